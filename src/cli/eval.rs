//! `dspark eval`: fidelity of each KV configuration against a reference run of stock
//! llama.cpp, the way llama.cpp's maintainers judge KV formats: KL divergence of the
//! next-token distribution, top-1 agreement and perplexity, scoring the second half of each
//! chunk (as llama-perplexity does).
//!
//! The default reference is exact attention (`stock:f32`: f32 KV without flash attention),
//! not f16 KV. Stock f16 runs flash attention, whose CPU kernel rounds the query to f16 and
//! sums f16 V into an f16 accumulator (ggml-cpu ops.cpp, `VKQ16`): with the default model's
//! weights in f16 (`--f16-weights`), at ctx 2048 token by token, that is a KL divergence of
//! 0.000074 from exact attention, four times `dspark:k8v8`'s own error, which an f16
//! reference would hide. With the model's Q4_1 weights every configuration sits on a floor
//! of ~0.004 instead (see [`super::f16_weights_copy`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::backend::{format_names, BackendSpec, Runner};
use super::{default_threads, model_path, text};
use crate::llama::{Context, KvType};

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// GGUF model (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// Text to evaluate on (default: the license texts in /usr/share/common-licenses).
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Tokens per chunk; the second half of each chunk is scored.
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Chunks to evaluate (default: as many as the text holds, at most 8).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Configurations compared against the baseline: a comma-separated list of stock:<type>,
    /// dspark:<format> and `all` (stock f16, q8_0, q5_1, q5_0, iq4_nl, q4_0, every DSpark
    /// preset: k8v8, k8v4, k4v4, k4v3, k4v2, and the calibrated auto3.5, auto4.5, auto6.5,
    /// which calibrate the model once, ~2 min, and cache the result next to it).
    #[arg(long, default_value = "all")]
    pub backends: String,
    /// The reference every configuration is compared with: stock:f32 is exact attention
    /// (f32 KV without flash attention); stock:f16 is llama.cpp's default KV, whose flash
    /// attention sums V in f16 (KL divergence 0.00007 from exact with --f16-weights).
    #[arg(long, default_value = "stock:f32")]
    pub baseline: String,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also draw bits per element against mean KL divergence to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Score the second half of each chunk one token at a time, as generation runs, instead
    /// of in batches of 512 (slower). Page selection (`attn=`) acts only on such decode steps.
    #[arg(long)]
    pub decode: bool,
    /// Evaluate on a copy of the model with f16 weights (written once beside it). With
    /// quantized weights ggml rounds every matrix product's input to 8 bits, which turns any
    /// change in attention into KL divergence ~0.004 on the default model, f16 KV included;
    /// with f16 weights that floor is gone and the KV cache's own error is left.
    #[arg(long)]
    pub f16_weights: bool,
    #[command(flatten)]
    pub tier: super::backend::TierArgs,
    #[command(flatten)]
    pub remote: super::rpc::RemoteArgs,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct EvalResult {
    pub backend: String,
    pub kld_mean: f64,
    pub kld_p99: f64,
    pub top1_agree: f64,
    pub ppl: f64,
    pub delta_ppl: f64,
    pub kv_bits_per_elem: f64,
    pub tokens: usize,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct EvalReport {
    pub model: String,
    pub text: String,
    pub ctx: usize,
    /// The reference configuration (reports before it existed: stock:f16).
    #[serde(default = "f16_baseline")]
    pub baseline: String,
    pub results: Vec<EvalResult>,
}

/// The calibrated presets `--backends all` includes: one per stock type's bits they are
/// measured against (q4_0 4.5, q5_0 5.5, q8_0 8.5) less one bit.
const AUTO_PRESETS: [&str; 3] = ["auto3.5", "auto4.5", "auto6.5"];

/// The configurations `--backends all` stands for.
fn all_specs() -> Vec<BackendSpec> {
    let mut v: Vec<BackendSpec> = KvType::ALL.iter().map(|&t| BackendSpec::Stock(t)).collect();
    v.extend(format_names().into_iter().chain(AUTO_PRESETS.map(String::from)).map(BackendSpec::Dspark));
    v
}

/// Log-probabilities of one logit row (computed in f64, kept in f32 to halve the memory of
/// a chunk's baseline: 1024 rows of 49k values at ctx 2048).
pub(crate) fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

/// KL divergence of the distribution `lp` from `base` (both log-probabilities).
pub(crate) fn kld(base: &[f32], lp: &[f32]) -> f64 {
    let d: f64 = base.iter().zip(lp).map(|(&pb, &pc)| (pb as f64).exp() * (pb as f64 - pc as f64)).sum();
    d.max(0.0)
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// Runs one chunk and calls `f(position, logits)` for each scored position (the second half),
/// which `decode` evaluates one token at a time.
pub(crate) fn run_chunk(ctx: &mut Context, toks: &[i32], decode: bool, mut f: impl FnMut(usize, &[f32])) -> Result<()> {
    let first_scored = toks.len() / 2;
    if decode {
        for (bi, batch) in toks[..first_scored].chunks(512).enumerate() {
            ctx.decode(batch, bi * 512, 0, false)?;
        }
        for p in first_scored..toks.len() - 1 {
            ctx.decode(&toks[p..=p], p, 0, true)?;
            f(p, ctx.logits(0));
        }
        return Ok(());
    }
    for (bi, batch) in toks.chunks(512).enumerate() {
        let pos0 = bi * 512;
        ctx.decode(batch, pos0, 0, true)?;
        for i in 0..batch.len() {
            let p = pos0 + i;
            if p >= first_scored && p + 1 < toks.len() {
                f(p, ctx.logits(i as i32));
            }
        }
    }
    Ok(())
}

fn f16_baseline() -> String {
    "stock:f16".into()
}

/// Per-configuration accumulators.
#[derive(Default)]
struct Acc {
    kld: Vec<f64>,
    agree: usize,
    nll: f64,
    bits: f64,
}

pub fn run_eval(args: &EvalArgs) -> Result<EvalReport> {
    args.tier.export_spill_dir();
    let mut specs = Vec::new();
    for item in args.backends.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        if item == "all" {
            specs.extend(all_specs());
        } else {
            specs.push(BackendSpec::parse(item)?);
        }
    }
    specs.extend(args.remote.spec()?);
    let specs = args.tier.apply(specs);
    if args.ctx < 16 || args.ctx % 2 != 0 {
        bail!("--ctx must be an even number of at least 16 tokens");
    }
    let threads = args.threads.unwrap_or_else(default_threads);
    let mut path = model_path(args.model.clone());
    if args.f16_weights {
        path = super::f16_weights_copy(&path, threads)?;
    }
    let runner = Runner::new(path.clone()).with_tensor_split(args.remote.tensor_split.clone());
    for s in &specs {
        runner.check(s)?;
    }
    if !args.decode && specs.iter().any(BackendSpec::has_attn_budget) {
        eprintln!("warning: page selection (attn=) acts on decode steps only; add --decode to score with it");
    }
    let base_spec = BackendSpec::parse(&args.baseline)?;
    runner.check(&base_spec)?;
    let text = text::load_text(args.file.as_deref())?;
    let model = runner.model(&base_spec)?;
    let toks = model.tokenize(&text, true)?;
    let available = toks.len() / args.ctx;
    if available == 0 {
        bail!("the text has {} tokens, fewer than one chunk of --ctx {}; use a longer text or a smaller --ctx", toks.len(), args.ctx);
    }
    let n_chunks = args.chunks.unwrap_or(available.min(8));
    if n_chunks == 0 || n_chunks > available {
        bail!("the text holds {available} chunks of {} tokens; --chunks {n_chunks} is not possible", args.ctx);
    }
    let bos = toks[0];

    let mut base_nll = 0.0;
    let mut accs: Vec<Acc> = specs.iter().map(|_| Acc::default()).collect();
    for c in 0..n_chunks {
        let mut chunk = toks[c * args.ctx..(c + 1) * args.ctx].to_vec();
        chunk[0] = bos;
        eprint!("chunk {}/{n_chunks}: baseline {base_spec}", c + 1);
        // Baseline log-probabilities of the scored positions, kept for this chunk only.
        let mut base: Vec<Vec<f32>> = Vec::new();
        {
            let mut ctx = runner.context(&base_spec, args.ctx, threads)?;
            run_chunk(&mut ctx, &chunk, args.decode, |p, l| {
                let lp = log_softmax(l);
                base_nll -= lp[chunk[p + 1] as usize] as f64;
                base.push(lp);
            })?;
        }
        for (spec, acc) in specs.iter().zip(&mut accs) {
            eprint!(", {spec}");
            let mut ctx = runner.context(spec, args.ctx, threads)?;
            let mut k = 0;
            run_chunk(&mut ctx, &chunk, args.decode, |p, l| {
                let lp = log_softmax(l);
                let b = &base[k];
                k += 1;
                acc.kld.push(kld(b, &lp));
                acc.agree += (argmax(b) == argmax(&lp)) as usize;
                acc.nll -= lp[chunk[p + 1] as usize] as f64;
            })?;
            acc.bits = runner.kv_bits_per_elem(&ctx);
        }
        eprintln!();
    }

    let n_tok = accs.first().map_or(0, |a| a.kld.len());
    let base_ppl = (base_nll / n_tok as f64).exp();
    let results = specs
        .iter()
        .zip(accs)
        .map(|(spec, mut a)| {
            a.kld.sort_by(|x, y| x.total_cmp(y));
            let n = a.kld.len();
            let ppl = (a.nll / n as f64).exp();
            EvalResult {
                backend: spec.to_string(),
                kld_mean: a.kld.iter().sum::<f64>() / n as f64,
                kld_p99: a.kld[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1],
                top1_agree: a.agree as f64 / n as f64,
                ppl,
                delta_ppl: ppl - base_ppl,
                kv_bits_per_elem: a.bits,
                tokens: n,
            }
        })
        .collect();
    let text_name = args.file.as_ref().map_or_else(|| "/usr/share/common-licenses (GPL-3, GPL-2, Apache-2.0, ...)".to_string(), |p| p.display().to_string());
    Ok(EvalReport { model: path.display().to_string(), text: text_name, ctx: args.ctx, baseline: base_spec.to_string(), results })
}

pub fn table(r: &EvalReport) -> String {
    let mut s = String::from("| backend | bits/elem | KLD mean | KLD p99 | top-1 agree | PPL | ΔPPL | tokens |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for x in &r.results {
        // An rpc: configuration's KV is on its servers: its bits are not known here.
        let bits = if BackendSpec::names_remote(&x.backend) { "-".to_string() } else { format!("{:.2}", x.kv_bits_per_elem) };
        s += &format!(
            "| {} | {bits} | {:.6} | {:.5} | {:.2}% | {:.4} | {:+.4} | {} |\n",
            x.backend,
            x.kld_mean,
            x.kld_p99,
            100.0 * x.top1_agree,
            x.ppl,
            x.delta_ppl,
            x.tokens
        );
    }
    s
}

/// Bits per element against mean KL divergence, one labelled point per configuration.
pub fn plot(r: &EvalReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    if path.extension().and_then(|e| e.to_str()) != Some("svg") {
        bail!("--plot writes SVG; give a file name ending in .svg");
    }
    // Rows on RPC servers have no bits to place them by.
    let pts: Vec<(f64, f64, &str)> = r
        .results
        .iter()
        .filter(|x| !BackendSpec::names_remote(&x.backend))
        .map(|x| (x.kv_bits_per_elem, x.kld_mean.max(1e-7), x.backend.as_str()))
        .collect();
    let x_max = pts.iter().map(|p| p.0).fold(0.0, f64::max) * 1.1 + 0.5;
    let y_max = pts.iter().map(|p| p.1).fold(1e-6, f64::max) * 3.0;
    let y_min = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min) / 3.0;
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("KV fidelity against {} (ctx {})", r.baseline, r.ctx), ("sans-serif", 22))
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())?;
        chart.configure_mesh().x_desc("bits per K/V element (metadata included)").y_desc("mean KL divergence (log)").draw()?;
        // Stock types, DSpark formats, DSpark with page selection (an attention budget), and
        // calibrated per-layer profiles.
        let kind = |name: &str| match name {
            _ if name.starts_with("stock") => 0,
            _ if BackendSpec::names_attn_budget(name) => 2,
            _ if BackendSpec::names_profile(name) => 3,
            _ => 1,
        };
        for (k, label, color) in [(0, "stock llama.cpp", BLUE), (1, "DSpark, one format", RED), (2, "DSpark, page selection (attn=)", GREEN), (3, "DSpark, calibrated profile", MAGENTA)] {
            let series: Vec<_> = pts.iter().filter(|p| kind(p.2) == k).collect();
            if series.is_empty() {
                continue;
            }
            chart
                .draw_series(series.iter().map(|p| Circle::new((p.0, p.1), 5, color.filled())))?
                .label(label)
                .legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
            chart.draw_series(series.iter().map(|p| Text::new(p.2.to_string(), (p.0, p.1), ("sans-serif", 14).into_font())))?;
        }
        chart.configure_series_labels().border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let report = run_eval(&args)?;
    println!("model: {}, text: {}, ctx: {}, KL divergence against {}\n", report.model, report.text, report.ctx, report.baseline);
    print!("{}", table(&report));
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &args.plot {
        plot(&report, p)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
