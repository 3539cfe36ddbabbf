//! Stage 4: pre-call guardrails, in configured order. A block ends the call with an error naming
//! the guardrail; a rewrite replaces the body and is what the next guardrail sees.

use crate::call::Call;
use crate::error::GatewayError;
use crate::extension::Verdict;
use crate::generation::Generation;
use crate::openai::ApiRequest;

pub async fn pre_call(
    generation: &Generation,
    call: &Call,
    request: &mut ApiRequest,
) -> Result<(), GatewayError> {
    for guardrail in &generation.guardrails {
        match guardrail.check_request(call, request).await? {
            Verdict::Allow => {}
            Verdict::Block { reason } => {
                return Err(GatewayError::Blocked {
                    message: format!("blocked by the guardrail '{}': {reason}", guardrail.name()),
                })
            }
            Verdict::Rewrite(body) => {
                // A rewrite must still be a valid request: check it as if a client had sent it.
                *request = ApiRequest::from_object(request.endpoint, body)?;
            }
        }
    }
    Ok(())
}
