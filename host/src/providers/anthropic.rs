//! Anthropic Messages dialect: OpenAI chat requests in, Anthropic replies (whole or streamed) out.

use std::collections::HashMap;
use std::fmt::Display;
use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use serde_json::{json, Value};

use super::{Decoded, JsonObject, ProviderError, RelayedObject, StreamDecoder};
use crate::sse::SseEvent;

/// The `anthropic-version` header value used when the deployment sets none.
pub(super) const DEFAULT_VERSION: &str = "2023-06-01";

/// Anthropic requires `max_tokens`; OpenAI clients usually leave it out.
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Content part types each kind of message may carry in Anthropic's dialect.
const USER_PARTS: &[&str] = &["text", "image_url"];
const ASSISTANT_PARTS: &[&str] = &["text", "refusal"];
const SYSTEM_PARTS: &[&str] = &["text"];

// ----- request -----

/// OpenAI chat completions body -> Anthropic Messages body. `model` is the upstream model id to put in the body.
/// Accepts both `https://api.anthropic.com` and `https://api.anthropic.com/v1` as the base.
pub(super) fn url(base: &str) -> String {
    match base.strip_suffix("/v1") {
        Some(root) => format!("{root}/v1/messages"),
        None => format!("{base}/v1/messages"),
    }
}

pub(super) fn messages_body(
    chat: &JsonObject,
    model: &str,
    stream: bool,
) -> Result<JsonObject, ProviderError> {
    let Some(Value::Array(messages)) = chat.get("messages") else {
        return Err(invalid_at("messages", "must be an array of messages"));
    };
    let (system, turns) = conversation(messages)?;

    let mut body = JsonObject::new();
    body.insert("model".into(), model.into());
    if let Some(system) = system {
        body.insert("system".into(), system.into());
    }
    body.insert("messages".into(), turns);
    body.insert("max_tokens".into(), max_tokens(chat)?.into());
    for key in ["temperature", "top_p"] {
        if let Some(value) = field(chat, key) {
            if !value.is_number() {
                return Err(invalid_at(key, "must be a number"));
            }
            body.insert(key.into(), value.clone());
        }
    }
    if let Some(top_k) = field(chat, "top_k") {
        let top_k = top_k
            .as_u64()
            .ok_or_else(|| invalid_at("top_k", "must be a non-negative integer"))?;
        body.insert("top_k".into(), top_k.into());
    }
    if let Some(stop) = stop_sequences(chat)? {
        body.insert("stop_sequences".into(), stop);
    }
    let tools = tools(chat)?;
    if let Some(choice) = tool_choice(chat, tools.is_some())? {
        body.insert("tool_choice".into(), choice);
    }
    if let Some(tools) = tools {
        body.insert("tools".into(), tools);
    }
    if let Some(user) = field(chat, "user") {
        let user = user
            .as_str()
            .ok_or_else(|| invalid_at("user", "must be a string"))?;
        body.insert("metadata".into(), json!({ "user_id": user }));
    }
    if stream {
        body.insert("stream".into(), true.into());
    }
    Ok(body)
}

/// A present, non-null field: OpenAI clients send `null` to mean "not set".
fn field<'a>(object: &'a JsonObject, key: &str) -> Option<&'a Value> {
    object.get(key).filter(|value| !value.is_null())
}

/// An InvalidRequest whose message starts with the offending field's path.
fn invalid_at(path: &str, problem: impl Display) -> ProviderError {
    ProviderError::invalid(format!("{path}: {problem}"), Some(path.to_owned()))
}

/// One Anthropic turn being assembled; same-role neighbours merge into one.
struct Turn {
    role: &'static str,
    blocks: Vec<Value>,
}

/// Splits the OpenAI messages into the joined system prompt and Anthropic's alternating turns.
fn conversation(messages: &[Value]) -> Result<(Option<String>, Value), ProviderError> {
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        let message = message
            .as_object()
            .ok_or_else(|| invalid_at(&path, "must be an object"))?;
        let role_path = format!("{path}.role");
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_at(&role_path, "must be a string"))?;
        let (role, blocks) = match role {
            "system" | "developer" => {
                let blocks = content_blocks(message.get("content"), &path, SYSTEM_PARTS)?;
                system.extend(blocks.iter().filter_map(block_text).map(str::to_owned));
                continue;
            }
            "user" => (
                "user",
                content_blocks(message.get("content"), &path, USER_PARTS)?,
            ),
            "assistant" => ("assistant", assistant_blocks(message, &path)?),
            // Anthropic carries tool results inside user turns.
            "tool" => ("user", vec![tool_result(message, &path)?]),
            other => {
                return Err(invalid_at(
                    &role_path,
                    format!("unsupported role '{other}' for Anthropic models"),
                ))
            }
        };
        push_turn(&mut turns, role, blocks);
    }
    if turns.is_empty() {
        return Err(invalid_at(
            "messages",
            "Anthropic models need at least one user or assistant message with content",
        ));
    }
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    let turns = turns
        .into_iter()
        .map(|turn| json!({ "role": turn.role, "content": turn.blocks }))
        .collect();
    Ok((system, turns))
}

/// Anthropic requires alternating roles, so a turn with the previous turn's role joins it.
/// Messages with nothing to say are dropped: Anthropic rejects empty content.
fn push_turn(turns: &mut Vec<Turn>, role: &'static str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some(last) if last.role == role => last.blocks.extend(blocks),
        _ => turns.push(Turn { role, blocks }),
    }
}

fn block_text(block: &Value) -> Option<&str> {
    block.get("text").and_then(Value::as_str)
}

fn text_block(text: &str) -> Value {
    json!({ "type": "text", "text": text })
}

/// A message's `content` (string, parts array or null) as Anthropic blocks. Empty text is
/// skipped because Anthropic rejects empty text blocks.
fn content_blocks(
    content: Option<&Value>,
    path: &str,
    allowed: &[&str],
) -> Result<Vec<Value>, ProviderError> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) if text.is_empty() => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(vec![text_block(text)]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .filter_map(|(j, part)| {
                content_part(part, &format!("{path}.content[{j}]"), allowed).transpose()
            })
            .collect(),
        Some(_) => Err(invalid_at(
            &format!("{path}.content"),
            "must be a string, an array of content parts or null",
        )),
    }
}

/// One OpenAI content part as an Anthropic block; `None` for an empty text part.
fn content_part(
    part: &Value,
    path: &str,
    allowed: &[&str],
) -> Result<Option<Value>, ProviderError> {
    let part = part
        .as_object()
        .ok_or_else(|| invalid_at(path, "must be an object"))?;
    let kind_path = format!("{path}.type");
    let kind = part
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_at(&kind_path, "must be a string"))?;
    if !allowed.contains(&kind) {
        return Err(invalid_at(
            &kind_path,
            format!("unsupported content part '{kind}' for Anthropic models"),
        ));
    }
    match kind {
        // An assistant's earlier refusal is, to Anthropic, just something it said.
        "text" | "refusal" => {
            let text_path = format!("{path}.{kind}");
            let text = part
                .get(kind)
                .and_then(Value::as_str)
                .ok_or_else(|| invalid_at(&text_path, "must be a string"))?;
            Ok((!text.is_empty()).then(|| text_block(text)))
        }
        _ => image_block(part.get("image_url"), path).map(Some),
    }
}

/// An `image_url` part: a base64 data URL or an http(s) URL. `image_url` may be the
/// `{url, detail}` object or, from lax clients, the URL string itself.
fn image_block(image_url: Option<&Value>, path: &str) -> Result<Value, ProviderError> {
    let url_path = format!("{path}.image_url.url");
    let url = match image_url {
        Some(Value::String(url)) => Some(url.as_str()),
        Some(Value::Object(image)) => image.get("url").and_then(Value::as_str),
        _ => None,
    }
    .ok_or_else(|| invalid_at(&url_path, "must be a string"))?;

    if let Some(rest) = url.strip_prefix("data:") {
        let (media_type, data) = parse_data_url(rest).ok_or_else(|| {
            invalid_at(
                &url_path,
                "data URLs must look like 'data:<media type>;base64,<data>'",
            )
        })?;
        return Ok(json!({
            "type": "image",
            "source": { "type": "base64", "media_type": media_type, "data": data },
        }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({ "type": "image", "source": { "type": "url", "url": url } }));
    }
    Err(invalid_at(
        &url_path,
        "must be an http(s) URL or a base64 data URL",
    ))
}

/// `<media type>[;params];base64,<data>` (after `data:`) -> (media type, data).
fn parse_data_url(rest: &str) -> Option<(&str, &str)> {
    let (header, data) = rest.split_once(',')?;
    let header = header.strip_suffix(";base64")?;
    let media_type = header.split(';').next().unwrap_or_default();
    (!media_type.is_empty() && !data.is_empty()).then_some((media_type, data))
}

/// An assistant message: its text, then one `tool_use` block per tool call.
fn assistant_blocks(message: &JsonObject, path: &str) -> Result<Vec<Value>, ProviderError> {
    let mut blocks = content_blocks(message.get("content"), path, ASSISTANT_PARTS)?;
    match field(message, "tool_calls") {
        None => {}
        Some(Value::Array(calls)) => {
            for (j, call) in calls.iter().enumerate() {
                blocks.push(tool_use_block(call, &format!("{path}.tool_calls[{j}]"))?);
            }
        }
        Some(_) => {
            return Err(invalid_at(
                &format!("{path}.tool_calls"),
                "must be an array",
            ))
        }
    }
    Ok(blocks)
}

/// `{id, type: "function", function: {name, arguments}}` -> `{type: "tool_use", id, name, input}`.
fn tool_use_block(call: &Value, path: &str) -> Result<Value, ProviderError> {
    let call = call
        .as_object()
        .ok_or_else(|| invalid_at(path, "must be an object"))?;
    if let Some(kind) = field(call, "type") {
        if kind.as_str() != Some("function") {
            return Err(invalid_at(
                &format!("{path}.type"),
                "only 'function' tool calls are supported for Anthropic models",
            ));
        }
    }
    let id = required_str(call, "id", path)?;
    let function_path = format!("{path}.function");
    let function = call
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid_at(&function_path, "must be an object"))?;
    let name = required_str(function, "name", &function_path)?;
    let input = tool_input(
        field(function, "arguments"),
        &format!("{function_path}.arguments"),
    )?;
    Ok(json!({ "type": "tool_use", "id": id, "name": name, "input": input }))
}

/// OpenAI sends arguments as a JSON string; Anthropic wants the object itself.
fn tool_input(arguments: Option<&Value>, path: &str) -> Result<Value, ProviderError> {
    let parsed = match arguments {
        None => return Ok(json!({})),
        Some(Value::String(text)) if text.trim().is_empty() => return Ok(json!({})),
        Some(Value::String(text)) => serde_json::from_str::<Value>(text)
            .map_err(|e| invalid_at(path, format!("is not valid JSON ({e})")))?,
        // Lax clients send the object itself.
        Some(other) => other.clone(),
    };
    if !parsed.is_object() {
        return Err(invalid_at(path, "must encode a JSON object"));
    }
    Ok(parsed)
}

fn required_str<'a>(
    object: &'a JsonObject,
    key: &str,
    path: &str,
) -> Result<&'a str, ProviderError> {
    object
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_at(&format!("{path}.{key}"), "must be a string"))
}

/// A `tool` message -> a `tool_result` block (the caller puts it in a user turn).
fn tool_result(message: &JsonObject, path: &str) -> Result<Value, ProviderError> {
    let id = required_str(message, "tool_call_id", path)?;
    let mut block = json!({ "type": "tool_result", "tool_use_id": id });
    let content = match message.get("content") {
        // A plain string stays a string: Anthropic accepts both forms.
        Some(Value::String(text)) if text.is_empty() => None,
        Some(Value::String(text)) => Some(Value::String(text.clone())),
        other => {
            let blocks = content_blocks(other, path, USER_PARTS)?;
            (!blocks.is_empty()).then_some(Value::Array(blocks))
        }
    };
    if let Some(content) = content {
        block["content"] = content;
    }
    Ok(block)
}

/// `max_completion_tokens` (the newer name) wins over `max_tokens`.
fn max_tokens(chat: &JsonObject) -> Result<u64, ProviderError> {
    for key in ["max_completion_tokens", "max_tokens"] {
        if let Some(value) = field(chat, key) {
            return value
                .as_u64()
                .filter(|&n| n > 0)
                .ok_or_else(|| invalid_at(key, "must be a positive integer"));
        }
    }
    Ok(DEFAULT_MAX_TOKENS)
}

/// `stop` (a string or an array of strings) -> `stop_sequences`; `None` when there are none.
fn stop_sequences(chat: &JsonObject) -> Result<Option<Value>, ProviderError> {
    let sequences = match field(chat, "stop") {
        None => return Ok(None),
        Some(Value::String(stop)) => vec![stop.clone()],
        Some(Value::Array(stops)) => stops
            .iter()
            .enumerate()
            .map(|(i, stop)| {
                stop.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid_at(&format!("stop[{i}]"), "must be a string"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(invalid_at(
                "stop",
                "must be a string or an array of strings",
            ))
        }
    };
    Ok((!sequences.is_empty()).then(|| json!(sequences)))
}

/// `tools` -> Anthropic's `[{name, description, input_schema}]`; `None` when there are none.
fn tools(chat: &JsonObject) -> Result<Option<Value>, ProviderError> {
    let tools = match field(chat, "tools") {
        None => return Ok(None),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(invalid_at("tools", "must be an array")),
    };
    let tools = tools
        .iter()
        .enumerate()
        .map(|(i, tool)| tool_definition(tool, &format!("tools[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((!tools.is_empty()).then_some(Value::Array(tools)))
}

fn tool_definition(tool: &Value, path: &str) -> Result<Value, ProviderError> {
    let tool = tool
        .as_object()
        .ok_or_else(|| invalid_at(path, "must be an object"))?;
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(invalid_at(
            &format!("{path}.type"),
            "only 'function' tools are supported for Anthropic models",
        ));
    }
    let function_path = format!("{path}.function");
    let function = tool
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid_at(&function_path, "must be an object"))?;
    let name = required_str(function, "name", &function_path)?;
    let schema = match field(function, "parameters") {
        None => json!({ "type": "object", "properties": {} }),
        Some(schema @ Value::Object(_)) => schema.clone(),
        Some(_) => {
            return Err(invalid_at(
                &format!("{function_path}.parameters"),
                "must be a JSON schema object",
            ))
        }
    };
    let mut definition = json!({ "name": name, "input_schema": schema });
    match field(function, "description") {
        None => {}
        Some(Value::String(description)) => {
            definition["description"] = description.as_str().into();
        }
        Some(_) => {
            return Err(invalid_at(
                &format!("{function_path}.description"),
                "must be a string",
            ))
        }
    }
    Ok(definition)
}

/// `tool_choice` and `parallel_tool_calls` -> Anthropic's `tool_choice`.
fn tool_choice(chat: &JsonObject, has_tools: bool) -> Result<Option<Value>, ProviderError> {
    let mut choice = match field(chat, "tool_choice") {
        None => None,
        Some(Value::String(mode)) => Some(match mode.as_str() {
            "auto" => json!({ "type": "auto" }),
            "required" => json!({ "type": "any" }),
            "none" => json!({ "type": "none" }),
            other => {
                return Err(invalid_at(
                    "tool_choice",
                    format!("unsupported value '{other}'; expected 'auto', 'required', 'none' or a function"),
                ))
            }
        }),
        Some(Value::Object(named)) => Some(named_tool_choice(named)?),
        Some(_) => return Err(invalid_at("tool_choice", "must be a string or an object")),
    };
    let parallel = field(chat, "parallel_tool_calls");
    if parallel.is_some_and(|p| !p.is_boolean()) {
        return Err(invalid_at("parallel_tool_calls", "must be a boolean"));
    }
    // Without tools there is nothing to run in parallel, and Anthropic rejects a bare tool_choice.
    if parallel == Some(&Value::Bool(false)) && (has_tools || choice.is_some()) {
        let choice = choice.get_or_insert_with(|| json!({ "type": "auto" }));
        // The `none` mode takes no options.
        if choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = true.into();
        }
    }
    Ok(choice)
}

/// `{type: "function", function: {name}}` -> `{type: "tool", name}`.
fn named_tool_choice(named: &JsonObject) -> Result<Value, ProviderError> {
    if named.get("type").and_then(Value::as_str) != Some("function") {
        return Err(invalid_at(
            "tool_choice.type",
            "only 'function' tool choices are supported for Anthropic models",
        ));
    }
    let name = named
        .get("function")
        .and_then(|function| function.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_at("tool_choice.function.name", "must be a string"))?;
    Ok(json!({ "type": "tool", "name": name }))
}

// ----- whole response -----

/// An Anthropic Messages response body (already parsed) -> an OpenAI `chat.completion` object.
pub(super) fn chat_completion(message: JsonObject) -> Result<JsonObject, ProviderError> {
    let Some(Value::Array(content)) = message.get("content") else {
        return Err(ProviderError::Protocol(not_a_message(&message)));
    };
    let mut text: Option<String> = None;
    let mut tool_calls = Vec::new();
    for block in content {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text
                .get_or_insert_with(String::new)
                .push_str(block_text(block).unwrap_or_default()),
            Some("tool_use") => tool_calls.push(openai_tool_call(block)?),
            // Thinking and server-tool blocks have no place in an OpenAI message.
            _ => {}
        }
    }

    let mut reply = json!({ "role": "assistant", "content": text });
    if !tool_calls.is_empty() {
        reply["tool_calls"] = Value::Array(tool_calls);
    }
    let input = InputTokens::default().updated(message.get("usage"));
    let output = output_tokens(message.get("usage"));
    Ok(into_object(json!({
        "id": str_of(&message, "id"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": str_of(&message, "model"),
        "choices": [{
            "index": 0,
            "message": reply,
            "finish_reason": finish_reason(message.get("stop_reason")),
            "logprobs": null,
        }],
        "usage": usage_json(input, output),
    })))
}

/// Explains a body that is not a Messages response, quoting Anthropic's error if it is one.
fn not_a_message(body: &JsonObject) -> String {
    let error = body
        .get("error")
        .and_then(|error| error.get("message"))
        .and_then(Value::as_str);
    match error {
        Some(error) => {
            format!("Anthropic replied with an error body instead of a message: {error}")
        }
        None => "Anthropic reply is not a Messages response: it has no `content` array".to_owned(),
    }
}

/// A `tool_use` block -> an OpenAI tool call with the input re-serialized as a string.
fn openai_tool_call(block: &Value) -> Result<Value, ProviderError> {
    let (Some(id), Some(name)) = (
        block.get("id").and_then(Value::as_str),
        block.get("name").and_then(Value::as_str),
    ) else {
        return Err(ProviderError::Protocol(
            "Anthropic tool_use block lacks an `id` or `name`".to_owned(),
        ));
    };
    let arguments = block
        .get("input")
        .map_or_else(|| "{}".to_owned(), Value::to_string);
    Ok(json!({
        "id": id,
        "type": "function",
        "function": { "name": name, "arguments": arguments },
    }))
}

/// Anthropic's `stop_reason` -> OpenAI's `finish_reason`.
fn finish_reason(stop_reason: Option<&Value>) -> &'static str {
    match stop_reason.and_then(Value::as_str) {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn, and whatever comes next.
        _ => "stop",
    }
}

/// Anthropic splits prompt tokens three ways; OpenAI counts them all as prompt tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct InputTokens {
    fresh: u64,
    cache_creation: u64,
    cache_read: u64,
}

impl InputTokens {
    /// These counts with any that `usage` reports replaced (stream usage is cumulative).
    fn updated(mut self, usage: Option<&Value>) -> Self {
        let count = |key: &str| usage.and_then(|u| u.get(key)).and_then(Value::as_u64);
        self.fresh = count("input_tokens").unwrap_or(self.fresh);
        self.cache_creation = count("cache_creation_input_tokens").unwrap_or(self.cache_creation);
        self.cache_read = count("cache_read_input_tokens").unwrap_or(self.cache_read);
        self
    }

    fn total(self) -> u64 {
        self.fresh
            .saturating_add(self.cache_creation)
            .saturating_add(self.cache_read)
    }
}

fn output_tokens(usage: Option<&Value>) -> u64 {
    usage
        .and_then(|u| u.get("output_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn usage_json(input: InputTokens, output: u64) -> Value {
    let prompt = input.total();
    let mut usage = json!({
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt.saturating_add(output),
    });
    if input.cache_read > 0 {
        usage["prompt_tokens_details"] = json!({ "cached_tokens": input.cache_read });
    }
    usage
}

fn str_of<'a>(object: &'a JsonObject, key: &str) -> &'a str {
    object.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// `json!` builds a `Value`; callers here want the map inside. Only used on object literals.
fn into_object(value: Value) -> JsonObject {
    match value {
        Value::Object(object) => object,
        _ => JsonObject::new(),
    }
}

// ----- stream -----

/// Decodes Anthropic's streaming events into OpenAI `chat.completion.chunk` objects.
#[derive(Debug)]
pub(super) struct MessagesStream {
    id: String,
    model: String,
    created: u64,
    input: InputTokens,
    /// Anthropic content block index -> OpenAI tool call index. OpenAI numbers tool calls from
    /// 0, while Anthropic's block indexes also count text and thinking blocks.
    tool_calls: HashMap<u64, usize>,
}

impl MessagesStream {
    pub(super) fn new() -> Self {
        MessagesStream {
            id: String::new(),
            model: String::new(),
            created: unix_now(),
            input: InputTokens::default(),
            tool_calls: HashMap::new(),
        }
    }

    fn message_start(&mut self, data: &JsonObject) -> Result<Vec<JsonObject>, ProviderError> {
        let message = data
            .get("message")
            .and_then(Value::as_object)
            .ok_or_else(|| protocol("message_start event has no `message` object"))?;
        self.id = str_of(message, "id").to_owned();
        self.model = str_of(message, "model").to_owned();
        self.input = InputTokens::default().updated(message.get("usage"));
        Ok(vec![self.chunk(
            json!({ "role": "assistant", "content": "" }),
            None,
        )])
    }

    fn block_start(&mut self, data: &JsonObject) -> Result<Vec<JsonObject>, ProviderError> {
        let index = block_index(data)?;
        let block = data
            .get("content_block")
            .ok_or_else(|| protocol("content_block_start event has no `content_block`"))?;
        let chunks = match block.get("type").and_then(Value::as_str) {
            Some("tool_use") => {
                let call = self.tool_calls.len();
                self.tool_calls.insert(index, call);
                let delta = json!({ "tool_calls": [{
                    "index": call,
                    "id": block.get("id").and_then(Value::as_str).unwrap_or_default(),
                    "type": "function",
                    "function": {
                        "name": block.get("name").and_then(Value::as_str).unwrap_or_default(),
                        "arguments": "",
                    },
                }]});
                vec![self.chunk(delta, None)]
            }
            Some("text") => self.text_chunk(block_text(block)),
            _ => Vec::new(),
        };
        Ok(chunks)
    }

    fn block_delta(&self, data: &JsonObject) -> Result<Vec<JsonObject>, ProviderError> {
        let index = block_index(data)?;
        let delta = data
            .get("delta")
            .ok_or_else(|| protocol("content_block_delta event has no `delta`"))?;
        let chunks = match delta.get("type").and_then(Value::as_str) {
            Some("text_delta") => self.text_chunk(block_text(delta)),
            Some("input_json_delta") => {
                let partial = delta.get("partial_json").and_then(Value::as_str);
                // Blocks not in the map are server-side tools, which the client never runs.
                match (self.tool_calls.get(&index), partial) {
                    (Some(&call), Some(partial)) if !partial.is_empty() => {
                        let delta = json!({ "tool_calls": [{
                            "index": call,
                            "function": { "arguments": partial },
                        }]});
                        vec![self.chunk(delta, None)]
                    }
                    _ => Vec::new(),
                }
            }
            // thinking_delta, signature_delta, citations_delta, ...
            _ => Vec::new(),
        };
        Ok(chunks)
    }

    /// The finish chunk, then the usage chunk.
    fn message_delta(&mut self, data: &JsonObject) -> Vec<JsonObject> {
        let stop_reason = data.get("delta").and_then(|delta| delta.get("stop_reason"));
        let finish = self.chunk(json!({}), Some(finish_reason(stop_reason)));
        let usage = data.get("usage");
        self.input = self.input.updated(usage);
        let mut totals = self.envelope();
        totals.insert("choices".into(), json!([]));
        totals.insert("usage".into(), usage_json(self.input, output_tokens(usage)));
        vec![finish, totals]
    }

    fn text_chunk(&self, text: Option<&str>) -> Vec<JsonObject> {
        match text {
            Some(text) if !text.is_empty() => vec![self.chunk(json!({ "content": text }), None)],
            _ => Vec::new(),
        }
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> JsonObject {
        let mut chunk = self.envelope();
        chunk.insert(
            "choices".into(),
            json!([{ "index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null }]),
        );
        chunk
    }

    fn envelope(&self) -> JsonObject {
        into_object(json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }))
    }
}

impl StreamDecoder for MessagesStream {
    fn decode(&mut self, event: SseEvent) -> Result<Decoded, ProviderError> {
        let name = match event.event {
            Some(name) => name,
            // Anthropic names every event, but its data repeats the name as `type`.
            None => str_of(&parse_event("unnamed", &event.data)?, "type").to_owned(),
        };
        let chunks = match name.as_str() {
            "message_stop" => return Ok(Decoded::Done),
            "message_start" => self.message_start(&parse_event(&name, &event.data)?)?,
            "content_block_start" => self.block_start(&parse_event(&name, &event.data)?)?,
            "content_block_delta" => self.block_delta(&parse_event(&name, &event.data)?)?,
            "message_delta" => self.message_delta(&parse_event(&name, &event.data)?),
            "error" => return Err(stream_error(&parse_event(&name, &event.data)?)),
            // ping, content_block_stop, and event types newer than this code.
            _ => Vec::new(),
        };
        Ok(Decoded::Chunks(
            chunks.into_iter().map(RelayedObject::from_object).collect(),
        ))
    }
}

fn parse_event(name: &str, data: &str) -> Result<JsonObject, ProviderError> {
    serde_json::from_str(data).map_err(|e| {
        protocol(format!(
            "Anthropic stream event '{name}' is not a JSON object: {e}"
        ))
    })
}

fn block_index(data: &JsonObject) -> Result<u64, ProviderError> {
    data.get("index")
        .and_then(Value::as_u64)
        .ok_or_else(|| protocol("Anthropic content block event has no `index`"))
}

fn protocol(message: impl Into<String>) -> ProviderError {
    ProviderError::Protocol(message.into())
}

/// A mid-stream `error` event -> the status Anthropic would have answered with up front.
fn stream_error(data: &JsonObject) -> ProviderError {
    let error = data.get("error");
    let detail = |key: &str| {
        error
            .and_then(|e| e.get(key))
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let code = match detail("type") {
        "overloaded_error" => 529,
        "rate_limit_error" => 429,
        _ => 500,
    };
    let message = match detail("message") {
        "" => "Anthropic stream reported an error".to_owned(),
        message => message.to_owned(),
    };
    ProviderError::Status {
        status: StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        message,
        retry_after_s: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "claude-sonnet-4-5";

    fn object(value: Value) -> JsonObject {
        match value {
            Value::Object(object) => object,
            other => panic!("not an object: {other}"),
        }
    }

    fn translate(chat: Value) -> Value {
        Value::Object(messages_body(&object(chat), MODEL, false).expect("translates"))
    }

    /// The error message and param of a request that must be rejected.
    fn rejected(chat: Value) -> (String, Option<String>) {
        match messages_body(&object(chat), MODEL, false) {
            Err(ProviderError::InvalidRequest { message, param }) => (message, param),
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    fn user(text: &str) -> Value {
        json!({ "role": "user", "content": text })
    }

    fn text(text: &str) -> Value {
        json!({ "type": "text", "text": text })
    }

    // ----- request -----

    #[test]
    fn minimal_request_gets_defaults_and_drops_openai_only_fields() {
        let body = translate(json!({
            "model": "gpt-4o",
            "messages": [user("Hi")],
            "n": 1,
            "logprobs": false,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "seed": 7,
            "stream": true,
            "stream_options": { "include_usage": true },
            "response_format": { "type": "text" },
            "metadata": { "a": "b" },
            "logit_bias": {},
            "service_tier": "auto",
            "store": false,
            "some_future_field": 1,
        }));
        assert_eq!(
            body,
            json!({
                "model": MODEL,
                "messages": [{ "role": "user", "content": [text("Hi")] }],
                "max_tokens": 4096,
            })
        );
    }

    #[test]
    fn stream_flag_comes_from_the_argument() {
        let chat = object(json!({ "model": "m", "messages": [user("Hi")] }));
        let body = messages_body(&chat, MODEL, true).expect("translates");
        assert_eq!(body["stream"], json!(true));
    }

    #[test]
    fn system_and_developer_messages_anywhere_join_into_the_system_prompt() {
        let body = translate(json!({
            "model": "m",
            "messages": [
                { "role": "system", "content": "Be brief." },
                user("Hi"),
                { "role": "developer", "content": [text("Use French."), text("No emoji.")] },
                { "role": "system", "content": "" },
            ],
        }));
        assert_eq!(
            body["system"],
            json!("Be brief.\n\nUse French.\n\nNo emoji.")
        );
        assert_eq!(
            body["messages"],
            json!([{ "role": "user", "content": [text("Hi")] }])
        );
    }

    #[test]
    fn system_messages_accept_only_text_parts() {
        let (message, param) = rejected(json!({
            "model": "m",
            "messages": [
                { "role": "system", "content": [{ "type": "image_url", "image_url": { "url": "https://x/y.png" } }] },
                user("Hi"),
            ],
        }));
        assert_eq!(param.as_deref(), Some("messages[0].content[0].type"));
        assert_eq!(
            message,
            "messages[0].content[0].type: unsupported content part 'image_url' for Anthropic models"
        );
    }

    #[test]
    fn multi_turn_conversation_merges_consecutive_same_role_messages() {
        let body = translate(json!({
            "model": "m",
            "messages": [
                user("one"),
                { "role": "user", "content": [text("two")] },
                { "role": "assistant", "content": "three" },
                { "role": "assistant", "content": null },
                { "role": "assistant", "content": [text("four"), { "type": "refusal", "refusal": "no" }] },
                user(""),
                user("five"),
            ],
        }));
        assert_eq!(
            body["messages"],
            json!([
                { "role": "user", "content": [text("one"), text("two")] },
                { "role": "assistant", "content": [text("three"), text("four"), text("no")] },
                { "role": "user", "content": [text("five")] },
            ])
        );
    }

    #[test]
    fn images_from_data_urls_and_web_urls() {
        let body = translate(json!({
            "model": "m",
            "messages": [{ "role": "user", "content": [
                text("What is this?"),
                { "type": "image_url", "image_url": { "url": "data:image/png;base64,iVBORw0K", "detail": "high" } },
                { "type": "image_url", "image_url": { "url": "https://example.com/cat.jpg" } },
                { "type": "image_url", "image_url": "http://example.com/dog.webp" },
            ]}],
        }));
        assert_eq!(
            body["messages"][0]["content"],
            json!([
                text("What is this?"),
                { "type": "image", "source": { "type": "base64", "media_type": "image/png", "data": "iVBORw0K" } },
                { "type": "image", "source": { "type": "url", "url": "https://example.com/cat.jpg" } },
                { "type": "image", "source": { "type": "url", "url": "http://example.com/dog.webp" } },
            ])
        );
    }

    #[test]
    fn bad_image_urls_are_rejected_with_their_path() {
        for url in [
            "ftp://example.com/a.png",
            "data:image/png,raw",
            "data:;base64,AAAA",
        ] {
            let (message, param) = rejected(json!({
                "model": "m",
                "messages": [user("Hi"), { "role": "user", "content": [
                    text("look"),
                    { "type": "image_url", "image_url": { "url": url } },
                ]}],
            }));
            assert_eq!(
                param.as_deref(),
                Some("messages[1].content[1].image_url.url"),
                "{url}"
            );
            assert!(
                message.starts_with("messages[1].content[1].image_url.url: "),
                "{message}"
            );
        }
    }

    #[test]
    fn unsupported_content_parts_name_the_field() {
        let (message, param) = rejected(json!({
            "model": "m",
            "messages": [
                user("a"),
                { "role": "assistant", "content": "b" },
                user("c"),
                { "role": "user", "content": [
                    text("listen"),
                    { "type": "input_audio", "input_audio": { "data": "AAAA", "format": "wav" } },
                ]},
            ],
        }));
        assert_eq!(
            message,
            "messages[3].content[1].type: unsupported content part 'input_audio' for Anthropic models"
        );
        assert_eq!(param.as_deref(), Some("messages[3].content[1].type"));
    }

    #[test]
    fn assistants_cannot_send_images() {
        let (_, param) = rejected(json!({
            "model": "m",
            "messages": [user("a"), { "role": "assistant", "content": [
                { "type": "image_url", "image_url": { "url": "https://x/y.png" } },
            ]}],
        }));
        assert_eq!(param.as_deref(), Some("messages[1].content[0].type"));
    }

    #[test]
    fn malformed_messages_are_rejected_with_their_path() {
        let cases = [
            (
                json!([user("a"), { "role": "function", "content": "x", "name": "f" }]),
                "messages[1].role",
            ),
            (json!([user("a"), { "content": "x" }]), "messages[1].role"),
            (json!([user("a"), "hello"]), "messages[1]"),
            (
                json!([{ "role": "user", "content": 42 }]),
                "messages[0].content",
            ),
            (
                json!([{ "role": "user", "content": [{ "type": "text" }] }]),
                "messages[0].content[0].text",
            ),
            (
                json!([{ "role": "user", "content": [{ "text": "x" }] }]),
                "messages[0].content[0].type",
            ),
            (
                json!([{ "role": "tool", "content": "42" }]),
                "messages[0].tool_call_id",
            ),
            (
                json!([{ "role": "system", "content": "only a system prompt" }]),
                "messages",
            ),
        ];
        for (messages, path) in cases {
            let (message, param) = rejected(json!({ "model": "m", "messages": messages }));
            assert_eq!(param.as_deref(), Some(path), "{message}");
            assert!(message.starts_with(&format!("{path}: ")), "{message}");
        }
        let (_, param) = rejected(json!({ "model": "m", "messages": "hi" }));
        assert_eq!(param.as_deref(), Some("messages"));
    }

    fn weather_call(id: &str, arguments: &str) -> Value {
        json!({
            "id": id,
            "type": "function",
            "function": { "name": "get_weather", "arguments": arguments },
        })
    }

    #[test]
    fn tool_calls_and_results_become_tool_use_and_tool_result_blocks() {
        let body = translate(json!({
            "model": "m",
            "messages": [
                user("Weather in Paris and Rome?"),
                { "role": "assistant", "content": null, "tool_calls": [
                    weather_call("toolu_1", "{\"city\":\"Paris\"}"),
                    weather_call("toolu_2", ""),
                ]},
                { "role": "tool", "tool_call_id": "toolu_1", "content": "18C" },
                { "role": "tool", "tool_call_id": "toolu_2", "content": [text("21C")] },
                user("Thanks. Which is warmer?"),
                { "role": "assistant", "content": "Rome.", "tool_calls": [] },
            ],
        }));
        assert_eq!(
            body["messages"],
            json!([
                { "role": "user", "content": [text("Weather in Paris and Rome?")] },
                { "role": "assistant", "content": [
                    { "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": { "city": "Paris" } },
                    { "type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {} },
                ]},
                { "role": "user", "content": [
                    { "type": "tool_result", "tool_use_id": "toolu_1", "content": "18C" },
                    { "type": "tool_result", "tool_use_id": "toolu_2", "content": [text("21C")] },
                    text("Thanks. Which is warmer?"),
                ]},
                { "role": "assistant", "content": [text("Rome.")] },
            ])
        );
    }

    #[test]
    fn assistant_text_precedes_its_tool_calls_and_empty_tool_output_is_omitted() {
        let body = translate(json!({
            "model": "m",
            "messages": [
                user("Go"),
                { "role": "assistant", "content": "Checking.", "tool_calls": [weather_call("t1", "{}")] },
                { "role": "tool", "tool_call_id": "t1", "content": "" },
            ],
        }));
        assert_eq!(
            body["messages"][1]["content"],
            json!([
                text("Checking."),
                { "type": "tool_use", "id": "t1", "name": "get_weather", "input": {} },
            ])
        );
        assert_eq!(
            body["messages"][2]["content"],
            json!([{ "type": "tool_result", "tool_use_id": "t1" }])
        );
    }

    #[test]
    fn bad_tool_call_arguments_are_rejected_with_their_path() {
        for arguments in ["{\"city\":", "[1, 2]"] {
            let (message, param) = rejected(json!({
                "model": "m",
                "messages": [
                    user("Go"),
                    { "role": "assistant", "tool_calls": [weather_call("t0", "{}"), weather_call("t1", arguments)] },
                ],
            }));
            assert_eq!(
                param.as_deref(),
                Some("messages[1].tool_calls[1].function.arguments")
            );
            assert!(
                message.starts_with("messages[1].tool_calls[1].function.arguments: "),
                "{message}"
            );
        }
        let (_, param) = rejected(json!({
            "model": "m",
            "messages": [user("Go"), { "role": "assistant", "tool_calls": [{ "id": "t", "function": {} }] }],
        }));
        assert_eq!(
            param.as_deref(),
            Some("messages[1].tool_calls[0].function.name")
        );
    }

    fn base_with(extra: Value) -> Value {
        let mut chat = json!({ "model": "m", "messages": [user("Hi")] });
        for (key, value) in object(extra) {
            chat[key] = value;
        }
        translate(chat)
    }

    #[test]
    fn max_tokens_comes_from_either_openai_name() {
        assert_eq!(
            base_with(json!({ "max_tokens": 100 }))["max_tokens"],
            json!(100)
        );
        assert_eq!(
            base_with(json!({ "max_completion_tokens": 200 }))["max_tokens"],
            json!(200)
        );
        assert_eq!(
            base_with(json!({ "max_tokens": 100, "max_completion_tokens": 200 }))["max_tokens"],
            json!(200)
        );
        assert_eq!(
            base_with(json!({ "max_tokens": null }))["max_tokens"],
            json!(4096)
        );
        for bad in [json!(0), json!(-1), json!("100"), json!(1.5)] {
            let (_, param) =
                rejected(json!({ "model": "m", "messages": [user("Hi")], "max_tokens": bad }));
            assert_eq!(param.as_deref(), Some("max_tokens"));
        }
    }

    #[test]
    fn sampling_parameters_pass_through() {
        let body = base_with(json!({ "temperature": 0.2, "top_p": 0.9, "top_k": 40 }));
        assert_eq!(body["temperature"], json!(0.2));
        assert_eq!(body["top_p"], json!(0.9));
        assert_eq!(body["top_k"], json!(40));
        let (_, param) =
            rejected(json!({ "model": "m", "messages": [user("Hi")], "temperature": "hot" }));
        assert_eq!(param.as_deref(), Some("temperature"));
    }

    #[test]
    fn stop_becomes_stop_sequences() {
        assert_eq!(
            base_with(json!({ "stop": "END" }))["stop_sequences"],
            json!(["END"])
        );
        assert_eq!(
            base_with(json!({ "stop": ["a", "b"] }))["stop_sequences"],
            json!(["a", "b"])
        );
        assert!(base_with(json!({ "stop": [] }))
            .get("stop_sequences")
            .is_none());
        assert!(base_with(json!({ "stop": null }))
            .get("stop_sequences")
            .is_none());
        let (_, param) =
            rejected(json!({ "model": "m", "messages": [user("Hi")], "stop": ["a", 1] }));
        assert_eq!(param.as_deref(), Some("stop[1]"));
    }

    #[test]
    fn user_becomes_metadata_user_id() {
        assert_eq!(
            base_with(json!({ "user": "user-42" }))["metadata"],
            json!({ "user_id": "user-42" })
        );
    }

    fn weather_tool() -> Value {
        json!({ "type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": { "type": "object", "properties": { "city": { "type": "string" } }, "required": ["city"] },
            "strict": true,
        }})
    }

    #[test]
    fn tools_become_input_schemas() {
        let body = base_with(json!({ "tools": [
            weather_tool(),
            { "type": "function", "function": { "name": "now" } },
        ]}));
        assert_eq!(
            body["tools"],
            json!([
                {
                    "name": "get_weather",
                    "description": "Current weather",
                    "input_schema": { "type": "object", "properties": { "city": { "type": "string" } }, "required": ["city"] },
                },
                { "name": "now", "input_schema": { "type": "object", "properties": {} } },
            ])
        );
        assert!(body.get("tool_choice").is_none());
        let (_, param) = rejected(json!({
            "model": "m", "messages": [user("Hi")],
            "tools": [weather_tool(), { "type": "web_search" }],
        }));
        assert_eq!(param.as_deref(), Some("tools[1].type"));
    }

    #[test]
    fn tool_choice_variants() {
        let choice = |extra: Value| {
            let mut extra = object(extra);
            extra.insert("tools".into(), json!([weather_tool()]));
            base_with(Value::Object(extra)).get("tool_choice").cloned()
        };
        assert_eq!(
            choice(json!({ "tool_choice": "auto" })),
            Some(json!({ "type": "auto" }))
        );
        assert_eq!(
            choice(json!({ "tool_choice": "required" })),
            Some(json!({ "type": "any" }))
        );
        assert_eq!(
            choice(json!({ "tool_choice": "none" })),
            Some(json!({ "type": "none" }))
        );
        assert_eq!(
            choice(
                json!({ "tool_choice": { "type": "function", "function": { "name": "get_weather" } } })
            ),
            Some(json!({ "type": "tool", "name": "get_weather" }))
        );
        assert_eq!(
            choice(json!({ "parallel_tool_calls": false })),
            Some(json!({ "type": "auto", "disable_parallel_tool_use": true }))
        );
        assert_eq!(
            choice(json!({ "tool_choice": "required", "parallel_tool_calls": false })),
            Some(json!({ "type": "any", "disable_parallel_tool_use": true }))
        );
        assert_eq!(
            choice(json!({ "tool_choice": "none", "parallel_tool_calls": false })),
            Some(json!({ "type": "none" }))
        );
        assert_eq!(choice(json!({ "parallel_tool_calls": true })), None);
        // No tools: nothing to parallelise.
        assert!(base_with(json!({ "parallel_tool_calls": false }))
            .get("tool_choice")
            .is_none());

        for (bad, path) in [
            (json!("sometimes"), "tool_choice"),
            (json!({ "type": "function" }), "tool_choice.function.name"),
            (json!({ "type": "allowed_tools" }), "tool_choice.type"),
        ] {
            let (_, param) = rejected(json!({
                "model": "m", "messages": [user("Hi")], "tools": [weather_tool()], "tool_choice": bad,
            }));
            assert_eq!(param.as_deref(), Some(path));
        }
    }

    // ----- whole response -----

    /// The completion with `created` checked and removed, so tests can compare the rest.
    fn completion(message: Value) -> Value {
        let mut completion = chat_completion(object(message)).expect("translates");
        let created = completion.remove("created").and_then(|c| c.as_u64());
        assert!(created.is_some_and(|c| c > 1_600_000_000));
        Value::Object(completion)
    }

    fn anthropic_message(content: Value, stop_reason: Value) -> Value {
        json!({
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": null,
            "usage": { "input_tokens": 12, "output_tokens": 5 },
        })
    }

    #[test]
    fn text_reply_becomes_a_chat_completion() {
        let reply = completion(anthropic_message(
            json!([text("Hello"), { "type": "thinking", "thinking": "hm", "signature": "s" }, text(" there")]),
            json!("end_turn"),
        ));
        assert_eq!(
            reply,
            json!({
                "id": "msg_01",
                "object": "chat.completion",
                "model": "claude-sonnet-4-5-20250929",
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": "Hello there" },
                    "finish_reason": "stop",
                    "logprobs": null,
                }],
                "usage": { "prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17 },
            })
        );
    }

    #[test]
    fn tool_use_reply_becomes_tool_calls() {
        let reply = completion(anthropic_message(
            json!([{ "type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": { "city": "Paris" } }]),
            json!("tool_use"),
        ));
        assert_eq!(
            reply["choices"][0]["message"],
            json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "id": "toolu_9",
                    "type": "function",
                    "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" },
                }],
            })
        );
        assert_eq!(reply["choices"][0]["finish_reason"], json!("tool_calls"));
    }

    #[test]
    fn every_stop_reason_maps_to_a_finish_reason() {
        for (stop_reason, finish) in [
            (json!("end_turn"), "stop"),
            (json!("stop_sequence"), "stop"),
            (json!("max_tokens"), "length"),
            (json!("tool_use"), "tool_calls"),
            (json!("refusal"), "content_filter"),
            (json!("pause_turn"), "stop"),
            (json!("model_context_window_exceeded"), "stop"),
            (json!(null), "stop"),
        ] {
            let reply = completion(anthropic_message(json!([text("x")]), stop_reason.clone()));
            assert_eq!(
                reply["choices"][0]["finish_reason"],
                json!(finish),
                "{stop_reason}"
            );
        }
    }

    #[test]
    fn cache_tokens_count_as_prompt_tokens() {
        let mut message = anthropic_message(json!([text("x")]), json!("end_turn"));
        message["usage"] = json!({
            "input_tokens": 10,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 1000,
            "output_tokens": 7,
        });
        assert_eq!(
            completion(message)["usage"],
            json!({
                "prompt_tokens": 1110,
                "completion_tokens": 7,
                "total_tokens": 1117,
                "prompt_tokens_details": { "cached_tokens": 1000 },
            })
        );
    }

    #[test]
    fn bodies_that_are_not_messages_are_protocol_errors() {
        let error = json!({ "type": "error", "error": { "type": "api_error", "message": "boom" } });
        for (body, needle) in [
            (json!({ "id": "x" }), "no `content` array"),
            (error, "boom"),
        ] {
            match chat_completion(object(body)) {
                Err(ProviderError::Protocol(message)) => {
                    assert!(message.contains(needle), "{message}")
                }
                other => panic!("expected Protocol, got {other:?}"),
            }
        }
    }

    // ----- stream -----

    fn stream() -> MessagesStream {
        let mut stream = MessagesStream::new();
        assert!(stream.created > 1_600_000_000);
        stream.created = 1;
        stream
    }

    fn event(name: &str, data: Value) -> SseEvent {
        SseEvent {
            event: Some(name.to_owned()),
            data: data.to_string(),
        }
    }

    fn decode(stream: &mut MessagesStream, event: SseEvent) -> Vec<Value> {
        match stream.decode(event).expect("decodes") {
            Decoded::Chunks(chunks) => chunks
                .into_iter()
                .map(|chunk| Value::Object(chunk.into_object().expect("an object")))
                .collect(),
            Decoded::Done => panic!("unexpected Done"),
        }
    }

    /// Feeds events and returns every chunk, checking the stream ends with `Done`.
    fn run(events: Vec<SseEvent>) -> Vec<Value> {
        let mut stream = stream();
        let mut chunks = Vec::new();
        let (last, events) = events.split_last().expect("events");
        for event in events {
            chunks.extend(decode(&mut stream, event.clone()));
        }
        assert!(matches!(stream.decode(last.clone()), Ok(Decoded::Done)));
        chunks
    }

    fn chunk(delta: Value, finish_reason: Value) -> Value {
        json!({
            "id": "msg_01",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "claude-x",
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null }],
        })
    }

    fn message_start(usage: Value) -> SseEvent {
        event(
            "message_start",
            json!({ "type": "message_start", "message": {
                "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x",
                "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage,
            }}),
        )
    }

    fn block_start(index: u64, block: Value) -> SseEvent {
        event(
            "content_block_start",
            json!({ "type": "content_block_start", "index": index, "content_block": block }),
        )
    }

    fn block_delta(index: u64, delta: Value) -> SseEvent {
        event(
            "content_block_delta",
            json!({ "type": "content_block_delta", "index": index, "delta": delta }),
        )
    }

    fn block_stop(index: u64) -> SseEvent {
        event(
            "content_block_stop",
            json!({ "type": "content_block_stop", "index": index }),
        )
    }

    fn message_delta(stop_reason: &str, usage: Value) -> SseEvent {
        event(
            "message_delta",
            json!({ "type": "message_delta", "delta": { "stop_reason": stop_reason, "stop_sequence": null }, "usage": usage }),
        )
    }

    fn message_stop() -> SseEvent {
        event("message_stop", json!({ "type": "message_stop" }))
    }

    fn text_delta(index: u64, text: &str) -> SseEvent {
        block_delta(index, json!({ "type": "text_delta", "text": text }))
    }

    fn json_delta(index: u64, partial: &str) -> SseEvent {
        block_delta(
            index,
            json!({ "type": "input_json_delta", "partial_json": partial }),
        )
    }

    #[test]
    fn streamed_text_reply() {
        let chunks = run(vec![
            message_start(json!({ "input_tokens": 25, "output_tokens": 1 })),
            block_start(0, json!({ "type": "text", "text": "" })),
            event("ping", json!({ "type": "ping" })),
            text_delta(0, "Hello"),
            text_delta(0, ", world"),
            block_stop(0),
            message_delta("end_turn", json!({ "output_tokens": 15 })),
            message_stop(),
        ]);
        let usage = json!({
            "id": "msg_01",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "claude-x",
            "choices": [],
            "usage": { "prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40 },
        });
        assert_eq!(
            chunks,
            vec![
                chunk(json!({ "role": "assistant", "content": "" }), json!(null)),
                chunk(json!({ "content": "Hello" }), json!(null)),
                chunk(json!({ "content": ", world" }), json!(null)),
                chunk(json!({}), json!("stop")),
                usage,
            ]
        );
    }

    #[test]
    fn streamed_tool_call_with_partial_json() {
        let chunks = run(vec![
            message_start(json!({ "input_tokens": 30, "output_tokens": 1 })),
            block_start(0, json!({ "type": "thinking", "thinking": "" })),
            block_delta(
                0,
                json!({ "type": "thinking_delta", "thinking": "Need weather." }),
            ),
            block_delta(0, json!({ "type": "signature_delta", "signature": "EqQB" })),
            block_stop(0),
            block_start(1, json!({ "type": "text", "text": "" })),
            text_delta(1, "Let me check."),
            block_stop(1),
            block_start(
                2,
                json!({ "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {} }),
            ),
            json_delta(2, ""),
            json_delta(2, "{\"ci"),
            json_delta(2, "ty\": \"Par"),
            json_delta(2, "is\"}"),
            block_stop(2),
            message_delta("tool_use", json!({ "output_tokens": 40 })),
            message_stop(),
        ]);
        let tool_call = |delta: Value| chunk(json!({ "tool_calls": [delta] }), json!(null));
        assert_eq!(
            chunks[..7],
            [
                chunk(json!({ "role": "assistant", "content": "" }), json!(null)),
                chunk(json!({ "content": "Let me check." }), json!(null)),
                tool_call(json!({
                    "index": 0, "id": "toolu_1", "type": "function",
                    "function": { "name": "get_weather", "arguments": "" },
                })),
                tool_call(json!({ "index": 0, "function": { "arguments": "{\"ci" } })),
                tool_call(json!({ "index": 0, "function": { "arguments": "ty\": \"Par" } })),
                tool_call(json!({ "index": 0, "function": { "arguments": "is\"}" } })),
                chunk(json!({}), json!("tool_calls")),
            ]
        );
        assert_eq!(chunks.len(), 8);
        assert_eq!(chunks[7]["usage"]["total_tokens"], json!(70));

        let arguments: String = chunks[3..6]
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        let parsed: Value = serde_json::from_str(&arguments).expect("whole JSON");
        assert_eq!(parsed, json!({ "city": "Paris" }));
    }

    #[test]
    fn parallel_streamed_tool_calls_are_numbered_from_zero() {
        let mut stream = stream();
        decode(&mut stream, message_start(json!({ "input_tokens": 1 })));
        decode(
            &mut stream,
            block_start(0, json!({ "type": "text", "text": "" })),
        );
        for (block, id) in [(1, "toolu_a"), (2, "toolu_b")] {
            let started = decode(
                &mut stream,
                block_start(
                    block,
                    json!({ "type": "tool_use", "id": id, "name": "f", "input": {} }),
                ),
            );
            assert_eq!(
                started[0]["choices"][0]["delta"]["tool_calls"][0]["id"],
                json!(id)
            );
        }
        let second = decode(&mut stream, json_delta(2, "{}"));
        let first = decode(&mut stream, json_delta(1, "{\"a\":1}"));
        assert_eq!(
            second[0]["choices"][0]["delta"]["tool_calls"][0]["index"],
            json!(1)
        );
        assert_eq!(
            first[0]["choices"][0]["delta"]["tool_calls"][0]["index"],
            json!(0)
        );
    }

    #[test]
    fn stream_usage_includes_cache_tokens_and_later_cumulative_counts() {
        let chunks = run(vec![
            message_start(json!({
                "input_tokens": 5,
                "cache_creation_input_tokens": 10,
                "cache_read_input_tokens": 100,
                "output_tokens": 1,
            })),
            message_delta(
                "max_tokens",
                json!({ "input_tokens": 6, "output_tokens": 9 }),
            ),
            message_stop(),
        ]);
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], json!("length"));
        assert_eq!(
            chunks[2]["usage"],
            json!({
                "prompt_tokens": 116,
                "completion_tokens": 9,
                "total_tokens": 125,
                "prompt_tokens_details": { "cached_tokens": 100 },
            })
        );
    }

    #[test]
    fn stream_error_events_become_statuses() {
        for (kind, status) in [
            ("overloaded_error", 529),
            ("rate_limit_error", 429),
            ("api_error", 500),
        ] {
            let error = event(
                "error",
                json!({ "type": "error", "error": { "type": kind, "message": "Overloaded" } }),
            );
            match stream().decode(error) {
                Err(ProviderError::Status {
                    status: got,
                    message,
                    retry_after_s,
                }) => {
                    assert_eq!(got.as_u16(), status, "{kind}");
                    assert_eq!(message, "Overloaded");
                    assert_eq!(retry_after_s, None);
                }
                other => panic!("expected Status, got {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_events_are_ignored_and_bad_json_is_a_protocol_error() {
        let mut stream = stream();
        let future = event("some_future_event", json!({ "type": "some_future_event" }));
        assert!(decode(&mut stream, future).is_empty());
        let garbled = SseEvent {
            event: Some("content_block_delta".into()),
            data: "{\"index\":".into(),
        };
        assert!(matches!(
            stream.decode(garbled),
            Err(ProviderError::Protocol(_))
        ));
        let unnamed = SseEvent {
            event: None,
            data: "not json".into(),
        };
        assert!(matches!(
            stream.decode(unnamed),
            Err(ProviderError::Protocol(_))
        ));
        let missing = event(
            "content_block_delta",
            json!({ "type": "content_block_delta", "index": 0 }),
        );
        assert!(matches!(
            stream.decode(missing),
            Err(ProviderError::Protocol(_))
        ));
    }

    #[test]
    fn unnamed_events_are_recognised_by_their_type() {
        let mut stream = stream();
        let start = message_start(json!({ "input_tokens": 1 }));
        let unnamed = SseEvent {
            event: None,
            data: start.data,
        };
        assert_eq!(decode(&mut stream, unnamed)[0]["id"], json!("msg_01"));
        let stop = SseEvent {
            event: None,
            data: json!({ "type": "message_stop" }).to_string(),
        };
        assert!(matches!(stream.decode(stop), Ok(Decoded::Done)));
    }
}
