//! WebAssembly plugins: one wasmtime `Engine` for the process, components compiled once per
//! content hash, and a fresh, sandboxed instance per call.
//!
//! **A plugin's trap, timeout or memory cap ends that plugin's call, never the gateway.** Every
//! call runs in its own `Store` under a memory limit and an epoch deadline, and the store is
//! thrown away afterwards, so nothing a call leaves behind is seen by the next.
//!
//! `adapters` implements the traits of `extension.rs` over loaded plugins; the pipeline sees only
//! those traits. This module never imports `providers` or `server`.

mod adapters;
mod store;
mod timing;
mod v0_1;

pub use timing::CallSummary;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use wasmtime::component::{Component, Instance, InstancePre, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

pub use adapters::{WasmEnricher, WasmGuardrail, WasmHook, WasmRouter};
pub use store::CallScope;
use store::{Sandbox, StoreState};
use v0_1::{enricher, guardrail, hook, lifecycle, router};

use crate::config::{Config as GatewayConfig, InstanceMode, PluginConfig, MAX_PLUGIN_MEMORY_MB};
use crate::digest::hex;

/// How often the epoch advances: the granularity of plugin deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Warm instances a pooled plugin keeps between calls; more are started under load and dropped
/// when they finish.
const MAX_IDLE_INSTANCES: usize = 32;

/// Why a plugin could not be loaded. The message names the plugin and the file.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin '{plugin}': cannot read {path}: {error}")]
    Read {
        plugin: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("plugin '{plugin}': {path} is not a valid component: {reason}")]
    Compile {
        plugin: String,
        path: PathBuf,
        reason: String,
    },
    #[error("plugin '{plugin}': {reason}")]
    Incompatible { plugin: String, reason: String },
    #[error("plugin '{plugin}' rejected its config: {reason}")]
    Init { plugin: String, reason: String },
    #[error("the WebAssembly engine could not start: {0}")]
    Engine(String),
}

/// Why one call into a plugin failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginFailure {
    #[error("plugin '{plugin}' exceeded its time limit of {limit_ms} ms")]
    Timeout { plugin: String, limit_ms: u64 },
    #[error("plugin '{plugin}' failed: {reason}")]
    Trap { plugin: String, reason: String },
}

/// The process's WebAssembly engine and everything shared across configurations.
pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<StoreState>,
    /// Compiled components by the SHA-256 of their bytes, so a reload that changes only YAML
    /// compiles nothing.
    cache: Mutex<HashMap<[u8; 32], Component>>,
    /// The epoch ticker starts with the first plugin: a gateway without plugins pays nothing.
    ticker: std::sync::OnceLock<Result<(), String>>,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime").finish_non_exhaustive()
    }
}

impl PluginRuntime {
    /// Starts the engine, with the pooling allocator where the address space allows it.
    pub fn new() -> Result<Arc<PluginRuntime>, PluginError> {
        let engine = pooled_engine()
            .or_else(|_| Engine::new(&base_config()))
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| v0_1::add_to_linker(&mut linker))
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        Ok(Arc::new(PluginRuntime {
            engine,
            linker,
            cache: Mutex::new(HashMap::new()),
            ticker: std::sync::OnceLock::new(),
        }))
    }

    /// Advances the engine's epoch every [`EPOCH_TICK`] for as long as the engine lives. Without
    /// it no deadline could stop a plugin spinning in a loop, so failing to start it is an error,
    /// every time it is asked for.
    fn start_ticker(&self) -> Result<(), PluginError> {
        self.ticker
            .get_or_init(|| {
                let weak = self.engine.weak();
                std::thread::Builder::new()
                    .name("portcullis-epoch".into())
                    .spawn(move || {
                        while let Some(engine) = weak.upgrade() {
                            engine.increment_epoch();
                            drop(engine);
                            std::thread::sleep(EPOCH_TICK);
                        }
                    })
                    .map(drop)
                    .map_err(|e| format!("cannot start the epoch thread: {e}"))
            })
            .clone()
            .map_err(PluginError::Engine)
    }

    /// Loads an enabled plugin: reads and compiles it (off the async runtime), checks what it
    /// exports, and runs `init` once with its config under its limits.
    pub async fn load(
        self: &Arc<Self>,
        gateway: &GatewayConfig,
        config: &PluginConfig,
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        self.start_ticker()?;
        let path = gateway.plugin_path(config);
        let runtime = Arc::clone(self);
        let (name, file) = (config.name.clone(), path.clone());
        let (component, hash) = tokio::task::spawn_blocking(move || runtime.compile(&name, &file))
            .await
            .map_err(|e| PluginError::Engine(e.to_string()))??;
        let incompatible = |reason: String| PluginError::Incompatible {
            plugin: config.name.clone(),
            reason,
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| incompatible(describe_imports(&component, &self.engine, &e)))?;
        let exports = Exports::of(&pre);
        if exports.kinds().is_empty() {
            return Err(incompatible(format!(
                "{} exports none of {}/guardrail, enricher, router or hook",
                path.display(),
                v0_1::PACKAGE
            )));
        }
        let config_json = match &config.config {
            Some(value) => serde_json::to_string(value).map_err(|e| PluginError::Init {
                plugin: config.name.clone(),
                reason: format!("the config block cannot be expressed as JSON: {e}"),
            })?,
            None => "{}".to_owned(),
        };
        let sandbox = Sandbox {
            memory_bytes: (config.limits.memory_mb.min(MAX_PLUGIN_MEMORY_MB) as usize) << 20,
            dirs: config
                .capabilities
                .dirs
                .iter()
                .map(|d| store::DirGrant {
                    host: gateway.resolve(&d.host),
                    guest: d.guest.clone(),
                    write: d.write,
                })
                .collect(),
            clocks: config.capabilities.clocks,
        };
        let plugin = Arc::new(LoadedPlugin {
            name: Arc::from(config.name.as_str()),
            path,
            engine: self.engine.clone(),
            pre,
            exports,
            config_json,
            sandbox,
            timeout: Duration::from_millis(config.limits.timeout_ms),
            pool: (config.instance == InstanceMode::Pooled).then(|| Pool {
                idle: Mutex::new(Vec::new()),
                recycle_after: config.recycle_after,
            }),
            content_hash: hex(&hash),
            failures: AtomicU64::new(0),
            call_times: timing::CallTimes::default(),
        });
        // A trial instance proves the plugin starts and accepts its config within its limits.
        plugin
            .instantiate(CallScope::default(), &mut Budget::new(plugin.timeout))
            .await
            .map_err(|failure| PluginError::Init {
                plugin: config.name.clone(),
                reason: failure.to_string(),
            })?;
        Ok(plugin)
    }

    /// What a component file exports and imports, and whether this gateway can run it.
    pub fn inspect(&self, path: &Path) -> Result<Inspection, PluginError> {
        let (component, hash) = self.compile("inspect", path)?;
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        let imports: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        let (kinds, problem) = match self.linker.instantiate_pre(&component) {
            Ok(pre) => {
                let exports = Exports::of(&pre);
                let kinds = exports.kinds();
                let problem = kinds.is_empty().then(|| {
                    format!(
                        "it exports none of {}/guardrail, enricher, router or hook",
                        v0_1::PACKAGE
                    )
                });
                (kinds, problem)
            }
            Err(e) => (
                Vec::new(),
                Some(describe_imports(&component, &self.engine, &e)),
            ),
        };
        Ok(Inspection {
            content_hash: hex(&hash),
            exports,
            imports,
            kinds,
            supported: v0_1::PACKAGE,
            problem,
        })
    }

    fn compile(&self, name: &str, path: &Path) -> Result<(Component, [u8; 32]), PluginError> {
        let bytes = std::fs::read(path).map_err(|error| PluginError::Read {
            plugin: name.to_owned(),
            path: path.to_owned(),
            error,
        })?;
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(component) = self.lock_cache().get(&hash) {
            return Ok((component.clone(), hash));
        }
        let component =
            Component::from_binary(&self.engine, &bytes).map_err(|e| PluginError::Compile {
                plugin: name.to_owned(),
                path: path.to_owned(),
                reason: format!("{e:#}"),
            })?;
        self.lock_cache().insert(hash, component.clone());
        Ok((component, hash))
    }

    /// Forgets compiled components that none of `plugins` uses, so replacing plugin files again
    /// and again does not grow memory. Generations still serving keep theirs alive.
    pub fn retain_only(&self, generations: &[&[Arc<LoadedPlugin>]]) {
        self.lock_cache().retain(|hash, _| {
            let hash = hex(hash);
            generations
                .iter()
                .flat_map(|g| g.iter())
                .any(|p| p.content_hash == hash)
        });
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Component>> {
        // The map stays consistent even if a holder panicked: entries are inserted whole.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// wasmtime makes an error value each time a component store is dropped, and with
/// `RUST_BACKTRACE` set each one captures a backtrace: about 75,000 instructions, more than the
/// rest of a fresh plugin call. Library backtraces are turned off unless `RUST_LIB_BACKTRACE`
/// asks for them; panics keep theirs. Call it first thing in `main`, before any thread starts.
pub fn quiet_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

fn base_config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    // The contract has no async component functions, streams or futures. With concurrency on,
    // every call goes through the component-model-async event loop: about 40,000 instructions
    // more per call than a plain call on a fiber.
    config.concurrency_support(false);
    config
}

fn pooled_engine() -> wasmtime::Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    // Long streams each hold a guardrail instance: room for thousands of them at once. A store
    // keeps the fiber stack of its last call until it is dropped, so stacks are counted as
    // instances are (the default, 1,000, failed calls with 1,000 streams open).
    pool.total_component_instances(4_000)
        .total_core_instances(8_000)
        .total_memories(4_000)
        .total_tables(4_000)
        .total_stacks(4_000)
        .max_memory_size((MAX_PLUGIN_MEMORY_MB as usize) << 20);
    let mut config = base_config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// Explains an import mismatch, naming the WIT version the component was built against.
fn describe_imports(component: &Component, engine: &Engine, err: &wasmtime::Error) -> String {
    let ours: Vec<String> = component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_owned())
        .filter(|name| name.starts_with("portcullis:plugin/"))
        .collect();
    match ours
        .iter()
        .find(|name| !name.ends_with(&v0_1::PACKAGE["portcullis:plugin".len()..]))
    {
        Some(other) => format!(
            "it imports {other}, but this gateway supports {}: {err:#}",
            v0_1::PACKAGE
        ),
        None => format!("its imports cannot be satisfied: {err:#}"),
    }
}

/// What `portcullis plugins inspect` reports about a component file.
#[derive(Debug)]
pub struct Inspection {
    pub content_hash: String,
    pub exports: Vec<String>,
    pub imports: Vec<String>,
    /// guardrail, enricher, router, hook: what the gateway would use it as.
    pub kinds: Vec<&'static str>,
    /// The plugin WIT version this gateway runs.
    pub supported: &'static str,
    /// Why the gateway could not run it, if it could not.
    pub problem: Option<String>,
}

/// Which interfaces a component exports.
struct Exports {
    lifecycle: Option<lifecycle::GuestIndices>,
    guardrail: Option<guardrail::GuestIndices>,
    enricher: Option<enricher::GuestIndices>,
    router: Option<router::GuestIndices>,
    hook: Option<hook::GuestIndices>,
}

impl Exports {
    fn of(pre: &InstancePre<StoreState>) -> Exports {
        Exports {
            lifecycle: lifecycle::GuestIndices::new(pre).ok(),
            guardrail: guardrail::GuestIndices::new(pre).ok(),
            enricher: enricher::GuestIndices::new(pre).ok(),
            router: router::GuestIndices::new(pre).ok(),
            hook: hook::GuestIndices::new(pre).ok(),
        }
    }

    fn kinds(&self) -> Vec<&'static str> {
        [
            (self.guardrail.is_some(), "guardrail"),
            (self.enricher.is_some(), "enricher"),
            (self.router.is_some(), "router"),
            (self.hook.is_some(), "hook"),
        ]
        .into_iter()
        .filter_map(|(present, kind)| present.then_some(kind))
        .collect()
    }
}

/// A compiled, checked plugin, ready to be instantiated for calls.
pub struct LoadedPlugin {
    pub name: Arc<str>,
    /// The `.wasm` file it was compiled from.
    pub path: PathBuf,
    engine: Engine,
    pre: InstancePre<StoreState>,
    exports: Exports,
    config_json: String,
    sandbox: Sandbox,
    timeout: Duration,
    /// Warm instances, for `instance: pooled`.
    pool: Option<Pool>,
    /// SHA-256 of the `.wasm` file.
    pub content_hash: String,
    failures: AtomicU64,
    /// Every guest call, instantiation included, failed or not.
    call_times: timing::CallTimes,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("kinds", &self.kinds())
            .field("content_hash", &self.content_hash)
            .finish_non_exhaustive()
    }
}

/// A live instance serving one call (or, pooled, one call at a time).
struct Live {
    store: Store<StoreState>,
    instance: Instance,
    /// Calls served so far.
    uses: u32,
    /// The exports this instance has been called through, looked up once: a lookup type-checks
    /// the functions again.
    guests: Guests,
}

#[derive(Default)]
struct Guests {
    guardrail: Option<guardrail::Guest>,
    enricher: Option<enricher::Guest>,
    router: Option<router::Guest>,
    hook: Option<hook::Guest>,
}

/// The export in `slot`, loaded into it first if this is the instance's first call through it.
fn cached<G>(
    slot: &mut Option<G>,
    load: impl FnOnce() -> wasmtime::Result<G>,
) -> wasmtime::Result<&G> {
    let guest = match slot.take() {
        Some(guest) => guest,
        None => load()?,
    };
    Ok(slot.insert(guest))
}

/// What one hook call may spend running guest code, instantiation included. Time spent waiting
/// for a core does not count, so a burst of calls queued on a busy runtime does not turn into
/// timeouts; a wall-clock backstop [`BACKSTOP_FACTOR`] times as long bounds a guest that waits on
/// the host instead of running.
#[derive(Debug)]
struct Budget {
    limit: Duration,
    spent: Duration,
    backstop: Instant,
}

/// How many times its time limit a call may last on the wall clock.
const BACKSTOP_FACTOR: u32 = 10;

impl Budget {
    fn new(limit: Duration) -> Budget {
        Budget {
            limit,
            spent: Duration::ZERO,
            backstop: Instant::now() + limit.saturating_mul(BACKSTOP_FACTOR),
        }
    }
}

/// The idle warm instances of a pooled plugin.
struct Pool {
    idle: Mutex<Vec<Live>>,
    recycle_after: u32,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Live>> {
        // A Vec of whole instances stays consistent even if a holder panicked.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Option<Live> {
        self.lock().pop()
    }

    /// Keeps `live` for another call unless it has served its share.
    fn give_back(&self, mut live: Live) {
        live.uses += 1;
        // The next call must not see this one's request through the host imports.
        live.store.data_mut().scope = CallScope::default();
        if live.uses < self.recycle_after {
            let mut idle = self.lock();
            if idle.len() < MAX_IDLE_INSTANCES {
                idle.push(live);
            }
        }
    }
}

impl LoadedPlugin {
    /// The kinds this plugin implements: guardrail, enricher, router, hook.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.exports.kinds()
    }

    pub fn is_guardrail(&self) -> bool {
        self.exports.guardrail.is_some()
    }

    pub fn is_enricher(&self) -> bool {
        self.exports.enricher.is_some()
    }

    pub fn is_router(&self) -> bool {
        self.exports.router.is_some()
    }

    pub fn is_hook(&self) -> bool {
        self.exports.hook.is_some()
    }

    /// Calls that failed (trap, timeout, memory cap) since the plugin was loaded.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// How long its calls have taken since it was loaded.
    pub fn call_times(&self) -> CallSummary {
        self.call_times.summary()
    }

    /// A fresh instance with `init` done, or the reason there is none.
    async fn instantiate(
        &self,
        scope: CallScope,
        budget: &mut Budget,
    ) -> Result<Live, PluginFailure> {
        let state = StoreState::new(Arc::clone(&self.name), &self.sandbox, scope)
            .map_err(|reason| self.trap(reason))?;
        let mut store = Store::new(&self.engine, state);
        store.limiter(StoreState::limiter);
        // At every epoch tick a running guest yields to the executor, so a plugin spinning in a
        // loop neither holds a worker thread nor outlives its budget: `within` drops it at the
        // next yield.
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        let run = async {
            let instance = self.pre.instantiate_async(&mut store).await?;
            if let Some(lifecycle) = &self.exports.lifecycle {
                let init = lifecycle.load(&mut store, &instance)?;
                if let Err(reason) = init.call_init(&mut store, &self.config_json).await? {
                    return Ok(Err(reason));
                }
            }
            wasmtime::Result::Ok(Ok(instance))
        };
        match self.within(budget, run).await? {
            Err(reason) => Err(self.trap(format!("init rejected the config: {reason}"))),
            Ok(instance) => Ok(Live {
                store,
                instance,
                uses: 0,
                guests: Guests::default(),
            }),
        }
    }

    /// Runs guest work within what is left of `budget`; running out, a trap or a host error
    /// becomes a counted failure. Only time spent polling the guest counts against the budget.
    async fn within<T>(
        &self,
        budget: &mut Budget,
        work: impl std::future::Future<Output = wasmtime::Result<T>>,
    ) -> Result<T, PluginFailure> {
        let mut work = std::pin::pin!(work);
        let limit = budget.limit;
        let spent = &mut budget.spent;
        let metered = std::future::poll_fn(|cx| {
            let started = std::time::Instant::now();
            let poll = work.as_mut().poll(cx);
            *spent += started.elapsed();
            match poll {
                std::task::Poll::Ready(result) => std::task::Poll::Ready(Some(result)),
                std::task::Poll::Pending if *spent >= limit => std::task::Poll::Ready(None),
                std::task::Poll::Pending => std::task::Poll::Pending,
            }
        });
        match tokio::time::timeout_at(budget.backstop, metered).await {
            Err(_) | Ok(None) => Err(self.timed_out()),
            Ok(Some(Err(e))) => Err(self.failed(&e)),
            Ok(Some(Ok(value))) => Ok(value),
        }
    }

    /// Runs `call` within the plugin's deadline on a fresh instance, or on a warm one if the
    /// plugin is pooled. An instance that failed is dropped, never used again.
    async fn with_instance<T>(
        &self,
        scope: CallScope,
        call: impl AsyncFnOnce(&mut Store<StoreState>, &Instance, &mut Guests) -> wasmtime::Result<T>,
    ) -> Result<T, PluginFailure> {
        self.metered(async |budget| self.on_instance(scope, budget, call).await)
            .await
    }

    /// Runs one hook call's guest work under a fresh budget, and records the time it spent
    /// running, failed or not.
    async fn metered<T>(
        &self,
        work: impl AsyncFnOnce(&mut Budget) -> Result<T, PluginFailure>,
    ) -> Result<T, PluginFailure> {
        let mut budget = Budget::new(self.timeout);
        let result = work(&mut budget).await;
        self.call_times.record(budget.spent);
        result
    }

    async fn on_instance<T>(
        &self,
        scope: CallScope,
        budget: &mut Budget,
        call: impl AsyncFnOnce(&mut Store<StoreState>, &Instance, &mut Guests) -> wasmtime::Result<T>,
    ) -> Result<T, PluginFailure> {
        let mut live = match self.pool.as_ref().and_then(Pool::take) {
            Some(mut live) => {
                live.store.data_mut().scope = scope;
                live
            }
            None => self.instantiate(scope, budget).await?,
        };
        let value = self
            .within(
                budget,
                call(&mut live.store, &live.instance, &mut live.guests),
            )
            .await?;
        if let Some(pool) = &self.pool {
            pool.give_back(live);
        }
        Ok(value)
    }

    fn timed_out(&self) -> PluginFailure {
        self.failures.fetch_add(1, Ordering::Relaxed);
        PluginFailure::Timeout {
            plugin: self.name.to_string(),
            limit_ms: self.timeout.as_millis() as u64,
        }
    }

    fn failed(&self, err: &wasmtime::Error) -> PluginFailure {
        if matches!(
            err.downcast_ref::<wasmtime::Trap>(),
            Some(wasmtime::Trap::Interrupt)
        ) {
            return self.timed_out();
        }
        self.trap(format!("{err:#}"))
    }

    fn trap(&self, reason: String) -> PluginFailure {
        self.failures.fetch_add(1, Ordering::Relaxed);
        PluginFailure::Trap {
            plugin: self.name.to_string(),
            reason,
        }
    }

    async fn check_request(
        &self,
        scope: CallScope,
        request: &v0_1::types::Request,
    ) -> Result<guardrail::RequestVerdict, PluginFailure> {
        let Some(indices) = &self.exports.guardrail else {
            return Ok(guardrail::RequestVerdict::Allow);
        };
        self.with_instance(scope, async |store, instance, guests| {
            let guest = cached(&mut guests.guardrail, || {
                indices.load(&mut *store, instance)
            })?;
            guest.call_check_request(store, request).await
        })
        .await
    }

    async fn check_response(
        &self,
        scope: CallScope,
        request: &v0_1::types::Request,
        response: &v0_1::types::Response,
    ) -> Result<guardrail::ResponseVerdict, PluginFailure> {
        let Some(indices) = &self.exports.guardrail else {
            return Ok(guardrail::ResponseVerdict::Allow);
        };
        self.with_instance(scope, async |store, instance, guests| {
            let guest = cached(&mut guests.guardrail, || {
                indices.load(&mut *store, instance)
            })?;
            guest.call_check_response(store, request, response).await
        })
        .await
    }

    async fn enrich(
        &self,
        scope: CallScope,
        request: &v0_1::types::Request,
    ) -> Result<Option<enricher::Enrichment>, PluginFailure> {
        let Some(indices) = &self.exports.enricher else {
            return Ok(None);
        };
        self.with_instance(scope, async |store, instance, guests| {
            let guest = cached(&mut guests.enricher, || indices.load(&mut *store, instance))?;
            guest.call_enrich(store, request).await.map(Some)
        })
        .await
    }

    async fn choose(
        &self,
        scope: CallScope,
        request: &router::RouteRequest,
        candidates: &[router::Candidate],
    ) -> Result<Vec<u32>, PluginFailure> {
        let Some(indices) = &self.exports.router else {
            return Ok(Vec::new());
        };
        self.with_instance(scope, async |store, instance, guests| {
            let guest = cached(&mut guests.router, || indices.load(&mut *store, instance))?;
            guest.call_choose(store, request, candidates).await
        })
        .await
    }

    async fn on_call_end(
        &self,
        scope: CallScope,
        event: &hook::CallEvent,
        success: bool,
    ) -> Result<(), PluginFailure> {
        let Some(indices) = &self.exports.hook else {
            return Ok(());
        };
        self.with_instance(scope, async |store, instance, guests| {
            let guest = cached(&mut guests.hook, || indices.load(&mut *store, instance))?;
            if success {
                guest.call_on_success(store, event).await
            } else {
                guest.call_on_failure(store, event).await
            }
        })
        .await
    }
}

/// One instance that sees a whole stream, delta by delta, as `check-stream` promises. It is
/// started at the first delta, so a stream without text costs nothing, and dropped with the
/// stream, or at its first failure: a trapped store is never entered again.
pub struct StreamSession {
    plugin: Arc<LoadedPlugin>,
    scope: Option<CallScope>,
    live: Option<Live>,
}

impl std::fmt::Debug for StreamSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSession")
            .field("plugin", &self.plugin.name)
            .field("started", &self.live.is_some())
            .finish()
    }
}

impl StreamSession {
    pub fn new(plugin: Arc<LoadedPlugin>, scope: CallScope) -> StreamSession {
        StreamSession {
            plugin,
            scope: Some(scope),
            live: None,
        }
    }

    /// Each delta gets the plugin's whole time limit (the first one including the start).
    async fn check(
        &mut self,
        delta: &v0_1::types::StreamDelta,
    ) -> Result<guardrail::StreamVerdict, PluginFailure> {
        let plugin = &self.plugin;
        let Some(indices) = &plugin.exports.guardrail else {
            return Ok(guardrail::StreamVerdict::Release(delta.text.clone()));
        };
        let (live, scope) = (&mut self.live, &mut self.scope);
        plugin
            .metered(async |budget| {
                let mut current = match live.take() {
                    Some(current) => current,
                    None => {
                        let scope = scope.take().unwrap_or_default();
                        plugin.instantiate(scope, budget).await?
                    }
                };
                let call = async {
                    let guest = cached(&mut current.guests.guardrail, || {
                        indices.load(&mut current.store, &current.instance)
                    })?;
                    guest.call_check_stream(&mut current.store, delta).await
                };
                // A failed instance is dropped, never used again.
                let verdict = plugin.within(budget, call).await?;
                *live = Some(current);
                Ok(verdict)
            })
            .await
    }
}
