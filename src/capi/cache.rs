//! Section "Cache" of dspark.h: the standalone compressed KV cache. Thin shims: each
//! converts its arguments and calls [`Cache`](super::store::Cache).

use std::ffi::{c_char, c_void};

use half::f16;

use super::device::dspark_stats;
use super::error::{dspark_status, fail, guard, Result, DSPARK_ERR_ARG, DSPARK_ERR_FORMAT, DSPARK_ERR_NULL, DSPARK_ERR_RANGE};
use super::store::{parse_format, AttnArgs, Cache, MaskData, Shape};
use super::{handles, overlaps, read_versioned, slice, slice_mut, span, write_versioned, Versioned};

/// `dspark_cache_t`: opaque. Handles are tokens (see `handles`), never dereferenced.
#[repr(C)]
#[derive(Debug)]
pub struct dspark_cache {
    _opaque: [u8; 0],
}

/// `dspark_cache_params` (see dspark.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct dspark_cache_params {
    /// `sizeof(dspark_cache_params)`.
    pub size: usize,
    /// Layers.
    pub n_layer: u32,
    /// KV heads.
    pub n_head_kv: u32,
    /// Query heads.
    pub n_head: u32,
    /// Values per head row.
    pub head_dim: u32,
    /// Tokens per sequence.
    pub max_tokens: u32,
    /// Sequences.
    pub n_seq_max: u32,
    /// Format name or NULL.
    pub format: *const c_char,
    /// f16 window in tokens.
    pub window: u32,
    /// Default attention threads (0: one per core).
    pub n_threads: u32,
    /// KV memory budget in bytes (0: none). Appended in API version 3.
    pub kv_budget_bytes: u64,
    /// Profile path or NULL. Appended in API version 5.
    pub profile: *const c_char,
}

// SAFETY: repr(C), starts with size_t, fields are integers and a pointer.
unsafe impl Versioned for dspark_cache_params {
    /// The struct before `kv_budget_bytes` was appended: old callers keep working.
    const MIN_SIZE: usize = std::mem::offset_of!(dspark_cache_params, kv_budget_bytes);
    /// API version 3's struct ended with `kv_budget_bytes`.
    const PAST_SIZES: &'static [usize] = &[std::mem::offset_of!(dspark_cache_params, profile)];
    fn defaults() -> Self {
        dspark_cache_params {
            size: std::mem::size_of::<Self>(),
            n_layer: 0,
            n_head_kv: 0,
            n_head: 0,
            head_dim: 0,
            max_tokens: 0,
            n_seq_max: 1,
            format: std::ptr::null(),
            window: 128,
            n_threads: 0,
            kv_budget_bytes: 0,
            profile: std::ptr::null(),
        }
    }
}

/// `dspark_attn_params` (see dspark.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct dspark_attn_params {
    /// `sizeof(dspark_attn_params)`.
    pub size: usize,
    /// Score scale (0: 1/sqrt(head_dim)).
    pub scale: f32,
    /// ALiBi maximum bias.
    pub max_bias: f32,
    /// Soft-capping.
    pub softcap: f32,
    /// `DSPARK_ATTN_*` flags.
    pub flags: u32,
    /// Optional mask.
    pub mask: *const c_void,
    /// `dspark_mask_type` (a C enum: int).
    pub mask_type: i32,
    /// Mask row stride in elements (0: the sequence length).
    pub mask_stride: u32,
    /// Optional sinks.
    pub sinks: *const f32,
    /// Threads (0: the cache's default).
    pub n_threads: u32,
}

/// `DSPARK_ATTN_CAUSAL`.
pub const DSPARK_ATTN_CAUSAL: u32 = 1;
/// `DSPARK_MASK_F32`.
pub const DSPARK_MASK_F32: i32 = 0;
/// `DSPARK_MASK_F16`.
pub const DSPARK_MASK_F16: i32 = 1;

// SAFETY: repr(C), starts with size_t, fields are integers, floats and pointers.
unsafe impl Versioned for dspark_attn_params {
    const MIN_SIZE: usize = std::mem::size_of::<dspark_attn_params>();
    fn defaults() -> Self {
        dspark_attn_params {
            size: std::mem::size_of::<Self>(),
            scale: 0.0,
            max_bias: 0.0,
            softcap: 0.0,
            flags: DSPARK_ATTN_CAUSAL,
            mask: std::ptr::null(),
            mask_type: DSPARK_MASK_F32,
            mask_stride: 0,
            sinks: std::ptr::null(),
            n_threads: 0,
        }
    }
}

fn u(x: u32) -> usize {
    x as usize
}

/// Fills cache params with the defaults; see dspark.h.
///
/// # Safety
/// `params` is NULL or points to a writable `dspark_cache_params`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_params_init(params: *mut dspark_cache_params) -> dspark_status {
    guard("dspark_cache_params_init", || {
        if params.is_null() {
            return fail(DSPARK_ERR_NULL, "params is NULL");
        }
        // SAFETY: non-null; the caller guarantees a writable dspark_cache_params.
        unsafe { params.write_unaligned(dspark_cache_params::defaults()) };
        Ok(())
    })
}

/// Fills attention params with the defaults; see dspark.h.
///
/// # Safety
/// `params` is NULL or points to a writable `dspark_attn_params`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_attn_params_init(params: *mut dspark_attn_params) -> dspark_status {
    guard("dspark_attn_params_init", || {
        if params.is_null() {
            return fail(DSPARK_ERR_NULL, "params is NULL");
        }
        // SAFETY: non-null; the caller guarantees a writable dspark_attn_params.
        unsafe { params.write_unaligned(dspark_attn_params::defaults()) };
        Ok(())
    })
}

/// Creates a cache; see dspark.h.
///
/// # Safety
/// `params` is NULL or a `dspark_cache_params` with a correct `size` whose `format` and
/// `profile` are NULL or NUL-terminated strings; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_new(params: *const dspark_cache_params, out: *mut *mut dspark_cache) -> dspark_status {
    guard("dspark_cache_new", || {
        // SAFETY: params is NULL or a struct with a size field (caller).
        let p = unsafe { read_versioned(params, "params") }?;
        if out.is_null() {
            return fail(DSPARK_ERR_NULL, "out is NULL");
        }
        // SAFETY: p.format is NULL or a NUL-terminated string (caller).
        let name = unsafe { super::opt_str(p.format, "params->format") }?.unwrap_or("k4v4");
        let shape = Shape {
            n_layer: u(p.n_layer),
            n_head_kv: u(p.n_head_kv),
            n_head: u(p.n_head),
            head_dim: u(p.head_dim),
            max_tokens: u(p.max_tokens),
            n_seq_max: u(p.n_seq_max),
            format: parse_format(name)?,
            layers: None,
        };
        // SAFETY: p.profile is NULL or a NUL-terminated string (caller).
        let (shape, window) = match unsafe { super::opt_str(p.profile, "params->profile") }? {
            Some(path) => with_profile(shape, path)?,
            None => (shape, u(p.window)),
        };
        let mut cache = Cache::new(shape, window, u(p.n_threads))?;
        if p.kv_budget_bytes > 0 {
            cache = cache.with_budget(p.kv_budget_bytes)?;
        }
        let token = handles::insert(cache);
        // SAFETY: out is non-null and writable (caller).
        unsafe { out.write_unaligned(token) };
        Ok(())
    })
}

/// `shape` with the widths of the profile at `path`, and the profile's window.
fn with_profile(shape: Shape, path: &str) -> Result<(Shape, usize)> {
    let p = crate::profile::Profile::load(std::path::Path::new(path)).or_else(|e| fail(DSPARK_ERR_FORMAT, e))?;
    let m = &p.model;
    if (m.n_layer, m.n_head_kv, m.head_dim) != (shape.n_layer, shape.n_head_kv, shape.head_dim) {
        return fail(
            DSPARK_ERR_FORMAT,
            format!("profile {path} was made for {} ({} layers, {} KV heads of {}); this cache has {} layers, {} KV heads of {}", m.name, m.n_layer, m.n_head_kv, m.head_dim, shape.n_layer, shape.n_head_kv, shape.head_dim),
        );
    }
    let widths = |l| Ok((p.quant(Some(l), true)?, p.quant(Some(l), false)?));
    let layers: Vec<_> = (0..shape.n_layer).map(widths).collect::<std::result::Result<_, String>>().or_else(|e| fail(DSPARK_ERR_FORMAT, e))?;
    Ok((Shape { layers: Some(layers.into()), ..shape }, p.window))
}

/// Deletes a cache; see dspark.h.
///
/// # Safety
/// None beyond the C signature: the handle is only looked up, never dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_delete(cache: *mut dspark_cache) -> dspark_status {
    guard("dspark_cache_delete", || if cache.is_null() { Ok(()) } else { handles::remove(cache) })
}

/// Appends K/V rows; see dspark.h.
///
/// # Safety
/// `k` and `v` are NULL or point to `n_tokens * n_head_kv * head_dim` readable floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_append(
    cache: *mut dspark_cache,
    layer: u32,
    seq: u32,
    k: *const f32,
    v: *const f32,
    n_tokens: u32,
) -> dspark_status {
    guard("dspark_cache_append", || {
        let c = handles::get(cache)?;
        let n = u(n_tokens);
        let len = n.checked_mul(c.shape.row_len()).ok_or_else(|| super::Error::new(DSPARK_ERR_ARG, "n_tokens too large"))?;
        // SAFETY: k and v hold `len` floats (caller); the cache never aliases caller memory.
        let (k, v) = unsafe { (slice(k, len, "k")?, slice(v, len, "v")?) };
        c.append(u(layer), u(seq), k, v, n)
    })
}

/// A lane's length; see dspark.h.
///
/// # Safety
/// `out_len` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_seq_len(cache: *const dspark_cache, layer: u32, seq: u32, out_len: *mut u32) -> dspark_status {
    guard("dspark_cache_seq_len", || {
        let c = handles::get(cache)?;
        if out_len.is_null() {
            return fail(DSPARK_ERR_NULL, "out_len is NULL");
        }
        let n = c.seq_len(u(layer), u(seq))?;
        // SAFETY: non-null and writable (caller). n <= max_tokens, a u32.
        unsafe { out_len.write_unaligned(u32::try_from(n).expect("max_tokens is a u32")) };
        Ok(())
    })
}

/// Attention; see dspark.h.
///
/// # Safety
/// `q` and `out` are NULL or point to `n_q * n_head * head_dim` floats (readable /
/// writable); `params` is NULL or a `dspark_attn_params` with a correct `size` whose `mask`
/// and `sinks` are NULL or hold the documented number of elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_attn(
    cache: *const dspark_cache,
    layer: u32,
    seq: u32,
    q: *const f32,
    n_q: u32,
    params: *const dspark_attn_params,
    out: *mut f32,
) -> dspark_status {
    guard("dspark_cache_attn", || {
        let c = handles::get(cache)?;
        let p = if params.is_null() {
            dspark_attn_params::defaults()
        } else {
            // SAFETY: a struct with a size field (caller).
            unsafe { read_versioned(params, "params") }?
        };
        let (layer, seq, n_q) = (u(layer), u(seq), u(n_q));
        // Range errors first, so that they are reported as such whatever the other arguments.
        if layer >= c.shape.n_layer || seq >= c.shape.n_seq_max {
            return c.seq_len(layer, seq).map(|_| ());
        }
        let (nh, d) = (c.shape.n_head, c.shape.head_dim);
        let n = n_q.checked_mul(nh * d).ok_or_else(|| super::Error::new(DSPARK_ERR_ARG, "n_q too large"))?;
        // SAFETY: q holds n floats (caller).
        let q = unsafe { slice(q, n, "q") }?;
        // SAFETY: out holds n writable floats (caller); overlap with inputs is refused below
        // before anything reads or writes through the slices.
        let out = unsafe { slice_mut(out, n, "out") }?;
        let len = c.seq_len(layer, seq)?;
        let stride = if p.mask_stride == 0 { len } else { u(p.mask_stride) };
        let mask_len = if n_q == 0 || p.mask.is_null() { 0 } else { (n_q - 1).saturating_mul(stride).saturating_add(len) };
        let mask = if p.mask.is_null() {
            None
        } else {
            match p.mask_type {
                // SAFETY: the mask holds (n_q - 1) * stride + len elements (caller).
                DSPARK_MASK_F32 => Some((MaskData::F32(unsafe { slice(p.mask.cast::<f32>(), mask_len, "params->mask") }?), stride)),
                // SAFETY: as above; f16 has the layout of uint16_t.
                DSPARK_MASK_F16 => Some((MaskData::F16(unsafe { slice(p.mask.cast::<f16>(), mask_len, "params->mask") }?), stride)),
                t => return fail(DSPARK_ERR_ARG, format!("params->mask_type {t} is not DSPARK_MASK_F32 or DSPARK_MASK_F16")),
            }
        };
        // SAFETY: sinks holds n_head floats when non-null (caller).
        let sinks = if p.sinks.is_null() { None } else { Some(unsafe { slice(p.sinks, nh, "params->sinks") }?) };
        let o = span(out);
        let mut inputs = vec![span(q)];
        inputs.extend(sinks.map(span));
        inputs.extend(mask.map(|(m, _)| match m {
            MaskData::F32(v) => span(v),
            MaskData::F16(v) => span(v),
        }));
        if inputs.iter().any(|i| overlaps(&o, i)) {
            return fail(DSPARK_ERR_ARG, "out overlaps an input (q, mask or sinks)");
        }
        if p.flags & !DSPARK_ATTN_CAUSAL != 0 {
            return fail(DSPARK_ERR_ARG, format!("unknown flags {:#x}", p.flags & !DSPARK_ATTN_CAUSAL));
        }
        #[allow(clippy::cast_precision_loss)]
        let scale = if p.scale == 0.0 { 1.0 / (d as f32).sqrt() } else { p.scale };
        let args = AttnArgs {
            scale,
            max_bias: p.max_bias,
            softcap: p.softcap,
            causal: p.flags & DSPARK_ATTN_CAUSAL != 0,
            mask,
            sinks,
            n_threads: u(p.n_threads),
        };
        c.attn(layer, seq, q, n_q, &args, out)
    })
}

/// Converts a C sequence id (`-1`: all) and checks it.
fn seq_arg(seq: i32, n_seq_max: usize) -> super::Result<Option<usize>> {
    match (seq, usize::try_from(seq)) {
        (-1, _) => Ok(None),
        (_, Ok(s)) if s < n_seq_max => Ok(Some(s)),
        (s, _) => fail(DSPARK_ERR_RANGE, format!("sequence {s} is out of range (0..{n_seq_max}, or -1 for all)")),
    }
}

/// Converts the C positions of `seq_rm` / `seq_add`: `p0` must not be negative; a negative
/// `p1` means "to the end" (llama.cpp's convention).
fn range_args(p0: i32, p1: i32) -> super::Result<(usize, Option<usize>)> {
    let Ok(p0) = usize::try_from(p0) else {
        return fail(DSPARK_ERR_RANGE, format!("p0 {p0} is negative"));
    };
    Ok((p0, usize::try_from(p1).ok()))
}

/// Removes positions; see dspark.h.
///
/// # Safety
/// None beyond the C signature: the handle is only looked up, never dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_seq_rm(cache: *mut dspark_cache, seq: i32, p0: i32, p1: i32) -> dspark_status {
    guard("dspark_cache_seq_rm", || {
        let c = handles::get(cache)?;
        let s = seq_arg(seq, c.shape.n_seq_max)?;
        let (p0, p1) = range_args(p0, p1)?;
        c.seq_rm(s, p0, p1)
    })
}

/// Moves positions; see dspark.h.
///
/// # Safety
/// None beyond the C signature: the handle is only looked up, never dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_seq_add(cache: *mut dspark_cache, seq: i32, p0: i32, p1: i32, delta: i32) -> dspark_status {
    guard("dspark_cache_seq_add", || {
        let c = handles::get(cache)?;
        let s = seq_arg(seq, c.shape.n_seq_max)?;
        let (p0, p1) = range_args(p0, p1)?;
        c.seq_add(s, p0, p1, i64::from(delta))
    })
}

/// Copies a sequence; see dspark.h.
///
/// # Safety
/// None beyond the C signature: the handle is only looked up, never dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_seq_cp(cache: *mut dspark_cache, src: u32, dst: u32) -> dspark_status {
    guard("dspark_cache_seq_cp", || handles::get(cache)?.seq_cp(u(src), u(dst)))
}

/// Keeps one sequence; see dspark.h.
///
/// # Safety
/// None beyond the C signature: the handle is only looked up, never dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_seq_keep(cache: *mut dspark_cache, seq: u32) -> dspark_status {
    guard("dspark_cache_seq_keep", || handles::get(cache)?.seq_keep(u(seq)))
}

/// A cache's figures; see dspark.h.
///
/// # Safety
/// `out` is NULL or a writable `dspark_stats` whose `size` is set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_stats(cache: *const dspark_cache, out: *mut dspark_stats) -> dspark_status {
    guard("dspark_cache_stats", || {
        let s = handles::get(cache)?.stats();
        let v = dspark_stats::new(s.kv_bytes, s.pages_f16, s.pages_compressed, s.cells, s.elems, s.attn_calls).with_tier(&s);
        // SAFETY: NULL or a writable dspark_stats with its size set (caller).
        unsafe { write_versioned(out, &v, "out") }
    })
}
