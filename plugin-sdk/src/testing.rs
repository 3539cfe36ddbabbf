//! Stand-ins for the gateway's imports when plugin code runs natively, as in `cargo test`.
//!
//! State is per thread, so parallel tests do not see each other's. On wasm these functions still
//! exist (so test code type-checks for every target) but the gateway's imports are used instead.

use crate::LogLevel;
use std::cell::RefCell;

thread_local! {
    static REQUEST_BODY: RefCell<Option<String>> = const { RefCell::new(None) };
    static LOGS: RefCell<Vec<(LogLevel, String)>> = const { RefCell::new(Vec::new()) };
}

/// Makes [`crate::request_body`] return `body` on this thread.
pub fn set_request_body(body: impl Into<String>) {
    let body = body.into();
    REQUEST_BODY.with(|cell| *cell.borrow_mut() = Some(body));
}

/// Makes [`crate::request_body`] return `None` on this thread again.
pub fn clear_request_body() {
    REQUEST_BODY.with(|cell| *cell.borrow_mut() = None);
}

/// Returns, and forgets, what [`crate::log`] recorded on this thread (native builds only).
pub fn take_logs() -> Vec<(LogLevel, String)> {
    LOGS.with(|cell| std::mem::take(&mut *cell.borrow_mut()))
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn request_body() -> Option<String> {
    REQUEST_BODY.with(|cell| cell.borrow().clone())
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn record_log(level: LogLevel, message: &str) {
    eprintln!("[plugin {level}] {message}");
    LOGS.with(|cell| cell.borrow_mut().push((level, message.to_string())));
}

#[cfg(test)]
mod tests {
    use crate::{log, request_body, testing, LogLevel};

    #[test]
    fn request_body_is_per_thread_and_clearable() {
        assert_eq!(request_body(), None);
        testing::set_request_body(r#"{"model":"m"}"#);
        assert_eq!(request_body().as_deref(), Some(r#"{"model":"m"}"#));
        std::thread::spawn(|| assert_eq!(request_body(), None))
            .join()
            .expect("thread");
        testing::clear_request_body();
        assert_eq!(request_body(), None);
    }

    #[test]
    fn logs_are_recorded() {
        log::info("hello");
        log::error(format!("bad {}", 1));
        assert_eq!(
            testing::take_logs(),
            vec![
                (LogLevel::Info, "hello".to_string()),
                (LogLevel::Error, "bad 1".to_string())
            ]
        );
        assert!(testing::take_logs().is_empty());
    }
}
