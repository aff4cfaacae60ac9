//! Attention over packed K/V rows with AVX-512 VNNI (decode, and prefill items of up to 128
//! query rows): integer K scores, 16 rows per vector, V accumulated straight from its codes.
//!
//! Per block of 16 rows (one [`DecodeJob`] run of one segment):
//! 1. **K scores, transposed.** For each group of 32 values the 16 rows' code bytes are
//!    transposed (4×4 dword transposes inside 128-bit lanes) so that dword lane `r` of a
//!    vector holds 4 codes of row `r`; 4-bit codes are split with AND/shift, codes of the
//!    other widths are first widened to one byte each ([`widen`]). `vpdpbusd`
//!    multiplies the unsigned codes by the signed int8 query (one dword of it broadcast),
//!    8 instructions per group and query row give all 16 rows' group dots at once, started
//!    from `−offset · Σq` so that the code offset costs nothing. Each group dot is multiplied
//!    by the row's int8 group multiplier (`vpmulld`), converted to f32 and accumulated with
//!    the query step; one multiply by the bf16 row scale gives 16 scores. No horizontal sums.
//! 2. **Softmax** on the 16 scores of each query row: softcap, mask and ALiBi, the running
//!    max (reduced only when a lane exceeds it), `exp`, a running sum kept as a vector. The
//!    weight of row `r` in group `g` is `p_r · S_r · c_rg` (V's row scale and multiplier).
//! 3. **V**: for each row, each group's codes are expanded to f32 `code − offset` (a
//!    `vpermps` table lookup for 2/3/4 bits, widened bytes for 5/6/7) and FMA'd into
//!    register-resident accumulators
//!    of up to 4 query rows × 64 columns, with the weight broadcast from memory.
//!
//! Headers (row scale and multipliers) of 16 rows come in with one dword gather per 4
//! groups. All loads are in bounds by the asserts at the top of [`decode_packed_avx512`]
//! (each row has `row_bytes` bytes; every load reads inside one row).
//!
//! The scalar specification is `reference.rs` in its int8-query mode (the query is rounded
//! to int8 per group of 32 exactly as here); `tests/attn_equivalence.rs` checks it.

use super::fast::DecodeJob;
use super::kernels::PACKED_BLOCK;
use crate::codec::layout::{group_code_bytes, row_bytes, GROUP, HEADER};
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

const B: usize = PACKED_BLOCK;

/// Query rows of one V pass (accumulators: 4 rows × 64 columns = 16 registers).
const HB: usize = 4;

/// Scratch sizes kept on the stack: query rows (the packed path takes fewer than 16), groups
/// of 32 values (head size 512), V weights (m·ng·16 floats; 3 rows × 2 groups = 96 here).
const ROWS_STACK: usize = 128;
const NG_STACK: usize = 16;
const AW_STACK: usize = 4096;
/// Expanded V values of a block (16 rows of head size 64..256).
const VF_STACK: usize = 16 * 256;

fn uninit<T, const N: usize>() -> [MaybeUninit<T>; N] {
    [const { MaybeUninit::uninit() }; N]
}

/// The first `n` elements of `stack`, or of `heap` grown to `n` when `stack` is too short,
/// set to `fill`. Only those `n` are written: zeroing the whole stack array on every call
/// would cost what the allocation did.
fn scratch<'a, T: Copy, const N: usize>(stack: &'a mut [MaybeUninit<T>; N], heap: &'a mut Vec<T>, n: usize, fill: T) -> &'a mut [T] {
    if n > N {
        heap.clear();
        heap.resize(n, fill);
        return heap;
    }
    for x in &mut stack[..n] {
        x.write(fill);
    }
    // SAFETY: the first n elements were just written, and MaybeUninit<T> has T's layout.
    unsafe { std::slice::from_raw_parts_mut(stack.as_mut_ptr().cast::<T>(), n) }
}

/// Expands `$go!(b)` with the code width `$bits` (2 to 8) as a literal, so that each width
/// gets its own instance of the kernels.
macro_rules! with_width {
    ($bits:expr, $go:ident) => {
        match $bits {
            8 => $go!(8),
            7 => $go!(7),
            6 => $go!(6),
            5 => $go!(5),
            4 => $go!(4),
            3 => $go!(3),
            _ => $go!(2),
        }
    };
}

/// Decode attention over `job.n` packed rows (see the module docs). `max`, `sum` and `acc`
/// (`m × d`, rotated space) are the online-softmax state of the job's `m` query rows;
/// `plain` (`m × d` or empty) is their f16-V accumulator, rescaled when a max grows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub fn decode_packed_avx512(job: &DecodeJob, max: &mut [f32], sum: &mut [f32], acc: &mut [f32], plain: &mut [f32]) {
    let (d, m, n) = (job.d, job.m, job.n);
    let ng = d / GROUP;
    assert!(d % GROUP == 0 && ng > 0, "decode_packed_avx512: head_dim");
    assert!(n % B == 0, "decode_packed_avx512: rows not whole blocks");
    assert!((2..=8).contains(&job.kbits), "decode_packed_avx512: K bits");
    assert!((2..=8).contains(&job.vbits), "decode_packed_avx512: V bits");
    assert_eq!(job.krb, row_bytes(job.kbits, d), "decode_packed_avx512: K row bytes");
    assert_eq!(job.vrb, row_bytes(job.vbits, d), "decode_packed_avx512: V row bytes");
    assert!(job.k.len() >= n * job.krb && job.v.len() >= n * job.vrb, "decode_packed_avx512: rows");
    assert!(job.q32.len() >= m * ng * 8 && job.qstep.len() >= m * ng && job.qsum.len() >= m * ng, "decode_packed_avx512: q");
    assert!(job.slopes.len() >= m && job.kbias.len() >= m && max.len() >= m && sum.len() >= m && acc.len() >= m * d, "decode_packed_avx512: state");
    assert!(job.g > 0 && m % job.g == 0, "decode_packed_avx512: group");
    assert!(plain.is_empty() || plain.len() >= m * d, "decode_packed_avx512: plain");
    if let Some(masks) = job.mask {
        assert!(masks.len() >= m / job.g && masks.iter().all(|x| x.len() >= n), "decode_packed_avx512: mask");
    }
    // The header gathers read dword `4·k` (k = 0..=(ng + 1) / 4) of a row: inside the row,
    // which has `HEADER + ng` header bytes followed by at least 4·ng code bytes.

    let lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    let kidx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(i32::try_from(job.krb).expect("row bytes")));
    let vidx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(i32::try_from(job.vrb).expect("row bytes")));

    let zero = _mm512_setzero_ps();
    // Scratch on the stack (the heap only for shapes beyond the default model's): this runs
    // once per page of 64 rows, where allocations cost as much as the work (perf: ~10% of a
    // decode step at depth 4096 went to malloc/free).
    let (mut h1, mut h2, mut h3, mut h4, mut h5, mut h6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut s1, mut s2, mut s3) = (uninit::<__m512, ROWS_STACK>(), uninit::<__m512, ROWS_STACK>(), uninit::<f32, ROWS_STACK>());
    let (mut s4, mut s5, mut s6) = (uninit::<f32, AW_STACK>(), uninit::<__m512i, NG_STACK>(), uninit::<__m512, NG_STACK>());
    // Per query row: score accumulator, running sum (vector), rescale factor of the block.
    let sacc = scratch(&mut s1, &mut h1, m, zero);
    let svec = scratch(&mut s2, &mut h2, m, zero);
    for (v, s) in svec.iter_mut().zip(&sum[..m]) {
        *v = _mm512_mask_mov_ps(zero, 1, _mm512_set1_ps(*s));
    }
    let alpha = scratch(&mut s3, &mut h3, m, 1.0);
    // V weights `[m][ng][16]`, and the multipliers of the block's rows.
    let aw = scratch(&mut s4, &mut h4, m * ng * B, 0.0);
    let kc = scratch(&mut s5, &mut h5, ng, _mm512_setzero_si512());
    let vc = scratch(&mut s6, &mut h6, ng, zero);
    let (mut s7, mut h7) = (uninit::<[__m512i; 8], NG_STACK>(), Vec::new());
    let kcodes = scratch(&mut s7, &mut h7, ng, [_mm512_setzero_si512(); 8]);
    // With more query rows than one V pass takes (prefill items), the block's V values are
    // expanded from their codes once, `[row][d]`, and every pass loads them: expanding in
    // each pass cost as many instructions as a third of its FMAs.
    let expand = m > HB;
    let (mut s8, mut h8) = (uninit::<f32, VF_STACK>(), Vec::new());
    let vf = scratch(&mut s8, &mut h8, if expand { B * d } else { 0 }, 0.0);

    for blk in 0..n / B {
        let r0 = blk * B;
        // Rows whose every query is masked out are skipped as a block.
        if let Some(masks) = job.mask {
            let mut any = false;
            for mq in masks.iter().take(m / job.g) {
                any |= mask_block(&mq[r0..r0 + B]) != 0;
            }
            if !any {
                continue;
            }
        }
        // SAFETY: rows r0..r0+16 lie in `job.k` / `job.v` (n·row_bytes bytes, asserted).
        let (kp, vp) = unsafe { (job.k.as_ptr().add(r0 * job.krb), job.v.as_ptr().add(r0 * job.vrb)) };
        // SAFETY: the gathers read dwords inside rows of the block (see above).
        let sk = unsafe { headers(kp, job.krb, kidx, ng, kc, false, &mut []) };
        // SAFETY: as above.
        let sv = unsafe { headers(vp, job.vrb, vidx, ng, &mut [], true, vc) };

        // 1. K scores: the block's codes laid out once, then up to 4 query rows per pass.
        // SAFETY: `kp` points at 16 rows of `krb` bytes (see above).
        unsafe {
            macro_rules! go {
                ($kb:literal) => {
                    k_codes::<$kb>(kp, job.krb, ng, kcodes)
                };
            }
            with_width!(job.kbits, go);
        }
        let off = 1i32 << (job.kbits - 1);
        let mut h0 = 0;
        while h0 < m {
            let hb = (m - h0).min(HB);
            match hb {
                4 => k_scores::<4>(kcodes, off, job, h0, kc, sacc),
                3 => k_scores::<3>(kcodes, off, job, h0, kc, sacc),
                2 => k_scores::<2>(kcodes, off, job, h0, kc, sacc),
                _ => k_scores::<1>(kcodes, off, job, h0, kc, sacc),
            }
            h0 += hb;
        }

        // 2. Softmax.
        for h in 0..m {
            let mut s = _mm512_fmadd_ps(sacc[h], sk, _mm512_set1_ps(job.kbias[h]));
            if job.softcap != 0.0 {
                s = softcap(s, job.softcap);
            }
            if let Some(masks) = job.mask {
                let mq = &masks[h / job.g][r0..r0 + B];
                // SAFETY: `mq` holds 16 f16 (32 bytes).
                let mv = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(mq.as_ptr().cast())) };
                let keep = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(mv, _mm512_set1_ps(f32::NEG_INFINITY));
                s = _mm512_mask_blend_ps(keep, _mm512_set1_ps(f32::NEG_INFINITY), _mm512_fmadd_ps(_mm512_set1_ps(job.slopes[h]), mv, s));
            }
            let old = max[h];
            alpha[h] = 1.0;
            if _mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, _mm512_set1_ps(old)) != 0 {
                let new = _mm512_reduce_max_ps(s).max(old);
                let a = if old == f32::NEG_INFINITY { 0.0 } else { (old - new).exp() };
                alpha[h] = a;
                svec[h] = _mm512_mul_ps(svec[h], _mm512_set1_ps(a));
                max[h] = new;
                if !plain.is_empty() {
                    plain[h * d..(h + 1) * d].iter_mut().for_each(|x| *x *= a);
                }
            }
            let p = if max[h] == f32::NEG_INFINITY { zero } else { exp(_mm512_sub_ps(s, _mm512_set1_ps(max[h]))) };
            svec[h] = _mm512_add_ps(svec[h], p);
            let a = _mm512_mul_ps(p, sv);
            for g in 0..ng {
                // SAFETY: (h·ng + g)·16 + 16 <= m·ng·16 = aw.len().
                unsafe { _mm512_storeu_ps(aw.as_mut_ptr().add((h * ng + g) * B), _mm512_mul_ps(a, vc[g])) };
            }
        }

        // 3. V.
        if expand {
            // SAFETY: `vp` points at 16 rows of `vrb` bytes; `vf` has 16·d floats.
            unsafe { expand_v(job.vbits, vp, job.vrb, ng, vf) };
        }
        let mut h0 = 0;
        while h0 < m {
            let hb = (m - h0).min(HB);
            let mut g0 = 0;
            while g0 < ng {
                let cg = if ng - g0 >= 2 { 2 } else { 1 };
                // SAFETY: `vp` points at 16 rows of `vrb` bytes (`vf` holds their 16·d values
                // when expanded); `acc` has m·d floats and the pass touches rows h0..h0+hb,
                // columns 32·g0 .. 32·(g0 + cg) <= d.
                unsafe {
                    if expand {
                        v_pass_expanded(hb, cg, vf, d, h0, g0, ng, aw, alpha, acc.as_mut_ptr());
                    } else {
                        v_pass(job.vbits, hb, cg, vp, job.vrb, ng, d, h0, g0, aw, alpha, acc.as_mut_ptr());
                    }
                }
                g0 += cg;
            }
            h0 += hb;
        }
    }
    for (s, v) in sum[..m].iter_mut().zip(svec.iter()) {
        *s = _mm512_reduce_add_ps(*v);
    }
}

/// The codes of the 16 rows at `kp` (`KB` bits, `rb` bytes per row), group by group, laid
/// out for `vpdpbusd`: `codes[g][j]` holds codes `4j..4j+4` of group `g` of each row, one
/// byte each. Laid out once per block and read by every pass of query rows (a prefill item
/// has up to 128).
///
/// # Safety
/// `kp` points at 16 rows of `rb` bytes in the `KB`-bit format of `32·ng` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn k_codes<const KB: u32>(kp: *const u8, rb: usize, ng: usize, codes: &mut [[__m512i; 8]]) {
    let gb = group_code_bytes(KB);
    for (g, c) in codes[..ng].iter_mut().enumerate() {
        // SAFETY: group g's codes lie at HEADER + ng + g·gb .. + gb of each row (caller).
        *c = unsafe {
            let p = kp.add(HEADER + ng + g * gb);
            match KB {
                4 => codes4(p, rb),
                8 => codes8(p, rb),
                _ => codes_widened::<KB>(p, rb),
            }
        };
    }
}

/// Unscaled scores (`Σ_g c_g · step_g · Σ q8·(code − offset)`, before the row scale) of
/// query rows `h0..h0+H` for the 16 rows whose codes [`k_codes`] laid out, into
/// `sacc[h0..h0+H]`. The H dot chains run interleaved so that `vpdpbusd` latency is hidden.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn k_scores<const H: usize>(codes: &[[__m512i; 8]], off: i32, job: &DecodeJob, h0: usize, kc: &[__m512i], sacc: &mut [__m512]) {
    let ng = job.d / GROUP;
    let mut s = [_mm512_setzero_ps(); H];
    for (g, cg) in codes[..ng].iter().enumerate() {
        let mut t = [_mm512_setzero_si512(); H];
        for (i, x) in t.iter_mut().enumerate() {
            *x = _mm512_set1_epi32(-off * job.qsum[(h0 + i) * ng + g]);
        }
        for (j, cj) in cg.iter().enumerate() {
            for (i, x) in t.iter_mut().enumerate() {
                *x = _mm512_dpbusd_epi32(*x, *cj, _mm512_set1_epi32(job.q32[((h0 + i) * ng + g) * 8 + j]));
            }
        }
        for (i, x) in s.iter_mut().enumerate() {
            let y = _mm512_cvtepi32_ps(_mm512_mullo_epi32(t[i], kc[g]));
            *x = _mm512_fmadd_ps(y, _mm512_set1_ps(job.qstep[(h0 + i) * ng + g]), *x);
        }
    }
    sacc[h0..h0 + H].copy_from_slice(&s);
}

/// Bit `r` set when row `r` of the block is kept (mask value not −∞).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn mask_block(mq: &[half::f16]) -> u16 {
    assert!(mq.len() >= B);
    // SAFETY: 16 f16 = 32 bytes are readable (asserted).
    let mv = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(mq.as_ptr().cast())) };
    _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(mv, _mm512_set1_ps(f32::NEG_INFINITY))
}

/// Row scales (f32) of 16 rows, and the group multipliers: sign-extended i32 into `ci`
/// (K), or as f32 into `cf` (V, when `float`). The first 16 bytes of the rows come in
/// through one transpose; dwords past them (only when `ng > 13`) through gathers.
///
/// # Safety
/// `p + r·rb` (= `p + idx[r]`) must start a row of `rb = row_bytes(bits, 32·ng)` bytes for
/// every r in 0..16; the reads stay inside the rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn headers(p: *const u8, rb: usize, idx: __m512i, ng: usize, ci: &mut [__m512i], float: bool, cf: &mut [__m512]) -> __m512 {
    // Rows shorter than 16 bytes (only d = 32 at 2 or 3 bits) take the gathers.
    let small = rb < 16;
    let t = if small {
        [_mm512_setzero_si512(); 4]
    } else {
        // SAFETY: every row has at least 16 bytes here.
        unsafe { transpose16(p, rb) }
    };
    let word_at = |dw: usize| -> __m512i {
        if !small && dw < 4 {
            t[dw]
        } else {
            // SAFETY: dw <= (ng + 1) / 4, guaranteed by the caller.
            unsafe { _mm512_i32gather_epi32::<1>(idx, p.add(4 * dw).cast()) }
        }
    };
    let h0 = word_at(0);
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h0));
    let mut word = h0;
    for g in 0..ng {
        // Multiplier g is byte 2 + g of the row: byte (2 + g) % 4 of dword (2 + g) / 4.
        let (dw, byte) = ((2 + g) / 4, (2 + g) % 4);
        if byte == 0 {
            word = word_at(dw);
        }
        let c = match byte {
            0 => _mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(word)),
            1 => _mm512_srai_epi32::<24>(_mm512_slli_epi32::<16>(word)),
            2 => _mm512_srai_epi32::<24>(_mm512_slli_epi32::<8>(word)),
            _ => _mm512_srai_epi32::<24>(word),
        };
        if float {
            cf[g] = _mm512_cvtepi32_ps(c);
        } else {
            ci[g] = c;
        }
    }
    scale
}

/// Loads 16 bytes of each of rows `p + 0·rb .. p + 15·rb` and transposes them so that dword
/// lane `r` of output `j` is dword `j` of row `r`.
///
/// # Safety
/// 16 bytes at `p + r·rb` must be readable for r in 0..16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn transpose16(p: *const u8, rb: usize) -> [__m512i; 4] {
    // SAFETY: guaranteed by the caller.
    let l = |r: usize| unsafe { _mm_loadu_si128(p.add(r * rb).cast()) };
    let z = |r: usize| {
        let a = _mm512_castsi128_si512(l(r));
        let a = _mm512_inserti32x4::<1>(a, l(r + 4));
        let a = _mm512_inserti32x4::<2>(a, l(r + 8));
        _mm512_inserti32x4::<3>(a, l(r + 12))
    };
    // 128-bit lane L of z(i) is row 4L + i.
    let (z0, z1, z2, z3) = (z(0), z(1), z(2), z(3));
    let t0 = _mm512_unpacklo_epi32(z0, z1);
    let t1 = _mm512_unpackhi_epi32(z0, z1);
    let t2 = _mm512_unpacklo_epi32(z2, z3);
    let t3 = _mm512_unpackhi_epi32(z2, z3);
    [
        _mm512_unpacklo_epi64(t0, t2),
        _mm512_unpackhi_epi64(t0, t2),
        _mm512_unpacklo_epi64(t1, t3),
        _mm512_unpackhi_epi64(t1, t3),
    ]
}

/// The 32 4-bit codes of one group of 16 rows, as 8 vectors of 4 codes per row and dword:
/// vector `j < 4` holds codes `4j..4j+4` (low nibbles), `j >= 4` codes `16 + 4(j−4)..`.
///
/// # Safety
/// As [`transpose16`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn codes4(p: *const u8, rb: usize) -> [__m512i; 8] {
    // SAFETY: guaranteed by the caller.
    let t = unsafe { transpose16(p, rb) };
    let lo = _mm512_set1_epi8(0x0F);
    let h = |x: __m512i| _mm512_and_si512(_mm512_srli_epi32::<4>(x), lo);
    [
        _mm512_and_si512(t[0], lo),
        _mm512_and_si512(t[1], lo),
        _mm512_and_si512(t[2], lo),
        _mm512_and_si512(t[3], lo),
        h(t[0]),
        h(t[1]),
        h(t[2]),
        h(t[3]),
    ]
}

/// The 32 8-bit codes of one group of 16 rows: vector `j` holds codes `4j..4j+4`.
///
/// # Safety
/// 32 bytes at `p + r·rb` must be readable for r in 0..16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn codes8(p: *const u8, rb: usize) -> [__m512i; 8] {
    // SAFETY: guaranteed by the caller.
    let (a, b) = unsafe { (transpose16(p, rb), transpose16(p.add(16), rb)) };
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// The 32 codes of one group of 16 rows at a width other than 4 or 8, widened to a byte
/// each ([`widen`]) and then laid out as [`codes8`]'s: vector `j` holds codes `4j..4j+4`.
///
/// # Safety
/// `group_code_bytes(KB)` bytes at `p + r·rb` must be readable for r in 0..16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn codes_widened<const KB: u32>(p: *const u8, rb: usize) -> [__m512i; 8] {
    let mut bytes = [_mm256_setzero_si256(); B];
    for (r, x) in bytes.iter_mut().enumerate() {
        // SAFETY: row r's group lies at p + r·rb (caller).
        *x = unsafe { widen::<KB>(p.add(r * rb)) };
    }
    // SAFETY: 16 rows of 32 bytes each.
    unsafe { codes8(bytes.as_ptr().cast(), 32) }
}

/// The 32 codes of one group at `BITS` bits, one byte each, code `i` in byte `i` (the
/// layouts are in `codec/quant.rs`): the low nibbles of 5-, 6- and 7-bit codes as in the
/// 4-bit layout, their high bits as 1-, 2- or 3-bit codes, 3-bit codes as 2 low bits and 1.
///
/// # Safety
/// `group_code_bytes(BITS)` bytes at `p` must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn widen<const BITS: u32>(p: *const u8) -> __m256i {
    // SAFETY (all): each read stays inside the group's 4·BITS bytes.
    unsafe {
        match BITS {
            2 => two_bits(p),
            3 => _mm256_or_si256(two_bits(p), one_bit(p.add(8), 4)),
            5 => _mm256_or_si256(nibbles(p), one_bit(p.add(16), 16)),
            6 => _mm256_or_si256(nibbles(p), _mm256_slli_epi16::<4>(two_bits(p.add(16)))),
            7 => {
                let hi = _mm256_or_si256(two_bits(p.add(16)), one_bit(p.add(24), 4));
                _mm256_or_si256(nibbles(p), _mm256_slli_epi16::<4>(hi))
            }
            4 => nibbles(p),
            _ => _mm256_loadu_si256(p.cast()),
        }
    }
}

/// 16 bytes of the 4-bit layout (byte `k`: code `k` low, code `k + 16` high) as 32 codes.
///
/// # Safety
/// 16 bytes at `p` must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: guaranteed by the caller.
    let x = unsafe { _mm_loadu_si128(p.cast()) };
    let lo = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(x), lo), _mm_and_si128(x, lo))
}

/// 8 bytes of the 2-bit layout (byte `k`: code `8s + k` in bits `2s..2s+2`) as 32 codes.
/// (Shifting a byte's codes left afterwards stays inside the byte: they are below 4.)
///
/// # Safety
/// 8 bytes at `p` must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn two_bits(p: *const u8) -> __m256i {
    // SAFETY: guaranteed by the caller.
    let x = unsafe { p.cast::<i64>().read_unaligned() };
    // 64-bit lane s is x >> 2s: its byte k holds code 8s + k in its low two bits.
    let lanes = _mm256_srlv_epi64(_mm256_set1_epi64x(x), _mm256_set_epi64x(6, 4, 2, 0));
    _mm256_and_si256(lanes, _mm256_set1_epi8(3))
}

/// 4 bytes of the 1-bit layout (bit `i` of the little-endian word: code `i`) as 32 bytes of
/// `value` or 0.
///
/// # Safety
/// 4 bytes at `p` must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn one_bit(p: *const u8, value: i8) -> __m256i {
    // SAFETY: guaranteed by the caller.
    let bits = unsafe { p.cast::<u32>().read_unaligned() };
    _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(value))
}

/// One V pass: query rows `h0..h0+hb` (hb <= 4), groups `g0..g0+cg` (cg <= 2), 16 rows.
///
/// # Safety
/// `vp` points at 16 rows of `vrb` bytes in the packed format of `vbits`; `acc` at `m·d`
/// floats with `h0 + hb <= m` and `32·(g0 + cg) <= d`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn v_pass(vbits: u32, hb: usize, cg: usize, vp: *const u8, vrb: usize, ng: usize, d: usize, h0: usize, g0: usize, aw: &[f32], alpha: &[f32], acc: *mut f32) {
    macro_rules! go {
        ($vb:literal) => {
            // SAFETY: forwarded from the caller.
            unsafe {
                match (hb, cg) {
                    (4, 2) => v_rows::<$vb, 4, 2>(vp, vrb, ng, d, h0, g0, aw, alpha, acc),
                    (3, 2) => v_rows::<$vb, 3, 2>(vp, vrb, ng, d, h0, g0, aw, alpha, acc),
                    (2, 2) => v_rows::<$vb, 2, 2>(vp, vrb, ng, d, h0, g0, aw, alpha, acc),
                    (1, 2) => v_rows::<$vb, 1, 2>(vp, vrb, ng, d, h0, g0, aw, alpha, acc),
                    (4, _) => v_rows::<$vb, 4, 1>(vp, vrb, ng, d, h0, g0, aw, alpha, acc),
                    (3, _) => v_rows::<$vb, 3, 1>(vp, vrb, ng, d, h0, g0, aw, alpha, acc),
                    (2, _) => v_rows::<$vb, 2, 1>(vp, vrb, ng, d, h0, g0, aw, alpha, acc),
                    _ => v_rows::<$vb, 1, 1>(vp, vrb, ng, d, h0, g0, aw, alpha, acc),
                }
            }
        };
    }
    with_width!(vbits, go);
}

/// See [`v_pass`]; `H` query rows, `C` groups, `VB` bits.
///
/// # Safety
/// As [`v_pass`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn v_rows<const VB: u32, const H: usize, const C: usize>(vp: *const u8, vrb: usize, ng: usize, d: usize, h0: usize, g0: usize, aw: &[f32], alpha: &[f32], acc: *mut f32) {
    let gb = group_code_bytes(VB);
    assert!(((h0 + H - 1) * ng + g0 + C) * B <= aw.len());
    // Row i's weights of groups g0.. (checked once above rather than at each load).
    let wp: [*const f32; H] = std::array::from_fn(|i| aw[((h0 + i) * ng + g0) * B..].as_ptr());
    // SAFETY: forwarded from the caller.
    let mut a = unsafe { load_acc::<H, C>(acc, d, h0, g0, alpha) };
    let tabs = Tables::new();
    for j in 0..B {
        // SAFETY: row j < 16 of the block; its codes start after the header.
        let rp = unsafe { vp.add(j * vrb + HEADER + ng) };
        for c in 0..C {
            // SAFETY: group g0 + c < ng lies inside the row.
            let (x0, x1) = unsafe { group_values::<VB>(rp.add((g0 + c) * gb), &tabs) };
            for (ai, w) in a.iter_mut().zip(wp) {
                // SAFETY: weight c·16 + j of row i's groups from g0 lies inside aw (asserted).
                let w = _mm512_set1_ps(unsafe { *w.add(c * B + j) });
                ai[c][0] = _mm512_fmadd_ps(w, x0, ai[c][0]);
                ai[c][1] = _mm512_fmadd_ps(w, x1, ai[c][1]);
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_acc(&a, acc, d, h0, g0) };
}

/// The accumulators of query rows `h0..h0+H`, columns `32·g0 .. 32·(g0 + C)`, from `acc`,
/// rescaled by each row's `alpha`.
///
/// # Safety
/// `acc` points at `m·d` floats with `h0 + H <= m` and `32·(g0 + C) <= d`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn load_acc<const H: usize, const C: usize>(acc: *const f32, d: usize, h0: usize, g0: usize, alpha: &[f32]) -> [[[__m512; 2]; C]; H] {
    let mut a = [[[_mm512_setzero_ps(); 2]; C]; H];
    for (i, ai) in a.iter_mut().enumerate() {
        let al = _mm512_set1_ps(alpha[h0 + i]);
        for (c, ac) in ai.iter_mut().enumerate() {
            for (k, x) in ac.iter_mut().enumerate() {
                // SAFETY: row h0 + i < m, column 32(g0 + c) + 16k + 16 <= d (caller).
                *x = _mm512_mul_ps(al, unsafe { _mm512_loadu_ps(acc.add((h0 + i) * d + 32 * (g0 + c) + 16 * k)) });
            }
        }
    }
    a
}

/// Writes back what [`load_acc`] loaded.
///
/// # Safety
/// As [`load_acc`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn store_acc<const H: usize, const C: usize>(a: &[[[__m512; 2]; C]; H], acc: *mut f32, d: usize, h0: usize, g0: usize) {
    for (i, ai) in a.iter().enumerate() {
        for (c, ac) in ai.iter().enumerate() {
            for (k, x) in ac.iter().enumerate() {
                // SAFETY: row h0 + i < m, column 32(g0 + c) + 16k + 16 <= d (caller).
                unsafe { _mm512_storeu_ps(acc.add((h0 + i) * d + 32 * (g0 + c) + 16 * k), *x) };
            }
        }
    }
}

/// The values `code − offset` of 16 V rows (`VB` bits) into `vf`, `[row][32·ng]`: what
/// [`v_rows`] computes in each pass, computed once.
///
/// # Safety
/// `vp` points at 16 rows of `vrb` bytes in the packed format of `vbits` and `32·ng` values;
/// `vf` holds at least `16·32·ng` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn expand_v(vbits: u32, vp: *const u8, vrb: usize, ng: usize, vf: &mut [f32]) {
    assert!(vf.len() >= B * GROUP * ng);
    macro_rules! go {
        ($vb:literal) => {{
            let (gb, tabs) = (group_code_bytes($vb), Tables::new());
            for j in 0..B {
                for g in 0..ng {
                    // SAFETY: row j < 16, group g < ng lie inside the block (caller); the
                    // stores fill floats 32·(j·ng + g) .. + 32 <= vf.len() (asserted).
                    unsafe {
                        let (x0, x1) = group_values::<$vb>(vp.add(j * vrb + HEADER + ng + g * gb), &tabs);
                        let o = vf.as_mut_ptr().add(GROUP * (j * ng + g));
                        _mm512_storeu_ps(o, x0);
                        _mm512_storeu_ps(o.add(16), x1);
                    }
                }
            }
        }};
    }
    with_width!(vbits, go);
}

/// [`v_pass`] over values [`expand_v`] expanded (`vf`: 16 rows of `d` floats).
///
/// # Safety
/// As [`v_pass`], with `vf` holding `16·d` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn v_pass_expanded(hb: usize, cg: usize, vf: &[f32], d: usize, h0: usize, g0: usize, ng: usize, aw: &[f32], alpha: &[f32], acc: *mut f32) {
    macro_rules! go {
        ($h:literal, $c:literal) => {
            // SAFETY: forwarded from the caller.
            unsafe { v_rows_expanded::<$h, $c>(vf, d, h0, g0, ng, aw, alpha, acc) }
        };
    }
    match (hb, cg) {
        (4, 2) => go!(4, 2),
        (3, 2) => go!(3, 2),
        (2, 2) => go!(2, 2),
        (1, 2) => go!(1, 2),
        (4, _) => go!(4, 1),
        (3, _) => go!(3, 1),
        (2, _) => go!(2, 1),
        _ => go!(1, 1),
    }
}

/// See [`v_pass_expanded`]; `H` query rows, `C` groups.
///
/// # Safety
/// As [`v_pass_expanded`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn v_rows_expanded<const H: usize, const C: usize>(vf: &[f32], d: usize, h0: usize, g0: usize, ng: usize, aw: &[f32], alpha: &[f32], acc: *mut f32) {
    assert!(vf.len() >= B * d && 32 * (g0 + C) <= d && ((h0 + H - 1) * ng + g0 + C) * B <= aw.len());
    // Row i's weights of groups g0.. (checked once above rather than at each load).
    let wp: [*const f32; H] = std::array::from_fn(|i| aw[((h0 + i) * ng + g0) * B..].as_ptr());
    // SAFETY: forwarded from the caller.
    let mut a = unsafe { load_acc::<H, C>(acc, d, h0, g0, alpha) };
    for j in 0..B {
        for c in 0..C {
            // SAFETY: floats j·d + 32(g0 + c) .. + 32 lie inside vf (asserted).
            let (x0, x1) = unsafe {
                let p = vf.as_ptr().add(j * d + 32 * (g0 + c));
                (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
            };
            for (ai, w) in a.iter_mut().zip(wp) {
                // SAFETY: weight c·16 + j of row i's groups from g0 lies inside aw (asserted).
                let w = _mm512_set1_ps(unsafe { *w.add(c * B + j) });
                ai[c][0] = _mm512_fmadd_ps(w, x0, ai[c][0]);
                ai[c][1] = _mm512_fmadd_ps(w, x1, ai[c][1]);
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_acc(&a, acc, d, h0, g0) };
}

/// Lookup tables from a code's low 4 bits to `code − offset` as f32.
struct Tables {
    /// 4 bits: `i − 8`.
    t4: __m512,
    /// 2 bits (the low two of the index): `(i & 3) − 2`.
    t2: __m512,
    /// 3 bits, high bit clear / set: `(i & 3) − 4` / `(i & 3)`.
    t3lo: __m512,
    t3hi: __m512,
}

impl Tables {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[inline]
    fn new() -> Tables {
        let t4 = _mm512_set_ps(7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0);
        let t2 = _mm512_set_ps(1.0, 0.0, -1.0, -2.0, 1.0, 0.0, -1.0, -2.0, 1.0, 0.0, -1.0, -2.0, 1.0, 0.0, -1.0, -2.0);
        let t3lo = _mm512_set_ps(-1.0, -2.0, -3.0, -4.0, -1.0, -2.0, -3.0, -4.0, -1.0, -2.0, -3.0, -4.0, -1.0, -2.0, -3.0, -4.0);
        let t3hi = _mm512_set_ps(3.0, 2.0, 1.0, 0.0, 3.0, 2.0, 1.0, 0.0, 3.0, 2.0, 1.0, 0.0, 3.0, 2.0, 1.0, 0.0);
        Tables { t4, t2, t3lo, t3hi }
    }
}

/// The 32 values `code − offset` of one group as two vectors (codes 0..16, 16..32).
///
/// # Safety
/// `group_code_bytes(VB)` bytes at `p` must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn group_values<const VB: u32>(p: *const u8, t: &Tables) -> (__m512, __m512) {
    // SAFETY (all arms): the loads stay inside the group's `4·VB` bytes.
    unsafe {
        match VB {
            8 => {
                let off = _mm512_set1_ps(128.0);
                let a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast())));
                let b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16).cast())));
                (_mm512_sub_ps(a, off), _mm512_sub_ps(b, off))
            }
            4 => {
                let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()));
                (_mm512_permutexvar_ps(b, t.t4), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(b), t.t4))
            }
            5..=7 => {
                let w = widen::<VB>(p);
                #[allow(clippy::cast_precision_loss)]
                let off = _mm512_set1_ps((1u32 << (VB - 1)) as f32);
                let f = |x: __m128i| _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x)), off);
                (f(_mm256_castsi256_si128(w)), f(_mm256_extracti128_si256::<1>(w)))
            }
            _ => {
                // Byte k holds codes k, 8 + k, 16 + k, 24 + k in bit pairs 0, 2, 4, 6.
                let x = _mm_loadl_epi64(p.cast());
                let b = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(x, x));
                let s01 = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
                let s23 = _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4);
                let (l0, l1) = (_mm512_srlv_epi32(b, s01), _mm512_srlv_epi32(b, s23));
                if VB == 2 {
                    return (_mm512_permutexvar_ps(l0, t.t2), _mm512_permutexvar_ps(l1, t.t2));
                }
                // Bit 2 of code i is bit i of the little-endian u32 after the low bits.
                let hi = _mm512_set1_epi32(p.add(8).cast::<i32>().read_unaligned());
                let bit = _mm512_sllv_epi32(_mm512_set1_epi32(1), _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
                let k0 = _mm512_test_epi32_mask(hi, bit);
                let k1 = _mm512_test_epi32_mask(hi, _mm512_slli_epi32::<16>(bit));
                (
                    _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(l0, t.t3lo), k0, l0, t.t3hi),
                    _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(l1, t.t3lo), k1, l1, t.t3hi),
                )
            }
        }
    }
}

/// `e^x` on 16 lanes: the algorithm and constants of `kernels::exp` (exactly 0 below −87).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn exp(x: __m512) -> __m512 {
    let magic = _mm512_set1_ps(12_582_912.0);
    let xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
    let t = _mm512_fmadd_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E), magic);
    let n = _mm512_sub_ps(t, magic);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_359_4), xc);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.000_000_1e-1));
    let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
    let ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(magic));
    let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(ni, _mm512_set1_epi32(127))));
    let live = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.0));
    _mm512_maskz_mul_ps(live, y, pow2)
}

/// `c · tanh(x)` on 16 lanes (as `kernels::softcap`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn softcap(x: __m512, c: f32) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    let ax = _mm512_abs_ps(x);
    let t = exp(_mm512_mul_ps(_mm512_set1_ps(-2.0), ax));
    let y = _mm512_div_ps(_mm512_sub_ps(one, t), _mm512_add_ps(one, t));
    // Copy the sign of x onto y.
    let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
    _mm512_mul_ps(_mm512_set1_ps(c), _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign)))
}
