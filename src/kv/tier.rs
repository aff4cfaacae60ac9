//! The KV memory budget and the cold tier it spills to.
//!
//! A [`Tier`] is shared by every store of one DSpark device (one KV configuration): the budget
//! counts every page they hold in RAM, and their cold pages share one spill file. Each store
//! gets a region of the file with a fixed place for each of its pages (whole [`BLOCK`]s), so
//! one store's cold pages lie in page order and an attention reads them back with one large
//! request per run of cold pages ([`Tier::read`] merges adjacent slots), not one per page.
//! The file is sparse: a region costs disk only where pages were written. (Placing pages by
//! the time they went cold instead interleaves the stores' batches, and reads then ran at 0.9
//! GB/s against the disk's 1.6 GB/s in 1 MiB requests.)

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::cold::{AlignedBuf, ColdStore, BLOCK};

/// Where one cold page's bytes are: `len` bytes at `off`, written as generation `gen` (unique
/// per write, so a prefetched copy of an older write is never taken for the current one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub off: u64,
    pub len: usize,
    pub gen: u64,
}

impl Slot {
    /// Bytes the slot spans in the file (whole blocks).
    pub fn span(&self) -> usize {
        span(self.len)
    }
}

/// The bytes a page of `len` bytes takes in the spill file: whole blocks.
fn span(len: usize) -> usize {
    len.next_multiple_of(BLOCK)
}

/// One store's part of the spill file: page place `i` is at `base + i * span`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    base: u64,
    span: u64,
}

impl Region {
    /// The file offset of page place `i`.
    pub fn place(&self, i: usize) -> u64 {
        self.base + i as u64 * self.span
    }
}

/// Disk space is reserved a piece of this size at a time, where the first page in it goes cold:
/// a store's cold pages then lie in extents of at least this size (what a read needs to run
/// at the disk's rate: 1 MiB requests read at 1.8 GB/s here, 8 KiB ones at 0.17).
pub const EXTENT: u64 = 1 << 20;

/// Gaps between cold pages this small are read (and dropped) with the pages around them: one
/// large request costs less than several small ones (on this machine's disk 4 KiB reads are
/// 3x slower per byte than 1 MiB reads), and a selection reads scattered pages.
pub const MAX_GAP: u64 = 64 << 10;

/// Counters of the cold tier and of the streams that move its pages (all cumulative).
#[derive(Default)]
pub struct TierCounters {
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Time the transfer stream spent reading pages, ns.
    pub transfer_busy_ns: AtomicU64,
    /// Time the compute stream waited for pages (prefetched ones not yet there, and pages it
    /// read itself), ns.
    pub compute_wait_ns: AtomicU64,
    /// Pages the compute stream found prefetched / had to read itself.
    pub prefetch_hits: AtomicU64,
    pub prefetch_misses: AtomicU64,
}

/// The budget, the cold store and its slots. See the module documentation.
pub struct Tier {
    budget: u64,
    cold: Box<dyn ColdStore>,
    /// The end of the last region handed out.
    regions_end: Mutex<u64>,
    /// Which [`EXTENT`]-sized pieces of the file have their disk space reserved.
    reserved: Mutex<std::collections::HashSet<u64>>,
    gen: AtomicU64,
    pub counters: TierCounters,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier").field("budget", &self.budget).field("cold", &self.cold.describe()).finish_non_exhaustive()
    }
}

impl Tier {
    /// A tier holding at most `budget` bytes of pages in RAM, spilling to `cold`.
    pub fn new(budget: u64, cold: Box<dyn ColdStore>) -> Tier {
        Tier { budget, cold, regions_end: Mutex::new(0), reserved: Mutex::default(), gen: AtomicU64::new(0), counters: TierCounters::default() }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn describe(&self) -> String {
        self.cold.describe()
    }

    /// A region of `slots` page places of `page_len` bytes each for one store.
    pub fn region(&self, slots: usize, page_len: usize) -> Region {
        let mut end = self.regions_end.lock().unwrap_or_else(|e| e.into_inner());
        let r = Region { base: *end, span: span(page_len) as u64 };
        *end += slots as u64 * r.span;
        r
    }

    /// Writes one page at `off` (a page place of a region).
    ///
    /// # Errors
    /// The cold store's error (disk full, I/O error).
    pub fn write(&self, off: u64, data: &[u8]) -> io::Result<Slot> {
        let end = off + data.len() as u64;
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        for piece in off / EXTENT..end.div_ceil(EXTENT) {
            if reserved.insert(piece) {
                // A file system without fallocate still works, only slower to read back.
                let _ = self.cold.reserve(piece * EXTENT, EXTENT);
            }
        }
        drop(reserved);
        let mut buf = AlignedBuf::new(data.len());
        buf.as_mut_slice()[..data.len()].copy_from_slice(data);
        self.cold.write_at(off, buf.as_slice())?;
        self.counters.write_bytes.fetch_add(buf.as_slice().len() as u64, Ordering::Relaxed);
        Ok(Slot { off, len: data.len(), gen: self.gen.fetch_add(1, Ordering::Relaxed) + 1 })
    }

    /// Reads the pages of `slots` (any order), merging slots that are adjacent in the file,
    /// or apart by less than [`MAX_GAP`], into one request. Returns each page's bytes, in the
    /// order given.
    ///
    /// # Errors
    /// The cold store's error, or a short read.
    pub fn read(&self, slots: &[Slot]) -> io::Result<Vec<Box<[u8]>>> {
        let mut order: Vec<usize> = (0..slots.len()).collect();
        order.sort_by_key(|&i| slots[i].off);
        let mut out: Vec<Option<Box<[u8]>>> = vec![None; slots.len()];
        let mut i = 0;
        while i < order.len() {
            let first = slots[order[i]];
            let mut j = i + 1;
            let mut end = first.off + first.span() as u64;
            while j < order.len() && slots[order[j]].off <= end + MAX_GAP {
                end = end.max(slots[order[j]].off + slots[order[j]].span() as u64);
                j += 1;
            }
            let mut buf = AlignedBuf::new((end - first.off) as usize);
            self.cold.read_at(first.off, buf.as_mut_slice())?;
            self.counters.read_bytes.fetch_add(end - first.off, Ordering::Relaxed);
            for &k in &order[i..j] {
                let s = slots[k];
                let at = (s.off - first.off) as usize;
                out[k] = Some(buf.as_slice()[at..at + s.len].into());
            }
            i = j;
        }
        Ok(out.into_iter().map(|b| b.expect("every slot read")).collect())
    }

    /// Adds a compute-stream wait.
    pub fn add_wait(&self, d: Duration) {
        self.counters.compute_wait_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Brings the pages `stores` hold in RAM within `limit` bytes: drops staged copies of cold
/// pages and moves compressed pages to the cold tier, least recently read by a query first
/// (pages of removed tokens, never read again, go before any page that queries still read;
/// among equals, staged copies, then lower pages, the older tokens, first). Returns the bytes still over the limit
/// (0 when they fit; more when what is left is f16: the sinks and the window never go cold).
///
/// # Errors
/// The cold store's error; the pages moved before it are cold, the others unchanged.
pub fn fit(stores: &mut [&mut super::KvStore], limit: u64) -> io::Result<u64> {
    let mut held: u64 = stores.iter().map(|s| s.bytes() as u64).sum();
    if held <= limit {
        return Ok(0);
    }
    let mut candidates: Vec<(u64, usize, super::PageId, bool)> =
        stores.iter().enumerate().flat_map(|(i, s)| s.evictable().into_iter().map(move |(seen, id, staged)| (seen, i, id, staged))).collect();
    // Least recently read first; at equal recency a staged copy (dropped, no write) first.
    candidates.sort_by_key(|&(seen, i, (s, p), staged)| (seen, !staged, p, s, i));
    let mut drop: Vec<Vec<super::PageId>> = vec![Vec::new(); stores.len()];
    let mut evict: Vec<Vec<super::PageId>> = vec![Vec::new(); stores.len()];
    for (_, i, id, staged) in candidates {
        if held <= limit {
            break;
        }
        held -= stores[i].packed_page_bytes() as u64;
        if staged { &mut drop[i] } else { &mut evict[i] }.push(id);
    }
    for ((store, d), mut e) in stores.iter_mut().zip(drop).zip(evict) {
        store.unstage_pages(&d);
        e.sort_unstable();
        store.evict(&e)?;
    }
    Ok(held.saturating_sub(limit))
}

#[cfg(test)]
mod tests {
    use super::super::cold::{MemCold, BLOCK};
    use super::*;

    #[test]
    fn pages_round_trip_and_adjacent_places_merge_into_one_read() {
        let cold = MemCold::default();
        let t = Tier::new(0, Box::new(cold.clone()));
        let (a, b) = (t.region(8, 5000), t.region(8, 5000));
        assert_eq!(b.place(0) - a.place(0), 8 * 2 * BLOCK as u64, "regions do not overlap");
        assert_eq!(b.place(3) - b.place(0), 3 * 2 * BLOCK as u64);
        let pages: Vec<Vec<u8>> = (0..5).map(|i| (0..5000).map(|j| (i * 31 + j) as u8).collect()).collect();
        let slots: Vec<Slot> = pages.iter().enumerate().map(|(i, p)| t.write(b.place(i), p).unwrap()).collect();
        assert!(slots.windows(2).all(|w| w[1].gen > w[0].gen));
        let back = t.read(&[slots[3], slots[0], slots[1], slots[2]]).unwrap();
        for (got, i) in back.iter().zip([3, 0, 1, 2]) {
            assert_eq!(&got[..], &pages[i][..]);
        }
        // Four adjacent places: one request of their spans.
        assert_eq!(t.counters.read_bytes.load(Ordering::Relaxed), 4 * 2 * BLOCK as u64);
        // Places 0 and 2: one request that also reads the small gap between them.
        let back = t.read(&[slots[2], slots[0]]).unwrap();
        assert!(back[0][..] == pages[2][..] && back[1][..] == pages[0][..]);
        assert_eq!(t.counters.read_bytes.load(Ordering::Relaxed), 7 * 2 * BLOCK as u64);
        // Pages further apart than MAX_GAP: a request each.
        let far = t.region(64, 5000);
        let s = [t.write(far.place(0), &pages[0]).unwrap(), t.write(far.place(40), &pages[1]).unwrap()];
        let before = t.counters.read_bytes.load(Ordering::Relaxed);
        let back = t.read(&s).unwrap();
        assert!(back[0][..] == pages[0][..] && back[1][..] == pages[1][..]);
        assert_eq!(t.counters.read_bytes.load(Ordering::Relaxed) - before, 2 * 2 * BLOCK as u64);
    }

    #[test]
    fn a_failed_write_or_read_is_an_error_and_the_next_one_works() {
        let cold = MemCold::default();
        let t = Tier::new(0, Box::new(cold.clone()));
        let s = t.write(0, &[1u8; 100]).unwrap();
        cold.fail.store(true, Ordering::Relaxed);
        assert!(t.write(BLOCK as u64, &[2u8; 100]).is_err());
        assert!(t.read(&[s]).is_err());
        cold.fail.store(false, Ordering::Relaxed);
        assert_eq!(&t.read(&[s]).unwrap()[0][..], &[1u8; 100][..]);
    }
}
