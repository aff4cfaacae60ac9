//! `dspark rpc-server`: DSPARK0 served to other machines through llama.cpp's RPC backend, and
//! `--rpc`, which places a model's layers on such servers (an `rpc:` configuration).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::backend::{check_endpoint, dspark_config, BackendSpec, TierArgs};
use super::default_threads;
use crate::ggml;

/// llama.cpp's rpc-server port.
pub const DEFAULT_PORT: u16 = 50052;

#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on. ggml's RPC protocol has no authentication or encryption: whoever
    /// reaches the port runs graphs on this machine. Listen elsewhere than on loopback only
    /// on a network where every machine is trusted.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// KV format of the layers clients place here, as after `dspark:` (k4v4, k8v8, any
    /// k<b>v<b>, profile=FILE, with options such as k4v4:kv=256M).
    #[arg(long, default_value = "k4v4")]
    pub format: String,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub tier: TierArgs,
}

/// Serves one DSPARK0 device until the process is stopped. Every client's KV is compressed
/// as `--format` says, whatever the client asks for (it asks for f16 KV: DSpark's device
/// stores f16 KV compressed).
pub fn serve(a: ServerArgs) -> Result<()> {
    let Some(BackendSpec::Dspark(format)) = a.tier.apply(vec![BackendSpec::Dspark(a.format.clone())]).pop() else { unreachable!() };
    if format.starts_with("auto") {
        bail!("--format {format}: an auto format is calibrated for one model, which a server does not know; run `dspark calibrate -m MODEL --bits B -o FILE` and serve --format profile=FILE");
    }
    let cfg = dspark_config(&format)?;
    a.tier.export_spill_dir();
    let endpoint = format!("{}:{}", a.host, a.port);
    check_endpoint(&endpoint)?;
    // ggml's server only prints "Failed to create server socket": say why first.
    std::net::TcpListener::bind((a.host.as_str(), a.port)).map_err(|e| anyhow!("cannot listen on {endpoint}: {e}"))?;
    if !is_loopback(&a.host) {
        eprintln!("dspark: warning: listening on {endpoint}: ggml's RPC protocol has no authentication or encryption; anyone who reaches this port can run graphs on this machine");
    }
    crate::llama::init();
    let dev = ggml::register(cfg);
    let threads = a.threads.unwrap_or_else(default_threads);
    eprintln!("dspark rpc-server: DSPARK0 (dspark:{format}) on {endpoint}, {threads} threads; use it with `--rpc {endpoint}` (dspark run/bench/eval and llama.cpp's tools)");
    report_kv(dev);
    ggml::rpc::serve(&endpoint, threads, dev).map_err(|e| anyhow!(e))
}

/// Prints the device's KV memory as it changes, at most every 2 s, and the last figure before
/// it empties (a client left), so that a server's share of a model's KV can be read off its log.
fn report_kv(dev: llama_cpp_sys_2::ggml_backend_dev_t) {
    let dev = dev as usize; // a device lives for the process; ggml shares it across threads
    std::thread::spawn(move || {
        // (bytes, cells, bits per value) last printed and last seen
        let (mut shown, mut seen) = ((0, 0, 0.0), (0, 0, 0.0));
        let mut last_print = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let s = ggml::Stats::of(dev as llama_cpp_sys_2::ggml_backend_dev_t);
            let now = (s.kv_bytes, s.cells, s.bits_per_elem());
            let emptied = now.1 == 0 && seen.1 != 0;
            if emptied && (seen.0, seen.1) != (shown.0, shown.1) {
                print_kv(seen);
            }
            if (now.0, now.1) != (shown.0, shown.1) && (emptied || last_print.elapsed() >= Duration::from_secs(2)) {
                print_kv(now);
                (shown, last_print) = (now, Instant::now());
            }
            seen = now;
        }
    });
}

fn print_kv((bytes, cells, bits): (u64, u64, f64)) {
    match cells {
        0 => eprintln!("dspark rpc-server: KV empty"),
        _ => eprintln!("dspark rpc-server: KV {:.2} MiB in {cells} K and V rows ({bits:.2} bits per value)", bytes as f64 / (1 << 20) as f64),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `--rpc` and `--tensor-split` of `run`, `bench` and `eval`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RemoteArgs {
    /// Comma-separated RPC servers (HOST:PORT) to place the model's layers on, as llama.cpp's
    /// `--rpc` does: adds the configuration rpc:HOST:PORT+HOST:PORT... Start the servers with
    /// `dspark rpc-server`; each keeps its layers' KV in its own --format.
    #[arg(long)]
    pub rpc: Option<String>,
    /// Shares of the layers per RPC server, comma-separated (e.g. 1,3); default: equal.
    #[arg(long, value_delimiter = ',')]
    pub tensor_split: Vec<f32>,
}

impl RemoteArgs {
    /// The `rpc:` configuration `--rpc` names, if any.
    pub fn spec(&self) -> Result<Option<BackendSpec>> {
        self.rpc.as_ref().map(|r| BackendSpec::parse(&format!("rpc:{}", r.replace(',', "+")))).transpose()
    }
}
