//! Stage 4, and its two later seams: guardrails in their three modes.
//!
//! - `pre_call`: before routing, in configured order. A block ends the call with an error naming
//!   the guardrail; a rewrite replaces the body and is what the next guardrail sees.
//! - `during_call`: concurrently with the upstream call. A block cancels it; nothing reaches the
//!   client before every verdict is in.
//! - `post_call`: on the whole response (a rewrite replaces choice texts), or on each streamed
//!   delta through [`StreamGuards`], which hold text back when a guardrail asks.
//!
//! A guardrail runs when it is `default_on`, or when the caller's key or the request's
//! `guardrails` field names it. With `monitor: true` its verdict is logged and never acted on.

use std::future::Future;

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::call::Call;
use crate::config::GuardrailMode;
use crate::error::GatewayError;
use crate::extension::{
    ResponseVerdict, StreamCheck, StreamDelta, StreamVerdict, Verdict, MAX_HELD_BYTES,
};
use crate::generation::{Generation, GuardrailSlot};
use crate::openai::{self, ApiRequest};
use crate::providers::{Endpoint, RelayedObject};

/// Each guardrail that ran and its outcome, for the call record.
type Outcomes = Vec<(String, &'static str)>;

/// The guardrails of `mode` that this call selects, in configured order.
fn selected<'g>(
    generation: &'g Generation,
    call: &Call,
    request: &ApiRequest,
    mode: GuardrailMode,
) -> Vec<&'g GuardrailSlot> {
    let key_names = call
        .principal
        .as_ref()
        .map_or(&[][..], |p| &p.guardrails[..]);
    generation
        .guardrails
        .iter()
        .filter(|slot| slot.mode == mode)
        .filter(|slot| {
            let name = slot.guardrail.name();
            let named = |names: &[String]| names.iter().any(|n| n == name);
            slot.default_on || named(key_names) || named(&request.guardrails)
        })
        .collect()
}

fn monitored(name: &str, outcome: &str) {
    tracing::info!(
        guardrail = name,
        outcome,
        "guardrail verdict (monitor only)"
    );
}

/// A monitor's failure is logged like its verdicts: it never fails the call.
fn monitor_failed(name: &str, err: &GatewayError) {
    tracing::warn!(guardrail = name, error = %err, "guardrail failed (monitor only)");
}

fn blocked(name: &str, reason: String) -> GatewayError {
    GatewayError::Blocked {
        guardrail: name.to_owned(),
        reason,
    }
}

pub async fn pre_call(
    generation: &Generation,
    call: &mut Call,
    request: &mut ApiRequest,
) -> Result<(), GatewayError> {
    for name in &request.guardrails {
        if !generation
            .guardrails
            .iter()
            .any(|g| g.guardrail.name() == name)
        {
            return Err(GatewayError::invalid(
                format!("guardrails: no guardrail named '{name}'"),
                Some("guardrails".to_owned()),
            ));
        }
    }
    for slot in selected(generation, call, request, GuardrailMode::PreCall) {
        let name = slot.guardrail.name();
        let verdict = match slot.guardrail.check_request(call, request).await {
            Ok(verdict) => verdict,
            Err(err) => {
                call.guardrails.push((name.to_owned(), "error"));
                if slot.monitor {
                    monitor_failed(name, &err);
                    continue;
                }
                return Err(err);
            }
        };
        let outcome = match &verdict {
            Verdict::Allow => "allow",
            Verdict::Block { .. } => "block",
            Verdict::Rewrite(_) => "rewrite",
        };
        call.guardrails.push((name.to_owned(), outcome));
        if slot.monitor {
            monitored(name, outcome);
            continue;
        }
        match verdict {
            Verdict::Allow => {}
            Verdict::Block { reason } => return Err(blocked(name, reason)),
            Verdict::Rewrite(body) => {
                // A rewrite must still be a valid request: check it as if a client had sent it.
                let guardrails = std::mem::take(&mut request.guardrails);
                *request = ApiRequest::from_object(request.endpoint, body)?;
                request.guardrails = guardrails;
            }
        }
    }
    Ok(())
}

/// The during-call guardrails of one call, with the call as it stood when the upstream call
/// started (the route stage goes on changing the call itself).
#[derive(Debug)]
pub struct DuringCall<'g> {
    call: Call,
    slots: Vec<&'g GuardrailSlot>,
}

impl<'g> DuringCall<'g> {
    /// `None` when no during-call guardrail runs for this call.
    pub fn select(
        generation: &'g Generation,
        call: &Call,
        request: &ApiRequest,
    ) -> Option<DuringCall<'g>> {
        let slots = selected(generation, call, request, GuardrailMode::DuringCall);
        (!slots.is_empty()).then(|| DuringCall {
            call: call.clone(),
            slots,
        })
    }

    /// Runs the guardrails alongside `upstream`. The first block drops `upstream`, which cancels
    /// the upstream call; otherwise the upstream's answer waits for the last verdict.
    pub async fn run<T>(
        &self,
        request: &ApiRequest,
        upstream: impl Future<Output = Result<T, GatewayError>>,
    ) -> (Result<T, GatewayError>, Outcomes) {
        let mut checks: FuturesUnordered<_> = self
            .slots
            .iter()
            .map(|slot| async move {
                let verdict = slot.guardrail.check_request(&self.call, request).await;
                (*slot, verdict)
            })
            .collect();
        let mut outcomes = Outcomes::new();
        let mut answer = None;
        tokio::pin!(upstream);
        loop {
            tokio::select! {
                result = &mut upstream, if answer.is_none() => match result {
                    Ok(value) => answer = Some(value),
                    // A failed upstream call needs no verdict.
                    Err(err) => return (Err(err), outcomes),
                },
                Some((slot, verdict)) = checks.next() => {
                    let name = slot.guardrail.name();
                    let outcome = match &verdict {
                        Err(_) => "error",
                        Ok(Verdict::Block { .. }) => "block",
                        // The body has gone upstream already: a rewrite cannot change it.
                        Ok(Verdict::Allow | Verdict::Rewrite(_)) => "allow",
                    };
                    outcomes.push((name.to_owned(), outcome));
                    match verdict {
                        Err(err) if slot.monitor => monitor_failed(name, &err),
                        Err(err) => return (Err(err), outcomes),
                        Ok(Verdict::Block { reason }) if !slot.monitor => {
                            return (Err(blocked(name, reason)), outcomes);
                        }
                        Ok(_) if slot.monitor => monitored(name, outcome),
                        Ok(_) => {}
                    }
                },
                else => break,
            }
            if checks.is_empty() && answer.is_some() {
                break;
            }
        }
        match answer {
            Some(value) => (Ok(value), outcomes),
            None => (
                Err(GatewayError::Internal(
                    "the upstream call ended without an answer".into(),
                )),
                outcomes,
            ),
        }
    }
}

/// Post-call guardrails on a whole response, in configured order; a rewrite feeds the next.
pub async fn post_call(
    generation: &Generation,
    call: &mut Call,
    request: &ApiRequest,
    answer: &mut RelayedObject,
) -> Result<(), GatewayError> {
    if call.endpoint == Endpoint::Embeddings {
        return Ok(());
    }
    let slots = selected(generation, call, request, GuardrailMode::PostCall);
    if slots.is_empty() {
        return Ok(());
    }
    let not_an_object = |e: serde_json::Error| GatewayError::Upstream {
        status: http::StatusCode::BAD_GATEWAY,
        message: format!("the upstream response is not a JSON object: {e}"),
    };
    let mut view = answer.response_view().map_err(not_an_object)?;
    for slot in slots {
        let name = slot.guardrail.name();
        let verdict = slot.guardrail.check_response(call, request, &view).await;
        let outcome = match &verdict {
            Err(_) => "error",
            Ok(ResponseVerdict::Allow) => "allow",
            Ok(ResponseVerdict::Block { .. }) => "block",
            Ok(ResponseVerdict::Rewrite(_)) => "rewrite",
        };
        call.guardrails.push((name.to_owned(), outcome));
        if slot.monitor {
            match &verdict {
                Err(err) => monitor_failed(name, err),
                Ok(_) => monitored(name, outcome),
            }
            continue;
        }
        match verdict? {
            ResponseVerdict::Allow => {}
            ResponseVerdict::Block { reason } => return Err(blocked(name, reason)),
            ResponseVerdict::Rewrite(texts) => {
                // Only here is an upstream's answer parsed whole.
                let response = answer.object_mut().map_err(not_an_object)?;
                for (index, text) in texts {
                    if openai::set_choice_text(response, index, text.clone()) {
                        view.set_text(index, text);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The post-call guardrails of one stream. Each sees every choice's text in order; what one
/// releases is what the next sees, and what reaches the client is what the last releases.
#[derive(Default)]
pub struct StreamGuards {
    guards: Vec<StreamGuard>,
}

impl std::fmt::Debug for StreamGuards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.guards.iter().map(|g| &g.name))
            .finish()
    }
}

struct StreamGuard {
    name: String,
    monitor: bool,
    check: Box<dyn StreamCheck>,
    /// Per choice index: what this guardrail holds back and what it has released.
    choices: Vec<(u32, ChoiceState)>,
    outcome: &'static str,
}

#[derive(Default)]
struct ChoiceState {
    /// Whether the guardrail has been shown text of this choice: if so, it is shown the choice's
    /// last delta too, even an empty one, so it knows the choice ended.
    shown: bool,
    held: String,
    /// The end of what was released (at most [`RELEASED_TAIL`] bytes): the context a match cut
    /// by an earlier release continues from. Whole, it would make each delta cost more than the
    /// last.
    released: String,
}

/// How much released text each delta shows a guardrail.
const RELEASED_TAIL: usize = 4 * 1024;

impl ChoiceState {
    fn release(&mut self, text: &str) {
        self.released.push_str(text);
        if self.released.len() > 2 * RELEASED_TAIL {
            let mut cut = self.released.len() - RELEASED_TAIL;
            while !self.released.is_char_boundary(cut) {
                cut += 1;
            }
            self.released.drain(..cut);
        }
    }
}

fn choice_of(choices: &mut Vec<(u32, ChoiceState)>, index: u32) -> &mut ChoiceState {
    let position = match choices.iter().position(|(i, _)| *i == index) {
        Some(position) => position,
        None => {
            choices.push((index, ChoiceState::default()));
            choices.len() - 1
        }
    };
    &mut choices[position].1
}

impl StreamGuard {
    /// One delta of one choice through this guardrail: the text to pass on.
    async fn pass(
        &mut self,
        index: u32,
        text: String,
        finished: bool,
    ) -> Result<String, GatewayError> {
        let monitor = self.monitor;
        let state = choice_of(&mut self.choices, index);
        let mut input = std::mem::take(&mut state.held);
        input.push_str(&text);
        if input.is_empty() && !(finished && state.shown) {
            return Ok(input);
        }
        state.shown = true;
        let delta = StreamDelta {
            choice_index: index,
            text: &input,
            released: &state.released,
            finished,
        };
        let verdict = self.check.check(delta).await;
        let (outcome, passed) = match verdict {
            Err(err) if monitor => {
                self.outcome = "error";
                monitor_failed(&self.name, &err);
                return Ok(text);
            }
            Err(err) => {
                self.outcome = "error";
                return Err(err);
            }
            Ok(StreamVerdict::Release(out)) => {
                let outcome = if out == input { "allow" } else { "rewrite" };
                state.release(&out);
                (outcome, out)
            }
            Ok(StreamVerdict::Hold) if finished || input.len() > MAX_HELD_BYTES => {
                self.outcome = "error";
                if monitor {
                    return Ok(text);
                }
                return Err(GatewayError::PluginFailed(format!(
                    "guardrail '{}' held back {} bytes of a stream{}",
                    self.name,
                    input.len(),
                    if finished { " at its end" } else { "" }
                )));
            }
            Ok(StreamVerdict::Hold) => {
                state.held = input;
                ("allow", String::new())
            }
            Ok(StreamVerdict::Block { reason }) => {
                if !monitor {
                    self.outcome = "block";
                    return Err(blocked(&self.name, reason));
                }
                state.release(&input);
                ("block", input)
            }
        };
        // The stream's outcome is its most severe delta's.
        if self.outcome == "allow" || outcome == "block" {
            self.outcome = outcome;
        }
        if monitor {
            if outcome != "allow" {
                monitored(&self.name, outcome);
            }
            // The client sees the text as it came, whatever the verdict.
            return Ok(text);
        }
        Ok(passed)
    }
}

impl StreamGuards {
    /// `None` when no post-call guardrail runs on this call's stream.
    pub fn select(
        generation: &Generation,
        call: &Call,
        request: &ApiRequest,
    ) -> Option<StreamGuards> {
        if !request.stream || call.endpoint == Endpoint::Embeddings {
            return None;
        }
        let guards: Vec<StreamGuard> = selected(generation, call, request, GuardrailMode::PostCall)
            .into_iter()
            .map(|slot| StreamGuard {
                name: slot.guardrail.name().to_owned(),
                monitor: slot.monitor,
                check: slot.guardrail.open_stream(call, request),
                choices: Vec::new(),
                outcome: "allow",
            })
            .collect();
        (!guards.is_empty()).then_some(StreamGuards { guards })
    }

    /// Passes the text of each choice of a chunk through every guardrail: the texts that came
    /// out changed, by choice index.
    pub async fn filter(
        &mut self,
        choices: &[openai::ChoiceText],
    ) -> Result<Vec<(usize, String)>, GatewayError> {
        let mut rewrites = Vec::new();
        for choice in choices {
            let finished = choice.finish_reason.is_some();
            let index = choice.index as u32;
            let mut text = choice.text.clone();
            for guard in &mut self.guards {
                text = guard.pass(index, text, finished).await?;
            }
            if text != choice.text {
                rewrites.push((choice.index, text));
            }
        }
        Ok(rewrites)
    }

    /// At the end of a stream that never finished a choice: the text still held back, released
    /// as the last delta of each choice.
    pub async fn flush(&mut self) -> Result<Vec<(u32, String)>, GatewayError> {
        let mut holding: Vec<u32> = self
            .guards
            .iter()
            .flat_map(|g| g.choices.iter())
            .filter(|(_, c)| !c.held.is_empty())
            .map(|(index, _)| *index)
            .collect();
        holding.sort_unstable();
        holding.dedup();
        let mut released = Vec::new();
        for index in holding {
            let mut text = String::new();
            for guard in &mut self.guards {
                text = guard.pass(index, text, true).await?;
            }
            if !text.is_empty() {
                released.push((index, text));
            }
        }
        Ok(released)
    }

    /// Each guardrail's outcome over the whole stream so far.
    pub fn outcomes(&self) -> Outcomes {
        self.guards
            .iter()
            .map(|g| (g.name.clone(), g.outcome))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extension::{ready, BoxFuture};
    use crate::providers::JsonObject;
    use serde_json::json;

    /// Holds text until it ends in a space (or the choice finishes), then releases it upper-cased;
    /// blocks on the word "stop".
    struct Shouting;

    impl StreamCheck for Shouting {
        fn check<'a>(
            &'a mut self,
            delta: StreamDelta<'a>,
        ) -> BoxFuture<'a, Result<StreamVerdict, GatewayError>> {
            ready(Ok(if delta.text.contains("stop") {
                StreamVerdict::Block {
                    reason: "stop seen".into(),
                }
            } else if delta.finished || delta.text.ends_with(' ') {
                StreamVerdict::Release(delta.text.to_uppercase())
            } else {
                StreamVerdict::Hold
            }))
        }
    }

    /// Answers every delta the same.
    struct Always(fn() -> Result<StreamVerdict, GatewayError>);

    impl StreamCheck for Always {
        fn check<'a>(
            &'a mut self,
            _delta: StreamDelta<'a>,
        ) -> BoxFuture<'a, Result<StreamVerdict, GatewayError>> {
            ready((self.0)())
        }
    }

    /// Records what it saw and appends "!" to every delta.
    struct Marking(Vec<(String, String, bool)>);

    impl StreamCheck for Marking {
        fn check<'a>(
            &'a mut self,
            delta: StreamDelta<'a>,
        ) -> BoxFuture<'a, Result<StreamVerdict, GatewayError>> {
            self.0
                .push((delta.text.into(), delta.released.into(), delta.finished));
            ready(Ok(StreamVerdict::Release(format!("{}!", delta.text))))
        }
    }

    fn guards(checks: Vec<(bool, Box<dyn StreamCheck>)>) -> StreamGuards {
        StreamGuards {
            guards: checks
                .into_iter()
                .enumerate()
                .map(|(i, (monitor, check))| StreamGuard {
                    name: format!("g{i}"),
                    monitor,
                    check,
                    choices: Vec::new(),
                    outcome: "allow",
                })
                .collect(),
        }
    }

    fn chunk(text: &str, finished: bool) -> JsonObject {
        let reason = if finished { json!("stop") } else { json!(null) };
        json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": reason}]})
            .as_object()
            .cloned()
            .expect("an object")
    }

    /// What the client receives for each upstream delta.
    async fn run(
        guards: &mut StreamGuards,
        deltas: &[(&str, bool)],
    ) -> Vec<Result<String, String>> {
        let mut out = Vec::new();
        for (text, finished) in deltas {
            let mut chunk = chunk(text, *finished);
            out.push(match guards.filter(&openai::choice_texts(&chunk)).await {
                Ok(rewrites) => {
                    for (index, text) in rewrites {
                        openai::set_choice_text(&mut chunk, index, text);
                    }
                    Ok(openai::choice_texts(&chunk)[0].text.clone())
                }
                Err(e) => Err(e.to_string()),
            });
        }
        out
    }

    #[tokio::test]
    async fn held_text_is_prepended_to_the_next_delta_and_released_at_the_end() {
        let mut g = guards(vec![(false, Box::new(Shouting))]);
        let out = run(
            &mut g,
            &[("he", false), ("llo ", false), ("wor", false), ("ld", true)],
        )
        .await;
        assert_eq!(
            out,
            [
                Ok("".into()),
                Ok("HELLO ".into()),
                Ok("".into()),
                Ok("WORLD".into())
            ]
        );
        assert_eq!(g.outcomes(), [("g0".to_owned(), "rewrite")]);
    }

    #[tokio::test]
    async fn each_guardrail_sees_what_the_one_before_released() {
        let mut g = guards(vec![
            (false, Box::new(Shouting)),
            (false, Box::new(Marking(Vec::new()))),
        ]);
        let out = run(&mut g, &[("a", false), ("b ", false), ("c", true)]).await;
        assert_eq!(out, [Ok("".into()), Ok("AB !".into()), Ok("C!".into())]);
    }

    #[tokio::test]
    async fn a_guardrail_shown_a_choice_is_shown_its_end_even_when_empty() {
        let mut g = guards(vec![(false, Box::new(Marking(Vec::new())))]);
        let out = run(&mut g, &[("a", false), ("", false), ("", true)]).await;
        assert_eq!(out, [Ok("a!".into()), Ok("".into()), Ok("!".into())]);

        // A choice without text is never shown, not even its end.
        let mut g = guards(vec![(false, Box::new(Marking(Vec::new())))]);
        assert_eq!(
            run(&mut g, &[("", false), ("", true)]).await,
            [Ok("".into()), Ok("".into())]
        );
    }

    #[tokio::test]
    async fn a_block_ends_the_stream_but_a_monitor_only_logs() {
        let mut g = guards(vec![(false, Box::new(Shouting))]);
        let out = run(&mut g, &[("go ", false), ("stop ", false)]).await;
        assert_eq!(out[0], Ok("GO ".into()));
        let error = out[1].clone().expect_err("blocked");
        assert!(
            error.contains("'g0'") && error.contains("stop seen"),
            "{error}"
        );
        assert_eq!(g.outcomes(), [("g0".to_owned(), "block")]);

        let mut g = guards(vec![(true, Box::new(Shouting))]);
        let out = run(&mut g, &[("go", false), ("stop ", false), ("x", true)]).await;
        assert_eq!(out, [Ok("go".into()), Ok("stop ".into()), Ok("x".into())]);
        assert_eq!(g.outcomes(), [("g0".to_owned(), "block")]);
    }

    #[tokio::test]
    async fn a_stream_cut_short_releases_what_is_held_and_released_text_is_shown() {
        let marking = Box::new(Marking(Vec::new()));
        let mut g = guards(vec![(false, Box::new(Shouting)), (false, marking)]);
        assert_eq!(
            run(&mut g, &[("one ", false), ("tw", false)]).await[1],
            Ok("".into())
        );
        assert_eq!(g.flush().await.expect("flushed"), [(0, "TW!".to_owned())]);
        assert!(g.flush().await.expect("nothing left").is_empty());
    }

    #[tokio::test]
    async fn holding_the_last_delta_or_too_much_is_an_error() {
        let mut g = guards(vec![(false, Box::new(Always(|| Ok(StreamVerdict::Hold))))]);
        let out = run(&mut g, &[("a", false), ("b", true)]).await;
        assert!(
            out[1].as_ref().is_err_and(|e| e.contains("at its end")),
            "{out:?}"
        );

        let mut g = guards(vec![(false, Box::new(Always(|| Ok(StreamVerdict::Hold))))]);
        let big = "x".repeat(MAX_HELD_BYTES);
        let out = run(&mut g, &[(&big, false), ("y", false)]).await;
        assert_eq!(out[0], Ok("".into()));
        assert!(out[1].is_err(), "{out:?}");
    }

    #[tokio::test]
    async fn a_failing_monitor_changes_nothing_and_released_text_stays_bounded() {
        let mut g = guards(vec![(
            true,
            Box::new(Always(|| Err(GatewayError::PluginFailed("boom".into())))),
        )]);
        let out = run(&mut g, &[("a", false), ("b", true)]).await;
        assert_eq!(out, [Ok("a".into()), Ok("b".into())]);
        assert_eq!(g.outcomes(), [("g0".to_owned(), "error")]);

        let mut g = guards(vec![(false, Box::new(Marking(Vec::new())))]);
        let piece = "é".repeat(100);
        let deltas: Vec<(&str, bool)> = (0..500).map(|_| (piece.as_str(), false)).collect();
        run(&mut g, &deltas).await;
        let released = &g.guards[0].choices[0].1.released;
        assert!(
            released.len() <= 2 * RELEASED_TAIL + piece.len() + 1,
            "{}",
            released.len()
        );
        assert!(released.ends_with(&format!("{piece}!")));
    }
}
