//! The seams of the pipeline: traits that built-ins implement today and Wasm plugins will too.
//!
//! **The pipeline calls only these traits; it never names wasmtime.** A built-in routing strategy
//! and a plugin are interchangeable behind [`RoutingStrategy`].

use std::fmt;

/// One deployment as a routing strategy sees it: identity, capacity and live load.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: String,
    pub weight: u32,
    pub in_flight: u32,
    /// Exponentially weighted latency in milliseconds; `None` until a call has finished.
    pub latency_ms: Option<f64>,
    pub rpm_used: u64,
    pub tpm_used: u64,
    pub rpm_limit: Option<u64>,
    pub tpm_limit: Option<u64>,
    pub input_cost_per_token: f64,
    pub output_cost_per_token: f64,
}

impl Candidate {
    /// An idle deployment of weight 1 with no limits, no prices and no latency yet.
    pub fn new(id: impl Into<String>) -> Candidate {
        Candidate {
            id: id.into(),
            weight: 1,
            in_flight: 0,
            latency_ms: None,
            rpm_used: 0,
            tpm_used: 0,
            rpm_limit: None,
            tpm_limit: None,
            input_cost_per_token: 0.0,
            output_cost_per_token: 0.0,
        }
    }
}

/// What a strategy may know about the call it routes.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub call_id: &'a str,
    /// The model group being routed.
    pub group: &'a str,
    /// Estimated prompt tokens, for usage-aware strategies; 0 unless the strategy says it
    /// [uses the estimate](RoutingStrategy::uses_token_estimate).
    pub estimated_tokens: u64,
    pub stream: bool,
    /// The call being routed, for strategies that read more of it (plugins); `None` in tests.
    pub origin: Option<(&'a crate::call::Call, &'a crate::openai::ApiRequest)>,
}

/// Chooses a deployment among the ones that can take a call now (not cooling down, under their
/// rpm/tpm caps). Retries call it again without the deployments already tried.
pub trait RoutingStrategy: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;

    /// Whether `choose` reads `RouteRequest::estimated_tokens`. Estimating costs a pass over the
    /// prompt, so it is only done for strategies that use it (otherwise it is 0).
    fn uses_token_estimate(&self) -> bool {
        false
    }

    /// Returns an index into `candidates`, which is never empty. `None` or an index out of range
    /// means "no opinion", and the router falls back to a weighted shuffle.
    fn choose<'a>(
        &'a self,
        request: &'a RouteRequest<'a>,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Option<usize>>;
}

/// A boxed future, so the traits stay object safe while plugin calls are async.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What an enricher adds to a call before the guardrails see it.
#[derive(Debug, Clone, Default)]
pub struct Enrichment {
    pub metadata: crate::providers::JsonObject,
    pub tags: Vec<String>,
    /// Routes the call to another model group (e.g. a team's default).
    pub model: Option<String>,
}

/// Adds metadata and tags to a call, or overrides its model.
pub trait Enricher: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;
    fn enrich<'a>(
        &'a self,
        call: &'a crate::call::Call,
        request: &'a crate::openai::ApiRequest,
    ) -> BoxFuture<'a, Result<Enrichment, crate::error::GatewayError>>;
}

/// A guardrail's answer about a request.
#[derive(Debug, Clone)]
pub enum Verdict {
    Allow,
    Block {
        reason: String,
    },
    /// Replace the request body (e.g. with personal data masked).
    Rewrite(crate::providers::JsonObject),
}

/// A future that is ready at once, for implementations that never wait.
pub fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

/// A guardrail's answer about a whole response.
#[derive(Debug, Clone)]
pub enum ResponseVerdict {
    Allow,
    Block {
        reason: String,
    },
    /// New texts for some choices, by choice index.
    Rewrite(Vec<(usize, String)>),
}

/// One streamed piece of a choice's text, as a streaming guardrail sees it.
#[derive(Debug, Clone, Copy)]
pub struct StreamDelta<'a> {
    pub choice_index: u32,
    /// The new text, after whatever this guardrail held back before it.
    pub text: &'a str,
    /// What this guardrail has released for the choice so far.
    pub released: &'a str,
    /// The choice's last delta: nothing may be held any more.
    pub finished: bool,
}

/// The most text one streaming guardrail may hold back for one choice. A guardrail that holds
/// more is broken: text would pile up without reaching the client.
pub const MAX_HELD_BYTES: usize = 16 * 1024;

/// A streaming guardrail's answer about one delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamVerdict {
    /// Send this text (the delta, possibly rewritten) on.
    Release(String),
    /// Keep the delta back; it is prepended to the next one.
    Hold,
    /// End the stream with an error event.
    Block { reason: String },
}

/// One guardrail's view of one stream: its deltas arrive in order, so it may keep state.
pub trait StreamCheck: Send {
    fn check<'a>(
        &'a mut self,
        delta: StreamDelta<'a>,
    ) -> BoxFuture<'a, Result<StreamVerdict, crate::error::GatewayError>>;
}

/// Releases every delta as it is: the stream check of guardrails that do not look at streams.
#[derive(Debug)]
pub struct ReleaseAll;

impl StreamCheck for ReleaseAll {
    fn check<'a>(
        &'a mut self,
        delta: StreamDelta<'a>,
    ) -> BoxFuture<'a, Result<StreamVerdict, crate::error::GatewayError>> {
        ready(Ok(StreamVerdict::Release(delta.text.to_owned())))
    }
}

/// Checks requests (before or while they are routed), whole responses, and streams.
pub trait Guardrail: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;

    fn check_request<'a>(
        &'a self,
        call: &'a crate::call::Call,
        request: &'a crate::openai::ApiRequest,
    ) -> BoxFuture<'a, Result<Verdict, crate::error::GatewayError>>;

    /// `response` is what a guardrail reads of the upstream's whole answer.
    fn check_response<'a>(
        &'a self,
        _call: &'a crate::call::Call,
        _request: &'a crate::openai::ApiRequest,
        _response: &'a crate::openai::ResponseView,
    ) -> BoxFuture<'a, Result<ResponseVerdict, crate::error::GatewayError>> {
        ready(Ok(ResponseVerdict::Allow))
    }

    /// A checker for one stream of this call.
    fn open_stream(
        &self,
        _call: &crate::call::Call,
        _request: &crate::openai::ApiRequest,
    ) -> Box<dyn StreamCheck> {
        Box::new(ReleaseAll)
    }
}

/// Runs after a call ended, off the request path; `record.outcome` says how it ended.
pub trait CallHook: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;
    fn on_call_end<'a>(&'a self, record: &'a crate::call::CallRecord) -> BoxFuture<'a, ()>;
}
