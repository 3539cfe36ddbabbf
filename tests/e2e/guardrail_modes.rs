//! Guardrails in every mode with the real PII plugin: `post_call` on whole responses and on
//! streams (text held back across chunks, a block mid-stream), `during_call` cancelling the
//! upstream call, and `monitor` acting on nothing.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::client;
use support::fixtures::{assert_error, chat, chat_stream, start, MASTER};
use support::mock_upstream::{sse_data, SSE_DONE};
use support::{wasm, Fault, MockUpstream};

const EMAIL: &str = "jane.doe@example.com";

/// One OpenAI deployment (`gpt`, on the mock upstream), one local echo (`echo`), and the PII
/// plugin enabled as `pii` with `settings` (mode, config, ...).
fn config(settings: &str) -> String {
    format!(
        r#"
server: {{ listen: "{{listen}}" }}
auth: {{ master_key: "sk-master" }}
models:
  - {{ name: gpt, provider: openai, model: gpt-4o-mini, api_base: "{{upstream}}/v1", api_key: "sk-upstream-test" }}
  - {{ name: echo, provider: mock }}
plugins:
  dir: "{dir}"
  enabled:
    - {{ name: pii, path: pii_mask.wasm, default_on: true, {settings} }}
"#,
        dir = {
            wasm::built("pii_mask");
            wasm::dir().display().to_string()
        }
    )
}

/// The mock upstream and a gateway on [`config`] with `settings`.
async fn pii_gateway(settings: &str) -> (MockUpstream, support::Gateway) {
    let upstream = MockUpstream::start().await;
    let gateway = start(&config(settings), &upstream).await;
    (upstream, gateway)
}

fn url(gateway: &support::Gateway) -> String {
    format!("{}/v1/chat/completions", gateway.url())
}

/// An upstream stream whose content arrives in exactly these pieces.
fn stream_of(pieces: &[&str]) -> Fault {
    let mut frames: Vec<String> = pieces
        .iter()
        .map(|piece| {
            sse_data(&json!({
                "id": "chatcmpl-pieces", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]
            }))
        })
        .collect();
    frames.push(sse_data(&json!({
        "id": "chatcmpl-pieces", "object": "chat.completion.chunk", "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    })));
    frames.push(SSE_DONE.to_owned());
    Fault::ReplySse(frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_call_masks_a_whole_response_and_leaves_the_request_alone() {
    let (upstream, gateway) = pii_gateway("mode: post_call").await;
    let response = client::post_json(
        &url(&gateway),
        MASTER,
        &chat("gpt", &format!("mail {EMAIL}")),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let content = response.json()["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    assert_eq!(content, "echo: mail [EMAIL]");
    let sent = upstream.last_request().expect("the upstream was called");
    assert!(
        sent.body.to_string().contains(EMAIL),
        "post_call does not touch the request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_call_in_block_mode_refuses_a_response_with_personal_data() {
    let (_upstream, gateway) = pii_gateway("mode: post_call, config: { action: block }").await;
    let response = client::post_json(
        &url(&gateway),
        MASTER,
        &chat("echo", &format!("mail {EMAIL}")),
    )
    .await;
    let error = assert_error(&response, 400, "guardrail_violation");
    assert_eq!(error["param"], "pii");
    assert!(
        !response.text().contains(EMAIL),
        "the refusal does not repeat the data: {}",
        response.text()
    );
    let clean = client::post_json(&url(&gateway), MASTER, &chat("echo", "nothing personal")).await;
    assert_eq!(clean.status, 200, "{}", clean.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_has_an_address_split_across_chunks_masked() {
    // The gateway keeps the held text, so a call of its own per delta masks as well.
    for plugin in [
        "mode: post_call",
        "mode: post_call, instance: pooled, stream_instance: per_delta",
    ] {
        let (upstream, gateway) = pii_gateway(plugin).await;
        upstream.push_fault(stream_of(&[
            "Write to jane.d",
            "oe@exam",
            "ple.com",
            " or call.",
        ]));
        let response =
            client::stream_sse(&url(&gateway), MASTER, &chat_stream("gpt", "contact?")).await;
        assert_eq!(response.status, 200, "{plugin}");
        assert!(response.done(), "{plugin}: {}", response.raw);
        assert_eq!(response.content(), "Write to [EMAIL] or call.", "{plugin}");
        assert!(!response.raw.contains("jane"), "{plugin}: {}", response.raw);
        // Every chunk still names the model the client asked for.
        for event in response.json_events() {
            assert_eq!(event["model"], "gpt", "{plugin}: {event}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_guardrail_blocks_mid_stream_with_an_error_event() {
    let (upstream, gateway) = pii_gateway("mode: post_call, config: { action: block }").await;
    upstream.push_fault(stream_of(&[
        "Hello there,\n",
        "it is jane.doe@example.com",
        " ok\n",
    ]));
    let response = client::stream_sse(&url(&gateway), MASTER, &chat_stream("gpt", "hi")).await;
    assert_eq!(response.status, 200, "the stream had started");
    assert!(
        !response.done(),
        "a blocked stream has no [DONE]: {}",
        response.raw
    );
    assert_eq!(response.content(), "Hello there,\n", "{}", response.raw);
    assert!(!response.raw.contains("jane"), "{}", response.raw);
    let last: Value = response.json_events().last().cloned().expect("events");
    assert_eq!(last["error"]["type"], "guardrail_violation", "{last}");
    assert_eq!(last["error"]["param"], "pii", "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_echo_streams_through_the_guardrail_word_by_word() {
    let (_upstream, gateway) = pii_gateway("mode: post_call").await;
    let text = format!("reach {EMAIL} today, thanks");
    let response = client::stream_sse(&url(&gateway), MASTER, &chat_stream("echo", &text)).await;
    assert!(response.done(), "{}", response.raw);
    assert_eq!(response.content(), "reach [EMAIL] today, thanks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_call_block_cancels_an_upstream_call_that_would_never_answer() {
    let upstream = MockUpstream::start().await;
    // A guardrail slow enough (1 s) that the upstream call is surely under way when it blocks.
    let yaml = config("mode: during_call").replace(
        "    - { name: pii, path: pii_mask.wasm, default_on: true, mode: during_call }",
        &format!(
            "    - {{ name: pii, path: \"{}\", default_on: true, mode: during_call, limits: {{ timeout_ms: 5000 }}, capabilities: {{ clocks: true }}, config: {{ check: block, delay_ms: 1000 }} }}",
            wasm::built("misbehave").display()
        ),
    );
    let gateway = start(&yaml, &upstream).await;
    upstream.push_fault(Fault::Hang);
    let started = Instant::now();
    let response = client::RequestBuilder::post(&url(&gateway))
        .key(MASTER)
        .json(&chat("gpt", "anything"))
        .timeout(Duration::from_secs(20))
        .send()
        .await;
    let error = assert_error(&response, 400, "guardrail_violation");
    assert!(error["message"]
        .as_str()
        .is_some_and(|m| m.contains("blocked on purpose")));
    assert_eq!(
        upstream.request_count(),
        1,
        "the upstream call was under way"
    );
    // The upstream never answers and the router waits ten minutes: only cancelling the upstream
    // call answers this soon.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_call_allows_what_it_finds_clean_and_never_rewrites() {
    let (upstream, gateway) = pii_gateway("mode: during_call").await;
    let response =
        client::post_json(&url(&gateway), MASTER, &chat("gpt", "nothing personal")).await;
    assert_eq!(response.status, 200, "{}", response.text());
    // In mask mode the verdict is a rewrite, which comes too late: the upstream saw the original.
    let response = client::post_json(
        &url(&gateway),
        MASTER,
        &chat("gpt", &format!("mail {EMAIL}")),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(upstream
        .last_request()
        .expect("called")
        .body
        .to_string()
        .contains(EMAIL));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_guardrail_logs_its_verdict_and_changes_nothing() {
    let (_upstream, gateway) =
        pii_gateway("mode: post_call, monitor: true, config: { action: block }").await;
    let text = format!("mail {EMAIL}");
    let whole = client::post_json(&url(&gateway), MASTER, &chat("echo", &text)).await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert_eq!(whole.json()["choices"][0]["message"]["content"], text);
    let stream = client::stream_sse(&url(&gateway), MASTER, &chat_stream("echo", &text)).await;
    assert!(stream.done());
    assert_eq!(stream.content(), text);
    assert!(
        gateway
            .wait_for_log("guardrail verdict (monitor only)", Duration::from_secs(5))
            .await
    );
}

/// Each open stream holds a guardrail instance, and each instance a fiber stack from the engine's
/// pool: more streams than wasmtime's default of 1,000 stacks are held at once, none refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_streams_than_the_default_stack_pool_each_hold_a_guardrail() {
    const STREAMS: usize = 1_050;
    // A thousand guarded streams starting at once on a shared machine: the limit is not what
    // this test is about.
    let (upstream, gateway) = pii_gateway("mode: post_call, limits: { timeout_ms: 30000 }").await;
    // Long enough that more than a thousand are open before the first ones end, even when
    // starting them all takes a loaded machine a few seconds.
    upstream.set_delay_per_chunk(Duration::from_millis(1_500));
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let url = url(&gateway);
        streams.spawn(async move {
            client::stream_sse(&url, MASTER, &chat_stream("gpt", "one two three four five")).await
        });
    }
    // More open at one moment than the default pool had stacks.
    let open = || upstream.request_count() - upstream.completed_streams();
    let overlapped = support::wait_until(Duration::from_secs(60), || open() > 1_000).await;
    assert!(
        overlapped,
        "at most {} streams were open at once ({} requests, {} completed)",
        open(),
        upstream.request_count(),
        upstream.completed_streams()
    );
    while let Some(joined) = streams.join_next().await {
        let response = joined.expect("the stream task");
        assert_eq!(response.status, 200, "{}", response.raw);
        assert!(response.done(), "{}", response.raw);
        assert_eq!(response.content(), "echo: one two three four five");
    }
}
