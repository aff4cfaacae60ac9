//! Fidelity of the codec against llama.cpp's rotated q4_0/q8_0 and against the quantizer
//! variants that were measured and dropped (see the table in `src/codec/mod.rs`).
//!
//! The q4_0/q8_0 baselines are ggml's own quantizers from the linked library
//! (`ggml_quantize_chunk`, and the type's `to_float` to dequantize), as llama.cpp stores a
//! quantized KV cache; the Rust ports beside them only check that the test drives ggml right.
//!
//! `cargo test --release --test codec_fidelity -- --nocapture` prints the table.

use dspark::codec::{rotate, unrotate, Quant, RowCodec};
use half::f16;
use llama_cpp_sys_2 as sys;
use rand::{rngs::StdRng, Rng, SeedableRng};

const QK: usize = 32;

/// Quantize `x` (one row) to ggml type `t` with ggml's `ggml_quantize_chunk`, then back to f32
/// with the type's `to_float`: what llama.cpp does to a row of a KV cache of that type.
fn ggml_roundtrip(t: sys::ggml_type, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "ggml_roundtrip: lengths");
    let n = x.len() as i64;
    // SAFETY: a pure size query for a built-in type.
    let mut buf = vec![0u8; unsafe { sys::ggml_row_size(t, n) }];
    // SAFETY: 1. `x` holds one row of n floats, `buf` ggml_row_size(t, n) bytes for it;
    // 2. no importance matrix (q4_0/q8_0 do not need one); 3. the traits pointer is ggml's
    // static table entry for `t`, and `to_float` reads that row and writes n floats to `out`.
    unsafe {
        let written = sys::ggml_quantize_chunk(t, x.as_ptr(), buf.as_mut_ptr().cast(), 0, 1, n, std::ptr::null());
        assert_eq!(written, buf.len(), "ggml_quantize_chunk wrote an unexpected size");
        let to_float = (*sys::ggml_get_type_traits(t)).to_float.expect("type without to_float");
        to_float(buf.as_ptr().cast(), out.as_mut_ptr(), n);
    }
}

/// Rust port of ggml `quantize_row_q4_0_ref` + `dequantize_row_q4_0` (ggml-quants.c), on a rotated row.
fn q4_0_roundtrip(x: &[f32], out: &mut [f32]) {
    for (b, o) in x.chunks_exact(QK).zip(out.chunks_exact_mut(QK)) {
        let max = b.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        let dh = f16::from_f32(d).to_f32();
        for (v, y) in b.iter().zip(o.iter_mut()) {
            let q = ((v * id + 8.5) as i32).min(15); // C's (int8_t) truncation, then MIN(15, .)
            *y = (q - 8) as f32 * dh;
        }
    }
}

/// Rust port of ggml `quantize_row_q8_0_ref` + dequantize, on a rotated row.
fn q8_0_roundtrip(x: &[f32], out: &mut [f32]) {
    for (b, o) in x.chunks_exact(QK).zip(out.chunks_exact_mut(QK)) {
        let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        let dh = f16::from_f32(d).to_f32();
        for (v, y) in b.iter().zip(o.iter_mut()) {
            *y = (v * id).round() * dh;
        }
    }
}

/// Best reconstruction of `x` with `levels` (unit scale) times a row scale from a search over
/// multiples of the row RMS: a row-scale scalar quantizer with an MSE-optimal scale.
fn row_codebook_roundtrip(x: &[f32], levels: &[f32], out: &mut [f32]) {
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
    let mut best = f32::INFINITY;
    for k in 0..31 {
        let s = rms * (0.7 + 0.02 * k as f32);
        let mut err = 0.0;
        let mut y = vec![0.0; x.len()];
        for (v, o) in x.iter().zip(y.iter_mut()) {
            let l = levels
                .iter()
                .fold(f32::INFINITY, |b, &c| if (c * s - v).abs() < (b - v).abs() { c * s } else { b });
            *o = l;
            err += (l - v) * (l - v);
        }
        if err < best {
            best = err;
            out.copy_from_slice(&y);
        }
    }
}

const LLOYD16: [f32; 8] = [0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326];
const LLOYD8: [f32; 4] = [0.2451, 0.7560, 1.3439, 2.1520];

fn symmetric(half: &[f32]) -> Vec<f32> {
    half.iter().flat_map(|&c| [c, -c]).collect()
}

fn uniform16() -> Vec<f32> {
    (0..16).map(|k| (k as f32 - 7.5) * 0.3352).collect()
}

fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.gen_range(1e-7..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// `n` rows of dimension `d`: half i.i.d. Gaussian, half with 4 fixed outlier channels at 20x
/// and a per-channel bias (the shape of real K rows).
fn test_rows(d: usize, n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let outliers: Vec<usize> = (0..4).map(|_| rng.gen_range(0..d)).collect();
    let bias: Vec<f32> = (0..d).map(|_| 0.3 * gaussian(&mut rng)).collect();
    (0..n)
        .map(|r| {
            (0..d)
                .map(|c| {
                    let g = gaussian(&mut rng);
                    if r % 2 == 1 {
                        if outliers.contains(&c) {
                            20.0 * g
                        } else {
                            g + bias[c]
                        }
                    } else {
                        g
                    }
                })
                .collect()
        })
        .collect()
}

type Roundtrip = Box<dyn Fn(&[f32], &mut [f32])>;

/// A quantizer that works on rotated rows, wrapped to take and return model-space rows.
fn rotated(f: impl Fn(&[f32], &mut [f32]) + 'static) -> Roundtrip {
    Box::new(move |x: &[f32], out: &mut [f32]| {
        let mut y = x.to_vec();
        rotate(&mut y);
        f(&y, out);
        unrotate(out);
    })
}

fn codec(q: Quant, d: usize, search: bool) -> Roundtrip {
    let c = RowCodec::new(q, d).unwrap();
    Box::new(move |x: &[f32], out: &mut [f32]| {
        let mut buf = vec![0u8; c.row_bytes()];
        if search {
            c.encode(x, &mut buf);
        } else {
            c.encode_absmax(x, &mut buf);
        }
        c.decode(&buf, out);
    })
}

struct Variant {
    name: &'static str,
    bits: f64,
    f: Roundtrip,
}

fn variants(d: usize) -> Vec<Variant> {
    let row = 16.0 / d as f64;
    let bpe = |q| RowCodec::new(q, d).unwrap().bits_per_elem();
    let lm16 = symmetric(&LLOYD16);
    let lm8 = symmetric(&LLOYD8);
    let u16l = uniform16();
    vec![
        Variant { name: "R8", bits: bpe(Quant::Q8), f: codec(Quant::Q8, d, true) },
        Variant { name: "rotated q8_0", bits: 8.5, f: rotated(|x, o| ggml_roundtrip(sys::GGML_TYPE_Q8_0, x, o)) },
        Variant { name: "rotated q8_0 (Rust port)", bits: 8.5, f: rotated(q8_0_roundtrip) },
        Variant { name: "R4", bits: bpe(Quant::Q4), f: codec(Quant::Q4, d, true) },
        Variant { name: "R4 absmax (no search)", bits: bpe(Quant::Q4), f: codec(Quant::Q4, d, false) },
        Variant { name: "rotated q4_0", bits: 4.5, f: rotated(|x, o| ggml_roundtrip(sys::GGML_TYPE_Q4_0, x, o)) },
        Variant { name: "rotated q4_0 (Rust port)", bits: 4.5, f: rotated(q4_0_roundtrip) },
        Variant {
            name: "row-scale uniform 4-bit",
            bits: 4.0 + row,
            f: rotated(move |x, o| row_codebook_roundtrip(x, &u16l, o)),
        },
        Variant {
            name: "row-scale Lloyd-Max 16",
            bits: 4.0 + row,
            f: rotated(move |x, o| row_codebook_roundtrip(x, &lm16, o)),
        },
        Variant { name: "R3", bits: bpe(Quant::Q3), f: codec(Quant::Q3, d, true) },
        Variant {
            name: "row-scale Lloyd-Max 8",
            bits: 3.0 + row,
            f: rotated(move |x, o| row_codebook_roundtrip(x, &lm8, o)),
        },
        Variant { name: "R2", bits: bpe(Quant::Q2), f: codec(Quant::Q2, d, true) },
    ]
}

/// Relative MSE over all rows, and the mean relative error of single-query attention outputs
/// (K and V both quantized by the variant) against exact f64 attention.
struct Fidelity {
    rel_mse: f64,
    attn_err: f64,
}

fn measure(v: &Variant, keys: &[Vec<f32>], vals: &[Vec<f32>], queries: &[Vec<f32>]) -> Fidelity {
    let d = keys[0].len();
    let rt = |rows: &[Vec<f32>]| -> Vec<Vec<f32>> {
        rows.iter()
            .map(|x| {
                let mut y = vec![0.0; d];
                (v.f)(x, &mut y);
                y
            })
            .collect()
    };
    let (kq, vq) = (rt(keys), rt(vals));
    let (mut e, mut s) = (0.0f64, 0.0f64);
    for (x, y) in keys.iter().chain(vals).zip(kq.iter().chain(&vq)) {
        for (a, b) in x.iter().zip(y) {
            e += f64::from(a - b).powi(2);
            s += f64::from(*a).powi(2);
        }
    }
    let mut attn_err = 0.0;
    for q in queries {
        let exact = attend(q, keys, vals);
        let approx = attend(q, &kq, &vq);
        let num: f64 = exact.iter().zip(&approx).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = exact.iter().map(|a| a * a).sum();
        attn_err += (num / den).sqrt();
    }
    Fidelity { rel_mse: e / s, attn_err: attn_err / queries.len() as f64 }
}

fn attend(q: &[f32], keys: &[Vec<f32>], vals: &[Vec<f32>]) -> Vec<f64> {
    let scale = 1.0 / (q.len() as f64).sqrt();
    let s: Vec<f64> = keys
        .iter()
        .map(|k| k.iter().zip(q).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() * scale)
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut out = vec![0.0; q.len()];
    for (wi, v) in w.iter().zip(vals) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += wi / z * f64::from(*x);
        }
    }
    out
}

fn table(d: usize) -> Vec<(&'static str, f64, Fidelity)> {
    let keys = test_rows(d, 1024, 1);
    let vals = test_rows(d, 1024, 2);
    // Queries correlated with a few keys so the softmax is peaky, as in real attention.
    let mut rng = StdRng::seed_from_u64(3);
    let queries: Vec<Vec<f32>> = (0..64)
        .map(|i| {
            let k = &keys[(i * 37) % keys.len()];
            let norm = (k.iter().map(|x| x * x).sum::<f32>() / d as f32).sqrt();
            k.iter().map(|x| 0.7 * x / norm + gaussian(&mut rng)).collect()
        })
        .collect();
    let rows: Vec<_> = variants(d)
        .into_iter()
        .map(|v| {
            let f = measure(&v, &keys, &vals, &queries);
            (v.name, v.bits, f)
        })
        .collect();
    println!("\nd = {d}\n| quantizer | bits/value | rel. MSE | attn out rel. err |\n|---|---|---|---|");
    for (name, bits, f) in &rows {
        println!("| {name} | {bits:.3} | {:.3e} | {:.3e} |", f.rel_mse, f.attn_err);
    }
    rows
}

fn get<'a>(rows: &'a [(&str, f64, Fidelity)], name: &str) -> &'a Fidelity {
    &rows.iter().find(|r| r.0 == name).unwrap().2
}

#[test]
fn r4_beats_rotated_q4_0_and_r8_matches_q8_0() {
    for d in [64, 128] {
        let rows = table(d);
        // The test drives ggml's quantizers right: their error is the port's, within 1%.
        for t in ["q4_0", "q8_0"] {
            let (g, port) = (get(&rows, &format!("rotated {t}")), get(&rows, &format!("rotated {t} (Rust port)")));
            let rel = (g.rel_mse / port.rel_mse - 1.0).abs();
            assert!(rel < 0.01, "d={d}: ggml {t} rel. MSE {} vs Rust port {} ({:.2}% apart)", g.rel_mse, port.rel_mse, 100.0 * rel);
        }
        let (r4, q4) = (get(&rows, "R4"), get(&rows, "rotated q4_0"));
        assert!(r4.rel_mse <= q4.rel_mse, "d={d}: R4 mse {} > q4_0 {}", r4.rel_mse, q4.rel_mse);
        assert!(r4.attn_err <= q4.attn_err, "d={d}: R4 attn {} > q4_0 {}", r4.attn_err, q4.attn_err);
        let (r8, q8) = (get(&rows, "R8"), get(&rows, "rotated q8_0"));
        assert!(r8.rel_mse <= 1.2 * q8.rel_mse, "d={d}: R8 {} vs q8_0 {}", r8.rel_mse, q8.rel_mse);
        // Lower bit widths keep their documented ceilings.
        assert!(get(&rows, "R3").rel_mse < 0.04);
        assert!(get(&rows, "R2").rel_mse < 0.15);
    }
}

/// A known property of ggml's q4_0, on its own output: with d = max/-8 (max = the block's
/// value of largest magnitude) and codes clamped to 15, every value is reconstructed within
/// one step |d| = |max|/8 (half a step unless clamped), plus the f16 rounding of d (at most
/// 8 steps × 2⁻¹¹ relative). And the block's largest value comes back exactly up to that
/// rounding (code 0).
#[test]
fn ggml_q4_0_error_is_within_one_step() {
    let mut rng = StdRng::seed_from_u64(9);
    let x: Vec<f32> = (0..QK * 64).map(|i| gaussian(&mut rng) * (1.0 + (i / QK) as f32)).collect();
    let mut y = vec![0.0; x.len()];
    ggml_roundtrip(sys::GGML_TYPE_Q4_0, &x, &mut y);
    let mut worst = 0.0f32;
    for (b, o) in x.chunks_exact(QK).zip(y.chunks_exact(QK)) {
        let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let tol = amax / 8.0 * (1.0 + 8.0 / 2048.0) + 1e-6;
        for (v, r) in b.iter().zip(o) {
            assert!((v - r).abs() <= tol, "q4_0 error {} > one step {tol} (x {v}, back {r})", (v - r).abs());
            worst = worst.max((v - r).abs() / amax);
        }
        let top = b.iter().zip(o).max_by(|p, q| p.0.abs().total_cmp(&q.0.abs())).unwrap();
        assert!((top.0 - top.1).abs() <= amax * 8.0 / 2048.0 / 8.0 + 1e-6, "largest value {} came back as {}", top.0, top.1);
    }
    // It does quantize: some value lands about half a step away.
    assert!(worst > 0.04, "q4_0 looks lossless (worst error {worst} of max)");
}
