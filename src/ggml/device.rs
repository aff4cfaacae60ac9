//! DSPARK0's registry, device and buffer type: process-wide objects that ggml keeps raw
//! pointers to, so they are created once and never freed.

use std::ffi::c_char;
use std::sync::OnceLock;

use llama_cpp_sys_2 as ll;

use super::buffer::{self, KV_BUFFERS};
use super::{backend, guard, sys, Config};

struct Objects {
    reg: *mut sys::ggml_backend_reg,
    dev: *mut sys::ggml_backend_device,
    buft: *mut sys::ggml_backend_buffer_type,
}

// SAFETY: the objects are immutable after creation and only handed to ggml, which shares
// them across threads itself.
unsafe impl Send for Objects {}
unsafe impl Sync for Objects {}

static OBJECTS: OnceLock<Objects> = OnceLock::new();

fn objects() -> &'static Objects {
    OBJECTS.get_or_init(|| {
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
        let dev = Box::into_raw(Box::new(sys::ggml_backend_device {
            iface: device_iface(),
            reg: reg.cast(),
            context: std::ptr::null_mut(),
        }));
        let buft = Box::into_raw(Box::new(sys::ggml_backend_buffer_type {
            iface: buffer::buft_iface(),
            device: dev.cast(),
            context: std::ptr::null_mut(),
        }));
        Objects { reg, dev, buft }
    })
}

/// DSPARK0's buffer type.
pub(crate) fn buft() -> ll::ggml_backend_buffer_type_t {
    objects().buft.cast()
}

/// The DSPARK0 device handle (also before registration).
pub fn dev() -> ll::ggml_backend_dev_t {
    objects().dev.cast()
}

/// The registry handle, for the plugin entry point.
pub(crate) fn reg() -> ll::ggml_backend_reg_t {
    objects().reg.cast()
}

/// Registers DSPARK0 with ggml (once; later calls only update the configuration) and
/// returns the device, to pass in `llama_model_params.devices`.
pub fn register(config: Config) -> ll::ggml_backend_dev_t {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    super::set_config(config);
    crate::llama::init();
    REGISTERED.call_once(|| {
        // SAFETY: the registry object lives for the whole process.
        unsafe { ll::ggml_backend_register(reg()) };
    });
    dev()
}

unsafe extern "C" fn reg_name(_: ll::ggml_backend_reg_t) -> *const c_char {
    c"DSPARK".as_ptr()
}

unsafe extern "C" fn reg_device_count(_: ll::ggml_backend_reg_t) -> usize {
    1
}

unsafe extern "C" fn reg_device(_: ll::ggml_backend_reg_t, index: usize) -> ll::ggml_backend_dev_t {
    if index == 0 {
        dev()
    } else {
        std::ptr::null_mut()
    }
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

unsafe extern "C" fn dev_name(_: ll::ggml_backend_dev_t) -> *const c_char {
    c"DSPARK0".as_ptr()
}

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

unsafe extern "C" fn dev_memory(_: ll::ggml_backend_dev_t, free: *mut usize, total: *mut usize) {
    let (f, t) = host_memory();
    *free = f;
    *total = t;
}

unsafe extern "C" fn dev_type(_: ll::ggml_backend_dev_t) -> ll::ggml_backend_dev_type {
    // GPU: the only type whose device can own a layer's KV cache (ACCEL cannot, CPU would
    // be taken for the CPU itself).
    ll::GGML_BACKEND_DEVICE_TYPE_GPU
}

unsafe extern "C" fn dev_props(d: ll::ggml_backend_dev_t, props: *mut ll::ggml_backend_dev_props) {
    guard("dev_props", (), || {
        // SAFETY: ggml passes a zeroed props struct to fill.
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

unsafe extern "C" fn dev_buffer_type(_: ll::ggml_backend_dev_t) -> ll::ggml_backend_buffer_type_t {
    buft()
}

unsafe extern "C" fn dev_supports_buft(_: ll::ggml_backend_dev_t, b: ll::ggml_backend_buffer_type_t) -> bool {
    b == buft()
}

pub use crate::kv::Stats;

impl Stats {
    /// The figures now, all KV caches together.
    pub fn now() -> Stats {
        Self::collect(|_| true)
    }

    /// The figures of the KV caches created under one [`super::with_config`] owner id.
    pub fn of(owner: u64) -> Stats {
        Self::collect(|o| o == owner)
    }

    fn collect(keep: impl Fn(u64) -> bool) -> Stats {
        let mut s = Stats { attn_calls: backend::ATTN_CALLS.load(std::sync::atomic::Ordering::Relaxed), ..Stats::default() };
        let bufs = KV_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
        for &addr in bufs.iter() {
            // SAFETY: addresses are removed from KV_BUFFERS before their buffer is freed,
            // and the lock is held while we read.
            let ctx = unsafe { &*(addr as *const buffer::BufferCtx) };
            for e in ctx.kv_entries().iter().filter(|e| keep(e.owner)) {
                if let Some(store) = e.read().as_ref() {
                    s.add_pages(store);
                    s.cells += store.cells_in_use() as u64;
                    s.elems += (store.cells_in_use() * store.row_len()) as u64;
                }
            }
        }
        s
    }
}
