//! Instructions per request: the server runs under callgrind, which counts every user-space
//! instruction it executes. Unlike time, the count barely moves when the machine is busy.
//!
//! After a warm-up the counters are zeroed, a fixed number of requests is sent one at a time, and
//! the dump's total is divided by that number.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use super::process::Pinning;
use super::{client_target, Options, PluginSet};
use crate::load::{self, Pace};
use crate::mock::Mock;

/// Every server variant that gets a count, by label; a variant that failed says why.
pub async fn measure_all(
    options: &Options,
    pinning: &Pinning,
    mock: &Mock,
) -> BTreeMap<String, Result<f64, String>> {
    let requests = if options.quick { 300 } else { 2000 };
    let mut counts = BTreeMap::new();
    let floor = measure(options, pinning, mock, None, requests).await;
    eprintln!("callgrind floor: {floor:?}");
    counts.insert("floor".to_owned(), floor.map_err(|e| format!("{e:#}")));
    for set in [
        PluginSet::None,
        PluginSet::NoopPooled,
        PluginSet::NoopFresh,
        PluginSet::One,
        PluginSet::Three,
        PluginSet::Five,
        PluginSet::FiveFresh,
    ] {
        let count = measure(options, pinning, mock, Some(set), requests).await;
        eprintln!("callgrind {}: {count:?}", set.label());
        counts.insert(set.label().to_owned(), count.map_err(|e| format!("{e:#}")));
    }
    counts
}

/// Instructions per request of the floor (`set` is `None`) or of Portcullis with `set`.
async fn measure(
    options: &Options,
    pinning: &Pinning,
    mock: &Mock,
    set: Option<PluginSet>,
    requests: u64,
) -> anyhow::Result<f64> {
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
            let config =
                super::write_config(options, mock, set, &format!("callgrind-{}", set.label()))?;
            command.arg(&options.gateway);
            super::start_gateway(command, &config)?
        }
    };
    let target = client_target(server.address);
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
    control(server.pid(), "--dump")?;
    let total = newest_total(&dumps, server.pid())?;
    Ok(total as f64 / requests as f64)
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

/// The `totals:` (or `summary:`) line of the newest dump of `pid`.
fn newest_total(dir: &Path, pid: u32) -> anyhow::Result<u64> {
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
    let (_, newest) = dumps.last().context("callgrind wrote no dump")?;
    let text = std::fs::read_to_string(newest)?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .with_context(|| format!("no totals in {}", newest.display()))
}
