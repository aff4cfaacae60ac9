//! The CPU backend embedded in each DSpark backend, so that DSPARK0 runs whole graphs.
//!
//! llama.cpp's scheduler cuts a graph wherever the backend changes. If DSPARK0 ran only the
//! ops that touch the KV cache, every layer would be two splits, with q, k, v and the mask
//! copied in and the attention output copied back, and llama.cpp's CPU thread pool would wake
//! (or spin, when it polls as llama.cpp's tools make it) while DSpark's threads work. Instead
//! DSPARK0 accepts every op the CPU backend accepts, reads the weights where llama.cpp keeps
//! them (host and CPU "extra" buffer types, so repacked layouts stay), and computes the
//! nodes that do not touch the KV on an instance of ggml's own CPU backend. The instance comes
//! from ggml's registry, so in the plugin case it is the host's CPU backend module, the one
//! llama.cpp itself would use.
//!
//! DSpark's own kernels run on the same thread pool: [`CpuBackend::compute_with`] hands the
//! whole graph to the CPU backend in one call, its KV nodes swapped for ggml custom ops that
//! run DSpark's code on the pool's threads ([`Team`]). One set of threads does all the work of
//! a graph in one pass, and a polling pool never spins against DSpark's workers.

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

use llama_cpp_sys_2 as ll;

use super::sys;
use crate::attn::{Executor, Threads};

/// How long the pool's threads spin for new work before they sleep: llama.cpp's tools'
/// default (`common_params::cpuparams.poll`), so that back-to-back runs of a graph do not pay
/// a wake-up each. A ggml built with OpenMP ignores it (the OpenMP runtime spins by its own
/// rules, OMP_WAIT_POLICY).
const POLL: u32 = 50;

type ThreadpoolNew = unsafe extern "C" fn(*mut ll::ggml_threadpool_params) -> *mut ll::ggml_threadpool;
type ThreadpoolFree = unsafe extern "C" fn(*mut ll::ggml_threadpool);
type SetThreadpool = unsafe extern "C" fn(ll::ggml_backend_t, *mut ll::ggml_threadpool);
type SetNThreads = unsafe extern "C" fn(ll::ggml_backend_t, c_int);
type SetAbortCallback = unsafe extern "C" fn(ll::ggml_backend_t, ll::ggml_abort_callback, *mut c_void);

/// ggml's CPU device, if one is registered (looked up when first needed: in the plugin case
/// the host registers it).
pub(crate) fn device() -> Option<ll::ggml_backend_dev_t> {
    // SAFETY: reads ggml's device registry.
    let d = unsafe { ll::ggml_backend_dev_by_type(ll::GGML_BACKEND_DEVICE_TYPE_CPU) };
    (!d.is_null()).then_some(d)
}

/// An instance of ggml's CPU backend with a persistent thread pool of the context's size.
pub(crate) struct CpuBackend {
    backend: ll::ggml_backend_t,
    threadpool_new: ThreadpoolNew,
    threadpool_free: ThreadpoolFree,
    set_threadpool: SetThreadpool,
    set_n_threads: SetNThreads,
    set_abort_callback: SetAbortCallback,
    /// The pool and its size; rebuilt when llama.cpp changes the thread count.
    pool: Mutex<(*mut ll::ggml_threadpool, usize)>,
}

// SAFETY: the backend and pool are used under `pool`'s lock or from the one thread that runs
// the owning DSpark backend's graphs (ggml never computes two graphs of a backend at once).
unsafe impl Send for CpuBackend {}
// SAFETY: as above.
unsafe impl Sync for CpuBackend {}

impl CpuBackend {
    /// A new instance of ggml's CPU backend, or why there is none.
    pub fn new() -> Result<CpuBackend, String> {
        let dev = device().ok_or("no ggml CPU backend is registered")?;
        // SAFETY: dev is a registered device; the names are NUL-terminated; the functions
        // found under these names have the signatures of ggml-cpu.h (ggml-cpu.cpp's
        // get_proc_address returns exactly these functions).
        unsafe {
            let reg = ll::ggml_backend_dev_backend_reg(dev);
            let find = |name: &CStr| {
                let f = ll::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
                if f.is_null() {
                    Err(format!("ggml's CPU backend does not export {}", name.to_string_lossy()))
                } else {
                    Ok(f)
                }
            };
            let threadpool_new: ThreadpoolNew = std::mem::transmute(find(c"ggml_threadpool_new")?);
            let threadpool_free: ThreadpoolFree = std::mem::transmute(find(c"ggml_threadpool_free")?);
            let set_threadpool: SetThreadpool = std::mem::transmute(find(c"ggml_backend_cpu_set_threadpool")?);
            let set_n_threads: SetNThreads = std::mem::transmute(find(c"ggml_backend_set_n_threads")?);
            let set_abort_callback: SetAbortCallback = std::mem::transmute(find(c"ggml_backend_set_abort_callback")?);
            let backend = ll::ggml_backend_dev_init(dev, std::ptr::null());
            if backend.is_null() {
                return Err("ggml's CPU backend could not be started".into());
            }
            Ok(CpuBackend {
                backend,
                threadpool_new,
                threadpool_free,
                set_threadpool,
                set_n_threads,
                set_abort_callback,
                pool: Mutex::new((std::ptr::null_mut(), 0)),
            })
        }
    }

    /// Makes the pool `n` threads (the context's count; ggml sets it before each graph).
    pub fn set_threads(&self, n: usize) -> Result<(), String> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.1 == n && !pool.0.is_null() {
            return Ok(());
        }
        // SAFETY: plain-data params; the old pool is detached from the backend before it is
        // freed, and no graph runs meanwhile (graphs run on the thread calling this).
        unsafe {
            let mut p = ll::ggml_threadpool_params_default(n as c_int);
            p.poll = POLL;
            let new = (self.threadpool_new)(&mut p);
            if new.is_null() {
                return Err(format!("ggml could not start a pool of {n} threads"));
            }
            (self.set_threadpool)(self.backend, new);
            (self.set_n_threads)(self.backend, n as c_int);
            if !pool.0.is_null() {
                (self.threadpool_free)(pool.0);
            }
            *pool = (new, n);
        }
        Ok(())
    }

    /// Computes every node of `g` in one call of ggml's CPU backend, with node `own[k]`
    /// replaced by a custom op that runs `body(k, threads)` on the pool's threads (`own`
    /// ascending). ggml puts a barrier between nodes, so each op sees its predecessors done.
    /// The first error stops the graph (ggml's abort callback, checked after each node) and
    /// is returned; ops after it are skipped. `body` runs on this thread only: ggml computes
    /// thread 0's part of every node on the thread that called it (ggml-cpu.c,
    /// `ggml_graph_compute`: OpenMP's master thread, or worker 0 of ggml's own pool), and only
    /// thread 0 calls `body`; so it need not be `Sync`.
    ///
    /// # Safety
    /// `g` must be a valid graph whose nodes other than `own` read host memory and write
    /// host memory, and each `own[k] < n_nodes`.
    pub unsafe fn compute_with(&self, g: *mut ll::ggml_cgraph, own: &[usize], body: &dyn Fn(usize, Threads) -> Result<(), String>) -> Result<(), String> {
        let failed = Failure::default();
        let jobs: Vec<OwnOp> = (0..own.len()).map(|k| OwnOp { k, body, team: Team::default(), failed: &failed }).collect();
        // Room for the custom nodes, without tensor data (no_alloc).
        // SAFETY: a plain size computation.
        let mem = own.len() * unsafe { ll::ggml_tensor_overhead() } + 256;
        let mut arena = vec![0u8; mem];
        let params = ll::ggml_init_params { mem_size: mem, mem_buffer: arena.as_mut_ptr().cast(), no_alloc: true };
        // SAFETY: the context lives in `arena` for this call and is freed before it; each
        // custom node has no sources and no data, and its job (in `jobs`) outlives the compute
        // call that reads it. The graph view borrows `g`'s fields and our node array for the
        // call (caller: valid graph and indices), as ggml_graph_view makes views.
        let status = unsafe {
            let ctx = ll::ggml_init(params);
            if ctx.is_null() {
                return Err("ggml_init failed".into());
            }
            let mut view = *(g as *const sys::graph::ggml_cgraph);
            let mut nodes: Vec<*mut ll::ggml_tensor> = std::slice::from_raw_parts(view.nodes.cast(), view.n_nodes as usize).to_vec();
            for (&i, job) in own.iter().zip(&jobs) {
                let userdata = (job as *const OwnOp).cast_mut().cast();
                let node = ll::ggml_custom_4d(ctx, ll::GGML_TYPE_F32, 1, 1, 1, 1, std::ptr::null_mut(), 0, Some(own_op), -1, userdata);
                // ggml computes only nodes so flagged (graph building sets it).
                (*node).flags |= ll::GGML_TENSOR_FLAG_COMPUTE as i32;
                nodes[i] = node;
            }
            view.size = 0;
            view.nodes = nodes.as_mut_ptr().cast();
            view.n_leafs = 0;
            view.grads = std::ptr::null_mut();
            view.grad_accs = std::ptr::null_mut();
            view.leafs = std::ptr::null_mut();
            view.uid = 0;
            (self.set_abort_callback)(self.backend, Some(stop_after_failure), (&failed as *const Failure).cast_mut().cast());
            let s = ll::ggml_backend_graph_compute(self.backend, (&mut view as *mut sys::graph::ggml_cgraph).cast());
            (self.set_abort_callback)(self.backend, None, std::ptr::null_mut());
            ll::ggml_free(ctx);
            s
        };
        match failed.take() {
            Some(msg) => Err(msg),
            None => checked(status),
        }
    }
}

impl Drop for CpuBackend {
    fn drop(&mut self) {
        let pool = self.pool.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: we own the backend and the pool; the backend is freed first, so it never
        // holds a freed pool.
        unsafe {
            ll::ggml_backend_free(self.backend);
            if !pool.0.is_null() {
                (self.threadpool_free)(pool.0);
            }
        }
    }
}

/// The first error of a graph's own ops; ggml's abort callback stops the graph on it.
#[derive(Default)]
struct Failure {
    set: AtomicBool,
    msg: Mutex<Option<String>>,
}

impl Failure {
    fn record(&self, msg: String) {
        let mut m = self.msg.lock().unwrap_or_else(|e| e.into_inner());
        m.get_or_insert(msg);
        self.set.store(true, Ordering::Release);
    }

    fn take(&self) -> Option<String> {
        self.msg.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// ggml's abort callback during [`CpuBackend::compute_with`].
///
/// # Safety
/// ggml callback: `data` is the `Failure` that `compute_with` keeps alive over the compute.
unsafe extern "C" fn stop_after_failure(data: *mut c_void) -> bool {
    // SAFETY: see above.
    unsafe { &*(data as *const Failure) }.set.load(Ordering::Acquire)
}

/// One of DSpark's ops in a graph that the CPU backend computes: `body(k, ..)` on `team`.
/// Every thread of the pool reaches it; only thread 0 touches `body` (see `compute_with`).
struct OwnOp<'a> {
    k: usize,
    body: &'a dyn Fn(usize, Threads) -> Result<(), String>,
    team: Team,
    failed: &'a Failure,
}

/// The custom op's body for [`OwnOp`]: thread 0 runs the op's code, whose parallel parts
/// the other threads serve.
///
/// # Safety
/// ggml callback: `userdata` is an `OwnOp` that `compute_with` keeps alive until the graph has
/// been computed.
unsafe extern "C" fn own_op(_dst: *mut ll::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    // SAFETY: see above.
    let op = unsafe { &*(userdata as *const OwnOp) };
    let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
    if ith > 0 {
        op.team.serve(ith, nth);
        return;
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if op.failed.set.load(Ordering::Acquire) {
            return Ok(());
        }
        (op.body)(op.k, op.team.lead(nth))
    }));
    op.team.dismiss();
    match r {
        Ok(Ok(())) => {}
        Ok(Err(msg)) => op.failed.record(msg),
        Err(_) => op.failed.record("a DSpark kernel panicked on a ggml thread".into()),
    }
}

/// The threads of one custom op as an [`Executor`]. Thread 0 (the leader) runs the op's code;
/// each `run` it makes publishes the closure, and the other threads, which wait inside the
/// same op ([`Team::serve`]), run it with the leader. A fork costs an atomic store and the
/// spin of threads that are running anyway, where a graph of its own per kernel
/// ([`CpuBackend::run`]) woke the pool each time: with OpenMP a parallel region, ~10% of a
/// decode step at short context (perf, llama-bench tg256), 4 per layer.
#[derive(Default)]
struct Team {
    n: AtomicUsize,
    /// Bumped by the leader to publish `task`; `usize::MAX` once the op is over.
    round: AtomicUsize,
    /// Points at the leader's `&dyn Fn` while a round runs.
    task: AtomicPtr<()>,
    /// Followers done with the current round.
    done: AtomicUsize,
    panicked: AtomicBool,
}

type Task<'f> = &'f (dyn Fn(usize, usize) + Sync);

impl Team {
    /// Called by thread 0 with the op's thread count: the team's threads, for the op's code.
    fn lead(&self, n: usize) -> Threads<'_> {
        self.n.store(n, Ordering::Relaxed);
        Threads::on(self)
    }

    /// Ends the op: the followers return from [`Team::serve`].
    fn dismiss(&self) {
        self.round.store(usize::MAX, Ordering::Release);
    }

    /// Thread `ith`'s part: runs each published task until the leader dismisses the team.
    fn serve(&self, ith: usize, n: usize) {
        let mut seen = 0;
        loop {
            let mut spins = 0u32;
            let round = loop {
                let r = self.round.load(Ordering::Acquire);
                if r != seen {
                    break r;
                }
                spins = spins.saturating_add(1);
                if spins < 1 << 16 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            };
            if round == usize::MAX {
                return;
            }
            seen = round;
            // SAFETY: the leader stored a pointer to its `Task` before bumping `round`
            // (release/acquire) and keeps it alive until every follower has counted itself
            // in `done` below.
            let f: Task = unsafe { *self.task.load(Ordering::Acquire).cast::<Task>() };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(ith, n))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Executor for Team {
    fn threads(&self) -> usize {
        self.n.load(Ordering::Relaxed).max(1)
    }

    fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) -> Result<(), String> {
        let n = self.threads();
        let task: Task = f;
        self.done.store(0, Ordering::Relaxed);
        self.task.store((&task as *const Task).cast_mut().cast(), Ordering::Release);
        self.round.fetch_add(1, Ordering::AcqRel);
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0, n))).is_err() {
            self.panicked.store(true, Ordering::Relaxed);
        }
        while self.done.load(Ordering::Acquire) < n - 1 {
            std::hint::spin_loop();
        }
        if self.panicked.swap(false, Ordering::Relaxed) {
            return Err("a DSpark kernel panicked on a ggml thread".into());
        }
        Ok(())
    }
}

/// A job for [`custom_op`]: the closure and whether any call of it panicked.
struct Job<'a> {
    f: &'a (dyn Fn(usize, usize) + Sync),
    panicked: AtomicBool,
}

/// The custom op's body, called by each of ggml's threads with its index.
///
/// # Safety
/// ggml callback: `userdata` is the `Job` that [`CpuBackend::run`] keeps alive until the
/// graph has been computed.
unsafe extern "C" fn custom_op(_dst: *mut ll::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    // SAFETY: see above.
    let job = unsafe { &*(userdata as *const Job) };
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.f)(ith as usize, nth as usize))).is_ok();
    if !ok {
        job.panicked.store(true, Ordering::Relaxed);
    }
}

impl Executor for CpuBackend {
    fn threads(&self) -> usize {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).1.max(1)
    }

    /// Runs `f(i, n)` on each of the pool's `n` threads: a one-node graph whose node is a
    /// ggml custom op, computed by this CPU backend.
    fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) -> Result<(), String> {
        let job = Job { f, panicked: false.into() };
        // Room for the node and a one-node graph, without tensor data (no_alloc).
        // SAFETY: plain size computations.
        let mem = unsafe { ll::ggml_tensor_overhead() + ll::ggml_graph_overhead_custom(1, false) } + 256;
        let mut arena = vec![0u8; mem];
        let params = ll::ggml_init_params { mem_size: mem, mem_buffer: arena.as_mut_ptr().cast(), no_alloc: true };
        // SAFETY: the context lives in `arena` for this call; the custom node has no sources
        // and no data; `job` outlives the compute call that reads it.
        let status = unsafe {
            let ctx = ll::ggml_init(params);
            if ctx.is_null() {
                return Err("ggml_init failed".into());
            }
            let node = ll::ggml_custom_4d(
                ctx,
                ll::GGML_TYPE_F32,
                1,
                1,
                1,
                1,
                std::ptr::null_mut(),
                0,
                Some(custom_op),
                -1, // GGML_N_TASKS_MAX: every thread of the pool
                (&job as *const Job).cast_mut().cast(),
            );
            let graph = ll::ggml_new_graph_custom(ctx, 1, false);
            ll::ggml_build_forward_expand(graph, node);
            let s = ll::ggml_backend_graph_compute(self.backend, graph);
            ll::ggml_free(ctx);
            s
        };
        if job.panicked.load(Ordering::Relaxed) {
            return Err("a DSpark kernel panicked on a ggml thread".into());
        }
        checked(status)
    }
}

/// A graph computation's status as a result.
fn checked(status: ll::ggml_status) -> Result<(), String> {
    if status == ll::GGML_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(format!("ggml's CPU backend failed (status {status})"))
    }
}

/// Whether ggml's CPU backend runs `op`, judged as if every source that lives in a DSpark
/// buffer were plain host memory (DSpark's compute buffers are; its buffer type says "not
/// host" only because of the KV, which never gets here).
///
/// # Safety
/// `op` and its sources must be valid tensors.
pub(crate) unsafe fn supports_op(dev: ll::ggml_backend_dev_t, op: *const ll::ggml_tensor) -> bool {
    // SAFETY: copies of valid tensors (caller); the copies live for this call only and the
    // CPU backend's check reads fields, never data.
    unsafe {
        let mut copy = *op;
        // Capacity for every source, so the element addresses stay put.
        let mut srcs: Vec<ll::ggml_tensor> = Vec::with_capacity(copy.src.len());
        for s in copy.src.iter_mut().filter(|s| !s.is_null()) {
            srcs.push(**s);
            let c = srcs.last_mut().expect("just pushed");
            if super::buffer::is_ours(c.buffer) {
                c.buffer = std::ptr::null_mut();
            }
            *s = c;
        }
        ll::ggml_backend_dev_supports_op(dev, &copy)
    }
}

/// Whether ggml's CPU backend reads buffers of type `buft` (host memory and its repacked
/// "extra" types).
pub(crate) fn supports_buft(buft: ll::ggml_backend_buffer_type_t) -> bool {
    // SAFETY: dev is a registered device; buft is a buffer type ggml handed us.
    device().is_some_and(|dev| unsafe { ll::ggml_backend_dev_supports_buft(dev, buft) })
}
