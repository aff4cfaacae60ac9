//! DSPARK0's buffer type and buffers.
//!
//! Every buffer reserves its logical size as anonymous memory with MAP_NORESERVE: compute
//! tensors (copies of q, masks, attention outputs) live there as plain bytes, and the kernel
//! commits pages only when they are touched. KV roots (`cache_k_l*`, `cache_v_l*`) are never
//! touched through their address: `init_tensor` gives each one a compressed [`KvStore`]
//! (pointed to by `tensor->extra`), and every read or write of their bytes is translated to
//! and from that store. So the KV's logical f16 size costs address space, not memory. The
//! buffer type is not host memory: no one else may dereference these addresses.

use std::ffi::{c_char, c_void};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::f16;
use llama_cpp_sys_2 as ll;

use super::sys;
use super::{current, guard};
use crate::kv::{KvStore, StoreConfig};

/// Alignment of tensor addresses in DSpark buffers.
const ALIGNMENT: usize = 64;

/// The KV store behind one KV root tensor. The store is created ("shaped") once its head
/// size is known: the KV tensor is [n_head_kv * head_dim, cells, streams] and does not say
/// how a row splits into heads; the attention op that reads it does.
pub(crate) struct KvEntry {
    /// Owner id from `with_config` (0: none), to report figures per context.
    pub owner: u64,
    is_k: bool,
    row_len: usize,
    cells: usize,
    streams: usize,
    cfg: StoreConfig,
    store: RwLock<Option<KvStore>>,
}

impl KvEntry {
    /// Creates the store for `head_dim`-sized heads, if not done yet.
    pub fn shape(&self, head_dim: usize) -> Result<(), String> {
        let mut s = self.store.write().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = s.as_ref() {
            return if st.head_dim() == head_dim { Ok(()) } else { Err(format!("KV already shaped with head size {}", st.head_dim())) };
        }
        if head_dim == 0 || self.row_len % head_dim != 0 {
            return Err(format!("row of {} values does not split into heads of {head_dim}", self.row_len));
        }
        *s = Some(KvStore::new(self.cfg, self.row_len / head_dim, head_dim, self.cells, self.streams)?);
        Ok(())
    }

    pub fn is_shaped(&self) -> bool {
        self.store.read().map(|s| s.is_some()).unwrap_or(false)
    }

    /// The store, shaped with a best guess (head size 128 if the row splits evenly into
    /// an even number of such heads, else 64) if no attention op has shaped it yet.
    pub fn write(&self) -> Result<RwLockWriteGuard<'_, Option<KvStore>>, String> {
        if !self.is_shaped() {
            let guess = if self.row_len % 256 == 0 { 128 } else { 64 };
            eprintln!("dspark: warning: KV written before its head size was known; assuming {guess}");
            self.shape(guess)?;
        }
        Ok(self.store.write().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Option<KvStore>> {
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn row_len(&self) -> usize {
        self.row_len
    }

    pub fn is_k(&self) -> bool {
        self.is_k
    }
}

/// Per-buffer state: the reserved memory and the KV stores of the roots placed in it.
pub(crate) struct BufferCtx {
    base: *mut u8,
    size: usize,
    kv: Vec<Box<KvEntry>>,
}

impl BufferCtx {
    pub fn kv_entries(&self) -> &[Box<KvEntry>] {
        &self.kv
    }
}

/// Live buffers that hold KV stores (as addresses of their BufferCtx), for statistics.
pub(crate) static KV_BUFFERS: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

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

unsafe extern "C" fn buft_name(_: ll::ggml_backend_buffer_type_t) -> *const c_char {
    c"DSPARK0".as_ptr()
}

unsafe extern "C" fn get_alignment(_: ll::ggml_backend_buffer_type_t) -> usize {
    ALIGNMENT
}

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
            eprintln!("dspark: cannot reserve {size} bytes of address space");
            return std::ptr::null_mut();
        }
        let ctx = Box::new(BufferCtx { base: base.cast(), size: len, kv: Vec::new() });
        // SAFETY: ggml_backend_buffer_init copies the iface and takes ownership of the
        // context pointer until free_buffer.
        unsafe { sys::ggml_backend_buffer_init(buft, BUFFER_IFACE, Box::into_raw(ctx).cast(), size) }
    })
}

/// The context of one of our buffers.
///
/// # Safety
/// `buf` must be a live buffer created by `alloc_buffer`.
pub(crate) unsafe fn ctx<'a>(buf: ll::ggml_backend_buffer_t) -> &'a mut BufferCtx {
    &mut *((*(buf as *mut sys::ggml_backend_buffer)).context as *mut BufferCtx)
}

unsafe extern "C" fn free_buffer(buf: ll::ggml_backend_buffer_t) {
    guard("free_buffer", (), || {
        // SAFETY: ggml calls this once, with a buffer we created; we take the context back.
        let ctx = unsafe { Box::from_raw((*(buf as *mut sys::ggml_backend_buffer)).context as *mut BufferCtx) };
        let addr = &*ctx as *const BufferCtx as usize;
        KV_BUFFERS.lock().unwrap_or_else(|e| e.into_inner()).retain(|&a| a != addr);
        // SAFETY: base/size are the mapping made in alloc_buffer.
        unsafe { libc::munmap(ctx.base.cast(), ctx.size) };
    })
}

unsafe extern "C" fn get_base(buf: ll::ggml_backend_buffer_t) -> *mut c_void {
    ctx(buf).base.cast()
}

/// Whether `name` names a KV cache root that DSpark stores compressed.
fn is_kv_name(name: &str) -> Option<bool> {
    let is_k = name.starts_with("cache_k_l");
    (is_k || name.starts_with("cache_v_l")).then_some(is_k)
}

/// Reads a tensor's name.
///
/// # Safety
/// `t` must point to a valid ggml tensor.
pub(crate) unsafe fn tensor_name(t: *const ll::ggml_tensor) -> String {
    std::ffi::CStr::from_ptr((*t).name.as_ptr()).to_string_lossy().into_owned()
}

unsafe extern "C" fn init_tensor(buf: ll::ggml_backend_buffer_t, t: *mut ll::ggml_tensor) -> ll::ggml_status {
    guard("init_tensor", ll::GGML_STATUS_FAILED, || {
        // SAFETY: ggml passes a valid tensor placed in our live buffer.
        unsafe {
            let tr = &mut *t;
            if !tr.view_src.is_null() {
                return ll::GGML_STATUS_SUCCESS;
            }
            let Some(is_k) = is_kv_name(&tensor_name(t)) else { return ll::GGML_STATUS_SUCCESS };
            if tr.type_ != ll::GGML_TYPE_F16 || tr.ne[3] != 1 {
                eprintln!("dspark: warning: KV tensor {} is not a 3-D F16 tensor; kept uncompressed", tensor_name(t));
                return ll::GGML_STATUS_SUCCESS;
            }
            let (c, owner) = current();
            let quant = c.format.map(|f| if is_k { f.k } else { f.v });
            let entry = Box::new(KvEntry {
                owner,
                is_k,
                row_len: tr.ne[0] as usize,
                cells: tr.ne[1] as usize,
                streams: tr.ne[2] as usize,
                cfg: StoreConfig { quant, window: c.window },
                store: RwLock::new(None),
            });
            tr.extra = (&*entry as *const KvEntry).cast_mut().cast();
            let ctx = ctx(buf);
            if ctx.kv.is_empty() {
                KV_BUFFERS.lock().unwrap_or_else(|e| e.into_inner()).push(ctx as *const BufferCtx as usize);
            }
            ctx.kv.push(entry);
            ll::GGML_STATUS_SUCCESS
        }
    })
}

/// The KV entry behind `t` (a KV root or a view of one), if `t` lives in a DSpark buffer.
///
/// # Safety
/// `t` must point to a valid tensor whose buffer, if any, is alive.
pub(crate) unsafe fn kv_entry<'a>(t: *const ll::ggml_tensor) -> Option<&'a KvEntry> {
    let root = root_of(t);
    if !is_ours((*root).buffer) || (*root).extra.is_null() {
        return None;
    }
    Some(&*((*root).extra as *const KvEntry))
}

/// The tensor that owns `t`'s memory (`t` itself unless it is a view).
///
/// # Safety
/// `t` must point to a valid tensor.
pub(crate) unsafe fn root_of(t: *const ll::ggml_tensor) -> *const ll::ggml_tensor {
    if (*t).view_src.is_null() {
        t
    } else {
        (*t).view_src
    }
}

/// Whether a buffer is one of DSPARK0's.
///
/// # Safety
/// `buf` must be NULL or a valid buffer.
pub(crate) unsafe fn is_ours(buf: ll::ggml_backend_buffer_t) -> bool {
    !buf.is_null() && (*(buf as *mut sys::ggml_backend_buffer)).buft == super::device::buft()
}

/// Byte offset of `t`'s data (plus `offset`) from its root's data.
///
/// # Safety
/// `t` must point to a valid tensor with data.
unsafe fn root_offset(t: *const ll::ggml_tensor, offset: usize) -> usize {
    let root = root_of(t);
    ((*t).data as usize - (*root).data as usize) + offset
}

/// Reads logical f16 bytes [off, off + out.len()) of a KV root from its store.
pub(crate) fn kv_read_bytes(e: &KvEntry, off: usize, out: &mut [u8]) {
    let guard = e.read();
    let row_bytes = e.row_len * 2;
    let mut rowf = vec![0.0f32; e.row_len];
    let mut rowb = vec![0u8; row_bytes];
    let mut pos = 0;
    while pos < out.len() {
        let (cell, within) = ((off + pos) / row_bytes, (off + pos) % row_bytes);
        let n = (row_bytes - within).min(out.len() - pos);
        match guard.as_ref() {
            Some(store) => {
                store.read_row(cell, &mut rowf);
                f32_to_f16_bytes(&rowf, &mut rowb);
            }
            None => rowb.fill(0),
        }
        out[pos..pos + n].copy_from_slice(&rowb[within..within + n]);
        pos += n;
    }
}

/// Writes logical f16 bytes at [off, off + data.len()) of a KV root into its store;
/// partial rows are read, patched and written back.
pub(crate) fn kv_write_bytes(e: &KvEntry, off: usize, data: &[u8]) -> Result<(), String> {
    let mut guard = e.write()?;
    let store = guard.as_mut().expect("shaped by write()");
    let row_bytes = e.row_len * 2;
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
    store.compact(None);
    Ok(())
}

pub(crate) fn f32_to_f16_bytes(src: &[f32], dst: &mut [u8]) {
    for (x, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
        o.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
    }
}

fn f16_bytes_to_f32(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

unsafe extern "C" fn set_tensor(_buf: ll::ggml_backend_buffer_t, t: *mut ll::ggml_tensor, data: *const c_void, offset: usize, size: usize) {
    guard("set_tensor", (), || {
        // SAFETY: ggml guarantees offset + size <= nbytes(t) and that data holds size bytes.
        unsafe {
            let src = std::slice::from_raw_parts(data as *const u8, size);
            match kv_entry(t) {
                Some(e) => {
                    if let Err(msg) = kv_write_bytes(e, root_offset(t, offset), src) {
                        eprintln!("dspark: set_tensor: {msg}");
                    }
                }
                None => std::ptr::copy_nonoverlapping(src.as_ptr(), ((*t).data as *mut u8).add(offset), size),
            }
        }
    })
}

unsafe extern "C" fn get_tensor(_buf: ll::ggml_backend_buffer_t, t: *const ll::ggml_tensor, data: *mut c_void, offset: usize, size: usize) {
    guard("get_tensor", (), || {
        // SAFETY: as in set_tensor; data has room for size bytes.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(data as *mut u8, size);
            match kv_entry(t) {
                Some(e) => kv_read_bytes(e, root_offset(t, offset), dst),
                None => std::ptr::copy_nonoverlapping(((*t).data as *const u8).add(offset), dst.as_mut_ptr(), size),
            }
        }
    })
}

unsafe extern "C" fn memset_tensor(buf: ll::ggml_backend_buffer_t, t: *mut ll::ggml_tensor, value: u8, offset: usize, size: usize) {
    let bytes = vec![value; size];
    set_tensor(buf, t, bytes.as_ptr().cast(), offset, size);
}

unsafe extern "C" fn cpy_tensor(_buf: ll::ggml_backend_buffer_t, src: *const ll::ggml_tensor, dst: *mut ll::ggml_tensor) -> bool {
    guard("cpy_tensor", false, || {
        // SAFETY: ggml passes valid tensors of the same layout; src is in one of our buffers
        // (otherwise it would be host memory and ggml would not call us).
        unsafe {
            let src_buf = (*root_of(src)).buffer;
            if !is_ours(src_buf) {
                return false;
            }
            let n = ll::ggml_nbytes(src);
            let mut tmp = vec![0u8; n];
            get_tensor(src_buf, src, tmp.as_mut_ptr().cast(), 0, n);
            set_tensor((*root_of(dst)).buffer, dst, tmp.as_ptr().cast(), 0, n);
            true
        }
    })
}

unsafe extern "C" fn clear(buf: ll::ggml_backend_buffer_t, value: u8) {
    guard("clear", (), || {
        // SAFETY: buf is a live buffer of ours.
        let ctx = unsafe { ctx(buf) };
        if ctx.kv.is_empty() {
            // SAFETY: base..base+size is our mapping.
            unsafe { std::ptr::write_bytes(ctx.base, value, ctx.size) };
            return;
        }
        if value != 0 {
            eprintln!("dspark: warning: clearing a KV buffer to {value} is treated as clearing to 0");
        }
        for e in &ctx.kv {
            if let Some(s) = e.store.write().unwrap_or_else(|e| e.into_inner()).as_mut() {
                s.clear();
            }
        }
    })
}
