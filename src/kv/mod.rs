//! The paged, compressed KV store.
//!
//! One [`KvStore`] holds one KV tensor of llama.cpp (`cache_k_l<il>` or `cache_v_l<il>`):
//! `n_stream` streams of `cells` cells, each cell one row of `n_head` head rows of `head_dim`
//! values. Memory is allocated a page (`PAGE` cells) at a time, only when a cell of the page is
//! written, so a context of 32k cells with 1k tokens in use costs about 1k cells.
//!
//! A page is f16 or compressed. The first page of each stream stays f16 (it holds the
//! attention sinks, the first tokens that every query attends to), and so do the pages
//! written within the last `window` rows of their stream; a page is compressed as a whole
//! when it has not been written for `window` rows (recency, not position, so a context shift
//! or a ring that reuses low cells keeps its newest rows in f16); without a window, when it is
//! full or a row lands in another page. A new row written into a
//! compressed page turns it back into f16 (its other rows as their codes decode); a row
//! rewritten in place (a K-shift) is encoded directly.
//! Within a page, rows are grouped by head (`[head][slot]`), so that attention reads each
//! head's rows as one contiguous run.
//!
//! With a memory budget ([`tier`]), compressed pages can also be cold: their bytes are in the
//! spill file, and a cold page is read back ("staged", a clean copy in RAM) for the attention
//! that needs it and dropped after. A cold page that is written again comes back for good.
//! The sink page and the f16 window never go cold.
//!
//! With an attention budget, K stores also keep a digest of each compressed page's keys, from
//! which a decode query chooses the cells it reads ([`select`]).

pub mod cold;
pub mod page;
pub mod select;
pub mod tier;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::attn::{Rows, Segment, Threads};
use crate::codec::{Quant, RowCodec};
pub use page::PageCodec;
use page::HeadToEncode;
use tier::{Region, Slot, Tier};
use crate::sched::{Fence, Transfer};

/// Cells per page.
pub const PAGE: usize = 64;
// `PageSlot::written` has one bit per cell of a page.
const _: () = assert!(PAGE == 64);

/// Largest finite f16 value: what [`KvStore::write_row`] saturates to.
pub const F16_MAX: f32 = 65504.0;

/// Figures of a set of KV stores: a llama.cpp context's (`ggml::Stats`) or a standalone
/// cache's (C API).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Bytes held by pages.
    pub kv_bytes: u64,
    /// Pages allocated in f16.
    pub pages_f16: u64,
    /// Pages allocated compressed.
    pub pages_compressed: u64,
    /// Cells that hold data, summed over all stores.
    pub cells: u64,
    /// Values stored (cells × values per cell), to compute bits per element.
    pub elems: u64,
    /// Attention calls.
    pub attn_calls: u64,
    /// Graphs (scheduler splits) a DSpark device has run: one per ubatch when a whole model
    /// runs on it.
    pub graphs: u64,
    /// Allocated pages that the latest attention call over their store could not see
    /// (e.g. pages of tokens removed with `seq_rm`, which llama.cpp never reports).
    pub pages_unseen: u64,
    /// Bytes of pages in the cold tier (not counted in `kv_bytes`).
    pub kv_cold_bytes: u64,
    /// Bytes read from and written to the cold tier (cumulative).
    pub cold_read_bytes: u64,
    pub cold_write_bytes: u64,
    /// Time the transfer stream spent reading cold pages (with prefetch 0, the compute
    /// stream's own reads), ns, cumulative.
    pub transfer_busy_ns: u64,
    /// Time the compute stream waited for cold pages, ns, cumulative.
    pub compute_wait_ns: u64,
    /// Cold pages an attention needed that were already staged (prefetched, or kept from an
    /// earlier token) / that the compute stream read itself.
    pub prefetch_hits: u64,
    pub prefetch_misses: u64,
    /// Decode attention calls, counted once per KV head ([`select::Counters`]).
    pub decode_head_calls: u64,
    /// Cells those calls read (all of them when dense; the selection under a budget).
    pub attended_cells: u64,
    /// Time spent selecting pages, ns, cumulative.
    pub select_ns: u64,
}

impl Stats {
    /// Adds the pages of one store (bytes and page counts; cells are counted by the caller,
    /// who knows which cells are in use).
    pub fn add_pages(&mut self, store: &KvStore) {
        let (f, c) = store.page_counts();
        self.kv_bytes += store.bytes() as u64;
        self.pages_f16 += f as u64;
        self.pages_compressed += c as u64;
        self.pages_unseen += store.pages_unseen() as u64;
        self.kv_cold_bytes += store.cold_bytes() as u64;
    }

    /// Adds a tier's counters (once per tier: the stores that share it are added apart).
    pub fn add_tier(&mut self, t: &Tier) {
        let c = &t.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.cold_read_bytes += get(&c.read_bytes);
        self.cold_write_bytes += get(&c.write_bytes);
        self.transfer_busy_ns += get(&c.transfer_busy_ns);
        self.compute_wait_ns += get(&c.compute_wait_ns);
        self.prefetch_hits += get(&c.prefetch_hits);
        self.prefetch_misses += get(&c.prefetch_misses);
    }

    /// Adds a device's selection counters.
    pub fn add_select(&mut self, c: &select::Counters) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.decode_head_calls += get(&c.decode_head_calls);
        self.attended_cells += get(&c.attended_cells);
        self.select_ns += get(&c.select_ns);
    }

    /// Cells a decode call read per KV head, on average (0 before any decode).
    pub fn attended_tokens(&self) -> f64 {
        if self.decode_head_calls == 0 {
            return 0.0;
        }
        self.attended_cells as f64 / self.decode_head_calls as f64
    }

    /// Cold pages a decode call needed that the transfer stream had read ahead (1 when none
    /// was needed).
    pub fn prefetch_hit_rate(&self) -> f64 {
        let all = self.prefetch_hits + self.prefetch_misses;
        if all == 0 {
            return 1.0;
        }
        self.prefetch_hits as f64 / all as f64
    }

    /// The part of the transfer stream's reading that the compute stream did not wait for:
    /// `1 - wait / busy` (1 when nothing was read).
    pub fn hidden_fraction(&self) -> f64 {
        if self.transfer_busy_ns == 0 {
            return 1.0;
        }
        (1.0 - self.compute_wait_ns as f64 / self.transfer_busy_ns as f64).max(0.0)
    }

    /// The figures of what happened since `before` (an earlier reading of the same caches):
    /// cumulative counters as differences, the state (bytes, pages, cells) as it is now.
    #[must_use]
    pub fn since(&self, before: &Stats) -> Stats {
        Stats {
            attn_calls: self.attn_calls - before.attn_calls,
            graphs: self.graphs - before.graphs,
            cold_read_bytes: self.cold_read_bytes - before.cold_read_bytes,
            cold_write_bytes: self.cold_write_bytes - before.cold_write_bytes,
            transfer_busy_ns: self.transfer_busy_ns - before.transfer_busy_ns,
            compute_wait_ns: self.compute_wait_ns - before.compute_wait_ns,
            prefetch_hits: self.prefetch_hits - before.prefetch_hits,
            prefetch_misses: self.prefetch_misses - before.prefetch_misses,
            decode_head_calls: self.decode_head_calls - before.decode_head_calls,
            attended_cells: self.attended_cells - before.attended_cells,
            select_ns: self.select_ns - before.select_ns,
            ..*self
        }
    }

    /// Adds another set's figures (statistics of several devices or caches together).
    pub fn merge(&mut self, o: &Stats) {
        self.kv_bytes += o.kv_bytes;
        self.pages_f16 += o.pages_f16;
        self.pages_compressed += o.pages_compressed;
        self.cells += o.cells;
        self.elems += o.elems;
        self.attn_calls += o.attn_calls;
        self.graphs += o.graphs;
        self.pages_unseen += o.pages_unseen;
        self.kv_cold_bytes += o.kv_cold_bytes;
        self.cold_read_bytes += o.cold_read_bytes;
        self.cold_write_bytes += o.cold_write_bytes;
        self.transfer_busy_ns += o.transfer_busy_ns;
        self.compute_wait_ns += o.compute_wait_ns;
        self.prefetch_hits += o.prefetch_hits;
        self.prefetch_misses += o.prefetch_misses;
        self.decode_head_calls += o.decode_head_calls;
        self.attended_cells += o.attended_cells;
        self.select_ns += o.select_ns;
    }

    /// Stored bits per K/V value, page metadata included, in RAM and cold (0 with nothing
    /// stored, e.g. a device that is not DSpark's: JSON has no NaN).
    pub fn bits_per_elem(&self) -> f64 {
        if self.elems == 0 {
            return 0.0;
        }
        8.0 * (self.kv_bytes + self.kv_cold_bytes) as f64 / self.elems as f64
    }
}

/// How a store keeps its rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StoreConfig {
    /// Code width of compressed pages; `None` keeps every row in f16.
    pub quant: Option<Quant>,
    /// Most recent cells kept in f16 (rounded up to whole pages).
    pub window: usize,
    /// Keep a digest of each compressed page's rows for query-aware selection
    /// ([`select`]; K stores).
    pub digests: bool,
    /// Store each compressed page's rows relative to their mean ([`page`]; K stores).
    pub centered: bool,
    /// Code width of the pages not compressed yet (the sink page, the window, the page
    /// being filled): `None` keeps them in f16. Their rows are encoded one by one as they
    /// arrive, without a centroid; a page leaving the window is decoded and encoded at
    /// `quant` once. Only with a `quant`.
    pub window_quant: Option<Quant>,
    /// The latest rows written, kept in f16 besides their codes, which attention reads
    /// instead of the codes ([`Recent`]). Only with a `quant`.
    pub recent: usize,
}

/// The f16 and window pages are shared with a transfer stream while it encodes them
/// ([`KvStore::compact_on`]): the stream reads the rows the page holds without a copy (the
/// store waits for it before it changes a page, so writes find the page unshared).
enum Page {
    Empty,
    F16(Arc<[f16]>),
    /// A page not compressed yet whose rows are in the store's window codes
    /// ([`StoreConfig::window_quant`]) instead of f16.
    Window(Arc<[u8]>),
    Packed(Box<[u8]>),
    /// Packed bytes in the cold tier, and a staged copy of them while one is in RAM.
    Cold { slot: Slot, staged: Option<Box<[u8]>> },
}

/// An f16 or window page's rows, shared with a transfer stream.
enum Shared {
    F16(Arc<[f16]>),
    Window(Arc<[u8]>),
}

impl Page {
    /// Another handle of an f16 or window page's rows.
    fn share(&self) -> Shared {
        match self {
            Page::F16(d) => Shared::F16(d.clone()),
            Page::Window(d) => Shared::Window(d.clone()),
            _ => unreachable!("only f16 and window pages are handed to a transfer stream"),
        }
    }

    /// The packed bytes of a packed or staged cold page.
    fn packed(&self) -> Option<&[u8]> {
        match self {
            Page::Packed(d) | Page::Cold { staged: Some(d), .. } => Some(d),
            _ => None,
        }
    }
}

/// A page of a store: (stream, page index).
pub type PageId = (usize, usize);

/// One page and what the store knows of its use.
struct PageSlot {
    data: Page,
    /// The stream's write clock after the page's last row was written: the page is recent
    /// while fewer than `window` rows of its stream have been written since.
    last_write: u64,
    /// One bit per cell of the page written since it was last f16 from empty or from codes:
    /// without a window, a page is compressed when it is full, not while rows still arrive.
    written: u64,
    /// The store's attention tick of the last call in which a query could see one of the
    /// page's cells (0: never). Pages of removed tokens stop being seen; a memory budget
    /// moves them out first.
    last_seen: AtomicU64,
}

impl PageSlot {
    fn empty() -> PageSlot {
        PageSlot { data: Page::Empty, last_write: 0, written: 0, last_seen: AtomicU64::new(0) }
    }
}

/// Per stream: its pages (the table grows to the highest page written, so an empty store
/// costs nothing however many cells it has), its clock and its high-water mark.
#[derive(Default)]
struct Stream {
    pages: Vec<PageSlot>,
    /// Rows written to the stream since the last clear.
    clock: u64,
    /// One past the highest cell written since the last clear.
    high_water: usize,
    /// The pages' digests, in two tables indexed by page (an entry is valid while its page
    /// has a digest): the whole-page summaries, which ranking scores for every page, and
    /// the block summaries, `[page][head][block]`, read for the pages ranked best. Kept
    /// together rather than with each page, ranking streams through one small region of
    /// memory: with a digest in each page's own allocation, spread over the whole KV heap,
    /// reading the chosen pages' blocks stalled on cache and TLB misses (75% of their
    /// scoring time in `perf` at depth 16384).
    page_summaries: select::PageTable,
    block_summaries: Vec<u8>,
    /// Per page, whether it has a digest (in RAM whatever the page's tier): from when it is
    /// compressed until a row of it is written. Kept with the tables it vouches for, and
    /// dense: a selection checks every page of its range.
    digested: Vec<bool>,
    /// f16 copies of the latest rows written (allocated with the first row).
    recent: Recent,
}

impl Stream {
    fn page(&self, p: usize) -> &Page {
        self.pages.get(p).map_or(&Page::Empty, |s| &s.data)
    }

    fn slot_mut(&mut self, p: usize) -> &mut PageSlot {
        if p >= self.pages.len() {
            self.pages.resize_with(p + 1, PageSlot::empty);
        }
        &mut self.pages[p]
    }

    fn has_digest(&self, p: usize) -> bool {
        self.digested.get(p).is_some_and(|&d| d)
    }

    /// Gives page `p` a digest, or drops its digest.
    fn set_digest(&mut self, p: usize, digest: Option<select::Digest>) {
        if p >= self.digested.len() {
            self.digested.resize(p + 1, false);
        }
        self.digested[p] = digest.is_some();
        if let Some(g) = digest {
            self.page_summaries.set(p, &g);
            let n = g.blocks.len();
            if self.block_summaries.len() < (p + 1) * n {
                self.block_summaries.resize((p + 1) * n, 0);
            }
            self.block_summaries[p * n..][..n].copy_from_slice(&g.blocks);
        }
    }
}

/// f16 copies of the latest rows written to a stream, besides their codes; attention reads
/// them instead of the codes. A decode step puts much of its weight on the last few tokens
/// (a small model's local heads nearly all of it), so their code error reaches the output
/// nearly undiluted, where an old row's is averaged with many others.
/// A row is held at slot `cell % n` until a row of another cell takes that slot, so for rows
/// written in order these are the last `n`.
#[derive(Default)]
struct Recent {
    /// `[head][slot][head_dim]`.
    rows: Box<[f16]>,
    /// The cell each slot holds (`u32::MAX`: none).
    cells: Box<[u32]>,
}

impl Recent {
    /// Keeps `row` (heads of `d` values) as cell `cell`'s, in a ring of `n` slots: a new row
    /// always, a rewritten one only if the cell's row is held.
    fn put(&mut self, n: usize, d: usize, cell: usize, row: &[f32], new: bool) {
        if n == 0 {
            return;
        }
        if self.cells.is_empty() {
            self.rows = vec![f16::ZERO; n * row.len()].into_boxed_slice();
            self.cells = vec![u32::MAX; n].into_boxed_slice();
        }
        let slot = cell % n;
        if !new && !self.holds(cell) {
            return;
        }
        self.cells[slot] = u32::try_from(cell).unwrap_or(u32::MAX);
        for (h, src) in row.chunks_exact(d).enumerate() {
            self.rows[(h * n + slot) * d..][..d].convert_from_f32_slice(src);
        }
    }

    fn holds(&self, cell: usize) -> bool {
        !self.cells.is_empty() && self.cells[cell % self.cells.len()] as usize == cell
    }

    /// Forgets the rows of the cells in `range` (their page was replaced).
    fn forget(&mut self, range: std::ops::Range<usize>) {
        self.cells.iter_mut().filter(|c| range.contains(&(**c as usize))).for_each(|c| *c = u32::MAX);
    }

    /// The cells held in `range`, ascending.
    fn held_in(&self, range: std::ops::Range<usize>) -> Vec<usize> {
        let mut v: Vec<usize> = self.cells.iter().map(|&c| c as usize).filter(|c| range.contains(c)).collect();
        v.sort_unstable();
        v
    }

    /// Head `head`'s rows of cells `cell..cell + len`, all held and in consecutive slots.
    fn rows(&self, head: usize, d: usize, cell: usize, len: usize) -> &[f16] {
        let n = self.cells.len();
        &self.rows[(head * n + cell % n) * d..][..len * d]
    }

    /// Bytes of the rows (the cell numbers are bookkeeping, as the page table is).
    fn bytes(&self) -> usize {
        self.rows.len() * 2
    }
}

/// A page's content, borrowed from a store (see [`KvStore::page`]).
#[derive(Clone, Copy, Debug)]
pub enum PageView<'a> {
    /// Never written (reads as zeros).
    Empty,
    /// f16 values, `[head][slot][head_dim]`.
    F16(&'a [f16]),
    /// Rows encoded by the store's codec, `[head][slot][row_bytes]`.
    Packed(&'a [u8]),
    /// Rows of a page not compressed yet, in the store's window codes
    /// ([`KvStore::window_codec`] decodes them), `[head][slot][row_bytes]`.
    Window(&'a [u8]),
}

/// One KV tensor, paged and compressed. See the module documentation.
pub struct KvStore {
    codec: Option<PageCodec>,
    /// The codes of pages not compressed yet ([`StoreConfig::window_quant`]); `None`: f16.
    window_codec: Option<PageCodec>,
    window: usize,
    /// Rows kept in each stream's [`Recent`] (0: none).
    recent: usize,
    digests: bool,
    n_head: usize,
    head_dim: usize,
    cells: usize,
    streams: Vec<Stream>,
    /// Attention calls that reported what they could see ([`KvStore::note_seen`]).
    attn_tick: AtomicU64,
    zeros: Box<[f16]>,
    /// The budget's cold tier, when the store has one, and the store's region in it.
    tier: Option<Arc<Tier>>,
    region: Region,
    /// Pages being encoded on a transfer stream.
    encoding: Vec<Encoding>,
}

/// A page handed to a transfer stream to be encoded ([`KvStore::compact_on`]): its codes and
/// digest arrive through the fence.
struct Encoding {
    page: PageId,
    fence: Arc<Fence<Result<Encoded, String>>>,
}

/// A page's codes and, when the store keeps them, its digest.
type Encoded = (Box<[u8]>, Option<select::Digest>);

impl KvStore {
    /// A store for `n_stream` streams of `cells` cells of `n_head` × `head_dim` values.
    ///
    /// # Errors
    /// If the codec cannot encode rows of `head_dim` values.
    pub fn new(cfg: StoreConfig, n_head: usize, head_dim: usize, cells: usize, n_stream: usize) -> Result<KvStore, String> {
        let codec = cfg.quant.map(|q| RowCodec::new(q, head_dim)).transpose()?.map(|rows| PageCodec { rows, n_head, centered: cfg.centered });
        // Window codes are centred as the compressed pages are: a page starts from the
        // centroids of the nearest compressed page before it (K's per-channel offset changes
        // slowly), which its rows are encoded against as they arrive. Uncentred 8-bit window
        // codes cost the default model (f16 weights, ctx 2048, token by token) KL divergence
        // 0.00037, as much as q8_0's whole error. The sink page has none before it and stays
        // uncentred: centred on its own centroid, which the first token's large K pulls, it
        // did worse (README, "Per-layer widths").
        let window_codec = cfg.window_quant.filter(|_| codec.is_some()).map(|q| RowCodec::new(q, head_dim)).transpose()?.map(|rows| PageCodec { rows, n_head, centered: cfg.centered });
        Ok(KvStore {
            codec,
            recent: if codec.is_some() { cfg.recent } else { 0 },
            window_codec,
            window: cfg.window,
            digests: cfg.digests,
            n_head,
            head_dim,
            cells,
            streams: (0..n_stream).map(|_| Stream::default()).collect(),
            attn_tick: AtomicU64::new(0),
            zeros: vec![f16::ZERO; PAGE * head_dim].into_boxed_slice(),
            tier: None,
            region: Region::default(),
            encoding: Vec::new(),
        })
    }

    /// Lets the store move compressed pages to `tier`'s cold store ([`KvStore::evict`]).
    pub fn set_tier(&mut self, tier: Arc<Tier>) {
        self.region = tier.region(self.n_stream() * self.pages_per_stream(), self.packed_page_bytes());
        self.tier = Some(tier);
    }

    /// Values per cell (all heads).
    pub fn row_len(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn n_head(&self) -> usize {
        self.n_head
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Cells per stream.
    pub fn cells(&self) -> usize {
        self.cells
    }

    /// Total cells (all streams).
    pub fn total_cells(&self) -> usize {
        self.cells * self.streams.len()
    }

    /// Pages per stream (`cells / PAGE`, rounded up).
    pub fn pages_per_stream(&self) -> usize {
        self.cells.div_ceil(PAGE)
    }

    /// Pages of a stream that may hold data: those below the highest page ever allocated
    /// (pages at or above it read as [`PageView::Empty`]).
    pub fn pages_allocated_span(&self, stream: usize) -> usize {
        self.streams[stream].pages.len()
    }

    /// Number of streams.
    pub fn n_stream(&self) -> usize {
        self.streams.len()
    }

    /// Page `page` of a stream as it is stored (for saving, copying and restoring a store
    /// without re-encoding rows). An f16 page holds `n_head * PAGE * head_dim` values, a
    /// packed one `n_head * PAGE * row_bytes` bytes, both laid out `[head][slot]`. A cold
    /// page must be staged first (only stores with a tier have cold pages).
    pub fn page(&self, stream: usize, page: usize) -> PageView<'_> {
        assert!(stream < self.n_stream() && page < self.pages_per_stream(), "KvStore::page: out of range");
        match self.streams[stream].page(page) {
            Page::Empty => PageView::Empty,
            Page::F16(d) => PageView::F16(d),
            Page::Window(d) => PageView::Window(d),
            p => PageView::Packed(p.packed().expect("KvStore::page: a cold page that is not staged")),
        }
    }

    /// Replaces page `page` of a stream with a copy of `view` (`Empty` frees it). The page
    /// counts as written now.
    ///
    /// # Errors
    /// If the view's length does not match this store's page size, or a packed page is
    /// given to a store without a codec. The store is unchanged then.
    pub fn set_page(&mut self, stream: usize, page: usize, view: PageView<'_>) -> Result<(), String> {
        if stream >= self.n_stream() || page >= self.pages_per_stream() {
            return Err(format!("page {page} of stream {stream} is out of range"));
        }
        self.finish_compaction();
        let per_page = self.n_head * PAGE;
        let new = match view {
            PageView::Empty => Page::Empty,
            PageView::F16(d) if d.len() == per_page * self.head_dim => match &self.window_codec {
                Some(w) => Page::Window(w.encode_page(d).into()),
                None => Page::F16(d.into()),
            },
            PageView::Window(d) => match &self.window_codec {
                Some(w) if d.len() == w.page_bytes() => Page::Window(d.into()),
                _ => return Err(format!("window page of {} bytes does not fit this store", d.len())),
            },
            PageView::Packed(d) => match self.codec {
                Some(c) if d.len() == c.page_bytes() => Page::Packed(d.into()),
                Some(_) => return Err(format!("packed page of {} bytes does not fit this store", d.len())),
                None => return Err("packed page given to an uncompressed store".to_string()),
            },
            PageView::F16(d) => return Err(format!("f16 page of {} values does not fit this store", d.len())),
        };
        let digest = match &new {
            Page::Packed(d) => self.digest_of(d),
            _ => None,
        };
        let st = &mut self.streams[stream];
        if matches!(new, Page::Empty) && page >= st.pages.len() {
            return Ok(());
        }
        st.recent.forget(page * PAGE..(page + 1) * PAGE);
        let clock = st.clock;
        let slot = st.slot_mut(page);
        slot.data = new;
        slot.last_write = clock;
        slot.written = 0;
        st.set_digest(page, digest);
        st.pages.truncate(st.pages.iter().rposition(|s| !matches!(s.data, Page::Empty)).map_or(0, |i| i + 1));
        Ok(())
    }

    /// One past the highest cell written in a stream.
    pub fn high_water(&self, stream: usize) -> usize {
        self.streams[stream].high_water
    }

    /// Sets a stream's high-water mark (clamped to `cells`), e.g. after its tail was dropped
    /// or its pages restored with [`KvStore::set_page`].
    pub fn set_high_water(&mut self, stream: usize, cells: usize) {
        self.streams[stream].high_water = cells.min(self.cells);
    }

    /// Stream, page index and slot of a global cell (stream * cells + cell).
    fn locate(&self, gcell: usize) -> (usize, usize, usize) {
        let (stream, cell) = (gcell / self.cells, gcell % self.cells);
        (stream, cell / PAGE, cell % PAGE)
    }

    /// Whether the page holding a global cell has been allocated (the cell may hold data).
    pub fn is_written(&self, gcell: usize) -> bool {
        let (s, p, _) = self.locate(gcell);
        !matches!(self.streams[s].page(p), Page::Empty)
    }

    /// Whether the page holding a global cell is kept in f16 (sink, window, or no codec).
    pub fn is_f16(&self, gcell: usize) -> bool {
        let (s, p, _) = self.locate(gcell);
        matches!(self.streams[s].page(p), Page::F16(_))
    }

    /// Whether the page holding a global cell is kept out of compression in the window
    /// codes ([`StoreConfig::window_quant`]).
    pub fn is_window_coded(&self, gcell: usize) -> bool {
        let (s, p, _) = self.locate(gcell);
        matches!(self.streams[s].page(p), Page::Window(_))
    }

    /// The codes of this store's pages not compressed yet, when they are not f16
    /// ([`StoreConfig::window_quant`]): the layout of [`PageView::Window`].
    pub fn window_codec(&self) -> Option<&PageCodec> {
        self.window_codec.as_ref()
    }

    /// Drops every page: all cells read as zero again.
    pub fn clear(&mut self) {
        self.finish_compaction();
        self.streams.iter_mut().for_each(|s| *s = Stream::default());
    }

    /// Writes one cell (`row.len() == row_len()`, head after head): a new row, which makes
    /// its page recent. Values are stored as an
    /// f16 KV cache holds them: finite values beyond the f16 range saturate to ±65504 and
    /// non-finite values are stored as 0, in f16 and in compressed pages alike.
    pub fn write_row(&mut self, gcell: usize, row: &[f32]) {
        self.put_row(gcell, row, true);
    }

    /// Rewrites a cell's values in place (e.g. a K-shift rotating a row that is already
    /// there): not a new row, so recency is unchanged.
    pub fn rewrite_row(&mut self, gcell: usize, row: &[f32]) {
        self.put_row(gcell, row, false);
    }

    fn put_row(&mut self, gcell: usize, row: &[f32], new: bool) {
        assert_eq!(row.len(), self.row_len());
        self.finish_compaction();
        let clamped: Vec<f32>;
        let row = if row.iter().all(|x| x.abs() <= F16_MAX) {
            row
        } else {
            clamped = row.iter().map(|&x| if x.is_finite() { x.clamp(-F16_MAX, F16_MAX) } else { 0.0 }).collect();
            &clamped
        };
        let (s, p, slot) = self.locate(gcell);
        self.bring_back(s, p);
        let (d, nh) = (self.head_dim, self.n_head);
        let (codec, window_codec) = (self.codec, self.window_codec);
        let st = &mut self.streams[s];
        st.high_water = st.high_water.max(gcell % self.cells + 1);
        if new {
            st.clock += 1;
        }
        let clock = st.clock;
        st.set_digest(p, None);
        // The centroids a new window page starts from: those of the nearest compressed page
        // before it (none while every page before it is still out of compression).
        let before = match (matches!(st.page(p), Page::Empty), codec) {
            (true, Some(c)) => (1..p).rev().find_map(|q| st.page(q).packed()).map(|d| c.centroids(d).to_vec()),
            _ => None,
        };
        let page = st.slot_mut(p);
        if new || matches!(page.data, Page::Empty) {
            page.last_write = clock;
        }
        match &page.data {
            Page::Empty => {
                page.data = match &window_codec {
                    // Zero bytes are rows of zeros in any codes (a zero scale).
                    Some(w) => Page::Window(w.empty_page(before.as_deref()).into()),
                    None => Page::F16(vec![f16::ZERO; nh * PAGE * d].into()),
                };
                page.written = 0;
            }
            // A new row makes its page recent again (a context shift or a ring writes new
            // tokens into freed low cells): the page goes back to f16 (or the window codes),
            // its other rows as their codes decode, and is compressed again when it leaves
            // the window.
            Page::Packed(data) if new => {
                let f16 = codec.expect("packed page without codec").decode_page(data);
                page.data = match &window_codec {
                    Some(w) => Page::Window(w.encode_page(&f16).into()),
                    None => Page::F16(f16.into()),
                };
                page.written = 0;
            }
            _ => {}
        }
        page.written |= 1 << slot;
        match &mut page.data {
            Page::F16(data) => {
                let data = Arc::make_mut(data);
                for (h, src) in row.chunks_exact(d).enumerate() {
                    let dst = &mut data[(h * PAGE + slot) * d..][..d];
                    dst.convert_from_f32_slice(src);
                }
            }
            Page::Packed(data) => {
                let codec = codec.expect("packed page without codec");
                for (h, src) in row.chunks_exact(d).enumerate() {
                    codec.encode_row(data, h, slot, src);
                }
            }
            Page::Window(data) => {
                let (w, data) = (window_codec.expect("window page without window codes"), Arc::make_mut(data));
                for (h, src) in row.chunks_exact(d).enumerate() {
                    w.encode_row(data, h, slot, src);
                }
            }
            Page::Empty | Page::Cold { .. } => unreachable!(),
        }
        st.recent.put(self.recent, d, gcell % self.cells, row, new);
    }

    /// Brings a cold page back for good (a row is written into it): its staged copy becomes
    /// the page (its place in the spill file stays the store's, for when it goes cold again).
    /// The page must be staged ([`KvStore::stage_cells`]).
    fn bring_back(&mut self, s: usize, p: usize) {
        let Some(slot) = self.streams[s].pages.get_mut(p) else { return };
        if let Page::Cold { staged, .. } = &mut slot.data {
            let data = staged.take().expect("a cold page is staged before a row is written into it");
            slot.data = Page::Packed(data);
        }
    }

    /// Reads one cell into `out` (`out.len() == row_len()`).
    pub fn read_row(&self, gcell: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.row_len());
        let (s, p, slot) = self.locate(gcell);
        let d = self.head_dim;
        let st = &self.streams[s];
        match st.page(p) {
            Page::Empty => out.fill(0.0),
            Page::Window(_) | Page::Packed(_) | Page::Cold { .. } if st.recent.holds(gcell % self.cells) => {
                for (h, dst) in out.chunks_exact_mut(d).enumerate() {
                    st.recent.rows(h, d, gcell % self.cells, 1).convert_to_f32_slice(dst);
                }
            }
            Page::F16(data) => {
                for (h, dst) in out.chunks_exact_mut(d).enumerate() {
                    let src = &data[(h * PAGE + slot) * d..][..d];
                    src.convert_to_f32_slice(dst);
                }
            }
            Page::Window(data) => {
                let w = self.window_codec.expect("window page without window codes");
                for (h, dst) in out.chunks_exact_mut(d).enumerate() {
                    w.decode_row(data, h, slot, dst);
                }
            }
            page => {
                let read;
                let data = match page.packed() {
                    Some(d) => d,
                    None => {
                        read = self.read_cold(s, p).unwrap_or_else(|e| panic!("reading a cold KV page back: {e}"));
                        &read
                    }
                };
                let codec = self.codec.expect("packed page without codec");
                for (h, dst) in out.chunks_exact_mut(d).enumerate() {
                    codec.decode_row(data, h, slot, dst);
                }
            }
        }
    }

    /// Compresses the f16 pages that have not been written for `window` rows of their stream
    /// (never a stream's first page, which holds the attention sinks). Recency, not position:
    /// after a context shift or a ring's reuse of low cells, the newest rows stay f16 wherever
    /// they were written. Without a window, a page is compressed once every cell of it is
    /// written or a row lands in another page, never while its rows still arrive: each new
    /// row would decode it and encode it again, and the codes' error compounded (token by
    /// token at 4 bits, ctx 512: KL divergence 1.26 against 0.004 with the window).
    /// Call after a batch of writes; pages are encoded on `threads` (the caller's workers, so
    /// a context never uses more threads than it was given).
    pub fn compact(&mut self, threads: Threads) {
        self.finish_compaction();
        let due = self.due_pages();
        self.encode(due, threads);
    }

    /// As [`KvStore::compact`], but the pages leaving the window are encoded on `stream`
    /// while the caller goes on: they stay f16 (readable) until
    /// [`KvStore::finish_compaction`] swaps their codes in, which anything that changes the
    /// store does first (a write, a compaction, `set_page`, `clear`), so the store holds
    /// the same pages as with [`KvStore::compact`] whenever it changes.
    pub fn compact_on(&mut self, stream: &Transfer, threads: Threads) {
        self.finish_compaction();
        let (handed, here): (Vec<PageId>, Vec<PageId>) = self.due_pages().into_iter().partition(|&(s, p)| matches!(self.streams[s].page(p), Page::F16(_) | Page::Window(_)));
        self.encode(here, threads);
        let (Some(codec), window_codec, digests, nh, d) = (self.codec, self.window_codec, self.digests, self.n_head, self.head_dim) else { return };
        for (s, p) in handed {
            let page = self.streams[s].pages[p].data.share();
            let fence = stream.run(move || {
                let window;
                let rows: &[f16] = match &page {
                    Shared::F16(rows) => rows,
                    Shared::Window(data) => {
                        window = window_codec.expect("window page without window codes").decode_page(data);
                        &window
                    }
                };
                (codec.encode_page(rows), digests.then(|| select::digest(rows, nh, d)))
            });
            self.encoding.push(Encoding { page: (s, p), fence });
        }
    }

    /// Waits for the pages being encoded on a transfer stream ([`KvStore::compact_on`]) and
    /// swaps their codes in.
    pub fn finish_compaction(&mut self) {
        for Encoding { page: (s, p), fence } in std::mem::take(&mut self.encoding) {
            let (done, _) = fence.wait();
            // A task that failed leaves the page as it was: the next compaction encodes it again.
            if let Ok((packed, digest)) = done {
                let st = &mut self.streams[s];
                st.pages[p].data = Page::Packed(packed);
                st.set_digest(p, digest);
            }
        }
    }

    /// Pages due for compression, and (with digests) compressed pages in RAM whose digest a
    /// rewrite in place (a K-shift) dropped.
    fn due_pages(&self) -> Vec<PageId> {
        if self.codec.is_none() {
            return Vec::new();
        }
        let window = self.window as u64;
        let mut due: Vec<PageId> = Vec::new();
        for (s, st) in self.streams.iter().enumerate() {
            let clock = st.clock;
            due.extend(st.pages.iter().enumerate().skip(1).filter_map(|(p, slot)| {
                let due = match slot.data {
                    Page::F16(_) | Page::Window(_) => clock - slot.last_write >= window.max(1) || (window == 0 && slot.written == u64::MAX),
                    Page::Packed(_) => self.digests && !st.has_digest(p),
                    _ => false,
                };
                due.then_some((s, p))
            }));
        }
        due
    }

    /// The rows of an f16 or window page as f16 (a window page decoded).
    fn page_rows(&self, s: usize, p: usize) -> Option<std::borrow::Cow<'_, [f16]>> {
        match self.streams[s].page(p) {
            Page::F16(data) => Some(std::borrow::Cow::Borrowed(&data[..])),
            Page::Window(data) => Some(std::borrow::Cow::Owned(self.window_codec.expect("window page without window codes").decode_page(data).into_vec())),
            _ => None,
        }
    }

    /// Encodes the `due` pages on `threads` (and digests them, with digests) and swaps them in.
    fn encode(&mut self, due: Vec<PageId>, threads: Threads) {
        let Some(codec) = self.codec else { return };
        if due.is_empty() {
            return;
        }
        let (d, nh) = (self.head_dim, self.n_head);
        // The rows of each page leaving the window, as f16 (a window-coded page decoded).
        let sources: Vec<Option<std::borrow::Cow<[f16]>>> = threads.map(&due, |&(s, p)| self.page_rows(s, p));
        // Encoded on the threads a head at a time (a prefill compresses a few pages per
        // layer, and a page at a time left a thread idle), then swapped in.
        let mut packed: Vec<Option<Box<[u8]>>> = sources.iter().map(|src| src.as_ref().map(|_| vec![0u8; codec.page_bytes()].into_boxed_slice())).collect();
        let mut heads: Vec<HeadToEncode> = sources
            .iter()
            .zip(packed.iter_mut())
            .filter_map(|(src, buf)| Some(codec.heads(src.as_ref()?, buf.as_mut()?)))
            .flatten()
            .collect();
        threads.for_each_mut(&mut heads, |h| codec.encode_head(h));
        drop(heads);
        // A digest's page summaries go to its stream's table, which the threads do not share.
        let digests: Vec<Option<select::Digest>> = if self.digests {
            threads.map(&due.iter().zip(&sources).collect::<Vec<_>>(), |&(&(s, p), src)| match (src, self.streams[s].page(p)) {
                (Some(rows), _) => Some(select::digest(rows, nh, d)),
                (None, Page::Packed(data)) => Some(select::digest(&codec.decode_page(data), nh, d)),
                _ => None,
            })
        } else {
            due.iter().map(|_| None).collect()
        };
        drop(sources);
        for (((s, p), packed), digest) in due.into_iter().zip(packed).zip(digests) {
            let st = &mut self.streams[s];
            if let Some(packed) = packed {
                st.pages[p].data = Page::Packed(packed);
            }
            st.set_digest(p, digest);
        }
    }

    /// The digest of a packed page, when the store keeps digests.
    fn digest_of(&self, packed: &[u8]) -> Option<select::Digest> {
        let codec = self.codec.as_ref().filter(|_| self.digests)?;
        Some(select::digest(&codec.decode_page(packed), self.n_head, self.head_dim))
    }

    /// Per KV head, the cells of [first, first + n) of a stream that a decode call reads with
    /// an attention budget of `budget` cells chosen by `unit`, as ranges counted from `first`;
    /// `None` when the call stays dense (see [`select`]). `visible(range)` says whether a query
    /// row can see a cell of a range (counted from `first`); `q` holds `n_q` rows of `n_head_q`
    /// heads of `head_dim` values, and query head `h` reads KV head `h / (n_head_q / n_head)`.
    /// The blocks are scored on `threads`.
    #[allow(clippy::too_many_arguments)]
    pub fn select(
        &self,
        stream: usize,
        first: usize,
        n: usize,
        visible: impl Fn(std::ops::Range<usize>) -> bool,
        q: &[f32],
        n_q: usize,
        n_head_q: usize,
        budget: usize,
        unit: select::Unit,
        threads: Threads,
    ) -> Option<Vec<Vec<std::ops::Range<usize>>>> {
        use select::BLOCK;
        let (d, nh) = (self.head_dim, self.n_head);
        let (group, per_page) = (n_head_q / nh, select::BLOCKS);
        let st = &self.streams[stream];
        let cells = first..first + n;
        let first_block = first / BLOCK;
        // Only compressed pages (in RAM or cold) have a digest.
        let blocks = select::Blocks::sort(cells.clone(), |p| st.has_digest(p), visible);
        let picks = blocks.picks(budget)?;
        let select::Blocks { whole, loose, always, .. } = &blocks;
        let keep = (select::REFINE * budget).div_ceil(PAGE);
        let blocks_len = select::block_summaries_len(nh, d);
        // The pages of the whole ones, as page indices.
        let ranked = whole.first().zip(whole.last()).map_or(0..0, |(&a, &b)| (first_block + a) / per_page..(first_block + b) / per_page + 1);
        // Block `i`'s page's entry in the block summaries.
        let page_entry = |i: usize| &st.block_summaries[(first_block + i) / per_page * blocks_len..][..blocks_len];
        let heads: Vec<usize> = (0..nh).collect();
        // Head `h`'s candidate blocks with their scores: the loose ones and the blocks of its
        // best pages.
        let score = |h: usize| {
            let rows: Vec<f32> = (0..n_q).flat_map(|i| &q[(i * n_head_q + h * group) * d..][..group * d]).copied().collect();
            let query = select::Query::new(&rows, d);
            let mut kept = whole.clone();
            if kept.len() > keep {
                let all = st.page_summaries.scores(h, &query, ranked.clone());
                let page_scores: Vec<f32> = whole.iter().map(|&i| all[(first_block + i) / per_page - ranked.start]).collect();
                let mut order: Vec<usize> = (0..whole.len()).collect();
                order.select_nth_unstable_by(keep, |&a, &b| page_scores[b].total_cmp(&page_scores[a]));
                kept = order[..keep].iter().map(|&k| whole[k]).collect();
            }
            // The chosen pages' blocks are scattered over the table: each page's fetched two
            // pages ahead, and scored in one call.
            let page_blocks = |i: usize| select::head_blocks(page_entry(i), h, d);
            kept.iter().take(2).for_each(|&i| crate::attn::prefetch(page_blocks(i)));
            let mut scored = Vec::with_capacity(kept.len() * per_page + loose.len());
            let mut s = [0.0f32; select::BLOCKS];
            for (k, &i) in kept.iter().enumerate() {
                if let Some(&next) = kept.get(k + 2) {
                    crate::attn::prefetch(page_blocks(next));
                }
                query.scores(page_blocks(i), &mut s);
                scored.extend((i..).zip(s));
            }
            scored.extend(loose.iter().map(|&i| (i, query.score(select::block_digest(page_entry(i), h, (first_block + i) % per_page, d)))));
            scored
        };
        match unit {
            // One task per KV head, from ranking to its ranges: nothing waits in between.
            select::Unit::Block => Some(threads.map(&heads, |&h| select::pick(&cells, always, score(h), picks))),
            select::Unit::Page => {
                let chosen = select::shared_pages(first_block, &threads.map(&heads, |&h| score(h)), picks);
                let n = chosen.len();
                Some(vec![select::pick(&cells, always, chosen, n); nh])
            }
        }
    }

    /// Records that an attention call read cells [first, first + n) of a stream where
    /// `visible(cell_range)` says so (the mask lets a query see them and, under an attention
    /// budget, they were selected), one check per page. Call once per attention call.
    pub fn note_seen(&self, stream: usize, first: usize, n: usize, visible: impl Fn(std::ops::Range<usize>) -> bool) {
        let tick = self.attn_tick.fetch_add(1, Ordering::Relaxed) + 1;
        let st = &self.streams[stream];
        let mut c = first;
        while c < first + n {
            let p = c / PAGE;
            let end = ((p + 1) * PAGE).min(first + n);
            if let Some(slot) = st.pages.get(p) {
                if !matches!(slot.data, Page::Empty) && visible(c - first..end - first) {
                    slot.last_seen.store(tick, Ordering::Relaxed);
                }
            }
            c = end;
        }
    }

    /// Allocated pages that the most recent attention call ([`KvStore::note_seen`]) did not
    /// read: pages of removed tokens, of another sequence's cells, or not selected. The pages
    /// a memory budget moves out first.
    pub fn pages_unseen(&self) -> usize {
        let tick = self.attn_tick.load(Ordering::Relaxed);
        self.streams
            .iter()
            .flat_map(|s| &s.pages)
            .filter(|s| !matches!(s.data, Page::Empty) && s.last_seen.load(Ordering::Relaxed) < tick)
            .count()
    }

    fn all_pages(&self) -> impl Iterator<Item = &Page> {
        self.streams.iter().flat_map(|s| s.pages.iter().map(|p| &p.data))
    }

    /// Bytes held by pages in RAM (staged copies of cold pages and digests included).
    pub fn bytes(&self) -> usize {
        let pages: usize = self
            .all_pages()
            .map(|p| match p {
                Page::F16(d) => d.len() * 2,
                Page::Window(d) => d.len(),
                p => p.packed().map_or(0, <[u8]>::len),
            })
            .sum();
        let digests: usize = self.streams.iter().map(|s| s.page_summaries.bytes() + s.block_summaries.len()).sum();
        let recent: usize = self.streams.iter().map(|s| s.recent.bytes()).sum();
        pages + digests + recent
    }

    /// Bytes of pages in the cold tier.
    pub fn cold_bytes(&self) -> usize {
        self.all_pages().map(|p| if let Page::Cold { slot, .. } = p { slot.len } else { 0 }).sum()
    }

    /// Bytes a page of this store takes in its compressed form (0 without a codec).
    pub fn packed_page_bytes(&self) -> usize {
        self.codec.map_or(0, |c| c.page_bytes())
    }

    /// Pages allocated (not compressed yet, compressed: cold ones included).
    pub fn page_counts(&self) -> (usize, usize) {
        let f = self.all_pages().filter(|p| matches!(p, Page::F16(_) | Page::Window(_))).count();
        let c = self.all_pages().filter(|p| matches!(p, Page::Packed(_) | Page::Cold { .. })).count();
        (f, c)
    }

    // --- The cold tier -------------------------------------------------------------------

    /// The pages whose bytes may leave RAM, with the attention tick when a query last read
    /// them: compressed pages (they go cold) and staged copies of cold pages (dropped without
    /// a write; `true`). The budget moves the least recently read out first, so pages of
    /// removed tokens (never read again) go before any page a query still reads.
    pub fn evictable(&self) -> Vec<(u64, PageId, bool)> {
        let mut v = Vec::new();
        for (s, st) in self.streams.iter().enumerate() {
            for (p, slot) in st.pages.iter().enumerate() {
                let staged = match slot.data {
                    Page::Packed(_) => false,
                    Page::Cold { staged: Some(_), .. } => true,
                    _ => continue,
                };
                v.push((slot.last_seen.load(Ordering::Relaxed), (s, p), staged));
            }
        }
        v
    }

    /// Moves compressed pages to the cold tier, each to its place in the store's region.
    /// Pages that are not compressed and in RAM are skipped. Returns the bytes freed.
    ///
    /// # Errors
    /// The cold store's error; the pages written before it are cold, the others unchanged.
    pub fn evict(&mut self, pages: &[PageId]) -> io::Result<usize> {
        let tier = self.tier.clone().ok_or_else(|| io::Error::other("store has no cold tier"))?;
        let (region, per_stream) = (self.region, self.pages_per_stream());
        let mut freed = 0;
        for &(s, p) in pages {
            let Some(slot) = self.streams[s].pages.get_mut(p) else { continue };
            let Page::Packed(data) = &slot.data else { continue };
            let cold = tier.write(region.place(s * per_stream + p), data)?;
            freed += data.len();
            slot.data = Page::Cold { slot: cold, staged: None };
        }
        Ok(freed)
    }

    /// Drops every staged copy (cold pages stay cold). Returns the bytes freed.
    pub fn unstage(&mut self) -> usize {
        let mut freed = 0;
        for slot in self.streams.iter_mut().flat_map(|s| s.pages.iter_mut()) {
            if let Page::Cold { staged, .. } = &mut slot.data {
                freed += staged.take().map_or(0, |d| d.len());
            }
        }
        freed
    }

    /// Drops the staged copies of these pages. Returns the bytes freed.
    pub fn unstage_pages(&mut self, pages: &[PageId]) -> usize {
        let mut freed = 0;
        for &(s, p) in pages {
            if let Some(PageSlot { data: Page::Cold { staged, .. }, .. }) = self.streams[s].pages.get_mut(p) {
                freed += staged.take().map_or(0, |d| d.len());
            }
        }
        freed
    }

    /// The cold pages not staged among the pages of cells [first, first + n) of a stream.
    pub fn cold_pages(&self, stream: usize, first: usize, n: usize) -> Vec<(PageId, Slot)> {
        let st = &self.streams[stream];
        self.page_span(stream, first, n).filter_map(|p| match st.pages[p].data {
            Page::Cold { slot, staged: None } => Some(((stream, p), slot)),
            _ => None,
        })
        .collect()
    }

    /// The cold pages with a staged copy among the pages of cells [first, first + n) of a
    /// stream.
    pub fn staged_pages(&self, stream: usize, first: usize, n: usize) -> usize {
        let st = &self.streams[stream];
        self.page_span(stream, first, n).filter(|&p| matches!(st.pages[p].data, Page::Cold { staged: Some(_), .. })).count()
    }

    /// The allocated pages of a stream that hold cells of [first, first + n).
    fn page_span(&self, stream: usize, first: usize, n: usize) -> std::ops::Range<usize> {
        first / PAGE..(first + n).div_ceil(PAGE).min(self.streams[stream].pages.len())
    }

    /// Installs staged copies read from the tier. A copy whose page has since changed (a
    /// write brought it back, or it went cold again as another generation) is dropped.
    pub fn install(&mut self, pages: Vec<(PageId, Slot, Box<[u8]>)>) {
        for ((s, p), slot, data) in pages {
            if let Some(PageSlot { data: Page::Cold { slot: now, staged }, .. }) = self.streams[s].pages.get_mut(p) {
                if *now == slot && staged.is_none() {
                    *staged = Some(data);
                }
            }
        }
    }

    /// Stages the cold pages of cells [first, first + n) of a stream, reading them on this
    /// thread. Returns the bytes read.
    ///
    /// # Errors
    /// The cold store's error (nothing is staged then).
    pub fn stage(&mut self, stream: usize, first: usize, n: usize) -> io::Result<usize> {
        let cold = self.cold_pages(stream, first, n);
        self.stage_pages(cold)
    }

    /// Stages the pages holding these global cells (before rows are written into them, or
    /// read one by one), reading them in one go (adjacent pages in one request).
    ///
    /// # Errors
    /// The cold store's error (nothing is staged then).
    pub fn stage_cells(&mut self, gcells: impl IntoIterator<Item = usize>) -> io::Result<()> {
        if self.tier.is_none() {
            return Ok(());
        }
        let mut pages: Vec<PageId> = gcells.into_iter().map(|g| self.locate(g)).map(|(s, p, _)| (s, p)).collect();
        pages.sort_unstable();
        pages.dedup();
        let cold = pages.into_iter().flat_map(|(s, p)| self.cold_pages(s, p * PAGE, PAGE)).collect();
        self.stage_pages(cold).map(|_| ())
    }

    /// Reads cold pages (not staged, as [`KvStore::cold_pages`] lists them) from the tier and
    /// installs them. Returns the bytes read.
    ///
    /// # Errors
    /// The cold store's error (nothing is staged then).
    pub fn stage_pages(&mut self, cold: Vec<(PageId, Slot)>) -> io::Result<usize> {
        if cold.is_empty() {
            return Ok(0);
        }
        let tier = self.tier.as_ref().ok_or_else(|| io::Error::other("cold page without tier"))?;
        let data = tier.read(&cold.iter().map(|c| c.1).collect::<Vec<_>>())?;
        let bytes = data.iter().map(|d| d.len()).sum();
        self.install(cold.into_iter().zip(data).map(|((id, slot), d)| (id, slot, d)).collect());
        Ok(bytes)
    }

    /// Reads a cold page's bytes from the tier (without staging it).
    fn read_cold(&self, s: usize, p: usize) -> io::Result<Box<[u8]>> {
        let tier = self.tier.as_ref().ok_or_else(|| io::Error::other("cold page without tier"))?;
        let Page::Cold { slot, .. } = self.streams[s].page(p) else { return Err(io::Error::other("page is not cold")) };
        tier.read(&[*slot]).map(|mut d| d.remove(0))
    }

    /// Cells that hold data: the sum over streams of the high-water marks.
    pub fn cells_in_use(&self) -> usize {
        self.streams.iter().map(|s| s.high_water).sum()
    }

    /// The rows of one head for cells [first, first + n) of a stream, as runs of uniform
    /// encoding. Cells never written read as zero; coded cells whose f16 copy the stream
    /// holds ([`Recent`]) read from it.
    fn head_rows(&self, stream: usize, first: usize, n: usize, head: usize) -> Vec<(usize, usize, Rows<'_>)> {
        let mut out = Vec::new();
        let d = self.head_dim;
        let st = &self.streams[stream];
        let mut held = st.recent.held_in(first..first + n).into_iter().peekable();
        let mut c = first;
        while c < first + n {
            let end = (c - c % PAGE + PAGE).min(first + n);
            let page = st.page(c / PAGE);
            let rows = |c: usize, len: usize| {
                let slot = c % PAGE;
                match page {
                    Page::Empty => Rows::F16(&self.zeros[..len * d]),
                    Page::F16(data) => Rows::F16(&data[(head * PAGE + slot) * d..][..len * d]),
                    Page::Window(data) => self.window_codec.as_ref().expect("window page without window codes").rows(data, head, slot, len),
                    page => {
                        let data = page.packed().expect("a cold page is staged before attention reads it");
                        self.codec.as_ref().expect("packed page without codec").rows(data, head, slot, len)
                    }
                }
            };
            let coded = !matches!(page, Page::Empty | Page::F16(_));
            while c < end {
                match held.next_if(|&h| h < end) {
                    Some(h) if coded => {
                        if h > c {
                            out.push((c, h - c, rows(c, h - c)));
                        }
                        // The held cells that follow in consecutive slots.
                        let mut len = 1;
                        while held.next_if(|&x| x == h + len && x < end && x % st.recent.cells.len() != 0).is_some() {
                            len += 1;
                        }
                        out.push((h, len, Rows::F16(st.recent.rows(head, d, h, len))));
                        c = h + len;
                    }
                    Some(_) => {}
                    None => {
                        out.push((c, end - c, rows(c, end - c)));
                        c = end;
                    }
                }
            }
        }
        out
    }
}


/// The attention segments of one KV head over cells [first, first + n) of a stream, K and V
/// side by side. `first_cell` of each segment counts from `first` (the mask's column).
pub fn segments<'a>(k: &'a KvStore, v: &'a KvStore, stream: usize, first: usize, n: usize, head: usize) -> Vec<Segment<'a>> {
    segments_in(k, v, stream, first, std::slice::from_ref(&(0..n)), head)
}

/// As [`segments`], over the cells `first + r` for each range `r` of `ranges` (a selection).
pub fn segments_in<'a>(k: &'a KvStore, v: &'a KvStore, stream: usize, first: usize, ranges: &[std::ops::Range<usize>], head: usize) -> Vec<Segment<'a>> {
    let mut out = Vec::new();
    for r in ranges {
        // K's runs and V's cover the same cells but may end at different ones (one side's
        // recent rows are f16 copies, the other's f16 pages): each segment ends where
        // either run does.
        let mut ks = k.head_rows(stream, first + r.start, r.len(), head).into_iter();
        let mut vs = v.head_rows(stream, first + r.start, r.len(), head).into_iter();
        let (mut kr, mut vr) = (ks.next(), vs.next());
        let (mut ko, mut vo) = (0, 0);
        while let (Some((c, kn, krows)), Some((_, vn, vrows))) = (kr, vr) {
            let n = (kn - ko).min(vn - vo);
            out.push(Segment { first_cell: c + ko - first, n, k: krows.slice(ko, n, k.head_dim), v: vrows.slice(vo, n, v.head_dim) });
            (ko, vo) = (ko + n, vo + n);
            if ko == kn {
                (kr, ko) = (ks.next(), 0);
            }
            if vo == vn {
                (vr, vo) = (vs.next(), 0);
            }
        }
    }
    out
}
