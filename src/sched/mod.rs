//! The transfer stream: a thread that reads cold pages back while the compute stream works.
//!
//! The compute stream asks for the cold pages of the layers it will reach next
//! ([`Transfer::fetch`]) and gets a [`Fence`] per request; when it reaches that layer it waits
//! on the fence ([`Fence::wait`]), which counts only the time it really waited. Requests are
//! served in order from a bounded queue (a full queue makes `fetch` wait, so the stream never
//! runs further ahead than it was asked to). The reads themselves are the tier's
//! ([`Tier::read`]), so a CUDA copy stream can later stand behind the same interface.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::kv::tier::{Slot, Tier};

/// What a request delivers: each slot's bytes, in the order asked, or the read's error.
pub type Delivery = io::Result<Vec<Box<[u8]>>>;

/// One request's completion.
pub struct Fence {
    done: Mutex<Option<Delivery>>,
    cv: Condvar,
}

impl Fence {
    fn new() -> Arc<Fence> {
        Arc::new(Fence { done: Mutex::new(None), cv: Condvar::new() })
    }

    fn complete(&self, d: Delivery) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
        self.cv.notify_all();
    }

    /// Waits for the request and takes what it delivered, with the time spent waiting.
    pub fn wait(&self) -> (Delivery, Duration) {
        let t = Instant::now();
        let mut g = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while g.is_none() {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        (g.take().expect("checked"), t.elapsed())
    }
}

struct Job {
    slots: Vec<Slot>,
    fence: Arc<Fence>,
}

/// The transfer thread of one tier. Dropping it finishes the queued requests and joins it.
pub struct Transfer {
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Transfer {
    /// Starts the thread; at most `queue` requests wait in its queue.
    pub fn new(tier: Arc<Tier>, queue: usize) -> io::Result<Transfer> {
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let thread = std::thread::Builder::new().name("dspark-transfer".into()).spawn(move || {
            for job in rx {
                let t = Instant::now();
                let d = tier.read(&job.slots);
                tier.counters.transfer_busy_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                job.fence.complete(d);
            }
        })?;
        Ok(Transfer { tx: Some(tx), thread: Some(thread) })
    }

    /// Queues a read of `slots`; the fence completes when they are read.
    pub fn fetch(&self, slots: Vec<Slot>) -> Arc<Fence> {
        let fence = Fence::new();
        let job = Job { slots, fence: fence.clone() };
        if let Err(e) = self.tx.as_ref().expect("sender lives until drop").send(job) {
            // The thread is gone (it only ends when the sender drops): say so through the fence.
            e.0.fence.complete(Err(io::Error::other("the transfer thread has stopped")));
        }
        fence
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        drop(self.tx.take());
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
}
