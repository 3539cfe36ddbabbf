//! Upstream dialects: build the upstream request, call it, decode the reply into OpenAI's shapes.
//!
//! **Providers know nothing of keys, plugins or the router**: they get one [`Upstream`] (a
//! deployment's connection details) and a body in OpenAI's chat/completions/embeddings shape, and
//! give back OpenAI-shaped JSON objects, whole or as a stream of chunks.

mod anthropic;
mod azure;
mod client;
mod mock;
mod openai;
mod prepared;
mod relayed;
mod request_body;

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use http::StatusCode;
use serde::Deserialize;

pub use client::UpstreamClient;
pub use prepared::PreparedRequests;
pub use relayed::RelayedObject;
pub use request_body::{RequestBody, SentSpans, UnreadableBody};

/// A JSON object: request bodies, responses and stream chunks all travel as these, so fields we do
/// not know about survive the trip.
pub type JsonObject = serde_json::Map<String, serde_json::Value>;

/// Which OpenAI operation a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// The operation's name as plugins see it.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat-completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }

    /// The path under an OpenAI-style base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat/completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// The upstream dialect of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Openai,
    OpenaiCompatible,
    Azure,
    Anthropic,
    Mock,
}

impl ProviderKind {
    /// Where the provider's public API lives; `None` where the config must say.
    pub fn default_api_base(self) -> Option<&'static str> {
        match self {
            ProviderKind::Openai => Some("https://api.openai.com/v1"),
            ProviderKind::Anthropic => Some("https://api.anthropic.com"),
            ProviderKind::Mock => Some("mock://local"),
            ProviderKind::OpenaiCompatible | ProviderKind::Azure => None,
        }
    }
}

/// A secret from the config. Its `Debug` and `Display` never show it, so it cannot leak into a log
/// line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The only way to read the value; grep for it to audit where secrets go.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Everything needed to reach one deployment.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub kind: ProviderKind,
    /// The upstream's model id (for Azure, the deployment name).
    pub model: String,
    /// Base URL without a trailing slash.
    pub api_base: String,
    pub api_key: Option<Secret>,
    /// Azure's `api-version`; Anthropic's `anthropic-version`.
    pub api_version: Option<String>,
    /// Until the response head (and for whole replies, the whole body).
    pub timeout: Duration,
    /// Longest silence allowed between two stream chunks.
    pub stream_idle_timeout: Duration,
    /// Made on the first call: see [`PreparedRequests`].
    pub prepared: PreparedRequests,
}

/// Why an upstream call failed. Retryable failures move the router to another deployment.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The upstream answered with an error status.
    #[error("upstream returned {status}: {message}")]
    Status {
        status: StatusCode,
        message: String,
        retry_after_s: Option<u64>,
    },
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Connect(String),
    /// The upstream answered something we could not decode.
    #[error("{0}")]
    Protocol(String),
    /// The deployment's dialect cannot do this operation (e.g. embeddings on Anthropic).
    #[error("{0}")]
    Unsupported(String),
    /// The request cannot be expressed in the upstream's dialect because of what the client sent.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
}

impl From<UnreadableBody> for ProviderError {
    fn from(error: UnreadableBody) -> Self {
        ProviderError::InvalidRequest {
            message: error.to_string(),
            param: None,
        }
    }
}

impl ProviderError {
    /// Whether another deployment might succeed where this one failed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => {
                matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error()
            }
            ProviderError::Timeout(_) | ProviderError::Connect(_) | ProviderError::Protocol(_) => {
                true
            }
            ProviderError::Unsupported(_) | ProviderError::InvalidRequest { .. } => false,
        }
    }

    /// Whether this failure counts against the deployment's health (and so toward its cooldown).
    pub fn counts_against_deployment(&self) -> bool {
        self.is_retryable()
    }

    /// Removes `secret` from the message: some upstreams quote the credential they rejected.
    pub(crate) fn redact(self, secret: Option<&Secret>) -> Self {
        let Some(secret) = secret.map(Secret::expose).filter(|s| !s.is_empty()) else {
            return self;
        };
        let scrub = |m: String| m.replace(secret, "[redacted]");
        match self {
            ProviderError::Status {
                status,
                message,
                retry_after_s,
            } => ProviderError::Status {
                status,
                message: scrub(message),
                retry_after_s,
            },
            ProviderError::Timeout(m) => ProviderError::Timeout(scrub(m)),
            ProviderError::Connect(m) => ProviderError::Connect(scrub(m)),
            ProviderError::Protocol(m) => ProviderError::Protocol(scrub(m)),
            ProviderError::Unsupported(m) => ProviderError::Unsupported(scrub(m)),
            ProviderError::InvalidRequest { message, param } => ProviderError::InvalidRequest {
                message: scrub(message),
                param,
            },
        }
    }

    pub(crate) fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        ProviderError::InvalidRequest {
            message: message.into(),
            param: param.into(),
        }
    }
}

/// Token counts as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    /// Reads `usage` from an OpenAI response or chunk, if present and well formed.
    pub fn from_object(object: &JsonObject) -> Option<Usage> {
        object
            .get("usage")
            .filter(|u| u.is_object())
            .and_then(|u| Usage::deserialize(u).ok())
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        })
    }
}

/// A stream of OpenAI chunk objects (`chat.completion.chunk` or `text_completion`), in order.
/// It ends after the upstream's last chunk; `[DONE]` is the encoder's business, not the stream's.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<RelayedObject, ProviderError>> + Send>>;

/// What a successful upstream call gave back.
// A reply moves a few times per call; boxing the answer would cost an allocation each time.
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    Whole(RelayedObject),
    Stream(ChunkStream),
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Whole(_) => f.write_str("Reply::Whole"),
            Reply::Stream(_) => f.write_str("Reply::Stream"),
        }
    }
}

/// What a stream decoder made of one SSE event.
#[derive(Debug)]
pub(crate) enum Decoded {
    Chunks(Vec<RelayedObject>),
    /// The upstream said the stream is complete.
    Done,
}

/// Turns one dialect's SSE events into OpenAI chunk objects.
pub(crate) trait StreamDecoder: Send + 'static {
    fn decode(&mut self, event: crate::sse::SseEvent) -> Result<Decoded, ProviderError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_removes_the_secret_from_messages() {
        let err = ProviderError::Status {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect API key provided: sk-live-123.".into(),
            retry_after_s: None,
        };
        let secret = Secret::new("sk-live-123".into());
        assert_eq!(
            err.redact(Some(&secret)).to_string(),
            "upstream returned 401 Unauthorized: Incorrect API key provided: [redacted]."
        );
        assert_eq!(format!("{secret:?}"), "Secret(..)");
    }
}
