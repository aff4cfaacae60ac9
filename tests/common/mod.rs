//! What the tests that build DSpark's plugin share: paths, the gate, and the plugin build.
#![allow(dead_code)] // each test binary uses a part

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>` of the running test binary.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

pub fn release() -> bool {
    profile_dir().file_name().is_some_and(|n| n == "release")
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn model() -> PathBuf {
    std::env::var_os("DSPARK_MODEL").map_or_else(|| root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"), PathBuf::from)
}

/// Runs `cmd`, panics with its output unless it succeeds, returns stdout + stderr.
pub fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// Whether the slow plugin tests run: `DSPARK_PLUGIN_TEST=1` (CI sets it). Under CI=true a
/// skip is a failure: nothing may skip silently there.
pub fn plugin_tests_enabled() -> bool {
    if std::env::var("DSPARK_PLUGIN_TEST").is_ok_and(|v| v == "1") {
        assert!(model().exists(), "model {} missing (run scripts/setup.sh)", model().display());
        return true;
    }
    assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI=true but DSPARK_PLUGIN_TEST is not 1: the plugin tests would be skipped");
    println!("skipped: set DSPARK_PLUGIN_TEST=1 to build DSpark's plugin and test it");
    false
}

/// Builds `libdspark.so` with the `plugin` feature in `target/plugin` (its llama.cpp is
/// shared; the main build's is static) and returns the target folder's profile dir.
pub fn build_plugin() -> PathBuf {
    let plugin_target = profile_dir().parent().unwrap().join("plugin");
    let dir = plugin_target.join(if release() { "release" } else { "debug" });
    // llama-cpp-sys-2's build script, when it reruns (an environment change), links its shared
    // libraries into these folders again and fails on the links it left, now dangling.
    for sub in ["", "deps", "examples"] {
        for e in std::fs::read_dir(dir.join(sub)).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_symlink()) && std::fs::metadata(e.path()).is_err() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut b = cargo();
    b.args(["build", "--lib", "--features", "plugin", "--target-dir"]).arg(&plugin_target).current_dir(root());
    if release() {
        b.arg("--release");
    }
    run(&mut b, "cargo build --features plugin");
    dir
}

/// The folder of stock llama.cpp's tools and shared libraries for the pinned llama.cpp, built
/// with dynamically loaded backends by `scripts/llama-tools.sh` (cached outside the clone).
pub fn llama_tools() -> PathBuf {
    // Its progress goes to stderr (shown), the folder to stdout.
    let out = Command::new("bash").arg(root().join("scripts/llama-tools.sh")).stderr(Stdio::inherit()).output().expect("scripts/llama-tools.sh");
    assert!(out.status.success(), "scripts/llama-tools.sh failed ({})", out.status);
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().expect("llama-tools.sh prints the bin folder").trim());
    assert!(bin.join("llama-completion").exists(), "no llama-completion in {}", bin.display());
    bin
}
