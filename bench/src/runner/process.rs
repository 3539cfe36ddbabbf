//! The processes under test: started pinned to their core, found by the address they print or
//! are given, measured by their resident memory, and stopped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// A server process the runner started.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub address: SocketAddr,
}

/// Where each side runs. On a machine with one core, nothing is pinned.
#[derive(Debug, Clone)]
pub struct Pinning {
    /// `taskset -c N` for the process under test, if the machine can pin.
    server_core: Option<usize>,
    /// Cores the machine has, counted before the runner pinned itself.
    pub cores: usize,
}

impl Pinning {
    /// Pins the runner (mock and load generator) to the last core and servers to the first, on a
    /// machine with two cores or more and `taskset`.
    pub fn detect() -> Pinning {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let taskset = Command::new("taskset")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Pinning {
            server_core: (cores >= 2 && taskset).then_some(0),
            cores,
        }
    }

    pub fn describe(&self) -> String {
        match self.server_core {
            Some(core) => format!("server on core {core}, mock and load generator on the others"),
            None => "not pinned (one core, or no taskset)".to_owned(),
        }
    }

    /// A command for `program`, pinned.
    pub fn command(&self, program: &Path) -> Command {
        match self.server_core {
            Some(core) => {
                let mut command = Command::new("taskset");
                command.arg("-c").arg(core.to_string()).arg(program);
                command
            }
            None => Command::new(program),
        }
    }

    /// Pins this process (and the threads it starts later) away from the server's core.
    pub fn pin_self(&self) -> anyhow::Result<()> {
        let Some(core) = self.server_core else {
            return Ok(());
        };
        let others: Vec<String> = (0..self.cores)
            .filter(|&c| c != core)
            .map(|c| c.to_string())
            .collect();
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", &others.join(",")])
            .arg(std::process::id().to_string())
            .stdout(Stdio::null())
            .status()
            .context("taskset")?;
        if !status.success() {
            bail!("taskset could not pin the runner");
        }
        Ok(())
    }
}

impl Server {
    /// Starts `command` and waits for it to print `<prefix>http://ADDRESS` on stderr.
    pub fn start_announced(mut command: Command, prefix: &str) -> anyhow::Result<Server> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        // Several lines: under callgrind the last ones are its summary, not the server's error.
        let mut last = std::collections::VecDeque::new();
        let address = loop {
            let Some(line) = lines.next() else {
                let _ = child.wait();
                let last: Vec<_> = last.into_iter().collect();
                bail!("exited before listening:\n{}", last.join("\n"));
            };
            let line = line.unwrap_or_default();
            if last.len() == 12 {
                last.pop_front();
            }
            last.push_back(line.clone());
            if let Some(rest) = line.split(prefix).nth(1) {
                let address = rest.trim().trim_start_matches("http://");
                break address
                    .parse()
                    .with_context(|| format!("bad address in {line:?}"))?;
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Server { child, address })
    }

    /// Starts `command`, which listens on `address`, and waits until it accepts connections.
    pub fn start_at(
        mut command: Command,
        address: SocketAddr,
        log: &Path,
        patience: Duration,
    ) -> anyhow::Result<Server> {
        let log_file = std::fs::File::create(log)?;
        command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?;
        let mut server = Server { child, address };
        let deadline = std::time::Instant::now() + patience;
        loop {
            if std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                bail!(
                    "exited with {status} before listening; see {}",
                    log.display()
                );
            }
            if std::time::Instant::now() > deadline {
                server.stop();
                bail!(
                    "not listening on {address} after {patience:?}; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory in bytes, from `/proc`.
    pub fn rss(&self) -> Option<u64> {
        rss_of(self.pid())
    }

    /// SIGTERM, then SIGKILL if it has not gone within five seconds.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// `VmRSS` of a process, in bytes.
pub fn rss_of(pid: u32) -> Option<u64> {
    proc_kib(&format!("/proc/{pid}/status"), "VmRSS:").map(|kib| kib * 1024)
}

/// The proportional set size of a process, in bytes: pages it shares count in part. Plugin
/// instances each map their module's initial memory image, which RSS counts once per instance
/// and PSS once in all.
pub fn pss_of(pid: u32) -> Option<u64> {
    proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:").map(|kib| kib * 1024)
}

/// The number of the line of `file` that starts with `field`, which `/proc` gives in KiB.
fn proc_kib(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A loopback address nothing listens on right now.
pub fn free_address() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}
