//! Section "Registration into llama.cpp" of dspark.h: the DSPARK0 device and its figures.

use std::ffi::c_char;

use llama_cpp_sys_2 as ll;

use super::error::{dspark_status, fail, guard, DSPARK_ERR_FORMAT, DSPARK_ERR_NULL};
use super::{opt_str, read_versioned, write_versioned, Versioned};
use crate::ggml;

/// `dspark_config` (see dspark.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct dspark_config {
    /// `sizeof(dspark_config)`.
    pub size: usize,
    /// Format name or NULL.
    pub format: *const c_char,
    /// f16 window in tokens.
    pub window: u32,
    /// KV memory budget in bytes (0: none). Appended in API version 3.
    pub kv_budget_bytes: u64,
    /// Layers ahead whose cold pages are prefetched. Appended in API version 3.
    pub prefetch_depth: u32,
    /// Attention budget in tokens (0: dense) and layers kept dense. Appended in API version 4
    /// (a u64 first, so that it starts after version 3's trailing padding).
    pub attn_budget_tokens: u64,
    pub attn_dense_layers: u32,
    /// Profile path or NULL. Appended in API version 5.
    pub profile: *const c_char,
}

// SAFETY: repr(C), starts with size_t, fields are a pointer and integers.
unsafe impl Versioned for dspark_config {
    /// The struct before `kv_budget_bytes` was appended: old callers keep working.
    const MIN_SIZE: usize = std::mem::offset_of!(dspark_config, kv_budget_bytes);
    /// API version 3's struct ended with `prefetch_depth` (and its padding).
    /// API version 4's ended with `attn_dense_layers` (and its padding).
    const PAST_SIZES: &'static [usize] = &[std::mem::offset_of!(dspark_config, attn_budget_tokens), std::mem::offset_of!(dspark_config, profile)];
    fn defaults() -> Self {
        let d = ggml::Config::default();
        dspark_config {
            size: std::mem::size_of::<Self>(),
            format: std::ptr::null(),
            window: default_window(),
            kv_budget_bytes: 0,
            prefetch_depth: u32::try_from(d.prefetch).unwrap_or(u32::MAX),
            attn_budget_tokens: 0,
            attn_dense_layers: u32::try_from(d.attn_dense_layers).unwrap_or(u32::MAX),
            profile: std::ptr::null(),
        }
    }
}

fn default_window() -> u32 {
    u32::try_from(ggml::Config::default().window).unwrap_or(u32::MAX)
}

/// `dspark_stats` (see dspark.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct dspark_stats {
    /// `sizeof(dspark_stats)`.
    pub size: usize,
    /// Bytes held by KV pages.
    pub kv_bytes: u64,
    /// f16 pages.
    pub pages_f16: u64,
    /// Compressed pages.
    pub pages_compressed: u64,
    /// Cells holding data.
    pub cells: u64,
    /// Values stored.
    pub elems: u64,
    /// Bits per stored value (0 when empty).
    pub bits_per_elem: f64,
    /// 16 / bits_per_elem (0 when empty).
    pub compression_ratio: f64,
    /// Attention calls.
    pub attn_calls: u64,
    /// The memory budget's figures (appended in API version 3; zero without a budget).
    pub kv_cold_bytes: u64,
    pub cold_read_bytes: u64,
    pub cold_write_bytes: u64,
    pub transfer_busy_s: f64,
    pub compute_wait_s: f64,
    pub hidden_fraction: f64,
    /// Page selection's figures (appended in API version 4).
    pub attended_tokens: f64,
    pub select_s: f64,
    pub prefetch_hit_rate: f64,
}

// SAFETY: repr(C), starts with size_t, fields are integers and floats.
unsafe impl Versioned for dspark_stats {
    /// An output struct: any size that holds the `size` field; the fields that fit are written.
    const MIN_SIZE: usize = std::mem::size_of::<usize>();
    fn defaults() -> Self {
        dspark_stats { size: std::mem::size_of::<Self>(), ..dspark_stats::default() }
    }
    fn whole_fields(size: usize) -> usize {
        use std::mem::{offset_of, size_of};
        let ends = [
            offset_of!(dspark_stats, kv_bytes) + size_of::<u64>(),
            offset_of!(dspark_stats, pages_f16) + size_of::<u64>(),
            offset_of!(dspark_stats, pages_compressed) + size_of::<u64>(),
            offset_of!(dspark_stats, cells) + size_of::<u64>(),
            offset_of!(dspark_stats, elems) + size_of::<u64>(),
            offset_of!(dspark_stats, bits_per_elem) + size_of::<f64>(),
            offset_of!(dspark_stats, compression_ratio) + size_of::<f64>(),
            offset_of!(dspark_stats, attn_calls) + size_of::<u64>(),
            offset_of!(dspark_stats, kv_cold_bytes) + size_of::<u64>(),
            offset_of!(dspark_stats, cold_read_bytes) + size_of::<u64>(),
            offset_of!(dspark_stats, cold_write_bytes) + size_of::<u64>(),
            offset_of!(dspark_stats, transfer_busy_s) + size_of::<f64>(),
            offset_of!(dspark_stats, compute_wait_s) + size_of::<f64>(),
            offset_of!(dspark_stats, hidden_fraction) + size_of::<f64>(),
            offset_of!(dspark_stats, attended_tokens) + size_of::<f64>(),
            offset_of!(dspark_stats, select_s) + size_of::<f64>(),
            offset_of!(dspark_stats, prefetch_hit_rate) + size_of::<f64>(),
        ];
        ends.into_iter().filter(|&e| e <= size).max().unwrap_or(size_of::<usize>())
    }
}

impl dspark_stats {
    /// Fills the derived figures from the raw ones.
    #[allow(clippy::cast_precision_loss)]
    pub(crate) fn new(kv_bytes: u64, pages_f16: u64, pages_compressed: u64, cells: u64, elems: u64, attn_calls: u64) -> Self {
        let bits = if elems == 0 || kv_bytes == 0 { 0.0 } else { 8.0 * kv_bytes as f64 / elems as f64 };
        dspark_stats {
            size: std::mem::size_of::<Self>(),
            kv_bytes,
            pages_f16,
            pages_compressed,
            cells,
            elems,
            bits_per_elem: bits,
            compression_ratio: if bits > 0.0 { 16.0 / bits } else { 0.0 },
            attn_calls,
            ..dspark_stats::default()
        }
    }

    /// Adds the memory budget's figures.
    pub(crate) fn with_tier(mut self, s: &crate::kv::Stats) -> Self {
        self.kv_cold_bytes = s.kv_cold_bytes;
        self.cold_read_bytes = s.cold_read_bytes;
        self.cold_write_bytes = s.cold_write_bytes;
        self.transfer_busy_s = s.transfer_busy_ns as f64 * 1e-9;
        self.compute_wait_s = s.compute_wait_ns as f64 * 1e-9;
        self.hidden_fraction = s.hidden_fraction();
        self.attended_tokens = s.attended_tokens();
        self.select_s = s.select_ns as f64 * 1e-9;
        self.prefetch_hit_rate = s.prefetch_hit_rate();
        self
    }
}

/// Fills a config with the defaults; see dspark.h.
///
/// # Safety
/// `config` is NULL or points to a writable `dspark_config`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_config_init(config: *mut dspark_config) -> dspark_status {
    guard("dspark_config_init", || {
        if config.is_null() {
            return fail(DSPARK_ERR_NULL, "config is NULL");
        }
        // SAFETY: non-null, and the caller guarantees a writable dspark_config.
        unsafe { config.write_unaligned(dspark_config::defaults()) };
        Ok(())
    })
}

/// Registers DSPARK0; see dspark.h.
///
/// # Safety
/// `config` is NULL or points to a `dspark_config` with a correct `size` whose `format` and
/// `profile` are NULL or NUL-terminated strings; `out_dev` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_register(config: *const dspark_config, out_dev: *mut ll::ggml_backend_dev_t) -> dspark_status {
    guard("dspark_register", || {
        let cfg = if config.is_null() {
            dspark_config::defaults()
        } else {
            // SAFETY: non-null config with a size field (caller).
            unsafe { read_versioned(config, "config") }?
        };
        if out_dev.is_null() {
            return fail(DSPARK_ERR_NULL, "out_dev is NULL");
        }
        // SAFETY: cfg.format is NULL or a NUL-terminated string (caller).
        let name = unsafe { opt_str(cfg.format, "config->format") }?.unwrap_or("k4v4");
        let c = ggml::Config {
            window: cfg.window as usize,
            kv_budget: (cfg.kv_budget_bytes > 0).then_some(cfg.kv_budget_bytes),
            prefetch: cfg.prefetch_depth as usize,
            attn_budget: usize::try_from(cfg.attn_budget_tokens).unwrap_or(usize::MAX),
            attn_dense_layers: cfg.attn_dense_layers as usize,
            ..ggml::Config::default()
        }
        .with_format_name(name)
        .or_else(|e| fail(DSPARK_ERR_FORMAT, format!("{e} (or f16)")))?;
        // SAFETY: cfg.profile is NULL or a NUL-terminated string (caller).
        let c = match unsafe { opt_str(cfg.profile, "config->profile") }? {
            Some(path) => c.with_option("profile", path).or_else(|e| fail(DSPARK_ERR_FORMAT, e))?,
            None => c,
        };
        let dev = ggml::register(c);
        // SAFETY: out_dev is non-null and writable (caller).
        unsafe { out_dev.write_unaligned(dev) };
        Ok(())
    })
}

/// The device's figures; see dspark.h.
///
/// # Safety
/// `out` is NULL or points to a writable `dspark_stats` whose `size` is set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_stats_get(out: *mut dspark_stats) -> dspark_status {
    guard("dspark_stats_get", || {
        let s = ggml::Stats::now();
        let v = dspark_stats::new(s.kv_bytes, s.pages_f16, s.pages_compressed, s.cells, s.elems, s.attn_calls).with_tier(&s);
        // SAFETY: out is NULL or a writable dspark_stats with its size set (caller).
        unsafe { write_versioned(out, &v, "out") }
    })
}
