//! Stand-ins for the gateway's imports when plugin code runs natively, as in `cargo test`.
//!
//! State is per thread, so parallel tests do not see each other's. On wasm these functions still
//! exist (so test code type-checks for every target) but the gateway's imports are used instead.

use crate::LogLevel;
use std::cell::RefCell;

thread_local! {
    static LOGS: RefCell<Vec<(LogLevel, String)>> = const { RefCell::new(Vec::new()) };
}

/// Returns, and forgets, what [`crate::log`] recorded on this thread (native builds only).
pub fn take_logs() -> Vec<(LogLevel, String)> {
    LOGS.with(|cell| std::mem::take(&mut *cell.borrow_mut()))
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn record_log(level: LogLevel, message: &str) {
    eprintln!("[plugin {level}] {message}");
    LOGS.with(|cell| cell.borrow_mut().push((level, message.to_string())));
}

#[cfg(test)]
mod tests {
    use crate::{log, testing, LogLevel};

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
