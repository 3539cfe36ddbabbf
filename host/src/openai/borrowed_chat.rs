//! The common case of checking a chat request: one pass that borrows from the client's bytes,
//! reads only the fields the checks in [`super::request`] read, and builds no map.
//!
//! **It accepts a body only if those checks accept it, and then yields the same request.**
//! Anything it cannot vouch for (a bad or unusual value, a repeated field, the gateway's own
//! `guardrails` field) makes it give up, and the full parse decides and names the problem; so it
//! needs no error messages of its own. A test holds the two to each other over many bodies.
//!
//! One exception, on purpose: JSON that is valid but that `serde_json`'s values cannot hold (a
//! number beyond `f64`, a lone surrogate escape, nesting deeper than 128) in a value the pass
//! skips. Like any proxy, the gateway relays it as written when nothing reads the whole body; where
//! something must, it is the client's 400 then ([`crate::providers::UnreadableBody`]).
//!
//! The texts plugins see are read from a checked body the same way, without the parse.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::request::{ApiRequest, TextView, PENALTY, ROLES, TEMPERATURE, TOP_P};
use crate::json::borrowed::{span_in, ObjectOf, Present};
use crate::providers::{Endpoint, JsonObject, RequestBody, SentSpans};

#[derive(serde::Deserialize)]
struct ChatFields<'a> {
    #[serde(borrow, default)]
    model: Present<'a>,
    #[serde(borrow)]
    messages: Vec<ObjectOf<MessageFields<'a>>>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    n: Option<u64>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    /// Checked as it is read; nothing else reads it.
    #[allow(dead_code)]
    stop: Option<Stop>,
    #[serde(borrow)]
    tools: Option<Vec<ObjectOf<ToolFields<'a>>>>,
    #[serde(borrow, default)]
    tool_choice: Present<'a>,
    stream: Option<bool>,
    #[serde(borrow, default)]
    stream_options: Present<'a>,
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    metadata: Present<'a>,
    #[serde(borrow, default)]
    guardrails: Present<'a>,
}

#[derive(serde::Deserialize)]
struct MessageFields<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    content: Option<Content>,
    #[serde(borrow, default)]
    tool_call_id: Present<'a>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ObjectOf<ToolCallFields<'a>>>>,
}

#[derive(serde::Deserialize)]
struct ToolCallFields<'a> {
    #[serde(borrow)]
    function: ObjectOf<FunctionFields<'a>>,
}

#[derive(serde::Deserialize)]
struct FunctionFields<'a> {
    #[serde(borrow, default)]
    name: Present<'a>,
}

#[derive(serde::Deserialize)]
struct ToolFields<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    function: Option<ObjectOf<FunctionFields<'a>>>,
}

#[derive(serde::Deserialize)]
struct PartFields<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    text: Present<'a>,
}

#[derive(serde::Deserialize)]
struct StreamOptionsFields {
    include_usage: Option<bool>,
}

/// A string, read and let go.
struct AnyString;

impl<'de> Deserialize<'de> for AnyString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = AnyString;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<AnyString, E> {
                Ok(AnyString)
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// `stop`: a string or a list of strings.
struct Stop;

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Strings;
        impl<'de> Visitor<'de> for Strings {
            type Value = Stop;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<Stop, E> {
                Ok(Stop)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Stop, A::Error> {
                while items.next_element::<AnyString>()?.is_some() {}
                Ok(Stop)
            }
        }
        deserializer.deserialize_any(Strings)
    }
}

/// A message's `content`: a string, or a list of parts each with a string `type` (and a string
/// `text` if that type is `text`).
struct Content;

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Parts;
        impl<'de> Visitor<'de> for Parts {
            type Value = Content;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of parts")
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<Content, E> {
                Ok(Content)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut parts: A) -> Result<Content, A::Error> {
                while let Some(ObjectOf(part)) = parts.next_element::<ObjectOf<PartFields<'_>>>()? {
                    if part.kind == "text" && !part.text.is_string() {
                        return Err(de::Error::custom("a text part without text"));
                    }
                }
                Ok(Content)
            }
        }
        deserializer.deserialize_any(Parts)
    }
}

#[derive(serde::Deserialize)]
struct ChatTexts<'a> {
    #[serde(borrow)]
    messages: Vec<ObjectOf<MessageText<'a>>>,
}

#[derive(serde::Deserialize)]
struct MessageText<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(default)]
    content: ContentText,
    name: Option<String>,
    tool_calls: Option<Vec<ObjectOf<CallText>>>,
}

#[derive(serde::Deserialize)]
struct CallText {
    id: Option<String>,
    function: ObjectOf<FunctionText>,
}

#[derive(serde::Deserialize)]
struct FunctionText {
    name: String,
    arguments: Option<String>,
}

#[derive(serde::Deserialize)]
struct PartText<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    text: Option<String>,
}

/// A message's text: the string, or its text parts joined by newlines (as `content_text` joins
/// them).
#[derive(Default)]
struct ContentText(String);

impl<'de> Deserialize<'de> for ContentText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = ContentText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a list of parts or null")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ContentText, E> {
                Ok(ContentText(text.to_owned()))
            }

            fn visit_unit<E: de::Error>(self) -> Result<ContentText, E> {
                Ok(ContentText::default())
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut parts: A) -> Result<ContentText, A::Error> {
                let mut joined = String::new();
                let mut first = true;
                while let Some(ObjectOf(part)) = parts.next_element::<ObjectOf<PartText<'_>>>()? {
                    if let (true, Some(text)) = (part.kind == "text", part.text) {
                        if !first {
                            joined.push('\n');
                        }
                        joined.push_str(&text);
                        first = false;
                    }
                }
                Ok(ContentText(joined))
            }
        }
        deserializer.deserialize_any(Text)
    }
}

/// The texts of a checked chat body, as [`ApiRequest::texts`] reads them from its object; `None`
/// if a field is of a shape only that reading handles (a `name` that is not a string, say).
pub(super) fn texts(sent: &[u8]) -> Option<Vec<TextView>> {
    let ChatTexts { messages } = serde_json::from_slice(sent).ok()?;
    let view = |ObjectOf(message): ObjectOf<MessageText<'_>>| TextView {
        role: message.role.into_owned(),
        content: message.content.0,
        name: message.name,
        tool_calls: message
            .tool_calls
            .into_iter()
            .flatten()
            .map(|ObjectOf(call)| {
                let ObjectOf(function) = call.function;
                let arguments = function.arguments.unwrap_or_default();
                (call.id.unwrap_or_default(), function.name, arguments)
            })
            .collect(),
    };
    Some(messages.into_iter().map(view).collect())
}

/// The request, if the pass can vouch for it.
pub(super) fn check(bytes: &Bytes) -> Option<ApiRequest> {
    // Skipped strings are not checked for UTF-8, and these bytes may go upstream as they are.
    let text = std::str::from_utf8(bytes).ok()?;
    let ObjectOf(fields) = serde_json::from_str::<ObjectOf<ChatFields<'_>>>(text).ok()?;
    if fields.guardrails.0.is_some() {
        return None;
    }
    let model_raw = fields.model.0?;
    let model = string_of(model_raw).filter(|m| !m.is_empty())?;
    if fields.messages.is_empty() || !fields.messages.iter().all(|m| message_passes(&m.0)) {
        return None;
    }
    let in_range =
        |value: Option<f64>, (min, max): (f64, f64)| value.is_none_or(|v| (min..=max).contains(&v));
    let positive = |value: Option<u64>| value.is_none_or(|v| v >= 1);
    let tools_pass = fields.tools.iter().flatten().all(|ObjectOf(tool)| {
        tool.kind.as_deref() != Some("function")
            || tool.function.as_ref().is_some_and(|f| f.0.name.is_string())
    });
    let tool_choice_passes = fields
        .tool_choice
        .raw()
        .is_none_or(|raw| raw.starts_with(['n', '"', '{']));
    let passes = in_range(fields.temperature, TEMPERATURE)
        && in_range(fields.top_p, TOP_P)
        && in_range(fields.presence_penalty, PENALTY)
        && in_range(fields.frequency_penalty, PENALTY)
        && positive(fields.n)
        && positive(fields.max_tokens)
        && positive(fields.max_completion_tokens)
        && tools_pass
        && tool_choice_passes;
    if !passes {
        return None;
    }
    let stream = fields.stream.unwrap_or(false);
    let include_usage = match fields.stream_options.raw() {
        None | Some("null") => false,
        Some(raw) if stream && raw.starts_with('{') => {
            serde_json::from_str::<ObjectOf<StreamOptionsFields>>(raw)
                .ok()?
                .0
                .include_usage
                .unwrap_or(false)
        }
        Some(_) => return None,
    };
    let metadata = match fields.metadata.raw() {
        None | Some("null") => JsonObject::new(),
        Some(raw) if raw.starts_with('{') => serde_json::from_str(raw).ok()?,
        Some(_) => return None,
    };
    let spans = SentSpans {
        model: span_in(bytes, model_raw.get())?,
        stream_options: match fields.stream_options.raw() {
            Some(raw) => Some(span_in(bytes, raw)?),
            None => None,
        },
    };
    Some(ApiRequest {
        endpoint: Endpoint::ChatCompletions,
        body: RequestBody::from_sent(bytes.clone(), spans),
        model,
        stream,
        include_usage,
        user: fields.user.map(Cow::into_owned),
        metadata,
        guardrails: Vec::new(),
        max_output_tokens: fields
            .max_completion_tokens
            .or(fields.max_tokens)
            .unwrap_or(0),
        derived: Default::default(),
    })
}

fn message_passes(message: &MessageFields<'_>) -> bool {
    let role = message.role.as_ref();
    ROLES.contains(&role)
        && (message.content.is_some() || role == "assistant")
        && (role != "tool" || message.tool_call_id.is_string())
        && message
            .tool_calls
            .iter()
            .flatten()
            .all(|call| call.0.function.0.name.is_string())
}

/// A JSON string's text; `None` if `raw` is not a string.
fn string_of(raw: &RawValue) -> Option<String> {
    let raw = raw.get();
    if !raw.starts_with('"') {
        return None;
    }
    match raw.contains('\\') {
        false => Some(raw[1..raw.len() - 1].to_owned()),
        true => serde_json::from_str(raw).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// The pass must agree with the full parse on every body it accepts.
    fn agrees(text: &str) -> bool {
        let bytes = Bytes::copy_from_slice(text.as_bytes());
        let Some(fast) = check(&bytes) else {
            return false;
        };
        let whole = ApiRequest::parse_whole(Endpoint::ChatCompletions, &bytes)
            .unwrap_or_else(|e| panic!("the pass accepted what the parse refuses ({e}): {text}"));
        assert_eq!(fast.model, whole.model, "{text}");
        assert_eq!(fast.stream, whole.stream, "{text}");
        assert_eq!(fast.include_usage, whole.include_usage, "{text}");
        assert_eq!(fast.user, whole.user, "{text}");
        assert_eq!(fast.metadata, whole.metadata, "{text}");
        assert_eq!(fast.guardrails, whole.guardrails, "{text}");
        assert_eq!(fast.max_output_tokens, whole.max_output_tokens, "{text}");
        assert_eq!(fast.texts(), whole.texts(), "{text}");
        assert_eq!(fast.body.object(), whole.body.object(), "{text}");
        true
    }

    fn pool() -> Vec<Value> {
        let values = json!([
            null, true, false, 0, 1, -1, 2.5, 3, 100, "", "x", "user", "assistant", "tool",
            "function", "text", [], ["x"], ["x", 1], [1], [{}], [null],
            [{"type": "text"}], [{"type": "text", "text": "t"}], [{"type": "text", "text": 1}],
            [{"type": "image_url", "image_url": {"url": "u"}}], [{"text": "t"}], [["text", "t"]],
            {}, {"a": 1}, {"include_usage": true}, {"include_usage": "yes"},
            {"include_usage": null}, {"name": "f"}, {"function": {"name": "f"}},
            [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            [{"type": "function"}], [{"type": "function", "function": {"name": 1}}],
            [{"type": "function", "function": ["f"]}], [{"type": "web", "function": 1}],
            [{"type": 1}], [{"function": {"name": "f"}}], [{"function": {}}], ["f"],
            [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
        ]);
        values.as_array().cloned().unwrap_or_default()
    }

    fn base() -> Value {
        json!({"model": "group", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there"}]})
    }

    const TOP_FIELDS: &[&str] = &[
        "model",
        "messages",
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "tools",
        "tool_choice",
        "stream",
        "stream_options",
        "user",
        "metadata",
        "guardrails",
        "vendor_knob",
    ];

    const MESSAGE_FIELDS: &[&str] = &["role", "content", "tool_call_id", "tool_calls", "name"];

    #[test]
    fn agrees_with_the_full_parse_on_every_field_and_value() {
        let mut bodies = Vec::new();
        for stream in [None, Some(true), Some(false)] {
            for field in TOP_FIELDS {
                for value in pool() {
                    let mut body = base();
                    if let Some(stream) = stream {
                        body["stream"] = json!(stream);
                    }
                    body[*field] = value;
                    bodies.push(body);
                }
            }
        }
        for role in [
            "system",
            "user",
            "assistant",
            "tool",
            "developer",
            "function",
        ] {
            for field in MESSAGE_FIELDS {
                for value in pool() {
                    let mut body = base();
                    body["messages"][1]["role"] = json!(role);
                    body["messages"][1][*field] = value;
                    bodies.push(body);
                }
                let mut body = base();
                body["messages"][1]["role"] = json!(role);
                if let Some(message) = body["messages"][1].as_object_mut() {
                    message.remove(*field);
                }
                bodies.push(body);
            }
        }
        let mut missed = Vec::new();
        for body in &bodies {
            for text in [
                body.to_string(),
                serde_json::to_string_pretty(body).unwrap_or_default(),
            ] {
                let parses =
                    ApiRequest::parse_whole(Endpoint::ChatCompletions, &Bytes::from(text.clone()));
                if !agrees(&text) && parses.is_ok() {
                    missed.push(text);
                }
            }
        }
        // The pass leaves to the parse only what it gives up on by design: the gateway's own
        // field, and tools whose type is not a string or whose function is not an object.
        let by_design = |text: &String| {
            let compact = text.replace(char::is_whitespace, "");
            compact.contains("\"guardrails\":")
                || compact.contains("\"tools\":[{\"type\":1")
                || compact.contains("\"type\":\"web\",\"function\":1")
        };
        let unexpected: Vec<_> = missed.iter().filter(|text| !by_design(text)).collect();
        assert!(
            unexpected.is_empty(),
            "the parse alone accepted: {unexpected:#?}"
        );
        assert!(agrees(&base().to_string()));
        let mut with_parts = base();
        with_parts["messages"][1] = json!({"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "u"}},
            {"type": "text", "text": "here"}]});
        let calls = json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"type": "function", "function": {"name": "g"}}]});
        if let Some(messages) = with_parts["messages"].as_array_mut() {
            messages.push(calls);
        }
        assert!(agrees(&with_parts.to_string()));
        let read = texts(with_parts.to_string().as_bytes()).expect("read without the parse");
        assert_eq!(read[1].content, "look\nhere");
        assert_eq!(
            read[2].tool_calls[1],
            (String::new(), "g".into(), String::new())
        );
    }

    #[test]
    fn gives_up_on_what_only_the_parse_can_judge() {
        let gives_up = |text: &str| {
            let bytes = Bytes::copy_from_slice(text.as_bytes());
            check(&bytes).is_none()
        };
        let messages = r#""messages": [{"role": "user", "content": "hi"}]"#;
        // A repeated field: the last counts in a parsed object.
        assert!(gives_up(&format!(
            r#"{{"model": "a", "model": "b", {messages}}}"#
        )));
        assert!(gives_up(&format!(
            r#"{{"model": "a", {messages}, "n": 1, "n": 0}}"#
        )));
        // The gateway's own field, which is taken out of the body.
        assert!(gives_up(&format!(
            r#"{{"model": "a", {messages}, "guardrails": []}}"#
        )));
        // Not an object; not text.
        assert!(gives_up(r#"["a", [{"role": "user", "content": "hi"}]]"#));
        let not_text = Bytes::from_static(b"{\"model\": \"a\xff\", \"messages\": []}");
        assert!(check(&not_text).is_none());
        assert!(gives_up(
            r#"{"model": "", "messages": [{"role": "user", "content": "hi"}]}"#
        ));
    }

    #[test]
    fn escapes_are_read_as_the_parse_reads_them() {
        let text = r#"{"mod\u0065l": "gr\u006fup", "messages": [{"role": "us\u0065r",
            "content": "a\nb"}], "user": "\u00e9"}"#;
        assert!(agrees(text));
        let bytes = Bytes::copy_from_slice(text.as_bytes());
        let request = check(&bytes).expect("accepted");
        assert_eq!(request.model, "group");
        assert_eq!(request.user.as_deref(), Some("é"));
    }

    #[test]
    fn json_serde_cannot_hold_is_found_when_the_object_is_read() {
        let deep = format!("{}{}", "[".repeat(130), "]".repeat(130));
        for skipped in ["1e400", r#""\ud800""#, deep.as_str()] {
            let text = format!(
                r#"{{"model": "a", "messages": [{{"role": "user", "content": "hi"}}],
                    "vendor_knob": {skipped}}}"#
            );
            let bytes = Bytes::from(text);
            let request = ApiRequest::parse(Endpoint::ChatCompletions, &bytes).expect("checked");
            assert!(request.body.object().is_err(), "{skipped}");
            assert!(ApiRequest::parse_whole(Endpoint::ChatCompletions, &bytes).is_err());
        }
    }
}
