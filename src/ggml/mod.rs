//! The DSPARK0 ggml device: llama.cpp's KV cache of every offloaded layer lives in DSpark's
//! compressed store, and attention over it runs on DSpark's kernels. Weights and every other
//! op stay on llama.cpp's CPU backend, because `supports_op` declines them.
//!
//! - `sys`: ggml's backend interface, generated from the vendored header.
//! - `buffer`: the buffer type and buffers (plain memory for compute tensors, compressed
//!   stores for the KV roots `cache_k_l<il>` / `cache_v_l<il>`).
//! - `backend`: `supports_op` and `graph_compute` (SET_ROWS, FLASH_ATTN_EXT, ROPE K-shift).
//!
//! All raw pointers of the integration stay in this module.

mod backend;
mod buffer;
mod device;
pub mod sys;

use std::sync::{Mutex, OnceLock};

pub use device::{dev, register, Stats};
/// The registry, for the plugin entry point (`capi::plugin`).
pub(crate) use device::reg;

use crate::codec::Format;

/// The name of the device as ggml lists it.
pub const DEVICE_NAME: &str = "DSPARK0";

/// How DSpark stores the KV cache. Read when llama.cpp allocates a KV cache, so a change
/// applies to contexts created afterwards.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Compressed format; `None` keeps the KV in f16 (DSpark's paging without compression).
    pub format: Option<Format>,
    /// Most recent cells kept in f16.
    pub window: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config { format: Format::parse("k4v4").ok(), window: 128 }
    }
}

impl Config {
    /// Parses a format name as the CLI and the C API accept it: `f16` or `k<b>v<b>`.
    pub fn with_format_name(mut self, name: &str) -> Result<Config, String> {
        self.format = if name == "f16" { None } else { Some(Format::parse(name)?) };
        Ok(self)
    }

    /// The format's name (`f16` for uncompressed).
    pub fn format_name(&self) -> String {
        self.format.map_or_else(|| "f16".to_string(), |f| f.name())
    }
}

/// The configuration new KV caches get, and the owner id their stores are tagged with.
static CONFIG: OnceLock<Mutex<(Config, u64)>> = OnceLock::new();
static NEXT_OWNER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn config_cell() -> &'static Mutex<(Config, u64)> {
    CONFIG.get_or_init(|| Mutex::new((Config::default(), 0)))
}

/// The configuration new KV caches get, and their owner id.
pub(crate) fn current() -> (Config, u64) {
    *config_cell().lock().unwrap_or_else(|e| e.into_inner())
}

/// The configuration new KV caches get.
pub fn config() -> Config {
    current().0
}

/// Sets the configuration for KV caches allocated from now on (owner id 0).
pub fn set_config(c: Config) {
    *config_cell().lock().unwrap_or_else(|e| e.into_inner()) = (c, 0);
}

/// Runs `create` (which should create one llama.cpp context) with `c` as the configuration
/// of the KV caches it allocates, holding other threads' configurations off meanwhile.
/// Returns its result and the owner id of those caches, for [`Stats::of`].
pub fn with_config<R>(c: Config, create: impl FnOnce() -> R) -> (R, u64) {
    let cell = config_cell();
    let _hold = CREATE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let id = NEXT_OWNER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let saved = std::mem::replace(&mut *cell.lock().unwrap_or_else(|e| e.into_inner()), (c, id));
    let r = create();
    *cell.lock().unwrap_or_else(|e| e.into_inner()) = saved;
    (r, id)
}

static CREATE_LOCK: Mutex<()> = Mutex::new(());

/// Runs `f`, turning a panic into `fallback` and an error message on stderr: no panic may
/// unwind into ggml's C++ frames.
fn guard<T>(what: &str, fallback: T, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            eprintln!("dspark: internal error in {what}: {msg}");
            fallback
        }
    }
}
