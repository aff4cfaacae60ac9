//! `dspark passkey`: the retrieval check that a perplexity average hides. A five-digit pass
//! key is stated once in a long filler text, and the model is asked for it at the end; the
//! question is fed one token at a time, as a chat client's turn after a long document would
//! be decoded, so page selection (`attn=`) acts on every step that has to find the key.
//! Greedy answers; a trial passes when the answer holds the key's digits.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::backend::{BackendSpec, Runner};
use super::{default_threads, model_path};
use crate::llama::{argmax, Context};

#[derive(clap::Args, Debug, Clone)]
pub struct PasskeyArgs {
    /// GGUF model (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    pub depths: Vec<usize>,
    /// Trials per depth (the key and its place change with each).
    #[arg(long, default_value_t = 20)]
    pub trials: usize,
    /// Configurations, comma-separated (stock:<type>, dspark:<format>[:key=value...]).
    #[arg(long, default_value = "stock:f16,dspark:k4v4,dspark:k4v4:attn=2048,dspark:k4v4:attn=1024")]
    pub backends: String,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub tier: super::backend::TierArgs,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PasskeyResult {
    pub backend: String,
    pub depth: usize,
    pub correct: usize,
    pub trials: usize,
}

const INTRO: &str = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about it.\n\n";
const FILLER: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";

/// The key and the place (a fraction of the filler before it) of trial `i`: deterministic, so
/// every configuration answers the same questions.
fn trial(i: usize) -> (u32, f64) {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    (10_000 + (x % 90_000) as u32, 0.1 + 0.8 * ((x >> 20) % 1000) as f64 / 1000.0)
}

/// The prompt (before the question) of about `depth` tokens with `key` at `place`, and the
/// question's tokens.
fn prompt(ctx: &Context, depth: usize, key: u32, place: f64) -> Result<(Vec<i32>, Vec<i32>)> {
    let model = ctx.model;
    let needle = format!("The pass key is {key}. Remember it. {key} is the pass key. ");
    let fixed = model.tokenize(INTRO, true)?.len() + model.tokenize(&needle, false)?.len() + model.tokenize(QUESTION, false)?.len();
    let per_filler = model.tokenize(FILLER, false)?.len();
    let n_filler = depth.saturating_sub(fixed) / per_filler;
    let before = (n_filler as f64 * place) as usize;
    let text = format!("{INTRO}{}{needle}{}", FILLER.repeat(before), FILLER.repeat(n_filler - before));
    Ok((model.tokenize(&text, true)?, model.tokenize(QUESTION, false)?))
}

/// Whether `spec` answers trial `i` at `depth` correctly.
fn answer(ctx: &mut Context, depth: usize, i: usize) -> Result<bool> {
    let (key, place) = trial(i);
    let (doc, question) = prompt(ctx, depth, key, place)?;
    ctx.clear();
    ctx.decode(&doc, 0, 0, false)?;
    let mut pos = doc.len();
    for &t in &question {
        ctx.decode(&[t], pos, 0, false)?;
        pos += 1;
    }
    let mut out = Vec::new();
    for _ in 0..8 {
        let t = argmax(ctx.logits(-1));
        if ctx.model.is_eog(t) {
            break;
        }
        out.extend(ctx.model.token_bytes(t));
        ctx.decode(&[t], pos, 0, false)?;
        pos += 1;
    }
    let digits: String = String::from_utf8_lossy(&out).chars().filter(char::is_ascii_digit).collect();
    Ok(digits.starts_with(&key.to_string()))
}

/// Correct answers per configuration and depth.
pub fn run_passkey(args: &PasskeyArgs) -> Result<Vec<PasskeyResult>> {
    args.tier.export_spill_dir();
    let specs = args.tier.apply(BackendSpec::parse_list(&args.backends)?);
    if specs.is_empty() || args.depths.is_empty() || args.trials == 0 {
        bail!("passkey needs at least one backend, one depth and one trial");
    }
    if args.depths.iter().any(|&d| d < 256) {
        bail!("depths must be at least 256 tokens");
    }
    let runner = Runner::new(model_path(args.model.clone()));
    for s in &specs {
        runner.check(s)?;
    }
    let threads = args.threads.unwrap_or_else(default_threads);
    // Progress on one line at a terminal; the result line only in a log.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut out = Vec::new();
    for &depth in &args.depths {
        for spec in &specs {
            let mut ctx = runner.context(spec, depth + 64, threads)?;
            let mut correct = 0;
            for i in 0..args.trials {
                correct += usize::from(answer(&mut ctx, depth, i)?);
                if tty {
                    eprint!("\r{spec} depth {depth}: {correct}/{} correct", i + 1);
                }
            }
            eprintln!("{}{spec} depth {depth}: {correct}/{} correct", if tty { "\r" } else { "" }, args.trials);
            out.push(PasskeyResult { backend: spec.to_string(), depth, correct, trials: args.trials });
        }
    }
    Ok(out)
}

pub fn table(r: &[PasskeyResult]) -> String {
    let mut s = String::from("| backend | depth | correct |\n|---|---:|---:|\n");
    for x in r {
        s += &format!("| {} | {} | {}/{} |\n", x.backend, x.depth, x.correct, x.trials);
    }
    s
}

pub fn passkey(args: PasskeyArgs) -> Result<()> {
    let r = run_passkey(&args)?;
    print!("{}", table(&r));
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)?)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
