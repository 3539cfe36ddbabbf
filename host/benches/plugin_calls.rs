//! What one plugin call costs inside the gateway: each shipped plugin (and a no-op guardrail as
//! the floor) called through the pipeline's traits, with a fresh instance per call and with a
//! warm pooled one, as latency percentiles over many calls. Then what a reload costs, from the
//! moment it starts to the new generation serving (the watcher's 150 ms settle comes on top).
//!
//! ```sh
//! plugins/build && cargo build --release --target wasm32-wasip2 -p misbehave
//! cargo bench -p portcullis --bench plugin_calls            # PLUGIN_CALLS=5000 for more calls
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::call::{Call, CallRecord, Outcome};
use portcullis::config::Config;
use portcullis::extension::{Candidate, RouteRequest};
use portcullis::generation::{self, Generation};
use portcullis::openai::ApiRequest;
use portcullis::pipeline::authenticate::Principal;
use portcullis::providers::Endpoint;

/// A plugin under test: its YAML entry (without `instance`) and the kind of call to make.
struct Case {
    name: &'static str,
    entry: String,
    kind: Kind,
}

#[derive(Clone, Copy)]
enum Kind {
    Guardrail,
    Enricher,
    Router,
    Hook,
}

fn wasm_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release")
}

fn cases(audit_dir: &std::path::Path) -> Vec<Case> {
    let entry = |name: &str, file: &str, rest: &str| {
        format!("{{ name: {name}, path: {file}.wasm, default_on: true, {rest} }}")
    };
    vec![
        Case {
            name: "no-op guardrail",
            entry: entry("noop", "misbehave", "config: { check: allow }"),
            kind: Kind::Guardrail,
        },
        Case {
            name: "pii-mask (pre-call, mask)",
            entry: entry("pii", "pii_mask", "config: { action: mask }"),
            kind: Kind::Guardrail,
        },
        Case {
            name: "team-defaults (enricher)",
            entry: entry(
                "teams",
                "team_defaults",
                "config: { teams: { research: { tags: [r], metadata: { cc: 42 } } } }",
            ),
            kind: Kind::Enricher,
        },
        Case {
            name: "least-latency (router)",
            entry: entry("least-latency", "least_latency", "config: {}"),
            kind: Kind::Router,
        },
        Case {
            name: "audit-log (hook)",
            entry: entry(
                "audit",
                "audit_log",
                &format!(
                    "capabilities: {{ dirs: [{{ host: \"{}\", guest: /audit, write: true }}] }}",
                    audit_dir.display()
                ),
            ),
            kind: Kind::Hook,
        },
    ]
}

async fn generation(entry: &str, kind: Kind, pooled: bool) -> Generation {
    let instance = if pooled { "instance: pooled, " } else { "" };
    let entry = entry.replacen("{ ", &format!("{{ {instance}"), 1);
    let router = match kind {
        Kind::Router => "router: { strategy: least-latency }\n",
        _ => "",
    };
    let yaml = format!(
        "models:\n  - {{ name: g, provider: mock, id: a }}\n  - {{ name: g, provider: mock, id: b }}\n  - {{ name: g, provider: mock, id: c }}\nplugins:\n  dir: \"{}\"\n  enabled:\n    - {entry}\n{router}",
        wasm_dir().display()
    );
    let config = Config::parse(&yaml, &|_| None).expect("a valid bench config");
    let shared = generation::Shared::start(16, None).expect("the engine");
    Generation::build(config, &shared, None)
        .await
        .expect("the plugin loads (did plugins/build run?)")
}

/// A chat of about 2 KB, one address in it, from a key with a team.
fn request() -> (Call, ApiRequest) {
    let filler = "The quarterly report covers revenue, churn and hiring plans. ".repeat(30);
    let body = serde_json::json!({
        "model": "g",
        "messages": [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": format!("{filler} Mail it to jane.doe@example.com.")}
        ]
    });
    let body = body.as_object().cloned().expect("an object");
    let request = ApiRequest::from_object(Endpoint::ChatCompletions, body).expect("valid");
    let mut call = Call::new(Endpoint::ChatCompletions);
    call.principal = Some(Arc::new(Principal {
        alias: Some("bench".into()),
        team: Some("research".into()),
        user: None,
        token: None,
        models: None,
        guardrails: Vec::new(),
        is_master: false,
        governed: None,
    }));
    call.requested_model = "g".into();
    call.model = "g".into();
    (call, request)
}

fn candidates() -> Vec<Candidate> {
    ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, id)| Candidate {
            in_flight: i as u32,
            latency_ms: Some(100.0 + i as f64),
            ..Candidate::new(*id)
        })
        .collect()
}

async fn one_call(
    generation: &Generation,
    kind: Kind,
    (call, request, record): (&Call, &ApiRequest, &CallRecord),
) {
    match kind {
        Kind::Guardrail => {
            let slot = &generation.guardrails[0];
            slot.guardrail
                .check_request(call, request)
                .await
                .expect("a verdict");
        }
        Kind::Enricher => {
            generation.enrichers[0]
                .enrich(call, request)
                .await
                .expect("an enrichment");
        }
        Kind::Router => {
            let route = RouteRequest {
                call_id: &call.id,
                group: "g",
                estimated_tokens: 0,
                stream: false,
                origin: Some((call, request)),
            };
            let offered = candidates();
            generation.router.strategy().choose(&route, &offered).await;
        }
        Kind::Hook => {
            // The plugin's hook comes after the built-in call log, which is left out when the
            // log filter drops its line.
            let hook = generation.hooks.last().expect("the audit hook");
            hook.on_call_end(record).await;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1e6
}

async fn measure(generation: &Generation, kind: Kind, calls: usize) -> (f64, f64) {
    let (call, request) = request();
    let record = call.clone().into_record(Outcome::Success);
    let inputs = (&call, &request, &record);
    for _ in 0..calls / 10 {
        one_call(generation, kind, inputs).await;
    }
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        one_call(generation, kind, inputs).await;
        times.push(started.elapsed());
    }
    times.sort_unstable();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

fn main() {
    // As the gateway's own `main` does.
    portcullis::plugins::quiet_library_backtraces();
    let calls: usize = std::env::var("PLUGIN_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let audit = std::env::temp_dir().join(format!("portcullis-bench-audit-{}", std::process::id()));
    std::fs::create_dir_all(&audit).expect("a temp dir");
    // One worker thread, as the gateway's request tasks see it on a loaded core.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    println!("{calls} calls each; microseconds per call, measured in-process\n");
    println!("| plugin | fresh p50 | fresh p99 | pooled p50 | pooled p99 |");
    println!("|---|---:|---:|---:|---:|");
    for case in cases(&audit) {
        let (fresh, pooled) = runtime.block_on(async {
            let fresh = generation(&case.entry, case.kind, false).await;
            let fresh = measure(&fresh, case.kind, calls).await;
            let pooled = generation(&case.entry, case.kind, true).await;
            let pooled = measure(&pooled, case.kind, calls).await;
            (fresh, pooled)
        });
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            case.name, fresh.0, fresh.1, pooled.0, pooled.1
        );
    }
    let _ = std::fs::remove_dir_all(&audit);
    runtime.block_on(reloads());
}

/// Reload times: a YAML-only change (the component comes from the cache), and a changed plugin
/// file (compiled anew).
async fn reloads() {
    let dir = std::env::temp_dir().join(format!("portcullis-bench-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let config_path = dir.join("portcullis.yaml");
    let wasm = dir.join("guard.wasm");
    let write_config = |tags: usize| {
        let yaml = format!(
            "models:\n  - {{ name: g{tags}, provider: mock }}\nplugins:\n  dir: \"{}\"\n  enabled:\n    - {{ name: guard, path: guard.wasm, default_on: true }}\n",
            dir.display()
        );
        std::fs::write(&config_path, yaml).expect("write the config");
    };
    let original = std::fs::read(wasm_dir().join("pii_mask.wasm")).expect("pii_mask.wasm");
    // A custom section makes each round's file new to the cache, so it is compiled again.
    let version = |round: u8| {
        let mut bytes = original.clone();
        bytes.extend_from_slice(&[0, 6, 4, b'b', b'e', b'n', b'c', round]);
        bytes
    };
    std::fs::write(&wasm, version(0)).expect("write a plugin");
    write_config(0);
    let config = Config::load(&config_path).expect("a valid config");
    let parts = generation::Shared::start(16, None).expect("the engine");
    let reloader = portcullis::reload::Reloader::start(config_path.clone(), config, parts)
        .await
        .expect("the first generation");
    let mut yaml_only = Vec::new();
    let mut new_file = Vec::new();
    for round in 1..=10usize {
        write_config(round);
        let started = tokio::time::Instant::now();
        reloader.reload(false, started).await;
        yaml_only.push(started.elapsed());
        std::fs::write(&wasm, version(round as u8)).expect("replace the plugin");
        let started = tokio::time::Instant::now();
        reloader.reload(false, started).await;
        new_file.push(started.elapsed());
    }
    assert_eq!(reloader.status().failed, 0, "{:?}", reloader.status());
    yaml_only.sort_unstable();
    new_file.sort_unstable();
    println!("\nreload, start to the new generation serving (10 each; milliseconds):\n");
    println!("| change | p50 | max |\n|---|---:|---:|");
    for (what, times) in [
        ("YAML only", &yaml_only),
        ("plugin file replaced", &new_file),
    ] {
        println!(
            "| {what} | {:.1} | {:.1} |",
            percentile(times, 0.5) / 1000.0,
            percentile(times, 1.0) / 1000.0
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
