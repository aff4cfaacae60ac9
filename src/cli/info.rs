//! `dspark info`: versions, devices and CPU features.

use anyhow::Result;

use crate::llama;

/// SIMD features of this CPU that DSpark's kernels can use.
pub fn cpu_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => {$( if std::is_x86_feature_detected!($name) { f.push($name); } )*};
        }
        probe!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni");
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            f.push("neon");
        }
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            f.push("dotprod");
        }
    }
    f
}

/// "llama.cpp via llama-cpp-sys-2 0.1.161, ggml 0.x (commit), native AVX-512: yes".
pub fn llama_cpp_version() -> String {
    format!(
        "llama-cpp-sys-2 {}, ggml {}, built for this CPU (GGML_NATIVE, AVX-512): {}",
        llama::LLAMA_CPP_SYS_VERSION,
        llama::ggml_version(),
        if llama::ggml_has_avx512() { "yes" } else { "no" }
    )
}

pub fn info() -> Result<()> {
    crate::ggml::register(crate::ggml::Config::default());
    println!("dspark {}", env!("CARGO_PKG_VERSION"));
    println!("llama.cpp: {}", llama_cpp_version());
    println!("llama.cpp system info: {}", llama::system_info());
    println!("CPU features (DSpark kernels): {}", cpu_features().join(" "));
    println!("ggml devices:");
    for (name, desc) in llama::devices() {
        println!("  {name}: {desc}");
    }
    Ok(())
}
