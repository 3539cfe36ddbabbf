//! Streaming end to end: chunk passthrough and relabelling, usage chunks, Anthropic translation, failures before and during a stream, cancellation.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::client::{self, RequestBuilder, SseResponse};
use support::fixtures::{
    assert_error, chat_stream, start, start_json_logs, stream_error, wait_for_call_records, words,
    MASTER, STANDARD_CONFIG,
};
use support::mock_upstream::{sse_data, sse_event, SSE_DONE};
use support::{wait_until, Fault, Gateway, MockUpstream};

/// The standard config with one retry instead of two, so failures before the first chunk are
/// retried (and fall back) without long backoff pauses, and no cooldowns, so the number of
/// upstream attempts does not depend on what earlier calls of a test did.
async fn gateway(upstream: &MockUpstream) -> Gateway {
    let config = STANDARD_CONFIG
        .replace("num_retries: 2", "num_retries: 1")
        .replace("allowed_fails: 3", "allowed_fails: 100");
    start(&config, upstream).await
}

fn chat_url(gateway: &Gateway) -> String {
    format!("{}/v1/chat/completions", gateway.url())
}

/// The JSON chunks of a stream, each checked to be a chat chunk labelled with `model`.
fn chat_chunks(response: &SseResponse, model: &str) -> Vec<Value> {
    let chunks = response.json_events();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert_eq!(chunk["model"], model, "{chunk}");
    }
    chunks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_stream_passes_chunks_in_order_relabelled_and_ends_with_done() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    let mut body = chat_stream("gpt-4o-mini", "one two three");
    body["vendor_knob"] = json!({"x": 1});
    let response = client::stream_sse(&chat_url(&gateway), MASTER, &body).await;

    assert_eq!(response.status, 200, "{}", response.raw);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    assert!(response.done(), "{}", response.raw);
    assert_eq!(response.error, None);
    // Each upstream chunk comes through as it was sent (field order too), with the client's
    // model name and without the `usage: null` the gateway's own usage request added.
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini",
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        })
        .to_string()
    };
    let expected = vec![
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": "echo:"}), Value::Null),
        chunk(json!({"content": " one"}), Value::Null),
        chunk(json!({"content": " two"}), Value::Null),
        chunk(json!({"content": " three"}), Value::Null),
        chunk(json!({}), json!("stop")),
        "[DONE]".to_owned(),
    ];
    assert_eq!(response.events, expected);

    // Deployment headers come with the head; the cost is only known at the end.
    assert!(response
        .header("x-portcullis-call-id")
        .is_some_and(|id| id.starts_with("call-")));
    assert_eq!(response.header("x-portcullis-model-id"), Some("oai-a"));
    assert_eq!(
        response.header("x-portcullis-model-group"),
        Some("gpt-4o-mini")
    );
    assert_eq!(
        response.header("x-portcullis-api-base"),
        Some(format!("{}/v1", upstream.url()).as_str())
    );
    assert_eq!(response.header("x-portcullis-attempted-retries"), Some("0"));
    assert_eq!(
        response.header("x-portcullis-attempted-fallbacks"),
        Some("0")
    );
    assert!(response
        .header("x-portcullis-response-duration-ms")
        .is_some());
    assert!(response
        .header("x-portcullis-overhead-duration-ms")
        .is_some());
    assert_eq!(response.header("x-portcullis-response-cost"), None);

    let sent = upstream.last_request().expect("the upstream was called");
    assert_eq!(sent.body["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["vendor_knob"], json!({"x": 1}));
    // Always asked for, so the gateway knows the usage and cost of every stream.
    assert_eq!(sent.body["stream_options"], json!({"include_usage": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_chunk_is_forwarded_only_when_the_client_asked() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;

    let mut asked = chat_stream("gpt-4o-mini", "count me");
    asked["stream_options"] = json!({"include_usage": true});
    let response = client::stream_sse(&chat_url(&gateway), MASTER, &asked).await;
    assert!(response.done(), "{}", response.raw);
    let chunks = chat_chunks(&response, "gpt-4o-mini");
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]));
    // "be brief" + "count me" in, "echo: count me" out.
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})
    );
    assert_eq!(
        chunks.iter().filter(|c| c["usage"].is_object()).count(),
        1,
        "one usage chunk"
    );

    for options in [json!({"include_usage": false}), json!(null)] {
        let mut not_asked = chat_stream("gpt-4o-mini", "count me");
        not_asked["stream_options"] = options.clone();
        let response = client::stream_sse(&chat_url(&gateway), MASTER, &not_asked).await;
        assert!(response.done(), "{}", response.raw);
        for chunk in chat_chunks(&response, "gpt-4o-mini") {
            assert!(chunk.get("usage").is_none(), "{options}: {chunk}");
            assert_ne!(chunk["choices"], json!([]), "{options}: {chunk}");
        }
        let sent = upstream.last_request().expect("the upstream was called");
        assert_eq!(
            sent.body["stream_options"]["include_usage"], true,
            "{options}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_stream_comes_back_as_openai_chunks() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    let response = client::stream_sse(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("claude", "stream me please"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.raw);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    assert!(response.done(), "{}", response.raw);
    assert!(
        response.frames.iter().all(|f| f.event.is_none()),
        "OpenAI streams name no events"
    );
    let chunks = chat_chunks(&response, "claude");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(response.content(), "echo: stream me please");
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert!(chunks.iter().all(|c| c["id"] == "msg_mock"));

    let sent = upstream.last_request().expect("the upstream was called");
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["model"], "claude-3-5-haiku-latest");
    assert!(sent.body.get("stream_options").is_none(), "{}", sent.body);

    // Asked for, the usage comes from Anthropic's message_start and message_delta events.
    let mut asked = chat_stream("claude", "stream me please");
    asked["stream_options"] = json!({"include_usage": true});
    let response = client::stream_sse(&chat_url(&gateway), MASTER, &asked).await;
    assert!(response.done(), "{}", response.raw);
    let chunks = chat_chunks(&response, "claude");
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_and_completion_streams_are_relabelled() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    let response =
        client::stream_sse(&chat_url(&gateway), MASTER, &chat_stream("azure-4o", "a b")).await;
    assert!(response.done(), "{}", response.raw);
    chat_chunks(&response, "azure-4o");
    assert_eq!(response.content(), "echo: a b");
    let sent = upstream.last_request().expect("the upstream was called");
    assert_eq!(sent.path, "/openai/deployments/my-deploy/chat/completions");
    assert_eq!(sent.body["stream_options"], json!({"include_usage": true}));

    let response = client::stream_sse(
        &format!("{}/v1/completions", gateway.url()),
        MASTER,
        &json!({"model": "gpt-4o-mini", "prompt": "say this", "stream": true}),
    )
    .await;
    assert!(response.done(), "{}", response.raw);
    let chunks = response.json_events();
    let mut text = String::new();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "text_completion", "{chunk}");
        assert_eq!(chunk["model"], "gpt-4o-mini", "{chunk}");
        assert!(chunk.get("usage").is_none(), "{chunk}");
        text.push_str(chunk["choices"][0]["text"].as_str().unwrap_or_default());
    }
    assert_eq!(text, "echo: say this");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_before_the_first_chunk_is_a_json_error() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    // azure-4o has no fallback: one call plus one retry, both 503.
    upstream.push_faults([Fault::status(503), Fault::status(503)]);
    let response = RequestBuilder::post(&chat_url(&gateway))
        .key(MASTER)
        .json(&chat_stream("azure-4o", "hi"))
        .send()
        .await;
    assert_error(&response, 503, "api_error");
    assert!(response.header("x-portcullis-call-id").is_some());
    assert_eq!(upstream.request_count(), 2);

    // A rate limit before the first chunk keeps its status and retry-after too.
    upstream.push_faults([Fault::rate_limited(1), Fault::rate_limited(1)]);
    let response = RequestBuilder::post(&chat_url(&gateway))
        .key(MASTER)
        .json(&chat_stream("azure-4o", "hi"))
        .send()
        .await;
    assert_error(&response, 429, "rate_limit_error");
    assert_eq!(response.header("retry-after"), Some("1"));
    assert_eq!(upstream.request_count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_the_first_chunk_are_retried() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    // An error status, and a stream that breaks before its first event: both are retried.
    for fault in [Fault::status(500), Fault::CutStream { after_chunks: 0 }] {
        upstream.clear_requests();
        upstream.push_fault(fault.clone());
        let response = client::stream_sse(
            &chat_url(&gateway),
            MASTER,
            &chat_stream("azure-4o", "again"),
        )
        .await;
        assert_eq!(response.status, 200, "{fault:?}: {}", response.raw);
        assert!(response.done(), "{fault:?}: {}", response.raw);
        assert_eq!(response.content(), "echo: again");
        assert_eq!(response.header("x-portcullis-attempted-retries"), Some("1"));
        assert_eq!(upstream.request_count(), 2, "{fault:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_failing_before_its_first_chunk_falls_back() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    upstream.push_faults([Fault::status(500), Fault::status(502)]);
    let response = client::stream_sse(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("gpt-4o-mini", "fall back"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.raw);
    assert!(response.done(), "{}", response.raw);
    // Anthropic answered, under the name the client asked for.
    chat_chunks(&response, "gpt-4o-mini");
    assert_eq!(response.content(), "echo: fall back");
    assert_eq!(
        response.header("x-portcullis-attempted-fallbacks"),
        Some("1")
    );
    assert_eq!(response.header("x-portcullis-model-group"), Some("claude"));
    let paths: Vec<String> = upstream.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/messages"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_stream_cut_ends_with_an_error_event_and_no_done() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    upstream.push_fault(Fault::CutStream { after_chunks: 3 });
    let response = client::stream_sse(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("gpt-4o-mini", &words(10)),
    )
    .await;
    assert_eq!(response.status, 200);
    assert!(!response.done(), "{}", response.raw);
    // The three chunks that made it, then the error.
    assert_eq!(response.events.len(), 4, "{}", response.raw);
    assert_eq!(response.content(), "echo: w0");
    let error = stream_error(&response).unwrap_or_else(|| panic!("error event: {}", response.raw));
    assert_eq!(error["error"]["type"], "api_error", "{error}");
    assert!(error["error"]["message"].is_string(), "{error}");
    // The gateway ends its own response cleanly after the error event.
    assert_eq!(response.error, None);
    // Chunks were already sent: no retry could be spliced in.
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_stream_error_event_from_the_upstream_is_relayed_without_done() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    let chunk = |content: &str| {
        sse_data(&json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]
        }))
    };
    upstream.push_fault(Fault::ReplySse(vec![
        chunk("partial"),
        chunk(" answer"),
        sse_data(&json!({"error": {"message": "the model crashed", "type": "server_error"}})),
        SSE_DONE.to_owned(),
    ]));
    let response = client::stream_sse(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("gpt-4o-mini", "x"),
    )
    .await;
    assert_eq!(response.status, 200);
    assert!(!response.done(), "{}", response.raw);
    assert_eq!(response.content(), "partial answer");
    let error = stream_error(&response).unwrap_or_else(|| panic!("error event: {}", response.raw));
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("the model crashed")),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_closed_before_it_finished_ends_with_an_error_not_done() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    let chunk = |content: &str| {
        sse_data(&json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]
        }))
    };
    // A clean close, but no finish reason and no [DONE]: the answer was cut short.
    upstream.push_fault(Fault::ReplySse(vec![chunk("half"), chunk(" an")]));
    let response = client::stream_sse(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("gpt-4o-mini", "x"),
    )
    .await;
    assert_eq!(response.content(), "half an");
    assert!(!response.done(), "{}", response.raw);
    assert!(stream_error(&response).is_some(), "{}", response.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_stream_stall_ends_with_a_timeout_error_event() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    // stream_idle_timeout_s is 1: a 4 s silence is a dead stream.
    upstream.push_fault(Fault::StallStream {
        after_chunks: 2,
        stall: Duration::from_secs(4),
    });
    let started = Instant::now();
    let response = client::stream_sse(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("gpt-4o-mini", &words(5)),
    )
    .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "ended by the idle timeout, not the stall's end: {elapsed:?}"
    );
    assert_eq!(response.status, 200);
    assert!(!response.done(), "{}", response.raw);
    assert_eq!(response.events.len(), 3, "{}", response.raw);
    let error = stream_error(&response).unwrap_or_else(|| panic!("error event: {}", response.raw));
    assert_eq!(error["error"]["code"], "timeout", "{error}");
    // The gateway hung up on the stalled upstream instead of waiting it out.
    assert!(
        wait_until(Duration::from_secs(3), || upstream.cancelled_streams() == 1).await,
        "upstream stream cancelled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream_stream() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    upstream.set_delay_per_chunk(Duration::from_millis(50));
    let mut stream = client::open_stream(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("gpt-4o-mini", &words(200)),
    )
    .await;
    assert_eq!(stream.status, 200);
    for _ in 0..3 {
        assert!(stream.next_event().await.is_some());
    }
    assert_eq!(upstream.cancelled_streams(), 0);
    drop(stream);
    assert!(
        wait_until(Duration::from_secs(5), || upstream.cancelled_streams() == 1).await,
        "the upstream request was not cancelled"
    );
    assert_eq!(upstream.completed_streams(), 0);
    assert!(
        gateway
            .wait_for_log("client went away", Duration::from_secs(2))
            .await,
        "logged:\n{}",
        gateway.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_error_event_mid_stream_is_relayed_without_done() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    upstream.push_fault(Fault::ReplySse(vec![
        sse_event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": "msg_x", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-latest",
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 3, "output_tokens": 1}
            }}),
        ),
        sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        sse_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "half"}}),
        ),
        sse_event(
            "error",
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ),
    ]));
    let response =
        client::stream_sse(&chat_url(&gateway), MASTER, &chat_stream("claude", "x")).await;
    assert_eq!(response.status, 200, "{}", response.raw);
    assert!(!response.done(), "{}", response.raw);
    assert_eq!(response.content(), "half");
    let error = stream_error(&response).unwrap_or_else(|| panic!("error event: {}", response.raw));
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Overloaded")),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_before_the_first_chunk_cancels_the_upstream() {
    let upstream = MockUpstream::start().await;
    // A long idle timeout, so only the client going away can end the upstream request early.
    let gateway = start(
        &STANDARD_CONFIG.replace("stream_idle_timeout_s: 1", "stream_idle_timeout_s: 30"),
        &upstream,
    )
    .await;
    // The upstream answers 200 at once, then thinks for 4 s before its first chunk.
    upstream.push_fault(Fault::StallStream {
        after_chunks: 0,
        stall: Duration::from_secs(4),
    });
    let call = RequestBuilder::post(&chat_url(&gateway))
        .key(MASTER)
        .json(&chat_stream("azure-4o", "slow thinker"))
        .timeout(Duration::from_millis(300))
        .try_send()
        .await;
    assert!(call.is_err(), "gave up before the first chunk: {call:?}");
    assert!(
        wait_until(Duration::from_secs(2), || upstream.cancelled_streams() == 1).await,
        "the upstream kept generating for a client that left (completed: {})",
        upstream.completed_streams()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_streamed_tool_call_becomes_openai_tool_call_deltas() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    upstream.push_fault(Fault::ReplySse(vec![
        sse_event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": "msg_t", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-latest",
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 12, "output_tokens": 1}
            }}),
        ),
        sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        sse_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking."}}),
        ),
        sse_event("content_block_stop", &json!({"type": "content_block_stop", "index": 0})),
        sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}
            }}),
        ),
        sse_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\":"}}),
        ),
        sse_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": " \"Oslo\"}"}}),
        ),
        sse_event("content_block_stop", &json!({"type": "content_block_stop", "index": 1})),
        sse_event(
            "message_delta",
            &json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 20}}),
        ),
        sse_event("message_stop", &json!({"type": "message_stop"})),
    ]));
    let response = client::stream_sse(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("claude", "weather in Oslo?"),
    )
    .await;
    assert!(response.done(), "{}", response.raw);
    let chunks = chat_chunks(&response, "claude");
    assert_eq!(response.content(), "Checking.");
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(calls[0]["index"], 0, "OpenAI numbers tool calls from 0");
    assert_eq!(calls[0]["id"], "toolu_1");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let arguments: String = calls
        .iter()
        .map(|c| {
            assert_eq!(c["index"], 0);
            c["function"]["arguments"].as_str().unwrap_or_default()
        })
        .collect();
    assert_eq!(arguments, "{\"city\": \"Oslo\"}");
    assert_eq!(
        chunks.last().expect("chunks")["choices"][0]["finish_reason"],
        "tool_calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_choices_empty_chunk_without_usage_is_not_mistaken_for_the_usage_chunk() {
    let upstream = MockUpstream::start().await;
    let gateway = gateway(&upstream).await;
    // Azure opens streams with a chunk that has no choices, only content-filter results; with
    // include_usage on (which the gateway always asks for), every non-final chunk has `usage: null`.
    let filter_chunk = json!({
        "id": "", "object": "", "created": 0, "model": "",
        "choices": [],
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {"hate": {"filtered": false, "severity": "safe"}}}],
        "usage": null
    });
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": "chatcmpl-az", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            "usage": null
        })
    };
    upstream.push_fault(Fault::ReplySse(vec![
        sse_data(&filter_chunk),
        sse_data(&chunk(json!({"role": "assistant", "content": ""}), Value::Null)),
        sse_data(&chunk(json!({"content": "filtered ok"}), Value::Null)),
        sse_data(&chunk(json!({}), json!("stop"))),
        sse_data(&json!({
            "id": "chatcmpl-az", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        })),
        SSE_DONE.to_owned(),
    ]));
    let response =
        client::stream_sse(&chat_url(&gateway), MASTER, &chat_stream("azure-4o", "x")).await;
    assert!(response.done(), "{}", response.raw);
    assert_eq!(response.content(), "filtered ok");
    let chunks = response.json_events();
    // Everything but the real usage chunk comes through, in order.
    assert_eq!(chunks.len(), 4, "{}", response.raw);
    assert_eq!(
        chunks[0]["prompt_filter_results"], filter_chunk["prompt_filter_results"],
        "{}",
        response.raw
    );
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "{}",
        response.raw
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_is_costed_even_when_the_client_did_not_ask_for_it() {
    let upstream = MockUpstream::start().await;
    let gateway = start_json_logs(STANDARD_CONFIG, &upstream).await;
    // No `stream_options`: the client gets no usage chunk, but the gateway asks for one anyway.
    let response = client::stream_sse(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("gpt-4o-mini", "count these tokens"),
    )
    .await;
    assert!(response.done(), "{}", response.raw);
    assert_eq!(response.content(), "echo: count these tokens");
    for chunk in chat_chunks(&response, "gpt-4o-mini") {
        assert!(chunk.get("usage").is_none(), "{chunk}");
    }

    let records = wait_for_call_records(&gateway, 1).await;
    let record = &records[0];
    assert_eq!(record["stream"], true, "{record}");
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["deployment"], "oai-a", "{record}");
    // "be brief" + "count these tokens" in, "echo: count these tokens" out.
    assert_eq!(record["prompt_tokens"], 5, "{record}");
    assert_eq!(record["completion_tokens"], 4, "{record}");
    // gpt-4o-mini-2024-07-18 is in the built-in price table: 0.15 / 0.60 USD per million tokens.
    let cost = record["cost_usd"].as_f64().expect("cost_usd is a number");
    let expected = (5.0 * 0.15 + 4.0 * 0.60) / 1e6;
    assert!(
        (cost - expected).abs() < 1e-12,
        "cost {cost}, expected {expected}: {record}"
    );
}
