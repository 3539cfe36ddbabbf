//! A whole (non-streamed) answer in OpenAI's shape.
//!
//! An OpenAI-compatible upstream's answer is kept as the bytes it sent: the gateway only needs its
//! `model` (to put the client's name back) and its `usage`, which one borrowing pass finds without
//! building a map. The answer is parsed into an object only when something must read or change
//! all of it (a post-call guardrail), and then written out again.

use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{JsonObject, Usage};
use crate::json;

#[derive(Debug, Clone)]
pub struct WholeAnswer {
    /// The upstream's body as it came.
    sent: Bytes,
    /// Where the model's JSON value is in `sent`, if it has one.
    model: Option<Range<usize>>,
    usage: Option<Usage>,
    /// The answer as an object, once built or parsed: from then on it is what the client gets.
    object: Option<JsonObject>,
}

/// The two fields of an answer the gateway reads; serde skips the rest without allocating.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
}

impl WholeAnswer {
    /// An answer the gateway built (or translated from another dialect).
    pub fn from_object(object: JsonObject) -> WholeAnswer {
        WholeAnswer {
            sent: Bytes::new(),
            model: None,
            usage: None,
            object: Some(object),
        }
    }

    /// The upstream's body, which must be a JSON object.
    pub fn from_bytes(sent: Bytes) -> Result<WholeAnswer, serde_json::Error> {
        let starts_as_object = sent.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        // A struct also reads from an array, and refuses a repeated field; either way the full
        // parse decides (and names the problem).
        let fields = match starts_as_object {
            true => serde_json::from_slice::<Fields<'_>>(&sent).ok(),
            false => None,
        };
        let Some(fields) = fields else {
            return serde_json::from_slice(&sent).map(WholeAnswer::from_object);
        };
        let model = fields.model.map(|raw| span_in(&sent, raw.get()));
        let usage = fields
            .usage
            .filter(|raw| raw.get().starts_with('{'))
            .and_then(|raw| serde_json::from_str::<Usage>(raw.get()).ok());
        Ok(WholeAnswer {
            sent,
            model,
            usage,
            object: None,
        })
    }

    /// `usage`, if present and well formed.
    pub fn usage(&self) -> Option<Usage> {
        match &self.object {
            Some(object) => Usage::from_object(object),
            None => self.usage,
        }
    }

    /// The answer as an object, parsed now if it was not yet.
    pub fn object_mut(&mut self) -> Result<&mut JsonObject, serde_json::Error> {
        let object = match self.object.take() {
            Some(object) => object,
            None => serde_json::from_slice(&self.sent)?,
        };
        Ok(self.object.insert(object))
    }

    /// The body for the client, with `model` set to the name the client asked for.
    pub fn into_body(self, model: &str) -> Bytes {
        if let Some(mut object) = self.object {
            object.insert("model".into(), serde_json::Value::String(model.to_owned()));
            return Bytes::from(json::to_vec(&object));
        }
        let sent = &self.sent;
        let mut out = Vec::with_capacity(sent.len() + model.len() + 12);
        match self.model {
            Some(span) => {
                out.extend_from_slice(&sent[..span.start]);
                json::write_str(&mut out, model);
                out.extend_from_slice(&sent[span.end..]);
            }
            None => {
                // No model field: one goes first, so the rest is copied as it came.
                let open = sent.iter().position(|b| *b == b'{').map_or(0, |i| i + 1);
                let rest = &sent[open..];
                let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
                out.extend_from_slice(b"{\"model\":");
                json::write_str(&mut out, model);
                if !empty {
                    out.push(b',');
                }
                out.extend_from_slice(rest);
            }
        }
        Bytes::from(out)
    }
}

/// Where `part`, a slice of `whole` that serde borrowed, lies in it.
fn span_in(whole: &[u8], part: &str) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn relabelled(body: &str) -> Value {
        let answer = WholeAnswer::from_bytes(Bytes::from(body.to_owned())).expect("an object");
        serde_json::from_slice(&answer.into_body("client \"model\"")).expect("valid JSON")
    }

    #[test]
    fn the_model_is_replaced_and_everything_else_kept_in_order() {
        let body = r#"{"id":"x","model" : "gpt-4o-2024" ,"choices":[{"message":{"content":"hi"}}],"z":1,"a":2}"#;
        let out = relabelled(body);
        assert_eq!(out["model"], "client \"model\"");
        assert_eq!(out["choices"][0]["message"]["content"], "hi");
        let keys: Vec<_> = out.as_object().expect("object").keys().cloned().collect();
        assert_eq!(keys, ["id", "model", "choices", "z", "a"]);
    }

    #[test]
    fn a_missing_model_is_added() {
        assert_eq!(relabelled("{}"), json!({"model": "client \"model\""}));
        assert_eq!(
            relabelled(r#" { "id": "x" }"#),
            json!({"model": "client \"model\"", "id": "x"})
        );
    }

    #[test]
    fn usage_is_read_without_parsing_the_rest() {
        let body =
            r#"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let answer = WholeAnswer::from_bytes(Bytes::from_static(body.as_bytes())).expect("object");
        let usage = answer.usage().expect("usage");
        assert_eq!(usage.total_tokens, 7);
        let broken = r#"{"model":"m","usage":"lots"}"#;
        let answer =
            WholeAnswer::from_bytes(Bytes::from_static(broken.as_bytes())).expect("object");
        assert!(answer.usage().is_none());
    }

    #[test]
    fn repeated_fields_and_non_objects_take_the_full_parse() {
        let twice = r#"{"model":"a","model":"b","id":1}"#;
        let answer = WholeAnswer::from_bytes(Bytes::from_static(twice.as_bytes())).expect("object");
        let out: Value = serde_json::from_slice(&answer.into_body("c")).expect("json");
        assert_eq!(out, json!({"model": "c", "id": 1}));
        for bad in ["[1, 2]", "\"text\"", "{\"model\": ", ""] {
            assert!(
                WholeAnswer::from_bytes(Bytes::from(bad)).is_err(),
                "{bad:?} is not an object"
            );
        }
    }

    #[test]
    fn an_answer_parsed_for_a_guardrail_is_written_from_the_object() {
        let body = r#"{"model":"m","choices":[{"index":0,"message":{"content":"secret"}}]}"#;
        let mut answer =
            WholeAnswer::from_bytes(Bytes::from_static(body.as_bytes())).expect("object");
        let object = answer.object_mut().expect("parses");
        object.insert("note".into(), json!("added"));
        let out: Value = serde_json::from_slice(&answer.into_body("c")).expect("json");
        assert_eq!(out["note"], "added");
        assert_eq!(out["model"], "c");
    }
}
