//! Worker threads owned by whoever runs attention or compresses pages (a DSpark backend, a
//! standalone cache, a test), so that work never runs on more threads than its owner was
//! given and no call spawns threads.

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
        Threads { pool: self.pool.as_ref().filter(|_| n > 1), n }
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

/// The threads one call may use: a share of a [`Workers`] set, or the caller's thread alone.
#[derive(Clone, Copy)]
pub struct Threads<'a> {
    pool: Option<&'a rayon::ThreadPool>,
    n: usize,
}

impl Threads<'_> {
    /// The calling thread alone.
    pub fn serial() -> Threads<'static> {
        Threads { pool: None, n: 1 }
    }

    /// How many threads the call may use.
    pub fn count(&self) -> usize {
        self.n
    }

    /// `items.iter().map(f).collect()` on these threads, results in item order.
    pub(crate) fn map<T: Sync, R: Send>(&self, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
        match self.pool {
            Some(p) if items.len() > 1 => p.install(|| items.par_iter().with_max_len(1).map(&f).collect()),
            _ => items.iter().map(f).collect(),
        }
    }

    /// `items.iter_mut().for_each(f)` on these threads.
    pub fn for_each_mut<T: Send>(&self, items: &mut [T], f: impl Fn(&mut T) + Sync) {
        match self.pool {
            Some(p) if items.len() > 1 => p.install(|| items.par_iter_mut().with_max_len(1).for_each(&f)),
            _ => items.iter_mut().for_each(f),
        }
    }
}
