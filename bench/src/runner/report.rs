//! The report: medians and spreads across repeats, what each variant adds over going direct,
//! the ratios the targets are stated in, as Markdown for people and JSON for tools.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{json, Value};

use super::reload::Reload;
use super::scenarios::{metric, Metrics, Soak};
use super::{Options, Skipped};

#[derive(Debug)]
pub struct Report<'a> {
    pub started: SystemTime,
    pub options: &'a Options,
    pub pinning: String,
    pub cores: usize,
    /// Variant labels in the order they ran.
    pub order: Vec<String>,
    pub samples: BTreeMap<String, Vec<Metrics>>,
    pub skipped: Vec<Skipped>,
    pub instructions: BTreeMap<String, Result<f64, String>>,
    /// `/admin/status` of each Portcullis variant after its last repeat.
    pub plugin_stats: BTreeMap<String, Value>,
    pub reload: Reload,
    pub soak: Soak,
    pub peer_versions: BTreeMap<String, String>,
}

#[derive(Debug)]
pub struct Written {
    pub markdown: PathBuf,
    pub json: PathBuf,
}

/// The median and range of one metric over the repeats.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    low: f64,
    high: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Option<Spread> {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let middle = values.len() / 2;
        let median = if values.len() % 2 == 1 {
            values[middle]
        } else {
            (values[middle - 1] + values[middle]) / 2.0
        };
        Some(Spread {
            median,
            low: values[0],
            high: values[values.len() - 1],
        })
    }

    fn json(self) -> Value {
        json!({ "median": self.median, "min": self.low, "max": self.high })
    }
}

/// Formats a spread with `digits` decimals, scaled by `scale`: `62.1 (60.3–64.0)`.
fn show(spread: Option<Spread>, scale: f64, digits: usize) -> String {
    match spread {
        None => "–".to_owned(),
        Some(s) if (s.high - s.low).abs() < f64::EPSILON => {
            format!("{:.digits$}", s.median * scale)
        }
        Some(s) => format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            s.median * scale,
            s.low * scale,
            s.high * scale
        ),
    }
}

fn ratio(value: Option<f64>, floor: Option<f64>) -> String {
    match (value, floor) {
        (Some(v), Some(f)) if f.abs() > f64::EPSILON => format!("{:.2}x", v / f),
        _ => "–".to_owned(),
    }
}

impl Report<'_> {
    fn metric(&self, label: &str, name: &str) -> Option<Spread> {
        let samples = self.samples.get(label)?;
        Spread::of(
            samples
                .iter()
                .filter_map(|m| m.get(name).copied())
                .collect(),
        )
    }

    /// What `label` adds over direct, repeat by repeat (each repeat's direct run is the
    /// baseline of the same repeat).
    fn added(&self, label: &str, name: &str) -> Option<Spread> {
        let samples = self.samples.get(label)?;
        let direct = self.samples.get("direct")?;
        Spread::of(
            samples
                .iter()
                .zip(direct)
                .filter_map(|(m, d)| Some(m.get(name)? - d.get(name)?))
                .collect(),
        )
    }

    fn instructions(&self, label: &str) -> Option<f64> {
        self.instructions.get(label)?.as_ref().ok().copied()
    }

    fn ran(&self) -> Vec<&String> {
        self.order
            .iter()
            .filter(|label| self.samples.contains_key(*label))
            .collect()
    }

    pub fn write(&self, out: &Path) -> anyhow::Result<Written> {
        let written = Written {
            markdown: out.join("latest.md"),
            json: out.join("latest.json"),
        };
        std::fs::write(&written.markdown, self.markdown())?;
        std::fs::write(
            &written.json,
            serde_json::to_string_pretty(&self.json())? + "\n",
        )?;
        Ok(written)
    }

    fn machine(&self) -> Value {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        json!({
            "date": humantime::format_rfc3339_seconds(self.started).to_string(),
            "cpu": cpu,
            "cores": self.cores,
            "kernel": command_line("uname", &["-sr"]),
            "rustc": command_line("rustc", &["--version"]),
            "portcullis_commit": command_line("git", &["rev-parse", "--short", "HEAD"]),
            "pinning": self.pinning,
            "repeats": self.options.repeats,
            "quick": self.options.quick,
            "peers": self.peer_versions,
        })
    }

    fn json(&self) -> Value {
        let mut variants = serde_json::Map::new();
        for label in self.ran() {
            let names: std::collections::BTreeSet<&String> =
                self.samples[label].iter().flat_map(|m| m.keys()).collect();
            let mut summary = serde_json::Map::new();
            for name in names {
                let mut entry = serde_json::Map::new();
                if let Some(spread) = self.metric(label, name) {
                    entry.insert("value".into(), spread.json());
                }
                if let Some(spread) = self.added(label, name) {
                    entry.insert("added_over_direct".into(), spread.json());
                }
                summary.insert(name.clone(), Value::Object(entry));
            }
            variants.insert(
                label.clone(),
                json!({ "summary": summary, "repeats": self.samples[label] }),
            );
        }
        let instructions: BTreeMap<&String, Value> = self
            .instructions
            .iter()
            .map(|(label, count)| {
                (
                    label,
                    match count {
                        Ok(n) => json!(n),
                        Err(why) => json!({ "error": why }),
                    },
                )
            })
            .collect();
        json!({
            "machine": self.machine(),
            "variants": variants,
            "skipped": self.skipped.iter().map(|s| json!({"variant": s.label, "why": s.why})).collect::<Vec<_>>(),
            "instructions_per_request": instructions,
            "plugin_calls": self.plugin_calls(),
            "reload": self.reload,
            "soak": self.soak,
            "targets": self.targets().iter().map(|t| json!({"target": t.what, "measured": t.measured, "met": t.met})).collect::<Vec<_>>(),
        })
    }

    /// Per plugin, the call-time histogram the gateway keeps, from the five-plugin variant.
    fn plugin_calls(&self) -> Value {
        let Some(status) = self
            .plugin_stats
            .get(super::PluginSet::Five.label())
            .or_else(|| self.plugin_stats.values().next())
        else {
            return Value::Null;
        };
        let plugins = status["plugins"].as_array().cloned().unwrap_or_default();
        Value::Array(
            plugins
                .into_iter()
                .map(|p| json!({ "name": p["name"], "kinds": p["kinds"], "calls": p["calls"] }))
                .collect(),
        )
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let machine = self.machine();
        let _ = writeln!(md, "# Portcullis benchmark\n");
        let _ = writeln!(
            md,
            "{} · {} ({} cores) · {} · {} · commit {} · {}; {} repeats{}, median (min–max).\n",
            machine["date"].as_str().unwrap_or("?"),
            machine["cpu"].as_str().unwrap_or("?"),
            machine["cores"],
            machine["kernel"].as_str().unwrap_or("?"),
            machine["rustc"].as_str().unwrap_or("?"),
            machine["portcullis_commit"].as_str().unwrap_or("?"),
            self.pinning,
            self.options.repeats,
            if self.options.quick { " (quick)" } else { "" },
        );
        if !self.peer_versions.is_empty() {
            let versions: Vec<String> = self
                .peer_versions
                .iter()
                .map(|(name, version)| format!("{name} {version}"))
                .collect();
            let _ = writeln!(md, "Peers: {}.\n", versions.join(", "));
        }
        self.latency_table(&mut md);
        self.throughput_table(&mut md);
        self.memory_table(&mut md);
        self.plugin_table(&mut md);
        self.reload_section(&mut md);
        self.targets_section(&mut md);
        if !self.skipped.is_empty() {
            let _ = writeln!(md, "## Could not run\n");
            for skipped in &self.skipped {
                let _ = writeln!(md, "- **{}**: {}", skipped.label, skipped.why);
            }
            md.push('\n');
        }
        md
    }

    fn latency_table(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## Latency (concurrency 1, zero-delay mock, ~1 KB prompt)\n\n\
             Times in microseconds; *added* is over direct in the same repeat; *x floor* divides by \
             the floor's added time. Instructions are the server's, per request, under callgrind.\n"
        );
        let _ = writeln!(
            md,
            "| variant | p50 | p99 | added p50 | added p99 | added p50 x floor | added p99 x floor | instructions/request | x floor |\n|---|---|---|---|---|---|---|---|---|"
        );
        let floor_p50 = self.added("floor", metric::LATENCY_P50).map(|s| s.median);
        let floor_p99 = self.added("floor", metric::LATENCY_P99).map(|s| s.median);
        let floor_instructions = self.instructions("floor");
        for label in self.ran() {
            let added_p50 = self.added(label, metric::LATENCY_P50);
            let added_p99 = self.added(label, metric::LATENCY_P99);
            let instructions = self.instructions(label);
            let direct = label == "direct";
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {} | {} | {} | {} |",
                show(self.metric(label, metric::LATENCY_P50), 1.0, 1),
                show(self.metric(label, metric::LATENCY_P99), 1.0, 1),
                if direct {
                    "–".into()
                } else {
                    show(added_p50, 1.0, 1)
                },
                if direct {
                    "–".into()
                } else {
                    show(added_p99, 1.0, 1)
                },
                if direct {
                    "–".into()
                } else {
                    ratio(added_p50.map(|s| s.median), floor_p50)
                },
                if direct {
                    "–".into()
                } else {
                    ratio(added_p99.map(|s| s.median), floor_p99)
                },
                instructions.map_or("–".into(), |n| format!("{:.0}k", n / 1000.0)),
                ratio(instructions, floor_instructions),
            );
        }
        let _ = writeln!(
            md,
            "\n## Streams\n\n\
             Time to first byte at concurrency 1 (16 deltas, no pacing); gaps between 64 deltas paced \
             20 ms apart, 16 streams at a time; 1,000 streams held open at once (a stall is a gap over \
             a second or a stream that did not finish).\n"
        );
        let _ = writeln!(
            md,
            "| variant | TTFB p50 | added TTFB p50 | x floor | gap p50 | gap p99 | added gap p99 | x floor | 1,000 streams: done / failed | longest gap (ms) |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        let floor_ttfb = self.added("floor", metric::TTFB_P50).map(|s| s.median);
        let floor_gap = self.added("floor", metric::GAP_P99).map(|s| s.median);
        for label in self.ran() {
            let direct = label == "direct";
            let ttfb = self.added(label, metric::TTFB_P50);
            let gap = self.added(label, metric::GAP_P99);
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
                show(self.metric(label, metric::TTFB_P50), 1.0, 1),
                if direct {
                    "–".into()
                } else {
                    show(ttfb, 1.0, 1)
                },
                if direct {
                    "–".into()
                } else {
                    ratio(ttfb.map(|s| s.median), floor_ttfb)
                },
                show(self.metric(label, metric::GAP_P50), 0.001, 2),
                show(self.metric(label, metric::GAP_P99), 0.001, 2),
                if direct {
                    "–".into()
                } else {
                    show(gap, 1.0, 0)
                },
                if direct {
                    "–".into()
                } else {
                    ratio(gap.map(|s| s.median), floor_gap)
                },
                show(self.metric(label, metric::STREAMS_HELD), 1.0, 0),
                show(self.metric(label, metric::STREAMS_FAILED), 1.0, 0),
                show(self.metric(label, metric::STREAMS_MAX_GAP), 0.001, 0),
            );
        }
        md.push('\n');
    }

    fn throughput_table(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## Throughput (concurrency 32, closed loop)\n\n| variant | zero-delay mock (rps) | x floor | failed | 20 ms mock (rps) | failed |\n|---|---|---|---|---|---|"
        );
        let floor = self.metric("floor", metric::THROUGHPUT).map(|s| s.median);
        for label in self.ran() {
            let rps = self.metric(label, metric::THROUGHPUT);
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {} |",
                show(rps, 1.0, 0),
                ratio(rps.map(|s| s.median), floor),
                show(self.metric(label, metric::THROUGHPUT_FAILED), 1.0, 0),
                show(self.metric(label, metric::SLOW_THROUGHPUT), 1.0, 0),
                show(self.metric(label, metric::SLOW_FAILED), 1.0, 0),
            );
        }
        md.push('\n');
    }

    fn memory_table(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## Memory (resident set, MB)\n\n*PSS* counts a page shared by several mappings in part: each plugin instance maps its module's initial memory image, which the resident set counts once per instance.\n\n| variant | idle | under load (c=32) | after load | 1,000 open streams | 1,000 open streams, PSS |\n|---|---|---|---|---|---|"
        );
        for label in self.ran().into_iter().filter(|l| *l != "direct") {
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {} |",
                show(self.metric(label, metric::RSS_IDLE), 1e-6, 1),
                show(self.metric(label, metric::RSS_LOAD), 1e-6, 1),
                show(self.metric(label, metric::RSS_AFTER), 1e-6, 1),
                show(self.metric(label, metric::RSS_STREAMS), 1e-6, 1),
                show(self.metric(label, metric::PSS_STREAMS), 1e-6, 1),
            );
        }
        let soak = &self.soak;
        let _ = writeln!(
            md,
            "\nSoak: {} at {:.0} rps for {:.0} s: {} requests, {} failed; RSS {} MB after the first third, {} MB at the end (growth {}).\n",
            soak.label,
            soak.rate_rps,
            soak.seconds,
            soak.requests_ok,
            soak.requests_failed,
            soak.rss
                .iter()
                .find(|(at, _)| *at >= soak.seconds / 3.0)
                .map_or("–".into(), |(_, b)| format!("{:.1}", *b as f64 / 1e6)),
            soak.rss
                .last()
                .map_or("–".into(), |(_, b)| format!("{:.1}", *b as f64 / 1e6)),
            soak.growth_bytes()
                .map_or("–".into(), |g| format!("{:+.1} MB", g as f64 / 1e6)),
        );
    }

    fn plugin_table(&self, md: &mut String) {
        let base = self.instructions(super::PluginSet::None.label());
        let floor = self.instructions("floor");
        let _ = writeln!(
            md,
            "## Plugins\n\nThe host's cost of one call to a guardrail that allows everything, in \
             instructions per request over Portcullis without plugins, and as a share of the \
             floor's instructions per request:\n\n| instance | instructions | share of floor |\n|---|---|---|"
        );
        for set in [super::PluginSet::NoopPooled, super::PluginSet::NoopFresh] {
            let cost = self.instructions(set.label()).zip(base).map(|(n, b)| n - b);
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                set.label(),
                cost.map_or("–".into(), |c| format!("{:.0}", c)),
                cost.zip(floor)
                    .map_or("–".into(), |(c, f)| format!("{:.0}%", 100.0 * c / f)),
            );
        }
        let calls = self.plugin_calls();
        if let Some(plugins) = calls.as_array() {
            let _ = writeln!(
                md,
                "\nEach shipped plugin's cost. *Instructions*: per request over Portcullis without \
                 plugins, with the plugin enabled alone as the five-plugin set enables it (counted \
                 on whole answers, which pii-mask-stream checks in one call). The rest: its calls as \
                 the gateway timed them (microseconds, instantiation included; five plugins, \
                 pooled, over the last repeat).\n\n| plugin | kinds | instructions | calls | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|---|---|"
            );
            for plugin in plugins {
                let calls = &plugin["calls"];
                let kinds: Vec<&str> = plugin["kinds"]
                    .as_array()
                    .map(|k| k.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let name = plugin["name"].as_str().unwrap_or("?");
                let alone = super::Shipped::ALL
                    .into_iter()
                    .find(|shipped| shipped.name() == name)
                    .and_then(|shipped| {
                        self.instructions(super::PluginSet::Alone(shipped).label())
                    });
                let cost = alone.zip(base).map(|(n, b)| n - b);
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    name,
                    kinds.join(", "),
                    cost.map_or("–".into(), |c| format!("{:.0}", c)),
                    calls["count"],
                    calls["p50_us"],
                    calls["p90_us"],
                    calls["p99_us"],
                    calls["max_us"],
                );
            }
        }
        md.push('\n');
    }

    fn reload_section(&self, md: &mut String) {
        let r = &self.reload;
        let median = |values: &[f64]| Spread::of(values.to_vec());
        let _ = writeln!(
            md,
            "## Reload under load\n\n{:.0} rps for {:.0} s while the config and a plugin file were replaced \
             {} times (ten a second): {} requests, **{} failed**, {} generations served. p99 {:.0} us \
             with no swaps, {:.0} us while swapping. From a write to the new generation serving: \
             config {} ms, plugin {} ms (median, min–max; the watcher waits 150 ms for writes to settle).{}\n",
            r.rate_rps,
            r.seconds,
            r.swaps,
            r.requests_ok,
            r.requests_failed,
            r.generations,
            r.quiet_p99_us,
            r.swapping_p99_us,
            show(median(&r.config_to_serving_ms), 1.0, 0),
            show(median(&r.plugin_to_serving_ms), 1.0, 0),
            r.error
                .as_ref()
                .map_or(String::new(), |e| format!(" Error: {e}.")),
        );
    }

    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        let floor = |name: &str| self.added("floor", name).map(|s| s.median);
        let added = |label: &str, name: &str| self.added(label, name).map(|s| s.median);
        let none = super::PluginSet::None.label();
        let five = super::PluginSet::Five.label();
        let mut at_most = |what: String, value: Option<f64>, base: Option<f64>, limit: f64| {
            if let (Some(v), Some(b)) = (value, base) {
                let r = v / b;
                targets.push(Target {
                    what,
                    measured: format!("{r:.2}x"),
                    met: r <= limit,
                });
            }
        };
        at_most(
            "no plugins: added p50 ≤ 1.5x the floor's".into(),
            added(none, metric::LATENCY_P50),
            floor(metric::LATENCY_P50),
            1.5,
        );
        at_most(
            "no plugins: added p99 ≤ 2x the floor's".into(),
            added(none, metric::LATENCY_P99),
            floor(metric::LATENCY_P99),
            2.0,
        );
        at_most(
            "no plugins: instructions/request ≤ 2x the floor's".into(),
            self.instructions(none),
            self.instructions("floor"),
            2.0,
        );
        at_most(
            "five plugins: added p50 ≤ 3x the floor's".into(),
            added(five, metric::LATENCY_P50),
            floor(metric::LATENCY_P50),
            3.0,
        );
        at_most(
            "five plugins: instructions/request ≤ 4x the floor's".into(),
            self.instructions(five),
            self.instructions("floor"),
            4.0,
        );
        at_most(
            "no plugins: added TTFB ≤ 1.5x the floor's".into(),
            added(none, metric::TTFB_P50),
            floor(metric::TTFB_P50),
            1.5,
        );
        at_most(
            "streaming guardrail on: added per-delta gap p99 ≤ 2x the floor's".into(),
            added(five, metric::GAP_P99).map(|g| g.max(0.0)),
            floor(metric::GAP_P99).map(|g| g.max(1.0)),
            2.0,
        );
        let base = self.instructions(none);
        let floor_instructions = self.instructions("floor");
        for (set, limit) in [
            (super::PluginSet::NoopPooled, 0.10),
            (super::PluginSet::NoopFresh, 0.50),
        ] {
            let cost = self.instructions(set.label()).zip(base).map(|(n, b)| n - b);
            if let Some((cost, floor)) = cost.zip(floor_instructions) {
                let share = cost / floor;
                targets.push(Target {
                    what: format!(
                        "{}: host cost ≤ {:.0}% of the floor's instructions",
                        set.label(),
                        limit * 100.0
                    ),
                    measured: format!("{:.0}%", share * 100.0),
                    met: share <= limit,
                });
            }
        }
        let throughput = self
            .metric(none, metric::THROUGHPUT)
            .zip(self.metric("floor", metric::THROUGHPUT));
        if let Some((p, f)) = throughput {
            let share = p.median / f.median;
            targets.push(Target {
                what: "no plugins: throughput at c=32 ≥ 75% of the floor's".into(),
                measured: format!("{:.0}%", share * 100.0),
                met: share >= 0.75,
            });
        }
        for label in [none, five] {
            if let Some(held) = self.metric(label, metric::STREAMS_HELD) {
                let failed = self
                    .metric(label, metric::STREAMS_FAILED)
                    .map_or(0.0, |s| s.high);
                let gap = self
                    .metric(label, metric::STREAMS_MAX_GAP)
                    .map_or(f64::INFINITY, |s| s.high);
                targets.push(Target {
                    what: format!("{label}: 1,000 concurrent streams, no stall"),
                    measured: format!(
                        "{:.0} done, {failed:.0} failed, longest gap {:.0} ms",
                        held.low,
                        gap / 1000.0
                    ),
                    met: held.low >= 1000.0 && failed == 0.0 && gap < 1_000_000.0,
                });
            }
        }
        if let Some(idle) = self.metric(none, metric::RSS_IDLE) {
            targets.push(Target {
                what: "idle RSS ≤ 30 MB".into(),
                measured: format!("{:.1} MB", idle.high / 1e6),
                met: idle.high <= 30e6,
            });
        }
        if let Some(streams) = self.metric(five, metric::RSS_STREAMS) {
            targets.push(Target {
                what: "RSS with 1,000 open streams ≤ 150 MB (five plugins)".into(),
                measured: match self.metric(five, metric::PSS_STREAMS) {
                    Some(pss) => format!(
                        "{:.1} MB (PSS {:.1} MB)",
                        streams.high / 1e6,
                        pss.high / 1e6
                    ),
                    None => format!("{:.1} MB", streams.high / 1e6),
                },
                met: streams.high <= 150e6,
            });
        }
        if let Some(growth) = self.soak.growth_bytes() {
            targets.push(Target {
                what: format!("no growth over the {:.0} s soak", self.soak.seconds),
                measured: format!("{:+.1} MB", growth as f64 / 1e6),
                // Allocator noise, not a leak: under 2 MB over the last two thirds.
                met: growth < 2_000_000,
            });
        }
        targets.push(Target {
            what: "reload: zero failed requests across the swaps".into(),
            measured: format!(
                "{} failed of {}",
                self.reload.requests_failed,
                self.reload.requests_ok + self.reload.requests_failed
            ),
            met: self.reload.error.is_none() && self.reload.requests_failed == 0,
        });
        for (peer, factor) in [("litellm", 20.0), ("portkey", 10.0), ("tensorzero", 5.0)] {
            if let (Some(theirs), Some(ours)) = (
                added(peer, metric::LATENCY_P50),
                added(none, metric::LATENCY_P50),
            ) {
                let r = theirs / ours;
                targets.push(Target {
                    what: format!("added p50 ≥ {factor:.0}x lower than {peer}'s"),
                    measured: format!("{r:.1}x lower"),
                    met: r >= factor,
                });
            }
        }
        targets
    }

    fn targets_section(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## Targets\n\n| target | measured | met |\n|---|---|---|"
        );
        for target in self.targets() {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                target.what,
                target.measured,
                if target.met { "yes" } else { "**no**" }
            );
        }
        md.push('\n');
    }
}

#[derive(Debug)]
struct Target {
    what: String,
    measured: String,
    met: bool,
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_take_the_median_of_finite_values() {
        let spread = Spread::of(vec![3.0, f64::NAN, 1.0, 2.0]).map(|s| (s.median, s.low, s.high));
        assert_eq!(spread, Some((2.0, 1.0, 3.0)));
        assert!(Spread::of(vec![f64::NAN]).is_none());
    }
}
