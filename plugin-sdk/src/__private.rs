//! Support code for the [`crate::export!`] expansion; not part of the public API.

use crate::{Config, Plugin};
use std::sync::OnceLock;

/// `lifecycle.init`: builds the plugin and keeps it for the instance's lifetime.
pub fn init<T: Plugin>(cell: &OnceLock<T>, config: String) -> Result<(), String> {
    if cell.get().is_some() {
        return Err("init was called twice on the same instance".into());
    }
    let plugin = T::init(Config::new(config))?;
    cell.set(plugin)
        .map_err(|_| "init was called twice on the same instance".to_string())
}

/// The instance `init` built. A call before a successful `init` is a gateway bug; guessing a
/// verdict could let a request through that should have been blocked, so it traps instead.
pub fn instance<T>(cell: &OnceLock<T>) -> &T {
    match cell.get() {
        Some(plugin) => plugin,
        None => not_initialised(),
    }
}

#[cold]
fn not_initialised() -> ! {
    const MESSAGE: &str = "plugin called before lifecycle.init succeeded";
    crate::log::error(MESSAGE);
    panic!("{MESSAGE}");
}

#[cfg(test)]
mod tests {
    use super::{init, instance};
    use crate::{Config, Plugin};
    use std::sync::OnceLock;

    #[derive(Debug)]
    struct Echo(String);

    impl Plugin for Echo {
        fn init(config: Config) -> Result<Self, String> {
            if config.json() == "bad" {
                return Err("bad config".into());
            }
            Ok(Self(config.json().to_string()))
        }
    }

    #[test]
    fn init_stores_once() {
        let cell = OnceLock::new();
        init::<Echo>(&cell, "{}".into()).expect("first init");
        assert_eq!(instance(&cell).0, "{}");
        let err = init::<Echo>(&cell, "{}".into()).expect_err("second init");
        assert!(err.contains("twice"));
    }

    #[test]
    fn init_errors_pass_through() {
        let cell = OnceLock::new();
        assert_eq!(init::<Echo>(&cell, "bad".into()), Err("bad config".into()));
        assert!(cell.get().is_none());
    }

    #[test]
    #[should_panic(expected = "before lifecycle.init")]
    fn calls_before_init_trap() {
        let cell = OnceLock::<Echo>::new();
        let _ = instance(&cell);
    }
}
