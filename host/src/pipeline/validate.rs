//! Stage 2: read the body (within the size limit) and check it against the route's schema.
//! **The body is checked once**, here; it is parsed into an object at most once, when a later
//! stage first reads all of it.

use bytes::Bytes;
use http::HeaderMap;
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use crate::error::GatewayError;
use crate::openai::ApiRequest;
use crate::providers::Endpoint;

/// Reads the whole body, refusing more than `limit` bytes before reading them.
pub async fn read_body<B>(headers: &HeaderMap, body: B, limit: usize) -> Result<Bytes, GatewayError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::PayloadTooLarge { limit })
        }
        Err(e) => Err(GatewayError::invalid(
            format!("the request body could not be read: {e}"),
            None,
        )),
    }
}

/// Parses the body for `endpoint`.
pub fn validate(endpoint: Endpoint, bytes: &Bytes) -> Result<ApiRequest, GatewayError> {
    ApiRequest::parse(endpoint, bytes)
}
