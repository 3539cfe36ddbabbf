//! A small HTTP/1.1 test client: one fresh connection per call, hard timeouts, SSE parsing.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Whole-call limit for ordinary requests: a hung gateway fails the test instead of CI.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit for reading a whole SSE stream, and for waiting on any single event.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// A fully read HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// The body parsed as JSON; panics (showing the body) when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}, body: {}",
                self.status,
                self.text()
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any (Anthropic names every event; OpenAI names none).
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// A fully read SSE response.
#[derive(Debug, Clone)]
pub struct SseResponse {
    pub status: u16,
    pub headers: HeaderMap,
    /// Each event's data payload in order, including the final `[DONE]`.
    pub events: Vec<String>,
    /// The same events with their names.
    pub frames: Vec<SseEvent>,
    /// The whole body as received (lossy UTF-8), including any unterminated tail.
    pub raw: String,
    /// Set when the body ended with a transport error (e.g. the connection was cut).
    pub error: Option<String>,
}

impl SseResponse {
    /// Every event payload that parses as JSON (skips `[DONE]`).
    pub fn json_events(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect()
    }

    /// Whether the stream ended with OpenAI's `[DONE]` sentinel.
    pub fn done(&self) -> bool {
        self.events.last().is_some_and(|e| e == "[DONE]")
    }

    /// Concatenated `choices[0].delta.content` of OpenAI chat chunks.
    pub fn content(&self) -> String {
        self.json_events()
            .iter()
            .filter_map(|e| {
                e.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A request under construction; `send`, `stream` or `open_stream` performs it.
#[derive(Debug, Clone)]
pub struct RequestBuilder {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    timeout: Duration,
}

impl RequestBuilder {
    pub fn new(method: Method, url: &str) -> RequestBuilder {
        RequestBuilder {
            method,
            url: url.to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn get(url: &str) -> RequestBuilder {
        RequestBuilder::new(Method::GET, url)
    }

    pub fn post(url: &str) -> RequestBuilder {
        RequestBuilder::new(Method::POST, url)
    }

    /// Add `authorization: Bearer <key>` when a key is given.
    pub fn key(self, key: Option<&str>) -> RequestBuilder {
        match key {
            Some(key) => self.header(AUTHORIZATION.as_str(), &format!("Bearer {key}")),
            None => self,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> RequestBuilder {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn json(self, body: &Value) -> RequestBuilder {
        self.body("application/json", body.to_string())
    }

    pub fn body(mut self, content_type: &str, body: impl Into<Bytes>) -> RequestBuilder {
        self.body = body.into();
        self.header(CONTENT_TYPE.as_str(), content_type)
    }

    /// Limit for the whole call (`send`), the whole stream (`stream`) or each event (`open_stream`).
    pub fn timeout(mut self, timeout: Duration) -> RequestBuilder {
        self.timeout = timeout;
        self
    }

    /// Perform the request and read the whole body; errors (including timeouts) are returned.
    pub async fn try_send(self) -> Result<Response, String> {
        let what = format!("{} {}", self.method, self.url);
        let call = async {
            let (status, headers, body, _conn) = self.start().await?;
            let body = body
                .collect()
                .await
                .map_err(|e| format!("{what}: reading body: {e}"))?
                .to_bytes();
            Ok(Response {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| format!("{what}: timed out after {:?}", self.timeout))?
    }

    /// Perform the request and read the whole body; panics on transport errors and timeouts.
    pub async fn send(self) -> Response {
        self.try_send().await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Perform the request and read the SSE body to its end (a cut stream is reported in
    /// `error`, not a panic); panics if the whole exchange takes longer than the timeout.
    pub async fn stream(self) -> SseResponse {
        let what = format!("{} {}", self.method, self.url);
        let limit = self.timeout.max(STREAM_TIMEOUT);
        let call = async {
            let mut stream = self.open_stream().await;
            while stream.read_event().await.is_some() {}
            stream.into_response()
        };
        tokio::time::timeout(limit, call)
            .await
            .unwrap_or_else(|_| panic!("{what}: SSE stream not finished after {limit:?}"))
    }

    /// Perform the request and return once the response head has arrived; events are then read
    /// one by one. Dropping the returned stream closes the connection.
    pub async fn open_stream(self) -> SseStream {
        let what = format!("{} {}", self.method, self.url);
        let limit = self.timeout.max(STREAM_TIMEOUT);
        let (status, headers, body, conn) = tokio::time::timeout(limit, self.start())
            .await
            .unwrap_or_else(|_| panic!("{what}: no response head after {limit:?}"))
            .unwrap_or_else(|e| panic!("{e}"));
        SseStream {
            status,
            headers,
            body,
            parser: SseParser::default(),
            ended: false,
            error: None,
            event_timeout: limit,
            what,
            _conn: conn,
        }
    }

    /// Connect, send, and wait for the response head.
    async fn start(&self) -> Result<(u16, HeaderMap, Incoming, ConnGuard), String> {
        let what = format!("{} {}", self.method, self.url);
        let uri: Uri = self
            .url
            .parse()
            .map_err(|e| format!("{what}: bad URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{what}: only http:// URLs are supported"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{what}: URL has no host"))?
            .clone();
        let port = authority.port_u16().unwrap_or(80);
        let stream = TcpStream::connect((authority.host(), port))
            .await
            .map_err(|e| format!("{what}: connect: {e}"))?;
        // Small request/response exchanges and SSE events should not wait for Nagle.
        stream
            .set_nodelay(true)
            .map_err(|e| format!("{what}: TCP_NODELAY: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{what}: handshake: {e}"))?;
        let conn = ConnGuard(tokio::spawn(async move {
            let _ = connection.await;
        }));

        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut request = Request::builder()
            .method(self.method.clone())
            .uri(path)
            .header(HOST, authority.as_str());
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request
            .body(Full::new(self.body.clone()))
            .map_err(|e| format!("{what}: building request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        let (parts, body) = response.into_parts();
        Ok((parts.status.as_u16(), parts.headers, body, conn))
    }
}

/// `GET url` with an optional bearer key.
pub async fn get(url: &str, key: Option<&str>) -> Response {
    RequestBuilder::get(url).key(key).send().await
}

/// `POST url` with a JSON body and an optional bearer key.
pub async fn post_json(url: &str, key: Option<&str>, body: &Value) -> Response {
    RequestBuilder::post(url).key(key).json(body).send().await
}

/// `POST url` with arbitrary bytes (invalid JSON, oversize bodies, other content types).
pub async fn post_raw(
    url: &str,
    key: Option<&str>,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response {
    RequestBuilder::post(url)
        .key(key)
        .body(content_type, body)
        .send()
        .await
}

/// `POST url` with a JSON body and read the SSE response to its end.
pub async fn stream_sse(url: &str, key: Option<&str>, body: &Value) -> SseResponse {
    RequestBuilder::post(url).key(key).json(body).stream().await
}

/// `POST url` with a JSON body; read events with [`SseStream::next_event`], drop to disconnect.
pub async fn open_stream(url: &str, key: Option<&str>, body: &Value) -> SseStream {
    RequestBuilder::post(url)
        .key(key)
        .json(body)
        .open_stream()
        .await
}

/// Returned by [`SseStream::next_event_within`] when no event arrived in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

/// An SSE response being read incrementally. Dropping it closes the connection.
#[derive(Debug)]
pub struct SseStream {
    pub status: u16,
    pub headers: HeaderMap,
    body: Incoming,
    parser: SseParser,
    ended: bool,
    error: Option<String>,
    event_timeout: Duration,
    what: String,
    _conn: ConnGuard,
}

impl SseStream {
    /// The next event's data; `None` once the body has ended (cleanly or not).
    /// Panics if no event arrives within the stream's timeout.
    pub async fn next_event(&mut self) -> Option<String> {
        self.next_frame().await.map(|f| f.data)
    }

    /// Like [`SseStream::next_event`], with the event name.
    pub async fn next_frame(&mut self) -> Option<SseEvent> {
        let limit = self.event_timeout;
        match tokio::time::timeout(limit, self.read_event()).await {
            Ok(event) => event,
            Err(_) => panic!(
                "{}: no SSE event within {limit:?}; received so far: {:?}",
                self.what,
                self.parser.raw_text()
            ),
        }
    }

    /// The next event's data, or `Err(TimedOut)` if none arrives within `limit` (nothing is lost:
    /// a later call picks up where this one stopped).
    pub async fn next_event_within(&mut self, limit: Duration) -> Result<Option<String>, TimedOut> {
        tokio::time::timeout(limit, self.read_event())
            .await
            .map(|e| e.map(|f| f.data))
            .map_err(|_| TimedOut)
    }

    pub fn set_timeout(&mut self, limit: Duration) {
        self.event_timeout = limit;
    }

    /// Whether the body has ended.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The transport error the body ended with, if any.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Everything received so far.
    pub fn raw(&self) -> String {
        self.parser.raw_text()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Read the rest of the stream (bounded by [`STREAM_TIMEOUT`] overall).
    pub async fn collect(mut self) -> SseResponse {
        let what = self.what.clone();
        let drained = tokio::time::timeout(STREAM_TIMEOUT, async {
            while self.read_event().await.is_some() {}
            self
        })
        .await;
        drained
            .unwrap_or_else(|_| panic!("{what}: SSE stream not finished after {STREAM_TIMEOUT:?}"))
            .into_response()
    }

    /// Cancel-safe: all state lives in `self`, and polling a body frame loses nothing.
    async fn read_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.parser.pop() {
                return Some(event);
            }
            if self.ended {
                return None;
            }
            match self.body.frame().await {
                None => self.ended = true,
                Some(Err(e)) => {
                    self.ended = true;
                    self.error = Some(e.to_string());
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.parser.push(&data);
                    }
                }
            }
        }
    }

    fn into_response(self) -> SseResponse {
        let frames = self.parser.dispatched.clone();
        SseResponse {
            status: self.status,
            headers: self.headers,
            events: frames.iter().map(|f| f.data.clone()).collect(),
            frames,
            raw: self.parser.raw_text(),
            error: self.error,
        }
    }
}

/// Incremental SSE parser (per the WHATWG rules the tests care about; unterminated events are
/// not dispatched, so a stream missing its final blank line is visible as a lost event).
#[derive(Debug, Default)]
struct SseParser {
    raw: Vec<u8>,
    pending: Vec<u8>,
    ready: VecDeque<SseEvent>,
    dispatched: Vec<SseEvent>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
        // CRLF and LF line endings both occur in the wild; normalise to LF.
        self.pending
            .extend(bytes.iter().copied().filter(|&b| b != b'\r'));
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.pending.drain(..end + 2).collect();
            if let Some(event) = parse_block(&String::from_utf8_lossy(&block[..end])) {
                self.ready.push_back(event);
            }
        }
    }

    fn pop(&mut self) -> Option<SseEvent> {
        let event = self.ready.pop_front()?;
        self.dispatched.push(event.clone());
        Some(event)
    }

    fn raw_text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

fn parse_block(block: &str) -> Option<SseEvent> {
    let mut event = None;
    let mut data: Vec<&str> = Vec::new();
    for line in block.split('\n') {
        if line.is_empty() || line.starts_with(':') {
            continue; // comments (keep-alives) carry nothing
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() {
        return None;
    }
    Some(SseEvent {
        event,
        data: data.join("\n"),
    })
}

/// Owns the connection task; dropping it closes the TCP connection.
#[derive(Debug)]
struct ConnGuard(JoinHandle<()>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
