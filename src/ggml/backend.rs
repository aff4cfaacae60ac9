//! DSPARK0's backend (stream): which ops it accepts and how it runs them.
//!
//! It accepts only what touches the KV cache: the view ops on KV tensors, SET_ROWS into the
//! KV (compress), FLASH_ATTN_EXT reading it (attention on the compressed pages) and an
//! in-place ROPE on K (the K-shift of context shifting: decompress, rotate, recompress).
//! Everything else is declined and runs on llama.cpp's CPU backend.

use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use half::f16;
use llama_cpp_sys_2 as ll;

use super::buffer::{kv_entry, root_of, KvEntry};
use super::{guard, sys};
use crate::attn::{self, FaParams, Mask};
use crate::kv::segments;

/// FLASH_ATTN_EXT ops run, for statistics.
pub(crate) static ATTN_CALLS: AtomicU64 = AtomicU64::new(0);

const ROPE_TYPE_NORMAL: i32 = 0;
const ROPE_TYPE_NEOX: i32 = 2;

struct BackendCtx {
    n_threads: AtomicUsize,
}

static GUID: [u8; 16] = *b"DSpark-KV-v1\0\0\0\0";

pub(crate) unsafe extern "C" fn init_backend(dev: ll::ggml_backend_dev_t, _params: *const c_char) -> ll::ggml_backend_t {
    guard("init_backend", std::ptr::null_mut(), || {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let ctx = Box::new(BackendCtx { n_threads: AtomicUsize::new(threads) });
        let b = Box::new(sys::ggml_backend {
            guid: GUID.as_ptr() as ll::ggml_guid_t,
            iface: backend_iface(),
            device: dev,
            context: Box::into_raw(ctx).cast(),
        });
        Box::into_raw(b).cast()
    })
}

fn backend_iface() -> sys::ggml_backend_i {
    sys::ggml_backend_i {
        get_name: Some(backend_name),
        free: Some(backend_free),
        set_tensor_async: None,
        get_tensor_async: None,
        set_tensor_2d_async: None,
        get_tensor_2d_async: None,
        cpy_tensor_async: None,
        synchronize: None,
        graph_plan_create: None,
        graph_plan_free: None,
        graph_plan_update: None,
        graph_plan_compute: None,
        graph_compute: Some(graph_compute),
        event_record: None,
        event_wait: None,
        graph_optimize: None,
    }
}

unsafe fn backend_ctx<'a>(b: ll::ggml_backend_t) -> &'a BackendCtx {
    &*((*(b as *mut sys::ggml_backend)).context as *const BackendCtx)
}

unsafe extern "C" fn backend_name(_: ll::ggml_backend_t) -> *const c_char {
    c"DSPARK0".as_ptr()
}

unsafe extern "C" fn backend_free(b: ll::ggml_backend_t) {
    guard("backend_free", (), || {
        // SAFETY: ggml frees each backend once; we created both boxes in init_backend.
        unsafe {
            let b = Box::from_raw(b as *mut sys::ggml_backend);
            drop(Box::from_raw(b.context as *mut BackendCtx));
        }
    })
}

unsafe extern "C" fn set_n_threads(b: ll::ggml_backend_t, n: i32) {
    backend_ctx(b).n_threads.store(n.max(1) as usize, Ordering::Relaxed);
}

pub(crate) unsafe extern "C" fn proc_address(_: ll::ggml_backend_reg_t, name: *const c_char) -> *mut c_void {
    if name.is_null() {
        return std::ptr::null_mut();
    }
    match std::ffi::CStr::from_ptr(name).to_bytes() {
        b"ggml_backend_set_n_threads" => set_n_threads as *mut c_void,
        _ => std::ptr::null_mut(),
    }
}

/// Byte offset of a tensor from the start of its root.
unsafe fn offs(t: *const ll::ggml_tensor) -> usize {
    if (*t).view_src.is_null() {
        0
    } else {
        (*t).view_offs
    }
}

unsafe fn f32_param(t: *const ll::ggml_tensor, i: usize) -> f32 {
    f32::from_bits((*t).op_params[i] as u32)
}

pub(crate) unsafe extern "C" fn supports_op(_: ll::ggml_backend_dev_t, op: *const ll::ggml_tensor) -> bool {
    guard("supports_op", false, || {
        // SAFETY: ggml passes a valid op whose srcs are valid tensors.
        unsafe {
            match (*op).op {
                ll::GGML_OP_NONE | ll::GGML_OP_VIEW | ll::GGML_OP_RESHAPE | ll::GGML_OP_PERMUTE | ll::GGML_OP_TRANSPOSE => {
                    super::buffer::is_ours((*root_of(op)).buffer)
                }
                ll::GGML_OP_SET_ROWS => set_rows_check(op).is_ok(),
                ll::GGML_OP_FLASH_ATTN_EXT if cpu_attention() => false,
                ll::GGML_OP_FLASH_ATTN_EXT => match flash_attn_check(op) {
                    Ok(_) => true,
                    Err(why) => {
                        warn_once(&why);
                        false
                    }
                },
                ll::GGML_OP_ROPE => rope_check(op).is_ok(),
                _ => false,
            }
        }
    })
}

/// `DSPARK_CPU_ATTENTION=1` leaves attention to llama.cpp's CPU kernel, which then reads the
/// KV through `get_tensor` (decompressed). For diagnosis: it isolates the store from the
/// attention kernels.
fn cpu_attention() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DSPARK_CPU_ATTENTION").is_ok_and(|v| v == "1"))
}

/// Prints a reason for falling back to the stock path, once per distinct reason.
fn warn_once(why: &str) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|s| s == why) {
        eprintln!("dspark: warning: attention falls back to llama.cpp's CPU path: {why}");
        seen.push(why.to_string());
    }
}

unsafe extern "C" fn graph_compute(b: ll::ggml_backend_t, g: *mut ll::ggml_cgraph) -> ll::ggml_status {
    guard("graph_compute", ll::GGML_STATUS_FAILED, || {
        // SAFETY: ggml passes our backend and a graph whose nodes and srcs are valid and
        // whose srcs live in our buffers (copies of CPU tensors included).
        unsafe {
            compute_nodes(g, backend_ctx(b).n_threads.load(Ordering::Relaxed))
        }
    })
}

/// Runs the nodes of one split.
///
/// # Safety
/// As for graph_compute.
unsafe fn compute_nodes(g: *mut ll::ggml_cgraph, n_threads: usize) -> ll::ggml_status {
    for i in 0..ll::ggml_graph_n_nodes(g) {
        let node = ll::ggml_graph_node(g, i);
        if (*node).flags & ll::GGML_TENSOR_FLAG_COMPUTE as i32 == 0 {
            continue;
        }
        let r = match (*node).op {
            ll::GGML_OP_NONE | ll::GGML_OP_VIEW | ll::GGML_OP_RESHAPE | ll::GGML_OP_PERMUTE | ll::GGML_OP_TRANSPOSE => Ok(()),
            ll::GGML_OP_SET_ROWS => set_rows(node),
            ll::GGML_OP_FLASH_ATTN_EXT => flash_attn(node, n_threads),
            ll::GGML_OP_ROPE => rope_shift(node),
            op => Err(format!("op {op} was not accepted by DSPARK0")),
        };
        if let Err(msg) = r {
            eprintln!("dspark: {}: {msg}", super::buffer::tensor_name(node));
            return ll::GGML_STATUS_FAILED;
        }
    }
    ll::GGML_STATUS_SUCCESS
}

// ---------------------------------------------------------------------------------------
// SET_ROWS: compress rows into the KV store.

/// Checks a SET_ROWS node and returns its KV entry and whether it writes whole KV rows
/// (the fast path; otherwise, e.g. into a transposed V, rows go through the byte path).
unsafe fn set_rows_check<'a>(op: *const ll::ggml_tensor) -> Result<(&'a KvEntry, bool), String> {
    let e = kv_entry(op).ok_or("destination is not a DSpark KV tensor")?;
    let (src, idx) = ((*op).src[0], (*op).src[1]);
    if src.is_null() || idx.is_null() {
        return Err("missing sources".into());
    }
    if !matches!((*src).type_, ll::GGML_TYPE_F32 | ll::GGML_TYPE_F16) || !matches!((*idx).type_, ll::GGML_TYPE_I64 | ll::GGML_TYPE_I32) {
        return Err("unsupported source or index type".into());
    }
    let row_bytes = e.row_len() * 2;
    let whole = (*op).ne[0] as usize == e.row_len() && (*op).nb[1] == row_bytes && offs(op) % row_bytes == 0;
    Ok((e, whole))
}

unsafe fn set_rows(node: *mut ll::ggml_tensor) -> Result<(), String> {
    let (e, whole) = set_rows_check(node)?;
    let (src, idx) = (&*(*node).src[0], &*(*node).src[1]);
    let n = &(*node);
    let ne0 = src.ne[0] as usize;
    let mut row = vec![0.0f32; ne0];
    let mut bytes = vec![0u8; ne0 * 2];
    // Destination byte offset (from the root) of each source row, in source order.
    let mut dsts = Vec::with_capacity((src.ne[1] * src.ne[2] * src.ne[3]) as usize);
    for i3 in 0..src.ne[3] as usize {
        for i2 in 0..src.ne[2] as usize {
            for i in 0..src.ne[1] as usize {
                let ip = (idx.data as *const u8).add(i * idx.nb[0] + (i2 % idx.ne[1] as usize) * idx.nb[1] + (i3 % idx.ne[2] as usize) * idx.nb[2]);
                let r = if idx.type_ == ll::GGML_TYPE_I64 { *(ip as *const i64) } else { *(ip as *const i32) as i64 };
                if r < 0 || r >= n.ne[1] {
                    return Err(format!("row index {r} out of range"));
                }
                let sp = (src.data as *const u8).add(i * src.nb[1] + i2 * src.nb[2] + i3 * src.nb[3]);
                dsts.push((offs(node) + r as usize * n.nb[1] + i2 * n.nb[2] + i3 * n.nb[3], sp));
            }
        }
    }
    if !whole {
        for (off, sp) in dsts {
            read_row(sp, src.type_, &mut row);
            super::buffer::f32_to_f16_bytes(&row, &mut bytes);
            super::buffer::kv_write_bytes(e, off, &bytes)?;
        }
        return Ok(());
    }
    let mut guard = e.write()?;
    let store = guard.as_mut().expect("shaped by write()");
    for (off, sp) in dsts {
        read_row(sp, src.type_, &mut row);
        store.write_row(off / (e.row_len() * 2), &row);
    }
    store.compact(None);
    Ok(())
}

/// Reads a contiguous F32 or F16 row into `out`.
unsafe fn read_row(p: *const u8, ty: ll::ggml_type, out: &mut [f32]) {
    if ty == ll::GGML_TYPE_F32 {
        out.copy_from_slice(std::slice::from_raw_parts(p as *const f32, out.len()));
    } else {
        let h = std::slice::from_raw_parts(p as *const f16, out.len());
        out.iter_mut().zip(h).for_each(|(o, x)| *o = x.to_f32());
    }
}

// ---------------------------------------------------------------------------------------
// FLASH_ATTN_EXT on the compressed pages.

/// Where a K or V view of FLASH_ATTN_EXT starts in its store.
struct KvView<'a> {
    entry: &'a KvEntry,
    /// First global cell of view stream 0.
    cell0: usize,
    /// Global cells between view streams.
    stream_step: usize,
}

/// Validates that `t` is a [head_dim, n_kv, n_head_kv, ns] view of a KV root with the
/// layout llama.cpp builds (cells, then heads within a cell, then streams).
unsafe fn kv_view<'a>(t: *const ll::ggml_tensor) -> Result<KvView<'a>, String> {
    let e = kv_entry(t).ok_or("K/V is not a DSpark KV tensor")?;
    let t = &*t;
    let rb = e.row_len() * 2;
    let (d, n_kv, nh) = (t.ne[0] as usize, t.ne[1] as usize, t.ne[2] as usize);
    if t.type_ != ll::GGML_TYPE_F16 || t.nb[0] != 2 || t.nb[1] != rb || t.nb[2] != d * 2 || t.nb[3] % rb != 0 || offs(t) % rb != 0 {
        return Err("unexpected K/V view layout".into());
    }
    if nh * d != e.row_len() {
        return Err(format!("K/V view covers {nh} heads of {d}, but a row holds {} values", e.row_len()));
    }
    let cell0 = offs(t) / rb;
    let cells = (*root_of(t)).ne[1] as usize;
    if cell0 % cells + n_kv > cells {
        return Err("K/V view crosses a stream boundary".into());
    }
    Ok(KvView { entry: e, cell0, stream_step: t.nb[3] / rb })
}

unsafe fn flash_attn_check<'a>(op: *const ll::ggml_tensor) -> Result<(KvView<'a>, KvView<'a>), String> {
    let s = &(*op).src;
    let (q, k, v, mask, sinks) = (s[0], s[1], s[2], s[3], s[4]);
    let kv = kv_view(k)?;
    let vv = kv_view(v)?;
    if !kv.entry.is_k() || vv.entry.is_k() {
        return Err("K and V views do not read cache_k and cache_v".into());
    }
    let d = (*k).ne[0] as usize;
    if (*q).type_ != ll::GGML_TYPE_F32 || (*q).nb[0] != 4 || (*q).ne[0] as usize != d || (*v).ne[0] as usize != d {
        return Err(format!("head sizes q {} / k {d} / v {} differ or q is not F32", (*q).ne[0], (*v).ne[0]));
    }
    if d % crate::codec::GROUP != 0 {
        return Err(format!("head size {d} is not a multiple of {}", crate::codec::GROUP));
    }
    if (*q).ne[2] % (*k).ne[2] != 0 || (*q).ne[3] % (*k).ne[3] != 0 || (*k).ne[1] != (*v).ne[1] {
        return Err("unsupported head or stream broadcast".into());
    }
    if !mask.is_null() && ((*mask).type_ != ll::GGML_TYPE_F16 || (*mask).ne[2] != 1 || (*mask).nb[0] != 2 || (*mask).ne[0] != (*k).ne[1]) {
        return Err("mask is not an F16 [n_kv, n_q, 1, S] tensor".into());
    }
    if !sinks.is_null() && (*sinks).type_ != ll::GGML_TYPE_F32 {
        return Err("sinks are not F32".into());
    }
    if (*op).type_ != ll::GGML_TYPE_F32 {
        return Err("output is not F32".into());
    }
    kv.entry.shape(d)?;
    vv.entry.shape(d)?;
    Ok((kv, vv))
}

unsafe fn flash_attn(node: *mut ll::ggml_tensor, n_threads: usize) -> Result<(), String> {
    ATTN_CALLS.fetch_add(1, Ordering::Relaxed);
    let (kview, vview) = flash_attn_check(node)?;
    let s = &(*node).src;
    let (q, k, mask, sinks) = (&*s[0], &*s[1], s[3], s[4]);
    let (d, n_q, n_head, n_seq) = (q.ne[0] as usize, q.ne[1] as usize, q.ne[2] as usize, q.ne[3] as usize);
    let (n_kv, n_head_kv, n_kv_seq) = (k.ne[1] as usize, k.ne[2] as usize, k.ne[3] as usize);
    let p = FaParams { scale: f32_param(node, 0), max_bias: f32_param(node, 1), softcap: f32_param(node, 2) };
    let sinks = (!sinks.is_null()).then(|| std::slice::from_raw_parts((*sinks).data as *const f32, n_head));

    let kg = kview.entry.read();
    let vg = vview.entry.read();
    let (ks, vs) = (kg.as_ref().ok_or("K store not shaped")?, vg.as_ref().ok_or("V store not shaped")?);
    let mut qbuf = vec![0.0f32; n_q * n_head * d];
    for seq in 0..n_seq {
        let kv_seq = seq / (n_seq / n_kv_seq);
        let gk = kview.cell0 + kv_seq * kview.stream_step;
        let gv = vview.cell0 + kv_seq * vview.stream_step;
        if gk != gv {
            return Err("K and V views start at different cells".into());
        }
        let (stream, first) = (gk / ks.cells(), gk % ks.cells());

        // q [d, n_q, n_head, seq] (strided) -> [n_q][n_head][d]
        for i in 0..n_q {
            for h in 0..n_head {
                let src = (q.data as *const u8).add(i * q.nb[1] + h * q.nb[2] + seq * q.nb[3]) as *const f32;
                qbuf[(i * n_head + h) * d..][..d].copy_from_slice(std::slice::from_raw_parts(src, d));
            }
        }
        let mask = (!mask.is_null()).then(|| {
            let m = &*mask;
            let rows = (m.ne[1] as usize).max(n_q);
            let base = (m.data as *const u8).add((seq % m.ne[3] as usize) * m.nb[3]) as *const f16;
            Mask { data: std::slice::from_raw_parts(base, (rows - 1) * (m.nb[1] / 2) + n_kv), stride: m.nb[1] / 2 }
        });
        let kv: Vec<_> = (0..n_head_kv).map(|h| segments(ks, vs, stream, first, n_kv, h)).collect();
        let out = std::slice::from_raw_parts_mut(((*node).data as *mut f32).add(seq * n_q * n_head * d), n_q * n_head * d);
        attn::flash_attn(&qbuf, n_q, n_head, d, &kv, mask, sinks, &p, attn_threads(n_threads, n_q * n_kv * n_head_kv), out);
    }
    Ok(())
}

/// Threads for one attention call: waking a second thread costs more than it saves on
/// small calls (short contexts in decode), measured on the default model.
fn attn_threads(n_threads: usize, row_visits: usize) -> usize {
    const MIN_ROWS_PER_THREAD: usize = 4096;
    n_threads.min(row_visits / MIN_ROWS_PER_THREAD).max(1)
}

// ---------------------------------------------------------------------------------------
// ROPE in place on K: the K-shift that context shifting runs.

unsafe fn rope_check<'a>(op: *const ll::ggml_tensor) -> Result<&'a KvEntry, String> {
    let e = kv_entry(op).ok_or("ROPE target is not a DSpark KV tensor")?;
    let src = (*op).src[0];
    if (*op).view_src.is_null() || src.is_null() || kv_entry(src).map(|s| s as *const KvEntry) != Some(e as *const KvEntry) {
        return Err("ROPE is not in place on K".into());
    }
    let mode = (*op).op_params[2];
    if !e.is_k() || !matches!(mode, ROPE_TYPE_NORMAL | ROPE_TYPE_NEOX) || (*(*op).src[1]).type_ != ll::GGML_TYPE_I32 {
        return Err("unsupported ROPE".into());
    }
    if (*op).nb[2] != e.row_len() * 2 || (*op).nb[0] != 2 || offs(op) != offs(src) {
        return Err("unexpected ROPE view layout".into());
    }
    Ok(e)
}

unsafe fn rope_shift(node: *mut ll::ggml_tensor) -> Result<(), String> {
    let e = rope_check(node)?;
    let n = &*node;
    let n_dims = n.op_params[1] as usize;
    let mode = n.op_params[2];
    let n_ctx_orig = n.op_params[4];
    let (freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow) =
        (f32_param(node, 5), f32_param(node, 6), f32_param(node, 7), f32_param(node, 8), f32_param(node, 9), f32_param(node, 10));
    let n_offs = n.op_params[15].max(0) as usize;
    let mut corr = [0.0f32; 2];
    ll::ggml_rope_yarn_corr_dims(n_dims as i32, n_ctx_orig, freq_base, beta_fast, beta_slow, corr.as_mut_ptr());
    let pos = std::slice::from_raw_parts((*n.src[1]).data as *const i32, n.ne[2] as usize);
    let ff = n.src[2];
    let freq_factors = (!ff.is_null()).then(|| std::slice::from_raw_parts((*ff).data as *const f32, n_dims / 2));
    let rope = Rope { n_dims, neox: mode == ROPE_TYPE_NEOX, freq_base, freq_scale, ext_factor, attn_factor, corr, freq_factors };

    let row_bytes = e.row_len() * 2;
    let (cell0, col0) = (offs(node) / row_bytes, (offs(node) % row_bytes) / 2);
    let mut guard = e.write()?;
    let store = guard.as_mut().expect("shaped by write()");
    let mut row = vec![0.0f32; e.row_len()];
    for (i2, &p) in pos.iter().enumerate() {
        let gcell = cell0 + i2;
        if !store.is_written(gcell) {
            continue;
        }
        store.read_row(gcell, &mut row);
        for i1 in 0..n.ne[1] as usize {
            let start = col0 + i1 * n.nb[1] / 2 + n_offs;
            rope.apply(&mut row[start..start + n_dims], p as f32);
        }
        store.write_row(gcell, &row);
    }
    store.compact(None);
    Ok(())
}

/// ggml's rope_yarn, for one head slice of n_dims values (ggml-cpu/ops.cpp).
struct Rope<'a> {
    n_dims: usize,
    neox: bool,
    freq_base: f32,
    freq_scale: f32,
    ext_factor: f32,
    attn_factor: f32,
    corr: [f32; 2],
    freq_factors: Option<&'a [f32]>,
}

impl Rope<'_> {
    fn apply(&self, x: &mut [f32], pos: f32) {
        let theta_scale = self.freq_base.powf(-2.0 / self.n_dims as f32);
        let mut theta = pos;
        for i0 in (0..self.n_dims).step_by(2) {
            let ff = self.freq_factors.map_or(1.0, |f| f[i0 / 2]);
            let (c, s) = self.yarn(theta / ff, i0);
            let (a, b) = if self.neox { (i0 / 2, i0 / 2 + self.n_dims / 2) } else { (i0, i0 + 1) };
            let (x0, x1) = (x[a], x[b]);
            x[a] = x0 * c - x1 * s;
            x[b] = x0 * s + x1 * c;
            theta *= theta_scale;
        }
    }

    fn yarn(&self, theta_extrap: f32, i0: usize) -> (f32, f32) {
        let theta_interp = self.freq_scale * theta_extrap;
        let mut theta = theta_interp;
        let mut mscale = self.attn_factor;
        if self.ext_factor != 0.0 {
            let y = ((i0 / 2) as f32 - self.corr[0]) / (self.corr[1] - self.corr[0]).max(0.001);
            let ramp_mix = (1.0 - y.clamp(0.0, 1.0)) * self.ext_factor;
            theta = theta_interp * (1.0 - ramp_mix) + theta_extrap * ramp_mix;
            mscale *= 1.0 + 0.1 * (1.0 / self.freq_scale).ln();
        }
        (theta.cos() * mscale, theta.sin() * mscale)
    }
}
