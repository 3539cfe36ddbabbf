//! The host binding of `portcullis:plugin@0.1.0`, and conversions between the gateway's types and
//! that version's records. Each supported WIT version gets a module like this one.

use wasmtime::component::{HasSelf, Linker};

use super::store::StoreState;
use crate::call::CallRecord;
use crate::extension::Candidate;
use crate::openai::{self, ApiRequest, TextView};
use crate::providers::{JsonObject, UnreadableBody, Usage};

wasmtime::component::bindgen!({
    path: "../plugin-sdk/wit/0.1.0",
    world: "plugin",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use self::exports::portcullis::plugin::{enricher, guardrail, hook, lifecycle, router};
pub use self::portcullis::plugin::types;

/// The WIT package this module binds, as components name it.
pub const PACKAGE: &str = "portcullis:plugin@0.1.0";

/// Adds this version's host imports to the linker.
pub fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    Plugin::add_to_linker::<_, HasSelf<StoreState>>(linker, |state| state)
}

impl self::portcullis::plugin::types::Host for StoreState {}

/// Longest log message a plugin may write in one call; the rest is cut.
const MAX_LOG_MESSAGE: usize = 8 * 1024;

impl self::portcullis::plugin::host::Host for StoreState {
    async fn log(
        &mut self,
        level: self::portcullis::plugin::host::LogLevel,
        mut message: String,
    ) -> wasmtime::Result<()> {
        use self::portcullis::plugin::host::LogLevel;
        if message.len() > MAX_LOG_MESSAGE {
            let mut end = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let plugin = &*self.plugin;
        let call_id = self.scope.call_id.as_deref().unwrap_or("-");
        match level {
            LogLevel::Trace => {
                tracing::trace!(target: "portcullis::plugin", plugin, call_id, "{message}")
            }
            LogLevel::Debug => {
                tracing::debug!(target: "portcullis::plugin", plugin, call_id, "{message}")
            }
            LogLevel::Info => {
                tracing::info!(target: "portcullis::plugin", plugin, call_id, "{message}")
            }
            LogLevel::Warn => {
                tracing::warn!(target: "portcullis::plugin", plugin, call_id, "{message}")
            }
            LogLevel::Error => {
                tracing::error!(target: "portcullis::plugin", plugin, call_id, "{message}")
            }
        }
        Ok(())
    }

    async fn request_body(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(self
            .scope
            .request_body
            .as_ref()
            .and_then(|body| body.to_json().ok()))
    }
}

/// The request record plugins see.
pub fn request(
    call: &crate::call::Call,
    request: &ApiRequest,
) -> Result<types::Request, UnreadableBody> {
    Ok(types::Request {
        call_id: call.id.clone(),
        endpoint: call.endpoint.name().to_owned(),
        model: call.model.clone(),
        messages: request.texts()?.iter().map(message).collect(),
        stream: request.stream,
        key_alias: call.principal.as_ref().and_then(|p| p.alias.clone()),
        team: call.principal.as_ref().and_then(|p| p.team.clone()),
        end_user: call.end_user.clone(),
        metadata: serde_json::to_string(&call.metadata).unwrap_or_else(|_| "{}".into()),
        tags: call.tags.clone(),
    })
}

/// The response record plugins see, from a whole OpenAI response.
pub fn response(object: &JsonObject) -> types::Response {
    types::Response {
        model: object
            .get("model")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        choices: openai::choice_texts(object)
            .into_iter()
            .map(|choice| types::Choice {
                index: choice.index as u32,
                text: choice.text,
                finish_reason: choice.finish_reason,
            })
            .collect(),
        usage: Usage::from_object(object).map(usage),
    }
}

fn usage(u: Usage) -> types::Usage {
    types::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.total_tokens,
    }
}

pub fn stream_delta(delta: crate::extension::StreamDelta<'_>) -> types::StreamDelta {
    types::StreamDelta {
        choice_index: delta.choice_index,
        text: delta.text.to_owned(),
        released: delta.released.to_owned(),
        finished: delta.finished,
    }
}

fn message(view: &TextView) -> types::Message {
    types::Message {
        role: view.role.clone(),
        content: view.content.clone(),
        name: view.name.clone(),
        tool_calls: view
            .tool_calls
            .iter()
            .map(|(id, name, arguments)| types::ToolCall {
                id: id.clone(),
                name: name.clone(),
                arguments: arguments.clone(),
            })
            .collect(),
    }
}

pub fn candidate(c: &Candidate) -> router::Candidate {
    router::Candidate {
        id: c.id.clone(),
        weight: c.weight,
        in_flight: c.in_flight,
        latency_ms: c.latency_ms,
        rpm_used: c.rpm_used,
        tpm_used: c.tpm_used,
        rpm_limit: c.rpm_limit,
        tpm_limit: c.tpm_limit,
        input_cost_per_token: c.input_cost_per_token,
        output_cost_per_token: c.output_cost_per_token,
    }
}

pub fn call_event(record: &CallRecord) -> hook::CallEvent {
    hook::CallEvent {
        call_id: record.call_id.clone(),
        endpoint: record.endpoint.name().to_owned(),
        key_alias: record.key_alias.clone(),
        team: record.team.clone(),
        model: record.model.clone(),
        deployment: record.deployment.clone(),
        stream: record.stream,
        end_user: record.end_user.clone(),
        usage: record.usage.map(usage),
        cost_usd: record.cost,
        latency_ms: record.latency.as_secs_f64() * 1000.0,
        status: record.outcome.status(),
        error: record.outcome.error().map(str::to_owned),
        attempts: record.attempts,
        fallbacks: record.fallbacks,
        started_at_ms: record
            .started_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        metadata: serde_json::to_string(&record.metadata).unwrap_or_else(|_| "{}".into()),
        tags: record.tags.clone(),
        guardrails: record
            .guardrails
            .iter()
            .map(|(name, outcome)| hook::GuardrailOutcome {
                name: name.clone(),
                outcome: (*outcome).to_owned(),
            })
            .collect(),
    }
}
