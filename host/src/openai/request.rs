//! Parses and checks a request body against its route's OpenAI schema, naming the bad field.
//!
//! The body stays a JSON object: only the fields the gateway acts on are checked and copied out, so
//! **unknown fields reach the upstream unchanged**.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde_json::Value;

use crate::error::GatewayError;
use crate::providers::{Endpoint, JsonObject, RequestBody, UnreadableBody};
use crate::tokens;

/// A request body that passed its route's checks.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub endpoint: Endpoint,
    /// The client's body as sent (less the gateway's own fields, such as `guardrails`). Cheap to
    /// clone, because plugins may read it while the call is routed.
    pub body: RequestBody,
    /// The model the client asked for: a model group's name.
    pub model: String,
    pub stream: bool,
    /// Whether the client asked for the usage chunk at the end of a stream.
    pub include_usage: bool,
    /// The body's `user`: the end user the client acts for.
    pub user: Option<String>,
    /// The body's `metadata` object.
    pub metadata: JsonObject,
    /// Guardrails the request asks for by name, besides the default ones.
    pub guardrails: Vec<String>,
    pub(super) max_output_tokens: u64,
    /// Read once, when first asked for: each plugin may ask, and so may the budget and the router.
    pub(super) derived: Derived,
}

/// The text of one message (or prompt, or embedding input), as plugins see it.
#[derive(Debug, Clone, PartialEq)]
pub struct TextView {
    pub role: String,
    pub content: String,
    pub name: Option<String>,
    /// (id, function name, arguments) of each tool call.
    pub tool_calls: Vec<(String, String, String)>,
}

/// What is read from a request's body only when first asked for: its texts
/// ([`ApiRequest::texts`]) and its prompt-size estimate. Clones share what was read, so a plugin
/// call that outlives the borrow of its `ApiRequest` reads them at most once for everyone.
#[derive(Debug, Clone, Default)]
pub struct Derived(Arc<DerivedOnce>);

#[derive(Debug, Default)]
struct DerivedOnce {
    texts: OnceLock<Result<Vec<TextView>, UnreadableBody>>,
    prompt_tokens: OnceLock<u64>,
}

impl Derived {
    /// The texts of `body`, which must be the body this was made for.
    pub fn texts(
        &self,
        endpoint: Endpoint,
        body: &RequestBody,
    ) -> Result<&[TextView], UnreadableBody> {
        match self.0.texts.get_or_init(|| read_texts(endpoint, body)) {
            Ok(texts) => Ok(texts),
            Err(e) => Err(e.clone()),
        }
    }

    /// A prompt-size estimate of `body`, for usage-aware routing and token rate limits.
    pub fn prompt_tokens(
        &self,
        endpoint: Endpoint,
        body: &RequestBody,
    ) -> Result<u64, UnreadableBody> {
        if let Some(tokens) = self.0.prompt_tokens.get() {
            return Ok(*tokens);
        }
        let tokens = match endpoint {
            // A message's text parts are joined by newlines, which the estimate counts as nothing.
            Endpoint::ChatCompletions => self
                .texts(endpoint, body)?
                .iter()
                .map(|m| tokens::estimate(&m.content) + 4)
                .sum(),
            Endpoint::Completions | Endpoint::Embeddings => {
                let body = body.object()?;
                ["prompt", "input"]
                    .iter()
                    .filter_map(|f| body.get(*f))
                    .map(|v| match v {
                        Value::String(s) => tokens::estimate(s),
                        other => tokens::estimate(&other.to_string()),
                    })
                    .sum()
            }
        };
        Ok(*self.0.prompt_tokens.get_or_init(|| tokens))
    }
}

fn read_texts(endpoint: Endpoint, body: &RequestBody) -> Result<Vec<TextView>, UnreadableBody> {
    if let Some(texts) = body.sent().and_then(|(sent, _)| {
        // Only a chat body is kept as sent.
        super::borrowed_chat::texts(sent)
    }) {
        return Ok(texts);
    }
    let body = body.object()?;
    let user = |content: String| TextView {
        role: "user".into(),
        content,
        name: None,
        tool_calls: Vec::new(),
    };
    let field = match endpoint {
        Endpoint::ChatCompletions => {
            let messages = body.get("messages").and_then(Value::as_array);
            return Ok(messages.into_iter().flatten().map(message_view).collect());
        }
        Endpoint::Completions => "prompt",
        Endpoint::Embeddings => "input",
    };
    Ok(match body.get(field) {
        Some(Value::String(text)) => vec![user(text.clone())],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                user(
                    item.as_str()
                        .map_or_else(|| item.to_string(), str::to_owned),
                )
            })
            .collect(),
        _ => Vec::new(),
    })
}

type Check = Result<(), GatewayError>;

fn bad(param: &str, message: impl std::fmt::Display) -> GatewayError {
    GatewayError::invalid(format!("{param}: {message}"), Some(param.to_owned()))
}

impl ApiRequest {
    /// Parses `bytes` as the body of `endpoint`.
    pub fn parse(endpoint: Endpoint, bytes: &Bytes) -> Result<ApiRequest, GatewayError> {
        if endpoint == Endpoint::ChatCompletions {
            if let Some(request) = super::borrowed_chat::check(bytes) {
                return Ok(request);
            }
        }
        ApiRequest::parse_whole(endpoint, bytes)
    }

    /// Parses all of `bytes`, then checks it: what decides every body the borrowing pass does not.
    pub(super) fn parse_whole(
        endpoint: Endpoint,
        bytes: &Bytes,
    ) -> Result<ApiRequest, GatewayError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            GatewayError::invalid(format!("the request body is not valid JSON: {e}"), None)
        })?;
        let Value::Object(body) = value else {
            return Err(GatewayError::invalid(
                "the request body must be a JSON object",
                None,
            ));
        };
        ApiRequest::from_object(endpoint, body)
    }

    /// Checks an already parsed body for `endpoint`.
    pub fn from_object(
        endpoint: Endpoint,
        mut body: JsonObject,
    ) -> Result<ApiRequest, GatewayError> {
        // The gateway's own field: it selects guardrails and is never sent upstream.
        let guardrails = match body.shift_remove("guardrails") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(names)) if names.iter().all(Value::is_string) => names
                .into_iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect(),
            Some(_) => return Err(bad("guardrails", "must be an array of guardrail names")),
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) => return Err(bad("model", "must not be empty")),
            Some(_) => return Err(bad("model", "must be a string")),
            None => return Err(bad("model", "is required")),
        };
        match endpoint {
            Endpoint::ChatCompletions => check_chat(&body)?,
            Endpoint::Completions => check_completion(&body)?,
            Endpoint::Embeddings => check_embeddings(&body)?,
        }
        let stream = optional_bool(&body, "stream")?.unwrap_or(false);
        if endpoint == Endpoint::Embeddings && stream {
            return Err(bad("stream", "embeddings cannot be streamed"));
        }
        let include_usage = match body.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(options)) => {
                if !stream {
                    return Err(bad(
                        "stream_options",
                        "is only allowed when 'stream' is true",
                    ));
                }
                match options.get("include_usage") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(bad("stream_options.include_usage", "must be a boolean"))
                    }
                }
            }
            Some(_) => return Err(bad("stream_options", "must be an object")),
        };
        let user = match body.get("user") {
            None | Some(Value::Null) => None,
            Some(Value::String(u)) => Some(u.clone()),
            Some(_) => return Err(bad("user", "must be a string")),
        };
        let metadata = match body.get("metadata") {
            None | Some(Value::Null) => JsonObject::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(bad("metadata", "must be an object")),
        };
        let max_output_tokens = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|field| body.get(*field).and_then(Value::as_u64))
            .unwrap_or(0);
        Ok(ApiRequest {
            endpoint,
            body: RequestBody::from_object(body),
            model,
            stream,
            include_usage,
            user,
            metadata,
            guardrails,
            max_output_tokens,
            derived: Derived::default(),
        })
    }

    /// The most tokens the client lets the answer have (`max_completion_tokens` or the older
    /// `max_tokens`), 0 if it sets no bound.
    pub fn max_output_tokens(&self) -> u64 {
        self.max_output_tokens
    }

    /// The texts a plugin checks: chat messages, a completion's prompts, or embedding inputs
    /// (the last two as user messages, in order).
    pub fn texts(&self) -> Result<&[TextView], UnreadableBody> {
        self.derived.texts(self.endpoint, &self.body)
    }

    /// What is read from the body on demand, for a holder that outlives this borrow, such as a
    /// plugin call; whoever reads first reads for everyone.
    pub fn derived(&self) -> Derived {
        self.derived.clone()
    }

    /// A prompt-size estimate, for usage-aware routing and token rate limits.
    pub fn estimated_prompt_tokens(&self) -> Result<u64, UnreadableBody> {
        self.derived.prompt_tokens(self.endpoint, &self.body)
    }

    /// The body with the texts at these indices (as [`ApiRequest::texts`] numbers them) replaced.
    pub fn with_texts(&self, rewrites: &[(usize, String)]) -> Result<JsonObject, UnreadableBody> {
        let mut body = JsonObject::clone(self.body.object()?);
        let field = match self.endpoint {
            Endpoint::ChatCompletions => "messages",
            Endpoint::Completions => "prompt",
            Endpoint::Embeddings => "input",
        };
        for (index, text) in rewrites {
            let text = Value::String(text.clone());
            match (self.endpoint, body.get_mut(field)) {
                (Endpoint::ChatCompletions, Some(Value::Array(messages))) => {
                    if let Some(Value::Object(message)) = messages.get_mut(*index) {
                        message.insert("content".into(), text);
                    }
                }
                (_, Some(slot @ Value::String(_))) if *index == 0 => *slot = text,
                (_, Some(Value::Array(items))) => {
                    if let Some(item) = items.get_mut(*index) {
                        *item = text;
                    }
                }
                _ => {}
            }
        }
        Ok(body)
    }
}

fn message_view(message: &Value) -> TextView {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let tool_calls = message["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|call| {
            (
                text(&call["id"]),
                text(&call["function"]["name"]),
                text(&call["function"]["arguments"]),
            )
        })
        .collect();
    TextView {
        role: text(&message["role"]),
        content: super::content_text(message.get("content")),
        name: message["name"].as_str().map(str::to_owned),
        tool_calls,
    }
}

/// The bounds of the sampling numbers, which both checks of a chat body read.
pub(super) const TEMPERATURE: (f64, f64) = (0.0, 2.0);
pub(super) const TOP_P: (f64, f64) = (0.0, 1.0);
pub(super) const PENALTY: (f64, f64) = (-2.0, 2.0);

pub(super) const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

fn check_chat(body: &JsonObject) -> Check {
    let messages = match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => return Err(bad("messages", "must contain at least one message")),
        Some(_) => return Err(bad("messages", "must be an array")),
        None => return Err(bad("messages", "is required")),
    };
    for (i, message) in messages.iter().enumerate() {
        check_message(i, message)?;
    }
    check_number(body, "temperature", TEMPERATURE)?;
    check_number(body, "top_p", TOP_P)?;
    check_number(body, "presence_penalty", PENALTY)?;
    check_number(body, "frequency_penalty", PENALTY)?;
    for field in ["n", "max_tokens", "max_completion_tokens"] {
        check_positive_integer(body, field)?;
    }
    check_stop(body)?;
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        let tools = tools
            .as_array()
            .ok_or_else(|| bad("tools", "must be an array"))?;
        for (i, tool) in tools.iter().enumerate() {
            if !tool.is_object() {
                return Err(bad(&format!("tools[{i}]"), "must be an object"));
            }
            if tool["type"] == "function" && !tool["function"]["name"].is_string() {
                return Err(bad(&format!("tools[{i}].function.name"), "is required"));
            }
        }
    }
    match body.get("tool_choice") {
        None | Some(Value::Null | Value::String(_) | Value::Object(_)) => Ok(()),
        Some(_) => Err(bad("tool_choice", "must be a string or an object")),
    }
}

/// `messages[N]`, written out only for an error: a valid request pays no formatting.
struct MessagePath(usize);

impl std::fmt::Display for MessagePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "messages[{}]", self.0)
    }
}

fn check_message(index: usize, message: &Value) -> Check {
    let at = MessagePath(index);
    let Value::Object(message) = message else {
        return Err(bad(&at.to_string(), "must be an object"));
    };
    let role = match message.get("role") {
        Some(Value::String(role)) => role.as_str(),
        Some(_) => return Err(bad(&format!("{at}.role"), "must be a string")),
        None => return Err(bad(&format!("{at}.role"), "is required")),
    };
    if !ROLES.contains(&role) {
        return Err(bad(
            &format!("{at}.role"),
            format!("'{role}' is not one of {}", ROLES.join(", ")),
        ));
    }
    match message.get("content") {
        Some(Value::String(_)) => {}
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                match part.get("type") {
                    Some(Value::String(kind)) => {
                        if kind == "text" && !part["text"].is_string() {
                            return Err(bad(
                                &format!("{at}.content[{j}].text"),
                                "must be a string",
                            ));
                        }
                    }
                    _ => return Err(bad(&format!("{at}.content[{j}].type"), "is required")),
                }
            }
        }
        None | Some(Value::Null) => {
            // Only an assistant turn that calls tools may come without content.
            if role != "assistant" {
                return Err(bad(&format!("{at}.content"), "is required"));
            }
        }
        Some(_) => {
            return Err(bad(
                &format!("{at}.content"),
                "must be a string or an array of parts",
            ))
        }
    }
    if role == "tool" && !message.get("tool_call_id").is_some_and(Value::is_string) {
        return Err(bad(
            &format!("{at}.tool_call_id"),
            "is required for tool messages",
        ));
    }
    if let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) {
        let calls = calls
            .as_array()
            .ok_or_else(|| bad(&format!("{at}.tool_calls"), "must be an array"))?;
        for (j, call) in calls.iter().enumerate() {
            if !call["function"]["name"].is_string() {
                return Err(bad(
                    &format!("{at}.tool_calls[{j}].function.name"),
                    "is required",
                ));
            }
        }
    }
    Ok(())
}

fn check_completion(body: &JsonObject) -> Check {
    match body.get("prompt") {
        Some(Value::String(_)) => {}
        Some(Value::Array(items)) if !items.is_empty() => {}
        Some(Value::Array(_)) => return Err(bad("prompt", "must not be empty")),
        Some(_) => return Err(bad("prompt", "must be a string or an array")),
        None => return Err(bad("prompt", "is required")),
    }
    check_number(body, "temperature", TEMPERATURE)?;
    check_number(body, "top_p", TOP_P)?;
    check_positive_integer(body, "max_tokens")?;
    check_positive_integer(body, "n")?;
    check_stop(body)
}

fn check_embeddings(body: &JsonObject) -> Check {
    match body.get("input") {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(Value::String(_)) => return Err(bad("input", "must not be empty")),
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                if !(item.is_string() || item.is_number() || item.is_array()) {
                    return Err(bad(&format!("input[{i}]"), "must be a string or token ids"));
                }
            }
        }
        Some(Value::Array(_)) => return Err(bad("input", "must not be empty")),
        Some(_) => return Err(bad("input", "must be a string or an array")),
        None => return Err(bad("input", "is required")),
    }
    match body.get("encoding_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f == "float" || f == "base64" => {}
        Some(_) => return Err(bad("encoding_format", "must be 'float' or 'base64'")),
    }
    check_positive_integer(body, "dimensions")
}

fn optional_bool(body: &JsonObject, field: &str) -> Result<Option<bool>, GatewayError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(field, "must be a boolean")),
    }
}

fn check_number(body: &JsonObject, field: &str, (min, max): (f64, f64)) -> Check {
    match body.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(v) if (min..=max).contains(&v) => Ok(()),
            _ => Err(bad(field, format!("must be between {min} and {max}"))),
        },
        Some(_) => Err(bad(field, "must be a number")),
    }
}

fn check_positive_integer(body: &JsonObject, field: &str) -> Check {
    match body.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v >= 1) => Ok(()),
        Some(_) => Err(bad(field, "must be a positive integer")),
    }
}

fn check_stop(body: &JsonObject) -> Check {
    match body.get("stop") {
        None | Some(Value::Null | Value::String(_)) => Ok(()),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => Ok(()),
        Some(_) => Err(bad("stop", "must be a string or an array of strings")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(endpoint: Endpoint, body: Value) -> Result<ApiRequest, GatewayError> {
        ApiRequest::parse(endpoint, &Bytes::from(body.to_string()))
    }

    fn param_of(result: Result<ApiRequest, GatewayError>) -> String {
        match result {
            Err(GatewayError::InvalidRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn valid_chat_keeps_unknown_fields() {
        let req = parse(
            Endpoint::ChatCompletions,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                   "stream": true, "stream_options": {"include_usage": true},
                   "user": "u1", "metadata": {"team": "x"}, "vendor_knob": 7}),
        )
        .expect("valid");
        assert!(req.stream && req.include_usage);
        assert_eq!(req.user.as_deref(), Some("u1"));
        assert_eq!(req.metadata["team"], "x");
        assert_eq!(req.body.object().expect("an object")["vendor_knob"], 7);
    }

    #[test]
    fn bad_fields_are_named() {
        let chat = |messages: Value| {
            param_of(parse(
                Endpoint::ChatCompletions,
                json!({"model": "m", "messages": messages}),
            ))
        };
        assert_eq!(chat(json!([{"content": "x"}])), "messages[0].role");
        assert_eq!(chat(json!([{"role": "user"}])), "messages[0].content");
        assert_eq!(
            chat(json!([{"role": "robot", "content": "x"}])),
            "messages[0].role"
        );
        assert_eq!(
            chat(json!([{"role": "user", "content": [{"text": "x"}]}])),
            "messages[0].content[0].type"
        );
        assert_eq!(
            chat(json!([{"role": "tool", "content": "x"}])),
            "messages[0].tool_call_id"
        );
        assert_eq!(chat(json!([])), "messages");
        assert_eq!(
            param_of(parse(Endpoint::ChatCompletions, json!({"messages": []}))),
            "model"
        );
        assert_eq!(
            param_of(parse(
                Endpoint::ChatCompletions,
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 9})
            )),
            "temperature"
        );
        assert_eq!(
            param_of(parse(
                Endpoint::Embeddings,
                json!({"model": "m", "input": 5})
            )),
            "input"
        );
        assert_eq!(
            param_of(parse(Endpoint::Completions, json!({"model": "m"}))),
            "prompt"
        );
    }

    #[test]
    fn stream_options_need_stream_and_bodies_must_be_objects() {
        assert_eq!(
            param_of(parse(
                Endpoint::ChatCompletions,
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "stream_options": {"include_usage": true}})
            )),
            "stream_options"
        );
        assert!(ApiRequest::parse(Endpoint::ChatCompletions, &Bytes::from_static(b"[1]")).is_err());
        assert!(
            ApiRequest::parse(Endpoint::ChatCompletions, &Bytes::from_static(b"{nope")).is_err()
        );
    }

    #[test]
    fn guardrails_field_is_taken_out_of_the_body() {
        let req = parse(
            Endpoint::ChatCompletions,
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "guardrails": ["pii"]}),
        )
        .expect("valid");
        assert_eq!(req.guardrails, vec!["pii".to_owned()]);
        assert!(!req
            .body
            .object()
            .expect("an object")
            .contains_key("guardrails"));
    }

    #[test]
    fn texts_and_rewrites_line_up() {
        let req = parse(
            Endpoint::ChatCompletions,
            json!({"model": "m", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "mail a@b.co"}]}]}),
        )
        .expect("valid");
        let texts = req.texts().expect("texts");
        assert_eq!(texts[1].content, "mail a@b.co");
        // Read once, whoever asks.
        assert!(std::ptr::eq(texts, req.texts().expect("texts")));
        let body = req
            .with_texts(&[(1, "mail [EMAIL]".into())])
            .expect("rewritten");
        assert_eq!(body["messages"][1]["content"], "mail [EMAIL]");
        assert_eq!(body["messages"][0]["content"], "be brief");
        let embed = parse(
            Endpoint::Embeddings,
            json!({"model": "m", "input": ["a", "b"]}),
        )
        .expect("valid");
        assert_eq!(embed.texts().expect("texts").len(), 2);
        assert_eq!(
            embed.with_texts(&[(1, "c".into())]).expect("rewritten")["input"],
            json!(["a", "c"])
        );
    }

    #[test]
    fn prompt_estimates_count_each_message_and_its_text_parts() {
        let messages = json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"},
                {"type": "image_url", "image_url": {"url": "https://x"}},
                {"type": "text", "text": "there, you"}]}]});
        let pieces = ["be brief", "hello", "there, you"];
        let expected: u64 = pieces.iter().map(|t| tokens::estimate(t)).sum::<u64>() + 2 * 4;
        for request in [
            parse(Endpoint::ChatCompletions, messages.clone()).expect("valid"),
            ApiRequest::parse_whole(
                Endpoint::ChatCompletions,
                &Bytes::from(messages.to_string()),
            )
            .expect("valid"),
        ] {
            assert_eq!(request.estimated_prompt_tokens(), Ok(expected));
        }
        let prompt = parse(
            Endpoint::Completions,
            json!({"model": "m", "prompt": "one two"}),
        );
        let prompt = prompt.expect("valid");
        assert_eq!(prompt.estimated_prompt_tokens(), Ok(2));
    }

    #[test]
    fn assistant_tool_call_turn_may_omit_content() {
        parse(
            Endpoint::ChatCompletions,
            json!({"model": "m", "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}),
        )
        .expect("valid");
    }
}
