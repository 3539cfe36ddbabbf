//! An OpenAI-shaped object on its way from an upstream to the client: a whole answer, or one chunk
//! of a stream.
//!
//! An OpenAI-compatible upstream's object is kept as the bytes it sent. The gateway reads only a
//! few of its fields (`model`, to put the client's name back; `usage`; whether `choices` is empty
//! or a choice has finished; `error`), which one borrowing pass finds without building a map. The
//! object is parsed only when something must change it (a guardrail's rewrite), and then written
//! out again; a guardrail that only reads gets its view by another borrowing pass. Valid JSON
//! that `serde_json` values cannot hold (a number beyond `f64`, a lone surrogate escape, nesting
//! past 128) in a field the passes skip is relayed as it came, as any proxy would relay it; a
//! rewrite that must parse it fails the answer instead.

use std::ops::Range;

use bytes::Bytes;
use std::borrow::Cow;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::Value;

use super::{JsonObject, Usage};
use crate::json;
use crate::json::borrowed::{entry_span, span_in, splice, Present};
use crate::openai::ResponseView;

#[derive(Debug, Clone)]
pub struct RelayedObject {
    /// The upstream's bytes as they came (empty for an object the gateway built).
    sent: Bytes,
    fields: SentFields,
    /// The object, once built or parsed: from then on it is what the client gets.
    object: Option<JsonObject>,
}

/// What the borrowing pass found in `sent`; spans are of JSON values.
#[derive(Debug, Clone, Default)]
struct SentFields {
    model: Option<Range<usize>>,
    usage: Option<Range<usize>>,
    parsed_usage: Option<Usage>,
    usage_is_object: bool,
    no_choices: bool,
    finished: bool,
    error: Option<Range<usize>>,
    /// The `usage` entry (key, value and one comma), once the client is not to see it.
    dropped: Option<Range<usize>>,
}

/// The fields the gateway reads; serde skips the rest without allocating.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Present<'a>,
    #[serde(borrow, default)]
    usage: Present<'a>,
    #[serde(borrow, default)]
    error: Present<'a>,
    #[serde(default)]
    choices: Option<Vec<ChoicePeek>>,
}

/// Whether a choice has a non-null `finish_reason`. Read from an object only: a derived struct
/// would also read one from an array.
struct ChoicePeek {
    finished: bool,
}

impl<'de> Deserialize<'de> for ChoicePeek {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Choice;
        impl<'de> Visitor<'de> for Choice {
            type Value = ChoicePeek;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a choice object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChoicePeek, A::Error> {
                let mut finished = false;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "finish_reason" {
                        // The last of repeated keys counts, as in a parsed object.
                        finished = map.next_value::<&RawValue>()?.get() != "null";
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ChoicePeek { finished })
            }
        }
        deserializer.deserialize_map(Choice)
    }
}

impl RelayedObject {
    /// An object the gateway built (or translated from another dialect).
    pub fn from_object(object: JsonObject) -> RelayedObject {
        RelayedObject {
            sent: Bytes::new(),
            fields: SentFields::default(),
            object: Some(object),
        }
    }

    /// The upstream's bytes, which must be a JSON object.
    pub fn from_bytes(sent: Bytes) -> Result<RelayedObject, serde_json::Error> {
        let starts_as_object = sent.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        // A struct also reads from an array, and refuses a repeated field or a `choices` that
        // is not a list; in each case the full parse decides (and names any problem).
        // Skipped strings are not checked for UTF-8; the client must never get bytes that are
        // not text.
        let text = std::str::from_utf8(&sent).ok().filter(|_| starts_as_object);
        let peek = text.and_then(|text| serde_json::from_str::<Peek<'_>>(text).ok());
        let Some(peek) = peek else {
            return parsed(&sent);
        };
        // serde borrows raw values from the input; were one ever not, the parse decides.
        let span = |present: &Present<'_>| match present.0 {
            None => Ok(None),
            Some(raw) => span_in(&sent, raw.get()).map(Some).ok_or(()),
        };
        let (Ok(model), Ok(usage), Ok(error)) =
            (span(&peek.model), span(&peek.usage), span(&peek.error))
        else {
            return parsed(&sent);
        };
        let usage_raw = peek.usage.0.map(RawValue::get);
        let usage_is_object = usage_raw.is_some_and(|raw| raw.starts_with('{'));
        let parsed_usage = match usage_raw.filter(|_| usage_is_object) {
            None => None,
            // Read straight into its fields; a repeated key makes that fail, and then through a
            // value, as the object path reads it (the last counts).
            Some(raw) => match serde_json::from_str::<Usage>(raw) {
                Ok(usage) => Some(usage),
                Err(_) => match serde_json::from_str::<Value>(raw) {
                    Ok(value) => Usage::deserialize(&value).ok(),
                    Err(_) => return parsed(&sent),
                },
            },
        };
        let choices = peek.choices;
        let fields = SentFields {
            parsed_usage,
            usage_is_object,
            no_choices: choices.as_ref().is_some_and(Vec::is_empty),
            finished: choices.iter().flatten().any(|choice| choice.finished),
            model,
            usage,
            error,
            dropped: None,
        };
        Ok(RelayedObject {
            sent,
            fields,
            object: None,
        })
    }

    /// `usage`, if present and well formed.
    pub fn usage(&self) -> Option<Usage> {
        match &self.object {
            Some(object) => Usage::from_object(object),
            None => self.fields.parsed_usage,
        }
    }

    /// A chunk with no choices that carries usage: the usage chunk at a stream's end.
    pub fn is_usage_only(&self) -> bool {
        match &self.object {
            Some(object) => {
                let no_choices = object
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty);
                no_choices && object.get("usage").is_some_and(Value::is_object)
            }
            None => self.fields.no_choices && self.fields.usage_is_object,
        }
    }

    /// Whether a choice has a finish reason.
    pub fn has_finish_reason(&self) -> bool {
        match &self.object {
            Some(object) => object
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(|choices| choices.iter().any(|c| !c["finish_reason"].is_null())),
            None => self.fields.finished,
        }
    }

    /// The `error` field, if there is one; an error that cannot be read is an error too.
    pub fn error(&self) -> Result<Option<Value>, serde_json::Error> {
        match (&self.object, &self.fields.error) {
            (Some(object), _) => Ok(object.get("error").cloned()),
            (None, Some(span)) => serde_json::from_slice(&self.sent[span.clone()]).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Leaves `usage` out of what the client gets; fails only if that needs a parse that fails,
    /// and then nothing may be sent.
    pub fn drop_usage(&mut self) -> Result<(), serde_json::Error> {
        if self.object.is_none() {
            let Some(value) = self.fields.usage.clone() else {
                return Ok(());
            };
            if let Some(entry) = entry_span(&self.sent, value, "usage") {
                self.fields.dropped = Some(entry);
                return Ok(());
            }
        }
        // Written in a way the byte search does not follow (an escaped key): parse it.
        self.object_mut()?.shift_remove("usage");
        Ok(())
    }

    /// The object, parsed now if it was not yet.
    pub fn object_mut(&mut self) -> Result<&mut JsonObject, serde_json::Error> {
        let object = match self.object.take() {
            Some(object) => object,
            None => self.parse_sent()?,
        };
        Ok(self.object.insert(object))
    }

    /// What a post-call guardrail reads, without parsing the upstream's bytes into an object
    /// where one borrowing pass can read it; the bytes are still relayed as they came.
    pub fn response_view(&self) -> Result<ResponseView, serde_json::Error> {
        if let Some(object) = &self.object {
            return Ok(ResponseView::of(object));
        }
        // A usage cut out for the client is not part of the answer.
        let usage = self
            .fields
            .parsed_usage
            .filter(|_| self.fields.dropped.is_none());
        let peeked = std::str::from_utf8(&self.sent)
            .ok()
            .and_then(|text| ResponseView::peek(text, usage));
        match peeked {
            Some(view) => Ok(view),
            None => Ok(ResponseView::of(&self.parse_sent()?)),
        }
    }

    fn parse_sent(&self) -> Result<JsonObject, serde_json::Error> {
        let mut object: JsonObject = serde_json::from_slice(&self.sent)?;
        if self.fields.dropped.is_some() {
            object.shift_remove("usage");
        }
        Ok(object)
    }

    /// The object itself, parsed if it was not yet.
    pub fn into_object(mut self) -> Result<JsonObject, serde_json::Error> {
        self.object_mut()?;
        Ok(self.object.unwrap_or_default())
    }

    /// The JSON for the client, with `model` set to the name the client asked for.
    pub fn into_body(self, model: &str) -> Vec<u8> {
        if let Some(mut object) = self.object {
            object.insert("model".into(), Value::String(model.to_owned()));
            return json::to_vec(&object);
        }
        let sent = &self.sent[..];
        let has_model = self.fields.model.is_some();
        let mut edits: Vec<(Range<usize>, Option<&str>)> = Vec::with_capacity(2);
        if let Some(span) = self.fields.model {
            edits.push((span, Some(model)));
        }
        if let Some(span) = self.fields.dropped {
            edits.push((span, None));
        }
        let mut out = Vec::with_capacity(sent.len() + model.len() + 12);
        let mut rest = sent;
        if !has_model {
            // No model field: one goes first, so the rest is copied as it came.
            let open = sent.iter().position(|b| *b == b'{').map_or(0, |i| i + 1);
            rest = &sent[open..];
            for (span, _) in &mut edits {
                *span = span.start - open..span.end - open;
            }
            out.extend_from_slice(b"{\"model\":");
            json::write_str(&mut out, model);
            out.push(b',');
        }
        let first_entry = out.len();
        splice(rest, edits, &mut out);
        if !has_model && out[first_entry..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}')
        {
            // The object had nothing else: no comma after the model.
            out.remove(first_entry - 1);
        }
        out
    }
}

/// The full parse: for whatever the borrowing pass cannot vouch for; it names any problem.
fn parsed(sent: &[u8]) -> Result<RelayedObject, serde_json::Error> {
    serde_json::from_slice(sent).map(RelayedObject::from_object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sent(body: &str) -> RelayedObject {
        RelayedObject::from_bytes(Bytes::from(body.to_owned())).expect("an object")
    }

    fn relabelled(object: RelayedObject) -> Value {
        serde_json::from_slice(&object.into_body("client \"model\"")).expect("valid JSON")
    }

    #[test]
    fn the_model_is_replaced_and_everything_else_kept_in_order() {
        let body = r#"{"id":"x","model" : "gpt-4o-2024" ,"choices":[{"message":{"content":"hi"}}],"z":1,"a":2}"#;
        let out = relabelled(sent(body));
        assert_eq!(out["model"], "client \"model\"");
        assert_eq!(out["choices"][0]["message"]["content"], "hi");
        let keys: Vec<_> = out.as_object().expect("object").keys().cloned().collect();
        assert_eq!(keys, ["id", "model", "choices", "z", "a"]);
    }

    #[test]
    fn a_missing_or_null_model_is_set_once() {
        assert_eq!(relabelled(sent("{}")), json!({"model": "client \"model\""}));
        assert_eq!(
            relabelled(sent(r#" { "id": "x" }"#)),
            json!({"model": "client \"model\"", "id": "x"})
        );
        let null = sent(r#"{"model":null,"id":"x"}"#).into_body("c");
        assert_eq!(null, br#"{"model":"c","id":"x"}"#);
    }

    #[test]
    fn usage_is_read_without_parsing_the_rest() {
        let object = sent(
            r#"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        );
        assert_eq!(object.usage().map(|u| u.total_tokens), Some(7));
        assert!(sent(r#"{"model":"m","usage":"lots"}"#).usage().is_none());
        assert!(sent(r#"{"model":"m","usage":null}"#).usage().is_none());
    }

    #[test]
    fn usage_is_dropped_wherever_it_stands() {
        let cases = [
            (
                r#"{"usage":null,"id":"x"}"#,
                json!({"model": "c", "id": "x"}),
            ),
            (
                r#"{"id":"x" , "usage" : {"total_tokens":1} }"#,
                json!({"model": "c", "id": "x"}),
            ),
            (
                r#"{"id":"x","usage":null,"model":"m"}"#,
                json!({"id": "x", "model": "c"}),
            ),
            (r#"{"usage":null}"#, json!({"model": "c"})),
            (r#"{"model":"m","usage":null}"#, json!({"model": "c"})),
            // An escaped key is found by the parse instead.
            (
                r#"{"id":"x","\u0075sage":null}"#,
                json!({"id": "x", "model": "c"}),
            ),
        ];
        for (body, expected) in cases {
            let mut object = sent(body);
            object.drop_usage().expect("drops");
            let out: Value = serde_json::from_slice(&object.into_body("c")).expect(body);
            assert_eq!(out, expected, "{body}");
        }
    }

    #[test]
    fn the_byte_path_agrees_with_the_object_path() {
        let bodies = [
            r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"a\"b"},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3},"model":"m"}"#,
            "{\n  \"usage\" : null ,\n  \"model\" : \"m\"\n}",
            r#"{"id":"x","choices":[{"finish_reason":"stop","index":0}],"created":1}"#,
            r#"{"model":"\u006d","text":"\ud83d\ude00","usage":{"total_tokens":"odd"}}"#,
        ];
        for body in bodies {
            for drop in [false, true] {
                let mut by_bytes = sent(body);
                let mut by_object =
                    RelayedObject::from_object(serde_json::from_str(body).expect(body));
                assert_eq!(by_bytes.usage(), by_object.usage(), "{body}");
                assert_eq!(
                    by_bytes.is_usage_only(),
                    by_object.is_usage_only(),
                    "{body}"
                );
                assert_eq!(
                    by_bytes.has_finish_reason(),
                    by_object.has_finish_reason(),
                    "{body}"
                );
                if drop {
                    by_bytes.drop_usage().expect("drops");
                    by_object.drop_usage().expect("drops");
                }
                assert_eq!(relabelled(by_bytes), relabelled(by_object), "{body} {drop}");
            }
        }
    }

    #[test]
    fn what_a_skipping_pass_cannot_check_is_never_relayed_unchecked() {
        // Bytes that are not UTF-8 are not JSON, wherever they are.
        let not_text = b"{\"model\":\"m\",\"choices\":[{\"message\":{\"content\":\"a\xffb\"}}]}";
        assert!(RelayedObject::from_bytes(Bytes::from_static(not_text)).is_err());
        // A usage under an escaped key, in a body the parse refuses: nothing may go out.
        let mut escaped = sent(r#"{"id":"x","\u0075sage":{"total_tokens":5},"n":1e400}"#);
        assert!(escaped.drop_usage().is_err());
        // An error that cannot be read is still an error.
        assert!(sent(r#"{"error":"\ud800","model":"m"}"#).error().is_err());
        // A choice written as an array is no choice, as in a parsed object.
        assert!(!sent(r#"{"choices":[["stop"]]}"#).has_finish_reason());
        // A repeated key inside usage: the last counts, as in a parsed object.
        let twice = sent(
            r#"{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":1,"total_tokens":2}}"#,
        );
        assert_eq!(twice.usage().map(|u| u.total_tokens), Some(2));
    }

    #[test]
    fn chunks_say_whether_they_carry_only_usage_or_a_finish() {
        let usage_chunk = sent(r#"{"choices": [ ],"usage":{"total_tokens":2}}"#);
        assert!(usage_chunk.is_usage_only());
        let azure_opening = sent(r#"{"choices":[],"usage":null}"#);
        assert!(!azure_opening.is_usage_only());
        let delta = sent(r#"{"choices":[{"delta":{"content":"a"},"finish_reason":null}]}"#);
        assert!(!delta.has_finish_reason());
        let last = sent(r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#);
        assert!(last.has_finish_reason());
        let failed = sent(r#"{"error":{"message":"boom"}}"#);
        assert_eq!(
            failed.error().expect("reads"),
            Some(json!({"message": "boom"}))
        );
        assert_eq!(delta.error().expect("reads"), None);
    }

    #[test]
    fn repeated_fields_and_non_objects_take_the_full_parse() {
        let out: Value =
            serde_json::from_slice(&sent(r#"{"model":"a","model":"b","id":1}"#).into_body("c"))
                .expect("json");
        assert_eq!(out, json!({"model": "c", "id": 1}));
        let odd_choices = sent(r#"{"choices":{"x":1}}"#);
        assert!(!odd_choices.has_finish_reason());
        for bad in ["[1, 2]", "\"text\"", "{\"model\": ", ""] {
            assert!(
                RelayedObject::from_bytes(Bytes::from(bad)).is_err(),
                "{bad:?} is not an object"
            );
        }
    }

    #[test]
    fn an_object_parsed_for_a_guardrail_is_written_from_the_object() {
        let mut object = sent(
            r#"{"model":"m","usage":null,"choices":[{"index":0,"message":{"content":"secret"}}]}"#,
        );
        object.drop_usage().expect("drops");
        object
            .object_mut()
            .expect("parses")
            .insert("note".into(), json!("added"));
        let out = relabelled(object);
        assert_eq!(out["note"], "added");
        assert_eq!(out["model"], "client \"model\"");
        assert!(out.get("usage").is_none());
    }
}
