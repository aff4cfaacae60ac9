//! Tile kernels in plain Rust, written so that LLVM vectorizes them: fixed 16-lane
//! accumulators, no float reductions across lanes inside loops, no table lookups. Every
//! function is `#[inline(always)]` and generic over [`Flavor`], so `isa.rs` compiles the whole
//! tile pipeline once per instruction set (AVX-512, AVX2+FMA, portable) from this one source.

/// What differs between instruction sets: the multiply-add and the row decoders.
pub(crate) trait Flavor: Copy + Send + Sync + 'static {
    /// `a * b + c`.
    fn fma(a: f32, b: f32, c: f32) -> f32;
    /// One packed row into the rotated space.
    fn decode_packed(codec: &RowCodec, data: &[u8], out: &mut [f32]) {
        codec.decode_rotated_inline(data, out);
    }
    /// f16 rows to f32, non-finite values read as 0.
    fn f16_rows(src: &[f16], out: &mut [f32]) {
        f16_rows(src, out);
    }
    /// `s[r·stride + j] = dot(q row r, k row j)` for `m` query rows and `nj` keys, summed in
    /// the order of [`dot_rows`].
    #[allow(clippy::too_many_arguments)]
    fn scores(q: &[f32], m: usize, k: &[f32], nj: usize, d: usize, s: &mut [f32], stride: usize) {
        scores::<Self>(q, m, k, nj, d, s, stride);
    }
    /// `acc row r += Σ_j p[r·stride + j] · v row j` for rows `0..m`, in the order of
    /// [`accumulate`].
    #[allow(clippy::too_many_arguments)]
    fn accumulate_rows(p: &[f32], stride: usize, v: &[f32], nj: usize, d: usize, m: usize, acc: &mut [f32]) {
        for r in 0..m {
            accumulate::<Self>(&p[r * stride..r * stride + nj], &v[..nj * d], &mut acc[r * d..(r + 1) * d]);
        }
    }
    /// Whether the transposed prefill kernels below exist.
    const WIDE: bool = false;
    /// `st[j·mp + r] = dot(q row r, k row j)` with `qt` transposed (`d × mp`).
    fn scores_t(_qt: &[f32], _mp: usize, _k: &[f32], _nj: usize, _d: usize, _st: &mut [f32]) {
        unreachable!("scores_t without WIDE");
    }
    /// `acc row r += Σ_j pt[j·mp + r] · v row j` for rows `0..m`.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_t(_pt: &[f32], _mp: usize, _v: &[f32], _nj: usize, _d: usize, _m: usize, _acc: &mut [f32]) {
        unreachable!("accumulate_t without WIDE");
    }
    /// `x[r] = exp(x[r] − sub[r])` by [`exp`], and `acc[r] += x[r]`: one key's transposed
    /// scores of a wide tile turned into weights, with their running sums.
    fn exp_rows(x: &mut [f32], sub: &[f32], acc: &mut [f32]) {
        for ((x, s), a) in x.iter_mut().zip(sub).zip(acc.iter_mut()) {
            *x = exp::<Self>(*x - s);
            *a += *x;
        }
    }
    /// Whether [`Flavor::packed_decode`] exists (integer K scores over packed rows).
    const PACKED_DECODE: bool = false;
    /// Runs the packed decode kernel over `job.n` rows (a multiple of [`PACKED_BLOCK`]),
    /// updating the softmax state and the rotated accumulator (`acc`) of the job's query
    /// rows, and rescaling their f16-V accumulator (`plain`, possibly empty).
    fn packed_decode(_job: &DecodeJob, _max: &mut [f32], _sum: &mut [f32], _acc: &mut [f32], _plain: &mut [f32]) {
        unreachable!("packed_decode without PACKED_DECODE");
    }
}

/// Rows per block of the packed decode kernels (one score vector of 16 lanes).
pub(crate) const PACKED_BLOCK: usize = 16;

/// Quantizes one group of 32 rotated query values to int8 with one absmax step (ggml's
/// q8_0 rule: `step = max|x| / 127`, `q = round(x / step)`), returning the step (0 for an
/// all-zero group). Every path that scores packed K uses `q · step` as the query (the
/// integer kernels use `q` and `step` separately), so all instruction sets agree on it.
#[inline]
pub(crate) fn quantize_q8(x: &[f32], q: &mut [i8]) -> f32 {
    let x: &[f32; 32] = x.try_into().expect("quantize_q8: group length");
    let q: &mut [i8; 32] = q.try_into().expect("quantize_q8: output length");
    // Written lane by lane so that LLVM vectorizes it (a prefill quantizes every query row
    // of every layer, and the scalar fold and rounding loop took ~1% of it): the maximum is
    // order-independent (`max` ignores NaN), so the lanes give the plain fold's result.
    let mut lanes = [0.0f32; LANES];
    for c in x.chunks_exact(LANES) {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    // The lanes as a tree, in vectors (a left-to-right fold is 16 dependent scalar steps).
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            lanes[l] = lanes[l].max(lanes[l + w]);
        }
        w /= 2;
    }
    let amax = lanes[0];
    if amax == 0.0 || !amax.is_finite() {
        // Non-finite queries have no int8 image; the float paths keep them as they are.
        q.fill(0);
        return if amax == 0.0 { 0.0 } else { f32::NAN };
    }
    let step = amax / 127.0;
    let inv = 127.0 / amax;
    for (o, v) in q.iter_mut().zip(x) {
        // As `(v · inv).round().clamp(-127.0, 127.0) as i8`, in steps that vectorize (a
        // NaN's code is 0, as `as` makes it).
        let r = v * inv;
        let r = if r.is_nan() { 0.0 } else { r };
        #[allow(clippy::cast_possible_truncation)]
        let c = small_int(round(r).clamp(-127.0, 127.0)) as i8;
        *o = c;
    }
    step
}

/// Portable code: separate multiply and add (`mul_add` would be a libm call without FMA).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

impl Flavor for Portable {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

use super::fast::DecodeJob;
use crate::codec::quant::{round, small_int};
use crate::codec::RowCodec;
use half::f16;

/// Lanes of the vector accumulators (one AVX-512 register, two AVX2 registers).
pub(crate) const LANES: usize = 16;

#[inline(always)]
fn hsum(a: &[f32; LANES]) -> f32 {
    let mut t = *a;
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            t[l] += t[l + w];
        }
        w /= 2;
    }
    t[0]
}

/// Sum of a short slice with 16 independent partial sums.
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += v;
    }
    hsum(&acc)
}

/// Maximum of a short slice (−∞ when empty); NaN inputs are ignored.
#[inline(always)]
pub(crate) fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
        *a = if *v > *a { *v } else { *a };
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// `out[r] = dot(q[r·d..], k)` for `R` query rows that share one key row.
#[inline(always)]
pub(crate) fn dot_rows<F: Flavor, const R: usize>(q: &[f32], k: &[f32]) -> [f32; R] {
    let d = k.len();
    let rows: [&[f32]; R] = core::array::from_fn(|r| &q[r * d..(r + 1) * d]);
    let mut acc = [[0.0f32; LANES]; R];
    for c in 0..d / LANES {
        let kc: &[f32; LANES] = k[c * LANES..(c + 1) * LANES].try_into().expect("lane chunk");
        for r in 0..R {
            let qc: &[f32; LANES] = rows[r][c * LANES..(c + 1) * LANES].try_into().expect("lane chunk");
            for l in 0..LANES {
                acc[r][l] = F::fma(qc[l], kc[l], acc[r][l]);
            }
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = hsum(&acc[r]);
    }
    out
}

/// Scores of `m` query rows (`q`, `m × d`) against `nj` key rows (`k`, `nj × d`), written to
/// `s[r·stride + j]`.
#[inline(always)]
pub(crate) fn scores<F: Flavor>(q: &[f32], m: usize, k: &[f32], nj: usize, d: usize, s: &mut [f32], stride: usize) {
    let mut r = 0;
    while r + 4 <= m {
        let qb = &q[r * d..(r + 4) * d];
        for j in 0..nj {
            let o = dot_rows::<F, 4>(qb, &k[j * d..(j + 1) * d]);
            for (i, v) in o.iter().enumerate() {
                s[(r + i) * stride + j] = *v;
            }
        }
        r += 4;
    }
    if r + 2 <= m {
        let qb = &q[r * d..(r + 2) * d];
        for j in 0..nj {
            let o = dot_rows::<F, 2>(qb, &k[j * d..(j + 1) * d]);
            s[r * stride + j] = o[0];
            s[(r + 1) * stride + j] = o[1];
        }
        r += 2;
    }
    if r < m {
        let qb = &q[r * d..(r + 1) * d];
        for j in 0..nj {
            s[r * stride + j] = dot_rows::<F, 1>(qb, &k[j * d..(j + 1) * d])[0];
        }
    }
}

/// `acc += Σ_j p[j] · v[j·d..]`, four rows of V per pass over `acc`.
#[inline(always)]
pub(crate) fn accumulate<F: Flavor>(p: &[f32], v: &[f32], acc: &mut [f32]) {
    let d = acc.len();
    let nj = p.len();
    let mut j = 0;
    while j + 4 <= nj {
        let (p0, p1, p2, p3) = (p[j], p[j + 1], p[j + 2], p[j + 3]);
        let rows = &v[j * d..(j + 4) * d];
        let (v0, rest) = rows.split_at(d);
        let (v1, rest) = rest.split_at(d);
        let (v2, v3) = rest.split_at(d);
        for ((((a, x0), x1), x2), x3) in acc.iter_mut().zip(v0).zip(v1).zip(v2).zip(v3) {
            *a = F::fma(p3, *x3, F::fma(p2, *x2, F::fma(p1, *x1, F::fma(p0, *x0, *a))));
        }
        j += 4;
    }
    while j < nj {
        let pj = p[j];
        for (a, x) in acc.iter_mut().zip(&v[j * d..(j + 1) * d]) {
            *a = F::fma(pj, *x, *a);
        }
        j += 1;
    }
}

/// `e^x` for `x <= 88`, relative error ~1e-7, exactly 0 below −87 (and for −∞). Cody-Waite
/// range reduction and the Cephes `expf` polynomial; the integer part is found with the
/// 1.5·2^23 rounding trick so that no float→int conversion is needed.
#[inline(always)]
pub(crate) fn exp<F: Flavor>(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let xc = x.clamp(-87.0, 88.0);
    let t = F::fma(xc, std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = F::fma(n, -0.693_359_4, xc);
    let r = F::fma(n, 2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4;
    p = F::fma(p, r, 1.398_199_9e-3);
    p = F::fma(p, r, 8.333_452e-3);
    p = F::fma(p, r, 4.166_579_6e-2);
    p = F::fma(p, r, 1.666_666_5e-1);
    p = F::fma(p, r, 5.000_000_1e-1);
    let y = F::fma(p * r, r, r) + 1.0;
    #[allow(clippy::cast_sign_loss)]
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    #[allow(clippy::cast_sign_loss)]
    let pow2 = f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * pow2
    }
}

/// `c · tanh(x)` through [`exp`]; accurate to a few 1e-7 of `c`.
#[inline(always)]
pub(crate) fn softcap<F: Flavor>(x: f32, c: f32) -> f32 {
    let t = exp::<F>(-2.0 * x.abs());
    let y = (1.0 - t) / (1.0 + t);
    c * if x < 0.0 { -y } else { y }
}

/// f16 bits → f32, with Inf and NaN read as 0 (the attention rule for f16 rows). Integer
/// arithmetic only, so it vectorizes without F16C and never touches denormal floats.
#[inline(always)]
pub(crate) fn f16_to_f32_finite(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let em = u32::from(h & 0x7FFF);
    let normal = f32::from_bits((em << 13) + 0x3800_0000);
    #[allow(clippy::cast_precision_loss)]
    let sub = (em as f32) * (1.0 / 16_777_216.0); // 2^-24
    let mag = if em >= 0x7C00 {
        0.0
    } else if em < 0x0400 {
        sub
    } else {
        normal
    };
    f32::from_bits(mag.to_bits() | sign)
}

/// Converts f16 rows to f32 with [`f16_to_f32_finite`].
#[inline(always)]
pub(crate) fn f16_rows(src: &[half::f16], out: &mut [f32]) {
    for (o, h) in out.iter_mut().zip(src) {
        *o = f16_to_f32_finite(h.to_bits());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// `quantize_q8` as first written: a plain fold and a scalar rounding loop.
    fn quantize_q8_plain(x: &[f32], q: &mut [i8]) -> f32 {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if amax == 0.0 || !amax.is_finite() {
            q.fill(0);
            return if amax == 0.0 { 0.0 } else { f32::NAN };
        }
        let inv = 127.0 / amax;
        for (o, v) in q.iter_mut().zip(x) {
            *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
        amax / 127.0
    }

    #[test]
    fn quantize_q8_matches_the_plain_loop() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        for case in 0..2000 {
            let scale = 10f32.powi(rng.gen_range(-6..6));
            let mut x: Vec<f32> = (0..32).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect();
            match case % 5 {
                // Values that land exactly on a half step, where rounding direction matters.
                1 => x.iter_mut().enumerate().for_each(|(i, v)| *v = (i as f32 - 15.5) * 127.0 / 16.5),
                2 => x.fill(0.0),
                3 => x[case % 32] = f32::INFINITY,
                4 => x[case % 32] = f32::NAN,
                _ => {}
            }
            let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
            let (sa, sb) = (quantize_q8(&x, &mut a), quantize_q8_plain(&x, &mut b));
            assert_eq!(a, b, "codes of {x:?}");
            assert_eq!(sa.to_bits(), sb.to_bits(), "step of {x:?}");
        }
    }
}
