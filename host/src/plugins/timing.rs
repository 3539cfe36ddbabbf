//! How long a plugin's calls take, as a lock-free histogram: recording is two relaxed atomic
//! adds, so it can sit on every call, and `/admin/status` reads percentiles from it.
//!
//! Buckets are log-linear: eight per power of two, so a percentile is within 12.5% of the truth
//! from 8 ns to the longest duration a `u64` of nanoseconds holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two, as a number of bits.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (SUB + (64 - SUB_BITS as u64) * SUB) as usize;

pub struct CallTimes {
    counts: Box<[AtomicU64]>,
    max_ns: AtomicU64,
}

impl std::fmt::Debug for CallTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallTimes")
            .field("summary", &self.summary())
            .finish()
    }
}

/// Percentiles of the calls recorded so far, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CallSummary {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Default for CallTimes {
    fn default() -> Self {
        CallTimes {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl CallTimes {
    pub fn record(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    pub fn summary(&self) -> CallSummary {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        let max_ns = self.max_ns.load(Ordering::Relaxed);
        // A bucket's midpoint can lie above the largest value recorded in it.
        let at = |quantile: f64| -> f64 {
            if count == 0 {
                return 0.0;
            }
            let rank = ((quantile * count as f64).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (index, &n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return micros(midpoint(index).min(max_ns));
                }
            }
            micros(max_ns)
        };
        CallSummary {
            count,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            max_us: micros(max_ns),
        }
    }
}

fn micros(ns: u64) -> f64 {
    // Two decimals are all a 12.5%-wide bucket can honestly claim.
    (ns as f64 / 10.0).round() / 100.0
}

fn bucket(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let exponent = 63 - ns.leading_zeros();
    let mantissa = (ns >> (exponent - SUB_BITS)) & (SUB - 1);
    (SUB + u64::from(exponent - SUB_BITS) * SUB + mantissa) as usize
}

/// The middle of bucket `index`, in nanoseconds.
fn midpoint(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB {
        return index;
    }
    let exponent = (index - SUB) / SUB + u64::from(SUB_BITS);
    let mantissa = (index - SUB) % SUB;
    let width = 1u64 << (exponent - u64::from(SUB_BITS));
    ((SUB + mantissa) * width).saturating_add(width / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_u64_in_order() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(7), 7);
        assert_eq!(bucket(8), 8);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        let mut last = 0;
        for ns in (0..20).map(|shift| (1u64 << shift) + 3) {
            assert!(bucket(ns) >= last);
            last = bucket(ns);
        }
    }

    #[test]
    fn percentiles_are_within_an_eighth() {
        let times = CallTimes::default();
        for us in 1..=100u64 {
            times.record(Duration::from_micros(us));
        }
        let summary = times.summary();
        assert_eq!(summary.count, 100);
        for (got, want) in [
            (summary.p50_us, 50.0),
            (summary.p90_us, 90.0),
            (summary.p99_us, 99.0),
        ] {
            assert!((got - want).abs() <= want / 8.0, "{got} vs {want}");
        }
        assert_eq!(summary.max_us, 100.0);
    }

    #[test]
    fn an_empty_histogram_reports_zeros() {
        let summary = CallTimes::default().summary();
        assert_eq!(summary.count, 0);
        assert_eq!(summary.p99_us, 0.0);
    }
}
