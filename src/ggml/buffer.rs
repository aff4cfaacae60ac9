//! DSpark's buffer type and buffers.
//!
//! Every buffer reserves its logical size as anonymous memory with MAP_NORESERVE: compute
//! tensors (copies of q, masks, attention outputs) live there as plain bytes, and the kernel
//! commits pages only when they are touched. KV roots (`cache_k_l<N>`, `cache_v_l<N>`) are
//! never touched through their address: each one has a compressed [`KvStore`], which the
//! buffer keeps by the root's place in it, and every read or write of their bytes is
//! translated to and from that store. So the KV's logical f16 size costs address space, not
//! memory. The buffer type is not host memory: no one else may dereference these addresses.
//!
//! A root gets its store when the buffer first sees it: from `init_tensor` when llama.cpp
//! allocates it here, or, where `init_tensor` is never called, from the first graph or byte
//! write that touches it ([`adopt_kv`]). That second way is ggml-rpc's server: it rebuilds the
//! tensor structs for every command (so nothing can hang off `tensor->extra`) and calls
//! `init_tensor` for quantized tensors only. The name and the place survive the wire.
//!
//! A KV root is created before anyone says how its rows split into heads; the attention op
//! that reads it does. Until DSpark has seen that op in a graph it is about to run, the rows
//! are kept exactly, in f16, one "head" per row; once the head size is known they are
//! re-laid out and compressed ([`KvEntry::shape`]). A KV whose attention DSpark declines (an
//! odd head size) thus stays exact f16, and llama.cpp's CPU kernel reads it correctly.
//!
//! ggml's buffer callbacks return nothing, so an error while writing KV bytes is recorded on
//! the KV entry, and every graph that touches that KV fails (`GGML_STATUS_FAILED`, so
//! `llama_decode` reports an error) until the cache is cleared.

use std::ffi::{c_char, c_void};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::f16;
use half::slice::HalfFloatSliceExt;
use llama_cpp_sys_2 as ll;

use super::device::{dev_ctx, is_our_buft, DeviceCtx};
use super::{guard, log_error, log_warn, panic_message, sys};
use crate::attn::Threads;
use crate::kv::tier::Tier;
use crate::kv::{KvStore, StoreConfig};

/// Alignment of tensor addresses in DSpark buffers.
const ALIGNMENT: usize = 64;

/// Largest temporary a byte-range operation allocates (memset, copy): larger ranges are
/// streamed in pieces of about this size.
const CHUNK_BYTES: usize = 1 << 20;

/// The store behind one KV root tensor, [row_len, cells, streams].
pub(crate) struct KvEntry {
    /// The root's data address (its logical bytes start there).
    addr: usize,
    row_len: usize,
    cells: usize,
    streams: usize,
    cfg: StoreConfig,
    /// The head size, once an attention op has told it (see the module documentation).
    head_dim: OnceLock<usize>,
    store: RwLock<KvStore>,
    /// The first error that left the store's content unreliable, until the next clear.
    failure: Mutex<Option<String>>,
    /// The device's memory budget, whose cold tier the shaped store may spill to.
    tier: Option<Arc<Tier>>,
    /// The model layer (from the tensor's name, `cache_k_l<layer>`).
    pub layer: Option<usize>,
    /// Whether it holds K (`cache_k_l<layer>`), not V.
    pub is_k: bool,
    /// The cells (stream, first, cells) the latest attention over this KV read: with a
    /// budget, the transfer stream prefetches these for the next call (page selection
    /// changes little from one token to the next).
    pub last_reads: Mutex<Option<Vec<(usize, usize, usize)>>>,
}

impl KvEntry {
    #[allow(clippy::too_many_arguments)]
    fn new(addr: usize, row_len: usize, cells: usize, streams: usize, cfg: StoreConfig, tier: Option<Arc<Tier>>, layer: Option<usize>, is_k: bool) -> Result<KvEntry, String> {
        Ok(KvEntry {
            addr,
            layer,
            is_k,
            last_reads: Mutex::new(None),
            row_len,
            cells,
            streams,
            cfg,
            tier,
            head_dim: OnceLock::new(),
            store: RwLock::new(Self::exact_store(row_len, cells, streams, cfg.window)?),
            failure: Mutex::new(None),
        })
    }

    /// The store of a KV whose head size is not known: whole rows, f16, exact.
    fn exact_store(row_len: usize, cells: usize, streams: usize, window: usize) -> Result<KvStore, String> {
        KvStore::new(StoreConfig { quant: None, window, digests: false, centered: false, window_quant: None, recent: 0 }, 1, row_len, cells, streams)
    }

    /// Whether [`KvEntry::shape`] would accept `head_dim` (changes nothing).
    pub fn can_shape(&self, head_dim: usize) -> Result<(), String> {
        if let Some(&d) = self.head_dim.get() {
            return if d == head_dim { Ok(()) } else { Err(format!("KV already shaped with head size {d}")) };
        }
        head_dim_fits(self.row_len, self.cfg.quant, head_dim)
    }

    /// Sets the head size: re-lays the rows written so far into `head_dim`-sized heads and
    /// compresses them as the format says (on `threads`). Once only; a different head size
    /// later is an error.
    pub fn shape(&self, head_dim: usize, threads: Threads) -> Result<(), String> {
        self.can_shape(head_dim)?;
        if self.head_dim.get().is_some() {
            return Ok(());
        }
        let mut old = self.write();
        if self.head_dim.get().is_some() {
            drop(old);
            return self.shape(head_dim, threads); // another thread shaped it meanwhile
        }
        let mut new = KvStore::new(self.cfg, self.row_len / head_dim, head_dim, self.cells, self.streams)?;
        if let Some(t) = &self.tier {
            new.set_tier(t.clone());
        }
        let mut row = vec![0.0f32; self.row_len];
        for stream in 0..self.streams {
            for cell in 0..old.high_water(stream) {
                let g = stream * self.cells + cell;
                if old.is_written(g) {
                    old.read_row(g, &mut row);
                    new.write_row(g, &row);
                }
            }
        }
        new.compact(threads);
        *old = new;
        let _ = self.head_dim.set(head_dim);
        Ok(())
    }

    /// Cells of all its streams.
    pub fn cells(&self) -> usize {
        self.cells * self.streams
    }

    pub fn read(&self) -> RwLockReadGuard<'_, KvStore> {
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, KvStore> {
        self.store.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// The root's logical size in bytes (f16 rows).
    fn bytes(&self) -> usize {
        self.row_len * 2 * self.cells * self.streams
    }

    /// Records that the store's content can no longer be trusted (and logs it).
    pub fn fail(&self, msg: &str) {
        log_error(msg);
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert_with(|| msg.to_string());
    }

    /// The recorded failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Drops every row; the KV is consistent (empty) again.
    fn clear(&self) {
        self.write().clear();
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Runs `f` on this entry; an error or a panic is recorded as the entry's failure.
    fn run(&self, what: &str, f: impl FnOnce() -> Result<(), String>) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|e| Err(panic_message(&*e).to_string()));
        if let Err(msg) = r {
            self.fail(&format!("{what}: {msg}"));
        }
    }
}

/// Whether rows of `row_len` values split into heads of `head_dim` that `quant` can encode.
fn head_dim_fits(row_len: usize, quant: Option<crate::codec::Quant>, head_dim: usize) -> Result<(), String> {
    if head_dim == 0 || row_len % head_dim != 0 {
        return Err(format!("row of {row_len} values does not split into heads of {head_dim}"));
    }
    quant.map(|q| crate::codec::RowCodec::new(q, head_dim)).transpose().map(|_| ())
}

/// Per-buffer state: the reserved memory, the device it belongs to, and the KV stores of the
/// roots placed in it (owned here, freed with the buffer).
pub(crate) struct BufferCtx {
    base: *mut u8,
    size: usize,
    dev: &'static DeviceCtx,
    /// The KV stores by their root's data address.
    kv: Mutex<BTreeMap<usize, Arc<KvEntry>>>,
}

impl BufferCtx {
    fn kv(&self) -> MutexGuard<'_, BTreeMap<usize, Arc<KvEntry>>> {
        self.kv.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store whose root's bytes hold `addr`.
    fn entry_at(&self, addr: usize) -> Option<Arc<KvEntry>> {
        let kv = self.kv();
        let (_, e) = kv.range(..=addr).next_back()?;
        (addr < e.addr + e.bytes()).then(|| e.clone())
    }
}

pub(crate) static BUFFER_IFACE: sys::ggml_backend_buffer_i = sys::ggml_backend_buffer_i {
    free_buffer: Some(free_buffer),
    get_base: Some(get_base),
    init_tensor: Some(init_tensor),
    memset_tensor: Some(memset_tensor),
    set_tensor: Some(set_tensor),
    get_tensor: Some(get_tensor),
    set_tensor_2d: None,
    get_tensor_2d: None,
    cpy_tensor: Some(cpy_tensor),
    clear: Some(clear),
    reset: None,
};

/// The buffer type's vtable.
pub(crate) fn buft_iface() -> sys::ggml_backend_buffer_type_i {
    sys::ggml_backend_buffer_type_i {
        get_name: Some(buft_name),
        alloc_buffer: Some(alloc_buffer),
        alloc_buffer_n: None,
        get_alignment: Some(get_alignment),
        get_max_size: None,
        get_alloc_size: None,
        get_alloc_size_n: None,
        is_host: None, // false: KV bytes are not in ggml's layout
    }
}

/// The device context behind a buffer type of ours.
///
/// # Safety
/// `buft` must be a buffer type made by `device.rs`.
unsafe fn buft_dev(buft: ll::ggml_backend_buffer_type_t) -> &'static DeviceCtx {
    // SAFETY: our buffer types point to their device, whose context lives forever (caller).
    unsafe { dev_ctx((*(buft as *mut sys::ggml_backend_buffer_type)).device.cast()) }
}

/// # Safety
/// ggml callback: `buft` is a buffer type made by `device.rs`.
unsafe extern "C" fn buft_name(buft: ll::ggml_backend_buffer_type_t) -> *const c_char {
    // SAFETY: ggml passes our buffer type; the device's name is a static string.
    unsafe { ll::ggml_backend_dev_name((*(buft as *mut sys::ggml_backend_buffer_type)).device.cast()) }
}

/// # Safety
/// ggml callback: the argument is a buffer type made by `device.rs`.
unsafe extern "C" fn get_alignment(_: ll::ggml_backend_buffer_type_t) -> usize {
    ALIGNMENT
}

/// # Safety
/// ggml callback: `buft` is a buffer type made by `device.rs`.
unsafe extern "C" fn alloc_buffer(buft: ll::ggml_backend_buffer_type_t, size: usize) -> ll::ggml_backend_buffer_t {
    guard("alloc_buffer", std::ptr::null_mut(), || {
        let len = size.max(ALIGNMENT);
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            log_error(&format!("cannot reserve {size} bytes of address space"));
            return std::ptr::null_mut();
        }
        // SAFETY: ggml calls alloc_buffer on our buffer type only.
        let dev = unsafe { buft_dev(buft) };
        let ctx = Box::new(BufferCtx { base: base.cast(), size: len, dev, kv: Mutex::new(BTreeMap::new()) });
        // SAFETY: ggml_backend_buffer_init copies the iface and takes ownership of the
        // context pointer until free_buffer.
        unsafe { sys::ggml_backend_buffer_init(buft, BUFFER_IFACE, Box::into_raw(ctx).cast(), size) }
    })
}

/// The context of one of our buffers.
///
/// # Safety
/// `buf` must be a live buffer created by `alloc_buffer`.
unsafe fn ctx<'a>(buf: ll::ggml_backend_buffer_t) -> &'a BufferCtx {
    // SAFETY: our buffers carry a BufferCtx as context until free_buffer (caller).
    unsafe { &*((*(buf as *mut sys::ggml_backend_buffer)).context as *const BufferCtx) }
}

/// # Safety
/// ggml callback: `buf` is a live buffer made by `alloc_buffer`; tensors are valid, placed in it, and byte ranges lie inside them (ggml checks them before calling).
unsafe extern "C" fn free_buffer(buf: ll::ggml_backend_buffer_t) {
    guard("free_buffer", (), || {
        // SAFETY: ggml calls this once, with a buffer we created; we take the context back.
        let ctx = unsafe { Box::from_raw((*(buf as *mut sys::ggml_backend_buffer)).context as *mut BufferCtx) };
        // SAFETY: base/size are the mapping made in alloc_buffer.
        unsafe { libc::munmap(ctx.base.cast(), ctx.size) };
        // The KV entries drop with ctx; the device's statistics hold weak references only.
    })
}

/// # Safety
/// ggml callback: `buf` is a live buffer made by `alloc_buffer`; tensors are valid, placed in it, and byte ranges lie inside them (ggml checks them before calling).
unsafe extern "C" fn get_base(buf: ll::ggml_backend_buffer_t) -> *mut c_void {
    // SAFETY: ggml passes a live buffer of ours.
    unsafe { ctx(buf) }.base.cast()
}

/// The model layer of a KV root's name (`cache_k_l<layer>`).
fn layer_of(name: &str) -> Option<usize> {
    name.get("cache_k_l".len()..)?.parse().ok()
}

/// Whether `name` names a KV cache root that DSpark stores compressed (`Some(is_k)`): exactly
/// `cache_k_l<N>` or `cache_v_l<N>`, so that a view named after its root ("cache_k_l0
/// (view)"), which ggml-rpc's server sends without its root, is not taken for one.
fn is_kv_name(name: &str) -> Option<bool> {
    let is_k = name.starts_with("cache_k_l");
    let layer = name.get("cache_k_l".len()..).filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()));
    (layer.is_some() && (is_k || name.starts_with("cache_v_l"))).then_some(is_k)
}

/// Reads a tensor's name.
///
/// # Safety
/// `t` must point to a valid ggml tensor.
pub(crate) unsafe fn tensor_name(t: *const ll::ggml_tensor) -> String {
    // SAFETY: ggml tensor names are NUL-terminated arrays (caller: valid tensor).
    unsafe { std::ffi::CStr::from_ptr((*t).name.as_ptr()) }.to_string_lossy().into_owned()
}

/// # Safety
/// ggml callback: `buf` is a live buffer made by `alloc_buffer`; tensors are valid, placed in it, and byte ranges lie inside them (ggml checks them before calling).
unsafe extern "C" fn init_tensor(_buf: ll::ggml_backend_buffer_t, t: *mut ll::ggml_tensor) -> ll::ggml_status {
    guard("init_tensor", ll::GGML_STATUS_FAILED, || {
        // SAFETY: ggml passes a valid tensor placed in our live buffer.
        let (tr, name) = unsafe { (&*t, tensor_name(t)) };
        if !tr.view_src.is_null() {
            return ll::GGML_STATUS_SUCCESS;
        }
        if is_kv_name(&name).is_some() && (tr.type_ != ll::GGML_TYPE_F16 || tr.ne[3] != 1) {
            // SAFETY: ggml_type_name returns a static string for any type.
            let ty = unsafe { std::ffi::CStr::from_ptr(ll::ggml_type_name(tr.type_)) }.to_string_lossy();
            log_error(&format!("{name}: DSpark takes the KV cache as 3-D F16 (it compresses it itself), got {ty}: use KV type f16 (-ctk f16 -ctv f16)"));
            return ll::GGML_STATUS_FAILED;
        }
        // SAFETY: as above.
        match unsafe { adopt_kv(t) } {
            Ok(_) => ll::GGML_STATUS_SUCCESS,
            Err(e) => {
                log_error(&e);
                ll::GGML_STATUS_FAILED
            }
        }
    })
}

/// The store of the KV root behind `t` (a root or a view of one), made now if the buffer has
/// not seen that root yet (see the module documentation); `Ok(None)` if `t` is not in a KV
/// root of one of our buffers.
///
/// # Safety
/// `t` must point to a valid tensor whose buffer, if any, is alive.
pub(crate) unsafe fn adopt_kv(t: *const ll::ggml_tensor) -> Result<Option<Arc<KvEntry>>, String> {
    // SAFETY: valid tensor (caller).
    if let Some(e) = unsafe { kv_entry(t) } {
        return Ok(Some(e));
    }
    // SAFETY: as above; a KvRoot's root is a valid tensor in one of our live buffers.
    unsafe {
        let Some(kv) = kv_root(t) else { return Ok(None) };
        // llama.cpp's fitting pass places the KV in a placeholder buffer, which holds no store.
        let Some(ctx) = buffer_ctx((*kv.root).buffer) else { return Ok(None) };
        let name = tensor_name(kv.root);
        new_entry(ctx, kv, &name, (*kv.root).data as usize).map(Some).map_err(|e| format!("{name}: {e}"))
    }
}

/// Makes the store of a KV root at `addr` in `ctx`'s buffer (or returns the one another
/// thread made meanwhile), as the device's configuration says.
fn new_entry(ctx: &BufferCtx, kv: KvRoot, name: &str, addr: usize) -> Result<Arc<KvEntry>, String> {
    let mut map = ctx.kv();
    if let Some(e) = map.get(&addr) {
        return Ok(e.clone());
    }
    let c = &ctx.dev.config;
    let layer = layer_of(name);
    let quant = c.quant(layer, kv.is_k)?;
    if let Some(p) = c.profile.as_ref().filter(|p| p.model.n_head_kv * p.model.head_dim != kv.row_len) {
        return Err(format!("rows of {} values, but profile {} was made for {} ({} KV heads of {})", kv.row_len, p.source, p.model.name, p.model.n_head_kv, p.model.head_dim));
    }
    let cfg = StoreConfig { quant, window: c.window, digests: kv.is_k && c.attn_budget > 0, centered: c.center, window_quant: c.window_quant(), recent: c.recent };
    let tier = ctx.dev.budget()?.map(|b| b.tier.clone());
    let entry = Arc::new(KvEntry::new(addr, kv.row_len, kv.cells, kv.streams, cfg, tier, layer, kv.is_k)?);
    ctx.dev.track(&entry);
    map.insert(addr, entry.clone());
    Ok(entry)
}

/// A KV root in one of our buffers as its tensor describes it, with or without a store:
/// llama.cpp's parameter fitting (`--fit`, on by default in its tools) puts the KV tensors in
/// a zero-size placeholder buffer that has no stores, and asks `supports_op` about them.
#[derive(Clone, Copy)]
pub(crate) struct KvRoot {
    root: *const ll::ggml_tensor,
    pub is_k: bool,
    pub row_len: usize,
    /// Cells per stream.
    pub cells: usize,
    pub streams: usize,
}

impl KvRoot {
    /// The store behind the root; `None` in a placeholder buffer.
    pub fn entry(&self) -> Option<Arc<KvEntry>> {
        // SAFETY: `root` was valid when this KvRoot was made, and ggml keeps tensors alive
        // for the duration of the op that made it.
        unsafe { kv_entry(self.root) }
    }

    /// Whether the root's rows split into heads of `head_dim` that the format can encode
    /// (and, once a store has a head size, that it is this one).
    pub fn can_shape(&self, head_dim: usize) -> Result<(), String> {
        match self.entry() {
            Some(e) => e.can_shape(head_dim),
            None => {
                // SAFETY: as in `entry`; the root lives in one of our buffers (`kv_root`
                // checked), whose type points to its device.
                let (cfg, name) = unsafe { (&buft_dev((*((*self.root).buffer as *mut sys::ggml_backend_buffer)).buft).config, tensor_name(self.root)) };
                // A layer the profile lacks answers as f16 here (llama.cpp's fitting pass
                // asks before any store exists, and a "no" aborts it); init_tensor refuses
                // its store with the reason.
                head_dim_fits(self.row_len, cfg.quant(layer_of(&name), self.is_k).unwrap_or(None), head_dim)
            }
        }
    }

    pub fn same_as(&self, o: &KvRoot) -> bool {
        std::ptr::eq(self.root, o.root)
    }
}

/// The KV root behind `t` (a root or a view of one) if it lives in one of our buffers.
///
/// # Safety
/// `t` must point to a valid tensor whose buffer, if any, is alive.
pub(crate) unsafe fn kv_root(t: *const ll::ggml_tensor) -> Option<KvRoot> {
    // SAFETY: valid tensor and root (caller); a buffer's type is valid.
    unsafe {
        let root = root_of(t);
        let r = &*root;
        if !is_ours(r.buffer) || r.type_ != ll::GGML_TYPE_F16 || r.ne[3] != 1 {
            return None;
        }
        // Not `tensor_name`: this runs for every tensor of every graph, and need not allocate.
        let is_k = is_kv_name(std::ffi::CStr::from_ptr(r.name.as_ptr()).to_str().ok()?)?;
        Some(KvRoot { root, is_k, row_len: r.ne[0] as usize, cells: r.ne[1] as usize, streams: r.ne[2] as usize })
    }
}

/// Whether the root of `t` has a name that starts like a KV root's (`cache_`): a test of a
/// few bytes, which spares the lookups of [`adopt_kv`] to the graph scan's other tensors.
///
/// # Safety
/// `t` must point to a valid tensor.
pub(crate) unsafe fn named_like_kv(t: *const ll::ggml_tensor) -> bool {
    // SAFETY: t and its root are valid (caller); a name is a NUL-padded array of 64 bytes.
    let name = unsafe { &(*root_of(t)).name };
    name[..6].iter().zip(b"cache_").all(|(&c, &k)| c as u8 == k)
}

/// The KV entries of a buffer (none if it is NULL or not ours).
///
/// # Safety
/// `buf` must be NULL or a live buffer.
pub(crate) unsafe fn entries_of(buf: ll::ggml_backend_buffer_t) -> Vec<Arc<KvEntry>> {
    // SAFETY: NULL or a live buffer (caller).
    match unsafe { buffer_ctx(buf) } {
        Some(c) => c.kv().values().cloned().collect(),
        None => Vec::new(),
    }
}

/// The context of `buf` if it is one of our buffers with memory (a placeholder has none).
///
/// # Safety
/// `buf` must be NULL or a live buffer.
unsafe fn buffer_ctx<'a>(buf: ll::ggml_backend_buffer_t) -> Option<&'a BufferCtx> {
    // SAFETY: NULL or a live buffer (caller); ours carry a BufferCtx, placeholders none.
    unsafe { (is_ours(buf) && !(*(buf as *mut sys::ggml_backend_buffer)).context.is_null()).then(|| ctx(buf)) }
}

/// The KV store whose bytes `t` (a KV root or a view of one) lies in, if `t` lives in a DSpark
/// buffer. Found by address, so a view that ggml-rpc's server sends without its root is found.
///
/// # Safety
/// `t` must point to a valid tensor whose buffer, if any, is alive.
pub(crate) unsafe fn kv_entry(t: *const ll::ggml_tensor) -> Option<Arc<KvEntry>> {
    // SAFETY: t and its root are valid tensors whose buffer is alive (caller).
    unsafe { buffer_ctx((*root_of(t)).buffer)?.entry_at((*t).data as usize) }
}

/// The tensor that owns `t`'s memory (`t` itself unless it is a view).
///
/// # Safety
/// `t` must point to a valid tensor.
pub(crate) unsafe fn root_of(t: *const ll::ggml_tensor) -> *const ll::ggml_tensor {
    // SAFETY: t is valid (caller).
    let src = unsafe { (*t).view_src };
    if src.is_null() {
        t
    } else {
        src
    }
}

/// Whether a buffer is one of DSpark's: its buffer type belongs to one of our devices.
///
/// # Safety
/// `buf` must be NULL or a valid buffer.
pub(crate) unsafe fn is_ours(buf: ll::ggml_backend_buffer_t) -> bool {
    // SAFETY: a valid buffer has a valid buffer type (caller).
    !buf.is_null() && is_our_buft(unsafe { (*(buf as *mut sys::ggml_backend_buffer)).buft })
}

/// Byte offset of `t`'s data (plus `offset`) from the start of `e`'s root, which holds it.
///
/// # Safety
/// `t` must point to a valid tensor with data.
unsafe fn root_offset(e: &KvEntry, t: *const ll::ggml_tensor, offset: usize) -> usize {
    // SAFETY: t is valid (caller).
    unsafe { (*t).data as usize - e.addr + offset }
}

/// Reads logical f16 bytes [off, off + out.len()) of a KV root from its store.
pub(crate) fn kv_read_bytes(e: &KvEntry, off: usize, out: &mut [u8]) {
    let row_bytes = e.row_len * 2;
    let mut store = e.write();
    // Cold pages in the range are read back once, not once per row. Should that fail, each
    // row's own read fails again and the caller records the error.
    let _ = store.stage_cells(off / row_bytes..(off + out.len()).div_ceil(row_bytes));
    let mut rowf = vec![0.0f32; e.row_len];
    let mut rowb = vec![0u8; row_bytes];
    let mut pos = 0;
    while pos < out.len() {
        let (cell, within) = ((off + pos) / row_bytes, (off + pos) % row_bytes);
        let n = (row_bytes - within).min(out.len() - pos);
        store.read_row(cell, &mut rowf);
        f32_to_f16_bytes(&rowf, &mut rowb);
        out[pos..pos + n].copy_from_slice(&rowb[within..within + n]);
        pos += n;
    }
    store.unstage();
}

/// Writes logical f16 bytes at [off, off + data.len()) of a KV root into its store;
/// partial rows are read, patched and written back.
pub(crate) fn kv_write_bytes(e: &KvEntry, off: usize, data: &[u8]) -> Result<(), String> {
    let row_bytes = e.row_len * 2;
    if off.checked_add(data.len()).is_none_or(|end| end > row_bytes * e.cells * e.streams) {
        return Err(format!("write of {} bytes at {off} is outside the KV tensor", data.len()));
    }
    let mut store = e.write();
    store.stage_cells(off / row_bytes..(off + data.len()).div_ceil(row_bytes)).map_err(|e| format!("reading a cold KV page back: {e}"))?;
    let mut rowf = vec![0.0f32; e.row_len];
    let mut rowb = vec![0u8; row_bytes];
    let mut pos = 0;
    while pos < data.len() {
        let (cell, within) = ((off + pos) / row_bytes, (off + pos) % row_bytes);
        let n = (row_bytes - within).min(data.len() - pos);
        if n < row_bytes {
            store.read_row(cell, &mut rowf);
            f32_to_f16_bytes(&rowf, &mut rowb);
        }
        rowb[within..within + n].copy_from_slice(&data[pos..pos + n]);
        // Zero rows that were never written stay unallocated (llama.cpp clears in chunks).
        if !(rowb.iter().all(|&b| b == 0) && !store.is_written(cell)) {
            f16_bytes_to_f32(&rowb, &mut rowf);
            store.write_row(cell, &rowf);
        }
        pos += n;
    }
    store.compact(Threads::serial());
    Ok(())
}

// Both convert 8 values at a time with half's slice conversions (F16C where the CPU has it):
// converting one value at a time costs ~4x more.
pub(crate) fn f32_to_f16_bytes(src: &[f32], dst: &mut [u8]) {
    let mut h = [f16::ZERO; 8];
    for (x, o) in src.chunks(8).zip(dst.chunks_mut(16)) {
        h[..x.len()].convert_from_f32_slice(x);
        for (v, b) in h.iter().zip(o.chunks_exact_mut(2)) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }
}

fn f16_bytes_to_f32(src: &[u8], dst: &mut [f32]) {
    let mut h = [f16::ZERO; 8];
    for (b, o) in src.chunks(16).zip(dst.chunks_mut(8)) {
        for (v, b) in h.iter_mut().zip(b.chunks_exact(2)) {
            *v = f16::from_le_bytes([b[0], b[1]]);
        }
        h[..o.len()].convert_to_f32_slice(o);
    }
}

/// Bytes per piece when streaming a range of `t`: about [`CHUNK_BYTES`], whole KV rows.
///
/// # Safety
/// `t` must point to a valid tensor.
unsafe fn chunk_len(t: *const ll::ggml_tensor) -> usize {
    // SAFETY: t is valid (caller).
    match unsafe { kv_store(t) } {
        Some(e) => (CHUNK_BYTES / (e.row_len * 2)).max(1) * e.row_len * 2,
        None => CHUNK_BYTES,
    }
}

/// The store behind `t` for a byte access (made now if need be, see [`adopt_kv`]); `None`
/// for plain bytes. A store that cannot be made is logged, and the bytes stay plain: the
/// next graph on that KV fails with the same error.
///
/// # Safety
/// `t` must point to a valid tensor whose buffer, if any, is alive.
unsafe fn kv_store(t: *const ll::ggml_tensor) -> Option<Arc<KvEntry>> {
    // SAFETY: as the caller's.
    unsafe { adopt_kv(t) }.unwrap_or_else(|e| {
        log_error(&e);
        None
    })
}

/// # Safety
/// ggml callback: `buf` is a live buffer made by `alloc_buffer`; tensors are valid, placed in it, and byte ranges lie inside them (ggml checks them before calling).
unsafe extern "C" fn set_tensor(_buf: ll::ggml_backend_buffer_t, t: *mut ll::ggml_tensor, data: *const c_void, offset: usize, size: usize) {
    guard("set_tensor", (), || {
        // SAFETY: ggml guarantees offset + size <= nbytes(t) and that data holds size bytes.
        let src = unsafe { std::slice::from_raw_parts(data as *const u8, size) };
        // SAFETY: t is a valid tensor in our live buffer.
        match unsafe { kv_store(t) } {
            // SAFETY: as above.
            Some(e) => e.run("set_tensor", || kv_write_bytes(&e, unsafe { root_offset(&e, t, offset) }, src)),
            // SAFETY: a plain tensor's bytes are ours to write, inside its range (ggml).
            None => unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), ((*t).data as *mut u8).add(offset), size) },
        }
    })
}

/// # Safety
/// ggml callback: `buf` is a live buffer made by `alloc_buffer`; tensors are valid, placed in it, and byte ranges lie inside them (ggml checks them before calling).
unsafe extern "C" fn get_tensor(_buf: ll::ggml_backend_buffer_t, t: *const ll::ggml_tensor, data: *mut c_void, offset: usize, size: usize) {
    guard("get_tensor", (), || {
        // SAFETY: as in set_tensor; data has room for size bytes.
        let dst = unsafe { std::slice::from_raw_parts_mut(data as *mut u8, size) };
        // SAFETY: t is a valid tensor in our live buffer.
        match unsafe { kv_store(t) } {
            Some(e) => {
                dst.fill(0);
                // SAFETY: as above.
                let off = unsafe { root_offset(&e, t, offset) };
                e.run("get_tensor", || {
                    kv_read_bytes(&e, off, dst);
                    Ok(())
                });
            }
            // SAFETY: a plain tensor's bytes are ours to read, inside its range (ggml).
            None => unsafe { std::ptr::copy_nonoverlapping(((*t).data as *const u8).add(offset), dst.as_mut_ptr(), size) },
        }
    })
}

/// # Safety
/// ggml callback: `buf` is a live buffer made by `alloc_buffer`; tensors are valid, placed in it, and byte ranges lie inside them (ggml checks them before calling).
unsafe extern "C" fn memset_tensor(buf: ll::ggml_backend_buffer_t, t: *mut ll::ggml_tensor, value: u8, offset: usize, size: usize) {
    guard("memset_tensor", (), || {
        // SAFETY: t is a valid tensor of ours; offset + size <= nbytes(t) (ggml).
        let piece = unsafe { chunk_len(t) }.min(size);
        let bytes = vec![value; piece];
        let mut done = 0;
        while done < size {
            let n = piece.min(size - done);
            // SAFETY: as above; bytes holds at least n bytes.
            unsafe { set_tensor(buf, t, bytes.as_ptr().cast(), offset + done, n) };
            done += n;
        }
    })
}

/// # Safety
/// ggml callback: `buf` is a live buffer made by `alloc_buffer`; tensors are valid, placed in it, and byte ranges lie inside them (ggml checks them before calling).
unsafe extern "C" fn cpy_tensor(_buf: ll::ggml_backend_buffer_t, src: *const ll::ggml_tensor, dst: *mut ll::ggml_tensor) -> bool {
    guard("cpy_tensor", false, || {
        // SAFETY: ggml passes valid tensors of the same size; src is ours only if its buffer
        // is (otherwise it would be host memory and ggml would copy itself).
        unsafe {
            let src_buf = (*root_of(src)).buffer;
            if !is_ours(src_buf) {
                return false;
            }
            let size = ll::ggml_nbytes(src);
            let mut tmp = vec![0u8; chunk_len(src).min(size)];
            let mut done = 0;
            while done < size {
                let n = tmp.len().min(size - done);
                get_tensor(src_buf, src, tmp.as_mut_ptr().cast(), done, n);
                ll::ggml_backend_tensor_set(dst, tmp.as_ptr().cast(), done, n);
                done += n;
            }
            true
        }
    })
}

/// # Safety
/// ggml callback: `buf` is a live buffer made by `alloc_buffer`; tensors are valid, placed in it, and byte ranges lie inside them (ggml checks them before calling).
unsafe extern "C" fn clear(buf: ll::ggml_backend_buffer_t, value: u8) {
    guard("clear", (), || {
        // SAFETY: buf is a live buffer of ours.
        let ctx = unsafe { ctx(buf) };
        let kv = ctx.kv();
        if value == 0 {
            // Zero pages without touching them: a KV buffer whose roots have no store yet
            // (ggml-rpc's server, see the module documentation) is cleared when its context
            // is made, and writing zeros would commit its whole logical f16 size.
            // SAFETY: base..base+size is our private anonymous mapping; MADV_DONTNEED makes
            // its pages read as zeros again.
            if unsafe { libc::madvise(ctx.base.cast(), ctx.size, libc::MADV_DONTNEED) } != 0 {
                // SAFETY: as above.
                unsafe { std::ptr::write_bytes(ctx.base, 0, ctx.size) };
            }
        } else if kv.is_empty() {
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(ctx.base, value, ctx.size) };
        } else {
            log_warn(&format!("clearing a KV buffer to {value} is treated as clearing to 0"));
        }
        kv.values().for_each(|e| e.clear());
    })
}
