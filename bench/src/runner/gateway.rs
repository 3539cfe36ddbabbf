//! Portcullis as the benchmark runs it: one config file per plugin set, all pointing at the mock.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The key clients use; a static key of team `bench`, so the team enricher has work to do.
pub const CLIENT_KEY: &str = "sk-bench";
/// `CLIENT_KEY` as an `authorization` header value.
pub const CLIENT_BEARER: &str = "Bearer sk-bench";
/// The master key, for `/admin/status`.
pub const MASTER_KEY: &str = "sk-bench-master";
/// The model group clients ask for.
pub const MODEL: &str = "bench-model";

/// Which plugins are enabled, in the order the issue lists them: a PII guardrail before the call,
/// then an enricher and a routing strategy, then a guardrail on the response stream and an audit
/// hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginSet {
    None,
    One,
    Three,
    Five,
    /// The five with a fresh instance per call instead of pooled instances.
    FiveFresh,
    /// One guardrail that allows everything: the host's own cost of a plugin call.
    NoopFresh,
    NoopPooled,
}

impl PluginSet {
    pub fn label(self) -> &'static str {
        match self {
            PluginSet::None => "portcullis",
            PluginSet::One => "portcullis +1 plugin",
            PluginSet::Three => "portcullis +3 plugins",
            PluginSet::Five => "portcullis +5 plugins",
            PluginSet::FiveFresh => "portcullis +5 plugins (fresh)",
            PluginSet::NoopFresh => "portcullis +no-op (fresh)",
            PluginSet::NoopPooled => "portcullis +no-op (pooled)",
        }
    }

    /// The wasm files this set needs, relative to the plugin directory.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            PluginSet::None => &[],
            PluginSet::One => &["pii_mask.wasm"],
            PluginSet::Three => &["pii_mask.wasm", "team_defaults.wasm", "least_latency.wasm"],
            PluginSet::Five | PluginSet::FiveFresh => &[
                "pii_mask.wasm",
                "team_defaults.wasm",
                "least_latency.wasm",
                "audit_log.wasm",
            ],
            PluginSet::NoopFresh | PluginSet::NoopPooled => &["misbehave.wasm"],
        }
    }

    fn instance(self) -> &'static str {
        match self {
            PluginSet::FiveFresh | PluginSet::NoopFresh => "fresh",
            _ => "pooled",
        }
    }

    fn count(self) -> usize {
        match self {
            PluginSet::None => 0,
            PluginSet::One | PluginSet::NoopFresh | PluginSet::NoopPooled => 1,
            PluginSet::Three => 3,
            PluginSet::Five | PluginSet::FiveFresh => 5,
        }
    }
}

/// Writes `DIR/<name>.yaml` for `set` and returns its path. `plugins` is the directory the
/// plugin files are in; the audit hook writes into `DIR/audit`. Each config gets an empty spend
/// database of its own: appending to one that earlier runs filled costs more per row, and counts
/// would depend on what ran before. The audit log starts empty too: kept, it grew by hundreds of
/// megabytes a run, all of it written back to disk while later variants ran.
pub fn write_config(
    dir: &Path,
    name: &str,
    set: PluginSet,
    upstream: &str,
    plugins: &Path,
) -> std::io::Result<PathBuf> {
    let audit = dir.join("audit");
    if audit.exists() {
        std::fs::remove_dir_all(&audit)?;
    }
    std::fs::create_dir_all(&audit)?;
    let database = dir.join(format!("{name}.db"));
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", database.display()));
        if file.exists() {
            std::fs::remove_file(file)?;
        }
    }
    let mut text = config_text(set, upstream, plugins, &audit, 600);
    let _ = writeln!(
        text,
        "store:\n  database_url: \"sqlite://{}\"",
        database.display()
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The YAML for `set`. Two deployments of the one mock, so a routing strategy has a choice to
/// make; `timeout_s` lets the reload scenario change the file without changing behaviour.
pub fn config_text(
    set: PluginSet,
    upstream: &str,
    plugins: &Path,
    audit: &Path,
    timeout_s: u32,
) -> String {
    let mut yaml = format!(
        "server:\n  listen: 127.0.0.1:0\n\
         auth:\n  master_key: {MASTER_KEY}\n  keys:\n    - {{ key: {CLIENT_KEY}, alias: bench, team: bench }}\n\
         models:\n"
    );
    for id in ["a", "b"] {
        let _ = writeln!(
            yaml,
            "  - {{ name: {MODEL}, id: {id}, provider: openai_compatible, model: {MODEL}, api_base: \"{upstream}\", \
             input_cost_per_token: 0.00000015, output_cost_per_token: 0.0000006 }}"
        );
    }
    let strategy = if set.count() >= 3 {
        "least-latency"
    } else {
        "simple-shuffle"
    };
    let _ = writeln!(
        yaml,
        "router: {{ strategy: {strategy}, timeout_s: {timeout_s} }}"
    );
    if set.count() == 0 {
        return yaml;
    }
    let instance = set.instance();
    let _ = write!(
        yaml,
        "plugins:\n  dir: \"{}\"\n  enabled:\n",
        plugins.display()
    );
    let mut enable = |entry: String| {
        let _ = writeln!(yaml, "    - {{ {entry}, instance: {instance} }}");
    };
    if matches!(set, PluginSet::NoopFresh | PluginSet::NoopPooled) {
        enable(
            "name: noop, path: misbehave.wasm, default_on: true, config: { check: allow }".into(),
        );
        return yaml;
    }
    enable(
        "name: pii-mask, path: pii_mask.wasm, mode: pre_call, default_on: true, config: { action: mask }"
            .into(),
    );
    if set.count() >= 3 {
        enable(
            "name: team-defaults, path: team_defaults.wasm, config: { teams: { bench: { tags: [bench] } } }"
                .into(),
        );
        enable("name: least-latency, path: least_latency.wasm".into());
    }
    if set.count() >= 5 {
        // pii-mask keeps nothing between deltas: pooled, its streams share the warm instances.
        let per_delta = if instance == "pooled" {
            ", stream_instance: per_delta"
        } else {
            ""
        };
        enable(format!(
            "name: pii-mask-stream, path: pii_mask.wasm, mode: post_call, default_on: true, config: {{ action: mask }}{per_delta}"
        ));
        enable(format!(
            "name: audit, path: audit_log.wasm, capabilities: {{ dirs: [{{ host: \"{}\", guest: /audit, write: true }}] }}",
            audit.display()
        ));
    }
    yaml
}
