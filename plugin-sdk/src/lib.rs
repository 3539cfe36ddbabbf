//! The Portcullis plugin SDK: plain Rust traits for guardrails, enrichers, routers and hooks, and one
//! [`export!`] macro that turns a type implementing them into a WebAssembly component.
//!
//! ```
//! use portcullis_plugin_sdk::{Config, Guardrail, Plugin, Request, RequestVerdict};
//!
//! #[derive(Debug)]
//! struct NoShouting;
//!
//! impl Plugin for NoShouting {
//!     fn init(_config: Config) -> Result<Self, String> {
//!         Ok(Self)
//!     }
//! }
//!
//! impl Guardrail for NoShouting {
//!     fn check_request(&self, request: &Request<'_>) -> RequestVerdict {
//!         let shouting = |text: &str| text.len() > 3 && text == text.to_uppercase();
//!         if request.messages().iter().any(|m| shouting(&m.content)) {
//!             RequestVerdict::Block("please do not shout".into())
//!         } else {
//!             RequestVerdict::Allow
//!         }
//!     }
//! }
//!
//! portcullis_plugin_sdk::export!(NoShouting: Guardrail);
//!
//! # fn main() {
//! let plugin = NoShouting::init(Config::default()).expect("no config needed");
//! let request = Request::chat("gpt-4o", &[("user", "HELLO THERE")]);
//! assert!(matches!(plugin.check_request(&request), RequestVerdict::Block(_)));
//! # }
//! ```
//!
//! Plugin logic is ordinary Rust: call the trait methods from `#[test]`s and run `cargo test` on
//! the host machine. There, [`log`] prints to stderr, where [`testing::take_logs`] finds it too.
//!
//! A [`Request`] is read field by field from the gateway, each field the first time the plugin
//! reads it: the cost of a call grows with what the plugin reads, not with the request.
#![deny(missing_docs)]

#[doc(hidden)]
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
#[path = "bindings.rs"]
pub mod __bindings;

mod config;
mod export;
mod helpers;
pub mod log;
mod request;
pub mod testing;

#[doc(hidden)]
pub mod __private;

pub use config::Config;
pub use request::Request;

pub use __bindings::enricher::exports::portcullis::plugin::enricher::Enrichment;
pub use __bindings::guardrail::exports::portcullis::plugin::guardrail::{
    ChoiceRewrite, MessageRewrite, RequestVerdict, ResponseVerdict, StreamVerdict,
};
pub use __bindings::guardrail::portcullis::plugin::host::LogLevel;
pub use __bindings::guardrail::portcullis::plugin::types::{
    Choice, Message, Response, StreamDelta, ToolCall, Usage,
};
pub use __bindings::hook::exports::portcullis::plugin::hook::{CallEvent, GuardrailOutcome};
pub use __bindings::router::exports::portcullis::plugin::router::Candidate;

/// What every plugin is: a value built once from its configuration.
///
/// [`export!`] calls [`Plugin::init`] when the gateway loads the plugin (and for each fresh
/// instance), keeps the value, and hands `&self` to every later call. A plugin without settings
/// writes `Ok(Self)`.
pub trait Plugin: Sized + Send + Sync + 'static {
    /// Builds the plugin from its YAML `config` block. An error rejects the plugin: the gateway
    /// keeps its previous configuration and shows the message to the operator.
    fn init(config: Config) -> Result<Self, String>;
}

/// Checks requests before they go upstream, and responses and streams on their way back.
///
/// Every method defaults to letting things through, so implement only what you check.
/// Methods take `&self`: a guardrail that must remember something between calls needs interior
/// mutability (a `Mutex` or atomics).
pub trait Guardrail: Plugin {
    /// Runs before the upstream call (`pre_call`) or alongside it (`during_call`).
    fn check_request(&self, request: &Request<'_>) -> RequestVerdict {
        let _ = request;
        RequestVerdict::Allow
    }

    /// Runs on a whole, non-streamed response (`post_call`).
    fn check_response(&self, request: &Request<'_>, response: &Response) -> ResponseVerdict {
        let _ = (request, response);
        ResponseVerdict::Allow
    }

    /// Runs on each streamed delta, in order. [`StreamVerdict::Hold`] keeps the text back and the
    /// gateway prepends it to the next delta's `text`.
    fn check_stream(&self, request: &Request<'_>, delta: &StreamDelta) -> StreamVerdict {
        let _ = request;
        StreamVerdict::Release(delta.text.clone())
    }
}

/// Adds metadata and tags to a call before it is routed, or moves it to another model group.
pub trait Enricher: Plugin {
    /// What to add to this call; [`Enrichment::default`] adds nothing.
    fn enrich(&self, request: &Request<'_>) -> Enrichment;
}

/// Chooses which deployment of a model group takes each attempt of a call.
pub trait Router: Plugin {
    /// Indices into `candidates`, best first. An empty or invalid answer lets the gateway's
    /// configured built-in strategy decide. `group` is the model group being routed: the
    /// request's model, or one of its fallback groups.
    fn choose(&self, request: &Request<'_>, group: &str, candidates: &[Candidate]) -> Vec<u32>;
}

/// Runs after a call ended, off the request path: audit logs, billing, alerts.
pub trait Hook: Plugin {
    /// The call succeeded.
    fn on_success(&self, event: &CallEvent) {
        let _ = event;
    }

    /// The call failed; `event.error` says why.
    fn on_failure(&self, event: &CallEvent) {
        let _ = event;
    }
}
