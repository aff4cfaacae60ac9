//! Query-aware page selection: the cells a decode query reads.
//!
//! Each compressed page of a K store keeps, per KV head and per block of [`BLOCK`] cells, a
//! digest of its keys: per channel the mean `c` and the mean absolute deviation `r`, in the
//! model's (unrotated, post-RoPE) space, as 8-bit codes. A query `q` scores a block
//! `q·c + Σ|q_i|·r_i`: the highest score of a key inside the box `c ± r` (ArkVale's
//! "cuboid-mean"). Measured against the alternatives on the default model (`dspark eval
//! --decode`, ctx 8192, attn=2048; dense k4v4 0.0122 KLD): this digest 0.0292, Quest's
//! min/max box (a true bound) 0.0390, mean and standard deviation scored as the log of a
//! Gaussian's expected attention mass 0.0344, all with 64-cell blocks. The box bound is loose
//! because one outlying key widens a channel's range for the whole block, so it ranks blocks by
//! spread rather than relevance. The digest lives in the unrotated space because the codec's
//! Hadamard rotation makes keys near-isotropic, which makes boxes loose and alike.
//!
//! Each page also keeps the same summary of all its cells, so that ranking is two-level: pages
//! first, then the blocks of the best pages ([`REFINE`]).
//!
//! A decode call (at most [`MAX_QUERY_ROWS`] query rows) then reads, per KV head: the
//! stream's sink page, every f16 page (the recent window), every page without a digest, and
//! the best-scoring blocks until the attention budget is spent; the other cells are not read
//! at all. Blocks no query row can see (the mask holds −∞ for all their cells) are skipped, as
//! they add nothing. When everything visible fits the budget the call stays dense, exactly as
//! without selection.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use half::f16;

use super::PAGE;

/// Calls with more query rows than this (prefill) are always dense.
pub const MAX_QUERY_ROWS: usize = 8;

/// Cells per digest: the unit of selection.
pub const BLOCK: usize = 16;

/// Bytes of one block's digest for one head: `d` centers as i8 and `d` radii as u8, each
/// with an f32 step.
pub fn block_bytes(d: usize) -> usize {
    2 * d + 8
}

/// Summaries per head in a page's digest: one per block, then one of the whole page.
const PER_HEAD: usize = PAGE / BLOCK + 1;

/// Pages are ranked by their whole-page summary first, and only the blocks of the best pages,
/// holding `REFINE` times the attention budget, are ranked by their own: at depth 32768 and
/// budget 2048 this scores 2304 summaries per layer where ranking every block scored 6144
/// (see `benches/select.rs`), for 0.001 more KLD (`dspark eval --decode`, ctx 8192).
pub const REFINE: usize = 2;

/// Bytes of one page's digest: per head, [`block_bytes`] for each block and the page.
pub fn digest_len(n_head: usize, d: usize) -> usize {
    n_head * PER_HEAD * block_bytes(d)
}

/// Block `b`'s summary for head `h` in a page's digest.
pub fn block_digest(g: &[u8], h: usize, b: usize, d: usize) -> &[u8] {
    &g[(h * PER_HEAD + b) * block_bytes(d)..][..block_bytes(d)]
}

/// The whole page's summary for head `h` in a page's digest.
pub fn page_digest(g: &[u8], h: usize, d: usize) -> &[u8] {
    block_digest(g, h, PAGE / BLOCK, d)
}

/// The digest of one page's keys, `rows` laid out `[head][slot][d]` (the f16 page): per head,
/// the summary of each block of [`BLOCK`] rows, then of all [`PAGE`] rows.
pub fn digest(rows: &[f16], n_head: usize, d: usize) -> Box<[u8]> {
    let mut out = vec![0u8; digest_len(n_head, d)].into_boxed_slice();
    let bb = block_bytes(d);
    for (head, dst) in rows.chunks_exact(PAGE * d).zip(out.chunks_exact_mut(PER_HEAD * bb)) {
        let (blocks, page) = dst.split_at_mut((PER_HEAD - 1) * bb);
        for (block, dst) in head.chunks_exact(BLOCK * d).zip(blocks.chunks_exact_mut(bb)) {
            summarize(block, d, dst);
        }
        summarize(head, d, page);
    }
    out
}

/// The mean and mean absolute deviation per channel of `rows` (`[n][d]`), as 8-bit codes with
/// a step each ([`block_bytes`] bytes into `dst`).
fn summarize(rows: &[f16], d: usize, dst: &mut [u8]) {
    let n = (rows.len() / d) as f32;
    let mut mean = vec![0.0f32; d];
    let mut dev = vec![0.0f32; d];
    for row in rows.chunks_exact(d) {
        mean.iter_mut().zip(row).for_each(|(m, x)| *m += x.to_f32());
    }
    mean.iter_mut().for_each(|m| *m /= n);
    for row in rows.chunks_exact(d) {
        dev.iter_mut().zip(row).zip(&mean).for_each(|((r, x), m)| *r += (x.to_f32() - m).abs() / n);
    }
    let (codes, steps) = dst.split_at_mut(2 * d);
    let (center, radius) = codes.split_at_mut(d);
    // 8 bits keep the ranking: the steps are 1/127 and 1/255 of the largest channel.
    let c_step = mean.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
    let r_step = dev.iter().fold(0.0f32, |m, &x| m.max(x)) / 255.0;
    let code = |x: f32, step: f32| if step > 0.0 { (x / step).round() } else { 0.0 };
    center.iter_mut().zip(&mean).for_each(|(o, &m)| *o = code(m, c_step) as i8 as u8);
    radius.iter_mut().zip(&dev).for_each(|(o, &r)| *o = code(r, r_step) as u8);
    steps[..4].copy_from_slice(&c_step.to_le_bytes());
    steps[4..].copy_from_slice(&r_step.to_le_bytes());
}

/// The steps of one block's digest.
fn steps(block: &[u8], d: usize) -> (f32, f32) {
    let step = |i: usize| f32::from_le_bytes(block[2 * d + 4 * i..][..4].try_into().expect("4 bytes"));
    (step(0), step(1))
}

/// One block's digest for one head ([`block_bytes`] bytes) as `d` centers then `d` radii.
pub fn unpack(block: &[u8], d: usize, out: &mut [f32]) {
    let (c_step, r_step) = steps(block, d);
    let (center, radius) = out.split_at_mut(d);
    center.iter_mut().zip(&block[..d]).for_each(|(o, &x)| *o = f32::from(x as i8) * c_step);
    radius.iter_mut().zip(&block[d..2 * d]).for_each(|(o, &x)| *o = f32::from(x) * r_step);
}

/// One KV head's query rows (its GQA group) and their absolute values, for scoring digests.
pub struct Query {
    d: usize,
    q: Vec<f32>,
    q_abs: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    avx512: bool,
}

impl Query {
    /// `q` holds the rows `[n][d]` (vector code for `d` a multiple of 16).
    pub fn new(q: &[f32], d: usize) -> Query {
        let q_abs = q.iter().map(|x| x.abs()).collect();
        #[cfg(target_arch = "x86_64")]
        let avx512 = is_x86_feature_detected!("avx512f") && d.is_multiple_of(16);
        Query {
            d,
            q: q.to_vec(),
            q_abs,
            #[cfg(target_arch = "x86_64")]
            avx512,
        }
    }

    /// The score of one summary for one head ([`block_bytes`] bytes): the largest over the
    /// rows of `q·c + Σ|q_i|·r_i`.
    pub fn score(&self, block: &[u8]) -> f32 {
        let d = self.d;
        let (c_step, r_step) = steps(block, d);
        let (c, r) = (&block[..d], &block[d..2 * d]);
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            // SAFETY: `avx512` is set only where the CPU has AVX-512F (detected at run time).
            return unsafe { x86::score_avx512(&self.q, &self.q_abs, c, r, c_step, r_step) };
        }
        let rows = self.q.chunks_exact(d).zip(self.q_abs.chunks_exact(d));
        rows.map(|(q, qa)| dot(q, qa, c, r, c_step, r_step)).fold(f32::NEG_INFINITY, f32::max)
    }
}

/// `c_step · Σ q_i c_i + r_step · Σ |q_i| r_i` over the codes: the portable scorer, and the
/// specification of the vector one (`tests::the_vector_scorer_matches_the_portable_one`).
fn dot(q: &[f32], q_abs: &[f32], c: &[u8], r: &[u8], c_step: f32, r_step: f32) -> f32 {
    let (mut sc, mut sr) = (0.0f32, 0.0f32);
    for (((q, qa), &c), &r) in q.iter().zip(q_abs).zip(c).zip(r) {
        sc += q * f32::from(c as i8);
        sr += qa * f32::from(r);
    }
    c_step * sc + r_step * sr
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::dot`] of each row of `q` (`[n][d]`, `d = c.len()`, a multiple of 16), the
    /// largest. Every candidate summary of a layer is scored for each decoded token: the
    /// codes are widened 16 at a time and each row's products kept in 16 lanes, summed once
    /// per row (the compiler's own vectorization of the portable loop kept a 16-add chain and
    /// ran at ~130 cycles per summary at head size 64).
    #[target_feature(enable = "avx512f")]
    pub fn score_avx512(q: &[f32], q_abs: &[f32], c: &[u8], r: &[u8], c_step: f32, r_step: f32) -> f32 {
        let d = c.len();
        assert!(d.is_multiple_of(16) && r.len() == d && q.len() == q_abs.len() && q.len().is_multiple_of(d), "score_avx512: shapes");
        let (cs, rs) = (_mm512_set1_ps(c_step), _mm512_set1_ps(r_step));
        let mut best = f32::NEG_INFINITY;
        for (q, qa) in q.chunks_exact(d).zip(q_abs.chunks_exact(d)) {
            // Two sums, so that the products do not wait on each other.
            let (mut ac, mut ar) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for k in (0..d).step_by(16) {
                // SAFETY: k + 16 <= d, and c, r, q and qa each hold d values (asserted).
                unsafe {
                    let cv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c.as_ptr().add(k).cast())));
                    let rv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(r.as_ptr().add(k).cast())));
                    ac = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(k)), cv, ac);
                    ar = _mm512_fmadd_ps(_mm512_loadu_ps(qa.as_ptr().add(k)), rv, ar);
                }
            }
            best = best.max(_mm512_reduce_add_ps(_mm512_fmadd_ps(ac, cs, _mm512_mul_ps(ar, rs))));
        }
        best
    }
}

/// What a block of cells is to a selection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PageKind {
    /// Never read: no query row can see a cell of it.
    Hidden,
    /// Always read: blocks of the sink page, of f16 pages, of pages without a digest, and
    /// blocks cut by the range.
    Always,
    /// Read if its score ranks within the budget.
    Candidate,
}

/// Per KV head, the cell ranges to read (relative to the range's first cell, merged where
/// adjacent), or `None` when everything visible fits in `budget` cells (a dense call).
///
/// `blocks[i]` is the kind of the `i`-th block of [`BLOCK`] cells overlapping `cells` (the
/// range's cells, counted from the stream's cell 0), and `scores[h][i]` its score for KV head
/// `h` (read for candidates only; a candidate scored −∞, whose page ranked out, is never
/// picked).
pub fn choose(cells: Range<usize>, blocks: &[PageKind], scores: &[Vec<f32>], budget: usize) -> Option<Vec<Vec<Range<usize>>>> {
    let first_block = cells.start / BLOCK;
    let span = |i: usize| {
        let b = first_block + i;
        (b * BLOCK).max(cells.start)..((b + 1) * BLOCK).min(cells.end)
    };
    let count = |k: PageKind| blocks.iter().enumerate().filter(|(_, &x)| x == k).map(|(i, _)| span(i).len()).sum::<usize>();
    let always = count(PageKind::Always);
    if always + count(PageKind::Candidate) <= budget {
        return None;
    }
    let picks = budget.saturating_sub(always) / BLOCK;
    let ranges = scores
        .iter()
        .map(|score| {
            let mut cand: Vec<usize> = (0..blocks.len()).filter(|&i| blocks[i] == PageKind::Candidate && score[i] != f32::NEG_INFINITY).collect();
            if picks < cand.len() {
                cand.select_nth_unstable_by(picks, |&a, &b| score[b].total_cmp(&score[a]));
                cand.truncate(picks);
            }
            let mut read: Vec<usize> = (0..blocks.len()).filter(|&i| blocks[i] == PageKind::Always).chain(cand).collect();
            read.sort_unstable();
            merge(read.into_iter().map(span).map(|r| r.start - cells.start..r.end - cells.start))
        })
        .collect();
    Some(ranges)
}

/// Merges ranges sorted by their start that touch or overlap.
pub fn merge(ranges: impl Iterator<Item = Range<usize>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// What decode calls read, for the statistics.
#[derive(Default, Debug)]
pub struct Counters {
    /// (decode call, KV head) pairs.
    pub decode_head_calls: AtomicU64,
    /// Cells those pairs read.
    pub attended_cells: AtomicU64,
    /// Time spent selecting, ns.
    pub select_ns: AtomicU64,
}

impl Counters {
    /// Counts one decode call of `heads` KV heads that read `cells` cells in all.
    pub fn add(&self, took: Duration, cells: usize, heads: usize) {
        self.decode_head_calls.fetch_add(heads as u64, Ordering::Relaxed);
        self.attended_cells.fetch_add(cells as u64, Ordering::Relaxed);
        self.select_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        }
    }

    #[test]
    fn the_digest_holds_each_blocks_and_pages_mean_and_mean_absolute_deviation() {
        let (nh, d) = (2, 64);
        let mut rnd = rng(7);
        let rows: Vec<f16> = (0..nh * PAGE * d).map(|i| f16::from_f32(3.0 * rnd() + (i % d) as f32 * 0.1)).collect();
        let g = digest(&rows, nh, d);
        let mut u = vec![0.0f32; 2 * d];
        // Per head, its blocks and then the whole page.
        let parts = (0..nh).flat_map(|h| (0..PAGE / BLOCK).map(move |b| (h, Some(b))).chain([(h, None)]));
        for (h, b) in parts {
            let block = match b {
                Some(b) => &rows[(h * PAGE + b * BLOCK) * d..][..BLOCK * d],
                None => &rows[h * PAGE * d..][..PAGE * d],
            };
            unpack(b.map_or_else(|| page_digest(&g, h, d), |b| block_digest(&g, h, b, d)), d, &mut u);
            let tol = |v: &[f32]| f64::from(v.iter().fold(0.0f32, |m, x| m.max(x.abs()))) / 200.0;
            let (c_tol, r_tol) = (tol(&u[..d]), tol(&u[d..]));
            for i in 0..d {
                let col: Vec<f64> = block.chunks_exact(d).map(|r| f64::from(r[i].to_f32())).collect();
                let mean = col.iter().sum::<f64>() / col.len() as f64;
                let dev = col.iter().map(|x| (x - mean).abs()).sum::<f64>() / col.len() as f64;
                let (c, r) = (f64::from(u[i]), f64::from(u[d + i]));
                // Within half a step of 8-bit codes (1/127 and 1/255 of the largest channel).
                assert!((c - mean).abs() <= c_tol && (r - dev).abs() <= r_tol, "head {h} block {b:?} channel {i}: {c} vs {mean}, {r} vs {dev}");
            }
        }
    }

    /// Exhaustive scores against the digest's: keys with a per-channel offset and scale (the
    /// shape of real K rows), each block drifting around its own mean, and random queries.
    /// The block that holds the best key ranks in the digest's top quarter in nearly every
    /// trial (a digest that ranked at random would manage a quarter of them).
    #[test]
    fn the_block_with_the_best_key_ranks_high_by_its_digest() {
        let (d, n_blocks) = (64, 64);
        let mut rnd = rng(0x2545_F491_4F6C_DD1D);
        let scale: Vec<f32> = (0..d).map(|i| if i % 16 == 3 { 6.0 } else { 1.0 + rnd().abs() }).collect();
        let (mut hits, trials) = (0, 200);
        for _ in 0..trials {
            let mut keys = Vec::new();
            let mut digests = Vec::new();
            for _ in 0..n_blocks {
                let mean: Vec<f32> = (0..d).map(|i| scale[i] * rnd()).collect();
                let block: Vec<f16> = (0..BLOCK * d).map(|j| f16::from_f32(mean[j % d] + 0.5 * scale[j % d] * rnd())).collect();
                let mut g = vec![0u8; block_bytes(d)];
                summarize(&block, d, &mut g);
                digests.push(g);
                keys.push(block);
            }
            let q: Vec<f32> = (0..d).map(|_| rnd()).collect();
            let exact = |b: &[f16]| b.chunks_exact(d).map(|k| q.iter().zip(k).map(|(a, x)| a * x.to_f32()).sum::<f32>()).fold(f32::MIN, f32::max);
            let best = (0..n_blocks).max_by(|&a, &b| exact(&keys[a]).total_cmp(&exact(&keys[b]))).unwrap();
            let query = Query::new(&q, d);
            let est: Vec<f32> = digests.iter().map(|g| query.score(g)).collect();
            let rank = est.iter().filter(|&&e| e > est[best]).count();
            hits += usize::from(rank < n_blocks / 4);
        }
        assert!(hits * 10 >= trials * 9, "the best block ranked in the top quarter in {hits} of {trials} trials");
    }

    /// The scorer in use (AVX-512 where the CPU has it) against the portable one, on fresh
    /// random summaries and 1 to 8 query rows of several head sizes.
    #[test]
    fn the_vector_scorer_matches_the_portable_one() {
        let mut rnd = rng(0x9E37_79B9_7F4A_7C15);
        for d in [16, 64, 80, 128, 256] {
            for n in 1..=8 {
                let q: Vec<f32> = (0..n * d).map(|_| 4.0 * rnd()).collect();
                let rows: Vec<f16> = (0..BLOCK * d).map(|_| f16::from_f32(8.0 * rnd())).collect();
                let mut g = vec![0u8; block_bytes(d)];
                summarize(&rows, d, &mut g);
                let (c_step, r_step) = steps(&g, d);
                let q_abs: Vec<f32> = q.iter().map(|x| x.abs()).collect();
                let want = q.chunks_exact(d).zip(q_abs.chunks_exact(d)).map(|(q, qa)| dot(q, qa, &g[..d], &g[d..2 * d], c_step, r_step)).fold(f32::MIN, f32::max);
                let got = Query::new(&q, d).score(&g);
                let scale = q_abs.iter().sum::<f32>() * 8.0;
                assert!((got - want).abs() <= 1e-5 * scale, "d {d}, {n} rows: {got} vs {want}");
            }
        }
    }

    #[test]
    fn choose_keeps_the_always_blocks_and_the_best_candidates() {
        use PageKind::{Always as A, Candidate as C, Hidden as H};
        let pages = [A, C, C, H, C, C, A];
        let scores = vec![vec![0.0, 5.0, 1.0, 9.0, 3.0, 0.5, 0.0], vec![0.0, -1.0, 2.0, 9.0, 1.0, 4.0, 0.0]];
        // 7 blocks; two always read, one hidden; a budget of 4 blocks: two picks.
        let r = choose(0..7 * BLOCK, &pages, &scores, 4 * BLOCK).unwrap();
        assert_eq!(r[0], vec![0..2 * BLOCK, 4 * BLOCK..5 * BLOCK, 6 * BLOCK..7 * BLOCK]);
        assert_eq!(r[1], vec![0..BLOCK, 2 * BLOCK..3 * BLOCK, 5 * BLOCK..7 * BLOCK]);
        // Everything visible fits: dense.
        assert!(choose(0..7 * BLOCK, &pages, &scores, 6 * BLOCK).is_none());
        // A budget below the always-read blocks reads those only.
        assert_eq!(choose(0..7 * BLOCK, &pages, &scores, BLOCK).unwrap()[0], vec![0..BLOCK, 6 * BLOCK..7 * BLOCK]);
    }

    #[test]
    fn choose_counts_partial_blocks_by_their_cells() {
        use PageKind::{Always as A, Candidate as C};
        // Cells 8..58 of 16-cell blocks: block 0 holds 8 of them, block 3 holds 10.
        let b = BLOCK;
        let r = choose(b / 2..3 * b + 10, &[A, C, C, A], &[vec![0.0, 1.0, 2.0, 0.0]], b / 2 + 10 + b).unwrap();
        assert_eq!(r[0], vec![0..b / 2, 2 * b - b / 2..3 * b + 10 - b / 2]);
    }
}
