//! x86-64 row decoders: packed rows (every width on AVX-512; on AVX2, 5 to 7 bits take the
//! generic body) and f16 rows into f32 tiles, for AVX-512 (16 lanes) and AVX2+F16C (8 lanes).
//! Each is a safe `#[target_feature]` function that checks its slice lengths up front; the raw
//! loads and stores it does are in bounds by those checks. The scalar specification is
//! `RowCodec::decode_rotated` and `kernels::f16_rows`; `tests/attn_equivalence.rs` checks every
//! path against it.

use crate::codec::layout::{group_code_bytes, row_scale, GROUP, HEADER};
use crate::codec::RowCodec;
use half::f16;
use std::arch::x86_64::*;

/// Decodes one packed row into the rotated space (AVX-512).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub fn decode_packed_avx512(codec: &RowCodec, data: &[u8], out: &mut [f32]) {
    let d = codec.head_dim();
    let bits = codec.quant().bits();
    assert_eq!(data.len(), codec.row_bytes(), "decode_packed_avx512: row bytes");
    assert_eq!(out.len(), d, "decode_packed_avx512: out length");
    let groups = d / GROUP;
    let s = row_scale(data);
    let gb = group_code_bytes(bits);
    for g in 0..groups {
        let step = s * f32::from(i8::from_le_bytes([data[HEADER + g]]));
        let c = &data[HEADER + groups + g * gb..][..gb];
        let o: &mut [f32; GROUP] = (&mut out[g * GROUP..(g + 1) * GROUP]).try_into().expect("group");
        match bits {
            8 => group8_avx512(c, step, o),
            4 => group4_avx512(c, step, o),
            3 => group3_avx512(c, step, o),
            2 => group2_avx512(c, step, o),
            _ => group_wide_avx512(bits, c, step, o),
        }
    }
}

/// Converts the codes in 16 i32 lanes to `(code - off) · step` and stores them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn store16(codes: __m512i, off: i32, step: __m512, o: &mut [f32]) {
    store(o, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(codes, _mm512_set1_epi32(off))), step));
}

#[target_feature(enable = "sse2")]
#[inline]
fn load16(c: &[u8]) -> __m128i {
    assert!(c.len() >= 16);
    // SAFETY: at least 16 bytes are readable (asserted); the load is unaligned.
    unsafe { _mm_loadu_si128(c.as_ptr().cast()) }
}

#[target_feature(enable = "sse2")]
#[inline]
fn load8(c: &[u8]) -> __m128i {
    let b: [u8; 8] = c[..8].try_into().expect("8 bytes");
    _mm_set_epi64x(0, i64::from_le_bytes(b))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn group8_avx512(c: &[u8], step: f32, o: &mut [f32; GROUP]) {
    let st = _mm512_set1_ps(step);
    store16(_mm512_cvtepu8_epi32(load16(&c[..16])), 128, st, &mut o[..16]);
    store16(_mm512_cvtepu8_epi32(load16(&c[16..32])), 128, st, &mut o[16..]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn group4_avx512(c: &[u8], step: f32, o: &mut [f32; GROUP]) {
    let st = _mm512_set1_ps(step);
    let b = _mm512_cvtepu8_epi32(load16(c));
    store16(_mm512_and_si512(b, _mm512_set1_epi32(15)), 8, st, &mut o[..16]);
    store16(_mm512_srli_epi32::<4>(b), 8, st, &mut o[16..]);
}

/// Low two bits of all 32 codes: lanes 0..16 use shifts 0/2, lanes 16..32 shifts 4/6.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn low2_avx512(c: &[u8]) -> (__m512i, __m512i) {
    let x = load8(c);
    let b = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(x, x));
    let three = _mm512_set1_epi32(3);
    let s01 = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    let s23 = _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4);
    (
        _mm512_and_si512(_mm512_srlv_epi32(b, s01), three),
        _mm512_and_si512(_mm512_srlv_epi32(b, s23), three),
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn group2_avx512(c: &[u8], step: f32, o: &mut [f32; GROUP]) {
    let st = _mm512_set1_ps(step);
    let (a, b) = low2_avx512(c);
    store16(a, 2, st, &mut o[..16]);
    store16(b, 2, st, &mut o[16..]);
}

/// Bit `i` of the little-endian u32 in `c[..4]`, for codes 0..16 and 16..32 (the 1-bit layout).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn plane1_avx512(c: &[u8]) -> (__m512i, __m512i) {
    #[allow(clippy::cast_possible_wrap)]
    let h = _mm512_set1_epi32(u32::from_le_bytes(c[..4].try_into().expect("4 bytes")) as i32);
    let one = _mm512_set1_epi32(1);
    let lo = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    let hi = _mm512_add_epi32(lo, _mm512_set1_epi32(16));
    (_mm512_and_si512(_mm512_srlv_epi32(h, lo), one), _mm512_and_si512(_mm512_srlv_epi32(h, hi), one))
}

/// The 3-bit codes: the low two bits, then bit 2 from the 1-bit plane in bytes 8..12.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn codes3_avx512(c: &[u8]) -> (__m512i, __m512i) {
    let (a, b) = low2_avx512(c);
    let (h0, h1) = plane1_avx512(&c[8..12]);
    (_mm512_or_si512(a, _mm512_slli_epi32::<2>(h0)), _mm512_or_si512(b, _mm512_slli_epi32::<2>(h1)))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn group3_avx512(c: &[u8], step: f32, o: &mut [f32; GROUP]) {
    let st = _mm512_set1_ps(step);
    let (a, b) = codes3_avx512(c);
    store16(a, 4, st, &mut o[..16]);
    store16(b, 4, st, &mut o[16..]);
}

/// 5, 6 and 7 bits: the low nibbles as in the 4-bit layout, then the high bits as 1-, 2- or
/// 3-bit codes (see `codec/quant.rs`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn group_wide_avx512(bits: u32, c: &[u8], step: f32, o: &mut [f32; GROUP]) {
    let st = _mm512_set1_ps(step);
    let b = _mm512_cvtepu8_epi32(load16(c));
    let (lo0, lo1) = (_mm512_and_si512(b, _mm512_set1_epi32(15)), _mm512_srli_epi32::<4>(b));
    let (h0, h1) = match bits {
        5 => plane1_avx512(&c[16..20]),
        6 => low2_avx512(&c[16..24]),
        _ => codes3_avx512(&c[16..28]),
    };
    #[allow(clippy::cast_possible_wrap)]
    let off = 1i32 << (bits - 1);
    store16(_mm512_or_si512(lo0, _mm512_slli_epi32::<4>(h0)), off, st, &mut o[..16]);
    store16(_mm512_or_si512(lo1, _mm512_slli_epi32::<4>(h1)), off, st, &mut o[16..]);
}

/// f16 → f32 with non-finite values read as 0 (AVX-512).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub fn f16_rows_avx512(src: &[f16], out: &mut [f32]) {
    assert_eq!(src.len(), out.len(), "f16_rows_avx512: lengths");
    assert_eq!(src.len() % 16, 0, "f16_rows_avx512: multiple of 16");
    for (s, o) in src.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
        // SAFETY: `s` holds 16 f16 (32 bytes) and `o` 16 f32, by `chunks_exact`.
        unsafe {
            let x = _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().cast()));
            let finite = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_sub_ps(x, x), _mm512_setzero_ps());
            _mm512_storeu_ps(o.as_mut_ptr(), _mm512_maskz_mov_ps(finite, x));
        }
    }
}

/// Decodes one packed row into the rotated space (AVX2).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn decode_packed_avx2(codec: &RowCodec, data: &[u8], out: &mut [f32]) {
    let d = codec.head_dim();
    let bits = codec.quant().bits();
    assert_eq!(data.len(), codec.row_bytes(), "decode_packed_avx2: row bytes");
    assert_eq!(out.len(), d, "decode_packed_avx2: out length");
    if bits > 4 && bits < 8 {
        // 5 to 7 bits: rare widths (per-layer profiles), decoded by the generic body.
        codec.decode_rotated_inline(data, out);
        return;
    }
    let groups = d / GROUP;
    let s = row_scale(data);
    let gb = group_code_bytes(bits);
    for g in 0..groups {
        let step = s * f32::from(i8::from_le_bytes([data[HEADER + g]]));
        let c = &data[HEADER + groups + g * gb..][..gb];
        let o = &mut out[g * GROUP..(g + 1) * GROUP];
        let st = _mm256_set1_ps(step);
        for q in 0..4 {
            let codes = codes8_avx2(bits, c, q);
            store8(codes, 1 << (bits - 1), st, &mut o[8 * q..8 * q + 8]);
        }
    }
}

/// Codes `8q..8q+8` of a group as i32 lanes (AVX2).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn codes8_avx2(bits: u32, c: &[u8], q: usize) -> __m256i {
    match bits {
        8 => _mm256_cvtepu8_epi32(load8(&c[8 * q..])),
        4 => {
            let b = _mm256_cvtepu8_epi32(load8(&c[8 * (q % 2)..]));
            if q < 2 {
                _mm256_and_si256(b, _mm256_set1_epi32(15))
            } else {
                _mm256_srli_epi32::<4>(b)
            }
        }
        _ => {
            #[allow(clippy::cast_possible_wrap)]
            let shift = _mm256_set1_epi32(2 * q as i32);
            let b = _mm256_cvtepu8_epi32(load8(c));
            let low = _mm256_and_si256(_mm256_srlv_epi32(b, shift), _mm256_set1_epi32(3));
            if bits == 2 {
                return low;
            }
            let h = _mm256_set1_epi32(i32::from(c[8 + q]));
            let k = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
            let hb = _mm256_and_si256(_mm256_srlv_epi32(h, k), _mm256_set1_epi32(1));
            _mm256_or_si256(low, _mm256_slli_epi32::<2>(hb))
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn store8(codes: __m256i, off: i32, step: __m256, o: &mut [f32]) {
    assert!(o.len() >= 8);
    let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(codes, _mm256_set1_epi32(off))), step);
    // SAFETY: `o` has at least 8 floats (asserted); the store is unaligned.
    unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
}

/// f16 → f32 with non-finite values read as 0 (AVX2 + F16C).
#[target_feature(enable = "avx2,fma,f16c")]
pub fn f16_rows_avx2(src: &[f16], out: &mut [f32]) {
    assert_eq!(src.len(), out.len(), "f16_rows_avx2: lengths");
    assert_eq!(src.len() % 8, 0, "f16_rows_avx2: multiple of 8");
    for (s, o) in src.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
        // SAFETY: `s` holds 8 f16 (16 bytes) and `o` 8 f32, by `chunks_exact`.
        unsafe {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast()));
            let finite = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_sub_ps(x, x), _mm256_setzero_ps());
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_and_ps(x, finite));
        }
    }
}

/// Scores of `m` query rows against `nj` row-major keys (AVX-512): `s[r·stride + j] =
/// dot(q row r, k row j)`, up to 4 query rows per pass over a key.
///
/// Summed in exactly the order of `kernels::dot_rows` (16 partial sums, partial `l` taking
/// `x ≡ l (mod 16)` in increasing `x`, then `hsum`'s tree), so every instruction set and the
/// transposed prefill kernel give the same bits. LLVM compiled that generic code for 1–3
/// rows into 2-wide vectors; this is the decode step's tile path (f16 rows, and packed rows
/// without the integer kernel).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub fn scores_avx512(q: &[f32], m: usize, k: &[f32], nj: usize, d: usize, s: &mut [f32], stride: usize) {
    assert!(
        d.is_multiple_of(16) && q.len() >= m * d && k.len() >= nj * d && (m == 0 || nj == 0 || s.len() >= (m - 1) * stride + nj) && nj <= stride,
        "scores_avx512: sizes"
    );
    let mut r = 0;
    while r < m {
        match m - r {
            1 => dots::<1>(q, r, k, nj, d, s, stride),
            2 => dots::<2>(q, r, k, nj, d, s, stride),
            3 => dots::<3>(q, r, k, nj, d, s, stride),
            _ => dots::<4>(q, r, k, nj, d, s, stride),
        }
        r += 4;
    }
}

/// [`scores_avx512`] for query rows `r0..r0 + R` (sizes checked there).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn dots<const R: usize>(q: &[f32], r0: usize, k: &[f32], nj: usize, d: usize, s: &mut [f32], stride: usize) {
    for j in 0..nj {
        let mut acc = [_mm512_setzero_ps(); R];
        for c in 0..d / 16 {
            // SAFETY: j < nj and 16c + 16 <= d, so the key chunk lies in `k` (len >= nj·d);
            // r0 + R <= m rows of d values lie in `q` (len >= m·d).
            unsafe {
                let kc = _mm512_loadu_ps(k.as_ptr().add(j * d + 16 * c));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add((r0 + i) * d + 16 * c)), kc, *a);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            s[(r0 + i) * stride + j] = hsum16(*a);
        }
    }
}

/// `kernels::hsum`'s tree on one register: lanes `l` and `l + w` added for w = 8, 4, 2, 1.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn hsum16(a: __m512) -> f32 {
    let t8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))));
    let t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps::<1>(t8));
    let t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
    _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps::<1>(t2, t2)))
}

/// Transposed scores for prefill (AVX-512): `st[j·mp + r] = Σ_x qt[x·mp + r] · k[j·d + x]`
/// for all `mp` (a multiple of 16) query rows and `nj` keys, one key × 16 query rows per
/// register block.
///
/// Each score is summed in exactly the order of the decode path (`kernels::dot_rows`): 16
/// partial sums, partial `l` taking elements `x ≡ l (mod 16)` in increasing `x` by FMA, then
/// `hsum`'s tree (`t[l] += t[l + w]`, `w` = 8, 4, 2, 1). So a query row gets bit for bit the
/// score it gets when decoded alone. A sequential sum over `x` (the former kernel) differs
/// in the last bit, and the model turns one-ulp differences in attention outputs into
/// logit changes of ~1 (measured: scaling them by 1 + 1e-7 does it; likely through the
/// 8-bit quantization of activations in its matmuls): a prompt decoded as one batch then
/// disagreed with the same prompt fed token by token (KL ~5e-3, dspark:f16).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub fn scores_t_avx512(qt: &[f32], mp: usize, k: &[f32], nj: usize, d: usize, st: &mut [f32]) {
    assert!(mp % 16 == 0 && st.len() >= nj * mp, "scores_t_avx512: sizes");
    for r in (0..mp).step_by(16) {
        // Four keys at a time share each load of the queries: one at a time, a score cost a
        // load of 16 query values and a broadcast per FMA, ~1 FMA per cycle.
        let mut j = 0;
        while j + KEYS <= nj {
            for (n, s) in scores_keys::<KEYS>(qt, mp, r, k, j, d).into_iter().enumerate() {
                store(&mut st[(j + n) * mp + r..][..16], s);
            }
            j += KEYS;
        }
        for j in j..nj {
            store(&mut st[j * mp + r..][..16], scores_keys::<1>(qt, mp, r, k, j, d)[0]);
        }
    }
}

/// Keys [`scores_t_avx512`] scores together.
const KEYS: usize = 4;

/// The scores of keys `j..j + N` (rows of `k`) for query rows `r..r + 16` (columns of `qt`),
/// each in the decode order: partial `l` takes the terms `x ≡ l (mod 16)` by FMA in
/// increasing `x`, and the partials add up as `hsum`'s tree (`t[l] += t[l + w]`, `w` = 8, 4,
/// 2, 1), here evaluated depth first, so that five registers per key are live, not sixteen.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn scores_keys<const N: usize>(qt: &[f32], mp: usize, r: usize, k: &[f32], j: usize, d: usize) -> [__m512; N] {
    // The unchecked loads below rely on this.
    assert!(d % 16 == 0 && r + 16 <= mp && qt.len() >= d * mp && k.len() >= (j + N) * d, "scores_keys: sizes");
    let part = |l: usize| -> [__m512; N] {
        let mut acc = [_mm512_setzero_ps(); N];
        for c in 0..d / 16 {
            let x = 16 * c + l;
            // SAFETY: x < d and r + 16 <= mp, so the 16 queries lie in `qt` (length >= d·mp);
            // j + n < j + N, so each key value lies in `k` (length >= (j + N)·d); asserted.
            unsafe {
                let q = _mm512_loadu_ps(qt.as_ptr().add(x * mp + r));
                for (n, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(q, _mm512_set1_ps(*k.get_unchecked((j + n) * d + x)), *a);
                }
            }
        }
        acc
    };
    let add = |a: [__m512; N], b: [__m512; N]| -> [__m512; N] { std::array::from_fn(|n| _mm512_add_ps(a[n], b[n])) };
    let a = |l| add(part(l), part(l + 8));
    let b = |l| add(a(l), a(l + 4));
    let c = |l| add(b(l), b(l + 2));
    add(c(0), c(1))
}

/// `x[r] = exp(x[r] − sub[r])` and `acc[r] += x[r]` (AVX-512; lengths a multiple of 16):
/// [`kernels::exp`]'s operations in its order, 16 lanes at a time, so every lane gets the
/// bits the generic code gives (the decode path's weights; `batched_queries_equal_queries_alone`
/// checks it). LLVM vectorized the generic loop 8 lanes wide, and the prefill's softmax (a
/// tenth of a prefill at depth 8192) was mostly this loop.
///
/// [`kernels::exp`]: super::kernels::exp
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub fn exp_rows_avx512(x: &mut [f32], sub: &[f32], acc: &mut [f32]) {
    assert!(x.len().is_multiple_of(16) && sub.len() >= x.len() && acc.len() >= x.len(), "exp_rows_avx512: sizes");
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23, as in kernels::exp
    let c = |v: f32| _mm512_set1_ps(v);
    for i in (0..x.len()).step_by(16) {
        let v = _mm512_sub_ps(load(&x[i..]), load(&sub[i..]));
        // `v.clamp(-87, 88)`: max and min return their second operand for NaN, so NaN stays.
        let xc = _mm512_min_ps(c(88.0), _mm512_max_ps(c(-87.0), v));
        let t = _mm512_fmadd_ps(xc, c(std::f32::consts::LOG2_E), c(MAGIC));
        let n = _mm512_sub_ps(t, c(MAGIC));
        let r = _mm512_fmadd_ps(n, c(-0.693_359_4), xc);
        let r = _mm512_fmadd_ps(n, c(2.121_944_4e-4), r);
        let mut p = c(1.987_569_1e-4);
        for k in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
            p = _mm512_fmadd_ps(p, r, c(k));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), c(1.0));
        let ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(MAGIC.to_bits().cast_signed()));
        let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(ni, _mm512_set1_epi32(127))));
        // Lanes below −87 (−∞ included) are exactly 0.
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(v, c(-87.0));
        let e = _mm512_maskz_mul_ps(keep, y, pow2);
        store(&mut x[i..], e);
        let sum = _mm512_add_ps(load(&acc[i..]), e);
        store(&mut acc[i..], sum);
    }
}

/// Loads 16 lanes from `o` (16 floats).
#[target_feature(enable = "avx512f")]
#[inline]
fn load(o: &[f32]) -> __m512 {
    assert!(o.len() >= 16);
    // SAFETY: `o` has at least 16 floats (asserted); the load is unaligned.
    unsafe { _mm512_loadu_ps(o.as_ptr()) }
}

/// Stores 16 lanes into `o` (16 floats).
#[target_feature(enable = "avx512f")]
#[inline]
fn store(o: &mut [f32], v: __m512) {
    assert!(o.len() >= 16);
    // SAFETY: `o` has at least 16 floats (asserted); the store is unaligned.
    unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) };
}

/// Prefill V accumulation (AVX-512): `acc[r·d..] += Σ_j pt[j·mp + r] · v[j·d..]` for rows
/// `0..m`. `R` rows × `C` 16-lane chunks (`d = 16·C`) stay in registers for the whole tile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub fn accumulate_t_avx512(pt: &[f32], mp: usize, v: &[f32], nj: usize, d: usize, m: usize, acc: &mut [f32]) {
    acc_rows_any(pt, (mp, 1), v, nj, d, m, acc);
}

/// Decode V accumulation (AVX-512): `acc[r·d..] += Σ_j p[r·stride + j] · v[j·d..]` for rows
/// `0..m`, each value summed over `j` in order as `kernels::accumulate` does (same bits).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub fn accumulate_avx512(p: &[f32], stride: usize, v: &[f32], nj: usize, d: usize, m: usize, acc: &mut [f32]) {
    acc_rows_any(p, (1, stride), v, nj, d, m, acc);
}

/// [`acc_rows`] with the register blocking for `d`; the weight of key `j` for row `r` is
/// `w[j·steps.0 + r·steps.1]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn acc_rows_any(w: &[f32], steps: (usize, usize), v: &[f32], nj: usize, d: usize, m: usize, acc: &mut [f32]) {
    match d {
        64 => acc_rows::<4, 4>(w, steps, v, nj, d, m, acc),
        128 => acc_rows::<2, 8>(w, steps, v, nj, d, m, acc),
        256 => acc_rows::<1, 16>(w, steps, v, nj, d, m, acc),
        _ => acc_rows::<2, 2>(w, steps, v, nj, d, m, acc), // d a multiple of 32: chunks of 32 columns
    }
}

/// Works on column blocks of `16·C`; `C·16` divides `d` for every call above.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
fn acc_rows<const R: usize, const C: usize>(pw: &[f32], (sj, sr): (usize, usize), v: &[f32], nj: usize, d: usize, m: usize, acc: &mut [f32]) {
    let w = 16 * C;
    // The unchecked loads below rely on these (checked once per tile, not per load).
    assert!(v.len() >= nj * d && acc.len() >= m * d && d % w == 0, "accumulate_avx512: sizes");
    assert!(m == 0 || nj == 0 || pw.len() > (nj - 1) * sj + (m - 1) * sr, "accumulate_avx512: weights");
    let mut r0 = 0;
    while r0 < m {
        let nr = (m - r0).min(R);
        for c0 in (0..d).step_by(w) {
            let mut a = [[_mm512_setzero_ps(); C]; R];
            for (i, row) in a.iter_mut().enumerate().take(nr) {
                for (c, x) in row.iter_mut().enumerate() {
                    // SAFETY: (r0 + i)·d + c0 + 16c + 16 <= m·d <= acc.len() (asserted above).
                    *x = unsafe { _mm512_loadu_ps(acc.as_ptr().add((r0 + i) * d + c0 + 16 * c)) };
                }
            }
            for j in 0..nj {
                let mut vv = [_mm512_setzero_ps(); C];
                for (c, x) in vv.iter_mut().enumerate() {
                    // SAFETY: j·d + c0 + 16c + 16 <= nj·d <= v.len() (asserted above).
                    *x = unsafe { _mm512_loadu_ps(v.as_ptr().add(j * d + c0 + 16 * c)) };
                }
                for (i, row) in a.iter_mut().enumerate().take(nr) {
                    let p = _mm512_set1_ps(pw[j * sj + (r0 + i) * sr]);
                    for (x, vc) in row.iter_mut().zip(&vv) {
                        *x = _mm512_fmadd_ps(p, *vc, *x);
                    }
                }
            }
            for (i, row) in a.iter().enumerate().take(nr) {
                for (c, x) in row.iter().enumerate() {
                    // SAFETY: as for the loads above.
                    unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add((r0 + i) * d + c0 + 16 * c), *x) };
                }
            }
        }
        r0 += nr;
    }
}
