//! Query-aware page selection: the compressed pages a decode query reads.
//!
//! Each compressed page of a K store keeps, per KV head, a digest of its keys: per channel a
//! center `c` and a radius `r`, in the model's (unrotated, post-RoPE) space, as f16. A query
//! `q` scores a page `q·c + Σ|q_i|·r_i`. With the box digest (`c`, `r` the middle and half
//! the width of each channel's range) that is Quest's bound: no key of the page scores more.
//! DSpark keeps the digest in the unrotated space because the codec's Hadamard rotation makes
//! keys near-isotropic, which makes such boxes loose and alike for every page.
//!
//! A decode call (at most [`MAX_QUERY_ROWS`] query rows) then reads, per KV head: the stream's
//! sink page, every f16 page (the recent window), every page without a digest, and the
//! best-scoring compressed pages until the attention budget is spent; the other pages are not
//! read at all. Pages no query row can see (the mask holds −∞ for all their cells) are skipped,
//! as they add nothing. When everything visible fits the budget the call stays dense, exactly
//! as without selection.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use half::f16;

use super::PAGE;

/// Calls with more query rows than this (prefill) are always dense.
pub const MAX_QUERY_ROWS: usize = 8;

/// Values of one page's digest: per head, `d` centers then `d` radii.
pub fn digest_len(n_head: usize, d: usize) -> usize {
    n_head * 2 * d
}

/// The digest of one page's keys, `rows` laid out `[head][slot][d]` (the f16 page).
pub fn digest(rows: &[f16], n_head: usize, d: usize) -> Box<[f16]> {
    let mut out = vec![f16::ZERO; digest_len(n_head, d)].into_boxed_slice();
    let mut lo = vec![f32::INFINITY; d];
    let mut hi = vec![f32::NEG_INFINITY; d];
    for (h, dst) in out.chunks_exact_mut(2 * d).enumerate() {
        lo.fill(f32::INFINITY);
        hi.fill(f32::NEG_INFINITY);
        for row in rows[h * PAGE * d..(h + 1) * PAGE * d].chunks_exact(d) {
            for ((l, u), x) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                let x = x.to_f32();
                *l = l.min(x);
                *u = u.max(x);
            }
        }
        let (center, radius) = dst.split_at_mut(d);
        for i in 0..d {
            let c = 0.5 * (lo[i] + hi[i]);
            let c16 = f16::from_f32(c);
            // The radius covers the range around the rounded center, rounded up: the box
            // stays a bound after both are stored as f16.
            let r = 0.5 * (hi[i] - lo[i]) + (c - c16.to_f32()).abs();
            center[i] = c16;
            radius[i] = round_up(r);
        }
    }
    out
}

/// The smallest f16 not below `x` (`x >= 0`).
fn round_up(x: f32) -> f16 {
    let r = f16::from_f32(x);
    if r.to_f32() >= x {
        r
    } else {
        f16::from_bits(r.to_bits() + 1)
    }
}

/// The score of one head's digest (`2 * d` values) for the query rows `q` (`[n][d]`): the
/// largest over the rows of `q·c + Σ|q_i|·r_i`.
pub fn score(head_digest: &[f32], q: &[f32], d: usize) -> f32 {
    let (c, r) = head_digest.split_at(d);
    q.chunks_exact(d)
        .map(|q| q.iter().zip(c).zip(r).map(|((&q, &c), &r)| q * c + q.abs() * r).sum::<f32>())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// What one stream's pages are to a selection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PageKind {
    /// Never read: no query row can see a cell of it.
    Hidden,
    /// Always read: the sink page, f16 pages, pages without a digest, pages cut by the range.
    Always,
    /// Read if its score ranks within the budget.
    Candidate,
}

/// Per KV head, the cell ranges to read (relative to the range's first cell, merged where
/// adjacent), or `None` when everything visible fits in `budget` cells (a dense call).
///
/// `pages[i]` is the kind of the `i`-th page overlapping `cells` (the range's cells, counted
/// from the stream's cell 0), and `scores[h][i]` its score for KV head `h` (read for
/// candidates only).
pub fn choose(cells: Range<usize>, pages: &[PageKind], scores: &[Vec<f32>], budget: usize) -> Option<Vec<Vec<Range<usize>>>> {
    let first_page = cells.start / PAGE;
    let span = |i: usize| {
        let p = first_page + i;
        (p * PAGE).max(cells.start)..((p + 1) * PAGE).min(cells.end)
    };
    let count = |k: PageKind| pages.iter().enumerate().filter(|(_, &x)| x == k).map(|(i, _)| span(i).len()).sum::<usize>();
    let always = count(PageKind::Always);
    if always + count(PageKind::Candidate) <= budget {
        return None;
    }
    let picks = budget.saturating_sub(always) / PAGE;
    let ranges = scores
        .iter()
        .map(|score| {
            let mut cand: Vec<usize> = (0..pages.len()).filter(|&i| pages[i] == PageKind::Candidate).collect();
            if picks < cand.len() {
                cand.select_nth_unstable_by(picks, |&a, &b| score[b].total_cmp(&score[a]));
                cand.truncate(picks);
            }
            let mut read: Vec<usize> = (0..pages.len()).filter(|&i| pages[i] == PageKind::Always).chain(cand).collect();
            read.sort_unstable();
            merge(read.into_iter().map(span).map(|r| r.start - cells.start..r.end - cells.start))
        })
        .collect();
    Some(ranges)
}

/// Merges sorted ranges that touch.
fn merge(ranges: impl Iterator<Item = Range<usize>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
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

    /// A page's keys with a per-channel offset and scale (the shape of real K rows), and
    /// random queries: no key scores above its page's digest.
    #[test]
    fn the_digest_bounds_every_key_of_its_page() {
        let (nh, d) = (2, 64);
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        };
        for _ in 0..50 {
            let offset: Vec<f32> = (0..d).map(|_| 4.0 * rnd()).collect();
            let scale: Vec<f32> = (0..d).map(|i| if i % 16 == 3 { 20.0 } else { 1.0 + rnd().abs() }).collect();
            let mut rows: Vec<f16> = (0..nh * PAGE * d).map(|i| f16::from_f32(offset[i % d] + scale[i % d] * rnd())).collect();
            // The last row of each head is a corner of its page's box, and the last query
            // points at it: there the bound is met exactly, so a digest a bit too small fails.
            let corner: Vec<bool> = (0..d).map(|_| rnd() > 0.0).collect();
            for h in 0..nh {
                let page = &mut rows[h * PAGE * d..][..PAGE * d];
                for i in 0..d {
                    let col = page[..(PAGE - 1) * d].iter().skip(i).step_by(d).map(|x| x.to_f32());
                    let v = if corner[i] { col.fold(f32::NEG_INFINITY, f32::max) } else { col.fold(f32::INFINITY, f32::min) };
                    page[(PAGE - 1) * d + i] = f16::from_f32(v);
                }
            }
            let g: Vec<f32> = digest(&rows, nh, d).iter().map(|x| x.to_f32()).collect();
            for t in 0..20 {
                let mut q: Vec<f32> = (0..3 * d).map(|_| 3.0 * rnd()).collect();
                if t == 19 {
                    q.iter_mut().enumerate().for_each(|(i, x)| *x = x.abs() * if corner[i % d] { 1.0 } else { -1.0 });
                }
                for h in 0..nh {
                    let bound = score(&g[h * 2 * d..][..2 * d], &q, d);
                    let best = q
                        .chunks_exact(d)
                        .flat_map(|q| rows[h * PAGE * d..][..PAGE * d].chunks_exact(d).map(move |k| q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum::<f32>()))
                        .fold(f32::NEG_INFINITY, f32::max);
                    assert!(best <= bound + 1e-4 * bound.abs().max(1.0), "head {h}: a key scores {best} > bound {bound}");
                }
            }
        }
    }

    #[test]
    fn choose_keeps_the_always_pages_and_the_best_candidates() {
        use PageKind::{Always as A, Candidate as C, Hidden as H};
        let pages = [A, C, C, H, C, C, A];
        let scores = vec![vec![0.0, 5.0, 1.0, 9.0, 3.0, 0.5, 0.0], vec![0.0, -1.0, 2.0, 9.0, 1.0, 4.0, 0.0]];
        // 7 pages of cells 0..448; two pages always, one hidden; budget 4 pages: two picks.
        let r = choose(0..7 * PAGE, &pages, &scores, 4 * PAGE).unwrap();
        assert_eq!(r[0], vec![0..2 * PAGE, 4 * PAGE..5 * PAGE, 6 * PAGE..7 * PAGE]);
        assert_eq!(r[1], vec![0..PAGE, 2 * PAGE..3 * PAGE, 5 * PAGE..7 * PAGE]);
        // Everything visible fits: dense.
        assert!(choose(0..7 * PAGE, &pages, &scores, 6 * PAGE).is_none());
        // A budget below the always-read pages reads those only.
        assert_eq!(choose(0..7 * PAGE, &pages, &scores, PAGE).unwrap()[0], vec![0..PAGE, 6 * PAGE..7 * PAGE]);
    }

    #[test]
    fn choose_counts_partial_pages_by_their_cells() {
        use PageKind::{Always as A, Candidate as C};
        // Cells 32..200: page 0 holds 32 of them, page 3 holds 8.
        let r = choose(32..200, &[A, C, C, A], &[vec![0.0, 1.0, 2.0, 0.0]], 40 + PAGE).unwrap();
        assert_eq!(r[0], vec![0..32, 96..168]);
    }
}
