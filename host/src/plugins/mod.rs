//! WebAssembly plugins: one wasmtime `Engine` for the process, components compiled once per
//! content hash, and a fresh, sandboxed instance per call.
//!
//! **A plugin's trap, timeout or memory cap ends that plugin's call, never the gateway.** Every
//! call runs in its own `Store` under a memory limit and an epoch deadline, and the store is
//! thrown away afterwards, so nothing a call leaves behind is seen by the next.
//!
//! `adapters` implements the traits of `extension.rs` over loaded plugins; the pipeline sees only
//! those traits. Each supported WIT version has a module (`v0_1`, `v0_2`); a plugin's
//! [`Contract`] says which one its calls go to. This module never imports `server` or
//! `pipeline`, and from `providers` only data types.

mod adapters;
mod contract;
mod store;
mod timing;
mod v0_1;
mod v0_2;

pub use timing::CallSummary;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use wasmtime::component::{Component, Instance, InstancePre, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};

pub use adapters::{WasmEnricher, WasmGuardrail, WasmHook, WasmRouter};
pub use store::{CallScope, RequestFacts};
use store::{Sandbox, StoreState};

use crate::call::CallRecord;
use crate::config::{
    Config as GatewayConfig, InstanceMode, PluginConfig, StreamInstance, MAX_PLUGIN_MEMORY_MB,
};
use crate::digest::hex;
use crate::extension::{Candidate, Enrichment, RouteRequest, StreamDelta, StreamVerdict};
use crate::openai::ResponseView;
use crate::providers::UnreadableBody;

/// The WIT packages this gateway runs plugins of, newest first.
pub const SUPPORTED: [&str; 2] = [v0_2::PACKAGE, v0_1::PACKAGE];

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
    /// The gateway could not read the request back for the plugin: the call's fault, not the
    /// plugin's, so it fails the call whatever the plugin's `on_error`.
    #[error(transparent)]
    Body(UnreadableBody),
}

/// A guardrail's answer on a request's messages or a response's choices, in any version.
#[derive(Debug, Clone, PartialEq)]
pub enum TextVerdict {
    Allow,
    Block(String),
    /// New texts by message (or choice) index.
    Rewrite(Vec<(usize, String)>),
}

/// The kinds a component implements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kinds {
    pub guardrail: bool,
    pub enricher: bool,
    pub router: bool,
    pub hook: bool,
}

impl Kinds {
    pub fn names(self) -> Vec<&'static str> {
        [
            (self.guardrail, "guardrail"),
            (self.enricher, "enricher"),
            (self.router, "router"),
            (self.hook, "hook"),
        ]
        .into_iter()
        .filter_map(|(present, kind)| present.then_some(kind))
        .collect()
    }
}

/// An enricher's answer, the same in every version. Values are JSON; a plain word that is not
/// JSON is kept as a string.
fn enrichment(
    metadata: Vec<(String, String)>,
    tags: Vec<String>,
    model: Option<String>,
) -> Enrichment {
    let metadata = metadata
        .into_iter()
        .map(|(key, value)| {
            let value = serde_json::from_str(&value).unwrap_or(serde_json::Value::String(value));
            (key, value)
        })
        .collect();
    Enrichment {
        metadata,
        tags,
        model: model.filter(|m| !m.is_empty()),
    }
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
            .and_then(|()| v0_2::add_to_linker(&mut linker))
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
        let Some(exports) = Contract::of(&pre) else {
            return Err(incompatible(format!(
                "{} {}",
                path.display(),
                exports_nothing()
            )));
        };
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
            stream_instance: config.stream_instance,
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
        let (contract, problem) = match self.linker.instantiate_pre(&component) {
            Ok(pre) => match Contract::of(&pre) {
                Some(contract) => (Some(contract), None),
                None => (None, Some(format!("it {}", exports_nothing()))),
            },
            Err(e) => (None, Some(describe_imports(&component, &self.engine, &e))),
        };
        Ok(Inspection {
            content_hash: hex(&hash),
            exports,
            imports,
            kinds: contract
                .as_ref()
                .map(|c| c.kinds().names())
                .unwrap_or_default(),
            contract: contract.as_ref().map(Contract::package),
            supported: &SUPPORTED,
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

fn exports_nothing() -> String {
    format!(
        "exports no guardrail, enricher, router or hook of {}",
        SUPPORTED.join(" or ")
    )
}

/// Explains an import mismatch, naming the WIT version the component was built against.
fn describe_imports(component: &Component, engine: &Engine, err: &wasmtime::Error) -> String {
    let ours: Vec<String> = component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_owned())
        .filter(|name| name.starts_with("portcullis:plugin/"))
        .collect();
    let supported = |name: &str| {
        SUPPORTED
            .iter()
            .any(|package| name.ends_with(&package["portcullis:plugin".len()..]))
    };
    match ours.iter().find(|name| !supported(name)) {
        Some(other) => format!(
            "it imports {other}, but this gateway supports {}: {err:#}",
            SUPPORTED.join(" and ")
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
    /// The WIT package the component was built against, if the gateway can run it.
    pub contract: Option<&'static str>,
    /// The WIT packages this gateway runs.
    pub supported: &'static [&'static str],
    /// Why the gateway could not run it, if it could not.
    pub problem: Option<String>,
}

/// The contract version a component was built against, and what it exports of it.
enum Contract {
    V0_1(v0_1::Exports),
    V0_2(v0_2::Exports),
}

impl Contract {
    /// The newest version the component exports a kind of; `None` if it exports none.
    fn of(pre: &InstancePre<StoreState>) -> Option<Contract> {
        v0_2::Exports::of(pre)
            .map(Contract::V0_2)
            .or_else(|| v0_1::Exports::of(pre).map(Contract::V0_1))
    }

    fn kinds(&self) -> Kinds {
        match self {
            Contract::V0_1(exports) => exports.kinds(),
            Contract::V0_2(exports) => exports.kinds(),
        }
    }

    fn package(&self) -> &'static str {
        match self {
            Contract::V0_1(_) => v0_1::PACKAGE,
            Contract::V0_2(_) => v0_2::PACKAGE,
        }
    }

    fn new_guests(&self) -> Guests {
        match self {
            Contract::V0_1(_) => Guests::V0_1(Default::default()),
            Contract::V0_2(_) => Guests::V0_2(Default::default()),
        }
    }
}

/// An instance's looked-up exports, of its contract's version.
enum Guests {
    V0_1(v0_1::Guests),
    V0_2(v0_2::Guests),
}

/// Runs `$call` with `$version` naming the version module of the plugin's contract, and
/// `$exports` and `$guests` that version's.
macro_rules! by_version {
    ($contract:expr, $guests:expr, |$version:ident, $exports:ident, $g:ident| $call:expr) => {
        match ($contract, $guests) {
            (Contract::V0_1($exports), Guests::V0_1($g)) => {
                use v0_1 as $version;
                $call
            }
            (Contract::V0_2($exports), Guests::V0_2($g)) => {
                use v0_2 as $version;
                $call
            }
            _ => Err(wasmtime::format_err!(
                "an instance of another contract version"
            )),
        }
    };
}

/// A compiled, checked plugin, ready to be instantiated for calls.
pub struct LoadedPlugin {
    pub name: Arc<str>,
    /// The `.wasm` file it was compiled from.
    pub path: PathBuf,
    engine: Engine,
    pre: InstancePre<StoreState>,
    exports: Contract,
    config_json: String,
    sandbox: Sandbox,
    timeout: Duration,
    /// Warm instances, for `instance: pooled`.
    pool: Option<Pool>,
    stream_instance: StreamInstance,
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
    guests: Guests,
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

/// Starts a call's epoch accounting afresh: its first tick is at least one tick away, and it has
/// seen none yet. A warm instance's deadline from its last call has long passed.
fn begin_call(store: &mut Store<StoreState>) {
    store.set_epoch_deadline(1);
    store.data_mut().ticks_this_call = 0;
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
    // Boxed: a call moves its instance out of the pool, through its futures and back; a box
    // moves as one pointer, a `Live` (with its export handles) as a copy each time.
    #[expect(clippy::vec_box, reason = "the boxes leave the Vec, see above")]
    idle: Mutex<Vec<Box<Live>>>,
    recycle_after: u32,
}

impl Pool {
    #[expect(clippy::vec_box, reason = "the boxes leave the Vec")]
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<Live>>> {
        // A Vec of whole instances stays consistent even if a holder panicked.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Option<Box<Live>> {
        self.lock().pop()
    }

    /// Keeps `live` for another call unless it has served its share.
    fn give_back(&self, mut live: Box<Live>) {
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
        self.exports.kinds().names()
    }

    pub fn is_guardrail(&self) -> bool {
        self.exports.kinds().guardrail
    }

    pub fn is_enricher(&self) -> bool {
        self.exports.kinds().enricher
    }

    pub fn is_router(&self) -> bool {
        self.exports.kinds().router
    }

    pub fn is_hook(&self) -> bool {
        self.exports.kinds().hook
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
    ) -> Result<Box<Live>, PluginFailure> {
        let state = StoreState::new(Arc::clone(&self.name), &self.sandbox, scope)
            .map_err(|reason| self.trap(reason))?;
        let mut store = Store::new(&self.engine, state);
        store.limiter(StoreState::limiter);
        // At every epoch tick after its first a running guest yields to the executor, so a
        // plugin spinning in a loop holds a worker thread for at most two ticks and never
        // outlives its budget: `within` drops it at the next yield.
        store.epoch_deadline_callback(|mut store| {
            let state = store.data_mut();
            state.ticks_this_call += 1;
            // The first tick can come a moment after the call began; from the second on, the
            // guest has run a whole tick and yields. Short calls that straddle a tick never
            // leave their fiber.
            Ok(if state.ticks_this_call < 2 {
                UpdateDeadline::Continue(1)
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        begin_call(&mut store);
        let run = async {
            let instance = self.pre.instantiate_async(&mut store).await?;
            let init = match &self.exports {
                Contract::V0_1(exports) => {
                    v0_1::init(exports, &mut store, &instance, &self.config_json).await?
                }
                Contract::V0_2(exports) => {
                    v0_2::init(exports, &mut store, &instance, &self.config_json).await?
                }
            };
            wasmtime::Result::Ok(init.map(|()| instance))
        };
        match self.within(budget, run).await? {
            Err(reason) => Err(self.trap(format!("init rejected the config: {reason}"))),
            Ok(instance) => Ok(Box::new(Live {
                store,
                instance,
                uses: 0,
                guests: self.exports.new_guests(),
            })),
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
        let backstop = budget.backstop;
        let spent = &mut budget.spent;
        // Armed at the guest's first wait only: most calls finish in one poll and never touch
        // the timer wheel.
        let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let outcome = std::future::poll_fn(|cx| {
            use std::future::Future as _;
            use std::task::Poll;
            let started = std::time::Instant::now();
            let poll = work.as_mut().poll(cx);
            *spent += started.elapsed();
            match poll {
                Poll::Ready(result) => return Poll::Ready(Some(result)),
                Poll::Pending if *spent >= limit => return Poll::Ready(None),
                Poll::Pending => {}
            }
            let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(backstop)));
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match outcome {
            None => Err(self.timed_out()),
            Some(Err(e)) => Err(self.failed(&e)),
            Some(Ok(value)) => Ok(value),
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
            .map(|(value, _scope)| value)
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

    /// Also gives `scope` back, for a caller that makes several calls about one request.
    async fn on_instance<T>(
        &self,
        scope: CallScope,
        budget: &mut Budget,
        call: impl AsyncFnOnce(&mut Store<StoreState>, &Instance, &mut Guests) -> wasmtime::Result<T>,
    ) -> Result<(T, CallScope), PluginFailure> {
        let mut live = self.warm_or_fresh(scope, budget).await?;
        let value = self
            .within(
                budget,
                call(&mut live.store, &live.instance, &mut live.guests),
            )
            .await?;
        let scope = std::mem::take(&mut live.store.data_mut().scope);
        if let Some(pool) = &self.pool {
            pool.give_back(live);
        }
        Ok((value, scope))
    }

    /// An idle pooled instance set up for `scope`, or a fresh one.
    async fn warm_or_fresh(
        &self,
        scope: CallScope,
        budget: &mut Budget,
    ) -> Result<Box<Live>, PluginFailure> {
        match self.pool.as_ref().and_then(Pool::take) {
            Some(mut live) => {
                live.store.data_mut().scope = scope;
                begin_call(&mut live.store);
                Ok(live)
            }
            None => self.instantiate(scope, budget).await,
        }
    }

    fn timed_out(&self) -> PluginFailure {
        self.failures.fetch_add(1, Ordering::Relaxed);
        PluginFailure::Timeout {
            plugin: self.name.to_string(),
            limit_ms: self.timeout.as_millis() as u64,
        }
    }

    fn failed(&self, err: &wasmtime::Error) -> PluginFailure {
        if let Some(unreadable) = err.downcast_ref::<UnreadableBody>() {
            return PluginFailure::Body(unreadable.clone());
        }
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

    async fn check_request(&self, scope: CallScope) -> Result<TextVerdict, PluginFailure> {
        if !self.is_guardrail() {
            return Ok(TextVerdict::Allow);
        }
        self.with_instance(scope, async |store, instance, guests| {
            by_version!(&self.exports, guests, |version, exports, guests| {
                version::check_request(exports, guests, store, instance).await
            })
        })
        .await
    }

    async fn check_response(
        &self,
        scope: CallScope,
        response: &ResponseView,
    ) -> Result<TextVerdict, PluginFailure> {
        if !self.is_guardrail() {
            return Ok(TextVerdict::Allow);
        }
        self.with_instance(scope, async |store, instance, guests| {
            by_version!(&self.exports, guests, |version, exports, guests| {
                version::check_response(exports, guests, store, instance, response).await
            })
        })
        .await
    }

    async fn enrich(&self, scope: CallScope) -> Result<Enrichment, PluginFailure> {
        if !self.is_enricher() {
            return Ok(Enrichment::default());
        }
        self.with_instance(scope, async |store, instance, guests| {
            by_version!(&self.exports, guests, |version, exports, guests| {
                version::enrich(exports, guests, store, instance).await
            })
        })
        .await
    }

    async fn choose(
        &self,
        scope: CallScope,
        request: &RouteRequest<'_>,
        candidates: &[Candidate],
    ) -> Result<Vec<u32>, PluginFailure> {
        if !self.is_router() {
            return Ok(Vec::new());
        }
        self.with_instance(scope, async |store, instance, guests| {
            by_version!(&self.exports, guests, |version, exports, guests| {
                version::choose(exports, guests, store, instance, request, candidates).await
            })
        })
        .await
    }

    /// One `check-stream` call on an instance the caller holds.
    async fn check_stream_on(
        &self,
        store: &mut Store<StoreState>,
        instance: &Instance,
        guests: &mut Guests,
        delta: &StreamDelta<'_>,
    ) -> wasmtime::Result<StreamVerdict> {
        by_version!(&self.exports, guests, |version, exports, guests| {
            version::check_stream(exports, guests, store, instance, delta).await
        })
    }

    async fn on_call_end(
        &self,
        scope: CallScope,
        record: &CallRecord,
    ) -> Result<(), PluginFailure> {
        if !self.is_hook() {
            return Ok(());
        }
        self.with_instance(scope, async |store, instance, guests| {
            by_version!(&self.exports, guests, |version, exports, guests| {
                version::on_call_end(exports, guests, store, instance, record).await
            })
        })
        .await
    }
}

/// One instance that sees a whole stream, delta by delta, as `check-stream` promises. It is
/// taken (warm from the pool, or started) at the first delta, so a stream without text costs
/// nothing. A pooled instance goes back to the pool with the stream only if it saw every choice
/// to its last delta and released it: what it kept for the stream, it has been told to let go.
/// Otherwise, and at its first failure, it is dropped: a trapped store is never entered again.
pub struct StreamSession {
    plugin: Arc<LoadedPlugin>,
    scope: Option<CallScope>,
    live: Option<Box<Live>>,
    progress: StreamProgress,
}

/// Whether a stream's instance may serve again, from the deltas it saw and what it answered.
#[derive(Debug, Default)]
struct StreamProgress {
    /// Choices the instance has seen deltas of, but not the last one.
    unfinished: Vec<u32>,
    /// It blocked the stream, or held text at a choice's end.
    spoiled: bool,
}

impl StreamProgress {
    fn saw(&mut self, delta: &StreamDelta<'_>, verdict: &StreamVerdict) {
        let index = delta.choice_index;
        self.unfinished.retain(|&i| i != index);
        match verdict {
            StreamVerdict::Block { .. } => self.spoiled = true,
            StreamVerdict::Hold if delta.finished => self.spoiled = true,
            _ if !delta.finished => self.unfinished.push(index),
            _ => {}
        }
    }

    fn ended_clean(&self) -> bool {
        self.unfinished.is_empty() && !self.spoiled
    }
}

impl Drop for StreamSession {
    fn drop(&mut self) {
        let Some(live) = self.live.take() else {
            return;
        };
        if let Some(pool) = &self.plugin.pool {
            if self.progress.ended_clean() {
                pool.give_back(live);
            }
        }
    }
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
            progress: StreamProgress::default(),
        }
    }

    /// Each delta gets the plugin's whole time limit (the first one including the start).
    async fn check(&mut self, delta: &StreamDelta<'_>) -> Result<StreamVerdict, PluginFailure> {
        let plugin = &self.plugin;
        if !plugin.is_guardrail() {
            return Ok(StreamVerdict::Release(delta.text.to_owned()));
        }
        if plugin.stream_instance == StreamInstance::PerDelta {
            return self.check_alone(delta).await;
        }
        let (live, scope) = (&mut self.live, &mut self.scope);
        plugin
            .metered(async |budget| {
                let mut current = match live.take() {
                    Some(current) => current,
                    None => {
                        let scope = scope.take().unwrap_or_default();
                        plugin.warm_or_fresh(scope, budget).await?
                    }
                };
                let Live {
                    store,
                    instance,
                    guests,
                    ..
                } = &mut *current;
                begin_call(store);
                let call = plugin.check_stream_on(store, instance, guests, delta);
                // A failed instance is dropped, never used again.
                let verdict = plugin.within(budget, call).await?;
                *live = Some(current);
                Ok(verdict)
            })
            .await
            .inspect(|verdict| self.progress.saw(delta, verdict))
    }

    /// `stream_instance: per_delta`: the delta is a call like any other, and the stream keeps no
    /// instance between deltas.
    async fn check_alone(
        &mut self,
        delta: &StreamDelta<'_>,
    ) -> Result<StreamVerdict, PluginFailure> {
        let plugin = &self.plugin;
        let scope = self.scope.take().unwrap_or_default();
        let (verdict, scope) = plugin
            .metered(async |budget| {
                plugin
                    .on_instance(scope, budget, async |store, instance, guests| {
                        plugin.check_stream_on(store, instance, guests, delta).await
                    })
                    .await
            })
            .await?;
        self.scope = Some(scope);
        Ok(verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(choice_index: u32, finished: bool) -> StreamDelta<'static> {
        StreamDelta {
            choice_index,
            text: "text",
            released: "",
            finished,
        }
    }

    fn release() -> StreamVerdict {
        StreamVerdict::Release("text".into())
    }

    #[test]
    fn an_instance_serves_again_once_every_choice_it_saw_has_ended() {
        let mut progress = StreamProgress::default();
        progress.saw(&delta(0, false), &release());
        progress.saw(&delta(1, false), &StreamVerdict::Hold);
        progress.saw(&delta(0, true), &release());
        assert!(!progress.ended_clean(), "choice 1 is still open");
        progress.saw(&delta(1, true), &release());
        assert!(progress.ended_clean());
    }

    #[test]
    fn an_instance_that_blocked_or_held_at_the_end_never_serves_again() {
        let mut blocked = StreamProgress::default();
        blocked.saw(
            &delta(0, false),
            &StreamVerdict::Block {
                reason: "no".into(),
            },
        );
        assert!(!blocked.ended_clean());

        let mut held = StreamProgress::default();
        held.saw(&delta(0, true), &StreamVerdict::Hold);
        assert!(!held.ended_clean());
    }

    #[test]
    fn a_stream_cut_before_its_end_spends_its_instance() {
        let mut progress = StreamProgress::default();
        progress.saw(&delta(0, false), &release());
        assert!(!progress.ended_clean());
    }
}
