//! The plugin path: libdspark.so built with the `plugin` feature is loaded by a stock
//! llama.cpp built as shared libraries with GGML_BACKEND_DL (`scripts/llama-tools.sh`'s
//! build) through `GGML_BACKEND_PATH`, and must decode greedily exactly like DSpark
//! registered statically through `dspark_register()`.
//!
//! This builds the plugin (with a shared llama.cpp of its own, to link against) in
//! `target/plugin` and the stock tools (cached outside the clone): several minutes on 2
//! cores, so it only runs when `DSPARK_PLUGIN_TEST=1` (CI sets it). By hand:
//!
//! ```sh
//! DSPARK_PLUGIN_TEST=1 cargo test --release --test capi_plugin -- --nocapture
//! ```

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{build_plugin, cargo, llama_tools, model, plugin_tests_enabled, profile_dir, release, root, run};

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

fn tokens(output: &str) -> String {
    output.lines().find(|l| l.starts_with("tokens:")).unwrap_or_else(|| panic!("no tokens line in:\n{output}")).to_string()
}

#[test]
fn plugin_decodes_like_static_registration() {
    if !plugin_tests_enabled() {
        return;
    }
    let target = profile_dir().parent().unwrap().to_path_buf();

    // 1. The plugin, in its own target folder (its llama.cpp is shared; the main one static).
    let plugin = build_plugin().join("libdspark.so");
    // The host's llama.cpp: stock, shared, with dynamically loaded backends (the tools' build).
    let lib = llama_tools();
    let src = lib.join("../../src");

    // 2. No copy of ggml inside: ggml_* are imported, only the two entry points are defined.
    let nm = run(Command::new("nm").args(["-D", "--defined-only"]).arg(&plugin), "nm");
    let own_ggml: Vec<&str> = nm
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|s| s.starts_with("ggml_") && *s != "ggml_backend_init" && *s != "ggml_backend_score")
        .collect();
    assert!(own_ggml.is_empty(), "the plugin defines ggml symbols: {own_ggml:?}");
    assert!(nm.contains("ggml_backend_init") && nm.contains("ggml_backend_score"), "entry points missing:\n{nm}");
    let needed = run(Command::new("readelf").arg("-d").arg(&plugin), "readelf");
    assert!(needed.contains("libggml-base.so"), "the plugin does not link libggml-base.so:\n{needed}");

    // 3. The host: shared llama.cpp only, no DSpark library.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("capi_plugin");
    std::fs::create_dir_all(&dir).unwrap();
    let host = dir.join("plugin_host");
    let c_src = root().join("tests/c/plugin_host.c");
    let includes = |c: &mut Command| {
        c.arg("-I").arg(root().join("include")).arg("-I").arg(src.join("include")).arg("-I").arg(src.join("ggml/include"));
    };
    let mut c = Command::new(cc());
    c.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1"]);
    includes(&mut c);
    // DT_RPATH (not RUNPATH) so that libllama's own dependencies are found there too.
    c.arg(&c_src).arg("-L").arg(&lib).arg(format!("-Wl,--disable-new-dtags,-rpath,{}", lib.display()));
    c.args(["-lllama", "-lggml", "-lggml-base", "-o"]).arg(&host);
    run(&mut c, "compile the shared host");

    // 4. The same program with DSpark registered statically (the main path).
    let host_static = dir.join("plugin_host_static");
    let mut c = Command::new(cc());
    c.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-DDSPARK_STATIC"]);
    includes(&mut c);
    c.arg(&c_src).arg(profile_dir().join("libdspark.a")).args(["-lstdc++", "-lm", "-lpthread", "-ldl", "-lgomp", "-o"]).arg(&host_static);
    let mut build_static = cargo();
    build_static.args(["build", "--lib", "--quiet", "--target-dir"]).arg(&target).current_dir(root());
    if release() {
        build_static.arg("--release");
    }
    run(&mut build_static, "cargo build --lib");
    run(&mut c, "compile the static host");

    let n = "8";
    let env = [("DSPARK_FORMAT", "k4v4"), ("DSPARK_WINDOW", "0")];
    let dynamic = run(
        // ggml looks for its CPU backend module (libggml-cpu.so) next to the executable and in
        // the working directory.
        Command::new(&host).arg(model()).arg(n).env("GGML_BACKEND_PATH", &plugin).envs(env).current_dir(&lib),
        "the shared host with the plugin",
    );
    let stat = run(Command::new(&host_static).arg(model()).arg(n).envs(env), "the static host");
    println!("plugin: {}\nstatic: {}", tokens(&dynamic), tokens(&stat));
    assert_eq!(tokens(&dynamic), tokens(&stat), "greedy output differs between the plugin and static registration");

    // 5. A bad configuration refuses the load with a message, and the host carries on.
    let out = Command::new(&host)
        .current_dir(&lib)
        .arg(model())
        .arg("1")
        .env("GGML_BACKEND_PATH", &plugin)
        .env("DSPARK_FORMAT", "q4_0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("DSPARK_FORMAT") && err.contains("DSPARK0 not registered"), "{err}");
}
