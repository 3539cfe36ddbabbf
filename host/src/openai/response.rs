//! The texts of OpenAI responses and stream chunks, read and written in place, for guardrails.
//! Chat choices carry `message.content` (whole) or `delta.content` (chunks); legacy completions
//! carry `text` in both.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::content_text;
use crate::json::borrowed::{ObjectOf, Present};
use crate::providers::{JsonObject, Usage};

/// One choice's text as a guardrail sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChoiceText {
    pub index: usize,
    pub text: String,
    pub finish_reason: Option<String>,
}

fn choices(object: &JsonObject) -> impl Iterator<Item = (usize, &JsonObject)> {
    object
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(position, choice)| {
            let choice = choice.as_object()?;
            let index = choice
                .get("index")
                .and_then(Value::as_u64)
                .map_or(position, |i| i as usize);
            Some((index, choice))
        })
}

/// Where a choice keeps its text: `message` in whole chat responses, `delta` in chat chunks.
fn text_holder(choice: &JsonObject) -> Option<&'static str> {
    ["message", "delta"]
        .into_iter()
        .find(|field| choice.get(*field).is_some_and(Value::is_object))
}

fn choice_text(choice: &JsonObject) -> Option<String> {
    match text_holder(choice) {
        Some(holder) => choice[holder]
            .get("content")
            .filter(|c| !c.is_null())
            .map(|c| content_text(Some(c))),
        None => choice
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_owned),
    }
}

/// The text of every choice of a whole response or a chunk (empty where a choice has none).
pub fn choice_texts(object: &JsonObject) -> Vec<ChoiceText> {
    choices(object)
        .map(|(index, choice)| ChoiceText {
            index,
            text: choice_text(choice).unwrap_or_default(),
            finish_reason: choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
        .collect()
}

/// What a post-call guardrail reads of a whole response.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseView {
    /// Empty where the response names none.
    pub model: String,
    pub choices: Vec<ChoiceText>,
    pub usage: Option<Usage>,
}

impl ResponseView {
    pub fn of(object: &JsonObject) -> ResponseView {
        ResponseView {
            model: object
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            choices: choice_texts(object),
            usage: Usage::from_object(object),
        }
    }

    /// The view of a whole response's JSON text by one borrowing pass, which reads what [`of`]
    /// reads of the parsed object and builds nothing else; `usage` is the caller's. `None` where
    /// the text strays from the plain shape (a repeated field it reads, an `index` or content
    /// it cannot read as a value), and then the parsed object decides.
    ///
    /// [`of`]: ResponseView::of
    pub fn peek(text: &str, usage: Option<Usage>) -> Option<ResponseView> {
        let ObjectOf(top) = serde_json::from_str::<ObjectOf<ResponsePeek<'_>>>(text).ok()?;
        let listed = match top.choices.raw() {
            Some(raw) if raw.starts_with('[') => {
                serde_json::from_str::<Vec<&RawValue>>(raw).ok()?
            }
            _ => Vec::new(),
        };
        let mut choices = Vec::with_capacity(listed.len());
        for (position, raw) in listed.iter().enumerate() {
            // Anything but an object is no choice, though it keeps its place.
            if !raw.get().starts_with('{') {
                continue;
            }
            let choice: ChoicePeek<'_> = serde_json::from_str(raw.get()).ok()?;
            let index = match choice.index.raw() {
                None => position,
                Some(raw) => serde_json::from_str::<Value>(raw)
                    .ok()?
                    .as_u64()
                    .map_or(position, |i| i as usize),
            };
            let holder = [&choice.message, &choice.delta]
                .into_iter()
                .find_map(|field| field.raw().filter(|raw| raw.starts_with('{')));
            let text = match holder {
                Some(holder) => {
                    let holder: HolderPeek<'_> = serde_json::from_str(holder).ok()?;
                    match holder.content.raw() {
                        None | Some("null") => String::new(),
                        Some(raw) if raw.starts_with('"') => serde_json::from_str(raw).ok()?,
                        Some(raw) => content_text(Some(&serde_json::from_str(raw).ok()?)),
                    }
                }
                None => string_in(&choice.text)?.unwrap_or_default(),
            };
            choices.push(ChoiceText {
                index,
                text,
                finish_reason: string_in(&choice.finish_reason)?,
            });
        }
        Some(ResponseView {
            model: string_in(&top.model)?.unwrap_or_default(),
            choices,
            usage,
        })
    }

    /// What a rewrite of the object by [`set_choice_text`] changes, seen by the next guardrail.
    pub fn set_text(&mut self, index: usize, text: String) {
        if let Some(choice) = self.choices.iter_mut().find(|c| c.index == index) {
            choice.text = text;
        }
    }
}

/// The fields of a response that [`ResponseView::peek`] reads.
#[derive(Deserialize)]
struct ResponsePeek<'a> {
    #[serde(borrow, default)]
    model: Present<'a>,
    #[serde(borrow, default)]
    choices: Present<'a>,
}

#[derive(Deserialize)]
struct ChoicePeek<'a> {
    #[serde(borrow, default)]
    index: Present<'a>,
    #[serde(borrow, default)]
    message: Present<'a>,
    #[serde(borrow, default)]
    delta: Present<'a>,
    #[serde(borrow, default)]
    text: Present<'a>,
    #[serde(borrow, default)]
    finish_reason: Present<'a>,
}

#[derive(Deserialize)]
struct HolderPeek<'a> {
    #[serde(borrow, default)]
    content: Present<'a>,
}

/// A field's string, `Some(None)` if it is absent or holds anything else (as `Value::as_str`
/// reads it), `None` if the string cannot be read.
fn string_in(field: &Present<'_>) -> Option<Option<String>> {
    match field.raw() {
        Some(raw) if raw.starts_with('"') => serde_json::from_str(raw).ok().map(Some),
        _ => Some(None),
    }
}

/// Replaces the text of the choice with this `index`; false if there is no such choice.
pub fn set_choice_text(object: &mut JsonObject, index: usize, text: String) -> bool {
    let Some(Value::Array(list)) = object.get_mut("choices") else {
        return false;
    };
    let found = list.iter_mut().enumerate().find_map(|(position, choice)| {
        let choice = choice.as_object_mut()?;
        let own = choice
            .get("index")
            .and_then(Value::as_u64)
            .map_or(position, |i| i as usize);
        (own == index).then_some(choice)
    });
    let Some(choice) = found else {
        return false;
    };
    match text_holder(choice) {
        Some(holder) => {
            if let Some(Value::Object(holder)) = choice.get_mut(holder) {
                holder.insert("content".into(), Value::String(text));
            }
        }
        None => {
            choice.insert("text".into(), Value::String(text));
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> JsonObject {
        value.as_object().cloned().expect("an object")
    }

    #[test]
    fn reads_and_writes_chat_completions_and_chunks() {
        let mut whole = object(json!({"choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": [{"type": "text", "text": "a"}]}, "finish_reason": null}
        ]}));
        let texts = choice_texts(&whole);
        assert_eq!(texts[0].text, "hello");
        assert_eq!(texts[0].finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            (texts[1].text.as_str(), texts[1].finish_reason.is_none()),
            ("a", true)
        );
        assert!(set_choice_text(&mut whole, 1, "b".into()));
        assert_eq!(whole["choices"][1]["message"]["content"], "b");
        assert!(!set_choice_text(&mut whole, 7, "x".into()));

        let mut chunk = object(json!({"choices": [{"index": 0, "delta": {"content": "hi"}}]}));
        assert_eq!(choice_texts(&chunk)[0].text, "hi");
        set_choice_text(&mut chunk, 0, "HI".into());
        assert_eq!(chunk["choices"][0]["delta"]["content"], "HI");

        let legacy =
            object(json!({"choices": [{"index": 0, "text": "old", "finish_reason": "length"}]}));
        assert_eq!(choice_texts(&legacy)[0].text, "old");
        let role_only = object(json!({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}));
        assert_eq!(choice_texts(&role_only)[0].text, "");
    }

    /// Responses in the plain shape, which the borrowing pass must read.
    const PLAIN: &[&str] = &[
        r#"{"id":"x","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
        r#"{"choices":[{"index":1,"message":{"content":[{"type":"text","text":"a"},{"type":"image_url"},{"type":"text","text":"b"}]}},{"index":0,"message":{"content":null},"finish_reason":null}]}"#,
        r#"{"choices":[{"text":"legacy \u00e9\n","finish_reason":"length"},7,{"message":"not an object","delta":{"content":"d"}}]}"#,
        r#"{"model":null,"choices":null}"#,
        r#"{"model":5,"choices":{"index":0}}"#,
        r#"{"choices":[{"index":-0,"message":{"content":17}},{"index":2.0,"text":3,"finish_reason":false},{"index":null}]}"#,
        r#"{"ch\u006fices":[{"index":4,"message":{"content":"escaped key"}}]}"#,
        r#"{}"#,
    ];

    /// What the pass may hand to the parse instead.
    const STRAYING: &[&str] = &[
        r#"{"model":"a","model":"b","choices":[]}"#,
        r#"{"choices":[{"index":0,"message":{"content":"x","content":"y"}}]}"#,
        r#"{"choices":[{"index":0,"index":1,"text":"x"}]}"#,
        r#"["not", "an", "object"]"#,
    ];

    #[test]
    fn the_borrowing_pass_reads_what_the_parsed_object_shows() {
        for text in PLAIN.iter().chain(STRAYING) {
            let Ok(parsed) = serde_json::from_str::<JsonObject>(text) else {
                assert_eq!(ResponseView::peek(text, None), None, "{text}");
                continue;
            };
            let usage = Usage::from_object(&parsed);
            let expected = ResponseView::of(&parsed);
            match ResponseView::peek(text, usage) {
                Some(view) => assert_eq!(view, expected, "{text}"),
                None => assert!(STRAYING.contains(text), "plain, yet not read: {text}"),
            }
        }
    }

    #[test]
    fn a_rewritten_text_is_what_the_view_shows_next() {
        let text = PLAIN[1];
        let mut object: JsonObject = serde_json::from_str(text).expect("json");
        let mut view = ResponseView::peek(text, None).expect("plain");
        assert!(set_choice_text(&mut object, 0, "new".into()));
        view.set_text(0, "new".into());
        assert_eq!(view, ResponseView::of(&object));
    }
}
