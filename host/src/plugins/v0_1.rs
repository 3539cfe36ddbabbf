//! The host binding of `portcullis:plugin@0.1.0`: its imports, and its guardrail and enricher
//! calls, which pass the request as a record. Each supported WIT version gets a module like this.

use wasmtime::component::{HasSelf, Instance, Linker};
use wasmtime::Store;

use super::contract::same_shape_items;
use super::store::{CallScope, StoreState};
use super::TextVerdict;
use crate::extension::{Candidate, Enrichment, RouteRequest, StreamDelta, StreamVerdict};
use crate::openai::ResponseView;

wasmtime::component::bindgen!({
    path: "../plugin-sdk/wit/0.1.0",
    world: "plugin",
    imports: { default: async | trappable },
    exports: { default: async },
});

use self::exports::portcullis::plugin::{enricher, guardrail, hook, lifecycle, router};
use self::portcullis::plugin::types;

/// The WIT package this module binds, as components name it.
pub const PACKAGE: &str = "portcullis:plugin@0.1.0";

same_shape_items!();

/// Adds this version's host imports to the linker.
pub fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    Plugin::add_to_linker::<_, HasSelf<StoreState>>(linker, |state| state)
}

impl self::portcullis::plugin::types::Host for StoreState {}

impl self::portcullis::plugin::host::Host for StoreState {
    async fn log(
        &mut self,
        level: self::portcullis::plugin::host::LogLevel,
        message: String,
    ) -> wasmtime::Result<()> {
        self.write_log(level.into(), message);
        Ok(())
    }

    async fn request_body(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(self
            .scope
            .request
            .as_ref()
            .and_then(|facts| facts.body.to_json().ok()))
    }
}

/// The request record, built whole before each call: this version has no other way to pass it.
fn request(scope: &CallScope) -> wasmtime::Result<types::Request> {
    let facts = scope
        .request
        .as_ref()
        .ok_or_else(|| wasmtime::format_err!("no request to pass to the plugin"))?;
    let texts = facts.texts()?;
    Ok(types::Request {
        call_id: scope.call_id.clone().unwrap_or_default(),
        endpoint: facts.endpoint.name().to_owned(),
        model: facts.model.clone(),
        messages: texts.iter().map(message).collect(),
        stream: facts.stream,
        key_alias: facts.key_alias.clone(),
        team: facts.team.clone(),
        end_user: facts.end_user.clone(),
        metadata: facts.metadata_json(),
        tags: facts.tags.clone(),
    })
}

pub async fn check_request(
    exports: &Exports,
    guests: &mut Guests,
    store: &mut Store<StoreState>,
    instance: &Instance,
) -> wasmtime::Result<TextVerdict> {
    let record = request(&store.data().scope)?;
    let guest = guardrail_guest(exports, guests, store, instance)?;
    Ok(request_verdict(
        guest.call_check_request(store, &record).await?,
    ))
}

pub async fn check_response(
    exports: &Exports,
    guests: &mut Guests,
    store: &mut Store<StoreState>,
    instance: &Instance,
    view: &ResponseView,
) -> wasmtime::Result<TextVerdict> {
    let record = request(&store.data().scope)?;
    let answer = response(view);
    let guest = guardrail_guest(exports, guests, store, instance)?;
    Ok(response_verdict(
        guest.call_check_response(store, &record, &answer).await?,
    ))
}

pub async fn check_stream(
    exports: &Exports,
    guests: &mut Guests,
    store: &mut Store<StoreState>,
    instance: &Instance,
    delta: &StreamDelta<'_>,
) -> wasmtime::Result<StreamVerdict> {
    let guest = guardrail_guest(exports, guests, store, instance)?;
    Ok(stream_verdict(
        guest.call_check_stream(store, &stream_delta(delta)).await?,
    ))
}

/// The estimate is made here, for every call: this version's record has no other way to carry it.
pub async fn choose(
    exports: &Exports,
    guests: &mut Guests,
    store: &mut Store<StoreState>,
    instance: &Instance,
    request: &RouteRequest<'_>,
    candidates: &[Candidate],
) -> wasmtime::Result<Vec<u32>> {
    let estimated_tokens = match &store.data().scope.request {
        Some(facts) => facts.estimated_tokens()?,
        None => request.estimated_tokens,
    };
    let view = router::RouteRequest {
        call_id: request.call_id.to_owned(),
        group: request.group.to_owned(),
        estimated_tokens,
        stream: request.stream,
    };
    let offered: Vec<_> = candidates.iter().map(candidate).collect();
    let guest = router_guest(exports, guests, store, instance)?;
    guest.call_choose(store, &view, &offered).await
}

pub async fn enrich(
    exports: &Exports,
    guests: &mut Guests,
    store: &mut Store<StoreState>,
    instance: &Instance,
) -> wasmtime::Result<Enrichment> {
    let record = request(&store.data().scope)?;
    let guest = enricher_guest(exports, guests, store, instance)?;
    Ok(enrichment(guest.call_enrich(store, &record).await?))
}
