//! The fixed pipeline every API call goes through, in this order:
//!
//! authenticate → validate → enrich → guardrails (pre-call) → route (with during-call
//! guardrails) → guardrails (post-call) → respond → post-call hooks
//!
//! Each stage is a module named after it; [`handle`] calls them in order and is the only place the
//! order is written down. Any stage may end the call with a [`GatewayError`], which becomes an
//! OpenAI-style error response.

pub mod authenticate;
pub mod enrich;
pub mod guardrails;
pub mod post_call;
pub mod respond;
pub mod route;
pub mod validate;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body::Body;
use serde_json::json;
use tracing::Instrument;

use crate::call::{Call, Outcome};
use crate::error::GatewayError;
use crate::generation::Generation;
use crate::providers::{Endpoint, RelayedObject};
use respond::ResponseBody;

/// Runs one API call through every stage and always returns a response.
pub async fn handle<B>(
    generation: Arc<Generation>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: B,
) -> Response<ResponseBody>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let mut call = Call::new(endpoint);
    let span = tracing::info_span!("call", call_id = %call.id, endpoint = endpoint.path());
    async move {
        match run(&generation, &mut call, &headers, body).await {
            Ok(ready) => {
                respond::respond(
                    generation,
                    call,
                    ready.routed,
                    ready.include_usage,
                    ready.stream_guards,
                )
                .await
            }
            Err(err) => {
                let mut response = respond::error_response(&err, Some(&call.id));
                respond::add_key_headers(&mut response, &call);
                if err.status().is_server_error() {
                    tracing::warn!(status = err.status().as_u16(), error = %err, "call failed");
                } else {
                    tracing::debug!(status = err.status().as_u16(), error = %err, "call refused");
                }
                // Calls refused before a key was known are not anyone's calls to report.
                if call.principal.is_some() {
                    let outcome = Outcome::Failure {
                        status: err.status().as_u16(),
                        message: err.to_string(),
                    };
                    post_call::finish(&generation, call, outcome);
                }
                response
            }
        }
    }
    .instrument(span)
    .await
}

async fn run<B>(
    generation: &Arc<Generation>,
    call: &mut Call,
    headers: &HeaderMap,
    body: B,
) -> Result<Ready, GatewayError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let principal = authenticate::authenticate(generation, headers).await?;
    call.principal = Some(Arc::clone(&principal));
    let limit = generation.config.server.max_request_bytes;
    let bytes = validate::read_body(headers, body, limit).await?;
    let mut request = validate::validate(call.endpoint, &bytes)?;
    drop(bytes);
    enrich::enrich(generation, call, &request).await?;
    authenticate::authorize_model(
        &principal,
        &call.model,
        generation.router.has_group(&call.model),
    )?;
    authenticate::admit(generation.governance.as_deref(), call, || {
        Ok(request.estimated_prompt_tokens()? + request.max_output_tokens())
    })
    .await?;
    guardrails::pre_call(generation, call, &mut request).await?;
    let during = guardrails::DuringCall::select(generation, call, &request);
    let stream_guards = guardrails::StreamGuards::select(generation, call, &request);
    let mut routed = match &during {
        None => route::route(generation, call, &request).await?,
        Some(during) => {
            let (routed, outcomes) = during
                .run(&request, route::route(generation, call, &request))
                .await;
            call.guardrails.extend(outcomes);
            routed?
        }
    };
    if let route::Answer::Whole(response) = &mut routed.answer {
        take_usage(call, &routed.deployment, response);
        guardrails::post_call(generation, call, &request, response).await?;
    }
    Ok(Ready {
        routed,
        include_usage: request.include_usage,
        stream_guards,
    })
}

/// Counts a whole answer's usage for the call and the deployment as soon as it arrives, so an
/// answer a guardrail then refuses is still paid for and counted against the caps.
fn take_usage(call: &mut Call, deployment: &crate::router::Deployment, response: &RelayedObject) {
    if let Some(usage) = response.usage() {
        call.set_usage(usage);
        deployment.record_tokens(usage.total_tokens);
    }
}

/// A call that has its upstream answer, ready to respond with.
struct Ready {
    routed: route::Routed,
    include_usage: bool,
    stream_guards: Option<guardrails::StreamGuards>,
}

/// `GET /v1/models`: the model groups the caller's key may use, in OpenAI's list shape.
pub async fn list_models(generation: &Generation, headers: &HeaderMap) -> Response<ResponseBody> {
    let principal = match authenticate::authenticate(generation, headers).await {
        Ok(p) => p,
        Err(err) => return respond::error_response(&err, None),
    };
    let data: Vec<_> = generation
        .router
        .group_names()
        .iter()
        .filter(|name| principal.may_use(name))
        .map(|name| model_object(name))
        .collect();
    let body = json!({ "object": "list", "data": data }).to_string();
    respond::json_response(StatusCode::OK, Bytes::from(body))
}

/// `GET /v1/models/{id}`: one model, if the caller's key may use it.
pub async fn retrieve_model(
    generation: &Generation,
    headers: &HeaderMap,
    id: &str,
) -> Response<ResponseBody> {
    let found = authenticate::authenticate(generation, headers)
        .await
        .and_then(|principal| {
            // A model the key may not use is reported as absent, as OpenAI does.
            let visible = generation.router.has_group(id) && principal.may_use(id);
            authenticate::authorize_model(&principal, id, visible)
        });
    match found {
        Ok(()) => respond::json_response(StatusCode::OK, Bytes::from(model_object(id).to_string())),
        Err(err) => respond::error_response(&err, None),
    }
}

fn model_object(id: &str) -> serde_json::Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": "portcullis" })
}
