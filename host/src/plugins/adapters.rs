//! The pipeline's traits implemented over loaded plugins, with each plugin's `on_error` policy.

use std::sync::Arc;

use super::v0_1::{self, enricher, guardrail};
use super::{CallScope, LoadedPlugin, PluginFailure, StreamSession};
use crate::call::{Call, CallRecord, Outcome};
use crate::config::OnError;
use crate::error::GatewayError;
use crate::extension::{
    BoxFuture, CallHook, Candidate, Enricher, Enrichment, Guardrail, ResponseVerdict, RouteRequest,
    RoutingStrategy, StreamCheck, StreamDelta, StreamVerdict, Verdict, MAX_HELD_BYTES,
};
use crate::openai::ApiRequest;
use crate::providers::JsonObject;

fn scope(call: &Call, request: &ApiRequest) -> CallScope {
    CallScope {
        call_id: Some(call.id.clone()),
        request_body: Some(request.body.clone()),
    }
}

/// What a failed plugin call means for the call it served.
fn on_failure<T>(
    failure: PluginFailure,
    policy: OnError,
    call_id: &str,
    fail_open: T,
) -> Result<T, GatewayError> {
    match policy {
        OnError::Allow => {
            tracing::warn!(call_id, error = %failure, "plugin failed; continuing as configured (on_error: allow)");
            Ok(fail_open)
        }
        OnError::Block => {
            tracing::warn!(call_id, error = %failure, "plugin failed; failing the call (on_error: block)");
            Err(GatewayError::PluginFailed(failure.to_string()))
        }
    }
}

/// A plugin exporting `guardrail`.
#[derive(Debug)]
pub struct WasmGuardrail {
    plugin: Arc<LoadedPlugin>,
    on_error: OnError,
}

impl WasmGuardrail {
    pub fn new(plugin: Arc<LoadedPlugin>, on_error: OnError) -> WasmGuardrail {
        WasmGuardrail { plugin, on_error }
    }
}

impl Guardrail for WasmGuardrail {
    fn name(&self) -> &str {
        &self.plugin.name
    }

    fn check_request<'a>(
        &'a self,
        call: &'a Call,
        request: &'a ApiRequest,
    ) -> BoxFuture<'a, Result<Verdict, GatewayError>> {
        Box::pin(async move {
            let view = v0_1::request(call, request)?;
            match self.plugin.check_request(scope(call, request), &view).await {
                Ok(guardrail::RequestVerdict::Allow) => Ok(Verdict::Allow),
                Ok(guardrail::RequestVerdict::Block(reason)) => Ok(Verdict::Block { reason }),
                Ok(guardrail::RequestVerdict::Rewrite(rewrites)) => {
                    let texts: Vec<(usize, String)> = rewrites
                        .into_iter()
                        .map(|r| (r.index as usize, r.content))
                        .collect();
                    Ok(Verdict::Rewrite(request.with_texts(&texts)?))
                }
                Err(failure) => on_failure(failure, self.on_error, &call.id, Verdict::Allow),
            }
        })
    }

    fn check_response<'a>(
        &'a self,
        call: &'a Call,
        request: &'a ApiRequest,
        response: &'a JsonObject,
    ) -> BoxFuture<'a, Result<ResponseVerdict, GatewayError>> {
        Box::pin(async move {
            let view = v0_1::request(call, request)?;
            let answer = v0_1::response(response);
            let verdict = self
                .plugin
                .check_response(scope(call, request), &view, &answer)
                .await;
            match verdict {
                Ok(guardrail::ResponseVerdict::Allow) => Ok(ResponseVerdict::Allow),
                Ok(guardrail::ResponseVerdict::Block(reason)) => {
                    Ok(ResponseVerdict::Block { reason })
                }
                Ok(guardrail::ResponseVerdict::Rewrite(rewrites)) => Ok(ResponseVerdict::Rewrite(
                    rewrites
                        .into_iter()
                        .map(|r| (r.index as usize, r.text))
                        .collect(),
                )),
                Err(failure) => {
                    on_failure(failure, self.on_error, &call.id, ResponseVerdict::Allow)
                }
            }
        })
    }

    fn open_stream(&self, call: &Call, request: &ApiRequest) -> Box<dyn StreamCheck> {
        Box::new(WasmStreamCheck {
            session: Some(StreamSession::new(
                Arc::clone(&self.plugin),
                scope(call, request),
            )),
            on_error: self.on_error,
            call_id: call.id.clone(),
        })
    }
}

/// A guardrail plugin's check of one stream. After a failure with `on_error: allow` the rest of
/// the stream passes unchecked; with `block` the stream ends.
struct WasmStreamCheck {
    /// `None` once the plugin failed.
    session: Option<StreamSession>,
    on_error: OnError,
    call_id: String,
}

impl StreamCheck for WasmStreamCheck {
    fn check<'a>(
        &'a mut self,
        delta: StreamDelta<'a>,
    ) -> BoxFuture<'a, Result<StreamVerdict, GatewayError>> {
        Box::pin(async move {
            // Unchecked, the delta goes on as it came.
            let release = || StreamVerdict::Release(delta.text.to_owned());
            let Some(session) = self.session.as_mut() else {
                return Ok(release());
            };
            let failure = match session.check(&v0_1::stream_delta(delta)).await {
                Ok(guardrail::StreamVerdict::Release(text)) => {
                    return Ok(StreamVerdict::Release(text))
                }
                Ok(guardrail::StreamVerdict::Block(reason)) => {
                    return Ok(StreamVerdict::Block { reason })
                }
                Ok(guardrail::StreamVerdict::Hold)
                    if !delta.finished && delta.text.len() <= MAX_HELD_BYTES =>
                {
                    return Ok(StreamVerdict::Hold)
                }
                // Holding the last delta, or without bound, keeps text back for ever.
                Ok(guardrail::StreamVerdict::Hold) => session.plugin.trap(format!(
                    "it held back {} bytes of a stream{}",
                    delta.text.len(),
                    if delta.finished { " at its end" } else { "" }
                )),
                Err(failure) => failure,
            };
            self.session = None;
            on_failure(failure, self.on_error, &self.call_id, release())
        })
    }
}

/// A plugin exporting `enricher`. A failing enricher with `on_error: allow` adds nothing.
#[derive(Debug)]
pub struct WasmEnricher {
    plugin: Arc<LoadedPlugin>,
    on_error: OnError,
}

impl WasmEnricher {
    pub fn new(plugin: Arc<LoadedPlugin>, on_error: OnError) -> WasmEnricher {
        WasmEnricher { plugin, on_error }
    }
}

impl Enricher for WasmEnricher {
    fn name(&self) -> &str {
        &self.plugin.name
    }

    fn enrich<'a>(
        &'a self,
        call: &'a Call,
        request: &'a ApiRequest,
    ) -> BoxFuture<'a, Result<Enrichment, GatewayError>> {
        Box::pin(async move {
            let view = v0_1::request(call, request)?;
            match self.plugin.enrich(scope(call, request), &view).await {
                Ok(Some(enrichment)) => Ok(convert_enrichment(enrichment)),
                Ok(None) => Ok(Enrichment::default()),
                Err(failure) => on_failure(failure, self.on_error, &call.id, Enrichment::default()),
            }
        })
    }
}

fn convert_enrichment(enrichment: enricher::Enrichment) -> Enrichment {
    let metadata = enrichment
        .metadata
        .into_iter()
        .map(|(key, value)| {
            // Values are JSON; a plain word that is not JSON is kept as a string.
            let value = serde_json::from_str(&value).unwrap_or(serde_json::Value::String(value));
            (key, value)
        })
        .collect();
    Enrichment {
        metadata,
        tags: enrichment.tags,
        model: enrichment.model.filter(|m| !m.is_empty()),
    }
}

/// A plugin exporting `router`; `fallback` decides when the plugin fails or answers nothing usable.
#[derive(Debug)]
pub struct WasmRouter {
    plugin: Arc<LoadedPlugin>,
    fallback: Arc<dyn RoutingStrategy>,
}

impl WasmRouter {
    pub fn new(plugin: Arc<LoadedPlugin>, fallback: Arc<dyn RoutingStrategy>) -> WasmRouter {
        WasmRouter { plugin, fallback }
    }
}

impl RoutingStrategy for WasmRouter {
    fn name(&self) -> &str {
        &self.plugin.name
    }

    /// The contract hands every router plugin the estimate.
    fn uses_token_estimate(&self) -> bool {
        true
    }

    fn choose<'a>(
        &'a self,
        request: &'a RouteRequest<'a>,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Option<usize>> {
        Box::pin(async move {
            let view = v0_1::router::RouteRequest {
                call_id: request.call_id.to_owned(),
                group: request.group.to_owned(),
                estimated_tokens: request.estimated_tokens,
                stream: request.stream,
            };
            let offered: Vec<_> = candidates.iter().map(v0_1::candidate).collect();
            let scope = CallScope {
                call_id: Some(request.call_id.to_owned()),
                request_body: None,
            };
            match self.plugin.choose(scope, &view, &offered).await {
                Ok(ranked) => {
                    if let Some(&first) = ranked.iter().find(|&&i| (i as usize) < candidates.len())
                    {
                        return Some(first as usize);
                    }
                    tracing::debug!(call_id = request.call_id, plugin = %self.plugin.name, "router plugin had no usable answer");
                }
                Err(failure) => {
                    tracing::warn!(call_id = request.call_id, error = %failure, "router plugin failed; using the fallback strategy");
                }
            }
            self.fallback.choose(request, candidates).await
        })
    }
}

/// A plugin exporting `hook`. Its failures are logged; they can never affect a call.
#[derive(Debug)]
pub struct WasmHook {
    plugin: Arc<LoadedPlugin>,
}

impl WasmHook {
    pub fn new(plugin: Arc<LoadedPlugin>) -> WasmHook {
        WasmHook { plugin }
    }
}

impl CallHook for WasmHook {
    fn name(&self) -> &str {
        &self.plugin.name
    }

    fn on_call_end<'a>(&'a self, record: &'a CallRecord) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let event = v0_1::call_event(record);
            let scope = CallScope {
                call_id: Some(record.call_id.clone()),
                request_body: None,
            };
            let success = record.outcome == Outcome::Success;
            if let Err(failure) = self.plugin.on_call_end(scope, &event, success).await {
                tracing::warn!(call_id = %record.call_id, error = %failure, "post-call hook failed");
            }
        })
    }
}
