//! Scenario 6: reloads under load. A steady request rate runs while the config file and a
//! plugin file are replaced ten times a second; then single changes are timed from the write to
//! the new generation serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::gateway::{self, PluginSet};
use super::process::{Pinning, Server};
use super::{client_target, scenarios, Options};
use crate::load::{self, Pace};
use crate::mock::Mock;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Reload {
    pub rate_rps: f64,
    pub seconds: f64,
    /// Files replaced during the run (config and plugin, alternately).
    pub swaps: u64,
    /// Generations that came to serve during the run.
    pub generations: u64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub first_failure: Option<String>,
    /// The same rate with no swaps, just before, for comparison.
    pub quiet_p99_us: f64,
    pub swapping_p99_us: f64,
    /// From the write to the new generation serving, config only and plugin file, in ms.
    pub config_to_serving_ms: Vec<f64>,
    pub plugin_to_serving_ms: Vec<f64>,
    pub error: Option<String>,
}

pub async fn measure(options: &Options, pinning: &Pinning, mock: &Mock) -> Reload {
    let mut reload = Reload {
        rate_rps: 200.0,
        seconds: if options.quick { 3.0 } else { 10.0 },
        ..Reload::default()
    };
    eprintln!(
        "reload: {} rps for {} s while files change 10 times a second",
        reload.rate_rps, reload.seconds
    );
    if let Err(e) = run(options, pinning, mock, &mut reload).await {
        reload.error = Some(format!("{e:#}"));
    }
    reload
}

/// The files the scenario rewrites: a config whose one guardrail is `guard.wasm`, which
/// alternates between two different guardrail components.
#[derive(Debug)]
struct Files {
    config: PathBuf,
    plugin: PathBuf,
    upstream: String,
    plugin_dir: PathBuf,
    audit: PathBuf,
    components: [Vec<u8>; 2],
    /// Which of `components` the plugin file holds now.
    installed: std::cell::Cell<usize>,
}

impl Files {
    fn write_config(&self, timeout_s: u32) -> std::io::Result<()> {
        let text = gateway::config_text(
            PluginSet::One,
            &self.upstream,
            &self.plugin_dir,
            &self.audit,
            timeout_s,
            None,
        )
        .replace("path: pii_mask.wasm", "path: guard.wasm")
        .replace(", config: { action: mask }", "");
        replace_atomically(&self.config, text.as_bytes())
    }

    /// Replaces the plugin file with the other component, so its content always changes.
    fn swap_plugin(&self) -> std::io::Result<()> {
        let next = 1 - self.installed.get();
        replace_atomically(&self.plugin, &self.components[next])?;
        self.installed.set(next);
        Ok(())
    }
}

/// Write beside, then rename over: how deploy tools replace files, and never half a file.
fn replace_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents)?;
    std::fs::rename(&temporary, path)
}

async fn run(
    options: &Options,
    pinning: &Pinning,
    mock: &Mock,
    reload: &mut Reload,
) -> anyhow::Result<()> {
    let dir = options.work.join("reload");
    let plugin_dir = dir.join("plugins");
    std::fs::create_dir_all(&plugin_dir)?;
    let files = Files {
        config: dir.join("portcullis.yaml"),
        plugin: plugin_dir.join("guard.wasm"),
        upstream: mock.base_url(),
        plugin_dir: plugin_dir.clone(),
        audit: dir.join("audit"),
        components: [
            std::fs::read(options.plugins.join("pii_mask.wasm"))?,
            std::fs::read(options.plugins.join("misbehave.wasm"))?,
        ],
        installed: std::cell::Cell::new(0),
    };
    replace_atomically(&files.plugin, &files.components[0])?;
    files.write_config(600)?;
    let server = super::start_portcullis(
        options,
        pinning,
        mock,
        PluginSet::One,
        "reload",
        Some(&files.config),
    )?;
    let target = client_target(server.address);
    let pace = Pace::Open {
        rate: reload.rate_rps,
        duration: Duration::from_secs_f64(reload.seconds),
        connections: 16,
    };
    let quiet = load::run(&target, pace).await;
    reload.quiet_p99_us = scenarios::micros(&quiet.latency, 99.0);

    let before = generation(&server).await?;
    let stop = Instant::now() + Duration::from_secs_f64(reload.seconds);
    let swapping = tokio::spawn(load::run_owned(target, pace));
    let mut swaps = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < stop {
        tick.tick().await;
        if swaps.is_multiple_of(2) {
            files.write_config(600 + (swaps / 2 % 2) as u32)?;
        } else {
            files.swap_plugin()?;
        }
        swaps += 1;
    }
    let outcome = swapping.await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    reload.swaps = swaps;
    reload.generations = generation(&server).await?.saturating_sub(before);
    reload.requests_ok = outcome.ok;
    reload.requests_failed = outcome.failed;
    reload.first_failure = outcome.first_failure;
    reload.swapping_p99_us = scenarios::micros(&outcome.latency, 99.0);

    for round in 0..10u32 {
        let before = generation(&server).await?;
        let written = Instant::now();
        if round.is_multiple_of(2) {
            files.write_config(700 + round)?;
        } else {
            files.swap_plugin()?;
        }
        let elapsed = serving_after(&server, before, written).await?;
        if round.is_multiple_of(2) {
            reload.config_to_serving_ms.push(elapsed);
        } else {
            reload.plugin_to_serving_ms.push(elapsed);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// Milliseconds from `written` until the generation number passes `before`.
async fn serving_after(server: &Server, before: u64, written: Instant) -> anyhow::Result<f64> {
    let deadline = written + Duration::from_secs(10);
    while Instant::now() < deadline {
        if generation(server).await? > before {
            return Ok(written.elapsed().as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    anyhow::bail!("no new generation 10 s after a write")
}

async fn generation(server: &Server) -> anyhow::Result<u64> {
    let status = load::get(server.address, "/admin/status", gateway::MASTER_KEY)
        .await
        .map_err(anyhow::Error::msg)?;
    let value: serde_json::Value = serde_json::from_str(&status)?;
    value["generation"]["number"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no generation number in /admin/status"))
}
