//! [`Request`]: the call a guardrail or enricher serves.

use std::cell::OnceCell;

use crate::Message;

type Lent = crate::__bindings::guardrail::portcullis::plugin::types::Request;

/// The call a guardrail, enricher or router serves, as it stands when the plugin sees it.
///
/// The gateway lends it for one hook call. Each field is fetched from the gateway the first time
/// it is read, and kept, so a plugin pays only for what it reads: a guardrail that never reads
/// the messages never copies them. In unit tests, build one with [`Request::chat`] and the
/// `with_*` methods.
#[derive(Debug)]
pub struct Request<'a> {
    source: Source<'a>,
}

#[derive(Debug)]
// The lent variant is the one plugins meet, on the stack for one call; boxing it would cost an
// allocation a call.
#[allow(clippy::large_enum_variant)]
enum Source<'a> {
    /// The gateway's request, read on demand.
    Lent(&'a Lent, Fetched),
    /// A request built in a test.
    Built(Box<Fields>),
}

/// What has been read of a lent request so far.
#[derive(Debug, Default)]
struct Fetched {
    call_id: OnceCell<String>,
    endpoint: OnceCell<String>,
    model: OnceCell<String>,
    stream: OnceCell<bool>,
    key_alias: OnceCell<Option<String>>,
    team: OnceCell<Option<String>>,
    end_user: OnceCell<Option<String>>,
    metadata: OnceCell<String>,
    tags: OnceCell<Vec<String>>,
    messages: OnceCell<Vec<Message>>,
    estimated_tokens: OnceCell<u64>,
    body: OnceCell<Result<String, String>>,
}

/// Every field of a request built in a test.
#[derive(Debug)]
struct Fields {
    call_id: String,
    endpoint: String,
    model: String,
    stream: bool,
    key_alias: Option<String>,
    team: Option<String>,
    end_user: Option<String>,
    metadata: String,
    tags: Vec<String>,
    messages: Vec<Message>,
    estimated_tokens: u64,
    /// `None`: made from the model and messages when read.
    body: OnceCell<Result<String, String>>,
}

/// An accessor that reads a lent request's field once, or a built request's field.
macro_rules! field {
    ($(#[$doc:meta])* $name:ident -> $out:ty, |$value:ident| $view:expr) => {
        $(#[$doc])*
        pub fn $name(&self) -> $out {
            let $value = match &self.source {
                Source::Lent(lent, fetched) => fetched.$name.get_or_init(|| lent.$name()),
                Source::Built(fields) => &fields.$name,
            };
            $view
        }
    };
}

impl Request<'_> {
    /// The gateway's request, lent for the call the export glue is serving.
    #[doc(hidden)]
    pub fn lent(lent: &Lent) -> Request<'_> {
        Request {
            source: Source::Lent(lent, Fetched::default()),
        }
    }

    field!(
        /// The call's id, as the gateway's logs and response headers show it.
        call_id -> &str, |value| value
    );
    field!(
        /// The operation: `chat-completions`, `completions` or `embeddings` (more may come).
        endpoint -> &str, |value| value
    );
    field!(
        /// The model group the call is routed to.
        model -> &str, |value| value
    );
    field!(
        /// Whether the client asked for a stream.
        stream -> bool, |value| *value
    );
    field!(
        /// The caller's key alias, if the key has one.
        key_alias -> Option<&str>, |value| value.as_deref()
    );
    field!(
        /// The caller's team, if the key has one.
        team -> Option<&str>, |value| value.as_deref()
    );
    field!(
        /// The body's `user`: the end user the client acts for.
        end_user -> Option<&str>, |value| value.as_deref()
    );
    field!(
        /// The call's metadata so far, as a JSON object.
        metadata -> &str, |value| value
    );
    field!(
        /// The call's tags so far.
        tags -> &[String], |value| value
    );
    field!(
        /// Chat messages. For completions, the prompt as one user message; for embeddings,
        /// each input as a user message. Rewrites name messages by their index here.
        messages -> &[Message], |value| value
    );
    field!(
        /// A prompt-size estimate in tokens (words and punctuation, not a real tokenizer). A
        /// request built in a test has 0 unless [`Request::with_estimated_tokens`] set it.
        estimated_tokens -> u64, |value| *value
    );

    /// The client's request body as JSON, every field included (images, tools, sampling
    /// options…); an error if the gateway could not read it back. A request built in a test
    /// has `{"model": …, "messages": […]}` unless [`Request::with_body`] set one.
    pub fn body(&self) -> Result<&str, &str> {
        let body = match &self.source {
            Source::Lent(lent, fetched) => fetched.body.get_or_init(|| lent.body()),
            Source::Built(fields) => fields.body.get_or_init(|| Ok(fields.default_body())),
        };
        body.as_deref().map_err(String::as_str)
    }
}

impl Fields {
    fn default_body(&self) -> String {
        let messages: Vec<_> = self
            .messages
            .iter()
            .map(|m| serde_json::json!({ "role": m.role, "content": m.content }))
            .collect();
        serde_json::json!({ "model": self.model, "messages": messages }).to_string()
    }
}

impl Default for Request<'static> {
    /// An empty, non-streamed chat-completions call `test-call`, with no messages and `{}`
    /// metadata.
    fn default() -> Self {
        Request {
            source: Source::Built(Box::new(Fields {
                call_id: "test-call".into(),
                endpoint: "chat-completions".into(),
                model: String::new(),
                stream: false,
                key_alias: None,
                team: None,
                end_user: None,
                metadata: "{}".into(),
                tags: Vec::new(),
                messages: Vec::new(),
                estimated_tokens: 0,
                body: OnceCell::new(),
            })),
        }
    }
}

/// A setter of a built request's field.
macro_rules! with {
    ($(#[$doc:meta])* $setter:ident($name:ident: $in:ty) => $value:expr) => {
        $(#[$doc])*
        pub fn $setter(mut self, $name: $in) -> Self {
            self.fields().$name = $value;
            self
        }
    };
}

impl Request<'static> {
    /// A chat-completions call to `model` with `(role, content)` messages, e.g.
    /// `Request::chat("gpt-4o", &[("system", "be brief"), ("user", "hi")])`.
    pub fn chat(model: impl Into<String>, messages: &[(&str, &str)]) -> Self {
        Request::default().with_model(model).with_messages(
            messages
                .iter()
                .map(|(role, content)| Message::new(*role, *content)),
        )
    }

    fn fields(&mut self) -> &mut Fields {
        match &mut self.source {
            Source::Built(fields) => fields,
            // Only `Request::lent` makes a lent request, and it returns a `Request<'_>` that
            // these setters cannot be called on.
            Source::Lent(..) => unreachable!("a lent request is not 'static"),
        }
    }

    with!(
        /// Sets the call id.
        with_call_id(call_id: impl Into<String>) => call_id.into()
    );
    with!(
        /// Sets the endpoint: `chat-completions`, `completions` or `embeddings`.
        with_endpoint(endpoint: impl Into<String>) => endpoint.into()
    );
    with!(
        /// Sets the model group.
        with_model(model: impl Into<String>) => model.into()
    );
    with!(
        /// Makes it a streamed call, or not.
        with_stream(stream: bool) => stream
    );
    with!(
        /// Sets the caller's key alias.
        with_key_alias(key_alias: impl Into<String>) => Some(key_alias.into())
    );
    with!(
        /// Sets the caller's team.
        with_team(team: impl Into<String>) => Some(team.into())
    );
    with!(
        /// Sets the body's `user`.
        with_end_user(end_user: impl Into<String>) => Some(end_user.into())
    );
    with!(
        /// Sets the metadata, a JSON object as text.
        with_metadata(metadata: impl Into<String>) => metadata.into()
    );
    with!(
        /// Sets the tags.
        with_tags(tags: impl IntoIterator<Item = impl Into<String>>) =>
            tags.into_iter().map(Into::into).collect()
    );
    with!(
        /// Sets the messages.
        with_messages(messages: impl IntoIterator<Item = Message>) => messages.into_iter().collect()
    );
    with!(
        /// Sets the prompt-size estimate.
        with_estimated_tokens(estimated_tokens: u64) => estimated_tokens
    );
    with!(
        /// Sets the body [`Request::body`] returns, JSON as text.
        with_body(body: impl Into<String>) => OnceCell::from(Ok(body.into()))
    );
}

#[cfg(test)]
mod tests {
    use super::Request;
    use crate::Message;

    #[test]
    fn chat_builds_messages_in_order() {
        let request = Request::chat("m", &[("system", "s"), ("user", "u")]);
        assert_eq!(request.model(), "m");
        assert_eq!(request.messages().len(), 2);
        assert_eq!(request.messages()[1].role, "user");
        assert_eq!(request.messages()[1].content, "u");
        assert_eq!(request.metadata(), "{}");
        assert_eq!(request.call_id(), "test-call");
        assert_eq!(request.endpoint(), "chat-completions");
        assert!(!request.stream());
        assert_eq!(request.team(), None);
    }

    #[test]
    fn a_built_body_follows_the_model_and_messages_unless_set() {
        let request = Request::chat("m", &[("user", "hi")]);
        let body: serde_json::Value =
            serde_json::from_str(request.body().expect("body")).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        );
        let request = Request::default().with_body(r#"{"seed":1}"#);
        assert_eq!(request.body(), Ok(r#"{"seed":1}"#));
    }

    #[test]
    fn setters_set_their_field() {
        let request = Request::default()
            .with_call_id("c")
            .with_endpoint("embeddings")
            .with_model("m")
            .with_stream(true)
            .with_key_alias("k")
            .with_team("t")
            .with_end_user("u")
            .with_metadata(r#"{"a":1}"#)
            .with_tags(["x", "y"])
            .with_messages([Message::new("user", "hi")])
            .with_estimated_tokens(7);
        assert_eq!(request.call_id(), "c");
        assert_eq!(request.endpoint(), "embeddings");
        assert_eq!(request.model(), "m");
        assert!(request.stream());
        assert_eq!(request.key_alias(), Some("k"));
        assert_eq!(request.team(), Some("t"));
        assert_eq!(request.end_user(), Some("u"));
        assert_eq!(request.metadata(), r#"{"a":1}"#);
        assert_eq!(request.tags(), ["x", "y"]);
        assert_eq!(request.messages(), [Message::new("user", "hi")]);
        assert_eq!(request.estimated_tokens(), 7);
    }
}
