//! `dspark bench`: prefill and decode speed and KV memory of each backend configuration at each
//! depth, with the configurations interleaved, like llama-bench.
//!
//! Every measurement runs in a child process of its own (`dspark bench --child`), which loads
//! the model once for its one configuration, so that each row's peak RSS is that
//! configuration's alone. It makes one untimed warm-up pass first, so that the measurement
//! does not pay for page-in and start-up. The machine's load is
//! sampled around every timed window (see [`super::load`]); rows measured while it was not
//! idle are flagged `busy` and warned about on stderr.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::backend::{peak_rss_bytes, reset_peak_rss, BackendSpec, Runner, TierArgs};
use super::load::{self, Load};
use super::{default_threads, info, model_path, text};
use crate::llama::{argmax, CtxParams, KvType};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// GGUF model (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// Comma-separated configurations: stock:f16, stock:q8_0, stock:q4_0, dspark:<format>
    /// (formats: f16, k8v8, k8v4, k4v4, k4v3, k4v2, any k<b>v<b> with b from 2 to 8).
    #[arg(long, default_value = "stock:f16,stock:q4_0,dspark:k4v4")]
    pub backends: String,
    /// Comma-separated prompt depths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "512,4096")]
    pub depths: Vec<usize>,
    /// Single-token decode steps timed after each prompt.
    #[arg(long, default_value_t = 32)]
    pub decode: usize,
    /// Also time a prefill of this many tokens on top of each depth, the shape of
    /// llama-bench's `pp512 @ dN` (the depth's prompt is already in the cache); 0: off.
    #[arg(long, default_value_t = 512)]
    pub prompt_at_depth: usize,
    /// Polling level of the CPU thread pool attached to every context, 0 (threads sleep
    /// between graphs) to 100, as llama.cpp's `--poll`; llama.cpp's tools default to 50. Only
    /// ggml's own thread pool polls: with OpenMP (this build, and llama.cpp's default build)
    /// the OpenMP runtime decides (OMP_WAIT_POLICY) and this changes nothing.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub poll: u32,
    /// Threads for llama.cpp and DSpark (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Repetitions; the table shows the median and, with more than one, the min–max spread.
    #[arg(long, default_value_t = 1)]
    pub reps: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Text for the prompts (default: the license texts in /usr/share/common-licenses).
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub tier: TierArgs,
    #[command(flatten)]
    pub remote: super::rpc::RemoteArgs,
    /// Internal: measure the one configuration at the one depth given in this process and
    /// print the measurement as JSON (what every measurement of a bench runs as).
    #[arg(long, hide = true)]
    pub child: bool,
    /// The `dspark` executable the measurements run in (default: this one).
    #[arg(skip)]
    pub exe: Option<PathBuf>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BenchResult {
    pub backend: String,
    pub depth: usize,
    pub prefill_tps: f64,
    pub decode_tps: f64,
    /// Prefill speed of `prompt_at_depth` tokens on top of `depth` (0 when not measured).
    #[serde(default)]
    pub prompt_at_depth_tps: f64,
    pub kv_bytes: u64,
    pub kv_bits_per_elem: f64,
    pub peak_rss_bytes: u64,
    /// Spread of the reps (equal to the median with one rep).
    #[serde(default)]
    pub prefill_tps_min: f64,
    #[serde(default)]
    pub prefill_tps_max: f64,
    #[serde(default)]
    pub decode_tps_min: f64,
    #[serde(default)]
    pub decode_tps_max: f64,
    /// Whether the machine was not idle during any rep of this row (see [`super::load`]).
    #[serde(default)]
    pub busy: bool,
    /// The memory budget's figures (DSpark with `kv=`): bytes of KV pages in RAM and in the
    /// cold tier after the decode, cold bytes read per decoded token, the transfer stream's
    /// busy time and the compute stream's wait during the decode, and `1 - wait / busy`.
    #[serde(default)]
    pub kv_hot_bytes: u64,
    #[serde(default)]
    pub kv_cold_bytes: u64,
    #[serde(default)]
    pub cold_read_bytes_per_token: f64,
    #[serde(default)]
    pub transfer_busy_s: f64,
    #[serde(default)]
    pub compute_wait_s: f64,
    #[serde(default)]
    pub hidden_fraction: f64,
    /// Page selection's figures during the decode (DSpark): tokens a decode attention call
    /// read per layer and KV head, seconds spent choosing pages, and the share of the cold
    /// pages needed that the transfer stream had read ahead (1 when none was needed).
    #[serde(default)]
    pub attended_tokens: f64,
    #[serde(default)]
    pub select_s: f64,
    #[serde(default)]
    pub prefetch_hit_rate: f64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct BenchReport {
    pub model: String,
    pub threads: usize,
    pub llama_cpp: String,
    pub cpu_features: Vec<String>,
    /// Timed repetitions per row.
    #[serde(default = "one")]
    pub reps: usize,
    /// Tokens of the prefill timed on top of each depth (0: not measured).
    #[serde(default)]
    pub prompt_at_depth: usize,
    /// Polling level of the contexts' CPU thread pools.
    #[serde(default)]
    pub poll: u32,
    /// Read rate of the disk under the spill folder, bytes/s (measured when a configuration
    /// has a KV budget: a spill file written, then read in 1 MiB requests past the page cache).
    #[serde(default)]
    pub disk_read_bytes_per_s: f64,
    pub results: Vec<BenchResult>,
}

fn one() -> usize {
    1
}

/// One measurement of one configuration at one depth.
#[derive(Serialize, Deserialize, Debug)]
struct Sample {
    prefill_tps: f64,
    decode_tps: f64,
    prompt_at_depth_tps: f64,
    kv_bytes: u64,
    kv_bits: f64,
    peak_rss: u64,
    /// The busier of the prefill and decode windows.
    load: Load,
    kv_cold_bytes: u64,
    /// Over the decode steps (zero without a budget).
    cold_read_bytes: u64,
    transfer_busy_s: f64,
    compute_wait_s: f64,
    attended_tokens: f64,
    select_s: f64,
    prefetch_hit_rate: f64,
}

/// Decode steps of the warm-up pass.
const WARMUP_DECODE: usize = 4;

/// What one measurement runs: the prompt (the depth), the tokens prefilled on top of it
/// (may be empty), the decode steps, and the contexts' threads and polling level.
struct Shape<'a> {
    prompt: &'a [i32],
    at_depth: &'a [i32],
    decode: usize,
    threads: usize,
    poll: u32,
}

impl Shape<'_> {
    /// A context with room for every step: stock allocates it all, DSpark what is written.
    fn context<'r>(&self, runner: &'r Runner, spec: &BackendSpec) -> Result<crate::llama::Context<'r>> {
        let n_ctx = self.prompt.len() + self.decode.max(self.at_depth.len());
        let mut p = CtxParams::new(n_ctx as u32, self.threads, KvType::F16);
        p.poll = self.poll;
        runner.context_with(spec, &p)
    }
}

/// The untimed warm-up pass: a context of the timed one's shape, one prefill batch (the
/// graph shape of the timed prefill's batches) and a few decode steps. It pages in the
/// model's weights and the code paths of this configuration before its first timed rep.
fn warm_up(runner: &Runner, spec: &BackendSpec, shape: &Shape) -> Result<()> {
    let mut ctx = shape.context(runner, spec)?;
    let prompt = shape.prompt;
    let n = prompt.len().min(CtxParams::new(0, shape.threads, KvType::F16).n_ubatch as usize);
    ctx.decode(&prompt[..n], 0, 0, false)?;
    let mut tok = argmax(ctx.logits(-1));
    for i in 0..WARMUP_DECODE.min(shape.decode) {
        ctx.decode(&[tok], n + i, 0, false)?;
        tok = argmax(ctx.logits(-1));
    }
    Ok(())
}

/// Runs `f` and returns its result, its wall time and the machine's load meanwhile.
fn timed<T>(threads: usize, f: impl FnOnce() -> Result<T>) -> Result<(T, f64, Load)> {
    let before = load::sample();
    let t = Instant::now();
    let v = f()?;
    let s = t.elapsed().as_secs_f64();
    Ok((v, s, load::classify(before, load::sample(), s, threads, default_threads())))
}

/// Prefill of the prompt, decode steps after it, then (the decoded tokens removed) a prefill
/// of `at_depth` on top of the prompt. KV and memory figures are taken after the decode.
fn measure(runner: &Runner, spec: &BackendSpec, shape: &Shape) -> Result<Sample> {
    let (prompt, decode, threads) = (shape.prompt, shape.decode, shape.threads);
    let mut ctx = shape.context(runner, spec)?;
    // Outside the timings: the first decode of a context allocates its compute buffers.
    ctx.decode(&prompt[..prompt.len().min(8)], 0, 0, false)?;
    ctx.clear();
    reset_peak_rss();

    let ((), prefill_s, prefill_load) = timed(threads, || ctx.decode(prompt, 0, 0, false))?;

    let mut tok = argmax(ctx.logits(-1));
    let before = runner.dspark_stats(&ctx).unwrap_or_default();
    let ((), decode_s, decode_load) = timed(threads, || {
        for i in 0..decode {
            ctx.decode(&[tok], prompt.len() + i, 0, false)?;
            tok = argmax(ctx.logits(-1));
        }
        Ok(())
    })?;
    // Stock's KV as llama.cpp sizes a context for prompt and decode (cells padded to 256),
    // though this one has room for the prefill on top of the depth.
    let kv_bytes = runner.kv_bytes(&ctx, (prompt.len() + decode).next_multiple_of(256)) as u64;
    let (kv_bits, peak_rss) = (runner.kv_bits_per_elem(&ctx), peak_rss_bytes());
    let during = runner.dspark_stats(&ctx).unwrap_or_default().since(&before);

    let mut loads = vec![prefill_load];
    if decode > 0 {
        loads.push(decode_load);
    }
    let mut prompt_at_depth_tps = 0.0;
    if !shape.at_depth.is_empty() {
        ctx.seq_rm(0, prompt.len() as i32, -1);
        let ((), s, load) = timed(threads, || ctx.decode(shape.at_depth, prompt.len(), 0, false))?;
        prompt_at_depth_tps = shape.at_depth.len() as f64 / s;
        loads.push(load);
    }
    // The first busy window if there is one, else the last window.
    let load = *loads.iter().find(|l| l.busy()).unwrap_or(loads.last().expect("prefill"));
    Ok(Sample {
        prefill_tps: prompt.len() as f64 / prefill_s,
        decode_tps: if decode > 0 { decode as f64 / decode_s } else { 0.0 },
        prompt_at_depth_tps,
        kv_bytes,
        kv_bits,
        peak_rss,
        load,
        kv_cold_bytes: during.kv_cold_bytes,
        cold_read_bytes: during.cold_read_bytes,
        transfer_busy_s: during.transfer_busy_ns as f64 * 1e-9,
        compute_wait_s: during.compute_wait_ns as f64 * 1e-9,
        attended_tokens: during.attended_tokens(),
        select_s: during.select_ns as f64 * 1e-9,
        prefetch_hit_rate: during.prefetch_hit_rate(),
    })
}

fn min_max(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run_bench(args: &BenchArgs) -> Result<BenchReport> {
    let mut specs = BackendSpec::parse_list(&args.backends)?;
    specs.extend(args.remote.spec()?);
    let specs = args.tier.apply(specs);
    if specs.is_empty() || args.depths.is_empty() || args.reps == 0 {
        bail!("bench needs at least one backend, one depth and one repetition");
    }
    if args.depths.iter().any(|&d| d == 0) {
        bail!("depths must be positive");
    }
    let path = model_path(args.model.clone());
    let runner = Runner::new(path.clone()).with_tensor_split(args.remote.tensor_split.clone());
    for s in &specs {
        runner.check(s)?;
    }
    let threads = args.threads.unwrap_or_else(default_threads);
    let exe = match &args.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().context("cannot find the dspark executable to run measurements in")?,
    };
    let disk_read_bytes_per_s = if specs.iter().any(BackendSpec::has_budget) { disk_read_rate(&args.tier)? } else { 0.0 };

    // samples[depth index][spec index] = one Sample per rep
    let mut samples: Vec<Vec<Vec<Sample>>> = (0..args.depths.len()).map(|_| (0..specs.len()).map(|_| vec![]).collect()).collect();
    let total = args.reps * args.depths.len() * specs.len();
    let mut done = 0;
    let mut shown = HashSet::new();
    for rep in 0..args.reps {
        for (di, &depth) in args.depths.iter().enumerate() {
            for (si, spec) in specs.iter().enumerate() {
                done += 1;
                eprint!("[{done}/{total}] {spec} depth {depth} rep {}/{} ... ", rep + 1, args.reps);
                let s = measure_in_child(&exe, args, &path, spec, depth, threads, &mut shown)?;
                eprint!("prefill {:.1} t/s, decode {:.1} t/s", s.prefill_tps, s.decode_tps);
                if args.prompt_at_depth > 0 {
                    eprint!(", prefill of {} at depth {:.1} t/s", args.prompt_at_depth, s.prompt_at_depth_tps);
                }
                eprintln!(", peak RSS {:.0} MiB", s.peak_rss as f64 / 1048576.0);
                if s.load.busy() {
                    eprintln!(
                        "warning: the machine was busy during {spec} depth {depth} rep {} ({}); its figures, and ratios against it, are unreliable",
                        rep + 1,
                        s.load.describe()
                    );
                }
                samples[di][si].push(s);
            }
        }
    }

    let mut results = Vec::new();
    for (di, &depth) in args.depths.iter().enumerate() {
        for (si, spec) in specs.iter().enumerate() {
            let ss = &samples[di][si];
            let (prefill_tps_min, prefill_tps_max) = min_max(ss.iter().map(|s| s.prefill_tps));
            let (decode_tps_min, decode_tps_max) = min_max(ss.iter().map(|s| s.decode_tps));
            let last = ss.last().expect("one sample per rep");
            let busy_s = median(ss.iter().map(|s| s.transfer_busy_s).collect());
            let wait_s = median(ss.iter().map(|s| s.compute_wait_s).collect());
            results.push(BenchResult {
                backend: spec.to_string(),
                depth,
                prefill_tps: median(ss.iter().map(|s| s.prefill_tps).collect()),
                decode_tps: median(ss.iter().map(|s| s.decode_tps).collect()),
                prompt_at_depth_tps: median(ss.iter().map(|s| s.prompt_at_depth_tps).collect()),
                kv_bytes: ss.iter().map(|s| s.kv_bytes).max().unwrap_or(0),
                kv_bits_per_elem: ss.last().map_or(f64::NAN, |s| s.kv_bits),
                peak_rss_bytes: ss.iter().map(|s| s.peak_rss).max().unwrap_or(0),
                prefill_tps_min,
                prefill_tps_max,
                decode_tps_min,
                decode_tps_max,
                busy: ss.iter().any(|s| s.load.busy()),
                kv_hot_bytes: last.kv_bytes,
                kv_cold_bytes: last.kv_cold_bytes,
                cold_read_bytes_per_token: median(ss.iter().map(|s| s.cold_read_bytes as f64 / args.decode.max(1) as f64).collect()),
                transfer_busy_s: busy_s,
                compute_wait_s: wait_s,
                hidden_fraction: if busy_s > 0.0 { (1.0 - wait_s / busy_s).max(0.0) } else { 1.0 },
                attended_tokens: median(ss.iter().map(|s| s.attended_tokens).collect()),
                select_s: median(ss.iter().map(|s| s.select_s).collect()),
                prefetch_hit_rate: median(ss.iter().map(|s| s.prefetch_hit_rate).collect()),
            });
        }
    }
    Ok(BenchReport {
        model: path.display().to_string(),
        threads,
        llama_cpp: info::llama_cpp_version(),
        cpu_features: info::cpu_features().into_iter().map(String::from).collect(),
        reps: args.reps,
        prompt_at_depth: args.prompt_at_depth,
        poll: args.poll,
        disk_read_bytes_per_s,
        results,
    })
}

/// Measures the read rate of the disk under the spill folder (see
/// [`BenchReport::disk_read_bytes_per_s`]), 256 MiB, and says so.
fn disk_read_rate(tier: &TierArgs) -> Result<f64> {
    let dir = tier.spill_dir();
    eprint!("measuring the read rate of the disk under {} (256 MiB past the page cache) ... ", dir.display());
    let r = crate::kv::cold::measure_read_rate(&dir, 256 << 20).with_context(|| format!("cannot measure the disk under {}", dir.display()))?;
    eprintln!("{:.0} MB/s", r / 1e6);
    Ok(r)
}

/// The markdown table, with ratios against stock:f16 at the same depth when it was measured.
/// With more than one rep, speeds show the median and the min–max spread, e.g. `184.0
/// (180.2–190.1)`. The last column says whether the machine was busy during the row.
pub fn table(r: &BenchReport) -> String {
    // The prefill on top of the depth, when it was measured: `pp512@d` as llama-bench names it.
    let pp = (r.prompt_at_depth > 0).then(|| format!("pp{}@d", r.prompt_at_depth));
    let mut head = vec!["backend", "depth", "prefill t/s", "decode t/s"];
    let pp_head = pp.as_ref().map(|p| (format!("{p} t/s"), format!("{p} vs f16")));
    if let Some((h, _)) = &pp_head {
        head.push(h);
    }
    head.extend(["KV MiB", "bits/elem", "peak RSS MiB", "prefill vs f16", "decode vs f16"]);
    if let Some((_, h)) = &pp_head {
        head.push(h);
    }
    head.extend(["KV vs f16", "busy"]);
    let mut s = format!("| {} |\n|---|{}---|\n", head.join(" | "), "---:|".repeat(head.len() - 2));
    let speed = |med: f64, lo: f64, hi: f64| {
        if r.reps > 1 {
            format!("{med:.1} ({lo:.1}–{hi:.1})")
        } else {
            format!("{med:.1}")
        }
    };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for x in &r.results {
        let base = r.results.iter().find(|b| b.depth == x.depth && b.backend == "stock:f16");
        let ratio = |f: fn(&BenchResult) -> f64| match base {
            Some(b) if f(b) > 0.0 => format!("{:.2}x", f(x) / f(b)),
            _ => "-".into(),
        };
        let kv = match base {
            Some(b) if b.kv_bytes > 0 && x.kv_bytes > 0 => format!("{:.0}%", 100.0 * x.kv_bytes as f64 / b.kv_bytes as f64),
            _ => "-".into(),
        };
        let mut row = vec![
            x.backend.clone(),
            x.depth.to_string(),
            speed(x.prefill_tps, x.prefill_tps_min, x.prefill_tps_max),
            speed(x.decode_tps, x.decode_tps_min, x.decode_tps_max),
        ];
        if pp.is_some() {
            row.push(format!("{:.1}", x.prompt_at_depth_tps));
        }
        // An rpc: configuration's KV is on its servers (their logs show it).
        let (kv_mib, bits) = if BackendSpec::names_remote(&x.backend) { ("remote".into(), "-".into()) } else { (format!("{:.2}", mib(x.kv_bytes)), format!("{:.2}", x.kv_bits_per_elem)) };
        row.extend([kv_mib, bits, format!("{:.0}", mib(x.peak_rss_bytes))]);
        row.extend([ratio(|b| b.prefill_tps), ratio(|b| b.decode_tps)]);
        if pp.is_some() {
            row.push(ratio(|b| b.prompt_at_depth_tps));
        }
        row.extend([kv, (if x.busy { "yes" } else { "no" }).to_string()]);
        s += &format!("| {} |\n", row.join(" | "));
    }
    s
}

/// Runs one measurement in a child process (`dspark bench --child`) and reads its sample.
/// The child's log lines are passed on once each: the same warning from every child is shown
/// the first time only.
fn measure_in_child(
    exe: &Path,
    args: &BenchArgs,
    model: &Path,
    spec: &BackendSpec,
    depth: usize,
    threads: usize,
    shown: &mut HashSet<String>,
) -> Result<Sample> {
    let mut cmd = Command::new(exe);
    cmd.arg("bench").arg("--child").arg("-m").arg(model);
    cmd.args(["--backends", &spec.to_string(), "--depths", &depth.to_string(), "--threads", &threads.to_string()]);
    cmd.args(["--decode", &args.decode.to_string(), "--prompt-at-depth", &args.prompt_at_depth.to_string(), "--poll", &args.poll.to_string()]);
    if let Some(f) = &args.file {
        cmd.arg("-f").arg(f);
    }
    if let Some(d) = &args.tier.spill_dir {
        cmd.env("DSPARK_SPILL_DIR", d);
    }
    if !args.remote.tensor_split.is_empty() {
        cmd.arg("--tensor-split").arg(args.remote.tensor_split.iter().map(f32::to_string).collect::<Vec<_>>().join(","));
    }
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run {}", exe.display()))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("the measurement of {spec} at depth {depth} failed ({}):\n{}", out.status, log.trim_end());
    }
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        if shown.insert(line.to_string()) {
            eprintln!("{line}");
        }
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{} bench --child printed no measurement", exe.display()))
}

/// `bench --child`: the warm-up pass and one measurement of the one configuration at the one
/// depth given, in this process.
fn measure_here(args: &BenchArgs) -> Result<Sample> {
    let specs = args.tier.apply(BackendSpec::parse_list(&args.backends)?);
    let (spec, &depth) = match (specs.as_slice(), args.depths.as_slice()) {
        ([spec], [depth]) => (spec, depth),
        _ => bail!("bench --child takes one configuration and one depth"),
    };
    let runner = Runner::new(model_path(args.model.clone())).with_tensor_split(args.remote.tensor_split.clone());
    runner.check(spec)?;
    let text = text::load_text(args.file.as_deref())?;
    let tokens = text::prompt_tokens(runner.model(spec)?, &text, depth + args.prompt_at_depth)?;
    let (prompt, at_depth) = tokens.split_at(depth);
    let threads = args.threads.unwrap_or_else(default_threads);
    let shape = Shape { prompt, at_depth, decode: args.decode, threads, poll: args.poll };
    warm_up(&runner, spec, &shape)?;
    measure(&runner, spec, &shape)
}

/// The memory budget's and page selection's figures of the rows that have a cold tier or an
/// attention budget (empty when none has).
pub fn tier_table(r: &BenchReport) -> String {
    let rows: Vec<_> = r.results.iter().filter(|x| x.kv_cold_bytes > 0 || x.transfer_busy_s > 0.0 || BackendSpec::names_attn_budget(&x.backend)).collect();
    if rows.is_empty() {
        return String::new();
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut s = "| backend | depth | hot MiB | cold MiB | cold read KiB/token | transfer busy s | compute wait s | hidden | attended tokens | prefetch hits | decode t/s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n".to_string();
    for x in rows {
        s += &format!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.3} | {:.3} | {:.0}% | {:.0} | {:.0}% | {:.1} |\n",
            x.backend,
            x.depth,
            mib(x.kv_hot_bytes),
            mib(x.kv_cold_bytes),
            x.cold_read_bytes_per_token / 1024.0,
            x.transfer_busy_s,
            x.compute_wait_s,
            100.0 * x.hidden_fraction,
            x.attended_tokens,
            100.0 * x.prefetch_hit_rate,
            x.decode_tps
        );
    }
    if r.disk_read_bytes_per_s > 0.0 {
        s += &format!("\ndisk read rate under the spill folder: {:.0} MB/s\n", r.disk_read_bytes_per_s / 1e6);
    }
    s
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.child {
        println!("{}", serde_json::to_string(&measure_here(&args)?)?);
        return Ok(());
    }
    let report = run_bench(&args)?;
    println!("model: {}, threads: {}\nllama.cpp: {}\n", report.model, report.threads, report.llama_cpp);
    print!("{}", table(&report));
    let tiers = tier_table(&report);
    if !tiers.is_empty() {
        print!("\n{tiers}");
    }
    let busy = report.results.iter().filter(|x| x.busy).count();
    if busy > 0 {
        eprintln!(
            "warning: {busy} of {} rows were measured while the machine was busy (busy = yes); rerun them on an idle machine before comparing",
            report.results.len()
        );
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
