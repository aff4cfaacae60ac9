//! `dspark run`: greedy (or seeded sampling) generation with one backend configuration.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use super::backend::{BackendSpec, Runner};
use super::{default_threads, model_path};
use crate::llama::{argmax, Context};

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// GGUF model (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// Prompt text.
    #[arg(short = 'p', long, default_value = "The capital of France is")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 64)]
    pub n: usize,
    /// Backend configuration: stock:f16, stock:q8_0, stock:q4_0, dspark:<format> or
    /// rpc:HOST:PORT[+HOST:PORT...].
    #[arg(long, default_value = "stock:f16")]
    pub backend: String,
    /// Sample with this seed (temperature 0.8) instead of greedy decoding.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Context size in tokens (default: prompt + n).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub tier: super::backend::TierArgs,
    #[command(flatten)]
    pub remote: super::rpc::RemoteArgs,
}

/// A small xorshift generator, so a seed gives the same text everywhere.
struct Rng(u64);
impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn sample(logits: &[f32], rng: &mut Option<Rng>) -> i32 {
    let Some(rng) = rng else { return argmax(logits) };
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = logits.iter().map(|&l| (((l - max) / 0.8) as f64).exp()).collect();
    let mut r = rng.next_f64() * w.iter().sum::<f64>();
    for (i, x) in w.iter().enumerate() {
        r -= x;
        if r <= 0.0 {
            return i as i32;
        }
    }
    (w.len() - 1) as i32
}

/// Generates up to `n` tokens after `prompt`, calling `emit` with each one. Stops at
/// end-of-generation tokens. Returns the generated tokens.
pub fn generate(ctx: &mut Context, prompt: &[i32], n: usize, seed: Option<u64>, mut emit: impl FnMut(i32)) -> Result<Vec<i32>> {
    let mut rng = seed.map(|s| Rng(s.max(1)));
    ctx.decode(prompt, 0, 0, false)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let tok = sample(ctx.logits(-1), &mut rng);
        if ctx.model.is_eog(tok) {
            break;
        }
        emit(tok);
        out.push(tok);
        if i + 1 < n {
            ctx.decode(&[tok], prompt.len() + i, 0, false)?;
        }
    }
    Ok(out)
}

pub fn run(a: RunArgs) -> Result<()> {
    a.tier.export_spill_dir();
    // --rpc names the configuration in --backend's place.
    let spec = a.remote.spec()?.map_or_else(|| BackendSpec::parse(&a.backend), Ok)?;
    let spec = a.tier.apply(vec![spec]).remove(0);
    let runner = Runner::new(model_path(a.model)).with_tensor_split(a.remote.tensor_split);
    runner.check(&spec)?;
    let model = runner.model(&spec)?;
    let prompt = model.tokenize(&a.prompt, true)?;
    let n_ctx = a.ctx.unwrap_or(prompt.len() + a.n);
    let mut ctx = runner.context(&spec, n_ctx, a.threads.unwrap_or_else(default_threads))?;
    print!("{}", a.prompt);
    let t = Instant::now();
    let mut out = std::io::stdout().lock();
    let toks = generate(&mut ctx, &prompt, a.n, a.seed, |tok| {
        let _ = out.write_all(&model.token_bytes(tok));
        let _ = out.flush();
    })?;
    let secs = t.elapsed().as_secs_f64();
    println!();
    let kv = match spec {
        BackendSpec::Rpc(_) => "KV cache on the RPC servers (their logs show it)".to_string(),
        _ => format!("KV cache {:.2} MiB ({:.2} bits/elem)", runner.kv_bytes(&ctx, ctx.n_ctx()) as f64 / 1048576.0, runner.kv_bits_per_elem(&ctx)),
    };
    eprintln!("\n{}: {} prompt + {} generated tokens in {:.2} s ({:.1} t/s overall); {kv}", spec, prompt.len(), toks.len(), secs, (prompt.len() + toks.len()) as f64 / secs);
    Ok(())
}
