//! `audit-log`: a hook that appends one JSON line per finished call to a file the gateway grants.

use portcullis_plugin_sdk::{log, CallEvent, Config, Hook, Plugin};
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Where lines go when the config names no path.
pub const DEFAULT_PATH: &str = "/audit/audit.jsonl";

/// The plugin: the guest path of the audit file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_path")]
    path: String,
}

fn default_path() -> String {
    DEFAULT_PATH.to_string()
}

impl Plugin for AuditLog {
    fn init(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        if settings.path.trim().is_empty() {
            return Err("invalid config at `path`: empty path".into());
        }
        let path = PathBuf::from(settings.path);
        // Not an error: a missing grant is reported on each write, and loading still succeeds so
        // the rest of the gateway's configuration is not held hostage by an audit directory.
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            if !dir.is_dir() {
                log::warn(format!(
                    "audit directory {} is not accessible; was it granted to the plugin?",
                    dir.display()
                ));
            }
        }
        Ok(Self { path })
    }
}

impl Hook for AuditLog {
    fn on_success(&self, event: &CallEvent) {
        self.record(event);
    }

    fn on_failure(&self, event: &CallEvent) {
        self.record(event);
    }
}

impl AuditLog {
    /// Appends the event's line; a failure is logged, never raised, since the call is over anyway.
    fn record(&self, event: &CallEvent) {
        if let Err(err) = append(&self.path, &line(event)) {
            log::error(format!(
                "cannot append to audit file {}: {err}",
                self.path.display()
            ));
        }
    }
}

/// What one audit line holds, in the order written. Serialized straight from the event's fields:
/// no intermediate JSON value, so a line costs a few allocations however many fields it has.
#[derive(Serialize)]
struct Line<'a> {
    call_id: &'a str,
    timestamp: u64,
    key_alias: Option<&'a str>,
    team: Option<&'a str>,
    model: &'a str,
    deployment: Option<&'a str>,
    status: u16,
    error: Option<&'a str>,
    usage: Option<LineUsage>,
    cost_usd: f64,
    latency_ms: f64,
    tags: &'a [String],
}

#[derive(Serialize)]
struct LineUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

/// The audit line for one call, newline-terminated.
pub fn line(event: &CallEvent) -> String {
    let line = Line {
        call_id: &event.call_id,
        timestamp: event.started_at_ms,
        key_alias: event.key_alias.as_deref(),
        team: event.team.as_deref(),
        model: &event.model,
        deployment: event.deployment.as_deref(),
        status: event.status,
        error: event.error.as_deref(),
        usage: event.usage.map(|usage| LineUsage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
        }),
        cost_usd: event.cost_usd,
        latency_ms: event.latency_ms,
        tags: &event.tags,
    };
    // Plain fields with string keys: serializing cannot fail.
    let mut text = serde_json::to_string(&line).unwrap_or_default();
    text.push('\n');
    text
}

/// One `write_all` of a whole line on an append-mode file, so concurrent writers (several
/// instances) interleave by line rather than mid-line. Opening per call keeps log rotation simple.
fn append(path: &Path, line: &str) -> io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(line.as_bytes())
}

portcullis_plugin_sdk::export!(AuditLog: Hook);

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_plugin_sdk::{testing, LogLevel, Usage};
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh, empty directory per test.
    fn temp_dir() -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "audit-log-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    fn plugin_at(path: &Path) -> AuditLog {
        let config = json!({ "path": path }).to_string();
        AuditLog::init(Config::new(config)).expect("valid config")
    }

    fn read_lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .expect("audit file")
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is JSON"))
            .collect()
    }

    fn success() -> CallEvent {
        CallEvent {
            call_id: "call-1".into(),
            key_alias: Some("alice".into()),
            team: Some("ml".into()),
            model: "gpt-4o".into(),
            deployment: Some("azure-east".into()),
            usage: Some(Usage::new(10, 5)),
            cost_usd: 0.0015,
            latency_ms: 812.5,
            started_at_ms: 1_700_000_000_123,
            tags: vec!["ml".into()],
            ..CallEvent::default()
        }
    }

    #[test]
    fn appends_one_line_per_call() {
        let dir = temp_dir();
        let path = dir.join("audit.jsonl");
        let plugin = plugin_at(&path);
        plugin.on_success(&success());
        plugin.on_failure(&CallEvent {
            call_id: "call-2".into(),
            model: "gpt-4o".into(),
            status: 502,
            error: Some("upstream timed out".into()),
            ..CallEvent::default()
        });

        let lines = read_lines(&path);
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            json!({
                "call_id": "call-1",
                "timestamp": 1_700_000_000_123u64,
                "key_alias": "alice",
                "team": "ml",
                "model": "gpt-4o",
                "deployment": "azure-east",
                "status": 200,
                "error": null,
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                "cost_usd": 0.0015,
                "latency_ms": 812.5,
                "tags": ["ml"],
            })
        );
        assert_eq!(lines[1]["call_id"], "call-2");
        assert_eq!(lines[1]["status"], 502);
        assert_eq!(lines[1]["error"], "upstream timed out");
        assert_eq!(lines[1]["usage"], Value::Null);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn lines_stay_single_lines() {
        let event = CallEvent {
            error: Some("line one\nline two".into()),
            ..success()
        };
        let line = line(&event);
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn missing_directory_logs_instead_of_panicking() {
        let dir = temp_dir();
        let path = dir.join("not-granted").join("audit.jsonl");
        let _ = testing::take_logs();
        let plugin = plugin_at(&path);
        plugin.on_success(&success());
        let logs = testing::take_logs();
        assert!(logs
            .iter()
            .any(|(level, message)| *level == LogLevel::Warn && message.contains("granted")));
        assert!(
            logs.iter()
                .any(|(level, message)| *level == LogLevel::Error
                    && message.contains("cannot append"))
        );
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn default_path_and_config_errors() {
        let plugin = AuditLog::init(Config::default()).expect("defaults");
        assert_eq!(plugin.path, Path::new(DEFAULT_PATH));
        let err = AuditLog::init(Config::new(r#"{"path": ""}"#)).expect_err("empty");
        assert!(err.contains("path"), "{err}");
        let err = AuditLog::init(Config::new(r#"{"file": "/x"}"#)).expect_err("unknown");
        assert!(err.contains("file"), "{err}");
    }
}
