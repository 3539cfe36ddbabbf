//! Stage 5: pick a deployment and call it; on a retryable failure try another deployment of the
//! group, then the fallback groups. A stream counts as answered only once its first chunk arrived,
//! so a stream that fails before that is retried like any other call.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::call::Call;
use crate::error::GatewayError;
use crate::extension::RouteRequest;
use crate::generation::Generation;
use crate::openai::ApiRequest;
use crate::providers::{ChunkStream, ProviderError, RelayedObject, Reply};
use crate::router::{Deployment, InFlight, NoDeployment};

/// The upstream's answer, with the deployment that gave it.
#[derive(Debug)]
pub struct Routed {
    pub deployment: Arc<Deployment>,
    /// Held until the answer has been delivered, so least-busy routing counts open streams.
    pub in_flight: InFlight,
    pub answer: Answer,
}

pub enum Answer {
    Whole(RelayedObject),
    Stream {
        first: RelayedObject,
        rest: ChunkStream,
    },
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Whole(_) => f.write_str("Answer::Whole"),
            Answer::Stream { .. } => f.write_str("Answer::Stream"),
        }
    }
}

/// Longest pause before retrying a deployment that already failed this call.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub async fn route(
    generation: &Generation,
    call: &mut Call,
    request: &ApiRequest,
) -> Result<Routed, GatewayError> {
    let router = &generation.router;
    let settings = &router.settings;
    let estimated_tokens = if router.strategy().uses_token_estimate() {
        request.estimated_prompt_tokens()?
    } else {
        0
    };
    // The call changes as it goes; its model's name is kept apart from it.
    let model = call.model.clone();
    let groups = std::iter::once(&model).chain(router.fallbacks(&model));
    let mut last_error: Option<GatewayError> = None;
    for (group_index, group) in groups.enumerate() {
        if group_index > 0 {
            call.fallbacks += 1;
            debug!(%group, "falling back");
        }
        let mut tried: Vec<Arc<Deployment>> = Vec::new();
        for retry in 0..=settings.num_retries {
            // Made afresh for each attempt: a plugin strategy sees the call as it stands.
            let route_request = RouteRequest {
                call_id: &call.id,
                group,
                estimated_tokens,
                stream: request.stream,
                origin: Some((call, request)),
            };
            let (deployment, in_flight) = match router.reserve(&route_request, &tried).await {
                Ok(reserved) => reserved,
                Err(e @ NoDeployment::NoneAvailable(_)) => {
                    last_error.get_or_insert(GatewayError::Unavailable(e.to_string()));
                    break;
                }
                Err(e @ NoDeployment::UnknownGroup(_)) => {
                    last_error = Some(GatewayError::ModelNotFound(e.to_string()));
                    break;
                }
            };
            if tried.iter().any(|t| Arc::ptr_eq(t, &deployment)) {
                // Only this deployment is left: give it a moment before asking again.
                let wait = Duration::from_millis(100 * 2u64.pow(retry.min(5)));
                let wait = match &last_error {
                    Some(GatewayError::RateLimited {
                        retry_after_ms: Some(ms),
                        ..
                    }) => Duration::from_millis(*ms).max(wait),
                    _ => wait,
                }
                .min(MAX_BACKOFF);
                tokio::time::sleep(wait).await;
            }
            call.attempts += 1;
            let started = Instant::now();
            let result = attempt(generation, &deployment, request).await;
            call.upstream_time += started.elapsed();
            match result {
                Ok(answer) => {
                    deployment.record_latency(started.elapsed());
                    call.deployment = Some(Arc::clone(&deployment));
                    return Ok(Routed {
                        deployment,
                        in_flight,
                        answer,
                    });
                }
                Err(err) => {
                    warn!(deployment = %deployment.id, error = %err, "upstream attempt failed");
                    if err.counts_against_deployment()
                        && deployment.record_failure(settings.allowed_fails, settings.cooldown)
                    {
                        warn!(deployment = %deployment.id, cooldown_s = settings.cooldown.as_secs_f64(), "deployment cooling down");
                    }
                    let retryable = err.is_retryable();
                    last_error = Some(GatewayError::from(err));
                    if !retryable {
                        return Err(last_error.unwrap_or_else(|| {
                            GatewayError::Internal("lost the upstream error".into())
                        }));
                    }
                    tried.push(deployment);
                }
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        GatewayError::Unavailable(format!("no deployment could serve '{}'", call.model))
    }))
}

/// One call to one deployment; for streams, until the first chunk.
async fn attempt(
    generation: &Generation,
    deployment: &Deployment,
    request: &ApiRequest,
) -> Result<Answer, ProviderError> {
    let reply = generation
        .client
        .send(
            &deployment.upstream,
            request.endpoint,
            &request.body,
            request.stream,
        )
        .await?;
    match reply {
        Reply::Whole(object) => Ok(Answer::Whole(object)),
        Reply::Stream(mut rest) => match rest.next().await {
            Some(Ok(first)) => Ok(Answer::Stream { first, rest }),
            Some(Err(e)) => Err(e),
            None => Err(ProviderError::Protocol(
                "the upstream stream ended before its first chunk".into(),
            )),
        },
    }
}
