//! What every supported WIT version's host module shares.
//!
//! Versions differ in a few functions, but most records keep their shape from one version to the
//! next, and `bindgen!` makes distinct Rust types of them for each version. [`same_shape_items!`]
//! writes the code over those records once; each version module expands it over its own types.

/// Expands, in a version module, the items whose code is the same for every version: the export
/// lookup, the lifecycle and hook calls, and the conversions of the records that kept
/// their shape. The module must have `lifecycle`, `guardrail`, `enricher`, `router`, `hook` and
/// `types` in scope, as `bindgen!` names them.
macro_rules! same_shape_items {
    () => {
        /// Which interfaces of this version a component exports.
        pub struct Exports {
            lifecycle: Option<lifecycle::GuestIndices>,
            guardrail: Option<guardrail::GuestIndices>,
            enricher: Option<enricher::GuestIndices>,
            router: Option<router::GuestIndices>,
            hook: Option<hook::GuestIndices>,
        }

        impl Exports {
            /// The kinds this version's interfaces make of the component; `None` if it exports
            /// none of them.
            pub fn of(
                pre: &wasmtime::component::InstancePre<$crate::plugins::store::StoreState>,
            ) -> Option<Exports> {
                let exports = Exports {
                    lifecycle: lifecycle::GuestIndices::new(pre).ok(),
                    guardrail: guardrail::GuestIndices::new(pre).ok(),
                    enricher: enricher::GuestIndices::new(pre).ok(),
                    router: router::GuestIndices::new(pre).ok(),
                    hook: hook::GuestIndices::new(pre).ok(),
                };
                (exports.kinds() != $crate::plugins::Kinds::default()).then_some(exports)
            }

            pub fn kinds(&self) -> $crate::plugins::Kinds {
                $crate::plugins::Kinds {
                    guardrail: self.guardrail.is_some(),
                    enricher: self.enricher.is_some(),
                    router: self.router.is_some(),
                    hook: self.hook.is_some(),
                }
            }
        }

        /// The exports one instance has been called through, looked up once: a lookup
        /// type-checks the functions again.
        #[derive(Default)]
        pub struct Guests {
            guardrail: Option<guardrail::Guest>,
            enricher: Option<enricher::Guest>,
            router: Option<router::Guest>,
            hook: Option<hook::Guest>,
        }

        fn missing(interface: &str) -> wasmtime::Error {
            wasmtime::format_err!("the component does not export {interface}")
        }

        fn guardrail_guest<'g>(
            exports: &Exports,
            guests: &'g mut Guests,
            store: &mut wasmtime::Store<$crate::plugins::store::StoreState>,
            instance: &wasmtime::component::Instance,
        ) -> wasmtime::Result<&'g guardrail::Guest> {
            let indices = exports
                .guardrail
                .as_ref()
                .ok_or_else(|| missing("guardrail"))?;
            $crate::plugins::cached(&mut guests.guardrail, || indices.load(store, instance))
        }

        fn enricher_guest<'g>(
            exports: &Exports,
            guests: &'g mut Guests,
            store: &mut wasmtime::Store<$crate::plugins::store::StoreState>,
            instance: &wasmtime::component::Instance,
        ) -> wasmtime::Result<&'g enricher::Guest> {
            let indices = exports
                .enricher
                .as_ref()
                .ok_or_else(|| missing("enricher"))?;
            $crate::plugins::cached(&mut guests.enricher, || indices.load(store, instance))
        }

        /// Runs `init` if the component exports `lifecycle`; `Ok(Err(..))` is its refusal.
        pub async fn init(
            exports: &Exports,
            store: &mut wasmtime::Store<$crate::plugins::store::StoreState>,
            instance: &wasmtime::component::Instance,
            config_json: &str,
        ) -> wasmtime::Result<Result<(), String>> {
            match &exports.lifecycle {
                Some(indices) => {
                    let lifecycle = indices.load(&mut *store, instance)?;
                    lifecycle.call_init(store, config_json).await
                }
                None => Ok(Ok(())),
            }
        }

        fn router_guest<'g>(
            exports: &Exports,
            guests: &'g mut Guests,
            store: &mut wasmtime::Store<$crate::plugins::store::StoreState>,
            instance: &wasmtime::component::Instance,
        ) -> wasmtime::Result<&'g router::Guest> {
            let indices = exports.router.as_ref().ok_or_else(|| missing("router"))?;
            $crate::plugins::cached(&mut guests.router, || indices.load(store, instance))
        }

        pub async fn on_call_end(
            exports: &Exports,
            guests: &mut Guests,
            store: &mut wasmtime::Store<$crate::plugins::store::StoreState>,
            instance: &wasmtime::component::Instance,
            record: &$crate::call::CallRecord,
        ) -> wasmtime::Result<()> {
            let indices = exports.hook.as_ref().ok_or_else(|| missing("hook"))?;
            let guest =
                $crate::plugins::cached(&mut guests.hook, || indices.load(&mut *store, instance))?;
            let event = call_event(record);
            if record.outcome == $crate::call::Outcome::Success {
                guest.call_on_success(store, &event).await
            } else {
                guest.call_on_failure(store, &event).await
            }
        }

        fn request_verdict(verdict: guardrail::RequestVerdict) -> $crate::plugins::TextVerdict {
            use $crate::plugins::TextVerdict;
            match verdict {
                guardrail::RequestVerdict::Allow => TextVerdict::Allow,
                guardrail::RequestVerdict::Block(reason) => TextVerdict::Block(reason),
                guardrail::RequestVerdict::Rewrite(rewrites) => TextVerdict::Rewrite(
                    rewrites
                        .into_iter()
                        .map(|r| (r.index as usize, r.content))
                        .collect(),
                ),
            }
        }

        fn response_verdict(verdict: guardrail::ResponseVerdict) -> $crate::plugins::TextVerdict {
            use $crate::plugins::TextVerdict;
            match verdict {
                guardrail::ResponseVerdict::Allow => TextVerdict::Allow,
                guardrail::ResponseVerdict::Block(reason) => TextVerdict::Block(reason),
                guardrail::ResponseVerdict::Rewrite(rewrites) => TextVerdict::Rewrite(
                    rewrites
                        .into_iter()
                        .map(|r| (r.index as usize, r.text))
                        .collect(),
                ),
            }
        }

        fn stream_verdict(verdict: guardrail::StreamVerdict) -> $crate::extension::StreamVerdict {
            use $crate::extension::StreamVerdict;
            match verdict {
                guardrail::StreamVerdict::Release(text) => StreamVerdict::Release(text),
                guardrail::StreamVerdict::Hold => StreamVerdict::Hold,
                guardrail::StreamVerdict::Block(reason) => StreamVerdict::Block { reason },
            }
        }

        fn enrichment(enrichment: enricher::Enrichment) -> $crate::extension::Enrichment {
            $crate::plugins::enrichment(enrichment.metadata, enrichment.tags, enrichment.model)
        }

        /// The response record plugins see, from a whole OpenAI response.
        fn response(view: &$crate::openai::ResponseView) -> types::Response {
            types::Response {
                model: view.model.clone(),
                choices: view
                    .choices
                    .iter()
                    .map(|choice| types::Choice {
                        index: choice.index as u32,
                        text: choice.text.clone(),
                        finish_reason: choice.finish_reason.clone(),
                    })
                    .collect(),
                usage: view.usage.map(usage),
            }
        }

        fn usage(u: $crate::providers::Usage) -> types::Usage {
            types::Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                total_tokens: u.total_tokens,
            }
        }

        fn stream_delta(delta: &$crate::extension::StreamDelta<'_>) -> types::StreamDelta {
            types::StreamDelta {
                choice_index: delta.choice_index,
                text: delta.text.to_owned(),
                released: delta.released.to_owned(),
                finished: delta.finished,
            }
        }

        fn message(view: &$crate::openai::TextView) -> types::Message {
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

        fn candidate(c: &$crate::extension::Candidate) -> router::Candidate {
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

        fn call_event(record: &$crate::call::CallRecord) -> hook::CallEvent {
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

        impl From<self::portcullis::plugin::host::LogLevel> for tracing::Level {
            fn from(level: self::portcullis::plugin::host::LogLevel) -> tracing::Level {
                use self::portcullis::plugin::host::LogLevel;
                match level {
                    LogLevel::Trace => tracing::Level::TRACE,
                    LogLevel::Debug => tracing::Level::DEBUG,
                    LogLevel::Info => tracing::Level::INFO,
                    LogLevel::Warn => tracing::Level::WARN,
                    LogLevel::Error => tracing::Level::ERROR,
                }
            }
        }
    };
}

pub(super) use same_shape_items;
