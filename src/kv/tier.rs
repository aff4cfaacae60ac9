//! The KV memory budget and the cold tier it spills to.
//!
//! A [`Tier`] is shared by every store of one DSpark device (one KV configuration): the budget
//! counts every page they hold in RAM, and their cold pages share one spill file. Placement of
//! a cold page in the file is a slot of whole [`BLOCK`]s; a store moves its pages out a batch
//! at a time, so one store's cold pages tend to sit side by side and are read back with few,
//! large requests ([`KvStore::stage`](super::KvStore::stage) merges adjacent slots).

use std::collections::BTreeMap;
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
        self.len.next_multiple_of(BLOCK)
    }
}

/// Free space in the spill file: freed slots by size, and the end of the file.
#[derive(Default)]
struct Slots {
    end: u64,
    free: BTreeMap<usize, Vec<u64>>,
}

impl Slots {
    fn take(&mut self, span: usize) -> u64 {
        if let Some(offs) = self.free.get_mut(&span) {
            if let Some(off) = offs.pop() {
                return off;
            }
        }
        let off = self.end;
        self.end += span as u64;
        off
    }

    fn give_back(&mut self, off: u64, span: usize) {
        self.free.entry(span).or_default().push(off);
    }
}

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
    slots: Mutex<Slots>,
    gen: AtomicU64,
    pub counters: TierCounters,
}

impl Tier {
    /// A tier holding at most `budget` bytes of pages in RAM, spilling to `cold`.
    pub fn new(budget: u64, cold: Box<dyn ColdStore>) -> Tier {
        Tier { budget, cold, slots: Mutex::default(), gen: AtomicU64::new(0), counters: TierCounters::default() }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn describe(&self) -> String {
        self.cold.describe()
    }

    /// Writes one page to a new slot.
    ///
    /// # Errors
    /// The cold store's error (disk full, I/O error); nothing is allocated then.
    pub fn write(&self, data: &[u8]) -> io::Result<Slot> {
        let mut buf = AlignedBuf::new(data.len());
        buf.as_mut_slice()[..data.len()].copy_from_slice(data);
        let span = buf.as_slice().len();
        let off = self.slots.lock().unwrap_or_else(|e| e.into_inner()).take(span);
        if let Err(e) = self.cold.write_at(off, buf.as_slice()) {
            self.free(Slot { off, len: data.len(), gen: 0 });
            return Err(e);
        }
        self.counters.write_bytes.fetch_add(span as u64, Ordering::Relaxed);
        Ok(Slot { off, len: data.len(), gen: self.gen.fetch_add(1, Ordering::Relaxed) + 1 })
    }

    /// Reads the pages of `slots` (any order), merging slots that are adjacent in the file
    /// into one request. Returns each page's bytes, in the order given.
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
            while j < order.len() && slots[order[j]].off == end {
                end += slots[order[j]].span() as u64;
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

    /// Gives a slot's space back (its page came back to RAM for good, or was dropped).
    pub fn free(&self, slot: Slot) {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).give_back(slot.off, slot.span());
    }

    /// Adds a compute-stream wait.
    pub fn add_wait(&self, d: Duration) {
        self.counters.compute_wait_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Brings the pages `stores` hold in RAM within `limit` bytes: drops every staged copy, then
/// moves compressed pages to the cold tier, least recently seen by a query first (pages of
/// removed tokens, never seen again, go before any page that queries still read; among equals,
/// lower pages, the older tokens, first). The pages chosen in one store are written in page
/// order, so they sit side by side in the spill file. Returns the bytes still over the limit
/// (0 when they fit; more when what is left is f16: the sinks and the window never go cold).
///
/// # Errors
/// The cold store's error; the pages moved before it are cold, the others unchanged.
pub fn fit(stores: &mut [&mut super::KvStore], limit: u64) -> io::Result<u64> {
    let mut held: u64 = stores.iter_mut().map(|s| {
        s.unstage();
        s.bytes() as u64
    }).sum();
    if held <= limit {
        return Ok(0);
    }
    let mut candidates: Vec<(u64, usize, super::PageId)> =
        stores.iter().enumerate().flat_map(|(i, s)| s.evictable().into_iter().map(move |(seen, id)| (seen, i, id))).collect();
    candidates.sort_by_key(|&(seen, i, (s, p))| (seen, p, s, i));
    let mut chosen: Vec<Vec<super::PageId>> = vec![Vec::new(); stores.len()];
    for (_, i, id) in candidates {
        if held <= limit {
            break;
        }
        held -= stores[i].packed_page_bytes() as u64;
        chosen[i].push(id);
    }
    for (store, mut pages) in stores.iter_mut().zip(chosen) {
        pages.sort_unstable();
        store.evict(&pages)?;
    }
    Ok(held.saturating_sub(limit))
}

#[cfg(test)]
mod tests {
    use super::super::cold::MemCold;
    use super::*;

    #[test]
    fn pages_round_trip_and_adjacent_slots_merge_into_one_read() {
        let cold = MemCold::default();
        let t = Tier::new(0, Box::new(cold.clone()));
        let pages: Vec<Vec<u8>> = (0..5).map(|i| (0..5000 + i * 100).map(|j| (i * 31 + j) as u8).collect()).collect();
        let slots: Vec<Slot> = pages.iter().map(|p| t.write(p).unwrap()).collect();
        assert!(slots.windows(2).all(|w| w[1].off == w[0].off + w[0].span() as u64 && w[1].gen > w[0].gen));
        let back = t.read(&[slots[3], slots[0], slots[1], slots[2]]).unwrap();
        for (b, i) in back.iter().zip([3, 0, 1, 2]) {
            assert_eq!(&b[..], &pages[i][..]);
        }
        // Four adjacent slots: one request of their spans.
        assert_eq!(t.counters.read_bytes.load(Ordering::Relaxed), slots[..4].iter().map(|s| s.span() as u64).sum::<u64>());
        // A freed slot is reused for a page of the same span.
        t.free(slots[1]);
        assert_eq!(t.write(&pages[1]).unwrap().off, slots[1].off);
    }

    #[test]
    fn a_failed_write_allocates_nothing_and_a_failed_read_is_an_error() {
        let cold = MemCold::default();
        let t = Tier::new(0, Box::new(cold.clone()));
        let s = t.write(&[1u8; 100]).unwrap();
        cold.fail.store(true, Ordering::Relaxed);
        assert!(t.write(&[2u8; 100]).is_err());
        assert!(t.read(&[s]).is_err());
        cold.fail.store(false, Ordering::Relaxed);
        let s2 = t.write(&[3u8; 100]).unwrap();
        assert_eq!(s2.off, s.off + s.span() as u64, "the failed write's slot was given back");
        assert_eq!(&t.read(&[s]).unwrap()[0][..], &[1u8; 100][..]);
    }
}
