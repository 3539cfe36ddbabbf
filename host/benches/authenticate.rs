//! What the authenticate stage costs per call: a static key from the config, a stored key
//! (resolved from the in-memory cache, as every call after a key's first is), and a stored key
//! with a budget and rate limits checked and taken. Medians of several rounds, in nanoseconds, and
//! each as a multiple of the static key's cost in the same run.
//!
//! ```sh
//! cargo bench -p portcullis --bench authenticate         # AUTH_CALLS=1000000 for more calls
//! ```
//!
//! With `PORTCULLIS_BENCH_REDIS_URL=redis://...` it also measures the limited key with its counters
//! in Redis, as replicas keep them.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue};
use portcullis::call::Call;
use portcullis::config::{Config, StoreConfig};
use portcullis::generation::{self, Generation};
use portcullis::governance::secret;
use portcullis::governance::store::{KeyRecord, Policy, StoredSpend};
use portcullis::governance::Governance;
use portcullis::pipeline::authenticate;
use portcullis::providers::{Endpoint, JsonObject};

const ROUNDS: usize = 7;

fn stored_key(id: &str, plaintext: &str, policy: Policy) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        token: secret::hash_key(plaintext),
        key_name: secret::abbreviate(plaintext),
        key_alias: Some(id.into()),
        team_id: None,
        user_id: None,
        policy,
        expires_at: None,
        metadata: JsonObject::new(),
        guardrails: Vec::new(),
        blocked: false,
        spend: StoredSpend::default(),
        created_at: 0,
        updated_at: 0,
        deleted_at: None,
    }
}

fn bearer(key: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Bearer {key}")).expect("a header value");
    headers.insert(http::header::AUTHORIZATION, value);
    headers
}

/// Median nanoseconds of one PING, the floor for anything that asks Redis.
async fn ping_ns(url: &str, calls: usize) -> f64 {
    let client = redis::Client::open(url).expect("a redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis is up");
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        for _ in 0..calls {
            let _: String = redis::cmd("PING")
                .query_async(&mut connection)
                .await
                .expect("a pong");
        }
        rounds.push(started.elapsed().as_nanos() as f64 / calls as f64);
    }
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

/// Median nanoseconds per call of `calls` authentications (and admissions, if `admit`).
async fn measure(generation: &Generation, headers: &HeaderMap, admit: bool, calls: usize) -> f64 {
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        for _ in 0..calls {
            let principal = authenticate::authenticate(generation, headers)
                .await
                .expect("the key resolves");
            if admit {
                let mut call = Call::new(Endpoint::ChatCompletions);
                call.principal = Some(principal);
                authenticate::admit(generation.governance.as_deref(), &mut call, || Ok(500))
                    .await
                    .expect("within the limits");
            }
        }
        rounds.push(started.elapsed().as_nanos() as f64 / calls as f64);
    }
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

/// A generation whose governance stores into a fresh SQLite file in `dir`, with the bench's keys.
async fn gateway(dir: &std::path::Path, store: StoreConfig) -> (Arc<Governance>, Generation) {
    let url = format!("sqlite://{}?mode=rwc", dir.join("bench.db").display());
    let governance = Governance::start(&url, &store)
        .await
        .expect("the store opens");
    let yaml = "auth: { master_key: sk-master, keys: [{ key: sk-static, alias: static }] }\n\
                models: [{ name: g, provider: mock }]\n";
    let config = Config::parse(yaml, &|_| None).expect("a valid bench config");
    let shared = generation::Shared::start(16, Some(Arc::clone(&governance))).expect("the engine");
    let generation = Generation::build(config, &shared, None)
        .await
        .expect("a generation");
    let limits = Policy {
        max_budget: Some(1e9),
        rpm_limit: Some(u64::MAX / 2),
        tpm_limit: Some(u64::MAX / 2),
        max_parallel_requests: Some(1_000),
        ..Policy::default()
    };
    for record in [
        stored_key("plain", PLAIN, Policy::default()),
        stored_key("limited", LIMITED, limits),
    ] {
        governance.store().insert(&record).await.expect("insert");
    }
    (governance, generation)
}

const PLAIN: &str = "sk-stored-plain-0123456789abcdef";
const LIMITED: &str = "sk-stored-limited-0123456789abcdef";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let calls: usize = std::env::var("AUTH_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let dir = std::env::temp_dir().join(format!("portcullis-auth-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("local")).expect("a temp dir");
    let (governance, generation) = gateway(&dir.join("local"), StoreConfig::default()).await;

    let static_ns = measure(&generation, &bearer("sk-static"), false, calls).await;
    let stored_ns = measure(&generation, &bearer(PLAIN), false, calls).await;
    let limited_ns = measure(&generation, &bearer(LIMITED), true, calls).await;
    let mut rows = vec![
        ("static (config)", static_ns),
        ("stored, cached", stored_ns),
        ("stored, budget + rpm/tpm/parallel limits", limited_ns),
    ];
    governance.shutdown().await;
    // Counters in Redis cost a round trip per call: fewer calls, same medians.
    let redis_url = std::env::var("PORTCULLIS_BENCH_REDIS_URL").unwrap_or_default();
    if !redis_url.is_empty() {
        std::fs::create_dir_all(dir.join("redis")).expect("a temp dir");
        let store = StoreConfig {
            redis_url: Some(redis_url.clone()),
            ..StoreConfig::default()
        };
        let (governance, generation) = gateway(&dir.join("redis"), store).await;
        let redis_calls = (calls / 20).max(100);
        let ns = measure(&generation, &bearer(LIMITED), true, redis_calls).await;
        rows.push(("stored, budget + limits, counters in Redis", ns));
        rows.push((
            "(a Redis PING round trip, for scale)",
            ping_ns(&redis_url, redis_calls).await,
        ));
        governance.shutdown().await;
    }
    println!("authenticate stage, median of {ROUNDS} rounds of {calls} calls");
    println!("| key | ns per call | x static |");
    println!("|---|---|---|");
    for (name, ns) in rows {
        println!("| {name} | {ns:.0} | {:.2}x |", ns / static_ns);
    }
    let _ = std::fs::remove_dir_all(dir);
}
