//! A mock OpenAI upstream fast enough never to be the bottleneck: canned bytes, no JSON parsing.
//!
//! What it does is a [`Behavior`] that the runner may change between scenarios while it serves,
//! so every gateway under test stays configured with one upstream and one model.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::time::Sleep;

/// How the mock answers; applies to requests that arrive after it is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Behavior {
    /// Before the response head.
    pub delay: Duration,
    /// Content deltas of a streamed answer.
    pub deltas: u32,
    /// Between two deltas of a streamed answer.
    pub delta_gap: Duration,
    /// Share of requests answered with a 500, from 0 to 1.
    pub fail_rate: f64,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            delay: Duration::ZERO,
            deltas: 16,
            delta_gap: Duration::ZERO,
            fail_rate: 0.0,
        }
    }
}

/// A running mock; dropping it does not stop it (it lives as long as the runtime).
#[derive(Debug, Clone)]
pub struct Mock {
    pub address: SocketAddr,
    behavior: Arc<RwLock<Behavior>>,
}

impl Mock {
    pub fn set(&self, behavior: Behavior) {
        *self
            .behavior
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = behavior;
    }

    /// `http://address/v1`, what OpenAI clients take as their base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.address)
    }
}

/// Binds `listen` and serves on the current runtime.
pub async fn start(listen: SocketAddr, behavior: Behavior) -> std::io::Result<Mock> {
    let listener = TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let behavior = Arc::new(RwLock::new(behavior));
    let shared = Arc::clone(&behavior);
    tokio::spawn(async move {
        let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let behavior = Arc::clone(&shared);
            let builder = Arc::clone(&builder);
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let now = *behavior
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    answer(request, now)
                });
                let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    Ok(Mock { address, behavior })
}

type MockBody = http_body_util::Either<http_body_util::Full<Bytes>, PacedSse>;

async fn answer(
    request: Request<Incoming>,
    behavior: Behavior,
) -> Result<Response<MockBody>, Infallible> {
    let is_chat = request.uri().path().ends_with("/chat/completions");
    // Read the whole request, as a real upstream must before answering.
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if !behavior.delay.is_zero() {
        tokio::time::sleep(behavior.delay).await;
    }
    if !is_chat {
        return Ok(json(StatusCode::NOT_FOUND, NOT_FOUND));
    }
    if behavior.fail_rate > 0.0 && fastrand::f64() < behavior.fail_rate {
        return Ok(json(StatusCode::INTERNAL_SERVER_ERROR, UPSTREAM_ERROR));
    }
    if contains(&body, b"\"stream\":true") || contains(&body, b"\"stream\": true") {
        let usage = contains(&body, b"include_usage");
        let stream = PacedSse::new(behavior.deltas, behavior.delta_gap, usage);
        let mut response = Response::new(http_body_util::Either::Right(stream));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        return Ok(response);
    }
    Ok(json(StatusCode::OK, COMPLETION))
}

fn json(status: StatusCode, body: &'static str) -> Response<MockBody> {
    let mut response = Response::new(http_body_util::Either::Left(http_body_util::Full::new(
        Bytes::from_static(body.as_bytes()),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1764547200,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"This is a benchmark answer of about twenty tokens, the same for every request."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":20,"total_tokens":270}}"#;
const UPSTREAM_ERROR: &str =
    r#"{"error":{"message":"injected failure","type":"server_error","code":null}}"#;
const NOT_FOUND: &str =
    r#"{"error":{"message":"not found","type":"invalid_request_error","code":null}}"#;
const DELTA: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1764547200,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"},\"finish_reason\":null}]}\n\n";
const FINISH: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1764547200,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
const USAGE: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1764547200,\"model\":\"bench-model\",\"choices\":[],\"usage\":{\"prompt_tokens\":250,\"completion_tokens\":64,\"total_tokens\":314}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

/// An SSE answer: `deltas` content chunks `gap` apart, then the finish chunk, the usage chunk if
/// asked for, and `[DONE]`. Paced by a timer in the body itself, so no task per stream.
#[derive(Debug)]
pub struct PacedSse {
    remaining: u32,
    gap: Duration,
    usage: bool,
    sleep: Option<Pin<Box<Sleep>>>,
    finished: bool,
}

impl PacedSse {
    fn new(deltas: u32, gap: Duration, usage: bool) -> PacedSse {
        PacedSse {
            remaining: deltas,
            gap,
            usage,
            sleep: None,
            finished: false,
        }
    }
}

impl Body for PacedSse {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if self.remaining == 0 {
            self.finished = true;
            let tail = if self.usage {
                [FINISH, USAGE, DONE].concat()
            } else {
                [FINISH, DONE].concat()
            };
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
        }
        if !self.gap.is_zero() {
            let gap = self.gap;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let next = tokio::time::Instant::now() + gap;
            sleep.as_mut().reset(next);
        }
        self.remaining -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(DELTA.as_bytes())))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_paced_stream_ends_with_done_and_usage_when_asked() {
        let body = PacedSse::new(3, Duration::from_millis(1), true);
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(text.matches("\"tok \"").count(), 3);
        assert!(text.contains("\"usage\""));
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
}
