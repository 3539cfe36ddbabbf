//! The pooled HTTPS client and the one function that calls an upstream in any dialect.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{
    anthropic, mock, openai, ChunkStream, Decoded, Endpoint, JsonObject, PreparedRequests,
    ProviderError, ProviderKind, RelayedObject, Reply, RequestBody, StreamDecoder, Upstream,
};
use crate::sse::SseParser;

/// Large enough for a big batch of embeddings, small enough that a broken upstream cannot exhaust
/// memory.
const MAX_UPSTREAM_BODY: usize = 256 * 1024 * 1024;
/// Error bodies are only ever shown as a message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Calls upstreams over pooled HTTP/1.1 and HTTP/2 connections; cheap to clone.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl UpstreamClient {
    /// Trusts the platform's roots, or the bundled webpki roots where the platform has none.
    pub fn new() -> UpstreamClient {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_keepalive(Some(Duration::from_secs(60)));
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match builder.with_native_roots() {
            Ok(native) => native,
            Err(_) => hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots(),
        };
        let https = builder
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        UpstreamClient { http }
    }

    /// Sends one call to one deployment. For streams, returns once the response head arrived.
    /// **Upstream keys never leave the config**: errors are scrubbed of the deployment's key.
    pub async fn send(
        &self,
        upstream: &Upstream,
        endpoint: Endpoint,
        body: &RequestBody,
        stream: bool,
    ) -> Result<Reply, ProviderError> {
        let secret = upstream.api_key.as_ref();
        match self.send_unredacted(upstream, endpoint, body, stream).await {
            Ok(Reply::Stream(chunks)) => {
                let secret = secret.cloned();
                Ok(Reply::Stream(Box::pin(chunks.map(move |item| {
                    item.map_err(|e| e.redact(secret.as_ref()))
                }))))
            }
            Ok(whole) => Ok(whole),
            Err(e) => Err(e.redact(secret)),
        }
    }

    async fn send_unredacted(
        &self,
        upstream: &Upstream,
        endpoint: Endpoint,
        body: &RequestBody,
        stream: bool,
    ) -> Result<Reply, ProviderError> {
        if upstream.kind == ProviderKind::Mock {
            return mock::reply(upstream, endpoint, body.object()?, stream);
        }
        let request = build_request(upstream, endpoint, body, stream)?;
        let deadline = tokio::time::Instant::now() + upstream.timeout;
        let response = tokio::time::timeout_at(deadline, self.http.request(request))
            .await
            .map_err(|_| timed_out(upstream))?
            .map_err(|e| describe_client_error(upstream, &e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(error_from_response(response).await);
        }
        if stream {
            let decoder: Box<dyn StreamDecoder> = match upstream.kind {
                ProviderKind::Anthropic => Box::new(anthropic::MessagesStream::new()),
                _ => Box::new(openai::ChunkDecoder),
            };
            return Ok(Reply::Stream(chunk_stream(
                response.into_body(),
                decoder,
                upstream.stream_idle_timeout,
            )));
        }
        let bytes = tokio::time::timeout_at(
            deadline,
            Limited::new(response.into_body(), MAX_UPSTREAM_BODY).collect(),
        )
        .await
        .map_err(|_| timed_out(upstream))?
        .map_err(|e| ProviderError::Protocol(format!("reading the upstream response failed: {e}")))?
        .to_bytes();
        let not_an_object = |e: serde_json::Error| {
            ProviderError::Protocol(format!("the upstream response is not a JSON object: {e}"))
        };
        match upstream.kind {
            ProviderKind::Anthropic => {
                let object: JsonObject = serde_json::from_slice(&bytes).map_err(not_an_object)?;
                let answer = anthropic::chat_completion(object)?;
                Ok(Reply::Whole(RelayedObject::from_object(answer)))
            }
            _ => Ok(Reply::Whole(
                RelayedObject::from_bytes(bytes).map_err(not_an_object)?,
            )),
        }
    }
}

impl Default for UpstreamClient {
    fn default() -> Self {
        UpstreamClient::new()
    }
}

fn build_request(
    upstream: &Upstream,
    endpoint: Endpoint,
    body: &RequestBody,
    stream: bool,
) -> Result<Request<Full<Bytes>>, ProviderError> {
    let prepared = PreparedRequests::of(upstream);
    let uri = prepared.uri(endpoint)?;
    let credentials = prepared.headers()?;
    let bytes = match upstream.kind {
        ProviderKind::Openai
        | ProviderKind::OpenaiCompatible
        | ProviderKind::Mock
        | ProviderKind::Azure => openai::body(upstream, body, stream)?,
        ProviderKind::Anthropic => {
            let messages = anthropic::messages_body(body.object()?, &upstream.model, stream)?;
            serde_json::to_vec(&messages).map_err(|e| {
                ProviderError::Protocol(format!("cannot encode the upstream request: {e}"))
            })?
        }
    };
    let mut request = Request::new(Full::new(Bytes::from(bytes)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    // hyper then adds `host` and `content-length`: room for them spares two regrowths.
    headers.reserve(3 + credentials.len());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in credentials {
        headers.insert(name.clone(), value.clone());
    }
    Ok(request)
}

fn timed_out(upstream: &Upstream) -> ProviderError {
    ProviderError::Timeout(format!(
        "the upstream {} did not answer within {:.1}s",
        upstream.api_base,
        upstream.timeout.as_secs_f64()
    ))
}

fn describe_client_error(
    upstream: &Upstream,
    err: &hyper_util::client::legacy::Error,
) -> ProviderError {
    let mut cause = String::new();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if err.is_connect() {
        ProviderError::Connect(format!(
            "cannot connect to the upstream {}: {cause}",
            upstream.api_base
        ))
    } else {
        ProviderError::Connect(format!(
            "the upstream {} connection failed: {err} {cause}",
            upstream.api_base
        ))
    }
}

async fn error_from_response(response: Response<Incoming>) -> ProviderError {
    let status = response.status();
    let retry_after_s = retry_after(response.headers());
    let body = match Limited::new(response.into_body(), MAX_ERROR_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let message = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(object)) => object
            .get("error")
            .map(error_message_of)
            .or_else(|| {
                object
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| truncated(&body)),
        _ => truncated(&body),
    };
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        message
    };
    ProviderError::Status {
        status,
        message,
        retry_after_s,
    }
}

/// The message of an error object in either dialect (`{"message": ..}`), or the value as text.
pub(super) fn error_message_of(error: &Value) -> String {
    match error {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| error.to_string(), str::to_owned),
        other => other.to_string(),
    }
}

fn truncated(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(500) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

fn retry_after(headers: &http::HeaderMap) -> Option<u64> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some((ms / 1000.0).ceil().max(0.0) as u64);
    }
    header("retry-after").and_then(|v| v.trim().parse::<u64>().ok())
}

/// Reads upstream body frames, cuts them into SSE events, and decodes those into chunks.
fn chunk_stream(body: Incoming, decoder: Box<dyn StreamDecoder>, idle: Duration) -> ChunkStream {
    struct State {
        body: Incoming,
        parser: SseParser,
        decoder: Box<dyn StreamDecoder>,
        ready: VecDeque<Result<RelayedObject, ProviderError>>,
        finished: bool,
        /// Whether a chunk carried a finish reason: then a missing terminator loses nothing.
        saw_finish: bool,
        idle: Duration,
    }

    impl State {
        fn take(&mut self, event: crate::sse::SseEvent) {
            match self.decoder.decode(event) {
                Ok(Decoded::Chunks(chunks)) => {
                    self.saw_finish |= chunks.iter().any(RelayedObject::has_finish_reason);
                    self.ready.extend(chunks.into_iter().map(Ok));
                }
                Ok(Decoded::Done) => self.finished = true,
                Err(e) => {
                    self.ready.push_back(Err(e));
                    self.finished = true;
                }
            }
        }

        fn fail(&mut self, err: ProviderError) {
            self.ready.push_back(Err(err));
            self.finished = true;
        }
    }

    let state = State {
        body,
        parser: SseParser::new(),
        decoder,
        ready: VecDeque::new(),
        finished: false,
        saw_finish: false,
        idle,
    };
    Box::pin(stream::unfold(state, |mut s| async move {
        loop {
            if let Some(item) = s.ready.pop_front() {
                return Some((item, s));
            }
            if s.finished {
                return None;
            }
            match tokio::time::timeout(s.idle, s.body.frame()).await {
                Err(_) => s.fail(ProviderError::Timeout(format!(
                    "the upstream stream sent nothing for {:.1}s",
                    s.idle.as_secs_f64()
                ))),
                Ok(None) => {
                    if let Some(event) = s.parser.finish() {
                        s.take(event);
                    }
                    if s.finished || s.saw_finish {
                        s.finished = true;
                    } else {
                        // Closed before saying it was done: the client must not mistake a
                        // truncated answer for a whole one.
                        s.fail(ProviderError::Protocol(
                            "the upstream stream ended before the answer was complete".into(),
                        ));
                    }
                }
                Ok(Some(Err(e))) => s.fail(ProviderError::Protocol(format!(
                    "the upstream stream broke off: {e}"
                ))),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        for event in s.parser.push(&data) {
                            if !s.finished {
                                s.take(event);
                            }
                        }
                    }
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut headers = http::HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(7));
        headers.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&headers), Some(2));
    }

    #[test]
    fn error_messages_from_either_dialect() {
        let openai = serde_json::json!({"message": "bad", "type": "x"});
        assert_eq!(error_message_of(&openai), "bad");
        assert_eq!(error_message_of(&Value::String("plain".into())), "plain");
        assert_eq!(truncated(&[b'a'; 600]).len(), 503);
    }
}
