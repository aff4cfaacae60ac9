//! The ggml backend-plugin entry points, for a llama.cpp built with `BUILD_SHARED_LIBS=ON`
//! and `GGML_BACKEND_DL=ON`: the host `dlopen`s `libdspark.so` (e.g. from
//! `GGML_BACKEND_PATH`), calls `ggml_backend_score` and then `ggml_backend_init`, checks the
//! returned registry's `api_version` against its own `GGML_BACKEND_API_VERSION` (refusing a
//! mismatch with a logged message), and registers it itself.
//!
//! The symbols are exported only with the cargo feature `plugin`, which also links ggml and
//! llama.cpp as shared libraries, so the plugin carries no copy of ggml: its ggml symbols
//! resolve to the host's `libggml-base.so` / `libggml.so`. The configuration comes from the
//! environment, read once at load:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `DSPARK_FORMAT` | KV format: `f16` or `k<b>v<b>`, b from 2 to 8 | `k4v4` |
//! | `DSPARK_WINDOW` | most recent tokens kept in f16 | 128 |
//! | `DSPARK_WINDOW_BITS` | `16`: the sink page and the window in f16; `8` to `2`: in codes of that width | 16 |
//! | `DSPARK_RECENT` | the latest rows kept in f16 besides their codes, which attention reads instead | 0 |
//! | `DSPARK_KV_BUDGET` | most bytes of KV pages in RAM (`512M`, `2G`); the rest spills to disk | none |
//! | `DSPARK_PREFETCH` | layers ahead whose cold pages are read during attention | 2 |
//! | `DSPARK_SPILL_DIR` | folder of the spill file | the system temp folder |
//! | `DSPARK_PROFILE` | per-layer K/V widths from `dspark calibrate` (a JSON file); replaces `DSPARK_FORMAT`, and sets the window it was made for unless `DSPARK_WINDOW` is given | none |
//! | `DSPARK_CENTER` | `1`: compressed pages are stored relative to their rows' mean (better fidelity, 0.13 bit per value); `0`: not | 1 |
//! | `DSPARK_ATTN_BUDGET` | tokens a decode step's attention reads per layer and KV head (page selection) | 0 (all) |
//! | `DSPARK_ATTN_UNIT` | what that budget chooses: `block` (16 cells per KV head) or `page` (64-cell pages shared by the KV heads; for a KV budget) | `block` |

use std::ffi::c_int;

use llama_cpp_sys_2 as ll;

use crate::ggml;

/// The configuration the plugin reads from `get` (the environment).
///
/// # Errors
/// A message naming the variable whose value is invalid.
pub fn config_from_env(get: impl Fn(&str) -> Option<String>) -> Result<ggml::Config, String> {
    let mut c = ggml::Config::default();
    if let Some(f) = get("DSPARK_FORMAT") {
        c = c.with_format_name(f.trim()).map_err(|e| format!("DSPARK_FORMAT={f:?}: {e} (or f16)"))?;
    }
    if let Some(p) = get("DSPARK_PROFILE") {
        c = c.with_option("profile", p.trim()).map_err(|e| format!("DSPARK_PROFILE: {e}"))?;
    }
    if let Some(w) = get("DSPARK_WINDOW") {
        c.window = w.trim().parse().map_err(|_| format!("DSPARK_WINDOW={w:?} is not a token count"))?;
    }
    if let Some(b) = get("DSPARK_WINDOW_BITS") {
        c = c.with_option("window_bits", b.trim()).map_err(|e| format!("DSPARK_WINDOW_BITS: {e}"))?;
    }
    if let Some(r) = get("DSPARK_RECENT") {
        c = c.with_option("recent", r.trim()).map_err(|e| format!("DSPARK_RECENT: {e}"))?;
    }
    if let Some(b) = get("DSPARK_KV_BUDGET") {
        c = c.with_option("kv", b.trim()).map_err(|e| format!("DSPARK_KV_BUDGET: {e}"))?;
    }
    if let Some(d) = get("DSPARK_PREFETCH") {
        c = c.with_option("prefetch", d.trim()).map_err(|e| format!("DSPARK_PREFETCH: {e}"))?;
    }
    if let Some(v) = get("DSPARK_CENTER") {
        c = c.with_option("center", v.trim()).map_err(|e| format!("DSPARK_CENTER: {e}"))?;
    }
    if let Some(n) = get("DSPARK_ATTN_BUDGET") {
        c = c.with_option("attn", n.trim()).map_err(|e| format!("DSPARK_ATTN_BUDGET: {e}"))?;
    }
    if let Some(u) = get("DSPARK_ATTN_UNIT") {
        c = c.with_option("attn_unit", u.trim()).map_err(|e| format!("DSPARK_ATTN_UNIT: {e}"))?;
    }
    Ok(c)
}

/// The ggml version DSpark was built against (from the vendored tree, by build.rs).
pub const GGML_VERSION: &str = env!("DSPARK_GGML_VERSION");

/// Whether a host whose ggml reports `host` may load this plugin: ggml's backend interface
/// is not ABI-stable, so only the exact version DSpark was built against is accepted (ggml's
/// loader checks only the backend API version, which changes less often than the structs).
pub fn check_host_ggml(host: &str) -> Result<(), String> {
    if host == GGML_VERSION {
        return Ok(());
    }
    Err(format!(
        "this program uses ggml {host}, but DSpark was built against ggml {GGML_VERSION} (the llama.cpp that \
         llama-cpp-sys-2 {} vendors); build DSpark against the llama.cpp you run, or run that llama.cpp",
        crate::llama::LLAMA_CPP_SYS_VERSION
    ))
}

/// What `ggml_backend_init` does: check the host's ggml, configure, and hand out the registry
/// (the host registers it). `None` (with a message on stderr) refuses the load.
#[cfg_attr(not(feature = "plugin"), allow(dead_code))] // exported only by the plugin build
pub(crate) fn plugin_init() -> Option<ll::ggml_backend_reg_t> {
    let run = || -> Result<ll::ggml_backend_reg_t, String> {
        // SAFETY: ggml_version returns a static NUL-terminated string.
        check_host_ggml(&unsafe { std::ffi::CStr::from_ptr(ll::ggml_version()) }.to_string_lossy())?;
        let c = config_from_env(|k| std::env::var(k).ok())?;
        Ok(ggml::registry(c))
    };
    match std::panic::catch_unwind(run) {
        Ok(Ok(reg)) => Some(reg),
        Ok(Err(e)) => {
            ggml::log_error(&format!("ggml_backend_init: {e}; DSpark is not loaded"));
            None
        }
        Err(_) => {
            ggml::log_error("ggml_backend_init: internal error; DSpark is not loaded");
            None
        }
    }
}

/// ggml's plugin entry point: the DSPARK registry, or NULL (with a message) when the
/// environment's configuration is invalid.
#[cfg(feature = "plugin")]
#[unsafe(no_mangle)]
pub extern "C" fn ggml_backend_init() -> ll::ggml_backend_reg_t {
    plugin_init().unwrap_or(std::ptr::null_mut())
}

/// ggml's plugin score: DSpark runs on any CPU (its kernels fall back to portable code), so
/// always 1; the device is chosen by name (`DSPARK0`), not by score.
#[cfg(feature = "plugin")]
#[unsafe(no_mangle)]
pub extern "C" fn ggml_backend_score() -> c_int {
    PLUGIN_SCORE
}

/// The score `ggml_backend_score` reports.
pub const PLUGIN_SCORE: c_int = 1;

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_string())
    }

    #[test]
    fn config_comes_from_the_environment() {
        assert_eq!(config_from_env(env(&[])).unwrap(), ggml::Config::default());
        assert_eq!(config_from_env(env(&[("DSPARK_RECENT", "16")])).unwrap().recent, 16);
        assert!(config_from_env(env(&[("DSPARK_RECENT", "x")])).unwrap_err().contains("DSPARK_RECENT"));
        let c = config_from_env(env(&[("DSPARK_FORMAT", "k8v4"), ("DSPARK_WINDOW", " 256 ")])).unwrap();
        assert_eq!((c.format_name(), c.window), ("k8v4".to_string(), 256));
        assert_eq!(config_from_env(env(&[("DSPARK_WINDOW_BITS", "8")])).unwrap().window_bits, 8);
        assert!(config_from_env(env(&[("DSPARK_WINDOW_BITS", "12")])).unwrap_err().contains("DSPARK_WINDOW_BITS"));
        assert_eq!(config_from_env(env(&[("DSPARK_FORMAT", "f16")])).unwrap().format, None);
        assert!(config_from_env(env(&[("DSPARK_FORMAT", "q4_0")])).unwrap_err().contains("DSPARK_FORMAT"));
        assert!(config_from_env(env(&[("DSPARK_WINDOW", "-1")])).unwrap_err().contains("DSPARK_WINDOW"));
        assert_eq!(config_from_env(env(&[("DSPARK_ATTN_BUDGET", "1024")])).unwrap().attn_budget, 1024);
        assert!(config_from_env(env(&[("DSPARK_ATTN_BUDGET", "lots")])).unwrap_err().contains("DSPARK_ATTN_BUDGET"));
        assert_eq!(config_from_env(env(&[("DSPARK_ATTN_UNIT", "page")])).unwrap().attn_unit, crate::kv::select::Unit::Page);
        assert!(config_from_env(env(&[("DSPARK_ATTN_UNIT", "head")])).unwrap_err().contains("DSPARK_ATTN_UNIT"));
        assert!(!config_from_env(env(&[("DSPARK_CENTER", "0")])).unwrap().center);
        assert!(config_from_env(env(&[("DSPARK_CENTER", "yes")])).unwrap_err().contains("DSPARK_CENTER"));
        let e = config_from_env(env(&[("DSPARK_PROFILE", "/nonexistent/p.json")])).unwrap_err();
        assert!(e.contains("DSPARK_PROFILE") && e.contains("cannot read profile"), "{e}");
    }

    #[test]
    fn only_the_ggml_built_against_may_host_the_plugin() {
        // SAFETY: ggml_version returns a static NUL-terminated string.
        let linked = unsafe { std::ffi::CStr::from_ptr(ll::ggml_version()) }.to_string_lossy().into_owned();
        assert_eq!(linked, GGML_VERSION);
        assert!(check_host_ggml(&linked).is_ok());
        let e = check_host_ggml("0.27.0").unwrap_err();
        assert!(e.contains("ggml 0.27.0") && e.contains(&format!("ggml {GGML_VERSION}")), "{e}");
    }

    unsafe extern "C" {
        /// `ffi/abi_check.c`: GGML_BACKEND_API_VERSION as the C compiler reads it from the
        /// vendored ggml-backend-impl.h.
        fn dspark_abi_check_api_version() -> c_int;
    }

    /// The api_version of a registry object (ggml's `struct ggml_backend_reg`).
    ///
    /// # Safety
    /// `reg` is a live `ggml_backend_reg_t`.
    unsafe fn api_version(reg: ll::ggml_backend_reg_t) -> i32 {
        assert!(!reg.is_null(), "NULL registry");
        // SAFETY: non-null, and the caller guarantees a live registry object, whose layout
        // ggml::sys mirrors from ggml-backend-impl.h.
        unsafe { (*reg.cast::<ggml::sys::ggml_backend_reg>()).api_version }
    }

    /// The registry the plugin hands to the host carries the version that ggml itself was
    /// built with: the CPU backend's registry, which ggml fills from its own
    /// GGML_BACKEND_API_VERSION, is the host's side of the check that ggml's loader makes
    /// (`reg->api_version != GGML_BACKEND_API_VERSION` refuses a plugin). The C compiler's
    /// reading of the vendored header must agree too.
    #[test]
    fn registry_has_the_host_api_version() {
        let reg = plugin_init().expect("default environment");
        // SAFETY: plugin_init returns DSpark's registry, which lives for the whole process.
        let ours = unsafe { api_version(reg) };
        // SAFETY: ggml_backend_cpu_reg takes no arguments and returns ggml's static registry.
        let ggml_cpu = unsafe { api_version(ll::ggml_backend_cpu_reg()) };
        // SAFETY: a C function without arguments (ffi/abi_check.c).
        let header = unsafe { dspark_abi_check_api_version() };
        assert_eq!(ours, ggml_cpu, "DSpark's registry has api_version {ours}, ggml's CPU registry {ggml_cpu}");
        assert_eq!(ours, header, "DSpark's registry has api_version {ours}, ggml-backend-impl.h says {header}");
    }
}
