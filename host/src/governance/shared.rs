//! Counters shared by replicas through Redis: spend per key, team and user, and their rate limits.
//!
//! One script call admits a request: it reads the spends, refills the buckets from Redis's own
//! clock (so replicas need not agree on the time), and takes what the call needs only if every
//! limit allows it. The buckets are the same as the local ones ([`super::limits`]).
//!
//! **When Redis cannot be reached, the first failed call marks it down; from then on requests do
//! not wait on it: they use the local counters (or are refused with 503 under `fail_closed`) until
//! a probe finds it again.** Spend charged while it was down is added once it is back, before any
//! request uses it again, so a replica's own spend is never lost from the shared totals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::task::JoinHandle;

use super::limits::{Allowance, EntityId, Refusal};
use super::period;
use super::store::{Policy, SpendDelta};

/// How long a request waits on Redis before it is declared down.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A spend total without a budget period is kept this long after its last use, then re-seeded.
const SPEND_IDLE_TTL_MS: i64 = 24 * 3_600_000;
/// Calls in flight are counted per entity; if a replica dies with calls open, their slots come
/// back this long after the entity's last call.
const PARALLEL_TTL_MS: i64 = 600_000;
const PREFIX: &str = "portcullis";

/// Checks every budget and limit of a call and takes what it needs only if all allow it.
///
/// KEYS, four per entity: spend, request bucket, token bucket, calls in flight.
/// ARGV: the call's tokens, how long a count of calls in flight outlives its last call, then six
/// per entity: max budget, spend to start from if Redis has none, that total's time to live, rpm,
/// tpm, parallel (empty: none).
const ADMIT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local tokens = tonumber(ARGV[1])
local n = #KEYS / 4
local function arg(i, field)
  local v = ARGV[3 + 6 * i + field]
  if v == '' then return false end
  return tonumber(v)
end
local function level(key, cap)
  local saved = redis.call('HMGET', key, 'level', 'at')
  if not saved[1] then return cap end
  return math.min(cap, tonumber(saved[1]) + (now - tonumber(saved[2])) * cap / 60000)
end
local function wait(lvl, cap, amount)
  local need = math.min(amount, cap)
  if lvl >= need then return false end
  if cap == 0 then return 60000 end
  return math.ceil((need - lvl) * 60000 / cap)
end
local function show(x) if x then return tostring(x) end return '' end
local spends, requests, toks = {}, {}, {}
for i = 0, n - 1 do
  local key = KEYS[4 * i + 1]
  local spend = redis.call('GET', key)
  if not spend then
    spend = ARGV[3 + 6 * i + 1]
    redis.call('SET', key, spend)
  end
  redis.call('PEXPIRE', key, ARGV[3 + 6 * i + 2])
  spends[i + 1] = spend
  local max = arg(i, 0)
  if max and tonumber(spend) >= max then return {'budget', tostring(i), spend} end
end
for i = 0, n - 1 do
  local rpm, tpm, parallel = arg(i, 3), arg(i, 4), arg(i, 5)
  requests[i + 1] = rpm and level(KEYS[4 * i + 2], rpm)
  toks[i + 1] = tpm and level(KEYS[4 * i + 3], tpm)
  local refused = false
  if parallel and tonumber(redis.call('GET', KEYS[4 * i + 4]) or '0') >= parallel then
    refused = {'parallel', parallel, 1000}
  end
  local w = rpm and wait(requests[i + 1], rpm, 1)
  if not refused and w then refused = {'requests', rpm, w} end
  w = tpm and wait(toks[i + 1], tpm, tokens)
  if not refused and w then refused = {'tokens', tpm, w} end
  if refused then
    return {'limit', tostring(i), refused[1], tostring(refused[2]), tostring(refused[3]),
      show(requests[i + 1]), show(toks[i + 1])}
  end
end
local out = {'ok'}
for i = 0, n - 1 do
  local rpm, tpm, parallel = arg(i, 3), arg(i, 4), arg(i, 5)
  if rpm then
    requests[i + 1] = requests[i + 1] - 1
    redis.call('HSET', KEYS[4 * i + 2], 'level', tostring(requests[i + 1]), 'at', now)
    redis.call('PEXPIRE', KEYS[4 * i + 2], 120000)
  end
  if tpm then
    toks[i + 1] = toks[i + 1] - tokens
    redis.call('HSET', KEYS[4 * i + 3], 'level', tostring(toks[i + 1]), 'at', now)
    redis.call('PEXPIRE', KEYS[4 * i + 3], 120000)
  end
  if parallel then
    redis.call('INCR', KEYS[4 * i + 4])
    redis.call('PEXPIRE', KEYS[4 * i + 4], ARGV[2])
  end
  out[#out + 1] = spends[i + 1]
  out[#out + 1] = show(requests[i + 1])
  out[#out + 1] = show(toks[i + 1])
end
return out
";

/// Adds spend to totals that exist; a missing one is seeded later from the local counters, which
/// already hold it.
const CHARGE: &str = r"
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBYFLOAT', key, ARGV[i]) end
end
return 0
";

/// After a call: KEYS token buckets with ARGV tokens to give back, then calls in flight to end
/// (ARGV '-').
const RELEASE: &str = r"
for i, key in ipairs(KEYS) do
  if ARGV[i] == '-' then
    if redis.call('DECR', key) < 0 then redis.call('SET', key, 0) end
  elseif redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBYFLOAT', key, 'level', ARGV[i])
  end
end
return 0
";

/// The Redis side of governance; one per process.
pub struct Shared {
    client: redis::Client,
    connection: ConnectionManager,
    fail_closed: bool,
    up: AtomicBool,
    health: Mutex<Health>,
    /// Spend charged while Redis was down, per total, added when it is back.
    owed: Mutex<HashMap<String, f64>>,
    admit: Script,
    charge: Script,
    release: Script,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Health {
    since: i64,
    last_error: Option<String>,
}

/// One entity's part in an admission.
#[derive(Debug)]
pub struct Ask<'a> {
    pub entity: &'a EntityId,
    pub policy: &'a Policy,
    /// This process's view of the entity's spend, in case Redis has none.
    pub local_spend: f64,
}

/// Redis's answer to an admission.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Per entity asked: its spend and its request and token allowances.
    Admitted(Vec<Standing>),
    OverBudget {
        index: usize,
        spend: f64,
    },
    Limited {
        index: usize,
        refusal: Refusal,
        standing: Standing,
    },
}

#[derive(Debug, Default, PartialEq)]
pub struct Standing {
    pub spend: f64,
    pub requests: Option<Allowance>,
    pub tokens: Option<Allowance>,
}

/// What an admitted call holds in Redis, given back when it ends.
#[derive(Debug, Default)]
pub struct Held {
    token_buckets: Vec<(String, u64)>,
    in_flight: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis answered an admission with {0:?}")]
    Malformed(Vec<String>),
}

impl Shared {
    /// Connects lazily: an unreachable Redis at start is reported, not fatal.
    pub async fn start(url: &str, fail_closed: bool) -> Result<Arc<Shared>, SharedError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(PROBE_EVERY);
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        let shared = Arc::new(Shared {
            client,
            connection,
            fail_closed,
            up: AtomicBool::new(false),
            health: Mutex::new(Health {
                since: period::now_ms(),
                last_error: Some("not connected yet".into()),
            }),
            owed: Mutex::new(HashMap::new()),
            admit: Script::new(ADMIT),
            charge: Script::new(CHARGE),
            release: Script::new(RELEASE),
        });
        if let Err(e) = shared.probe().await {
            shared.mark_down(&e);
        }
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                if !shared.is_up() {
                    if let Err(e) = shared.probe().await {
                        lock(&shared.health).last_error = Some(e.to_string());
                    }
                }
            }
        });
        Ok(shared)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn fail_closed(&self) -> bool {
        self.fail_closed
    }

    /// For `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        let health = lock(&self.health);
        serde_json::json!({
            "state": if self.is_up() { "connected" } else { "unreachable" },
            "since": period::iso(health.since),
            "last_error": health.last_error,
            "counters": if self.is_up() { "shared" } else if self.fail_closed { "refusing" } else { "local" },
            "owed_spend_totals": lock(&self.owed).len(),
        })
    }

    /// Pays what is owed, then lets requests use Redis again.
    async fn probe(&self) -> Result<(), SharedError> {
        let mut connection = self.connection.clone();
        let _: String = redis::cmd("PING").query_async(&mut connection).await?;
        let owed: Vec<(String, f64)> = lock(&self.owed).drain().collect();
        if !owed.is_empty() {
            if let Err(e) = self.add_spend(&owed).await {
                self.owe(owed);
                return Err(e);
            }
        }
        if !self.up.swap(true, Ordering::AcqRel) {
            *lock(&self.health) = Health {
                since: period::now_ms(),
                last_error: None,
            };
            tracing::info!("redis reachable: replicas share counters again");
        }
        Ok(())
    }

    fn mark_down(&self, error: &SharedError) {
        let was_up = self.up.swap(false, Ordering::AcqRel);
        let mut health = lock(&self.health);
        if was_up {
            health.since = period::now_ms();
            if self.fail_closed {
                tracing::error!(%error, "redis unreachable: calls with budgets or limits get 503 (fail_closed)");
            } else {
                tracing::warn!(%error, "redis unreachable: each replica falls back to its own counters");
            }
        }
        health.last_error = Some(error.to_string());
    }

    /// Asks Redis to admit a call; `Err` means Redis is down (and is now marked so).
    pub async fn admit(&self, asks: &[Ask<'_>], tokens: u64) -> Result<(Verdict, Held), ()> {
        let now_ms = period::now_ms();
        let mut invocation = self.admit.prepare_invoke();
        invocation.arg(tokens).arg(PARALLEL_TTL_MS);
        let mut held = Held::default();
        for ask in asks {
            let name = entity_key(ask.entity);
            let period_start = ask.policy.period_start(now_ms);
            invocation
                .key(spend_key(ask.entity, period_start))
                .key(format!("{PREFIX}:rpm:{name}"))
                .key(format!("{PREFIX}:tpm:{name}"))
                .key(format!("{PREFIX}:parallel:{name}"));
            let ttl = ask
                .policy
                .reset_at(now_ms)
                .map_or(SPEND_IDLE_TTL_MS, |end| end - now_ms + 3_600_000);
            invocation
                .arg(optional(ask.policy.max_budget))
                .arg(ask.local_spend.to_string())
                .arg(ttl.max(1))
                .arg(optional(ask.policy.rpm_limit))
                .arg(optional(ask.policy.tpm_limit))
                .arg(optional(ask.policy.max_parallel_requests));
            if ask.policy.tpm_limit.is_some() {
                held.token_buckets
                    .push((format!("{PREFIX}:tpm:{name}"), tokens));
            }
            if ask.policy.max_parallel_requests.is_some() {
                held.in_flight.push(format!("{PREFIX}:parallel:{name}"));
            }
        }
        let mut connection = self.connection.clone();
        let answer: Vec<String> = match invocation.invoke_async(&mut connection).await {
            Ok(answer) => answer,
            Err(e) => {
                self.mark_down(&e.into());
                return Err(());
            }
        };
        match parse_verdict(asks, answer) {
            Ok(verdict) => {
                if !matches!(verdict, Verdict::Admitted(_)) {
                    held = Held::default();
                }
                Ok((verdict, held))
            }
            Err(e) => {
                self.mark_down(&e);
                Err(())
            }
        }
    }

    /// Adds a finished call's cost to the shared totals in a task of its own; a caller that can
    /// wait for it to land awaits the handle.
    pub fn charge(self: &Arc<Self>, deltas: &[SpendDelta]) -> Option<JoinHandle<()>> {
        let totals: Vec<(String, f64)> = deltas
            .iter()
            .map(|d| (spend_key(&d.entity, d.period_start), d.amount))
            .collect();
        if !self.is_up() {
            self.owe(totals);
            return None;
        }
        let shared = Arc::clone(self);
        spawn(async move {
            if let Err(e) = shared.add_spend(&totals).await {
                shared.mark_down(&e);
                shared.owe(totals);
            }
        })
    }

    async fn add_spend(&self, totals: &[(String, f64)]) -> Result<(), SharedError> {
        let mut invocation = self.charge.prepare_invoke();
        for (key, cost) in totals {
            invocation.key(key).arg(cost.to_string());
        }
        let mut connection = self.connection.clone();
        let _: i64 = invocation.invoke_async(&mut connection).await?;
        Ok(())
    }

    fn owe(&self, totals: Vec<(String, f64)>) {
        let mut owed = lock(&self.owed);
        for (key, cost) in totals {
            *owed.entry(key).or_default() += cost;
        }
    }

    /// Gives back a finished call's unused tokens and its parallel slots.
    pub fn release(self: &Arc<Self>, held: Held, used_tokens: Option<u64>) {
        if held.token_buckets.is_empty() && held.in_flight.is_empty() {
            return;
        }
        let shared = Arc::clone(self);
        spawn(async move {
            let mut invocation = shared.release.prepare_invoke();
            if let Some(used) = used_tokens {
                for (key, reserved) in &held.token_buckets {
                    invocation
                        .key(key)
                        .arg((*reserved as f64 - used as f64).to_string());
                }
            }
            for key in &held.in_flight {
                invocation.key(key).arg("-");
            }
            let mut connection = shared.connection.clone();
            if let Err(e) = invocation.invoke_async::<i64>(&mut connection).await {
                shared.mark_down(&e.into());
            }
        });
    }

    /// Tells the other replicas of a change; they hear it through [`Shared::watch`].
    pub async fn publish(&self, channel: &str, message: &str) {
        let mut connection = self.connection.clone();
        if let Err(e) = connection.publish::<_, _, i64>(channel, message).await {
            tracing::warn!(error = %e, "cannot announce a change through redis");
        }
    }

    /// Hands every message on `channel` to `heard`, for as long as `alive` says; after a lost
    /// subscription `heard(None)`, since messages may have been missed.
    pub async fn watch(
        &self,
        channel: &str,
        alive: impl Fn() -> bool,
        heard: impl Fn(Option<&str>),
    ) {
        use futures_util::StreamExt;
        while alive() {
            match self.client.get_async_pubsub().await {
                Ok(mut pubsub) => {
                    if pubsub.subscribe(channel).await.is_ok() {
                        let mut messages = pubsub.on_message();
                        while let Some(message) = messages.next().await {
                            if let Ok(text) = message.get_payload::<String>() {
                                heard(Some(&text));
                            }
                        }
                    }
                    heard(None);
                }
                Err(e) => tracing::debug!(error = %e, "cannot subscribe to redis"),
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }
}

fn parse_verdict(asks: &[Ask<'_>], answer: Vec<String>) -> Result<Verdict, SharedError> {
    let malformed = || SharedError::Malformed(answer.clone());
    let number = |text: &str| text.parse::<f64>().map_err(|_| malformed());
    let bucket = |text: &str, limit: Option<u64>| -> Result<Option<Allowance>, SharedError> {
        match (limit, text) {
            (Some(limit), level) if !level.is_empty() => {
                Ok(Some(Allowance::at_level(limit, number(level)?)))
            }
            _ => Ok(None),
        }
    };
    let index = |text: &str| -> Result<usize, SharedError> {
        text.parse::<usize>()
            .ok()
            .filter(|i| *i < asks.len())
            .ok_or_else(malformed)
    };
    match answer.first().map(String::as_str) {
        Some("ok") if answer.len() == 1 + 3 * asks.len() => {
            let standings = asks
                .iter()
                .zip(answer[1..].chunks(3))
                .map(|(ask, part)| {
                    Ok(Standing {
                        spend: number(&part[0])?,
                        requests: bucket(&part[1], ask.policy.rpm_limit)?,
                        tokens: bucket(&part[2], ask.policy.tpm_limit)?,
                    })
                })
                .collect::<Result<_, SharedError>>()?;
            Ok(Verdict::Admitted(standings))
        }
        Some("budget") if answer.len() == 3 => Ok(Verdict::OverBudget {
            index: index(&answer[1])?,
            spend: number(&answer[2])?,
        }),
        Some("limit") if answer.len() == 7 => {
            let i = index(&answer[1])?;
            let policy = asks[i].policy;
            let what = match answer[2].as_str() {
                "parallel" => "parallel requests",
                "requests" => "requests per minute",
                "tokens" => "tokens per minute",
                _ => return Err(malformed()),
            };
            Ok(Verdict::Limited {
                index: i,
                refusal: Refusal {
                    what,
                    limit: number(&answer[3])? as u64,
                    retry_after: Duration::from_millis(number(&answer[4])? as u64),
                },
                standing: Standing {
                    spend: 0.0,
                    requests: bucket(&answer[5], policy.rpm_limit)?,
                    tokens: bucket(&answer[6], policy.tpm_limit)?,
                },
            })
        }
        _ => Err(malformed()),
    }
}

fn spend_key(entity: &EntityId, period_start: i64) -> String {
    format!("{PREFIX}:spend:{}:{period_start}", entity_key(entity))
}

fn entity_key(entity: &EntityId) -> String {
    format!("{}:{}", entity.kind.noun(), entity.id)
}

fn optional<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) -> Option<JoinHandle<()>> {
    // Drops can run outside the runtime (at exit); then there is nothing left to tell Redis.
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    Some(runtime.spawn(task))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governance::limits::Kind;

    fn answer(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn verdicts_read_back_per_entity() {
        let key = EntityId::new(Kind::Key, "k");
        let team = EntityId::new(Kind::Team, "t");
        let limited = Policy {
            rpm_limit: Some(60),
            ..Policy::default()
        };
        let plain = Policy::default();
        let asks = [
            Ask {
                entity: &key,
                policy: &limited,
                local_spend: 0.0,
            },
            Ask {
                entity: &team,
                policy: &plain,
                local_spend: 0.0,
            },
        ];
        let admitted = parse_verdict(&asks, answer(&["ok", "0.5", "59", "", "2", "", ""]));
        let Ok(Verdict::Admitted(standings)) = admitted else {
            panic!("admitted: {admitted:?}");
        };
        assert_eq!(standings[0].spend, 0.5);
        assert_eq!(standings[0].requests.map(|a| a.remaining), Some(59));
        assert_eq!((standings[1].spend, standings[1].requests), (2.0, None));

        let over = parse_verdict(&asks, answer(&["budget", "1", "3.25"]));
        assert!(matches!(over, Ok(Verdict::OverBudget { index: 1, spend }) if spend == 3.25));

        let limited = parse_verdict(
            &asks,
            answer(&["limit", "0", "requests", "60", "1500", "0", ""]),
        );
        let Ok(Verdict::Limited { index, refusal, .. }) = limited else {
            panic!("limited: {limited:?}");
        };
        assert_eq!(index, 0);
        assert_eq!(refusal.what, "requests per minute");
        assert_eq!(refusal.retry_after, Duration::from_millis(1500));
    }

    #[test]
    fn a_garbled_answer_is_an_error_not_a_verdict() {
        let key = EntityId::new(Kind::Key, "k");
        let policy = Policy::default();
        let asks = [Ask {
            entity: &key,
            policy: &policy,
            local_spend: 0.0,
        }];
        for words in [
            &["ok"][..],
            &["budget", "7", "1"],
            &["limit", "0", "weather", "1", "1", "", ""],
            &["ok", "lots", "", ""],
            &[],
        ] {
            assert!(parse_verdict(&asks, answer(words)).is_err(), "{words:?}");
        }
    }
}
