//! Runs the real `portcullis` binary as a child process on a free port, with captured logs.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::client::RequestBuilder;

/// How long a gateway may take to answer its readiness probe.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `portcullis check` may run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// A directory removed on drop (the crate avoids a `tempfile` dependency for this).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The `portcullis` executable: `$PORTCULLIS_BIN`, else the workspace's debug, else release build.
pub fn binary_path() -> PathBuf {
    if let Some(path) = std::env::var_os("PORTCULLIS_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "PORTCULLIS_BIN={} does not exist",
            path.display()
        );
        return path;
    }
    let exe = format!("portcullis{}", std::env::consts::EXE_SUFFIX);
    // The test runs from `<target>/<profile>/deps/`: the binary it was built with is two levels
    // up. The compile-time manifest path below can name another checkout whose build cargo
    // reused, so it comes second.
    if let Some(profile_dir) = std::env::current_exe()
        .ok()
        .and_then(|test| Some(test.parent()?.parent()?.to_owned()))
    {
        let candidate = profile_dir.join(&exe);
        if candidate.is_file() {
            return candidate;
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut targets = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        targets.push(workspace.join(dir));
    }
    targets.push(workspace.join("target"));
    for target in &targets {
        for profile in ["debug", "release"] {
            let candidate = target.join(profile).join(&exe);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "portcullis binary not found: run `cargo build -p portcullis` first (tests/run does this)"
    );
}

/// Starts tried before giving up on finding a free port.
const PORT_ATTEMPTS: usize = 3;

/// Why a started gateway never answered its readiness probe.
#[derive(Debug)]
enum NotReady {
    Exited(ExitStatus),
    TimedOut,
}

/// A port that was free a moment ago (bind :0, read it, release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// Options for starting a gateway; see [`Gateway::builder`].
#[derive(Debug, Clone)]
pub struct GatewayBuilder {
    yaml: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    ready_timeout: Duration,
}

impl GatewayBuilder {
    /// An extra environment variable for the child.
    pub fn env(mut self, key: &str, value: &str) -> GatewayBuilder {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// An extra command-line argument, after `--config <path>`.
    pub fn arg(mut self, arg: &str) -> GatewayBuilder {
        self.args.push(arg.to_owned());
        self
    }

    pub fn ready_timeout(mut self, timeout: Duration) -> GatewayBuilder {
        self.ready_timeout = timeout;
        self
    }

    /// Spawn and wait for `/health/readiness` to answer 200 (panics with the logs otherwise).
    pub async fn start(self) -> Gateway {
        let timeout = self.ready_timeout;
        // The port was free when chosen, but a test running beside this one may take it first:
        // then start again on another.
        for attempt in 1..=PORT_ATTEMPTS {
            let mut gateway = self.clone().spawn();
            match gateway.try_wait_ready(timeout).await {
                Ok(()) => return gateway,
                Err(NotReady::Exited(_))
                    if attempt < PORT_ATTEMPTS
                        && gateway.logs().contains("Address already in use") => {}
                Err(not_ready) => gateway.fail(not_ready, timeout),
            }
        }
        unreachable!("the last attempt returns or fails")
    }

    /// Spawn without waiting (for tests that expect a failed start: use `wait_exit`).
    pub fn spawn(self) -> Gateway {
        let dir = TempDir::new("portcullis-e2e");
        let port = free_port();
        let config_path = dir.path().join("portcullis.yaml");
        write_config(&config_path, &self.yaml, port);
        let stdout = create_log(&dir.path().join("stdout.log"));
        let stderr = create_log(&dir.path().join("stderr.log"));
        let binary = binary_path();
        let child = Command::new(&binary)
            .arg("--config")
            .arg(&config_path)
            .args(&self.args)
            .env("PORTCULLIS_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        Gateway {
            child,
            exit: None,
            port,
            config_path,
            dir,
        }
    }
}

/// A running `portcullis` child process; killed on drop (its logs are printed if the test failed).
#[derive(Debug)]
pub struct Gateway {
    child: Child,
    exit: Option<ExitStatus>,
    port: u16,
    config_path: PathBuf,
    // Last, so the directory outlives everything that writes into it.
    dir: TempDir,
}

impl Gateway {
    /// Start with `config_yaml` (`{listen}` is replaced by the chosen address).
    pub async fn start(config_yaml: &str) -> Gateway {
        Gateway::builder(config_yaml).start().await
    }

    pub fn builder(config_yaml: &str) -> GatewayBuilder {
        GatewayBuilder {
            yaml: config_yaml.to_owned(),
            env: Vec::new(),
            args: Vec::new(),
            ready_timeout: READY_TIMEOUT,
        }
    }

    /// Run `portcullis check --config <file>`; returns the exit code (-1 if killed by a signal)
    /// and stdout followed by stderr. Blocks the calling thread (it needs no mock upstream).
    pub fn check(config_yaml: &str) -> (i32, String) {
        let dir = TempDir::new("portcullis-check");
        let config_path = dir.path().join("portcullis.yaml");
        write_config(&config_path, config_yaml, free_port());
        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        let binary = binary_path();
        let mut child = Command::new(&binary)
            .arg("check")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(create_log(&stdout_path))
            .stderr(create_log(&stderr_path))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} check: {e}", binary.display()));
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("poll `portcullis check`") {
                break status;
            }
            if started.elapsed() > CHECK_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`portcullis check` still running after {CHECK_TIMEOUT:?}; output:\n{}",
                    read_logs(&stdout_path, &stderr_path)
                );
            }
            std::thread::sleep(POLL);
        };
        (
            status.code().unwrap_or(-1),
            read_logs(&stdout_path, &stderr_path),
        )
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file the gateway was started with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The gateway's private temp directory (for extra files a config may reference).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Overwrite the config file (same `{listen}` substitution), e.g. before a reload signal.
    pub fn write_config(&self, config_yaml: &str) {
        write_config(&self.config_path, config_yaml, self.port);
    }

    /// Captured stdout followed by stderr, so far.
    pub fn logs(&self) -> String {
        read_logs(
            &self.dir.path().join("stdout.log"),
            &self.dir.path().join("stderr.log"),
        )
    }

    /// Wait until the logs contain `needle`; false on timeout.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let started = Instant::now();
        loop {
            if self.logs().contains(needle) {
                return true;
            }
            if started.elapsed() > timeout {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Send a signal by name (`TERM`, `HUP`, `INT`, ...) via `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg("-s")
            .arg(name)
            .arg(self.pid().to_string())
            .status()
            .expect("run kill(1)");
        assert!(
            status.success(),
            "kill -s {name} {} failed (already exited?)",
            self.pid()
        );
    }

    /// Ask for a graceful shutdown (SIGTERM).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Whether the process has a handler installed for signal number `signo` (Linux: the
    /// `SigCgt` mask in `/proc/<pid>/status`). `None` where that cannot be read (other systems, or
    /// the process is gone).
    pub fn catches_signal(&self, signo: u32) -> Option<bool> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let mask = status
            .lines()
            .find_map(|line| line.strip_prefix("SigCgt:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())?;
        Some(signo >= 1 && mask & (1 << (signo - 1)) != 0)
    }

    /// Wait until the process catches `signo` (see [`Gateway::catches_signal`]); true at once
    /// where that cannot be observed, false on timeout.
    pub async fn wait_catches_signal(&self, signo: u32, timeout: Duration) -> bool {
        let started = Instant::now();
        loop {
            match self.catches_signal(signo) {
                None | Some(true) => return true,
                Some(false) if started.elapsed() > timeout => return false,
                Some(false) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    /// Wait up to `timeout` for the process to exit; `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.poll_exit() {
                return Some(status);
            }
            if started.elapsed() > timeout {
                return None;
            }
            // Polling, not a blocking wait: the mock upstream shares this runtime.
            tokio::time::sleep(POLL).await;
        }
    }

    /// Poll `/health/readiness` until it answers 200; panics (with the logs) on early exit or
    /// after `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        if let Err(not_ready) = self.try_wait_ready(timeout).await {
            self.fail(not_ready, timeout);
        }
    }

    async fn try_wait_ready(&mut self, timeout: Duration) -> Result<(), NotReady> {
        let url = format!("{}/health/readiness", self.url());
        let started = Instant::now();
        loop {
            if let Some(status) = self.poll_exit() {
                return Err(NotReady::Exited(status));
            }
            let probe = RequestBuilder::get(&url)
                .timeout(Duration::from_secs(1))
                .try_send()
                .await;
            if probe.is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                let _ = self.child.kill();
                return Err(NotReady::TimedOut);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn fail(&self, not_ready: NotReady, timeout: Duration) -> ! {
        match not_ready {
            NotReady::Exited(status) => panic!(
                "portcullis exited ({status}) before becoming ready; logs:\n{}",
                self.logs()
            ),
            NotReady::TimedOut => panic!(
                "portcullis not ready after {timeout:?} ({}); logs:\n{}",
                self.url(),
                self.logs()
            ),
        }
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("poll portcullis child");
        }
        self.exit
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The temp dir is about to go; keep the evidence in the test output.
            eprintln!(
                "---- portcullis logs (port {}) ----\n{}\n---- end of portcullis logs ----",
                self.port,
                self.logs()
            );
        }
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn write_config(path: &Path, yaml: &str, port: u16) {
    let yaml = yaml.replace("{listen}", &format!("127.0.0.1:{port}"));
    fs::write(path, yaml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn create_log(path: &Path) -> File {
    File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

fn read_logs(stdout: &Path, stderr: &Path) -> String {
    let read = |p: &Path| {
        fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    format!("{}{}", read(stdout), read(stderr))
}
