//! Shared configs, request bodies and assertions for the gateway end-to-end tests.

use std::time::Duration;

use serde_json::{json, Value};

use super::client::{Response, SseResponse};
use super::mock_upstream::DEFAULT_UPSTREAM_KEY;
use super::{fill, Gateway, MockUpstream};

/// The master key of every test config.
pub const MASTER: Option<&str> = Some("sk-master");
/// A key limited to the `gpt-4o-mini` group.
pub const TEAM_A: Option<&str> = Some("sk-team-a");
/// The credential the gateway presents upstream; it must never reach a client or a log line.
pub const UPSTREAM_KEY: &str = DEFAULT_UPSTREAM_KEY;

/// One group per provider. Timeouts and cooldowns are short so that failure tests stay fast.
pub const STANDARD_CONFIG: &str = r#"
server: { listen: "{listen}", max_request_bytes: 4194304, shutdown_drain_s: 5 }
auth:
  master_key: "sk-master"
  keys:
    - { key: "sk-team-a", alias: team-a, models: [gpt-4o-mini] }
models:
  - { name: gpt-4o-mini, provider: openai, model: gpt-4o-mini-2024-07-18, api_base: "{upstream}/v1", api_key: "sk-upstream-test", id: oai-a }
  - { name: azure-4o, provider: azure, model: my-deploy, api_base: "{upstream}", api_key: "sk-upstream-test", api_version: "2024-10-21" }
  - { name: claude, provider: anthropic, model: claude-3-5-haiku-latest, api_base: "{upstream}", api_key: "sk-upstream-test" }
  - { name: local, provider: openai_compatible, model: llama, api_base: "{upstream}/v1" }
  - { name: echo, provider: mock }
router: { strategy: simple-shuffle, num_retries: 2, timeout_s: 1, stream_idle_timeout_s: 1, allowed_fails: 3, cooldown_s: 1, fallbacks: { gpt-4o-mini: [claude] } }
"#;

/// Starts a gateway on `config` (with `{upstream}` filled in from `upstream`).
pub async fn start(config: &str, upstream: &MockUpstream) -> Gateway {
    Gateway::start(&fill(config, upstream)).await
}

/// Starts a gateway on [`STANDARD_CONFIG`].
pub async fn standard(upstream: &MockUpstream) -> Gateway {
    start(STANDARD_CONFIG, upstream).await
}

/// A chat body with a system prompt and one user turn.
pub fn chat(model: &str, text: &str) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": text}
        ]
    })
}

/// [`chat`] with `stream: true`.
pub fn chat_stream(model: &str, text: &str) -> Value {
    let mut body = chat(model, text);
    body["stream"] = json!(true);
    body
}

/// `n` distinct words, for streams long enough to interrupt.
pub fn words(n: usize) -> String {
    (0..n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks the OpenAI error shape (`{"error":{"message","type","param","code"}}` and nothing else)
/// and the status; returns the `error` object.
pub fn assert_error(response: &Response, status: u16, kind: &str) -> Value {
    assert_eq!(response.status, status, "body: {}", response.text());
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{}",
        response.text()
    );
    let body = response.json();
    let error = body
        .get("error")
        .unwrap_or_else(|| panic!("no `error` object: {body}"))
        .clone();
    let keys: Vec<&str> = error
        .as_object()
        .unwrap_or_else(|| panic!("`error` is not an object: {body}"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 4, "exactly message/type/param/code: {body}");
    for key in ["message", "type", "param", "code"] {
        assert!(keys.contains(&key), "missing error.{key}: {body}");
    }
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message is a non-empty string: {body}"
    );
    assert_eq!(error["type"], kind, "{body}");
    assert!(error["param"].is_null() || error["param"].is_string());
    assert!(error["code"].is_null() || error["code"].is_string());
    error
}

/// The `x-portcullis-*` header, parsed as a number.
pub fn header_f64(response: &Response, name: &str) -> f64 {
    let value = response
        .header(name)
        .unwrap_or_else(|| panic!("missing header {name}; headers: {:?}", response.headers));
    value
        .parse()
        .unwrap_or_else(|e| panic!("header {name}={value:?} is not a number: {e}"))
}

/// The error event that ends a broken stream, if the stream ended with one.
pub fn stream_error(response: &SseResponse) -> Option<Value> {
    response
        .json_events()
        .last()
        .filter(|e| e.get("error").is_some())
        .cloned()
}

/// Generous bound for things that should happen "promptly" on a loaded 2-core CI machine.
pub const PROMPTLY: Duration = Duration::from_secs(5);

/// Starts a gateway on `config` that logs one JSON object per line, so tests can read the
/// fields of its `call finished` records instead of matching text.
pub async fn start_json_logs(config: &str, upstream: &MockUpstream) -> Gateway {
    Gateway::builder(&fill(config, upstream))
        .env("PORTCULLIS_LOG_FORMAT", "json")
        .start()
        .await
}

/// The fields of every `call finished` line in JSON-format logs, in order.
pub fn call_records(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line.pointer("/fields/message") == Some(&json!("call finished")))
        .filter_map(|line| line.get("fields").cloned())
        .collect()
}

/// Waits until the gateway (started with [`start_json_logs`]) has logged `count` call records;
/// panics with the logs otherwise. Records are written off the request path, so they may trail
/// the response.
pub async fn wait_for_call_records(gateway: &Gateway, count: usize) -> Vec<Value> {
    let started = std::time::Instant::now();
    loop {
        let records = call_records(&gateway.logs());
        if records.len() >= count {
            return records;
        }
        assert!(
            started.elapsed() < PROMPTLY,
            "{} of {count} `call finished` records after {PROMPTLY:?}; logs:\n{}",
            records.len(),
            gateway.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
