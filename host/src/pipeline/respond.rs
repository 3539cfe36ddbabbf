//! Stage 6: shape the upstream's answer for the client: the client's model name, usage and cost,
//! the `x-portcullis-*` headers, and SSE framing for streams.
//!
//! **The client's model name comes back unchanged**, whatever deployment answered.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use serde_json::Value;

use crate::call::{Call, Outcome};
use crate::error::GatewayError;
use crate::generation::Generation;
use crate::json;
use crate::openai;
use crate::pipeline::guardrails::StreamGuards;
use crate::pipeline::post_call::Charging;
use crate::pipeline::route::{Answer, Routed};
use crate::providers::{ChunkStream, Endpoint, JsonObject, RelayedObject};
use crate::router::{Deployment, InFlight};
use crate::sse;

/// Every response body the gateway sends.
pub type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

pub fn full_body(bytes: Bytes) -> ResponseBody {
    Full::new(bytes).boxed_unsync()
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, APPLICATION_JSON);
    response
}

const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The OpenAI error body for `err`, with its status and retry headers.
pub fn error_response(err: &GatewayError, call_id: Option<&str>) -> Response<ResponseBody> {
    let mut response = json_response(err.status(), err.body());
    let headers = response.headers_mut();
    for (name, value) in err.retry_headers() {
        headers.insert(name, value);
    }
    if let Some(id) = call_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert(CALL_ID, id);
    }
    response
}

const CALL_ID: HeaderName = HeaderName::from_static("x-portcullis-call-id");

/// Builds the client's response from the upstream's answer. `guards` check a stream's text on
/// its way to the client.
pub async fn respond(
    generation: Arc<Generation>,
    call: Call,
    routed: Routed,
    include_usage: bool,
    guards: Option<StreamGuards>,
) -> Response<ResponseBody> {
    let Routed {
        deployment,
        in_flight,
        answer,
    } = routed;
    match answer {
        Answer::Whole(answer) => {
            // Usage was taken when the answer arrived (pipeline::take_usage).
            let body = Bytes::from(answer.into_body(&call.requested_model));
            let mut response = Response::new(full_body(body));
            // The headers first, into a map still empty: sized once, never rehashed.
            add_headers(&mut response, &call, &deployment, Some(call.cost));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, APPLICATION_JSON);
            drop(in_flight);
            // Charged before the client has the answer: its next request sees the spend.
            super::post_call::finish(&generation, call, Outcome::Success)
                .landed()
                .await;
            response
        }
        Answer::Stream { first, rest } => {
            let mut response = Response::new(full_body(Bytes::new()));
            // Cost is known only at the end of a stream; post-call hooks receive it.
            add_headers(&mut response, &call, &deployment, None);
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            let end = StreamEnd {
                generation,
                call,
                deployment,
                in_flight,
            };
            let body = StreamBody::new(client_stream(end, first, rest, include_usage, guards));
            *response.body_mut() = BodyExt::boxed_unsync(body);
            response
        }
    }
}

fn set_model(object: &mut JsonObject, model: &str) {
    object.insert("model".into(), Value::String(model.to_owned()));
}

fn add_headers(
    response: &mut Response<ResponseBody>,
    call: &Call,
    deployment: &Deployment,
    cost: Option<f64>,
) {
    let headers = response.headers_mut();
    // One allocation for every header this adds and the two its caller adds after, instead of
    // growing at each.
    headers.reserve(12 + call.key_headers.len());
    let names = &deployment.header_values;
    for (name, value) in [
        (MODEL_ID, &names.id),
        (MODEL_GROUP, &names.group),
        (API_BASE, &names.api_base),
    ] {
        if let Some(value) = value {
            headers.insert(name, value.clone());
        }
    }
    let mut put = |name: HeaderName, value: Option<HeaderValue>| {
        if let Some(value) = value {
            headers.insert(name, value);
        }
    };
    put(CALL_ID, HeaderValue::from_str(&call.id).ok());
    if let Some(cost) = cost {
        put(RESPONSE_COST, fixed_point(cost, 10));
    }
    let milliseconds = |elapsed: std::time::Duration| elapsed.as_secs_f64() * 1000.0;
    put(
        RESPONSE_DURATION,
        fixed_point(milliseconds(call.received.elapsed()), 3),
    );
    put(
        OVERHEAD_DURATION,
        fixed_point(milliseconds(call.overhead()), 3),
    );
    // Numbers need no check, nor a string first.
    let retries = HeaderValue::from(call.attempts.saturating_sub(1));
    headers.insert(ATTEMPTED_RETRIES, retries);
    headers.insert(ATTEMPTED_FALLBACKS, HeaderValue::from(call.fallbacks));
    add_key_headers(response, call);
}

/// A stored key's rate-limit and spend headers, on success and refusal alike.
pub fn add_key_headers(response: &mut Response<ResponseBody>, call: &Call) {
    let headers = response.headers_mut();
    for (name, value) in &call.key_headers {
        headers.insert(name.clone(), value.clone());
    }
}

// Names made at compile time: `from_static` at run time checks the name against every standard
// header first.
const MODEL_ID: HeaderName = HeaderName::from_static("x-portcullis-model-id");
const MODEL_GROUP: HeaderName = HeaderName::from_static("x-portcullis-model-group");
const API_BASE: HeaderName = HeaderName::from_static("x-portcullis-api-base");
const RESPONSE_COST: HeaderName = HeaderName::from_static("x-portcullis-response-cost");
const RESPONSE_DURATION: HeaderName = HeaderName::from_static("x-portcullis-response-duration-ms");
const OVERHEAD_DURATION: HeaderName = HeaderName::from_static("x-portcullis-overhead-duration-ms");
const ATTEMPTED_RETRIES: HeaderName = HeaderName::from_static("x-portcullis-attempted-retries");
const ATTEMPTED_FALLBACKS: HeaderName = HeaderName::from_static("x-portcullis-attempted-fallbacks");

/// `value` with `decimals` (1 to 19) digits after the point, written from an integer: formatting a
/// float with a fixed precision takes the slow exact path (thousands of instructions a header),
/// and formatting the integer costs more than these few divisions.
fn fixed_point(value: f64, decimals: u32) -> Option<HeaderValue> {
    let scale = 10u64.pow(decimals);
    if !value.is_finite() || value < 0.0 || value >= (u64::MAX / scale) as f64 {
        return HeaderValue::from_str(&format!("{value:.*}", decimals as usize)).ok();
    }
    let mut scaled = (value * scale as f64).round() as u64;
    // Filled from the end: 20 digits at most, the point, and a leading zero.
    let mut text = [0u8; 24];
    let mut start = text.len();
    let mut written = 0;
    while scaled > 0 || written <= decimals {
        if written == decimals {
            start -= 1;
            text[start] = b'.';
        }
        start -= 1;
        text[start] = b'0' + (scaled % 10) as u8;
        scaled /= 10;
        written += 1;
    }
    HeaderValue::from_bytes(&text[start..]).ok()
}

/// The stream the client reads: chunks re-labelled with the client's model, usage taken on the
/// way (and hidden unless asked for), `[DONE]` at the end, an error event if the upstream breaks.
fn client_stream(
    end: StreamEnd,
    first: RelayedObject,
    rest: ChunkStream,
    include_usage: bool,
    guards: Option<StreamGuards>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    let state = StreamState {
        pending_first: Some(first),
        rest,
        include_usage,
        guards,
        template: None,
        end: Some(end),
    };
    stream::unfold(state, |mut state| async move {
        loop {
            let end = state.end.as_mut()?;
            let next = match state.pending_first.take() {
                Some(first) => Some(Ok(first)),
                None => state.rest.next().await,
            };
            match next {
                Some(Ok(mut chunk)) => {
                    if let Some(usage) = chunk.usage() {
                        end.call.set_usage(usage);
                    }
                    if !state.include_usage {
                        // Only the usage chunk itself is hidden; Azure also opens streams with a
                        // choice-less chunk (content filter results, `"usage": null`) that stays.
                        if chunk.is_usage_only() {
                            continue;
                        }
                        if let Err(e) = chunk.drop_usage() {
                            let err = not_an_object(e);
                            return Some((Ok(Frame::data(state.fail(err))), state));
                        }
                    }
                    let model = &end.call.requested_model;
                    let json = match state.guards.as_mut() {
                        // Without guardrails a chunk goes out as it came, relabelled.
                        None => chunk.into_body(model),
                        Some(guards) => {
                            // Only guardrails may need to add chunks of their own at the end.
                            if state.template.is_none() {
                                match chunk.object_mut() {
                                    Ok(object) => {
                                        let mut template = chunk_template(object);
                                        set_model(&mut template, model);
                                        state.template = Some(template);
                                    }
                                    Err(e) => {
                                        let err = not_an_object(e);
                                        return Some((Ok(Frame::data(state.fail(err))), state));
                                    }
                                }
                            }
                            // The chunk is parsed only if a guardrail changed a text of it.
                            let rewrites = match chunk.response_view() {
                                Ok(view) => guards.filter(&view.choices).await,
                                Err(e) => Err(not_an_object(e)),
                            };
                            let rewritten = rewrites.and_then(|rewrites| {
                                if !rewrites.is_empty() {
                                    let object = chunk.object_mut().map_err(not_an_object)?;
                                    for (index, text) in rewrites {
                                        openai::set_choice_text(object, index, text);
                                    }
                                }
                                Ok(chunk.into_body(model))
                            });
                            match rewritten {
                                Ok(body) => body,
                                Err(err) => return Some((Ok(Frame::data(state.fail(err))), state)),
                            }
                        }
                    };
                    return Some((Ok(Frame::data(sse::encode_data(&json))), state));
                }
                Some(Err(err)) => {
                    let err = GatewayError::from(err);
                    tracing::warn!(call_id = %end.call.id, error = %err, "upstream stream failed");
                    // What a guardrail held back was checked text: it goes out before the error.
                    let mut tail = match state.flush_guards().await {
                        Ok(tail) => tail,
                        Err(guard_err) => {
                            return Some((Ok(Frame::data(state.fail(guard_err))), state))
                        }
                    };
                    tail.extend_from_slice(&state.fail(err));
                    return Some((Ok(Frame::data(Bytes::from(tail))), state));
                }
                None => {
                    let mut tail = match state.flush_guards().await {
                        Ok(tail) => tail,
                        Err(err) => return Some((Ok(Frame::data(state.fail(err))), state)),
                    };
                    tail.extend_from_slice(sse::DONE);
                    state.finish(Outcome::Success).landed().await;
                    return Some((Ok(Frame::data(Bytes::from(tail))), state));
                }
            }
        }
    })
}

/// A chunk that needed a parse and did not survive it.
fn not_an_object(e: serde_json::Error) -> GatewayError {
    GatewayError::Upstream {
        status: StatusCode::BAD_GATEWAY,
        message: format!("the upstream sent a stream chunk that is not a JSON object: {e}"),
    }
}

struct StreamState {
    pending_first: Option<RelayedObject>,
    rest: ChunkStream,
    include_usage: bool,
    guards: Option<StreamGuards>,
    /// The first chunk's `id`, `object`, `created` and `model`, for chunks the gateway adds.
    template: Option<JsonObject>,
    /// Taken when the stream ends; still here on drop means the client went away.
    end: Option<StreamEnd>,
}

impl StreamState {
    /// Ends the stream for `err`: the call is recorded as failed, the client gets an error event.
    fn fail(&mut self, err: GatewayError) -> Bytes {
        self.finish(Outcome::Failure {
            status: err.status().as_u16(),
            message: err.to_string(),
        });
        sse::encode_data(err.to_json().to_string().as_bytes())
    }

    fn finish(&mut self, outcome: Outcome) -> Charging {
        let Some(mut end) = self.end.take() else {
            return Charging::default();
        };
        if let Some(guards) = &self.guards {
            end.call.guardrails.extend(guards.outcomes());
        }
        end.finish(outcome)
    }

    /// The SSE frames of text the guardrails still held when the upstream stream ended.
    async fn flush_guards(&mut self) -> Result<Vec<u8>, GatewayError> {
        let Some(guards) = self.guards.as_mut() else {
            return Ok(Vec::new());
        };
        let mut frames = Vec::new();
        for (index, text) in guards.flush().await? {
            let json = json::to_vec(&self.released_chunk(index, text));
            frames.extend_from_slice(&sse::encode_data(&json));
        }
        Ok(frames)
    }

    /// A chunk carrying text a guardrail released only when the stream ended.
    fn released_chunk(&self, index: u32, text: String) -> JsonObject {
        let mut chunk = self.template.clone().unwrap_or_default();
        let completions = self
            .end
            .as_ref()
            .is_some_and(|end| end.call.endpoint == Endpoint::Completions);
        let choice = if completions {
            serde_json::json!({ "index": index, "text": text, "finish_reason": null })
        } else {
            serde_json::json!({ "index": index, "delta": { "content": text }, "finish_reason": null })
        };
        chunk.insert("choices".into(), Value::Array(vec![choice]));
        chunk
    }
}

fn chunk_template(chunk: &JsonObject) -> JsonObject {
    ["id", "object", "created", "model"]
        .iter()
        .filter_map(|field| Some(((*field).to_owned(), chunk.get(*field)?.clone())))
        .collect()
}

struct StreamEnd {
    generation: Arc<Generation>,
    call: Call,
    deployment: Arc<Deployment>,
    in_flight: InFlight,
}

impl StreamEnd {
    fn finish(self, outcome: Outcome) -> Charging {
        let StreamEnd {
            generation,
            call,
            deployment,
            in_flight,
        } = self;
        if let Some(usage) = call.usage {
            deployment.record_tokens(usage.total_tokens);
        }
        drop(in_flight);
        // Before the last frame goes out, so the next request sees this stream's spend.
        super::post_call::finish(&generation, call, outcome)
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        // Dropping the upstream stream here closes its connection: the upstream stops generating.
        if let Some(end) = &self.end {
            tracing::info!(call_id = %end.call.id, "client went away mid-stream");
            self.finish(Outcome::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_matches_float_formatting() {
        for (value, decimals) in [
            (0.0, 10),
            (0.000_123_45, 10),
            (1.5, 3),
            (12.345_678, 3),
            (0.000_15, 10),
            (1_234.567_8, 1),
            (0.05, 1),
            (9.999_6, 3),
            (123.456, 10),
        ] {
            assert_eq!(
                fixed_point(value, decimals).expect("a header value"),
                format!("{value:.*}", decimals as usize),
                "{value} to {decimals}"
            );
        }
        assert_eq!(fixed_point(f64::NAN, 3).expect("a header value"), "NaN");
    }
}
