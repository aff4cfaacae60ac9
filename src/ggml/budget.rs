//! A device's KV memory budget in a graph's life: the cold pages an attention node reads are
//! staged before it runs (prefetched by the transfer stream for the next layers, or read on
//! the spot), and after the graph the device's pages are brought back within the budget.
//!
//! The budget covers the pages in RAM and the staged copies: the resident pages are kept
//! within the budget less a staging reserve, room for the attention's own layer and the
//! layers being prefetched (at most half the budget, so a layer larger than that exceeds it
//! while it is staged). Staged copies that fit in half the reserve stay after their attention
//! (a cache of the pages the next token is likely to read again); the rest are dropped, and
//! after the graph the least recently read copies and pages leave first. A budget smaller than
//! the f16 pages (sinks and window, which never go cold) is exceeded by them, and a warning
//! says so once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llama_cpp_sys_2 as ll;

use super::backend::kv_ranges;
use super::buffer::KvEntry;
use super::{log_warn, Config};
use crate::kv::cold::{ColdStore, SpillFile};
use crate::kv::tier::{self, Slot, Tier};
use crate::kv::{PageId, PAGE};
use crate::sched::{Fence, Transfer};

/// The tier of one device and its transfer stream.
pub(crate) struct Budget {
    pub tier: Arc<Tier>,
    /// `None` with prefetch 0: the compute stream reads cold pages itself.
    transfer: Option<Transfer>,
    prefetch: usize,
    warned: Mutex<bool>,
    /// The room left for staged copies at the last `enforce`, bytes.
    reserve: AtomicU64,
}

impl Budget {
    /// The budget of `config` with a spill file in `DSPARK_SPILL_DIR` (else the temp folder).
    pub fn new(config: &Config, bytes: u64) -> Result<Budget, String> {
        let dir = std::env::var_os("DSPARK_SPILL_DIR").map_or_else(std::env::temp_dir, Into::into);
        let file = SpillFile::create(&dir).map_err(|e| format!("cannot create the KV spill file in {}: {e} (set DSPARK_SPILL_DIR to a writable folder)", dir.display()))?;
        if !file.is_direct() {
            log_warn(&format!("{} refuses O_DIRECT: cold KV pages go through the page cache, dropped after each read", dir.display()));
        }
        Budget::with_cold(config, bytes, Box::new(file))
    }

    /// The budget of `config` spilling to `cold`.
    pub fn with_cold(config: &Config, bytes: u64, cold: Box<dyn ColdStore>) -> Result<Budget, String> {
        let tier = Arc::new(Tier::new(bytes, cold));
        let transfer = match config.prefetch {
            0 => None,
            d => Some(Transfer::new(tier.clone(), d).map_err(|e| format!("cannot start the KV transfer thread: {e}"))?),
        };
        Ok(Budget { tier, transfer, prefetch: config.prefetch, warned: Mutex::new(false), reserve: AtomicU64::new(0) })
    }

    /// The transfer stream (none with prefetch 0).
    pub fn transfer(&self) -> Option<&Transfer> {
        self.transfer.as_ref()
    }

    /// Brings the device's pages within the budget after a graph (see the module docs),
    /// once the pages the transfer stream encoded are swapped in.
    pub fn enforce(&self, entries: &[Arc<KvEntry>]) -> Result<(), String> {
        let mut guards: Vec<_> = entries.iter().map(|e| e.write()).collect();
        for g in &mut guards {
            g.finish_compaction();
        }
        // Staging needs room for K and V of the layer attended and of the layers prefetched:
        // at most each's compressed pages, or the pages its last attention read (a selection).
        let largest = entries
            .iter()
            .zip(&guards)
            .map(|(e, s)| {
                let read = e.last_reads.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(usize::MAX, |r| r.iter().map(|&(_, f, n)| (f + n).div_ceil(PAGE) - f / PAGE).sum());
                (s.page_counts().1.min(read) * s.packed_page_bytes()) as u64
            })
            .max()
            .unwrap_or(0);
        let reserve = (2 * largest * (1 + self.prefetch as u64)).min(self.tier.budget() / 2);
        self.reserve.store(reserve, Ordering::Relaxed);
        let mut stores: Vec<_> = guards.iter_mut().map(|g| &mut **g).collect();
        let over = tier::fit(&mut stores, self.tier.budget() - reserve).map_err(|e| format!("moving KV pages to the spill file ({}): {e}", self.tier.describe()))?;
        if over > 0 && !std::mem::replace(&mut *self.warned.lock().unwrap_or_else(|e| e.into_inner()), true) {
            log_warn(&format!(
                "KV budget of {} bytes is smaller than the f16 sinks and window DSpark keeps in RAM (over by {over} bytes)",
                self.tier.budget()
            ));
        }
        Ok(())
    }
}

/// What one attention node reads: its K and V entries, and per KV stream (stream, first
/// cell, cells).
pub(crate) type KvRanges = (Vec<Arc<KvEntry>>, Vec<(usize, usize, usize)>);

/// The cold pages one attention node will read: per K/V entry, the pages and their slots.
type Want = Vec<(Arc<KvEntry>, Vec<(PageId, Slot)>)>;

/// One graph's staging: which attention nodes read which KV, and the fetches in flight.
pub(crate) struct Stager<'g> {
    budget: &'g Budget,
    /// Per attention node of the graph, in order: its K and V entries and cell ranges.
    nodes: Vec<KvRanges>,
    inflight: Vec<Option<(Want, Arc<Fence>)>>,
    /// Bytes staged by this graph so far, per node, and those kept after their node ran.
    staged: Vec<u64>,
    kept: u64,
}

impl<'g> Stager<'g> {
    /// # Safety
    /// `attn` must be the graph's valid FLASH_ATTN_EXT nodes on DSpark's KV, in order, and
    /// stay valid while the stager lives.
    pub unsafe fn new(budget: &'g Budget, attn: &[*mut ll::ggml_tensor]) -> Result<Stager<'g>, String> {
        // SAFETY: valid attention nodes (caller).
        let nodes = attn.iter().map(|&n| unsafe { kv_ranges(n) }).collect::<Result<Vec<_>, _>>()?;
        let inflight = (0..nodes.len()).map(|_| None).collect();
        let staged = vec![0; nodes.len()];
        Ok(Stager { budget, nodes, inflight, staged, kept: 0 })
    }

    /// The cold pages node `j` is expected to read: those its K entry's last call read (the
    /// same layer's selection for the previous token), or all of its cells.
    fn want(&self, j: usize) -> Want {
        let (entries, ranges) = &self.nodes[j];
        let predicted = entries[0].last_reads.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ranges = predicted.as_ref().unwrap_or(ranges);
        entries
            .iter()
            .map(|e| {
                let s = e.read();
                (e.clone(), ranges.iter().flat_map(|&(stream, first, n)| s.cold_pages(stream, first, n)).collect::<Vec<_>>())
            })
            .filter(|(_, p)| !p.is_empty())
            .collect()
    }

    /// Before attention node `i` runs, which reads `reads` (stream, first cell, cells): asks
    /// the transfer stream for the nodes after it, up to the prefetch depth, then stages the
    /// cold pages `reads` covers, from its fetch when one was made, reading what is still
    /// missing itself. Cold pages found staged count as prefetch hits, the others as misses.
    pub fn before(&mut self, i: usize, reads: Vec<(usize, usize, usize)>) -> Result<(), String> {
        let tier = &self.budget.tier;
        if let Some(x) = &self.budget.transfer {
            for j in i + 1..(i + 1 + self.budget.prefetch).min(self.nodes.len()) {
                if self.inflight[j].is_none() {
                    let want = self.want(j);
                    let slots: Vec<Slot> = want.iter().flat_map(|(_, p)| p.iter().map(|&(_, s)| s)).collect();
                    if !slots.is_empty() {
                        self.inflight[j] = Some((want, x.fetch(slots)));
                    }
                }
            }
        }
        if let Some((want, fence)) = self.inflight[i].take() {
            let (got, waited) = fence.wait();
            tier.add_wait(waited);
            let mut got = got.map_err(|e| format!("reading KV pages from the spill file ({}): {e}", tier.describe()))?.into_iter();
            for (e, pages) in want {
                let pages: Vec<_> = pages.into_iter().map(|(id, slot)| (id, slot, got.next().expect("one delivery per slot"))).collect();
                self.staged[i] += pages.iter().map(|p| p.2.len() as u64).sum::<u64>();
                e.write().install(pages);
            }
        }
        // What no fetch brought (prefetch 0, pages the prediction missed, or pages that went
        // cold after the fetch).
        let entries = &self.nodes[i].0;
        for e in entries {
            let mut s = e.write();
            for &(stream, first, n) in &reads {
                let hits = s.staged_pages(stream, first, n) as u64;
                tier.counters.prefetch_hits.fetch_add(hits, Ordering::Relaxed);
                let t = Instant::now();
                let cold = s.cold_pages(stream, first, n);
                let missed = cold.len() as u64;
                if missed == 0 {
                    continue;
                }
                self.staged[i] += s.stage_pages(cold).map_err(|e| format!("reading KV pages from the spill file ({}): {e}", tier.describe()))? as u64;
                let d = t.elapsed();
                tier.add_wait(d);
                tier.counters.transfer_busy_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
                tier.counters.prefetch_misses.fetch_add(missed, Ordering::Relaxed);
            }
        }
        *entries[0].last_reads.lock().unwrap_or_else(|e| e.into_inner()) = Some(reads);
        Ok(())
    }

    /// After attention node `i`: the copies it staged stay in RAM while they fit in half the
    /// staging reserve (the next token's attention, which reads mostly the same pages when it
    /// selects them, finds them there; the budget drops the least recently read first), else
    /// they are dropped and read again next time.
    pub fn after(&mut self, i: usize) {
        let fresh = std::mem::take(&mut self.staged[i]);
        if self.kept + fresh <= self.budget.reserve.load(Ordering::Relaxed) / 2 {
            self.kept += fresh;
            return;
        }
        for e in &self.nodes[i].0 {
            e.write().unstage();
        }
    }
}
