//! The runner: every scenario, for every variant (direct, the floor, Portcullis with each plugin
//! set, the peers), interleaved and repeated, then the report.
//!
//! It runs the mock and the load generator in its own process, pinned away from the core the
//! server under test gets, so the two never compete for a core.

mod callgrind;
mod gateway;
mod plot;
mod process;
mod reload;
mod report;
mod scenarios;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use http::{header, HeaderName, HeaderValue};

use crate::load::{self, Target};
use crate::mock::{self, Mock};
pub use gateway::{PluginSet, Shipped};
use process::{Pinning, Server};
pub use scenarios::micros;
use scenarios::Metrics;

/// What `portcullis-bench run` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The release `portcullis` binary.
    pub gateway: PathBuf,
    /// This very binary, for the floor.
    pub bench: PathBuf,
    /// Where the shipped plugins and the no-op test plugin were built.
    pub plugins: PathBuf,
    /// Where the report goes.
    pub out: PathBuf,
    /// Scratch space: configs, logs, callgrind dumps.
    pub work: PathBuf,
    pub repeats: usize,
    /// Shorter runs, for trying the suite out; the numbers are noisier.
    pub quick: bool,
    /// Count instructions per request under callgrind.
    pub callgrind: bool,
    /// How long the memory soak runs.
    pub soak: Duration,
    /// Peer scripts (`bench/peers/<name>.sh`) and where to install them, if peers are wanted.
    pub peers: Option<Peers>,
}

#[derive(Debug, Clone)]
pub struct Peers {
    pub scripts: PathBuf,
    pub install: PathBuf,
    pub names: Vec<String>,
}

/// What a run is made of: one server (or none, for direct) and how to address it.
#[derive(Debug, Clone)]
enum Kind {
    Direct,
    Floor,
    Portcullis(PluginSet),
    Peer(String),
}

#[derive(Debug, Clone)]
struct Variant {
    label: String,
    kind: Kind,
}

/// A variant that could not run, and why: it gets a row that says so.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub label: String,
    pub why: String,
}

pub fn run(mut options: Options) -> anyhow::Result<()> {
    // Configs are written elsewhere and resolve paths against themselves.
    for path in [
        &mut options.gateway,
        &mut options.plugins,
        &mut options.bench,
        &mut options.work,
    ] {
        *path = std::path::absolute(&*path)?;
    }
    if let Some(peers) = &mut options.peers {
        peers.install = std::path::absolute(&peers.install)?;
        peers.scripts = std::path::absolute(&peers.scripts)?;
    }
    let pinning = Pinning::detect();
    pinning.pin_self()?;
    std::fs::create_dir_all(&options.work)?;
    std::fs::create_dir_all(&options.out)?;
    check_inputs(&options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_all(options, pinning))
}

/// `portcullis-bench instructions`: the callgrind counts alone, for the servers named (short
/// names, as [`callgrind::short_name`] gives them; all when none are), keeping each dump for
/// `callgrind_annotate`.
pub fn instructions(
    mut options: Options,
    names: &[String],
    requests: u64,
    stream: bool,
) -> anyhow::Result<()> {
    let sets: Vec<_> = callgrind::MEASURED
        .into_iter()
        .filter(|set| names.is_empty() || names.iter().any(|n| n == callgrind::short_name(*set)))
        .collect();
    if sets.is_empty() {
        let known: Vec<_> = callgrind::MEASURED
            .into_iter()
            .map(callgrind::short_name)
            .collect();
        bail!("no such server; choose from {}", known.join(", "));
    }
    for path in [
        &mut options.gateway,
        &mut options.plugins,
        &mut options.bench,
        &mut options.work,
    ] {
        *path = std::path::absolute(&*path)?;
    }
    let pinning = Pinning::detect();
    pinning.pin_self()?;
    std::fs::create_dir_all(&options.work)?;
    check_inputs(&options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mock = mock::start(
            "127.0.0.1:0".parse().context("address")?,
            mock::Behavior::default(),
        )
        .await?;
        for set in sets {
            let count =
                callgrind::measure(&options, &pinning, &mock, set, requests, stream).await?;
            println!(
                "{:<16} {:>9.0} instructions/request  {}",
                callgrind::short_name(set),
                count.per_request,
                count.dump.display()
            );
        }
        Ok(())
    })
}

fn check_inputs(options: &Options) -> anyhow::Result<()> {
    if !options.gateway.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p portcullis`",
            options.gateway.display()
        );
    }
    for set in [PluginSet::Five, PluginSet::NoopPooled] {
        for file in set.files() {
            let path = options.plugins.join(file);
            if !path.is_file() {
                bail!(
                    "{} is missing: build the plugins with `plugins/build && cargo build --release --target wasm32-wasip2 -p misbehave`",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

async fn run_all(options: Options, pinning: Pinning) -> anyhow::Result<()> {
    let started = std::time::SystemTime::now();
    let mock = mock::start(
        "127.0.0.1:0".parse().context("address")?,
        mock::Behavior::default(),
    )
    .await?;
    eprintln!("mock upstream on {}; {}", mock.address, pinning.describe());

    let mut variants = vec![
        Variant {
            label: "direct".into(),
            kind: Kind::Direct,
        },
        Variant {
            label: "floor".into(),
            kind: Kind::Floor,
        },
    ];
    for set in [
        PluginSet::None,
        PluginSet::One,
        PluginSet::Three,
        PluginSet::Five,
        PluginSet::FiveFresh,
    ] {
        variants.push(Variant {
            label: set.label().into(),
            kind: Kind::Portcullis(set),
        });
    }
    let mut skipped = Vec::new();
    if let Some(peers) = &options.peers {
        for name in &peers.names {
            match install_peer(peers, name) {
                Ok(()) => variants.push(Variant {
                    label: name.clone(),
                    kind: Kind::Peer(name.clone()),
                }),
                Err(why) => skipped.push(Skipped {
                    label: name.clone(),
                    why: format!("{why:#}"),
                }),
            }
        }
    }

    let plan = scenarios::Plan::new(options.quick);
    let mut samples: BTreeMap<String, Vec<Metrics>> = BTreeMap::new();
    let mut latencies: BTreeMap<String, hdrhistogram::Histogram<u64>> = BTreeMap::new();
    let mut plugin_stats: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for repeat in 1..=options.repeats {
        for variant in &variants {
            if skipped.iter().any(|s| s.label == variant.label) {
                continue;
            }
            eprintln!("[{repeat}/{}] {}", options.repeats, variant.label);
            let started = match start(&options, &pinning, &mock, variant, &variant.label) {
                Ok(started) => started,
                Err(why) => {
                    eprintln!("  cannot run: {why:#}");
                    skipped.push(Skipped {
                        label: variant.label.clone(),
                        why: format!("{why:#}"),
                    });
                    continue;
                }
            };
            let (metrics, latency) =
                scenarios::measure(&plan, &mock, &started.target, started.server.as_ref()).await;
            eprintln!("  {}", scenarios::summary(&metrics));
            if matches!(variant.kind, Kind::Portcullis(_)) && repeat == options.repeats {
                if let Some(server) = &started.server {
                    if let Ok(status) =
                        load::get(server.address, "/admin/status", gateway::MASTER_KEY).await
                    {
                        if let Ok(value) = serde_json::from_str(&status) {
                            plugin_stats.insert(variant.label.clone(), value);
                        }
                    }
                }
            }
            samples
                .entry(variant.label.clone())
                .or_default()
                .push(metrics);
            let merged = latencies
                .entry(variant.label.clone())
                .or_insert_with(load::histogram);
            let _ = merged.add(&latency);
            drop(started);
        }
    }

    let instructions = if options.callgrind {
        callgrind::measure_all(&options, &pinning, &mock).await
    } else {
        BTreeMap::new()
    };
    let reload = reload::measure(&options, &pinning, &mock).await;
    let soak = scenarios::soak(&options, &pinning, &mock).await;

    let report = report::Report {
        started,
        options: &options,
        pinning: pinning.describe(),
        cores: pinning.cores,
        order: variants.iter().map(|v| v.label.clone()).collect(),
        samples,
        skipped,
        instructions,
        plugin_stats,
        reload,
        soak,
        peer_versions: options
            .peers
            .as_ref()
            .map(peer_versions)
            .unwrap_or_default(),
    };
    let written = report.write(&options.out)?;
    plot::write(&options.out.join("latency.svg"), &report.order, &latencies)?;
    eprintln!("{}", std::fs::read_to_string(&written.markdown)?);
    eprintln!(
        "wrote {}, {} and {}",
        written.markdown.display(),
        written.json.display(),
        options.out.join("latency.svg").display()
    );
    Ok(())
}

/// A started variant: its server, if it has one, and how the load generator reaches it.
#[derive(Debug)]
struct Started {
    server: Option<Server>,
    target: Target,
}

fn start(
    options: &Options,
    pinning: &Pinning,
    mock: &Mock,
    variant: &Variant,
    label: &str,
) -> anyhow::Result<Started> {
    let server = match &variant.kind {
        Kind::Direct => None,
        Kind::Floor => Some(start_floor(pinning.command(&options.bench), mock)?),
        Kind::Portcullis(set) => Some(start_portcullis(options, pinning, mock, *set, label, None)?),
        Kind::Peer(name) => {
            let peers = options.peers.as_ref().context("no peers configured")?;
            let (server, peer) = start_peer(peers, pinning, mock, name, &options.work)?;
            let mut target = client_target(server.address);
            target.path = peer.path;
            target.headers.extend(peer.headers);
            target.body = load::chat_body(&peer.model, PROMPT_BYTES, false);
            return Ok(Started {
                server: Some(server),
                target,
            });
        }
    };
    let address = server.as_ref().map_or(mock.address, |s| s.address);
    Ok(Started {
        server,
        target: client_target(address),
    })
}

/// About 1 KB of prompt, as the latency scenario asks.
const PROMPT_BYTES: usize = 1024;

/// A whole chat completion for the bench model with the client key, to `address`.
fn client_target(address: std::net::SocketAddr) -> Target {
    Target {
        address,
        path: "/v1/chat/completions".into(),
        headers: vec![(
            header::AUTHORIZATION,
            HeaderValue::from_static(gateway::CLIENT_BEARER),
        )],
        body: load::chat_body(gateway::MODEL, PROMPT_BYTES, false),
        stream: false,
    }
}

/// Starts the gateway on a fresh config for `set`; `config` overrides the file it serves.
fn start_portcullis(
    options: &Options,
    pinning: &Pinning,
    mock: &Mock,
    set: PluginSet,
    label: &str,
    config: Option<&Path>,
) -> anyhow::Result<Server> {
    let path = match config {
        Some(path) => path.to_owned(),
        None => write_config(options, mock, set, label, None)?,
    };
    start_gateway(pinning.command(&options.gateway), &path)
}

/// The config for `set` against `mock`, in the work directory under a name made from `label`.
fn write_config(
    options: &Options,
    mock: &Mock,
    set: PluginSet,
    label: &str,
    plugin_timeout_ms: Option<u64>,
) -> std::io::Result<std::path::PathBuf> {
    let name = label.replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    gateway::write_config(
        &options.work,
        &name,
        set,
        &mock.base_url(),
        &options.plugins,
        plugin_timeout_ms,
    )
}

/// Starts the gateway binary that `command` runs (pinned, or under callgrind) on `config`.
fn start_gateway(mut command: Command, config: &Path) -> anyhow::Result<Server> {
    command
        .arg("--config")
        .arg(config)
        .env("PORTCULLIS_LOG", "warn");
    Server::start_announced(command, "portcullis listening on ")
}

/// Starts the floor, in front of `mock`; `command` runs this binary (pinned, or under callgrind).
fn start_floor(mut command: Command, mock: &Mock) -> anyhow::Result<Server> {
    command
        .arg("floor")
        .arg("--upstream")
        .arg(format!("http://{}", mock.address));
    Server::start_announced(command, "floor listening on ")
}

/// How to address a peer, from its script's `headers` answer.
#[derive(Debug)]
struct PeerAddressing {
    path: String,
    model: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

fn install_peer(peers: &Peers, name: &str) -> anyhow::Result<()> {
    let script = peers.scripts.join(format!("{name}.sh"));
    eprintln!("installing peer {name} into {}", peers.install.display());
    let output = std::process::Command::new("bash")
        .arg(&script)
        .arg("install")
        .arg(peers.install.join(name))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr.lines().last().unwrap_or("install failed").trim();
        bail!("{reason}");
    }
    Ok(())
}

fn start_peer(
    peers: &Peers,
    pinning: &Pinning,
    mock: &Mock,
    name: &str,
    work: &Path,
) -> anyhow::Result<(Server, PeerAddressing)> {
    let script = peers.scripts.join(format!("{name}.sh"));
    let output = std::process::Command::new("bash")
        .arg(&script)
        .arg("headers")
        .arg(mock.base_url())
        .output()?;
    if !output.status.success() {
        bail!("{} headers failed", script.display());
    }
    let mut addressing = PeerAddressing {
        path: "/v1/chat/completions".into(),
        model: gateway::MODEL.into(),
        headers: Vec::new(),
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Some(model) = line.strip_prefix("#model:") {
            addressing.model = model.trim().to_owned();
        } else if let Some(path) = line.strip_prefix("#path:") {
            addressing.path = path.trim().to_owned();
        } else if !line.trim().is_empty() {
            addressing
                .headers
                .push(load::header(line).map_err(anyhow::Error::msg)?);
        }
    }
    let address = process::free_address()?;
    let mut command = pinning.command(Path::new("bash"));
    command
        .arg(&script)
        .arg("run")
        .arg(peers.install.join(name))
        .arg(address.port().to_string())
        .arg(mock.base_url())
        // TCP_NODELAY on every socket, for peers that would leave Nagle on (TensorZero does).
        .env("BENCH_TCP_NODELAY", "1");
    let server = Server::start_at(
        command,
        address,
        &work.join(format!("peer-{name}.log")),
        Duration::from_secs(180),
    )?;
    Ok((server, addressing))
}

fn peer_versions(peers: &Peers) -> BTreeMap<String, String> {
    peers
        .names
        .iter()
        .filter_map(|name| {
            let output = std::process::Command::new("bash")
                .arg(peers.scripts.join(format!("{name}.sh")))
                .arg("version")
                .arg(peers.install.join(name))
                .output()
                .ok()?;
            let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            (!version.is_empty()).then(|| (name.clone(), version))
        })
        .collect()
}
