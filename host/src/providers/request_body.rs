//! A request body on its way to an upstream.
//!
//! A body whose fields were checked by a borrowing pass is kept as the bytes the client sent, with
//! where its `model` and `stream_options` values lie: an OpenAI-compatible upstream gets those
//! bytes with the two rewritten. **It is parsed into an object only when something reads all of
//! it** (a guardrail's rewrite, a translating dialect, the built-in mock), and at most once;
//! plugins' texts and token estimates are read from the bytes.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::JsonObject;

#[derive(Debug, Clone)]
pub struct RequestBody {
    /// The client's bytes, when they may be relayed (empty for a body built as an object).
    sent: Bytes,
    spans: SentSpans,
    object: OnceLock<Result<Arc<JsonObject>, UnreadableBody>>,
}

/// Where values the gateway rewrites lie in the client's bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SentSpans {
    pub model: Range<usize>,
    pub stream_options: Option<Range<usize>>,
}

/// Bytes a borrowing pass accepted that are still not a JSON object `serde_json` can hold (a
/// number like `1e400`, a lone surrogate escape, nesting deeper than 128): the client's mistake,
/// found when something first reads the whole body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the request body is not valid JSON: {0}")]
pub struct UnreadableBody(String);

impl RequestBody {
    /// A body built (or already parsed) as an object.
    pub fn from_object(object: JsonObject) -> RequestBody {
        RequestBody {
            sent: Bytes::new(),
            spans: SentSpans::default(),
            object: OnceLock::from(Ok(Arc::new(object))),
        }
    }

    /// The client's bytes, whose `model` value (and `stream_options` value, if any) lie at
    /// `spans`; the caller has checked the fields the gateway reads.
    pub fn from_sent(sent: Bytes, spans: SentSpans) -> RequestBody {
        debug_assert!(spans.model.end <= sent.len());
        RequestBody {
            sent,
            spans,
            object: OnceLock::new(),
        }
    }

    /// The body as an object, parsed now if it was not yet.
    pub fn object(&self) -> Result<&Arc<JsonObject>, UnreadableBody> {
        self.object
            .get_or_init(|| {
                serde_json::from_slice(&self.sent)
                    .map(Arc::new)
                    .map_err(|e| UnreadableBody(e.to_string()))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The client's bytes and where the rewritten values lie, if the body may be relayed as sent.
    pub fn sent(&self) -> Option<(&Bytes, &SentSpans)> {
        (!self.sent.is_empty()).then_some((&self.sent, &self.spans))
    }

    /// The body as JSON text, for a plugin that asks for it: the client's own bytes if it can.
    pub fn to_json(&self) -> Result<String, UnreadableBody> {
        if let Some((sent, _)) = self.sent() {
            if let Ok(text) = std::str::from_utf8(sent) {
                return Ok(text.to_owned());
            }
        }
        let object = self.object()?;
        String::from_utf8(crate::json::to_vec(object)).map_err(|e| UnreadableBody(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sent_bytes_are_parsed_once_and_only_when_asked() {
        let sent = Bytes::from_static(br#"{"model": "m", "messages": []}"#);
        let spans = SentSpans {
            model: 10..13,
            stream_options: None,
        };
        let body = RequestBody::from_sent(sent.clone(), spans.clone());
        assert_eq!(body.sent(), Some((&sent, &spans)));
        assert_eq!(
            body.to_json().as_deref(),
            Ok(r#"{"model": "m", "messages": []}"#)
        );
        let first = Arc::clone(body.object().expect("an object"));
        assert_eq!(first["model"], "m");
        assert!(Arc::ptr_eq(&first, body.object().expect("an object")));
    }

    #[test]
    fn a_body_serde_cannot_hold_is_the_clients_error() {
        let body = RequestBody::from_sent(
            Bytes::from_static(br#"{"model": "m", "n": 1e400}"#),
            SentSpans {
                model: 10..13,
                stream_options: None,
            },
        );
        let error = body.object().expect_err("out of range");
        assert!(error
            .to_string()
            .starts_with("the request body is not valid JSON"));
        assert!(body.object().is_err());
    }

    #[test]
    fn objects_are_not_relayed_as_bytes() {
        let object = json!({"model": "m"})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let body = RequestBody::from_object(object);
        assert_eq!(body.sent(), None);
        assert_eq!(body.to_json().as_deref(), Ok(r#"{"model":"m"}"#));
    }
}
