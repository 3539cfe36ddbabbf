//! Routes for operators: `GET /admin/status`, what the gateway is serving and how its last reload
//! went. Master key only (or anyone, on a gateway with no keys at all).

use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use serde_json::{json, Value};

use crate::pipeline::authenticate;
use crate::pipeline::respond::{error_response, json_response, ResponseBody};
use crate::reload::Reloader;

/// `GET /admin/status`.
pub async fn status(reloader: &Reloader, headers: &HeaderMap) -> Response<ResponseBody> {
    let generation = reloader.current();
    if let Err(err) = authenticate::require_master(&generation, headers).await {
        return error_response(&err, None);
    }
    let plugins: Vec<Value> = generation
        .plugins
        .iter()
        .map(|plugin| {
            json!({
                "name": &*plugin.name,
                "path": plugin.path.display().to_string(),
                "kinds": plugin.kinds(),
                "sha256": plugin.content_hash,
                "failures": plugin.failures(),
                "calls": plugin.call_times(),
            })
        })
        .collect();
    let reloads = reloader.status();
    let last_error = reloads
        .last_error
        .as_ref()
        .map(|(at, message)| json!({ "at": timestamp(*at), "message": message }));
    let body = json!({
        "generation": {
            "number": generation.number,
            "loaded_at": timestamp(generation.loaded_at),
            "config": reloader.config_path().display().to_string(),
        },
        "plugins": plugins,
        "reloads": {
            "succeeded": reloads.succeeded,
            "failed": reloads.failed,
            "last_error": last_error,
            "last_duration_ms": reloads.last_duration.map(|d| d.as_secs_f64() * 1000.0),
        },
        "post_call": { "dropped": generation.post_call.dropped() },
        "store": generation.governance.as_ref().map(|g| g.status()),
    });
    json_response(StatusCode::OK, Bytes::from(body.to_string()))
}

/// RFC 3339 in UTC with milliseconds, as logs and dashboards expect.
fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}
