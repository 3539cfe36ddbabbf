//! A guardrail and enricher written against `portcullis:plugin@0.1.0` without the SDK, as a
//! plugin built before 0.2.0 was: the request arrives as a record, the body through
//! `host.request-body`.
//!
//! - check-request blocks a message containing `forbidden`, naming the model and team it saw;
//!   a message `echo the body` is blocked with the body the host gave back.
//! - check-stream upper-cases each delta.
//! - enrich tags the call `contract-0.1`.

wit_bindgen::generate!({
    path: "../../../plugin-sdk/wit/0.1.0",
    inline: "
        package test:contract-v0-1;
        world legacy {
            import portcullis:plugin/host@0.1.0;
            export portcullis:plugin/guardrail@0.1.0;
            export portcullis:plugin/enricher@0.1.0;
        }
    ",
    world: "legacy",
    generate_all,
});

use exports::portcullis::plugin::enricher::{self, Enrichment};
use exports::portcullis::plugin::guardrail::{
    self, RequestVerdict, ResponseVerdict, StreamVerdict,
};
use portcullis::plugin::types::{Request, Response, StreamDelta};

// Exported only when built as a component: natively (`cargo test`, `cargo build` of the
// workspace) the export glue's symbol names do not link.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
struct Legacy;

impl guardrail::Guest for Legacy {
    fn check_request(request: Request) -> RequestVerdict {
        let said = |word: &str| request.messages.iter().any(|m| m.content.contains(word));
        if said("echo the body") {
            let body = portcullis::plugin::host::request_body().unwrap_or_default();
            return RequestVerdict::Block(format!("body: {body}"));
        }
        if said("forbidden") {
            let team = request.team.as_deref().unwrap_or("none");
            return RequestVerdict::Block(format!(
                "0.1.0 plugin blocked a call to {} for team {team}",
                request.model
            ));
        }
        RequestVerdict::Allow
    }

    fn check_response(_request: Request, _response: Response) -> ResponseVerdict {
        ResponseVerdict::Allow
    }

    fn check_stream(delta: StreamDelta) -> StreamVerdict {
        StreamVerdict::Release(delta.text.to_uppercase())
    }
}

impl enricher::Guest for Legacy {
    fn enrich(_request: Request) -> Enrichment {
        Enrichment {
            metadata: Vec::new(),
            tags: vec!["contract-0.1".into()],
            model: None,
        }
    }
}

#[cfg(target_arch = "wasm32")]
export!(Legacy);
