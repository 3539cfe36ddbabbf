//! Shared end-to-end test support: a mock upstream provider, the gateway process harness, an HTTP client.
#![allow(dead_code)] // each test binary uses a different subset of the support code

pub mod client;
pub mod fixtures;
pub mod gateway;
pub mod mock_upstream;
pub mod wasm;

use std::time::{Duration, Instant};

// Convenience re-exports; like the rest of the module, not every test binary uses each one.
#[allow(unused_imports)]
pub use gateway::{Gateway, GatewayBuilder, TempDir};
#[allow(unused_imports)]
pub use mock_upstream::{Fault, MockUpstream, RecordedRequest};

/// Replace the `{upstream}` placeholder in a test config with the mock's base URL.
pub fn fill(yaml: &str, upstream: &MockUpstream) -> String {
    yaml.replace("{upstream}", &upstream.url())
}

/// Poll `condition` every 10 ms until it holds (true) or `timeout` passes (false).
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if started.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
