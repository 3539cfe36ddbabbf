//! What one plugin instance may reach: its WASI context (no files, sockets, environment or real
//! clocks unless granted), its memory cap, and the call it serves.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{
    FsPerms, HostMonotonicClock, HostWallClock, ResourceTable, WasiCtx, WasiCtxView, WasiView,
};

use crate::providers::RequestBody;

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
    pub request_body: Option<RequestBody>,
}

/// The data of one store: one plugin instance serving one call.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    pub(super) plugin: Arc<str>,
    pub(super) scope: CallScope,
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
        })
    }

    pub fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
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
