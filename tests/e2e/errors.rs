//! Every error the gateway answers with: status, OpenAI error shape, retry headers, and no credential leaks.

mod support;

use serde_json::{json, Value};
use support::client::{self, Response};
use support::fixtures::{
    assert_error, chat, chat_stream, start, stream_error, MASTER, TEAM_A, UPSTREAM_KEY,
};
use support::gateway::free_port;
use support::mock_upstream::sse_data;
use support::{Fault, Gateway, MockUpstream};

/// One retry, so "after retries" is real; `gpt-4o-mini` has two deployments on the same upstream,
/// so the retry goes straight to the other one without a backoff pause. `dead` points at a port
/// nobody listens on. A small body limit keeps the 413 test cheap.
const ERRORS_CONFIG: &str = r#"
server: { listen: "{listen}", max_request_bytes: 4096, shutdown_drain_s: 5 }
auth:
  master_key: "sk-master"
  keys:
    - { key: "sk-team-a", alias: team-a, models: [gpt-4o-mini] }
models:
  - { name: gpt-4o-mini, provider: openai, model: gpt-4o-mini-2024-07-18, api_base: "{upstream}/v1", api_key: "sk-upstream-test", id: oai-a }
  - { name: gpt-4o-mini, provider: openai, model: gpt-4o-mini-2024-07-18, api_base: "{upstream}/v1", api_key: "sk-upstream-test", id: oai-b }
  - { name: claude, provider: anthropic, model: claude-3-5-haiku-latest, api_base: "{upstream}", api_key: "sk-upstream-test" }
  - { name: echo, provider: mock }
  - { name: dead, provider: openai, model: gpt-4o-mini, api_base: "http://127.0.0.1:{dead_port}/v1", api_key: "sk-upstream-test" }
router: { num_retries: 1, timeout_s: 1, stream_idle_timeout_s: 1, allowed_fails: 100, cooldown_s: 1 }
"#;

async fn errors_gateway(upstream: &MockUpstream) -> Gateway {
    let config = ERRORS_CONFIG.replace("{dead_port}", &free_port().to_string());
    start(&config, upstream).await
}

fn chat_url(gateway: &Gateway) -> String {
    format!("{}/v1/chat/completions", gateway.url())
}

/// Client mistakes tell the SDKs not to retry.
fn assert_no_retry(response: &Response) {
    assert_eq!(
        response.header("x-should-retry"),
        Some("false"),
        "status {}",
        response.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_and_non_object_bodies_are_400() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    for body in ["{not json", "", "[1, 2]", "\"a string\"", "null"] {
        let response =
            client::post_raw(&chat_url(&gateway), MASTER, "application/json", body).await;
        let error = assert_error(&response, 400, "invalid_request_error");
        assert!(error["param"].is_null(), "{body:?}: {error}");
        assert_no_retry(&response);
        assert!(response.header("x-portcullis-call-id").is_some());
    }
    assert_eq!(upstream.request_count(), 0);
}

/// A checked body is relayed to an OpenAI upstream as the client wrote it. Where the gateway must
/// read all of it (a dialect it translates, the built-in mock), JSON that serde cannot hold is the
/// client's mistake: a 400, with the upstream never called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_relayed_as_written_and_read_whole_only_where_needed() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    let body = |model: &str, knob: &str| {
        format!(
            r#"{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}],
                "vendor_knob": {knob}, "spacing" :  [ 1 ,2 ]}}"#
        )
    };
    let as_written = body("gpt-4o-mini", "1.50e0");
    let relayed =
        client::post_raw(&chat_url(&gateway), MASTER, "application/json", as_written).await;
    assert_eq!(relayed.status, 200, "{}", relayed.text());
    let sent = upstream.last_request().expect("the upstream was called");
    let sent = String::from_utf8_lossy(&sent.raw_body).into_owned();
    assert!(
        sent.contains(r#""model": "gpt-4o-mini-2024-07-18""#),
        "{sent}"
    );
    assert!(
        sent.contains(r#""vendor_knob": 1.50e0, "spacing" :  [ 1 ,2 ]"#),
        "{sent}"
    );
    upstream.clear_requests();
    for model in ["claude", "echo"] {
        let response = client::post_raw(
            &chat_url(&gateway),
            MASTER,
            "application/json",
            body(model, "1e400"),
        )
        .await;
        let error = assert_error(&response, 400, "invalid_request_error");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains("not valid JSON"), "{model}: {error}");
        assert_no_retry(&response);
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_errors_name_the_field() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    let user = json!({"role": "user", "content": "hi"});
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "chat/completions",
            json!({"model": "gpt-4o-mini", "messages": [{"content": "x"}]}),
            "messages[0].role",
        ),
        (
            "chat/completions",
            json!({"model": "gpt-4o-mini", "messages": [user, {"role": "robot", "content": "x"}]}),
            "messages[1].role",
        ),
        (
            "chat/completions",
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            "chat/completions",
            json!({"model": "gpt-4o-mini", "messages": []}),
            "messages",
        ),
        (
            "chat/completions",
            json!({"model": "gpt-4o-mini"}),
            "messages",
        ),
        ("chat/completions", json!({"messages": [user]}), "model"),
        (
            "chat/completions",
            json!({"model": 7, "messages": [user]}),
            "model",
        ),
        (
            "chat/completions",
            json!({"model": "gpt-4o-mini", "messages": [user], "temperature": 3}),
            "temperature",
        ),
        (
            "chat/completions",
            json!({"model": "gpt-4o-mini", "messages": [user], "stream": "yes"}),
            "stream",
        ),
        (
            "chat/completions",
            json!({"model": "gpt-4o-mini", "messages": [user], "stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        ("completions", json!({"model": "gpt-4o-mini"}), "prompt"),
        (
            "embeddings",
            json!({"model": "gpt-4o-mini", "input": 5}),
            "input",
        ),
    ];
    for (path, body, param) in cases {
        let response =
            client::post_json(&format!("{}/v1/{path}", gateway.url()), MASTER, &body).await;
        let error = assert_error(&response, 400, "invalid_request_error");
        assert_eq!(error["param"], param, "{body}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(param), "message names {param}: {message}");
        assert_no_retry(&response);
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unknown_keys_are_401() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    let body = chat("gpt-4o-mini", "hi");
    for key in [None, Some("sk-nobody"), Some("")] {
        let response = client::post_json(&chat_url(&gateway), key, &body).await;
        let error = assert_error(&response, 401, "authentication_error");
        assert_eq!(error["code"], "invalid_api_key", "{key:?}");
        assert_no_retry(&response);
        // The presented key is not echoed back.
        assert!(!response.text().contains("sk-nobody"));
    }
    // The upstream key is the gateway's, not a client's.
    let response = client::post_json(&chat_url(&gateway), Some(UPSTREAM_KEY), &body).await;
    assert_error(&response, 401, "authentication_error");
    // The key is checked before the body is even read.
    let response = client::post_raw(&chat_url(&gateway), None, "application/json", "{bad").await;
    assert_error(&response, 401, "authentication_error");
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_asking_for_a_model_it_may_not_use_is_403() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    for model in ["echo", "claude"] {
        let response = client::post_json(&chat_url(&gateway), TEAM_A, &chat(model, "hi")).await;
        let error = assert_error(&response, 403, "permission_error");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains(model),
            "{error}"
        );
        assert_no_retry(&response);
    }
    // The same key may use its own model.
    let response = client::post_json(&chat_url(&gateway), TEAM_A, &chat("gpt-4o-mini", "hi")).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_404_model_not_found() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    for key in [MASTER, TEAM_A] {
        let response = client::post_json(&chat_url(&gateway), key, &chat("gpt-9", "hi")).await;
        let error = assert_error(&response, 404, "invalid_request_error");
        assert_eq!(error["code"], "model_not_found");
        assert!(error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("gpt-9"));
        assert_no_retry(&response);
    }
    let response = client::post_json(
        &format!("{}/v1/embeddings", gateway.url()),
        MASTER,
        &json!({"model": "nope", "input": "x"}),
    )
    .await;
    assert_eq!(
        assert_error(&response, 404, "invalid_request_error")["code"],
        "model_not_found"
    );
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    for path in ["/v1/nonsense", "/v2/chat/completions", "/", "/v1/chat"] {
        for key in [MASTER, None] {
            let response = client::post_json(
                &format!("{}{path}", gateway.url()),
                key,
                &chat("gpt-4o-mini", "hi"),
            )
            .await;
            let error = assert_error(&response, 404, "invalid_request_error");
            assert_ne!(error["code"], "model_not_found", "{path}");
            assert_no_retry(&response);
        }
    }
    let get = client::get(&chat_url(&gateway), MASTER).await;
    assert_error(&get, 405, "invalid_request_error");
    assert_no_retry(&get);
    for path in ["/v1/models", "/health/liveliness", "/health/readiness"] {
        let response =
            client::post_json(&format!("{}{path}", gateway.url()), MASTER, &json!({})).await;
        assert_error(&response, 405, "invalid_request_error");
    }
    for path in ["/v1/completions", "/embeddings"] {
        let response = client::get(&format!("{}{path}", gateway.url()), MASTER).await;
        assert_error(&response, 405, "invalid_request_error");
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    // 4096 bytes allowed: a little under passes, a little over does not.
    let under = chat("gpt-4o-mini", &"a".repeat(3500));
    assert!(under.to_string().len() < 4096);
    let response = client::post_json(&chat_url(&gateway), MASTER, &under).await;
    assert_eq!(response.status, 200, "{}", response.text());

    let over = chat("gpt-4o-mini", &"a".repeat(5000));
    let response = client::post_json(&chat_url(&gateway), MASTER, &over).await;
    let error = assert_error(&response, 413, "invalid_request_error");
    assert_eq!(error["code"], "request_too_large");
    assert_no_retry(&response);
    assert_eq!(upstream.request_count(), 1, "the oversize call never left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rate_limit_after_retries_is_429_with_retry_after() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    upstream.push_faults([Fault::rate_limited(7), Fault::rate_limited(7)]);
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", "hi")).await;
    let error = assert_error(&response, 429, "rate_limit_error");
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(response.header("retry-after"), Some("7"));
    // 429 is worth retrying later: no "do not retry" hint.
    assert_eq!(response.header("x-should-retry"), None);
    assert_eq!(upstream.request_count(), 2, "one call and one retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_5xx_is_502_and_upstream_503_is_503() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    upstream.push_faults([Fault::status(500), Fault::status(500)]);
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", "hi")).await;
    assert_error(&response, 502, "api_error");
    assert_eq!(response.header("x-should-retry"), None);

    upstream.push_faults([Fault::status(502), Fault::status(500)]);
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", "hi")).await;
    assert_error(&response, 502, "api_error");

    upstream.push_faults([Fault::status(503), Fault::status(503)]);
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", "hi")).await;
    assert_error(&response, 503, "api_error");
    assert_eq!(upstream.request_count(), 6);

    // An Anthropic upstream's errors map the same way.
    upstream.push_faults([Fault::status(500), Fault::status(500)]);
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("claude", "hi")).await;
    assert_error(&response, 502, "api_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_502() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("dead", "hi")).await;
    assert_error(&response, 502, "api_error");
    let stream = client::stream_sse(&chat_url(&gateway), MASTER, &chat_stream("dead", "hi")).await;
    assert_eq!(stream.status, 502, "{}", stream.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rejecting_the_gateway_credentials_is_502() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    upstream.set_api_key("sk-rotated-upstream");
    for model in ["gpt-4o-mini", "claude"] {
        let response = client::post_json(&chat_url(&gateway), MASTER, &chat(model, "hi")).await;
        // Not the client's 401: its key was fine.
        let error = assert_error(&response, 502, "api_error");
        assert_ne!(error["code"], "invalid_api_key", "{model}");
        assert_eq!(response.header("x-should-retry"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_on_an_anthropic_group_are_400_unsupported() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    let response = client::post_json(
        &format!("{}/v1/embeddings", gateway.url()),
        MASTER,
        &json!({"model": "claude", "input": "hello"}),
    )
    .await;
    let error = assert_error(&response, 400, "invalid_request_error");
    let message = error["message"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        message.contains("support") && message.contains("embeddings"),
        "{message}"
    );
    assert_no_retry(&response);
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_key_never_leaks() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    let url = chat_url(&gateway);
    let mut seen: Vec<String> = Vec::new();
    let mut record = |what: &str, status: u16, headers: &http::HeaderMap, body: &str| {
        seen.push(format!("{what} {status} {headers:?} {body}"));
    };

    let ok = client::post_json(&url, MASTER, &chat("gpt-4o-mini", "hi")).await;
    record("ok", ok.status, &ok.headers, &ok.text());
    let stream = client::stream_sse(&url, MASTER, &chat_stream("claude", "hi")).await;
    record("stream", stream.status, &stream.headers, &stream.raw);
    upstream.push_faults([Fault::status(500), Fault::status(500)]);
    let failed = client::post_json(&url, MASTER, &chat("gpt-4o-mini", "hi")).await;
    record("500", failed.status, &failed.headers, &failed.text());
    upstream.push_fault(Fault::CutStream { after_chunks: 2 });
    let cut = client::stream_sse(&url, MASTER, &chat_stream("gpt-4o-mini", "a b c d")).await;
    assert!(stream_error(&cut).is_some(), "{}", cut.raw);
    record("cut", cut.status, &cut.headers, &cut.raw);
    let dead = client::post_json(&url, MASTER, &chat("dead", "hi")).await;
    record("dead", dead.status, &dead.headers, &dead.text());
    // A key mismatch is where a careless gateway quotes the credential it sent.
    upstream.set_api_key("sk-rotated-upstream");
    for model in ["gpt-4o-mini", "claude"] {
        let rejected = client::post_json(&url, MASTER, &chat(model, "hi")).await;
        assert_eq!(rejected.status, 502);
        record(
            "rejected",
            rejected.status,
            &rejected.headers,
            &rejected.text(),
        );
    }

    for response in &seen {
        assert!(!response.contains(UPSTREAM_KEY), "leaked: {response}");
    }
    let logs = gateway.logs();
    assert!(
        logs.contains("upstream attempt failed"),
        "debug logs captured"
    );
    assert!(
        !logs.contains(UPSTREAM_KEY),
        "the key is in the logs:\n{logs}"
    );
    // Sanity: the key really was in use.
    assert!(upstream
        .requests()
        .iter()
        .any(|r| r.header("authorization") == Some(&format!("Bearer {UPSTREAM_KEY}"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_quoting_the_key_is_not_relayed() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    // Some OpenAI-compatible servers quote the credential they rejected in their error message.
    let echoing = format!(
        "{{\"error\":{{\"message\":\"Incorrect API key provided: {UPSTREAM_KEY}\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"invalid_api_key\"}}}}"
    );
    upstream.push_fault(Fault::Status {
        status: 401,
        body: Some(echoing),
        headers: Vec::new(),
    });
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", "hi")).await;
    assert_error(&response, 502, "api_error");
    assert!(
        !response.text().contains(UPSTREAM_KEY),
        "{}",
        response.text()
    );

    // The same, as an Anthropic error body.
    upstream.push_fault(Fault::Status {
        status: 401,
        body: Some(format!(
            "{{\"type\":\"error\",\"error\":{{\"type\":\"authentication_error\",\"message\":\"invalid x-api-key {UPSTREAM_KEY}\"}}}}"
        )),
        headers: Vec::new(),
    });
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("claude", "hi")).await;
    assert_error(&response, 502, "api_error");
    assert!(
        !response.text().contains(UPSTREAM_KEY),
        "{}",
        response.text()
    );

    // And as an error event in the middle of a stream.
    upstream.push_fault(Fault::ReplySse(vec![
        sse_data(&json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
            "choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": null}]
        })),
        sse_data(
            &json!({"error": {"message": format!("key {UPSTREAM_KEY} was revoked mid-stream")}}),
        ),
    ]));
    let stream = client::stream_sse(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("gpt-4o-mini", "x"),
    )
    .await;
    assert!(stream_error(&stream).is_some(), "{}", stream.raw);
    assert!(!stream.raw.contains(UPSTREAM_KEY), "{}", stream.raw);

    let logs = gateway.logs();
    assert!(
        !logs.contains(UPSTREAM_KEY),
        "the key is in the logs:\n{logs}"
    );
}

/// Sends raw bytes on a fresh connection and returns what the gateway answered (up to 4 KiB,
/// or whatever arrived before it closed the connection).
async fn raw_exchange(gateway: &Gateway, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", gateway.port()))
        .await
        .expect("connect");
    tcp.write_all(request).await.expect("send");
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut answer))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    String::from_utf8_lossy(&answer[..read]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_bodies_are_413_without_a_content_length_or_before_100_continue() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;

    // Chunked: the size is only known while reading.
    let body = chat("gpt-4o-mini", &"a".repeat(6000)).to_string();
    let mut request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer sk-master\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    request.extend_from_slice(format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()).as_bytes());
    let answer = raw_exchange(&gateway, &request).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request_too_large"), "{answer}");

    // curl sends `Expect: 100-continue` for large bodies: refuse before the body is sent.
    let answer = raw_exchange(
        &gateway,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer sk-master\r\ncontent-type: application/json\r\ncontent-length: 100000\r\nexpect: 100-continue\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_error_carries_a_call_id() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    let url = chat_url(&gateway);
    upstream.push_faults([Fault::status(503), Fault::status(503)]);
    let responses = vec![
        client::post_raw(&url, MASTER, "application/json", "{").await,
        client::post_json(&url, None, &chat("gpt-4o-mini", "hi")).await,
        client::post_json(&url, TEAM_A, &chat("echo", "hi")).await,
        client::post_json(&url, MASTER, &chat("gpt-9", "hi")).await,
        client::post_json(&url, MASTER, &chat("gpt-4o-mini", &"a".repeat(5000))).await,
        client::post_json(&url, MASTER, &chat("gpt-4o-mini", "hi")).await,
        client::post_json(&url, MASTER, &chat("dead", "hi")).await,
    ];
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [400, 401, 403, 404, 413, 503, 502]);
    let mut ids = std::collections::HashSet::new();
    for response in &responses {
        let id = response
            .header("x-portcullis-call-id")
            .unwrap_or_else(|| panic!("no call id on a {}", response.status));
        assert!(ids.insert(id.to_owned()), "call ids are unique");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeouts_and_garbage_map_to_504_and_502() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    upstream.push_faults([Fault::status(504), Fault::status(504)]);
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", "hi")).await;
    assert_eq!(assert_error(&response, 504, "api_error")["code"], "timeout");

    // A 200 that is not JSON is the upstream's fault, not the client's.
    let garbage = Fault::Status {
        status: 200,
        body: Some("<html>gateway of a gateway</html>".to_owned()),
        headers: Vec::new(),
    };
    upstream.push_faults([garbage.clone(), garbage]);
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", "hi")).await;
    assert_error(&response, 502, "api_error");
    assert_eq!(upstream.request_count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_anthropic_cannot_express_are_400_before_any_upstream_call() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    let cases = [
        (
            json!({"model": "claude", "messages": [{"role": "system", "content": "only a system prompt"}]}),
            "messages",
        ),
        (
            json!({"model": "claude", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}
            ]}]}),
            "messages[0].content[1].image_url.url",
        ),
    ];
    for (body, param) in cases {
        let response = client::post_json(&chat_url(&gateway), MASTER, &body).await;
        let error = assert_error(&response, 400, "invalid_request_error");
        assert_eq!(error["param"], param, "{error}");
        assert_no_retry(&response);
    }
    let response = client::post_json(
        &format!("{}/v1/completions", gateway.url()),
        MASTER,
        &json!({"model": "claude", "prompt": "hi"}),
    )
    .await;
    assert_error(&response, 400, "invalid_request_error");
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_405_names_the_allowed_method() {
    let upstream = MockUpstream::start().await;
    let gateway = errors_gateway(&upstream).await;
    // RFC 9110 section 15.5.6: a 405 response MUST carry an Allow header.
    let get = client::get(&chat_url(&gateway), MASTER).await;
    assert_eq!(get.status, 405);
    assert_eq!(get.header("allow"), Some("POST"));
    let post = client::post_json(&format!("{}/v1/models", gateway.url()), MASTER, &json!({})).await;
    assert_eq!(post.status, 405);
    assert!(
        post.header("allow").is_some_and(|a| a.contains("GET")),
        "{:?}",
        post.headers
    );
}
