//! Backend configurations (`stock:<kv type>`, `dspark:<format>`) and the models they run on.

use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};

use crate::ggml;
use crate::llama::{Context, CtxParams, KvType, Model, Placement};

/// One backend configuration to run or compare.
#[derive(Clone, Debug, PartialEq)]
pub enum BackendSpec {
    /// llama.cpp's CPU backend with this KV type, flash attention on.
    Stock(KvType),
    /// DSpark's DSPARK0 device with this compressed KV format name (e.g. "k4v4").
    Dspark(String),
}

impl BackendSpec {
    pub fn parse(s: &str) -> Result<BackendSpec> {
        let (kind, arg) = s.split_once(':').ok_or_else(|| anyhow!("backend `{s}`: expected stock:<type> or dspark:<format>"))?;
        match kind {
            "stock" => KvType::parse(arg).map(BackendSpec::Stock).ok_or_else(|| {
                anyhow!("backend `{s}`: unknown stock KV type `{arg}` (use f16, q8_0 or q4_0)")
            }),
            "dspark" => Ok(BackendSpec::Dspark(arg.to_string())),
            _ => bail!("backend `{s}`: expected stock:<type> or dspark:<format>"),
        }
    }

    /// Parses a comma-separated list.
    pub fn parse_list(s: &str) -> Result<Vec<BackendSpec>> {
        s.split(',').filter(|x| !x.trim().is_empty()).map(|x| BackendSpec::parse(x.trim())).collect()
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::Stock(t) => write!(f, "stock:{}", t.name()),
            BackendSpec::Dspark(name) => write!(f, "dspark:{name}"),
        }
    }
}

/// Loads each model placement once and hands out contexts for backend configurations.
pub struct Runner {
    path: PathBuf,
    stock: OnceLock<Model>,
    dspark: OnceLock<Model>,
}

/// The DSpark configuration for a `dspark:<format>` name.
pub fn dspark_config(name: &str) -> Result<ggml::Config> {
    ggml::Config::default().with_format_name(name).map_err(|e| {
        anyhow!("backend `dspark:{name}`: {e}; formats: f16 (no compression), {}", format_names().join(", "))
    })
}

/// The DSpark formats this build offers, most accurate first.
pub fn format_names() -> Vec<String> {
    crate::codec::Format::ALL_PRESETS.iter().map(|f| f.name()).collect()
}

impl Runner {
    pub fn new(path: PathBuf) -> Runner {
        Runner { path, stock: OnceLock::new(), dspark: OnceLock::new() }
    }

    /// Refuses configurations this build cannot run, before any work starts.
    pub fn check(&self, spec: &BackendSpec) -> Result<()> {
        match spec {
            BackendSpec::Stock(_) => Ok(()),
            BackendSpec::Dspark(name) => dspark_config(name).map(|_| ()),
        }
    }

    /// The model for `spec`: loaded on the CPU backend for stock configurations, with all
    /// layers offloaded to DSPARK0 (which keeps only the KV cache and attention) for DSpark.
    pub fn model(&self, spec: &BackendSpec) -> Result<&Model> {
        let (cell, placement) = match spec {
            BackendSpec::Stock(_) => (&self.stock, None),
            BackendSpec::Dspark(name) => (&self.dspark, Some(dspark_config(name)?)),
        };
        if let Some(m) = cell.get() {
            return Ok(m);
        }
        let m = match placement {
            None => Model::load(&self.path, Placement::Cpu)?,
            Some(cfg) => Model::load(&self.path, Placement::Offload(vec![ggml::register(cfg)]))?,
        };
        Ok(cell.get_or_init(|| m))
    }

    /// A fresh context of `n_ctx` cells for `spec`.
    pub fn context(&self, spec: &BackendSpec, n_ctx: usize, threads: usize) -> Result<Context<'_>> {
        let model = self.model(spec)?;
        let kv = match spec {
            BackendSpec::Stock(t) => *t,
            BackendSpec::Dspark(name) => {
                // The format applies to the KV caches allocated from now on.
                ggml::set_config(dspark_config(name)?);
                KvType::F16
            }
        };
        Context::new(model, &CtxParams::new(n_ctx as u32, threads, kv))
    }

    /// Memory held for the KV cache right now (for DSpark: its pages, which belong to the
    /// one live DSpark context).
    pub fn kv_bytes(&self, spec: &BackendSpec, ctx: &Context) -> usize {
        match spec {
            BackendSpec::Stock(t) => ctx.model.stock_kv_bytes(*t, ctx.n_ctx()),
            BackendSpec::Dspark(_) => ggml::Stats::now().kv_bytes as usize,
        }
    }

    /// Bits per stored K/V element, metadata included: the type's figure for stock, measured
    /// from the pages of the cells in use for DSpark.
    pub fn kv_bits_per_elem(&self, spec: &BackendSpec) -> f64 {
        match spec {
            BackendSpec::Stock(t) => t.bits_per_elem(),
            BackendSpec::Dspark(_) => ggml::Stats::now().bits_per_elem(),
        }
    }
}

/// Peak resident memory of this process since the last `reset_peak_rss`, in bytes.
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resets the kernel's peak-RSS mark, so that each configuration reports its own peak.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
