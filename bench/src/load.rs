//! The load generator: closed loop at a fixed concurrency, or open loop at a fixed rate, over
//! keep-alive HTTP/1.1 connections with TCP_NODELAY, into HDR histograms (nanoseconds).
//!
//! Open-loop latency is measured from when a request was due, not when it went out, so a stall
//! shows in the percentiles instead of hiding in fewer samples (coordinated omission).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{header, HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Where requests go and what they carry.
#[derive(Debug, Clone)]
pub struct Target {
    pub address: SocketAddr,
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// Read the answer as a stream: time to first byte and gaps between chunks are recorded.
    pub stream: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// `concurrency` connections, each sending its next request when the last one finished,
    /// `requests` in all (spread over the connections).
    Closed { concurrency: usize, requests: u64 },
    /// The same, for a fixed time instead of a fixed count.
    ClosedFor {
        concurrency: usize,
        duration: Duration,
    },
    /// `rate` requests a second for `duration`, over at most `connections` connections.
    Open {
        rate: f64,
        duration: Duration,
        connections: usize,
    },
}

/// What one load run saw. Histograms are in nanoseconds.
#[derive(Debug)]
pub struct Outcome {
    pub ok: u64,
    pub failed: u64,
    pub first_failure: Option<String>,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
    pub first_byte: Histogram<u64>,
    pub gaps: Histogram<u64>,
}

impl Outcome {
    fn new() -> Outcome {
        Outcome {
            ok: 0,
            failed: 0,
            first_failure: None,
            elapsed: Duration::ZERO,
            latency: histogram(),
            first_byte: histogram(),
            gaps: histogram(),
        }
    }

    fn merge(&mut self, other: Outcome) {
        self.ok += other.ok;
        self.failed += other.failed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        // Same bounds on every histogram, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.first_byte.add(&other.first_byte);
        let _ = self.gaps.add(&other.gaps);
    }

    fn fail(&mut self, why: String) {
        self.failed += 1;
        if self.first_failure.is_none() {
            self.first_failure = Some(why);
        }
    }

    /// Completed requests per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Up to a minute, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .expect("these bounds and 3 significant digits are valid")
}

/// Runs the load to the end and merges what every connection saw.
pub async fn run(target: &Target, pace: Pace) -> Outcome {
    let target = Arc::new(target.clone());
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let (connections, plan) = match pace {
        Pace::Closed {
            concurrency,
            requests,
        } => (concurrency, Plan::Count(requests)),
        Pace::ClosedFor {
            concurrency,
            duration,
        } => (concurrency, Plan::Until(start + duration)),
        Pace::Open {
            rate,
            duration,
            connections,
        } => (
            connections,
            Plan::Rate {
                start,
                interval: Duration::from_secs_f64(1.0 / rate.max(1e-6)),
                total: (rate * duration.as_secs_f64()).round() as u64,
            },
        ),
    };
    let workers: Vec<_> = (0..connections.max(1))
        .map(|_| {
            let target = Arc::clone(&target);
            let next = Arc::clone(&next);
            tokio::spawn(async move { worker(&target, plan, &next).await })
        })
        .collect();
    let mut outcome = Outcome::new();
    for worker in workers {
        match worker.await {
            Ok(seen) => outcome.merge(seen),
            Err(e) => outcome.fail(format!("load worker failed: {e}")),
        }
    }
    outcome.elapsed = start.elapsed();
    outcome
}

#[derive(Debug, Clone, Copy)]
enum Plan {
    Count(u64),
    Until(Instant),
    Rate {
        start: Instant,
        interval: Duration,
        total: u64,
    },
}

async fn worker(target: &Target, plan: Plan, next: &AtomicU64) -> Outcome {
    let mut seen = Outcome::new();
    let mut connection: Option<SendRequest<Full<Bytes>>> = None;
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        let due = match plan {
            Plan::Count(total) if index >= total => break,
            Plan::Until(end) if Instant::now() >= end => break,
            Plan::Rate { total, .. } if index >= total => break,
            Plan::Rate {
                start, interval, ..
            } => {
                let due = start + interval.mul_f64(index as f64);
                tokio::time::sleep_until(due).await;
                due
            }
            Plan::Count(_) | Plan::Until(_) => Instant::now(),
        };
        let sender = match connection.as_mut() {
            Some(sender) if sender.is_ready() => sender,
            _ => match connect(target.address).await {
                Ok(sender) => connection.insert(sender),
                Err(why) => {
                    seen.fail(why);
                    // A refused connection fails fast; do not spin through the whole plan.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        match exchange(target, sender, due, &mut seen).await {
            Ok(()) => {
                seen.ok += 1;
                record(&mut seen.latency, due.elapsed());
            }
            Err(why) => {
                seen.fail(why);
                connection = None;
            }
        }
    }
    seen
}

async fn connect(address: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect {address}: {e}"))?;
    tcp.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn exchange(
    target: &Target,
    sender: &mut SendRequest<Full<Bytes>>,
    due: Instant,
    seen: &mut Outcome,
) -> Result<(), String> {
    let mut request = Request::post(target.path.as_str())
        .header(header::HOST, target.address.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(target.body.clone()))
        .map_err(|e| format!("request: {e}"))?;
    for (name, value) in &target.headers {
        request.headers_mut().insert(name.clone(), value.clone());
    }
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut last: Option<Instant> = None;
    let mut first_bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let now = Instant::now();
        match last {
            None => {
                if target.stream {
                    record(&mut seen.first_byte, now - due);
                }
            }
            Some(previous) => {
                if target.stream {
                    record(&mut seen.gaps, now - previous);
                }
            }
        }
        last = Some(now);
        if !status.is_success() && first_bytes.len() < 512 {
            first_bytes.extend_from_slice(data);
        }
    }
    if !status.is_success() {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&first_bytes)
        ));
    }
    Ok(())
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    histogram.saturating_record(elapsed.as_nanos().min(u64::MAX as u128) as u64);
}

/// A `Name: value` line as a header.
pub fn header(line: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| format!("{line:?} is not `Name: value`"))?;
    let name =
        HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| format!("{line:?}: {e}"))?;
    let value = HeaderValue::from_str(value.trim()).map_err(|e| format!("{line:?}: {e}"))?;
    Ok((name, value))
}

/// A chat completion request of about `prompt_bytes` bytes of user text.
pub fn chat_body(model: &str, prompt_bytes: usize, stream: bool) -> Bytes {
    let sentence = "Summarise the quarterly report for the platform team in three bullet points. ";
    let prompt: String = sentence.chars().cycle().take(prompt_bytes).collect();
    let mut body = serde_json::json!({
        "model": model,
        "messages": [
            { "role": "system", "content": "You are a concise assistant." },
            { "role": "user", "content": prompt },
        ],
        "max_tokens": 64,
    });
    if stream {
        body["stream"] = serde_json::Value::Bool(true);
    }
    Bytes::from(body.to_string())
}

/// One `GET` on a new connection, for status pages; the body as text.
pub async fn get(address: SocketAddr, path: &str, bearer: &str) -> Result<String, String> {
    let mut sender = connect(address).await?;
    let request = Request::get(path)
        .header(header::HOST, address.to_string())
        .header(header::AUTHORIZATION, format!("Bearer {bearer}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        Ok(text)
    } else {
        Err(format!("GET {path}: {status}: {text}"))
    }
}

/// [`run`] for a spawned task, which cannot borrow.
pub async fn run_owned(target: Target, pace: Pace) -> Outcome {
    run(&target, pace).await
}
