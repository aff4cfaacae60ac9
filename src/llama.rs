//! A small safe wrapper over the llama.cpp C API that `llama-cpp-sys-2` binds.
//!
//! It holds just what DSpark's CLI and tests need: load a model, tokenize, create a context
//! with a chosen KV type, decode batches and read logits. Every raw pointer stays in this file.

use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Once, OnceLock};

use anyhow::{bail, Context as _, Result};
use llama_cpp_sys_2 as sys;

/// The exact llama-cpp-sys-2 release DSpark is built against (see Cargo.toml).
pub const LLAMA_CPP_SYS_VERSION: &str = "0.1.161";

static INIT: Once = Once::new();
static VERBOSE: OnceLock<bool> = OnceLock::new();

thread_local! {
    /// Log lines llama.cpp writes on this thread while [`capture_log`] runs.
    static CAPTURE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Runs `f` and returns what llama.cpp logged on this thread meanwhile, at any level. llama.cpp
/// reports some facts only in its log (the KV caches it allocated, for one).
/// Captures nest: an outer capture also gets the lines of an inner one.
pub fn capture_log<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let outer = CAPTURE.with(|c| c.borrow_mut().replace(Vec::new()));
    let v = f();
    let lines = CAPTURE.with(|c| {
        let mut c = c.borrow_mut();
        let lines = c.take().unwrap_or_default();
        *c = outer.map(|mut o| {
            o.extend(lines.iter().cloned());
            o
        });
        lines
    });
    (v, lines)
}

/// Initialises llama.cpp once. Its log goes to stderr only when `DSPARK_VERBOSE` is set,
/// apart from warnings and errors, which are always shown.
pub fn init() {
    INIT.call_once(|| {
        let _ = VERBOSE.set(std::env::var_os("DSPARK_VERBOSE").is_some());
        // SAFETY: plain initialisation calls with no arguments but a static callback.
        unsafe {
            sys::llama_log_set(Some(log_callback), std::ptr::null_mut());
            sys::llama_backend_init();
        }
        // Before any model is loaded: ggml's device list must not change while one loads.
        crate::ggml::list_registry();
    });
}

/// # Safety
/// llama.cpp log callback: `text` is NULL or a NUL-terminated string valid for the call.
unsafe extern "C" fn log_callback(
    level: sys::ggml_log_level,
    text: *const std::os::raw::c_char,
    _user: *mut std::os::raw::c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string that lives for this call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    // try_with: the callback may run while this thread's locals are being torn down.
    let _ = CAPTURE.try_with(|c| c.borrow_mut().as_mut().map(|lines| lines.push(text.to_string())));
    let loud = level == sys::GGML_LOG_LEVEL_WARN || level == sys::GGML_LOG_LEVEL_ERROR;
    if loud || *VERBOSE.get().unwrap_or(&false) {
        eprint!("{text}");
    }
}

/// ggml's version string and commit, e.g. "0.26.0 (abc1234)".
pub fn ggml_version() -> String {
    init();
    // SAFETY: both return pointers to static NUL-terminated strings.
    unsafe {
        format!(
            "{} ({})",
            CStr::from_ptr(sys::ggml_version()).to_string_lossy(),
            CStr::from_ptr(sys::ggml_commit()).to_string_lossy()
        )
    }
}

/// llama.cpp's own feature line ("CPU : SSE3 = 1 | AVX2 = 1 | ...").
pub fn system_info() -> String {
    init();
    // SAFETY: returns a pointer to a static NUL-terminated buffer.
    unsafe { CStr::from_ptr(sys::llama_print_system_info()).to_string_lossy().trim().to_string() }
}

/// Whether the linked ggml CPU backend was compiled with AVX-512 (GGML_NATIVE on this CPU).
pub fn ggml_has_avx512() -> bool {
    system_info().contains("AVX512 = 1")
}

/// Every device of every registry ggml lists: (name, description). A registry's own list
/// includes the DSpark devices that ggml's device list leaves out (`ggml::list_registry`).
pub fn devices() -> Vec<(String, String)> {
    init();
    // SAFETY: indices below the counts are valid; names are static strings.
    unsafe {
        (0..sys::ggml_backend_reg_count())
            .map(|r| sys::ggml_backend_reg_get(r))
            .flat_map(|reg| (0..sys::ggml_backend_reg_dev_count(reg)).map(move |i| sys::ggml_backend_reg_dev_get(reg, i)))
            .map(|d| {
                (
                    CStr::from_ptr(sys::ggml_backend_dev_name(d)).to_string_lossy().into_owned(),
                    CStr::from_ptr(sys::ggml_backend_dev_description(d)).to_string_lossy().into_owned(),
                )
            })
            .collect()
    }
}

/// A KV cache element type that stock llama.cpp supports on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    /// The exact reference: f32 K and V, attention without flash attention (whose CPU kernel
    /// rounds the query to f16 and, for f16 V, sums the output in f16). Not in [`Self::ALL`]:
    /// it is what the others are measured against, not a cache anyone would run.
    F32,
    F16,
    Q8_0,
    Q5_1,
    Q5_0,
    Iq4Nl,
    Q4_0,
}

impl KvType {
    pub const ALL: [KvType; 6] = [KvType::F16, KvType::Q8_0, KvType::Q5_1, KvType::Q5_0, KvType::Iq4Nl, KvType::Q4_0];

    pub fn parse(s: &str) -> Option<KvType> {
        Self::ALL.into_iter().chain([KvType::F32]).find(|t| t.name() == s)
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q5_1 => "q5_1",
            KvType::Q5_0 => "q5_0",
            KvType::Iq4Nl => "iq4_nl",
            KvType::Q4_0 => "q4_0",
        }
    }

    fn ggml(self) -> sys::ggml_type {
        match self {
            KvType::F32 => sys::GGML_TYPE_F32,
            KvType::F16 => sys::GGML_TYPE_F16,
            KvType::Q8_0 => sys::GGML_TYPE_Q8_0,
            KvType::Q5_1 => sys::GGML_TYPE_Q5_1,
            KvType::Q5_0 => sys::GGML_TYPE_Q5_0,
            KvType::Iq4Nl => sys::GGML_TYPE_IQ4_NL,
            KvType::Q4_0 => sys::GGML_TYPE_Q4_0,
        }
    }

    /// Stored bits per element, block scales included (f16 = 16, q8_0 = 8.5, q4_0 = 4.5).
    pub fn bits_per_elem(self) -> f64 {
        // SAFETY: pure functions of the type id.
        unsafe { 8.0 * sys::ggml_type_size(self.ggml()) as f64 / sys::ggml_blck_size(self.ggml()) as f64 }
    }

    /// Bytes of one row of `n` elements.
    pub fn row_bytes(self, n: usize) -> usize {
        // SAFETY: pure function; n is a multiple of the block size for every head size we accept.
        unsafe { sys::ggml_row_size(self.ggml(), n as i64) }
    }
}

/// Writes a copy of the GGUF at `src` with its weights in f16 to `dst`, by llama.cpp's
/// quantizer (through `<dst>.part`, so an interrupted run leaves no partial `dst`).
pub fn write_f16_copy(src: &Path, dst: &Path, threads: usize) -> Result<()> {
    init();
    check_model_file(src)?;
    let part = dst.with_extension("gguf.part");
    let c = |p: &Path| CString::new(p.to_string_lossy().as_bytes()).context("model path contains NUL");
    let (csrc, cpart) = (c(src)?, c(&part)?);
    // SAFETY: default params are plain data with null pointers for the optional tables;
    // both names are NUL-terminated and outlive the call.
    let (rc, log) = capture_log(|| unsafe {
        let mut p = sys::llama_model_quantize_default_params();
        p.ftype = sys::LLAMA_FTYPE_MOSTLY_F16;
        p.allow_requantize = true;
        p.nthread = threads as i32;
        sys::llama_model_quantize(csrc.as_ptr(), cpart.as_ptr(), &p)
    });
    if rc != 0 {
        let _ = std::fs::remove_file(&part);
        bail!("llama.cpp could not write an f16 copy of {}:\n{}", src.display(), log.join(""));
    }
    std::fs::rename(&part, dst).with_context(|| format!("cannot rename {} to {}", part.display(), dst.display()))
}

/// A loaded GGUF model.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    /// The devices its layers were offloaded to (empty: CPU only).
    devices: Vec<sys::ggml_backend_dev_t>,
}

// SAFETY: a llama_model is immutable after loading and llama.cpp shares it across contexts
// and threads.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

/// Which devices a model's layers go to.
pub enum Placement {
    /// Stock llama.cpp on the CPU backend only.
    Cpu,
    /// All layers offloaded to these devices (weights stay on the CPU when the device
    /// declines them), e.g. DSPARK0.
    Offload(Vec<sys::ggml_backend_dev_t>),
    /// All layers on these devices in these shares (llama.cpp's `--tensor-split`: one weight
    /// per device, any scale), e.g. remote DSPARK0s behind ggml-rpc.
    Split(Vec<sys::ggml_backend_dev_t>, Vec<f32>),
}

impl Model {
    pub fn load(path: &Path, placement: Placement) -> Result<Model> {
        init();
        check_model_file(path)?;
        let cpath = CString::new(path.to_string_lossy().as_bytes()).context("model path contains NUL")?;
        // The device list must stay alive during loading and be NULL-terminated.
        let (mut devs, mut split): (Vec<sys::ggml_backend_dev_t>, Vec<f32>) = match &placement {
            Placement::Cpu => (vec![], vec![]),
            Placement::Offload(d) => (d.clone(), vec![]),
            Placement::Split(d, s) => (d.clone(), s.clone()),
        };
        // SAFETY: a pure query.
        let max_devices = unsafe { sys::llama_max_devices() };
        if split.len() > max_devices {
            bail!("a tensor split over {} devices: llama.cpp takes at most {max_devices}", split.len());
        }
        // llama.cpp reads llama_max_devices() weights.
        let has_split = !split.is_empty();
        split.resize(max_devices, 0.0);
        devs.push(std::ptr::null_mut());
        // SAFETY: default params are plain data; devs and split outlive the call; cpath
        // is NUL-terminated.
        let ptr = unsafe {
            let mut p = sys::llama_model_default_params();
            p.devices = devs.as_mut_ptr();
            p.n_gpu_layers = match placement {
                Placement::Cpu => 0,
                Placement::Offload(_) | Placement::Split(..) => -1,
            };
            if has_split {
                p.tensor_split = split.as_ptr();
            }
            sys::llama_model_load_from_file(cpath.as_ptr(), p)
        };
        let ptr = NonNull::new(ptr)
            .with_context(|| format!("llama.cpp could not load {} (not a valid GGUF model?)", path.display()))?;
        devs.pop();
        Ok(Model { ptr, devices: devs })
    }

    /// The devices the layers were offloaded to (empty for the CPU).
    pub fn devices(&self) -> &[sys::ggml_backend_dev_t] {
        &self.devices
    }

    pub(crate) fn raw(&self) -> *mut sys::llama_model {
        self.ptr.as_ptr()
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: the model is valid while self lives.
        unsafe { sys::llama_model_get_vocab(self.raw()) }
    }

    pub fn n_layer(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_layer(self.raw()) as usize }
    }
    pub fn n_head(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_head(self.raw()) as usize }
    }
    pub fn n_head_kv(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_head_kv(self.raw()) as usize }
    }
    /// Tokens a sliding-window layer attends (0: no layer slides).
    pub fn n_swa(&self) -> usize {
        // SAFETY: valid model pointer.
        usize::try_from(unsafe { sys::llama_model_n_swa(self.raw()) }).unwrap_or(0)
    }
    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_embd(self.raw()) as usize }
    }
    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) as usize }
    }

    /// Head size of K and V (n_embd / n_head for the models we run).
    pub fn head_dim(&self) -> usize {
        self.meta("attention.key_length").and_then(|s| s.parse().ok()).unwrap_or(self.n_embd() / self.n_head())
    }

    /// A metadata value under the model's architecture prefix, e.g. "attention.key_length".
    pub fn meta(&self, key: &str) -> Option<String> {
        let arch = self.meta_raw("general.architecture")?;
        self.meta_raw(&format!("{arch}.{key}"))
    }

    fn meta_raw(&self, key: &str) -> Option<String> {
        let ckey = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        // SAFETY: buf is writable for its length; llama.cpp NUL-terminates within it.
        let n = unsafe { sys::llama_model_meta_val_str(self.raw(), ckey.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return None;
        }
        buf.truncate((n as usize).min(buf.len() - 1));
        String::from_utf8(buf).ok()
    }

    /// The model's `general.name`, if the GGUF has one.
    pub fn name(&self) -> Option<String> {
        self.meta_raw("general.name")
    }

    /// A one-line description, e.g. "llama 135M Q4_1".
    pub fn desc(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: as in meta_raw.
        let n = unsafe { sys::llama_model_desc(self.raw(), buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(n.clamp(0, 255) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Tokenizes `text`, adding BOS when the model wants it.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<i32>> {
        let len = i32::try_from(text.len()).context("text too long to tokenize")?;
        let mut toks = vec![0i32; text.len() + 8];
        // SAFETY: text is valid for len bytes; toks has room for toks.len() tokens.
        let mut n = unsafe {
            sys::llama_tokenize(self.vocab(), text.as_ptr().cast(), len, toks.as_mut_ptr(), toks.len() as i32, add_special, false)
        };
        if n < 0 {
            toks.resize((-n) as usize, 0);
            // SAFETY: as above, with the size llama.cpp asked for.
            n = unsafe {
                sys::llama_tokenize(self.vocab(), text.as_ptr().cast(), len, toks.as_mut_ptr(), toks.len() as i32, add_special, false)
            };
            if n < 0 {
                bail!("tokenization failed");
            }
        }
        toks.truncate(n as usize);
        Ok(toks)
    }

    /// The text of one token (raw bytes; may be a partial UTF-8 sequence).
    pub fn token_bytes(&self, tok: i32) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe { sys::llama_token_to_piece(self.vocab(), tok, buf.as_mut_ptr().cast(), buf.len() as i32, 0, false) };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    pub fn is_eog(&self, tok: i32) -> bool {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), tok) }
    }

    /// Bytes that stock llama.cpp allocates for a KV cache of `n_cells` cells of this type:
    /// every layer holds K and V rows of n_head_kv * head_dim elements for all cells.
    pub fn stock_kv_bytes(&self, kv: KvType, n_cells: usize) -> usize {
        self.n_layer() * n_cells * 2 * kv.row_bytes(self.n_head_kv() * self.head_dim())
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: we own the model; contexts borrow it and are dropped first.
        unsafe { sys::llama_model_free(self.raw()) }
    }
}

/// Rejects a path that is missing or is not a GGUF file before llama.cpp sees it.
fn check_model_file(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| {
        format!("cannot open model {}: run `bash scripts/setup.sh` to fetch the default model, or pass -m", path.display())
    })?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        bail!("{} is not a GGUF model file (bad magic)", path.display());
    }
    Ok(())
}

/// How to build a llama.cpp context.
#[derive(Clone, Debug)]
pub struct CtxParams {
    pub n_ctx: u32,
    /// Most tokens one `llama_decode` takes (2048, as llama.cpp's tools); llama.cpp splits a
    /// batch into ubatches of at most `n_ubatch` (512) tokens, the graphs it computes.
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_threads: i32,
    pub kv: KvType,
    pub n_seq_max: u32,
    /// Flash attention (default on). Off stores V transposed; DSpark then works, slowly,
    /// through its generic byte path while llama.cpp's CPU attention reads the KV.
    pub flash_attn: bool,
    /// Polling level (0–100) of the CPU thread pool attached to the context: how long its
    /// threads spin for the next graph before they sleep. 50, as llama.cpp's tools. A ggml
    /// built with OpenMP (this one) ignores it.
    pub poll: u32,
}

impl CtxParams {
    pub fn new(n_ctx: u32, n_threads: usize, kv: KvType) -> CtxParams {
        CtxParams { n_ctx, n_batch: 2048, n_ubatch: 512, n_threads: n_threads as i32, kv, n_seq_max: 1, flash_attn: true, poll: 50 }
    }
}

/// A llama.cpp context: the KV cache and the compute state for one model.
pub struct Context<'m> {
    ptr: NonNull<sys::llama_context>,
    kv: KvType,
    threadpool: *mut sys::ggml_threadpool,
    pub model: &'m Model,
    batch: sys::llama_batch,
    batch_cap: usize,
    kv_caches: Vec<KvCacheShape>,
}

/// One KV cache llama.cpp allocated for a context, as its log reports it: a model with
/// sliding-window layers gets two, the full-context layers' and the windowed layers' ring.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvCacheShape {
    pub bytes: f64,
    pub cells: usize,
    pub layers: usize,
}

impl KvCacheShape {
    /// Reads llama.cpp's `llama_kv_cache: size = 40.50 MiB (  2304 cells,  18 layers, 1/1
    /// seqs), K (f16): ...` lines.
    fn parse_log(lines: &[String]) -> Vec<KvCacheShape> {
        lines
            .iter()
            .filter_map(|l| {
                let rest = l.split_once("llama_kv_cache: size =")?.1;
                let (mib, rest) = rest.split_once("MiB (")?;
                let (cells, rest) = rest.split_once("cells,")?;
                let layers = rest.split_once("layers")?.0;
                Some(KvCacheShape {
                    bytes: mib.trim().parse::<f64>().ok()? * 1024.0 * 1024.0,
                    cells: cells.trim().parse().ok()?,
                    layers: layers.trim().parse().ok()?,
                })
            })
            .collect()
    }
}

impl<'m> Context<'m> {
    pub fn new(model: &'m Model, p: &CtxParams) -> Result<Context<'m>> {
        // SAFETY: default params are plain data; the model outlives the context ('m).
        let (ptr, log) = capture_log(|| unsafe {
            let mut c = sys::llama_context_default_params();
            c.n_ctx = p.n_ctx;
            c.n_batch = p.n_batch;
            c.n_ubatch = p.n_ubatch;
            c.n_seq_max = p.n_seq_max;
            c.n_threads = p.n_threads;
            c.n_threads_batch = p.n_threads;
            c.type_k = p.kv.ggml();
            c.type_v = p.kv.ggml();
            // Quantized V needs flash attention, and DSpark is built for it. f32 KV is the
            // exact reference: under flash attention llama.cpp casts f32 K and V to f16
            // (llama-graph.cpp, build_attn_mha), so it runs without.
            let fa = p.flash_attn && p.kv != KvType::F32;
            c.flash_attn_type = if fa { sys::LLAMA_FLASH_ATTN_TYPE_ENABLED } else { sys::LLAMA_FLASH_ATTN_TYPE_DISABLED };
            c.offload_kqv = true;
            // As llama.cpp's own tools (common_params): sliding-window layers keep only their
            // window. llama_context_default_params() says true, which sizes them for n_ctx.
            c.swa_full = false;
            c.no_perf = true;
            sys::llama_init_from_model(model.raw(), c)
        });
        let ptr = NonNull::new(ptr).context("llama.cpp could not create a context (out of memory or bad parameters?)")?;
        // A persistent CPU thread pool with the polling level of llama.cpp's tools, attached as
        // they attach it (common_threadpools::init). Without it ggml starts and joins its
        // threads on every graph. When DSpark runs the whole graph this pool has no work.
        // SAFETY: plain-data params; the pool is freed in Drop after the context.
        let threadpool = unsafe {
            let mut tp = sys::ggml_threadpool_params_default(p.n_threads);
            tp.poll = p.poll;
            let pool = sys::ggml_threadpool_new(&mut tp);
            if !pool.is_null() {
                sys::llama_attach_threadpool(ptr.as_ptr(), pool, pool);
            }
            pool
        };
        let batch_cap = p.n_batch as usize;
        // SAFETY: allocates a batch of batch_cap tokens with one seq id each.
        let batch = unsafe { sys::llama_batch_init(batch_cap as i32, 0, 1) };
        Ok(Context { ptr, kv: p.kv, threadpool, model, batch, batch_cap, kv_caches: KvCacheShape::parse_log(&log) })
    }

    pub(crate) fn raw(&self) -> *mut sys::llama_context {
        self.ptr.as_ptr()
    }

    /// The KV element type llama.cpp was given.
    pub fn kv_type(&self) -> KvType {
        self.kv
    }

    /// Bytes llama.cpp allocates for the KV of a context of `n_cells` cells (its n_ctx padded to
    /// 256) with this one's other parameters, from the caches it allocated for this context: a
    /// sliding-window cache of fewer cells keeps its size. None when llama.cpp reported none.
    pub fn kv_cache_bytes(&self, n_cells: usize) -> Option<u64> {
        if self.kv_caches.is_empty() {
            return None;
        }
        Some(self.kv_caches.iter().map(|c| c.bytes * c.cells.min(n_cells) as f64 / c.cells as f64).sum::<f64>() as u64)
    }

    /// Cells in the KV cache (llama.cpp pads n_ctx).
    pub fn n_ctx(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::llama_n_ctx(self.raw()) as usize }
    }

    /// Drops all KV cache contents.
    pub fn clear(&mut self) {
        // SAFETY: valid context and its memory handle.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.raw()), true) }
    }

    /// Removes positions [p0, p1) of `seq` (p1 < 0: to the end).
    pub fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        // SAFETY: valid context and its memory handle.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.raw()), seq, p0, p1) }
    }

    /// Copies positions [p0, p1) of `src` into `dst`.
    pub fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) {
        // SAFETY: valid context and its memory handle.
        unsafe { sys::llama_memory_seq_cp(sys::llama_get_memory(self.raw()), src, dst, p0, p1) }
    }

    /// Shifts positions [p0, p1) of `seq` by `delta` (p1 < 0: to the end). The K-shift runs
    /// on the next decode.
    pub fn seq_add(&mut self, seq: i32, p0: i32, p1: i32, delta: i32) {
        // SAFETY: valid context and its memory handle.
        unsafe { sys::llama_memory_seq_add(sys::llama_get_memory(self.raw()), seq, p0, p1, delta) }
    }

    /// Decodes one batch of (token, position, sequence) entries, at most n_batch, with
    /// logits for every entry.
    pub fn decode_entries(&mut self, entries: &[(i32, usize, i32)]) -> Result<()> {
        if entries.len() > self.batch_cap {
            bail!("batch of {} entries exceeds n_batch {}", entries.len(), self.batch_cap);
        }
        self.fill_batch(entries.iter().map(|&(t, pos, seq)| (t, pos, seq, true)));
        let rc = self.decode_batch();
        if rc != 0 {
            bail!("llama_decode failed with code {rc}");
        }
        Ok(())
    }

    /// Decodes `tokens` at positions start_pos.. of sequence `seq`, in batches of at most
    /// n_batch. Logits are kept for the last token, or for every token when `all_logits`
    /// (then only one batch may be given).
    pub fn decode(&mut self, tokens: &[i32], start_pos: usize, seq: i32, all_logits: bool) -> Result<()> {
        if all_logits && tokens.len() > self.batch_cap {
            bail!("all_logits needs tokens.len() <= n_batch");
        }
        for (ci, chunk) in tokens.chunks(self.batch_cap).enumerate() {
            let last_chunk = (ci + 1) * self.batch_cap >= tokens.len();
            let pos0 = start_pos + ci * self.batch_cap;
            let n = chunk.len();
            self.fill_batch(chunk.iter().enumerate().map(|(i, &t)| (t, pos0 + i, seq, all_logits || (last_chunk && i + 1 == n))));
            let rc = self.decode_batch();
            if rc != 0 {
                bail!("llama_decode failed with code {rc} (KV cache full?)");
            }
        }
        Ok(())
    }

    /// Decodes the filled batch and waits for the devices to finish it: an asynchronous
    /// backend (ggml-rpc) returns from llama_decode before its graph has run, and a timing
    /// must not stop there (llama-bench synchronizes after each decode too).
    fn decode_batch(&mut self) -> i32 {
        // SAFETY: fill_batch left only valid entries in the batch; the context is valid.
        unsafe {
            let rc = sys::llama_decode(self.raw(), self.batch);
            sys::llama_synchronize(self.raw());
            rc
        }
    }

    /// Fills the batch with (token, position, sequence, wants logits) entries; the caller
    /// keeps their number within batch_cap.
    fn fill_batch(&mut self, entries: impl Iterator<Item = (i32, usize, i32, bool)>) {
        let b = &mut self.batch;
        b.n_tokens = 0;
        for (i, (t, pos, seq, logits)) in entries.enumerate() {
            assert!(i < self.batch_cap, "batch overflow");
            // SAFETY: i < batch_cap, the capacity llama_batch_init allocated; seq_id[i]
            // points at an array of one seq id.
            unsafe {
                *b.token.add(i) = t;
                *b.pos.add(i) = pos as i32;
                *b.n_seq_id.add(i) = 1;
                **b.seq_id.add(i) = seq;
                *b.logits.add(i) = logits as i8;
            }
            b.n_tokens += 1;
        }
    }

    /// Logits of the i-th token of the last batch (-1: the last one with logits).
    pub fn logits(&self, i: i32) -> &[f32] {
        let n = self.model.n_vocab();
        // SAFETY: llama.cpp returns n_vocab floats that stay valid until the next decode,
        // which needs &mut self.
        unsafe {
            let p = sys::llama_get_logits_ith(self.raw(), i);
            assert!(!p.is_null(), "no logits for token {i}");
            std::slice::from_raw_parts(p, n)
        }
    }

    /// Serialised state (KV cache included).
    pub fn state_save(&mut self) -> Vec<u8> {
        // SAFETY: the buffer has the size llama.cpp asked for.
        unsafe {
            let n = sys::llama_state_get_size(self.raw());
            let mut buf = vec![0u8; n];
            let w = sys::llama_state_get_data(self.raw(), buf.as_mut_ptr(), n);
            buf.truncate(w);
            buf
        }
    }

    pub fn state_load(&mut self, data: &[u8]) -> Result<()> {
        // SAFETY: data is valid for its length.
        let r = unsafe { sys::llama_state_set_data(self.raw(), data.as_ptr(), data.len()) };
        if r == 0 {
            bail!("llama_state_set_data rejected the state");
        }
        Ok(())
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the batch and the context.
        unsafe {
            sys::llama_batch_free(self.batch);
            sys::llama_free(self.raw());
            if !self.threadpool.is_null() {
                sys::ggml_threadpool_free(self.threadpool);
            }
        }
    }
}

/// Index of the largest logit.
pub fn argmax(logits: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_lines_of_an_iswa_context_parse() {
        let log: Vec<String> = [
            "llama_kv_cache_iswa: creating non-SWA KV cache, size = 8448 cells\n",
            "llama_kv_cache:        CPU KV buffer size =    24.75 MiB\n",
            "llama_kv_cache: size =   24.75 MiB (  8448 cells,   3 layers,  1/1 seqs), K (f16):   12.38 MiB, V (f16):   12.38 MiB\n",
            "llama_kv_cache: size =   15.00 MiB (  1024 cells,  15 layers,  1/1 seqs), K (f16):    7.50 MiB, V (f16):    7.50 MiB\n",
        ]
        .map(String::from)
        .to_vec();
        let caches = KvCacheShape::parse_log(&log);
        let mib = 1024.0 * 1024.0;
        assert_eq!(caches, [KvCacheShape { bytes: 24.75 * mib, cells: 8448, layers: 3 }, KvCacheShape { bytes: 15.0 * mib, cells: 1024, layers: 15 }]);
    }
}
