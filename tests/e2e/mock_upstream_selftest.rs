//! Self-test of the mock upstream and the test client over real HTTP, without the gateway.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::client::{self, RequestBuilder, TimedOut};
use support::mock_upstream::{
    anthropic_tool_use_response, mock_embedding, openai_tool_call_response, sse_data,
    DEFAULT_UPSTREAM_KEY, EMBEDDING_DIMS, SSE_DONE,
};
use support::{fill, wait_until, Fault, MockUpstream};

const KEY: Option<&str> = Some(DEFAULT_UPSTREAM_KEY);

fn chat(text: &str) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "an earlier question"},
            {"role": "assistant", "content": "an earlier answer"},
            {"role": "user", "content": text}
        ]
    })
}

fn chat_stream(text: &str) -> Value {
    let mut body = chat(text);
    body["stream"] = json!(true);
    body
}

fn anthropic_body(text: &str, stream: bool) -> Value {
    json!({
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 64,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
        "stream": stream
    })
}

async fn anthropic_post(upstream: &MockUpstream, body: &Value) -> client::Response {
    RequestBuilder::post(&format!("{}/v1/messages", upstream.url()))
        .header("x-api-key", DEFAULT_UPSTREAM_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
}

fn chat_url(upstream: &MockUpstream) -> String {
    format!("{}/v1/chat/completions", upstream.url())
}

#[tokio::test]
async fn openai_chat_echoes_the_last_user_message() {
    let upstream = MockUpstream::start().await;
    let response = client::post_json(&chat_url(&upstream), KEY, &chat("hello there world")).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body = response.json();
    assert_eq!(
        body,
        json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "echo: hello there world"},
                "finish_reason": "stop",
                "logprobs": null
            }],
            // 2 + 3 + 3 + 3 words in, 4 words out.
            "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
            "system_fingerprint": "fp_mock"
        })
    );

    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].method, http::Method::POST);
    assert_eq!(recorded[0].path, "/v1/chat/completions");
    assert_eq!(recorded[0].query, None);
    assert_eq!(
        recorded[0].header("authorization"),
        Some("Bearer sk-upstream-test")
    );
    assert_eq!(recorded[0].body, chat("hello there world"));
}

#[tokio::test]
async fn openai_content_parts_are_echoed() {
    let upstream = MockUpstream::start().await;
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "part one"},
            {"type": "image_url", "image_url": {"url": "data:,"}},
            {"type": "text", "text": "part two"}
        ]}]
    });
    let response = client::post_json(&chat_url(&upstream), KEY, &body).await;
    assert_eq!(
        response.json()["choices"][0]["message"]["content"],
        "echo: part one part two"
    );
}

#[tokio::test]
async fn openai_rejects_a_wrong_or_missing_key() {
    let upstream = MockUpstream::start().await;
    let expected = json!({"error": {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error",
        "param": null,
        "code": "invalid_api_key"
    }});
    for key in [Some("sk-wrong"), None] {
        let response = client::post_json(&chat_url(&upstream), key, &chat("hi")).await;
        assert_eq!(response.status, 401);
        assert_eq!(response.json(), expected);
    }

    // The expected key is configurable.
    let custom = MockUpstream::start_with_key("sk-custom").await;
    let response = client::post_json(&chat_url(&custom), Some("sk-custom"), &chat("hi")).await;
    assert_eq!(response.status, 200);
    custom.set_api_key("sk-rotated");
    let response = client::post_json(&chat_url(&custom), Some("sk-custom"), &chat("hi")).await;
    assert_eq!(response.status, 401);
}

#[tokio::test]
async fn openai_rejects_bad_bodies_and_unknown_paths() {
    let upstream = MockUpstream::start().await;
    let response =
        client::post_raw(&chat_url(&upstream), KEY, "application/json", "{not json").await;
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["error"]["type"], "invalid_request_error");

    let response =
        client::post_json(&chat_url(&upstream), KEY, &json!({"model": "gpt-4o-mini"})).await;
    assert_eq!(response.status, 400);

    let response =
        client::post_json(&format!("{}/v1/nonsense", upstream.url()), KEY, &chat("hi")).await;
    assert_eq!(response.status, 404);

    let response = client::get(&chat_url(&upstream), KEY).await;
    assert_eq!(response.status, 405);
    assert_eq!(upstream.request_count(), 4, "every request is recorded");
    assert_eq!(upstream.requests()[0].body, Value::Null);
    assert_eq!(&upstream.requests()[0].raw_body[..], b"{not json");
}

#[tokio::test]
async fn openai_chat_stream_has_role_content_finish_and_done() {
    let upstream = MockUpstream::start().await;
    let response =
        client::stream_sse(&chat_url(&upstream), KEY, &chat_stream("hello there world")).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    assert_eq!(response.error, None);
    assert!(response.done(), "ends with [DONE]: {}", response.raw);

    let chunks = response.json_events();
    // role, 4 words, finish.
    assert_eq!(chunks.len(), 6, "{}", response.raw);
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], "chatcmpl-mock");
        assert_eq!(chunk["model"], "gpt-4o-mini");
        assert!(chunk.get("usage").is_none(), "usage only when asked for");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let pieces: Vec<&str> = chunks[1..5]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content delta")
        })
        .collect();
    assert_eq!(pieces, ["echo:", " hello", " there", " world"]);
    assert_eq!(response.content(), "echo: hello there world");
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[5]["choices"][0]["delta"], json!({}));
    assert_eq!(response.events.len(), 7);
    // The counter is bumped just after the last frame is handed over, so allow a moment.
    assert!(wait_until(Duration::from_secs(1), || upstream.completed_streams() == 1).await);
}

#[tokio::test]
async fn openai_chat_stream_reports_usage_when_asked() {
    let upstream = MockUpstream::start().await;
    let mut body = chat_stream("count me");
    body["stream_options"] = json!({"include_usage": true});
    let response = client::stream_sse(&chat_url(&upstream), KEY, &body).await;
    let chunks = response.json_events();
    let usage_chunk = chunks.last().expect("a usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13})
    );
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
    assert!(response.done());
}

#[tokio::test]
async fn stream_frames_are_paced_and_flushed_one_by_one() {
    let upstream = MockUpstream::start().await;
    upstream.set_delay_per_chunk(Duration::from_millis(100));
    let mut stream =
        client::open_stream(&chat_url(&upstream), KEY, &chat_stream("one two three")).await;
    assert_eq!(stream.status, 200);
    let mut arrivals = Vec::new();
    while let Some(event) = stream.next_event().await {
        arrivals.push((Instant::now(), event));
    }
    // role + "echo:" + 3 words + finish + [DONE]
    assert_eq!(arrivals.len(), 7);
    // Loose bounds so a loaded CI machine does not flake: frames must not arrive in one burst.
    for pair in arrivals.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_millis(40),
            "frames arrive separately, gap {gap:?}"
        );
    }
    let total = arrivals[6].0 - arrivals[0].0;
    assert!(
        total >= Duration::from_millis(550),
        "paced overall: {total:?}"
    );
    assert_eq!(stream.error(), None);
}

#[tokio::test]
async fn completions_echo_the_prompt() {
    let upstream = MockUpstream::start().await;
    let url = format!("{}/v1/completions", upstream.url());
    let response = client::post_json(
        &url,
        KEY,
        &json!({"model": "gpt-3.5-turbo-instruct", "prompt": "say this"}),
    )
    .await;
    let body = response.json();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "echo: say this");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
    );

    let response = client::stream_sse(
        &url,
        KEY,
        &json!({"model": "gpt-3.5-turbo-instruct", "prompt": "say this", "stream": true}),
    )
    .await;
    let text: String = response
        .json_events()
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "echo: say this");
    assert!(response.done());
}

#[tokio::test]
async fn embeddings_are_deterministic() {
    let upstream = MockUpstream::start().await;
    let url = format!("{}/v1/embeddings", upstream.url());
    let response = client::post_json(
        &url,
        KEY,
        &json!({"model": "text-embedding-3-small", "input": ["alpha beta", "gamma"]}),
    )
    .await;
    assert_eq!(response.status, 200);
    let body = response.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "text-embedding-3-small");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );
    let data = body["data"].as_array().expect("data array");
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["embedding"], json!(mock_embedding("alpha beta")));
    assert_eq!(data[1]["embedding"], json!(mock_embedding("gamma")));
    assert_eq!(mock_embedding("gamma").len(), EMBEDDING_DIMS);
    assert_ne!(mock_embedding("gamma"), mock_embedding("alpha beta"));

    let single = client::post_json(
        &url,
        KEY,
        &json!({"model": "text-embedding-3-small", "input": "gamma"}),
    )
    .await
    .json();
    assert_eq!(single["data"][0]["embedding"], data[1]["embedding"]);

    // The OpenAI SDKs ask for base64 by default: 8 little-endian f32s = 32 bytes = 44 chars.
    let b64 = client::post_json(
        &url,
        KEY,
        &json!({"model": "text-embedding-3-small", "input": "gamma", "encoding_format": "base64"}),
    )
    .await
    .json();
    let encoded = b64["data"][0]["embedding"].as_str().expect("base64 string");
    assert_eq!(encoded.len(), 44);
    assert!(encoded.ends_with('='));
}

#[tokio::test]
async fn azure_routes_check_key_and_api_version() {
    let upstream = MockUpstream::start().await;
    let base = format!("{}/openai/deployments/my-gpt", upstream.url());
    let send = |path: &str, key: &str| {
        RequestBuilder::post(&format!("{base}/{path}"))
            .header("api-key", key)
            .json(&chat("azure hello"))
            .send()
    };
    let ok = send(
        "chat/completions?api-version=2024-06-01",
        DEFAULT_UPSTREAM_KEY,
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(
        ok.json()["choices"][0]["message"]["content"],
        "echo: azure hello"
    );
    let recorded = upstream.last_request().expect("recorded");
    assert_eq!(recorded.path, "/openai/deployments/my-gpt/chat/completions");
    assert_eq!(recorded.query.as_deref(), Some("api-version=2024-06-01"));
    assert_eq!(recorded.header("api-key"), Some(DEFAULT_UPSTREAM_KEY));

    let missing_version = send("chat/completions", DEFAULT_UPSTREAM_KEY).await;
    assert_eq!(missing_version.status, 404);
    assert_eq!(missing_version.json()["error"]["code"], "404");

    let wrong_key = send("chat/completions?api-version=2024-06-01", "nope").await;
    assert_eq!(wrong_key.status, 401);

    // Without a model in the body the deployment name stands in.
    let embeddings = RequestBuilder::post(&format!("{base}/embeddings?api-version=2024-06-01"))
        .header("api-key", DEFAULT_UPSTREAM_KEY)
        .json(&json!({"input": "x"}))
        .send()
        .await
        .json();
    assert_eq!(embeddings["model"], "my-gpt");
}

#[tokio::test]
async fn anthropic_messages_non_streaming() {
    let upstream = MockUpstream::start().await;
    let response = anthropic_post(&upstream, &anthropic_body("hi claude", false)).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.json(),
        json!({
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": "claude-3-5-haiku-latest",
            "content": [{"type": "text", "text": "echo: hi claude"}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": 4, "output_tokens": 3}
        })
    );
}

#[tokio::test]
async fn anthropic_checks_headers_and_required_fields() {
    let upstream = MockUpstream::start().await;
    let url = format!("{}/v1/messages", upstream.url());

    let wrong_key = RequestBuilder::post(&url)
        .header("x-api-key", "nope")
        .header("anthropic-version", "2023-06-01")
        .json(&anthropic_body("x", false))
        .send()
        .await;
    assert_eq!(wrong_key.status, 401);
    assert_eq!(
        wrong_key.json(),
        json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
    );

    // A bearer token is the OpenAI way, not Anthropic's.
    let bearer = RequestBuilder::post(&url)
        .key(KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&anthropic_body("x", false))
        .send()
        .await;
    assert_eq!(bearer.status, 401);

    let no_version = RequestBuilder::post(&url)
        .header("x-api-key", DEFAULT_UPSTREAM_KEY)
        .json(&anthropic_body("x", false))
        .send()
        .await;
    assert_eq!(no_version.status, 400);
    assert_eq!(no_version.json()["error"]["type"], "invalid_request_error");

    let mut no_max_tokens = anthropic_body("x", false);
    no_max_tokens
        .as_object_mut()
        .expect("object")
        .remove("max_tokens");
    let response = anthropic_post(&upstream, &no_max_tokens).await;
    assert_eq!(response.status, 400);
    assert_eq!(
        response.json()["error"]["message"],
        "max_tokens: Field required"
    );
}

#[tokio::test]
async fn anthropic_streaming_event_sequence() {
    let upstream = MockUpstream::start().await;
    let response = RequestBuilder::post(&format!("{}/v1/messages", upstream.url()))
        .header("x-api-key", DEFAULT_UPSTREAM_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&anthropic_body("stream me please", true))
        .stream()
        .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let names: Vec<&str> = response
        .frames
        .iter()
        .map(|f| f.event.as_deref().expect("named event"))
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let events = response.json_events();
    for (event, name) in events.iter().zip(&names) {
        assert_eq!(event["type"], *name, "data type matches event name");
    }
    assert_eq!(events[0]["message"]["id"], "msg_mock");
    assert_eq!(events[0]["message"]["model"], "claude-3-5-haiku-latest");
    assert_eq!(events[0]["message"]["usage"]["input_tokens"], 5);
    assert_eq!(
        events[1]["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "content_block_delta")
        .map(|e| {
            assert_eq!(e["index"], 0);
            assert_eq!(e["delta"]["type"], "text_delta");
            e["delta"]["text"].as_str().expect("delta text").to_owned()
        })
        .collect();
    assert_eq!(text, "echo: stream me please");
    assert_eq!(
        events[8],
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 4}})
    );
    assert!(!response.done(), "Anthropic streams have no [DONE]");
}

#[tokio::test]
async fn status_faults_apply_in_order_then_defaults_resume() {
    let upstream = MockUpstream::start().await;
    upstream.push_fault(Fault::rate_limited(7));
    upstream.push_fault(Fault::status(503));
    upstream.push_fault(Fault::Status {
        status: 500,
        body: Some("plain failure".to_owned()),
        headers: vec![("x-mock".to_owned(), "yes".to_owned())],
    });
    assert_eq!(upstream.pending_faults(), 3);

    let first = client::post_json(&chat_url(&upstream), KEY, &chat("a")).await;
    assert_eq!(first.status, 429);
    assert_eq!(first.header("retry-after"), Some("7"));
    assert_eq!(first.json()["error"]["message"], "mock upstream error 429");

    // Faults apply to any path, in arrival order.
    let second = client::post_json(
        &format!("{}/v1/embeddings", upstream.url()),
        KEY,
        &json!({"model": "m", "input": "x"}),
    )
    .await;
    assert_eq!(second.status, 503);
    assert_eq!(
        second.json(),
        json!({"error": {"message": "mock upstream error 503", "type": "server_error", "param": null, "code": null}})
    );

    let third = client::post_json(&chat_url(&upstream), KEY, &chat("c")).await;
    assert_eq!(third.status, 500);
    assert_eq!(third.text(), "plain failure");
    assert_eq!(third.header("x-mock"), Some("yes"));

    let fourth = client::post_json(&chat_url(&upstream), KEY, &chat("d")).await;
    assert_eq!(fourth.status, 200);
    assert_eq!(upstream.pending_faults(), 0);
    assert_eq!(upstream.request_count(), 4);

    // Anthropic routes get Anthropic-shaped default error bodies.
    upstream.push_fault(Fault::status(529));
    let overloaded = anthropic_post(&upstream, &anthropic_body("x", false)).await;
    assert_eq!(overloaded.status, 529);
    assert_eq!(
        overloaded.json(),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "mock upstream error 529"}})
    );
}

#[tokio::test]
async fn default_status_fails_everything_until_cleared() {
    let upstream = MockUpstream::start().await;
    upstream.set_default_status(Some(503));
    for _ in 0..3 {
        let response = client::post_json(&chat_url(&upstream), KEY, &chat("x")).await;
        assert_eq!(response.status, 503);
    }
    // A queued fault still takes precedence.
    upstream.push_fault(Fault::Reply(json!({"scripted": true})));
    let scripted = client::post_json(&chat_url(&upstream), KEY, &chat("x")).await;
    assert_eq!(scripted.json(), json!({"scripted": true}));

    upstream.set_default_status(None);
    let response = client::post_json(&chat_url(&upstream), KEY, &chat("x")).await;
    assert_eq!(response.status, 200);
}

#[tokio::test]
async fn delay_and_slow_first_byte_hold_the_response() {
    let upstream = MockUpstream::start().await;
    upstream.push_fault(Fault::Delay(Duration::from_millis(300)));
    let started = Instant::now();
    let response = client::post_json(&chat_url(&upstream), KEY, &chat("late")).await;
    assert_eq!(response.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    upstream.push_fault(Fault::SlowFirstByte(Duration::from_millis(300)));
    let started = Instant::now();
    let mut stream = client::open_stream(&chat_url(&upstream), KEY, &chat_stream("late")).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the head itself is late"
    );
    assert_eq!(stream.status, 200);
    assert!(stream.next_event().await.is_some());

    // A client with a short timeout gives up on a delayed upstream.
    upstream.push_fault(Fault::Delay(Duration::from_secs(5)));
    let result = RequestBuilder::post(&chat_url(&upstream))
        .key(KEY)
        .json(&chat("x"))
        .timeout(Duration::from_millis(200))
        .try_send()
        .await;
    let error = result.expect_err("times out");
    assert!(error.contains("timed out"), "{error}");
}

#[tokio::test]
async fn cut_stream_aborts_without_done() {
    let upstream = MockUpstream::start().await;
    upstream.push_fault(Fault::CutStream { after_chunks: 2 });
    let response = client::stream_sse(&chat_url(&upstream), KEY, &chat_stream("a b c d e f")).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.events.len(), 2, "{}", response.raw);
    assert!(!response.done());
    assert!(response.error.is_some(), "the body ends with an error");

    // Non-streaming bodies can be cut too: half a JSON document, then an error.
    upstream.push_fault(Fault::CutStream { after_chunks: 1 });
    let result = RequestBuilder::post(&chat_url(&upstream))
        .key(KEY)
        .json(&chat("x"))
        .try_send()
        .await;
    assert!(result.is_err(), "{result:?}");

    // The next stream is whole again.
    let response = client::stream_sse(&chat_url(&upstream), KEY, &chat_stream("a b")).await;
    assert!(response.done());
}

#[tokio::test]
async fn stall_stream_goes_silent_then_resumes() {
    let upstream = MockUpstream::start().await;
    upstream.push_fault(Fault::StallStream {
        after_chunks: 2,
        stall: Duration::from_millis(600),
    });
    let mut stream = client::open_stream(&chat_url(&upstream), KEY, &chat_stream("a b c")).await;
    assert!(stream.next_event().await.is_some());
    assert!(stream.next_event().await.is_some());
    let started = Instant::now();
    assert_eq!(
        stream.next_event_within(Duration::from_millis(200)).await,
        Err(TimedOut),
        "silent during the stall"
    );
    // Nothing was lost by the timed-out read; the rest arrives after the stall.
    let third = stream.next_event().await.expect("third event");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(third.contains("\"content\":\" a\""), "{third}");
    let response = stream.collect().await;
    assert!(response.done());
    assert_eq!(response.events.len(), 7);
}

#[tokio::test]
async fn scripted_replies_are_sent_verbatim() {
    let upstream = MockUpstream::start().await;
    let tool_call =
        openai_tool_call_response("gpt-4o-mini", "get_weather", &json!({"city": "Oslo"}));
    upstream.push_fault(Fault::Reply(tool_call.clone()));
    let response = client::post_json(&chat_url(&upstream), KEY, &chat("weather?")).await;
    assert_eq!(response.json(), tool_call);
    assert_eq!(
        response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Oslo\"}"
    );

    let tool_use = anthropic_tool_use_response(
        "claude-3-5-haiku-latest",
        "get_weather",
        &json!({"city": "Oslo"}),
    );
    upstream.push_fault(Fault::Reply(tool_use.clone()));
    let response = anthropic_post(&upstream, &anthropic_body("weather?", false)).await;
    assert_eq!(response.json(), tool_use);

    upstream.push_fault(Fault::ReplySse(vec![
        sse_data(&json!({"n": 1})),
        ": keep-alive comment\n\n".to_owned(),
        sse_data(&json!({"n": 2})),
        SSE_DONE.to_owned(),
    ]));
    let response = client::stream_sse(&chat_url(&upstream), KEY, &chat_stream("x")).await;
    assert_eq!(response.events, ["{\"n\":1}", "{\"n\":2}", "[DONE]"]);
}

#[tokio::test]
async fn hang_never_answers() {
    let upstream = MockUpstream::start().await;
    upstream.push_fault(Fault::Hang);
    let result = RequestBuilder::post(&chat_url(&upstream))
        .key(KEY)
        .json(&chat("x"))
        .timeout(Duration::from_millis(300))
        .try_send()
        .await;
    assert!(result.expect_err("hangs").contains("timed out"));
    // Other connections are unaffected.
    let response = client::post_json(&chat_url(&upstream), KEY, &chat("x")).await;
    assert_eq!(response.status, 200);
}

#[tokio::test]
async fn client_disconnect_cancels_the_stream() {
    let upstream = MockUpstream::start().await;
    upstream.set_delay_per_chunk(Duration::from_millis(50));
    let long_text = vec!["word"; 200].join(" ");
    let mut stream = client::open_stream(&chat_url(&upstream), KEY, &chat_stream(&long_text)).await;
    for _ in 0..3 {
        assert!(stream.next_event().await.is_some());
    }
    assert_eq!(upstream.cancelled_streams(), 0);
    drop(stream);
    assert!(
        wait_until(Duration::from_secs(5), || upstream.cancelled_streams() == 1).await,
        "the mock notices the client went away"
    );
    assert_eq!(upstream.completed_streams(), 0);
}

#[tokio::test]
async fn request_log_can_be_cleared_and_stop_refuses_connections() {
    let upstream = MockUpstream::start().await;
    for i in 0..3 {
        client::post_json(&chat_url(&upstream), KEY, &chat(&format!("n{i}"))).await;
    }
    assert_eq!(upstream.request_count(), 3);
    assert_eq!(
        upstream.connection_count(),
        3,
        "the client opens one connection per call"
    );
    let texts: Vec<Value> = upstream
        .requests()
        .iter()
        .map(|r| r.body["messages"][3]["content"].clone())
        .collect();
    assert_eq!(texts, [json!("n0"), json!("n1"), json!("n2")]);
    upstream.clear_requests();
    assert_eq!(upstream.request_count(), 0);
    assert!(upstream.last_request().is_none());

    upstream.clear_faults();
    upstream.push_fault(Fault::status(500));
    upstream.clear_faults();
    assert_eq!(upstream.pending_faults(), 0);

    upstream.stop();
    let result = RequestBuilder::post(&chat_url(&upstream))
        .key(KEY)
        .json(&chat("x"))
        .timeout(Duration::from_secs(2))
        .try_send()
        .await;
    assert!(result.is_err(), "stopped upstream refuses: {result:?}");
}

#[tokio::test]
async fn fill_substitutes_the_upstream_url() {
    let upstream = MockUpstream::start().await;
    let yaml = fill(
        "models:\n  - { name: m, provider: openai, model: m, api_base: \"{upstream}/v1\" }\n",
        &upstream,
    );
    assert!(yaml.contains(&format!("api_base: \"{}/v1\"", upstream.url())));
    assert!(upstream.url().starts_with("http://127.0.0.1:"));
}
