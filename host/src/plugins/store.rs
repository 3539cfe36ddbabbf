//! What one plugin instance may reach: its WASI context (no files, sockets, environment or real
//! clocks unless granted), its memory cap, and the call it serves.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{
    FsPerms, HostMonotonicClock, HostWallClock, ResourceTable, WasiCtx, WasiCtxView, WasiView,
};

use crate::openai::{Derived, TextView};
use crate::providers::{Endpoint, JsonObject, RequestBody, UnreadableBody};

/// A directory grant, resolved to a host path.
#[derive(Debug, Clone)]
pub struct DirGrant {
    pub host: PathBuf,
    pub guest: String,
    pub write: bool,
}

/// The capabilities and limits of one plugin, fixed when it is loaded.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub memory_bytes: usize,
    pub dirs: Vec<DirGrant>,
    pub clocks: bool,
}

/// What a plugin call is about, for the host imports.
#[derive(Debug, Clone, Default)]
pub struct CallScope {
    pub call_id: Option<String>,
    /// The request a guardrail or enricher serves; `None` for routers and hooks. Boxed, as a
    /// scope moves through several futures on its way into the store.
    pub request: Option<Box<RequestFacts>>,
}

/// The fields of a request as a plugin may read them, copied when its call starts. Only what is
/// cheap to copy is copied; the texts are read from the body when a plugin first asks.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    pub key_alias: Option<String>,
    pub team: Option<String>,
    pub end_user: Option<String>,
    pub metadata: JsonObject,
    pub tags: Vec<String>,
    pub body: RequestBody,
    pub derived: Derived,
}

impl RequestFacts {
    pub fn texts(&self) -> Result<&[TextView], UnreadableBody> {
        self.derived.texts(self.endpoint, &self.body)
    }

    pub fn estimated_tokens(&self) -> Result<u64, UnreadableBody> {
        self.derived.prompt_tokens(self.endpoint, &self.body)
    }

    pub fn metadata_json(&self) -> String {
        serde_json::to_string(&self.metadata).unwrap_or_else(|_| "{}".into())
    }
}

/// Longest log message a plugin may write in one call; the rest is cut.
const MAX_LOG_MESSAGE: usize = 8 * 1024;

/// The data of one store: one plugin instance serving one call.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    pub(super) plugin: Arc<str>,
    pub(super) scope: CallScope,
    /// Epoch ticks the current call has seen.
    pub(super) ticks_this_call: u32,
}

impl std::fmt::Debug for StoreState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreState")
            .field("plugin", &self.plugin)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl StoreState {
    pub fn new(
        plugin: Arc<str>,
        sandbox: &Sandbox,
        scope: CallScope,
    ) -> Result<StoreState, String> {
        let mut wasi = WasiCtx::builder();
        // Nothing is inherited: no environment, arguments, stdio or network (denied by default).
        for dir in &sandbox.dirs {
            let perms = if dir.write {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            wasi.preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|e| format!("cannot grant the directory {}: {e}", dir.host.display()))?;
        }
        if !sandbox.clocks {
            // WASI has no way to remove clocks, so ungranted plugins get clocks stopped at zero.
            wasi.wall_clock(StoppedClock);
            wasi.monotonic_clock(StoppedClock);
        }
        let limits = StoreLimitsBuilder::new()
            .memory_size(sandbox.memory_bytes)
            .instances(32)
            .tables(64)
            .memories(8)
            .trap_on_grow_failure(true)
            .build();
        Ok(StoreState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits,
            plugin,
            scope,
            ticks_this_call: 0,
        })
    }

    pub fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }

    /// A plugin's log line, into the gateway's log with its name and call id. Long messages are
    /// cut at [`MAX_LOG_MESSAGE`] bytes.
    pub fn write_log(&self, level: tracing::Level, mut message: String) {
        if message.len() > MAX_LOG_MESSAGE {
            let mut end = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let plugin = &*self.plugin;
        let call_id = self.scope.call_id.as_deref().unwrap_or("-");
        // `tracing` takes levels as constants, hence one arm each.
        match level {
            tracing::Level::TRACE => {
                tracing::trace!(target: "portcullis::plugin", plugin, call_id, "{message}")
            }
            tracing::Level::DEBUG => {
                tracing::debug!(target: "portcullis::plugin", plugin, call_id, "{message}")
            }
            tracing::Level::INFO => {
                tracing::info!(target: "portcullis::plugin", plugin, call_id, "{message}")
            }
            tracing::Level::WARN => {
                tracing::warn!(target: "portcullis::plugin", plugin, call_id, "{message}")
            }
            _ => tracing::error!(target: "portcullis::plugin", plugin, call_id, "{message}"),
        }
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A clock that always reads zero.
struct StoppedClock;

impl HostWallClock for StoppedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for StoppedClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }

    fn now(&self) -> u64 {
        0
    }
}
