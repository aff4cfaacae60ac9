//! DSpark attention and compression against ggml's CPU `ggml_flash_attn_ext`, side by side.
//!
//! `cargo bench --bench attn` runs decode (1 query) for f16 rows and every preset, ggml f16 and
//! ggml q4_0, at depths 512/4096/8192/16384, for (d=64, 9 q / 3 kv heads) and (d=128, 32/8);
//! prefill (512 queries, causal mask) for f16, k4v4 and k4v3 against ggml f16 and q4_0 at
//! 512/4096/8192 (add 16384 with `DSPARK_BENCH_FULL=1`); and compression throughput. It ends
//! with a table of ratios (ggml time / DSpark time) and the effective GB/s of KV read.
//! `DSPARK_BENCH_THREADS` sets the thread count of both sides (default 2),
//! `DSPARK_BENCH_FILTER` keeps only benchmarks whose id contains it.
//!
//! The quick mode (`DSPARK_BENCH_QUICK=1`, see [`quick`]) first measures the machine's read
//! bandwidth with a STREAM-like probe ([`read_bandwidth`]), so that the kernels' GB/s of KV
//! read can be put against it.

use criterion::{BenchmarkId, Criterion, Throughput};
use dspark::attn::{self, FaParams, Mask, Rows, Segment};
use dspark::codec::{Format, Quant, RowCodec};
use half::f16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Duration;

/// f16 rows kept at the start (attention sinks) and at the end (recent window) of a sequence
/// stored in a compressed format.
const SINKS: usize = 4;
const WINDOW: usize = 64;

#[derive(Clone, Copy, Debug)]
struct Shape {
    name: &'static str,
    d: usize,
    n_head: usize,
    n_kv: usize,
}

const SHAPES: [Shape; 2] = [
    Shape { name: "d64_9x3", d: 64, n_head: 9, n_kv: 3 },
    Shape { name: "d128_32x8", d: 128, n_head: 32, n_kv: 8 },
];

fn threads() -> usize {
    std::env::var("DSPARK_BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

fn full() -> bool {
    std::env::var("DSPARK_BENCH_FULL").is_ok_and(|v| v == "1")
}

fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.gen_range(1e-7..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// K and V of every KV head as f32, `[kv head][cell][d]`.
struct Data {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

fn data(s: Shape, depth: usize) -> Data {
    let mut rng = StdRng::seed_from_u64(depth as u64);
    let gen = |rng: &mut StdRng, outliers: bool| -> Vec<f32> {
        (0..depth * s.d)
            .map(|i| gaussian(rng) * if outliers && i % s.d == 7 { 10.0 } else { 1.0 })
            .collect()
    };
    Data {
        k: (0..s.n_kv).map(|_| gen(&mut rng, true)).collect(),
        v: (0..s.n_kv).map(|_| gen(&mut rng, false)).collect(),
    }
}

/// One KV head stored the DSpark way.
enum Store {
    F16(Vec<f16>),
    Packed(RowCodec, Vec<u8>),
}

impl Store {
    fn new(x: &[f32], q: Option<Quant>, d: usize) -> Store {
        match q {
            None => Store::F16(x.iter().map(|v| f16::from_f32(*v)).collect()),
            Some(q) => {
                let c = RowCodec::new(q, d).unwrap();
                let mut out = vec![0u8; x.len() / d * c.row_bytes()];
                c.encode_rows(x, &mut out);
                Store::Packed(c, out)
            }
        }
    }

    fn rows(&self) -> Rows<'_> {
        match self {
            Store::F16(v) => Rows::F16(v),
            Store::Packed(c, d) => Rows::Packed { codec: c, data: d, center: None },
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Store::F16(v) => v.len() * 2,
            Store::Packed(_, d) => d.len(),
        }
    }
}

/// A KV head: segments (first cell, K, V).
struct Head(Vec<(usize, Store, Store)>);

/// The DSpark KV of one layer: f16 everywhere, or sinks + compressed body + recent window.
struct DsKv {
    heads: Vec<Head>,
}

impl DsKv {
    fn new(s: Shape, data: &Data, fmt: Option<Format>) -> DsKv {
        let depth = data.k[0].len() / s.d;
        let heads = (0..s.n_kv)
            .map(|h| {
                let (k, v) = (&data.k[h], &data.v[h]);
                let Some(f) = fmt.filter(|_| depth > SINKS + WINDOW) else {
                    return Head(vec![(0, Store::new(k, None, s.d), Store::new(v, None, s.d))]);
                };
                let cuts = [0, SINKS, depth - WINDOW, depth];
                let kinds = [(None, None), (Some(f.k), Some(f.v)), (None, None)];
                Head(
                    kinds
                        .iter()
                        .enumerate()
                        .map(|(i, (kq, vq))| {
                            let (a, b) = (cuts[i] * s.d, cuts[i + 1] * s.d);
                            (cuts[i], Store::new(&k[a..b], *kq, s.d), Store::new(&v[a..b], *vq, s.d))
                        })
                        .collect(),
                )
            })
            .collect();
        DsKv { heads }
    }

    fn segments(&self, d: usize) -> Vec<Vec<Segment<'_>>> {
        self.heads
            .iter()
            .map(|h| {
                h.0.iter()
                    .map(|(c, k, v)| Segment { first_cell: *c, n: k.rows().len(d), k: k.rows(), v: v.rows() })
                    .collect()
            })
            .collect()
    }

    fn bytes(&self) -> usize {
        self.heads.iter().flat_map(|h| &h.0).map(|(_, k, v)| k.bytes() + v.bytes()).sum()
    }
}

/// Causal mask of `n_q` queries that are the last `n_q` cells of `depth` (all zeros for 1).
fn causal_mask(n_q: usize, depth: usize) -> Vec<f16> {
    (0..n_q)
        .flat_map(|i| {
            (0..depth).map(move |c| if c + n_q <= depth + i { f16::ZERO } else { f16::NEG_INFINITY })
        })
        .collect()
}

fn queries(s: Shape, n_q: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(99);
    (0..n_q * s.n_head * s.d).map(|_| gaussian(&mut rng)).collect()
}

mod ggml {
    //! ggml's CPU flash attention through llama-cpp-sys-2, on the same shapes and data.
    use half::f16;
    use llama_cpp_sys_2 as sys;
    use std::ffi::{c_int, c_void};
    use std::ptr::null_mut;

    /// A built FLASH_ATTN_EXT graph on ggml's CPU backend with its inputs uploaded.
    pub struct Fa {
        ctx: *mut sys::ggml_context,
        backend: sys::ggml_backend_t,
        buffer: sys::ggml_backend_buffer_t,
        graph: *mut sys::ggml_cgraph,
        threadpool: *mut sys::ggml_threadpool,
        pub kv_bytes: usize,
    }

    type SetThreads = unsafe extern "C" fn(sys::ggml_backend_t, c_int);

    impl Fa {
        /// `k`/`v`: `[kv head][cell][d]` f32, stored as `kv_type` (F16 or Q4_0).
        #[allow(clippy::too_many_arguments)]
        pub fn new(
            d: usize,
            n_head: usize,
            n_kv: usize,
            n_q: usize,
            q: &[f32],
            k: &[Vec<f32>],
            v: &[Vec<f32>],
            mask: &[f16],
            kv_type: sys::ggml_type,
            threads: usize,
        ) -> Fa {
            let depth = k[0].len() / d;
            let (di, dp, nq, nh, nkv) = (d as i64, depth as i64, n_q as i64, n_head as i64, n_kv as i64);
            // SAFETY: plain ggml API use: every pointer passed comes from ggml itself or from a
            // live Rust slice whose length matches the tensor's byte size (checked below), and
            // the context/backend/buffer are freed exactly once in `Drop`.
            unsafe {
                let params = sys::ggml_init_params {
                    mem_size: sys::ggml_tensor_overhead() * 16 + sys::ggml_graph_overhead(),
                    mem_buffer: null_mut(),
                    no_alloc: true,
                };
                let ctx = sys::ggml_init(params);
                assert!(!ctx.is_null(), "ggml_init");
                let tq = sys::ggml_new_tensor_4d(ctx, sys::GGML_TYPE_F32, di, nq, nh, 1);
                let tk = sys::ggml_new_tensor_4d(ctx, kv_type, di, dp, nkv, 1);
                let tv = sys::ggml_new_tensor_4d(ctx, kv_type, di, dp, nkv, 1);
                let tm = sys::ggml_new_tensor_4d(ctx, sys::GGML_TYPE_F16, dp, nq, 1, 1);
                #[allow(clippy::cast_precision_loss)]
                let scale = 1.0 / (d as f32).sqrt();
                let fa = sys::ggml_flash_attn_ext(ctx, tq, tk, tv, tm, scale, 0.0, 0.0);
                sys::ggml_flash_attn_ext_set_prec(fa, sys::GGML_PREC_F32);
                let graph = sys::ggml_new_graph(ctx);
                sys::ggml_build_forward_expand(graph, fa);

                let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
                assert!(!dev.is_null(), "no ggml CPU device");
                let backend = sys::ggml_backend_dev_init(dev, std::ptr::null());
                assert!(!backend.is_null(), "ggml CPU backend init");
                let reg = sys::ggml_backend_dev_backend_reg(dev);
                let f = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_backend_set_n_threads".as_ptr());
                assert!(!f.is_null(), "ggml_backend_set_n_threads");
                let set_threads: SetThreads = std::mem::transmute(f);
                set_threads(backend, c_int::try_from(threads).unwrap());
                // A persistent threadpool, as llama_context attaches one: without it ggml
                // creates and joins its threads on every graph_compute.
                let mut tpp = sys::ggml_threadpool_params_default(c_int::try_from(threads).unwrap());
                let threadpool = sys::ggml_threadpool_new(&mut tpp);
                assert!(!threadpool.is_null(), "ggml_threadpool_new");
                sys::ggml_backend_cpu_set_threadpool(backend, threadpool);
                let buffer = sys::ggml_backend_alloc_ctx_tensors(ctx, backend);
                assert!(!buffer.is_null(), "ggml buffer");

                upload(tq, q.as_ptr().cast(), q.len() * 4);
                upload(tm, mask.as_ptr().cast(), mask.len() * 2);
                let mut kv_bytes = 0;
                for (t, x) in [(tk, k), (tv, v)] {
                    let flat: Vec<f32> = x.iter().flatten().copied().collect();
                    let bytes = encode(&flat, kv_type, d);
                    upload(t, bytes.as_ptr().cast(), bytes.len());
                    kv_bytes += bytes.len();
                }
                Fa { ctx, backend, buffer, graph, threadpool, kv_bytes }
            }
        }

        pub fn run(&self) {
            // SAFETY: the graph and backend are alive until `Drop`.
            let st = unsafe { sys::ggml_backend_graph_compute(self.backend, self.graph) };
            assert_eq!(st, sys::GGML_STATUS_SUCCESS, "ggml_backend_graph_compute");
        }
    }

    /// # Safety
    /// `t` is an allocated tensor of exactly `len` bytes and `src` points to `len` bytes.
    unsafe fn upload(t: *mut sys::ggml_tensor, src: *const c_void, len: usize) {
        // SAFETY: guaranteed by the caller.
        unsafe {
            assert_eq!(sys::ggml_nbytes(t), len, "tensor size");
            sys::ggml_backend_tensor_set(t, src, 0, len);
        }
    }

    fn encode(x: &[f32], ty: sys::ggml_type, d: usize) -> Vec<u8> {
        if ty == sys::GGML_TYPE_F16 {
            return x.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        }
        let rows = x.len() / d;
        // SAFETY: ggml_row_size is a pure size query.
        let rb = unsafe { sys::ggml_row_size(ty, d as i64) };
        let mut out = vec![0u8; rows * rb];
        // SAFETY: `x` holds rows·d floats and `out` rows·row_size bytes, as ggml requires.
        let n = unsafe {
            sys::ggml_quantize_chunk(ty, x.as_ptr(), out.as_mut_ptr().cast(), 0, rows as i64, d as i64, std::ptr::null())
        };
        assert_eq!(n, out.len());
        out
    }

    impl Drop for Fa {
        fn drop(&mut self) {
            // SAFETY: each handle was created in `new` and is freed once, buffer before backend.
            unsafe {
                sys::ggml_backend_buffer_free(self.buffer);
                sys::ggml_backend_free(self.backend);
                sys::ggml_threadpool_free(self.threadpool);
                sys::ggml_free(self.ctx);
            }
        }
    }

    pub const F16: sys::ggml_type = sys::GGML_TYPE_F16;
    pub const Q4_0: sys::ggml_type = sys::GGML_TYPE_Q4_0;
}

/// One measured configuration, for the closing table.
struct Row {
    kind: &'static str,
    shape: &'static str,
    depth: usize,
    id: String,
    bytes: usize,
}

fn criterion_config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

fn keep(id: &str) -> bool {
    std::env::var("DSPARK_BENCH_FILTER").map_or(true, |f| id.contains(&f))
}

#[allow(clippy::too_many_lines)]
fn bench_attention(c: &mut Criterion, kind: &'static str, n_q: usize, depths: &[usize], fmts: &[Option<Format>], rows: &mut Vec<Row>) {
    let nt = threads();
    let workers = attn::Workers::new(nt);
    for s in SHAPES {
        let mut g = c.benchmark_group(format!("{kind}/{}", s.name));
        for &depth in depths {
            let data = data(s, depth);
            let q = queries(s, n_q);
            let mask = causal_mask(n_q, depth);
            #[allow(clippy::cast_precision_loss)]
            let p = FaParams { scale: 1.0 / (s.d as f32).sqrt(), max_bias: 0.0, softcap: 0.0 };
            let mut out = vec![0.0f32; q.len()];
            for &fmt in fmts {
                let name = fmt.map_or("dspark_f16".to_string(), |f| format!("dspark_{}", f.name()));
                let id = format!("{kind}/{}/{name}/{depth}", s.name);
                if !keep(&id) {
                    continue;
                }
                let kv = DsKv::new(s, &data, fmt);
                let segs = kv.segments(s.d);
                g.throughput(Throughput::Bytes(kv.bytes() as u64));
                g.bench_with_input(BenchmarkId::new(name, depth), &depth, |b, _| {
                    b.iter(|| {
                        let m = Mask { data: &mask, stride: depth };
                        attn::flash_attn(&q, n_q, s.n_head, s.d, &segs, Some(m), None, &p, workers.all(), &mut out);
                    });
                });
                rows.push(Row { kind, shape: s.name, depth, id, bytes: kv.bytes() });
            }
            for (name, ty) in [("ggml_f16", ggml::F16), ("ggml_q4_0", ggml::Q4_0)] {
                let id = format!("{kind}/{}/{name}/{depth}", s.name);
                if !keep(&id) {
                    continue;
                }
                let fa = ggml::Fa::new(s.d, s.n_head, s.n_kv, n_q, &q, &data.k, &data.v, &mask, ty, nt);
                g.throughput(Throughput::Bytes(fa.kv_bytes as u64));
                g.bench_with_input(BenchmarkId::new(name, depth), &depth, |b, _| b.iter(|| fa.run()));
                rows.push(Row { kind, shape: s.name, depth, id, bytes: fa.kv_bytes });
            }
        }
        g.finish();
    }
}

fn bench_compression(c: &mut Criterion) {
    let mut g = c.benchmark_group("compress");
    for d in [64, 128] {
        let mut rng = StdRng::seed_from_u64(5);
        let n = 1024;
        let x: Vec<f32> = (0..n * d).map(|_| gaussian(&mut rng)).collect();
        for q in Quant::ALL {
            let id = format!("compress/encode_q{}_d{d}", q.bits());
            if !keep(&id) {
                continue;
            }
            let codec = RowCodec::new(q, d).unwrap();
            let mut out = vec![0u8; n * codec.row_bytes()];
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(format!("encode_q{}_d{d}", q.bits()), |b| b.iter(|| codec.encode_rows(&x, &mut out)));
        }
    }
    g.finish();
}

/// Mean time of a benchmark from criterion's saved estimates, in seconds.
fn mean_s(id: &str) -> Option<f64> {
    let parts: Vec<&str> = id.split('/').collect();
    let dir = format!("target/criterion/{}_{}/{}/{}/new/estimates.json", parts[0], parts[1], parts[2], parts[3]);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let text = std::fs::read_to_string(dir).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64().map(|ns| ns * 1e-9)
}

fn table(rows: &[Row]) {
    println!("\n## Ratios (ggml time / DSpark time; > 1 means DSpark is faster), {} threads, ISA {}", threads(), attn::active_isa());
    println!("| op | shape | depth | DSpark variant | time | KV MB | GB/s | vs ggml f16 | vs ggml q4_0 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows.iter().filter(|r| r.id.contains("/dspark_")) {
        let Some(t) = mean_s(&r.id) else { continue };
        let base = |name: &str| {
            let id = format!("{}/{}/{name}/{}", r.kind, r.shape, r.depth);
            mean_s(&id).map_or("-".to_string(), |g| format!("{:.2}x", g / t))
        };
        let variant = r.id.split('/').nth(2).unwrap_or("");
        #[allow(clippy::cast_precision_loss)]
        let (mb, gbs) = (r.bytes as f64 / 1e6, r.bytes as f64 / t / 1e9);
        println!(
            "| {} | {} | {} | {} | {:.3} ms | {mb:.1} | {gbs:.1} | {} | {} |",
            r.kind,
            r.shape,
            r.depth,
            variant.trim_start_matches("dspark_"),
            t * 1e3,
            base("ggml_f16"),
            base("ggml_q4_0")
        );
    }
    for r in rows.iter().filter(|r| r.id.contains("/ggml_")) {
        if let Some(t) = mean_s(&r.id) {
            #[allow(clippy::cast_precision_loss)]
            let gbs = r.bytes as f64 / t / 1e9;
            println!("| {} | {} | {} | ({}) | {:.3} ms | {:.1} | {gbs:.1} | | |", r.kind, r.shape, r.depth, r.id.split('/').nth(2).unwrap_or(""), t * 1e3, r.bytes as f64 / 1e6);
        }
    }
}

/// `DSPARK_BENCH_QUICK=1`: decode only, every variant of a (shape, depth) run in interleaved
/// rounds inside one process, reporting the median and the minimum time per call over the
/// rounds, which resists a noisy, shared machine better than criterion's means.
/// `DSPARK_BENCH_DEPTHS` (default `4096,8192`) and `DSPARK_BENCH_ROUNDS` (default 15) tune it;
/// `DSPARK_BENCH_FILTER` applies to the ids as usual.
fn quick() {
    use std::time::Instant;
    let nt = threads();
    let workers = attn::Workers::new(nt);
    let depths: Vec<usize> = std::env::var("DSPARK_BENCH_DEPTHS")
        .ok()
        .map_or_else(|| vec![4096, 8192], |v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let rounds: usize = std::env::var("DSPARK_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    let mut fmts: Vec<Option<Format>> = vec![None];
    fmts.extend(Format::ALL_PRESETS.iter().copied().map(Some));
    fmts.extend(["k5v5", "k6v6", "k7v7", "k3v3"].map(|f| Format::parse(f).ok()));
    let clock = if nt == 1 { "thread CPU time" } else { "wall time" };
    let (mem, cache) = (read_bandwidth(512 << 20, nt), read_bandwidth(4 << 20, nt));
    println!("## Read bandwidth, {nt} threads (STREAM-like sum): {mem:.1} GB/s from a 512 MiB buffer (memory), {cache:.1} GB/s from a 4 MiB one (caches)\n");
    println!("## Decode, {nt} threads, ISA {}, {rounds} interleaved rounds (median / min {clock} per call)", attn::active_isa());
    println!("A call reads one layer's KV, the same each round, so it is cache-resident here; in a model every layer's KV is read once per token. \"of memory\": GB/s over the 512 MiB probe's.");
    println!("| shape | depth | variant | median | min | KV MB | GB/s (median) | of memory | vs ggml f16 | vs ggml q4_0 |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in SHAPES {
        for &depth in &depths {
            let data = data(s, depth);
            let q = queries(s, 1);
            let mask = causal_mask(1, depth);
            #[allow(clippy::cast_precision_loss)]
            let p = FaParams { scale: 1.0 / (s.d as f32).sqrt(), max_bias: 0.0, softcap: 0.0 };
            type Runner<'a> = Box<dyn FnMut() + 'a>;
            let mut names: Vec<String> = Vec::new();
            let mut bytes: Vec<usize> = Vec::new();
            let kvs: Vec<(String, DsKv)> = fmts
                .iter()
                .map(|f| (f.map_or("f16".to_string(), |f| f.name()), DsKv::new(s, &data, *f)))
                .filter(|(n, _)| keep(&format!("decode/{}/dspark_{n}/{depth}", s.name)))
                .collect();
            let ggmls: Vec<(String, ggml::Fa)> = [("ggml_f16", ggml::F16), ("ggml_q4_0", ggml::Q4_0)]
                .iter()
                .filter(|(n, _)| keep(&format!("decode/{}/{n}/{depth}", s.name)))
                .map(|(n, ty)| ((*n).to_string(), ggml::Fa::new(s.d, s.n_head, s.n_kv, 1, &q, &data.k, &data.v, &mask, *ty, nt)))
                .collect();
            let segs: Vec<Vec<Vec<Segment>>> = kvs.iter().map(|(_, kv)| kv.segments(s.d)).collect();
            let mut outs: Vec<Vec<f32>> = kvs.iter().map(|_| vec![0.0f32; q.len()]).collect();
            let mut runners: Vec<Runner> = Vec::new();
            for (((name, kv), seg), out) in kvs.iter().zip(&segs).zip(outs.iter_mut()) {
                names.push(name.clone());
                bytes.push(kv.bytes());
                let (q, mask, p, workers) = (&q, &mask, &p, &workers);
                runners.push(Box::new(move || {
                    let m = Mask { data: mask, stride: depth };
                    attn::flash_attn(q, 1, s.n_head, s.d, seg, Some(m), None, p, workers.all(), out);
                }));
            }
            for (name, fa) in &ggmls {
                names.push(format!("({name})"));
                bytes.push(fa.kv_bytes);
                runners.push(Box::new(move || fa.run()));
            }
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); runners.len()];
            for _ in 0..rounds {
                for (r, t) in runners.iter_mut().zip(times.iter_mut()) {
                    r(); // warm
                    let start = Instant::now();
                    let cpu0 = thread_cpu_s();
                    let mut iters = 0u32;
                    while start.elapsed().as_secs_f64() < 0.02 || iters < 3 {
                        r();
                        iters += 1;
                    }
                    // With one thread everything runs on this thread: its CPU time does not
                    // count the time other processes took the core from us.
                    let dt = if nt == 1 { thread_cpu_s() - cpu0 } else { start.elapsed().as_secs_f64() };
                    t.push(dt / f64::from(iters));
                }
            }
            let stat = |t: &mut Vec<f64>| {
                t.sort_by(f64::total_cmp);
                (t[t.len() / 2], t[0])
            };
            let stats: Vec<(f64, f64)> = times.iter_mut().map(stat).collect();
            let base = |n: &str| names.iter().position(|x| x == n).map(|i| stats[i].0);
            let (gf, gq) = (base("(ggml_f16)"), base("(ggml_q4_0)"));
            for (i, n) in names.iter().enumerate() {
                let (med, min) = stats[i];
                let ratio = |b: Option<f64>| b.map_or("-".to_string(), |b| format!("{:.2}x", b / med));
                #[allow(clippy::cast_precision_loss)]
                let (mb, gbs) = (bytes[i] as f64 / 1e6, bytes[i] as f64 / med / 1e9);
                let (rf, rq) = if n.starts_with('(') { (String::new(), String::new()) } else { (ratio(gf), ratio(gq)) };
                println!("| {} | {depth} | {n} | {:.3} ms | {:.3} ms | {mb:.1} | {gbs:.1} | {:.0}% | {rf} | {rq} |", s.name, med * 1e3, min * 1e3, 100.0 * gbs / mem);
            }
        }
    }
}

/// Read bandwidth in GB/s with `threads` threads, STREAM-like: each thread sums its share of
/// a buffer of `bytes` (written first, so its pages exist), best of 5 passes. A buffer much
/// larger than the caches measures memory; one of a layer's KV size, the caches.
fn read_bandwidth(bytes: usize, threads: usize) -> f64 {
    let buf: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let chunk = buf.len().div_ceil(threads);
    let passes = if bytes > 64 << 20 { 5 } else { 200 };
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        let total: u64 = std::thread::scope(|sc| {
            let hs: Vec<_> = buf
                .chunks(chunk)
                .map(|c| sc.spawn(move || (0..passes).map(|_| c.iter().fold(0u64, |a, &x| a.wrapping_add(x))).fold(0u64, u64::wrapping_add)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.min(start.elapsed().as_secs_f64() / f64::from(passes));
    }
    #[allow(clippy::cast_precision_loss)]
    let gbs = bytes as f64 / best / 1e9;
    gbs
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    #[allow(clippy::cast_precision_loss)]
    let t = ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
    t
}

fn main() {
    if std::env::var("DSPARK_BENCH_QUICK").is_ok_and(|v| v == "1") {
        quick();
        return;
    }
    let mut c = criterion_config().configure_from_args();
    let mut rows = Vec::new();
    let mut all: Vec<Option<Format>> = vec![None];
    all.extend(Format::ALL_PRESETS.iter().copied().map(Some));
    // Widths without SIMD decoders (per-layer profiles use them): what the generic path costs.
    all.extend(["k5v5", "k6v6"].map(|f| Format::parse(f).ok()));
    bench_attention(&mut c, "decode", 1, &[512, 4096, 8192, 16384], &all, &mut rows);
    let prefill_depths: &[usize] = if full() { &[512, 4096, 8192, 16384] } else { &[512, 4096, 8192] };
    let pre = [None, Some(Format::parse("k4v4").unwrap()), Some(Format::parse("k4v3").unwrap())];
    bench_attention(&mut c, "prefill", 512, prefill_depths, &pre, &mut rows);
    bench_compression(&mut c);
    c.final_summary();
    table(&rows);
}
