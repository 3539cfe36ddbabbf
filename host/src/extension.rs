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

/// What a strategy may know about the call it routes.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub call_id: &'a str,
    /// The model group being routed.
    pub group: &'a str,
    /// Estimated prompt tokens, for usage-aware strategies.
    pub estimated_tokens: u64,
    pub stream: bool,
}

/// Chooses a deployment among the ones that can take a call now (not cooling down, under their
/// rpm/tpm caps). Retries call it again without the deployments already tried.
pub trait RoutingStrategy: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;

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

/// Checks requests before they are routed.
pub trait Guardrail: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;
    fn check_request<'a>(
        &'a self,
        call: &'a crate::call::Call,
        request: &'a crate::openai::ApiRequest,
    ) -> BoxFuture<'a, Result<Verdict, crate::error::GatewayError>>;
}

/// Runs after a call ended, off the request path; `record.outcome` says how it ended.
pub trait CallHook: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;
    fn on_call_end<'a>(&'a self, record: &'a crate::call::CallRecord) -> BoxFuture<'a, ()>;
}
