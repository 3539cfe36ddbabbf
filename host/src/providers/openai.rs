//! OpenAI and OpenAI-compatible upstreams (vLLM, Ollama, Groq, Together, Mistral, DeepSeek,
//! OpenRouter...): the client's body passes through with only `model` (and, for streams,
//! `stream_options.include_usage`) set, so fields we do not know about still arrive.

use serde_json::Value;

use bytes::Bytes;

use super::{Decoded, Endpoint, JsonObject, ProviderError, RelayedObject, StreamDecoder, Upstream};
use crate::json;
use crate::sse::SseEvent;

pub(super) fn url(upstream: &Upstream, endpoint: Endpoint) -> String {
    format!("{}/{}", upstream.api_base, endpoint.path())
}

/// The client's body with the upstream's model id, written without copying the body first.
pub(super) fn body(upstream: &Upstream, body: &JsonObject, stream: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    let mut object = json::ObjectWriter::new(&mut out);
    object.str_entry("model", &upstream.model);
    for (key, value) in body {
        match key.as_str() {
            "model" => {}
            // Always ask for usage so cost is known; the pipeline hides the usage chunk from
            // clients that did not ask for it.
            "stream_options" if stream => {}
            _ => object.entry(key, value),
        }
    }
    if stream {
        let mut options = match body.get("stream_options") {
            Some(Value::Object(options)) => options.clone(),
            _ => JsonObject::new(),
        };
        options.insert("include_usage".into(), Value::Bool(true));
        object.entry("stream_options", &Value::Object(options));
    }
    object.end();
    out
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
        }
    }

    #[test]
    fn passthrough_sets_model_and_keeps_unknown_fields() {
        let Value::Object(client) = json!({"model": "alias", "messages": [], "x_custom": {"a": 1}})
        else {
            panic!("object")
        };
        let sent: Value = serde_json::from_slice(&body(&upstream(), &client, false)).expect("json");
        assert_eq!(
            sent,
            json!({"model": "gpt-4o-2024-08-06", "messages": [], "x_custom": {"a": 1}})
        );
    }

    #[test]
    fn streams_always_ask_for_usage() {
        let Value::Object(client) =
            json!({"model": "a", "stream": true, "stream_options": {"other": 1}})
        else {
            panic!("object")
        };
        let sent: Value = serde_json::from_slice(&body(&upstream(), &client, true)).expect("json");
        assert_eq!(
            sent["stream_options"],
            json!({"other": 1, "include_usage": true})
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
