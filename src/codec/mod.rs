//! K/V row formats: a randomized Hadamard rotation followed by a low-bit group quantizer.
//!
//! # The format
//! A head row of `d` values (any multiple of 32 up to 4096) is rotated with a fixed-seed
//! randomized Walsh-Hadamard transform ([`rotate`]); after it the coordinates are close to
//! Gaussian and outlier channels are spread over the whole row. The rotated row is cut into
//! groups of 32. Each group gets the q4_0-style signed absmax step (the extreme value lands
//! exactly on the lowest level), refined by a small MSE search over 9 candidate steps, and the
//! step is stored as a signed 8-bit multiplier of one bf16 row scale. Codes are uniform
//! `b`-bit integers, `b` from 2 to 8. Cost: `b + 8/32 + 16/d` bits per value, all metadata
//! included: at d = 128 that is 8.375 / 4.375 / 3.375 / 2.375 for 8 / 4 / 3 / 2 bits (d = 64:
//! 8.5 / 4.5 / 3.5 / 2.5).
//! The byte layout is in `quant.rs`.
//!
//! # Why this quantizer (measured by `tests/codec_fidelity.rs`, printed with `--nocapture`)
//! 2048 rows (half i.i.d. Gaussian, half with 4 fixed outlier channels at 20x plus a
//! per-channel bias, like real K rows), rotated, quantized, decoded. "rel. MSE" = error energy
//! / signal energy; "attn" = mean relative error of single-query attention outputs over 1024
//! such K and V rows (a peaky, outlier-heavy regime, so the figures are large; compare them
//! only with each other). "row-scale" variants have one scale per row found by an MSE search;
//! "LM" = Gaussian Lloyd-Max codebook; q4_0/q8_0 are ggml's formats after the same rotation.
//!
//! | quantizer (d = 128) | bits/value | rel. MSE | attn |
//! |---|---|---|---|
//! | **R8 (this codec)** | 8.375 | **1.94e-5** | 0.012 |
//! | rotated q8_0 | 8.5 | 2.00e-5 | 0.014 |
//! | **R4 (this codec)** | 4.375 | **4.96e-3** | **0.22** |
//! | R4 without the MSE search | 4.375 | 5.41e-3 | 0.25 |
//! | rotated q4_0 | 4.5 | 5.41e-3 | 0.25 |
//! | row-scale uniform 16 levels | 4.125 | 6.02e-3 | 0.24 |
//! | row-scale LM 16 levels | 4.125 | 6.32e-3 | 0.26 |
//! | **R3 (this codec)** | 3.375 | **2.17e-2** | 0.49 |
//! | row-scale LM 8 levels | 3.125 | 2.28e-2 | 0.44 |
//! | **R2 (this codec)** | 2.375 | **1.08e-1** | 0.92 |
//!
//! At d = 64 (R4 costs 4.5 bits, like q4_0): R4 4.79e-3 / 0.26 against q4_0 5.12e-3 / 0.30.
//!
//! Decisions: group-32 steps (0.25 bit as an int8 multiplier of the row scale, instead of
//! q4_0's 0.5 bit f16) beat one scale per row by ~20% MSE at 4 bits, i.e. more than the
//! ~10% that 0.25 bit more code would buy, so they stay. The MSE search buys 8%. Non-uniform
//! 16-level codebooks lose at 4 bits after rotation (ik_llama.cpp #1547 saw the same) and
//! would cost a table lookup per value in every kernel, so they were dropped. At 3 bits a
//! row-scale 8-level Lloyd-Max codebook is about as good per bit as R3 (better attention
//! error, slightly worse MSE): a candidate for a later `v3nl` variant, not done. Asymmetric
//! (min + scale) groups were not kept: rotated rows are zero-mean and the signed-extreme step
//! already uses all 2^b levels.
//!
//! # Non-finite input
//! Rule: NaN and ±Inf are encoded as 0 (before and after the rotation), so the row scale is
//! always finite and a bad value only costs its own row some precision; other rows are never
//! touched. Rows whose magnitude exceeds f32 range after rotation are also zeroed value by
//! value. The attention kernels read non-finite values of f16 rows as 0 too (see `attn`).
#![forbid(unsafe_code)]

pub(crate) mod quant;
mod rotate;

pub use rotate::{block_len, rotate, unrotate, MAX_HEAD_DIM};

/// The packed row layout, for kernels that decode rows themselves (SIMD, CUDA). See the
/// table at the top of `quant.rs`: `[bf16 row scale][int8 multiplier per group][codes]`.
pub mod layout {
    pub use super::quant::{group_code_bytes, row_bytes, row_scale, GROUP, HEADER};
}

/// Values per quantization group.
pub const GROUP: usize = quant::GROUP;

/// Bit width of one K or V code. Every width has an AVX-512 row decoder; on AVX2, 7, 6 and 5
/// bits (used by per-layer profiles, see [`crate::profile`]) take the generic body of
/// `quant.rs`, and the VNNI decode kernel takes K and V at every width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quant {
    /// 8-bit codes.
    Q8,
    /// 7-bit codes.
    Q7,
    /// 6-bit codes.
    Q6,
    /// 5-bit codes.
    Q5,
    /// 4-bit codes.
    Q4,
    /// 3-bit codes.
    Q3,
    /// 2-bit codes.
    Q2,
}

impl Quant {
    /// Every width, widest first.
    pub const ALL: [Quant; 7] = [Quant::Q8, Quant::Q7, Quant::Q6, Quant::Q5, Quant::Q4, Quant::Q3, Quant::Q2];

    /// Bits per code (metadata excluded; see [`RowCodec::bits_per_elem`] for the true figure).
    #[must_use]
    pub const fn bits(self) -> u32 {
        match self {
            Quant::Q8 => 8,
            Quant::Q7 => 7,
            Quant::Q6 => 6,
            Quant::Q5 => 5,
            Quant::Q4 => 4,
            Quant::Q3 => 3,
            Quant::Q2 => 2,
        }
    }

    /// The quant with `bits` bits per code.
    ///
    /// # Errors
    /// If `bits` is not in 2..=8.
    pub fn from_bits(bits: u32) -> Result<Quant, String> {
        Quant::ALL.into_iter().find(|q| q.bits() == bits).ok_or_else(|| format!("unsupported code width {bits} (use 2 to 8)"))
    }
}

/// A K/V format: independent bit widths for K and V, named like `k4v3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Format {
    /// Bits of K codes.
    pub k: Quant,
    /// Bits of V codes.
    pub v: Quant,
}

impl Format {
    /// Recommended presets, most to least accurate. k8v8: near-lossless; k8v4: K kept precise
    /// (K is the fragile side); k4v4: the q4_0 replacement, better error at fewer bits; k4v3:
    /// ~3.9 bits; k4v2: most compression that keeps K at 4 bits (pair it with f16 sinks and a
    /// recent window). Symmetric 3- and 2-bit K is known to break some model families, so no
    /// preset has K below 4 bits; the parser still accepts every `k<b>v<b>` with b in 2..=8.
    pub const ALL_PRESETS: [Format; 5] = [
        Format { k: Quant::Q8, v: Quant::Q8 },
        Format { k: Quant::Q8, v: Quant::Q4 },
        Format { k: Quant::Q4, v: Quant::Q4 },
        Format { k: Quant::Q4, v: Quant::Q3 },
        Format { k: Quant::Q4, v: Quant::Q2 },
    ];

    /// Parses a name like `k4v3`: exactly `k<b>v<b>` with each `<b>` one digit from 2 to 8,
    /// lowercase, nothing around it (no spaces, signs or leading zeros), so that a name is
    /// accepted if and only if it is some format's [`Format::name`].
    ///
    /// # Errors
    /// If the name is not `k<b>v<b>` with b in 2..=8.
    pub fn parse(name: &str) -> Result<Format, String> {
        let bad = || format!("bad KV format {name:?}: expected k<b>v<b> with b from 2 to 8, in lowercase, e.g. k4v4");
        // One byte per width: from_bits accepts 2..=8 and refuses every other byte.
        let width = |c: &u8| Quant::from_bits(u32::from(c.wrapping_sub(b'0'))).map_err(|_| bad());
        match name.as_bytes() {
            [b'k', k, b'v', v] => Ok(Format { k: width(k)?, v: width(v)? }),
            _ => Err(bad()),
        }
    }

    /// The canonical name, e.g. `k4v3`.
    #[must_use]
    pub fn name(&self) -> String {
        format!("k{}v{}", self.k.bits(), self.v.bits())
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        Format::parse(s)
    }
}

/// Encoder/decoder of one head row (`head_dim` values) in one [`Quant`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowCodec {
    quant: Quant,
    head_dim: usize,
}

impl RowCodec {
    /// A codec for rows of `head_dim` values.
    ///
    /// # Errors
    /// If `head_dim` is not a multiple of 32 in `32..=MAX_HEAD_DIM`.
    pub fn new(quant: Quant, head_dim: usize) -> Result<RowCodec, String> {
        if head_dim == 0 || head_dim % GROUP != 0 || head_dim > MAX_HEAD_DIM {
            return Err(format!(
                "head_dim {head_dim} is not a multiple of {GROUP} in {GROUP}..={MAX_HEAD_DIM}"
            ));
        }
        Ok(RowCodec { quant, head_dim })
    }

    /// The codec of a page's centroid: the row that the rows of a centred page are stored
    /// relative to (8-bit codes, so that its own error is small next to the rows').
    ///
    /// # Panics
    /// If `head_dim` is not one a codec accepts (callers hold a codec of that size).
    #[must_use]
    pub fn centroid(head_dim: usize) -> RowCodec {
        RowCodec::new(Quant::Q8, head_dim).expect("centroid of a valid head size")
    }

    /// The code width.
    #[must_use]
    pub fn quant(&self) -> Quant {
        self.quant
    }

    /// Values per row.
    #[must_use]
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Bytes per encoded row.
    #[must_use]
    pub fn row_bytes(&self) -> usize {
        quant::row_bytes(self.quant.bits(), self.head_dim)
    }

    /// True bits per value, row scale and group multipliers included.
    #[must_use]
    #[allow(clippy::cast_precision_loss)]
    pub fn bits_per_elem(&self) -> f64 {
        (self.row_bytes() * 8) as f64 / self.head_dim as f64
    }

    /// Rotates and encodes one row. Non-finite values are encoded as 0.
    ///
    /// # Panics
    /// If `x.len() != head_dim` or `out.len() != row_bytes()`.
    pub fn encode(&self, x: &[f32], out: &mut [u8]) {
        self.encode_impl(x, out, true);
    }

    /// `encode` without the per-group MSE search (plain absmax steps). Only for measuring
    /// what the search buys; rows it writes decode with [`RowCodec::decode`] as usual.
    #[doc(hidden)]
    pub fn encode_absmax(&self, x: &[f32], out: &mut [u8]) {
        self.encode_impl(x, out, false);
    }

    fn encode_impl(&self, x: &[f32], out: &mut [u8], search: bool) {
        assert_eq!(x.len(), self.head_dim, "RowCodec::encode: row length");
        assert_eq!(out.len(), self.row_bytes(), "RowCodec::encode: out length");
        with_row(self.head_dim, |y| {
            for (d, &s) in y.iter_mut().zip(x) {
                *d = if s.is_finite() { s } else { 0.0 };
            }
            rotate(y);
            for v in y.iter_mut() {
                if !v.is_finite() {
                    *v = 0.0;
                }
            }
            quant::encode_rotated(self.quant.bits(), y, out, search);
        });
    }

    /// Encodes a row that is already in the rotated space. Non-finite values are encoded as 0.
    ///
    /// # Panics
    /// If `y.len() != head_dim` or `out.len() != row_bytes()`.
    pub fn encode_rotated(&self, y: &[f32], out: &mut [u8]) {
        assert_eq!(y.len(), self.head_dim, "RowCodec::encode_rotated: row length");
        assert_eq!(out.len(), self.row_bytes(), "RowCodec::encode_rotated: out length");
        if y.iter().all(|v| v.is_finite()) {
            quant::encode_rotated(self.quant.bits(), y, out, true);
        } else {
            with_row(self.head_dim, |clean| {
                for (d, &s) in clean.iter_mut().zip(y) {
                    *d = if s.is_finite() { s } else { 0.0 };
                }
                quant::encode_rotated(self.quant.bits(), clean, out, true);
            });
        }
    }

    /// Decodes one row back to the model's (unrotated) space.
    ///
    /// # Panics
    /// If `data.len() != row_bytes()` or `out.len() != head_dim`.
    pub fn decode(&self, data: &[u8], out: &mut [f32]) {
        self.decode_rotated(data, out);
        unrotate(out);
    }

    /// Decodes one row into the rotated space (no inverse rotation).
    ///
    /// # Panics
    /// If `data.len() != row_bytes()` or `out.len() != head_dim`.
    pub fn decode_rotated(&self, data: &[u8], out: &mut [f32]) {
        assert_eq!(data.len(), self.row_bytes(), "RowCodec::decode: data length");
        assert_eq!(out.len(), self.head_dim, "RowCodec::decode: out length");
        self.decode_rotated_inline(data, out);
    }

    /// Encodes `n` consecutive rows (`x.len() == n·head_dim`, `out.len() == n·row_bytes()`).
    ///
    /// # Panics
    /// If the lengths do not describe the same number of rows.
    pub fn encode_rows(&self, x: &[f32], out: &mut [u8]) {
        let n = x.len() / self.head_dim;
        assert_eq!(x.len(), n * self.head_dim, "RowCodec::encode_rows: x length");
        assert_eq!(out.len(), n * self.row_bytes(), "RowCodec::encode_rows: out length");
        for (r, o) in x.chunks_exact(self.head_dim).zip(out.chunks_exact_mut(self.row_bytes())) {
            self.encode(r, o);
        }
    }

    /// Decodes `n` consecutive rows to the model's space.
    ///
    /// # Panics
    /// If the lengths do not describe the same number of rows.
    pub fn decode_rows(&self, data: &[u8], out: &mut [f32]) {
        let n = out.len() / self.head_dim;
        assert_eq!(out.len(), n * self.head_dim, "RowCodec::decode_rows: out length");
        assert_eq!(data.len(), n * self.row_bytes(), "RowCodec::decode_rows: data length");
        for (d, o) in data.chunks_exact(self.row_bytes()).zip(out.chunks_exact_mut(self.head_dim)) {
            self.decode(d, o);
        }
    }

    /// The row-decoding body for kernels that instantiate it under their own target features.
    #[doc(hidden)]
    #[inline(always)]
    pub fn decode_rotated_inline(&self, data: &[u8], out: &mut [f32]) {
        match self.quant {
            Quant::Q8 => quant::decode_rotated_body::<8>(data, out),
            Quant::Q7 => quant::decode_rotated_body::<7>(data, out),
            Quant::Q6 => quant::decode_rotated_body::<6>(data, out),
            Quant::Q5 => quant::decode_rotated_body::<5>(data, out),
            Quant::Q4 => quant::decode_rotated_body::<4>(data, out),
            Quant::Q3 => quant::decode_rotated_body::<3>(data, out),
            Quant::Q2 => quant::decode_rotated_body::<2>(data, out),
        }
    }
}

/// Runs `f` on a zeroed scratch row of `n` values: on the stack up to 256 values (the head
/// sizes of the models DSpark meets), on the heap beyond. A `[f32; MAX_HEAD_DIM]` on the stack
/// cost a 16 KiB memset for every encoded row.
fn with_row<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    const STACK: usize = 256;
    if n <= STACK {
        f(&mut [0.0f32; STACK][..n])
    } else {
        f(&mut vec![0.0f32; n])
    }
}
