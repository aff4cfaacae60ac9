//! The paged store's policies: which pages stay f16 (sinks, and the pages written within the
//! last `window` rows, by recency, not by position), what memory an empty store costs, and
//! which pages the last attention call could see.

use dspark::attn::Threads;
use dspark::codec::Quant;
use dspark::kv::select::Unit;
use dspark::kv::{KvStore, PageView, StoreConfig, PAGE};

const HEADS: usize = 3;
const D: usize = 64;

fn store(cells: usize) -> KvStore {
    KvStore::new(StoreConfig { quant: Some(Quant::Q4), window: 128, digests: false, centered: true, window_quant: None, recent: 0 }, HEADS, D, cells, 1).unwrap()
}

fn write(s: &mut KvStore, cells: std::ops::Range<usize>) {
    let row: Vec<f32> = (0..HEADS * D).map(|i| (i as f32 * 0.37).sin()).collect();
    for c in cells {
        s.write_row(c, &row);
    }
    s.compact(Threads::serial());
}

/// Reproducible values uniform in [-1, 1) from `seed` (a linear congruential generator).
fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed;
    move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn f16_pages(s: &KvStore) -> Vec<usize> {
    (0..s.pages_per_stream()).filter(|&p| s.is_f16(p * PAGE)).collect()
}

#[test]
fn sequential_writes_keep_the_sink_page_and_the_window_in_f16() {
    let mut s = store(1024);
    write(&mut s, 0..448);
    // Pages 0 (sinks), 5 and 6 (cells 320..447, the last 128 rows written).
    assert_eq!(f16_pages(&s), vec![0, 5, 6]);
}

#[test]
fn after_a_context_shift_the_newest_rows_are_f16_wherever_they_were_written() {
    let mut s = store(1024);
    write(&mut s, 0..448);
    // llama.cpp's context shift frees cells 64..320 and writes the next tokens there.
    write(&mut s, 64..192);
    // The newest 128 rows (cells 64..191, pages 1 and 2) are f16; pages 5 and 6 have not been
    // written for 128 rows and are compressed. (By distance from the highest cell, pages 1
    // and 2 would have been compressed as they were written.)
    assert_eq!(f16_pages(&s), vec![0, 1, 2]);
    for c in 64..192 {
        assert!(s.is_f16(c), "cell {c}");
    }
}

#[test]
fn a_rewrite_in_place_does_not_make_a_page_recent() {
    let mut s = store(1024);
    write(&mut s, 0..448);
    let row = vec![0.5f32; HEADS * D];
    for c in 64..448 {
        s.rewrite_row(c, &row); // a K-shift touching every cell
    }
    s.compact(Threads::serial());
    assert_eq!(f16_pages(&s), vec![0, 5, 6]);
}

#[test]
fn an_empty_store_costs_no_page_table() {
    let s = KvStore::new(StoreConfig { quant: Some(Quant::Q4), window: 128, digests: false, centered: true, window_quant: None, recent: 0 }, 8, 128, 1 << 30, 4).unwrap();
    assert_eq!(s.bytes(), 0);
    assert!((0..4).all(|st| s.pages_allocated_span(st) == 0));
    let mut s = s;
    s.write_row(3 * (1 << 30) + 100, &vec![1.0; 8 * 128]);
    assert_eq!(s.pages_allocated_span(3), 2, "the table grows to the highest page written");
    assert_eq!(s.pages_allocated_span(0), 0);
}

#[test]
fn pages_that_no_query_sees_are_counted() {
    let mut s = store(1024);
    write(&mut s, 0..320);
    // Cells 100..200 removed: the mask hides them from every query.
    s.note_seen(0, 0, 320, |r| !(r.start >= 100 && r.end <= 200));
    // Page 2 (cells 128..191) lies wholly inside the hole.
    assert_eq!(s.pages_unseen(), 1);
    s.note_seen(0, 0, 320, |_| true);
    assert_eq!(s.pages_unseen(), 0);
}

// --- The memory budget and the cold tier -----------------------------------------------------

mod tier {
    use super::*;
    use dspark::kv::cold::MemCold;
    use dspark::kv::tier::{fit, Tier};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    /// A store of 1024 cells with distinct random rows, a cold tier in memory, and the rows.
    fn filled(cold: &MemCold) -> (KvStore, Vec<Vec<f32>>) {
        let mut s = store(1024);
        s.set_tier(Arc::new(Tier::new(0, Box::new(cold.clone()))));
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let rows: Vec<Vec<f32>> = (0..1024).map(|_| (0..HEADS * D).map(|_| next()).collect()).collect();
        for (c, r) in rows.iter().enumerate() {
            s.write_row(c, r);
        }
        s.compact(Threads::serial());
        (s, rows)
    }

    fn read_all(s: &KvStore) -> Vec<Vec<f32>> {
        (0..1024)
            .map(|c| {
                let mut r = vec![0.0; HEADS * D];
                s.read_row(c, &mut r);
                r
            })
            .collect()
    }

    /// Pages leaving the window can be encoded on the transfer stream: until their codes are
    /// swapped in they read back as their f16 rows, and a write waits for them, so the store
    /// holds byte for byte what compacting on the caller's thread gives.
    #[test]
    fn pages_encoded_on_the_transfer_stream_are_those_encoded_here() {
        use dspark::sched::Transfer;
        let cfg = StoreConfig { quant: Some(Quant::Q4), window: 0, digests: true, centered: true, window_quant: None, recent: 0 };
        let x = Transfer::new(Arc::new(Tier::new(0, Box::new(MemCold::default()))), 2).unwrap();
        let mut rnd = uniform(777);
        let rows: Vec<Vec<f32>> = (0..4 * PAGE).map(|_| (0..HEADS * D).map(|_| rnd()).collect()).collect();
        let rewrite: Vec<f32> = (0..HEADS * D).map(|_| rnd()).collect();
        let (mut here, mut there) = (KvStore::new(cfg, HEADS, D, 4 * PAGE, 1).unwrap(), KvStore::new(cfg, HEADS, D, 4 * PAGE, 1).unwrap());
        for (c, r) in rows.iter().enumerate() {
            here.write_row(c, r);
            there.write_row(c, r);
        }
        here.compact(Threads::serial());
        there.compact_on(&x, Threads::serial());
        assert_eq!(f16_pages(&there), vec![0, 1, 2, 3], "handed pages stay f16 until swapped in");
        let mut got = vec![0.0; HEADS * D];
        for (c, r) in rows.iter().enumerate() {
            there.read_row(c, &mut got);
            let want: Vec<f32> = r.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            assert_eq!(got, want, "cell {c} before the swap");
        }
        // A rewrite in place (a K-shift) while the codes are on their way.
        let cell = 2 * PAGE + 5;
        here.rewrite_row(cell, &rewrite);
        there.rewrite_row(cell, &rewrite);
        there.finish_compaction();
        assert_eq!(f16_pages(&here), vec![0]);
        assert_eq!(f16_pages(&there), vec![0]);
        for p in 1..4 {
            match (here.page(0, p), there.page(0, p)) {
                (PageView::Packed(a), PageView::Packed(b)) => assert!(a == b, "page {p} differs"),
                v => panic!("page {p}: {v:?}"),
            }
        }
    }

    /// The same for pages kept in window codes: the stream decodes and encodes them.
    #[test]
    fn window_coded_pages_encoded_on_the_transfer_stream_are_those_encoded_here() {
        use dspark::sched::Transfer;
        let cfg = StoreConfig { quant: Some(Quant::Q3), window: 64, digests: true, centered: true, window_quant: Some(Quant::Q8), recent: 0 };
        let x = Transfer::new(Arc::new(Tier::new(0, Box::new(MemCold::default()))), 2).unwrap();
        let mut rnd = uniform(4242);
        let (mut here, mut there) = (KvStore::new(cfg, HEADS, D, 6 * PAGE, 1).unwrap(), KvStore::new(cfg, HEADS, D, 6 * PAGE, 1).unwrap());
        for c in 0..6 * PAGE - 10 {
            let r: Vec<f32> = (0..HEADS * D).map(|_| rnd()).collect();
            here.write_row(c, &r);
            there.write_row(c, &r);
            if c % 100 == 99 {
                here.compact(Threads::serial());
                there.compact_on(&x, Threads::serial());
            }
        }
        here.compact(Threads::serial());
        there.compact_on(&x, Threads::serial());
        there.finish_compaction();
        let packed = |s: &KvStore| (0..6).filter(|&p| matches!(s.page(0, p), PageView::Packed(_))).collect::<Vec<_>>();
        assert_eq!(packed(&here), vec![1, 2, 3]);
        assert_eq!(packed(&there), packed(&here));
        for p in 0..6 {
            match (here.page(0, p), there.page(0, p)) {
                (PageView::Packed(a), PageView::Packed(b)) | (PageView::Window(a), PageView::Window(b)) => assert!(a == b, "page {p} differs"),
                v => panic!("page {p}: {v:?}"),
            }
        }
    }

    #[test]
    fn pages_round_trip_bit_exactly_through_the_cold_tier_within_the_budget() {
        let cold = MemCold::default();
        let (mut s, _) = filled(&cold);
        let before = read_all(&s);
        let full = s.bytes() as u64;
        let limit = full / 2; // the f16 sink and window pages are 45% of it
        let over = fit(&mut [&mut s], limit).unwrap();
        assert_eq!(over, 0);
        assert!(s.bytes() as u64 <= limit, "{} bytes held, budget {limit}", s.bytes());
        assert!(s.cold_bytes() > 0 && s.bytes() + s.cold_bytes() == full as usize);
        // The sink page and the window never go cold.
        assert_eq!(f16_pages(&s), vec![0, 14, 15]);
        assert_eq!(read_all(&s), before, "the cold tier moves bytes, it never changes them");
        // Attention reads staged pages: stage everything, read, unstage.
        let staged = s.stage(0, 0, 1024).unwrap();
        assert_eq!(staged, s.cold_bytes());
        assert_eq!(read_all(&s), before);
        assert_eq!(s.unstage(), staged);
        assert!(s.bytes() as u64 <= limit);
    }

    #[test]
    fn pages_no_query_sees_go_cold_first() {
        let cold = MemCold::default();
        let (mut s, _) = filled(&cold);
        // The last attention saw every cell but those of pages 3..6 (e.g. removed tokens).
        s.note_seen(0, 0, 1024, |r| !(3 * PAGE..6 * PAGE).contains(&r.start));
        let page_bytes = s.packed_page_bytes() as u64;
        let limit = s.bytes() as u64 - 3 * page_bytes;
        fit(&mut [&mut s], limit).unwrap();
        let cold: Vec<usize> = (0..16).filter(|&p| s.is_written(p * PAGE) && !s.is_f16(p * PAGE) && s.cold_pages(0, p * PAGE, PAGE).len() == 1).collect();
        assert_eq!(cold, vec![3, 4, 5]);
    }

    #[test]
    fn a_cold_page_written_again_comes_back_hot() {
        let cold = MemCold::default();
        let (mut s, mut rows) = filled(&cold);
        fit(&mut [&mut s], 0).unwrap();
        assert_eq!(s.cold_pages(0, 0, 1024).len(), 13);
        let cold_before = s.cold_bytes();
        s.stage_cells([5 * PAGE + 7]).unwrap();
        rows[5 * PAGE + 7] = vec![0.25; HEADS * D];
        s.write_row(5 * PAGE + 7, &rows[5 * PAGE + 7]);
        assert!(s.is_f16(5 * PAGE), "a new row makes its page recent: f16");
        assert_eq!(s.cold_pages(0, 5 * PAGE, PAGE).len(), 0);
        assert_eq!(s.cold_bytes(), cold_before - s.packed_page_bytes());
        let mut r = vec![0.0; HEADS * D];
        s.read_row(5 * PAGE + 7, &mut r);
        assert_eq!(r, rows[5 * PAGE + 7]);
    }

    #[test]
    fn a_failing_cold_store_leaves_the_store_consistent_and_recovers() {
        let cold = MemCold::default();
        let (mut s, _) = filled(&cold);
        let before = read_all(&s);
        let held = s.bytes();
        cold.fail.store(true, Ordering::Relaxed);
        let e = fit(&mut [&mut s], 0).unwrap_err();
        assert!(e.to_string().contains("no space left"), "{e}");
        assert_eq!((s.bytes(), s.cold_bytes()), (held, 0), "no page moved");
        cold.fail.store(false, Ordering::Relaxed);
        fit(&mut [&mut s], 0).unwrap();
        cold.fail.store(true, Ordering::Relaxed);
        assert!(s.stage(0, 0, 1024).is_err(), "a failed read is an error");
        assert_eq!(s.cold_pages(0, 0, 1024).len(), 13, "nothing staged by a failed read");
        cold.fail.store(false, Ordering::Relaxed);
        assert_eq!(read_all(&s), before);
    }
}

/// Page selection under an attention budget: every head reads the sink page and the f16
/// window whatever the query, the compressed page whose keys match the query best, never a
/// page no query row can see, and with a budget that holds every visible cell the call stays
/// dense.
#[test]
fn selection_keeps_the_sinks_and_the_window_and_picks_the_matching_page() {
    let mut s = KvStore::new(StoreConfig { quant: Some(Quant::Q4), window: 128, digests: true, centered: true, window_quant: None, recent: 0 }, HEADS, D, 1024, 1).unwrap();
    let mut row = vec![0.0f32; HEADS * D];
    for c in 0..1024 {
        for (i, x) in row.iter_mut().enumerate() {
            *x = ((c * 31 + i * 7) as f32 * 0.61).sin();
        }
        // Head h's keys on page 3 + 2h point along channel 5; elsewhere they are small.
        for h in 0..HEADS {
            row[h * D + 5] = if c / PAGE == 3 + 2 * h { 8.0 } else { 0.1 };
        }
        s.write_row(c, &row);
    }
    s.compact(Threads::serial());
    // One query row per query head (2 per KV head), all along channel 5, the sink page
    // scoring worst.
    let n_head_q = 2 * HEADS;
    let q: Vec<f32> = (0..n_head_q * D).map(|i| if i % D == 5 { 1.0 } else { 0.0 }).collect();
    let visible = |r: std::ops::Range<usize>| r.start / PAGE != 9;
    let pick = s.select(0, 0, 1024, visible, &q, 1, n_head_q, 4 * PAGE, Unit::Block, Threads::serial()).expect("a budget under the context selects");
    for (h, ranges) in pick.iter().enumerate() {
        let pages: Vec<usize> = ranges.iter().flat_map(|r| r.start / PAGE..r.end / PAGE).collect();
        // Sinks (0), the window (14, 15), and the best-matching page.
        assert_eq!(pages, vec![0, 3 + 2 * h, 14, 15], "head {h}");
    }
    // A budget below the sinks and window still reads them.
    for ranges in s.select(0, 0, 1024, visible, &q, 1, n_head_q, PAGE, Unit::Block, Threads::serial()).unwrap() {
        assert_eq!(ranges, vec![0..PAGE, 14 * PAGE..16 * PAGE]);
    }
    // Every visible cell fits: dense.
    assert!(s.select(0, 0, 1024, visible, &q, 1, n_head_q, 1024 - PAGE, Unit::Block, Threads::serial()).is_none());
    // A page no query row can see is never read, even when the query matches it best.
    let pick = s.select(0, 0, 1024, |r: std::ops::Range<usize>| r.start / PAGE != 3, &q, 1, n_head_q, 4 * PAGE, Unit::Block, Threads::serial()).unwrap();
    assert!(pick[0].iter().all(|r| !r.contains(&(3 * PAGE))), "{:?}", pick[0]);
    // Pages shared by the KV heads: every head reads each head's best page (three pages of
    // budget beyond the sinks and window); with one page of budget, one of them.
    let pages = |ranges: &[std::ops::Range<usize>]| -> Vec<usize> { ranges.iter().flat_map(|r| r.start / PAGE..r.end.div_ceil(PAGE)).collect() };
    let pick = s.select(0, 0, 1024, visible, &q, 1, n_head_q, 6 * PAGE, Unit::Page, Threads::serial()).unwrap();
    assert!(pick.iter().all(|ranges| pages(ranges) == [0, 3, 5, 7, 14, 15]), "{pick:?}");
    let pick = s.select(0, 0, 1024, visible, &q, 1, n_head_q, 4 * PAGE, Unit::Page, Threads::serial()).unwrap();
    let first = pages(&pick[0]);
    assert!(first.len() == 4 && [3, 5, 7].contains(&first[1]), "{first:?}");
    assert!(pick.iter().all(|ranges| pages(ranges) == first), "{pick:?}");
    assert!(s.select(0, 0, 1024, visible, &q, 1, n_head_q, 1024 - PAGE, Unit::Page, Threads::serial()).is_none());
}

/// Without a window, rows written one at a time (compacting after each, as decode does) end
/// up with the same codes as the same rows written at once: the page being filled stays f16
/// until it is full, and is encoded once. (Compressing it after every row made each new row
/// decode and re-encode it, and at 4 bits the error compounded into garbage.)
#[test]
fn without_a_window_a_page_is_compressed_once_when_full() {
    let cfg = StoreConfig { quant: Some(Quant::Q4), window: 0, digests: false, centered: true, window_quant: None, recent: 0 };
    let mut rnd = uniform(12345);
    let rows: Vec<Vec<f32>> = (0..200).map(|_| (0..HEADS * D).map(|_| rnd()).collect()).collect();
    let (mut one, mut all) = (KvStore::new(cfg, HEADS, D, 256, 1).unwrap(), KvStore::new(cfg, HEADS, D, 256, 1).unwrap());
    for (c, r) in rows.iter().enumerate() {
        one.write_row(c, r);
        one.compact(Threads::serial());
        // The page being written is f16 until its last cell is.
        let page = c / PAGE;
        assert_eq!(one.is_f16(c), page == 0 || c % PAGE != PAGE - 1, "cell {c}");
    }
    for (c, r) in rows.iter().enumerate() {
        all.write_row(c, r);
    }
    all.compact(Threads::serial());
    // Sinks (page 0) and the partial last page (cells 192..199) stay f16; 1 and 2 are packed.
    assert_eq!(f16_pages(&one), vec![0, 3]);
    assert_eq!(f16_pages(&all), vec![0, 3]);
    let (mut a, mut b) = (vec![0.0; HEADS * D], vec![0.0; HEADS * D]);
    for c in 0..rows.len() {
        one.read_row(c, &mut a);
        all.read_row(c, &mut b);
        assert_eq!(a, b, "cell {c}: token by token differs from all at once");
    }
}

/// With window codes (`window_quant`), the sink page and the window are kept in 8-bit row
/// codes instead of f16: the same pages stay out of compression, their rows read back within
/// 8-bit error, they take about half the bytes, and a saved page restores byte for byte.
#[test]
fn window_codes_keep_the_same_pages_in_8_bits() {
    let cfg = |window_quant| StoreConfig { quant: Some(Quant::Q4), window: 128, digests: false, centered: true, window_quant, recent: 0 };
    let mut rnd = uniform(7);
    let rows: Vec<Vec<f32>> = (0..448).map(|_| (0..HEADS * D).map(|_| rnd()).collect()).collect();
    let (mut coded, mut f16) = (KvStore::new(cfg(Some(Quant::Q8)), HEADS, D, 1024, 1).unwrap(), KvStore::new(cfg(None), HEADS, D, 1024, 1).unwrap());
    for s in [&mut coded, &mut f16] {
        for (c, r) in rows.iter().enumerate() {
            s.write_row(c, r);
        }
        s.compact(Threads::serial());
    }
    let kept = |s: &KvStore| (0..s.pages_per_stream()).filter(|&p| s.is_window_coded(p * PAGE)).collect::<Vec<_>>();
    assert_eq!(kept(&coded), vec![0, 5, 6]);
    assert_eq!(f16_pages(&coded), Vec::<usize>::new());
    assert_eq!(f16_pages(&f16), vec![0, 5, 6]);
    let mut out = vec![0.0; HEADS * D];
    for c in (0..64).chain(320..448) {
        coded.read_row(c, &mut out);
        let err = rows[c].iter().zip(&out).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 0.02, "cell {c}: 8-bit window row off by {err}");
    }
    assert!(coded.bytes() * 10 < f16.bytes() * 7, "window codes hold {} bytes against f16's {}", coded.bytes(), f16.bytes());
    // A window page saved and restored into another store comes back byte for byte.
    let PageView::Window(page) = coded.page(0, 5) else { panic!("page 5 is window-coded") };
    let saved = page.to_vec();
    let mut other = KvStore::new(cfg(Some(Quant::Q8)), HEADS, D, 1024, 1).unwrap();
    other.set_page(0, 5, PageView::Window(&saved)).unwrap();
    assert!(matches!(other.page(0, 5), PageView::Window(p) if p == &saved[..]));
    // An f16 page given to a store with window codes is encoded into them.
    let PageView::F16(fp) = f16.page(0, 6) else { panic!("page 6 is f16") };
    other.set_page(0, 6, PageView::F16(&fp.to_vec())).unwrap();
    assert!(other.is_window_coded(6 * PAGE));
}

/// Rows that share a large offset (as K rows share per-channel biases) are window-coded
/// relative to the centroids of the nearest compressed page before them, as compressed pages
/// are to their own: a window page's rows read back several times closer than uncentred
/// codes of the same width give (the offset no longer sets the code step).
#[test]
fn window_pages_are_centred_on_the_page_before_them() {
    let cfg = |centered| StoreConfig { quant: Some(Quant::Q4), window: 0, digests: false, centered, window_quant: Some(Quant::Q4), recent: 0 };
    let mut rnd = uniform(11);
    let offset: Vec<f32> = (0..HEADS * D).map(|i| if i % 7 == 0 { 40.0 } else { 3.0 }).collect();
    // Two full pages (the sink page and one that is compressed), then half of a third.
    let rows: Vec<Vec<f32>> = (0..160).map(|_| offset.iter().map(|&o| o + rnd()).collect()).collect();
    let err = |centered| {
        let mut s = KvStore::new(cfg(centered), HEADS, D, 1024, 1).unwrap();
        for (c, r) in rows.iter().enumerate() {
            s.write_row(c, r);
            s.compact(Threads::serial());
        }
        assert!(s.is_window_coded(2 * PAGE) && !s.is_window_coded(PAGE));
        let mut out = vec![0.0; HEADS * D];
        (128..160)
            .map(|c| {
                s.read_row(c, &mut out);
                rows[c].iter().zip(&out).map(|(a, b)| (a - b) * (a - b)).sum::<f32>()
            })
            .sum::<f32>()
    };
    let (centred, uncentred) = (err(true), err(false));
    assert!(centred * 4.0 < uncentred, "window page squared error: centred {centred}, uncentred {uncentred}");
}

/// With `recent` rows, the latest rows written read back as their f16 values, through
/// `read_row` and through attention's segments, and older rows as their codes; a rewrite of
/// a held row updates its copy, a later row takes the oldest one's slot, a replaced page
/// forgets its rows, the copies count in the bytes, and K's segments line up with V's where
/// only K keeps copies.
#[test]
fn the_latest_rows_read_back_in_f16_besides_their_codes() {
    use dspark::attn::Rows;
    use dspark::kv::segments;
    use half::f16;
    const RECENT: usize = 16;
    let cfg = |quant, recent| StoreConfig { quant, window: 0, digests: false, centered: true, window_quant: quant.map(|_| Quant::Q8), recent };
    let mut rnd = uniform(5);
    let rows: Vec<Vec<f32>> = (0..201).map(|_| (0..HEADS * D).map(|_| rnd()).collect()).collect();
    let new = |s| KvStore::new(s, HEADS, D, 1024, 1).unwrap();
    let (mut with, mut without, mut v) = (new(cfg(Some(Quant::Q4), RECENT)), new(cfg(Some(Quant::Q4), 0)), new(cfg(None, RECENT)));
    // 200 rows: the last 16 (184..200) lie in a compressed page (184..192) and in the page
    // being filled, window-coded (192..200).
    for s in [&mut with, &mut without, &mut v] {
        for (c, r) in rows[..200].iter().enumerate() {
            s.write_row(c, r);
        }
        s.compact(Threads::serial());
    }
    let f16_of = |r: &[f32]| r.iter().map(|&x| f16::from_f32(x).to_f32()).collect::<Vec<_>>();
    let read = |s: &KvStore, c: usize| {
        let mut out = vec![0.0; HEADS * D];
        s.read_row(c, &mut out);
        out
    };
    for c in 0..200 {
        let want = if c >= 200 - RECENT { f16_of(&rows[c]) } else { read(&without, c) };
        assert_eq!(read(&with, c), want, "cell {c}");
    }
    assert_ne!(read(&without, 190), f16_of(&rows[190]), "the test needs coded rows to differ from f16");
    assert_eq!(with.bytes(), without.bytes() + RECENT * HEADS * D * 2);
    // Attention's runs: K (with copies) split at 184 and at the page boundary 192; V (an
    // f16 store, no copies) is cut to the same runs.
    for head in 0..HEADS {
        let segs = segments(&with, &v, 0, 0, 200, head);
        let bounds: Vec<(usize, usize)> = segs.iter().map(|s| (s.first_cell, s.n)).collect();
        assert_eq!(bounds, vec![(0, 64), (64, 64), (128, 56), (184, 8), (192, 8)]);
        for s in &segs[3..] {
            let (Rows::F16(k), Rows::F16(vr)) = (s.k, s.v) else { panic!("recent rows read as f16") };
            for i in 0..s.n {
                let c = s.first_cell + i;
                let want = f16_of(&rows[c][head * D..][..D]);
                assert_eq!(k[i * D..][..D].iter().map(|x| x.to_f32()).collect::<Vec<_>>(), want, "K cell {c}");
                assert_eq!(vr[i * D..][..D].iter().map(|x| x.to_f32()).collect::<Vec<_>>(), want, "V cell {c}");
            }
        }
    }
    // A rewrite in place updates the copy.
    with.rewrite_row(190, &rows[0]);
    assert_eq!(read(&with, 190), f16_of(&rows[0]));
    // Row 200 takes the slot of row 184, which reads as its codes again.
    for s in [&mut with, &mut without] {
        s.write_row(200, &rows[200]);
    }
    assert_eq!(read(&with, 184), read(&without, 184));
    assert_eq!(read(&with, 200), f16_of(&rows[200]));
    // A page replaced (restored from a save) forgets its rows' copies.
    let PageView::Window(page) = without.page(0, 3) else { panic!("page 3 is window-coded") };
    with.set_page(0, 3, PageView::Window(&page.to_vec())).unwrap();
    assert_eq!(read(&with, 195), read(&without, 195));
}
