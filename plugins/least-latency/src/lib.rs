//! `least-latency`: a router that sends each attempt to the deployment answering fastest.

use portcullis_plugin_sdk::{Candidate, Config, Plugin, Request, Router};
use std::cmp::Ordering;

/// Orders candidates by measured latency; it has no settings.
#[derive(Debug)]
pub struct LeastLatency;

impl Plugin for LeastLatency {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Self)
    }
}

impl Router for LeastLatency {
    fn choose(&self, _request: &Request<'_>, _group: &str, candidates: &[Candidate]) -> Vec<u32> {
        rank(candidates)
    }
}

/// Indices of `candidates`, best first: unmeasured deployments first (so each gets measured),
/// then by latency ascending; ties go to the one with fewer calls in flight, then to the
/// earlier index (the sort is stable).
pub fn rank(candidates: &[Candidate]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..candidates.len())
        .filter_map(|index| u32::try_from(index).ok())
        .collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&candidates[a as usize], &candidates[b as usize]);
        compare_latency(a.latency_ms, b.latency_ms).then(a.in_flight.cmp(&b.in_flight))
    });
    order
}

/// `None` (never measured) sorts first; NaN counts as unmeasured rather than poisoning the order.
fn compare_latency(a: Option<f64>, b: Option<f64>) -> Ordering {
    let measured = |latency: Option<f64>| latency.filter(|ms| !ms.is_nan());
    match (measured(a), measured(b)) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (Some(a), Some(b)) => a.total_cmp(&b),
    }
}

portcullis_plugin_sdk::export!(LeastLatency: Router);

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: &str, latency_ms: Option<f64>, in_flight: u32) -> Candidate {
        Candidate {
            latency_ms,
            in_flight,
            ..Candidate::new(id)
        }
    }

    fn choose(candidates: &[Candidate]) -> Vec<u32> {
        let router = LeastLatency::init(Config::default()).expect("no config needed");
        router.choose(&Request::chat("gpt-4o", &[]), "gpt-4o", candidates)
    }

    #[test]
    fn fastest_first() {
        let candidates = [
            candidate("slow", Some(900.0), 0),
            candidate("fast", Some(120.5), 0),
            candidate("medium", Some(300.0), 0),
        ];
        assert_eq!(choose(&candidates), vec![1, 2, 0]);
    }

    #[test]
    fn unmeasured_first_then_by_in_flight() {
        let candidates = [
            candidate("measured", Some(10.0), 0),
            candidate("new-busy", None, 3),
            candidate("new-idle", None, 1),
        ];
        assert_eq!(choose(&candidates), vec![2, 1, 0]);
    }

    #[test]
    fn latency_ties_go_to_fewer_in_flight_then_index() {
        let candidates = [
            candidate("a", Some(50.0), 4),
            candidate("b", Some(50.0), 2),
            candidate("c", Some(50.0), 2),
        ];
        assert_eq!(choose(&candidates), vec![1, 2, 0]);
    }

    #[test]
    fn nan_counts_as_unmeasured() {
        let candidates = [
            candidate("a", Some(5.0), 0),
            candidate("b", Some(f64::NAN), 0),
        ];
        assert_eq!(choose(&candidates), vec![1, 0]);
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(choose(&[]), Vec::<u32>::new());
        assert_eq!(choose(&[candidate("only", Some(1.0), 9)]), vec![0]);
    }

    #[test]
    fn every_index_once() {
        let candidates: Vec<Candidate> = (0..20)
            .map(|i| candidate("x", (i % 3 != 0).then_some(f64::from(i * 7 % 11)), i % 4))
            .collect();
        let mut order = choose(&candidates);
        order.sort_unstable();
        assert_eq!(order, (0..20).collect::<Vec<u32>>());
    }

    #[test]
    fn ignores_config() {
        assert!(LeastLatency::init(Config::new(r#"{"anything": 1}"#)).is_ok());
    }
}
