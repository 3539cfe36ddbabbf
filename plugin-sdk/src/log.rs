//! Logging into the gateway's log, tagged with the plugin's name and the current call id.
//!
//! Natively (unit tests) messages go to stderr and to [`crate::testing::take_logs`].

use crate::LogLevel;

/// Logs `message` at `level`.
pub fn log(level: LogLevel, message: impl AsRef<str>) {
    let message = message.as_ref();
    #[cfg(target_arch = "wasm32")]
    {
        crate::__bindings::guardrail::portcullis::plugin::host::log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        crate::testing::record_log(level, message);
    }
}

/// Logs at trace level.
pub fn trace(message: impl AsRef<str>) {
    log(LogLevel::Trace, message);
}

/// Logs at debug level.
pub fn debug(message: impl AsRef<str>) {
    log(LogLevel::Debug, message);
}

/// Logs at info level.
pub fn info(message: impl AsRef<str>) {
    log(LogLevel::Info, message);
}

/// Logs at warn level.
pub fn warn(message: impl AsRef<str>) {
    log(LogLevel::Warn, message);
}

/// Logs at error level.
pub fn error(message: impl AsRef<str>) {
    log(LogLevel::Error, message);
}
