//! Parses and checks a request body against its route's OpenAI schema, naming the bad field.
//!
//! The body stays a JSON object: only the fields the gateway acts on are checked and copied out, so
//! **unknown fields reach the upstream unchanged**.

use bytes::Bytes;
use serde_json::Value;

use crate::error::GatewayError;
use crate::providers::{Endpoint, JsonObject};

/// A request body that passed its route's checks.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub endpoint: Endpoint,
    /// The client's body as sent.
    pub body: JsonObject,
    /// The model the client asked for: a model group's name.
    pub model: String,
    pub stream: bool,
    /// Whether the client asked for the usage chunk at the end of a stream.
    pub include_usage: bool,
    /// The body's `user`: the end user the client acts for.
    pub user: Option<String>,
    /// The body's `metadata` object.
    pub metadata: JsonObject,
}

type Check = Result<(), GatewayError>;

fn bad(param: &str, message: impl std::fmt::Display) -> GatewayError {
    GatewayError::invalid(format!("{param}: {message}"), Some(param.to_owned()))
}

impl ApiRequest {
    /// Parses `bytes` as the body of `endpoint`.
    pub fn parse(endpoint: Endpoint, bytes: &Bytes) -> Result<ApiRequest, GatewayError> {
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
    pub fn from_object(endpoint: Endpoint, body: JsonObject) -> Result<ApiRequest, GatewayError> {
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
        Ok(ApiRequest {
            endpoint,
            body,
            model,
            stream,
            include_usage,
            user,
            metadata,
        })
    }
}

const ROLES: &[&str] = &[
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
        check_message(&format!("messages[{i}]"), message)?;
    }
    check_number(body, "temperature", 0.0, 2.0)?;
    check_number(body, "top_p", 0.0, 1.0)?;
    check_number(body, "presence_penalty", -2.0, 2.0)?;
    check_number(body, "frequency_penalty", -2.0, 2.0)?;
    for field in ["n", "max_tokens", "max_completion_tokens"] {
        check_positive_integer(body, field)?;
    }
    check_stop(body)?;
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        let tools = tools
            .as_array()
            .ok_or_else(|| bad("tools", "must be an array"))?;
        for (i, tool) in tools.iter().enumerate() {
            let at = format!("tools[{i}]");
            if !tool.is_object() {
                return Err(bad(&at, "must be an object"));
            }
            if tool["type"] == "function" && !tool["function"]["name"].is_string() {
                return Err(bad(&format!("{at}.function.name"), "is required"));
            }
        }
    }
    match body.get("tool_choice") {
        None | Some(Value::Null | Value::String(_) | Value::Object(_)) => Ok(()),
        Some(_) => Err(bad("tool_choice", "must be a string or an object")),
    }
}

fn check_message(at: &str, message: &Value) -> Check {
    let Value::Object(message) = message else {
        return Err(bad(at, "must be an object"));
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
    let content_at = format!("{at}.content");
    match message.get("content") {
        Some(Value::String(_)) => {}
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                let part_at = format!("{content_at}[{j}]");
                match part.get("type") {
                    Some(Value::String(kind)) => {
                        if kind == "text" && !part["text"].is_string() {
                            return Err(bad(&format!("{part_at}.text"), "must be a string"));
                        }
                    }
                    _ => return Err(bad(&format!("{part_at}.type"), "is required")),
                }
            }
        }
        None | Some(Value::Null) => {
            // Only an assistant turn that calls tools may come without content.
            if role != "assistant" {
                return Err(bad(&content_at, "is required"));
            }
        }
        Some(_) => return Err(bad(&content_at, "must be a string or an array of parts")),
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
    check_number(body, "temperature", 0.0, 2.0)?;
    check_number(body, "top_p", 0.0, 1.0)?;
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

fn check_number(body: &JsonObject, field: &str, min: f64, max: f64) -> Check {
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
        assert_eq!(req.body["vendor_knob"], 7);
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
