//! Helpers shared by the end-to-end test files: locating the workspace and the `bmc`
//! executable the tests run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("the workspace directory")
}

/// The cargo profile directory the calling test was built into (`debug` or `release`),
/// from the test executable's own path (`<target>/<profile>/deps/<test>-…`).
pub fn profile() -> String {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.ancestors()
        .filter_map(|a| a.file_name()?.to_str())
        .find(|n| *n == "debug" || *n == "release")
        .map(str::to_string)
        .unwrap_or_else(|| if cfg!(debug_assertions) { "debug".into() } else { "release".into() })
}

/// The workspace's `bmc` executable (`<target>/<profile>/bmc`), built first.
pub fn bmc_exe() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let ws = workspace();
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(t) if Path::new(&t).is_absolute() => PathBuf::from(t),
            Some(t) => ws.join(t),
            None => ws.join("target"),
        };
        let profile = profile();
        let bin = target.join(&profile).join(format!("bmc{}", std::env::consts::EXE_SUFFIX));
        // Make sure the executable is current (a no-op after `cargo test --workspace`
        // built everything; it rebuilds a stale one). If that fails (say, the tree is
        // mid-edit) but an executable exists, test that one.
        let mut build = Command::new(env!("CARGO"));
        // The same targets (and so the same feature set) as `cargo test --workspace`, which
        // has built them already: `-p bmc` alone would resolve features differently and
        // rebuild half the dependencies on a cold cache (minutes in CI).
        build.args(["build", "--workspace", "--all-targets"]).current_dir(&ws);
        if profile == "release" {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success() || bin.exists(), "cargo build --workspace --all-targets failed");
        assert!(bin.exists(), "no bmc executable at {}", bin.display());
        bin
    })
}
