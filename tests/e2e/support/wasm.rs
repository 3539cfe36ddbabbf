//! The `.wasm` components the tests load: the shipped plugins (`plugins/build`) and the test
//! plugins, all built by `tests/run` into the workspace's `wasm32-wasip2` release directory.

use std::path::PathBuf;

/// Where the components are built: beside the target directory this test runs from
/// (`<target>/<profile>/deps/`), else the workspace's.
pub fn dir() -> PathBuf {
    let target = std::env::current_exe()
        .ok()
        .and_then(|test| Some(test.parent()?.parent()?.parent()?.to_owned()));
    match target {
        Some(target) if target.join("wasm32-wasip2").is_dir() => {
            target.join("wasm32-wasip2/release")
        }
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release"),
    }
}

/// The built component of the crate `crate_name` (underscores, as cargo names the file).
pub fn built(crate_name: &str) -> PathBuf {
    let path = dir().join(format!("{crate_name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: tests/run builds it (plugins/build, then the test plugins)",
        path.display()
    );
    path
}
