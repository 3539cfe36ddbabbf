//! The immutable snapshot of configuration a request runs on.
//!
//! **A request reads one `Generation` from its first byte to its last; a reload never changes it.**
//! A reload builds a new generation and swaps it in; the old one is dropped when its last request
//! ends.

use std::sync::Arc;
use std::time::SystemTime;

use crate::config::{Config, GuardrailMode, StrategyName};
use crate::extension::{CallHook, Enricher, Guardrail, RoutingStrategy};
use crate::governance::Governance;
use crate::pipeline::authenticate::KeyTable;
use crate::pipeline::post_call::{LogHook, PostCallQueue};
use crate::plugins::{
    LoadedPlugin, PluginError, PluginRuntime, WasmEnricher, WasmGuardrail, WasmHook, WasmRouter,
};
use crate::providers::UpstreamClient;
use crate::router::{strategy, Router};

/// A guardrail and when it runs.
#[derive(Debug)]
pub struct GuardrailSlot {
    pub guardrail: Arc<dyn Guardrail>,
    pub mode: GuardrailMode,
    /// Runs on every call, not only when the key or the request names it.
    pub default_on: bool,
    /// Logs its verdict without acting on it.
    pub monitor: bool,
}

/// What every generation shares with the ones before and after it.
#[derive(Debug, Clone)]
pub struct Shared {
    /// So a reload keeps the upstream connection pool.
    pub client: UpstreamClient,
    /// The one worker that runs post-call hooks.
    pub post_call: PostCallQueue,
    /// The WebAssembly engine and compiled-component cache.
    pub plugins: Arc<PluginRuntime>,
    /// Stored keys, budgets, limits and spend; `None` only when checking a config.
    pub governance: Option<Arc<Governance>>,
}

impl Shared {
    /// Starts what generations share: the upstream client, the post-call worker (on the current
    /// tokio runtime) with room for `post_call_queue` events, and the WebAssembly engine.
    pub fn start(
        post_call_queue: usize,
        governance: Option<Arc<Governance>>,
    ) -> Result<Shared, PluginError> {
        Ok(Shared {
            client: UpstreamClient::new(),
            post_call: PostCallQueue::start(post_call_queue),
            plugins: PluginRuntime::new()?,
            governance,
        })
    }
}

/// Why a configuration could not become a generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("router.strategy: the plugin '{0}' does not export a router")]
    NotARouter(String),
}

/// Everything a request needs, built once per configuration.
#[derive(Debug)]
pub struct Generation {
    /// 1 for the configuration the gateway started with, one more for each successful reload.
    pub number: u64,
    pub loaded_at: SystemTime,
    pub config: Config,
    pub keys: KeyTable,
    pub router: Router,
    pub enrichers: Vec<Arc<dyn Enricher>>,
    /// Guardrails of every mode, in configured order.
    pub guardrails: Vec<GuardrailSlot>,
    pub hooks: Arc<[Arc<dyn CallHook>]>,
    /// The enabled plugins, in configured order.
    pub plugins: Vec<Arc<LoadedPlugin>>,
    pub client: UpstreamClient,
    pub post_call: PostCallQueue,
    pub governance: Option<Arc<Governance>>,
}

impl Generation {
    /// Loads the config's plugins (compiling only what the cache lacks) and builds the router.
    /// `previous` is the generation this one replaces: its deployments' live statistics carry on.
    pub async fn build(
        config: Config,
        shared: &Shared,
        previous: Option<&Generation>,
    ) -> Result<Generation, GenerationError> {
        let mut plugins = Vec::with_capacity(config.plugins.enabled.len());
        for plugin in &config.plugins.enabled {
            plugins.push(shared.plugins.load(&config, plugin).await?);
        }
        let mut guardrails = Vec::new();
        let mut enrichers: Vec<Arc<dyn Enricher>> = Vec::new();
        let mut hooks: Vec<Arc<dyn CallHook>> = Vec::new();
        if LogHook::wanted() {
            hooks.push(Arc::new(LogHook));
        }
        for (plugin, settings) in plugins.iter().zip(&config.plugins.enabled) {
            if plugin.is_guardrail() {
                guardrails.push(GuardrailSlot {
                    guardrail: Arc::new(WasmGuardrail::new(Arc::clone(plugin), settings.on_error)),
                    mode: settings.mode,
                    default_on: settings.default_on,
                    monitor: settings.monitor,
                });
            }
            if plugin.is_enricher() {
                enrichers.push(Arc::new(WasmEnricher::new(
                    Arc::clone(plugin),
                    settings.on_error,
                )));
            }
            if plugin.is_hook() {
                hooks.push(Arc::new(WasmHook::new(Arc::clone(plugin))));
            }
            tracing::info!(plugin = %plugin.name, kinds = ?plugin.kinds(), hash = %plugin.content_hash, "plugin loaded");
        }
        let fallback = strategy::builtin(config.router.fallback_strategy);
        let strategy: Arc<dyn RoutingStrategy> =
            match StrategyName::builtin(&config.router.strategy) {
                Some(name) => strategy::builtin(name),
                None => {
                    let name = &config.router.strategy;
                    let plugin = plugins
                        .iter()
                        .find(|p| &*p.name == name.as_str() && p.is_router())
                        .ok_or_else(|| GenerationError::NotARouter(name.clone()))?;
                    Arc::new(WasmRouter::new(Arc::clone(plugin), fallback))
                }
            };
        Ok(Generation {
            number: previous.map_or(1, |p| p.number + 1),
            loaded_at: SystemTime::now(),
            keys: KeyTable::from_config(&config.auth),
            router: Router::new(&config, strategy, previous.map(|p| &p.router)),
            enrichers,
            guardrails,
            hooks: hooks.into(),
            plugins,
            client: shared.client.clone(),
            post_call: shared.post_call.clone(),
            governance: shared.governance.clone(),
            config,
        })
    }
}
