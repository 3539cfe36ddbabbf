//! A broken plugin never takes the gateway down: loops, memory hogs, traps, slow or rejecting
//! `init` and nonsense answers are each contained within the plugin's limits and handled by its
//! `on_error`; and a plugin reaches no file, environment variable or clock it was not granted.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::client;
use support::fixtures::{assert_error, chat, chat_stream};
use support::{wasm, Gateway, TempDir};

fn misbehave_wasm() -> PathBuf {
    wasm::built("misbehave")
}

/// A gateway on the mock provider with the misbehaving plugin as a default-on guardrail.
fn config(plugin: &str, extra: &str) -> String {
    let wasm = misbehave_wasm();
    format!(
        r#"
server: {{ listen: "{{listen}}" }}
models:
  - {{ name: echo, provider: mock, id: a }}
  - {{ name: echo, provider: mock, id: b }}
plugins:
  dir: "{dir}"
  enabled:
    - {{ name: misbehave, path: misbehave.wasm, default_on: true, {plugin} }}
{extra}
"#,
        dir = wasm.parent().expect("a directory").display()
    )
}

async fn call(gateway: &Gateway) -> client::Response {
    client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        None,
        &chat("echo", "hello"),
    )
    .await
}

/// The gateway still answers health checks and plain calls.
async fn assert_healthy(gateway: &Gateway) {
    let ready = client::get(&format!("{}/health/readiness", gateway.url()), None).await;
    assert_eq!(ready.status, 200, "{}", gateway.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_is_stopped_at_the_deadline() {
    let gateway = Gateway::start(&config(
        "limits: { timeout_ms: 50 }, config: { check: loop }",
        "",
    ))
    .await;
    for _ in 0..3 {
        let started = Instant::now();
        let response = call(&gateway).await;
        let error = assert_error(&response, 500, "plugin_error");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("misbehave") && message.contains("time limit of 50 ms"),
            "{message}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }
    assert_healthy(&gateway).await;
}

/// The time limit counts the plugin's own running time. A hundred calls at once queue for the
/// gateway's cores several times longer than the limit (each costs a debug build about 2 ms), and
/// none of them may time out for it; the wall-clock backstop, ten times the limit, is not reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_calls_does_not_run_out_of_plugin_time_while_queued() {
    let gateway = Gateway::start(&config(
        "limits: { timeout_ms: 200 }, config: { check: allow }",
        "",
    ))
    .await;
    let started = Instant::now();
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let url = format!("{}/v1/chat/completions", gateway.url());
            tokio::spawn(async move { client::post_json(&url, None, &chat("echo", "hello")).await })
        })
        .collect();
    for call in calls {
        let response = call.await.expect("the call task");
        assert_eq!(response.status, 200, "{}", response.text());
    }
    eprintln!(
        "100 concurrent calls through a 200 ms plugin took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_lets_the_call_through_when_the_plugin_fails() {
    let gateway = Gateway::start(&config(
        "on_error: allow, limits: { timeout_ms: 50 }, config: { check: loop }",
        "",
    ))
    .await;
    let response = call(&gateway).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["choices"][0]["message"]["content"], "hello");
    assert!(
        gateway.logs().contains("on_error: allow"),
        "the failure is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_hits_its_cap_and_the_next_call_gets_a_fresh_instance() {
    let gateway = Gateway::start(&config(
        "limits: { memory_mb: 16, timeout_ms: 2000 }, config: { check: oom }",
        "",
    ))
    .await;
    for _ in 0..3 {
        let response = call(&gateway).await;
        let error = assert_error(&response, 500, "plugin_error");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("misbehave"),
            "{error}"
        );
    }
    assert_healthy(&gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_fails_only_that_call() {
    let gateway = Gateway::start(&config("config: { check: trap }", "")).await;
    for _ in 0..3 {
        let response = call(&gateway).await;
        let error = assert_error(&response, 500, "plugin_error");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("plugin 'misbehave' failed"),
            "{error}"
        );
    }
    assert_healthy(&gateway).await;
}

#[test]
fn slow_or_rejecting_init_fails_the_load_with_a_clear_reason() {
    let (code, output) = Gateway::check(&config(
        "limits: { timeout_ms: 100 }, config: { init: slow }",
        "",
    ));
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("plugin 'misbehave'") && output.contains("time limit of 100 ms"),
        "{output}"
    );

    let (code, output) = Gateway::check(&config("config: { init: reject }", ""));
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("rejected on purpose"), "{output}");

    let (code, output) = Gateway::check(&config("config: { check: levitate }", ""));
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("check"),
        "the config error names the field: {output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_answering_nonsense_falls_back_to_the_built_in_strategy() {
    let gateway = Gateway::start(&config(
        "config: { check: allow }",
        "router: { strategy: misbehave, fallback_strategy: least-busy }",
    ))
    .await;
    for _ in 0..5 {
        let response = call(&gateway).await;
        assert_eq!(response.status, 200, "{}", response.text());
    }
}

/// The probe's report: what the plugin could see from inside its sandbox.
async fn probe(gateway: &Gateway) -> Value {
    let response = call(gateway).await;
    let error = assert_error(&response, 400, "guardrail_violation");
    let message = error["message"].as_str().unwrap_or_default();
    let report = message.split_once(": ").map_or("", |(_, r)| r);
    serde_json::from_str(report).unwrap_or_else(|e| panic!("{e}: {message}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_grants_a_plugin_sees_no_files_environment_or_clock() {
    let gateway = Gateway::builder(&config("config: { check: probe }", ""))
        .env("PORTCULLIS_SECRET_FOR_TEST", "do-not-leak")
        .start()
        .await;
    let report = probe(&gateway).await;
    assert!(
        report["etc_passwd"]
            .as_str()
            .unwrap_or_default()
            .starts_with("error"),
        "{report}"
    );
    assert!(
        report["granted"]
            .as_str()
            .unwrap_or_default()
            .starts_with("error"),
        "{report}"
    );
    assert_eq!(report["env_vars"], 0, "{report}");
    assert_eq!(report["clock_secs"], 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_directories_and_clocks_are_visible_and_nothing_more() {
    let dir = TempDir::new("portcullis-grant");
    std::fs::write(dir.path().join("hello.txt"), "hi there").expect("write");
    let plugin = format!(
        "capabilities: {{ dirs: [{{ host: \"{}\", guest: /granted }}], clocks: true }}, config: {{ check: probe }}",
        dir.path().display()
    );
    let gateway = Gateway::start(&config(&plugin, "")).await;
    let report = probe(&gateway).await;
    assert_eq!(report["granted"], "read 8 bytes", "{report}");
    assert!(
        report["etc_passwd"]
            .as_str()
            .unwrap_or_default()
            .starts_with("error"),
        "{report}"
    );
    assert!(
        report["clock_secs"].as_u64().unwrap_or_default() > 1_700_000_000,
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_spinning_in_loops_do_not_stall_other_calls() {
    // Opt-in, so plain calls skip it; a long deadline, so looping calls are in flight throughout.
    let yaml = config("limits: { timeout_ms: 1500 }, config: { check: loop }", "")
        .replace("default_on: true", "default_on: false");
    let gateway = Gateway::start(&yaml).await;
    let url = format!("{}/v1/chat/completions", gateway.url());
    let mut looping = chat("echo", "spin");
    looping["guardrails"] = serde_json::json!(["misbehave"]);
    // More spinning calls than the gateway has worker threads (one per core).
    let spinners: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (url.clone(), looping.clone());
            tokio::spawn(async move { client::post_json(&url, None, &body).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let plain = call(&gateway).await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert!(
        started.elapsed() < Duration::from_millis(750),
        "a plain call waited {:?} behind spinning plugins",
        started.elapsed()
    );
    for spinner in spinners {
        let response = spinner.await.expect("the task ran");
        assert_error(&response, 500, "plugin_error");
    }
}

/// The reasons of `n` calls in a row (the `count` check blocks with `call N`).
async fn reasons(gateway: &Gateway, n: usize) -> Vec<String> {
    let mut reasons = Vec::new();
    for _ in 0..n {
        let response = call(gateway).await;
        let body = response.json();
        reasons.push(match body["error"]["message"].as_str() {
            Some(message) if response.status == 400 => {
                message.rsplit(": ").next().unwrap_or_default().to_owned()
            }
            _ => format!("{} {}", response.status, body["error"]["type"]),
        });
    }
    reasons
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_gets_a_fresh_instance_unless_the_plugin_is_pooled() {
    let fresh = Gateway::start(&config("config: { check: count }", "")).await;
    assert_eq!(reasons(&fresh, 3).await, ["call 1", "call 1", "call 1"]);

    let pooled = Gateway::start(&config(
        "instance: pooled, recycle_after: 3, config: { check: count }",
        "",
    ))
    .await;
    // One warm instance serves calls in turn until it has served three, then a new one starts.
    assert_eq!(
        reasons(&pooled, 5).await,
        ["call 1", "call 2", "call 3", "call 1", "call 2"]
    );
}

/// The `[call N]` marks `n` streams in a row end with (the `count` check on streams).
async fn stream_marks(gateway: &Gateway, n: usize) -> Vec<String> {
    let mut marks = Vec::new();
    for _ in 0..n {
        let url = format!("{}/v1/chat/completions", gateway.url());
        let response = client::stream_sse(&url, None, &chat_stream("echo", "hello")).await;
        let text: String = response
            .json_events()
            .iter()
            .filter_map(|e| {
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        let mark = text.rsplit('[').next().unwrap_or_default();
        marks.push(mark.trim_end_matches(']').to_owned());
    }
    marks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_instance_that_saw_a_stream_to_its_end_serves_the_next() {
    let stream_guard = "mode: post_call, config: { check: count }";
    let fresh = Gateway::start(&config(stream_guard, "")).await;
    let fresh_marks = stream_marks(&fresh, 2).await;
    assert_eq!(fresh_marks[0], fresh_marks[1], "{fresh_marks:?}");

    let pooled = Gateway::start(&config(&format!("instance: pooled, {stream_guard}"), "")).await;
    let marks = stream_marks(&pooled, 3).await;
    let counts: Vec<u32> = marks
        .iter()
        .map(|m| m.trim_start_matches("call ").parse().expect("a count"))
        .collect();
    // The count goes on from one stream to the next: the same warm instance saw all three.
    assert_eq!(marks[0], fresh_marks[0]);
    assert_eq!(counts[1], 2 * counts[0], "{marks:?}");
    assert_eq!(counts[2], 3 * counts[0], "{marks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_stream_instance_per_delta_each_delta_is_a_call_of_its_own() {
    // An instance replaced after each call: one seeing the whole stream counts every delta.
    let stream_guard =
        "instance: pooled, recycle_after: 1, mode: post_call, config: { check: count }";
    let per_stream = Gateway::start(&config(stream_guard, "")).await;
    let whole = stream_marks(&per_stream, 1).await;
    assert_ne!(whole, ["call 1"], "the echo streams several deltas");

    let per_delta = Gateway::start(&config(
        &format!("stream_instance: per_delta, {stream_guard}"),
        "",
    ))
    .await;
    assert_eq!(stream_marks(&per_delta, 2).await, ["call 1", "call 1"]);
    let fresh = Gateway::start(&config(
        "stream_instance: per_delta, mode: post_call, config: { check: count }",
        "",
    ))
    .await;
    assert_eq!(stream_marks(&fresh, 1).await, ["call 1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_instance_that_traps_is_replaced() {
    let gateway = Gateway::start(&config(
        "instance: pooled, config: { check: count, trap_at: 2 }",
        "",
    ))
    .await;
    assert_eq!(
        reasons(&gateway, 4).await,
        [
            "call 1",
            "500 \"plugin_error\"",
            "call 1",
            "500 \"plugin_error\""
        ]
    );
    assert_healthy(&gateway).await;
}
