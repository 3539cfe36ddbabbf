//! The API surface end to end: routes, one happy path per provider, headers, model override, passthrough, health, h2c.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use support::client::{self, Response};
use support::fixtures::{
    chat, chat_stream, header_f64, standard, start_json_logs, wait_for_call_records, words, MASTER,
    STANDARD_CONFIG, TEAM_A, UPSTREAM_KEY,
};
use support::mock_upstream::{
    anthropic_tool_use_response, mock_embedding, openai_tool_call_response,
};
use support::{wait_until, Fault, MockUpstream};

/// The deployment-level headers every whole (non-streamed) proxied response carries.
fn assert_proxy_headers(response: &Response, model_id: &str, group: &str, api_base: &str) {
    let call_id = response
        .header("x-portcullis-call-id")
        .expect("x-portcullis-call-id");
    assert!(call_id.starts_with("call-"), "{call_id}");
    assert_eq!(response.header("x-portcullis-model-id"), Some(model_id));
    assert_eq!(response.header("x-portcullis-model-group"), Some(group));
    assert_eq!(response.header("x-portcullis-api-base"), Some(api_base));
    assert!(header_f64(response, "x-portcullis-response-cost") >= 0.0);
    let total = header_f64(response, "x-portcullis-response-duration-ms");
    let overhead = header_f64(response, "x-portcullis-overhead-duration-ms");
    assert!(
        (0.0..=total).contains(&overhead),
        "overhead {overhead} within total {total}"
    );
    assert_eq!(response.header("x-portcullis-attempted-retries"), Some("0"));
    assert_eq!(
        response.header("x-portcullis-attempted-fallbacks"),
        Some("0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_overrides_model_and_passes_unknown_fields_through() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let mut body = chat("gpt-4o-mini", "hello there world");
    body["vendor_knob"] = json!({"x": 1});
    body["temperature"] = json!(0.2);

    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &body,
    )
    .await;

    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    // The upstream's answer comes back whole (unknown response fields included), relabelled with
    // the model the client asked for.
    assert_eq!(
        response.json(),
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
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
            "system_fingerprint": "fp_mock"
        })
    );

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    assert_forwarded_as_sent(&sent.body, &body, "gpt-4o-mini-2024-07-18");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_responses_carry_portcullis_headers_and_cost() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        TEAM_A,
        &chat("gpt-4o-mini", "hello there world"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_proxy_headers(
        &response,
        "oai-a",
        "gpt-4o-mini",
        &format!("{}/v1", upstream.url()),
    );
    // gpt-4o-mini-2024-07-18 is priced from the built-in table: 0.15 / 0.60 USD per million.
    // The mock counted 5 prompt and 4 completion tokens.
    let cost = header_f64(&response, "x-portcullis-response-cost");
    let expected = (5.0 * 0.15 + 4.0 * 0.60) / 1e6;
    assert!(
        (cost - expected).abs() < 1e-12,
        "cost {cost}, expected {expected}"
    );

    // Every call gets its own id.
    let again = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        TEAM_A,
        &chat("gpt-4o-mini", "again"),
    )
    .await;
    assert_ne!(
        again.header("x-portcullis-call-id"),
        response.header("x-portcullis-call-id")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_with_and_without_the_v1_prefix() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    for prefix in ["/v1", ""] {
        let url = |path: &str| format!("{}{prefix}/{path}", gateway.url());
        let chat_response =
            client::post_json(&url("chat/completions"), MASTER, &chat("gpt-4o-mini", "hi")).await;
        assert_eq!(
            chat_response.status,
            200,
            "{prefix}: {}",
            chat_response.text()
        );
        assert_eq!(chat_response.json()["object"], "chat.completion");

        let completion = client::post_json(
            &url("completions"),
            MASTER,
            &json!({"model": "gpt-4o-mini", "prompt": "say this"}),
        )
        .await;
        assert_eq!(completion.status, 200, "{prefix}: {}", completion.text());
        assert_eq!(completion.json()["object"], "text_completion");

        let embedding = client::post_json(
            &url("embeddings"),
            MASTER,
            &json!({"model": "gpt-4o-mini", "input": "x"}),
        )
        .await;
        assert_eq!(embedding.status, 200, "{prefix}: {}", embedding.text());
        assert_eq!(embedding.json()["object"], "list");

        let models = client::get(&url("models"), MASTER).await;
        assert_eq!(models.status, 200, "{prefix}: {}", models.text());
    }
    let paths: Vec<String> = upstream.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_chat_uses_the_deployment_url_api_version_and_api_key_header() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &chat("azure-4o", "hello azure"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_eq!(body["model"], "azure-4o");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "echo: hello azure"
    );
    assert_proxy_headers(&response, "azure-4o-1", "azure-4o", &upstream.url());

    let sent = upstream.last_request().expect("the upstream was called");
    assert_eq!(sent.path, "/openai/deployments/my-deploy/chat/completions");
    assert_eq!(sent.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(sent.header("api-key"), Some(UPSTREAM_KEY));
    assert_eq!(
        sent.header("authorization"),
        None,
        "Azure takes api-key only"
    );
    assert_eq!(sent.body["model"], "my-deploy");
    assert_eq!(sent.body["messages"], chat("x", "hello azure")["messages"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_chat_is_translated_both_ways() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let mut body = chat("claude", "hello claude");
    body["max_tokens"] = json!(50);
    body["temperature"] = json!(0.5);
    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &body,
    )
    .await;

    assert_eq!(response.status, 200, "{}", response.text());
    assert_proxy_headers(&response, "claude-2", "claude", &upstream.url());
    let reply = response.json();
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["model"], "claude");
    assert_eq!(reply["id"], "msg_mock");
    assert_eq!(
        reply["choices"],
        json!([{
            "index": 0,
            "message": {"role": "assistant", "content": "echo: hello claude"},
            "finish_reason": "stop",
            "logprobs": null
        }])
    );
    // input 2 (system) + 2 (user) words, output 3 words.
    assert_eq!(
        reply["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})
    );
    // claude-3-5-haiku is priced at 0.80 / 4.00 USD per million tokens.
    let cost = header_f64(&response, "x-portcullis-response-cost");
    let expected = (4.0 * 0.80 + 3.0 * 4.00) / 1e6;
    assert!(
        (cost - expected).abs() < 1e-12,
        "cost {cost}, expected {expected}"
    );

    let sent = upstream.last_request().expect("the upstream was called");
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.header("x-api-key"), Some(UPSTREAM_KEY));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent.header("authorization"), None);
    assert_eq!(
        sent.body,
        json!({
            "model": "claude-3-5-haiku-latest",
            "system": "be brief",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello claude"}]}],
            "max_tokens": 50,
            "temperature": 0.5
        })
    );

    // Anthropic requires max_tokens; OpenAI clients usually leave it out.
    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &chat("claude", "no limit given"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let sent = upstream.last_request().expect("the upstream was called");
    assert!(
        sent.body["max_tokens"].as_u64().is_some_and(|n| n > 0),
        "{}",
        sent.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_compatible_without_a_key_sends_no_authorization() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    upstream.push_fault(local_reply());
    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &chat("local", "hi"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["model"], "local");
    assert_eq!(
        response.json()["choices"][0]["message"]["content"],
        "local answer"
    );
    assert_proxy_headers(
        &response,
        "local-3",
        "local",
        &format!("{}/v1", upstream.url()),
    );
    // A self-hosted model has no built-in price.
    assert_eq!(header_f64(&response, "x-portcullis-response-cost"), 0.0);

    let sent = upstream.last_request().expect("the upstream was called");
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.header("authorization"), None);
    assert_eq!(sent.body["model"], "llama");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_provider_answers_without_an_upstream() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &chat("echo", "ping"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_eq!(body["model"], "echo");
    assert_eq!(body["choices"][0]["message"]["content"], "ping");
    assert_proxy_headers(&response, "echo-4", "echo", "mock://local");
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_pass_through_for_openai_and_azure() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let url = format!("{}/v1/completions", gateway.url());
    for (group, path, upstream_model) in [
        ("gpt-4o-mini", "/v1/completions", "gpt-4o-mini-2024-07-18"),
        (
            "azure-4o",
            "/openai/deployments/my-deploy/completions",
            "my-deploy",
        ),
    ] {
        let body =
            json!({"model": group, "prompt": "say this", "max_tokens": 5, "echo_knob": true});
        let response = client::post_json(&url, MASTER, &body).await;
        assert_eq!(response.status, 200, "{group}: {}", response.text());
        let reply = response.json();
        assert_eq!(reply["object"], "text_completion");
        assert_eq!(reply["model"], group);
        assert_eq!(reply["choices"][0]["text"], "echo: say this");
        assert_eq!(
            reply["usage"],
            json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
        );
        let sent = upstream.last_request().expect("the upstream was called");
        assert_eq!(sent.path, path);
        let mut expected = body.clone();
        expected["model"] = json!(upstream_model);
        assert_eq!(sent.body, expected, "{group}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_pass_through_for_openai_and_azure() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let url = format!("{}/v1/embeddings", gateway.url());
    for (group, path, upstream_model) in [
        ("gpt-4o-mini", "/v1/embeddings", "gpt-4o-mini-2024-07-18"),
        (
            "azure-4o",
            "/openai/deployments/my-deploy/embeddings",
            "my-deploy",
        ),
    ] {
        let body = json!({"model": group, "input": ["alpha beta", "gamma"], "dimensions": 8});
        let response = client::post_json(&url, MASTER, &body).await;
        assert_eq!(response.status, 200, "{group}: {}", response.text());
        let reply = response.json();
        assert_eq!(reply["object"], "list");
        assert_eq!(reply["model"], group);
        assert_eq!(
            reply["data"][0]["embedding"],
            json!(mock_embedding("alpha beta"))
        );
        assert_eq!(
            reply["data"][1]["embedding"],
            json!(mock_embedding("gamma"))
        );
        assert_eq!(reply["data"][1]["index"], 1);
        assert!(response.header("x-portcullis-response-cost").is_some());
        let sent = upstream.last_request().expect("the upstream was called");
        assert_eq!(sent.path, path);
        let mut expected = body.clone();
        expected["model"] = json!(upstream_model);
        assert_eq!(sent.body, expected, "{group}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_shows_the_groups_the_key_may_use() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let url = format!("{}/v1/models", gateway.url());
    let ids = |response: &Response| -> Vec<String> {
        assert_eq!(response.status, 200, "{}", response.text());
        let body = response.json();
        assert_eq!(body["object"], "list");
        body["data"]
            .as_array()
            .expect("data array")
            .iter()
            .map(|m| {
                assert_eq!(m["object"], "model");
                m["id"].as_str().expect("model id").to_owned()
            })
            .collect()
    };
    assert_eq!(
        ids(&client::get(&url, MASTER).await),
        ["gpt-4o-mini", "azure-4o", "claude", "local", "echo"]
    );
    assert_eq!(ids(&client::get(&url, TEAM_A).await), ["gpt-4o-mini"]);
    let anonymous = client::get(&url, None).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_need_no_key() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let live = client::get(&format!("{}/health/liveliness", gateway.url()), None).await;
    assert_eq!(live.status, 200, "{}", live.text());
    assert_eq!(live.json(), json!({"status": "alive"}));
    let ready = client::get(&format!("{}/health/readiness", gateway.url()), None).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json(), json!({"status": "ready"}));
    // A wrong key does not matter either.
    let ready = client::get(
        &format!("{}/health/readiness", gateway.url()),
        Some("sk-nobody"),
    )
    .await;
    assert_eq!(ready.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_chat_call() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let request = Request::post(format!("{}/v1/chat/completions", gateway.url()))
        .header(AUTHORIZATION, "Bearer sk-master")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            chat("gpt-4o-mini", "over h2c").to_string(),
        )))
        .expect("valid request");
    let call = async {
        let response = h2.request(request).await.expect("h2c request");
        let version = response.version();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("h2c body")
            .to_bytes();
        (version, status, headers, body)
    };
    let (version, status, headers, body) = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("h2c call finishes in time");
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let body: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: over h2c");
    assert_eq!(
        headers
            .get("x-portcullis-model-id")
            .and_then(|v| v.to_str().ok()),
        Some("oai-a")
    );
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_tool_calls_round_trip() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let url = format!("{}/v1/chat/completions", gateway.url());
    upstream.push_fault(Fault::Reply(anthropic_tool_use_response(
        "claude-3-5-haiku-latest",
        "get_weather",
        &json!({"city": "Oslo"}),
    )));
    let question = json!({"role": "user", "content": "weather in Oslo?"});
    let body = json!({
        "model": "claude",
        "messages": [question],
        "tools": [weather_tool()],
        "tool_choice": "required"
    });
    let response = client::post_json(&url, MASTER, &body).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let reply = response.json();
    assert_eq!(reply["model"], "claude");
    let call = json!({
        "id": "toolu_mock",
        "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}
    });
    assert_eq!(
        reply["choices"][0]["message"],
        json!({"role": "assistant", "content": null, "tool_calls": [call]})
    );
    assert_eq!(reply["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        reply["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    );
    let sent = upstream.last_request().expect("the upstream was called");
    assert_eq!(
        sent.body["tools"],
        json!([{
            "name": "get_weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "description": "Current weather in a city"
        }])
    );
    assert_eq!(sent.body["tool_choice"], json!({"type": "any"}));

    // The client runs the tool and sends the result back, OpenAI style.
    let follow_up = json!({
        "model": "claude",
        "messages": [
            question,
            reply["choices"][0]["message"],
            {"role": "tool", "tool_call_id": "toolu_mock", "content": "18C"}
        ],
        "tools": [weather_tool()]
    });
    let response = client::post_json(&url, MASTER, &follow_up).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let sent = upstream.last_request().expect("the upstream was called");
    assert_eq!(
        sent.body["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "weather in Oslo?"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_mock", "name": "get_weather", "input": {"city": "Oslo"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_mock", "content": "18C"}
            ]}
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_tool_calls_pass_through_unchanged() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let scripted = openai_tool_call_response(
        "gpt-4o-mini-2024-07-18",
        "get_weather",
        &json!({"city": "Oslo"}),
    );
    upstream.push_fault(Fault::Reply(scripted.clone()));
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "weather in Oslo?"}],
        "tools": [weather_tool()],
        "parallel_tool_calls": false
    });
    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &body,
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let mut expected = scripted;
    expected["model"] = json!("gpt-4o-mini");
    assert_eq!(response.json(), expected);
    let sent = upstream.last_request().expect("the upstream was called");
    assert_eq!(sent.body["tools"], json!([weather_tool()]));
    assert_eq!(sent.body["parallel_tool_calls"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_streams_and_cancels_like_http1() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let request = |text: &str| {
        Request::post(format!("{}/v1/chat/completions", gateway.url()))
            .header(AUTHORIZATION, "Bearer sk-master")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                chat_stream("gpt-4o-mini", text).to_string(),
            )))
            .expect("valid request")
    };

    // A whole stream over HTTP/2.
    let whole = async {
        let response = h2.request(request("one two")).await.expect("h2c request");
        assert_eq!(response.version(), Version::HTTP_2);
        assert_eq!(response.status(), 200);
        response
            .into_body()
            .collect()
            .await
            .expect("h2c body")
            .to_bytes()
    };
    let body = tokio::time::timeout(Duration::from_secs(10), whole)
        .await
        .expect("stream finishes in time");
    let text = String::from_utf8_lossy(&body);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains("\"content\":\" two\""), "{text}");

    // Dropping an HTTP/2 response resets only that stream; the upstream request is cancelled.
    upstream.set_delay_per_chunk(Duration::from_millis(50));
    let mut response =
        tokio::time::timeout(Duration::from_secs(10), h2.request(request(&words(200))))
            .await
            .expect("head in time")
            .expect("h2c request");
    let first = tokio::time::timeout(Duration::from_secs(10), response.body_mut().frame())
        .await
        .expect("first frame in time");
    assert!(first.is_some());
    drop(response);
    assert!(
        wait_until(Duration::from_secs(5), || upstream.cancelled_streams() == 1).await,
        "the upstream request was not cancelled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_on_shared_connections_all_succeed() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    // A pooling HTTP/1.1 client reuses connections across calls, as the SDKs do.
    let pool: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let calls = (0..24).map(|i| {
        let pool = pool.clone();
        let url = format!("{}/v1/chat/completions", gateway.url());
        let stream = i % 3 == 0;
        async move {
            let mut body = chat(
                ["gpt-4o-mini", "azure-4o", "claude", "echo"][i % 4],
                &format!("q{i}z"),
            );
            body["stream"] = json!(stream);
            let request = Request::post(url)
                .header(AUTHORIZATION, "Bearer sk-master")
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("valid request");
            let response = pool.request(request).await.expect("request");
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            (
                i,
                stream,
                status,
                String::from_utf8_lossy(&bytes).into_owned(),
            )
        }
    });
    let results = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("all calls finish");
    for (i, stream, status, text) in results {
        assert_eq!(status, 200, "call {i}: {text}");
        // Each answer is its own: no crossed wires between concurrent calls.
        assert!(text.contains(&format!("q{i}z")), "call {i}: {text}");
        if stream {
            assert!(text.ends_with("data: [DONE]\n\n"), "call {i}: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_model_can_be_retrieved_by_a_key_that_may_use_it() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let url = |id: &str| format!("{}/v1/models/{id}", gateway.url());
    let response = client::get(&url("gpt-4o-mini"), TEAM_A).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["id"], "gpt-4o-mini");
    assert_eq!(response.json()["object"], "model");
    // Another team's model looks absent, as OpenAI reports it.
    let hidden = client::get(&url("echo"), TEAM_A).await;
    assert_eq!(hidden.status, 404, "{}", hidden.text());
    assert_eq!(hidden.json()["error"]["code"], "model_not_found");
    assert_eq!(client::get(&url("echo"), MASTER).await.status, 200);
    assert_eq!(client::get(&url("nope"), MASTER).await.status, 404);
    assert_eq!(client::get(&url("echo"), None).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_compatible_passes_unknown_fields_through_unchanged() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let mut body = chat("local", "keep my extras");
    body["seed"] = json!(7);
    body["repetition_penalty"] = json!(1.1);
    body["vendor_options"] = json!({"top_k": 40, "nested": [1, {"deep": null}, "x"]});
    upstream.push_fault(local_reply());
    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &body,
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["model"], "local");

    let sent = upstream.last_request().expect("the upstream was called");
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_forwarded_as_sent(&sent.body, &body, "llama");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_calls_reuse_one_pooled_upstream_connection() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    for round in 0..5 {
        let response = client::post_json(
            &format!("{}/v1/chat/completions", gateway.url()),
            MASTER,
            &chat("gpt-4o-mini", "again"),
        )
        .await;
        assert_eq!(response.status, 200, "round {round}: {}", response.text());
        // The client hands a connection back to its pool from a task of its own; give it a moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(upstream.request_count(), 5);
    assert_eq!(
        upstream.connection_count(),
        1,
        "one connection for all calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_record_carries_the_end_user_and_metadata() {
    let upstream = MockUpstream::start().await;
    let gateway = start_json_logs(STANDARD_CONFIG, &upstream).await;
    let mut body = chat("gpt-4o-mini", "who am I");
    body["user"] = json!("end-user-42");
    body["metadata"] = json!({"ticket": "T-1234"});
    let response = client::post_json(
        &format!("{}/v1/chat/completions", gateway.url()),
        MASTER,
        &body,
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let records = wait_for_call_records(&gateway, 1).await;
    let record = records[0].to_string();
    assert!(record.contains("end-user-42"), "no end user: {record}");
    assert!(record.contains("T-1234"), "no metadata: {record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_model_can_be_retrieved_without_the_v1_prefix() {
    let upstream = MockUpstream::start().await;
    let gateway = standard(&upstream).await;
    let prefixed = client::get(&format!("{}/v1/models/gpt-4o-mini", gateway.url()), TEAM_A).await;
    assert_eq!(prefixed.status, 200, "{}", prefixed.text());
    let bare = client::get(&format!("{}/models/gpt-4o-mini", gateway.url()), TEAM_A).await;
    assert_eq!(bare.status, 200, "{}", bare.text());
    assert_eq!(bare.json(), prefixed.json());
    assert_eq!(bare.json()["id"], "gpt-4o-mini");
    assert_eq!(bare.json()["object"], "model");
    let hidden = client::get(&format!("{}/models/echo", gateway.url()), TEAM_A).await;
    assert_eq!(hidden.status, 404, "{}", hidden.text());
    assert_eq!(hidden.json()["error"]["code"], "model_not_found");
}

/// The answer of the keyless `local` deployment. The mock insists on a key for its own routes,
/// so the answer is scripted, to see what the gateway sent.
fn local_reply() -> Fault {
    Fault::Reply(json!({
        "id": "chatcmpl-local",
        "object": "chat.completion",
        "created": 1,
        "model": "llama",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "local answer"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    }))
}

/// Only `model` changes on the way up, to the upstream's id: everything else, unknown fields
/// too, arrives as the client sent it.
fn assert_forwarded_as_sent(sent: &Value, body: &Value, upstream_model: &str) {
    let mut expected = body.clone();
    expected["model"] = json!(upstream_model);
    assert_eq!(sent, &expected);
}
