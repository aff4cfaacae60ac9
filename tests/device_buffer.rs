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
    owner: u64,
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
        let (buf, owner) = ggml::with_config(cfg, || ll::ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft));
        assert!(!buf.is_null());
        Kv { ctx, buf, k, v, owner }
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

/// Runs the buffer scenario; `tol` is the allowed relative error (0 for f16 storage).
fn scenario(format: &str, tol: f32) {
    let kv = alloc(format);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let check = |want: &[f16], got: &[f16], what: &str| {
        let e = rel_err(want, got);
        assert!(e <= tol, "{format}: {what}: relative error {e} > {tol}");
    };

    // Never-written cells read as zero and cost nothing.
    assert!(get(kv.k, 0, 4 * ROW).iter().all(|x| x.to_f32() == 0.0));
    assert_eq!(Stats::of(kv.owner).kv_bytes, 0);

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

    let held = Stats::of(kv.owner).kv_bytes;
    assert!(held > 0);
    // SAFETY: our live buffer.
    unsafe { ll::ggml_backend_buffer_clear(kv.buf, 0) };
    assert_eq!(Stats::of(kv.owner).kv_bytes, 0, "{format}: clear must free the pages");
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
    for (format, quant) in [("f16", None), ("k8v8", Some(Quant::Q8)), ("k4v4", Some(Quant::Q4))] {
        let kv = alloc(format);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        set(kv.k, 0, &random_rows(&mut rng, CELLS));
        let s = Stats::of(kv.owner);
        // 4 pages of 64 cells: page 0 (sinks) and the two pages of the 128-cell window stay
        // f16; page 1 is compressed (f16 storage: all four are f16).
        let b = quant.map_or(16.0, |q| RowCodec::new(q, 64).unwrap().bits_per_elem());
        let want = (3.0 * 16.0 + b) / 4.0;
        assert_eq!(s.cells, CELLS as u64);
        assert!((s.bits_per_elem() - want).abs() < 1e-9, "{format}: {} bits/elem, want {want}", s.bits_per_elem());
        assert_eq!(s.kv_bytes as f64, want / 8.0 * (CELLS * ROW) as f64);
    }
}
