//! The client-facing wire format: OpenAI's request bodies, checked once into [`ApiRequest`].

mod request;
mod response;

pub use request::{ApiRequest, TextView};
pub use response::{choice_texts, set_choice_text, ChoiceText};

use serde_json::Value;

/// The text of a message's `content`: a string, or the `text` parts of an array joined by newlines.
pub fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|part| part["type"] == "text")
            .filter_map(|part| part["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}
