//! The fast path: work split, per-tile pipeline (generic over the instruction set), merge.
//!
//! Work item = one KV head × a tile of queries × a range of rows. For each tile of up to
//! [`TILE`] rows it decodes K (f16 → f32, or packed → rotated f32) into a scratch tile, scores
//! all query rows of the item (every query head of the KV head, for every query of the tile)
//! against it, updates the online softmax, decodes V the same way and accumulates it into the
//! plain (f16 V) or the rotated (packed V) accumulator. Items that share a query tile are
//! merged with log-sum-exp; the rotated accumulator is un-rotated once per output row.

use super::kernels::{self, Flavor, PACKED_BLOCK};
use super::pool::lock;
use super::{alibi_slope, isa, Problem, Rows, Segment, Threads};
use crate::codec::{rotate, unrotate, RowCodec};
use half::slice::HalfFloatSliceExt;

/// Rows per tile: K and V tiles of 32 × 128 f32 take 32 KiB of L1 together.
pub(crate) const TILE: usize = 32;

/// Most query rows (queries × heads of one group) the packed decode kernel takes per item.
const QUERY_ROWS: usize = 128;

/// Query rows per item: every K/V tile an item reads is decoded once for all of them, so more
/// rows amortise decoding (prefill over a deep compressed cache decodes each tile once per
/// item), until the rows' accumulators and transposed queries leave the caches. About 8192
/// values per accumulator: 128 rows at head size 64 (measured: prefill of 512 queries over
/// 8192 k4v4 rows, 100 ms at 32 rows, 80 at 128, 111 at 256), 64 at 128.
fn query_rows(d: usize) -> usize {
    (8192 / d).clamp(32, QUERY_ROWS)
}

/// Query rows from which the transposed (prefill) kernels are used.
const WIDE_MIN_ROWS: usize = 16;

/// Rows per item below which splitting a sequence across threads is not worth a merge.
const MIN_SPLIT_ROWS: usize = 256;

/// Shared, read-only state of one call.
pub(crate) struct Ctx<'p, 'a, 'b> {
    pub pb: &'p Problem<'a, 'b>,
    /// q · scale (÷ softcap when softcapping), `[n_q][n_head][d]`.
    pub q_plain: Vec<f32>,
    /// `q_plain` rotated and rounded to its int8 image (`q8 · step`, see [`QInt`]), or
    /// empty when no segment has packed K. Every kernel scores packed K against it.
    pub q_rot: Vec<f32>,
    /// The int8 image of `q_rot`; `None` when there is no packed K or q is not finite.
    pub q_int: Option<QInt>,
    pub slopes: Vec<f32>,
    /// Item buffers not in use; an item takes one and puts it back.
    pub bufs: std::sync::Mutex<Vec<ItemBufs>>,
}

/// The rotated, scaled queries quantized per group of 32 (see [`kernels::quantize_q8`]).
#[derive(Debug)]
pub(crate) struct QInt {
    /// `[n_q][n_head][d]` int8 codes.
    pub q8: Vec<i8>,
    /// `[n_q][n_head][d / 32]` steps.
    pub step: Vec<f32>,
    /// `[n_q][n_head][d / 32]` sums of the codes of each group.
    pub sum: Vec<i32>,
}

/// Everything the packed decode kernels read for one run of rows of one segment.
#[derive(Debug)]
pub(crate) struct DecodeJob<'a> {
    pub d: usize,
    /// Query rows (queries × heads of the group).
    pub m: usize,
    /// Query rows per query: row `r` uses mask row `r / g`.
    pub g: usize,
    pub kbits: u32,
    pub vbits: u32,
    /// Bytes per packed K / V row.
    pub krb: usize,
    pub vrb: usize,
    /// `n` packed K and V rows.
    pub k: &'a [u8],
    pub v: &'a [u8],
    /// Rows; a multiple of [`kernels::PACKED_BLOCK`].
    pub n: usize,
    /// `[m][d/32][8]`: dword `j` of group `g` packs the int8 query codes of elements
    /// `32g + 4j .. 32g + 4j + 4` (little-endian), ready for `vpdpbusd`.
    pub q32: &'a [i32],
    /// `[m][d/32]` query steps.
    pub qstep: &'a [f32],
    /// `[m][d/32]` sums of the query codes of each group.
    pub qsum: &'a [i32],
    /// Per query of the item, the mask values of these `n` rows; `None` without a mask.
    pub mask: Option<&'a [&'a [half::f16]]>,
    /// `[m]` ALiBi slopes.
    pub slopes: &'a [f32],
    /// `[m]` added to every score before softcapping (a centred K's `q · center`).
    pub kbias: &'a [f32],
    pub softcap: f32,
}

/// One unit of parallel work.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Item {
    pub kh: usize,
    pub q0: usize,
    pub q1: usize,
    /// Row range in the concatenation of the KV head's segments.
    pub r0: usize,
    pub r1: usize,
}

/// Softmax state of the query rows of one item (`m` rows, row = (query, head in group)).
#[derive(Debug)]
pub(crate) struct Partial {
    pub max: Vec<f32>,
    pub sum: Vec<f32>,
    /// `m × d`; empty when no f16 V row was accumulated.
    pub plain: Vec<f32>,
    /// `m × d`, rotated space; empty when no packed V row was accumulated.
    pub rot: Vec<f32>,
}

impl Partial {
    fn new(m: usize) -> Partial {
        Partial { max: vec![f32::NEG_INFINITY; m], sum: vec![0.0; m], plain: Vec::new(), rot: Vec::new() }
    }

    /// Folds `other` (same rows, other KV rows) into `self` (log-sum-exp merge).
    fn merge(&mut self, other: Partial, d: usize) {
        for r in 0..self.max.len() {
            let m = self.max[r].max(other.max[r]);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let a = (self.max[r] - m).exp();
            let b = (other.max[r] - m).exp();
            self.max[r] = m;
            self.sum[r] = self.sum[r] * a + other.sum[r] * b;
            merge_acc(&mut self.plain, &other.plain, r, d, a, b);
            merge_acc(&mut self.rot, &other.rot, r, d, a, b);
        }
    }
}

fn merge_acc(mine: &mut Vec<f32>, theirs: &[f32], r: usize, d: usize, a: f32, b: f32) {
    if theirs.is_empty() {
        if !mine.is_empty() {
            mine[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= a);
        }
        return;
    }
    if mine.is_empty() {
        mine.resize(theirs.len(), 0.0);
    }
    for (x, y) in mine[r * d..(r + 1) * d].iter_mut().zip(&theirs[r * d..(r + 1) * d]) {
        *x = *x * a + *y * b;
    }
}

/// The query buffers of one attention call, kept by its caller for the next. A prefill's
/// scaled, rotated and int8 queries take megabytes; allocated afresh for every layer, their
/// pages were mapped and faulted in again each time (llama-bench pp512, SmolLM2: 180k page
/// faults against stock's 14k, half a second of system time).
#[derive(Debug, Default)]
pub struct Scratch {
    q_plain: Vec<f32>,
    q_rot: Vec<f32>,
    q8: Vec<i8>,
    step: Vec<f32>,
    sum: Vec<i32>,
    items: Vec<ItemBufs>,
}

impl Scratch {
    /// Takes the buffers of a finished call back.
    fn keep(&mut self, ctx: Ctx) {
        self.q_plain = ctx.q_plain;
        self.q_rot = ctx.q_rot;
        if let Some(qi) = ctx.q_int {
            (self.q8, self.step, self.sum) = (qi.q8, qi.step, qi.sum);
        }
        self.items = ctx.bufs.into_inner().unwrap_or_else(|e| e.into_inner());
    }
}

/// The buffers of one work item (tiles, gathered queries, softmax temporaries), kept in
/// [`Scratch`] between items and calls. A decode step's item at short depth reads a few
/// dozen rows, and allocating and zeroing its ~17 KB of tiles was a visible share of it; a
/// prefill allocated three softmax temporaries per tile.
#[derive(Debug, Default)]
pub(crate) struct ItemBufs {
    q_plain: Vec<f32>,
    q_rot: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    s: Vec<f32>,
    mv: Vec<f32>,
    qt_plain: Vec<f32>,
    qt_rot: Vec<f32>,
    stt: Vec<f32>,
    row_slopes: Vec<f32>,
    /// [`softmax_update_t`]'s per-tile row maxima, subtrahends and lane sums.
    tmax: Vec<f32>,
    sub: Vec<f32>,
    part: Vec<f32>,
    iq: ItemQ,
}

/// `v`'s buffer, `n` long: new elements are `fill`, kept ones keep their old values (every
/// caller overwrites them all), so a buffer of the right size is neither allocated nor set.
fn reuse<T: Copy>(v: &mut Vec<T>, n: usize, fill: T) -> Vec<T> {
    let mut v = std::mem::take(v);
    v.resize(n, fill);
    v
}

pub(crate) fn run(pb: &Problem, kernels: &isa::Kernels, threads: Threads, out: &mut [f32], scratch: &mut Scratch) {
    let ctx = prepare(pb, threads, scratch);
    let items = plan(pb, threads.count());
    let partials = threads.map(&items, |it| (kernels.item)(&ctx, it));
    // Items that share a query tile (a KV split across threads) merge into one partial.
    let mut groups: Vec<(Item, Partial)> = Vec::new();
    for (it, st) in items.into_iter().zip(partials) {
        match groups.last_mut() {
            Some((first, acc)) if first.kh == it.kh && first.q0 == it.q0 => acc.merge(st, pb.d),
            _ => groups.push((it, st)),
        }
    }
    // Finishing (normalise, un-rotate) is row-wise work too: on the threads, each group into
    // its own rows of `out`. A decode step's few rows are finished sooner than the threads
    // are handed work.
    let (d, g) = (pb.d, pb.group());
    let mut rows: Vec<Option<&mut [f32]>> = out.chunks_exact_mut(d).map(Some).collect();
    let mut jobs: Vec<FinishJob> = groups
        .iter()
        .map(|gp| (gp, rows_of(&gp.0, g).map(|(qi, h)| rows[qi * pb.n_head + h].take().expect("an output row of two groups")).collect()))
        .collect();
    threads.at_most(pb.n_q * pb.n_head / FINISH_ROWS).for_each_mut(&mut jobs, |((it, st), out)| finish(pb, it, st, out));
    scratch.keep(ctx);
}

/// A merged item and its rows of the output.
type FinishJob<'g, 'o> = (&'g (Item, Partial), Vec<&'o mut [f32]>);

/// Output rows per thread below which [`finish`] runs on the calling thread: finishing a
/// decode step's 9 rows took 1.9 µs with two threads (llama-bench tg128, SmolLM2), most of it
/// handing the work over.
const FINISH_ROWS: usize = 64;

/// Queries per chunk of [`prepare`]'s parallel work.
const PREPARE_ROWS: usize = 64;

/// Whole query rows for [`prepare`]'s first pass: scaled into `plain`, rotated into `rot`
/// (empty when no K is packed), and whether every rotated value came out finite.
struct QChunk<'a> {
    q: &'a [f32],
    plain: &'a mut [f32],
    rot: &'a mut [f32],
    finite: bool,
}

fn prepare<'p, 'a, 'b>(pb: &'p Problem<'a, 'b>, threads: Threads, scratch: &mut Scratch) -> Ctx<'p, 'a, 'b> {
    let p = pb.p;
    let qscale = if p.softcap == 0.0 { p.scale } else { p.scale / p.softcap };
    let any_packed_k = pb.kv.iter().flatten().any(|s| matches!(s.k, Rows::Packed { .. }));
    let len = pb.q.len();
    let mut q_plain = reuse(&mut scratch.q_plain, len, 0.0);
    let mut q_rot = reuse(&mut scratch.q_rot, if any_packed_k { len } else { 0 }, 0.0);
    // Chunks of whole query rows (a multiple of 32 values: d is), scaled and rotated on the
    // threads; a prefill has hundreds of rows, and this was serial work the other threads
    // waited for.
    let per = PREPARE_ROWS * pb.n_head * pb.d;
    let mut chunks: Vec<QChunk> = pb
        .q
        .chunks(per)
        .zip(q_plain.chunks_mut(per))
        .zip(q_rot.chunks_mut(per).chain(std::iter::repeat_with(|| &mut [][..])))
        .map(|((q, plain), rot)| QChunk { q, plain, rot, finite: true })
        .collect();
    threads.for_each_mut(&mut chunks, |c| {
        for (y, x) in c.plain.iter_mut().zip(c.q) {
            *y = x * qscale;
        }
        if !c.rot.is_empty() {
            c.rot.copy_from_slice(c.plain);
            c.rot.chunks_exact_mut(pb.d).for_each(rotate);
            // A fold, not `all`: without the early exit it vectorizes.
            c.finite = c.rot.iter().fold(true, |ok, x| ok & x.is_finite());
        }
    });
    let finite = chunks.iter().all(|c| c.finite);
    drop(chunks);
    let q_int = (any_packed_k && finite).then(|| {
        let groups = len / 32;
        let mut qi = QInt { q8: reuse(&mut scratch.q8, len, 0), step: reuse(&mut scratch.step, groups, 0.0), sum: reuse(&mut scratch.sum, groups, 0) };
        let per_g = per / 32;
        let mut chunks: Vec<_> = q_rot
            .chunks_mut(per)
            .zip(qi.q8.chunks_mut(per))
            .zip(qi.step.chunks_mut(per_g).zip(qi.sum.chunks_mut(per_g)))
            .map(|((x, q8), (step, sum))| (x, q8, step, sum))
            .collect();
        threads.for_each_mut(&mut chunks, |(x, q8, step, sum)| quantize_groups(x, q8, step, sum));
        qi
    });
    let slopes = (0..pb.n_head).map(|h| alibi_slope(p.max_bias, h, pb.n_head)).collect();
    Ctx { pb, q_plain, q_rot, q_int, slopes, bufs: std::sync::Mutex::new(std::mem::take(&mut scratch.items)) }
}

/// Rounds the rotated queries to their int8 image in place (`q ← q8 · step` per group of
/// 32) and returns the codes; leaves them unchanged and returns `None` when any value is not
/// finite. The scalar oracle's int8 mode (`reference.rs`) calls this; `prepare` does the
/// same per chunk ([`quantize_groups`]).
pub(crate) fn quantize_queries(q_rot: &mut [f32]) -> Option<QInt> {
    if !q_rot.iter().all(|x| x.is_finite()) {
        return None;
    }
    let groups = q_rot.len() / 32;
    let mut qi = QInt { q8: vec![0; q_rot.len()], step: vec![0.0; groups], sum: vec![0; groups] };
    quantize_groups(q_rot, &mut qi.q8, &mut qi.step, &mut qi.sum);
    Some(qi)
}

/// [`quantize_queries`] on finite values, into the given codes, steps and sums.
fn quantize_groups(x: &mut [f32], q8: &mut [i8], step: &mut [f32], sum: &mut [i32]) {
    for (((x, q), st), sm) in x.chunks_exact_mut(32).zip(q8.chunks_exact_mut(32)).zip(step.iter_mut()).zip(sum.iter_mut()) {
        // Fixed lengths, so that the loops below are a few vector instructions each.
        let (x, q): (&mut [f32; 32], &mut [i8; 32]) = (x.try_into().expect("32 values"), q.try_into().expect("32 codes"));
        let s = kernels::quantize_q8(x, q);
        for (v, c) in x.iter_mut().zip(q.iter()) {
            *v = f32::from(*c) * s;
        }
        *st = s;
        *sm = q.iter().map(|c| i32::from(*c)).sum();
    }
}

/// Query tiles × row ranges, ordered so that the items of one query tile are adjacent.
fn plan(pb: &Problem, n_threads: usize) -> Vec<Item> {
    let qt = (query_rows(pb.d) / pb.group()).max(1);
    let q_tiles = pb.n_q.div_ceil(qt);
    let coarse = q_tiles * pb.kv.len();
    let mut items = Vec::new();
    for kh in 0..pb.kv.len() {
        let rows: usize = pb.kv[kh].iter().map(|s| s.n).sum();
        // Split rows only when there are too few query tiles to keep the threads busy.
        let want = (2 * n_threads).div_ceil(coarse.max(1));
        let splits = want.min(rows / MIN_SPLIT_ROWS).max(1);
        let per = rows.div_ceil(splits).div_ceil(TILE) * TILE;
        for t in 0..q_tiles {
            let (q0, q1) = (t * qt, ((t + 1) * qt).min(pb.n_q));
            let mut r0 = 0;
            loop {
                let r1 = (r0 + per.max(TILE)).min(rows);
                items.push(Item { kh, q0, q1, r0, r1 });
                r0 = r1;
                if r0 >= rows {
                    break;
                }
            }
        }
    }
    items
}

/// Sinks, normalisation and un-rotation: the item's output rows (`out`, one per row, in
/// [`rows_of`] order).
fn finish(pb: &Problem, it: &Item, st: &Partial, out: &mut [&mut [f32]]) {
    let (d, g) = (pb.d, pb.group());
    let mut rot = vec![0.0f32; d];
    for (r, ((_, h), o)) in rows_of(it, g).zip(out.iter_mut()).enumerate() {
        let (mut scale_acc, mut sum) = (1.0, st.sum[r]);
        if let Some(sinks) = pb.sinks {
            let s = sinks[h];
            let m = st.max[r].max(s);
            scale_acc = (st.max[r] - m).exp();
            sum = sum * scale_acc + (s - m).exp();
        }
        let inv = if sum == 0.0 { 0.0 } else { scale_acc / sum };
        if st.plain.is_empty() {
            o.fill(0.0);
        } else {
            for (y, x) in o.iter_mut().zip(&st.plain[r * d..(r + 1) * d]) {
                *y = x * inv;
            }
        }
        if !st.rot.is_empty() {
            rot.copy_from_slice(&st.rot[r * d..(r + 1) * d]);
            unrotate(&mut rot);
            for (y, x) in o.iter_mut().zip(&rot) {
                *y += x * inv;
            }
        }
    }
}

/// The (query, head) pairs of an item's rows, in row order.
fn rows_of(it: &Item, g: usize) -> impl Iterator<Item = (usize, usize)> {
    let (kh, q0, q1) = (it.kh, it.q0, it.q1);
    (q0..q1).flat_map(move |qi| (0..g).map(move |hg| (qi, kh * g + hg)))
}

/// Scratch and state of one item while it runs.
struct Work<'c, 'p, 'a, 'b> {
    ctx: &'c Ctx<'p, 'a, 'b>,
    it: Item,
    m: usize,
    /// The item's buffers: its query rows (`q_plain`, `q_rot`, `m × d`), K and V tiles
    /// (`TILE × d`, and one spare row each for a page's centroid), scores `s` (`m × TILE`),
    /// the tile's mask values `mv` (`[query][TILE]`, the head's slope applied later), and
    /// for wide tiles the transposed layout (below).
    b: ItemBufs,
    /// Whether the tile's mask values (`mv`) are all zero: it then changes no score.
    mask_zero: bool,
    st: Partial,
    /// Transposed layout for wide (prefill) tiles: `m` rounded up to 16, q as `d × mp`
    /// (`b.qt_plain`, `b.qt_rot`), scores as `TILE × mp` (`b.stt`). 0 when the tile
    /// kernels run row by row.
    mp: usize,
    /// Whether `b.iq` holds the item's int8 queries for the packed decode kernels
    /// (`F::PACKED_DECODE`, narrow tiles, finite q).
    iq: bool,
}

/// The int8 queries of an item's rows in the layout of [`DecodeJob`].
#[derive(Debug, Default)]
struct ItemQ {
    q32: Vec<i32>,
    step: Vec<f32>,
    sum: Vec<i32>,
}

/// Fills `out` with the int8 queries of the item's rows; false when there are none.
fn item_q(ctx: &Ctx, it: &Item, out: &mut ItemQ) -> bool {
    let Some(qi) = ctx.q_int.as_ref() else { return false };
    let pb = ctx.pb;
    let (d, g) = (pb.d, pb.group());
    let ng = d / 32;
    out.q32.clear();
    out.step.clear();
    out.sum.clear();
    for q in it.q0..it.q1 {
        for hg in 0..g {
            let row = q * pb.n_head + it.kh * g + hg;
            for c in qi.q8[row * d..(row + 1) * d].chunks_exact(4) {
                out.q32.push(i32::from_le_bytes([c[0].to_le_bytes()[0], c[1].to_le_bytes()[0], c[2].to_le_bytes()[0], c[3].to_le_bytes()[0]]));
            }
            out.step.extend_from_slice(&qi.step[row * ng..(row + 1) * ng]);
            out.sum.extend_from_slice(&qi.sum[row * ng..(row + 1) * ng]);
        }
    }
    true
}

/// `q` (`m × d`) transposed into `t` (`d × mp`), zero-padded; empty when `q` is.
fn transpose(q: &[f32], m: usize, d: usize, mp: usize, t: &mut Vec<f32>) {
    t.clear();
    if q.is_empty() {
        return;
    }
    t.resize(d * mp, 0.0);
    for r in 0..m {
        for x in 0..d {
            t[x * mp + r] = q[r * d + x];
        }
    }
}

/// Processes one item; instantiated per instruction set by `isa.rs`.
#[inline(always)]
pub(crate) fn run_item<F: Flavor>(ctx: &Ctx, it: &Item) -> Partial {
    let pb = ctx.pb;
    // The first segment the item reads, on its way while the item's scratch is set up.
    let mut end = 0;
    if let Some(first) = pb.kv[it.kh].iter().find(|s| {
        end += s.n;
        end > it.r0
    }) {
        prefetch_segment(first);
    }
    let (d, g) = (pb.d, pb.group());
    let m = (it.q1 - it.q0) * g;
    let mut b = lock(&ctx.bufs).pop().unwrap_or_default();
    let gather = |src: &[f32], v: &mut Vec<f32>| {
        v.clear();
        if !src.is_empty() {
            for qi in it.q0..it.q1 {
                v.extend_from_slice(&src[(qi * pb.n_head + it.kh * g) * d..][..g * d]);
            }
        }
    };
    gather(&ctx.q_plain, &mut b.q_plain);
    gather(&ctx.q_rot, &mut b.q_rot);
    // Every element of these is written before it is read (per tile, for the rows used).
    b.kt.resize((TILE + 1) * d, 0.0);
    b.vt.resize((TILE + 1) * d, 0.0);
    b.s.resize(m * TILE, 0.0);
    b.mv.resize((it.q1 - it.q0) * TILE, 0.0);
    b.row_slopes.clear();
    b.row_slopes.extend((0..m).map(|r| ctx.slopes[it.kh * g + r % g]));
    let mut w = Work { ctx, it: *it, m, b, mask_zero: false, st: Partial::new(m), mp: 0, iq: false };
    if F::WIDE && m >= WIDE_MIN_ROWS {
        w.mp = m.div_ceil(16) * 16;
        transpose(&w.b.q_plain, m, d, w.mp, &mut w.b.qt_plain);
        transpose(&w.b.q_rot, m, d, w.mp, &mut w.b.qt_rot);
        w.b.stt.resize(TILE * w.mp, 0.0);
    }
    if F::PACKED_DECODE {
        w.iq = item_q(ctx, it, &mut w.b.iq);
    }
    let mut base = 0;
    let segs = &pb.kv[it.kh];
    for (i, seg) in segs.iter().enumerate() {
        let (lo, hi) = (it.r0.max(base), it.r1.min(base + seg.n));
        // The next segment, when this item reads any of it.
        let next_at = base + seg.n;
        if let Some(next) = segs.get(i + 1).filter(|n| next_at < it.r1 && next_at + n.n > it.r0) {
            prefetch_segment(next);
        }
        let mut r = lo;
        if F::PACKED_DECODE && hi > lo {
            r += packed_rows::<F>(&mut w, seg, lo - base, hi - base);
        }
        while r < hi {
            let r1 = (r + TILE).min(hi);
            tile::<F>(&mut w, seg, r - base, r1 - base);
            r = r1;
        }
        base += seg.n;
    }
    lock(&ctx.bufs).push(w.b);
    w.st
}

/// Asks the CPU to bring a packed segment's bytes into cache while the current one is being
/// read. A head's consecutive pages are separate allocations, so the hardware prefetcher,
/// which follows sequential streams, started each page with misses, and a page's centroids
/// (stored after its rows) always missed: perf put 8% of a decode step at depth 8192 on their
/// first load. Measured at depth 8192 (k4v4): decode 60 -> 75–81 t/s. A page's work (~2 µs)
/// is far longer than a memory round trip, so one page ahead suffices (two ahead, or into L2
/// only, measured no better).
#[inline(always)]
fn prefetch_segment(seg: &Segment) {
    for rows in [seg.k, seg.v] {
        match rows {
            Rows::Packed { data, center, .. } => {
                prefetch(data);
                prefetch(center.unwrap_or_default());
            }
            Rows::F16(v) => prefetch(v),
        }
    }
}

/// Prefetches every cache line of `items` into L1 (a hint: it never faults).
#[inline(always)]
pub(crate) fn prefetch<T>(items: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in items.chunks((64 / std::mem::size_of::<T>().max(1)).max(1)) {
        // SAFETY: a prefetch is a hint that cannot fault, and SSE is in x86_64's baseline.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = items;
}

/// Runs the packed decode kernel on the longest run of whole blocks of rows `r0..r1` of
/// `seg` (K and V packed, at any width); returns how many rows it
/// consumed (0 when the segment does not qualify, and the tile path takes every row).
#[inline(always)]
fn packed_rows<F: Flavor>(w: &mut Work, seg: &Segment, r0: usize, r1: usize) -> usize {
    let (Rows::Packed { codec: kc, data: kd, center: kcenter }, Rows::Packed { codec: vc, data: vd, center: vcenter }) = (seg.k, seg.v) else {
        return 0;
    };
    let kbits = kc.quant().bits();
    let n = (r1 - r0) / PACKED_BLOCK * PACKED_BLOCK;
    let iq = &w.b.iq;
    if !w.iq {
        return 0;
    }
    if n == 0 || w.m > QUERY_ROWS {
        return 0;
    }
    let pb = w.ctx.pb;
    let (krb, vrb) = (kc.row_bytes(), vc.row_bytes());
    // One mask row per query of the item (at most QUERY_ROWS), on the stack: this runs once
    // per page.
    let mut masks: [&[half::f16]; QUERY_ROWS] = [&[]; QUERY_ROWS];
    let nq = w.it.q1 - w.it.q0;
    if let Some(mk) = pb.mask {
        for (m, q) in masks.iter_mut().zip(w.it.q0..w.it.q1) {
            *m = &mk.data[q * mk.stride + seg.first_cell + r0..][..n];
        }
    }
    let d = pb.d;
    // A centred K adds `q · center` to every score of the segment (the centroid is decoded
    // into the K tile's scratch, free between tiles).
    let mut kbias = [0.0f32; QUERY_ROWS];
    if let Some(c) = kcenter {
        F::decode_packed(&RowCodec::centroid(d), c, &mut w.b.kt[..d]);
        F::scores(&w.b.q_rot, w.m, &w.b.kt[..d], 1, d, &mut kbias, 1);
    }
    // A centred V adds `center` times the softmax mass of the rows (below).
    let before: Option<([f32; QUERY_ROWS], [f32; QUERY_ROWS])> = vcenter.map(|_| {
        let (mut mx, mut sm) = ([0.0; QUERY_ROWS], [0.0; QUERY_ROWS]);
        mx[..w.m].copy_from_slice(&w.st.max);
        sm[..w.m].copy_from_slice(&w.st.sum);
        (mx, sm)
    });
    let job = DecodeJob {
        d: pb.d,
        m: w.m,
        g: pb.group(),
        kbits,
        vbits: vc.quant().bits(),
        krb,
        vrb,
        k: &kd[r0 * krb..(r0 + n) * krb],
        v: &vd[r0 * vrb..(r0 + n) * vrb],
        n,
        q32: &iq.q32,
        qstep: &iq.step,
        qsum: &iq.sum,
        mask: pb.mask.map(|_| &masks[..nq]),
        slopes: &w.b.row_slopes,
        kbias: &kbias[..w.m],
        softcap: pb.p.softcap,
    };
    if w.st.rot.is_empty() {
        w.st.rot.resize(w.m * pb.d, 0.0);
    }
    F::packed_decode(&job, &mut w.st.max, &mut w.st.sum, &mut w.st.rot, &mut w.st.plain);
    if let (Some(c), Some((max0, sum0))) = (vcenter, before) {
        let center = &mut w.b.vt[..d];
        F::decode_packed(&RowCodec::centroid(d), c, center);
        for r in 0..w.m {
            let (max, sum) = (w.st.max[r], w.st.sum[r]);
            let old = if max0[r] == f32::NEG_INFINITY { 0.0 } else { sum0[r] * (max0[r] - max).exp() };
            let mass = sum - old;
            w.st.rot[r * d..(r + 1) * d].iter_mut().zip(center.iter()).for_each(|(a, c)| *a += mass * c);
        }
    }
    n
}

/// Loads mask values of the tile; returns false when every cell is dropped for every query.
#[inline(always)]
fn load_mask(w: &mut Work, seg: &Segment, r0: usize, nj: usize) -> bool {
    let Some(mask) = w.ctx.pb.mask else { return true };
    let (mut any, mut zero) = (false, true);
    for (i, qi) in (w.it.q0..w.it.q1).enumerate() {
        let src = &mask.data[qi * mask.stride + seg.first_cell + r0..][..nj];
        let dst = &mut w.b.mv[i * TILE..i * TILE + nj];
        // Converted as a slice (8 at a time), then checked: a prefill item loads 128 rows of
        // mask per tile, and converting them one at a time was a visible share of prefill.
        src.convert_to_f32_slice(dst);
        any |= dst.iter().fold(false, |a, x| a | (*x != f32::NEG_INFINITY));
        zero &= dst.iter().fold(true, |a, x| a & (*x == 0.0));
    }
    w.mask_zero = zero;
    any
}

/// Decodes rows `r0..r0+nj` of `rows` into `out` (a tile and one spare row for a centroid);
/// returns whether they are in rotated space.
#[inline(always)]
fn decode_tile<F: Flavor>(rows: Rows, d: usize, r0: usize, nj: usize, out: &mut [f32]) -> bool {
    match rows {
        Rows::F16(v) => {
            F::f16_rows(&v[r0 * d..(r0 + nj) * d], &mut out[..nj * d]);
            false
        }
        Rows::Packed { codec, data, center } => {
            let rb = codec.row_bytes();
            for (j, o) in out[..nj * d].chunks_exact_mut(d).enumerate() {
                F::decode_packed(codec, &data[(r0 + j) * rb..][..rb], o);
            }
            if let Some(c) = center {
                let (tile, spare) = out.split_at_mut(TILE * d);
                F::decode_packed(&RowCodec::centroid(d), c, &mut spare[..d]);
                for o in tile[..nj * d].chunks_exact_mut(d) {
                    o.iter_mut().zip(&spare[..d]).for_each(|(x, c)| *x += c);
                }
            }
            true
        }
    }
}

#[inline(always)]
fn tile<F: Flavor>(w: &mut Work, seg: &Segment, r0: usize, r1: usize) {
    let pb = w.ctx.pb;
    let (d, nj) = (pb.d, r1 - r0);
    if !load_mask(w, seg, r0, nj) {
        return;
    }
    let wide = w.mp > 0;
    let rotated = decode_tile::<F>(seg.k, d, r0, nj, &mut w.b.kt);
    if wide {
        let qt = if rotated { &w.b.qt_rot } else { &w.b.qt_plain };
        F::scores_t(qt, w.mp, &w.b.kt, nj, d, &mut w.b.stt);
        if !softmax_update_t::<F>(w, nj) {
            return;
        }
    } else {
        let q = if rotated { &w.b.q_rot } else { &w.b.q_plain };
        F::scores(q, w.m, &w.b.kt, nj, d, &mut w.b.s, TILE);
        if !softmax_update::<F>(w, nj) {
            return;
        }
    }
    let rotated = decode_tile::<F>(seg.v, d, r0, nj, &mut w.b.vt);
    let acc = if rotated { &mut w.st.rot } else { &mut w.st.plain };
    if acc.is_empty() {
        acc.resize(w.m * d, 0.0);
    }
    if wide {
        F::accumulate_t(&w.b.stt, w.mp, &w.b.vt[..nj * d], nj, d, w.m, acc);
        return;
    }
    F::accumulate_rows(&w.b.s, TILE, &w.b.vt, nj, d, w.m, acc);
}

/// Rescales row `r` of the accumulators and the sum when its running max grows.
#[inline(always)]
fn raise_max(st: &mut Partial, r: usize, d: usize, new: f32) {
    let old = st.max[r];
    if new > old {
        let alpha = (old - new).exp();
        st.sum[r] *= alpha;
        for acc in [&mut st.plain, &mut st.rot] {
            if !acc.is_empty() {
                acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= alpha);
            }
        }
        st.max[r] = new;
    }
}

/// [`softmax_update`] on transposed scores (`w.b.stt`, `[key][row]`): every loop runs along
/// the query rows, so it vectorizes across them.
#[inline(always)]
fn softmax_update_t<F: Flavor>(w: &mut Work, nj: usize) -> bool {
    let pb = w.ctx.pb;
    let (d, g, m, mp) = (pb.d, pb.group(), w.m, w.mp);
    let st = &mut w.b.stt[..nj * mp];
    if pb.p.softcap != 0.0 {
        let c = pb.p.softcap;
        st.iter_mut().for_each(|x| *x = kernels::softcap::<F>(*x, c));
    }
    // A tile whose mask is all zeros (every tile off the causal diagonal) changes no score.
    if pb.mask.is_some() && !w.mask_zero {
        for (j, row) in st.chunks_exact_mut(mp).enumerate() {
            // Rows are (query, head in group): one mask value per query.
            for (qi, rows) in row[..m].chunks_exact_mut(g).enumerate() {
                let mv = w.b.mv[qi * TILE + j];
                for (x, &slope) in rows.iter_mut().zip(&w.b.row_slopes[qi * g..]) {
                    *x = if mv == f32::NEG_INFINITY { f32::NEG_INFINITY } else { F::fma(slope, mv, *x) };
                }
            }
        }
    }
    let (tmax, sub, part) = (&mut w.b.tmax, &mut w.b.sub, &mut w.b.part);
    tmax.clear();
    tmax.resize(mp, f32::NEG_INFINITY);
    for row in st.chunks_exact(mp) {
        for (t, x) in tmax.iter_mut().zip(row) {
            *t = if *x > *t { *x } else { *t };
        }
    }
    let mut any = false;
    sub.clear();
    sub.resize(mp, 0.0);
    for r in 0..m {
        let new = w.st.max[r].max(tmax[r]);
        if new == f32::NEG_INFINITY {
            continue; // every score of the row is −∞: exp(−∞ − 0) = 0
        }
        any = true;
        raise_max(&mut w.st, r, d, new);
        sub[r] = new;
    }
    if !any {
        return false;
    }
    // Each row's sum in the order of `kernels::sum_lanes` (what the decode path uses): key
    // `j` goes to partial `j % LANES`, then `hsum`'s tree. A row then gets the same bits as
    // when it is decoded alone (see `scores_t_avx512` for why that matters).
    part.clear();
    part.resize(kernels::LANES * mp, 0.0);
    for (j, row) in st.chunks_exact_mut(mp).enumerate() {
        F::exp_rows(row, sub, &mut part[(j % kernels::LANES) * mp..][..mp]);
    }
    let mut lanes = kernels::LANES / 2;
    while lanes > 0 {
        let (lo, hi) = part.split_at_mut(lanes * mp);
        for (a, b) in lo.iter_mut().zip(&hi[..lanes * mp]) {
            *a += *b;
        }
        lanes /= 2;
    }
    for r in 0..m {
        w.st.sum[r] += part[r];
    }
    true
}

/// Softcap, mask, online-softmax update; leaves probabilities in `w.b.s`. Returns false when no
/// row got any weight from this tile.
#[inline(always)]
fn softmax_update<F: Flavor>(w: &mut Work, nj: usize) -> bool {
    let pb = w.ctx.pb;
    let (d, g) = (pb.d, pb.group());
    let softcap = pb.p.softcap;
    let mut any = false;
    for r in 0..w.m {
        let (qi_local, h) = (r / g, w.it.kh * g + r % g);
        let s = &mut w.b.s[r * TILE..r * TILE + nj];
        if softcap != 0.0 {
            s.iter_mut().for_each(|x| *x = kernels::softcap::<F>(*x, softcap));
        }
        if pb.mask.is_some() {
            let slope = w.ctx.slopes[h];
            let mv = &w.b.mv[qi_local * TILE..qi_local * TILE + nj];
            for (x, m) in s.iter_mut().zip(mv) {
                *x = if *m == f32::NEG_INFINITY { f32::NEG_INFINITY } else { F::fma(slope, *m, *x) };
            }
        }
        let tmax = kernels::max_lanes(s);
        let old = w.st.max[r];
        let new = old.max(tmax);
        if new == f32::NEG_INFINITY {
            s.fill(0.0);
            continue;
        }
        any = true;
        for x in s.iter_mut() {
            *x = kernels::exp::<F>(*x - new);
        }
        let sum = kernels::sum_lanes(s);
        raise_max(&mut w.st, r, d, new);
        w.st.sum[r] += sum;
    }
    any
}
