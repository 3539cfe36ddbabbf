//! OpenAI and OpenAI-compatible upstreams (vLLM, Ollama, Groq, Together, Mistral, DeepSeek,
//! OpenRouter...): the client's body passes through with only `model` (and, for streams,
//! `stream_options.include_usage`) set, so fields we do not know about still arrive.

use serde_json::Value;

use bytes::Bytes;

use super::{
    Decoded, Endpoint, JsonObject, ProviderError, RelayedObject, RequestBody, SentSpans,
    StreamDecoder, UnreadableBody, Upstream,
};
use crate::json::{self, borrowed};
use crate::sse::SseEvent;

pub(super) fn url(upstream: &Upstream, endpoint: Endpoint) -> String {
    format!("{}/{}", upstream.api_base, endpoint.path())
}

/// The client's body with the upstream's model id: the client's bytes with two values rewritten
/// where it can, else written from the object without copying it first.
pub(super) fn body(
    upstream: &Upstream,
    body: &RequestBody,
    stream: bool,
) -> Result<Vec<u8>, UnreadableBody> {
    let relayed = body
        .sent()
        .and_then(|(sent, spans)| relayed_body(sent, spans, &upstream.model, stream));
    match relayed {
        Some(bytes) => Ok(bytes),
        None => Ok(object_body(&upstream.model, body.object()?, stream)),
    }
}

/// The client's bytes with `model` replaced and, for a stream, `stream_options` moved to the end
/// with usage asked for; `None` if the bytes do not allow it (an escaped key).
fn relayed_body(sent: &[u8], spans: &SentSpans, model: &str, stream: bool) -> Option<Vec<u8>> {
    let mut edits = vec![(spans.model.clone(), Some(model))];
    let mut client_options = None;
    if let Some(value) = spans.stream_options.clone().filter(|_| stream) {
        // The client's options are kept; options that cannot be read are the object path's to
        // refuse, never dropped here.
        match serde_json::from_slice(&sent[value.clone()]) {
            Ok(Value::Object(options)) => client_options = Some(options),
            Ok(Value::Null) => {}
            _ => return None,
        }
        edits.push((borrowed::entry_span(sent, value, "stream_options")?, None));
    }
    let close = sent.iter().rposition(|b| *b == b'}')?;
    let mut out = Vec::with_capacity(sent.len() + model.len() + 48);
    borrowed::splice(&sent[..close], edits, &mut out);
    if stream {
        // `model` and `messages` are still there, so a comma always belongs before it.
        out.extend_from_slice(b",\"stream_options\":");
        json::write_object(&mut out, &asking_for_usage(client_options));
    }
    out.extend_from_slice(&sent[close..]);
    Some(out)
}

fn object_body(model: &str, body: &JsonObject, stream: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    let mut object = json::ObjectWriter::new(&mut out);
    object.str_entry("model", model);
    for (key, value) in body {
        match key.as_str() {
            "model" => {}
            "stream_options" if stream => {}
            _ => object.entry(key, value),
        }
    }
    if stream {
        let client_options = match body.get("stream_options") {
            Some(Value::Object(options)) => Some(options.clone()),
            _ => None,
        };
        object.entry(
            "stream_options",
            &Value::Object(asking_for_usage(client_options)),
        );
    }
    object.end();
    out
}

/// A stream's options as sent upstream: always asking for usage, so cost is known; the pipeline
/// hides the usage chunk from clients that did not ask for it.
fn asking_for_usage(client_options: Option<JsonObject>) -> JsonObject {
    let mut options = client_options.unwrap_or_default();
    options.insert("include_usage".into(), Value::Bool(true));
    options
}

/// OpenAI streams: each `data:` is a chunk object, `[DONE]` ends it, `{"error":...}` aborts it.
#[derive(Debug, Default)]
pub(super) struct ChunkDecoder;

impl StreamDecoder for ChunkDecoder {
    fn decode(&mut self, event: SseEvent) -> Result<Decoded, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(Decoded::Done);
        }
        let bytes = match data.len() == event.data.len() {
            true => Bytes::from(event.data),
            false => Bytes::copy_from_slice(data.as_bytes()),
        };
        let not_an_object = |e: serde_json::Error| {
            ProviderError::Protocol(format!(
                "the upstream sent a stream chunk that is not a JSON object: {e}"
            ))
        };
        let chunk = RelayedObject::from_bytes(bytes).map_err(not_an_object)?;
        if let Some(error) = chunk.error().map_err(not_an_object)? {
            return Err(ProviderError::Status {
                status: http::StatusCode::BAD_GATEWAY,
                message: super::client::error_message_of(&error),
                retry_after_s: None,
            });
        }
        Ok(Decoded::Chunks(vec![chunk]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn upstream() -> Upstream {
        Upstream {
            kind: super::super::ProviderKind::Openai,
            model: "gpt-4o-2024-08-06".into(),
            api_base: "https://api.openai.com/v1".into(),
            api_key: None,
            api_version: None,
            timeout: Duration::from_secs(1),
            stream_idle_timeout: Duration::from_secs(1),
            prepared: Default::default(),
        }
    }

    fn object(value: Value) -> RequestBody {
        RequestBody::from_object(value.as_object().cloned().unwrap_or_default())
    }

    /// The client's bytes, with their spans found as the chat pass finds them.
    fn sent(text: &str) -> RequestBody {
        #[derive(serde::Deserialize)]
        struct Spans<'a> {
            #[serde(borrow, default)]
            model: borrowed::Present<'a>,
            #[serde(borrow, default)]
            stream_options: borrowed::Present<'a>,
        }
        let found: Spans<'_> = serde_json::from_str(text).expect("an object");
        let span = |raw: &str| borrowed::span_in(text.as_bytes(), raw).expect("borrowed");
        let spans = SentSpans {
            model: span(found.model.raw().expect("a model")),
            stream_options: found.stream_options.raw().map(span),
        };
        RequestBody::from_sent(Bytes::copy_from_slice(text.as_bytes()), spans)
    }

    fn written(body: &RequestBody, stream: bool) -> Value {
        serde_json::from_slice(&super::body(&upstream(), body, stream).expect("written"))
            .expect("json")
    }

    #[test]
    fn passthrough_sets_model_and_keeps_unknown_fields() {
        let client = json!({"model": "alias", "messages": [], "x_custom": {"a": 1}});
        let expected = json!({"model": "gpt-4o-2024-08-06", "messages": [], "x_custom": {"a": 1}});
        assert_eq!(written(&object(client.clone()), false), expected);
        assert_eq!(written(&sent(&client.to_string()), false), expected);
    }

    #[test]
    fn relayed_bytes_change_only_the_model() {
        let text = "{ \"messages\": [ ],\n  \"model\" : \"alias\", \"x\": 1.50 }";
        let relayed = super::body(&upstream(), &sent(text), false).expect("written");
        assert_eq!(
            String::from_utf8(relayed).expect("text"),
            "{ \"messages\": [ ],\n  \"model\" : \"gpt-4o-2024-08-06\", \"x\": 1.50 }"
        );
    }

    #[test]
    fn streams_always_ask_for_usage() {
        let bodies = [
            r#"{"model": "a", "messages": [], "stream": true, "stream_options": {"other": 1}}"#,
            r#"{"stream_options": {"include_usage": false}, "model": "a", "stream": true}"#,
            r#"{"model": "a", "stream_options": null, "stream": true}"#,
            r#"{"model": "a", "stream": true, "messages": [] }"#,
        ];
        for text in bodies {
            let client: Value = serde_json::from_str(text).expect("json");
            let by_object = written(&object(client.clone()), true);
            let by_bytes = written(&sent(text), true);
            assert_eq!(by_object, by_bytes, "{text}");
            assert_eq!(by_bytes["model"], "gpt-4o-2024-08-06");
            assert_eq!(by_bytes["stream_options"]["include_usage"], true);
            let kept = client["stream_options"]["other"].clone();
            assert_eq!(by_bytes["stream_options"]["other"], kept);
        }
    }

    #[test]
    fn an_escaped_key_is_written_from_the_object() {
        let text = r#"{"model": "a", "stream_opti\u006fns": {"other": 1}}"#;
        let by_bytes = written(&sent(text), true);
        assert_eq!(
            by_bytes["stream_options"],
            json!({"other": 1, "include_usage": true})
        );
    }

    #[test]
    fn stream_options_that_cannot_be_read_are_refused_not_dropped() {
        let text = r#"{"model": "a", "stream": true, "stream_options": {"x": "\ud800"}}"#;
        let refused = super::body(&upstream(), &sent(text), true).expect_err("unreadable");
        assert!(refused.to_string().contains("not valid JSON"), "{refused}");
    }

    #[test]
    fn values_serde_cannot_hold_are_relayed_as_written_where_nothing_reads_them() {
        let text = r#"{"model": "a", "x": "\ud800", "n": 1e400}"#;
        let relayed = super::body(&upstream(), &sent(text), false).expect("relayed");
        assert_eq!(
            String::from_utf8(relayed).expect("text"),
            r#"{"model": "gpt-4o-2024-08-06", "x": "\ud800", "n": 1e400}"#
        );
    }

    #[test]
    fn decoder_handles_done_chunks_and_errors() {
        let mut decoder = ChunkDecoder;
        let event = |data: &str| SseEvent {
            event: None,
            data: data.into(),
        };
        assert!(matches!(decoder.decode(event("[DONE]")), Ok(Decoded::Done)));
        assert!(
            matches!(decoder.decode(event("{\"id\":1}")), Ok(Decoded::Chunks(c)) if c.len() == 1)
        );
        assert!(decoder
            .decode(event("{\"error\":{\"message\":\"boom\"}}"))
            .is_err());
        assert!(decoder.decode(event("not json")).is_err());
    }
}
