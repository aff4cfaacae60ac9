//! The C API end to end: `tests/c/capi_test.c` is compiled against `include/dspark.h` and
//! the static library, then run (plain, and with AddressSanitizer where the toolchain has
//! it). Also checks that the header agrees with the library: struct layouts, status codes,
//! version, and that every declared function is exported.
//!
//! The C compiler is `$CC` or `cc`. Set `DSPARK_SKIP_C_TESTS=1` to skip on a machine
//! without one (the tests then print why and pass). Under `CI=true` nothing skips: the skip
//! variable, a toolchain without AddressSanitizer or a missing `nm` fail the test instead
//! (`ci_turns_skips_into_failures` checks that).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use dspark::capi::error::STATUS_NAMES;
use dspark::capi::{dspark_attn_params, dspark_cache_params, dspark_config, dspark_stats};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>/ of this test build (the test binary is target/<profile>/deps/capi-*).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

/// The static library of this build, rebuilt first: `cargo test` links the test against the
/// rlib and does not refresh `libdspark.a`/`.so`, so the test runs `cargo build --lib` for the
/// same profile and target folder (a no-op when they are fresh). Cargo does not hold its
/// build lock while tests run, so this cannot deadlock, and a build runs no tests, so it
/// cannot recurse.
fn static_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = profile_dir();
        let lib = dir.join("libdspark.a");
        let target_dir = dir.parent().expect("target folder");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--lib", "--quiet", "--target-dir"]).arg(target_dir).current_dir(root());
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build --lib");
        assert!(st.success() && lib.exists(), "cargo build --lib did not produce {}", lib.display());
        lib
    })
    .clone()
}

/// Whether this is a CI run (`CI=true`, as GitHub Actions and most CI services set it).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Skips a test for `why` on a developer machine; under CI a skip is a failure, so that a
/// misconfigured runner cannot pass by testing nothing.
fn skip_because(why: &str) {
    assert!(!in_ci(), "CI=true, so this test may not skip, but: {why}");
    println!("skipped: {why}");
}

fn skip() -> Option<&'static str> {
    if std::env::var_os("DSPARK_SKIP_C_TESTS").is_some_and(|v| v != "0") {
        return Some("DSPARK_SKIP_C_TESTS is set");
    }
    None
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

fn out_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("capi");
    std::fs::create_dir_all(&d).expect("create test dir");
    d
}

/// Compiles `tests/c/capi_test.c` with `extra` flags into `name`; `Err` with the
/// compiler's output if it fails.
fn compile(name: &str, extra: &[&str]) -> Result<PathBuf, String> {
    let exe = out_dir().join(name);
    let src = root().join("tests/c/capi_test.c");
    let out = Command::new(cc())
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O1", "-g"])
        .args(extra)
        .arg("-I")
        .arg(root().join("include"))
        .arg(&src)
        .arg(static_lib())
        .args(["-lstdc++", "-lm", "-lpthread", "-ldl", "-lgomp", "-o"])
        .arg(&exe)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cc()))?;
    if out.status.success() {
        Ok(exe)
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// The C test without sanitizers, compiled once for the tests that need it.
fn plain_exe() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| compile("capi_test", &[]).unwrap_or_else(|e| panic!("the C test does not compile:\n{e}"))).clone()
}

fn run_c_test(exe: &Path, env: &[(&str, &str)]) {
    let tmp = out_dir().join(format!("{}-files", exe.file_name().unwrap().to_string_lossy()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let out = Command::new(exe).arg(&tmp).envs(env.iter().copied()).output().expect("run the C test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{} failed ({}):\n{stdout}\n{stderr}", exe.display(), out.status);
    assert!(stdout.contains(" 0 failures"), "unexpected output:\n{stdout}");
    // ggml may log to stderr; nothing else may appear there (ASan reports, panics).
    for bad in ["ERROR: AddressSanitizer", "LeakSanitizer", "panicked", "FAIL "] {
        assert!(!stderr.contains(bad), "{bad} in stderr:\n{stderr}");
    }
}

#[test]
fn c_program_passes() {
    if let Some(why) = skip() {
        skip_because(why);
        return;
    }
    run_c_test(&plain_exe(), &[]);
}

#[test]
fn c_program_passes_under_asan() {
    if let Some(why) = skip() {
        skip_because(why);
        return;
    }
    // Probe the toolchain first: no ASan runtime is a skip on a developer machine, a failure
    // under CI (setup installs libasan).
    let probe_src = out_dir().join("asan_probe.c");
    std::fs::write(&probe_src, "int main(void) { return 0; }\n").unwrap();
    let probe = out_dir().join("asan_probe");
    let ok = Command::new(cc())
        .args(["-fsanitize=address", "-o"])
        .arg(&probe)
        .arg(&probe_src)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(&probe).status().is_ok_and(|s| s.success());
    if !ok {
        skip_because(&format!("{} cannot build and run a -fsanitize=address program here (install libasan)", cc()));
        return;
    }
    let exe = compile("capi_test_asan", &["-fsanitize=address", "-fno-omit-frame-pointer"])
        .unwrap_or_else(|e| panic!("the C test does not compile with ASan:\n{e}"));
    run_c_test(&exe, &[("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=23")]);
}

/// sizeof / offsetof from the C compiler must equal the Rust mirrors.
#[test]
fn struct_layouts_match_the_header() {
    if let Some(why) = skip() {
        skip_because(why);
        return;
    }
    let out = Command::new(plain_exe()).arg("--layout").output().unwrap();
    assert!(out.status.success());
    let c = String::from_utf8(out.stdout).unwrap();
    macro_rules! rust_layout {
        ($($t:ident { $($f:ident),* })*) => {{
            let mut v = Vec::new();
            $(
                v.push(format!("sizeof {} {}", stringify!($t), std::mem::size_of::<$t>()));
                $( v.push(format!("offsetof {}.{} {}", stringify!($t), stringify!($f), std::mem::offset_of!($t, $f))); )*
            )*
            v
        }};
    }
    let mut rust = rust_layout! {
        dspark_config { format, window, kv_budget_bytes, prefetch_depth, attn_budget_tokens, attn_dense_layers, profile }
        dspark_stats { kv_bytes, pages_f16, pages_compressed, cells, elems, bits_per_elem, compression_ratio, attn_calls,
                       kv_cold_bytes, cold_read_bytes, cold_write_bytes, transfer_busy_s, compute_wait_s, hidden_fraction,
                       attended_tokens, select_s, prefetch_hit_rate }
        dspark_cache_params { n_layer, n_head_kv, n_head, head_dim, max_tokens, n_seq_max, format, window, n_threads, kv_budget_bytes, profile }
        dspark_attn_params { scale, max_bias, softcap, flags, mask, mask_type, mask_stride, sinks, n_threads }
    };
    rust.push(format!("sizeof dspark_mask_type {}", std::mem::size_of::<i32>()));
    assert_eq!(c.lines().collect::<Vec<_>>(), rust, "dspark.h and src/capi disagree on a struct layout");
}

fn header() -> String {
    std::fs::read_to_string(root().join("include/dspark.h")).expect("read include/dspark.h")
}

#[test]
fn header_status_codes_and_version_match() {
    let h = header();
    // `NAME = value,` lines inside the dspark_status enum.
    let start = h.find("typedef enum dspark_status").expect("dspark_status enum");
    let end = start + h[start..].find("} dspark_status;").unwrap();
    let codes: Vec<(i32, String)> = h[start..end]
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (name, rest) = l.split_once('=')?;
            let val = rest.trim().split([',', ' ', '/']).next()?.trim();
            Some((val.parse().ok()?, name.trim().to_string()))
        })
        .collect();
    let rust: Vec<(i32, String)> = STATUS_NAMES.iter().map(|(c, n)| (*c, (*n).to_string())).collect();
    assert_eq!(codes, rust, "status codes in dspark.h and src/capi/error.rs differ");

    let def = |name: &str| -> u32 {
        let key = format!("#define {name} ");
        let line = h.lines().find(|l| l.starts_with(&key)).unwrap_or_else(|| panic!("{name} not defined"));
        line[key.len()..].trim().parse().unwrap()
    };
    let v = format!("{}.{}.{}", def("DSPARK_VERSION_MAJOR"), def("DSPARK_VERSION_MINOR"), def("DSPARK_VERSION_PATCH"));
    assert_eq!(v, env!("CARGO_PKG_VERSION"), "dspark.h's version differs from Cargo.toml's");
    assert_eq!(dspark::capi::error::DSPARK_OK, 0);
}

/// Every function that dspark.h declares is exported by libdspark.so, and every exported
/// `dspark_` function is declared.
#[test]
fn every_declared_function_is_exported() {
    let h = header();
    let mut declared: Vec<String> = h
        .lines()
        .filter(|l| !l.trim_start().starts_with('*') && !l.trim_start().starts_with("/*"))
        .flat_map(|l| {
            // Every `dspark_<name>(` on the line (the return type may be dspark_status).
            l.match_indices("dspark_")
                .filter_map(|(i, _)| {
                    let rest = &l[i..];
                    let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    rest[name.len()..].starts_with('(').then_some(name)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    declared.sort();
    declared.dedup();
    assert!(declared.len() >= 20, "found only {declared:?}");
    let _ = static_lib(); // builds every crate type of the library
    let so = profile_dir().join("libdspark.so");
    let out = match Command::new("nm").args(["-D", "--defined-only"]).arg(&so).output() {
        Ok(o) if o.status.success() => o,
        _ => {
            skip_because("`nm -D` is not available");
            return;
        }
    };
    let syms = String::from_utf8_lossy(&out.stdout);
    let mut exported: Vec<String> = syms
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|s| s.starts_with("dspark_"))
        .map(String::from)
        .collect();
    exported.sort();
    let missing: Vec<_> = declared.iter().filter(|d| !exported.contains(d)).collect();
    let undeclared: Vec<_> = exported.iter().filter(|e| !declared.contains(e)).collect();
    assert!(missing.is_empty(), "declared in dspark.h but not exported: {missing:?}");
    assert!(undeclared.is_empty(), "exported but not declared in dspark.h: {undeclared:?}");
}

/// Under `CI=true` a skip is a failure: this runs the skipping tests of this binary again,
/// alone, with the conditions that make them skip (`DSPARK_SKIP_C_TESTS=1`; a C compiler
/// that cannot build an ASan program), with and without `CI=true`.
#[test]
fn ci_turns_skips_into_failures() {
    let run = |test: &str, env: &[(&str, &str)]| {
        let out = Command::new(std::env::current_exe().expect("current_exe"))
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env_remove("CI")
            .env_remove("DSPARK_SKIP_C_TESTS")
            .envs(env.iter().copied())
            .output()
            .expect("run this test binary");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let no_cc = "/nonexistent/dspark-test-cc";
    for (test, env) in [
        ("c_program_passes", [("DSPARK_SKIP_C_TESTS", "1")]),
        ("struct_layouts_match_the_header", [("DSPARK_SKIP_C_TESTS", "1")]),
        ("c_program_passes_under_asan", [("CC", no_cc)]),
    ] {
        let (ok, text) = run(test, &env);
        assert!(ok && text.contains("skipped: "), "{test} should skip outside CI:\n{text}");
        let with_ci = [env[0], ("CI", "true")];
        let (ok, text) = run(test, &with_ci);
        assert!(!ok && text.contains("may not skip"), "{test} should fail under CI=true:\n{text}");
    }
}
