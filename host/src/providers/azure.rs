//! Azure OpenAI: the OpenAI wire format at deployment URLs, with `api-version` and an `api-key`
//! header. Bodies and streams are OpenAI's, so [`super::openai`] encodes and decodes them.

use super::{Endpoint, Upstream};

pub(super) fn url(upstream: &Upstream, endpoint: Endpoint) -> String {
    format!(
        "{}/openai/deployments/{}/{}?api-version={}",
        upstream.api_base,
        upstream.model,
        endpoint.path(),
        upstream.api_version.as_deref().unwrap_or_default()
    )
}
