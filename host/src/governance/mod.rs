//! Governance: stored keys with their teams and users, budgets, rate limits and spend.
//!
//! The store ([`store`]) is the record; the request path never waits on it for a key it has seen.
//! Resolved keys live in a cache here, which the management routes ([`api`]) invalidate on every
//! change and a TTL refreshes in the background. Counters ([`limits`]) live in memory, one set per
//! key, team and user, kept across cache refreshes. Spend is added to them before a response is
//! sent, so the very next request sees it, and reaches the store in batches once a second and on
//! shutdown.
//!
//! Replicas share one store (Postgres) and, optionally, Redis ([`shared`]): then the counters that
//! must hold across replicas (spend, rate limits, calls in flight) are kept there too, and every
//! change is announced to the other replicas ([`changes`]).

pub mod api;
pub mod changes;
pub mod limits;
pub mod period;
pub mod secret;
pub mod shared;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use tokio::time::Instant;

use crate::call::{Call, Outcome};
use crate::config::StoreConfig;
use crate::error::GatewayError;
use crate::pipeline::authenticate::Principal;
use changes::Change;
use limits::{Allowance, EntityId, EntityState, Kind, Refusal, Taken};
use shared::{Ask, Held, Shared, Standing, Verdict};
use store::{KeyRecord, Policy, SpendBatch, SpendDelta, SpendRow, Store, StoreError, StoredSpend};

/// How long a resolved key is served before it is re-read in the background, in case a change
/// made elsewhere did not reach this process.
const CACHE_TTL: Duration = Duration::from_secs(30);
/// Spend log rows queued for an unreachable store at most (a few hundred bytes each).
const MAX_PENDING_ROWS: usize = 200_000;
/// Keys that do not exist are remembered too (so guessing costs no query), but not without bound.
const MAX_REFUSED_ENTRIES: usize = 100_000;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot use store.redis_url: {0}")]
    Redis(#[from] shared::SharedError),
    #[error("the operating system's random source failed: {0}")]
    Random(getrandom::Error),
}

/// The governance of one gateway process; shared by every generation.
#[derive(Debug)]
pub struct Governance {
    store: Store,
    /// Counters shared with other replicas, when `store.redis_url` is set.
    shared: Option<Arc<Shared>>,
    /// Names this process in the changes it announces, so it can skip its own.
    origin: String,
    budget_exceeded_status: StatusCode,
    cache: RwLock<HashMap<String, Cached>>,
    states: Mutex<HashMap<EntityId, Arc<EntityState>>>,
    pending: Mutex<Pending>,
    /// One flush at a time: the periodic one and the one at shutdown must not interleave.
    flushing: tokio::sync::Mutex<()>,
    /// Odd while a flush has taken spend from the queue and not yet written (or restored) it; a
    /// load syncs spend only if no flush overlapped its reads.
    flushes: AtomicU64,
    /// Bumped by every change applied: a load that overlapped one does not cache what it read.
    changes: AtomicU64,
}

#[derive(Debug, Clone)]
struct Cached {
    at: Instant,
    found: Found,
}

#[derive(Debug, Clone)]
enum Found {
    Key(Arc<Principal>),
    Refused(&'static str),
}

#[derive(Debug, Default)]
struct Pending {
    rows: Vec<SpendRow>,
    deltas: Vec<SpendDelta>,
    /// Spend log rows given up while the store was unreachable, since start.
    dropped_rows: u64,
}

impl Pending {
    /// Keeps the queue bounded while the store is unreachable: the oldest spend log rows go
    /// first, and the totals' deltas are merged (one per entity and period), so the totals
    /// stay exact however long the outage lasts.
    fn bound(&mut self, max_rows: usize) {
        if self.rows.len() > max_rows {
            let excess = self.rows.len() - max_rows;
            self.rows.drain(..excess);
            let before = self.dropped_rows;
            self.dropped_rows += excess as u64;
            // Now and then, not once per row.
            if (before + 1..=self.dropped_rows).any(u64::is_power_of_two) {
                tracing::error!(
                    dropped = self.dropped_rows,
                    "spend log rows dropped: the store has been unreachable too long to queue them all"
                );
            }
        }
        if self.deltas.len() > max_rows {
            self.deltas = merge(std::mem::take(&mut self.deltas));
        }
    }
}

/// What a stored key brings to a call: its expiry and, key first, the policies and counters of the
/// key, its team and its user.
#[derive(Debug)]
pub struct Governed {
    pub key_id: String,
    pub expires_at: Option<i64>,
    pub entities: Vec<(Policy, Arc<EntityState>)>,
}

impl Governed {
    /// Whether a token limit needs the call's size estimated.
    pub fn limits_tokens(&self) -> bool {
        self.entities.iter().any(|(p, _)| p.tpm_limit.is_some())
    }
}

/// An admitted call's hold on its limits: the parallel slots it takes are freed when it drops.
#[derive(Debug)]
pub struct Admission {
    taken: Vec<(Arc<EntityState>, Taken)>,
    /// What the call holds in Redis instead, when the counters are shared; given back with its
    /// cost when it is charged, or on drop if it never is.
    held: Mutex<Option<(Arc<Shared>, Held)>>,
    used_tokens: Mutex<Option<u64>>,
}

impl Admission {
    fn new() -> Admission {
        Admission {
            taken: Vec::new(),
            held: Mutex::new(None),
            used_tokens: Mutex::new(None),
        }
    }

    /// Replaces the token reservation by the call's real usage.
    pub fn settle(&self, used_tokens: u64) {
        for (state, taken) in &self.taken {
            if taken.tokens() > 0 {
                state.settle_tokens(taken.tokens(), used_tokens);
            }
        }
        *lock(&self.used_tokens) = Some(used_tokens);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        for (state, taken) in &self.taken {
            state.end_call(*taken);
        }
        if let Some((shared, held)) = lock(&self.held).take() {
            shared.settle(&[], Some(held), *lock(&self.used_tokens));
        }
    }
}

impl Governance {
    /// Opens the store (and Redis, if configured) and starts the spend writer and the change
    /// listeners on the current tokio runtime.
    pub async fn start(
        database_url: &str,
        settings: &StoreConfig,
    ) -> Result<Arc<Governance>, StartError> {
        let store = Store::open(database_url).await?;
        let shared = match &settings.redis_url {
            Some(url) => Some(Shared::start(url, settings.fail_closed).await?),
            None => None,
        };
        let governance = Arc::new(Governance {
            store,
            shared,
            origin: secret::generate_id().map_err(StartError::Random)?,
            budget_exceeded_status: StatusCode::from_u16(settings.budget_exceeded_status)
                .unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            cache: RwLock::new(HashMap::new()),
            states: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            flushing: tokio::sync::Mutex::new(()),
            flushes: AtomicU64::new(0),
            changes: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&governance);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(governance) = weak.upgrade() else {
                    return;
                };
                governance.flush().await;
            }
        });
        if governance.store.engine() == "postgres" {
            tokio::spawn(changes::listen_postgres(
                Arc::downgrade(&governance),
                database_url.to_owned(),
            ));
        }
        if let Some(shared) = &governance.shared {
            let shared = Arc::clone(shared);
            let weak = Arc::downgrade(&governance);
            tokio::spawn(async move {
                let alive = || weak.strong_count() > 0;
                shared
                    .watch(changes::CHANNEL, alive, |message| {
                        changes::heard(&weak, message)
                    })
                    .await;
            });
        }
        Ok(governance)
    }

    /// This process's name in the changes it announces.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Applies changes here and announces them to the other replicas before returning, so a
    /// management call's answer means every replica has been told.
    pub async fn announce(&self, changes: &[Change]) {
        for change in changes {
            self.apply(change);
            let message = change.encode(&self.origin);
            if let Err(e) = self.store.notify(changes::CHANNEL, &message).await {
                tracing::warn!(error = %e, "cannot announce a change through the store");
            }
            if let Some(shared) = &self.shared {
                shared.publish(changes::CHANNEL, &message).await;
            }
        }
    }

    /// Applies a change made here or announced by another replica.
    pub fn apply(&self, change: &Change) {
        let mut cache = write(&self.cache);
        // Under the cache's lock, so a load either sees the count move or inserts before this.
        self.changes.fetch_add(1, Ordering::SeqCst);
        match change {
            Change::Key(token) => {
                cache.remove(token);
            }
            Change::Deleted(entity) => {
                lock(&self.states).remove(entity);
            }
            Change::Everything => cache.clear(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// For `/admin/status`: the engine, keys cached, and spend rows not yet written.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "database": self.store.engine(),
            "cached_keys": read(&self.cache).len(),
            "pending_spend_rows": lock(&self.pending).rows.len(),
            "dropped_spend_rows": lock(&self.pending).dropped_rows,
            "redis": self.shared.as_ref().map(|shared| shared.status()),
        })
    }

    /// The caller of a stored key, from the cache or, the first time, the store.
    pub async fn resolve(self: &Arc<Self>, key: &str) -> Result<Arc<Principal>, GatewayError> {
        let token = secret::hash_key(key);
        let now = Instant::now();
        let cached = read(&self.cache).get(&token).cloned();
        let found = match cached {
            Some(cached) if now.duration_since(cached.at) < CACHE_TTL => cached.found,
            Some(cached) => {
                // Serve what we have; one background task re-reads it (the fresh timestamp
                // keeps other requests from starting their own).
                write(&self.cache).insert(
                    token.clone(),
                    Cached {
                        at: now,
                        found: cached.found.clone(),
                    },
                );
                let governance = Arc::clone(self);
                tokio::spawn(async move {
                    if let Err(e) = governance.load(&token).await {
                        tracing::warn!(error = %e, "cannot refresh a cached key");
                    }
                });
                cached.found
            }
            None => self.load(&token).await.map_err(|e| {
                tracing::warn!(error = %e, "cannot look up a key");
                GatewayError::Unavailable("the key store is unavailable; try again".into())
            })?,
        };
        match found {
            Found::Key(principal) => {
                let expired = principal
                    .governed
                    .as_ref()
                    .and_then(|g| g.expires_at)
                    .is_some_and(|at| at <= period::now_ms());
                if expired {
                    return Err(GatewayError::Unauthorized(
                        "this API key has expired".into(),
                    ));
                }
                Ok(principal)
            }
            Found::Refused(why) => Err(GatewayError::Unauthorized(why.into())),
        }
    }

    /// Reads a key (with its team and user) from the store into the cache, and brings their
    /// counters' spend in line with the store's totals.
    async fn load(&self, token: &str) -> Result<Found, StoreError> {
        let flushes = self.flushes.load(Ordering::SeqCst);
        let changes = self.changes.load(Ordering::SeqCst);
        let found = match self.store.key_by_token(token).await? {
            None => Found::Refused("invalid API key"),
            Some(key) if key.deleted_at.is_some() => Found::Refused("this API key was deleted"),
            Some(key) if key.blocked => Found::Refused("this API key is blocked"),
            Some(key) => {
                let team = match &key.team_id {
                    Some(id) => self.store.team(id).await?,
                    None => None,
                };
                let user = match &key.user_id {
                    Some(id) => self.store.user(id).await?,
                    None => None,
                };
                if team.as_ref().is_some_and(|t| t.blocked) {
                    Found::Refused("this API key's team is blocked")
                } else {
                    Found::Key(Arc::new(self.principal(key, team, user, flushes)))
                }
            }
        };
        let mut cache = write(&self.cache);
        if self.changes.load(Ordering::SeqCst) != changes {
            // What was read may predate the change: serve it to this request only.
            return Ok(found);
        }
        if matches!(found, Found::Refused(_)) && cache.len() >= MAX_REFUSED_ENTRIES {
            cache.retain(|_, c| matches!(c.found, Found::Key(_)));
        }
        cache.insert(
            token.to_owned(),
            Cached {
                at: Instant::now(),
                found: found.clone(),
            },
        );
        Ok(found)
    }

    fn principal(
        &self,
        key: KeyRecord,
        team: Option<store::TeamRecord>,
        user: Option<store::UserRecord>,
        flushes: u64,
    ) -> Principal {
        let mut entities = vec![(
            key.policy.clone(),
            self.state(Kind::Key, &key.id, &key.policy, key.spend, flushes),
        )];
        if let Some(team) = &team {
            entities.push((
                team.policy.clone(),
                self.state(Kind::Team, &team.team_id, &team.policy, team.spend, flushes),
            ));
        }
        if let Some(user) = &user {
            entities.push((
                user.policy.clone(),
                self.state(Kind::User, &user.user_id, &user.policy, user.spend, flushes),
            ));
        }
        // A model must be allowed by every one of key, team and user that lists models.
        let models = entities
            .iter()
            .filter_map(|(policy, _)| policy.models.as_ref())
            .fold(None::<std::collections::HashSet<String>>, |acc, list| {
                let list: std::collections::HashSet<String> = list.iter().cloned().collect();
                Some(match acc {
                    None => list,
                    Some(acc) => acc.intersection(&list).cloned().collect(),
                })
            });
        Principal {
            alias: key.key_alias.clone(),
            team: key.team_id.clone(),
            user: key.user_id.clone(),
            token: Some(key.token.clone()),
            models,
            guardrails: key.guardrails.clone(),
            is_master: false,
            governed: Some(Governed {
                key_id: key.id,
                expires_at: key.expires_at,
                entities,
            }),
        }
    }

    /// The live counters of an entity, their spend set from the store's total (every replica's
    /// flushed spend) plus this process's spend not yet written, unless a flush overlapped the
    /// read of `stored` (`flushes` is the count from before it): then the two could overlap or
    /// leave a gap, and the next load syncs instead.
    fn state(
        &self,
        kind: Kind,
        id: &str,
        policy: &Policy,
        stored: StoredSpend,
        flushes: u64,
    ) -> Arc<EntityState> {
        let entity = EntityId::new(kind, id);
        let now_ms = period::now_ms();
        let unflushed = self.unflushed(&entity, policy.period_start(now_ms));
        let state = Arc::clone(lock(&self.states).entry(entity.clone()).or_insert_with(|| {
            Arc::new(EntityState::new(entity, stored.spend, stored.period_start))
        }));
        if flushes.is_multiple_of(2) && self.flushes.load(Ordering::SeqCst) == flushes {
            state.sync_spend(policy, stored, unflushed, now_ms);
        }
        state
    }

    /// This process's spend of an entity in a period, queued but not yet written.
    fn unflushed(&self, entity: &EntityId, period_start: i64) -> f64 {
        lock(&self.pending)
            .deltas
            .iter()
            .filter(|d| d.entity == *entity && d.period_start == period_start)
            .map(|d| d.amount)
            .sum()
    }

    /// An entity's spend in its current period: the larger of the live counter and the store's
    /// `stored` total plus what is queued here (each can lag the other by a flush).
    pub fn spend_of(&self, kind: Kind, id: &str, policy: &Policy, stored: StoredSpend) -> f64 {
        let entity = EntityId::new(kind, id);
        let now = period::now_ms();
        let current = policy.period_start(now);
        let written = if stored.period_start < current {
            0.0
        } else {
            stored.spend
        };
        let from_store = written + self.unflushed(&entity, current);
        match lock(&self.states).get(&entity) {
            Some(state) => state.spend(policy, now).max(from_store),
            None => from_store,
        }
    }

    /// Checks budgets and takes rate-limit allowances for a call, key first, then team and user:
    /// in Redis when the counters are shared and it is reachable, here otherwise. Sets the call's
    /// `x-ratelimit-*` and spend headers either way.
    pub async fn admit(
        &self,
        call: &mut Call,
        governed: &Governed,
        tokens: u64,
    ) -> Result<Admission, GatewayError> {
        let now_ms = period::now_ms();
        // This process's own spend counts at once, even before Redis has it.
        let spends: Vec<f64> = governed
            .entities
            .iter()
            .map(|(policy, state)| state.spend(policy, now_ms))
            .collect();
        if let Some(refused) = self.over_budget(call, governed, &spends) {
            return Err(refused);
        }
        let Some(shared) = &self.shared else {
            return self.admit_here(call, governed, &spends, tokens);
        };
        if shared.is_up() {
            let asks: Vec<Ask<'_>> = governed
                .entities
                .iter()
                .zip(&spends)
                .map(|((policy, state), spend)| Ask {
                    entity: &state.id,
                    policy,
                    local_spend: *spend,
                })
                .collect();
            // On an error Redis is marked down, and the call is decided as the next ones are.
            if let Ok((verdict, held)) = shared.admit(&call.id, &asks, tokens).await {
                return self.decide_shared(call, governed, spends, shared, verdict, held);
            }
        }
        if shared.fail_closed() && governed.entities.iter().any(|(p, _)| p.is_limited()) {
            return Err(GatewayError::Unavailable(
                "the shared counters (Redis) are unreachable and store.fail_closed is set; \
                 try again"
                    .into(),
            ));
        }
        self.admit_here(call, governed, &spends, tokens)
    }

    /// Turns Redis's verdict into an admission or a refusal, with the headers.
    fn decide_shared(
        &self,
        call: &mut Call,
        governed: &Governed,
        mut spends: Vec<f64>,
        shared: &Arc<Shared>,
        verdict: Verdict,
        held: Held,
    ) -> Result<Admission, GatewayError> {
        match verdict {
            // Redis checked the budgets against its spend, and `admit` against the local one.
            Verdict::Admitted(standings) => {
                for (spend, standing) in spends.iter_mut().zip(&standings) {
                    *spend = spend.max(standing.spend);
                }
                push_spend_headers(call, governed, &spends);
                if let Some((_, standing)) = governed
                    .entities
                    .iter()
                    .zip(&standings)
                    .find(|((policy, _), _)| policy.has_rate_limits())
                {
                    push_standing(call, standing);
                }
                let admission = Admission::new();
                *lock(&admission.held) = Some((Arc::clone(shared), held));
                Ok(admission)
            }
            Verdict::OverBudget { index, spend } => {
                spends[index] = spends[index].max(spend);
                push_spend_headers(call, governed, &spends);
                Err(self.budget_error(&governed.entities[index], spends[index]))
            }
            Verdict::Limited {
                index,
                refusal,
                standing,
            } => {
                push_spend_headers(call, governed, &spends);
                push_standing(call, &standing);
                Err(rate_limited(governed.entities[index].1.id.kind, &refusal))
            }
        }
    }

    /// The refusal for the first of key, team and user at or over its budget, with the spend
    /// headers set; `None` if all are within budget.
    fn over_budget(
        &self,
        call: &mut Call,
        governed: &Governed,
        spends: &[f64],
    ) -> Option<GatewayError> {
        let (entity, spend) = governed
            .entities
            .iter()
            .zip(spends)
            .find(|((policy, _), spend)| policy.max_budget.is_some_and(|max| **spend >= max))?;
        push_spend_headers(call, governed, spends);
        Some(self.budget_error(entity, *spend))
    }

    fn budget_error(
        &self,
        (policy, state): &(Policy, Arc<EntityState>),
        spend: f64,
    ) -> GatewayError {
        GatewayError::BudgetExceeded {
            message: format!(
                "budget exceeded for this {}: spend {spend} of max_budget {}",
                state.id.kind.noun(),
                policy.max_budget.unwrap_or_default()
            ),
            status: self.budget_exceeded_status,
        }
    }

    /// Takes the rate-limit allowances from this process's counters.
    fn admit_here(
        &self,
        call: &mut Call,
        governed: &Governed,
        spends: &[f64],
        tokens: u64,
    ) -> Result<Admission, GatewayError> {
        push_spend_headers(call, governed, spends);
        let now = Instant::now();
        let mut admission = Admission::new();
        for (policy, state) in &governed.entities {
            if !policy.has_rate_limits() {
                continue;
            }
            match state.take(policy, tokens, now) {
                Ok(taken) => admission.taken.push((Arc::clone(state), taken)),
                Err(refusal) => {
                    for (state, taken) in admission.taken.drain(..) {
                        state.give_back(taken);
                    }
                    push_allowances(call, state.allowances(policy, now));
                    return Err(rate_limited(state.id.kind, &refusal));
                }
            }
        }
        // The headers describe the first of key, team and user that has limits.
        if let Some((policy, state)) = governed
            .entities
            .iter()
            .find(|(policy, _)| policy.has_rate_limits())
        {
            push_allowances(call, state.allowances(policy, now));
        }
        Ok(admission)
    }

    /// Counts a finished call's cost against its key, team and user, now, and queues its spend
    /// row for the store. The shared totals in Redis are charged in the background; the handle
    /// says when that has landed.
    pub fn charge(&self, call: &Call, outcome: &Outcome) -> Option<tokio::task::JoinHandle<()>> {
        let Some(principal) = &call.principal else {
            return None;
        };
        let now_ms = period::now_ms();
        let mut deltas = Vec::new();
        if let Some(governed) = &principal.governed {
            if call.cost > 0.0 {
                for (policy, state) in &governed.entities {
                    let period_start = state.add_spend(policy, call.cost, now_ms);
                    deltas.push(SpendDelta {
                        entity: state.id.clone(),
                        period_start,
                        amount: call.cost,
                    });
                }
            }
        }
        // The cost and what the call held in Redis go back in one round trip.
        let held = call
            .admission
            .as_ref()
            .and_then(|admission| lock(&admission.held).take());
        let used_tokens = call.usage.map(|usage| usage.total_tokens);
        let charging = self
            .shared
            .as_ref()
            .and_then(|shared| shared.settle(&deltas, held.map(|(_, held)| held), used_tokens));
        let usage = call.usage.unwrap_or_default();
        let row = SpendRow {
            request_id: call.id.clone(),
            api_key: principal.token.clone().unwrap_or_default(),
            key_alias: principal.alias.clone(),
            spend: call.cost,
            prompt_tokens: saturating(usage.prompt_tokens),
            completion_tokens: saturating(usage.completion_tokens),
            total_tokens: saturating(usage.total_tokens),
            model: call
                .deployment
                .as_ref()
                .map(|d| d.upstream.model.clone())
                .unwrap_or_default(),
            model_group: call.model.clone(),
            model_id: call
                .deployment
                .as_ref()
                .map(|d| d.id.clone())
                .unwrap_or_default(),
            user_id: principal.user.clone(),
            team_id: principal.team.clone(),
            end_user: call.end_user.clone(),
            start_time: period::unix_ms(call.received_at),
            end_time: now_ms,
            status: if *outcome == Outcome::Success {
                "success"
            } else {
                "failure"
            },
        };
        let mut pending = lock(&self.pending);
        pending.rows.push(row);
        pending.deltas.extend(deltas);
        pending.bound(MAX_PENDING_ROWS);
        charging
    }

    /// Writes the spend queued so far; on failure it stays queued for the next try.
    pub async fn flush(&self) {
        let _one_at_a_time = self.flushing.lock().await;
        if lock(&self.pending).rows.is_empty() {
            return;
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        let (rows, deltas) = {
            let mut pending = lock(&self.pending);
            // Room for as many rows as the last flush took: the queue does not start from nothing
            // each second, copying itself at every doubling.
            let room = pending.rows.len();
            (
                std::mem::replace(&mut pending.rows, Vec::with_capacity(room)),
                std::mem::take(&mut pending.deltas),
            )
        };
        let batch = Arc::new(SpendBatch {
            rows,
            deltas: merge(deltas),
        });
        if let Err(e) = self.store.write_spend(Arc::clone(&batch)).await {
            let SpendBatch { rows, deltas } = Arc::unwrap_or_clone(batch);
            tracing::warn!(error = %e, rows = rows.len(), "cannot write spend; will retry");
            let mut pending = lock(&self.pending);
            let later_rows = std::mem::replace(&mut pending.rows, rows);
            pending.rows.extend(later_rows);
            let later_deltas = std::mem::replace(&mut pending.deltas, deltas);
            pending.deltas.extend(later_deltas);
            pending.bound(MAX_PENDING_ROWS);
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
    }

    /// Writes what is queued and closes the store: the last step of a graceful shutdown.
    pub async fn shutdown(&self) {
        self.flush().await;
        if !lock(&self.pending).rows.is_empty() {
            tracing::error!("spend not written at shutdown: the store is unavailable");
        }
        self.store.close().await;
    }
}

const KEY_SPEND: HeaderName = HeaderName::from_static("x-portcullis-key-spend");
const KEY_MAX_BUDGET: HeaderName = HeaderName::from_static("x-portcullis-key-max-budget");
const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// `x-portcullis-key-spend` (the key is the first entity) and its `-max-budget`; once per call,
/// by whichever step decides it.
fn push_spend_headers(call: &mut Call, governed: &Governed, spends: &[f64]) {
    if let (Some((policy, _)), Some(spend)) = (governed.entities.first(), spends.first()) {
        call.key_headers.push((KEY_SPEND, number(*spend)));
        if let Some(max) = policy.max_budget {
            call.key_headers.push((KEY_MAX_BUDGET, number(max)));
        }
    }
}

fn push_standing(call: &mut Call, standing: &Standing) {
    push_allowances(call, (standing.requests, standing.tokens));
}

fn push_allowances(call: &mut Call, (requests, tokens): (Option<Allowance>, Option<Allowance>)) {
    let names = [
        (
            requests,
            [LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS],
        ),
        (tokens, [LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS]),
    ];
    for (allowance, [limit, remaining, reset]) in names {
        if let Some(a) = allowance {
            call.key_headers.push((limit, HeaderValue::from(a.limit)));
            call.key_headers
                .push((remaining, HeaderValue::from(a.remaining)));
            if let Ok(value) = HeaderValue::from_str(&limits::reset_text(a.reset)) {
                call.key_headers.push((reset, value));
            }
        }
    }
}

fn rate_limited(kind: Kind, refusal: &Refusal) -> GatewayError {
    let retry_after_ms = u64::try_from(refusal.retry_after.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    GatewayError::RateLimited {
        message: format!(
            "rate limit reached for this {}: {} {}; try again in {} ms",
            kind.noun(),
            refusal.limit,
            refusal.what,
            retry_after_ms
        ),
        retry_after_ms: Some(retry_after_ms),
    }
}

fn number(value: f64) -> HeaderValue {
    HeaderValue::from_str(&value.to_string()).unwrap_or(HeaderValue::from_static("0"))
}

fn saturating(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// One delta per entity and period: a second's calls become one `UPDATE` each.
fn merge(deltas: Vec<SpendDelta>) -> Vec<SpendDelta> {
    let mut merged: Vec<SpendDelta> = Vec::new();
    let mut index: HashMap<(EntityId, i64), usize> = HashMap::new();
    for delta in deltas {
        match index.get(&(delta.entity.clone(), delta.period_start)) {
            Some(&i) => merged[i].amount += delta.amount,
            None => {
                index.insert((delta.entity.clone(), delta.period_start), merged.len());
                merged.push(delta);
            }
        }
    }
    merged
}

// Poisoning means a panic elsewhere mid-update of plain maps: still consistent enough to serve.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwritable_queue_drops_the_oldest_rows_and_keeps_the_totals() {
        let key = EntityId::new(Kind::Key, "k");
        let mut pending = Pending::default();
        for i in 0..10 {
            pending.rows.push(SpendRow {
                request_id: format!("call-{i}"),
                ..SpendRow::default()
            });
            pending.deltas.push(SpendDelta {
                entity: key.clone(),
                period_start: 0,
                amount: 0.5,
            });
            pending.bound(4);
        }
        let kept: Vec<&str> = pending.rows.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(kept, ["call-6", "call-7", "call-8", "call-9"]);
        assert_eq!(pending.dropped_rows, 6);
        let total: f64 = pending.deltas.iter().map(|d| d.amount).sum();
        assert_eq!(total, 5.0);
        assert!(pending.deltas.len() <= 4);
    }

    #[test]
    fn deltas_merge_per_entity_and_period() {
        let key = EntityId::new(Kind::Key, "k");
        let team = EntityId::new(Kind::Team, "t");
        let delta = |entity: &EntityId, period_start, amount| SpendDelta {
            entity: entity.clone(),
            period_start,
            amount,
        };
        let merged = merge(vec![
            delta(&key, 0, 1.0),
            delta(&team, 0, 2.0),
            delta(&key, 0, 0.5),
            delta(&key, 10, 4.0),
        ]);
        assert_eq!(
            merged,
            vec![
                delta(&key, 0, 1.5),
                delta(&team, 0, 2.0),
                delta(&key, 10, 4.0)
            ]
        );
    }
}
