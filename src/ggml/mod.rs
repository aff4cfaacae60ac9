//! The DSpark ggml devices: llama.cpp's KV cache of every offloaded layer lives in DSpark's
//! compressed store, and attention over it runs on DSpark's kernels. Weights and every other
//! op stay on llama.cpp's CPU backend, because `supports_op` declines them.
//!
//! - `sys`: ggml's backend interface, generated from the vendored header.
//! - `device`: the registry and the devices (one per KV configuration: `DSPARK0`, ...).
//! - `buffer`: the buffer type and buffers (plain memory for compute tensors, compressed
//!   stores for the KV roots `cache_k_l<il>` / `cache_v_l<il>`).
//! - `backend`: `supports_op` and `graph_compute` (SET_ROWS, FLASH_ATTN_EXT, ROPE K-shift).
//! - `budget`: the KV memory budget during a graph (staging and prefetch of cold pages).
//! - `log`: messages through the host's ggml log callback.
//! - `rpc`: ggml's RPC backend: serving a DSpark device, adding remote devices.
//!
//! All raw pointers of the integration stay in this module.

mod backend;
mod budget;
mod buffer;
mod cpu;
mod device;
mod log;
pub mod rpc;
pub mod sys;

pub use device::{layer_cells, list_registry, register, Stats};
/// The registry, for the plugin entry point (`capi::plugin`).
pub(crate) use device::registry;
pub(crate) use log::{log_error, log_warn};

use std::sync::Arc;

use crate::codec::{Format, Quant};
use crate::profile::Profile;

/// The name of the first device as ggml lists it.
pub const DEVICE_NAME: &str = "DSPARK0";

/// How a DSpark device stores the KV cache. Each configuration is its own device (see
/// [`register`]), so the configuration of a KV cache is fixed by the device it lives on.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Compressed format; `None` keeps the KV in f16 (DSpark's paging without compression).
    pub format: Option<Format>,
    /// Per-layer widths; when set, they replace `format` ([`crate::profile`]).
    pub profile: Option<Arc<Profile>>,
    /// Most recent cells kept in f16.
    pub window: usize,
    /// Decline FLASH_ATTN_EXT, so llama.cpp's CPU kernel runs attention and reads the KV
    /// through `get_tensor` (decompressed). For diagnosis: it isolates the store from the
    /// attention kernels. Default: `DSPARK_CPU_ATTENTION=1` in the environment.
    pub cpu_attention: bool,
    /// Most bytes of KV pages held in RAM by this device's caches together; compressed pages
    /// beyond it go to a spill file (in `DSPARK_SPILL_DIR`, else the system temp folder).
    /// `None`: no budget, every page stays in RAM.
    pub kv_budget: Option<u64>,
    /// Layers ahead whose cold pages the transfer stream reads while attention runs; 0 reads
    /// them when the layer needs them (the synchronous baseline).
    pub prefetch: usize,
    /// Cells a decode call's attention reads per KV head: the sink page, the f16 window and
    /// the compressed pages whose digests score best for the query ([`crate::kv::select`]).
    /// 0 reads every cell (dense).
    pub attn_budget: usize,
    /// What the attention budget chooses: 16-cell blocks per KV head (the default, the best
    /// fidelity) or whole pages shared by a layer's KV heads (what the cold tier moves: with a
    /// KV budget, the selected set then stays within the budget's cells).
    pub attn_unit: crate::kv::select::Unit,
    /// Layers from the first that stay dense under an attention budget (published systems
    /// keep 2; on the default model they changed the KL divergence by 0.0003 at attn=2048,
    /// ctx 8192, and would double the attention reads at depth 32768, so none by default).
    pub attn_dense_layers: usize,
    /// Store each compressed page relative to its rows' mean ([`crate::kv::page`]).
    pub center: bool,
    /// Bits per value of the pages kept out of compression (the sink page, the window, the
    /// page being filled): 16 (f16) or a code width, 8 at most ([`crate::kv::StoreConfig`]).
    pub window_bits: u32,
    /// The latest rows written, kept in f16 besides their codes for attention to read
    /// ([`crate::kv::StoreConfig::recent`]).
    pub recent: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            format: Format::parse("k4v4").ok(),
            profile: None,
            window: 128,
            cpu_attention: std::env::var("DSPARK_CPU_ATTENTION").is_ok_and(|v| v == "1"),
            kv_budget: None,
            prefetch: 2,
            attn_budget: 0,
            attn_unit: crate::kv::select::Unit::Block,
            attn_dense_layers: 0,
            center: true,
            window_bits: 16,
            recent: 0,
        }
    }
}

/// The options a `dspark:` spec takes after its format.
const OPTIONS: &str = "profile=FILE, window=N, window_bits=16|8..2, recent=N, kv=SIZE, prefetch=N, attn=N, attn_unit=block|page, attn_dense=L, center=0|1";

/// Parses a size: bytes, or a number with K, M or G (binary: 16M = 16 MiB), e.g. `512M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 1u64 << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 1 << 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size (e.g. 512M, 2G, 1048576)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{s}` is not a size (e.g. 512M, 2G, 1048576)"));
    }
    Ok((v * mult as f64) as u64)
}

impl Config {
    /// Parses a format name as the CLI and the C API accept it: `f16` or `k<b>v<b>`.
    pub fn with_format_name(mut self, name: &str) -> Result<Config, String> {
        self.format = if name == "f16" { None } else { Some(Format::parse(name)?) };
        Ok(self)
    }

    /// The format's name (`f16` for uncompressed, `profile=FILE` with a profile).
    pub fn format_name(&self) -> String {
        match &self.profile {
            Some(p) => format!("profile={}", p.source),
            None => self.format.map_or_else(|| "f16".to_string(), |f| f.name()),
        }
    }

    /// The codes of pages kept out of compression; `None`: f16.
    pub fn window_quant(&self) -> Option<Quant> {
        (self.window_bits < 16).then(|| Quant::from_bits(self.window_bits).ok()).flatten()
    }

    /// The width of layer `layer`'s K (`is_k`) or V: the profile's, else the format's.
    /// `None` is f16.
    pub fn quant(&self, layer: Option<usize>, is_k: bool) -> Result<Option<Quant>, String> {
        match &self.profile {
            Some(p) => p.quant(layer, is_k),
            None => Ok(self.format.map(|f| if is_k { f.k } else { f.v })),
        }
    }

    /// Parses `FORMAT[:key=value...]` as `dspark:` specs take it (after the `dspark:`):
    /// `profile=FILE` (per-layer widths from `dspark calibrate`, and the window they were
    /// allocated for; it may stand in the format's place), `window=N` (cells kept in f16),
    /// `window_bits=B` (their codes), `recent=N` (the latest rows also kept in f16),
    /// `kv=SIZE` (the KV budget, `0`/`none` for no budget), `prefetch=N`, `attn=N` (the
    /// attention budget in cells, 0 = dense), `attn_unit=block|page` (what it chooses),
    /// `attn_dense=L` (layers kept dense) and
    /// `center=0|1` (pages stored relative to their mean).
    pub fn with_spec(self, spec: &str) -> Result<Config, String> {
        let mut parts = spec.split(':').peekable();
        let mut c = match parts.peek() {
            Some(first) if first.contains('=') => self,
            _ => self.with_format_name(parts.next().unwrap_or("").trim())?,
        };
        for kv in parts {
            let (key, value) = kv.split_once('=').ok_or_else(|| format!("option `{kv}`: expected key=value ({OPTIONS})"))?;
            c = c.with_option(key.trim(), value.trim())?;
        }
        Ok(c)
    }

    /// Sets one option by name (as [`Config::with_spec`] and the environment name them).
    pub fn with_option(mut self, key: &str, value: &str) -> Result<Config, String> {
        match key {
            "profile" => {
                // The profile's budget assumed its window: it comes with it (a later
                // `window=` still wins).
                let p = Profile::load(std::path::Path::new(value))?;
                self.window = p.window;
                self.window_bits = p.window_bits;
                self.recent = p.recent;
                self.profile = Some(Arc::new(p));
            }
            "window" => self.window = value.parse().map_err(|_| format!("window={value}: expected a number of cells"))?,
            "window_bits" => {
                self.window_bits = match value.parse() {
                    Ok(b @ (2..=8 | 16)) => b,
                    _ => return Err(format!("window_bits={value}: expected 16 (f16) or a code width from 2 to 8")),
                }
            }
            "recent" => self.recent = value.parse().map_err(|_| format!("recent={value}: expected a number of rows"))?,
            "kv" => self.kv_budget = if matches!(value, "0" | "none") { None } else { Some(parse_size(value).map_err(|e| format!("kv={value}: {e}"))?) },
            "prefetch" => self.prefetch = value.parse().map_err(|_| format!("prefetch={value}: expected a layer count (0 = synchronous)"))?,
            "attn" => self.attn_budget = value.parse().map_err(|_| format!("attn={value}: expected a number of cells (0 = dense)"))?,
            "attn_unit" => self.attn_unit = crate::kv::select::Unit::parse(value).ok_or_else(|| format!("attn_unit={value}: expected block (per KV head) or page (shared by the heads)"))?,
            "attn_dense" => self.attn_dense_layers = value.parse().map_err(|_| format!("attn_dense={value}: expected a layer count"))?,
            "center" => {
                self.center = match value {
                    "1" => true,
                    "0" => false,
                    _ => return Err(format!("center={value}: expected 1 (pages stored relative to their mean) or 0")),
                }
            }
            _ => return Err(format!("unknown option `{key}` (options: {OPTIONS})")),
        }
        Ok(self)
    }

    /// The spec this configuration is named by (`k4v4`, `k4v4:kv=16777216:prefetch=0`):
    /// options are shown where they differ from the defaults.
    pub fn spec_name(&self) -> String {
        let mut s = self.format_name();
        let d = Config::default();
        if self.window != d.window {
            s += &format!(":window={}", self.window);
        }
        if self.window_bits != d.window_bits {
            s += &format!(":window_bits={}", self.window_bits);
        }
        if self.recent != d.recent {
            s += &format!(":recent={}", self.recent);
        }
        if let Some(b) = self.kv_budget {
            s += &format!(":kv={b}");
        }
        if self.prefetch != d.prefetch {
            s += &format!(":prefetch={}", self.prefetch);
        }
        if self.attn_budget != d.attn_budget {
            s += &format!(":attn={}", self.attn_budget);
        }
        if self.attn_unit != d.attn_unit {
            s += &format!(":attn_unit={}", self.attn_unit.name());
        }
        if self.attn_dense_layers != d.attn_dense_layers {
            s += &format!(":attn_dense={}", self.attn_dense_layers);
        }
        if self.center != d.center {
            s += &format!(":center={}", u8::from(self.center));
        }
        s
    }
}

/// Tells the KV root behind `t` its head size, as the first attention graph that reads it
/// does: rows written so far are re-laid out and compressed. For tests of the buffer on
/// synthetic tensors, which have no attention graph.
///
/// # Safety
/// `t` must be a valid tensor whose buffer, if any, is alive.
#[doc(hidden)]
pub unsafe fn shape_kv(t: *const llama_cpp_sys_2::ggml_tensor, head_dim: usize) -> Result<(), String> {
    // SAFETY: valid tensor with a live buffer (caller).
    let e = unsafe { buffer::kv_entry(t) }.ok_or("not a DSpark KV tensor")?;
    e.shape(head_dim, crate::attn::Threads::serial())
}

/// Records a failure on the KV root behind `t`, as a failed write would: every graph that
/// touches it fails until the cache is cleared. For tests of that path.
///
/// # Safety
/// `t` must be a valid tensor whose buffer, if any, is alive.
#[doc(hidden)]
pub unsafe fn fail_kv(t: *const llama_cpp_sys_2::ggml_tensor, msg: &str) -> Result<(), String> {
    // SAFETY: valid tensor with a live buffer (caller).
    let e = unsafe { buffer::kv_entry(t) }.ok_or("not a DSpark KV tensor")?;
    e.fail(msg);
    Ok(())
}

/// Records a failure on every KV cache of a device (see [`fail_kv`]).
///
/// # Safety
/// `dev` must be a device returned by [`register`].
#[doc(hidden)]
pub unsafe fn fail_device_kv(dev: llama_cpp_sys_2::ggml_backend_dev_t, msg: &str) {
    // SAFETY: one of our devices (caller).
    unsafe { device::dev_ctx(dev) }.entries().iter().for_each(|e| e.fail(msg));
}

/// Makes the memory budget of `config`'s device spill to `cold` instead of a spill file, for
/// tests of the fault paths (a cold store that fails on command). Registers the device if
/// needed and returns it; must run before the device holds any KV cache.
#[doc(hidden)]
pub fn use_cold_store(config: Config, cold: Box<dyn crate::kv::cold::ColdStore>) -> Result<llama_cpp_sys_2::ggml_backend_dev_t, String> {
    let dev = register(config);
    // SAFETY: `register` returns one of our devices.
    unsafe { device::dev_ctx(dev) }.set_cold_store(cold)?;
    Ok(dev)
}

/// Runs `f`, turning a panic into `fallback` and an error message in the log: no panic may
/// unwind into ggml's C++ frames.
fn guard<T>(what: &str, fallback: T, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            log_error(&format!("internal error in {what}: {}", panic_message(&*e)));
            fallback
        }
    }
}

/// The message of a caught panic.
fn panic_message(e: &(dyn std::any::Any + Send)) -> &str {
    e.downcast_ref::<String>().map(String::as_str).or_else(|| e.downcast_ref::<&str>().copied()).unwrap_or("unknown panic")
}
