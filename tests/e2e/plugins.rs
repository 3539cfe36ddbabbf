//! Plugins end to end: the real gateway loading real `.wasm` components built from `plugins/`
//! (`plugins/build`, which `tests/run` calls first).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use support::client;
use support::fixtures::{assert_error, chat, chat_stream, start, MASTER, PROMPTLY};
use support::{wait_until, wasm, Fault, Gateway, MockUpstream, TempDir};

/// Where `plugins/build` puts the shipped plugins.
fn plugin_dir() -> PathBuf {
    for name in ["pii_mask", "team_defaults", "least_latency", "audit_log"] {
        wasm::built(name);
    }
    wasm::dir()
}

/// A config with one upstream group `gpt-4o-mini` and the given `plugins.enabled` entries.
fn config(enabled: &str, extra: &str) -> String {
    format!(
        r#"
server: {{ listen: "{{listen}}" }}
auth:
  master_key: "sk-master"
  keys:
    - {{ key: "sk-research", alias: researcher, team: research }}
{guarded}
models:
  - {{ name: gpt-4o-mini, provider: openai, model: gpt-4o-mini, api_base: "{{upstream}}/v1", api_key: "sk-upstream-test" }}
  - {{ name: echo, provider: mock }}
plugins:
  dir: "{dir}"
  enabled:
{enabled}
{extra}
"#,
        dir = plugin_dir().display(),
        // A key may only name guardrails that are enabled.
        guarded = if enabled.contains("pii-mask") {
            "    - { key: \"sk-guarded\", alias: guarded, guardrails: [pii-mask] }"
        } else {
            ""
        },
    )
}

/// For `check`, which never calls the upstream: any well-formed URL does.
fn offline(yaml: &str) -> String {
    yaml.replace("{upstream}", "http://127.0.0.1:9")
}

fn chat_url(gateway: &Gateway) -> String {
    format!("{}/v1/chat/completions", gateway.url())
}

#[test]
fn inspect_reads_each_shipped_plugins_kinds_from_its_exports() {
    let dir = plugin_dir();
    for (file, kind) in [
        ("pii_mask", "guardrail"),
        ("team_defaults", "enricher"),
        ("least_latency", "router"),
        ("audit_log", "hook"),
    ] {
        let output = std::process::Command::new(support::gateway::binary_path())
            .args(["plugins", "inspect"])
            .arg(dir.join(format!("{file}.wasm")))
            .output()
            .expect("run portcullis plugins inspect");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}");
        assert!(stdout.contains(&format!("kinds:    {kind}\n")), "{stdout}");
        assert!(
            stdout.contains("portcullis:plugin/lifecycle@0.2.0"),
            "{stdout}"
        );
        assert!(stdout.contains("status:   compatible"), "{stdout}");
    }
}

#[test]
fn check_names_the_plugin_whose_file_is_missing_or_not_a_component() {
    let enabled = "    - { name: ghost, path: no_such_plugin.wasm }";
    let (code, output) = Gateway::check(&offline(&config(enabled, "")));
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("plugin 'ghost': cannot read"), "{output}");

    let dir = TempDir::new("portcullis-garbage");
    std::fs::write(dir.path().join("garbage.wasm"), b"not wasm at all").expect("write");
    let yaml = config("", "").replace(
        &format!("dir: \"{}\"", plugin_dir().display()),
        &format!(
            "dir: \"{}\"\n  enabled:\n    - {{ name: junk, path: garbage.wasm }}",
            dir.path().display()
        ),
    );
    let yaml = yaml.replacen("  enabled:\n\n", "", 1);
    let (code, output) = Gateway::check(&offline(&yaml));
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("plugin 'junk'"), "{output}");
    assert!(output.contains("is not a valid component"), "{output}");
}

#[test]
fn a_router_strategy_must_name_a_plugin_that_exports_a_router() {
    let enabled = "    - { name: audit, path: audit_log.wasm }";
    let (code, output) = Gateway::check(&offline(&config(enabled, "router: { strategy: audit }")));
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("router.strategy: the plugin 'audit' does not export a router"),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_router_plugin_sends_calls_to_the_faster_deployment() {
    let slow = MockUpstream::start().await;
    let fast = MockUpstream::start().await;
    let yaml = format!(
        r#"
server: {{ listen: "{{listen}}" }}
models:
  - {{ name: g, provider: openai, model: m, api_base: "{slow}/v1", api_key: "sk-upstream-test", id: slow }}
  - {{ name: g, provider: openai, model: m, api_base: "{fast}/v1", api_key: "sk-upstream-test", id: fast }}
plugins:
  dir: "{dir}"
  enabled:
    - {{ name: least-latency, path: least_latency.wasm }}
router: {{ strategy: least-latency, num_retries: 0 }}
"#,
        slow = slow.url(),
        fast = fast.url(),
        dir = plugin_dir().display()
    );
    slow.push_faults((0..20).map(|_| Fault::Delay(Duration::from_millis(150))));
    let gateway = Gateway::start(&yaml).await;
    let mut picks = Vec::new();
    for _ in 0..8 {
        let response = client::post_json(&chat_url(&gateway), None, &chat("g", "hi")).await;
        assert_eq!(response.status, 200, "{}", response.text());
        picks.push(
            response
                .header("x-portcullis-model-id")
                .unwrap_or_default()
                .to_owned(),
        );
    }
    // Both are tried while unmeasured; after that the measured-faster one wins every time.
    assert!(picks[..2].contains(&"slow".to_owned()), "{picks:?}");
    assert!(picks[3..].iter().all(|p| p == "fast"), "{picks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_hook_writes_a_line_per_call_into_its_granted_directory() {
    let upstream = MockUpstream::start().await;
    let audit = TempDir::new("portcullis-audit");
    let enabled = format!(
        "    - {{ name: audit, path: audit_log.wasm, capabilities: {{ dirs: [{{ host: \"{}\", guest: /audit, write: true }}] }} }}",
        audit.path().display()
    );
    let gateway = start(&config(&enabled, ""), &upstream).await;
    let response =
        client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", "hello")).await;
    assert_eq!(response.status, 200);
    let call_id = response
        .header("x-portcullis-call-id")
        .expect("call id")
        .to_owned();
    let file = audit.path().join("audit.jsonl");
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        wait_until(PROMPTLY, || read().contains(&call_id)).await,
        "audit file: {}",
        read()
    );
    let line: Value =
        serde_json::from_str(read().lines().last().expect("a line")).expect("JSON line");
    assert_eq!(line["call_id"], call_id.as_str());
    assert_eq!(line["model"], "gpt-4o-mini");
    assert_eq!(line["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_without_a_grant_cannot_write_and_the_gateway_carries_on() {
    let upstream = MockUpstream::start().await;
    let gateway = start(
        &config("    - { name: audit, path: audit_log.wasm }", ""),
        &upstream,
    )
    .await;
    for _ in 0..3 {
        let response =
            client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", "hello")).await;
        assert_eq!(response.status, 200);
    }
    // The plugin says through the host log that it could not write; nothing else happens.
    assert!(
        gateway.wait_for_log("audit", Duration::from_secs(5)).await,
        "{}",
        gateway.logs()
    );
    let ready = client::get(&format!("{}/health/readiness", gateway.url()), None).await;
    assert_eq!(ready.status, 200);
}

const PII_MASK_ON: &str =
    "    - { name: pii-mask, path: pii_mask.wasm, default_on: true, config: { action: mask } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pii_mask_rewrites_the_request_before_the_upstream_sees_it() {
    let upstream = MockUpstream::start().await;
    let gateway = start(&config(PII_MASK_ON, ""), &upstream).await;
    let body = json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "mail jane.doe@example.com or call +1 415 555 0100, card 4111 1111 1111 1111"}]});
    let response = client::post_json(&chat_url(&gateway), MASTER, &body).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let sent = upstream
        .last_request()
        .expect("the upstream was called")
        .body;
    let text = sent["messages"][1]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        text.contains("[EMAIL]") && text.contains("[PHONE]") && text.contains("[CREDIT_CARD]"),
        "{text}"
    );
    assert!(
        !text.contains("jane.doe") && !text.contains("4111"),
        "{text}"
    );
    assert_eq!(sent["messages"][0]["content"], "be brief");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pii_mask_in_block_mode_refuses_with_a_guardrail_violation() {
    let upstream = MockUpstream::start().await;
    let enabled =
        "    - { name: pii-mask, path: pii_mask.wasm, default_on: true, config: { action: block } }";
    let gateway = start(&config(enabled, ""), &upstream).await;
    let body = chat("gpt-4o-mini", "my SSN is 123-45-6789");
    let response = client::post_json(&chat_url(&gateway), MASTER, &body).await;
    let error = assert_error(&response, 400, "guardrail_violation");
    assert_eq!(error["param"], "pii-mask");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("pii-mask") && message.contains("social security"),
        "{message}"
    );
    assert!(
        !message.contains("6789"),
        "the reason must not repeat the value: {message}"
    );
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opt_in_guardrail_runs_when_the_request_or_the_key_names_it() {
    let upstream = MockUpstream::start().await;
    let enabled = "    - { name: pii-mask, path: pii_mask.wasm, config: { action: mask } }";
    let gateway = start(&config(enabled, ""), &upstream).await;
    let sent_text = |upstream: &MockUpstream| {
        let body = upstream.last_request().expect("a request").body;
        body["messages"][1]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let email = "write to bob@example.org";

    let plain = client::post_json(&chat_url(&gateway), MASTER, &chat("gpt-4o-mini", email)).await;
    assert_eq!(plain.status, 200);
    assert_eq!(sent_text(&upstream), email, "not selected: runs for nobody");

    let mut named = chat("gpt-4o-mini", email);
    named["guardrails"] = json!(["pii-mask"]);
    let response = client::post_json(&chat_url(&gateway), MASTER, &named).await;
    assert_eq!(response.status, 200);
    assert_eq!(sent_text(&upstream), "write to [EMAIL]");
    let forwarded = upstream.last_request().expect("a request").body;
    assert!(
        forwarded.get("guardrails").is_none(),
        "the gateway's own field is not forwarded"
    );

    let by_key = client::post_json(
        &chat_url(&gateway),
        Some("sk-guarded"),
        &chat("gpt-4o-mini", email),
    )
    .await;
    assert_eq!(by_key.status, 200);
    assert_eq!(sent_text(&upstream), "write to [EMAIL]");

    let mut unknown = chat("gpt-4o-mini", email);
    unknown["guardrails"] = json!(["no-such-guardrail"]);
    let response = client::post_json(&chat_url(&gateway), MASTER, &unknown).await;
    let error = assert_error(&response, 400, "invalid_request_error");
    assert_eq!(error["param"], "guardrails");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_defaults_enricher_moves_a_teams_default_model_and_tags_the_call() {
    let upstream = MockUpstream::start().await;
    let audit = TempDir::new("portcullis-audit");
    let enabled = format!(
        r#"    - {{ name: team-defaults, path: team_defaults.wasm, config: {{ teams: {{ research: {{ model: echo, tags: [research], metadata: {{ cost_center: "R-42" }} }} }} }} }}
    - {{ name: audit, path: audit_log.wasm, capabilities: {{ dirs: [{{ host: "{}", guest: /audit, write: true }}] }} }}"#,
        audit.path().display()
    );
    let gateway = start(&config(&enabled, ""), &upstream).await;
    // "default" asks for the team's default model: the mock `echo` group answers, not the upstream.
    let response = client::post_json(
        &chat_url(&gateway),
        Some("sk-research"),
        &chat("default", "hello"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("x-portcullis-model-group"), Some("echo"));
    assert_eq!(
        response.json()["model"],
        "default",
        "the client's model name comes back"
    );
    assert_eq!(upstream.request_count(), 0);
    let file = audit.path().join("audit.jsonl");
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    assert!(wait_until(PROMPTLY, || !read().is_empty()).await);
    let line: Value = serde_json::from_str(read().lines().last().expect("a line")).expect("JSON");
    assert_eq!(line["tags"], json!(["research"]), "{line}");
}

#[test]
fn inspect_names_the_contract_version_a_component_was_built_against() {
    let legacy = wasm::built("contract_v0_1");
    let output = std::process::Command::new(support::gateway::binary_path())
        .args(["plugins", "inspect"])
        .arg(&legacy)
        .output()
        .expect("run portcullis plugins inspect");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("kinds:    guardrail, enricher\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("contract: portcullis:plugin@0.1.0\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("runs portcullis:plugin@0.2.0, portcullis:plugin@0.1.0"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_the_0_1_contract_runs_beside_0_2_plugins() {
    let upstream = MockUpstream::start().await;
    let audit = TempDir::new("portcullis-audit");
    let legacy = wasm::built("contract_v0_1");
    let enabled = format!(
        r#"    - {{ name: legacy, path: "{legacy}", default_on: true }}
    - {{ name: legacy-stream, path: "{legacy}", default_on: true, mode: post_call }}
    - {{ name: audit, path: audit_log.wasm, capabilities: {{ dirs: [{{ host: "{audit}", guest: /audit, write: true }}] }} }}"#,
        legacy = legacy.display(),
        audit = audit.path().display()
    );
    let gateway = start(&config(&enabled, ""), &upstream).await;

    // The request record carries the model and the key's team.
    let response = client::post_json(
        &chat_url(&gateway),
        Some("sk-research"),
        &chat("gpt-4o-mini", "a forbidden word"),
    )
    .await;
    let error = assert_error(&response, 400, "guardrail_violation");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("0.1.0 plugin blocked a call to gpt-4o-mini for team research"),
        "{message}"
    );

    // `host.request-body` gives the client's body back.
    let response = client::post_json(
        &chat_url(&gateway),
        MASTER,
        &chat("gpt-4o-mini", "echo the body"),
    )
    .await;
    let error = assert_error(&response, 400, "guardrail_violation");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains(r#""model":"gpt-4o-mini""#), "{message}");

    // check-stream sees every delta; the enricher's tag reaches the 0.2 audit hook.
    let response = client::stream_sse(
        &chat_url(&gateway),
        MASTER,
        &chat_stream("echo", "quiet words"),
    )
    .await;
    assert!(response.done(), "{}", response.raw);
    assert_eq!(response.content(), "QUIET WORDS");
    let file = audit.path().join("audit.jsonl");
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    assert!(wait_until(PROMPTLY, || read().lines().count() >= 3).await);
    let line: Value = serde_json::from_str(read().lines().last().expect("a line")).expect("JSON");
    // Enabled twice, the plugin enriches twice.
    assert_eq!(
        line["tags"],
        json!(["contract-0.1", "contract-0.1"]),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_plugin_reads_the_lent_request_to_choose() {
    let upstream = MockUpstream::start().await;
    let yaml = format!(
        r#"
server: {{ listen: "{{listen}}" }}
auth:
  master_key: "sk-master"
  keys:
    - {{ key: "sk-research", alias: researcher, team: research }}
models:
  - {{ name: g, provider: openai, model: m, api_base: "{upstream}/v1", api_key: "sk-upstream-test", id: other }}
  - {{ name: g, provider: openai, model: m, api_base: "{upstream}/v1", api_key: "sk-upstream-test", id: research }}
plugins:
  dir: "{dir}"
  enabled:
    - {{ name: by-team, path: misbehave.wasm, config: {{ route: to_team }} }}
router: {{ strategy: by-team, num_retries: 0 }}
"#,
        upstream = upstream.url(),
        dir = wasm::dir().display()
    );
    wasm::built("misbehave");
    let gateway = Gateway::start(&yaml).await;
    // Eight in a row: a coin toss between the two would do that once in 256 runs.
    for _ in 0..8 {
        let response =
            client::post_json(&chat_url(&gateway), Some("sk-research"), &chat("g", "hi")).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.header("x-portcullis-model-id"), Some("research"));
    }
}
