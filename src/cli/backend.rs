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
    /// The layers on these RPC servers (`host:port`), e.g. `dspark rpc-server`s, each of
    /// which keeps its layers' KV in the format it was started with.
    Rpc(Vec<String>),
}

impl BackendSpec {
    pub fn parse(s: &str) -> Result<BackendSpec> {
        let expected = || anyhow!("backend `{s}`: expected stock:<type>, dspark:<format> or rpc:<host:port>[+<host:port>...]");
        let (kind, arg) = s.split_once(':').ok_or_else(expected)?;
        match kind {
            "stock" => KvType::parse(arg).map(BackendSpec::Stock).ok_or_else(|| {
                anyhow!("backend `{s}`: unknown stock KV type `{arg}` (use f16, q8_0, q5_1, q5_0, iq4_nl, q4_0, or f32 for the exact reference)")
            }),
            "dspark" => Ok(BackendSpec::Dspark(arg.to_string())),
            "rpc" => Ok(BackendSpec::Rpc(arg.split('+').map(|e| check_endpoint(e).map_err(|e| anyhow!("backend `{s}`: {e}"))).collect::<Result<_>>()?)),
            _ => Err(expected()),
        }
    }

    /// Parses a comma-separated list.
    pub fn parse_list(s: &str) -> Result<Vec<BackendSpec>> {
        s.split(',').filter(|x| !x.trim().is_empty()).map(|x| BackendSpec::parse(x.trim())).collect()
    }
}

impl BackendSpec {
    /// Whether this is a DSpark configuration with a KV memory budget.
    pub fn has_budget(&self) -> bool {
        matches!(self, BackendSpec::Dspark(n) if dspark_config(n).is_ok_and(|c| c.kv_budget.is_some()))
    }

    /// Whether this is a DSpark configuration with an attention budget (page selection).
    pub fn has_attn_budget(&self) -> bool {
        matches!(self, BackendSpec::Dspark(n) if dspark_config(n).is_ok_and(|c| c.attn_budget > 0))
    }

    /// Whether a configuration named in a report has per-layer widths (`autoB` or
    /// `profile=FILE`).
    pub fn names_profile(name: &str) -> bool {
        matches!(BackendSpec::parse(name), Ok(BackendSpec::Dspark(n)) if auto_bits(&n).is_ok_and(|b| b.is_some()) || has_option(&n, "profile="))
    }

    /// Whether a configuration named in a report runs on RPC servers (`rpc:`), whose KV
    /// this process cannot measure.
    pub fn names_remote(name: &str) -> bool {
        matches!(BackendSpec::parse(name), Ok(BackendSpec::Rpc(_)))
    }

    /// [`BackendSpec::has_attn_budget`] of a configuration named in a report.
    pub fn names_attn_budget(name: &str) -> bool {
        BackendSpec::parse(name).is_ok_and(|s| s.has_attn_budget())
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::Stock(t) => write!(f, "stock:{}", t.name()),
            BackendSpec::Dspark(name) => write!(f, "dspark:{name}"),
            BackendSpec::Rpc(endpoints) => write!(f, "rpc:{}", endpoints.join("+")),
        }
    }
}

/// `endpoint` if it reads `host:port`.
pub fn check_endpoint(endpoint: &str) -> Result<String> {
    match endpoint.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(endpoint.to_string()),
        _ => bail!("RPC server `{endpoint}`: expected HOST:PORT, e.g. 127.0.0.1:50052"),
    }
}

/// The memory-budget and attention-budget flags of `run`, `bench`, `eval` and `passkey`:
/// defaults for every `dspark:` spec that does not set the option itself.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TierArgs {
    /// KV memory budget for DSpark configurations (e.g. 512M, 2G): compressed pages beyond it
    /// move to a spill file on disk (default: none). A spec's own `kv=` wins.
    #[arg(long)]
    pub kv_budget: Option<String>,
    /// Layers ahead whose cold pages the transfer stream reads while attention runs (0: read
    /// them when needed, synchronously) [default: 2]. A spec's own `prefetch=` wins.
    #[arg(long)]
    pub prefetch_depth: Option<usize>,
    /// Folder of the spill file (default: $DSPARK_SPILL_DIR, else the system temp folder).
    #[arg(long)]
    pub spill_dir: Option<PathBuf>,
    /// Attention budget for DSpark configurations: a decode step reads, per layer and KV head,
    /// the sink page, the f16 window and the best-scoring compressed pages up to this many
    /// tokens (0: every token, the default). A spec's own `attn=` wins.
    #[arg(long)]
    pub attn_budget: Option<usize>,
}

impl TierArgs {
    /// The specs with these defaults added to every `dspark:` spec that lacks them.
    pub fn apply(&self, specs: Vec<BackendSpec>) -> Vec<BackendSpec> {
        specs
            .into_iter()
            .map(|s| match s {
                BackendSpec::Dspark(mut name) => {
                    let defaults = [("kv=", self.kv_budget.clone()), ("prefetch=", self.prefetch_depth.map(|d| d.to_string())), ("attn=", self.attn_budget.map(|n| n.to_string()))];
                    for (key, value) in defaults {
                        if let Some(v) = value.filter(|_| !has_option(&name, key)) {
                            name += &format!(":{key}{v}");
                        }
                    }
                    BackendSpec::Dspark(name)
                }
                s => s,
            })
            .collect()
    }

    /// Makes `--spill-dir` the folder DSpark's devices spill to in this process (they read
    /// `DSPARK_SPILL_DIR`, as the plugin does). Call before any context exists.
    pub fn export_spill_dir(&self) {
        if let Some(d) = &self.spill_dir {
            std::env::set_var("DSPARK_SPILL_DIR", d);
        }
    }

    /// The spill folder in effect.
    pub fn spill_dir(&self) -> PathBuf {
        self.spill_dir.clone().or_else(|| std::env::var_os("DSPARK_SPILL_DIR").map(Into::into)).unwrap_or_else(std::env::temp_dir)
    }
}

/// Loads each model placement once and hands out contexts for backend configurations.
/// Every DSpark configuration is its own device, so it gets its own model (its layers
/// offloaded to that device); models load on first use.
pub struct Runner {
    path: PathBuf,
    stock: OnceLock<Model>,
    /// Append-only (models never move or drop while contexts may borrow them).
    dspark: elsa::sync::FrozenVec<Box<(ggml::Config, Model)>>,
    /// Models whose layers are on RPC servers, by the servers' endpoints.
    remote: elsa::sync::FrozenVec<Box<(Vec<String>, Model)>>,
    /// Shares of the layers for `rpc:` configurations, one per server (empty: equal).
    tensor_split: Vec<f32>,
}

/// The DSpark configuration for a `dspark:<format>[:key=value...]` spec (after `dspark:`).
/// For `autoB` the format is a placeholder until [`Runner::context`] calibrates a profile.
pub fn dspark_config(name: &str) -> Result<ggml::Config> {
    let spec = match auto_bits(name)? {
        Some(_) => format!("k4v4{}", name.find(':').map_or("", |i| &name[i..])),
        None => name.to_string(),
    };
    ggml::Config::default().with_spec(&spec).map_err(|e| {
        anyhow!("backend `dspark:{name}`: {e}; formats: f16 (no compression), {}, any k<b>v<b> (b from 2 to 8), autoB (a profile calibrated for an average of B bits per value) or profile=FILE", format_names().join(", "))
    })
}

/// Whether a `dspark:` spec (after `dspark:`) sets the option `key` (e.g. `"kv="`); a
/// profile may stand in the format's place, so every part counts.
fn has_option(name: &str, key: &str) -> bool {
    name.split(':').any(|o| o.trim_start().starts_with(key))
}

/// The bit budget of an `autoB[:options]` spec (`None` for other specs).
fn auto_bits(name: &str) -> Result<Option<f64>> {
    let Some(b) = name.split(':').next().and_then(|f| f.strip_prefix("auto")) else { return Ok(None) };
    match b.parse::<f64>() {
        Ok(bits) if bits.is_finite() && bits > 0.0 => Ok(Some(bits)),
        _ => bail!("backend `dspark:{name}`: `auto{b}`: expected autoB with B the average bits per value, e.g. auto3.5"),
    }
}

/// The DSpark formats this build offers, most accurate first.
pub fn format_names() -> Vec<String> {
    crate::codec::Format::ALL_PRESETS.iter().map(|f| f.name()).collect()
}

impl Runner {
    pub fn new(path: PathBuf) -> Runner {
        Runner { path, stock: OnceLock::new(), dspark: elsa::sync::FrozenVec::new(), remote: elsa::sync::FrozenVec::new(), tensor_split: Vec::new() }
    }

    /// Shares of the layers for `rpc:` configurations, one per server (as llama.cpp's
    /// `--tensor-split`); empty: equal shares.
    pub fn with_tensor_split(mut self, split: Vec<f32>) -> Runner {
        self.tensor_split = split;
        self
    }

    /// Refuses configurations this build cannot run, before any work starts.
    pub fn check(&self, spec: &BackendSpec) -> Result<()> {
        match spec {
            BackendSpec::Stock(_) => Ok(()),
            BackendSpec::Dspark(name) => dspark_config(name).map(|_| ()),
            BackendSpec::Rpc(e) if !self.tensor_split.is_empty() && self.tensor_split.len() != e.len() => {
                bail!("--tensor-split has {} shares for the {} servers of `{spec}`", self.tensor_split.len(), e.len())
            }
            BackendSpec::Rpc(_) => Ok(()),
        }
    }

    /// The model for `spec`: loaded on the CPU backend for stock configurations, with all
    /// layers offloaded to DSPARK0 (which keeps only the KV cache and attention) for DSpark.
    pub fn model(&self, spec: &BackendSpec) -> Result<&Model> {
        let cfg = match spec {
            BackendSpec::Stock(_) => {
                if let Some(m) = self.stock.get() {
                    return Ok(m);
                }
                let m = Model::load(&self.path, Placement::Cpu)?;
                return Ok(self.stock.get_or_init(|| m));
            }
            // An autoB spec's profile depends on the context; its tokenizer is the stock one.
            BackendSpec::Dspark(name) if auto_bits(name)?.is_some() => return self.model(&BackendSpec::Stock(KvType::F16)),
            BackendSpec::Dspark(name) => dspark_config(name)?,
            BackendSpec::Rpc(endpoints) => return self.remote_model(endpoints),
        };
        if let Some((_, m)) = self.dspark.iter().find(|(c, _)| *c == cfg) {
            return Ok(m);
        }
        let m = Model::load(&self.path, Placement::Offload(vec![ggml::register(cfg.clone())]))?;
        if let Some(p) = &cfg.profile {
            p.check_model(&super::calibrate::model_id(&m, &self.path)).map_err(|e| anyhow!("backend `{spec}`: {e}"))?;
        }
        Ok(&self.dspark.push_get(Box::new((cfg, m))).1)
    }

    /// The model with its layers on the RPC servers at `endpoints`.
    fn remote_model(&self, endpoints: &[String]) -> Result<&Model> {
        if let Some((_, m)) = self.remote.iter().find(|(e, _)| e == endpoints) {
            return Ok(m);
        }
        let mut devs = Vec::new();
        for e in endpoints {
            devs.extend(ggml::rpc::remote_devices(e).map_err(|e| anyhow!(e))?);
        }
        let split = if self.tensor_split.is_empty() { vec![1.0; devs.len()] } else { self.tensor_split.clone() };
        if split.len() != devs.len() {
            bail!("--tensor-split has {} shares for {} remote devices", split.len(), devs.len());
        }
        let m = Model::load(&self.path, Placement::Split(devs, split))?;
        Ok(&self.remote.push_get(Box::new((endpoints.to_vec(), m))).1)
    }

    /// `spec` with an `autoB` format replaced by its profile for a context of `p`'s size
    /// (calibrated now unless cached next to the model).
    fn resolve(&self, spec: &BackendSpec, p: &CtxParams) -> Result<BackendSpec> {
        let BackendSpec::Dspark(name) = spec else { return Ok(spec.clone()) };
        let Some(bits) = auto_bits(name)? else { return Ok(spec.clone()) };
        let cfg = dspark_config(name)?;
        let stock = self.model(&BackendSpec::Stock(KvType::F16))?;
        let cells = super::calibrate::layer_cells(stock, || self.model(&BackendSpec::Dspark("f16".into())), p.n_ctx as usize)?;
        let window = crate::profile::Window {
            cells: if has_option(name, "window=") { cfg.window } else { super::calibrate::AUTO_WINDOW },
            bits: if has_option(name, "window_bits=") { cfg.window_bits } else { super::calibrate::AUTO_WINDOW_BITS },
            recent: if has_option(name, "recent=") { cfg.recent } else { super::calibrate::auto_recent(&cells, bits) },
        };
        let path = super::calibrate::auto_profile(&self.path, &cells, bits, window, p.n_threads as usize)?;
        // The profile brings its window; the spec's other options follow it.
        let opts = name.split_once(':').map_or(String::new(), |(_, o)| format!(":{o}"));
        Ok(BackendSpec::Dspark(format!("profile={}{opts}", path.display())))
    }

    /// A fresh context of `n_ctx` cells for `spec`.
    pub fn context(&self, spec: &BackendSpec, n_ctx: usize, threads: usize) -> Result<Context<'_>> {
        self.context_with(spec, &CtxParams::new(n_ctx as u32, threads, KvType::F16))
    }

    /// A fresh context for `spec` with other parameters (its KV type comes from `spec`).
    pub fn context_with(&self, spec: &BackendSpec, p: &CtxParams) -> Result<Context<'_>> {
        let spec = &self.resolve(spec, p)?;
        let model = self.model(spec)?;
        match spec {
            BackendSpec::Stock(t) => Context::new(model, &CtxParams { kv: *t, ..p.clone() }),
            BackendSpec::Dspark(_) | BackendSpec::Rpc(_) => Context::new(model, &CtxParams { kv: KvType::F16, ..p.clone() }),
        }
    }

    /// Memory held for the KV cache of `ctx` right now (for DSpark: its pages).
    /// For stock, the bytes llama.cpp allocates for a context of `n_cells` cells (usually
    /// `ctx.n_ctx()`; a benchmark whose context holds room for a later step passes the cells
    /// its figure is about).
    pub fn kv_bytes(&self, ctx: &Context, n_cells: usize) -> usize {
        match ctx.model.devices().first() {
            Some(&dev) => ggml::Stats::of(dev).kv_bytes as usize,
            None => ctx.kv_cache_bytes(n_cells).map_or_else(|| ctx.model.stock_kv_bytes(ctx.kv_type(), n_cells), |b| b as usize),
        }
    }

    /// DSpark's statistics for the device `ctx`'s KV lives on (`None` for stock).
    pub fn dspark_stats(&self, ctx: &Context) -> Option<ggml::Stats> {
        ctx.model.devices().first().map(|&dev| ggml::Stats::of(dev))
    }

    /// Bits per stored K/V element of `ctx`, metadata included: the type's figure for
    /// stock, measured from the pages of the cells in use for DSpark.
    pub fn kv_bits_per_elem(&self, ctx: &Context) -> f64 {
        match ctx.model.devices().first() {
            Some(&dev) => ggml::Stats::of(dev).bits_per_elem(),
            None => ctx.kv_type().bits_per_elem(),
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
