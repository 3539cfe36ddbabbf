//! The `mock` provider: deterministic answers with no network, so the example config serves on a
//! fresh machine and benchmarks have an upstream that costs nothing.
//!
//! Chat echoes the last user message, completions echo the prompt, embeddings are derived from the
//! input's hash; usage counts come from [`crate::tokens::estimate`] over the real texts.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::stream;
use serde_json::{json, Value};

use super::{Endpoint, JsonObject, ProviderError, RelayedObject, Reply, Upstream, Usage};
use crate::openai;
use crate::tokens;

pub(super) fn reply(
    upstream: &Upstream,
    endpoint: Endpoint,
    body: &JsonObject,
    stream: bool,
) -> Result<Reply, ProviderError> {
    match endpoint {
        Endpoint::ChatCompletions => Ok(chat(&upstream.model, body, stream)),
        Endpoint::Completions => Ok(completion(&upstream.model, body, stream)),
        Endpoint::Embeddings => Ok(Reply::Whole(RelayedObject::from_object(embeddings(
            &upstream.model,
            body,
        )))),
    }
}

fn chat(model: &str, body: &JsonObject, stream: bool) -> Reply {
    let messages = body.get("messages").and_then(Value::as_array);
    let prompt: String = messages
        .into_iter()
        .flatten()
        .map(|m| openai::content_text(m.get("content")))
        .collect::<Vec<_>>()
        .join("\n");
    let last_user = messages
        .and_then(|ms| ms.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| openai::content_text(m.get("content")))
        .unwrap_or_default();
    let text = if last_user.is_empty() {
        "(no user message)".to_owned()
    } else {
        last_user
    };
    let usage = usage_of(&prompt, &text);
    let id = format!("chatcmpl-mock-{:016x}", fnv1a(prompt.as_bytes()));
    let created = unix_now();
    if !stream {
        return Reply::Whole(RelayedObject::from_object(object(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": text, "refusal": null },
                "finish_reason": "stop", "logprobs": null,
            }],
            "usage": usage.to_json(),
        }))));
    }
    let chunk = |delta: Value, finish: Value| {
        object(json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null }],
        }))
    };
    let mut chunks = vec![chunk(
        json!({ "role": "assistant", "content": "" }),
        Value::Null,
    )];
    chunks.extend(pieces(&text).map(|p| chunk(json!({ "content": p }), Value::Null)));
    chunks.push(chunk(json!({}), json!("stop")));
    chunks.push(object(json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [], "usage": usage.to_json(),
    })));
    into_stream(chunks)
}

fn completion(model: &str, body: &JsonObject, stream: bool) -> Reply {
    let prompt = match body.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    };
    let usage = usage_of(&prompt, &prompt);
    let id = format!("cmpl-mock-{:016x}", fnv1a(prompt.as_bytes()));
    let created = unix_now();
    let make = |text: &str, finish: Value| {
        object(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{ "index": 0, "text": text, "finish_reason": finish, "logprobs": null }],
        }))
    };
    if !stream {
        let mut whole = make(&prompt, json!("stop"));
        whole.insert("usage".into(), usage.to_json());
        return Reply::Whole(RelayedObject::from_object(whole));
    }
    let mut chunks: Vec<JsonObject> = pieces(&prompt).map(|p| make(p, Value::Null)).collect();
    chunks.push(make("", json!("stop")));
    let mut last = make("", Value::Null);
    last.insert("choices".into(), json!([]));
    last.insert("usage".into(), usage.to_json());
    chunks.push(last);
    into_stream(chunks)
}

/// Eight dimensions (or `dimensions`, up to 3072) per input, unit length, from the input's hash;
/// as float arrays, or base64 of little-endian `f32`s when `encoding_format` is `base64`.
fn embeddings(model: &str, body: &JsonObject) -> JsonObject {
    let inputs = embedding_inputs(body.get("input"));
    let dimensions = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(8, |d| d.clamp(1, 3072)) as usize;
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let vector = vector(input, dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector
                    .iter()
                    .flat_map(|x| (*x as f32).to_le_bytes())
                    .collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    let prompt_tokens: u64 = inputs.iter().map(|i| tokens::estimate(i)).sum();
    object(json!({
        "object": "list", "data": data, "model": model,
        "usage": { "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens },
    }))
}

/// The inputs as texts: a string, a list of strings, one list of token ids, or a list of those.
fn embedding_inputs(input: Option<&Value>) -> Vec<String> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match input {
        Some(Value::String(s)) => vec![s.clone()],
        // A flat list of token ids is one tokenized input.
        Some(items @ Value::Array(list)) if list.iter().all(Value::is_number) => vec![text(items)],
        Some(Value::Array(items)) => items.iter().map(text).collect(),
        _ => Vec::new(),
    }
}

fn vector(input: &str, dimensions: usize) -> Vec<f64> {
    let mut state = fnv1a(input.as_bytes());
    let raw: Vec<f64> = (0..dimensions)
        .map(|_| {
            // xorshift: cheap, deterministic, well spread.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 20_000) as f64 / 10_000.0 - 1.0
        })
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::EPSILON);
    raw.iter().map(|x| x / norm).collect()
}

/// Splits text into word-sized deltas that keep their leading spaces, as real models stream.
fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let start = rest.len() - rest.trim_start().len();
        let end = rest[start..]
            .find(char::is_whitespace)
            .map_or(rest.len(), |i| start + i);
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

fn usage_of(prompt: &str, completion: &str) -> Usage {
    let prompt_tokens = tokens::estimate(prompt);
    let completion_tokens = tokens::estimate(completion);
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

fn into_stream(chunks: Vec<JsonObject>) -> Reply {
    Reply::Stream(Box::pin(stream::iter(
        chunks
            .into_iter()
            .map(|chunk| Ok(RelayedObject::from_object(chunk))),
    )))
}

fn object(value: Value) -> JsonObject {
    match value {
        Value::Object(map) => map,
        _ => JsonObject::new(),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_keep_spaces_and_rejoin_to_the_text() {
        let text = "Hello  brave new\nworld";
        let parts: Vec<&str> = pieces(text).collect();
        assert_eq!(parts, vec!["Hello", "  brave", " new", "\nworld"]);
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn chat_echoes_the_last_user_message_with_counts() {
        let body = object(json!({"messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": [{"type": "text", "text": "say hi"}]},
        ]}));
        let Reply::Whole(mut reply) = chat("m", &body, false) else {
            panic!("expected a whole reply")
        };
        let reply = reply.object_mut().expect("an object");
        assert_eq!(reply["choices"][0]["message"]["content"], "say hi");
        assert_eq!(reply["usage"]["completion_tokens"], 2);
        // "first" (2) + "x" (1) + "say hi" (2)
        assert_eq!(reply["usage"]["prompt_tokens"], 5);
    }

    #[test]
    fn embedding_inputs_do_not_depend_on_batching() {
        let single = embeddings("e", &object(json!({"input": "beta"})));
        let batch = embeddings("e", &object(json!({"input": ["alpha", "beta"]})));
        assert_eq!(
            single["data"][0]["embedding"],
            batch["data"][1]["embedding"]
        );
        let tokens = embeddings("e", &object(json!({"input": [101, 2023, 102]})));
        assert_eq!(tokens["data"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn base64_embeddings_are_little_endian_f32() {
        let reply = embeddings(
            "e",
            &object(json!({"input": "x", "encoding_format": "base64"})),
        );
        let encoded = reply["data"][0]["embedding"].as_str().expect("a string");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64");
        assert_eq!(bytes.len(), 8 * 4);
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let body = object(json!({"input": ["a", "b"]}));
        let first = embeddings("e", &body);
        assert_eq!(first, embeddings("e", &body));
        let v: Vec<f64> =
            serde_json::from_value(first["data"][0]["embedding"].clone()).expect("floats");
        assert_eq!(v.len(), 8);
        assert!((v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-9);
    }
}
