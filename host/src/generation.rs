//! The immutable snapshot of configuration a request runs on.
//!
//! **A request reads one `Generation` from its first byte to its last; a reload never changes it.**
//! A reload builds a new generation and swaps it in; the old one is dropped when its last request
//! ends.

use std::sync::Arc;

use crate::config::Config;
use crate::extension::{CallHook, Enricher, Guardrail};
use crate::pipeline::authenticate::KeyTable;
use crate::pipeline::post_call::{LogHook, PostCallQueue};
use crate::providers::UpstreamClient;
use crate::router::Router;

/// Everything a request needs, built once per configuration.
#[derive(Debug)]
pub struct Generation {
    pub config: Config,
    pub keys: KeyTable,
    pub router: Router,
    pub enrichers: Vec<Arc<dyn Enricher>>,
    pub guardrails: Vec<Arc<dyn Guardrail>>,
    pub hooks: Arc<[Arc<dyn CallHook>]>,
    /// Shared by all generations, so a reload keeps the upstream connection pool.
    pub client: UpstreamClient,
    /// Shared by all generations: the one worker that runs post-call hooks.
    pub post_call: PostCallQueue,
}

impl Generation {
    pub fn new(config: Config, client: UpstreamClient, post_call: PostCallQueue) -> Generation {
        Generation {
            keys: KeyTable::from_config(&config.auth),
            router: Router::from_config(&config),
            enrichers: Vec::new(),
            guardrails: Vec::new(),
            hooks: Arc::new([Arc::new(LogHook) as Arc<dyn CallHook>]),
            client,
            post_call,
            config,
        }
    }
}
