//! `dspark calibrate`: measures how sensitive each layer's K and V are and writes a profile
//! of per-layer widths for an average bit budget ([`crate::profile`] explains the measure and
//! the allocation). `dspark:autoB` specs run it on the default calibration text and cache the
//! profile next to the model.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use super::eval::{kld, log_softmax};
use super::{beside_model, default_threads, f16_weights_copy, model_path, text};
use crate::ggml;
use crate::llama::{Context, CtxParams, KvType, Model, Placement};
use crate::codec::{Format, Quant};
use crate::profile::{self, Cells, LayerSensitivity, LayerWidths, ModelId, Profile, Sensitivity, Window, PROBE, PROBE_LOW, WIDTHS};

#[derive(clap::Args, Debug, Clone)]
pub struct CalibrateArgs {
    /// GGUF model (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// Calibration text (default: the MPL-1.1 and Artistic licenses in
    /// /usr/share/common-licenses, which `dspark eval`'s default text does not contain).
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Average bits per K/V value the profile may hold at --ctx, everything included: codes,
    /// scales, and the f16 sinks and window (e.g. 3.5, 4.5, 6.5).
    #[arg(long)]
    pub bits: f64,
    /// The context size the budget is counted at (the f16 sinks and window cost more bits per
    /// value in a short context).
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Most recent cells kept out of compression (as the `window=` option of a spec)
    /// [default: 0, as `dspark:autoB`].
    #[arg(long, default_value_t = AUTO_WINDOW)]
    pub window: usize,
    /// Bits per value of the cells kept out of compression (the sink page, the window): 16
    /// for f16 or a code width from 2 to 8 (as the `window_bits=` option of a spec)
    /// [default: 8, as `dspark:autoB`].
    #[arg(long, default_value_t = AUTO_WINDOW_BITS)]
    pub window_bits: u32,
    /// The latest rows kept in f16 besides their codes, which attention reads instead (as
    /// the `recent=` option of a spec) [default: as `dspark:autoB`, 16 where their copies
    /// cost at most 4% of the budget at --ctx, else 0].
    #[arg(long)]
    pub recent: Option<usize>,
    /// Tokens of calibration text each probe runs (the second half is scored) [default: 384,
    /// or 3 x (64 + window) if more].
    #[arg(long)]
    pub probe_ctx: Option<usize>,
    /// Where to write the profile (default: next to the model, named for the budget and
    /// context, as `dspark:autoB` caches it).
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// Reuse the measurements of this profile (same model and window) and only allocate
    /// widths for --bits and --ctx: seconds instead of a calibration run.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Measure on a copy of the model with f16 weights (written once beside it; see `dspark
    /// eval --f16-weights`): the measurements are then the KV cache's own error, without the
    /// floor that quantized weights add to every one, and the profile is for the model given.
    #[arg(long)]
    pub f16_weights: bool,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Tokens each calibration run takes by default: the f16 base and 74 runs of 384 tokens take
/// about 2 minutes on 2 cores with the default model.
pub const PROBE_CTX: usize = 384;

/// The identity a profile records for a model.
pub fn model_id(model: &Model, path: &Path) -> ModelId {
    let name = model.name().unwrap_or_else(|| path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned()));
    ModelId { name, n_layer: model.n_layer(), n_head_kv: model.n_head_kv(), head_dim: model.head_dim() }
}

/// Where `dspark:autoB` keeps the profile for this model, budget, context and window.
pub fn auto_profile_path(model: &Path, bits: f64, ctx: usize, window: Window) -> PathBuf {
    beside_model(model, &format!(".dspark-auto{bits}-ctx{ctx}-{}.json", window_tag(window)))
}

/// A window in file names: `w0` (f16, as before window codes existed) or `w0b8`, and `r16`
/// after it for the latest 16 rows kept in f16.
fn window_tag(w: Window) -> String {
    let tag = match w.bits {
        16 => format!("w{}", w.cells),
        b => format!("w{}b{b}", w.cells),
    };
    match w.recent {
        0 => tag,
        r => format!("{tag}r{r}"),
    }
}

/// The log-probabilities of the scored half of `chunk` with the KV on a device of `cfg`.
fn scored_logprobs(path: &Path, cfg: ggml::Config, chunk: &[i32], threads: usize) -> Result<Vec<Vec<f32>>> {
    let model = Model::load(path, Placement::Offload(vec![ggml::register(cfg)]))?;
    let mut ctx = Context::new(&model, &CtxParams::new(chunk.len() as u32, threads, KvType::F16))?;
    // Logits only for the scored half (the output layer is a large share of a short chunk).
    let half = chunk.len() / 2;
    ctx.decode(&chunk[..half], 0, 0, false)?;
    ctx.decode(&chunk[half..chunk.len() - 1], half, 0, true)?;
    Ok((0..chunk.len() - 1 - half).map(|i| log_softmax(ctx.logits(i as i32))).collect())
}

/// A probe's configuration: every side at [`PROBE`] except `layer`'s, which get `widths`;
/// no copies of the latest rows ([`Window::probed`]).
fn probe_config(id: &ModelId, window: Window, layer: usize, widths: LayerWidths) -> ggml::Config {
    let mut layers = vec![LayerWidths { k: PROBE.bits(), v: PROBE.bits() }; id.n_layer];
    layers[layer] = widths;
    let p = Profile {
        dspark_profile: profile::VERSION,
        model: id.clone(),
        bits: 0.0,
        ctx: 0,
        window: window.cells,
        window_bits: window.bits,
        recent: 0,
        bits_per_elem: 0.0,
        predicted_kld: 0.0,
        calibration: String::new(),
        layers,
        sensitivity: Sensitivity::default(),
        source: format!("(calibration probe: layer {layer} k{}v{})", widths.k, widths.v),
    };
    ggml::Config { format: None, profile: Some(Arc::new(p)), window: window.cells, window_bits: window.bits, ..ggml::Config::default() }
}

/// A uniform configuration.
fn uniform_config(window: Window, k: u32, v: u32) -> ggml::Config {
    let width = |b| Quant::from_bits(b).expect("2..=8");
    ggml::Config { format: Some(Format { k: width(k), v: width(v) }), window: window.cells, window_bits: window.bits, ..ggml::Config::default() }
}

/// What a calibration run needs besides the model.
pub struct Request<'a> {
    pub text: &'a str,
    pub text_name: String,
    pub bits: f64,
    pub ctx: usize,
    pub window: Window,
    pub probe_ctx: usize,
    pub threads: usize,
}

/// Measures each side's sensitivity and allocates widths (see [`crate::profile`]).
pub fn calibrate(path: &Path, r: &Request) -> Result<Profile> {
    let least = least_probe_ctx(r.window.cells);
    if r.probe_ctx < least || !r.probe_ctx.is_multiple_of(2) {
        bail!("--probe-ctx must be an even number of at least {least} tokens with --window {} (the sink page, the window and a page being filled are not compressed)", r.window.cells);
    }
    let base_cfg = ggml::Config { format: None, window: r.window.cells, ..ggml::Config::default() };
    let (id, chunk, cells) = {
        let model = Model::load(path, Placement::Offload(vec![ggml::register(base_cfg.clone())]))?;
        let toks = model.tokenize(r.text, true)?;
        if toks.len() < r.probe_ctx {
            bail!("the calibration text has {} tokens, fewer than --probe-ctx {}", toks.len(), r.probe_ctx);
        }
        (model_id(&model, path), toks[..r.probe_ctx].to_vec(), layer_cells(&model, || Ok(&model), r.ctx)?)
    };
    profile::check_budget(id.head_dim, &cells, r.window, r.bits).map_err(|e| anyhow!("{e}"))?;
    let t = Instant::now();
    let base = scored_logprobs(path, base_cfg, &chunk, r.threads)?;
    let runs = 2 * (WIDTHS.end() - WIDTHS.start()) as usize + 2 + 2 * id.n_layer;
    let mut done = 0;
    let mut mean_kld = |what: &str, cfg: ggml::Config| -> Result<f64> {
        done += 1;
        eprint!("\rcalibrating: {what}, run {done}/{runs} ({:.0} s)      ", t.elapsed().as_secs_f64());
        let lp = scored_logprobs(path, cfg, &chunk, r.threads)?;
        Ok(base.iter().zip(&lp).map(|(b, l)| kld(b, l)).sum::<f64>() / lp.len() as f64)
    };
    // The width curves: all K (or all V) at each width, the other side at 8 bits.
    let top = *WIDTHS.end();
    let full = mean_kld("width curves", uniform_config(r.window, top, top))?;
    let (mut curve_k, mut curve_v) = (Vec::new(), Vec::new());
    for b in WIDTHS {
        let (k, v) = if b == top { (full, full) } else { (mean_kld("width curves", uniform_config(r.window, b, top))?, mean_kld("width curves", uniform_config(r.window, top, b))?) };
        curve_k.push(k - full);
        curve_v.push(v - full);
    }
    // The layer weights: from every side at PROBE bits, one side at PROBE_LOW.
    let (p, low) = (PROBE.bits(), PROBE_LOW.bits());
    let probed = mean_kld("layer weights", uniform_config(r.window, p, p))?;
    let mut layers = Vec::with_capacity(id.n_layer);
    for layer in 0..id.n_layer {
        let k = mean_kld(&format!("layer {layer}"), probe_config(&id, r.window, layer, LayerWidths { k: low, v: p }))?;
        let v = mean_kld(&format!("layer {layer}"), probe_config(&id, r.window, layer, LayerWidths { k: p, v: low }))?;
        layers.push(LayerSensitivity { k: k - probed, v: v - probed });
    }
    let sens = Sensitivity { curve_k, curve_v, layers };
    eprintln!("\rcalibrated {} layers in {:.0} s{}", id.n_layer, t.elapsed().as_secs_f64(), " ".repeat(20));
    let calibration = format!("{}, first {} tokens, KL divergence of the last {} against f16 KV", r.text_name, r.probe_ctx, r.probe_ctx / 2 - 1);
    profile_for(id, sens, calibration, r.bits, &cells, r.window)
}

/// The cells each layer of `model` holds at context `ctx`: `ctx` for every layer unless some
/// layers attend a sliding window, whose rings are then read from a DSpark device as a
/// context of `ctx` allocates them, on the model `on_device` gives (the same model loaded on
/// a DSpark device; asked for only then).
pub fn layer_cells<'m>(model: &Model, on_device: impl FnOnce() -> Result<&'m Model>, ctx: usize) -> Result<Cells> {
    if model.n_swa() == 0 {
        return Ok(Cells::uniform(model.n_layer(), ctx));
    }
    let on_device = on_device()?;
    let &dev = on_device.devices().first().ok_or_else(|| anyhow!("layer_cells: the model is not on a DSpark device"))?;
    let (made, cells) = ggml::layer_cells(dev, || Context::new(on_device, &CtxParams::new(ctx as u32, 1, KvType::F16)));
    drop(made?);
    // llama.cpp pads the context (to 256 cells): a layer holds at most `ctx` of them.
    Ok(Cells { ctx, layers: (0..model.n_layer()).map(|l| cells.get(l).map_or(0, |&c| c.min(ctx))).collect() })
}

/// The profile that spends `bits` per value, over the cells each layer holds at the context
/// `cells` was counted for, as the measurements `sens` advise.
pub fn profile_for(model: ModelId, sensitivity: Sensitivity, calibration: String, bits: f64, cells: &Cells, window: Window) -> Result<Profile> {
    let (d, ctx) = (model.head_dim, cells.ctx);
    let (layers, predicted_kld) = profile::allocate(&sensitivity, d, cells, window, bits).map_err(|e| anyhow!("{e}"))?;
    let held = cells.held_bits(&layers, d, window);
    let (window, window_bits, recent) = (window.cells, window.bits, window.recent);
    Ok(Profile { dspark_profile: profile::VERSION, model, bits, ctx, window, window_bits, recent, bits_per_elem: held, predicted_kld, calibration, layers, sensitivity, source: String::new() })
}

/// The allocation as a table.
pub fn table(p: &Profile) -> String {
    let mut s = format!(
        "profile for {} at {} bits/value, ctx {} ({}): holds {:.3} bits/value, predicted KLD {:.5}\n\n",
        p.model.name, p.bits, p.ctx, p.window(), p.bits_per_elem, p.predicted_kld
    );
    let sens = &p.sensitivity;
    s += "| all layers at width | 2 | 3 | 4 | 5 | 6 | 7 | 8 |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (name, c) in [("K (V at 8): KLD over 8/8", &sens.curve_k), ("V (K at 8): KLD over 8/8", &sens.curve_v)] {
        s += &format!("| {name} | {} |\n", c.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>().join(" | "));
    }
    s += "\n| layer | K bits | V bits | K weight | V weight |\n|---:|---:|---:|---:|---:|\n";
    for (il, (l, x)) in p.layers.iter().zip(&sens.layers).enumerate() {
        s += &format!("| {il} | {} | {} | {:.2e} | {:.2e} |\n", l.k, l.v, x.k, x.v);
    }
    s
}

/// The window `dspark:autoB` allocates for unless the spec sets one: at ctx 2048 and equal
/// bits, profiles without a window scored better than with a 64-cell one (KL divergence
/// 0.059 against 0.107 at 4.5 bits, before pages were centred; the window's f16 cells cost
/// 0.5 bit per value that codes use better).
pub const AUTO_WINDOW: usize = 0;

/// The codes `dspark:autoB` keeps the sink page and the page being filled in unless the spec
/// sets `window_bits=`: those cells are about 1 bit per value in f16 at ctx 2048 (the
/// partial page alone 0.4 bit when it is nearly full), and 8-bit codes halve that at a
/// small cost (token by token, ctx 512: k4v4 without a window 7.49 bits and KL divergence
/// 0.0086 in f16, 5.61 bits and 0.0096 in 8-bit codes).
pub const AUTO_WINDOW_BITS: u32 = 8;

/// The latest rows `dspark:autoB` keeps in f16 besides their codes (where [`auto_recent`]
/// says so). A decode step puts much of its weight on the last few tokens, whose code error
/// then reaches the output nearly undiluted: on the default model with f16 weights (ctx
/// 2048, token by token, KL divergence against exact attention) `recent=16` took `auto6.5`
/// from 0.00042 to 0.00026 at the same bits (8: 0.00032, 32: 0.00027), `auto4.5` from 0.0053
/// to 0.0049 and `auto3.5` from 0.043 to 0.040 (8 and 32 did worse on both).
pub const AUTO_RECENT: usize = 16;

/// The largest share of the budget [`auto_recent`] spends on the copies of the latest rows.
/// Their bits come out of every code: on Gemma 3 270M (f16 weights, ctx 2048, 15 of 18
/// layers in rings of 1024 cells, where 16 f16 rows cost 0.21 bit per value) they took
/// `auto6.5` from KL divergence 0.00105 to 0.00087 (3.3% of its budget) but `auto4.5` from
/// 0.0103 to 0.0129 (4.8%) and `auto3.5` from 0.074 to 0.093 (6.1%); on the default model
/// (0.125 bit) they paid at every budget, `auto3.5` (3.6%) included. Two models, six points:
/// the limit sits between what paid and what did not.
pub const RECENT_SHARE: f64 = 0.04;

/// The latest rows `dspark:autoB` keeps in f16 unless the spec sets `recent=`:
/// [`AUTO_RECENT`] where their copies cost at most [`RECENT_SHARE`] of `bits` over the cells
/// the layers hold, else none.
pub fn auto_recent(cells: &Cells, bits: f64) -> usize {
    if cells.recent_bits(AUTO_RECENT) <= RECENT_SHARE * bits {
        AUTO_RECENT
    } else {
        0
    }
}

/// The profile file for `dspark:autoB` at this context, allocated from the model's cached
/// measurements (made once per model and window, on the default calibration text) and saved
/// next to the model. The allocation is made again each time (it takes microseconds), so a
/// build whose allocation changed never runs a stale profile.
pub fn auto_profile(model: &Path, cells: &Cells, bits: f64, window: Window, threads: usize) -> Result<PathBuf> {
    let ctx = cells.ctx;
    let path = auto_profile_path(model, bits, ctx, window);
    let probed = window.probed();
    let measured = beside_model(model, &format!(".dspark-calibration-{}.json", window_tag(probed)));
    let m = match Profile::load(&measured) {
        Ok(p) if p.window() == probed => p,
        _ => {
            eprintln!("dspark:auto{bits}: calibrating {} (once per model; cached in {})", model.display(), measured.display());
            let text = text::calibration_text()?;
            let p = calibrate(model, &Request { text: &text, text_name: "default calibration text".into(), bits, ctx, window: probed, probe_ctx: default_probe_ctx(window.cells), threads })?;
            p.save(&measured).map_err(|e| anyhow!("{e}"))?;
            p
        }
    };
    let p = profile_for(m.model, m.sensitivity, m.calibration, bits, cells, window)?;
    if !Profile::load(&path).is_ok_and(|old| old.layers == p.layers && old.bits_per_elem == p.bits_per_elem) {
        p.save(&path).map_err(|e| anyhow!("{e}"))?;
    }
    Ok(path)
}

/// The probe chunk for a window: [`PROBE_CTX`], or longer where the sink page and the
/// window would take more than a third of it.
pub fn default_probe_ctx(window: usize) -> usize {
    PROBE_CTX.max(3 * (crate::kv::PAGE + window)).max(least_probe_ctx(window)).next_multiple_of(2)
}

/// The shortest probe chunk that measures anything: the scored half attends to the first
/// half (its own rows are read before they are compressed), so the first half must hold a
/// compressed page: the sink page, a full page, and the window after them.
fn least_probe_ctx(window: usize) -> usize {
    use crate::kv::PAGE;
    2 * (2 * PAGE + window.next_multiple_of(PAGE))
}

pub fn calibrate_cmd(a: CalibrateArgs) -> Result<()> {
    let path = model_path(a.model.clone());
    // The spec option's rule for the value.
    ggml::Config::default().with_option("window_bits", &a.window_bits.to_string()).map_err(|e| anyhow!("--window-bits: {e}"))?;
    let model = Model::load(&path, Placement::Cpu)?;
    let on_device = std::cell::OnceCell::new();
    let load = || -> Result<&Model> {
        let m = Model::load(&path, Placement::Offload(vec![ggml::register(ggml::Config { format: None, ..ggml::Config::default() })]))?;
        Ok(on_device.get_or_init(|| m))
    };
    let cells = layer_cells(&model, load, a.ctx)?;
    let window = Window { cells: a.window, bits: a.window_bits, recent: a.recent.unwrap_or_else(|| auto_recent(&cells, a.bits)) };
    let p = match &a.from {
        Some(from) => {
            let old = Profile::load(from).map_err(|e| anyhow!("{e}"))?;
            if old.window().probed() != window.probed() {
                bail!("{} was measured with a {}; pass --window {} --window-bits {} (or calibrate again)", from.display(), old.window(), old.window, old.window_bits);
            }
            old.check_model(&model_id(&model, &path)).map_err(|e| anyhow!("{e}"))?;
            profile_for(old.model, old.sensitivity, old.calibration, a.bits, &cells, window)?
        }
        None => {
            drop(model);
            let text = match &a.file {
                Some(f) => text::load_text(Some(f))?,
                None => text::calibration_text()?,
            };
            let text_name = a.file.as_ref().map_or_else(|| "/usr/share/common-licenses (MPL-1.1, Artistic)".to_string(), |p| p.display().to_string());
            let threads = a.threads.unwrap_or_else(default_threads);
            let probe_ctx = a.probe_ctx.unwrap_or_else(|| default_probe_ctx(a.window));
            let measured = if a.f16_weights { f16_weights_copy(&path, threads)? } else { path.clone() };
            calibrate(&measured, &Request { text: &text, text_name, bits: a.bits, ctx: a.ctx, window, probe_ctx, threads })?
        }
    };
    print!("{}", table(&p));
    let out = a.output.unwrap_or_else(|| auto_profile_path(&path, a.bits, a.ctx, window));
    p.save(&out).map_err(|e| anyhow!("{e}"))?;
    eprintln!("wrote {} (use it with --backends dspark:profile={})", out.display(), out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copies of the latest rows are kept where they cost little of the budget: on every
    /// budget of a model whose layers hold the whole context of 2048 (0.125 bit), not at 4.5
    /// bits where most layers hold a ring of half of it (0.21 bit, as Gemma 3's do).
    #[test]
    fn the_latest_rows_are_kept_where_they_cost_little() {
        let full = Cells::uniform(30, 2048);
        assert!((full.recent_bits(16) - 0.125).abs() < 1e-12);
        assert_eq!([3.5, 4.5, 6.5].map(|b| auto_recent(&full, b)), [16; 3]);
        let rings = Cells { ctx: 2048, layers: (0..18).map(|l| if l % 6 == 5 { 2048 } else { 1024 }).collect() };
        assert_eq!([3.5, 4.5, 6.5].map(|b| auto_recent(&rings, b)), [0, 0, 16]);
        assert_eq!(auto_recent(&Cells { ctx: 2048, layers: vec![0; 4] }, 3.5), 16, "no cells, no cost");
    }
}
