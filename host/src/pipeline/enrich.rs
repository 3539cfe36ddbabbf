//! Stage 3: fill in what the later stages and hooks need to know about the call, then let
//! enrichers add metadata and tags or move the call to another model.

use crate::call::Call;
use crate::error::GatewayError;
use crate::generation::Generation;
use crate::openai::ApiRequest;

pub async fn enrich(
    generation: &Generation,
    call: &mut Call,
    request: &ApiRequest,
) -> Result<(), GatewayError> {
    call.requested_model = request.model.clone();
    call.model = request.model.clone();
    call.stream = request.stream;
    call.end_user = request.user.clone();
    call.metadata = request.metadata.clone();
    for enricher in &generation.enrichers {
        let enrichment = enricher.enrich(call, request).await?;
        call.metadata.extend(enrichment.metadata);
        call.tags.extend(enrichment.tags);
        if let Some(model) = enrichment.model {
            tracing::debug!(enricher = enricher.name(), %model, "enricher moved the call");
            call.model = model;
        }
    }
    Ok(())
}
