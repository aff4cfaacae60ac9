//! Per-layer profiles end to end on the real default model: the widths reach each layer's
//! stores, a profile for another model is refused, and calibration is deterministic.

use std::path::PathBuf;

use dspark::cli::backend::{BackendSpec, Runner};
use dspark::cli::calibrate::{calibrate, layer_cells, model_id, profile_for, Request};
use dspark::cli::{model_path, text};
use dspark::llama::{Model, Placement};
use dspark::profile::{side_bits, Cells, LayerSensitivity, LayerWidths, ModelId, Profile, Sensitivity, Window, VERSION};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dspark-profile-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn the_model() -> ModelId {
    let path = model_path(None);
    model_id(&Model::load(&path, Placement::Cpu).unwrap(), &path)
}

/// A profile file for `model` with `widths(layer)`, the sink page in f16.
fn write_profile(dir: &std::path::Path, name: &str, model: &ModelId, widths: impl Fn(usize) -> (u32, u32)) -> PathBuf {
    write_profile_with(dir, name, model, 16, widths)
}

/// As [`write_profile`], with the cells kept out of compression in `window_bits`.
fn write_profile_with(dir: &std::path::Path, name: &str, model: &ModelId, window_bits: u32, widths: impl Fn(usize) -> (u32, u32)) -> PathBuf {
    let layers: Vec<LayerWidths> = (0..model.n_layer).map(|l| LayerWidths { k: widths(l).0, v: widths(l).1 }).collect();
    let p = Profile {
        dspark_profile: VERSION,
        model: model.clone(),
        bits: 0.0,
        ctx: 0,
        // Everything but the sink page compressed: the bits held follow from the widths alone.
        window: 0,
        window_bits,
        recent: 0,
        bits_per_elem: 0.0,
        predicted_kld: 0.0,
        calibration: "test".into(),
        sensitivity: Sensitivity::default(),
        layers,
        source: String::new(),
    };
    let path = dir.join(name);
    p.save(&path).unwrap();
    path
}

/// The logits of the last token of a real 1087-token passage, and the KV's bits per value.
/// 1087 tokens leave the last page with 63 of its 64 cells: the most a budget counts
/// ([`dspark::profile::kept_cells`]).
const TOKENS: usize = 1087;

fn last_logits(r: &Runner, spec: &str) -> (Vec<f32>, f64) {
    let s = BackendSpec::parse(spec).unwrap();
    let model = r.model(&BackendSpec::parse("stock:f16").unwrap()).unwrap();
    let toks = text::prompt_tokens(model, &text::default_text().unwrap(), TOKENS).unwrap();
    let mut ctx = r.context(&s, 1088, 2).unwrap();
    for (i, b) in toks.chunks(256).enumerate() {
        ctx.decode(b, i * 256, 0, false).unwrap();
    }
    (ctx.logits(-1).to_vec(), r.kv_bits_per_elem(&ctx))
}

#[test]
fn a_profile_sets_each_layers_widths() {
    let dir = temp_dir("widths");
    let m = the_model();
    let r = Runner::new(model_path(None));
    let uniform = write_profile(&dir, "uniform.json", &m, |_| (4, 4));
    let (want, want_bits) = last_logits(&r, "dspark:k4v4:window=0");
    let (got, got_bits) = last_logits(&r, &format!("dspark:profile={}", uniform.display()));
    assert_eq!(want, got, "a profile of k4v4 everywhere must give k4v4's logits");
    assert_eq!(want_bits, got_bits);
    // Mixed widths, with a 16 (f16) layer: the bits held are what each layer's width costs.
    let widths = |l: usize| [(8, 2), (5, 6), (16, 3), (7, 4)][l % 4];
    let mixed = write_profile(&dir, "mixed.json", &m, widths);
    let (logits, bits) = last_logits(&r, &format!("dspark:profile={}", mixed.display()));
    assert!(logits.iter().all(|x| x.is_finite()));
    let cost = |w: Window| (0..m.n_layer).map(|l| side_bits(widths(l).0, m.head_dim, TOKENS, w) + side_bits(widths(l).1, m.head_dim, TOKENS, w)).sum::<f64>() / (2 * m.n_layer) as f64;
    let want = cost(Window { cells: 0, bits: 16, recent: 0 });
    assert!((bits - want).abs() < 0.002, "bits/elem {bits}, the widths cost {want}");
    // The same widths with the sink page in 8-bit codes: it costs what the accounting says.
    let mixed8 = write_profile_with(&dir, "mixed8.json", &m, 8, widths);
    let (logits, bits8) = last_logits(&r, &format!("dspark:profile={}", mixed8.display()));
    assert!(logits.iter().all(|x| x.is_finite()));
    let want8 = cost(Window { cells: 0, bits: 8, recent: 0 });
    assert!((bits8 - want8).abs() < 0.002 && bits8 < bits, "bits/elem {bits8}, the widths cost {want8}");
    // With the latest 16 rows also in f16 (`recent=16`): their copies cost what the
    // accounting says too.
    let (logits, bits8r) = last_logits(&r, &format!("dspark:profile={}:recent=16", mixed8.display()));
    assert!(logits.iter().all(|x| x.is_finite()));
    let want8r = cost(Window { cells: 0, bits: 8, recent: 16 });
    assert!((bits8r - want8r).abs() < 0.002 && bits8r > bits8 + 0.05, "bits/elem {bits8r}, the widths cost {want8r}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_profile_for_another_model_is_refused() {
    let dir = temp_dir("refused");
    let m = the_model();
    let r = Runner::new(model_path(None));
    let other_name = write_profile(&dir, "name.json", &ModelId { name: "another model".into(), ..m.clone() }, |_| (4, 4));
    let e = r.context(&BackendSpec::Dspark(format!("profile={}", other_name.display())), 256, 2).err().unwrap().to_string();
    assert!(e.contains("was made for another model") && e.contains("dspark calibrate"), "{e}");
    // Fewer layers than the model: refused when the profile is loaded for the model, and by
    // the device itself when the KV is allocated.
    let short = write_profile(&dir, "short.json", &ModelId { n_layer: 4, ..m.clone() }, |_| (4, 4));
    let e = r.context(&BackendSpec::Dspark(format!("profile={}", short.display())), 256, 2).err().unwrap().to_string();
    assert!(e.contains("was made for"), "{e}");
    let cfg = dspark::ggml::Config::default().with_spec(&format!("profile={}", short.display())).unwrap();
    let model = Model::load(&model_path(None), Placement::Offload(vec![dspark::ggml::register(cfg)])).unwrap();
    assert!(dspark::llama::Context::new(&model, &dspark::llama::CtxParams::new(256, 2, dspark::llama::KvType::F16)).is_err());
    // Not a profile, another version: clear errors when the spec is parsed.
    std::fs::write(dir.join("v9.json"), std::fs::read_to_string(&short).unwrap().replace(&format!("\"dspark_profile\": {VERSION}"), "\"dspark_profile\": 9")).unwrap();
    let e = dspark::cli::backend::dspark_config(&format!("profile={}", dir.join("v9.json").display())).unwrap_err().to_string();
    assert!(e.contains("version 9"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// On Gemma 3 270M, 15 of 18 layers keep a ring of 1024 cells at ctx 2048: the allocation
/// counts them so, and the bits the store then holds stay within the budget.
#[test]
fn a_profile_holds_its_budget_where_layers_keep_a_ring() {
    let path = dspark::cli::second_model_path();
    let r = Runner::new(path.clone());
    let model = r.model(&BackendSpec::parse("dspark:f16").unwrap()).unwrap();
    let cells = layer_cells(model, || Ok(model), 2048).unwrap();
    assert_eq!(cells.layers.iter().filter(|&&c| c == 1024).count(), 15, "{cells:?}");
    assert_eq!(cells.layers.iter().filter(|&&c| c == 2048).count(), 3, "{cells:?}");
    // Measurements that make every width worth its bits, each layer its own weight.
    let n = model.n_layer();
    let curve: Vec<f64> = (0..7).map(|i| 0.1 * 4f64.powi(-i)).collect();
    let layers = (0..n).map(|l| LayerSensitivity { k: 0.001 * (1 + l % 5) as f64, v: 0.001 * (1 + l % 3) as f64 }).collect();
    let sens = Sensitivity { curve_k: curve.clone(), curve_v: curve, layers };
    let window = Window { cells: 0, bits: 8, recent: 0 };
    let p = profile_for(model_id(model, &path), sens.clone(), "test".into(), 4.5, &cells, window).unwrap();
    assert!(p.bits_per_elem <= 4.5 + 1e-9, "{}", p.bits_per_elem);
    let counted_at_ctx = profile_for(model_id(model, &path), sens, "test".into(), 4.5, &Cells::uniform(n, 2048), window).unwrap();
    assert!(cells.held_bits(&counted_at_ctx.layers, p.model.head_dim, window) > 4.5 + 0.05, "counting every layer at ctx would overrun");
    let dir = temp_dir("ring");
    let file = dir.join("p.json");
    p.save(&file).unwrap();
    let spec = BackendSpec::parse(&format!("dspark:profile={}", file.display())).unwrap();
    let toks = text::prompt_tokens(model, &text::default_text().unwrap(), 2047).unwrap();
    let mut ctx = r.context(&spec, 2048, 2).unwrap();
    for (i, b) in toks.chunks(512).enumerate() {
        ctx.decode(b, i * 512, 0, false).unwrap();
    }
    let held = r.kv_bits_per_elem(&ctx);
    assert!(held <= 4.5 + 0.01 && held > 4.0, "held {held} bits per value, the profile counted {}", p.bits_per_elem);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn calibration_is_deterministic() {
    let text = text::calibration_text().unwrap();
    let req = Request { text: &text, text_name: "test".into(), bits: 4.0, ctx: 2048, window: Window { cells: 0, bits: 8, recent: 0 }, probe_ctx: 256, threads: 2 };
    let a = calibrate(&model_path(None), &req).unwrap();
    let b = calibrate(&model_path(None), &req).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.layers.len(), a.model.n_layer);
    assert!(a.bits_per_elem <= 4.0 + 1e-9 && a.bits_per_elem > 3.0, "{}", a.bits_per_elem);
    // 2-bit K costs more than 4-bit K when every layer takes it.
    assert!(a.sensitivity.curve_k[0] > a.sensitivity.curve_k[2], "{:?}", a.sensitivity);
}

#[test]
fn auto_specs_parse() {
    assert!(dspark::cli::backend::dspark_config("auto3.5").is_ok());
    assert_eq!(dspark::cli::backend::dspark_config("auto4.5:window=0").unwrap().window, 0);
    let e = dspark::cli::backend::dspark_config("autofast").unwrap_err().to_string();
    assert!(e.contains("expected autoB"), "{e}");
}
