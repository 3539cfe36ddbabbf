//! Resilience end to end: retries, fallbacks, cooldowns, timeouts, least-busy routing, rpm and tpm caps.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::client::{self, RequestBuilder};
use support::fixtures::{assert_error, chat, chat_stream, standard, start, words, MASTER};
use support::gateway::free_port;
use support::{wait_until, Fault, Gateway, MockUpstream};

/// Settings shared by the dedicated configs below; the `{...}` placeholders vary per test.
const TEMPLATE: &str = r#"
server: { listen: "{listen}", shutdown_drain_s: 5 }
auth: { master_key: "sk-master" }
models:
{models}
router: { strategy: {strategy}, num_retries: {retries}, timeout_s: 1, stream_idle_timeout_s: 1, allowed_fails: {allowed_fails}, cooldown_s: 1 }
"#;

/// Two deployments of one group on the same upstream, told apart by their upstream model ids.
const PAIR: &str = r#"
  - { name: pair, provider: openai, model: model-a, id: dep-a, api_base: "{upstream}/v1", api_key: "sk-upstream-test" }
  - { name: pair, provider: openai, model: model-b, id: dep-b, api_base: "{upstream}/v1", api_key: "sk-upstream-test" }
"#;

const SOLO: &str = r#"
  - { name: solo, provider: openai, model: solo-model, id: solo-a, api_base: "{upstream}/v1", api_key: "sk-upstream-test" }
"#;

struct Setup<'a> {
    models: &'a str,
    strategy: &'a str,
    retries: u32,
    allowed_fails: u32,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            models: PAIR,
            strategy: "simple-shuffle",
            retries: 0,
            allowed_fails: 100,
        }
    }
}

async fn gateway(setup: Setup<'_>, upstream: &MockUpstream) -> Gateway {
    let config = TEMPLATE
        .replace("{models}", setup.models.trim_matches('\n'))
        .replace("{strategy}", setup.strategy)
        .replace("{retries}", &setup.retries.to_string())
        .replace("{allowed_fails}", &setup.allowed_fails.to_string());
    start(&config, upstream).await
}

fn chat_url(gateway: &Gateway) -> String {
    format!("{}/v1/chat/completions", gateway.url())
}

/// The deployment id whose upstream model is `model` in [`PAIR`].
fn pair_id(model: &str) -> &'static str {
    match model {
        "model-a" => "dep-a",
        "model-b" => "dep-b",
        other => panic!("not a PAIR model: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_then_success_is_retried() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    upstream.push_fault(Fault::status(500));
    let response = client::post_json(
        &chat_url(&gateway),
        MASTER,
        &chat("gpt-4o-mini", "retry me"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["model"], "gpt-4o-mini");
    assert_eq!(
        response.json()["choices"][0]["message"]["content"],
        "echo: retry me"
    );
    assert_eq!(response.header("x-portcullis-attempted-retries"), Some("1"));
    assert_eq!(
        response.header("x-portcullis-attempted-fallbacks"),
        Some("0")
    );
    assert_eq!(response.header("x-portcullis-model-id"), Some("oai-a"));
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_the_other_deployment_of_the_group() {
    let upstream = MockUpstream::start().await;
    // The default allowed_fails (100) keeps both deployments out of cooldown during the rounds
    // (a cooling deployment is skipped, and then the retry rightly goes back to the one that failed).
    let setup = Setup {
        retries: 1,
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    // The first pick is random: repeat so both orders are likely to be seen.
    for round in 0..4 {
        upstream.clear_requests();
        upstream.push_fault(Fault::status(500));
        let response = client::post_json(&chat_url(&gateway), MASTER, &chat("pair", "hi")).await;
        assert_eq!(response.status, 200, "round {round}: {}", response.text());
        assert_eq!(response.header("x-portcullis-attempted-retries"), Some("1"));
        let requests = upstream.requests();
        assert_eq!(requests.len(), 2, "round {round}");
        let failed = requests[0].body["model"].as_str().expect("model");
        let answered = requests[1].body["model"].as_str().expect("model");
        assert_ne!(
            failed, answered,
            "round {round}: retried the failed deployment"
        );
        assert_eq!(
            response.header("x-portcullis-model-id"),
            Some(pair_id(answered)),
            "round {round}"
        );
        assert_eq!(response.json()["model"], "pair");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_deployment_is_routed_around() {
    let upstream = MockUpstream::start().await;
    let models = format!(
        r#"
  - {{ name: mixed, provider: openai, model: m, id: dead, api_base: "http://127.0.0.1:{}/v1", api_key: "sk-upstream-test" }}
  - {{ name: mixed, provider: openai, model: m, id: live, api_base: "{{upstream}}/v1", api_key: "sk-upstream-test" }}
"#,
        free_port()
    );
    let setup = Setup {
        models: &models,
        retries: 1,
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    for _ in 0..4 {
        let response = client::post_json(&chat_url(&gateway), MASTER, &chat("mixed", "hi")).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.header("x-portcullis-model-id"), Some("live"));
    }
    assert_eq!(upstream.request_count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_400_is_not_retried() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    upstream.push_fault(Fault::Status {
        status: 400,
        body: Some(
            r#"{"error":{"message":"'temperature' is too hot","type":"invalid_request_error","param":"temperature","code":null}}"#
                .to_owned(),
        ),
        headers: Vec::new(),
    });
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", "hi")).await;
    let error = assert_error(&response, 400, "invalid_request_error");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("'temperature' is too hot")),
        "the upstream's reason is passed on: {error}"
    );
    assert_eq!(response.header("x-should-retry"), Some("false"));
    assert_eq!(upstream.request_count(), 1, "not retried, no fallback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_attempt_fails_the_call_falls_back() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    // num_retries 2: three attempts on gpt-4o-mini, then the `claude` fallback group.
    upstream.push_faults([Fault::status(500), Fault::status(502), Fault::status(500)]);
    let response = client::post_json(
        &chat_url(&gateway),
        MASTER,
        &chat("gpt-4o-mini", "fall back"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_eq!(
        body["model"], "gpt-4o-mini",
        "the name the client asked for"
    );
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: fall back");
    assert_eq!(
        response.header("x-portcullis-attempted-fallbacks"),
        Some("1")
    );
    assert_eq!(response.header("x-portcullis-attempted-retries"), Some("3"));
    assert_eq!(response.header("x-portcullis-model-group"), Some("claude"));
    assert_eq!(response.header("x-portcullis-model-id"), Some("claude-2"));
    let paths: Vec<String> = upstream.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/messages"
        ]
    );

    // Three failures (allowed_fails) put oai-a in cooldown: the next call goes straight to the
    // fallback without knocking on the resting deployment.
    upstream.clear_requests();
    let response =
        client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", "rested")).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["model"], "gpt-4o-mini");
    assert_eq!(
        response.header("x-portcullis-attempted-fallbacks"),
        Some("1")
    );
    assert_eq!(response.header("x-portcullis-attempted-retries"), Some("0"));
    let paths: Vec<String> = upstream.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/v1/messages"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_deployment_cools_down_then_recovers() {
    let upstream = MockUpstream::start().await;
    let setup = Setup {
        models: SOLO,
        allowed_fails: 2,
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    upstream.set_default_status(Some(500));
    for attempt in 0..2 {
        let response = client::post_json(&chat_url(&gateway), MASTER, &chat("solo", "hi")).await;
        assert_error(&response, 502, "api_error");
        assert_eq!(upstream.request_count(), attempt + 1);
    }
    let cooled_at = Instant::now();

    // Two failures: the deployment rests, and the call fails fast without reaching it.
    let started = Instant::now();
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("solo", "hi")).await;
    assert_error(&response, 503, "api_error");
    assert!(started.elapsed() < Duration::from_millis(500), "fails fast");
    assert_eq!(upstream.request_count(), 2, "the upstream was left alone");

    upstream.set_default_status(None);
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(cooled_at.elapsed())).await;
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("solo", "back")).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(upstream.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_times_out_with_504() {
    let upstream = MockUpstream::start().await;
    let setup = Setup {
        models: SOLO,
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    upstream.push_fault(Fault::Delay(Duration::from_secs(2)));
    let started = Instant::now();
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("solo", "hi")).await;
    let elapsed = started.elapsed();
    let error = assert_error(&response, 504, "api_error");
    assert_eq!(error["code"], "timeout");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(1900),
        "timeout_s is 1: {elapsed:?}"
    );

    // A stream whose head is late times out the same way.
    upstream.push_fault(Fault::SlowFirstByte(Duration::from_secs(2)));
    let response = RequestBuilder::post(&chat_url(&gateway))
        .key(MASTER)
        .json(&chat_stream("solo", "hi"))
        .send()
        .await;
    assert_error(&response, 504, "api_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_busy_routes_around_a_deployment_held_by_a_stream() {
    let upstream = MockUpstream::start().await;
    let setup = Setup {
        strategy: "least-busy",
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    // Only streamed frames are paced, so the stream stays open while whole replies are instant.
    upstream.set_delay_per_chunk(Duration::from_millis(100));
    let mut stream = client::open_stream(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("pair", &words(100)),
    )
    .await;
    assert_eq!(stream.status, 200);
    let busy = stream
        .header("x-portcullis-model-id")
        .expect("model id")
        .to_owned();
    assert!(stream.next_event().await.is_some());

    for _ in 0..5 {
        let response = client::post_json(&chat_url(&gateway), MASTER, &chat("pair", "hi")).await;
        assert_eq!(response.status, 200, "{}", response.text());
        let id = response.header("x-portcullis-model-id").expect("model id");
        assert_ne!(id, busy, "routed to the deployment that is busy streaming");
    }

    // Once the stream is gone, its deployment counts as idle again and gets traffic.
    drop(stream);
    assert!(wait_until(Duration::from_secs(5), || upstream.cancelled_streams() == 1).await);
    let mut used = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while used.len() < 2 && Instant::now() < deadline {
        let response = client::post_json(&chat_url(&gateway), MASTER, &chat("pair", "hi")).await;
        assert_eq!(response.status, 200);
        used.insert(response.header("x-portcullis-model-id").map(str::to_owned));
    }
    assert_eq!(used.len(), 2, "both deployments serve once neither is busy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpm_cap_refuses_the_third_call_in_a_minute() {
    let upstream = MockUpstream::start().await;
    let models = r#"
  - { name: capped, provider: openai, model: capped-model, api_base: "{upstream}/v1", api_key: "sk-upstream-test", rpm: 2 }
"#;
    let setup = Setup {
        models,
        retries: 2,
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    for _ in 0..2 {
        let response = client::post_json(&chat_url(&gateway), MASTER, &chat("capped", "hi")).await;
        assert_eq!(response.status, 200, "{}", response.text());
    }
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("capped", "hi")).await;
    assert_error(&response, 503, "api_error");
    assert_eq!(upstream.request_count(), 2, "the third call never left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_reply_that_stalls_half_way_times_out() {
    let upstream = MockUpstream::start().await;
    let setup = Setup {
        models: SOLO,
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    // The head and half the JSON arrive at once; timeout_s covers the whole body.
    upstream.push_fault(Fault::StallStream {
        after_chunks: 1,
        stall: Duration::from_secs(3),
    });
    let started = Instant::now();
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("solo", "hi")).await;
    assert_error(&response, 504, "api_error");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );

    // Half a JSON body and a broken connection is the upstream's failure.
    upstream.push_fault(Fault::CutStream { after_chunks: 1 });
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("solo", "hi")).await;
    assert_error(&response, 502, "api_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_silent_before_its_first_chunk_is_retried() {
    let upstream = MockUpstream::start().await;
    let setup = Setup {
        models: SOLO,
        retries: 1,
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    // Answers 200 at once, then says nothing for longer than stream_idle_timeout_s.
    upstream.push_fault(Fault::StallStream {
        after_chunks: 0,
        stall: Duration::from_secs(3),
    });
    let started = Instant::now();
    let response =
        client::stream_sse(&chat_url(&gateway), MASTER, &chat_stream("solo", "wake up")).await;
    assert_eq!(response.status, 200, "{}", response.raw);
    assert!(response.done(), "{}", response.raw);
    assert_eq!(response.content(), "echo: wake up");
    assert_eq!(response.header("x-portcullis-attempted-retries"), Some("1"));
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(2), || upstream.cancelled_streams() == 1).await,
        "the silent attempt was abandoned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_cap_refuses_calls_once_the_minute_s_tokens_are_spent() {
    let upstream = MockUpstream::start().await;
    // Each call below costs 5 tokens ("be brief" + "hi" in, "echo: hi" out).
    let models = r#"
  - { name: capped, provider: openai, model: capped-model, api_base: "{upstream}/v1", api_key: "sk-upstream-test", tpm: 8 }
"#;
    let setup = Setup {
        models,
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    for _ in 0..2 {
        let response = client::post_json(&chat_url(&gateway), MASTER, &chat("capped", "hi")).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.json()["usage"]["total_tokens"], 5);
    }
    let response = client::post_json(&chat_url(&gateway), MASTER, &chat("capped", "hi")).await;
    assert_error(&response, 503, "api_error");
    assert_eq!(upstream.request_count(), 2, "the third call never left");
}

/// [`PAIR`] with a long per-deployment timeout, so a deliberately slow answer still succeeds.
const PATIENT_PAIR: &str = r#"
  - { name: pair, provider: openai, model: model-a, id: dep-a, api_base: "{upstream}/v1", api_key: "sk-upstream-test", timeout_s: 10 }
  - { name: pair, provider: openai, model: model-b, id: dep-b, api_base: "{upstream}/v1", api_key: "sk-upstream-test", timeout_s: 10 }
"#;

/// The deployment that answered, from the response header.
fn model_id(response: &client::Response) -> String {
    response
        .header("x-portcullis-model-id")
        .unwrap_or_else(|| panic!("no x-portcullis-model-id: {:?}", response.headers))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_based_routing_prefers_the_faster_deployment() {
    let upstream = MockUpstream::start().await;
    let setup = Setup {
        models: PATIENT_PAIR,
        strategy: "latency-based",
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    // Whichever deployment is picked first answers slowly and is measured so.
    upstream.push_fault(Fault::Delay(Duration::from_millis(800)));
    let first = client::post_json(&chat_url(&gateway), MASTER, &chat("pair", "hi")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let slow = model_id(&first);

    // The other one has no measurement yet, so it goes next, and answers at once.
    let second = client::post_json(&chat_url(&gateway), MASTER, &chat("pair", "hi")).await;
    assert_eq!(second.status, 200, "{}", second.text());
    let fast = model_id(&second);
    assert_ne!(fast, slow, "the unmeasured deployment was not tried");

    for round in 0..10 {
        let response = client::post_json(&chat_url(&gateway), MASTER, &chat("pair", "hi")).await;
        assert_eq!(response.status, 200, "round {round}: {}", response.text());
        assert_eq!(model_id(&response), fast, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_based_routing_prefers_the_deployment_with_fewer_tokens_this_minute() {
    let upstream = MockUpstream::start().await;
    let setup = Setup {
        strategy: "usage-based",
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    // About 600 tokens (300 words in, echoed back) on whichever deployment takes it.
    let big = client::post_json(&chat_url(&gateway), MASTER, &chat("pair", &words(300))).await;
    assert_eq!(big.status, 200, "{}", big.text());
    assert!(
        big.json()["usage"]["total_tokens"]
            .as_u64()
            .is_some_and(|t| t > 500),
        "{}",
        big.text()
    );
    let busy = model_id(&big);

    // Ten calls of 5 tokens each stay well below that, so all go to the other deployment.
    for round in 0..10 {
        let response = client::post_json(&chat_url(&gateway), MASTER, &chat("pair", "hi")).await;
        assert_eq!(response.status, 200, "round {round}: {}", response.text());
        assert_ne!(model_id(&response), busy, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_skew_the_traffic_split() {
    let upstream = MockUpstream::start().await;
    let models = r#"
  - { name: weighted, provider: mock, id: light, weight: 1 }
  - { name: weighted, provider: mock, id: heavy, weight: 9 }
"#;
    let setup = Setup {
        models,
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    let mut heavy = 0;
    for _ in 0..100 {
        let response =
            client::post_json(&chat_url(&gateway), MASTER, &chat("weighted", "hi")).await;
        assert_eq!(response.status, 200, "{}", response.text());
        match model_id(&response).as_str() {
            "heavy" => heavy += 1,
            "light" => {}
            other => panic!("unexpected deployment {other}"),
        }
    }
    // 90 expected; 60 is more than nine standard deviations away.
    assert!(heavy > 60, "heavy got {heavy} of 100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_reply_that_times_out_is_retried_on_the_other_deployment() {
    let upstream = MockUpstream::start().await;
    let setup = Setup {
        retries: 1,
        ..Setup::default()
    };
    let gateway = gateway(setup, &upstream).await;
    // Longer than timeout_s (1 s): the first attempt is abandoned.
    upstream.push_fault(Fault::Delay(Duration::from_secs(3)));
    let response =
        client::post_json(&chat_url(&gateway), MASTER, &chat("pair", "second try")).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.json()["choices"][0]["message"]["content"],
        "echo: second try"
    );
    assert_eq!(response.json()["model"], "pair");
    assert_eq!(response.header("x-portcullis-attempted-retries"), Some("1"));
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    let timed_out = requests[0].body["model"].as_str().expect("model");
    let answered = requests[1].body["model"].as_str().expect("model");
    assert_ne!(timed_out, answered, "retried the deployment that timed out");
    assert_eq!(model_id(&response), pair_id(answered));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_chain_moves_on_until_a_group_answers() {
    let upstream = MockUpstream::start().await;
    let config = r#"
server: { listen: "{listen}", shutdown_drain_s: 5 }
auth: { master_key: "sk-master" }
models:
  - { name: first, provider: openai, model: first-model, id: first-a, api_base: "{upstream}/v1", api_key: "sk-upstream-test" }
  - { name: second, provider: openai, model: second-model, id: second-a, api_base: "{upstream}/v1", api_key: "sk-upstream-test" }
  - { name: third, provider: openai, model: third-model, id: third-a, api_base: "{upstream}/v1", api_key: "sk-upstream-test" }
router: { num_retries: 0, timeout_s: 1, stream_idle_timeout_s: 1, allowed_fails: 100, cooldown_s: 1, fallbacks: { first: [second, third] } }
"#;
    let gateway = start(config, &upstream).await;
    upstream.push_faults([Fault::status(500), Fault::status(503)]);
    let response =
        client::post_json(&chat_url(&gateway), MASTER, &chat("first", "third time")).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.json()["model"],
        "first",
        "the name the client asked for"
    );
    assert_eq!(
        response.json()["choices"][0]["message"]["content"],
        "echo: third time"
    );
    assert_eq!(
        response.header("x-portcullis-attempted-fallbacks"),
        Some("2")
    );
    assert_eq!(response.header("x-portcullis-model-group"), Some("third"));
    assert_eq!(response.header("x-portcullis-model-id"), Some("third-a"));
    let models: Vec<Value> = upstream
        .requests()
        .iter()
        .map(|r| r.body["model"].clone())
        .collect();
    assert_eq!(models, ["first-model", "second-model", "third-model"]);
}
