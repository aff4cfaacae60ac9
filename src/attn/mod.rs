//! Flash attention over K/V rows that are partly f16 and partly compressed by [`crate::codec`].
//!
//! Semantics are those of ggml's `GGML_OP_FLASH_ATTN_EXT` on the CPU (ggml-cpu/ops.cpp,
//! `ggml_compute_forward_flash_attn_ext_f16_one_chunk`), for one sequence:
//! - score `s = dot(q, k) · scale`; with `softcap != 0`: `s = softcap · tanh(dot · scale / softcap)`;
//! - then `s += slope_h · mask[i, c]`, where `slope_h` is ggml's ALiBi slope (1 when
//!   `max_bias == 0`), and a mask value of −∞ drops the cell (its K and V are never read as
//!   numbers);
//! - `out = Σ e^{s−M} v / (Σ e^{s−M} + e^{sink_h−M})`: the per-head sink enters only the
//!   denominator; a row with every cell dropped (and no sink) gives 0.
//!
//! Differences from ggml, all deliberate: q is never rounded to f16, accumulation is f32
//! everywhere (ggml keeps an f16 accumulator for f16 V), and non-finite K/V values in f16
//! rows are read as 0, the same rule the codec applies when it encodes
//! (see [`crate::codec`]), so a NaN in one row never spreads to other rows or other queries.
//! Like ggml with a quantized K type (whose `vec_dot` takes q as q8_0), packed K rows are
//! scored against the int8 image of the query: rotated, then rounded per group of 32 with
//! step `max|x|/127`, on every instruction set ([`flash_attn_reference_int8q`] is the exact
//! oracle of that; the error it adds is measured in `benches/RESULTS.md`). f16 rows use the
//! f32 query.
//!
//! [`flash_attn_reference`] is the scalar oracle (decompress, then attend in f64).
//! [`flash_attn`] is the fast path: q is rotated once per head for packed K, packed rows are
//! decoded tile by tile into L1 and consumed at once (no row is materialised in memory), V
//! is accumulated in the rotated space for packed V and un-rotated once per output row,
//! every K/V tile is used by all query heads of its KV head (GQA) and by a tile of queries
//! (prefill), and long sequences are split across threads with a log-sum-exp merge. On
//! AVX-512 VNNI, decode over packed rows runs the integer kernel of `x86_decode.rs` instead
//! of the tiles (16 rows per score vector, `vpdpbusd`, V accumulated from its codes). Kernels
//! are chosen at run time: AVX-512 (+VNNI), AVX2+FMA, or portable (`DSPARK_FORCE_ISA` pins one).

mod fast;
mod isa;
mod kernels;
mod pool;
pub use fast::Scratch;
pub use pool::{Executor, Threads, Workers};
mod reference;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_decode;

use crate::codec::RowCodec;
use half::f16;

pub use isa::{active_isa, available_isas};
pub(crate) use fast::prefetch;

/// K or V rows of one segment, for one KV head.
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    /// `n × head_dim` f16 values in the model's (unrotated) space.
    F16(&'a [f16]),
    /// `n × row_bytes` bytes written by `codec.encode`.
    Packed {
        /// The codec that wrote the rows.
        codec: &'a RowCodec,
        /// The encoded rows, back to back.
        data: &'a [u8],
        /// A row that every row is relative to: row `i` is `decode(data_i) + decode(center)`.
        /// It is written by the 8-bit codec of the same head size ([`RowCodec::centroid`]).
        center: Option<&'a [u8]>,
    },
}

impl Rows<'_> {
    /// Number of rows held, given the head dimension.
    #[must_use]
    pub fn len(&self, head_dim: usize) -> usize {
        match self {
            Rows::F16(v) => v.len() / head_dim.max(1),
            Rows::Packed { codec, data, .. } => data.len() / codec.row_bytes(),
        }
    }

    /// Whether there are no rows.
    #[must_use]
    pub fn is_empty(&self, head_dim: usize) -> bool {
        self.len(head_dim) == 0
    }

    /// Rows `skip..skip + n`.
    #[must_use]
    pub fn slice(&self, skip: usize, n: usize, head_dim: usize) -> Self {
        match *self {
            Rows::F16(v) => Rows::F16(&v[skip * head_dim..][..n * head_dim]),
            Rows::Packed { codec, data, center } => {
                let rb = codec.row_bytes();
                Rows::Packed { codec, data: &data[skip * rb..][..n * rb], center }
            }
        }
    }
}

/// A run of `n` consecutive cells (`first_cell..first_cell + n`) of one KV head.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// Cell index of the first row; it selects the mask column.
    pub first_cell: usize,
    /// Number of rows.
    pub n: usize,
    /// Keys.
    pub k: Rows<'a>,
    /// Values.
    pub v: Rows<'a>,
}

/// The scalar parameters of `GGML_OP_FLASH_ATTN_EXT`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaParams {
    /// Multiplies `dot(q, k)`.
    pub scale: f32,
    /// ALiBi maximum bias; 0 disables ALiBi.
    pub max_bias: f32,
    /// Logit soft-capping; 0 disables it.
    pub softcap: f32,
}

/// An f16 mask shared by all heads: query `i`, cell `c` reads `data[i * stride + c]`.
#[derive(Clone, Copy, Debug)]
pub struct Mask<'a> {
    /// Mask values (0 keeps, −∞ drops, anything else is added to the score after `slope·`).
    pub data: &'a [f16],
    /// Distance between the rows of two consecutive queries (ggml's `ne0`, the KV length).
    pub stride: usize,
}

impl Mask<'_> {
    /// Whether one of the first `rows` queries sees a cell of `cells`: its value there is
    /// not −∞. The last rows are tried first: in a causal mask they see the most, so a
    /// prefill's visible pages are found at the first row instead of after a scan of the
    /// rows that precede them (which cost a prefill of 512 tokens ~1% of its time).
    #[inline]
    pub fn sees(&self, rows: usize, cells: std::ops::Range<usize>) -> bool {
        let minus_inf = f16::NEG_INFINITY.to_bits();
        (0..rows).rev().any(|i| self.data[i * self.stride..][cells.clone()].iter().any(|x| x.to_bits() != minus_inf))
    }

    /// One past the last of the first `n` cells that one of the first `rows` queries sees
    /// (0 when none is seen). llama.cpp pads the KV a graph reads to a multiple of 256 cells
    /// with masked ones; attention reads only the cells before this end. Rows are scanned from
    /// the last, each only beyond the end found so far, 32 cells at a time.
    pub fn visible_end(&self, rows: usize, n: usize) -> usize {
        const STEP: usize = 32;
        let minus_inf = f16::NEG_INFINITY.to_bits();
        let mut end = 0;
        for i in (0..rows).rev() {
            let row = &self.data[i * self.stride..][..n];
            let mut hi = n;
            while hi > end {
                let lo = hi.saturating_sub(STEP).max(end);
                // A fold, not `any`: without the early exit it vectorizes.
                if row[lo..hi].iter().fold(false, |seen, x| seen | (x.to_bits() != minus_inf)) {
                    end = lo + 1 + row[lo..hi].iter().rposition(|x| x.to_bits() != minus_inf).unwrap_or(0);
                    break;
                }
                hi = lo;
            }
            if end == n {
                break;
            }
        }
        end
    }
}

/// ggml's ALiBi slope for head `h` of `n_head` (ops.cpp: `m0^(h+1)` or `m1^(2(h−n2)+1)`).
#[must_use]
pub fn alibi_slope(max_bias: f32, h: usize, n_head: usize) -> f32 {
    if max_bias <= 0.0 {
        return 1.0;
    }
    let n2 = 1u32 << (usize::BITS - 1 - n_head.leading_zeros());
    #[allow(clippy::cast_precision_loss)]
    let n2f = n2 as f32;
    let m0 = 2f32.powf(-max_bias / n2f);
    let m1 = 2f32.powf(-(max_bias / 2.0) / n2f);
    let h = u32::try_from(h).expect("head index fits u32");
    #[allow(clippy::cast_possible_wrap)]
    if h < n2 {
        m0.powi((h + 1) as i32)
    } else {
        m1.powi((2 * (h - n2) + 1) as i32)
    }
}

/// Everything [`flash_attn`] reads, checked once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Problem<'a, 'b> {
    pub q: &'b [f32],
    pub n_q: usize,
    pub n_head: usize,
    pub d: usize,
    pub kv: &'b [Vec<Segment<'a>>],
    pub mask: Option<Mask<'b>>,
    pub sinks: Option<&'b [f32]>,
    pub p: FaParams,
}

impl Problem<'_, '_> {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_head / self.kv.len()
    }

    /// Panics with a precise message if the inputs do not fit together.
    fn validate(&self, out_len: usize) {
        let (d, kv) = (self.d, self.kv);
        assert!(d > 0 && d % 32 == 0, "flash_attn: head_dim {d} must be a positive multiple of 32");
        assert!(!kv.is_empty(), "flash_attn: no KV heads");
        assert!(
            self.n_head % kv.len() == 0,
            "flash_attn: n_head {} is not a multiple of n_kv_head {}",
            self.n_head,
            kv.len()
        );
        let rows = self.n_q * self.n_head * d;
        assert_eq!(self.q.len(), rows, "flash_attn: q length");
        assert_eq!(out_len, rows, "flash_attn: out length");
        if let Some(s) = self.sinks {
            assert_eq!(s.len(), self.n_head, "flash_attn: sinks length");
        }
        let mut max_cell = 0;
        for seg in kv.iter().flatten() {
            for (what, r) in [("k", seg.k), ("v", seg.v)] {
                match r {
                    Rows::F16(v) => assert_eq!(v.len(), seg.n * d, "flash_attn: f16 {what} length"),
                    Rows::Packed { codec, data, center } => {
                        assert_eq!(codec.head_dim(), d, "flash_attn: codec head_dim");
                        assert_eq!(data.len(), seg.n * codec.row_bytes(), "flash_attn: packed {what} length");
                        if let Some(c) = center {
                            assert_eq!(c.len(), RowCodec::centroid(d).row_bytes(), "flash_attn: {what} center length");
                        }
                    }
                }
            }
            max_cell = max_cell.max(seg.first_cell + seg.n);
        }
        if let Some(m) = self.mask {
            if self.n_q > 0 && max_cell > 0 {
                assert!(m.stride >= max_cell, "flash_attn: mask stride {} < cells {max_cell}", m.stride);
                assert!(
                    m.data.len() >= (self.n_q - 1) * m.stride + max_cell,
                    "flash_attn: mask too short"
                );
            }
        }
    }
}

/// Fast flash attention (see the module docs for the semantics).
///
/// `q` and `out` are `[n_q][n_head][head_dim]`; `kv[kh]` lists the segments of KV head `kh`,
/// and query head `h` reads KV head `h / (n_head / kv.len())`. It runs on `threads` (a share
/// of the caller's [`Workers`], or [`Threads::serial`]).
///
/// # Panics
/// If the lengths do not match the shapes, `head_dim` is not a multiple of 32, or `n_head`
/// is not a multiple of `kv.len()`.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn(
    q: &[f32],
    n_q: usize,
    n_head: usize,
    head_dim: usize,
    kv: &[Vec<Segment>],
    mask: Option<Mask>,
    sinks: Option<&[f32]>,
    p: &FaParams,
    threads: Threads,
    out: &mut [f32],
) {
    flash_attn_in(&mut Scratch::default(), q, n_q, n_head, head_dim, kv, mask, sinks, p, threads, out);
}

/// [`flash_attn`] with its query buffers taken from, and returned to, `scratch`: a caller
/// that runs attention over and over (a backend, layer after layer) keeps one.
///
/// # Panics
/// As [`flash_attn`].
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_in(
    scratch: &mut Scratch,
    q: &[f32],
    n_q: usize,
    n_head: usize,
    head_dim: usize,
    kv: &[Vec<Segment>],
    mask: Option<Mask>,
    sinks: Option<&[f32]>,
    p: &FaParams,
    threads: Threads,
    out: &mut [f32],
) {
    let prob = Problem { q, n_q, n_head, d: head_dim, kv, mask, sinks, p: *p };
    prob.validate(out.len());
    fast::run(&prob, isa::kernels(), threads, out, scratch);
}

/// [`flash_attn`] on a named kernel set (see [`available_isas`]), for tests and benches.
///
/// # Panics
/// As [`flash_attn`], or if this CPU cannot run `isa`.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_isa(
    isa: &str,
    q: &[f32],
    n_q: usize,
    n_head: usize,
    head_dim: usize,
    kv: &[Vec<Segment>],
    mask: Option<Mask>,
    sinks: Option<&[f32]>,
    p: &FaParams,
    threads: Threads,
    out: &mut [f32],
) {
    let kernels = isa::by_name(isa).unwrap_or_else(|| panic!("flash_attn_isa: {isa} not available"));
    let prob = Problem { q, n_q, n_head, d: head_dim, kv, mask, sinks, p: *p };
    prob.validate(out.len());
    fast::run(&prob, &kernels, threads, out, &mut Scratch::default());
}

/// The scalar oracle: decompresses every row, then attends with f64 accumulation.
/// Same signature and semantics as [`flash_attn`]; it runs on the calling thread.
///
/// # Panics
/// As [`flash_attn`].
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_reference(
    q: &[f32],
    n_q: usize,
    n_head: usize,
    head_dim: usize,
    kv: &[Vec<Segment>],
    mask: Option<Mask>,
    sinks: Option<&[f32]>,
    p: &FaParams,
    _threads: Threads,
    out: &mut [f32],
) {
    let prob = Problem { q, n_q, n_head, d: head_dim, kv, mask, sinks, p: *p };
    prob.validate(out.len());
    reference::run(&prob, out, false);
}

/// The scalar oracle of what [`flash_attn`] computes: as [`flash_attn_reference`], except
/// that packed K rows are scored against the int8 image of the query, as every kernel set
/// does: the query is scaled (`scale`, ÷ `softcap` when softcapping), rotated, and rounded
/// per group of 32 to `q8 · step` with `step = max|x| / 127` (ggml's q8_0 rule); the score is
/// `dot(q8 · step, k_rotated)`. f16 rows, and every row when a query value is not finite,
/// use the exact query.
///
/// # Panics
/// As [`flash_attn`].
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_reference_int8q(
    q: &[f32],
    n_q: usize,
    n_head: usize,
    head_dim: usize,
    kv: &[Vec<Segment>],
    mask: Option<Mask>,
    sinks: Option<&[f32]>,
    p: &FaParams,
    _threads: Threads,
    out: &mut [f32],
) {
    let prob = Problem { q, n_q, n_head, d: head_dim, kv, mask, sinks, p: *p };
    prob.validate(out.len());
    reference::run(&prob, out, true);
}
