//! The client-facing wire format: OpenAI's request bodies, checked once into [`ApiRequest`].

mod borrowed_chat;
mod request;
mod response;

pub use request::{ApiRequest, Derived, TextView};
pub use response::{choice_texts, set_choice_text, ChoiceText, ResponseView};

use serde_json::Value;

/// The text of a message's `content`: a string, or the `text` parts of an array joined by newlines.
pub fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        other => content_texts(other).collect::<Vec<_>>().join("\n"),
    }
}

/// Each text of a message's content, without copying: the string itself, or each text part.
fn content_texts(content: Option<&Value>) -> impl Iterator<Item = &str> {
    let (whole, parts) = match content {
        Some(Value::String(text)) => (Some(text.as_str()), None),
        Some(Value::Array(parts)) => (None, Some(parts)),
        _ => (None, None),
    };
    whole.into_iter().chain(
        parts
            .into_iter()
            .flatten()
            .filter(|part| part["type"] == "text")
            .filter_map(|part| part["text"].as_str()),
    )
}
