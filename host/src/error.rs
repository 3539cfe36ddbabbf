//! One error type for everything a client can be told, and its OpenAI JSON shape.
//!
//! Every stage returns `GatewayError`; only `into_response` decides status codes and bodies, so the
//! SDKs raise the same exception class for the same mistake wherever it was found.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use serde_json::json;

use crate::providers::{ProviderError, UnreadableBody};

/// What went wrong, in the terms a client of the OpenAI API understands.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    ModelNotFound(String),
    #[error("{0}")]
    RouteNotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A rate limit was reached: the upstream's (and retries and fallbacks could not find
    /// capacity elsewhere) or the caller's own.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_ms: Option<u64>,
    },
    /// The caller's key, team or user has spent its budget.
    #[error("{message}")]
    BudgetExceeded { message: String, status: StatusCode },
    /// A management route's key, team or user does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The upstream failed (5xx, bad answer, connection error).
    #[error("{message}")]
    Upstream { status: StatusCode, message: String },
    #[error("{0}")]
    Timeout(String),
    /// No deployment of the group can take the call right now (all cooling down or at their caps).
    #[error("{0}")]
    Unavailable(String),
    /// A guardrail refused the call.
    #[error("blocked by the guardrail '{guardrail}': {reason}")]
    Blocked { guardrail: String, reason: String },
    /// A plugin failed (trap, timeout, memory cap) and its policy is to fail the call.
    #[error("{0}")]
    PluginFailed(String),
    #[error("{0}")]
    Internal(String),
}

impl GatewayError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        GatewayError::InvalidRequest {
            message: message.into(),
            param: param.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidRequest { .. } | GatewayError::Blocked { .. } => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::ModelNotFound(_)
            | GatewayError::RouteNotFound(_)
            | GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::BudgetExceeded { status, .. } => *status,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Upstream { status, .. } => *status,
            GatewayError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal(_) | GatewayError::PluginFailed(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// OpenAI's `error.type` for this error.
    fn kind(&self) -> &'static str {
        match self {
            GatewayError::InvalidRequest { .. }
            | GatewayError::ModelNotFound(_)
            | GatewayError::RouteNotFound(_)
            | GatewayError::NotFound(_)
            | GatewayError::MethodNotAllowed(_)
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::UnsupportedMediaType(_) => "invalid_request_error",
            GatewayError::Unauthorized(_) => "authentication_error",
            GatewayError::Forbidden(_) => "permission_error",
            GatewayError::RateLimited { .. } => "rate_limit_error",
            GatewayError::BudgetExceeded { .. } => "budget_exceeded",
            GatewayError::Blocked { .. } => "guardrail_violation",
            GatewayError::PluginFailed(_) => "plugin_error",
            GatewayError::Upstream { .. }
            | GatewayError::Timeout(_)
            | GatewayError::Unavailable(_)
            | GatewayError::Internal(_) => "api_error",
        }
    }

    /// OpenAI's `error.code` for this error.
    fn code(&self) -> Option<&'static str> {
        match self {
            GatewayError::Unauthorized(_) => Some("invalid_api_key"),
            GatewayError::ModelNotFound(_) => Some("model_not_found"),
            GatewayError::RouteNotFound(_) => Some("unknown_url"),
            GatewayError::PayloadTooLarge { .. } => Some("request_too_large"),
            GatewayError::RateLimited { .. } => Some("rate_limit_exceeded"),
            // What OpenAI answers for an exhausted quota; its SDKs do not retry it.
            GatewayError::BudgetExceeded { .. } => Some("insufficient_quota"),
            GatewayError::Timeout(_) => Some("timeout"),
            GatewayError::Blocked { .. } => Some("guardrail_violation"),
            _ => None,
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            GatewayError::InvalidRequest { param, .. } => param.as_deref(),
            // The guardrail's name, so clients can tell which policy refused them.
            GatewayError::Blocked { guardrail, .. } => Some(guardrail),
            _ => None,
        }
    }

    /// The OpenAI error object: `{"error":{"message","type","param","code"}}`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }

    pub fn body(&self) -> Bytes {
        Bytes::from(self.to_json().to_string())
    }

    /// Headers the SDKs read to decide whether and when to retry.
    pub fn retry_headers(&self) -> Vec<(&'static str, HeaderValue)> {
        match self {
            GatewayError::RateLimited {
                retry_after_ms: Some(ms),
                ..
            } => vec![
                ("retry-after", HeaderValue::from(ms.div_ceil(1000))),
                ("retry-after-ms", HeaderValue::from(*ms)),
            ],
            // A client mistake or a spent budget will fail the same way again; tell the SDKs
            // not to retry.
            e if e.status().is_client_error() && !matches!(e, GatewayError::RateLimited { .. }) => {
                vec![("x-should-retry", HeaderValue::from_static("false"))]
            }
            _ => Vec::new(),
        }
    }
}

impl From<UnreadableBody> for GatewayError {
    fn from(error: UnreadableBody) -> Self {
        GatewayError::invalid(error.to_string(), None)
    }
}

impl From<ProviderError> for GatewayError {
    fn from(err: ProviderError) -> Self {
        match err {
            ProviderError::Status {
                status,
                message,
                retry_after_s,
            } => match status.as_u16() {
                429 => GatewayError::RateLimited {
                    message,
                    retry_after_ms: retry_after_s.map(|s| s.saturating_mul(1000)),
                },
                // The client's own mistake, reported by the upstream: pass it on as such.
                400 | 404 | 413 | 422 => GatewayError::invalid(message, None),
                // The upstream rejected the gateway's credentials: not the client's fault.
                401 | 403 => GatewayError::Upstream {
                    status: StatusCode::BAD_GATEWAY,
                    message: format!("the upstream rejected the gateway's credentials: {message}"),
                },
                503 => GatewayError::Upstream {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message,
                },
                408 | 504 => GatewayError::Timeout(message),
                _ => GatewayError::Upstream {
                    status: StatusCode::BAD_GATEWAY,
                    message,
                },
            },
            ProviderError::Timeout(message) => GatewayError::Timeout(message),
            ProviderError::Connect(message) | ProviderError::Protocol(message) => {
                GatewayError::Upstream {
                    status: StatusCode::BAD_GATEWAY,
                    message,
                }
            }
            ProviderError::Unsupported(message) => GatewayError::invalid(message, None),
            ProviderError::InvalidRequest { message, param } => {
                GatewayError::invalid(message, param)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_openai_shape() {
        let err =
            GatewayError::invalid("messages[0].role: missing", Some("messages[0].role".into()));
        let v = err.to_json();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "messages[0].role");
        assert!(v["error"]["code"].is_null());
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn upstream_statuses_map_to_client_statuses() {
        let from = |code: u16| {
            GatewayError::from(ProviderError::Status {
                status: StatusCode::from_u16(code).expect("valid status"),
                message: "m".into(),
                retry_after_s: None,
            })
            .status()
            .as_u16()
        };
        assert_eq!(from(429), 429);
        assert_eq!(from(400), 400);
        assert_eq!(from(401), 502);
        assert_eq!(from(500), 502);
        assert_eq!(from(503), 503);
        assert_eq!(from(504), 504);
    }
}
