//! End to end on the real default model through stock llama.cpp.

use std::path::PathBuf;

use dspark::cli::bench::{run_bench, BenchArgs};
use dspark::cli::model_path;
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

#[test]
fn bench_small_depth_gives_sane_figures() {
    let args = BenchArgs {
        model: None,
        backends: "stock:f16,stock:q4_0".into(),
        depths: vec![64],
        decode: 4,
        threads: Some(2),
        reps: 1,
        json: None,
        file: None,
    };
    let r = run_bench(&args).unwrap();
    assert_eq!(r.results.len(), 2);
    for x in &r.results {
        assert!(x.prefill_tps > 0.0 && x.prefill_tps.is_finite(), "{x:?}");
        assert!(x.decode_tps > 0.0 && x.decode_tps.is_finite(), "{x:?}");
        assert!(x.kv_bytes > 0 && x.peak_rss_bytes > x.kv_bytes, "{x:?}");
    }
    let f16 = &r.results[0];
    assert!((15.5..=16.5).contains(&f16.kv_bits_per_elem), "{f16:?}");
    // 30 layers x K and V x 256 cells (n_ctx is padded to 256) x 192 values x 2 bytes.
    assert_eq!(f16.kv_bytes, 30 * 2 * 256 * 192 * 2);
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
