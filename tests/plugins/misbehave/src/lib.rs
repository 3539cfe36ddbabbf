//! A plugin that misbehaves as its config says, so tests can prove the gateway contains it.
//!
//! Config: `{"init": "ok" | "slow" | "reject", "check": "allow" | "block" | "loop" | "oom" | "trap" |
//! "probe" | "count", "delay_ms": N, "trap_at": N, "route": "nowhere" | "to_team"}`. `probe` blocks with a JSON report of what the
//! sandbox let it see (files, environment, clocks). `count` blocks with `call N`, N counting the
//! checks this instance has served, and traps at call `trap_at`: it shows instance reuse (on
//! streams it appends `[call N]` to each choice's last delta instead of blocking).
//! `delay_ms` makes each check take that long first (it needs the clocks granted).
//! As a router it answers an index that does not exist, or with `to_team` the deployment whose
//! id is the caller's team (reading the lent request as content-aware routers do).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use portcullis_plugin_sdk::{
    Candidate, Config, Guardrail, Plugin, Request, RequestVerdict, Router, StreamDelta,
    StreamVerdict,
};
use serde::Deserialize;

/// What to do, from the plugin's config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Misbehave {
    #[serde(default)]
    init: Init,
    #[serde(default)]
    check: Check,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    trap_at: Option<u32>,
    #[serde(default)]
    route: Route,
    #[serde(skip)]
    calls: AtomicU32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Init {
    #[default]
    Ok,
    Slow,
    Reject,
}

/// What the router answers.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Route {
    /// An index past the candidates.
    #[default]
    Nowhere,
    /// The candidate whose id is the caller's team, for a call routed to the request's own
    /// model with a prompt estimate; nothing otherwise.
    ToTeam,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Check {
    #[default]
    Allow,
    Block,
    Loop,
    Oom,
    Trap,
    Probe,
    Count,
}

impl Plugin for Misbehave {
    fn init(config: Config) -> Result<Self, String> {
        let plugin: Misbehave = config.parse()?;
        match plugin.init {
            Init::Ok => Ok(plugin),
            Init::Slow => spin_forever(),
            Init::Reject => Err("this configuration is rejected on purpose".into()),
        }
    }
}

impl Guardrail for Misbehave {
    fn check_request(&self, _request: &Request<'_>) -> RequestVerdict {
        // Without a delay it reads no clock: as the no-op of the plugin benchmarks, it must call
        // nothing of the host's.
        if self.delay_ms > 0 {
            let started = std::time::Instant::now();
            while started.elapsed().as_millis() < u128::from(self.delay_ms) {
                std::hint::spin_loop();
            }
        }
        match self.check {
            Check::Allow => RequestVerdict::Allow,
            Check::Block => RequestVerdict::Block("blocked on purpose".into()),
            Check::Loop => spin_forever(),
            Check::Oom => hog_memory(),
            Check::Trap => panic!("misbehave: trapping on purpose"),
            Check::Probe => RequestVerdict::Block(probe()),
            Check::Count => RequestVerdict::Block(format!("call {}", self.count_call())),
        }
    }

    /// With `count`, a choice's last delta ends with `[call N]`, N counting the deltas this
    /// instance has checked; every other check releases the text as it came.
    fn check_stream(&self, _request: &Request<'_>, delta: &StreamDelta) -> StreamVerdict {
        match self.check {
            Check::Count => {
                let n = self.count_call();
                if delta.finished {
                    StreamVerdict::Release(format!("{}[call {n}]", delta.text))
                } else {
                    StreamVerdict::Release(delta.text.clone())
                }
            }
            _ => StreamVerdict::Release(delta.text.clone()),
        }
    }
}

impl Misbehave {
    fn count_call(&self) -> u32 {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if self.trap_at == Some(n) {
            panic!("misbehave: trapping at call {n} on purpose");
        }
        n
    }
}

impl Router for Misbehave {
    fn choose(&self, request: &Request<'_>, group: &str, candidates: &[Candidate]) -> Vec<u32> {
        match self.route {
            Route::Nowhere => vec![candidates.len() as u32 + 1000],
            Route::ToTeam if group != request.model() || request.estimated_tokens() == 0 => {
                Vec::new()
            }
            Route::ToTeam => (0u32..)
                .zip(candidates)
                .filter(|(_, c)| Some(c.id.as_str()) == request.team())
                .map(|(index, _)| index)
                .collect(),
        }
    }
}

portcullis_plugin_sdk::export!(Misbehave: Guardrail + Router);

fn spin_forever() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn hog_memory() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

/// What the sandbox lets through, as JSON: a file outside any grant, one inside `/granted` if
/// that was granted, the environment, and the wall clock.
fn probe() -> String {
    let read = |path: &str| match std::fs::read_to_string(path) {
        Ok(text) => format!("read {} bytes", text.len()),
        Err(e) => format!("error: {e}"),
    };
    let clock_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    serde_json::json!({
        "etc_passwd": read("/etc/passwd"),
        "granted": read("/granted/hello.txt"),
        "env_vars": std::env::vars().count(),
        "clock_secs": clock_secs,
    })
    .to_string()
}
