//! The per-request context that flows through the stages, and the record post-call hooks get.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue};
use tokio::time::Instant;

use crate::governance::Admission;
use crate::pipeline::authenticate::Principal;
use crate::providers::{Endpoint, JsonObject, Usage};
use crate::router::Deployment;

/// What the pipeline knows about one request so far. Stages fill it in order.
#[derive(Debug, Clone)]
pub struct Call {
    /// Unique per request; in every log line, header and hook event about it.
    pub id: String,
    pub endpoint: Endpoint,
    pub received: Instant,
    pub received_at: SystemTime,
    /// Set by authenticate.
    pub principal: Option<Arc<Principal>>,
    /// The model the client asked for; responses carry this name back.
    pub requested_model: String,
    /// The model group the call is routed to (the requested one unless an enricher moved it).
    pub model: String,
    pub stream: bool,
    /// The body's `user`.
    pub end_user: Option<String>,
    pub metadata: JsonObject,
    pub tags: Vec<String>,
    /// Upstream attempts made, across retries and fallbacks.
    pub attempts: u32,
    /// Fallback groups tried.
    pub fallbacks: u32,
    pub deployment: Option<Arc<Deployment>>,
    /// Time spent waiting on upstreams (to the head, or the whole body).
    pub upstream_time: Duration,
    pub usage: Option<Usage>,
    pub cost: f64,
    /// Each guardrail that ran and its outcome: allow, block, rewrite or error.
    pub guardrails: Vec<(String, &'static str)>,
    /// A stored key's rate-limit and spend headers, for the response whatever it is.
    pub key_headers: Vec<(HeaderName, HeaderValue)>,
    /// A stored key's hold on its limits, released when the call ends.
    pub admission: Option<Arc<Admission>>,
}

/// `call-` and 32 hex digits, written without the formatting machinery (a fifth of the cost).
/// The first 12 digits are the milliseconds since the Unix epoch and the other 20 are random, as
/// in a UUIDv7: ids sort by time, and a spend-log row is found by the time its id begins with
/// ([`id_millis`]), through the store's index on time.
/// Enough for the year 10889.
const TIME_BITS: u32 = 48;

fn call_id(at: SystemTime, random: u128) -> String {
    let millis = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    let random_bits = 128 - TIME_BITS;
    let id_bits = ((millis & ((1 << TIME_BITS) - 1)) << random_bits) | (random >> TIME_BITS);
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut id = *b"call-00000000000000000000000000000000";
    for (nibble, digit) in id[5..].iter_mut().rev().enumerate() {
        *digit = DIGITS[((id_bits >> (nibble * 4)) & 0xf) as usize];
    }
    // All ASCII, so never lossy.
    String::from_utf8_lossy(&id).into_owned()
}

/// The milliseconds since the Unix epoch a call id begins with (its call's `received_at`), if
/// `id` is one.
pub fn id_millis(id: &str) -> Option<i64> {
    let digits = id.strip_prefix("call-")?;
    if digits.len() != 32 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let time_digits = (TIME_BITS / 4) as usize;
    i64::from_str_radix(&digits[..time_digits], 16).ok()
}

impl Call {
    pub fn new(endpoint: Endpoint) -> Call {
        let received_at = SystemTime::now();
        Call {
            // Unique, not secret: a thread-local generator avoids a syscall per request.
            id: call_id(received_at, fastrand::u128(..)),
            endpoint,
            received: Instant::now(),
            received_at,
            principal: None,
            requested_model: String::new(),
            model: String::new(),
            stream: false,
            end_user: None,
            metadata: JsonObject::new(),
            tags: Vec::new(),
            attempts: 0,
            fallbacks: 0,
            deployment: None,
            upstream_time: Duration::ZERO,
            usage: None,
            cost: 0.0,
            guardrails: Vec::new(),
            key_headers: Vec::new(),
            admission: None,
        }
    }

    /// Time the gateway itself spent, excluding waits on upstreams.
    pub fn overhead(&self) -> Duration {
        self.received.elapsed().saturating_sub(self.upstream_time)
    }

    /// Sets usage and its cost from the chosen deployment's prices.
    pub fn set_usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
        if let Some(deployment) = &self.deployment {
            self.cost = deployment.prices.cost(usage);
        }
    }

    /// The record post-call hooks receive, taken when the call ends.
    pub fn into_record(self, outcome: Outcome) -> CallRecord {
        let latency = self.received.elapsed();
        let (key_alias, team) = match &self.principal {
            Some(principal) => (principal.alias.clone(), principal.team.clone()),
            None => (None, None),
        };
        CallRecord {
            call_id: self.id,
            endpoint: self.endpoint,
            key_alias,
            team,
            model: self.model,
            deployment: self.deployment.as_ref().map(|d| d.id.clone()),
            stream: self.stream,
            end_user: self.end_user,
            metadata: self.metadata,
            tags: self.tags,
            usage: self.usage,
            cost: self.cost,
            latency,
            attempts: self.attempts,
            fallbacks: self.fallbacks,
            started_at: self.received_at,
            guardrails: self.guardrails,
            outcome,
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The client got an error with this status.
    Failure {
        status: u16,
        message: String,
    },
    /// The client went away before the end of its stream.
    Cancelled,
}

impl Outcome {
    /// The HTTP status the client got (499, as proxies log it, if it went away).
    pub fn status(&self) -> u16 {
        match self {
            Outcome::Success => 200,
            Outcome::Failure { status, .. } => *status,
            Outcome::Cancelled => 499,
        }
    }

    /// What went wrong, if anything.
    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Success => None,
            Outcome::Failure { message, .. } => Some(message),
            Outcome::Cancelled => Some("the client went away"),
        }
    }
}

/// A finished call, as post-call hooks see it.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub call_id: String,
    pub endpoint: Endpoint,
    pub key_alias: Option<String>,
    pub team: Option<String>,
    pub model: String,
    pub deployment: Option<String>,
    pub stream: bool,
    pub end_user: Option<String>,
    pub metadata: JsonObject,
    pub tags: Vec<String>,
    pub usage: Option<Usage>,
    pub cost: f64,
    pub latency: Duration,
    pub attempts: u32,
    pub fallbacks: u32,
    pub started_at: SystemTime,
    pub guardrails: Vec<(String, &'static str)>,
    pub outcome: Outcome,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_are_the_prefix_the_time_and_random_digits() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(0x0123_4567_89ab);
        for random in [0, 1, 0xabc, u128::MAX, fastrand::u128(..)] {
            let random_part = random >> TIME_BITS;
            assert_eq!(
                call_id(at, random),
                format!("call-0123456789ab{random_part:020x}")
            );
        }
    }

    #[test]
    fn a_call_id_gives_back_its_time_and_nothing_else_does() {
        let at = SystemTime::now();
        let millis = crate::governance::period::unix_ms(at);
        assert_eq!(id_millis(&call_id(at, fastrand::u128(..))), Some(millis));
        for other in [
            "r1",
            "call-",
            "call-0123",
            "call-0123456789abcdef0123456789abcdeg",
        ] {
            assert_eq!(id_millis(other), None, "{other}");
        }
    }

    #[test]
    fn call_ids_sort_by_time() {
        let earlier = SystemTime::now();
        let later = earlier + Duration::from_millis(1);
        assert!(call_id(earlier, u128::MAX) < call_id(later, 0));
        assert!(call_id(SystemTime::UNIX_EPOCH - Duration::from_secs(1), 7)
            .starts_with("call-000000000000"));
    }
}
