//! The live counters of one key, team or user: spend in the current budget period, request and
//! token allowances, calls in flight.
//!
//! Rate limits are token buckets that hold one minute's allowance and refill continuously, as
//! OpenAI's own limits do: a burst may use the whole minute at once, and a refused call is told
//! exactly when the allowance it needs will be back. **Counters are only ever touched under their
//! own short lock, never across an `.await`.**

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::store::{Policy, StoredSpend};

/// Which table an entity lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Key,
    Team,
    User,
}

impl Kind {
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Key => "key",
            Kind::Team => "team",
            Kind::User => "user",
        }
    }
}

/// A key (by its record id), a team or a user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntityId {
    pub kind: Kind,
    pub id: String,
}

impl EntityId {
    pub fn new(kind: Kind, id: &str) -> EntityId {
        EntityId {
            kind,
            id: id.to_owned(),
        }
    }
}

/// One entity's counters; shared by every cached view of it, so a cache refresh keeps them.
#[derive(Debug)]
pub struct EntityState {
    pub id: EntityId,
    counters: Mutex<Counters>,
}

#[derive(Debug)]
struct Counters {
    spend: f64,
    /// The budget period `spend` belongs to (0 without a `budget_duration`).
    period_start: i64,
    requests: Bucket,
    tokens: Bucket,
    in_flight: u64,
}

/// What one admitted call took, so it can be given back.
#[derive(Debug, Clone, Copy, Default)]
pub struct Taken {
    request: bool,
    tokens: u64,
    parallel: bool,
}

/// A limit's state for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Allowance {
    pub limit: u64,
    pub remaining: u64,
    /// Until the allowance is full again.
    pub reset: Duration,
}

/// Why a call was refused and when it would succeed.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub what: &'static str,
    pub limit: u64,
    pub retry_after: Duration,
}

impl Taken {
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

impl EntityState {
    /// Counters that start from what the store holds.
    pub fn new(id: EntityId, spend: f64, period_start: i64) -> EntityState {
        EntityState {
            id,
            counters: Mutex::new(Counters {
                spend,
                period_start,
                requests: Bucket::default(),
                tokens: Bucket::default(),
                in_flight: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        // A panic while holding this lock leaves plain numbers behind: still usable.
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Spend in the period that holds `now_ms` (zero once a period has ended).
    pub fn spend(&self, policy: &Policy, now_ms: i64) -> f64 {
        let mut c = self.lock();
        c.roll(policy.period_start(now_ms));
        c.spend
    }

    /// Brings the spend in line with the store's total (which holds every replica's flushed spend)
    /// plus `unflushed`, this process's spend in the current period not yet written.
    pub fn sync_spend(&self, policy: &Policy, stored: StoredSpend, unflushed: f64, now_ms: i64) {
        let mut c = self.lock();
        c.roll(policy.period_start(now_ms).max(stored.period_start));
        c.spend = if stored.period_start == c.period_start {
            stored.spend + unflushed
        } else {
            unflushed
        };
    }

    /// Adds `cost` to the current period; returns the period it was added to.
    pub fn add_spend(&self, policy: &Policy, cost: f64, now_ms: i64) -> i64 {
        let mut c = self.lock();
        c.roll(policy.period_start(now_ms));
        c.spend += cost;
        c.period_start
    }

    /// Takes one request, `tokens` tokens and a parallel slot, as far as `policy` limits them;
    /// takes nothing if any of them is not available.
    pub fn take(&self, policy: &Policy, tokens: u64, now: Instant) -> Result<Taken, Refusal> {
        let mut c = self.lock();
        if let Some(max) = policy.max_parallel_requests {
            if c.in_flight >= max {
                // A slot frees when some call ends, which nobody can predict: try again soon.
                return Err(Refusal {
                    what: "parallel requests",
                    limit: max,
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        if let Some(rpm) = policy.rpm_limit {
            c.requests.refill(rpm, now);
            c.requests.wait_for(rpm, 1).map_or(Ok(()), |wait| {
                Err(Refusal {
                    what: "requests per minute",
                    limit: rpm,
                    retry_after: wait,
                })
            })?;
        }
        if let Some(tpm) = policy.tpm_limit {
            c.tokens.refill(tpm, now);
            c.tokens.wait_for(tpm, tokens).map_or(Ok(()), |wait| {
                Err(Refusal {
                    what: "tokens per minute",
                    limit: tpm,
                    retry_after: wait,
                })
            })?;
        }
        let mut taken = Taken::default();
        if policy.rpm_limit.is_some() {
            c.requests.level -= 1.0;
            taken.request = true;
        }
        if policy.tpm_limit.is_some() {
            c.tokens.level -= tokens as f64;
            taken.tokens = tokens;
        }
        if policy.max_parallel_requests.is_some() {
            c.in_flight += 1;
            taken.parallel = true;
        }
        Ok(taken)
    }

    /// Gives back what [`take`](Self::take) took, for a call another limit refused.
    pub fn give_back(&self, taken: Taken) {
        let mut c = self.lock();
        if taken.request {
            c.requests.level += 1.0;
        }
        c.tokens.level += taken.tokens as f64;
        if taken.parallel {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }

    /// The call's parallel slot is free again.
    pub fn end_call(&self, taken: Taken) {
        if taken.parallel {
            let mut c = self.lock();
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }

    /// Replaces a call's token reservation by what it really used.
    pub fn settle_tokens(&self, reserved: u64, used: u64) {
        let mut c = self.lock();
        c.tokens.level += reserved as f64 - used as f64;
    }

    /// The request and token allowances left, for the headers.
    pub fn allowances(
        &self,
        policy: &Policy,
        now: Instant,
    ) -> (Option<Allowance>, Option<Allowance>) {
        let mut c = self.lock();
        let requests = policy.rpm_limit.map(|rpm| {
            c.requests.refill(rpm, now);
            c.requests.allowance(rpm)
        });
        let tokens = policy.tpm_limit.map(|tpm| {
            c.tokens.refill(tpm, now);
            c.tokens.allowance(tpm)
        });
        (requests, tokens)
    }
}

impl Counters {
    fn roll(&mut self, period_start: i64) {
        if period_start > self.period_start {
            self.spend = 0.0;
            self.period_start = period_start;
        }
    }
}

/// A minute's allowance that refills continuously; full when first used.
#[derive(Debug, Default)]
struct Bucket {
    level: f64,
    updated: Option<Instant>,
}

impl Bucket {
    fn refill(&mut self, per_minute: u64, now: Instant) {
        let capacity = per_minute as f64;
        self.level = match self.updated {
            None => capacity,
            Some(then) => {
                let elapsed = now.saturating_duration_since(then).as_secs_f64();
                (self.level + elapsed * capacity / 60.0).min(capacity)
            }
        };
        self.updated = Some(now);
    }

    /// How long until `amount` is available; `None` if it is now. A call bigger than the whole
    /// allowance goes through once the bucket is full, rather than never.
    fn wait_for(&self, per_minute: u64, amount: u64) -> Option<Duration> {
        let needed = (amount as f64).min(per_minute as f64);
        if self.level >= needed {
            return None;
        }
        Some(refill_time(per_minute, needed - self.level))
    }

    fn allowance(&self, per_minute: u64) -> Allowance {
        Allowance::at_level(per_minute, self.level)
    }
}

impl Allowance {
    /// The allowance of a bucket filled to `level`, here or in Redis.
    pub fn at_level(per_minute: u64, level: f64) -> Allowance {
        Allowance {
            limit: per_minute,
            remaining: level.max(0.0).floor() as u64,
            // From the level itself: a call bigger than the allowance overdraws it, and the reset
            // is when the overdraft is paid back too.
            reset: refill_time(per_minute, per_minute as f64 - level),
        }
    }
}

/// Time to refill `missing` of a `per_minute` allowance.
fn refill_time(per_minute: u64, missing: f64) -> Duration {
    if per_minute == 0 {
        // A zero limit never refills; a minute is the honest answer for a retry.
        return Duration::from_secs(60);
    }
    Duration::from_secs_f64((missing.max(0.0) * 60.0 / per_minute as f64).min(86_400.0))
}

/// OpenAI's duration format for the reset headers: `850ms`, `12s`, `1m30s`.
pub fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs_f64().ceil() as u64;
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rpm: Option<u64>, tpm: Option<u64>, parallel: Option<u64>) -> Policy {
        Policy {
            rpm_limit: rpm,
            tpm_limit: tpm,
            max_parallel_requests: parallel,
            ..Policy::default()
        }
    }

    fn state() -> EntityState {
        EntityState::new(EntityId::new(Kind::Key, "k"), 0.0, 0)
    }

    #[test]
    fn a_minutes_requests_pass_then_the_next_waits_for_its_share_to_refill() {
        let s = state();
        let p = policy(Some(2), None, None);
        let t0 = Instant::now();
        assert!(s.take(&p, 0, t0).is_ok());
        assert!(s.take(&p, 0, t0).is_ok());
        let refused = s.take(&p, 0, t0).expect_err("third in the same instant");
        assert_eq!(refused.retry_after, Duration::from_secs(30));
        // Half a request has refilled after 15 s: still 15 s to go.
        let later = t0 + Duration::from_secs(15);
        let refused = s.take(&p, 0, later).expect_err("not yet");
        assert_eq!(refused.retry_after, Duration::from_secs(15));
        assert!(s.take(&p, 0, t0 + Duration::from_secs(30)).is_ok());
    }

    #[test]
    fn a_refused_token_reservation_takes_nothing_and_usage_corrects_it() {
        let s = state();
        let p = policy(Some(10), Some(100), None);
        let t0 = Instant::now();
        let taken = s.take(&p, 80, t0).expect("fits");
        let refused = s.take(&p, 80, t0).expect_err("does not fit");
        assert_eq!(refused.what, "tokens per minute");
        let (requests, tokens) = s.allowances(&p, t0);
        assert_eq!(requests.map(|a| a.remaining), Some(9));
        assert_eq!(tokens.map(|a| a.remaining), Some(20));
        // The call used 30, not 80: 50 come back.
        s.settle_tokens(taken.tokens, 30);
        assert_eq!(s.allowances(&p, t0).1.map(|a| a.remaining), Some(70));
        // One that used 250 overdraws the minute by 200: full again in three minutes.
        s.settle_tokens(0, 270);
        let tokens = s.allowances(&p, t0).1.expect("a token limit");
        assert_eq!(
            (tokens.remaining, tokens.reset),
            (0, Duration::from_secs(180))
        );
    }

    #[test]
    fn parallel_slots_free_when_calls_end() {
        let s = state();
        let p = policy(None, None, Some(1));
        let t0 = Instant::now();
        let first = s.take(&p, 0, t0).expect("free slot");
        assert_eq!(
            s.take(&p, 0, t0).expect_err("busy").what,
            "parallel requests"
        );
        s.end_call(first);
        assert!(s.take(&p, 0, t0).is_ok());
    }

    #[test]
    fn spend_resets_when_its_period_ends() {
        let s = state();
        let p = Policy {
            budget_duration: Some("10s".into()),
            budget_anchor: 0,
            ..Policy::default()
        };
        assert_eq!(s.add_spend(&p, 1.5, 1_000), 0);
        assert_eq!(s.spend(&p, 9_999), 1.5);
        assert_eq!(s.spend(&p, 10_000), 0.0);
        assert_eq!(s.add_spend(&p, 0.5, 12_000), 10_000);
    }

    #[test]
    fn a_sync_takes_the_stored_total_plus_what_is_not_yet_written() {
        let s = state();
        let p = Policy::default();
        s.add_spend(&p, 1.0, 5);
        let stored = StoredSpend {
            spend: 3.0,
            period_start: 0,
        };
        s.sync_spend(&p, stored, 0.25, 10);
        assert_eq!(s.spend(&p, 10), 3.25);
        // A stored total from an ended period counts for nothing.
        let p = Policy {
            budget_duration: Some("10s".into()),
            ..Policy::default()
        };
        s.sync_spend(&p, stored, 0.5, 25_000);
        assert_eq!(s.spend(&p, 25_000), 0.5);
    }

    #[test]
    fn reset_texts_look_like_openais() {
        assert_eq!(reset_text(Duration::from_millis(850)), "850ms");
        assert_eq!(reset_text(Duration::from_millis(11_200)), "12s");
        assert_eq!(reset_text(Duration::from_secs(90)), "1m30s");
    }
}
