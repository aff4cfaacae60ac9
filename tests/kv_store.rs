//! The paged store's policies: which pages stay f16 (sinks, and the pages written within the
//! last `window` rows, by recency, not by position), what memory an empty store costs, and
//! which pages the last attention call could see.

use dspark::attn::Threads;
use dspark::codec::Quant;
use dspark::kv::{KvStore, StoreConfig, PAGE};

const HEADS: usize = 3;
const D: usize = 64;

fn store(cells: usize) -> KvStore {
    KvStore::new(StoreConfig { quant: Some(Quant::Q4), window: 128 }, HEADS, D, cells, 1).unwrap()
}

fn write(s: &mut KvStore, cells: std::ops::Range<usize>) {
    let row: Vec<f32> = (0..HEADS * D).map(|i| (i as f32 * 0.37).sin()).collect();
    for c in cells {
        s.write_row(c, &row);
    }
    s.compact(Threads::serial());
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
    let s = KvStore::new(StoreConfig { quant: Some(Quant::Q4), window: 128 }, 8, 128, 1 << 30, 4).unwrap();
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
