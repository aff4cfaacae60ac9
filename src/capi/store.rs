//! The standalone compressed KV cache behind `dspark_cache_t`, in safe Rust.
//!
//! One [`KvStore`] pair (K, V) per layer. Each store has one stream per sequence and
//! `max_tokens` cells per stream: the token at position p of sequence s lives in cell p of
//! stream s, so positions never need a cell map and attention reads a sequence as one run of
//! cells. Per (sequence, layer) a [`Lane`] records the length and the removed ranges
//! ("holes"), which attention masks out.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::f16;

use super::error::{fail, Error, Result, DSPARK_ERR_ARG, DSPARK_ERR_FORMAT, DSPARK_ERR_FULL, DSPARK_ERR_IO, DSPARK_ERR_RANGE};
use crate::attn::{self, FaParams, Mask};
use crate::codec::{Format, Quant, RowCodec};
use crate::kv::cold::{ColdStore, SpillFile};
use crate::kv::tier::{self, Tier};
use crate::kv::{KvStore, PageView, StoreConfig, PAGE};

/// Most memory an empty cache may take (256 MiB). Pages and page tables grow as tokens
/// arrive, so an empty cache costs the same whatever `max_tokens` is: see
/// [`Shape::fixed_bytes`]. Real models (a few hundred layers x 256 sequences, head_dim up
/// to 512) need a few MiB; a shape above the budget is a typo, not a model.
pub const MAX_FIXED_BYTES: u128 = 256 << 20;

/// Fixed bytes of one (layer, sequence) lane: its [`Lane`] and a K and a V stream (a page
/// table header, a clock and a high-water mark), rounded up.
const LANE_BYTES: u128 = 160;

/// Most mask values one attention call holds at once (query rows × sequence length).
const MASK_BLOCK_VALUES: usize = 1 << 20;

/// Most threads one attention call may use.
pub const MAX_THREADS: usize = 256;

/// The widths of one layer's K and V (`None`: f16).
pub type LayerQuants = (Option<Quant>, Option<Quant>);

/// The shape and format of a cache: what a saved cache must match to be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Layers.
    pub n_layer: usize,
    /// KV heads per layer.
    pub n_head_kv: usize,
    /// Query heads.
    pub n_head: usize,
    /// Values per head row.
    pub head_dim: usize,
    /// Cells per sequence.
    pub max_tokens: usize,
    /// Sequences.
    pub n_seq_max: usize,
    /// `None`: f16.
    pub format: Option<Format>,
    /// Per-layer widths from a profile; they replace `format`.
    pub layers: Option<std::sync::Arc<[LayerQuants]>>,
}

impl Shape {
    /// The width of layer `layer`'s K (`is_k`) or V.
    #[must_use]
    pub fn quant(&self, layer: usize, is_k: bool) -> Option<Quant> {
        let (k, v) = match &self.layers {
            Some(l) => l[layer],
            None => (self.format.map(|f| f.k), self.format.map(|f| f.v)),
        };
        if is_k { k } else { v }
    }

    /// Whether every layer has the same widths (a file-format version 2 image can hold it).
    #[must_use]
    pub fn is_uniform(&self) -> bool {
        (0..self.n_layer).all(|l| (self.quant(l, true), self.quant(l, false)) == (self.quant(0, true), self.quant(0, false)))
    }

    /// Checks that the shape can be built.
    ///
    /// # Errors
    /// `DSPARK_ERR_ARG` for a zero or inconsistent field.
    pub fn validate(&self) -> Result<()> {
        let s = self;
        for (name, v) in [
            ("n_layer", s.n_layer),
            ("n_head_kv", s.n_head_kv),
            ("n_head", s.n_head),
            ("head_dim", s.head_dim),
            ("max_tokens", s.max_tokens),
            ("n_seq_max", s.n_seq_max),
        ] {
            if v == 0 {
                return fail(DSPARK_ERR_ARG, format!("{name} must be at least 1"));
            }
        }
        if !s.n_head.is_multiple_of(s.n_head_kv) {
            return fail(DSPARK_ERR_ARG, format!("n_head {} is not a multiple of n_head_kv {}", s.n_head, s.n_head_kv));
        }
        if !s.head_dim.is_multiple_of(32) || s.head_dim > crate::codec::MAX_HEAD_DIM {
            return fail(DSPARK_ERR_ARG, format!("head_dim {} is not a multiple of 32 up to {}", s.head_dim, crate::codec::MAX_HEAD_DIM));
        }
        // Cells of all sequences are addressed with one usize, and positions are i32 in the API.
        let cells = s.max_tokens.checked_mul(s.n_seq_max);
        if s.max_tokens > i32::MAX as usize || cells.is_none() {
            return fail(DSPARK_ERR_ARG, "max_tokens x n_seq_max is too large");
        }
        let fixed = s.fixed_bytes();
        if fixed > MAX_FIXED_BYTES {
            return fail(
                DSPARK_ERR_ARG,
                format!("n_layer {} x n_seq_max {} (head_dim {}): an empty cache would take {fixed} bytes, more than {MAX_FIXED_BYTES}", s.n_layer, s.n_seq_max, s.head_dim),
            );
        }
        Ok(())
    }

    /// About the bytes of an empty cache of this shape: per layer, a K and a V store with a
    /// page of zeros for one head (`PAGE x head_dim` f16 values, what never-written cells
    /// read as), and per (layer, sequence) [`LANE_BYTES`].
    #[must_use]
    pub fn fixed_bytes(&self) -> u128 {
        let per_layer = 2 * (PAGE as u128 * self.head_dim as u128 * 2 + 256);
        self.n_layer as u128 * (per_layer + self.n_seq_max as u128 * LANE_BYTES)
    }

    /// Values per cell (all KV heads).
    #[must_use]
    pub fn row_len(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Pages per sequence and store.
    #[must_use]
    pub fn pages_per_seq(&self) -> usize {
        self.max_tokens.div_ceil(PAGE)
    }

    /// Bytes of one packed page of a store whose code width is `quant` (`None`: f16 page).
    #[must_use]
    pub fn page_bytes(&self, quant: Option<crate::codec::Quant>) -> usize {
        let rows = self.n_head_kv * PAGE;
        match quant {
            None => rows * self.head_dim * 2,
            Some(q) => rows * RowCodec::new(q, self.head_dim).map_or(0, |c| c.row_bytes()),
        }
    }
}

/// Parses a format name as the C API accepts it (`f16` or `k<b>v<b>`).
///
/// # Errors
/// `DSPARK_ERR_FORMAT` if the name is unknown.
pub fn parse_format(name: &str) -> Result<Option<Format>> {
    match crate::ggml::Config::default().with_format_name(name) {
        Ok(c) => Ok(c.format),
        Err(e) => fail(DSPARK_ERR_FORMAT, format!("{e} (or f16)")),
    }
}

/// One (sequence, layer): its length and its removed ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lane {
    /// Positions appended so far (the next token's position).
    pub len: usize,
    /// Removed ranges `[p0, p1)`, sorted, disjoint, not touching, all below `len`.
    pub holes: Vec<(usize, usize)>,
}

impl Lane {
    /// Whether position `p` was removed.
    fn is_hole(&self, p: usize) -> bool {
        self.holes.iter().any(|&(a, b)| (a..b).contains(&p))
    }

    /// Adds `[p0, p1)` (p1 <= len) to the holes, merging neighbours.
    fn add_hole(&mut self, p0: usize, p1: usize) {
        let mut all = std::mem::take(&mut self.holes);
        all.push((p0, p1));
        all.sort_unstable();
        for (a, b) in all {
            match self.holes.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => self.holes.push((a, b)),
            }
        }
    }

    /// Whether position `p` holds a token (below the length, not in a hole).
    fn is_live(&self, p: usize) -> bool {
        p < self.len && !self.is_hole(p)
    }

    /// The runs of positions that hold tokens: the complement of the holes in `[0, len)`.
    fn live_runs(&self) -> Vec<(usize, usize)> {
        let mut runs = Vec::with_capacity(self.holes.len() + 1);
        let mut at = 0;
        for &(a, b) in &self.holes {
            if at < a {
                runs.push((at, a));
            }
            at = b;
        }
        if at < self.len {
            runs.push((at, self.len));
        }
        runs
    }

    /// The lane of `len` positions whose tokens are `runs` (sorted, disjoint).
    fn from_runs(len: usize, runs: &[(usize, usize)]) -> Lane {
        let mut holes = Vec::new();
        let mut at = 0;
        for &(a, b) in runs {
            if at < a {
                holes.push((at, a));
            }
            at = at.max(b);
        }
        if at < len {
            holes.push((at, len));
        }
        Lane { len, holes }
    }

    /// Drops positions from `p0` on.
    fn truncate(&mut self, p0: usize) {
        self.len = self.len.min(p0);
        let len = self.len;
        self.holes.retain_mut(|h| {
            h.1 = h.1.min(len);
            h.0 < h.1
        });
    }
}

/// K and V of one layer.
#[allow(missing_debug_implementations)] // KvStore has no Debug: pages are megabytes
pub struct LayerKv {
    /// Keys.
    pub k: KvStore,
    /// Values.
    pub v: KvStore,
}

/// Everything a load replaces.
pub struct State {
    /// Per layer.
    pub layers: Vec<LayerKv>,
    /// `lanes[seq][layer]`.
    pub lanes: Vec<Vec<Lane>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("layers", &self.layers.len()).field("lanes", &self.lanes).finish_non_exhaustive()
    }
}

impl State {
    /// Every K and V store.
    pub fn stores_mut(&mut self) -> impl Iterator<Item = &mut KvStore> {
        self.layers.iter_mut().flat_map(|lk| [&mut lk.k, &mut lk.v])
    }

    /// An empty state of `shape`.
    ///
    /// # Errors
    /// If a store cannot be built (shape not validated).
    pub fn empty(shape: &Shape, window: usize) -> Result<State> {
        let store = |q| {
            KvStore::new(StoreConfig { quant: q, window, digests: false, centered: false, window_quant: None, recent: 0 }, shape.n_head_kv, shape.head_dim, shape.max_tokens, shape.n_seq_max)
                .or_else(|e| fail(DSPARK_ERR_ARG, e))
        };
        let layers = (0..shape.n_layer)
            .map(|l| Ok(LayerKv { k: store(shape.quant(l, true))?, v: store(shape.quant(l, false))? }))
            .collect::<Result<Vec<_>>>()?;
        Ok(State { layers, lanes: vec![vec![Lane::default(); shape.n_layer]; shape.n_seq_max] })
    }
}

/// Attention parameters after the C struct was read and defaults applied.
#[derive(Clone, Copy, Debug)]
pub struct AttnArgs<'a> {
    /// Score scale (0 already replaced by 1/sqrt(head_dim)).
    pub scale: f32,
    /// ALiBi maximum bias.
    pub max_bias: f32,
    /// Soft-capping.
    pub softcap: f32,
    /// Causal batch.
    pub causal: bool,
    /// User mask and its row stride (in elements).
    pub mask: Option<(MaskData<'a>, usize)>,
    /// Sinks, one per query head.
    pub sinks: Option<&'a [f32]>,
    /// Threads (0: the cache's default).
    pub n_threads: usize,
}

/// A user mask's values.
#[derive(Clone, Copy, Debug)]
pub enum MaskData<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// f16 values.
    F16(&'a [f16]),
}

impl MaskData<'_> {
    fn get(&self, i: usize) -> f16 {
        match self {
            MaskData::F32(m) => f16::from_f32(m[i]),
            MaskData::F16(m) => m[i],
        }
    }
}

/// The standalone cache.
#[derive(Debug)]
pub struct Cache {
    /// Shape and format (fixed).
    pub shape: Shape,
    /// f16 window in tokens.
    pub window: usize,
    /// Default attention threads (resolved, >= 1).
    pub n_threads: usize,
    state: RwLock<State>,
    attn_calls: AtomicU64,
    /// The cache's worker threads (`n_threads`), made on the first call that needs them.
    workers: std::sync::OnceLock<attn::Workers>,
    /// The memory budget's cold tier, if the cache has a budget.
    tier: Option<Arc<Tier>>,
}

/// Figures of one cache.
pub type CacheStats = crate::kv::Stats;

fn check_range(what: &str, i: usize, n: usize) -> Result<()> {
    if i < n {
        Ok(())
    } else {
        fail(DSPARK_ERR_RANGE, format!("{what} {i} is out of range (0..{n})"))
    }
}

impl Cache {
    /// An empty cache.
    ///
    /// # Errors
    /// `DSPARK_ERR_ARG` for a bad shape.
    pub fn new(shape: Shape, window: usize, n_threads: usize) -> Result<Cache> {
        shape.validate()?;
        let n_threads = if n_threads == 0 { std::thread::available_parallelism().map_or(1, usize::from) } else { n_threads };
        let n_threads = n_threads.min(MAX_THREADS);
        Ok(Cache { state: RwLock::new(State::empty(&shape, window)?), shape, window, n_threads, attn_calls: AtomicU64::new(0), workers: std::sync::OnceLock::new(), tier: None })
    }

    /// Gives the cache a memory budget: compressed pages beyond `bytes` in RAM move to a spill
    /// file in `DSPARK_SPILL_DIR` (else the system temp folder). Attention reads a layer's cold
    /// pages back for its call (so RAM exceeds the budget by one layer's pages meanwhile);
    /// sequence copies and shifts and saves read every cold page back for their duration.
    ///
    /// # Errors
    /// `DSPARK_ERR_IO` when the spill file cannot be made.
    pub fn with_budget(mut self, bytes: u64) -> Result<Cache> {
        let dir = std::env::var_os("DSPARK_SPILL_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let file = SpillFile::create(&dir).or_else(|e| fail(DSPARK_ERR_IO, format!("cannot create the KV spill file in {}: {e}", dir.display())))?;
        self.set_cold(Box::new(file), bytes);
        Ok(self)
    }

    /// Gives the cache a budget of `bytes` spilling to `cold` (tests put a failing store here).
    pub fn set_cold(&mut self, cold: Box<dyn ColdStore>, bytes: u64) {
        let tier = Arc::new(Tier::new(bytes, cold));
        let st = self.state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        st.stores_mut().for_each(|s| s.set_tier(tier.clone()));
        self.tier = Some(tier);
    }

    /// Brings the pages in RAM within the budget (staged copies dropped, the least recently
    /// seen compressed pages moved out).
    fn fit(&self, st: &mut State) -> Result<()> {
        let Some(t) = &self.tier else { return Ok(()) };
        let mut stores: Vec<&mut KvStore> = st.stores_mut().collect();
        tier::fit(&mut stores, t.budget()).or_else(|e| fail(DSPARK_ERR_IO, format!("moving KV pages to the spill file ({}): {e}", t.describe())))?;
        Ok(())
    }

    /// Reads every cold page back (for operations that read pages as they are stored).
    fn stage_all(&self, st: &mut State) -> Result<()> {
        let Some(t) = &self.tier else { return Ok(()) };
        for store in st.stores_mut() {
            for seq in 0..store.n_stream() {
                let n = store.cells();
                store.stage(seq, 0, n).or_else(|e| fail(DSPARK_ERR_IO, format!("reading KV pages from the spill file ({}): {e}", t.describe())))?;
            }
        }
        Ok(())
    }

    /// Runs `f` on the state with every page readable (a save): with a budget, the cold pages
    /// are read back for the call and moved out again after it.
    ///
    /// # Errors
    /// `DSPARK_ERR_IO` from the cold tier.
    pub fn with_pages<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T> {
        if self.tier.is_none() {
            return Ok(f(&self.read()));
        }
        let mut st = self.write();
        self.stage_all(&mut st)?;
        let v = f(&st);
        self.fit(&mut st)?;
        Ok(v)
    }

    /// Shared access to the state (a panic in another call never poisons the cache for good:
    /// every mutation leaves the state consistent before it can panic).
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the whole state (a load).
    ///
    /// # Errors
    /// `DSPARK_ERR_IO` when a budget's pages cannot be moved out (the new state is kept,
    /// over the budget).
    pub fn replace(&self, mut new: State) -> Result<()> {
        if let Some(t) = &self.tier {
            new.stores_mut().for_each(|s| s.set_tier(t.clone()));
        }
        let mut st = self.write();
        *st = new;
        self.fit(&mut st)
    }

    fn check_layer_seq(&self, layer: usize, seq: usize) -> Result<()> {
        check_range("layer", layer, self.shape.n_layer)?;
        check_range("sequence", seq, self.shape.n_seq_max)
    }

    /// Appends `n` tokens' rows (`k.len() == v.len() == n * row_len`).
    ///
    /// # Errors
    /// `DSPARK_ERR_RANGE` / `DSPARK_ERR_FULL` / `DSPARK_ERR_ARG`.
    pub fn append(&self, layer: usize, seq: usize, k: &[f32], v: &[f32], n: usize) -> Result<()> {
        self.check_layer_seq(layer, seq)?;
        let rl = self.shape.row_len();
        if k.len() != n * rl || v.len() != n * rl {
            return fail(DSPARK_ERR_ARG, "k and v must hold n_tokens x n_head_kv x head_dim values");
        }
        if n == 0 {
            return Ok(());
        }
        let mut st = self.write();
        let len = st.lanes[seq][layer].len;
        if len + n > self.shape.max_tokens {
            return fail(
                DSPARK_ERR_FULL,
                format!("sequence {seq} of layer {layer} holds {len} tokens; {n} more exceed max_tokens {}", self.shape.max_tokens),
            );
        }
        let base = seq * self.shape.max_tokens + len;
        let lk = &mut st.layers[layer];
        for store in [&mut lk.k, &mut lk.v] {
            // A page of removed positions may be cold: read it back before writing into it.
            store.stage_cells(base..base + n).or_else(|e| fail(DSPARK_ERR_IO, format!("reading a KV page from the spill file: {e}")))?;
        }
        for (t, (kr, vr)) in k.chunks_exact(rl).zip(v.chunks_exact(rl)).enumerate() {
            lk.k.write_row(base + t, kr);
            lk.v.write_row(base + t, vr);
        }
        lk.k.compact(attn::Threads::serial());
        lk.v.compact(attn::Threads::serial());
        st.lanes[seq][layer].len = len + n;
        self.fit(&mut st)
    }

    /// Length of one lane.
    ///
    /// # Errors
    /// `DSPARK_ERR_RANGE`.
    pub fn seq_len(&self, layer: usize, seq: usize) -> Result<usize> {
        self.check_layer_seq(layer, seq)?;
        Ok(self.read().lanes[seq][layer].len)
    }

    /// Attention of `n_q` queries (`q`, `out`: `n_q * n_head * head_dim`).
    ///
    /// # Errors
    /// `DSPARK_ERR_RANGE` / `DSPARK_ERR_ARG`.
    pub fn attn(&self, layer: usize, seq: usize, q: &[f32], n_q: usize, a: &AttnArgs, out: &mut [f32]) -> Result<()> {
        self.check_layer_seq(layer, seq)?;
        let sh = &self.shape;
        let (nh, d) = (sh.n_head, sh.head_dim);
        if q.len() != n_q * nh * d || out.len() != q.len() {
            return fail(DSPARK_ERR_ARG, "q and out must hold n_q x n_head x head_dim values");
        }
        for (name, x) in [("scale", a.scale), ("max_bias", a.max_bias), ("softcap", a.softcap)] {
            if !x.is_finite() {
                return fail(DSPARK_ERR_ARG, format!("{name} {x} is not finite"));
            }
        }
        if let Some(s) = a.sinks {
            if s.len() != nh {
                return fail(DSPARK_ERR_ARG, "sinks must hold n_head values");
            }
        }
        // With a budget, the layer's cold pages are read back for this call (under the write
        // lock, so calls on a cache with a budget do not run in parallel).
        let mut staged = None;
        let read;
        let st: &State = match &self.tier {
            None => {
                read = self.read();
                &read
            }
            Some(t) => {
                let mut w = self.write();
                let lk = &mut w.layers[layer];
                if let Err(e) = lk.k.stage(seq, 0, sh.max_tokens).and_then(|_| lk.v.stage(seq, 0, sh.max_tokens)) {
                    lk.k.unstage();
                    return fail(DSPARK_ERR_IO, format!("reading KV pages from the spill file ({}): {e}", t.describe()));
                }
                &*staged.insert(w)
            }
        };
        let lane = &st.lanes[seq][layer];
        let len = lane.len;
        if a.causal && n_q > len {
            return fail(DSPARK_ERR_ARG, format!("a causal batch of {n_q} queries needs at least {n_q} tokens; sequence {seq} of layer {layer} holds {len}"));
        }
        if let Some((m, stride)) = a.mask {
            let need = if n_q == 0 { 0 } else { (n_q - 1) * stride + len };
            let have = match m {
                MaskData::F32(v) => v.len(),
                MaskData::F16(v) => v.len(),
            };
            if stride < len || have < need {
                return fail(DSPARK_ERR_ARG, format!("mask_stride {stride} is below the sequence length {len}"));
            }
        }
        if n_q == 0 {
            return Ok(());
        }
        let lk = &st.layers[layer];
        let kv: Vec<_> = (0..sh.n_head_kv).map(|h| crate::kv::segments(&lk.k, &lk.v, seq, 0, len, h)).collect();
        let p = FaParams { scale: a.scale, max_bias: a.max_bias, softcap: a.softcap };
        let workers = self.workers();
        let threads = workers.take(if a.n_threads == 0 { self.n_threads } else { a.n_threads });
        // One f16 mask for all heads, as ggml's op takes it, only when something is masked;
        // built for a block of queries at a time, so a long batch over a long sequence never
        // holds an n_q x len mask.
        let masked = (a.causal && n_q > 1) || !lane.holes.is_empty() || a.mask.is_some();
        let block = if masked { (MASK_BLOCK_VALUES / len.max(1)).clamp(1, n_q) } else { n_q };
        let row = nh * d;
        let mut mask_buf = vec![f16::ZERO; if masked { block * len } else { 0 }];
        for i0 in (0..n_q).step_by(block) {
            let i1 = (i0 + block).min(n_q);
            for (i, mrow) in (i0..i1).zip(mask_buf.chunks_exact_mut(len.max(1))) {
                let pos = len - n_q + i; // only read when causal, where n_q <= len
                for (c, x) in mrow.iter_mut().enumerate() {
                    *x = if (a.causal && c > pos) || lane.is_hole(c) {
                        f16::NEG_INFINITY
                    } else if let Some((um, stride)) = a.mask {
                        um.get(i * stride + c)
                    } else {
                        f16::ZERO
                    };
                }
            }
            let mask = (masked && len > 0).then(|| Mask { data: &mask_buf[..(i1 - i0) * len], stride: len });
            attn::flash_attn(&q[i0 * row..i1 * row], i1 - i0, nh, d, &kv, mask, a.sinks, &p, threads, &mut out[i0 * row..i1 * row]);
        }
        self.attn_calls.fetch_add(1, Ordering::Relaxed);
        drop(kv);
        if let Some(mut w) = staged {
            let lk = &mut w.layers[layer];
            lk.k.unstage();
            lk.v.unstage();
        }
        Ok(())
    }

    fn workers(&self) -> &attn::Workers {
        self.workers.get_or_init(|| attn::Workers::new(self.n_threads))
    }

    /// Removes positions `[p0, p1)` (`p1 = None`: to the end) of `seq` (`None`: all).
    /// `p1 <= p0` does nothing.
    ///
    /// # Errors
    /// `DSPARK_ERR_RANGE` for a sequence out of range or `p0 > max_tokens`.
    pub fn seq_rm(&self, seq: Option<usize>, p0: usize, p1: Option<usize>) -> Result<()> {
        if let Some(s) = seq {
            check_range("sequence", s, self.shape.n_seq_max)?;
        }
        if p0 > self.shape.max_tokens {
            return fail(DSPARK_ERR_RANGE, format!("p0 {p0} is beyond max_tokens {}", self.shape.max_tokens));
        }
        let sh = self.shape.clone();
        let mut st = self.write();
        for s in seq.map_or(0..sh.n_seq_max, |s| s..s + 1) {
            for layer in 0..sh.n_layer {
                let lane = &mut st.lanes[s][layer];
                let end = p1.unwrap_or(usize::MAX);
                if end <= p0 || p0 >= lane.len {
                    continue;
                }
                if end >= lane.len {
                    lane.truncate(p0);
                    let lk = &mut st.layers[layer];
                    for store in [&mut lk.k, &mut lk.v] {
                        // Only the pages the table holds: pages beyond it are empty already.
                        for p in p0.div_ceil(PAGE)..store.pages_allocated_span(s) {
                            store.set_page(s, p, PageView::Empty).expect("page in range");
                        }
                        let hw = store.high_water(s).min(p0);
                        store.set_high_water(s, hw);
                    }
                } else {
                    lane.add_hole(p0, end);
                    let (a, b) = *lane.holes.iter().find(|h| h.0 <= p0 && end <= h.1).expect("hole just added");
                    let first = a.div_ceil(PAGE);
                    let lk = &mut st.layers[layer];
                    for store in [&mut lk.k, &mut lk.v] {
                        for p in first..(b / PAGE).min(store.pages_allocated_span(s)) {
                            store.set_page(s, p, PageView::Empty).expect("page in range");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves the tokens at positions `[p0, p1)` (`p1 = None`: to the end) of `seq` (`None`:
    /// all) to positions `p + delta`, in every layer: their rows move to the cells of the new
    /// positions as stored (see [`shift_pages`]). The positions they leave become holes, or
    /// past the end when the range reached the end (the length then moves by `delta`).
    /// `p1 <= p0` or `delta == 0` does nothing. All or nothing: every lane is checked first.
    ///
    /// # Errors
    /// `DSPARK_ERR_RANGE` for a sequence out of range, `p0 > max_tokens`, or a token moved
    /// below 0 or to `max_tokens` or beyond; `DSPARK_ERR_ARG` if `[p0 + delta, p1 + delta)`
    /// holds a token that is not moved.
    pub fn seq_add(&self, seq: Option<usize>, p0: usize, p1: Option<usize>, delta: i64) -> Result<()> {
        if let Some(s) = seq {
            check_range("sequence", s, self.shape.n_seq_max)?;
        }
        let sh = self.shape.clone();
        if p0 > sh.max_tokens {
            return fail(DSPARK_ERR_RANGE, format!("p0 {p0} is beyond max_tokens {}", sh.max_tokens));
        }
        let mut st = self.write();
        self.stage_all(&mut st)?;
        // Plan every lane first, so that a refusal changes nothing.
        let mut plans = Vec::new();
        for s in seq.map_or(0..sh.n_seq_max, |s| s..s + 1) {
            for layer in 0..sh.n_layer {
                if let Some(plan) = plan_shift(&st.lanes[s][layer], p0, p1, delta, sh.max_tokens)
                    .map_err(|e| Error::new(e.code, format!("sequence {s}, layer {layer}: {}", e.msg)))?
                {
                    plans.push((s, layer, plan));
                }
            }
        }
        for (s, layer, plan) in plans {
            let lk = &mut st.layers[layer];
            for (store, q) in [(&mut lk.k, sh.quant(layer, true)), (&mut lk.v, sh.quant(layer, false))] {
                shift_pages(store, q, s, &plan);
                store.set_high_water(s, plan.lane.len);
            }
            st.lanes[s][layer] = plan.lane;
        }
        self.fit(&mut st)
    }

    /// Makes `dst` a copy of `src`.
    ///
    /// # Errors
    /// `DSPARK_ERR_RANGE`.
    pub fn seq_cp(&self, src: usize, dst: usize) -> Result<()> {
        check_range("source sequence", src, self.shape.n_seq_max)?;
        check_range("destination sequence", dst, self.shape.n_seq_max)?;
        if src == dst {
            return Ok(());
        }
        let mut st = self.write();
        self.stage_all(&mut st)?;
        for lk in &mut st.layers {
            for store in [&mut lk.k, &mut lk.v] {
                // Pages beyond both tables are empty in both streams.
                for p in 0..store.pages_allocated_span(src).max(store.pages_allocated_span(dst)) {
                    let owned = OwnedPage::of(store.page(src, p));
                    store.set_page(dst, p, owned.view()).expect("same store, same page size");
                }
                let hw = store.high_water(src);
                store.set_high_water(dst, hw);
            }
        }
        let lanes = st.lanes[src].clone();
        st.lanes[dst] = lanes;
        self.fit(&mut st)
    }

    /// Empties every sequence but `seq`.
    ///
    /// # Errors
    /// `DSPARK_ERR_RANGE`.
    pub fn seq_keep(&self, seq: usize) -> Result<()> {
        check_range("sequence", seq, self.shape.n_seq_max)?;
        for s in (0..self.shape.n_seq_max).filter(|&s| s != seq) {
            self.seq_rm(Some(s), 0, None)?;
        }
        Ok(())
    }

    /// Live figures.
    pub fn stats(&self) -> CacheStats {
        let st = self.read();
        let mut s = CacheStats { attn_calls: self.attn_calls.load(Ordering::Relaxed), ..CacheStats::default() };
        for lk in &st.layers {
            for store in [&lk.k, &lk.v] {
                s.add_pages(store);
            }
        }
        for lanes in &st.lanes {
            for lane in lanes {
                let held = lane.len - lane.holes.iter().map(|h| h.1 - h.0).sum::<usize>();
                s.cells += 2 * held as u64; // K and V
            }
        }
        s.elems = s.cells * self.shape.row_len() as u64;
        if let Some(t) = &self.tier {
            s.add_tier(t);
        }
        s
    }
}

/// A planned move of one lane's tokens (see [`Cache::seq_add`]).
#[derive(Debug)]
struct ShiftPlan {
    /// First position moved.
    p0: usize,
    /// One past the last position moved (at most the lane's length).
    end: usize,
    /// How far they move.
    delta: i64,
    /// The lane after the move.
    lane: Lane,
}

/// Checks a move of `lane`'s positions `[p0, p1)` by `delta` and plans it; `None` when it
/// moves nothing.
fn plan_shift(lane: &Lane, p0: usize, p1: Option<usize>, delta: i64, max_tokens: usize) -> Result<Option<ShiftPlan>> {
    let len = lane.len;
    let end = p1.unwrap_or(usize::MAX).min(len);
    if delta == 0 || p0 >= end {
        return Ok(None);
    }
    // Positions fit i32 (checked at creation), so these cannot overflow an i64.
    let (d0, d1) = (p0 as i64 + delta, end as i64 + delta);
    if d0 < 0 || d1 > max_tokens as i64 {
        return fail(DSPARK_ERR_RANGE, format!("positions [{p0}, {end}) would move to [{d0}, {d1}), outside 0..{max_tokens}"));
    }
    let (d0, d1) = (d0 as usize, d1 as usize);
    let mut runs = Vec::new();
    for (a, b) in lane.live_runs() {
        for (x, y) in [(a, b.min(p0)), (a.max(end), b)] {
            if x < y {
                if x < d1 && d0 < y {
                    return fail(DSPARK_ERR_ARG, format!("positions [{x}, {y}) hold tokens that are not moved, inside the target [{d0}, {d1})"));
                }
                runs.push((x, y));
            }
        }
        let (x, y) = (a.max(p0), b.min(end));
        if x < y {
            runs.push(((x as i64 + delta) as usize, (y as i64 + delta) as usize));
        }
    }
    runs.sort_unstable();
    let new_len = if end == len { d1 } else { len.max(d1) };
    Ok(Some(ShiftPlan { p0, end, delta, lane: Lane::from_runs(new_len, &runs) }))
}

impl ShiftPlan {
    /// The old cell whose row cell `c` holds after the move (`None`: no token there).
    fn source(&self, c: usize) -> Option<usize> {
        if !self.lane.is_live(c) {
            return None;
        }
        let from = c as i64 - self.delta;
        Some(if (self.p0 as i64..self.end as i64).contains(&from) { from as usize } else { c })
    }

    /// Cells whose content may change.
    fn span(&self) -> std::ops::Range<usize> {
        let moved = |p: usize| (p as i64 + self.delta) as usize;
        self.p0.min(moved(self.p0))..self.end.max(moved(self.end))
    }
}

/// Applies `plan` to one stream of a store whose code width is `quant`: rebuilds every page
/// of the plan's span from the old rows, as stored. A page whose rows all come from
/// compressed pages is compressed (rows copied byte for byte), one whose rows all come from
/// f16 pages is f16 (values copied); a page that mixes both is compressed (its f16 rows
/// encoded, as compaction would). The stream's first page is always f16, as compaction
/// keeps it (it holds the attention sinks): compressed rows moved into it are decoded. A
/// page without tokens is freed.
fn shift_pages(store: &mut KvStore, quant: Option<crate::codec::Quant>, s: usize, plan: &ShiftPlan) {
    let (d, nh) = (store.head_dim(), store.n_head());
    let codec = quant.map(|q| RowCodec::new(q, d).expect("head_dim checked at creation"));
    let rb = codec.map_or(0, |c| c.row_bytes());
    let mut zero_row = vec![0u8; rb];
    if let Some(c) = codec {
        c.encode(&vec![0.0; d], &mut zero_row);
    }
    let mut tmp = vec![0.0f32; d];
    let span = plan.span();
    let mut new_pages = Vec::new();
    for p in span.start / PAGE..span.end.div_ceil(PAGE) {
        let srcs: Vec<Option<usize>> = (0..PAGE).map(|slot| plan.source(p * PAGE + slot)).collect();
        let any_packed = srcs.iter().flatten().any(|&c| matches!(store.page(s, c / PAGE), PageView::Packed(_)));
        let page = if srcs.iter().all(Option::is_none) {
            OwnedPage::Empty
        } else if let Some(c) = codec.filter(|_| any_packed && p != 0) {
            let mut out = vec![0u8; nh * PAGE * rb];
            for (slot, src) in srcs.iter().enumerate() {
                for h in 0..nh {
                    let dst = &mut out[(h * PAGE + slot) * rb..][..rb];
                    let Some(cell) = *src else {
                        dst.copy_from_slice(&zero_row);
                        continue;
                    };
                    let ss = cell % PAGE;
                    match store.page(s, cell / PAGE) {
                        PageView::Packed(data) => dst.copy_from_slice(&data[(h * PAGE + ss) * rb..][..rb]),
                        PageView::F16(data) => {
                            tmp.iter_mut().zip(&data[(h * PAGE + ss) * d..][..d]).for_each(|(o, x)| *o = x.to_f32());
                            c.encode(&tmp, dst);
                        }
                        PageView::Window(data) => {
                            store.window_codec().expect("a window page has window codes").decode_row(data, h, ss, &mut tmp);
                            c.encode(&tmp, dst);
                        }
                        PageView::Empty => dst.copy_from_slice(&zero_row),
                    }
                }
            }
            OwnedPage::Packed(out)
        } else {
            let mut out = vec![f16::ZERO; nh * PAGE * d];
            for (slot, src) in srcs.iter().enumerate() {
                let Some(cell) = *src else { continue };
                let ss = cell % PAGE;
                for h in 0..nh {
                    let dst = &mut out[(h * PAGE + slot) * d..][..d];
                    match store.page(s, cell / PAGE) {
                        PageView::F16(data) => dst.copy_from_slice(&data[(h * PAGE + ss) * d..][..d]),
                        PageView::Packed(data) => {
                            let c = codec.expect("a packed page has a codec");
                            c.decode(&data[(h * PAGE + ss) * rb..][..rb], &mut tmp);
                            let sat = crate::kv::F16_MAX;
                            dst.iter_mut().zip(&tmp).for_each(|(o, &x)| *o = f16::from_f32(x.clamp(-sat, sat)));
                        }
                        PageView::Window(data) => {
                            store.window_codec().expect("a window page has window codes").decode_row(data, h, ss, &mut tmp);
                            let sat = crate::kv::F16_MAX;
                            dst.iter_mut().zip(&tmp).for_each(|(o, &x)| *o = f16::from_f32(x.clamp(-sat, sat)));
                        }
                        PageView::Empty => {}
                    }
                }
            }
            OwnedPage::F16(out)
        };
        new_pages.push((p, page));
    }
    for (p, page) in new_pages {
        store.set_page(s, p, page.view()).expect("pages built for this store");
    }
}

/// A page copied out of a store, to write it into another stream of the same store.
enum OwnedPage {
    Empty,
    F16(Vec<f16>),
    Packed(Vec<u8>),
    Window(Vec<u8>),
}

impl OwnedPage {
    fn of(v: PageView<'_>) -> OwnedPage {
        match v {
            PageView::Empty => OwnedPage::Empty,
            PageView::F16(d) => OwnedPage::F16(d.to_vec()),
            PageView::Packed(d) => OwnedPage::Packed(d.to_vec()),
            PageView::Window(d) => OwnedPage::Window(d.to_vec()),
        }
    }

    fn view(&self) -> PageView<'_> {
        match self {
            OwnedPage::Empty => PageView::Empty,
            OwnedPage::F16(d) => PageView::F16(d),
            OwnedPage::Packed(d) => PageView::Packed(d),
            OwnedPage::Window(d) => PageView::Window(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(format: &str) -> Shape {
        Shape { n_layer: 2, n_head_kv: 2, n_head: 4, head_dim: 32, max_tokens: 300, n_seq_max: 3, format: parse_format(format).unwrap(), layers: None }
    }

    fn rows(n: usize, rl: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).max(1);
        (0..n * rl)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn args() -> AttnArgs<'static> {
        AttnArgs { scale: 0.2, max_bias: 0.0, softcap: 0.0, causal: true, mask: None, sinks: None, n_threads: 1 }
    }

    /// A cache under a budget (cold store in memory) answers attention bit-identically to one
    /// without, saves the same bytes, and a failing cold store is an error that changes nothing.
    #[test]
    fn a_budget_moves_pages_cold_and_changes_no_result() {
        use crate::kv::cold::MemCold;
        let sh = Shape { n_layer: 2, n_head_kv: 2, n_head: 4, head_dim: 64, max_tokens: 2048, n_seq_max: 2, format: parse_format("k4v4").unwrap(), layers: None };
        let plain = Cache::new(sh.clone(), 128, 1).unwrap();
        let mut tiered = Cache::new(sh.clone(), 128, 1).unwrap();
        let cold = MemCold::default();
        tiered.set_cold(Box::new(cold.clone()), 600_000); // the f16 sinks and windows are 512 KiB
        let rl = sh.row_len();
        for (i, c) in [&plain, &tiered].into_iter().enumerate() {
            for layer in 0..2 {
                for seq in 0..2 {
                    let (k, v) = (rows(1500, rl, 1 + layer as u32), rows(1500, rl, 7 + seq as u32));
                    c.append(layer, seq, &k, &v, 1500).unwrap();
                }
            }
            if i == 1 {
                let st = c.stats();
                assert!(st.kv_bytes <= 600_000 && st.kv_cold_bytes > 500_000, "{st:?}");
            }
        }
        let q = rows(3, 4 * 64, 99);
        let attn = |c: &Cache| {
            let mut out = vec![0.0; q.len()];
            c.attn(1, 1, &q, 3, &args(), &mut out).map(|()| out)
        };
        assert_eq!(attn(&plain).unwrap(), attn(&tiered).unwrap(), "tiers move bytes, never change them");
        let save = |c: &Cache| c.with_pages(|st| {
            let n = super::super::format::size(&c.shape, st);
            let mut out = vec![0u8; n];
            let mut sink = super::super::format::SliceSink { buf: &mut out, pos: 0 };
            super::super::format::write(&c.shape, st, n - super::super::format::HEADER - super::super::format::TRAILER, &mut sink);
            out
        });
        assert_eq!(save(&plain).unwrap(), save(&tiered).unwrap());
        assert!(tiered.stats().kv_bytes <= 600_000, "pages moved out again after the save");
        cold.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(attn(&tiered).unwrap_err().code, DSPARK_ERR_IO);
        assert_eq!(tiered.seq_cp(0, 1).unwrap_err().code, DSPARK_ERR_IO);
        cold.fail.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(attn(&plain).unwrap(), attn(&tiered).unwrap(), "a failed call changed nothing");
    }

    /// Per-layer widths: each layer's stores take their own, a save of mixed widths is
    /// file-format version 3 and loads only into a cache of the same widths, and a uniform
    /// profile saves as version 2.
    #[test]
    fn per_layer_widths_save_and_load() {
        use super::super::format;
        let save = |c: &Cache| {
            c.with_pages(|st| {
                let n = format::size(&c.shape, st);
                let mut out = vec![0u8; n];
                format::write(&c.shape, st, n - format::HEADER - format::TRAILER, &mut format::SliceSink { buf: &mut out, pos: 0 });
                out
            })
            .unwrap()
        };
        let with = |layers: &[LayerQuants]| Shape { layers: Some(layers.into()), ..shape("k4v4") };
        let mixed = with(&[(Some(Quant::Q5), Some(Quant::Q3)), (Some(Quant::Q8), None)]);
        let c = Cache::new(mixed.clone(), 0, 1).unwrap();
        let rl = mixed.row_len();
        for layer in 0..2 {
            c.append(layer, 0, &rows(200, rl, 3), &rows(200, rl, 4), 200).unwrap();
        }
        let bytes = save(&c);
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 3);
        assert_eq!(&bytes[format::HEADER..format::HEADER + 4], &[5, 3, 8, 0]);
        let q = rows(2, 4 * 32, 9);
        let attn = |c: &Cache, layer| {
            let mut out = vec![0.0; q.len()];
            c.attn(layer, 0, &q, 2, &args(), &mut out).unwrap();
            out
        };
        let st = format::parse(&bytes, &mixed, 0).unwrap();
        let d = Cache::new(mixed.clone(), 0, 1).unwrap();
        d.replace(st).unwrap();
        assert_eq!((attn(&c, 0), attn(&c, 1)), (attn(&d, 0), attn(&d, 1)), "a loaded cache attends as the saved one");
        let e = format::parse(&bytes, &shape("k4v4"), 0).unwrap_err();
        assert!(e.code == crate::capi::error::DSPARK_ERR_MISMATCH && e.msg.contains("k5v3 k8v0"), "{}", e.msg);
        // A uniform profile is a version-2 image, loadable by a plain k4v4 cache.
        let uniform = Cache::new(with(&[(Some(Quant::Q4), Some(Quant::Q4)); 2]), 0, 1).unwrap();
        uniform.append(0, 0, &rows(100, rl, 3), &rows(100, rl, 4), 100).unwrap();
        let bytes = save(&uniform);
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
        assert!(format::parse(&bytes, &shape("k4v4"), 0).is_ok());
    }

    #[test]
    fn format_names_are_exact_and_lowercase() {
        assert_eq!(parse_format("f16").unwrap(), None);
        assert_eq!(parse_format("k4v3").unwrap().unwrap().name(), "k4v3");
        for bad in [" k4v4", "k4v4 ", "k04v4", "k+4v4", "k4v+4", "K4V4", "k4V4", "F16", "f16 ", "k4v4\n", ""] {
            assert_eq!(parse_format(bad).unwrap_err().code, DSPARK_ERR_FORMAT, "{bad:?}");
        }
    }

    #[test]
    fn empty_cache_budget() {
        let s = |n_layer, n_seq_max, head_dim| Shape { n_layer, n_seq_max, head_dim, max_tokens: i32::MAX as usize, ..shape("k4v4") };
        // 2^31 positions, real shapes: fine; the budget counts layers and lanes, not positions.
        assert!(s(200, 256, 128).validate().is_ok());
        assert!(s(126, 1, 4096).validate().is_ok());
        assert_eq!(s(10_000, 1000, 64).validate().unwrap_err().code, DSPARK_ERR_ARG);
        assert_eq!(s(1000, 1, 4096).validate().unwrap_err().code, DSPARK_ERR_ARG);
        // The estimate covers what an empty cache really holds per layer.
        let shape = s(30, 1, 64);
        let c = Cache::new(shape.clone(), 128, 1).unwrap();
        assert_eq!(c.stats().kv_bytes, 0);
        assert!(shape.fixed_bytes() >= 30 * 2 * (PAGE as u128 * 64 * 2));
    }

    #[test]
    fn shifts_move_rows_as_stored_and_keep_the_first_page_f16() {
        let c = Cache::new(Shape { n_layer: 1, n_seq_max: 1, ..shape("k4v4") }, 0, 1).unwrap();
        let rl = c.shape.row_len();
        c.append(0, 0, &rows(200, rl, 1), &rows(200, rl, 2), 200).unwrap();
        c.seq_rm(Some(0), 0, Some(64)).unwrap();
        let q = rows(3, 4 * 32, 3);
        let (mut before, mut after) = (vec![0.0; q.len()], vec![0.0; q.len()]);
        c.attn(0, 0, &q, 3, &args(), &mut before).unwrap();
        c.seq_add(Some(0), 64, None, -64).unwrap();
        assert_eq!(c.seq_len(0, 0).unwrap(), 136);
        // Page 0 <- page 1 (compressed, decoded into f16), page 1 <- 2 (bytes copied), page 2
        // <- 3 (f16: with no window, the partly filled last page is not compressed).
        let s = c.stats();
        assert_eq!((s.pages_f16, s.pages_compressed, s.cells), (4, 2, 2 * 136));
        c.attn(0, 0, &q, 3, &args(), &mut after).unwrap();
        let err = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-2, "the same tokens at new positions attend differently: {err}");
    }

    #[test]
    fn shift_plans() {
        let lane = Lane { len: 200, holes: vec![(4, 104)] };
        let p = plan_shift(&lane, 104, None, -100, 256).unwrap().unwrap();
        assert_eq!(p.lane, Lane { len: 100, holes: vec![] });
        assert_eq!((p.source(3), p.source(4), p.source(99), p.source(100)), (Some(3), Some(104), Some(199), None));
        let up = plan_shift(&Lane { len: 50, holes: vec![] }, 40, None, 6, 256).unwrap().unwrap();
        assert_eq!(up.lane, Lane { len: 56, holes: vec![(40, 46)] });
        assert!(plan_shift(&lane, 0, Some(3), 0, 256).unwrap().is_none());
        assert!(plan_shift(&lane, 200, None, -5, 256).unwrap().is_none());
        assert_eq!(plan_shift(&lane, 0, None, -1, 256).unwrap_err().code, DSPARK_ERR_RANGE);
        assert_eq!(plan_shift(&lane, 150, None, 57, 256).unwrap_err().code, DSPARK_ERR_RANGE);
        assert_eq!(plan_shift(&lane, 120, Some(150), -10, 256).unwrap_err().code, DSPARK_ERR_ARG);
        // Into a hole, in the middle: fine.
        let mid = plan_shift(&lane, 104, Some(120), -50, 256).unwrap().unwrap();
        assert_eq!(mid.lane, Lane { len: 200, holes: vec![(4, 54), (70, 120)] });
    }

    #[test]
    fn lanes_merge_holes() {
        let mut l = Lane { len: 100, holes: vec![] };
        l.add_hole(10, 20);
        l.add_hole(30, 40);
        l.add_hole(15, 31);
        assert_eq!(l.holes, vec![(10, 40)]);
        l.truncate(25);
        assert_eq!((l.len, l.holes.clone()), (25, vec![(10, 25)]));
        l.truncate(10);
        assert!(l.holes.is_empty());
    }

    #[test]
    fn copy_is_exact_and_rm_frees_pages() {
        let c = Cache::new(shape("k4v4"), 0, 1).unwrap();
        let rl = c.shape.row_len();
        let (k, v) = (rows(250, rl, 1), rows(250, rl, 2));
        for layer in 0..2 {
            c.append(layer, 0, &k, &v, 250).unwrap();
        }
        c.seq_cp(0, 2).unwrap();
        let q = rows(3, 4 * 32, 3);
        let (mut o0, mut o2) = (vec![0.0; q.len()], vec![0.0; q.len()]);
        c.attn(1, 0, &q, 3, &args(), &mut o0).unwrap();
        c.attn(1, 2, &q, 3, &args(), &mut o2).unwrap();
        assert_eq!(o0, o2);
        let before = c.stats().kv_bytes;
        c.seq_rm(Some(0), 64, Some(200)).unwrap();
        assert!(c.stats().kv_bytes < before, "pages inside the hole are freed");
        c.seq_rm(None, 0, None).unwrap();
        assert_eq!(c.stats().kv_bytes, 0);
        assert_eq!(c.seq_len(0, 2).unwrap(), 0);
    }
}
