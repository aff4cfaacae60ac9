//! Randomized Walsh-Hadamard rotation of a head row.
//!
//! `rotate(x) = H_n · (s ⊙ x) / √n` applied block by block, where `s` is a fixed pseudo-random
//! ±1 sign vector (seeded, so stored rows stay readable forever) and `n` is the largest power of
//! two that divides the row length (the whole row for 64/128/256; blocks of 32 for 96, 64 for
//! 192, ...). The transform is orthonormal, so `dot(rotate(q), rotate(k)) == dot(q, k)` up to
//! rounding, and `unrotate` is its exact inverse: `s ⊙ (H_n · y) / √n`.

/// Largest head row the rotation (and so the codec) accepts.
pub const MAX_HEAD_DIM: usize = 4096;

/// Seed of the sign sequence. Changing it makes every stored row unreadable.
const SIGN_SEED: u64 = 0x5D5B_A4C0_DE5E_ED01;

/// One sign bit per position (bit set = negate), generated at compile time with splitmix64.
const SIGN_BITS: [u64; MAX_HEAD_DIM / 64] = sign_bits();

const fn splitmix64(state: u64) -> u64 {
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const fn sign_bits() -> [u64; MAX_HEAD_DIM / 64] {
    let mut out = [0u64; MAX_HEAD_DIM / 64];
    let mut i = 0;
    while i < out.len() {
        out[i] = splitmix64(SIGN_SEED.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        i += 1;
    }
    out
}

/// The sign bits as f32 sign masks (`1 << 31` where the value is negated), so that applying
/// them is one XOR per value, which vectorizes (a bit test per value did not).
const SIGN_MASKS: [u32; MAX_HEAD_DIM] = sign_masks();

const fn sign_masks() -> [u32; MAX_HEAD_DIM] {
    let mut out = [0u32; MAX_HEAD_DIM];
    let mut i = 0;
    while i < MAX_HEAD_DIM {
        out[i] = (((SIGN_BITS[i / 64] >> (i % 64)) & 1) as u32) << 31;
        i += 1;
    }
    out
}

/// The Hadamard block size used for rows of length `n`: the largest power of two dividing `n`.
#[must_use]
pub fn block_len(n: usize) -> usize {
    1 << n.trailing_zeros()
}

fn check_len(n: usize) {
    assert!(
        n % 32 == 0 && n > 0 && n <= MAX_HEAD_DIM,
        "dspark::codec::rotate: row length {n} is not a multiple of 32 in 32..={MAX_HEAD_DIM}"
    );
}

fn apply_signs(x: &mut [f32]) {
    for (v, m) in x.iter_mut().zip(&SIGN_MASKS) {
        *v = f32::from_bits(v.to_bits() ^ m);
    }
}

/// One butterfly stage of span `H` (< 16) on 16 values: value `i` and value `i ^ H` become
/// their sum (lower index) and difference, the same operations in the same order as the
/// generic stage in [`fwht`]. Written lane by lane over a permuted copy, with `H` a constant,
/// so that LLVM makes it a shuffle and an add/sub blend instead of scalar code.
#[inline(always)]
fn stage16<const H: usize>(x: &mut [f32; 16]) {
    let p: [f32; 16] = core::array::from_fn(|i| x[i ^ H]);
    for (i, v) in x.iter_mut().enumerate() {
        *v = if i & H == 0 { *v + p[i] } else { p[i] - *v };
    }
}

/// Unnormalized in-place fast Walsh-Hadamard transform of one power-of-two block (32 values
/// or more).
fn fwht(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n >= 16 && n.is_power_of_two(), "fwht: block of {n}");
    // The spans below 16 stay inside 16-value chunks.
    for c in x.chunks_exact_mut(16) {
        let c: &mut [f32; 16] = c.try_into().expect("16 values");
        stage16::<1>(c);
        stage16::<2>(c);
        stage16::<4>(c);
        stage16::<8>(c);
    }
    let mut h = 16;
    while h < n {
        stage(x, h);
        h *= 2;
    }
}

/// One butterfly stage of span `h` on a block: in each run of `2h` values, value `i` of the
/// first half and value `i` of the second become their sum and difference.
fn stage(x: &mut [f32], h: usize) {
    for run in x.chunks_exact_mut(2 * h) {
        let (lo, hi) = run.split_at_mut(h);
        for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
            let (u, v) = (*a, *b);
            *a = u + v;
            *b = u - v;
        }
    }
}

fn hadamard_blocks(x: &mut [f32]) {
    let n = block_len(x.len());
    #[allow(clippy::cast_precision_loss)]
    let norm = 1.0 / (n as f32).sqrt();
    for block in x.chunks_exact_mut(n) {
        fwht(block);
        for v in block.iter_mut() {
            *v *= norm;
        }
    }
}

/// Rotates one head row in place into the codec's space.
///
/// # Panics
/// If `x.len()` is not a multiple of 32 in `32..=MAX_HEAD_DIM`.
pub fn rotate(x: &mut [f32]) {
    check_len(x.len());
    apply_signs(x);
    hadamard_blocks(x);
}

/// Inverse of [`rotate`]: brings a row from the codec's space back to the model's space.
///
/// # Panics
/// If `x.len()` is not a multiple of 32 in `32..=MAX_HEAD_DIM`.
pub fn unrotate(x: &mut [f32]) {
    check_len(x.len());
    hadamard_blocks(x);
    apply_signs(x);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The rotation as first written: a bit test per sign, every span through the generic
    /// `stage` (the fast path takes spans below 16 as lane shuffles).
    fn rotate_plain(x: &mut [f32]) {
        for (i, v) in x.iter_mut().enumerate() {
            if (SIGN_BITS[i / 64] >> (i % 64)) & 1 == 1 {
                *v = -*v;
            }
        }
        let n = block_len(x.len());
        let norm = 1.0 / (n as f32).sqrt();
        for block in x.chunks_exact_mut(n) {
            let mut h = 1;
            while h < n {
                stage(block, h);
                h *= 2;
            }
            block.iter_mut().for_each(|v| *v *= norm);
        }
    }

    #[test]
    fn rotation_gives_the_plain_loops_bits() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        for n in [32, 64, 96, 128, 192, 256, 512] {
            for _ in 0..50 {
                let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-4.0f32..4.0) * 10f32.powi(rng.gen_range(-3..3))).collect();
                let (mut a, mut b) = (x.clone(), x.clone());
                rotate(&mut a);
                rotate_plain(&mut b);
                assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "n={n}");
                unrotate(&mut a);
                let top = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(a.iter().zip(&x).all(|(p, q)| (p - q).abs() <= 1e-5 * top), "n={n}: round trip");
            }
        }
    }
}
