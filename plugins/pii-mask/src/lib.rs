//! `pii-mask`: a guardrail that masks (or blocks on) emails, phone numbers, card numbers and SSNs.

pub mod scan;

use portcullis_plugin_sdk::{
    ChoiceRewrite, Config, Guardrail, MessageRewrite, Plugin, Request, RequestVerdict, Response,
    ResponseVerdict, StreamDelta, StreamVerdict,
};
use scan::{Entities, Entity};
use serde::Deserialize;

/// A stream delta is held back while its tail could still become a match, but never once the held
/// text reaches this many bytes: streaming must keep moving.
pub const HOLD_LIMIT: usize = 256;

/// How much already-released text is re-scanned with each delta, so that the rest of a match
/// that began before a forced release is still masked.
const RELEASED_CONTEXT: usize = 64;

/// What to do when personal data is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Replace each match with a placeholder such as `[EMAIL]`.
    #[default]
    Mask,
    /// Refuse the call, naming the kinds found (never the values).
    Block,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    action: Action,
    /// `None` means every kind.
    #[serde(default)]
    entities: Option<Vec<Entity>>,
}

/// The guardrail: which kinds to look for, and what to do about them.
#[derive(Debug)]
pub struct PiiMask {
    action: Action,
    entities: Entities,
}

impl Plugin for PiiMask {
    fn init(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        let entities = settings
            .entities
            .map_or_else(Entities::all, Entities::from_iter);
        if entities.is_empty() {
            return Err(
                "invalid config at `entities`: empty list; omit it to detect every kind".into(),
            );
        }
        Ok(Self {
            action: settings.action,
            entities,
        })
    }
}

impl Guardrail for PiiMask {
    fn check_request(&self, request: &Request<'_>) -> RequestVerdict {
        let mut kinds = Vec::new();
        let mut rewrites = Vec::new();
        for (index, message) in (0u32..).zip(request.messages()) {
            if let Some(masked) = self.scan(&message.content, &mut kinds) {
                rewrites.push(MessageRewrite {
                    index,
                    content: masked,
                });
            }
        }
        match (self.action, kinds.is_empty()) {
            (_, true) => RequestVerdict::Allow,
            (Action::Block, false) => RequestVerdict::Block(block_reason("request", &kinds)),
            (Action::Mask, false) => RequestVerdict::Rewrite(rewrites),
        }
    }

    fn check_response(&self, _request: &Request<'_>, response: &Response) -> ResponseVerdict {
        let mut kinds = Vec::new();
        let mut rewrites = Vec::new();
        for choice in &response.choices {
            if let Some(masked) = self.scan(&choice.text, &mut kinds) {
                rewrites.push(ChoiceRewrite {
                    index: choice.index,
                    text: masked,
                });
            }
        }
        match (self.action, kinds.is_empty()) {
            (_, true) => ResponseVerdict::Allow,
            (Action::Block, false) => ResponseVerdict::Block(block_reason("response", &kinds)),
            (Action::Mask, false) => ResponseVerdict::Rewrite(rewrites),
        }
    }

    /// Holds the delta while its tail could still grow into a match (the gateway then prepends it
    /// to the next delta), up to [`HOLD_LIMIT`] bytes; otherwise releases it masked. The end of
    /// the already-released text is scanned along with it, so a match cut by a forced release
    /// still has its remainder masked.
    fn check_stream(&self, _request: &Request<'_>, delta: &StreamDelta) -> StreamVerdict {
        let text = &delta.text;
        if !delta.finished && text.len() < HOLD_LIMIT && scan::could_grow(text, self.entities) {
            return StreamVerdict::Hold;
        }
        let context = tail(&delta.released, RELEASED_CONTEXT);
        let joined = format!("{context}{text}");
        let found: Vec<scan::Found> = scan::find(&joined, self.entities)
            .into_iter()
            .filter(|found| found.end > context.len())
            .map(|found| scan::Found {
                start: found.start.max(context.len()) - context.len(),
                end: found.end - context.len(),
                entity: found.entity,
            })
            .collect();
        if found.is_empty() {
            return StreamVerdict::Release(text.clone());
        }
        match self.action {
            Action::Block => {
                let kinds = distinct(found.iter().map(|found| found.entity));
                StreamVerdict::Block(block_reason("response", &kinds))
            }
            Action::Mask => StreamVerdict::Release(scan::mask(text, &found)),
        }
    }
}

impl PiiMask {
    /// The masked text if `text` has matches (adding their kinds to `kinds`), else `None`.
    fn scan(&self, text: &str, kinds: &mut Vec<Entity>) -> Option<String> {
        let found = scan::find(text, self.entities);
        if found.is_empty() {
            return None;
        }
        for found in &found {
            if !kinds.contains(&found.entity) {
                kinds.push(found.entity);
            }
        }
        Some(scan::mask(text, &found))
    }
}

fn distinct(entities: impl Iterator<Item = Entity>) -> Vec<Entity> {
    let mut out = Vec::new();
    for entity in entities {
        if !out.contains(&entity) {
            out.push(entity);
        }
    }
    out
}

/// "The request contains personal data (email address, phone number)." Kinds in a fixed order,
/// so the reason does not depend on where in the text they were found.
fn block_reason(what: &str, kinds: &[Entity]) -> String {
    let names: Vec<String> = Entity::ALL
        .iter()
        .filter(|entity| kinds.contains(entity))
        .map(ToString::to_string)
        .collect();
    format!("The {what} contains personal data ({}).", names.join(", "))
}

/// The last `max` bytes of `text` or fewer, cut at a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

portcullis_plugin_sdk::export!(PiiMask: Guardrail);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(config: &str) -> PiiMask {
        PiiMask::init(Config::new(config)).expect("valid config")
    }

    fn masking() -> PiiMask {
        plugin("{}")
    }

    #[test]
    fn config_defaults_and_errors() {
        let default = masking();
        assert_eq!(default.action, Action::Mask);
        assert_eq!(default.entities, Entities::all());
        let block = plugin(r#"{"action": "block", "entities": ["email", "credit_card"]}"#);
        assert_eq!(block.action, Action::Block);
        assert!(block.entities.contains(Entity::CreditCard));
        assert!(!block.entities.contains(Entity::Phone));

        let err = PiiMask::init(Config::new(r#"{"action": "redact"}"#)).expect_err("bad action");
        assert!(err.contains("action") && err.contains("redact"), "{err}");
        let err = PiiMask::init(Config::new(r#"{"entities": ["iban"]}"#)).expect_err("bad kind");
        assert!(err.contains("entities") && err.contains("iban"), "{err}");
        let err = PiiMask::init(Config::new(r#"{"entities": []}"#)).expect_err("empty");
        assert!(err.contains("entities"), "{err}");
    }

    #[test]
    fn request_messages_are_masked_individually() {
        let request = Request::chat(
            "gpt-4o",
            &[
                ("system", "You are helpful."),
                ("user", "I'm jane@example.com, call 555-123-4567"),
                ("user", "My SSN is 123-45-6789"),
            ],
        );
        assert_eq!(
            masking().check_request(&request),
            RequestVerdict::Rewrite(vec![
                MessageRewrite {
                    index: 1,
                    content: "I'm [EMAIL], call [PHONE]".into()
                },
                MessageRewrite {
                    index: 2,
                    content: "My SSN is [SSN]".into()
                },
            ])
        );
    }

    #[test]
    fn clean_requests_pass() {
        let request = Request::chat(
            "m",
            &[("user", "Upgrade to v2.3.1 on 2024-05-01, ticket 4417.")],
        );
        assert_eq!(masking().check_request(&request), RequestVerdict::Allow);
    }

    #[test]
    fn block_names_kinds_not_values() {
        let guard = plugin(r#"{"action": "block"}"#);
        let request = Request::chat("m", &[("user", "card 4111 1111 1111 1111, mail a@b.io")]);
        let RequestVerdict::Block(reason) = guard.check_request(&request) else {
            panic!("expected a block");
        };
        assert_eq!(
            reason,
            "The request contains personal data (email address, credit card number)."
        );
        assert!(!reason.contains("4111") && !reason.contains("a@b.io"));
    }

    #[test]
    fn entity_subset_is_respected() {
        let guard = plugin(r#"{"entities": ["ssn"]}"#);
        let request = Request::chat("m", &[("user", "jane@example.com 123-45-6789")]);
        assert_eq!(
            guard.check_request(&request),
            RequestVerdict::Rewrite(vec![MessageRewrite {
                index: 0,
                content: "jane@example.com [SSN]".into()
            }])
        );
    }

    #[test]
    fn responses_are_masked_per_choice() {
        let response = Response::from_texts("m", &["nothing here", "reach me at +44 20 7946 0958"]);
        let request = Request::chat("m", &[]);
        assert_eq!(
            masking().check_response(&request, &response),
            ResponseVerdict::Rewrite(vec![ChoiceRewrite {
                index: 1,
                text: "reach me at [PHONE]".into()
            }])
        );
        let guard = plugin(r#"{"action": "block"}"#);
        assert!(matches!(
            guard.check_response(&request, &response),
            ResponseVerdict::Block(reason) if reason.contains("phone number")
        ));
        let clean = Response::from_texts("m", &["fine"]);
        assert_eq!(
            masking().check_response(&request, &clean),
            ResponseVerdict::Allow
        );
    }

    /// Feeds `deltas` the way the gateway does: held text is prepended to the next delta.
    fn stream(guard: &PiiMask, deltas: &[&str]) -> (String, Vec<StreamVerdict>) {
        let mut released = String::new();
        let mut held = String::new();
        let mut verdicts = Vec::new();
        for (i, piece) in deltas.iter().enumerate() {
            let delta = StreamDelta::new(
                format!("{held}{piece}"),
                released.clone(),
                i + 1 == deltas.len(),
            );
            held.clear();
            let verdict = guard.check_stream(&Request::default(), &delta);
            match &verdict {
                StreamVerdict::Release(text) => released.push_str(text),
                StreamVerdict::Hold => held = delta.text.clone(),
                StreamVerdict::Block(_) => {}
            }
            verdicts.push(verdict);
        }
        (released, verdicts)
    }

    #[test]
    fn stream_masks_an_email_split_across_deltas() {
        let (out, verdicts) = stream(
            &masking(),
            &[
                "Write", " to", " jane", ".doe", "@", "example", ".com", ", thanks", "!",
            ],
        );
        assert_eq!(out, "Write to [EMAIL], thanks!");
        assert_eq!(verdicts[0], StreamVerdict::Hold);
    }

    #[test]
    fn stream_masks_split_numbers() {
        let (out, _) = stream(&masking(), &["Call ", "555", "-123", "-", "4567", " now."]);
        assert_eq!(out, "Call [PHONE] now.");
        let (out, _) = stream(
            &masking(),
            &["card ", "4111 ", "1111 ", "1111 ", "1111", ";"],
        );
        assert_eq!(out, "card [CREDIT_CARD];");
    }

    #[test]
    fn stream_releases_at_safe_points() {
        let guard = masking();
        let delta = StreamDelta::new("Hello, ", "", false);
        assert_eq!(
            guard.check_stream(&Request::default(), &delta),
            StreamVerdict::Release("Hello, ".into())
        );
        let delta = StreamDelta::new("Hello", "", false);
        assert_eq!(
            guard.check_stream(&Request::default(), &delta),
            StreamVerdict::Hold
        );
        // Without emails, words are never held; numbers still are.
        let numbers = plugin(r#"{"entities": ["phone", "credit_card", "ssn"]}"#);
        assert_eq!(
            numbers.check_stream(&Request::default(), &StreamDelta::new("Hello", "", false)),
            StreamVerdict::Release("Hello".into())
        );
        assert_eq!(
            numbers.check_stream(&Request::default(), &StreamDelta::new("room 5", "", false)),
            StreamVerdict::Hold
        );
    }

    #[test]
    fn stream_flushes_everything_when_finished() {
        let (out, verdicts) = stream(&masking(), &["mail me: bob", "@example.org"]);
        assert_eq!(out, "mail me: [EMAIL]");
        assert_eq!(
            verdicts.last(),
            Some(&StreamVerdict::Release("mail me: [EMAIL]".into()))
        );
    }

    #[test]
    fn stream_holds_are_bounded() {
        let long = "a".repeat(HOLD_LIMIT);
        let verdict = masking().check_stream(
            &Request::default(),
            &StreamDelta::new(long.clone(), "", false),
        );
        assert_eq!(verdict, StreamVerdict::Release(long));
        let just_under = "a".repeat(HOLD_LIMIT - 1);
        let verdict = masking().check_stream(
            &Request::default(),
            &StreamDelta::new(just_under, "", false),
        );
        assert_eq!(verdict, StreamVerdict::Hold);
    }

    #[test]
    fn stream_masks_the_rest_of_a_match_cut_by_a_forced_release() {
        let released = format!("{} jane.doe", "x".repeat(300));
        let delta = StreamDelta::new("@example.com is mine!", released, false);
        assert_eq!(
            masking().check_stream(&Request::default(), &delta),
            StreamVerdict::Release("[EMAIL] is mine!".into())
        );
        // Text that was already released is not matched again.
        let delta = StreamDelta::new(" and more!", "jane@example.com", false);
        assert_eq!(
            masking().check_stream(&Request::default(), &delta),
            StreamVerdict::Release(" and more!".into())
        );
    }

    #[test]
    fn stream_block_mode() {
        let guard = plugin(r#"{"action": "block"}"#);
        let (_, verdicts) = stream(&guard, &["SSN: ", "123-45-", "6789", "."]);
        assert_eq!(
            verdicts.last(),
            Some(&StreamVerdict::Block(
                "The response contains personal data (US social security number).".into()
            ))
        );
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("ab", 10), "ab");
    }
}
