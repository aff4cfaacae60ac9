//! Generates Rust layouts of ggml's backend interface (`ggml-backend-impl.h`) from the exact
//! llama.cpp tree that llama-cpp-sys-2 builds, so a version bump that changes the interface
//! changes our bindings (and fails to compile where we use a changed field) instead of
//! crashing users. `ffi/abi_check.c` pins the interface version we were written for.

use std::path::{Path, PathBuf};

/// The GGML_BACKEND_API_VERSION that src/ggml was written and tested against.
const EXPECTED_BACKEND_API_VERSION: u32 = 3;

fn main() {
    let src = llama_cpp_source();
    let impl_h = src.join("ggml/src/ggml-backend-impl.h");
    println!("cargo:rerun-if-changed={}", impl_h.display());
    println!("cargo:rerun-if-changed=ffi/abi_check.c");
    println!("cargo:rerun-if-changed=build.rs");
    let inc = src.join("ggml/include");
    println!("cargo:rustc-env=DSPARK_GGML_VERSION={}", ggml_version(&src));

    cc::Build::new()
        .file("ffi/abi_check.c")
        .include(&inc)
        .include(src.join("ggml/src"))
        .define("DSPARK_EXPECTED_BACKEND_API_VERSION", EXPECTED_BACKEND_API_VERSION.to_string().as_str())
        .compile("dspark_abi_check");

    let bindings = bindgen::Builder::default()
        .header(impl_h.to_string_lossy())
        .clang_arg(format!("-I{}", inc.display()))
        // Only the backend interface; every other ggml type comes from llama-cpp-sys-2.
        .allowlist_type("ggml_backend_(buffer_type|buffer|device|reg)(_i)?")
        .allowlist_type("ggml_backend(_i)?")
        .allowlist_type("ggml_backend_graph_optimize_params")
        .allowlist_function("ggml_backend_buffer_init")
        .allowlist_var("GGML_BACKEND_API_VERSION")
        .allowlist_recursively(false)
        .raw_line("#[allow(unused_imports)] use llama_cpp_sys_2::*;")
        .layout_tests(true)
        .generate()
        .expect("bindgen could not read ggml-backend-impl.h");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    bindings.write_to_file(out.join("ggml_backend_impl.rs")).expect("cannot write bindings");

    // ggml-impl.h: the layout of `ggml_cgraph` (opaque in ggml.h), so that DSPARK0 can hand
    // runs of a graph's nodes to the embedded CPU backend as views, as `ggml_graph_view`
    // makes them (that function is internal: a shared libggml-base does not export it).
    let graph_h = src.join("ggml/src/ggml-impl.h");
    println!("cargo:rerun-if-changed={}", graph_h.display());
    bindgen::Builder::default()
        .header(graph_h.to_string_lossy())
        .clang_arg(format!("-I{}", inc.display()))
        .allowlist_type("ggml_cgraph")
        .allowlist_type("ggml_hash_set")
        .allowlist_type("ggml_bitset_t")
        .allowlist_type("ggml_cgraph_eval_order")
        .allowlist_recursively(false)
        .raw_line("#[allow(unused_imports)] use llama_cpp_sys_2::ggml_tensor;")
        .layout_tests(true)
        .generate()
        .expect("bindgen could not read ggml-impl.h")
        .write_to_file(out.join("ggml_graph.rs"))
        .expect("cannot write bindings");
}

/// ggml's version ("0.26.0") from the tree's ggml/CMakeLists.txt: the plugin refuses to load
/// into a program whose ggml reports another one.
fn ggml_version(src: &Path) -> String {
    let cmake = src.join("ggml/CMakeLists.txt");
    println!("cargo:rerun-if-changed={}", cmake.display());
    let text = std::fs::read_to_string(&cmake).expect("cannot read ggml/CMakeLists.txt");
    let part = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("set(GGML_VERSION_{name} "))?.strip_suffix(')').map(str::to_string))
            .unwrap_or_else(|| panic!("GGML_VERSION_{name} missing from {}", cmake.display()))
    };
    format!("{}.{}.{}", part("MAJOR"), part("MINOR"), part("PATCH"))
}

/// The llama.cpp source folder that llama-cpp-sys-2 built. Its build script exports the
/// folder of ggml's CMake package (DEP_LLAMA_GGML_CMAKE_DIR = <its OUT_DIR>/lib/cmake); the
/// CMake cache beside it names the source folder.
fn llama_cpp_source() -> PathBuf {
    let cmake_dir = std::env::var("DEP_LLAMA_GGML_CMAKE_DIR")
        .expect("llama-cpp-sys-2 did not export DEP_LLAMA_GGML_CMAKE_DIR; is its version =0.1.161?");
    let out_dir = Path::new(&cmake_dir).ancestors().nth(2).expect("unexpected DEP_LLAMA_GGML_CMAKE_DIR").to_path_buf();
    let cache = std::fs::read_to_string(out_dir.join("build/CMakeCache.txt")).expect("cannot read llama.cpp's CMakeCache.txt");
    let home = cache
        .lines()
        .find_map(|l| l.strip_prefix("CMAKE_HOME_DIRECTORY:INTERNAL="))
        .expect("CMAKE_HOME_DIRECTORY missing from llama.cpp's CMakeCache.txt");
    PathBuf::from(home.trim())
}
