//! Argument parsing and the JSON shape of `dspark bench`.

use clap::Parser;
use dspark::cli::backend::BackendSpec;
use dspark::cli::bench::{table, BenchReport, BenchResult};
use dspark::cli::{Cli, Command};
use dspark::llama::KvType;

#[test]
fn backend_specs_parse() {
    assert_eq!(BackendSpec::parse("stock:f16").unwrap(), BackendSpec::Stock(KvType::F16));
    assert_eq!(BackendSpec::parse("stock:q4_0").unwrap(), BackendSpec::Stock(KvType::Q4_0));
    assert_eq!(BackendSpec::parse("dspark:k4v4").unwrap(), BackendSpec::Dspark("k4v4".into()));
    let list = BackendSpec::parse_list("stock:f16, stock:q8_0,dspark:k8v8").unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[1].to_string(), "stock:q8_0");
    assert_eq!(BackendSpec::parse("stock:iq4_nl").unwrap(), BackendSpec::Stock(KvType::Iq4Nl));
    for bad in ["f16", "stock:q6_k", "gpu:f16", "stock"] {
        let err = BackendSpec::parse(bad).unwrap_err().to_string();
        assert!(err.contains(bad), "error for {bad:?} should name it: {err}");
    }
}

#[test]
fn bench_flags_parse() {
    let cli = Cli::try_parse_from([
        "dspark", "bench", "--backends", "stock:f16,stock:q4_0", "--depths", "512,4096", "--decode", "8", "--threads", "2",
        "--reps", "3", "--json", "out.json",
    ])
    .unwrap();
    let Command::Bench(b) = cli.command else { panic!("not bench") };
    assert_eq!(b.depths, vec![512, 4096]);
    assert_eq!((b.decode, b.threads, b.reps), (8, Some(2), 3));
    assert_eq!(b.json.unwrap().to_str(), Some("out.json"));

    let cli = Cli::try_parse_from(["dspark", "bench"]).unwrap();
    let Command::Bench(b) = cli.command else { panic!("not bench") };
    assert!(!b.depths.is_empty() && b.decode == 32 && b.reps == 1 && b.threads.is_none());

    assert!(Cli::try_parse_from(["dspark", "bench", "--depths", "abc"]).is_err());
    assert!(Cli::try_parse_from(["dspark", "bench", "--bogus"]).is_err());
}

#[test]
fn run_flags_parse() {
    let cli = Cli::try_parse_from(["dspark", "run", "-p", "Hello", "-n", "5", "--backend", "stock:q8_0", "--seed", "7"]).unwrap();
    let Command::Run(r) = cli.command else { panic!("not run") };
    assert_eq!((r.prompt.as_str(), r.n, r.backend.as_str(), r.seed), ("Hello", 5, "stock:q8_0", Some(7)));
}

#[test]
fn bench_json_shape() {
    let report = BenchReport {
        model: "m.gguf".into(),
        threads: 2,
        llama_cpp: "x".into(),
        cpu_features: vec!["avx2".into()],
        reps: 1,
        prompt_at_depth: 0,
        poll: 50,
        disk_read_bytes_per_s: 0.0,
        results: vec![
            row("stock:f16", 100.0, 50.0, 1000, 16.0, false),
            row("stock:q4_0", 50.0, 60.0, 300, 4.5, true),
        ],
    };
    let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    for key in ["model", "threads", "llama_cpp", "cpu_features", "results"] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    let r0 = &v["results"][0];
    for key in [
        "backend",
        "depth",
        "prefill_tps",
        "decode_tps",
        "kv_bytes",
        "kv_bits_per_elem",
        "peak_rss_bytes",
        "prefill_tps_min",
        "prefill_tps_max",
        "decode_tps_min",
        "decode_tps_max",
        "busy",
    ] {
        assert!(r0.get(key).is_some(), "missing results[].{key}");
    }
    // The table shows ratios against stock:f16 at the same depth.
    let t = table(&report);
    assert!(t.contains("| stock:q4_0 | 512 |") && t.contains("0.50x") && t.contains("1.20x") && t.contains("30%"), "{t}");
    // One rep: no spread; the busy row says so.
    assert!(!t.contains('–') && t.contains("| 30% | yes |") && t.contains("| no |"), "{t}");
    assert_eq!(v["results"][1]["busy"], true);
}

/// With the prefill on top of the depth measured, the table gains its speed and ratio, named
/// as llama-bench names the test.
#[test]
fn bench_table_with_prompt_at_depth() {
    let mut f16 = row("stock:f16", 100.0, 50.0, 1000, 16.0, false);
    let mut k4 = row("dspark:k4v4", 90.0, 80.0, 300, 4.8, false);
    (f16.prompt_at_depth_tps, k4.prompt_at_depth_tps) = (40.0, 60.0);
    let report = BenchReport {
        model: "m.gguf".into(),
        threads: 2,
        llama_cpp: "x".into(),
        cpu_features: vec![],
        reps: 1,
        prompt_at_depth: 512,
        poll: 50,
        disk_read_bytes_per_s: 0.0,
        results: vec![f16, k4],
    };
    let t = table(&report);
    assert!(t.contains("| pp512@d t/s |") && t.contains("| pp512@d vs f16 |"), "{t}");
    assert!(t.contains("| dspark:k4v4 | 512 | 90.0 | 80.0 | 60.0 |") && t.contains("| 0.90x | 1.60x | 1.50x | 30% | no |"), "{t}");
    let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    assert_eq!((v["prompt_at_depth"].as_u64(), v["poll"].as_u64(), v["results"][1]["prompt_at_depth_tps"].as_f64()), (Some(512), Some(50), Some(60.0)));
}

fn row(backend: &str, prefill: f64, decode: f64, kv_bytes: u64, bits: f64, busy: bool) -> BenchResult {
    BenchResult {
        backend: backend.into(),
        depth: 512,
        prefill_tps: prefill,
        decode_tps: decode,
        prompt_at_depth_tps: 0.0,
        kv_bytes,
        kv_bits_per_elem: bits,
        peak_rss_bytes: 5,
        prefill_tps_min: prefill,
        prefill_tps_max: prefill,
        decode_tps_min: decode,
        decode_tps_max: decode,
        busy,
        kv_hot_bytes: kv_bytes,
        kv_cold_bytes: 0,
        cold_read_bytes_per_token: 0.0,
        transfer_busy_s: 0.0,
        compute_wait_s: 0.0,
        hidden_fraction: 1.0,
        attended_tokens: 0.0,
        select_s: 0.0,
        prefetch_hit_rate: 1.0,
    }
}

#[test]
fn bench_spread_with_reps() {
    let mut f16 = row("stock:f16", 184.0, 50.0, 1000, 16.0, false);
    (f16.prefill_tps_min, f16.prefill_tps_max, f16.decode_tps_min, f16.decode_tps_max) = (180.0, 190.0, 48.5, 51.0);
    let report = BenchReport {
        model: "m.gguf".into(),
        threads: 2,
        llama_cpp: "x".into(),
        cpu_features: vec![],
        reps: 3,
        prompt_at_depth: 0,
        poll: 50,
        disk_read_bytes_per_s: 0.0,
        results: vec![f16],
    };
    let t = table(&report);
    assert!(t.contains("| 184.0 (180.0–190.0) | 50.0 (48.5–51.0) |"), "{t}");
    let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    assert_eq!((v["reps"].as_u64(), v["results"][0]["prefill_tps_min"].as_f64()), (Some(3), Some(180.0)));
    // JSON written before these fields existed still loads (no spread, not busy, one rep).
    let old = r#"{"model":"m","threads":2,"llama_cpp":"x","cpu_features":[],"results":[
        {"backend":"stock:f16","depth":512,"prefill_tps":1.0,"decode_tps":2.0,"kv_bytes":3,"kv_bits_per_elem":16.0,"peak_rss_bytes":4}]}"#;
    let old: BenchReport = serde_json::from_str(old).unwrap();
    assert!(old.reps == 1 && !old.results[0].busy);
}

#[test]
fn dspark_spec_options_parse_and_bad_ones_are_clear_errors() {
    use dspark::cli::backend::{dspark_config, TierArgs};
    let c = dspark_config("k4v4:kv=16M:prefetch=0").unwrap();
    assert_eq!((c.kv_budget, c.prefetch), (Some(16 << 20), 0));
    assert_eq!(dspark_config("k8v8:kv=1.5G").unwrap().kv_budget, Some(3 << 29));
    assert_eq!(dspark_config("k4v4").unwrap().kv_budget, None);
    let c = dspark_config("k5v7:window=64").unwrap();
    assert_eq!((c.format_name(), c.window, c.spec_name()), ("k5v7".to_string(), 64, "k5v7:window=64".to_string()));
    let c = dspark_config("k4v4:attn=2048:attn_dense=2").unwrap();
    assert_eq!((c.attn_budget, c.attn_dense_layers, c.spec_name()), (2048, 2, "k4v4:attn=2048:attn_dense=2".to_string()));
    for (bad, says) in [
        ("k4v4:kv=lots", "not a size"),
        ("k4v4:bits=3", "unknown option `bits`"),
        ("k4v4:prefetch=-1", "prefetch=-1"),
        ("k4v4:kv", "key=value"),
        ("k4v4:attn=2k", "attn=2k: expected a number of cells"),
        ("k4v4:attn_dense=x", "attn_dense=x"),
        ("k4v4:window=-3", "window=-3"),
        ("profile=/nonexistent/p.json", "cannot read profile /nonexistent/p.json"),
        ("k9v4", "b from 2 to 8"),
        ("auto", "expected autoB"),
    ] {
        let e = dspark_config(bad).unwrap_err().to_string();
        assert!(e.contains(says), "{bad}: {e}");
    }
    // Flags add defaults to specs that lack the key; a spec's own key wins.
    let t = TierArgs { kv_budget: Some("64M".into()), prefetch_depth: Some(1), spill_dir: None, attn_budget: Some(512) };
    let specs = t.apply(BackendSpec::parse_list("stock:f16,dspark:k4v4,dspark:k8v8:kv=8M:attn=0").unwrap());
    assert_eq!(
        specs.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ["stock:f16", "dspark:k4v4:kv=64M:prefetch=1:attn=512", "dspark:k8v8:kv=8M:attn=0:prefetch=1"]
    );
}

/// A spill folder that cannot hold the spill file fails with a message that names it.
#[test]
fn an_unwritable_spill_dir_is_a_clear_error() {
    let model = dspark::cli::model_path(None);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dspark"))
        .args(["run", "-n", "2", "--backend", "dspark:k4v4:kv=1M", "--spill-dir", "/nonexistent/dspark-spill", "-m"])
        .arg(&model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("spill file") && err.contains("/nonexistent/dspark-spill"), "{err}");
}

#[test]
fn rpc_specs_and_flags_parse() {
    let s = BackendSpec::parse("rpc:127.0.0.1:50052+10.0.0.2:50053").unwrap();
    assert_eq!(s, BackendSpec::Rpc(vec!["127.0.0.1:50052".into(), "10.0.0.2:50053".into()]));
    assert_eq!(s.to_string(), "rpc:127.0.0.1:50052+10.0.0.2:50053");
    assert!(BackendSpec::names_remote(&s.to_string()) && !BackendSpec::names_remote("dspark:k4v4"));
    for bad in ["rpc:", "rpc:host", "rpc:host:port", "rpc:127.0.0.1:70000", "rpc::50052"] {
        let err = BackendSpec::parse(bad).unwrap_err().to_string();
        assert!(err.contains("expected HOST:PORT"), "{bad}: {err}");
    }
    let cli = Cli::try_parse_from(["dspark", "run", "--rpc", "127.0.0.1:1,127.0.0.1:2", "--tensor-split", "1,3"]).unwrap();
    let Command::Run(r) = cli.command else { panic!("not run") };
    assert_eq!(r.remote.spec().unwrap(), Some(BackendSpec::Rpc(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()])));
    assert_eq!(r.remote.tensor_split, vec![1.0, 3.0]);
    let cli = Cli::try_parse_from(["dspark", "rpc-server"]).unwrap();
    let Command::RpcServer(a) = cli.command else { panic!("not rpc-server") };
    assert_eq!((a.host.as_str(), a.port, a.format.as_str()), ("127.0.0.1", 50052, "k4v4"));
}
