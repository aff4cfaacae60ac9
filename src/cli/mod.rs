//! The `dspark` command line: run, bench, eval, info.

pub mod backend;
pub mod bench;
pub mod calibrate;
pub mod eval;
pub mod info;
pub mod load;
pub mod passkey;
pub mod rpc;
pub mod run;
pub mod text;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

/// The model every command uses when `-m` is not given (fetched by `scripts/setup.sh`).
pub const SECOND_MODEL: &str = "models/gemma-3-270m-q4_k_m.gguf";
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser, Debug)]
#[command(
    name = "dspark",
    version,
    about = "DSpark: a compressed, paged KV cache for llama.cpp, and side-by-side comparisons with stock llama.cpp",
    long_about = "DSpark stores llama.cpp's KV cache compressed and runs attention on the compressed pages.\n\
This tool runs a GGUF model with DSpark or with stock llama.cpp and compares them side by side.\n\n\
Backend configurations are named stock:<kv type> (llama.cpp's CPU backend with KV type f16, q8_0, q5_1, q5_0, iq4_nl or q4_0,\n\
flash attention on) and dspark:<format> (DSpark's compressed KV: dspark:k4v4, any k<b>v<b> with b from 2 to 8,\n\
dspark:auto4.5 for per-layer widths calibrated to 4.5 bits per value, or dspark:profile=FILE from `dspark calibrate`);\n\
rpc:HOST:PORT[+HOST:PORT...] places the layers on `dspark rpc-server`s (llama.cpp's RPC backend).\n\n\
The default model is models/SmolLM2-135M-Instruct.Q4_1.gguf; `bash scripts/setup.sh` fetches it."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt with one backend configuration.
    Run(run::RunArgs),
    /// Measure prefill and decode speed and KV memory, stock and DSpark side by side.
    Bench(bench::BenchArgs),
    /// Fidelity against exact attention (or --baseline): KL divergence, top-1 agreement, perplexity.
    Eval(eval::EvalArgs),
    /// Measure each layer's K and V sensitivity and write a profile of per-layer widths for an
    /// average bit budget (use it as dspark:profile=FILE).
    Calibrate(calibrate::CalibrateArgs),
    /// Retrieval check: a pass key stated once in a long text, asked for at the end.
    Passkey(passkey::PasskeyArgs),
    /// Serve DSPARK0 to other machines through llama.cpp's RPC backend: clients place layers
    /// here with `--rpc HOST:PORT` (dspark run/bench/eval, llama.cpp's tools).
    RpcServer(rpc::ServerArgs),
    /// Show versions, registered ggml devices and CPU features.
    Info,
}

/// Resolves the model path: the given one, else $DSPARK_MODEL, else the default model
/// relative to the current folder or to the source tree.
pub fn model_path(arg: Option<PathBuf>) -> PathBuf {
    if let Some(p) = arg {
        return p;
    }
    if let Some(p) = std::env::var_os("DSPARK_MODEL") {
        return PathBuf::from(p);
    }
    in_tree(DEFAULT_MODEL)
}

/// A file next to the model: its name with `suffix` appended.
pub(crate) fn beside_model(model: &Path, suffix: &str) -> PathBuf {
    let mut name = model.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// A copy of the model with its weights in f16, written once beside it
/// (`<file>.f16-weights.gguf`), and its path.
///
/// What it is for: with quantized weights, ggml rounds the input of every matrix product to
/// 8 bits (the weights' `vec_dot_type`), so any change in attention, even the f16 rounding of
/// K and V, flips some of those roundings and moves the output by a fixed amount (KL
/// divergence ~0.004 on the default model, for dspark:f16 as for stock q8_0). With f16
/// weights the inputs round to f16 and what remains is the KV cache's own error.
pub fn f16_weights_copy(model: &Path, threads: usize) -> anyhow::Result<PathBuf> {
    let out = beside_model(model, ".f16-weights.gguf");
    if !out.is_file() {
        eprintln!("writing {} (the model with f16 weights; once, a few seconds)", out.display());
        crate::llama::write_f16_copy(model, &out, threads)?;
    }
    Ok(out)
}

/// The second model `scripts/setup.sh` fetches (Gemma 3 270M Q4_K_M: sliding-window layers,
/// head size 256, one KV head), relative to the current folder or to the source tree.
pub fn second_model_path() -> PathBuf {
    in_tree(SECOND_MODEL)
}

fn in_tree(rel: &str) -> PathBuf {
    let local = PathBuf::from(rel);
    if local.exists() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// All cores unless told otherwise.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub fn main_with(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Bench(a) => bench::bench(a),
        Command::Eval(a) => eval::eval(a),
        Command::Passkey(a) => passkey::passkey(a),
        Command::Calibrate(a) => calibrate::calibrate_cmd(a),
        Command::RpcServer(a) => rpc::serve(a),
        Command::Info => info::info(),
    }
}
