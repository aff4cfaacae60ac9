//! Persistent worker pools, one per thread count, built on first use and kept for the life
//! of the process, so a call never spawns threads and never runs more than `n` at once.

use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();

fn pool(n: usize) -> Option<Arc<rayon::ThreadPool>> {
    let pools = POOLS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = map.get(&n) {
        return Some(Arc::clone(p));
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("dspark-attn-{i}"))
        .build()
        .ok()?;
    let p = Arc::new(p);
    map.insert(n, Arc::clone(&p));
    Some(p)
}

/// `items.iter().map(f).collect()`, on up to `n_threads` threads, results in item order.
pub(crate) fn map<T: Sync, R: Send>(n_threads: usize, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if n_threads <= 1 || items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    match pool(n_threads) {
        Some(p) => p.install(|| items.par_iter().with_max_len(1).map(&f).collect()),
        None => items.iter().map(f).collect(),
    }
}
