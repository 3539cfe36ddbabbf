//! The scenarios one variant runs per repeat, and the memory soak. Each returns named numbers;
//! the report turns them into medians, spreads and ratios.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::process::Server;
use super::{Options, Pinning, PluginSet};
use crate::load::{self, Outcome, Pace, Target};
use crate::mock::{Behavior, Mock};

/// Named numbers from one repeat of one variant: microseconds (`_us`), requests a second
/// (`_rps`), bytes (`_bytes`) and counts.
pub type Metrics = BTreeMap<String, f64>;

/// Metric names, shared by the scenarios and the report.
pub mod metric {
    pub const LATENCY_P50: &str = "latency_p50_us";
    pub const LATENCY_P99: &str = "latency_p99_us";
    pub const THROUGHPUT: &str = "throughput_c32_rps";
    pub const THROUGHPUT_FAILED: &str = "throughput_c32_failed";
    pub const SLOW_THROUGHPUT: &str = "throughput_c32_20ms_rps";
    pub const SLOW_FAILED: &str = "throughput_c32_20ms_failed";
    pub const TTFB_P50: &str = "ttfb_p50_us";
    pub const TTFB_P99: &str = "ttfb_p99_us";
    pub const GAP_P50: &str = "delta_gap_p50_us";
    pub const GAP_P99: &str = "delta_gap_p99_us";
    pub const STREAMS_HELD: &str = "streams_1000_completed";
    pub const STREAMS_FAILED: &str = "streams_1000_failed";
    pub const STREAMS_MAX_GAP: &str = "streams_1000_max_gap_us";
    pub const RSS_IDLE: &str = "rss_idle_bytes";
    pub const RSS_LOAD: &str = "rss_load_bytes";
    pub const RSS_AFTER: &str = "rss_after_bytes";
    pub const RSS_STREAMS: &str = "rss_1000_streams_bytes";
    pub const PSS_STREAMS: &str = "pss_1000_streams_bytes";
}

/// How long each scenario runs.
#[derive(Debug, Clone)]
pub struct Plan {
    warmup: u64,
    latency: Duration,
    throughput: Duration,
    first_byte: Duration,
    paced_streams: u64,
    held_streams: u64,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                warmup: 200,
                latency: Duration::from_secs(1),
                throughput: Duration::from_secs(2),
                first_byte: Duration::from_secs(1),
                paced_streams: 16,
                held_streams: 1000,
            }
        } else {
            Plan {
                warmup: 500,
                latency: Duration::from_secs(3),
                throughput: Duration::from_secs(5),
                first_byte: Duration::from_secs(2),
                paced_streams: 32,
                held_streams: 1000,
            }
        }
    }
}

/// No delay, 16 deltas at once: what the latency and throughput scenarios use.
const INSTANT: Behavior = Behavior {
    delay: Duration::ZERO,
    deltas: 16,
    delta_gap: Duration::ZERO,
    fail_rate: 0.0,
};

/// 64 deltas paced 20 ms apart, as a model streaming tokens.
const PACED: Behavior = Behavior {
    delay: Duration::ZERO,
    deltas: 64,
    delta_gap: Duration::from_millis(20),
    fail_rate: 0.0,
};

/// Scenarios 1 to 3 and the memory readings of scenario 5, for one started variant. Also returns
/// the concurrency-1 latency histogram, for the plot.
pub async fn measure(
    plan: &Plan,
    mock: &Mock,
    target: &Target,
    server: Option<&Server>,
) -> (Metrics, Histogram<u64>) {
    let mut metrics = Metrics::new();
    let rss = |server: Option<&Server>| server.and_then(Server::rss).map(|b| b as f64);
    if let Some(bytes) = rss(server) {
        metrics.insert(metric::RSS_IDLE.into(), bytes);
    }
    mock.set(INSTANT);
    let _ = load::run(
        target,
        Pace::Closed {
            concurrency: 1,
            requests: plan.warmup,
        },
    )
    .await;

    // 1. Added latency at concurrency 1.
    let latency = load::run(
        target,
        Pace::ClosedFor {
            concurrency: 1,
            duration: plan.latency,
        },
    )
    .await;
    metrics.insert(metric::LATENCY_P50.into(), micros(&latency.latency, 50.0));
    metrics.insert(metric::LATENCY_P99.into(), micros(&latency.latency, 99.0));

    // 2. Throughput at concurrency 32, against an instant mock and a 20 ms one.
    let pid = server.map(Server::pid);
    let sampled = sample_memory_after(pid, plan.throughput / 2);
    let fast = load::run(
        target,
        Pace::ClosedFor {
            concurrency: 32,
            duration: plan.throughput,
        },
    )
    .await;
    if let Some(memory) = sampled.await.ok().flatten() {
        metrics.insert(metric::RSS_LOAD.into(), memory.rss as f64);
    }
    metrics.insert(metric::THROUGHPUT.into(), fast.rate());
    metrics.insert(metric::THROUGHPUT_FAILED.into(), fast.failed as f64);
    mock.set(Behavior {
        delay: Duration::from_millis(20),
        ..INSTANT
    });
    let slow = load::run(
        target,
        Pace::ClosedFor {
            concurrency: 32,
            duration: plan.throughput,
        },
    )
    .await;
    metrics.insert(metric::SLOW_THROUGHPUT.into(), slow.rate());
    metrics.insert(metric::SLOW_FAILED.into(), slow.failed as f64);

    // 3. Streams: time to first byte; gaps between paced deltas; 1,000 held at once.
    let streaming = streaming(target);
    mock.set(INSTANT);
    let first = load::run(
        &streaming,
        Pace::ClosedFor {
            concurrency: 1,
            duration: plan.first_byte,
        },
    )
    .await;
    metrics.insert(metric::TTFB_P50.into(), micros(&first.first_byte, 50.0));
    metrics.insert(metric::TTFB_P99.into(), micros(&first.first_byte, 99.0));
    mock.set(PACED);
    let paced = load::run(
        &streaming,
        Pace::Closed {
            concurrency: 16,
            requests: plan.paced_streams,
        },
    )
    .await;
    metrics.insert(metric::GAP_P50.into(), micros(&paced.gaps, 50.0));
    metrics.insert(metric::GAP_P99.into(), micros(&paced.gaps, 99.0));
    let sampled = sample_memory_after(pid, PACED.delta_gap * PACED.deltas * 3 / 4);
    let held = load::run(
        &streaming,
        Pace::Closed {
            concurrency: plan.held_streams as usize,
            requests: plan.held_streams,
        },
    )
    .await;
    if let Some(memory) = sampled.await.ok().flatten() {
        metrics.insert(metric::RSS_STREAMS.into(), memory.rss as f64);
        if let Some(pss) = memory.pss {
            metrics.insert(metric::PSS_STREAMS.into(), pss as f64);
        }
    }
    metrics.insert(metric::STREAMS_HELD.into(), held.ok as f64);
    metrics.insert(metric::STREAMS_FAILED.into(), held.failed as f64);
    metrics.insert(metric::STREAMS_MAX_GAP.into(), micros(&held.gaps, 100.0));
    report_failures("1,000 streams", &held);

    mock.set(INSTANT);
    tokio::time::sleep(Duration::from_secs(1)).await;
    if let Some(bytes) = rss(server) {
        metrics.insert(metric::RSS_AFTER.into(), bytes);
    }
    (metrics, latency.latency)
}

fn report_failures(what: &str, outcome: &Outcome) {
    if let Some(why) = &outcome.first_failure {
        eprintln!("  {what}: {} failed, first: {why}", outcome.failed);
    }
}

/// The same request with `"stream": true`.
pub fn streaming(target: &Target) -> Target {
    let mut body: serde_json::Value = serde_json::from_slice(&target.body).unwrap_or_default();
    body["stream"] = serde_json::Value::Bool(true);
    Target {
        body: bytes::Bytes::from(body.to_string()),
        stream: true,
        ..target.clone()
    }
}

/// A process's memory at one moment, in bytes.
struct Memory {
    rss: u64,
    pss: Option<u64>,
}

/// Reads the memory of `pid` once, `after` from now, without holding up the caller.
fn sample_memory_after(
    pid: Option<u32>,
    after: Duration,
) -> tokio::task::JoinHandle<Option<Memory>> {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let pid = pid?;
        Some(Memory {
            rss: super::process::rss_of(pid)?,
            pss: super::process::pss_of(pid),
        })
    })
}

/// A percentile in microseconds.
pub fn micros(histogram: &Histogram<u64>, percentile: f64) -> f64 {
    if histogram.is_empty() {
        return f64::NAN;
    }
    histogram.value_at_percentile(percentile) as f64 / 1000.0
}

/// One line for the progress log.
pub fn summary(metrics: &Metrics) -> String {
    let get = |name: &str| metrics.get(name).copied().unwrap_or(f64::NAN);
    format!(
        "p50 {:.1} us, p99 {:.1} us, {:.0} rps, ttfb p50 {:.1} us, gap p99 {:.0} us, 1000 streams: {} ok {} failed, rss idle {:.1} MB",
        get(metric::LATENCY_P50),
        get(metric::LATENCY_P99),
        get(metric::THROUGHPUT),
        get(metric::TTFB_P50),
        get(metric::GAP_P99),
        get(metric::STREAMS_HELD),
        get(metric::STREAMS_FAILED),
        get(metric::RSS_IDLE) / 1e6,
    )
}

/// Resident memory over a long steady run (scenario 5): does it grow?
#[derive(Debug, Clone, serde::Serialize)]
pub struct Soak {
    pub label: String,
    pub seconds: f64,
    pub rate_rps: f64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    /// `(seconds since start, bytes)`.
    pub rss: Vec<(f64, u64)>,
    pub error: Option<String>,
}

impl Soak {
    /// Growth from the first reading after the warm-up third to the last one.
    pub fn growth_bytes(&self) -> Option<i64> {
        let warm = self.seconds / 3.0;
        let first = self.rss.iter().find(|(at, _)| *at >= warm)?;
        let last = self.rss.last()?;
        Some(last.1 as i64 - first.1 as i64)
    }
}

/// Portcullis with five plugins at a steady rate for `options.soak`, its RSS read every few
/// seconds.
pub async fn soak(options: &Options, pinning: &Pinning, mock: &Mock) -> Soak {
    let set = PluginSet::Five;
    let rate = 500.0;
    let mut soak = Soak {
        label: set.label().into(),
        seconds: options.soak.as_secs_f64(),
        rate_rps: rate,
        requests_ok: 0,
        requests_failed: 0,
        rss: Vec::new(),
        error: None,
    };
    eprintln!("soak: {} at {rate} rps for {:?}", set.label(), options.soak);
    let server = match super::start_portcullis(options, pinning, mock, set, "soak", None) {
        Ok(server) => server,
        Err(e) => {
            soak.error = Some(format!("{e:#}"));
            return soak;
        }
    };
    mock.set(INSTANT);
    let target = super::client_target(server.address);
    let pid = server.pid();
    let every = (options.soak / 30).max(Duration::from_secs(1));
    let duration = options.soak;
    let sampler = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut readings = Vec::new();
        while start.elapsed() < duration {
            if let Some(bytes) = super::process::rss_of(pid) {
                readings.push((start.elapsed().as_secs_f64(), bytes));
            }
            tokio::time::sleep(every).await;
        }
        readings
    });
    let outcome = load::run(
        &target,
        Pace::Open {
            rate,
            duration,
            connections: 16,
        },
    )
    .await;
    soak.rss = sampler.await.unwrap_or_default();
    if let Some(bytes) = server.rss() {
        soak.rss.push((options.soak.as_secs_f64(), bytes));
    }
    soak.requests_ok = outcome.ok;
    soak.requests_failed = outcome.failed;
    soak.error = outcome.first_failure;
    soak
}
