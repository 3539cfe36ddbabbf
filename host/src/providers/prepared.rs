//! The parts of an upstream request that are the same on every call to a deployment: the URL of
//! each endpoint and the credential headers. They are made on the first call and kept with the
//! [`Upstream`], so a call clones them instead of formatting, parsing and checking them again.

use std::sync::OnceLock;

use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::Uri;

use super::{anthropic, azure, openai, Endpoint, ProviderError, ProviderKind, Upstream};

/// Made once per [`Upstream`], on its first call.
#[derive(Debug, Clone, Default)]
pub struct PreparedRequests(OnceLock<Prepared>);

#[derive(Debug, Clone)]
pub(super) struct Prepared {
    /// By endpoint, in [`ENDPOINTS`] order.
    uris: [Result<Uri, ProviderError>; 3],
    headers: Result<Vec<(HeaderName, HeaderValue)>, ProviderError>,
}

const ENDPOINTS: [Endpoint; 3] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
];

impl PreparedRequests {
    pub(super) fn of(upstream: &Upstream) -> &Prepared {
        upstream.prepared.0.get_or_init(|| Prepared::new(upstream))
    }
}

impl Prepared {
    fn new(upstream: &Upstream) -> Prepared {
        Prepared {
            uris: ENDPOINTS.map(|endpoint| uri(upstream, endpoint)),
            headers: credential_headers(upstream),
        }
    }

    pub(super) fn uri(&self, endpoint: Endpoint) -> Result<Uri, ProviderError> {
        let index = ENDPOINTS.iter().position(|e| *e == endpoint).unwrap_or(0);
        self.uris[index].clone()
    }

    /// The credential headers (and Anthropic's version header).
    pub(super) fn headers(&self) -> Result<&[(HeaderName, HeaderValue)], ProviderError> {
        self.headers.as_deref().map_err(Clone::clone)
    }
}

fn uri(upstream: &Upstream, endpoint: Endpoint) -> Result<Uri, ProviderError> {
    let url = match upstream.kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible | ProviderKind::Mock => {
            openai::url(upstream, endpoint)
        }
        ProviderKind::Azure => azure::url(upstream, endpoint),
        ProviderKind::Anthropic if endpoint == Endpoint::ChatCompletions => {
            anthropic::url(&upstream.api_base)
        }
        ProviderKind::Anthropic => {
            return Err(ProviderError::Unsupported(format!(
                "Anthropic models do not support /v1/{}",
                endpoint.path()
            )))
        }
    };
    url.parse::<Uri>()
        .map_err(|e| ProviderError::Connect(format!("invalid upstream URL {url}: {e}")))
}

fn credential_headers(
    upstream: &Upstream,
) -> Result<Vec<(HeaderName, HeaderValue)>, ProviderError> {
    let key = upstream.api_key.as_ref().map(|k| k.expose());
    let mut headers: Vec<(HeaderName, String)> = Vec::new();
    match upstream.kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible | ProviderKind::Mock => {
            headers.extend(key.map(|k| (AUTHORIZATION, format!("Bearer {k}"))));
        }
        ProviderKind::Azure => {
            headers.extend(key.map(|k| (HeaderName::from_static("api-key"), k.to_owned())));
        }
        ProviderKind::Anthropic => {
            let version = upstream.api_version.as_deref();
            let version = version.unwrap_or(anthropic::DEFAULT_VERSION).to_owned();
            headers.push((HeaderName::from_static("anthropic-version"), version));
            headers.extend(key.map(|k| (HeaderName::from_static("x-api-key"), k.to_owned())));
        }
    }
    headers
        .into_iter()
        .map(|(name, value)| {
            // Never echo the value: it is a secret.
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                ProviderError::Connect(format!(
                    "the configured credential for {name} is not a valid header value"
                ))
            })?;
            value.set_sensitive(true);
            Ok((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Secret;
    use std::time::Duration;

    fn upstream(kind: ProviderKind, api_base: &str, key: &str) -> Upstream {
        Upstream {
            kind,
            model: "dep".into(),
            api_base: api_base.into(),
            api_key: Some(Secret::new(key.into())),
            api_version: Some("2024-10-21".into()),
            timeout: Duration::from_secs(1),
            stream_idle_timeout: Duration::from_secs(1),
            prepared: PreparedRequests::default(),
        }
    }

    #[test]
    fn each_dialect_gets_its_urls_and_credentials_once() {
        let openai = upstream(ProviderKind::Openai, "https://api.openai.com/v1", "sk-1");
        let prepared = PreparedRequests::of(&openai);
        assert!(std::ptr::eq(prepared, PreparedRequests::of(&openai)));
        let uri = prepared.uri(Endpoint::Embeddings).expect("a URL");
        assert_eq!(uri.to_string(), "https://api.openai.com/v1/embeddings");
        let headers = prepared.headers().expect("valid");
        assert_eq!(headers[0].0, AUTHORIZATION);
        assert_eq!(headers[0].1, "Bearer sk-1");
        assert!(headers[0].1.is_sensitive());

        let azure = upstream(ProviderKind::Azure, "https://x.openai.azure.com", "k");
        let uri = PreparedRequests::of(&azure).uri(Endpoint::ChatCompletions);
        assert_eq!(
            uri.expect("a URL").to_string(),
            "https://x.openai.azure.com/openai/deployments/dep/chat/completions?api-version=2024-10-21"
        );

        let claude = upstream(ProviderKind::Anthropic, "https://api.anthropic.com/v1", "k");
        let prepared = PreparedRequests::of(&claude);
        let uri = prepared.uri(Endpoint::ChatCompletions).expect("a URL");
        assert_eq!(uri.to_string(), "https://api.anthropic.com/v1/messages");
        assert!(matches!(
            prepared.uri(Endpoint::Embeddings),
            Err(ProviderError::Unsupported(_))
        ));
        let headers = prepared.headers().expect("valid");
        let names: Vec<_> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["anthropic-version", "x-api-key"]);
    }

    #[test]
    fn anthropic_base_with_or_without_version() {
        assert_eq!(
            anthropic::url("https://api.anthropic.com"),
            "https://api.anthropic.com/v1/messages"
        );
        assert_eq!(anthropic::url("https://x/v1"), "https://x/v1/messages");
    }

    #[test]
    fn a_bad_url_or_key_fails_its_calls_without_showing_the_key() {
        let broken = upstream(ProviderKind::Openai, "http://exa mple", "line\nbreak");
        let prepared = PreparedRequests::of(&broken);
        assert!(matches!(
            prepared.uri(Endpoint::ChatCompletions),
            Err(ProviderError::Connect(_))
        ));
        let refused = prepared.headers().expect_err("not a header value");
        assert!(!refused.to_string().contains("line"), "{refused}");
    }
}
