//! One deployment and its live statistics: in-flight calls, latency, per-minute usage, health.
//!
//! Stats are atomics or a short-held mutex (never across `.await`), so many calls update them at
//! once without queueing behind each other.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;

use crate::cost::Prices;
use crate::extension::Candidate;
use crate::providers::Upstream;

/// A deployment: where to send a call, what it may take, and how it has been doing.
#[derive(Debug)]
pub struct Deployment {
    pub id: String,
    /// The model group's name: what clients ask for.
    pub group: String,
    pub upstream: Upstream,
    pub weight: u32,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub prices: Prices,
    /// `id`, `group` and the API base as header values, checked once: every response names them.
    pub header_values: HeaderValues,
    /// Shared with this deployment's successor in the next generation, so a reload keeps its
    /// load, latency, usage and cooldown.
    stats: Arc<Stats>,
}

#[derive(Debug)]
struct Stats {
    origin: Instant,
    in_flight: AtomicU32,
    /// f64 bits of the latency EWMA in milliseconds; 0 until the first success.
    latency_ewma: AtomicU64,
    /// Milliseconds since `origin` until which the deployment rests.
    cooldown_until_ms: AtomicU64,
    window: Mutex<MinuteWindow>,
}

/// Counts for the current wall-clock minute since `origin`.
#[derive(Debug, Default)]
struct MinuteWindow {
    minute: u64,
    requests: u64,
    tokens: u64,
    failures: u32,
}

impl MinuteWindow {
    fn roll(&mut self, minute: u64) -> &mut Self {
        if self.minute != minute {
            *self = MinuteWindow {
                minute,
                ..MinuteWindow::default()
            };
        }
        self
    }
}

/// A deployment's names as response header values; `None` where one cannot be a header.
#[derive(Debug, Clone)]
pub struct HeaderValues {
    pub id: Option<HeaderValue>,
    pub group: Option<HeaderValue>,
    pub api_base: Option<HeaderValue>,
}

impl HeaderValues {
    fn of(id: &str, group: &str, api_base: &str) -> HeaderValues {
        let value = |text: &str| HeaderValue::from_str(text).ok();
        HeaderValues {
            id: value(id),
            group: value(group),
            api_base: value(api_base),
        }
    }
}

/// Weight of the newest sample in the latency average.
const LATENCY_ALPHA: f64 = 0.3;

impl Deployment {
    pub fn new(
        id: String,
        group: String,
        upstream: Upstream,
        weight: u32,
        rpm: Option<u64>,
        tpm: Option<u64>,
        prices: Prices,
    ) -> Deployment {
        Deployment {
            header_values: HeaderValues::of(&id, &group, &upstream.api_base),
            id,
            group,
            upstream,
            weight,
            rpm,
            tpm,
            prices,
            stats: Arc::new(Stats {
                origin: Instant::now(),
                in_flight: AtomicU32::new(0),
                latency_ewma: AtomicU64::new(0),
                cooldown_until_ms: AtomicU64::new(0),
                window: Mutex::new(MinuteWindow::default()),
            }),
        }
    }

    /// Takes over `previous`'s live statistics if it is the same deployment: the same id in front
    /// of the same upstream model with the same key (a new key may well end a cooldown that the
    /// old one earned). Weights, caps and prices may have changed; the history holds.
    pub fn continuing(mut self, previous: &Deployment) -> Deployment {
        let same = previous.id == self.id
            && previous.upstream.kind == self.upstream.kind
            && previous.upstream.model == self.upstream.model
            && previous.upstream.api_base == self.upstream.api_base
            && previous.upstream.api_key == self.upstream.api_key;
        if same {
            self.stats = Arc::clone(&previous.stats);
        }
        self
    }

    fn now_ms(&self) -> u64 {
        self.stats.origin.elapsed().as_millis() as u64
    }

    fn with_window<T>(&self, f: impl FnOnce(&mut MinuteWindow) -> T) -> T {
        let minute = self.now_ms() / 60_000;
        // A poisoned lock only means another thread panicked mid-update of plain counters.
        let mut window = self.stats.window.lock().unwrap_or_else(|p| p.into_inner());
        f(window.roll(minute))
    }

    pub fn is_cooling_down(&self) -> bool {
        self.now_ms() < self.stats.cooldown_until_ms.load(Ordering::Relaxed)
    }

    /// Whether the deployment may take another call this minute.
    pub fn has_capacity(&self) -> bool {
        self.with_window(|w| {
            self.rpm.is_none_or(|cap| w.requests < cap) && self.tpm.is_none_or(|cap| w.tokens < cap)
        })
    }

    /// The strategy's view of this deployment now.
    pub fn candidate(&self) -> Candidate {
        let (rpm_used, tpm_used) = self.with_window(|w| (w.requests, w.tokens));
        let latency = f64::from_bits(self.stats.latency_ewma.load(Ordering::Relaxed));
        Candidate {
            id: self.id.clone(),
            weight: self.weight,
            in_flight: self.stats.in_flight.load(Ordering::Relaxed),
            latency_ms: (latency > 0.0).then_some(latency),
            rpm_used,
            tpm_used,
            rpm_limit: self.rpm,
            tpm_limit: self.tpm,
            input_cost_per_token: self.prices.input,
            output_cost_per_token: self.prices.output,
        }
    }

    /// Counts a call as started if the deployment is under its rpm/tpm caps, checking and
    /// counting at once so concurrent calls cannot overshoot a cap. The guard counts the call
    /// as ended when dropped.
    pub fn try_start_call(self: &Arc<Self>) -> Option<InFlight> {
        let admitted = self.with_window(|w| {
            let fits = self.rpm.is_none_or(|cap| w.requests < cap)
                && self.tpm.is_none_or(|cap| w.tokens < cap);
            if fits {
                w.requests += 1;
            }
            fits
        });
        admitted.then(|| {
            self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            InFlight {
                deployment: Arc::clone(self),
            }
        })
    }

    pub fn record_latency(&self, latency: Duration) {
        let sample = latency.as_secs_f64() * 1000.0;
        // Lost updates under contention only blur an average; no CAS loop needed.
        let old = f64::from_bits(self.stats.latency_ewma.load(Ordering::Relaxed));
        let new = if old > 0.0 {
            old + LATENCY_ALPHA * (sample - old)
        } else {
            sample.max(f64::MIN_POSITIVE)
        };
        self.stats
            .latency_ewma
            .store(new.to_bits(), Ordering::Relaxed);
    }

    pub fn record_tokens(&self, tokens: u64) {
        self.with_window(|w| w.tokens += tokens);
    }

    /// Counts a failure; at `allowed_fails` within the minute the deployment rests for `cooldown`.
    /// Returns whether this failure started a cooldown.
    pub fn record_failure(&self, allowed_fails: u32, cooldown: Duration) -> bool {
        let trip = self.with_window(|w| {
            w.failures += 1;
            if w.failures >= allowed_fails.max(1) {
                w.failures = 0;
                true
            } else {
                false
            }
        });
        if trip && !cooldown.is_zero() {
            let until = self.now_ms() + cooldown.as_millis() as u64;
            self.stats.cooldown_until_ms.store(until, Ordering::Relaxed);
        }
        trip
    }
}

/// Held while a call (including a whole stream) is in flight on a deployment.
#[derive(Debug)]
pub struct InFlight {
    deployment: Arc<Deployment>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.deployment
            .stats
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::providers::ProviderKind;

    pub(crate) fn deployment(id: &str, rpm: Option<u64>) -> Arc<Deployment> {
        Arc::new(Deployment::new(
            id.into(),
            "g".into(),
            Upstream {
                kind: ProviderKind::Mock,
                model: "m".into(),
                api_base: String::new(),
                api_key: None,
                api_version: None,
                timeout: Duration::from_secs(1),
                stream_idle_timeout: Duration::from_secs(1),
                prepared: Default::default(),
            },
            1,
            rpm,
            None,
            Prices {
                input: 0.0,
                output: 0.0,
            },
        ))
    }

    #[test]
    fn in_flight_counts_until_the_guard_drops() {
        let d = deployment("a", None);
        let guard = d.try_start_call().expect("no cap");
        assert_eq!(d.candidate().in_flight, 1);
        drop(guard);
        assert_eq!(d.candidate().in_flight, 0);
        assert_eq!(d.candidate().rpm_used, 1);
    }

    #[test]
    fn rpm_cap_stops_new_calls() {
        let d = deployment("a", Some(2));
        let _a = d.try_start_call().expect("under the cap");
        assert!(d.has_capacity());
        let _b = d.try_start_call().expect("at the cap");
        assert!(!d.has_capacity());
        assert!(d.try_start_call().is_none());
    }

    #[test]
    fn allowed_fails_trip_the_cooldown() {
        let d = deployment("a", None);
        assert!(!d.record_failure(2, Duration::from_secs(30)));
        assert!(!d.is_cooling_down());
        assert!(d.record_failure(2, Duration::from_secs(30)));
        assert!(d.is_cooling_down());
    }

    #[test]
    fn latency_is_an_average() {
        let d = deployment("a", None);
        assert_eq!(d.candidate().latency_ms, None);
        d.record_latency(Duration::from_millis(100));
        d.record_latency(Duration::from_millis(200));
        let latency = d.candidate().latency_ms.expect("measured");
        assert!((latency - 130.0).abs() < 1e-6, "{latency}");
    }
}
