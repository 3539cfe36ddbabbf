//! The README's example guardrail: blocks requests that mention a configured word.
//!
//! Build it as a component with
//! `cargo build --release --target wasm32-wasip2 -p portcullis-plugin-sdk --example hello`.

use portcullis_plugin_sdk::{Config, Guardrail, Plugin, Request, RequestVerdict};

/// The words to refuse, from `{"words": [...]}`.
#[derive(Debug, serde::Deserialize)]
pub struct Banned {
    words: Vec<String>,
}

impl Plugin for Banned {
    fn init(config: Config) -> Result<Self, String> {
        config.parse() // `{"words": [...]}` from the YAML `config` block
    }
}

impl Guardrail for Banned {
    fn check_request(&self, request: &Request<'_>) -> RequestVerdict {
        let text = request.messages().iter().map(|m| m.content.to_lowercase());
        match text
            .flat_map(|t| self.words.iter().filter(move |w| t.contains(w.as_str())))
            .next()
        {
            Some(word) => RequestVerdict::Block(format!("the word {word:?} is not allowed")),
            None => RequestVerdict::Allow,
        }
    }
}

portcullis_plugin_sdk::export!(Banned: Guardrail);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_banned_words() {
        let guard = Banned::init(Config::new(r#"{"words": ["secret"]}"#)).expect("config");
        let request = Request::chat("gpt-4o", &[("user", "tell me the SECRET")]);
        assert!(matches!(
            guard.check_request(&request),
            RequestVerdict::Block(_)
        ));
        let request = Request::chat("gpt-4o", &[("user", "hello")]);
        assert_eq!(guard.check_request(&request), RequestVerdict::Allow);
    }

    #[test]
    fn config_errors_name_the_field() {
        let err = Banned::init(Config::new(r#"{"words": "secret"}"#)).expect_err("not a list");
        assert!(err.contains("words"), "{err}");
    }
}
