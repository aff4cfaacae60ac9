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

/// Block summaries per head in a page's digest.
pub const BLOCKS: usize = PAGE / BLOCK;

/// Pages are ranked by their whole-page summary first, and only the blocks of the best pages,
/// holding `REFINE` times the attention budget, are ranked by their own: at depth 32768 and
/// budget 2048 this scores 2304 summaries per layer where ranking every block scored 6144
/// (see `benches/select.rs`), for 0.001 more KLD (`dspark eval --decode`, ctx 8192).
pub const REFINE: usize = 2;

/// A page's digest, in two parts: the summaries of its blocks, `[head][block]`, and of the
/// whole page, `[head]`. The store copies each into a table of its stream (ranking reads
/// every page's whole-page summary, so those lie together: one stream of memory, not a
/// scattered read per page).
pub struct Digest {
    pub blocks: Box<[u8]>,
    pub page: Box<[u8]>,
    /// The head size.
    pub d: usize,
}

/// Bytes of one page's summaries for all heads (its entry in a stream's table).
fn page_summary_len(n_head: usize, d: usize) -> usize {
    n_head * block_bytes(d)
}

/// Bytes of one page's block summaries for all heads (its entry in a stream's table).
pub fn block_summaries_len(n_head: usize, d: usize) -> usize {
    n_head * BLOCKS * block_bytes(d)
}

/// Head `h`'s summary in a page's whole-page summaries.
fn page_digest(page: &[u8], h: usize, d: usize) -> &[u8] {
    &page[h * block_bytes(d)..][..block_bytes(d)]
}

/// Head `h`'s summaries of its [`BLOCKS`] blocks, one after the other, in a page's block
/// summaries.
pub fn head_blocks(blocks: &[u8], h: usize, d: usize) -> &[u8] {
    &blocks[h * BLOCKS * block_bytes(d)..][..BLOCKS * block_bytes(d)]
}

/// Block `b`'s summary for head `h` in a page's block summaries.
pub fn block_digest(blocks: &[u8], h: usize, b: usize, d: usize) -> &[u8] {
    &blocks[(h * BLOCKS + b) * block_bytes(d)..][..block_bytes(d)]
}

/// The digest of one page's keys, `rows` laid out `[head][slot][d]` (the f16 page): per head,
/// the summary of each block of [`BLOCK`] rows and of all [`PAGE`] rows.
pub fn digest(rows: &[f16], n_head: usize, d: usize) -> Digest {
    let bb = block_bytes(d);
    let mut blocks = vec![0u8; block_summaries_len(n_head, d)].into_boxed_slice();
    let mut page = vec![0u8; page_summary_len(n_head, d)].into_boxed_slice();
    let heads = rows.chunks_exact(PAGE * d).zip(blocks.chunks_exact_mut(BLOCKS * bb)).zip(page.chunks_exact_mut(bb));
    for ((head, dst), whole) in heads {
        for (block, dst) in head.chunks_exact(BLOCK * d).zip(dst.chunks_exact_mut(bb)) {
            summarize(block, d, dst);
        }
        summarize(head, d, whole);
    }
    Digest { blocks, page, d }
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

/// One KV head's query rows (its GQA group), as 16-bit integers, for scoring digests.
///
/// A summary's codes are integers, so with integer rows a score is two exact integer dot
/// products and one scaling: AVX-512 VNNI multiplies 32 codes by 32 row values into 32-bit
/// sums per instruction (`vpdpwssd`), with no widening to f32, and the vector scorer equals
/// the portable one bit for bit. 13 bits keep the ranking (a row's rounding error is at most
/// 1/16382 of its largest value), and keep the sums within `i32` for head sizes up to 1024
/// (radii are at most 255).
pub struct Query {
    d: usize,
    /// `[n][d]`: each row divided by its `scale` and rounded.
    q: Vec<i16>,
    q_abs: Vec<i16>,
    /// `q` and `q_abs` with two neighbouring values in one `i32` (the first in the low half),
    /// as [`PageTable`]'s scorer multiplies them.
    q_pairs: Vec<i32>,
    q_abs_pairs: Vec<i32>,
    scale: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    vnni: bool,
}

/// The largest magnitude of a row's integer values.
const Q_MAX: f32 = 8191.0;

impl Query {
    /// `q` holds the rows `[n][d]`, `d` at most 1024.
    pub fn new(q: &[f32], d: usize) -> Query {
        assert!(d <= 1024 && !q.is_empty() && q.len().is_multiple_of(d), "query rows of {} values for head size {d}", q.len());
        let scale: Vec<f32> = q.chunks_exact(d).map(|row| row.iter().fold(0.0f32, |m, x| m.max(x.abs())) / Q_MAX).collect();
        let q: Vec<i16> = q.chunks_exact(d).zip(&scale).flat_map(|(row, &s)| row.iter().map(move |&x| if s > 0.0 { (x / s).round() as i16 } else { 0 })).collect();
        let q_abs: Vec<i16> = q.iter().map(|x| x.abs()).collect();
        let pairs = |v: &[i16]| v.chunks_exact(2).map(|p| i32::from(p[0] as u16) | (i32::from(p[1]) << 16)).collect();
        let (q_pairs, q_abs_pairs) = (pairs(&q), pairs(&q_abs));
        #[cfg(target_arch = "x86_64")]
        let vnni = d.is_multiple_of(32) && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni");
        Query {
            d,
            q,
            q_abs,
            q_pairs,
            q_abs_pairs,
            scale,
            #[cfg(target_arch = "x86_64")]
            vnni,
        }
    }

    /// The score of one summary for one head ([`block_bytes`] bytes): the largest over the
    /// rows of `q·c + Σ|q_i|·r_i`.
    pub fn score(&self, block: &[u8]) -> f32 {
        let d = self.d;
        let (c_step, r_step) = steps(block, d);
        let (c, r) = (&block[..d], &block[d..2 * d]);
        #[cfg(target_arch = "x86_64")]
        if self.vnni {
            // SAFETY: `vnni` is set only where the CPU has these features (detected at run
            // time) and `d` is a multiple of 32.
            return unsafe { x86::score_vnni(self, c, r, c_step, r_step) };
        }
        (0..self.scale.len()).map(|i| self.row_score(i, c, r, c_step, r_step)).fold(f32::NEG_INFINITY, f32::max)
    }

    /// [`Query::score`] of each of the summaries lying one after the other in `summaries`
    /// (a page's blocks for one head): one call for the page, not one per block.
    pub fn scores(&self, summaries: &[u8], out: &mut [f32]) {
        assert_eq!(summaries.len(), out.len() * block_bytes(self.d), "one summary per score");
        #[cfg(target_arch = "x86_64")]
        if self.vnni {
            // SAFETY: as in `score`.
            return unsafe { x86::scores_vnni(self, summaries, out) };
        }
        for (o, s) in out.iter_mut().zip(summaries.chunks_exact(block_bytes(self.d))) {
            *o = self.score(s);
        }
    }

    /// Row `i`'s score: the portable scorer, and the specification of the vector one
    /// (`tests::the_vector_scorer_matches_the_portable_one`): the integer sums are exact,
    /// and both scale them with the same float operations.
    fn row_score(&self, i: usize, c: &[u8], r: &[u8], c_step: f32, r_step: f32) -> f32 {
        let (q, qa) = (&self.q[i * self.d..][..self.d], &self.q_abs[i * self.d..][..self.d]);
        let sc: i32 = q.iter().zip(c).map(|(&q, &c)| i32::from(q) * i32::from(c as i8)).sum();
        let sr: i32 = qa.iter().zip(r).map(|(&q, &r)| i32::from(q) * i32::from(r)).sum();
        scaled(self.scale[i], sc, sr, c_step, r_step)
    }
}

/// Pages whose whole-page summaries [`PageTable`] scores together.
const GROUP: usize = 16;

/// Where the center code of channel `i` of page `slot` lies in a [`PageTable`] group's part
/// (its radius code lies `d * GROUP` bytes further).
fn code_at(i: usize, slot: usize) -> usize {
    i / 2 * 2 * GROUP + 2 * slot + i % 2
}

/// Where the center step (`k` = 0) or the radius step (`k` = 1) of page `slot` lies in a
/// [`PageTable`] group's part, for head size `d`.
fn step_at(d: usize, k: usize, slot: usize) -> usize {
    2 * d * GROUP + 4 * (k * GROUP + slot)
}

/// A stream's whole-page summaries, laid out so that one head's scores of [`GROUP`] pages
/// come out of the same vector operations: per group of pages and per head, the centers
/// `[d / 2][GROUP][2]` (two neighbouring channels of each page side by side), the radii
/// likewise, then the pages' center steps and radius steps. Ranking scores every page of the
/// range, so this is the hot loop of selection; scored one page at a time, each score ended
/// in sums across vector lanes and a call per page (a third of selection's time at depth
/// 32768). Scores equal [`Query::score`] of the page's summary bit for bit.
#[derive(Default)]
pub struct PageTable {
    /// The shape of the digests stored (set by the first).
    n_head: usize,
    d: usize,
    data: Vec<u8>,
}

impl PageTable {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn head_bytes(&self) -> usize {
        GROUP * (2 * self.d + 8)
    }

    /// Head `h`'s part of group `g`.
    fn part(&self, g: usize, h: usize) -> &[u8] {
        &self.data[(g * self.n_head + h) * self.head_bytes()..][..self.head_bytes()]
    }

    /// Stores page `p`'s whole-page summaries.
    pub fn set(&mut self, p: usize, digest: &Digest) {
        let (page, d) = (&digest.page, digest.d);
        if self.data.is_empty() {
            (self.n_head, self.d) = (page.len() / block_bytes(d), d);
        }
        assert_eq!((self.n_head * block_bytes(self.d), self.d), (page.len(), d), "a digest of another shape");
        let (hb, (g, slot)) = (self.head_bytes(), (p / GROUP, p % GROUP));
        let end = (g + 1) * self.n_head * hb;
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        for h in 0..self.n_head {
            let src = page_digest(page, h, d);
            let dst = &mut self.data[(g * self.n_head + h) * hb..][..hb];
            for i in 0..d {
                dst[code_at(i, slot)] = src[i];
                dst[d * GROUP + code_at(i, slot)] = src[d + i];
            }
            let (c_step, r_step) = steps(src, d);
            dst[step_at(d, 0, slot)..][..4].copy_from_slice(&c_step.to_le_bytes());
            dst[step_at(d, 1, slot)..][..4].copy_from_slice(&r_step.to_le_bytes());
        }
    }

    /// Head `h`'s score of each page of `pages` (pages without a summary score what the
    /// table holds for them: ignore those).
    pub fn scores(&self, h: usize, query: &Query, pages: Range<usize>) -> Vec<f32> {
        let mut out = Vec::with_capacity(pages.len() + GROUP);
        let groups = pages.start / GROUP..pages.end.div_ceil(GROUP);
        for g in groups.clone() {
            let part = self.part(g, h);
            // In a decode the table comes from memory (every layer has its own): the next
            // group's part is fetched while this one is scored.
            if groups.contains(&(g + 1)) {
                crate::attn::prefetch(self.part(g + 1, h));
            }
            out.extend_from_slice(&self.group_scores(query, part));
        }
        out.drain(..pages.start % GROUP);
        out.truncate(pages.len());
        out
    }

    /// The scores of the pages of one group's part for one head.
    fn group_scores(&self, query: &Query, part: &[u8]) -> [f32; GROUP] {
        let mut group = [0.0f32; GROUP];
        #[cfg(target_arch = "x86_64")]
        if query.vnni {
            // SAFETY: `vnni` is set only where the CPU has these features (detected at run
            // time) and `d` is a multiple of 32.
            unsafe { x86::group_scores_vnni(query, part, &mut group) };
            return group;
        }
        for (slot, o) in group.iter_mut().enumerate() {
            *o = self.page_score(query, part, slot);
        }
        group
    }

    /// The portable scorer: page `slot` of a group's part, as [`Query::row_score`] scores it.
    fn page_score(&self, query: &Query, part: &[u8], slot: usize) -> f32 {
        let d = self.d;
        let c: Vec<u8> = (0..d).map(|i| part[code_at(i, slot)]).collect();
        let r: Vec<u8> = (0..d).map(|i| part[d * GROUP + code_at(i, slot)]).collect();
        let step = |k: usize| f32::from_le_bytes(part[step_at(d, k, slot)..][..4].try_into().expect("4 bytes"));
        (0..query.scale.len()).map(|i| query.row_score(i, &c, &r, step(0), step(1))).fold(f32::NEG_INFINITY, f32::max)
    }
}

/// A row's score from its integer sums.
#[inline(always)]
fn scaled(scale: f32, sc: i32, sr: i32, c_step: f32, r_step: f32) -> f32 {
    scale * (c_step * sc as f32 + r_step * sr as f32)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::Query::row_score`] of each row, the largest (`d`, a multiple of 32, codes
    /// each in `c` and `r`). The codes are widened to 16 bits 32 at a time and multiplied
    /// into 32-bit sums by VNNI (`vpdpwssd`) for up to 4 rows at once, whose sums are then
    /// added across lanes together.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub fn score_vnni(query: &super::Query, c: &[u8], r: &[u8], c_step: f32, r_step: f32) -> f32 {
        let (d, n) = (query.d, query.scale.len());
        assert!(d.is_multiple_of(32) && c.len() == d && r.len() == d && query.q.len() == n * d && query.q_abs.len() == n * d, "score_vnni: shapes");
        let mut best = _mm_set1_ps(f32::NEG_INFINITY);
        for g in (0..n).step_by(4) {
            // A GQA group of 3 rows (the default model's) multiplies 3, not 4.
            let sums = match n - g {
                1 => row_sums::<1>(query, g, c, r),
                2 => row_sums::<2>(query, g, c, r),
                3 => row_sums::<3>(query, g, c, r),
                _ => row_sums::<4>(query, g, c, r),
            };
            // The rows' scores as [`super::scaled`] computes them, lane by lane: the largest
            // is kept in 4 lanes, so that rows and summaries do not wait on each other.
            let rows = [0, 1, 2, 3].map(|j| (g + j).min(n - 1));
            let scale = _mm_setr_ps(query.scale[rows[0]], query.scale[rows[1]], query.scale[rows[2]], query.scale[rows[3]]);
            let (sc, sr) = (_mm_cvtepi32_ps(sums.0), _mm_cvtepi32_ps(sums.1));
            let score = _mm_mul_ps(scale, _mm_add_ps(_mm_mul_ps(_mm_set1_ps(c_step), sc), _mm_mul_ps(_mm_set1_ps(r_step), sr)));
            best = _mm_max_ps(best, score);
        }
        let mut lanes = [0.0f32; 4];
        // SAFETY: `lanes` holds 4 floats.
        unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), best) };
        lanes.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
    }

    /// [`score_vnni`] of each summary of `summaries` (`out.len()` of them, asserted by the
    /// caller).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub fn scores_vnni(query: &super::Query, summaries: &[u8], out: &mut [f32]) {
        let d = query.d;
        for (o, s) in out.iter_mut().zip(summaries.chunks_exact(super::block_bytes(d))) {
            let (c_step, r_step) = super::steps(s, d);
            *o = score_vnni(query, &s[..d], &s[d..2 * d], c_step, r_step);
        }
    }

    /// The integer sums of rows `g..g + R` (`R` <= 4) with one summary's centers and radii,
    /// one row per lane; lanes past `R` repeat the last row (the largest is the same).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn row_sums<const R: usize>(query: &super::Query, g: usize, c: &[u8], r: &[u8]) -> (__m128i, __m128i) {
        let d = query.d;
        let (mut ac, mut ar) = ([_mm512_setzero_si512(); 4], [_mm512_setzero_si512(); 4]);
        for k in (0..d).step_by(32) {
            // SAFETY: k + 32 <= d; c and r hold d codes and each row d values (asserted by
            // the caller, which passes g + R <= n).
            unsafe {
                let cv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(c.as_ptr().add(k).cast()));
                let rv = _mm512_cvtepu8_epi16(_mm256_loadu_si256(r.as_ptr().add(k).cast()));
                for j in 0..R {
                    let at = (g + j) * d + k;
                    ac[j] = _mm512_dpwssd_epi32(ac[j], cv, _mm512_loadu_si512(query.q.as_ptr().add(at).cast()));
                    ar[j] = _mm512_dpwssd_epi32(ar[j], rv, _mm512_loadu_si512(query.q_abs.as_ptr().add(at).cast()));
                }
            }
        }
        for j in R..4 {
            (ac[j], ar[j]) = (ac[R - 1], ar[R - 1]);
        }
        (sum4(ac), sum4(ar))
    }

    /// [`super::PageTable`]'s scores of one group of pages for one head (`part`): lane `p`
    /// of each sum is page `p`'s, so rows and pages need no sums across lanes. Per pair of
    /// channels, the pages' codes are widened to 16 bits and multiplied by the pair of each
    /// of up to 4 rows (`vpdpwssd`, the pair broadcast); the scaling is [`super::scaled`]'s,
    /// lane by lane.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub fn group_scores_vnni(query: &super::Query, part: &[u8], out: &mut [f32; super::GROUP]) {
        const G: usize = super::GROUP;
        let (d, n) = (query.d, query.scale.len());
        assert!(d.is_multiple_of(32) && part.len() == G * (2 * d + 8) && query.q_pairs.len() == n * d / 2 && query.q_abs_pairs.len() == n * d / 2, "group_scores_vnni: shapes");
        let steps = |k: usize| -> __m512 {
            // SAFETY: the steps lie at the part's end: 2 x G floats after the codes (asserted).
            unsafe { _mm512_loadu_ps(part.as_ptr().add(super::step_at(d, k, 0)).cast()) }
        };
        let steps = (steps(0), steps(1));
        let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
        for g in (0..n).step_by(4) {
            best = match n - g {
                1 => group_rows::<1>(query, g, part, steps, best),
                2 => group_rows::<2>(query, g, part, steps, best),
                3 => group_rows::<3>(query, g, part, steps, best),
                _ => group_rows::<4>(query, g, part, steps, best),
            };
        }
        // SAFETY: `out` holds G = 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), best) };
    }

    /// [`group_scores_vnni`] for rows `g..g + R` (`R` <= 4), with the pages' center and
    /// radius steps: the largest of `best` and their scores, lane by lane.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn group_rows<const R: usize>(query: &super::Query, g: usize, part: &[u8], (c_step, r_step): (__m512, __m512), mut best: __m512) -> __m512 {
        const G: usize = super::GROUP;
        let pairs = query.d / 2;
        let (mut ac, mut ar) = ([_mm512_setzero_si512(); R], [_mm512_setzero_si512(); R]);
        for k in 0..pairs {
            // SAFETY: k < d / 2: the centers' 32 bytes of pair k lie in the first d x G bytes
            // of the part, the radii's in the next (asserted by the caller).
            let (c, r) = unsafe {
                let at = part.as_ptr().add(2 * G * k);
                (_mm512_cvtepi8_epi16(_mm256_loadu_si256(at.cast())), _mm512_cvtepu8_epi16(_mm256_loadu_si256(at.add(query.d * G).cast())))
            };
            for j in 0..R {
                ac[j] = _mm512_dpwssd_epi32(ac[j], c, _mm512_set1_epi32(query.q_pairs[(g + j) * pairs + k]));
                ar[j] = _mm512_dpwssd_epi32(ar[j], r, _mm512_set1_epi32(query.q_abs_pairs[(g + j) * pairs + k]));
            }
        }
        for j in 0..R {
            let scale = _mm512_set1_ps(query.scale[g + j]);
            let sum = _mm512_add_ps(_mm512_mul_ps(c_step, _mm512_cvtepi32_ps(ac[j])), _mm512_mul_ps(r_step, _mm512_cvtepi32_ps(ar[j])));
            best = _mm512_max_ps(best, _mm512_mul_ps(scale, sum));
        }
        best
    }

    /// The sums of the lanes of 4 vectors, as 4 lanes.
    #[target_feature(enable = "avx512f")]
    fn sum4(v: [__m512i; 4]) -> __m128i {
        let half = |x: __m512i| _mm256_add_epi32(_mm512_castsi512_si256(x), _mm512_extracti64x4_epi64::<1>(x));
        let ab = _mm256_hadd_epi32(half(v[0]), half(v[1]));
        let cd = _mm256_hadd_epi32(half(v[2]), half(v[3]));
        let abcd = _mm256_hadd_epi32(ab, cd);
        _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256::<1>(abcd))
    }
}

/// A range's blocks of [`BLOCK`] cells as a selection sorts them, each as its index from the
/// range's first block.
#[derive(Default, Debug)]
pub struct Blocks {
    /// The first block of each page whose blocks are all candidates: ranked by the page's
    /// whole-page summary first.
    pub whole: Vec<usize>,
    /// Candidates outside such pages (a page cut by the range or the mask): always scored.
    pub loose: Vec<usize>,
    /// Blocks always read.
    pub always: Vec<usize>,
    /// Cells of the always-read blocks, and of the candidates.
    always_cells: usize,
    candidate_cells: usize,
}

impl Blocks {
    /// Sorts the blocks overlapping `cells` (counted from the stream's cell 0), in one pass
    /// over the range's pages, whole pages at once: this runs before any head's scoring, on
    /// one thread (at depth 32768, 0.10 ms of a token, serially; 0.38 ms block by block,
    /// `benches/select.rs`). A block is hidden when no query row sees a cell of it
    /// (`visible(cells)`, counted from the range's first cell); else it is always read when
    /// it lies in the sink page, in a page without a digest (`digest(page)`), or is cut by
    /// the range; else it is a candidate.
    pub fn sort(cells: Range<usize>, digest: impl Fn(usize) -> bool, visible: impl Fn(Range<usize>) -> bool) -> Blocks {
        let first_block = cells.start / BLOCK;
        let mut b = Blocks { whole: Vec::with_capacity(cells.len() / PAGE + 1), ..Blocks::default() };
        for p in cells.start / PAGE..cells.end.div_ceil(PAGE) {
            let page = (p * PAGE).max(cells.start)..((p + 1) * PAGE).min(cells.end);
            let sink_or_raw = p == 0 || !digest(p);
            if page.len() == PAGE && !sink_or_raw && (0..BLOCKS).all(|j| visible(page.start + j * BLOCK - cells.start..page.start + (j + 1) * BLOCK - cells.start)) {
                b.whole.push(p * BLOCKS - first_block);
                b.candidate_cells += PAGE;
                continue;
            }
            for i in (page.start / BLOCK..page.end.div_ceil(BLOCK)).map(|blk| blk - first_block) {
                let span = span(&cells, i);
                if !visible(span.start - cells.start..span.end - cells.start) {
                    continue;
                }
                if sink_or_raw || span.len() < BLOCK {
                    b.always.push(i);
                    b.always_cells += span.len();
                } else {
                    b.loose.push(i);
                    b.candidate_cells += span.len();
                }
            }
        }
        b
    }

    /// How many candidate blocks each head picks under an attention budget of `budget` cells,
    /// once the always-read blocks are counted; `None` when everything visible fits the
    /// budget (a dense call).
    pub fn picks(&self, budget: usize) -> Option<usize> {
        (self.always_cells + self.candidate_cells > budget).then(|| budget.saturating_sub(self.always_cells) / BLOCK)
    }
}

/// One KV head's cell ranges to read (relative to the range's first cell, merged where
/// adjacent): the `always` blocks and the `picks` best-scoring of the candidates `scored`
/// (block index, score). Blocks are counted as in [`picks`].
pub fn pick(cells: &Range<usize>, always: &[usize], mut scored: Vec<(usize, f32)>, picks: usize) -> Vec<Range<usize>> {
    if picks < scored.len() {
        scored.select_nth_unstable_by(picks, |a, b| b.1.total_cmp(&a.1));
        scored.truncate(picks);
    }
    // Marked in a bitmap of the range's blocks and read back in order, rather than sorted.
    let n_blocks = cells.end.div_ceil(BLOCK) - cells.start / BLOCK;
    let mut marks = vec![0u64; n_blocks.div_ceil(64)];
    for i in always.iter().copied().chain(scored.into_iter().map(|(i, _)| i)) {
        marks[i / 64] |= 1 << (i % 64);
    }
    let read = marks.into_iter().enumerate().flat_map(|(w, mut m)| {
        std::iter::from_fn(move || {
            let bit = (m != 0).then(|| m.trailing_zeros() as usize)?;
            m &= m - 1;
            Some(w * 64 + bit)
        })
    });
    merge(read.map(|i| span(cells, i)).map(|r| r.start - cells.start..r.end - cells.start))
}

/// What a selection chooses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unit {
    /// Blocks of [`BLOCK`] cells, per KV head: the finest choice, for the best fidelity.
    #[default]
    Block,
    /// Whole pages, the same for every KV head of the layer: what the cold tier moves. Per-head
    /// blocks touch about half the pages at depth 16384 (the heads choose differently), more
    /// than a budget of a quarter of the KV holds, so every token reads them from disk again;
    /// shared pages are the budget's cells and nothing else.
    Page,
}

impl Unit {
    pub fn parse(s: &str) -> Option<Unit> {
        match s {
            "block" => Some(Unit::Block),
            "page" => Some(Unit::Page),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::Block => "block",
            Unit::Page => "page",
        }
    }
}

/// The candidate blocks of the pages chosen for all heads at once ([`Unit::Page`]), from each
/// head's scored candidates (block index from the range's first block `first_block`, score),
/// at most `picks` blocks. A page scores for a head what its best block scores, less that
/// head's best score (the log of its largest softmax weight relative to the head's top, up to
/// the scale, which is the same for all heads); for the layer, its best over the heads. Pages
/// go in that order while their blocks fit.
pub fn shared_pages(first_block: usize, heads: &[Vec<(usize, f32)>], picks: usize) -> Vec<(usize, f32)> {
    const { assert!(BLOCKS <= 8, "a page's blocks are a byte's bits") };
    let mut pages: std::collections::HashMap<usize, (f32, u8)> = std::collections::HashMap::new();
    for scored in heads {
        let top = scored.iter().map(|s| s.1).fold(f32::NEG_INFINITY, f32::max);
        for &(i, s) in scored {
            let page = pages.entry((first_block + i) / BLOCKS).or_insert((f32::NEG_INFINITY, 0));
            page.0 = page.0.max(s - top);
            page.1 |= 1 << ((first_block + i) % BLOCKS);
        }
    }
    let mut ranked: Vec<(usize, (f32, u8))> = pages.into_iter().collect();
    ranked.sort_unstable_by(|a, b| b.1 .0.total_cmp(&a.1 .0).then(a.0.cmp(&b.0)));
    let mut out = Vec::with_capacity(picks);
    for (p, (score, blocks)) in ranked {
        let n = blocks.count_ones() as usize;
        if out.len() + n <= picks {
            out.extend((0..BLOCKS).filter(|b| blocks & (1 << b) != 0).map(|b| (p * BLOCKS + b - first_block, score)));
        }
        if out.len() == picks {
            break;
        }
    }
    out
}

/// The cells of `cells` in the `i`-th block overlapping it.
#[inline]
fn span(cells: &Range<usize>, i: usize) -> Range<usize> {
    let b = cells.start / BLOCK + i;
    (b * BLOCK).max(cells.start)..((b + 1) * BLOCK).min(cells.end)
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
            unpack(b.map_or_else(|| page_digest(&g.page, h, d), |b| block_digest(&g.blocks, h, b, d)), d, &mut u);
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

    /// The scorer in use (VNNI where the CPU has it) against the portable one, on fresh
    /// random summaries and 1 to 24 query rows (up to 8 query rows of a GQA group of 3) of
    /// several head sizes: the same integer sums, so the same scores.
    #[test]
    fn the_vector_scorer_matches_the_portable_one() {
        let mut rnd = rng(0x9E37_79B9_7F4A_7C15);
        for d in [16, 64, 80, 128, 256] {
            for n in 1..=24 {
                let q: Vec<f32> = (0..n * d).map(|_| 4.0 * rnd()).collect();
                let rows: Vec<f16> = (0..BLOCK * d).map(|_| f16::from_f32(8.0 * rnd())).collect();
                let mut g = vec![0u8; block_bytes(d)];
                summarize(&rows, d, &mut g);
                let (c_step, r_step) = steps(&g, d);
                let query = Query::new(&q, d);
                let want = (0..n).map(|i| query.row_score(i, &g[..d], &g[d..2 * d], c_step, r_step)).fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(query.score(&g), want, "d {d}, {n} rows");
            }
        }
    }

    /// The page table's scores, vector and portable, equal each page summary's
    /// [`Query::score`] bit for bit, for any range of pages and any head.
    #[test]
    fn the_page_table_scores_pages_as_their_summaries_score() {
        let mut rnd = rng(0xD1B5_4A32_D192_ED03);
        let nh = 2;
        for d in [16, 64, 80, 128] {
            let n_pages = 37;
            let pages: Vec<Digest> = (0..n_pages).map(|_| digest(&(0..nh * PAGE * d).map(|_| f16::from_f32(8.0 * rnd())).collect::<Vec<_>>(), nh, d)).collect();
            let mut table = PageTable::default();
            for (p, g) in pages.iter().enumerate().rev() {
                table.set(p, g);
            }
            for n in [1, 2, 3, 4, 5, 6, 7, 9] {
                let query = Query::new(&(0..n * d).map(|_| 4.0 * rnd()).collect::<Vec<_>>(), d);
                for (h, range) in [(0, 0..n_pages), (1, 5..21), (1, 16..17), (0, 30..37)] {
                    let want: Vec<f32> = range.clone().map(|p| query.score(page_digest(&pages[p].page, h, d))).collect();
                    assert_eq!(table.scores(h, &query, range.clone()), want, "d {d}, {n} rows, head {h}, pages {range:?}");
                    let portable: Vec<f32> = range.clone().map(|p| table.page_score(&query, table.part(p / GROUP, h), p % GROUP)).collect();
                    assert_eq!(portable, want, "portable: d {d}, {n} rows, head {h}, pages {range:?}");
                }
            }
        }
    }

    /// Integer rows rank like the float products they stand for: each row's score is within
    /// 1/4000 of the scale of its terms of `q·c + Σ|q_i|·r_i` computed in f64.
    #[test]
    fn integer_query_rows_keep_the_float_score() {
        let mut rnd = rng(0x2545_F491_4F6C_DD1D);
        let d = 64;
        for _ in 0..200 {
            let q: Vec<f32> = (0..d).map(|_| 4.0 * rnd()).collect();
            let rows: Vec<f16> = (0..BLOCK * d).map(|_| f16::from_f32(8.0 * rnd())).collect();
            let mut g = vec![0u8; block_bytes(d)];
            summarize(&rows, d, &mut g);
            let mut u = vec![0.0f32; 2 * d];
            unpack(&g, d, &mut u);
            let terms = (0..d).map(|i| (f64::from(q[i]) * f64::from(u[i]), f64::from(q[i].abs()) * f64::from(u[d + i])));
            let (exact, size) = terms.fold((0.0, 0.0), |(e, s), (a, b)| (e + a + b, s + a.abs() + b.abs()));
            let got = f64::from(Query::new(&q, d).score(&g));
            assert!((got - exact).abs() <= size / 4000.0, "{got} vs {exact} (terms of size {size})");
        }
    }

    /// Every head's ranges, or `None` for a dense call: the blocks of `cells` sorted with
    /// pages `digest` having a digest and blocks `hidden` (counted from the stream's cell 0)
    /// seen by no query, then picked by `scores` (per head, per block of the range).
    fn choose(cells: Range<usize>, digest: &[usize], hidden: &[usize], scores: &[Vec<f32>], budget: usize) -> Option<Vec<Vec<Range<usize>>>> {
        let first = cells.start;
        let sorted = Blocks::sort(cells.clone(), |p| digest.contains(&p), |r| !hidden.contains(&((first + r.start) / BLOCK)));
        let n = sorted.picks(budget)?;
        let candidates: Vec<usize> = sorted.whole.iter().flat_map(|&i| i..i + BLOCKS).chain(sorted.loose.iter().copied()).collect();
        Some(scores.iter().map(|s| pick(&cells, &sorted.always, candidates.iter().map(|&i| (i, s[i])).collect(), n)).collect())
    }

    #[test]
    fn sort_puts_each_block_where_its_page_and_the_mask_put_it() {
        // From the middle of the sink page to 3 cells into block 21 (page 5); pages 1, 3, 4
        // and 5 have digests, page 2 has none, block 13 is hidden.
        let cells = PAGE / 2..5 * PAGE + BLOCK + 3;
        let b = Blocks::sort(cells.clone(), |p| [1, 3, 4, 5].contains(&p), |r| (cells.start + r.start) / BLOCK != 13);
        // Indices count from block 2, the range's first.
        assert_eq!(b.whole, [2, 14]);
        assert_eq!(b.loose, [10, 12, 13, 18]);
        assert_eq!(b.always, [0, 1, 6, 7, 8, 9, 19]);
        assert_eq!((b.always_cells, b.candidate_cells), (2 * BLOCK + PAGE + 3, 2 * PAGE + 4 * BLOCK));
        // Everything visible fits: dense; else the candidates the budget leaves room for.
        assert_eq!(b.picks(b.always_cells + b.candidate_cells), None);
        assert_eq!(b.picks(b.always_cells + b.candidate_cells - 1), Some((b.candidate_cells - 1) / BLOCK));
        assert_eq!(b.picks(BLOCK), Some(0));
    }

    #[test]
    fn choose_keeps_the_always_blocks_and_the_best_candidates() {
        // The sink page (blocks 0-3), a whole page (4-7), a page with block 9 hidden.
        let b = BLOCK;
        let s0 = vec![0.0, 0.0, 0.0, 0.0, 5.0, 1.0, 0.5, 3.0, 2.0, 9.0, 4.0, 0.0];
        let s1 = vec![0.0, 0.0, 0.0, 0.0, -1.0, 2.0, 0.0, 1.0, 0.0, 9.0, 0.0, 6.0];
        // Four blocks always read; a budget of 6 blocks: two picks.
        let r = choose(0..3 * PAGE, &[1, 2], &[9], &[s0.clone(), s1], 6 * b).unwrap();
        assert_eq!(r[0], vec![0..5 * b, 10 * b..11 * b]);
        assert_eq!(r[1], vec![0..4 * b, 5 * b..6 * b, 11 * b..12 * b]);
        // Everything visible fits: dense.
        assert!(choose(0..3 * PAGE, &[1, 2], &[9], std::slice::from_ref(&s0), 11 * b).is_none());
        // A budget below the always-read blocks reads those only.
        assert_eq!(choose(0..3 * PAGE, &[1, 2], &[9], &[s0], b).unwrap()[0], vec![0..4 * b]);
    }

    #[test]
    fn shared_pages_rank_each_page_by_its_best_block_against_each_heads_best() {
        // Block indices count from the range's block 2: page 0 holds indices 0-1, page 1 2-5,
        // page 2 6-9. Head 0 scores around 100, head 1 around 0: each head's best page (1 for
        // head 0, 2 for head 1) goes before head 0's second (page 0, 1 under its top), whose
        // raw score is far above anything of head 1's.
        let h0 = vec![(0, 99.0), (2, 100.0), (3, 99.5), (6, 50.0)];
        let h1 = vec![(2, -3.0), (6, 5.0), (7, 1.0)];
        let pages = |picks| shared_pages(2, &[h0.clone(), h1.clone()], picks).into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        // Page 1 (tied with page 2, first in cell order): the blocks any head scored.
        assert_eq!(pages(2), [2, 3]);
        // Page 2 next (6, 7), then page 0 (0) once room is left for it.
        assert_eq!(pages(4), [2, 3, 6, 7]);
        assert_eq!(pages(5), [2, 3, 6, 7, 0]);
        // A page whose blocks do not fit is skipped for one that does.
        assert_eq!(pages(3), [2, 3, 0]);
        assert!(pages(0).is_empty());
    }

    #[test]
    fn choose_counts_partial_blocks_by_their_cells() {
        // Cells 8..58 of page 1: block 4 holds 8 of them, block 7 holds 10, both always read.
        let b = BLOCK;
        let r = choose(PAGE + b / 2..PAGE + 3 * b + 10, &[1], &[], &[vec![0.0, 1.0, 2.0, 0.0]], b / 2 + 10 + b).unwrap();
        assert_eq!(r[0], vec![0..b / 2, 2 * b - b / 2..3 * b + 10 - b / 2]);
    }
}
