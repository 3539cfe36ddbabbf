//! The built-in routing strategies. Each picks among deployments that can take a call now.

use std::sync::Arc;

pub use crate::config::StrategyName;
use crate::extension::{ready, BoxFuture, Candidate, RouteRequest, RoutingStrategy};

/// The strategy the config names.
pub fn builtin(name: StrategyName) -> Arc<dyn RoutingStrategy> {
    match name {
        StrategyName::SimpleShuffle => Arc::new(SimpleShuffle),
        StrategyName::LeastBusy => Arc::new(LeastBusy),
        StrategyName::LatencyBased => Arc::new(LatencyBased),
        StrategyName::UsageBased => Arc::new(UsageBased),
    }
}

/// Random, in proportion to `weight`.
#[derive(Debug)]
pub struct SimpleShuffle;

impl RoutingStrategy for SimpleShuffle {
    fn name(&self) -> &str {
        "simple-shuffle"
    }

    fn choose<'a>(
        &'a self,
        _: &'a RouteRequest<'a>,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Option<usize>> {
        ready(weighted_shuffle(candidates))
    }
}

/// Weighted random choice; the router's fallback when a strategy has no opinion.
pub fn weighted_shuffle(candidates: &[Candidate]) -> Option<usize> {
    let total: u64 = candidates.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = fastrand::u64(0..total);
    candidates.iter().position(|c| {
        let weight = u64::from(c.weight);
        if ticket < weight {
            true
        } else {
            ticket -= weight;
            false
        }
    })
}

/// Fewest calls in flight.
#[derive(Debug)]
pub struct LeastBusy;

impl RoutingStrategy for LeastBusy {
    fn name(&self) -> &str {
        "least-busy"
    }

    fn choose<'a>(
        &'a self,
        _: &'a RouteRequest<'a>,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Option<usize>> {
        ready(lowest(candidates, |c| c.in_flight as f64))
    }
}

/// Lowest latency average; deployments not yet measured go first so every one gets measured.
#[derive(Debug)]
pub struct LatencyBased;

impl RoutingStrategy for LatencyBased {
    fn name(&self) -> &str {
        "latency-based"
    }

    fn choose<'a>(
        &'a self,
        _: &'a RouteRequest<'a>,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Option<usize>> {
        ready(lowest(candidates, |c| c.latency_ms.unwrap_or(0.0)))
    }
}

/// Lowest share of its token budget used this minute (tokens used where there is no cap).
#[derive(Debug)]
pub struct UsageBased;

impl RoutingStrategy for UsageBased {
    fn name(&self) -> &str {
        "usage-based"
    }

    fn uses_token_estimate(&self) -> bool {
        true
    }

    fn choose<'a>(
        &'a self,
        request: &'a RouteRequest<'a>,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Option<usize>> {
        ready(lowest(candidates, |c| {
            let used = (c.tpm_used + request.estimated_tokens) as f64;
            match c.tpm_limit {
                Some(limit) if limit > 0 => used / limit as f64,
                _ => used,
            }
        }))
    }
}

/// The index with the lowest score; ties are broken at random so equal deployments share load.
fn lowest(candidates: &[Candidate], score: impl Fn(&Candidate) -> f64) -> Option<usize> {
    let scores: Vec<f64> = candidates.iter().map(score).collect();
    let best = scores.iter().copied().fold(f64::INFINITY, f64::min);
    let ties: Vec<usize> = (0..scores.len()).filter(|&i| scores[i] <= best).collect();
    match ties.len() {
        0 => None,
        1 => Some(ties[0]),
        n => Some(ties[fastrand::usize(0..n)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: &str) -> Candidate {
        Candidate::new(id)
    }

    const REQUEST: RouteRequest<'static> = RouteRequest {
        call_id: "c",
        group: "g",
        estimated_tokens: 10,
        stream: false,
        origin: None,
    };

    fn choose(strategy: &dyn RoutingStrategy, candidates: &[Candidate]) -> Option<usize> {
        futures_util::FutureExt::now_or_never(strategy.choose(&REQUEST, candidates))
            .expect("built-in strategies never wait")
    }

    #[test]
    fn shuffle_follows_weights() {
        let mut heavy = candidate("heavy");
        heavy.weight = 9;
        let candidates = [candidate("light"), heavy];
        let heavy_picks = (0..2000)
            .filter(|_| choose(&SimpleShuffle, &candidates) == Some(1))
            .count();
        assert!((1600..=1990).contains(&heavy_picks), "{heavy_picks}");
    }

    #[test]
    fn least_busy_picks_the_idle_one() {
        let mut busy = candidate("busy");
        busy.in_flight = 3;
        assert_eq!(choose(&LeastBusy, &[busy, candidate("idle")]), Some(1));
    }

    #[test]
    fn latency_based_measures_unknowns_first_then_picks_fastest() {
        let mut slow = candidate("slow");
        slow.latency_ms = Some(200.0);
        let mut fast = candidate("fast");
        fast.latency_ms = Some(20.0);
        assert_eq!(
            choose(&LatencyBased, &[slow.clone(), fast.clone()]),
            Some(1)
        );
        assert_eq!(
            choose(&LatencyBased, &[slow, fast, candidate("new")]),
            Some(2)
        );
    }

    #[test]
    fn usage_based_compares_shares_of_budget() {
        let mut big = candidate("big");
        big.tpm_used = 5_000;
        big.tpm_limit = Some(100_000);
        let mut small = candidate("small");
        small.tpm_used = 1_000;
        small.tpm_limit = Some(2_000);
        assert_eq!(choose(&UsageBased, &[big, small]), Some(0));
    }
}
