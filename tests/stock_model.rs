//! End to end on the real default model through stock llama.cpp.

use std::path::PathBuf;

use dspark::cli::backend::{BackendSpec, Runner};
use dspark::cli::bench::{run_bench, BenchArgs};
use dspark::cli::{model_path, second_model_path};
use dspark::cli::run::generate;
use dspark::llama::{Context, CtxParams, KvType, Model, Placement};

fn model() -> Model {
    Model::load(&model_path(None), Placement::Cpu).expect("default model missing: run `bash scripts/setup.sh`")
}

fn greedy(model: &Model, prompt: &str, n: usize) -> Vec<i32> {
    let mut ctx = Context::new(model, &CtxParams::new(256, 2, KvType::F16)).unwrap();
    let toks = model.tokenize(prompt, true).unwrap();
    generate(&mut ctx, &toks, n, None, |_| {}).unwrap()
}

#[test]
fn greedy_decode_is_deterministic_and_sensible() {
    let m = model();
    assert_eq!((m.n_layer(), m.n_head(), m.n_head_kv(), m.head_dim()), (30, 9, 3, 64));
    let a = greedy(&m, "The capital of France is", 16);
    let b = greedy(&m, "The capital of France is", 16);
    assert_eq!(a.len(), 16);
    assert_eq!(a, b, "greedy decode must be deterministic");
    let text: String = a.iter().map(|&t| String::from_utf8_lossy(&m.token_bytes(t)).into_owned()).collect();
    assert!(text.contains("Paris"), "unexpected continuation: {text:?}");
}

/// The KV cache size, in MiB, that llama.cpp itself logs (`llama_kv_cache: CPU KV buffer
/// size = X MiB`: the size of the ggml buffer it allocated, to 2 decimals) for each context
/// that `f` creates on this thread.
fn llama_kv_buffer_mib(f: impl FnOnce()) -> Vec<f64> {
    let ((), log) = dspark::llama::capture_log(f);
    log.iter()
        .filter(|l| l.contains("llama_kv_cache") && l.contains("KV buffer size ="))
        .map(|l| {
            let v = l.split("KV buffer size =").nth(1).and_then(|r| r.trim().strip_suffix("MiB")).map(str::trim);
            v.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("cannot parse {l:?}"))
        })
        .collect()
}

/// `bytes` matches llama.cpp's figure printed with `%.2f` MiB.
fn matches_logged_mib(bytes: usize, logged: f64) -> bool {
    (bytes as f64 / (1024.0 * 1024.0) - logged).abs() <= 0.005 + 1e-9
}

/// The KV bytes DSpark reports for stock configurations (Runner::kv_bytes, the figure `dspark
/// bench` prints) against the buffers llama.cpp itself allocates, for two KV types and context
/// sizes that llama.cpp pads, on the default model and on the second one, whose sliding-window
/// layers get a cache of their own (a ring of 1024 cells at n_ctx 3000).
#[test]
fn stock_kv_bytes_match_llama_cpp_own_buffers() {
    for (path, sizes) in [(model_path(None), [300, 1000]), (second_model_path(), [1000, 3000])] {
        let r = Runner::new(path.clone());
        for kv in [KvType::F16, KvType::Q4_0] {
            for n_ctx in sizes {
                let spec = BackendSpec::Stock(kv);
                r.model(&spec).unwrap();
                let mut ours = 0;
                let logged = llama_kv_buffer_mib(|| {
                    let ctx = r.context(&spec, n_ctx, 2).unwrap();
                    ours = r.kv_bytes(&ctx, ctx.n_ctx());
                });
                let what = format!("{} {kv:?} n_ctx {n_ctx}", path.display());
                assert!(!logged.is_empty(), "{what}: llama.cpp logged no KV buffer");
                let total: f64 = logged.iter().sum();
                assert!(
                    (ours as f64 / 1048576.0 - total).abs() <= 0.005 * logged.len() as f64 + 1e-9,
                    "{what}: DSpark says {ours} bytes ({:.3} MiB), llama.cpp allocated {logged:?} MiB",
                    ours as f64 / 1048576.0
                );
            }
        }
    }
}

#[test]
fn bench_small_depth_gives_sane_figures() {
    let args = BenchArgs {
        model: None,
        backends: "stock:f16,stock:q4_0".into(),
        depths: vec![64],
        decode: 4,
        prompt_at_depth: 16,
        poll: 50,
        threads: Some(2),
        reps: 1,
        json: None,
        file: None,
        tier: Default::default(),
        remote: Default::default(),
        child: false,
        exe: Some(env!("CARGO_BIN_EXE_dspark").into()),
    };
    let r = run_bench(&args).unwrap();
    assert_eq!(r.results.len(), 2);
    for x in &r.results {
        assert!(x.prefill_tps > 0.0 && x.prefill_tps.is_finite(), "{x:?}");
        assert!(x.decode_tps > 0.0 && x.decode_tps.is_finite(), "{x:?}");
        assert!(x.prompt_at_depth_tps > 0.0 && x.prompt_at_depth_tps.is_finite(), "{x:?}");
        assert!(x.kv_bytes > 0 && x.peak_rss_bytes > x.kv_bytes, "{x:?}");
    }
    let f16 = &r.results[0];
    assert!((15.5..=16.5).contains(&f16.kv_bits_per_elem), "{f16:?}");
    // What llama.cpp allocates for the bench's context (depth + decode cells, padded by it).
    let logged = llama_kv_buffer_mib(|| {
        Context::new(&model(), &CtxParams::new(64 + 4, 2, KvType::F16)).unwrap();
    });
    assert!(logged.len() == 1 && matches_logged_mib(f16.kv_bytes as usize, logged[0]), "{f16:?} vs llama.cpp {logged:?} MiB");
    let q4 = &r.results[1];
    assert!((q4.kv_bits_per_elem - 4.5).abs() < 1e-9 && q4.kv_bytes * 3 < f16.kv_bytes, "{q4:?}");
}

#[test]
fn missing_or_corrupt_model_is_a_clear_error() {
    let err = Model::load(&PathBuf::from("/nonexistent/model.gguf"), Placement::Cpu).err().unwrap().to_string();
    assert!(err.contains("cannot open model") && err.contains("setup.sh"), "{err}");

    let dir = std::env::temp_dir().join(format!("dspark-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_gguf = dir.join("not.gguf");
    std::fs::write(&not_gguf, b"hello, this is not a model").unwrap();
    let err = Model::load(&not_gguf, Placement::Cpu).err().unwrap().to_string();
    assert!(err.contains("not a GGUF"), "{err}");

    // A real header, cut short: llama.cpp itself must refuse it without crashing us.
    let full = std::fs::read(model_path(None)).unwrap();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let err = Model::load(&truncated, Placement::Cpu).err().unwrap().to_string();
    assert!(err.contains("could not load"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
