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
    /// One of the five, enabled as the five enable it: its own cost.
    Alone(Shipped),
}

/// The entries of the five-plugin set, in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shipped {
    PiiMask,
    TeamDefaults,
    LeastLatency,
    PiiMaskStream,
    Audit,
}

impl Shipped {
    pub const ALL: [Shipped; 5] = [
        Shipped::PiiMask,
        Shipped::TeamDefaults,
        Shipped::LeastLatency,
        Shipped::PiiMaskStream,
        Shipped::Audit,
    ];

    /// The entry's name in the config (and in the gateway's per-plugin timings).
    pub fn name(self) -> &'static str {
        match self {
            Shipped::PiiMask => "pii-mask",
            Shipped::TeamDefaults => "team-defaults",
            Shipped::LeastLatency => "least-latency",
            Shipped::PiiMaskStream => "pii-mask-stream",
            Shipped::Audit => "audit",
        }
    }

    fn file(self) -> &'static str {
        match self {
            Shipped::PiiMask | Shipped::PiiMaskStream => "pii_mask.wasm",
            Shipped::TeamDefaults => "team_defaults.wasm",
            Shipped::LeastLatency => "least_latency.wasm",
            Shipped::Audit => "audit_log.wasm",
        }
    }

    /// The entry's YAML fields, but for `instance`.
    fn entry(self, instance: &str, audit: &Path) -> String {
        let rest = match self {
            Shipped::PiiMask => "mode: pre_call, default_on: true, config: { action: mask }".into(),
            Shipped::TeamDefaults => "config: { teams: { bench: { tags: [bench] } } }".into(),
            Shipped::LeastLatency => String::new(),
            Shipped::PiiMaskStream => {
                // pii-mask keeps nothing between deltas: pooled, its streams share the warm
                // instances.
                let per_delta = if instance == "pooled" {
                    ", stream_instance: per_delta"
                } else {
                    ""
                };
                format!("mode: post_call, default_on: true, config: {{ action: mask }}{per_delta}")
            }
            Shipped::Audit => format!(
                "capabilities: {{ dirs: [{{ host: \"{}\", guest: /audit, write: true }}] }}",
                audit.display()
            ),
        };
        let separator = if rest.is_empty() { "" } else { ", " };
        format!(
            "name: {}, path: {}{separator}{rest}",
            self.name(),
            self.file()
        )
    }
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
            PluginSet::Alone(Shipped::PiiMask) => "portcullis +pii-mask",
            PluginSet::Alone(Shipped::TeamDefaults) => "portcullis +team-defaults",
            PluginSet::Alone(Shipped::LeastLatency) => "portcullis +least-latency",
            PluginSet::Alone(Shipped::PiiMaskStream) => "portcullis +pii-mask-stream",
            PluginSet::Alone(Shipped::Audit) => "portcullis +audit",
        }
    }

    /// The wasm files this set needs, relative to the plugin directory.
    pub fn files(self) -> Vec<&'static str> {
        if matches!(self, PluginSet::NoopFresh | PluginSet::NoopPooled) {
            return vec!["misbehave.wasm"];
        }
        let mut files: Vec<_> = self.members().into_iter().map(Shipped::file).collect();
        // pii-mask and pii-mask-stream share a file, and are not neighbours in the set.
        files.sort_unstable();
        files.dedup();
        files
    }

    /// The shipped plugins it enables, in order (none for the no-op sets).
    fn members(self) -> Vec<Shipped> {
        match self {
            PluginSet::None | PluginSet::NoopFresh | PluginSet::NoopPooled => Vec::new(),
            PluginSet::One => Shipped::ALL[..1].to_vec(),
            PluginSet::Three => Shipped::ALL[..3].to_vec(),
            PluginSet::Five | PluginSet::FiveFresh => Shipped::ALL.to_vec(),
            PluginSet::Alone(plugin) => vec![plugin],
        }
    }

    fn instance(self) -> &'static str {
        match self {
            PluginSet::FiveFresh | PluginSet::NoopFresh => "fresh",
            _ => "pooled",
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
    plugin_timeout_ms: Option<u64>,
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
    let mut text = config_text(set, upstream, plugins, &audit, 600, plugin_timeout_ms);
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
/// `plugin_timeout_ms` replaces the plugins' default time limit.
pub fn config_text(
    set: PluginSet,
    upstream: &str,
    plugins: &Path,
    audit: &Path,
    timeout_s: u32,
    plugin_timeout_ms: Option<u64>,
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
    let members = set.members();
    let strategy = if members.contains(&Shipped::LeastLatency) {
        "least-latency"
    } else {
        "simple-shuffle"
    };
    let _ = writeln!(
        yaml,
        "router: {{ strategy: {strategy}, timeout_s: {timeout_s} }}"
    );
    let noop = matches!(set, PluginSet::NoopFresh | PluginSet::NoopPooled);
    if members.is_empty() && !noop {
        return yaml;
    }
    let instance = set.instance();
    let _ = write!(
        yaml,
        "plugins:\n  dir: \"{}\"\n  enabled:\n",
        plugins.display()
    );
    let limits = plugin_timeout_ms.map_or(String::new(), |ms| {
        format!(", limits: {{ timeout_ms: {ms} }}")
    });
    let mut enable = |entry: String| {
        let _ = writeln!(yaml, "    - {{ {entry}, instance: {instance}{limits} }}");
    };
    if noop {
        enable(
            "name: noop, path: misbehave.wasm, default_on: true, config: { check: allow }".into(),
        );
    }
    for member in &members {
        enable(member.entry(instance, audit));
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(set: PluginSet) -> String {
        config_text(
            set,
            "http://mock/v1",
            Path::new("/p"),
            Path::new("/a"),
            600,
            None,
        )
    }

    fn plugin_entries(yaml: &str) -> Vec<&str> {
        yaml.lines()
            .filter(|line| line.contains(" path: "))
            .collect()
    }

    #[test]
    fn a_plugin_alone_is_enabled_as_the_five_plugin_set_enables_it() {
        let five = config(PluginSet::Five);
        assert_eq!(plugin_entries(&five).len(), 5);
        for plugin in Shipped::ALL {
            let alone = config(PluginSet::Alone(plugin));
            let entries = plugin_entries(&alone);
            assert_eq!(entries.len(), 1, "{alone}");
            assert!(five.contains(entries[0]), "{} differs", plugin.name());
            let routed_by_plugin = alone.contains("strategy: least-latency");
            assert_eq!(routed_by_plugin, plugin == Shipped::LeastLatency);
        }
        assert!(plugin_entries(&config(PluginSet::None)).is_empty());
    }
}
