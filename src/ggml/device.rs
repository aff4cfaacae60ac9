//! DSpark's registry and devices. ggml keeps raw pointers to them for the life of the
//! process, so they are created once and never freed.
//!
//! A device is a KV configuration: every KV cache allocated from a device's buffer type gets
//! that device's format and window, so two contexts with different formats in one process
//! can never mix, whichever thread creates them. The first device is `DSPARK0`; [`register`]
//! with another configuration adds `DSPARK1`, `DSPARK2`, ... . ggml reaches them through the
//! registry ([`list_registry`] says why they are not added to ggml's own device list). Each
//! device also owns the list of its live KV stores, for statistics.

use std::ffi::{c_char, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use llama_cpp_sys_2 as ll;

use super::budget::Budget;
use super::buffer::{self, KvEntry};
use super::{backend, guard, sys, Config};

/// What one device owns: its configuration, its buffer type, and its live KV stores.
pub(crate) struct DeviceCtx {
    pub config: Config,
    name: CString,
    buft: *mut sys::ggml_backend_buffer_type,
    /// The KV stores allocated from this device's buffers; each buffer owns its entries
    /// (strong references) and frees them with itself.
    kv: Mutex<Vec<Weak<KvEntry>>>,
    /// FLASH_ATTN_EXT ops run on this device's KV.
    pub attn_calls: AtomicU64,
    /// Graphs (scheduler splits) run by this device's backends.
    pub graphs: AtomicU64,
    /// What decode attention calls read (page selection).
    pub select: crate::kv::select::Counters,
    /// The KV budget and its cold tier, made when the first KV store needs them.
    budget: Mutex<Option<Arc<Budget>>>,
}

impl DeviceCtx {
    /// Adds a live KV store to the statistics (dropping entries of freed buffers).
    pub fn track(&self, e: &Arc<KvEntry>) {
        let mut kv = self.kv.lock().unwrap_or_else(|e| e.into_inner());
        kv.retain(|w| w.strong_count() > 0);
        kv.push(Arc::downgrade(e));
    }

    /// The budget of this device's KV, if its configuration has one (made on first use; an
    /// error, e.g. an unwritable spill folder, is returned and tried again next time).
    pub fn budget(&self) -> Result<Option<Arc<Budget>>, String> {
        let Some(bytes) = self.config.kv_budget else { return Ok(None) };
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        if b.is_none() {
            *b = Some(Arc::new(Budget::new(&self.config, bytes)?));
        }
        Ok(b.clone())
    }

    /// Makes the budget spill to `cold` instead of a spill file (before any KV exists).
    pub fn set_cold_store(&self, cold: Box<dyn crate::kv::cold::ColdStore>) -> Result<(), String> {
        let bytes = self.config.kv_budget.ok_or("this device's configuration has no KV budget")?;
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        if b.is_some() {
            return Err("this device's budget is already in use".into());
        }
        *b = Some(Arc::new(Budget::with_cold(&self.config, bytes, cold)?));
        Ok(())
    }

    /// The live KV stores (kept alive while the caller holds them).
    pub fn entries(&self) -> Vec<Arc<KvEntry>> {
        self.kv.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect()
    }
}

/// A device handle that may cross threads: ggml shares devices across threads itself, and
/// a device's context is immutable apart from its mutex-guarded list.
#[derive(Clone, Copy)]
struct Dev(*mut sys::ggml_backend_device);
// SAFETY: see the type's documentation.
unsafe impl Send for Dev {}

struct Registry {
    reg: *mut sys::ggml_backend_reg,
    devices: Mutex<Vec<Dev>>,
}

// SAFETY: `reg` is immutable after creation; the device list is behind a mutex.
unsafe impl Send for Registry {}
unsafe impl Sync for Registry {}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

fn registry_obj() -> &'static Registry {
    REGISTRY.get_or_init(|| {
        let reg = Box::into_raw(Box::new(sys::ggml_backend_reg {
            api_version: sys::GGML_BACKEND_API_VERSION as i32,
            iface: sys::ggml_backend_reg_i {
                get_name: Some(reg_name),
                get_device_count: Some(reg_device_count),
                get_device: Some(reg_device),
                get_proc_address: Some(backend::proc_address),
            },
            context: std::ptr::null_mut(),
        }));
        Registry { reg, devices: Mutex::new(Vec::new()) }
    })
}

/// The device for `config`, created if no device has that configuration yet.
fn device_for(config: Config) -> ll::ggml_backend_dev_t {
    let r = registry_obj();
    let mut devs = r.devices.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: every listed device was made below and is never freed.
    if let Some(d) = devs.iter().find(|d| unsafe { dev_ctx(d.0.cast()) }.config == config) {
        return d.0.cast();
    }
    let name = CString::new(format!("DSPARK{}", devs.len())).expect("no NUL in a device name");
    let ctx = Box::into_raw(Box::new(DeviceCtx { config, name, buft: std::ptr::null_mut(), kv: Mutex::new(Vec::new()), attn_calls: AtomicU64::new(0), graphs: AtomicU64::new(0), select: Default::default(), budget: Mutex::new(None) }));
    let dev = Box::into_raw(Box::new(sys::ggml_backend_device { iface: device_iface(), reg: r.reg.cast(), context: ctx.cast() }));
    let buft = Box::into_raw(Box::new(sys::ggml_backend_buffer_type { iface: buffer::buft_iface(), device: dev.cast(), context: std::ptr::null_mut() }));
    // SAFETY: ctx was just allocated and is not shared yet.
    unsafe { (*ctx).buft = buft };
    devs.push(Dev(dev));
    dev.cast()
}

/// A device's context.
///
/// # Safety
/// `dev` must be a device made by this module.
pub(crate) unsafe fn dev_ctx<'a>(dev: ll::ggml_backend_dev_t) -> &'a DeviceCtx {
    // SAFETY: our devices carry a leaked DeviceCtx as their context (caller).
    unsafe { &*((*(dev as *mut sys::ggml_backend_device)).context as *const DeviceCtx) }
}

/// Whether a buffer type is one of DSpark's: its device belongs to our registry.
pub(crate) fn is_our_buft(b: ll::ggml_backend_buffer_type_t) -> bool {
    if b.is_null() {
        return false;
    }
    // SAFETY: a valid buffer type's device is NULL or a valid device.
    unsafe {
        let dev = (*(b as *mut sys::ggml_backend_buffer_type)).device as *mut sys::ggml_backend_device;
        !dev.is_null() && (*dev).reg == registry_obj().reg.cast()
    }
}

/// The registry with its first device configured as `config` (if it has none yet), for
/// hosts that register it themselves (the plugin entry point).
pub(crate) fn registry(config: Config) -> ll::ggml_backend_reg_t {
    device_for(config);
    registry_obj().reg.cast()
}

/// Returns the device whose KV caches use `config`, to pass in `llama_model_params.devices`:
/// `DSPARK0` for the first configuration, a new `DSPARKn` for each other one; and lists
/// DSpark's registry with ggml if nothing has yet ([`list_registry`]).
pub fn register(config: Config) -> ll::ggml_backend_dev_t {
    let dev = device_for(config);
    list_registry();
    dev
}

/// Lists DSpark's registry in ggml's process-wide list of registries and devices, once per
/// process, with the devices it has at that moment; devices made later are reached through
/// the registry (`ggml_backend_reg_dev_get`), never added to ggml's device list.
///
/// ggml's list has no lock, and llama.cpp walks it whenever a model is loaded or a context
/// created: growing it while another thread did either read freed memory (a test binary
/// that registered a second configuration while other tests loaded models died with
/// SIGSEGV). So it changes once: from `llama::init`, before a Rust process loads any model,
/// or from a C host's first `dspark_register`, which the host makes before other threads
/// load models (`dspark.h`).
pub fn list_registry() {
    static LISTED: std::sync::Once = std::sync::Once::new();
    // SAFETY: the registry lives for the whole process.
    LISTED.call_once(|| unsafe { ll::ggml_backend_register(registry_obj().reg.cast()) });
}

/// # Safety
/// ggml callback: the registry is the one made by `device.rs`.
unsafe extern "C" fn reg_name(_: ll::ggml_backend_reg_t) -> *const c_char {
    c"DSPARK".as_ptr()
}

/// # Safety
/// ggml callback: the registry is the one made by `device.rs`.
unsafe extern "C" fn reg_device_count(_: ll::ggml_backend_reg_t) -> usize {
    registry_obj().devices.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// # Safety
/// ggml callback: the registry is the one made by `device.rs`.
unsafe extern "C" fn reg_device(_: ll::ggml_backend_reg_t, index: usize) -> ll::ggml_backend_dev_t {
    let devs = registry_obj().devices.lock().unwrap_or_else(|e| e.into_inner());
    devs.get(index).map_or(std::ptr::null_mut(), |d| d.0.cast())
}

fn device_iface() -> sys::ggml_backend_device_i {
    sys::ggml_backend_device_i {
        get_name: Some(dev_name),
        get_description: Some(dev_description),
        get_memory: Some(dev_memory),
        get_type: Some(dev_type),
        get_props: Some(dev_props),
        init_backend: Some(backend::init_backend),
        get_buffer_type: Some(dev_buffer_type),
        get_host_buffer_type: None,
        buffer_from_host_ptr: None,
        supports_op: Some(backend::supports_op),
        supports_buft: Some(dev_supports_buft),
        offload_op: None,
        event_new: None,
        event_free: None,
        event_synchronize: None,
    }
}

/// # Safety
/// ggml callback: `d` is a device made by `device.rs`; out-pointers are writable.
unsafe extern "C" fn dev_name(d: ll::ggml_backend_dev_t) -> *const c_char {
    // SAFETY: ggml passes one of our devices.
    unsafe { dev_ctx(d) }.name.as_ptr()
}

/// # Safety
/// ggml callback: `d` is a device made by `device.rs`; out-pointers are writable.
unsafe extern "C" fn dev_description(_: ll::ggml_backend_dev_t) -> *const c_char {
    c"DSpark compressed KV cache and attention (CPU)".as_ptr()
}

/// Free and total host memory from /proc/meminfo: DSpark's pages are host memory.
fn host_memory() -> (usize, usize) {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemAvailable:"), field("MemTotal:"))
}

/// # Safety
/// ggml callback: `d` is a device made by `device.rs`; out-pointers are writable.
unsafe extern "C" fn dev_memory(_: ll::ggml_backend_dev_t, free: *mut usize, total: *mut usize) {
    let (f, t) = host_memory();
    // SAFETY: ggml passes two writable out-pointers.
    unsafe {
        *free = f;
        *total = t;
    }
}

/// # Safety
/// ggml callback: `d` is a device made by `device.rs`; out-pointers are writable.
unsafe extern "C" fn dev_type(_: ll::ggml_backend_dev_t) -> ll::ggml_backend_dev_type {
    // GPU: the only type whose device can own a layer's KV cache (ACCEL cannot, CPU would
    // be taken for the CPU itself).
    ll::GGML_BACKEND_DEVICE_TYPE_GPU
}

/// # Safety
/// ggml callback: `d` is a device made by `device.rs`; out-pointers are writable.
unsafe extern "C" fn dev_props(d: ll::ggml_backend_dev_t, props: *mut ll::ggml_backend_dev_props) {
    guard("dev_props", (), || {
        // SAFETY: ggml passes one of our devices and a zeroed props struct to fill.
        unsafe {
            let p = &mut *props;
            p.name = dev_name(d);
            p.description = dev_description(d);
            dev_memory(d, &mut p.memory_free, &mut p.memory_total);
            p.type_ = dev_type(d);
            p.device_id = std::ptr::null();
            p.caps = ll::ggml_backend_dev_caps {
                async_: false,
                host_buffer: false,
                buffer_from_host_ptr: false,
                events: false,
                mmap_support: true,
            };
        }
    })
}

/// # Safety
/// ggml callback: `d` is a device made by `device.rs`; out-pointers are writable.
unsafe extern "C" fn dev_buffer_type(d: ll::ggml_backend_dev_t) -> ll::ggml_backend_buffer_type_t {
    // SAFETY: ggml passes one of our devices.
    unsafe { dev_ctx(d) }.buft.cast()
}

/// # Safety
/// ggml callback: `d` is a device made by `device.rs`; out-pointers are writable.
unsafe extern "C" fn dev_supports_buft(d: ll::ggml_backend_dev_t, b: ll::ggml_backend_buffer_type_t) -> bool {
    // SAFETY: ggml passes one of our devices.
    // Ours (the KV and compute buffers) and the CPU's (weights, inputs), which DSPARK0 reads
    // in place (see cpu.rs).
    b == unsafe { dev_ctx(d) }.buft.cast() || super::cpu::supports_buft(b)
}

pub use crate::kv::Stats;

/// Runs `make` (which creates a llama.cpp context on DSpark device `dev`) and returns what
/// it made with the cells of each model layer's KV cache (K) that it allocated there, as
/// `cells[layer]` (0 for a layer not on `dev`): a layer that attends a sliding window keeps
/// a ring of fewer cells than the context. Caches of other contexts on `dev` are not counted.
pub fn layer_cells<T>(dev: ll::ggml_backend_dev_t, make: impl FnOnce() -> T) -> (T, Vec<usize>) {
    let ours = registry_obj().devices.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|d| d.0.cast() == dev);
    // SAFETY: `dev` is one of ours when `ours`.
    let entries = || if ours { unsafe { dev_ctx(dev) }.entries() } else { Vec::new() };
    let before: Vec<*const KvEntry> = entries().iter().map(Arc::as_ptr).collect();
    let made = make();
    let mut cells = Vec::new();
    for e in entries().into_iter().filter(|e| !before.contains(&Arc::as_ptr(e))) {
        if let (Some(l), true) = (e.layer, e.is_k) {
            if cells.len() <= l {
                cells.resize(l + 1, 0);
            }
            cells[l] += e.cells();
        }
    }
    (made, cells)
}

impl Stats {
    /// The figures now, all DSpark devices together.
    pub fn now() -> Stats {
        let devs: Vec<Dev> = registry_obj().devices.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut s = Stats::default();
        for d in devs {
            s.merge(&Stats::of(d.0.cast()));
        }
        s
    }

    /// The figures of the KV caches allocated from one DSpark device (as [`register`]
    /// returns it); zero for any other device.
    pub fn of(dev: ll::ggml_backend_dev_t) -> Stats {
        let mut s = Stats::default();
        let ours = registry_obj().devices.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|d| d.0.cast() == dev);
        if !ours {
            return s;
        }
        // SAFETY: checked above that `dev` is one of ours.
        let ctx = unsafe { dev_ctx(dev) };
        s.attn_calls = ctx.attn_calls.load(Ordering::Relaxed);
        s.graphs = ctx.graphs.load(Ordering::Relaxed);
        s.add_select(&ctx.select);
        ctx.entries().iter().for_each(|e| s.add_entry(e));
        if let Some(b) = ctx.budget.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            s.add_tier(&b.tier);
        }
        s
    }

    /// The figures of the KV caches in one buffer (zero for a buffer that is not DSpark's).
    ///
    /// # Safety
    /// `buf` must be NULL or a live ggml buffer.
    pub unsafe fn of_buffer(buf: ll::ggml_backend_buffer_t) -> Stats {
        let mut s = Stats::default();
        // SAFETY: NULL or a live buffer (caller).
        unsafe { buffer::entries_of(buf) }.iter().for_each(|e| s.add_entry(e));
        s
    }

    fn add_entry(&mut self, e: &KvEntry) {
        let store = e.read();
        self.add_pages(&store);
        self.cells += store.cells_in_use() as u64;
        self.elems += (store.cells_in_use() * store.row_len()) as u64;
    }
}
