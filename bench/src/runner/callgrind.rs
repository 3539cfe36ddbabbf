//! Instructions per request: the server runs under callgrind, which counts every user-space
//! instruction it executes. Unlike time, the count barely moves when the machine is busy.
//!
//! After a warm-up the counters are zeroed, a fixed number of requests is sent one at a time, and
//! the dump's total is divided by that number.
//!
//! Portcullis writes spend rows once a second, off the request path. The count waits for those
//! writes to land before zeroing and before dumping, so it holds the writes of exactly the measured
//! requests: without the wait, a second's worth of rows fell on either side by chance, and counts
//! of the same build moved by 6%.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use super::process::Pinning;
use super::{client_target, Options, PluginSet, Shipped};
use crate::load::{self, Pace};
use crate::mock::Mock;

/// The servers that get a count: the floor (`None`), Portcullis with each plugin set, and with
/// each of the five plugins alone.
pub const MEASURED: [Option<PluginSet>; 13] = [
    None,
    Some(PluginSet::None),
    Some(PluginSet::NoopPooled),
    Some(PluginSet::NoopFresh),
    Some(PluginSet::One),
    Some(PluginSet::Three),
    Some(PluginSet::Five),
    Some(PluginSet::FiveFresh),
    Some(PluginSet::Alone(Shipped::PiiMask)),
    Some(PluginSet::Alone(Shipped::TeamDefaults)),
    Some(PluginSet::Alone(Shipped::LeastLatency)),
    Some(PluginSet::Alone(Shipped::PiiMaskStream)),
    Some(PluginSet::Alone(Shipped::Audit)),
];

/// Longer than the gateway's spend-writing interval (a second) plus a write under callgrind.
const SPEND_WRITTEN: Duration = Duration::from_millis(2500);

/// Plugins' time limit under callgrind, where code runs about fifty times slower and a plugin's
/// first calls also wait for callgrind to translate the host code they reach (the audit hook
/// alone failed its start at the default 100 ms). A limit only bounds a call; it costs nothing.
const PLUGIN_TIMEOUT_MS: u64 = 10_000;

/// The floor's label, beside the plugin sets' own.
pub fn label(set: Option<PluginSet>) -> &'static str {
    set.map_or("floor", PluginSet::label)
}

/// A short name for the command line: `floor`, `portcullis`, `noop-pooled`, `noop-fresh`,
/// `plugins-1`, `plugins-3`, `plugins-5`, `plugins-5-fresh`, or a shipped plugin's name.
pub fn short_name(set: Option<PluginSet>) -> &'static str {
    match set {
        None => "floor",
        Some(PluginSet::None) => "portcullis",
        Some(PluginSet::NoopPooled) => "noop-pooled",
        Some(PluginSet::NoopFresh) => "noop-fresh",
        Some(PluginSet::One) => "plugins-1",
        Some(PluginSet::Three) => "plugins-3",
        Some(PluginSet::Five) => "plugins-5",
        Some(PluginSet::FiveFresh) => "plugins-5-fresh",
        Some(PluginSet::Alone(plugin)) => plugin.name(),
    }
}

/// Every server variant that gets a count, by label; a variant that failed says why.
pub async fn measure_all(
    options: &Options,
    pinning: &Pinning,
    mock: &Mock,
) -> BTreeMap<String, Result<f64, String>> {
    let requests = if options.quick { 300 } else { 2000 };
    let mut counts = BTreeMap::new();
    for set in MEASURED {
        let count = measure(options, pinning, mock, set, requests, false).await;
        eprintln!("callgrind {}: {count:?}", label(set));
        let count = count.map(|c| c.per_request).map_err(|e| format!("{e:#}"));
        counts.insert(label(set).to_owned(), count);
    }
    counts
}

/// One server's count, and the dump it came from (for `callgrind_annotate`).
#[derive(Debug)]
pub struct Count {
    pub per_request: f64,
    pub dump: PathBuf,
}

/// Instructions per request of the floor (`set` is `None`) or of Portcullis with `set`; with
/// `stream`, per streamed request (the mock's 16 deltas).
pub async fn measure(
    options: &Options,
    pinning: &Pinning,
    mock: &Mock,
    set: Option<PluginSet>,
    requests: u64,
    stream: bool,
) -> anyhow::Result<Count> {
    let dumps = options.work.join("callgrind");
    std::fs::create_dir_all(&dumps)?;
    let mut command = pinning.command(Path::new("valgrind"));
    command
        .arg("--tool=callgrind")
        .arg(format!(
            "--callgrind-out-file={}/callgrind.%p",
            dumps.display()
        ))
        // Counting starts zeroed on demand; nothing is collected per instruction or jump.
        .arg("--dump-instr=no")
        .arg("--collect-jumps=no");
    let server = match set {
        None => {
            command.arg(&options.bench);
            super::start_floor(command, mock)?
        }
        Some(set) => {
            let config = super::write_config(
                options,
                mock,
                set,
                &format!("callgrind-{}", set.label()),
                Some(PLUGIN_TIMEOUT_MS),
            )?;
            command.arg(&options.gateway);
            super::start_gateway(command, &config)?
        }
    };
    let target = client_target(server.address);
    let target = if stream {
        super::scenarios::streaming(&target)
    } else {
        target
    };
    let warmup = load::run(
        &target,
        Pace::Closed {
            concurrency: 1,
            requests: 200,
        },
    )
    .await;
    if warmup.failed > 0 {
        bail!(
            "warm-up failed: {}",
            warmup.first_failure.unwrap_or_default()
        );
    }
    spend_written(set).await;
    control(server.pid(), "--zero")?;
    let measured = load::run(
        &target,
        Pace::Closed {
            concurrency: 1,
            requests,
        },
    )
    .await;
    if measured.failed > 0 {
        bail!(
            "{} requests failed: {}",
            measured.failed,
            measured.first_failure.unwrap_or_default()
        );
    }
    spend_written(set).await;
    control(server.pid(), "--dump")?;
    let dump = newest_dump(&dumps, server.pid())?;
    let total = dump_total(&dump)?;
    Ok(Count {
        per_request: total as f64 / requests as f64,
        dump,
    })
}

/// Waits for Portcullis (not the floor, which writes nothing) to write the spend of the requests
/// so far.
async fn spend_written(set: Option<PluginSet>) {
    if set.is_some() {
        tokio::time::sleep(SPEND_WRITTEN).await;
    }
}

fn control(pid: u32, what: &str) -> anyhow::Result<()> {
    let status = Command::new("callgrind_control")
        .arg(what)
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("callgrind_control")?;
    if !status.success() {
        bail!("callgrind_control {what} {pid} failed");
    }
    Ok(())
}

/// The newest dump `pid` wrote into `dir`.
fn newest_dump(dir: &Path, pid: u32) -> anyhow::Result<PathBuf> {
    let prefix = format!("callgrind.{pid}.");
    let mut dumps: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let part: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((part, entry.path()))
        })
        .collect();
    dumps.sort();
    let (_, newest) = dumps.pop().context("callgrind wrote no dump")?;
    Ok(newest)
}

/// The `totals:` (or `summary:`) line of a dump.
fn dump_total(dump: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(dump)?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .with_context(|| format!("no totals in {}", dump.display()))
}
