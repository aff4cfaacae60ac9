//! DSPARK0's buffer operations on synthetic KV tensors, through ggml's public API, against a
//! plain f16 model of the same bytes: whole tensors, partial rows, sub-row ranges, strided
//! views, memset, copy between KV tensors, clear.

use dspark::ggml::{self, Config, Stats};
use half::f16;
use llama_cpp_sys_2 as ll;
use rand::{Rng, SeedableRng};

const ROW: usize = 192; // 3 heads of 64, as in the default model
const CELLS: usize = 256;

struct Kv {
    ctx: *mut ll::ggml_context,
    buf: ll::ggml_backend_buffer_t,
    k: *mut ll::ggml_tensor,
    v: *mut ll::ggml_tensor,
    dev: ll::ggml_backend_dev_t,
}

impl Kv {
    fn stats(&self) -> Stats {
        // SAFETY: our live buffer.
        unsafe { Stats::of_buffer(self.buf) }
    }

    /// Tells both stores their head size (64), as the first attention graph would.
    fn shape(&self) {
        // SAFETY: live tensors of our buffer.
        unsafe {
            ggml::shape_kv(self.k, 64).unwrap();
            ggml::shape_kv(self.v, 64).unwrap();
        }
    }
}

impl Drop for Kv {
    fn drop(&mut self) {
        // SAFETY: both were created in alloc() and are freed once.
        unsafe {
            ll::ggml_backend_buffer_free(self.buf);
            ll::ggml_free(self.ctx);
        }
    }
}

/// Two KV roots (cache_k_l0, cache_v_l0) of [ROW, CELLS, 1] F16 in one DSpark buffer.
fn alloc(format: &str) -> Kv {
    let cfg = Config::default().with_format_name(format).unwrap();
    let dev = ggml::register(cfg);
    // SAFETY: a no_alloc ggml context for a few tensor headers; names are NUL-terminated.
    unsafe {
        let ctx = ll::ggml_init(ll::ggml_init_params { mem_size: 16 * 1024, mem_buffer: std::ptr::null_mut(), no_alloc: true });
        let k = ll::ggml_new_tensor_3d(ctx, ll::GGML_TYPE_F16, ROW as i64, CELLS as i64, 1);
        ll::ggml_set_name(k, c"cache_k_l0".as_ptr());
        let v = ll::ggml_new_tensor_3d(ctx, ll::GGML_TYPE_F16, ROW as i64, CELLS as i64, 1);
        ll::ggml_set_name(v, c"cache_v_l0".as_ptr());
        let buft = ll::ggml_backend_dev_buffer_type(dev);
        let buf = ll::ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
        assert!(!buf.is_null());
        Kv { ctx, buf, k, v, dev }
    }
}

fn set(t: *mut ll::ggml_tensor, off: usize, data: &[f16]) {
    // SAFETY: the range lies inside the tensor (checked by ggml).
    unsafe { ll::ggml_backend_tensor_set(t, data.as_ptr().cast(), off, data.len() * 2) }
}

fn get(t: *const ll::ggml_tensor, off: usize, n: usize) -> Vec<f16> {
    let mut out = vec![f16::ZERO; n];
    // SAFETY: as in set.
    unsafe { ll::ggml_backend_tensor_get(t, out.as_mut_ptr().cast(), off, n * 2) };
    out
}

fn random_rows(rng: &mut impl Rng, n: usize) -> Vec<f16> {
    (0..n * ROW).map(|_| f16::from_f32(rng.gen_range(-2.0..2.0))).collect()
}

/// Largest error relative to the largest magnitude of `want`.
fn rel_err(want: &[f16], got: &[f16]) -> f32 {
    let scale = want.iter().map(|x| x.to_f32().abs()).fold(1e-6, f32::max);
    want.iter().zip(got).map(|(a, b)| (a.to_f32() - b.to_f32()).abs()).fold(0.0, f32::max) / scale
}

/// RMS error relative to the RMS of `want`.
fn rms_err(want: &[f16], got: &[f16]) -> f32 {
    let n: f32 = want.iter().map(|x| x.to_f32().powi(2)).sum();
    let e: f32 = want.iter().zip(got).map(|(a, b)| (a.to_f32() - b.to_f32()).powi(2)).sum();
    (e / n).sqrt()
}

/// Runs the buffer scenario; `tol` is the allowed relative error (0 for f16 storage).
fn scenario(format: &str, tol: f32) {
    let kv = alloc(format);
    kv.shape();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let check = |want: &[f16], got: &[f16], what: &str| {
        let e = rel_err(want, got);
        assert!(e <= tol, "{format}: {what}: relative error {e} > {tol}");
    };

    // Never-written cells read as zero and cost nothing.
    assert!(get(kv.k, 0, 4 * ROW).iter().all(|x| x.to_f32() == 0.0));
    assert_eq!(kv.stats().kv_bytes, 0);

    // Whole tensor, then reads of row ranges, partial rows and odd sub-row byte ranges.
    let mut model = random_rows(&mut rng, CELLS);
    set(kv.k, 0, &model);
    check(&model, &get(kv.k, 0, CELLS * ROW), "whole tensor");
    check(&model[5 * ROW..9 * ROW], &get(kv.k, 5 * ROW * 2, 4 * ROW), "row range");
    check(&model[7 * ROW + 10..9 * ROW + 3], &get(kv.k, (7 * ROW + 10) * 2, 2 * ROW - 7), "partial rows");
    let mut raw = vec![0u8; 5];
    // SAFETY: a 5-byte read at an odd offset inside the tensor.
    unsafe { ll::ggml_backend_tensor_get(kv.k, raw.as_mut_ptr().cast(), 2 * ROW * 2 + 3, 5) };
    let bytes: Vec<u8> = get(kv.k, 2 * ROW * 2, 4).iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(raw, bytes[3..8], "{format}: odd byte range");

    // Sub-row writes (read-modify-write) keep the rest of the row.
    let patch = random_rows(&mut rng, 1)[..50].to_vec();
    set(kv.k, (20 * ROW + 30) * 2, &patch);
    model[20 * ROW + 30..20 * ROW + 80].copy_from_slice(&patch);
    check(&model[19 * ROW..22 * ROW], &get(kv.k, 19 * ROW * 2, 3 * ROW), "sub-row write");

    // A strided view: head 1 (values 64..128) of cells 10..40, as a 2-D view.
    // SAFETY: the view lies inside k; view_init gives it its address in our buffer.
    let got = unsafe {
        let view = ll::ggml_view_2d(kv.ctx, kv.k, 64, 30, ROW * 2, (10 * ROW + 64) * 2);
        assert_eq!(ll::ggml_backend_view_init(view), ll::GGML_STATUS_SUCCESS);
        let span = ll::ggml_nbytes(view) / 2;
        get(view, 0, span)
    };
    check(&model[10 * ROW + 64..10 * ROW + 64 + got.len()], &got, "strided view span");

    // memset of a range, then copy K to V, then clear.
    // SAFETY: the range is inside k.
    unsafe { ll::ggml_backend_tensor_memset(kv.k, 0, (40 * ROW + 1) * 2, 3 * ROW * 2) };
    model[40 * ROW + 1..43 * ROW + 1].fill(f16::ZERO);
    check(&model[39 * ROW..44 * ROW], &get(kv.k, 39 * ROW * 2, 5 * ROW), "memset");
    // SAFETY: same shapes, both in our buffer.
    unsafe { ll::ggml_backend_tensor_copy(kv.k, kv.v) };
    let tol_copy = if tol == 0.0 { 0.0 } else { 2.0 * tol };
    let e = rel_err(&model, &get(kv.v, 0, CELLS * ROW));
    assert!(e <= tol_copy, "{format}: copy K to V: relative error {e}");

    let held = kv.stats().kv_bytes;
    assert!(held > 0);
    // SAFETY: our live buffer.
    unsafe { ll::ggml_backend_buffer_clear(kv.buf, 0) };
    assert_eq!(kv.stats().kv_bytes, 0, "{format}: clear must free the pages");
    assert!(get(kv.v, 0, CELLS * ROW).iter().all(|x| x.to_f32() == 0.0));
}

#[test]
fn f16_storage_is_exact() {
    scenario("f16", 0.0);
}

#[test]
fn k8v8_storage_is_close() {
    scenario("k8v8", 0.02);
}

#[test]
fn k4v4_storage_is_close() {
    scenario("k4v4", 0.25);
}

#[test]
fn memory_is_what_the_pages_hold() {
    use dspark::codec::{Quant, RowCodec};
    use dspark::kv::PageCodec;
    for (format, quant) in [("f16", None), ("k8v8", Some(Quant::Q8)), ("k4v4", Some(Quant::Q4))] {
        let kv = alloc(format);
        kv.shape();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        set(kv.k, 0, &random_rows(&mut rng, CELLS));
        let s = kv.stats();
        // 4 pages of 64 cells: page 0 (sinks) and the two pages of the 128-cell window stay
        // f16; page 1 is compressed (f16 storage: all four are f16).
        // A compressed page holds its rows and a centroid row per head (centred pages).
        let b = quant.map_or(16.0, |q| PageCodec { rows: RowCodec::new(q, 64).unwrap(), n_head: 1, centered: true }.bits_per_elem());
        let want = (3.0 * 16.0 + b) / 4.0;
        assert_eq!(s.cells, CELLS as u64);
        assert!((s.bits_per_elem() - want).abs() < 1e-9, "{format}: {} bits/elem, want {want}", s.bits_per_elem());
        assert_eq!(s.kv_bytes as f64, want / 8.0 * (CELLS * ROW) as f64);
    }
}

// ---------------------------------------------------------------------------------------
// Graphs computed on the DSpark backend (as llama.cpp's scheduler hands them over) and, for
// reference, the same graphs on ggml's CPU backend.

/// A ggml context for one graph, its tensors allocated in one buffer of `buft`.
struct Graph {
    ctx: *mut ll::ggml_context,
    gf: *mut ll::ggml_cgraph,
    buf: ll::ggml_backend_buffer_t,
}

impl Graph {
    /// Builds a graph with `build` (which returns the output node), then allocates it.
    fn new(buft: ll::ggml_backend_buffer_type_t, build: impl FnOnce(*mut ll::ggml_context) -> *mut ll::ggml_tensor) -> Graph {
        // SAFETY: a no_alloc context; the graph's tensors are allocated in a fresh buffer.
        unsafe {
            let ctx = ll::ggml_init(ll::ggml_init_params { mem_size: 1 << 20, mem_buffer: std::ptr::null_mut(), no_alloc: true });
            let out = build(ctx);
            let gf = ll::ggml_new_graph(ctx);
            ll::ggml_build_forward_expand(gf, out);
            let buf = ll::ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
            Graph { ctx, gf, buf }
        }
    }

    fn compute(&self, backend: ll::ggml_backend_t) -> ll::ggml_status {
        // SAFETY: a complete, allocated graph.
        unsafe { ll::ggml_backend_graph_compute(backend, self.gf) }
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: created in new() and freed once.
        unsafe {
            if !self.buf.is_null() {
                ll::ggml_backend_buffer_free(self.buf);
            }
            ll::ggml_free(self.ctx);
        }
    }
}

fn dspark_backend(kv: &Kv) -> ll::ggml_backend_t {
    // SAFETY: one of our devices.
    let b = unsafe { ll::ggml_backend_dev_init(kv.dev, std::ptr::null()) };
    assert!(!b.is_null());
    b
}

/// The K-shift graph llama.cpp builds: RoPE in place on a [64, 3, CELLS] view of K.
fn shift_graph(buft: ll::ggml_backend_buffer_type_t, k: *mut ll::ggml_tensor, shift: &[i32]) -> Graph {
    let mut pos = std::ptr::null_mut();
    let g = Graph::new(buft, |ctx| {
        // SAFETY: the view lies inside k; NEOX RoPE as SmolLM2 uses it.
        unsafe {
            let view = ll::ggml_view_3d(ctx, k, 64, 3, CELLS as i64, 64 * 2, ROW * 2, 0);
            pos = ll::ggml_new_tensor_1d(ctx, ll::GGML_TYPE_I32, CELLS as i64);
            ll::ggml_rope_ext_inplace(ctx, view, pos, std::ptr::null_mut(), 64, 2, 8192, 100000.0, 1.0, 0.0, 1.0, 32.0, 1.0)
        }
    });
    // SAFETY: pos is an allocated I32 tensor of CELLS values.
    unsafe { ll::ggml_backend_tensor_set(pos, shift.as_ptr().cast(), 0, CELLS * 4) };
    g
}

/// `t` in a CPU buffer, for reference computations: [ROW, CELLS] F16 named like a KV root.
struct CpuKv {
    ctx: *mut ll::ggml_context,
    buf: ll::ggml_backend_buffer_t,
    k: *mut ll::ggml_tensor,
}

impl CpuKv {
    fn new(data: &[f16]) -> CpuKv {
        // SAFETY: a no_alloc context with one tensor, allocated in a CPU buffer.
        unsafe {
            let ctx = ll::ggml_init(ll::ggml_init_params { mem_size: 16 * 1024, mem_buffer: std::ptr::null_mut(), no_alloc: true });
            let k = ll::ggml_new_tensor_2d(ctx, ll::GGML_TYPE_F16, ROW as i64, CELLS as i64);
            let buf = ll::ggml_backend_alloc_ctx_tensors_from_buft(ctx, ll::ggml_backend_cpu_buffer_type());
            let kv = CpuKv { ctx, buf, k };
            set(k, 0, data);
            kv
        }
    }
}

impl Drop for CpuKv {
    fn drop(&mut self) {
        // SAFETY: created in new() and freed once.
        unsafe {
            ll::ggml_backend_buffer_free(self.buf);
            ll::ggml_free(self.ctx);
        }
    }
}

#[test]
fn rows_written_before_the_head_size_is_known_stay_exact_until_an_attention_graph_tells_it() {
    let kv = alloc("k4v4");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (kd, vd) = (random_rows(&mut rng, CELLS), random_rows(&mut rng, CELLS));
    set(kv.k, 0, &kd);
    set(kv.v, 0, &vd);
    // Nothing has said how a row splits into heads: kept exactly, in f16.
    assert_eq!(get(kv.k, 0, CELLS * ROW), kd);
    assert_eq!(kv.stats().pages_compressed, 0);

    // Decode attention (9 query heads over the 3 KV heads, one query) on the DSpark
    // backend, and the same on ggml's CPU backend over the exact f16 K/V.
    let q: Vec<f32> = (0..64 * 9).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let fa = |buft, k, v| {
        let (mut tq, mut tm) = (std::ptr::null_mut(), std::ptr::null_mut());
        let mut out = std::ptr::null_mut();
        let g = Graph::new(buft, |ctx| {
            // SAFETY: views inside k and v; shapes as llama.cpp builds them.
            unsafe {
                tq = ll::ggml_new_tensor_4d(ctx, ll::GGML_TYPE_F32, 64, 1, 9, 1);
                let kview = ll::ggml_view_4d(ctx, k, 64, CELLS as i64, 3, 1, ROW * 2, 64 * 2, ROW * 2 * CELLS, 0);
                let vview = ll::ggml_view_4d(ctx, v, 64, CELLS as i64, 3, 1, ROW * 2, 64 * 2, ROW * 2 * CELLS, 0);
                tm = ll::ggml_new_tensor_4d(ctx, ll::GGML_TYPE_F16, CELLS as i64, 1, 1, 1);
                out = ll::ggml_flash_attn_ext(ctx, tq, kview, vview, tm, 0.125, 0.0, 0.0);
                ll::ggml_flash_attn_ext_set_prec(out, ll::GGML_PREC_F32);
                out
            }
        });
        // SAFETY: allocated tensors of the sizes written.
        unsafe {
            ll::ggml_backend_tensor_set(tq, q.as_ptr().cast(), 0, q.len() * 4);
            let zeros = vec![f16::ZERO; CELLS];
            ll::ggml_backend_tensor_set(tm, zeros.as_ptr().cast(), 0, CELLS * 2);
        }
        (g, out)
    };
    let read = |t: *mut ll::ggml_tensor| {
        let mut o = vec![0.0f32; 64 * 9];
        // SAFETY: the FA output holds 64 x 9 F32.
        unsafe { ll::ggml_backend_tensor_get(t, o.as_mut_ptr().cast(), 0, o.len() * 4) };
        o
    };
    let backend = dspark_backend(&kv);
    // SAFETY: our device's buffer type.
    let (g, out) = fa(unsafe { ll::ggml_backend_dev_buffer_type(kv.dev) }, kv.k, kv.v);
    assert_eq!(g.compute(backend), ll::GGML_STATUS_SUCCESS);
    let got = read(out);

    let (ck, cv) = (CpuKv::new(&kd), CpuKv::new(&vd));
    // SAFETY: ggml's CPU backend and buffer type.
    let (cpu, cpu_buft) = unsafe { (ll::ggml_backend_cpu_init(), ll::ggml_backend_cpu_buffer_type()) };
    let (gc, outc) = fa(cpu_buft, ck.k, cv.k);
    assert_eq!(gc.compute(cpu), ll::GGML_STATUS_SUCCESS);
    let want = read(outc);

    // The graph told DSpark the head size: page 1 (the one out of the sink page and the
    // 128-cell window) is compressed now, and attention read it in that shape.
    let s = kv.stats();
    assert_eq!((s.pages_f16, s.pages_compressed), (6, 2), "{s:?}");
    // Error relative to the largest |V| (2.0): 4-bit V rows in one of four pages.
    let err = want.iter().zip(&got).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / 2.0;
    assert!(err < 0.02, "attention differs from ggml's on the same K/V: {err}");
    // SAFETY: backends made above, freed once.
    unsafe {
        ll::ggml_backend_free(backend);
        ll::ggml_backend_free(cpu);
    }
}

#[test]
fn a_failed_kv_write_fails_every_graph_on_that_kv_until_it_is_cleared() {
    let kv = alloc("k4v4");
    kv.shape();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    set(kv.k, 0, &random_rows(&mut rng, CELLS));
    let backend = dspark_backend(&kv);
    // SAFETY: our device's buffer type.
    let buft = unsafe { ll::ggml_backend_dev_buffer_type(kv.dev) };
    let g = shift_graph(buft, kv.k, &[0; CELLS]);
    assert_eq!(g.compute(backend), ll::GGML_STATUS_SUCCESS);

    // SAFETY: a live KV tensor of ours.
    unsafe { ggml::fail_kv(kv.k, "injected write error") }.unwrap();
    assert_eq!(g.compute(backend), ll::GGML_STATUS_FAILED, "a graph on an unreliable KV must fail");
    assert_eq!(g.compute(backend), ll::GGML_STATUS_FAILED, "and keep failing");
    // SAFETY: our live buffer.
    unsafe { ll::ggml_backend_buffer_clear(kv.buf, 0) };
    assert_eq!(g.compute(backend), ll::GGML_STATUS_SUCCESS, "clearing the cache makes it consistent again");
    // SAFETY: made above, freed once.
    unsafe { ll::ggml_backend_free(backend) };
}

#[test]
fn k_shift_rotates_only_the_cells_that_move_and_ten_shifts_track_stock_f16() {
    let kv = alloc("k4v4");
    kv.shape();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let kd = random_rows(&mut rng, CELLS);
    set(kv.k, 0, &kd);
    let before = get(kv.k, 0, CELLS * ROW);
    let cpu_k = CpuKv::new(&before); // stock's f16 K, starting from the same values
    let backend = dspark_backend(&kv);
    // SAFETY: backends and buffer types of ggml and of our device.
    let (cpu, cpu_buft, buft) = unsafe { (ll::ggml_backend_cpu_init(), ll::ggml_backend_cpu_buffer_type(), ll::ggml_backend_dev_buffer_type(kv.dev)) };

    // Ten shifts of the cells from 100 on (as a context shift moves the tail down after a
    // removal); cells 0..100 (sinks and compressed cells alike) never move. Cells 100..128
    // lie in a compressed page, 128.. in the f16 window.
    let mut first_rms = 0.0;
    for i in 0..10 {
        let delta = if i % 2 == 0 { -7 } else { 5 };
        let shift: Vec<i32> = (0..CELLS).map(|c| if c >= 100 { delta } else { 0 }).collect();
        assert_eq!(shift_graph(buft, kv.k, &shift).compute(backend), ll::GGML_STATUS_SUCCESS);
        assert_eq!(shift_graph(cpu_buft, cpu_k.k, &shift).compute(cpu), ll::GGML_STATUS_SUCCESS);
        if i == 0 {
            first_rms = rms_err(&get(cpu_k.k, 100 * ROW * 2, 28 * ROW), &get(kv.k, 100 * ROW * 2, 28 * ROW));
        }
    }
    let (after, stock) = (get(kv.k, 0, CELLS * ROW), get(cpu_k.k, 0, CELLS * ROW));
    assert_eq!(after[..100 * ROW], before[..100 * ROW], "cells whose shift is 0 must not be re-encoded");
    let f16_err = rel_err(&stock[128 * ROW..], &after[128 * ROW..]);
    assert!(f16_err < 2e-3, "f16 cells after ten shifts differ from stock's f16 shift by {f16_err}");
    // A compressed cell is re-encoded by every shift that moves it (as llama.cpp re-quantizes
    // a quantized K), so its error grows like independent noise, ~sqrt(shifts) x one
    // re-encoding's; a wrong rotation would be far off.
    let rms = rms_err(&stock[100 * ROW..128 * ROW], &after[100 * ROW..128 * ROW]);
    assert!(first_rms > 0.0 && first_rms < 0.12, "one shift: rms error {first_rms}");
    assert!(rms < 1.25 * 10f32.sqrt() * first_rms, "ten shifts: rms error {rms}, one shift {first_rms}");
    assert!(rel_err(&before[100 * ROW..], &after[100 * ROW..]) > 0.1, "the shifted cells moved");
    // SAFETY: made above, freed once.
    unsafe {
        ll::ggml_backend_free(backend);
        ll::ggml_backend_free(cpu);
    }
}

#[test]
fn statistics_can_be_read_while_other_threads_create_and_free_kv_caches() {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = Stats::now();
                }
            });
        }
        let makers: Vec<_> = (0..2)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                    for _ in 0..200 {
                        let kv = alloc(if t == 0 { "k4v4" } else { "k8v8" });
                        set(kv.k, 0, &random_rows(&mut rng, 8));
                        assert_eq!(kv.stats().cells, 8);
                    }
                })
            })
            .collect();
        makers.into_iter().for_each(|m| m.join().unwrap());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

/// DSpark never replaces the host's log callback, and its messages reach it.
#[test]
fn registering_keeps_the_host_log_callback_and_logs_through_it() {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    /// # Safety
    /// llama.cpp log callback: `text` is NULL or a NUL-terminated string.
    unsafe extern "C" fn host_log(_: ll::ggml_log_level, text: *const std::ffi::c_char, _: *mut std::ffi::c_void) {
        if !text.is_null() {
            // SAFETY: NUL-terminated (ggml's contract).
            let t = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy().into_owned();
            SEEN.lock().unwrap().push(t);
        }
    }
    let tag = 0x5eed as *mut std::ffi::c_void;
    // SAFETY: a static callback; the tag is never dereferenced.
    unsafe { ll::llama_log_set(Some(host_log), tag) };
    let kv = alloc("k8v4");
    let (mut cb, mut user) = (None, std::ptr::null_mut());
    // SAFETY: two valid out-pointers.
    unsafe { ll::ggml_log_get(&mut cb, &mut user) };
    assert!(cb.is_some() && user == tag, "registering DSpark replaced the host's log callback");
    // SAFETY: a live KV tensor of ours.
    unsafe { ggml::fail_kv(kv.k, "message for the host log") }.unwrap();
    assert!(SEEN.lock().unwrap().iter().any(|t| t.contains("dspark: message for the host log")));
}
