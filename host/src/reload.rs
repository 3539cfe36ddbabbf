//! Hot reload: a new generation built from the config file off the request path and swapped in
//! whole, when the config file or a plugin file changes, on SIGHUP, or when asked.
//!
//! **A reload that fails changes nothing.** The old generation keeps serving; the error, naming
//! the file and the reason, is logged and kept for `/admin/status`.
//!
//! **Requests in flight finish on the generation they started with**: the swap only changes what
//! the next request loads.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use notify::{EventKind, RecursiveMode, Watcher as _};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError};
use crate::generation::{self, Generation, GenerationError};

/// How long a burst of file events must be quiet before the reload starts. A save is often
/// several events (truncate, write, close; or write a temporary file and rename it over).
const SETTLE: Duration = Duration::from_millis(150);
/// A stream of events that never goes quiet still reloads this long after its first event.
const SETTLE_AT_MOST: Duration = Duration::from_secs(1);

/// Why a reload did not produce a new generation.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{path}: {error}")]
    Config { path: PathBuf, error: ConfigError },
    #[error("{path}: {error}")]
    Generation {
        path: PathBuf,
        error: GenerationError,
    },
    #[error("the reload task failed: {0}")]
    Task(String),
}

/// What one reload attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// A new generation serves, with this number.
    Swapped(u64),
    /// The config and plugin files are the ones the last attempt saw; nothing was built.
    Unchanged,
    /// The old generation keeps serving; see [`ReloadStatus::last_error`].
    Failed,
}

/// Counters and the last error, for `/admin/status`.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub succeeded: u64,
    pub failed: u64,
    /// Set when the latest attempt failed; cleared by the next success.
    pub last_error: Option<(SystemTime, String)>,
    /// From the first file event (or the request) to the new generation serving.
    pub last_duration: Option<Duration>,
}

/// What a generation was built from, to skip reloads that would build the same thing again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inputs {
    config: [u8; 32],
    /// Each enabled plugin's file and the hash of its bytes (`None` if it could not be read).
    plugins: Vec<(PathBuf, Option<[u8; 32]>)>,
}

/// The current generation, and everything needed to build the next one.
pub struct Reloader {
    config_path: PathBuf,
    parts: generation::Shared,
    current: ArcSwap<Generation>,
    /// One reload at a time, and what the last attempt was built from.
    attempt: tokio::sync::Mutex<Option<Inputs>>,
    status: Mutex<ReloadStatus>,
    /// Woken by file events, SIGHUP and [`Reloader::request`].
    wake: Arc<Notify>,
    /// The next reload rebuilds even if no file changed.
    forced: AtomicBool,
    watcher: Mutex<Option<DirWatcher>>,
    /// The files whose events matter, as the watcher reports them (canonical directory and
    /// name). Everything else in those directories (logs, editors' swap files) is ignored.
    watched_files: Arc<std::sync::RwLock<HashSet<PathBuf>>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("config_path", &self.config_path)
            .field("generation", &self.current.load().number)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// Builds the first generation from `config` (already loaded from `config_path`).
    pub async fn start(
        config_path: PathBuf,
        config: Config,
        parts: generation::Shared,
    ) -> Result<Arc<Reloader>, GenerationError> {
        let inputs = read_inputs(config.text_hash, &config);
        let generation = Generation::build(config, &parts, None).await?;
        Ok(Arc::new(Reloader {
            config_path,
            parts,
            current: ArcSwap::from_pointee(generation),
            attempt: tokio::sync::Mutex::new(Some(inputs)),
            status: Mutex::new(ReloadStatus::default()),
            wake: Arc::new(Notify::new()),
            forced: AtomicBool::new(false),
            watcher: Mutex::new(None),
            watched_files: Arc::default(),
        }))
    }

    /// The generation a new request should run on, to hold to its last byte.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn status(&self) -> ReloadStatus {
        self.lock_status().clone()
    }

    /// Asks the reload task for a reload that rebuilds even if no file changed (SIGHUP).
    pub fn request(&self) {
        self.forced.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Watches the config file's and the plugins' directories (not the files: editors and tools
    /// save by renaming a new file over the old one) and reloads after each settled burst of
    /// changes, until the gateway stops. Also serves [`Reloader::request`].
    pub fn spawn(self: &Arc<Self>) {
        let wake = Arc::clone(&self.wake);
        let files = Arc::clone(&self.watched_files);
        let watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) if is_change(&event.kind) => {
                    let files = files.read().unwrap_or_else(|p| p.into_inner());
                    if event.paths.iter().any(|path| is_watched(&files, path)) {
                        wake.notify_one();
                    }
                }
                Ok(_) => {}
                Err(e) => debug!(error = %e, "file watch error"),
            });
        match watcher {
            Ok(watcher) => {
                *self.lock_watcher() = Some(DirWatcher {
                    watcher,
                    dirs: HashSet::new(),
                });
                self.watch_dirs_of(&self.current().config);
            }
            Err(e) => warn!(error = %e, "cannot watch files; reload with SIGHUP instead"),
        }
        // A save between the first load and the watch starting made no event: look once.
        self.wake.notify_one();
        let reloader = Arc::clone(self);
        tokio::spawn(async move { reloader.run().await });
    }

    async fn run(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            let changed_at = Instant::now();
            let settled = async {
                loop {
                    tokio::select! {
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(SETTLE) => break,
                    }
                }
            };
            let _ = tokio::time::timeout_at(changed_at + SETTLE_AT_MOST, settled).await;
            let forced = self.forced.swap(false, Ordering::Relaxed);
            self.reload(forced, changed_at).await;
        }
    }

    /// Builds a generation from the files as they are now and swaps it in. Unless `forced`, does
    /// nothing when the config and plugin files are those the previous attempt saw.
    pub async fn reload(&self, forced: bool, changed_at: Instant) -> Reloaded {
        let mut attempt = self.attempt.lock().await;
        let path = self.config_path.clone();
        let read = tokio::task::spawn_blocking(move || {
            let text = std::fs::read(&path).map_err(|error| ConfigError::Read {
                path: path.clone(),
                error,
            })?;
            let config = std::str::from_utf8(&text)
                .map_err(|e| ConfigError::Syntax(format!("the file is not UTF-8: {e}")))
                .and_then(|text| Config::from_file_text(&path, text));
            Ok::<_, ConfigError>(match config {
                Ok(config) => (read_inputs(config.text_hash, &config), Ok(config)),
                Err(e) => (config_only_inputs(Sha256::digest(&text).into()), Err(e)),
            })
        })
        .await;
        let (inputs, config) = match read {
            Ok(Ok(pair)) => pair,
            Ok(Err(error)) => {
                *attempt = None;
                return self.failed(ReloadError::Config {
                    path: self.config_path.clone(),
                    error,
                });
            }
            Err(e) => return self.failed(ReloadError::Task(e.to_string())),
        };
        if !forced && attempt.as_ref() == Some(&inputs) {
            debug!("reload: no file changed");
            return Reloaded::Unchanged;
        }
        *attempt = Some(inputs);
        let config = match config {
            Ok(config) => config,
            Err(error) => {
                return self.failed(ReloadError::Config {
                    path: self.config_path.clone(),
                    error,
                })
            }
        };
        // Watch where the new config looks even if it fails, so fixing it is seen.
        self.watch_dirs_of(&config);
        let previous = self.current();
        warn_about_restart_only_changes(&previous.config, &config);
        match Generation::build(config, &self.parts, Some(&previous)).await {
            Ok(generation) => {
                let number = generation.number;
                let plugins = generation.plugins.clone();
                self.current.store(Arc::new(generation));
                // The previous generation's components stay too: switching back costs nothing.
                self.parts
                    .plugins
                    .retain_only(&[&plugins, &previous.plugins]);
                let took = changed_at.elapsed();
                {
                    let mut status = self.lock_status();
                    status.succeeded += 1;
                    status.last_error = None;
                    status.last_duration = Some(took);
                }
                info!(
                    generation = number,
                    took_ms = took.as_secs_f64() * 1000.0,
                    "configuration reloaded"
                );
                Reloaded::Swapped(number)
            }
            Err(error) => {
                // A build can fail for reasons outside its files (an `init` slow under load):
                // the next event tries again rather than taking the same files as known bad.
                *attempt = None;
                self.failed(ReloadError::Generation {
                    path: self.config_path.clone(),
                    error,
                })
            }
        }
    }

    fn failed(&self, error: ReloadError) -> Reloaded {
        let message = error.to_string();
        warn!(error = %message, "reload failed: the previous configuration keeps serving");
        let mut status = self.lock_status();
        status.failed += 1;
        status.last_error = Some((SystemTime::now(), message));
        Reloaded::Failed
    }

    /// Watches the files `config` reads (through their directories) instead of the old ones.
    fn watch_dirs_of(&self, config: &Config) {
        let mut files = vec![self.config_path.clone()];
        files.extend(config.plugins.enabled.iter().map(|p| config.plugin_path(p)));
        // One spelling per file, as the watcher reports it: the canonical directory and the name.
        let files: HashSet<PathBuf> = files
            .iter()
            .filter_map(|file| {
                let dir = parent_dir(file);
                let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
                Some(dir.join(file.file_name()?))
            })
            .collect();
        let dirs: HashSet<PathBuf> = files.iter().map(|file| parent_dir(file)).collect();
        *self
            .watched_files
            .write()
            .unwrap_or_else(|p| p.into_inner()) = files;
        if let Some(watch) = self.lock_watcher().as_mut() {
            watch.set(dirs);
        }
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, ReloadStatus> {
        // Plain counters: consistent even if a holder panicked.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_watcher(&self) -> std::sync::MutexGuard<'_, Option<DirWatcher>> {
        self.watcher.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The directories being watched, non-recursively.
struct DirWatcher {
    watcher: notify::RecommendedWatcher,
    dirs: HashSet<PathBuf>,
}

impl DirWatcher {
    fn set(&mut self, wanted: HashSet<PathBuf>) {
        for gone in self.dirs.difference(&wanted) {
            let _ = self.watcher.unwatch(gone);
        }
        let mut watching = HashSet::new();
        for dir in wanted {
            if self.dirs.contains(&dir) {
                watching.insert(dir);
                continue;
            }
            // A directory that does not exist yet is tried again at the next reload.
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    debug!(dir = %dir.display(), "watching");
                    watching.insert(dir);
                }
                Err(e) => debug!(dir = %dir.display(), error = %e, "cannot watch"),
            }
        }
        self.dirs = watching;
    }
}

/// Whether a file event may mean new content. Opening and reading a file does not.
fn is_change(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Whether an event on `path` concerns a watched file. Kubernetes updates a mounted ConfigMap by
/// swapping a `..data` symlink beside the file, so `..`-names in a watched directory count too.
fn is_watched(files: &HashSet<PathBuf>, path: &Path) -> bool {
    if files.contains(path) {
        return true;
    }
    let swapped_in = path
        .file_name()
        .is_some_and(|name| name.to_string_lossy().starts_with(".."));
    swapped_in && files.iter().any(|file| file.parent() == path.parent())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn config_only_inputs(text_hash: [u8; 32]) -> Inputs {
    Inputs {
        config: text_hash,
        plugins: Vec::new(),
    }
}

/// The config's hash and every enabled plugin file's. Blocking: call it off the runtime.
fn read_inputs(text_hash: [u8; 32], config: &Config) -> Inputs {
    let mut inputs = config_only_inputs(text_hash);
    for plugin in &config.plugins.enabled {
        let path = config.plugin_path(plugin);
        let hash = std::fs::read(&path)
            .ok()
            .map(|bytes| Sha256::digest(&bytes).into());
        inputs.plugins.push((path, hash));
    }
    inputs
}

/// Settings the listener took at start cannot change under it; say so instead of ignoring them.
fn warn_about_restart_only_changes(old: &Config, new: &Config) {
    let changed = [
        ("server.listen", old.server.listen != new.server.listen),
        (
            "server.tls",
            old.server.tls.as_ref().map(|t| (&t.cert_file, &t.key_file))
                != new.server.tls.as_ref().map(|t| (&t.cert_file, &t.key_file)),
        ),
        (
            "server.post_call_queue",
            old.server.post_call_queue != new.server.post_call_queue,
        ),
        (
            "server.shutdown_drain_s",
            old.server.shutdown_drain_s != new.server.shutdown_drain_s,
        ),
        ("store", old.store != new.store),
    ];
    for (field, _) in changed.iter().filter(|(_, changed)| *changed) {
        warn!(
            field,
            "this setting changed but takes effect only at the next start"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "models:\n  - { name: a, provider: mock }\n";
    const OTHER: &str = "models:\n  - { name: b, provider: mock }\n";

    struct Fixture {
        dir: PathBuf,
        path: PathBuf,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            let dir = std::env::temp_dir()
                .join(format!("portcullis-reload-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let path = dir.join("portcullis.yaml");
            std::fs::write(&path, GOOD).expect("write config");
            Fixture { dir, path }
        }

        async fn reloader(&self) -> Arc<Reloader> {
            let config = Config::load(&self.path).expect("valid config");
            let parts = generation::Shared::start(8, None).expect("engine");
            Reloader::start(self.path.clone(), config, parts)
                .await
                .expect("first generation")
        }

        fn write(&self, text: &str) {
            std::fs::write(&self.path, text).expect("write config");
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn reload(reloader: &Reloader, forced: bool) -> Reloaded {
        reloader.reload(forced, Instant::now()).await
    }

    fn groups(reloader: &Reloader) -> Vec<String> {
        reloader.current().router.group_names().to_vec()
    }

    #[tokio::test]
    async fn a_changed_file_swaps_and_an_unchanged_one_builds_nothing() {
        let fixture = Fixture::new("swap");
        let reloader = fixture.reloader().await;
        assert_eq!(reloader.current().number, 1);
        assert_eq!(reload(&reloader, false).await, Reloaded::Unchanged);
        fixture.write(OTHER);
        assert_eq!(reload(&reloader, false).await, Reloaded::Swapped(2));
        assert_eq!(groups(&reloader), ["b"]);
        assert_eq!(reload(&reloader, true).await, Reloaded::Swapped(3));
        assert_eq!(reloader.status().succeeded, 2);
    }

    #[tokio::test]
    async fn a_broken_config_keeps_the_old_generation_and_reports_the_field() {
        let fixture = Fixture::new("broken");
        let reloader = fixture.reloader().await;
        let held = reloader.current();
        fixture.write("models:\n  - { name: a, provider: mock, api_bsae: x }\n");
        assert_eq!(reload(&reloader, false).await, Reloaded::Failed);
        assert_eq!(reloader.current().number, 1);
        assert!(Arc::ptr_eq(&held, &reloader.current()));
        let status = reloader.status();
        let (_, message) = status.last_error.expect("an error is kept");
        assert!(message.contains("models[0].api_bsae"), "{message}");
        assert!(message.contains("portcullis.yaml"), "{message}");

        // The same broken file again is not retried; a fix is taken and clears the error.
        assert_eq!(reload(&reloader, false).await, Reloaded::Unchanged);
        fixture.write(OTHER);
        assert_eq!(reload(&reloader, false).await, Reloaded::Swapped(2));
        assert!(reloader.status().last_error.is_none());
        // A request that started before the swap still sees its own generation.
        assert_eq!(held.router.group_names(), ["a"]);
    }

    #[tokio::test]
    async fn a_missing_file_is_a_failed_reload() {
        let fixture = Fixture::new("missing");
        let reloader = fixture.reloader().await;
        std::fs::remove_file(&fixture.path).expect("remove");
        assert_eq!(reload(&reloader, false).await, Reloaded::Failed);
        fixture.write(GOOD);
        // Same content as before, but the failure in between means it must be rebuilt.
        assert_eq!(reload(&reloader, false).await, Reloaded::Swapped(2));
    }

    #[tokio::test]
    async fn a_reload_keeps_the_live_stats_of_deployments_that_stay() {
        let fixture = Fixture::new("stats");
        let reloader = fixture.reloader().await;
        let before = reloader.current();
        let (deployment, in_flight) = before
            .router
            .reserve(
                &crate::extension::RouteRequest {
                    call_id: "c",
                    group: "a",
                    estimated_tokens: 1,
                    stream: false,
                    origin: None,
                },
                &[],
            )
            .await
            .expect("a deployment");
        assert_eq!(deployment.candidate().in_flight, 1);
        fixture.write("models:\n  - { name: a, provider: mock, weight: 5 }\n");
        assert_eq!(reload(&reloader, false).await, Reloaded::Swapped(2));
        let after = reloader.current();
        let candidate = after
            .router
            .deployment("a", &deployment.id)
            .expect("same id")
            .candidate();
        assert_eq!((candidate.in_flight, candidate.weight), (1, 5));
        drop(in_flight);
        let candidate = after
            .router
            .deployment("a", &deployment.id)
            .expect("same id")
            .candidate();
        assert_eq!(candidate.in_flight, 0);
    }
}
