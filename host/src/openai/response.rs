//! The texts of OpenAI responses and stream chunks, read and written in place, for guardrails.
//! Chat choices carry `message.content` (whole) or `delta.content` (chunks); legacy completions
//! carry `text` in both.

use std::borrow::Cow;
use std::marker::PhantomData;

use serde::de::value::SeqAccessDeserializer;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::content_text;
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

    /// The view of a whole response's or a chunk's JSON text, read in one pass that builds
    /// nothing else; `usage` is the caller's. `None` where the text strays from the plain shape
    /// (not an object, or a field it reads given twice), and then the parsed object decides.
    pub fn peek(text: &str, usage: Option<Usage>) -> Option<ResponseView> {
        let top: Shallow<TopFields> = serde_json::from_str(text).ok()?;
        let Shallow::Object(top) = top else {
            return None;
        };
        Some(ResponseView {
            model: top.model.and_then(Shallow::into_str).unwrap_or_default(),
            choices: match top.choices {
                Some(Shallow::List(ChoiceList(choices))) => choices,
                _ => Vec::new(),
            },
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

/// A value as [`ResponseView::peek`] reads it: a string, an unsigned integer, an object read
/// by `T`, a list read by `L`, or anything else, skipped. Each is what `Value::as_str`,
/// `as_u64`, `as_object` and `as_array` would find in the parsed value.
enum Shallow<T, L = Skipped> {
    Str(String),
    Unsigned(u64),
    Object(T),
    List(L),
    Other,
}

impl<T, L> Shallow<T, L> {
    fn into_str(self) -> Option<String> {
        match self {
            Shallow::Str(text) => Some(text),
            _ => None,
        }
    }
}

/// An object's fields, read as a map visitor meets them.
trait FromMap<'de>: Sized {
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

/// A list's elements, read as a sequence visitor meets them.
trait FromSeq<'de>: Sized {
    fn from_seq<A: SeqAccess<'de>>(seq: A) -> Result<Self, A::Error>;
}

/// An object or list whose contents do not matter.
struct Skipped;

impl<'de> FromMap<'de> for Skipped {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Skipped)
    }
}

impl<'de> FromSeq<'de> for Skipped {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Skipped)
    }
}

impl<'de, T: FromMap<'de>, L: FromSeq<'de>> Deserialize<'de> for Shallow<T, L> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ShallowVisitor<T, L>(PhantomData<(T, L)>);
        impl<'de, T: FromMap<'de>, L: FromSeq<'de>> Visitor<'de> for ShallowVisitor<T, L> {
            type Value = Shallow<T, L>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Shallow::Str(text.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, number: u64) -> Result<Self::Value, E> {
                Ok(Shallow::Unsigned(number))
            }
            fn visit_i64<E: de::Error>(self, number: i64) -> Result<Self::Value, E> {
                Ok(u64::try_from(number).map_or(Shallow::Other, Shallow::Unsigned))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Shallow::Other)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Shallow::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Shallow::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                L::from_seq(seq).map(Shallow::List)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::from_map(map).map(Shallow::Object)
            }
        }
        deserializer.deserialize_any(ShallowVisitor(PhantomData))
    }
}

/// Sets a field read once; a field given twice sends the text to the parse, where the last
/// counts.
fn once<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    match slot.replace(value) {
        None => Ok(()),
        Some(_) => Err(E::custom("a field given twice")),
    }
}

/// The fields of a response or chunk that [`ResponseView::peek`] reads.
struct TopFields {
    model: Option<Shallow<Skipped>>,
    choices: Option<Shallow<Skipped, ChoiceList>>,
}

impl<'de> FromMap<'de> for TopFields {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut fields = TopFields {
            model: None,
            choices: None,
        };
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "model" => once(&mut fields.model, map.next_value()?)?,
                "choices" => once(&mut fields.choices, map.next_value()?)?,
                _ => drop(map.next_value::<IgnoredAny>()?),
            }
        }
        Ok(fields)
    }
}

/// `choices`: the texts of its objects, each at its `index` or its place in the list.
struct ChoiceList(Vec<ChoiceText>);

impl<'de> FromSeq<'de> for ChoiceList {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut choices = Vec::new();
        let mut position = 0;
        while let Some(element) = seq.next_element::<Shallow<ChoiceFields>>()? {
            if let Shallow::Object(choice) = element {
                choices.push(choice.into_text(position));
            }
            position += 1;
        }
        Ok(ChoiceList(choices))
    }
}

#[derive(Default)]
struct ChoiceFields {
    index: Option<Shallow<Skipped>>,
    message: Option<Shallow<HolderFields>>,
    delta: Option<Shallow<HolderFields>>,
    text: Option<Shallow<Skipped>>,
    finish_reason: Option<Shallow<Skipped>>,
}

impl<'de> FromMap<'de> for ChoiceFields {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut fields = ChoiceFields::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "index" => once(&mut fields.index, map.next_value()?)?,
                "message" => once(&mut fields.message, map.next_value()?)?,
                "delta" => once(&mut fields.delta, map.next_value()?)?,
                "text" => once(&mut fields.text, map.next_value()?)?,
                "finish_reason" => once(&mut fields.finish_reason, map.next_value()?)?,
                _ => drop(map.next_value::<IgnoredAny>()?),
            }
        }
        Ok(fields)
    }
}

impl ChoiceFields {
    fn into_text(self, position: usize) -> ChoiceText {
        let index = match self.index {
            Some(Shallow::Unsigned(index)) => index as usize,
            _ => position,
        };
        // As `text_holder` reads it: `message` if it is an object, else `delta` if it is.
        let holder = [self.message, self.delta]
            .into_iter()
            .find_map(|field| match field {
                Some(Shallow::Object(holder)) => Some(holder),
                _ => None,
            });
        let text = match holder {
            Some(holder) => holder.content.unwrap_or_default(),
            None => self.text.and_then(Shallow::into_str).unwrap_or_default(),
        };
        ChoiceText {
            index,
            text,
            finish_reason: self.finish_reason.and_then(Shallow::into_str),
        }
    }
}

/// A `message` or `delta` object: its `content` as [`content_text`] reads it.
struct HolderFields {
    content: Option<String>,
}

impl<'de> FromMap<'de> for HolderFields {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut content = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "content" {
                let text = match map.next_value::<Shallow<Skipped, Parts>>()? {
                    Shallow::Str(text) => text,
                    Shallow::List(Parts(parts)) => content_text(Some(&parts)),
                    _ => String::new(),
                };
                once(&mut content, text)?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(HolderFields { content })
    }
}

/// A list of content parts, read as a value: parts are few, and rare in answers.
struct Parts(Value);

impl<'de> FromSeq<'de> for Parts {
    fn from_seq<A: SeqAccess<'de>>(seq: A) -> Result<Self, A::Error> {
        Value::deserialize(SeqAccessDeserializer::new(seq)).map(Parts)
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

    /// Responses and stream chunks in the plain shape, which the borrowing pass must read.
    const PLAIN: &[&str] = &[
        r#"{"id":"x","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
        r#"{"choices":[{"index":1,"message":{"content":[{"type":"text","text":"a"},{"type":"image_url"},{"type":"text","text":"b"}]}},{"index":0,"message":{"content":null},"finish_reason":null}]}"#,
        r#"{"choices":[{"text":"legacy \u00e9\n","finish_reason":"length"},7,{"message":"not an object","delta":{"content":"d"}}]}"#,
        r#"{"model":null,"choices":null}"#,
        r#"{"model":5,"choices":{"index":0}}"#,
        r#"{"choices":[{"index":-0,"message":{"content":17}},{"index":2.0,"text":3,"finish_reason":false},{"index":null}]}"#,
        r#"{"ch\u006fices":[{"index":4,"message":{"content":"escaped key"}}]}"#,
        r#"{}"#,
        r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"he said \"hi\""},"finish_reason":null}]}"#,
        r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#,
        r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
        r#"{"choices":[[1,2],"x",{"index":"1","delta":{"content":{"a":1}}},{"message":[1],"text":"t"}]}"#,
        r#"{"choices":[{"index":18446744073709551615,"text":"max","finish_reason":7}],"model":{"name":"m"}}"#,
        r#"{"model":"m","choices":[{"delta":{"role":"assistant","content":[{"type":"text","text":"p"},{"type":"text","text":"q"}]},"finish_reason":"stop"}]}"#,
    ];

    /// What the pass may hand to the parse instead.
    const STRAYING: &[&str] = &[
        r#"{"model":"a","model":"b","choices":[]}"#,
        r#"{"choices":[{"index":0,"message":{"content":"x","content":"y"}}]}"#,
        r#"{"choices":[{"index":0,"index":1,"text":"x"}]}"#,
        r#"["not", "an", "object"]"#,
        r#"{"choices":[],"choices":[{"text":"a"}]}"#,
        r#"{"choices":[{"delta":{"content":"a"},"finish_reason":null,"finish_reason":"stop"}]}"#,
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
