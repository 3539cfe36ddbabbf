//! A scriptable mock LLM provider (OpenAI, Azure OpenAI, Anthropic wire formats) served over real HTTP.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// The upstream API key the mock accepts unless told otherwise.
pub const DEFAULT_UPSTREAM_KEY: &str = "sk-upstream-test";

/// Fixed `created` timestamp so responses are byte-for-byte reproducible.
const CREATED: u64 = 1_700_000_000;

/// Number of floats in every mock embedding vector.
pub const EMBEDDING_DIMS: usize = 8;

type RespBody = BoxBody<Bytes, io::Error>;

/// A one-shot behaviour applied to the next request the mock receives (FIFO, any path).
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status; `body: None` gives the provider's usual error JSON.
    Status {
        status: u16,
        body: Option<String>,
        headers: Vec<(String, String)>,
    },
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Delay the response head (and so the first byte / first chunk), then answer normally.
    SlowFirstByte(Duration),
    /// Send `after_chunks` body frames, then abort the connection (no `[DONE]`, no terminating chunk).
    CutStream { after_chunks: usize },
    /// Send `after_chunks` body frames, go silent for `stall`, then carry on.
    StallStream {
        after_chunks: usize,
        stall: Duration,
    },
    /// Answer 200 with exactly this JSON body (scripted tool calls and the like).
    Reply(Value),
    /// Answer 200 `text/event-stream` with exactly these frames, each sent as its own body frame
    /// (each string is a complete SSE frame, e.g. from [`sse_data`]).
    ReplySse(Vec<String>),
    /// Never answer; the request stays open until the client gives up.
    Hang,
}

impl Fault {
    /// A status fault with the default error body and no extra headers.
    pub fn status(status: u16) -> Fault {
        Fault::Status {
            status,
            body: None,
            headers: Vec::new(),
        }
    }

    /// A 429 with a `retry-after` header.
    pub fn rate_limited(retry_after_secs: u64) -> Fault {
        Fault::Status {
            status: 429,
            body: None,
            headers: vec![("retry-after".to_owned(), retry_after_secs.to_string())],
        }
    }
}

/// One request as the mock saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The parsed JSON body, or `Null` when the body was not JSON.
    pub body: Value,
    pub raw_body: Bytes,
}

impl RecordedRequest {
    /// A header's value as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Debug)]
struct State {
    faults: VecDeque<Fault>,
    delay_per_chunk: Duration,
    default_status: Option<u16>,
    api_key: String,
    requests: Vec<RecordedRequest>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    cancelled_streams: AtomicUsize,
    completed_streams: AtomicUsize,
    connections: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test must not turn every later assertion into a poison error.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Owns the accept loop; aborting it also aborts every connection it spawned.
#[derive(Debug)]
struct ServerTask(Mutex<Option<JoinHandle<()>>>);

impl ServerTask {
    fn abort(&self) {
        if let Some(task) = self.0.lock().unwrap_or_else(PoisonError::into_inner).take() {
            task.abort();
        }
    }
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Handle to a running mock upstream; clones share the same server and state.
#[derive(Debug, Clone)]
pub struct MockUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Arc<ServerTask>,
}

impl MockUpstream {
    /// Start a mock on 127.0.0.1:<free port> that expects [`DEFAULT_UPSTREAM_KEY`].
    pub async fn start() -> MockUpstream {
        MockUpstream::start_with_key(DEFAULT_UPSTREAM_KEY).await
    }

    /// Start a mock that expects `api_key` from its clients.
    pub async fn start_with_key(api_key: &str) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock upstream on 127.0.0.1:0");
        let addr = listener.local_addr().expect("mock upstream local address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                faults: VecDeque::new(),
                delay_per_chunk: Duration::ZERO,
                default_status: None,
                api_key: api_key.to_owned(),
                requests: Vec::new(),
            }),
            cancelled_streams: AtomicUsize::new(0),
            completed_streams: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
        });
        let task = tokio::spawn(serve(listener, Arc::clone(&shared)));
        MockUpstream {
            shared,
            addr,
            server: Arc::new(ServerTask(Mutex::new(Some(task)))),
        }
    }

    /// Base URL, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queue a one-shot behaviour for the next request that has none yet.
    pub fn push_fault(&self, fault: Fault) {
        self.shared.lock().faults.push_back(fault);
    }

    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.lock().faults.extend(faults);
    }

    /// Faults queued but not yet consumed by a request.
    pub fn pending_faults(&self) -> usize {
        self.shared.lock().faults.len()
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Pause between consecutive streamed frames (zero = as fast as possible).
    pub fn set_delay_per_chunk(&self, delay: Duration) {
        self.shared.lock().delay_per_chunk = delay;
    }

    /// When set, every request without a queued fault fails with this status ("upstream is down").
    pub fn set_default_status(&self, status: Option<u16>) {
        self.shared.lock().default_status = status;
    }

    pub fn set_api_key(&self, api_key: &str) {
        api_key.clone_into(&mut self.shared.lock().api_key);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.lock().requests.last().cloned()
    }

    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Streams abandoned because the client (the gateway) went away before the end.
    pub fn cancelled_streams(&self) -> usize {
        self.shared.cancelled_streams.load(Ordering::SeqCst)
    }

    /// Streams whose every frame was handed to the connection.
    pub fn completed_streams(&self) -> usize {
        self.shared.completed_streams.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far (to observe connection reuse).
    pub fn connection_count(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Stop listening and drop every open connection (new connections are refused).
    pub fn stop(&self) {
        self.server.abort();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Connections live in this set so that aborting the accept loop tears them down too.
    let mut connections = JoinSet::new();
    loop {
        let accepted = listener.accept().await;
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Transient (e.g. out of file descriptors): back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Streamed frames must leave as soon as they are written, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// How the transport misbehaves for one response.
#[derive(Debug, Clone, Copy)]
enum Plan {
    Normal,
    Cut(usize),
    Stall(usize, Duration),
}

/// What a route decided to answer, before transport faults are applied.
#[derive(Debug)]
enum Outcome {
    Json(u16, Value),
    Sse(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

#[derive(Debug)]
enum Route {
    OpenAi(Endpoint),
    Azure {
        deployment: String,
        endpoint: Endpoint,
    },
    Anthropic,
    Unknown,
}

impl Route {
    fn parse(path: &str) -> Route {
        let endpoint = |tail: &str| match tail {
            "chat/completions" => Some(Endpoint::Chat),
            "completions" => Some(Endpoint::Completions),
            "embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        };
        if path == "/v1/messages" {
            return Route::Anthropic;
        }
        if let Some(tail) = path.strip_prefix("/v1/") {
            return endpoint(tail).map_or(Route::Unknown, Route::OpenAi);
        }
        if let Some(rest) = path.strip_prefix("/openai/deployments/") {
            if let Some((deployment, tail)) = rest.split_once('/') {
                if let Some(endpoint) = endpoint(tail) {
                    return Route::Azure {
                        deployment: deployment.to_owned(),
                        endpoint,
                    };
                }
            }
        }
        Route::Unknown
    }

    fn is_anthropic(&self) -> bool {
        matches!(self, Route::Anthropic)
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let raw = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let json_body = serde_json::from_slice::<Value>(&raw).unwrap_or(Value::Null);
    let route = Route::parse(parts.uri.path());

    // Record and take the fault under one lock so log order and fault order agree.
    let (fault, delay_per_chunk, default_status, api_key) = {
        let mut state = shared.lock();
        state.requests.push(RecordedRequest {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts.headers.clone(),
            body: json_body.clone(),
            raw_body: raw,
        });
        (
            state.faults.pop_front(),
            state.delay_per_chunk,
            state.default_status,
            state.api_key.clone(),
        )
    };

    let mut plan = Plan::Normal;
    match fault {
        None => {}
        Some(Fault::Hang) => return std::future::pending().await,
        Some(Fault::Status {
            status,
            body,
            headers,
        }) => return status_response(&route, status, body, &headers),
        Some(Fault::Reply(value)) => return json_response(200, &value),
        Some(Fault::ReplySse(frames)) => {
            return stream_response(&shared, 200, frames, Plan::Normal, delay_per_chunk)
        }
        Some(Fault::Delay(d) | Fault::SlowFirstByte(d)) => tokio::time::sleep(d).await,
        Some(Fault::CutStream { after_chunks }) => plan = Plan::Cut(after_chunks),
        Some(Fault::StallStream {
            after_chunks,
            stall,
        }) => plan = Plan::Stall(after_chunks, stall),
    }
    if let Some(status) = default_status {
        return status_response(&route, status, None, &[]);
    }

    let request = Req {
        method: &parts.method,
        headers: &parts.headers,
        query: parts.uri.query(),
        body: &json_body,
        api_key: &api_key,
    };
    match respond(&route, &request) {
        Outcome::Sse(frames) => stream_response(&shared, 200, frames, plan, delay_per_chunk),
        Outcome::Json(status, value) => match plan {
            Plan::Normal => json_response(status, &value),
            // A non-streaming body can still be cut or stalled half way through.
            Plan::Cut(_) | Plan::Stall(..) => {
                let text = value.to_string();
                let mut mid = text.len() / 2;
                while !text.is_char_boundary(mid) {
                    mid -= 1;
                }
                let frames = vec![text[..mid].to_owned(), text[mid..].to_owned()];
                let mut response = stream_response(&shared, status, frames, plan, delay_per_chunk);
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                response
            }
        },
    }
}

/// The parts of a request a route needs to decide its answer.
#[derive(Debug)]
struct Req<'a> {
    method: &'a Method,
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    body: &'a Value,
    api_key: &'a str,
}

impl Req<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn stream(&self) -> bool {
        self.body
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    fn include_usage(&self) -> bool {
        self.body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    fn model_or(&self, fallback: &str) -> String {
        self.body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(fallback)
            .to_owned()
    }
}

fn respond(route: &Route, req: &Req<'_>) -> Outcome {
    if matches!(route, Route::Unknown) {
        return openai_error(
            404,
            "mock upstream: unknown path",
            "invalid_request_error",
            None,
        );
    }
    if *req.method != Method::POST {
        return if route.is_anthropic() {
            anthropic_error(405, "invalid_request_error", "method not allowed")
        } else {
            openai_error(405, "method not allowed", "invalid_request_error", None)
        };
    }
    match route {
        Route::OpenAi(endpoint) => {
            let expected = format!("Bearer {}", req.api_key);
            if req.header("authorization") != Some(expected.as_str()) {
                return openai_error(
                    401,
                    "Incorrect API key provided.",
                    "invalid_request_error",
                    Some("invalid_api_key"),
                );
            }
            if req.body.is_null() {
                return openai_error(
                    400,
                    "We could not parse the JSON body of your request.",
                    "invalid_request_error",
                    None,
                );
            }
            if req.body.get("model").and_then(Value::as_str).is_none() {
                return openai_error(
                    400,
                    "you must provide a model parameter",
                    "invalid_request_error",
                    None,
                );
            }
            openai_endpoint(*endpoint, req, "")
        }
        Route::Azure {
            deployment,
            endpoint,
        } => {
            if req.header("api-key") != Some(req.api_key) {
                return Outcome::Json(
                    401,
                    json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}}),
                );
            }
            let has_version = req
                .query
                .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("api-version=")));
            if !has_version {
                return Outcome::Json(
                    404,
                    json!({"error": {"code": "404", "message": "Resource not found"}}),
                );
            }
            if req.body.is_null() {
                return openai_error(
                    400,
                    "We could not parse the JSON body of your request.",
                    "invalid_request_error",
                    None,
                );
            }
            openai_endpoint(*endpoint, req, deployment)
        }
        Route::Anthropic => anthropic_messages(req),
        Route::Unknown => openai_error(
            404,
            "mock upstream: unknown path",
            "invalid_request_error",
            None,
        ),
    }
}

fn openai_endpoint(endpoint: Endpoint, req: &Req<'_>, model_fallback: &str) -> Outcome {
    let model = req.model_or(model_fallback);
    match endpoint {
        Endpoint::Chat => openai_chat(req, &model),
        Endpoint::Completions => openai_completions(req, &model),
        Endpoint::Embeddings => openai_embeddings(req, &model),
    }
}

fn openai_chat(req: &Req<'_>, model: &str) -> Outcome {
    let Some(messages) = req.body.get("messages").and_then(Value::as_array) else {
        return openai_error(
            400,
            "'messages' is a required property",
            "invalid_request_error",
            Some("messages"),
        );
    };
    let prompt_tokens: usize = messages
        .iter()
        .map(|m| word_count(&text_of(m.get("content").unwrap_or(&Value::Null))))
        .sum();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| text_of(m.get("content").unwrap_or(&Value::Null)))
        .unwrap_or_default();
    let reply = format!("echo: {last_user}");
    let completion_tokens = word_count(&reply);
    let usage = usage_json(prompt_tokens, completion_tokens);

    if !req.stream() {
        return Outcome::Json(
            200,
            json!({
                "id": "chatcmpl-mock",
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop",
                    "logprobs": null
                }],
                "usage": usage,
                "system_fingerprint": "fp_mock"
            }),
        );
    }

    let include_usage = req.include_usage();
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        });
        if include_usage {
            // OpenAI sends `usage: null` on every chunk but the last when usage is requested.
            c["usage"] = Value::Null;
        }
        sse_data(&c)
    };
    let mut frames = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    frames.extend(
        split_words(&reply)
            .into_iter()
            .map(|piece| chunk(json!({"content": piece}), Value::Null)),
    );
    frames.push(chunk(json!({}), json!("stop")));
    if include_usage {
        frames.push(sse_data(&json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [],
            "usage": usage
        })));
    }
    frames.push(SSE_DONE.to_owned());
    Outcome::Sse(frames)
}

fn openai_completions(req: &Req<'_>, model: &str) -> Outcome {
    let prompts: Vec<String> = match req.body.get("prompt") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => {
            return openai_error(
                400,
                "'prompt' must be a string or an array of strings",
                "invalid_request_error",
                Some("prompt"),
            )
        }
    };
    let replies: Vec<String> = prompts.iter().map(|p| format!("echo: {p}")).collect();
    let prompt_tokens = prompts.iter().map(|p| word_count(p)).sum();
    let completion_tokens = replies.iter().map(|r| word_count(r)).sum();
    let usage = usage_json(prompt_tokens, completion_tokens);

    if !req.stream() {
        let choices: Vec<Value> = replies
            .iter()
            .enumerate()
            .map(|(i, text)| json!({"text": text, "index": i, "logprobs": null, "finish_reason": "stop"}))
            .collect();
        return Outcome::Json(
            200,
            json!({
                "id": "cmpl-mock",
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": choices,
                "usage": usage
            }),
        );
    }

    let include_usage = req.include_usage();
    let chunk = |index: usize, text: &str, finish: Value| {
        let mut c = json!({
            "id": "cmpl-mock",
            "object": "text_completion",
            "created": CREATED,
            "model": model,
            "choices": [{"text": text, "index": index, "logprobs": null, "finish_reason": finish}]
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        sse_data(&c)
    };
    let mut frames = Vec::new();
    for (index, reply) in replies.iter().enumerate() {
        frames.extend(
            split_words(reply)
                .iter()
                .map(|piece| chunk(index, piece, Value::Null)),
        );
        frames.push(chunk(index, "", json!("stop")));
    }
    if include_usage {
        frames.push(sse_data(&json!({
            "id": "cmpl-mock",
            "object": "text_completion",
            "created": CREATED,
            "model": model,
            "choices": [],
            "usage": usage
        })));
    }
    frames.push(SSE_DONE.to_owned());
    Outcome::Sse(frames)
}

fn openai_embeddings(req: &Req<'_>, model: &str) -> Outcome {
    // Each input becomes (text to hash, token count).
    let inputs: Vec<(String, usize)> = match req.body.get("input") {
        Some(Value::String(s)) => vec![(s.clone(), word_count(s))],
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
            vec![(Value::Array(items.clone()).to_string(), items.len())]
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut inputs = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => inputs.push((s.clone(), word_count(s))),
                    Value::Array(tokens) if tokens.iter().all(Value::is_number) => {
                        inputs.push((item.to_string(), tokens.len()));
                    }
                    _ => return invalid_embedding_input(),
                }
            }
            inputs
        }
        _ => return invalid_embedding_input(),
    };
    let base64 = req.body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, (text, _))| {
            let vector = mock_embedding(text);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector
                    .iter()
                    .flat_map(|x| (*x as f32).to_le_bytes())
                    .collect();
                json!(base64_encode(&bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens: usize = inputs.iter().map(|(_, n)| n).sum();
    Outcome::Json(
        200,
        json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
        }),
    )
}

fn invalid_embedding_input() -> Outcome {
    openai_error(
        400,
        "'input' must be a string, an array of strings, or an array of token arrays",
        "invalid_request_error",
        Some("input"),
    )
}

fn anthropic_messages(req: &Req<'_>) -> Outcome {
    if req.header("x-api-key") != Some(req.api_key) {
        return anthropic_error(401, "authentication_error", "invalid x-api-key");
    }
    if req.header("anthropic-version").is_none() {
        return anthropic_error(
            400,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    let body = req.body;
    if body.is_null() {
        return anthropic_error(
            400,
            "invalid_request_error",
            "request body is not valid JSON",
        );
    }
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return anthropic_error(400, "invalid_request_error", "model: Field required");
    };
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return anthropic_error(400, "invalid_request_error", "messages: Field required");
    };
    // The real API rejects requests without max_tokens; catching that here catches translation bugs.
    if body.get("max_tokens").and_then(Value::as_u64).is_none() {
        return anthropic_error(400, "invalid_request_error", "max_tokens: Field required");
    }
    let system_tokens = word_count(&text_of(body.get("system").unwrap_or(&Value::Null)));
    let input_tokens: usize = system_tokens
        + messages
            .iter()
            .map(|m| word_count(&text_of(m.get("content").unwrap_or(&Value::Null))))
            .sum::<usize>();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| text_of(m.get("content").unwrap_or(&Value::Null)))
        .unwrap_or_default();
    let reply = format!("echo: {last_user}");
    let output_tokens = word_count(&reply);

    if !req.stream() {
        return Outcome::Json(
            200,
            json!({
                "id": "msg_mock",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": reply}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}
            }),
        );
    }

    let mut frames = vec![
        sse_event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1}
            }}),
        ),
        sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        // The real API interleaves pings; a client must tolerate them.
        sse_event("ping", &json!({"type": "ping"})),
    ];
    frames.extend(split_words(&reply).into_iter().map(|piece| {
        sse_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
        )
    }));
    frames.push(sse_event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    frames.push(sse_event(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": output_tokens}}),
    ));
    frames.push(sse_event("message_stop", &json!({"type": "message_stop"})));
    Outcome::Sse(frames)
}

/// The final OpenAI stream frame.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// One `data:` SSE frame carrying `value`.
pub fn sse_data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// One named SSE frame (`event:` + `data:`), as Anthropic sends them.
pub fn sse_event(name: &str, value: &Value) -> String {
    format!("event: {name}\ndata: {value}\n\n")
}

/// A non-streaming OpenAI chat response whose assistant message is one tool call.
pub fn openai_tool_call_response(model: &str, name: &str, arguments: &Value) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "id": "call_mock",
                    "type": "function",
                    "function": {"name": name, "arguments": arguments.to_string()}
                }]
            },
            "finish_reason": "tool_calls",
            "logprobs": null
        }],
        "usage": usage_json(10, 5),
        "system_fingerprint": "fp_mock"
    })
}

/// A non-streaming Anthropic Messages response that asks for one tool call.
pub fn anthropic_tool_use_response(model: &str, name: &str, input: &Value) -> Value {
    json!({
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "tool_use", "id": "toolu_mock", "name": name, "input": input}],
        "stop_reason": "tool_use",
        "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 5}
    })
}

/// The deterministic vector the mock returns for `text` (values are multiples of 1/1024,
/// exact in both f32 and f64, so tests can compare with `==`).
pub fn mock_embedding(text: &str) -> Vec<f64> {
    // FNV-1a over the text, then a per-dimension mix so dimensions differ.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0..EMBEDDING_DIMS as u64)
        .map(|i| {
            let mut x = hash ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^= x >> 33;
            x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
            x ^= x >> 33;
            ((x % 2049) as f64 - 1024.0) / 1024.0
        })
        .collect()
}

/// Text content of a chat message: a plain string, or the `text` parts of a content array.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

/// Split into streaming pieces, one per word, each keeping its leading space.
fn split_words(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    for ch in text.chars() {
        if ch == ' ' && !current.is_empty() && !current.ends_with(' ') {
            pieces.push(std::mem::take(&mut current));
        }
        current.push(ch);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens
    })
}

fn openai_error(status: u16, message: &str, kind: &str, code: Option<&str>) -> Outcome {
    Outcome::Json(status, openai_error_body(message, kind, code))
}

fn openai_error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

fn anthropic_error(status: u16, kind: &str, message: &str) -> Outcome {
    Outcome::Json(status, anthropic_error_body(kind, message))
}

fn anthropic_error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// The error body a real provider would send for `status`, in the route's wire format.
fn default_error_body(route: &Route, status: u16) -> Value {
    let message = format!("mock upstream error {status}");
    if route.is_anthropic() {
        let kind = match status {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            _ => "api_error",
        };
        return anthropic_error_body(kind, &message);
    }
    let (kind, code) = match status {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("invalid_request_error", None),
    };
    openai_error_body(&message, kind, code)
}

fn status_response(
    route: &Route,
    status: u16,
    body: Option<String>,
    headers: &[(String, String)],
) -> Response<RespBody> {
    let mut response = match body {
        Some(text) => {
            let content_type = if serde_json::from_str::<Value>(&text).is_ok() {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            };
            full_response(status, content_type, Bytes::from(text))
        }
        None => json_response(status, &default_error_body(route, status)),
    };
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("fault header name is valid");
        let value = HeaderValue::from_str(value).expect("fault header value is valid");
        response.headers_mut().insert(name, value);
    }
    response
}

fn json_response(status: u16, value: &Value) -> Response<RespBody> {
    full_response(status, "application/json", Bytes::from(value.to_string()))
}

fn full_response(status: u16, content_type: &'static str, body: Bytes) -> Response<RespBody> {
    let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *response.status_mut() = status_code(status);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).expect("fault status is a valid HTTP status code (100-999)")
}

/// A response whose body frames are produced by a task, one HTTP body frame per `frames` entry.
fn stream_response(
    shared: &Arc<Shared>,
    status: u16,
    frames: Vec<String>,
    plan: Plan,
    delay_per_chunk: Duration,
) -> Response<RespBody> {
    // Capacity 1: the producer stays at most one frame ahead of the socket, so pacing is real.
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(pump(Arc::clone(shared), tx, frames, plan, delay_per_chunk));
    let mut response = Response::new(ChannelBody { rx }.boxed());
    *response.status_mut() = status_code(status);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn pump(
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    frames: Vec<String>,
    plan: Plan,
    delay_per_chunk: Duration,
) {
    // Never let a cut or stall land after the final frame: the point is an unfinished stream.
    let last = frames.len().saturating_sub(1);
    let cancelled = || {
        shared.cancelled_streams.fetch_add(1, Ordering::SeqCst);
    };
    for (index, frame) in frames.into_iter().enumerate() {
        if matches!(plan, Plan::Cut(after) if after.min(last) == index) {
            // Let hyper flush the frames already sent before the connection is torn down.
            if index > 0 && !idle(&tx, Duration::from_millis(50)).await {
                cancelled();
                return;
            }
            let _ = tx
                .send(Err(io::Error::other("mock upstream cut the stream")))
                .await;
            return;
        }
        // Pause before this frame: the usual pacing, plus the stall if it falls here.
        let pacing = if index > 0 {
            delay_per_chunk
        } else {
            Duration::ZERO
        };
        let stall = match plan {
            Plan::Stall(after, stall) if after.min(last) == index => stall,
            _ => Duration::ZERO,
        };
        let pause = pacing + stall;
        if !pause.is_zero() && !idle(&tx, pause).await {
            cancelled();
            return;
        }
        if tx.send(Ok(Bytes::from(frame))).await.is_err() {
            cancelled();
            return;
        }
    }
    shared.completed_streams.fetch_add(1, Ordering::SeqCst);
}

/// Sleep for `duration`; false if the response body was dropped (client gone) meanwhile.
async fn idle(tx: &mpsc::Sender<Result<Bytes, io::Error>>, duration: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => true,
        () = tx.closed() => false,
    }
}

/// A body fed by a channel, so each sent chunk becomes its own HTTP body frame.
#[derive(Debug)]
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|chunk| chunk.map(Frame::data)))
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b0 = u32::from(chunk[0]);
        let b1 = u32::from(chunk.get(1).copied().unwrap_or(0));
        let b2 = u32::from(chunk.get(2).copied().unwrap_or(0));
        let n = (b0 << 16) | (b1 << 8) | b2;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
