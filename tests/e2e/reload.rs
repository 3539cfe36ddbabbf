//! Hot reload end to end: the user's journey (enable a plugin in the YAML, drop its `.wasm`,
//! replace it, disable it) against a running gateway under load, and a hundred reloads
//! alternating good and broken configurations without a failed request.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::client;
use support::fixtures::{chat, MASTER};
use support::{wasm, Gateway, TempDir};

/// A change serves within about a second of the file being written (the times are printed); the
/// bound is looser so that a loaded machine compiling a plugin does not fail the test.
const TAKES_EFFECT: Duration = Duration::from_secs(5);
/// For the many-reloads test, where each wait is one of a hundred on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(10);
const EMAIL: &str = "write to jane.doe@example.com please";

/// A gateway config whose plugins live in `dir`, with `enabled` as `plugins.enabled`.
fn config(dir: &Path, enabled: &str) -> String {
    format!(
        r#"
server: {{ listen: "{{listen}}" }}
auth:
  master_key: "sk-master"
models:
  - {{ name: echo, provider: mock }}
plugins:
  dir: "{dir}"
  enabled: {enabled}
"#,
        dir = dir.display()
    )
}

const NONE: &str = "[]";
const GUARD: &str = "\n    - { name: guard, path: guard.wasm, default_on: true }";

/// Writes the way editors and deploy tools do: a new file renamed over the old one.
fn write_atomically(path: &Path, contents: &[u8]) {
    let name = path.file_name().expect("a file name").to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&temporary, contents).expect("write the temporary file");
    std::fs::rename(&temporary, path).expect("rename it over the old one");
}

fn write_config(gateway: &Gateway, yaml: &str) {
    let yaml = yaml.replace("{listen}", &format!("127.0.0.1:{}", gateway.port()));
    write_atomically(gateway.config_path(), yaml.as_bytes());
}

async fn admin_status(gateway: &Gateway) -> Value {
    let response = client::get(&format!("{}/admin/status", gateway.url()), MASTER).await;
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()
}

/// The echo of `EMAIL` through the gateway: masked while the PII guardrail runs.
async fn echo(gateway: &Gateway) -> String {
    let url = format!("{}/v1/chat/completions", gateway.url());
    let response = client::post_json(&url, MASTER, &chat("echo", EMAIL)).await;
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned()
}

/// Polls until `condition` holds on the status; returns how long that took.
async fn wait_for_status(
    gateway: &Gateway,
    limit: Duration,
    what: &str,
    condition: impl Fn(&Value) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let status = admin_status(gateway).await;
        if condition(&status) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}; status: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn attempts(status: &Value) -> u64 {
    let reloads = &status["reloads"];
    reloads["succeeded"].as_u64().unwrap_or(0) + reloads["failed"].as_u64().unwrap_or(0)
}

/// Clients sending calls for as long as the test runs, counting every answer that is not a 200.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gateway: &Gateway, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let url = format!("{}/v1/chat/completions", gateway.url());
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failures, url) = (
                    Arc::clone(&stop),
                    Arc::clone(&ok),
                    Arc::clone(&failures),
                    url.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let response = client::post_json(&url, MASTER, &chat("echo", EMAIL)).await;
                        if response.status == 200 {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else if let Ok(mut failures) = failures.lock() {
                            failures.push(format!("{}: {}", response.status, response.text()));
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    /// Stops the clients; asserts that every call they made succeeded.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a load task");
        }
        let failures = self.failures.lock().expect("failures").clone();
        assert!(
            failures.is_empty(),
            "{} failed calls, first: {:?}",
            failures.len(),
            failures.first()
        );
        let ok = self.ok.load(Ordering::Relaxed);
        assert!(ok > 0, "the load made no calls");
        ok
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_drop_replace_and_disable_a_plugin_in_a_running_gateway() {
    let plugins = TempDir::new("portcullis-plugins");
    let gateway = Gateway::start(&config(plugins.path(), NONE)).await;
    assert_eq!(echo(&gateway).await, EMAIL);
    let load = Load::start(&gateway, 2);

    // Enabled in the YAML before its file exists: the reload fails, naming the file, and the
    // gateway carries on as it was.
    write_config(&gateway, &config(plugins.path(), GUARD));
    let took = wait_for_status(&gateway, TAKES_EFFECT, "the failed reload", |s| {
        s["reloads"]["failed"] == 1
    })
    .await;
    let status = admin_status(&gateway).await;
    let error = status["reloads"]["last_error"]["message"]
        .as_str()
        .expect("the error is shown");
    assert!(
        error.contains("plugin 'guard'") && error.contains("guard.wasm"),
        "{error}"
    );
    assert_eq!(status["generation"]["number"], 1);
    assert_eq!(echo(&gateway).await, EMAIL);
    eprintln!("config edit seen as a failed reload after {took:?}");

    // Dropping the file in (a plain copy, not atomic) makes the same config load.
    let guard = plugins.path().join("guard.wasm");
    std::fs::copy(wasm::built("pii_mask"), &guard).expect("copy pii_mask.wasm");
    let took = wait_for_status(&gateway, TAKES_EFFECT, "the dropped plugin", |s| {
        s["plugins"][0]["name"] == "guard"
    })
    .await;
    eprintln!("dropped plugin serving after {took:?}");
    let status = admin_status(&gateway).await;
    assert_eq!(status["plugins"][0]["kinds"][0], "guardrail");
    assert!(status["reloads"]["last_error"].is_null(), "{status:#}");
    let first_hash = status["plugins"][0]["sha256"].clone();
    assert!(echo(&gateway).await.contains("[EMAIL]"));
    // Each plugin's calls are timed.
    let calls = &admin_status(&gateway).await["plugins"][0]["calls"];
    assert!(calls["count"].as_u64() >= Some(1), "{calls:#}");
    assert!(
        calls["p50_us"].as_f64().is_some_and(|us| us > 0.0),
        "{calls:#}"
    );
    assert!(
        calls["max_us"].as_f64() >= calls["p99_us"].as_f64(),
        "{calls:#}"
    );

    // A new version of the file: another component under the same name, which allows all.
    write_atomically(
        &guard,
        &std::fs::read(wasm::built("misbehave")).expect("read misbehave.wasm"),
    );
    let took = wait_for_status(&gateway, TAKES_EFFECT, "the replaced plugin", |s| {
        s["plugins"][0]["sha256"] != first_hash && s["plugins"][0]["name"] == "guard"
    })
    .await;
    eprintln!("replaced plugin serving after {took:?}");
    assert_eq!(echo(&gateway).await, EMAIL);

    // Disabled in the YAML.
    write_config(&gateway, &config(plugins.path(), NONE));
    let took = wait_for_status(&gateway, TAKES_EFFECT, "the disabled plugin", |s| {
        s["plugins"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    eprintln!("disabled plugin gone after {took:?}");
    assert_eq!(admin_status(&gateway).await["generation"]["number"], 4);

    let calls = load.finish().await;
    eprintln!("{calls} calls under load, none failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_alternating_good_and_broken_fail_no_request() {
    let plugins = TempDir::new("portcullis-plugins");
    std::fs::copy(wasm::built("pii_mask"), plugins.path().join("guard.wasm")).expect("copy");
    std::fs::copy(
        wasm::built("misbehave"),
        plugins.path().join("rejecting.wasm"),
    )
    .expect("copy");
    std::fs::write(plugins.path().join("garbage.wasm"), b"not a component").expect("write");
    let dir = plugins.path();
    let masked = config(dir, GUARD);
    let plain = config(dir, NONE);
    let broken = [
        // Not YAML.
        "models: [ { name: echo".to_owned(),
        // An unknown field.
        plain.replace("provider: mock", "provider: mock, api_bsae: x"),
        // A plugin file that is not there.
        config(dir, "\n    - { name: ghost, path: ghost.wasm }"),
        // A file that is not a component.
        config(dir, "\n    - { name: junk, path: garbage.wasm }"),
        // A plugin whose init rejects its config.
        config(
            dir,
            "\n    - { name: picky, path: rejecting.wasm, config: { init: reject } }",
        ),
        // A router strategy naming a plugin that is no router.
        format!("{masked}router: {{ strategy: guard }}\n"),
    ];

    let gateway = Gateway::start(&plain).await;
    let load = Load::start(&gateway, 3);
    let mut masking = false;
    let mut seen = 0;
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let good = i % 2 == 0;
        let yaml = if good {
            masking = !masking;
            if masking {
                &masked
            } else {
                &plain
            }
        } else {
            &broken[(i / 2) % broken.len()]
        };
        write_config(&gateway, yaml);
        seen += 1;
        let took = wait_for_status(&gateway, PATIENCE, &format!("reload {i}"), |s| {
            attempts(s) >= seen
        })
        .await;
        slowest = slowest.max(took);
        let status = admin_status(&gateway).await;
        assert_eq!(attempts(&status), seen, "one attempt per write: {status:#}");
        assert_eq!(
            status["reloads"]["last_error"].is_null(),
            good,
            "reload {i}: {status:#}"
        );
        // A broken config leaves the behaviour of the last good one in place.
        let reply = echo(&gateway).await;
        assert_eq!(reply.contains("[EMAIL]"), masking, "reload {i}: {reply}");
    }
    let status = admin_status(&gateway).await;
    assert_eq!(status["reloads"]["succeeded"], 50);
    assert_eq!(status["reloads"]["failed"], 50);
    assert_eq!(status["generation"]["number"], 51);
    let calls = load.finish().await;
    eprintln!("100 reloads, slowest seen after {slowest:?}; {calls} calls, none failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_the_status_needs_the_master_key() {
    let plugins = TempDir::new("portcullis-plugins");
    let yaml = config(plugins.path(), NONE).replace(
        "  master_key: \"sk-master\"\n",
        "  master_key: \"sk-master\"\n  keys:\n    - { key: \"sk-user\" }\n",
    );
    let gateway = Gateway::start(&yaml).await;
    let url = format!("{}/admin/status", gateway.url());
    let anonymous = client::get(&url, None).await;
    support::fixtures::assert_error(&anonymous, 401, "authentication_error");
    let user = client::get(&url, Some("sk-user")).await;
    support::fixtures::assert_error(&user, 403, "permission_error");

    // SIGHUP rebuilds even though no file changed.
    gateway.signal("HUP");
    wait_for_status(&gateway, TAKES_EFFECT, "the SIGHUP reload", |s| {
        s["generation"]["number"] == 2
    })
    .await;
    let status = admin_status(&gateway).await;
    assert!(
        status["generation"]["loaded_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{status:#}"
    );
}
