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
/// Each call in flight holds a slot with a deadline: if its replica dies before giving it back, the
/// slot frees itself this long after the call began.
const SLOT_TTL_MS: i64 = 600_000;
const PREFIX: &str = "portcullis";

/// Checks every budget and limit of a call and takes what it needs only if all allow it.
///
/// KEYS, four per entity: spend, request bucket, token bucket, slots of calls in flight (a sorted
/// set of call ids by deadline).
/// ARGV: the call's tokens, a slot's time to live, the call's id, then six per entity: max budget,
/// spend to start from if Redis has none, that total's time to live, rpm, tpm, parallel (empty:
/// none).
const ADMIT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local tokens = tonumber(ARGV[1])
local n = #KEYS / 4
local function arg(i, field)
  local v = ARGV[4 + 6 * i + field]
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
-- A bucket is kept until it would be full again (an overdraft included), and a minute more.
local function until_full(lvl, cap)
  if cap == 0 then return 120000 end
  return math.ceil(math.max(0, cap - lvl) * 60000 / cap) + 60000
end
local spends, requests, toks = {}, {}, {}
for i = 0, n - 1 do
  local key = KEYS[4 * i + 1]
  local spend = redis.call('GET', key)
  if not spend then
    spend = ARGV[4 + 6 * i + 1]
    redis.call('SET', key, spend)
  end
  redis.call('PEXPIRE', key, ARGV[4 + 6 * i + 2])
  spends[i + 1] = spend
  local max = arg(i, 0)
  if max and tonumber(spend) >= max then return {'budget', tostring(i), spend} end
end
for i = 0, n - 1 do
  local rpm, tpm, parallel = arg(i, 3), arg(i, 4), arg(i, 5)
  requests[i + 1] = rpm and level(KEYS[4 * i + 2], rpm)
  toks[i + 1] = tpm and level(KEYS[4 * i + 3], tpm)
  local refused = false
  if parallel then
    redis.call('ZREMRANGEBYSCORE', KEYS[4 * i + 4], '-inf', now)
    if redis.call('ZCARD', KEYS[4 * i + 4]) >= parallel then
      refused = {'parallel', parallel, 1000}
    end
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
    redis.call('PEXPIRE', KEYS[4 * i + 2], until_full(requests[i + 1], rpm))
  end
  if tpm then
    toks[i + 1] = toks[i + 1] - tokens
    redis.call('HSET', KEYS[4 * i + 3], 'level', tostring(toks[i + 1]), 'at', now)
    redis.call('PEXPIRE', KEYS[4 * i + 3], until_full(toks[i + 1], tpm))
  end
  if parallel then
    redis.call('ZADD', KEYS[4 * i + 4], now + tonumber(ARGV[2]), ARGV[3])
    redis.call('PEXPIRE', KEYS[4 * i + 4], ARGV[2])
  end
  out[#out + 1] = spends[i + 1]
  out[#out + 1] = show(requests[i + 1])
  out[#out + 1] = show(toks[i + 1])
end
return out
";

/// What a finished call gives back, one operation per key, named by ARGV's first letter:
/// `s` adds spend to a total (a missing one is seeded later from the local counters, which
/// already hold it), `t` gives tokens back to a bucket, `z` frees the call's slot.
const SETTLE: &str = r"
for i, key in ipairs(KEYS) do
  local op, value = string.sub(ARGV[i], 1, 1), string.sub(ARGV[i], 2)
  if op == 'z' then
    redis.call('ZREM', key, value)
  elseif redis.call('EXISTS', key) == 1 then
    if op == 's' then
      redis.call('INCRBYFLOAT', key, value)
    elseif op == 't' then
      redis.call('HINCRBYFLOAT', key, 'level', value)
    end
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
    /// What calls gave back while Redis was down, given to it when it is back.
    owed: Mutex<Owed>,
    admit: Script,
    settle: Script,
}

#[derive(Debug, Default)]
struct Owed {
    /// Spend per total.
    spend: HashMap<String, f64>,
    /// Slots of calls that ended meanwhile, by key and call id.
    slots: Vec<(String, String)>,
}

impl Owed {
    fn add(&mut self, ops: Vec<(String, String)>) {
        for (key, op) in ops {
            match op.split_at(1) {
                ("s", amount) => {
                    *self.spend.entry(key).or_default() += amount.parse::<f64>().unwrap_or(0.0)
                }
                ("z", member) => self.slots.push((key, member.to_owned())),
                // A bucket's correction is worth less than the minute it would apply to.
                _ => {}
            }
        }
    }

    fn take(&mut self) -> Vec<(String, String)> {
        let spend = self
            .spend
            .drain()
            .map(|(key, amount)| (key, format!("s{amount}")));
        let slots = self
            .slots
            .drain(..)
            .map(|(key, member)| (key, format!("z{member}")));
        spend.chain(slots).collect()
    }
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
    call_id: String,
    token_buckets: Vec<(String, u64)>,
    slots: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis answered an admission with {0:?}")]
    Malformed(Vec<String>),
    #[error("redis did not answer within {RESPONSE_TIMEOUT:?}")]
    Timeout,
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
            owed: Mutex::new(Owed::default()),
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
        });
        if let Err(e) = shared.probe().await {
            if fail_closed {
                tracing::error!(error = %e, "redis unreachable at start: calls with budgets or limits get 503 (fail_closed) until it answers");
            } else {
                tracing::warn!(error = %e, "redis unreachable at start: counting on this replica alone until it answers");
            }
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
            "owed_spend_totals": lock(&self.owed).spend.len(),
        })
    }

    /// Pays what is owed, then lets requests use Redis again.
    async fn probe(&self) -> Result<(), SharedError> {
        let mut connection = self.connection.clone();
        let _: String = redis::cmd("PING").query_async(&mut connection).await?;
        loop {
            let owed = {
                let mut owed = lock(&self.owed);
                let ops = owed.take();
                if ops.is_empty() {
                    // Under the lock: a call settling now either sees Redis up or is owed and
                    // paid by this loop, never left behind.
                    if !self.up.swap(true, Ordering::AcqRel) {
                        *lock(&self.health) = Health {
                            since: period::now_ms(),
                            last_error: None,
                        };
                        tracing::info!("redis reachable: replicas share counters");
                    }
                    return Ok(());
                }
                ops
            };
            if let Err(e) = self.run_settle(&owed).await {
                lock(&self.owed).add(owed);
                return Err(e);
            }
        }
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
    pub async fn admit(
        &self,
        call_id: &str,
        asks: &[Ask<'_>],
        tokens: u64,
    ) -> Result<(Verdict, Held), ()> {
        let now_ms = period::now_ms();
        let mut invocation = self.admit.prepare_invoke();
        invocation.arg(tokens).arg(SLOT_TTL_MS).arg(call_id);
        let mut held = Held {
            call_id: call_id.to_owned(),
            ..Held::default()
        };
        for ask in asks {
            let name = entity_key(ask.entity);
            let period_start = ask.policy.period_start(now_ms);
            let tokens_key = format!("{PREFIX}:tpm:{name}");
            let slots_key = format!("{PREFIX}:slots:{name}");
            invocation
                .key(spend_key(ask.entity, period_start))
                .key(format!("{PREFIX}:rpm:{name}"))
                .key(&tokens_key)
                .key(&slots_key);
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
                held.token_buckets.push((tokens_key, tokens));
            }
            if ask.policy.max_parallel_requests.is_some() {
                held.slots.push(slots_key);
            }
        }
        let mut connection = self.connection.clone();
        let answer = match within(invocation.invoke_async::<Vec<String>>(&mut connection)).await {
            Ok(answer) => answer,
            Err(e) => {
                self.mark_down(&e);
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

    /// Adds a finished call's cost to the shared totals and gives back what it held (its unused
    /// tokens, with `used_tokens`, and its slots), in one round trip in a task of its own; a
    /// caller that can wait for it to land awaits the handle.
    pub fn settle(
        self: &Arc<Self>,
        deltas: &[SpendDelta],
        held: Option<Held>,
        used_tokens: Option<u64>,
    ) -> Option<JoinHandle<()>> {
        let mut ops: Vec<(String, String)> = deltas
            .iter()
            .map(|d| {
                (
                    spend_key(&d.entity, d.period_start),
                    format!("s{}", d.amount),
                )
            })
            .collect();
        if let Some(held) = held {
            if let Some(used) = used_tokens {
                for (key, reserved) in held.token_buckets {
                    ops.push((key, format!("t{}", reserved as f64 - used as f64)));
                }
            }
            for key in held.slots {
                ops.push((key, format!("z{}", held.call_id)));
            }
        }
        if ops.is_empty() {
            return None;
        }
        {
            // Checked under the lock the probe flips it under (see `probe`).
            let mut owed = lock(&self.owed);
            if !self.is_up() {
                owed.add(ops);
                return None;
            }
        }
        let shared = Arc::clone(self);
        spawn(async move {
            if let Err(e) = shared.run_settle(&ops).await {
                shared.mark_down(&e);
                lock(&shared.owed).add(ops);
            }
        })
    }

    async fn run_settle(&self, ops: &[(String, String)]) -> Result<(), SharedError> {
        let mut invocation = self.settle.prepare_invoke();
        for (key, op) in ops {
            invocation.key(key).arg(op);
        }
        let mut connection = self.connection.clone();
        within(invocation.invoke_async::<i64>(&mut connection))
            .await
            .map(drop)
    }

    /// Tells the other replicas of a change; they hear it through [`Shared::watch`].
    pub async fn publish(&self, channel: &str, message: &str) {
        if !self.is_up() {
            // Replicas that miss it drop their caches when their subscription comes back.
            return;
        }
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
        let mut lost = false;
        while alive() {
            let subscribed = match self.client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(channel).await {
                    Ok(()) => Ok(pubsub),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match subscribed {
                Ok(mut pubsub) => {
                    // Only now: a change made before this subscription is in the store already.
                    if lost {
                        heard(None);
                    }
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        if let Ok(text) = message.get_payload::<String>() {
                            heard(Some(&text));
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot subscribe to redis"),
            }
            lost = true;
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

/// A Redis call bounded by [`RESPONSE_TIMEOUT`], reconnecting included, which the connection's
/// own timeouts do not cover.
async fn within<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, SharedError> {
    match tokio::time::timeout(RESPONSE_TIMEOUT, call).await {
        Ok(result) => result.map_err(SharedError::from),
        Err(_) => Err(SharedError::Timeout),
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
