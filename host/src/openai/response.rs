//! The texts of OpenAI responses and stream chunks, read and written in place, for guardrails.
//! Chat choices carry `message.content` (whole) or `delta.content` (chunks); legacy completions
//! carry `text` in both.

use serde_json::Value;

use super::content_text;
use crate::providers::JsonObject;

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
}
