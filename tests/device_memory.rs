//! The DSpark memory layer on the real default model: a KV whose attention DSpark declines
//! stays exact, pages of removed tokens are known, a failed KV surfaces as a failed decode
//! and clears, and configurations never mix across contexts and threads.

use dspark::cli::{model_path, text};
use dspark::ggml::{self, Config, Stats};
use dspark::llama::{Context, CtxParams, KvType, Model, Placement};

fn prompt(model: &Model, n: usize) -> Vec<i32> {
    let t = model.tokenize(&text::default_text().unwrap(), true).unwrap();
    t[..n].to_vec()
}

fn dspark_model(cfg: Config) -> Model {
    Model::load(&model_path(None), Placement::Offload(vec![ggml::register(cfg)])).unwrap()
}

fn k4v4() -> Config {
    Config::default().with_format_name("k4v4").unwrap()
}

/// Logits of the last token after decoding `toks` in one context of 512 cells.
fn last_logits(model: &Model, toks: &[i32]) -> Vec<f32> {
    let mut ctx = Context::new(model, &CtxParams::new(512, 2, KvType::F16)).unwrap();
    ctx.decode(toks, 0, 0, false).unwrap();
    ctx.logits(-1).to_vec()
}

/// When DSpark declines attention (here forced with `cpu_attention`; an odd head size does
/// the same), nothing tells it how K/V rows split into heads: the rows must stay exact, so
/// llama.cpp's CPU kernel, reading them back through the buffer, computes what it computes
/// on its own f16 cache. (Guessing a head size and compressing would change the logits.)
#[test]
fn kv_of_declined_attention_stays_exact_f16() {
    let stock = Model::load(&model_path(None), Placement::Cpu).unwrap();
    let toks = prompt(&stock, 300);
    let want = last_logits(&stock, &toks);
    let model = dspark_model(Config { cpu_attention: true, ..k4v4() });
    let got = last_logits(&model, &toks);
    assert_eq!(want, got, "k4v4 with attention declined must equal stock f16 bit for bit");
    assert_eq!(Stats::of(model.devices()[0]).pages_compressed, 0);
}

/// llama.cpp never tells the buffer about seq_rm, but the attention mask does: the pages of
/// removed tokens are the ones no query sees.
#[test]
fn pages_of_removed_tokens_are_seen_by_no_query() {
    let model = dspark_model(Config { window: 64, ..k4v4() });
    let dev = model.devices()[0];
    let toks = prompt(&model, 320);
    let mut ctx = Context::new(&model, &CtxParams::new(512, 2, KvType::F16)).unwrap();
    ctx.decode(&toks, 0, 0, false).unwrap();
    ctx.decode(&toks[..1], 320, 0, false).unwrap();
    assert_eq!(Stats::of(dev).pages_unseen, 0, "every page holds live tokens");
    // Positions 100..200 live in cells 100..200: page 2 (cells 128..191) lies inside.
    assert!(ctx.seq_rm(0, 100, 200));
    ctx.decode(&toks[1..2], 321, 0, false).unwrap();
    let layers = model.n_layer() as u64;
    assert_eq!(Stats::of(dev).pages_unseen, 2 * layers, "one K and one V page per layer");
}

/// A KV whose content can no longer be trusted makes llama_decode fail (rather than compute
/// on wrong data) until the cache is cleared.
#[test]
fn a_failed_kv_fails_decode_until_cleared() {
    let model = dspark_model(Config { window: 96, ..k4v4() });
    let dev = model.devices()[0];
    let toks = prompt(&model, 64);
    let mut ctx = Context::new(&model, &CtxParams::new(256, 2, KvType::F16)).unwrap();
    ctx.decode(&toks, 0, 0, false).unwrap();
    // SAFETY: a device of ours with a live context.
    unsafe { ggml::fail_device_kv(dev, "injected I/O error") };
    assert!(ctx.decode(&toks[..1], 64, 0, false).is_err(), "decode on an unreliable KV must fail");
    ctx.clear();
    ctx.decode(&toks, 0, 0, false).expect("after clear the cache works again");
}

/// Two formats in one process, contexts created from two threads at once: each context's KV
/// has its own device's format (bits per element tell them apart).
#[test]
fn formats_never_mix_between_contexts_created_concurrently() {
    let (m8, m4) = (dspark_model(Config::default().with_format_name("k8v8").unwrap()), dspark_model(k4v4()));
    let toks = prompt(&m8, 600);
    std::thread::scope(|s| {
        for m in [&m8, &m4] {
            let toks = &toks;
            s.spawn(move || {
                for _ in 0..3 {
                    let mut ctx = Context::new(m, &CtxParams::new(1024, 1, KvType::F16)).unwrap();
                    ctx.decode(toks, 0, 0, false).unwrap();
                }
            });
        }
    });
    // Contexts are gone; make one of each again and compare their measured bits.
    let bits = |m: &Model| {
        let mut ctx = Context::new(m, &CtxParams::new(1024, 2, KvType::F16)).unwrap();
        ctx.decode(&toks, 0, 0, false).unwrap();
        Stats::of(m.devices()[0]).bits_per_elem()
    };
    // 600 cells in 10 pages: 4 stay f16 (the sink page and the three written within the last
    // 128 rows), 6 are compressed at the format's bits (8.5 or 4.5 at head size 64, and a
    // 68-byte centroid per head and page).
    let want = |b: f64| (4.0 * 64.0 * 16.0 + 6.0 * 64.0 * (b + 68.0 * 8.0 / (64.0 * 64.0))) / 600.0;
    let (b8, b4) = (bits(&m8), bits(&m4));
    assert!((b8 - want(8.5)).abs() < 1e-9 && (b4 - want(4.5)).abs() < 1e-9, "k8v8 {b8} bits, k4v4 {b4} bits");
}

/// llama.cpp walks ggml's device list, which has no lock, whenever it loads a model or
/// creates a context. A new configuration must leave that list alone: when each one was
/// added to it, a test binary died with SIGSEGV (a test registered a configuration while
/// others loaded models), and here the count below grew.
#[test]
fn registering_configurations_while_models_load_leaves_ggml_device_list_alone() {
    use llama_cpp_sys_2 as ll;
    dspark::llama::init();
    // SAFETY: a plain query of ggml's list.
    let listed = || unsafe { ll::ggml_backend_dev_count() };
    let before = listed();
    std::thread::scope(|s| {
        s.spawn(|| {
            for w in 0..64 {
                ggml::register(Config { window: 100_000 + w, ..k4v4() });
            }
        });
        let m = Model::load(&model_path(None), Placement::Cpu).unwrap();
        drop(Context::new(&m, &CtxParams::new(256, 1, KvType::F16)).unwrap());
    });
    assert_eq!(listed(), before, "ggml's device list changed");
    // ggml reaches every one of them through DSpark's registry.
    let ours = dspark::llama::devices().into_iter().filter(|(name, _)| name.starts_with("DSPARK")).count();
    assert!(ours >= 64, "{ours} DSpark devices listed by their registry");
}

/// llama.cpp's parameter fitting (`--fit on`, the default of its tools) loads the model with
/// `no_alloc` and builds a context whose KV tensors sit in a zero-size placeholder buffer;
/// the scheduler then asks DSpark whether it can run SET_ROWS into them. Answering from the
/// store (which a placeholder does not have) made ggml abort with "pre-allocated tensor in
/// a buffer that cannot run the operation".
#[test]
fn parameter_fitting_with_placeholder_kv_buffers_works() {
    use llama_cpp_sys_2 as ll;
    dspark::llama::init();
    let mut devs = [ggml::register(k4v4()), std::ptr::null_mut()];
    let path = std::ffi::CString::new(model_path(None).to_string_lossy().as_bytes()).unwrap();
    // SAFETY: plain-data params; devs and path outlive the calls; everything made is freed.
    unsafe {
        let mut mp = ll::llama_model_default_params();
        mp.devices = devs.as_mut_ptr();
        mp.n_gpu_layers = -1;
        mp.no_alloc = true;
        mp.load_mode = ll::LLAMA_LOAD_MODE_NONE; // as common/fit.cpp
        let model = ll::llama_model_load_from_file(path.as_ptr(), mp);
        assert!(!model.is_null());
        let mut cp = ll::llama_context_default_params();
        cp.n_ctx = 4096;
        cp.flash_attn_type = ll::LLAMA_FLASH_ATTN_TYPE_ENABLED;
        let ctx = ll::llama_init_from_model(model, cp);
        assert!(!ctx.is_null(), "a no_alloc context (what --fit measures) could not be created");
        ll::llama_free(ctx);
        ll::llama_model_free(model);
    }
}

/// DSPARK0 runs whole graphs: every op that does not touch the KV runs on its embedded CPU
/// backend, reading the weights where llama.cpp keeps them, so llama.cpp's scheduler makes
/// one split per ubatch (it made two per layer when DSPARK0 took only the KV ops).
#[test]
fn a_prefill_and_a_decode_ubatch_are_one_split_each() {
    // A window of its own: a device of its own, whose counters no other test moves.
    let model = dspark_model(Config { window: 112, ..k4v4() });
    let dev = model.devices()[0];
    let toks = prompt(&model, 300);
    let mut ctx = Context::new(&model, &CtxParams::new(512, 2, KvType::F16)).unwrap();
    let before = Stats::of(dev);
    ctx.decode(&toks, 0, 0, false).unwrap();
    let prefill = Stats::of(dev);
    ctx.decode(&toks[..1], 300, 0, false).unwrap();
    let decode = Stats::of(dev);
    let layers = model.n_layer() as u64;
    assert_eq!(prefill.attn_calls - before.attn_calls, layers, "DSpark's attention ran on every layer");
    assert_eq!(prefill.graphs - before.graphs, 1, "a 300-token prefill ubatch is one split");
    assert_eq!(decode.graphs - prefill.graphs, 1, "a decode ubatch is one split");
}
