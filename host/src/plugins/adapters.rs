//! The pipeline's traits implemented over loaded plugins, with each plugin's `on_error` policy.

use std::sync::Arc;

use super::{CallScope, LoadedPlugin, PluginFailure, RequestFacts, StreamSession, TextVerdict};
use crate::call::{Call, CallRecord};
use crate::config::OnError;
use crate::error::GatewayError;
use crate::extension::{
    BoxFuture, CallHook, Candidate, Enricher, Enrichment, Guardrail, ResponseVerdict, RouteRequest,
    RoutingStrategy, StreamCheck, StreamDelta, StreamVerdict, Verdict, MAX_HELD_BYTES,
};
use crate::openai::{ApiRequest, ResponseView};

fn scope(call: &Call, request: &ApiRequest) -> CallScope {
    let principal = call.principal.as_deref();
    CallScope {
        call_id: Some(call.id.clone()),
        request: Some(Box::new(RequestFacts {
            endpoint: call.endpoint,
            model: call.model.clone(),
            stream: request.stream,
            key_alias: principal.and_then(|p| p.alias.clone()),
            team: principal.and_then(|p| p.team.clone()),
            end_user: call.end_user.clone(),
            metadata: call.metadata.clone(),
            tags: call.tags.clone(),
            body: request.body.clone(),
            derived: request.derived(),
        })),
    }
}

/// What a failed plugin call means for the call it served.
fn on_failure<T>(
    failure: PluginFailure,
    policy: OnError,
    call_id: &str,
    fail_open: T,
) -> Result<T, GatewayError> {
    if let PluginFailure::Body(unreadable) = failure {
        return Err(unreadable.into());
    }
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
            match self.plugin.check_request(scope(call, request)).await {
                Ok(TextVerdict::Allow) => Ok(Verdict::Allow),
                Ok(TextVerdict::Block(reason)) => Ok(Verdict::Block { reason }),
                Ok(TextVerdict::Rewrite(texts)) => {
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
        response: &'a ResponseView,
    ) -> BoxFuture<'a, Result<ResponseVerdict, GatewayError>> {
        Box::pin(async move {
            let verdict = self
                .plugin
                .check_response(scope(call, request), response)
                .await;
            match verdict {
                Ok(TextVerdict::Allow) => Ok(ResponseVerdict::Allow),
                Ok(TextVerdict::Block(reason)) => Ok(ResponseVerdict::Block { reason }),
                Ok(TextVerdict::Rewrite(texts)) => Ok(ResponseVerdict::Rewrite(texts)),
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
            let failure = match session.check(&delta).await {
                Ok(StreamVerdict::Hold)
                    if !delta.finished && delta.text.len() <= MAX_HELD_BYTES =>
                {
                    return Ok(StreamVerdict::Hold)
                }
                // Holding the last delta, or without bound, keeps text back for ever.
                Ok(StreamVerdict::Hold) => session.plugin.trap(format!(
                    "it held back {} bytes of a stream{}",
                    delta.text.len(),
                    if delta.finished { " at its end" } else { "" }
                )),
                Ok(verdict) => return Ok(verdict),
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
            match self.plugin.enrich(scope(call, request)).await {
                Ok(enrichment) => Ok(enrichment),
                Err(failure) => on_failure(failure, self.on_error, &call.id, Enrichment::default()),
            }
        })
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

    /// Plugins ask for the estimate when they want it (0.1.0 plugins always get it).
    fn uses_token_estimate(&self) -> bool {
        false
    }

    fn choose<'a>(
        &'a self,
        request: &'a RouteRequest<'a>,
        candidates: &'a [Candidate],
    ) -> BoxFuture<'a, Option<usize>> {
        Box::pin(async move {
            let scope = match request.origin {
                Some((call, api_request)) => scope(call, api_request),
                None => CallScope {
                    call_id: Some(request.call_id.to_owned()),
                    request: None,
                },
            };
            match self.plugin.choose(scope, request, candidates).await {
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
            let scope = CallScope {
                call_id: Some(record.call_id.clone()),
                request: None,
            };
            if let Err(failure) = self.plugin.on_call_end(scope, record).await {
                tracing::warn!(call_id = %record.call_id, error = %failure, "post-call hook failed");
            }
        })
    }
}
