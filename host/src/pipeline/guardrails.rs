//! Stage 4: pre-call guardrails, in configured order. A block ends the call with an error naming
//! the guardrail; a rewrite replaces the body and is what the next guardrail sees. A guardrail runs
//! when it is `default_on`, or when the caller's key or the request's `guardrails` field names it.

use crate::call::Call;
use crate::error::GatewayError;
use crate::extension::Verdict;
use crate::generation::Generation;
use crate::openai::ApiRequest;

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
    for slot in &generation.guardrails {
        let name = slot.guardrail.name();
        let named = |names: &[String]| names.iter().any(|n| n == name);
        let key_names = call
            .principal
            .as_ref()
            .map_or(&[][..], |p| &p.guardrails[..]);
        if !(slot.default_on || named(key_names) || named(&request.guardrails)) {
            continue;
        }
        let verdict = match slot.guardrail.check_request(call, request).await {
            Ok(verdict) => verdict,
            Err(err) => {
                call.guardrails.push((name.to_owned(), "error"));
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
            tracing::info!(
                guardrail = name,
                outcome,
                "guardrail verdict (monitor only)"
            );
            continue;
        }
        match verdict {
            Verdict::Allow => {}
            Verdict::Block { reason } => {
                return Err(GatewayError::Blocked {
                    guardrail: name.to_owned(),
                    reason,
                })
            }
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
