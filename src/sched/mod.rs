//! The transfer stream: a thread that works beside the compute stream, reading cold pages
//! back and compressing pages that left the window.
//!
//! The compute stream asks for the cold pages of the layers it will reach next
//! ([`Transfer::fetch`]) and gets a [`Fence`] per request; when it reaches that layer it waits
//! on the fence ([`Fence::wait`]), which counts only the time it really waited. Reads are
//! served in order from a bounded queue (a full queue makes `fetch` wait, so the stream never
//! runs further ahead than it was asked to). Other work ([`Transfer::run`], e.g. encoding a
//! page) waits behind every queued read: a read is needed a layer or two later, an encoded
//! page only when its layer comes round again. The reads themselves are the tier's
//! ([`Tier::read`]), so a CUDA copy stream can later stand behind the same interface.

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::kv::tier::{Slot, Tier};

/// What a read delivers: each slot's bytes, in the order asked, or the read's error.
pub type Delivery = io::Result<Vec<Box<[u8]>>>;

/// One request's completion, delivering a `T`.
pub struct Fence<T = Delivery> {
    done: Mutex<Option<T>>,
    cv: Condvar,
}

impl<T> Fence<T> {
    fn new() -> Arc<Fence<T>> {
        Arc::new(Fence { done: Mutex::new(None), cv: Condvar::new() })
    }

    fn complete(&self, d: T) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
        self.cv.notify_all();
    }

    /// Waits for the request and takes what it delivered, with the time spent waiting.
    pub fn wait(&self) -> (T, Duration) {
        let t = Instant::now();
        let mut g = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while g.is_none() {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        (g.take().expect("checked"), t.elapsed())
    }
}

type Task = Box<dyn FnOnce() + Send>;

/// The stream's queues: reads first, then other work.
#[derive(Default)]
struct Queues {
    reads: VecDeque<Task>,
    work: VecDeque<Task>,
    closed: bool,
}

struct Shared {
    queues: Mutex<Queues>,
    /// Signalled when a task is queued, taken or the stream closes.
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The transfer thread of one tier. Dropping it finishes the queued tasks and joins it.
pub struct Transfer {
    tier: Arc<Tier>,
    shared: Arc<Shared>,
    /// Reads that may wait in the queue.
    depth: usize,
    thread: Option<JoinHandle<()>>,
}

impl Transfer {
    /// Starts the thread; at most `queue` reads wait in its queue.
    pub fn new(tier: Arc<Tier>, queue: usize) -> io::Result<Transfer> {
        let shared = Arc::new(Shared { queues: Mutex::new(Queues::default()), cv: Condvar::new() });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("dspark-transfer".into()).spawn(move || loop {
            let mut q = s.lock();
            let task = loop {
                if let Some(t) = q.reads.pop_front().or_else(|| q.work.pop_front()) {
                    break t;
                }
                if q.closed {
                    return;
                }
                q = s.cv.wait(q).unwrap_or_else(|e| e.into_inner());
            };
            drop(q);
            s.cv.notify_all();
            task();
        })?;
        Ok(Transfer { tier, shared, depth: queue.max(1), thread: Some(thread) })
    }

    /// Queues a read of `slots`; the fence completes when they are read.
    pub fn fetch(&self, slots: Vec<Slot>) -> Arc<Fence> {
        let fence = Fence::new();
        let (tier, f) = (self.tier.clone(), fence.clone());
        let task: Task = Box::new(move || {
            let t = Instant::now();
            let d = catch_unwind(AssertUnwindSafe(|| tier.read(&slots))).unwrap_or_else(|_| Err(io::Error::other("reading cold pages panicked")));
            tier.counters.transfer_busy_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            f.complete(d);
        });
        let mut q = self.shared.lock();
        while q.reads.len() >= self.depth {
            q = self.shared.cv.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        q.reads.push_back(task);
        drop(q);
        self.shared.cv.notify_all();
        fence
    }

    /// Queues `f` behind the reads; the fence delivers its result, or an error if it
    /// panicked (the stream goes on).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Arc<Fence<Result<T, String>>> {
        let fence = Fence::new();
        let done = fence.clone();
        let task: Task = Box::new(move || done.complete(catch_unwind(AssertUnwindSafe(f)).map_err(|_| "a transfer-stream task panicked".to_string())));
        self.shared.lock().work.push_back(task);
        self.shared.cv.notify_all();
        fence
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::cold::{ColdStore, BLOCK};

    /// A cold store whose reads take a fixed time: the stand-in for a disk.
    struct SlowCold(Duration);

    impl ColdStore for SlowCold {
        fn write_at(&self, _: u64, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
        fn read_at(&self, off: u64, out: &mut [u8]) -> io::Result<()> {
            std::thread::sleep(self.0);
            // Each block reads as its own index.
            for (i, block) in out.chunks_mut(BLOCK).enumerate() {
                block.fill((off / BLOCK as u64) as u8 + i as u8);
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "slow".into()
        }
    }

    #[test]
    fn a_fetch_runs_while_the_caller_works_and_delivers_in_order() {
        let tier = Arc::new(Tier::new(0, Box::new(SlowCold(Duration::from_millis(30)))));
        let slots: Vec<Slot> = (0..3u64).map(|i| tier.write(i * BLOCK as u64, &[0u8; 100]).unwrap()).collect();
        let x = Transfer::new(tier.clone(), 2).unwrap();
        // Asked out of order and a small gap apart: one merged read of 30 ms.
        let f = x.fetch(vec![slots[2], slots[0]]);
        std::thread::sleep(Duration::from_millis(150)); // the compute stream's work
        let (d, waited) = f.wait();
        let d = d.unwrap();
        assert_eq!((d[0][0], d[1][0]), (2, 0));
        assert!(waited < Duration::from_millis(20), "the read should have been hidden, waited {waited:?}");
        assert!(tier.counters.transfer_busy_ns.load(Ordering::Relaxed) >= 30_000_000);
    }

    /// A cold store that notes each read in `order`.
    struct NotedCold(Arc<Mutex<Vec<&'static str>>>);

    impl ColdStore for NotedCold {
        fn write_at(&self, _: u64, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
        fn read_at(&self, _: u64, out: &mut [u8]) -> io::Result<()> {
            self.0.lock().unwrap().push("read");
            out.fill(1);
            Ok(())
        }
        fn describe(&self) -> String {
            "noted".into()
        }
    }

    #[test]
    fn other_work_waits_behind_the_reads_and_a_panic_is_an_error() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let tier = Arc::new(Tier::new(0, Box::new(NotedCold(order.clone()))));
        let slot = tier.write(0, &[0u8; 100]).unwrap();
        let x = Transfer::new(tier.clone(), 4).unwrap();
        // Hold the stream with a first task, queue work, then a read: the read runs first.
        let gate = x.run(|| std::thread::sleep(Duration::from_millis(50)));
        let o = order.clone();
        let work = x.run(move || o.lock().unwrap().push("work"));
        let read = x.fetch(vec![slot]);
        let failed = x.run(|| -> u32 { panic!("a task that fails, on purpose") });
        let after = x.run(|| 7);
        assert!(gate.wait().0.is_ok());
        assert_eq!(read.wait().0.unwrap()[0][0], 1);
        assert!(work.wait().0.is_ok());
        assert!(failed.wait().0.is_err());
        assert_eq!(after.wait().0, Ok(7), "the stream goes on after a task panicked");
        assert_eq!(*order.lock().unwrap(), ["read", "work"], "the read goes before the work queued ahead of it");
    }
}
