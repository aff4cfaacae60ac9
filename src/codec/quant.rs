//! The group quantizer and the bit packing of one rotated row.
//!
//! Row layout (`G = head_dim / 32` groups of 32 values, `b` bits per value):
//!
//! | bytes | content |
//! |---|---|
//! | 0..2 | row scale `S`, bf16 little-endian, `S >= 0` |
//! | 2..2+G | one signed 8-bit group multiplier `c_g` per group |
//! | 2+G.. | `G` code blocks of `4·b` bytes |
//!
//! Value `i` of group `g` decodes to `S · c_g · (code_i − 2^(b−1))`; every product is exact in
//! f32 (8 + 7 + 8 significant bits), so any decoder gives the same bits.
//!
//! Code block packing (32 codes per group), chosen so that a SIMD decoder needs only shifts
//! and masks with constant counts:
//! - 8 bits: byte `k` is code `k`.
//! - 4 bits: byte `k` holds code `k` (low nibble) and code `k + 16` (high nibble).
//! - 2 bits: byte `k` holds code `8s + k` in bits `2s..2s+2`, for `s` in 0..4.
//! - 3 bits: the low two bits as in the 2-bit layout (8 bytes), then 4 bytes where bit `k` of
//!   byte `s` is bit 2 of code `8s + k` (the 1-bit layout).
//! - 5, 6, 7 bits: the low four bits as in the 4-bit layout (16 bytes), then the high `b − 4`
//!   bits of each code in the layout of that width (1 bit: as bit 2 of the 3-bit layout).

/// Values per group.
pub const GROUP: usize = 32;

/// Bytes of the row header before the group multipliers (the bf16 row scale).
pub const HEADER: usize = 2;

/// Bytes one group of codes takes at `bits` bits per value.
#[must_use]
pub const fn group_code_bytes(bits: u32) -> usize {
    4 * bits as usize
}

/// Total bytes of a row of `dim` values at `bits` bits per value.
#[must_use]
pub const fn row_bytes(bits: u32, dim: usize) -> usize {
    let groups = dim / GROUP;
    HEADER + groups + groups * group_code_bytes(bits)
}

/// Scale factors tried (relative to the absmax step) by the per-group MSE search. A step a
/// little below absmax/2^(b-1) clips the rare extreme value but quantizes the bulk finer.
const SEARCH: [f32; 9] = [1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.78, 1.03];

#[inline]
fn bf16_bits_round_up(x: f32) -> u16 {
    // x is finite and >= 0: rounding the bit pattern up rounds the magnitude up.
    let bits = x.to_bits();
    let hi = bits >> 16;
    let hi = if bits & 0xFFFF != 0 { hi + 1 } else { hi };
    u16::try_from(hi).unwrap_or(0x7F7F)
}

/// The row scale stored in the first two bytes of a row.
#[inline(always)]
#[must_use]
pub fn row_scale(data: &[u8]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([data[0], data[1]])) << 16)
}

/// `x.round()` (half away from zero), written as LLVM lowers it, `trunc(x ± 0.49999997)`
/// (exact for every float), because `f32::round` in a loop does not vectorize.
#[inline(always)]
pub(crate) fn round(x: f32) -> f32 {
    (x + 0.499_999_97_f32.copysign(x)).trunc()
}

/// `t as i32` for an integer-valued `t` of `-2^22..2^22`, in a form that vectorizes: `as`
/// saturates (and maps NaN to 0) value by value, a scalar conversion and two compares each.
/// Adding 1.5 · 2^23 puts `t` into the low mantissa bits of the sum exactly.
#[inline(always)]
pub(crate) fn small_int(t: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    #[allow(clippy::cast_possible_wrap)]
    let bits = (t + MAGIC).to_bits() as i32;
    bits - 0x4B40_0000
}

/// Quantizes one value with a given step; the result is a code in `0..2·off`.
#[inline(always)]
fn quantize(v: f32, inv_step: f32, off: i32) -> i32 {
    // Clamped as a float (NaN to the lowest code), then converted ([`small_int`]).
    #[allow(clippy::cast_precision_loss)]
    let q = small_int(round(v * inv_step).max(-(off as f32)).min((off - 1) as f32));
    q + off
}

/// Squared error of quantizing `v` with `step`: what [`quantize`] then decoding gives, as
/// `clamp(round(x / step), -off, off - 1) · step`. Summed in 16 lanes, then the lanes as a
/// tree (8 + 8, 4 + 4, ...), not left to right, so that it vectorizes: the scale search calls
/// it 9 times per group, and a sequential sum (of the values, then of the lanes: 16 dependent
/// adds, a fifth of encoding's time) made compression a visible share of prefill.
#[allow(clippy::cast_precision_loss)]
fn group_error(v: &[f32], step: f32, off: i32) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (inv, lo, hi) = if step == 0.0 { (0.0, 0.0, 0.0) } else { (1.0 / step, -(off as f32), (off - 1) as f32) };
    for c in v.chunks_exact(16) {
        let c: &[f32; 16] = c.try_into().expect("16 values");
        for (l, &x) in lanes.iter_mut().zip(c) {
            let e = x - round(x * inv).max(lo).min(hi) * step;
            *l += e * e;
        }
    }
    let mut w = lanes.len() / 2;
    while w > 0 {
        for l in 0..w {
            lanes[l] += lanes[l + w];
        }
        w /= 2;
    }
    lanes[0]
}

/// Picks the signed 8-bit multiplier for one group. `ideal` is the absmax step (negative when
/// the extreme value is positive, so that the extreme lands on the lowest code).
#[allow(clippy::cast_possible_truncation)]
fn pick_multiplier(v: &[f32], ideal: f32, row_scale: f32, off: i32, search: bool) -> i8 {
    let c0 = (ideal / row_scale).round().clamp(-127.0, 127.0);
    if !search || c0 == 0.0 {
        return c0 as i8;
    }
    // Every candidate's error first, then the choice: the errors are independent, and
    // computed apart from the running best they overlap (encoding measured 10% faster).
    let cands = SEARCH.map(|f| (c0 * f).round().clamp(-127.0, 127.0));
    let errs = cands.map(|c| if c == 0.0 { f32::INFINITY } else { group_error(v, row_scale * c, off) });
    let mut best = (f32::INFINITY, c0);
    for (err, c) in errs.into_iter().zip(cands) {
        if err < best.0 {
            best = (err, c);
        }
    }
    best.1 as i8
}

/// Signed value of largest magnitude (ggml's q4_0 convention: the first one, should several
/// share it), 0 for an all-zero group. The magnitude is found in 16 lanes, so it vectorizes.
fn signed_extreme(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    for c in v.chunks_exact(16) {
        let c: &[f32; 16] = c.try_into().expect("16 values");
        lanes.iter_mut().zip(c).for_each(|(l, &x)| *l = l.max(x.abs()));
    }
    let m = lanes.iter().fold(0.0f32, |a, &b| a.max(b));
    if m == 0.0 {
        return 0.0;
    }
    v.iter().copied().find(|x| x.abs() == m).unwrap_or(0.0)
}

/// Encodes one rotated, finite row. `search` turns the per-group MSE scale search on.
pub fn encode_rotated(bits: u32, y: &[f32], out: &mut [u8], search: bool) {
    let groups = y.len() / GROUP;
    let off = 1i32 << (bits - 1);
    #[allow(clippy::cast_precision_loss)]
    let offf = off as f32;
    let mut ideal = [0.0f32; crate::codec::rotate::MAX_HEAD_DIM / GROUP];
    for (g, v) in y.chunks_exact(GROUP).enumerate() {
        ideal[g] = -signed_extreme(v) / offf;
    }
    let max_step = ideal[..groups].iter().fold(0.0f32, |m, d| m.max(d.abs()));
    let s_bits = bf16_bits_round_up(max_step / 127.0);
    out[..2].copy_from_slice(&s_bits.to_le_bytes());
    let s = row_scale(out);
    let (mults, codes) = out[HEADER..].split_at_mut(groups);
    let gb = group_code_bytes(bits);
    for (g, v) in y.chunks_exact(GROUP).enumerate() {
        let c = if s > 0.0 && s.is_finite() {
            pick_multiplier(v, ideal[g], s, off, search)
        } else {
            0
        };
        mults[g] = c.to_le_bytes()[0];
        let step = s * f32::from(c);
        let inv = if step == 0.0 { 0.0 } else { 1.0 / step };
        let mut q = [0u8; GROUP];
        for (qi, &x) in q.iter_mut().zip(v) {
            *qi = u8::try_from(quantize(x, inv, off)).unwrap_or(0);
        }
        pack(bits, &q, &mut codes[g * gb..(g + 1) * gb]);
    }
}

fn pack(bits: u32, q: &[u8; GROUP], out: &mut [u8]) {
    out.fill(0);
    match bits {
        8 => out.copy_from_slice(q),
        4 => {
            for k in 0..16 {
                out[k] = q[k] | (q[k + 16] << 4);
            }
        }
        2 => pack2(q, out),
        3 => {
            pack2(q, &mut out[..8]);
            pack1(&q.map(|c| c >> 2), &mut out[8..]);
        }
        5..=7 => {
            pack(4, &q.map(|c| c & 15), &mut out[..16]);
            let hi = q.map(|c| c >> 4);
            match bits {
                5 => pack1(&hi, &mut out[16..]),
                _ => pack(bits - 4, &hi, &mut out[16..]),
            }
        }
        _ => unreachable!("bits checked by Quant"),
    }
}

/// Bit 0 of code `8s + k` into bit `k` of byte `s`.
fn pack1(q: &[u8; GROUP], out: &mut [u8]) {
    for (i, &c) in q.iter().enumerate() {
        out[i / 8] |= (c & 1) << (i % 8);
    }
}

fn pack2(q: &[u8; GROUP], out: &mut [u8]) {
    for (i, &c) in q.iter().enumerate() {
        out[i % 8] |= (c & 3) << (2 * (i / 8));
    }
}

/// Decodes one row into the rotated space. Generic over the bit width so that each width
/// compiles to its own straight-line loops (the attention kernels instantiate it per ISA).
#[inline(always)]
pub fn decode_rotated_body<const BITS: u32>(data: &[u8], out: &mut [f32]) {
    let groups = out.len() / GROUP;
    let s = row_scale(data);
    let (mults, codes) = data[HEADER..].split_at(groups);
    let gb = group_code_bytes(BITS);
    for ((o, &m), c) in out
        .chunks_exact_mut(GROUP)
        .zip(mults)
        .zip(codes.chunks_exact(gb))
    {
        let step = s * f32::from(i8::from_le_bytes([m]));
        let o: &mut [f32; GROUP] = o.try_into().expect("group of 32");
        match BITS {
            8 => unpack8(c, step, o),
            4 => unpack4(c, step, o),
            3 => unpack3(c, step, o),
            2 => unpack2(c, step, o),
            _ => unpack_wide::<BITS>(c, step, o),
        }
    }
}

#[inline(always)]
fn level(code: u8, off: i32, step: f32) -> f32 {
    #[allow(clippy::cast_precision_loss)]
    let l = (i32::from(code) - off) as f32;
    l * step
}

// The unpackers work on local copies so that LLVM sees no aliasing and vectorizes them.

#[inline(always)]
fn unpack8(c: &[u8], step: f32, o: &mut [f32; GROUP]) {
    let c: [u8; 32] = c.try_into().expect("32 bytes");
    let mut t = [0.0f32; GROUP];
    for k in 0..32 {
        t[k] = level(c[k], 128, step);
    }
    *o = t;
}

#[inline(always)]
fn unpack4(c: &[u8], step: f32, o: &mut [f32; GROUP]) {
    let c: [u8; 16] = c.try_into().expect("16 bytes");
    let mut t = [0.0f32; GROUP];
    for k in 0..16 {
        t[k] = level(c[k] & 15, 8, step);
        t[k + 16] = level(c[k] >> 4, 8, step);
    }
    *o = t;
}

#[inline(always)]
fn unpack2(c: &[u8], step: f32, o: &mut [f32; GROUP]) {
    let c: [u8; 8] = c.try_into().expect("8 bytes");
    let mut t = [0.0f32; GROUP];
    for s in 0..4 {
        for k in 0..8 {
            t[8 * s + k] = level((c[k] >> (2 * s)) & 3, 2, step);
        }
    }
    *o = t;
}

#[inline(always)]
fn unpack3(c: &[u8], step: f32, o: &mut [f32; GROUP]) {
    let c: [u8; 12] = c.try_into().expect("12 bytes");
    let mut t = [0.0f32; GROUP];
    for s in 0..4 {
        let hi = c[8 + s];
        for k in 0..8 {
            let code = ((c[k] >> (2 * s)) & 3) | (((hi >> k) & 1) << 2);
            t[8 * s + k] = level(code, 4, step);
        }
    }
    *o = t;
}

/// 5, 6 and 7 bits: the low nibbles, then the high bits as 1-, 2- or 3-bit codes.
#[inline(always)]
fn unpack_wide<const BITS: u32>(c: &[u8], step: f32, o: &mut [f32; GROUP]) {
    let lo: [u8; 16] = c[..16].try_into().expect("16 bytes");
    let mut code = [0u8; GROUP];
    for k in 0..16 {
        code[k] = lo[k] & 15;
        code[k + 16] = lo[k] >> 4;
    }
    let hi = &c[16..];
    for (i, x) in code.iter_mut().enumerate() {
        let (s, k) = (i / 8, i % 8);
        let h = match BITS {
            5 => (hi[s] >> k) & 1,
            6 => (hi[k] >> (2 * s)) & 3,
            _ => ((hi[k] >> (2 * s)) & 3) | (((hi[8 + s] >> k) & 1) << 2),
        };
        *x |= h << 4;
    }
    let off = 1i32 << (BITS - 1);
    let mut t = [0.0f32; GROUP];
    for k in 0..GROUP {
        t[k] = level(code[k], off, step);
    }
    *o = t;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorizable helpers give exactly what the plain formulations give.
    #[test]
    fn vectorized_helpers_match_the_plain_definitions() {
        let mut x = 0x9e37_79b9_u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        // Halves, their neighbours, and arbitrary floats of every magnitude.
        let mut vals: Vec<f32> = (-40..40).flat_map(|k| [k as f32 + 0.5, (k as f32 + 0.5).next_up(), (k as f32 + 0.5).next_down()]).collect();
        vals.extend([0.0, -0.0, 0.499_999_97, -0.499_999_97, 8_388_607.5, 1e30, -1e30]);
        vals.extend((0..10_000).map(|_| f32::from_bits(next() & 0xbfff_ffff))); // finite, |x| < 2^64
        vals.extend((0..10_000).map(|_| (next() as i32) as f32 / 1e8)); // row-sized values, |x| < 22
        for &v in &vals {
            assert_eq!(round(v).to_bits(), v.round().to_bits(), "round({v:e})");
        }
        for chunk in vals.chunks_exact(GROUP) {
            let plain = chunk.iter().fold(0.0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
            assert_eq!(signed_extreme(chunk).to_bits(), plain.to_bits());
            if plain.abs() > 1e6 {
                continue; // squares beyond f32's range: not what rows hold
            }
            for (off, step) in [(8, 0.37f32), (2, 3.0), (128, 1e-3), (8, 0.0)] {
                let plain: f32 = chunk
                    .iter()
                    .map(|&x| {
                        let e = if step == 0.0 { x } else { x - ((x / step).round().clamp(-off as f32, (off - 1) as f32)) * step };
                        f64::from(e * e) as f32
                    })
                    .map(f64::from)
                    .sum::<f64>() as f32;
                let got = group_error(chunk, step, off);
                assert!((got - plain).abs() <= 1e-5 * plain.max(1e-30), "group_error {got} vs {plain}");
            }
        }
        // Ties in magnitude: the first of them, with its sign.
        let mut g = [0.0f32; GROUP];
        g[3] = -2.0;
        g[20] = 2.0;
        assert_eq!(signed_extreme(&g), -2.0);
        assert_eq!(signed_extreme(&[0.0; GROUP]), 0.0);
    }
}
