//! Worker threads owned by whoever runs attention or compresses pages (a DSpark backend, a
//! standalone cache, a test), so that work never runs on more threads than its owner was
//! given and no call spawns threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

/// A fixed set of worker threads (none for one thread: work runs on the caller's thread).
pub struct Workers {
    pool: Option<rayon::ThreadPool>,
    n: usize,
}

impl Workers {
    /// `n` threads at most (the calling thread takes part; `n <= 1` spawns none).
    pub fn new(n: usize) -> Workers {
        let n = n.max(1);
        let pool = (n > 1)
            .then(|| rayon::ThreadPoolBuilder::new().num_threads(n).thread_name(|i| format!("dspark-{i}")).build().ok())
            .flatten();
        Workers { n: if pool.is_some() { n } else { 1 }, pool }
    }

    /// How many threads this set runs on.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Never empty: one thread at least.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Up to `n` of these threads, for one call.
    pub fn take(&self, n: usize) -> Threads<'_> {
        let n = n.clamp(1, self.n);
        Threads { on: self.pool.as_ref().filter(|_| n > 1).map_or(On::Caller, On::Pool), n }
    }

    /// All of these threads, for one call.
    pub fn all(&self) -> Threads<'_> {
        self.take(self.n)
    }
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Workers({})", self.n)
    }
}

/// Threads that someone else owns and starts: `run(f)` calls `f(i, n)` once for each `i` in
/// `0..n` (`n` = [`Executor::threads`]), concurrently, and returns when every call has.
/// DSPARK0 runs its kernels this way on ggml's CPU thread pool (`src/ggml/cpu.rs`).
pub trait Executor: Sync {
    fn threads(&self) -> usize;
    fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) -> Result<(), String>;
}

/// The threads one call may use: a share of a [`Workers`] set, an [`Executor`]'s threads,
/// or the caller's thread alone.
#[derive(Clone, Copy)]
pub struct Threads<'a> {
    on: On<'a>,
    n: usize,
}

#[derive(Clone, Copy)]
enum On<'a> {
    Caller,
    Pool(&'a rayon::ThreadPool),
    Executor(&'a dyn Executor),
}

impl<'a> Threads<'a> {
    /// The calling thread alone.
    pub fn serial() -> Threads<'static> {
        Threads { on: On::Caller, n: 1 }
    }

    /// All of an executor's threads.
    pub fn on(e: &'a dyn Executor) -> Threads<'a> {
        Threads { on: On::Executor(e), n: e.threads().max(1) }
    }

    /// How many threads the call may use.
    pub fn count(&self) -> usize {
        self.n
    }

    /// These threads, or the caller's alone when `n <= 1` (an executor's threads run
    /// together or not at all).
    pub fn at_most(self, n: usize) -> Threads<'a> {
        match self.on {
            On::Pool(p) if n > 1 => Threads { on: On::Pool(p), n: n.min(self.n) },
            On::Executor(_) if n > 1 => self,
            _ => Threads::serial(),
        }
    }

    /// `items.iter().map(f).collect()` on these threads, results in item order.
    pub(crate) fn map<T: Sync, R: Send>(&self, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
        match self.on {
            On::Pool(p) if items.len() > 1 => p.install(|| items.par_iter().with_max_len(1).map(&f).collect()),
            On::Executor(e) if items.len() > 1 => {
                let out: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
                share(e, items.len(), |k| *lock(&out[k]) = Some(f(&items[k])));
                // An item without a result means a thread failed: the run's error says why.
                out.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()).expect("an executor thread failed")).collect()
            }
            _ => items.iter().map(f).collect(),
        }
    }

    /// `items.iter_mut().for_each(f)` on these threads.
    pub fn for_each_mut<T: Send>(&self, items: &mut [T], f: impl Fn(&mut T) + Sync) {
        match self.on {
            On::Pool(p) if items.len() > 1 => p.install(|| items.par_iter_mut().with_max_len(1).for_each(&f)),
            On::Executor(e) if items.len() > 1 => {
                let cells: Vec<Mutex<&mut T>> = items.iter_mut().map(Mutex::new).collect();
                share(e, cells.len(), |k| f(&mut lock(&cells[k])));
            }
            _ => items.iter_mut().for_each(f),
        }
    }
}

/// Locks `m`, taking the data even if a panicking holder poisoned it (every holder leaves
/// it consistent: a result slot, an item being worked on, or a pool of buffers).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f(k)` for every `k` in `0..n` on the executor's threads, each thread taking the next
/// item when it is done with one (items differ in cost). Panics if the executor fails, as a
/// panicking rayon task would.
fn share(e: &dyn Executor, n: usize, f: impl Fn(usize) + Sync) {
    let next = AtomicUsize::new(0);
    let r = e.run(&|_, _| loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        if k >= n {
            break;
        }
        f(k);
    });
    if let Err(msg) = r {
        panic!("{msg}");
    }
}
