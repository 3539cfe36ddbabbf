//! `portcullis-bench`: what Portcullis adds, measured against going direct, against the thinnest
//! possible proxy (the floor) and against its peers, in one run on one machine.
//!
//! `run` does everything and writes the report; `mock`, `floor` and `load` are its parts, for
//! measuring by hand.

mod floor;
mod load;
mod mock;
mod runner;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

// The gateway's allocator: the floor must pay what any proxy built like Portcullis pays, no more.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "portcullis-bench", about = "Benchmarks for Portcullis")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every scenario and variant, then the report (Markdown, JSON and a plot).
    Run {
        /// The gateway binary under test.
        #[arg(long, default_value = "target/release/portcullis")]
        gateway: PathBuf,
        /// Where `plugins/build` and the no-op test plugin put their `.wasm` files.
        #[arg(long, default_value = "target/wasm32-wasip2/release")]
        plugins: PathBuf,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        #[arg(long, default_value = "target/bench-work")]
        work: PathBuf,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Short runs, to try the suite out; noisier numbers.
        #[arg(long)]
        quick: bool,
        /// Skip counting instructions under callgrind.
        #[arg(long)]
        no_callgrind: bool,
        /// The memory soak's length, e.g. `300s` or `5m`.
        #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
        soak: Duration,
        /// Peers to install and measure (scripts in `bench/peers/`), comma-separated:
        /// litellm,tensorzero,portkey.
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
        /// Where peers are installed: a throw-away directory.
        #[arg(long, default_value = "target/bench-peers")]
        peer_dir: PathBuf,
    },
    /// Instructions per request under callgrind alone, for some servers; prints each dump's path
    /// for `callgrind_annotate`.
    Instructions {
        /// Servers to count: floor, portcullis, noop-pooled, noop-fresh, plugins-1, plugins-3,
        /// plugins-5, plugins-5-fresh, or one of the five plugins alone: pii-mask, team-defaults,
        /// least-latency, pii-mask-stream, audit (all when none are named).
        servers: Vec<String>,
        #[arg(long, default_value_t = 2000)]
        requests: u64,
        /// Count streamed requests (16 deltas each) instead of whole answers.
        #[arg(long)]
        stream: bool,
        #[arg(long, default_value = "target/release/portcullis")]
        gateway: PathBuf,
        #[arg(long, default_value = "target/wasm32-wasip2/release")]
        plugins: PathBuf,
        #[arg(long, default_value = "target/bench-work")]
        work: PathBuf,
    },
    /// Serve the mock upstream until interrupted.
    Mock {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: SocketAddr,
        /// Before each response head.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        delay: Duration,
        /// Content deltas per streamed answer.
        #[arg(long, default_value_t = 16)]
        deltas: u32,
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        delta_gap: Duration,
        /// Share of requests answered with a 500.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
    },
    /// Serve the floor proxy until interrupted.
    Floor {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// `http://host:port` of the upstream.
        #[arg(long)]
        upstream: http::Uri,
    },
    /// Send load to one address and print the percentiles.
    Load {
        /// `host:port`.
        address: SocketAddr,
        #[arg(long, default_value = "/v1/chat/completions")]
        path: String,
        #[arg(long, default_value = "bench-model")]
        model: String,
        /// `Name: value`; repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        #[arg(long)]
        stream: bool,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Open loop at this many requests a second instead of a closed loop.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            gateway,
            plugins,
            out,
            work,
            repeats,
            quick,
            no_callgrind,
            soak,
            peers,
            peer_dir,
        } => {
            let bench = std::env::current_exe().context("cannot find this binary")?;
            runner::run(runner::Options {
                gateway,
                bench,
                plugins,
                out,
                work,
                repeats: repeats.max(1),
                quick,
                callgrind: !no_callgrind,
                soak,
                peers: (!peers.is_empty()).then(|| runner::Peers {
                    scripts: PathBuf::from("bench/peers"),
                    install: peer_dir,
                    names: peers,
                }),
            })
        }
        Command::Instructions {
            servers,
            requests,
            stream,
            gateway,
            plugins,
            work,
        } => {
            let bench = std::env::current_exe().context("cannot find this binary")?;
            let options = runner::Options {
                gateway,
                bench,
                plugins,
                out: PathBuf::from("bench/results"),
                work,
                repeats: 1,
                quick: false,
                callgrind: true,
                soak: Duration::ZERO,
                peers: None,
            };
            runner::instructions(options, &servers, requests.max(1), stream)
        }
        Command::Mock {
            listen,
            delay,
            deltas,
            delta_gap,
            fail_rate,
        } => current_thread()?.block_on(async {
            let mock = mock::start(
                listen,
                mock::Behavior {
                    delay,
                    deltas,
                    delta_gap,
                    fail_rate,
                },
            )
            .await?;
            eprintln!("mock listening on http://{}", mock.address);
            std::future::pending::<()>().await;
            Ok(())
        }),
        Command::Floor { listen, upstream } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(floor::serve(listen, upstream)),
        Command::Load {
            address,
            path,
            model,
            headers,
            stream,
            concurrency,
            rate,
            duration,
        } => {
            let headers = headers
                .iter()
                .map(|line| load::header(line))
                .collect::<Result<Vec<_>, String>>()
                .map_err(anyhow::Error::msg)?;
            let target = load::Target {
                address,
                path,
                headers,
                body: load::chat_body(&model, 1024, stream),
                stream,
            };
            let pace = match rate {
                Some(rate) => load::Pace::Open {
                    rate,
                    duration,
                    connections: concurrency.max(16),
                },
                None => load::Pace::ClosedFor {
                    concurrency,
                    duration,
                },
            };
            let outcome = current_thread()?.block_on(load::run(&target, pace));
            print_outcome(&outcome);
            Ok(())
        }
    }
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn print_outcome(outcome: &load::Outcome) {
    let us = |h: &hdrhistogram::Histogram<u64>, p: f64| runner::micros(h, p);
    println!(
        "{} ok, {} failed in {:.2} s: {:.0} rps",
        outcome.ok,
        outcome.failed,
        outcome.elapsed.as_secs_f64(),
        outcome.rate()
    );
    println!(
        "latency us: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        us(&outcome.latency, 50.0),
        us(&outcome.latency, 90.0),
        us(&outcome.latency, 99.0),
        us(&outcome.latency, 99.9),
        us(&outcome.latency, 100.0)
    );
    if !outcome.first_byte.is_empty() {
        println!(
            "first byte us: p50 {:.1}  p99 {:.1}; gaps us: p50 {:.1}  p99 {:.1}",
            us(&outcome.first_byte, 50.0),
            us(&outcome.first_byte, 99.0),
            us(&outcome.gaps, 50.0),
            us(&outcome.gaps, 99.0)
        );
    }
    if let Some(why) = &outcome.first_failure {
        println!("first failure: {why}");
    }
}
