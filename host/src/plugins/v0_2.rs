//! The host binding of `portcullis:plugin@0.2.0`: its imports, the `request` resource, and its
//! guardrail and enricher calls, which lend the plugin the request.
//!
//! The plugin reads the request field by field through the resource's methods, so a call costs
//! only what it reads. **There is one request per call, so every handle means the one in the
//! store's [`CallScope`]**: the host lends handle 0 and never puts requests in a table.

use wasmtime::component::{HasSelf, Instance, Linker, Resource};
use wasmtime::Store;

use super::contract::same_shape_items;
use super::store::{RequestFacts, StoreState};
use super::TextVerdict;
use crate::extension::{Candidate, Enrichment, RouteRequest, StreamDelta, StreamVerdict};
use crate::openai::ResponseView;

wasmtime::component::bindgen!({
    path: "../plugin-sdk/wit/0.2.0",
    world: "plugin",
    imports: { default: trappable },
    exports: { default: async },
    with: { "portcullis:plugin/types.request": crate::plugins::RequestFacts },
});

use self::exports::portcullis::plugin::{enricher, guardrail, hook, lifecycle, router};
use self::portcullis::plugin::types;

/// The WIT package this module binds, as components name it.
pub const PACKAGE: &str = "portcullis:plugin@0.2.0";

same_shape_items!();

/// Adds this version's host imports to the linker.
pub fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    Plugin::add_to_linker::<_, HasSelf<StoreState>>(linker, |state| state)
}

/// The handle a call lends its plugin; see the module docs.
fn lent() -> Resource<RequestFacts> {
    Resource::new_borrow(0)
}

impl StoreState {
    fn facts(&self) -> wasmtime::Result<&RequestFacts> {
        self.scope
            .request
            .as_deref()
            .ok_or_else(|| wasmtime::format_err!("the request is no longer available"))
    }
}

impl types::Host for StoreState {}

impl types::HostRequest for StoreState {
    fn call_id(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<String> {
        self.facts()?;
        Ok(self.scope.call_id.clone().unwrap_or_default())
    }

    fn endpoint(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<String> {
        Ok(self.facts()?.endpoint.name().to_owned())
    }

    fn model(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<String> {
        Ok(self.facts()?.model.clone())
    }

    fn stream(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<bool> {
        Ok(self.facts()?.stream)
    }

    fn key_alias(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<Option<String>> {
        Ok(self.facts()?.key_alias.clone())
    }

    fn team(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<Option<String>> {
        Ok(self.facts()?.team.clone())
    }

    fn end_user(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<Option<String>> {
        Ok(self.facts()?.end_user.clone())
    }

    fn metadata(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<String> {
        Ok(self.facts()?.metadata_json())
    }

    fn tags(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<Vec<String>> {
        Ok(self.facts()?.tags.clone())
    }

    /// A body the gateway cannot read back is the gateway's problem, not the plugin's: the
    /// error ends the call and reaches the client whatever the plugin's `on_error`.
    fn messages(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<Vec<types::Message>> {
        let texts = self.facts()?.texts()?;
        Ok(texts.iter().map(message).collect())
    }

    fn estimated_tokens(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<u64> {
        Ok(self.facts()?.estimated_tokens()?)
    }

    fn body(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<Result<String, String>> {
        Ok(self.facts()?.body.to_json().map_err(|e| e.to_string()))
    }

    /// Lent handles are never dropped by their borrower; there is nothing to free.
    fn drop(&mut self, _: Resource<RequestFacts>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl self::portcullis::plugin::host::Host for StoreState {
    fn log(
        &mut self,
        level: self::portcullis::plugin::host::LogLevel,
        message: String,
    ) -> wasmtime::Result<()> {
        self.write_log(level.into(), message);
        Ok(())
    }
}

pub async fn check_request(
    exports: &Exports,
    guests: &mut Guests,
    store: &mut Store<StoreState>,
    instance: &Instance,
) -> wasmtime::Result<TextVerdict> {
    let guest = guardrail_guest(exports, guests, store, instance)?;
    Ok(request_verdict(
        guest.call_check_request(store, lent()).await?,
    ))
}

pub async fn check_response(
    exports: &Exports,
    guests: &mut Guests,
    store: &mut Store<StoreState>,
    instance: &Instance,
    view: &ResponseView,
) -> wasmtime::Result<TextVerdict> {
    let answer = response(view);
    let guest = guardrail_guest(exports, guests, store, instance)?;
    Ok(response_verdict(
        guest.call_check_response(store, lent(), &answer).await?,
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
        guest
            .call_check_stream(store, lent(), &stream_delta(delta))
            .await?,
    ))
}

pub async fn choose(
    exports: &Exports,
    guests: &mut Guests,
    store: &mut Store<StoreState>,
    instance: &Instance,
    request: &RouteRequest<'_>,
    candidates: &[Candidate],
) -> wasmtime::Result<Vec<u32>> {
    let offered: Vec<_> = candidates.iter().map(candidate).collect();
    let guest = router_guest(exports, guests, store, instance)?;
    guest
        .call_choose(store, lent(), request.group, &offered)
        .await
}

pub async fn enrich(
    exports: &Exports,
    guests: &mut Guests,
    store: &mut Store<StoreState>,
    instance: &Instance,
) -> wasmtime::Result<Enrichment> {
    let guest = enricher_guest(exports, guests, store, instance)?;
    Ok(enrichment(guest.call_enrich(store, lent()).await?))
}
