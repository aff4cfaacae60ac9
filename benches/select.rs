//! The cost of choosing pages under an attention budget (`KvStore::select`), per decode token.
//!
//! `cargo bench --bench select` builds one K store shaped like a layer of the default model
//! (3 KV heads, head size 64, 9 query heads, k4 centred pages with digests) at depths 8192,
//! 16384 and 32768, 30 of them as the layers of a model, and times `select` of each for one
//! decode query (and its mask, all cells visible, as llama.cpp passes it) with a budget of 2048
//! cells on 2 threads (`DSPARK_BENCH_THREADS`; `DSPARK_BENCH_DEPTHS=32768` picks depths), and
//! serially. It prints milliseconds per token: the time a token spends choosing before it
//! reads anything.

use dspark::attn::{Mask, Threads, Workers};
use dspark::codec::Quant;
use dspark::kv::select::Unit;
use dspark::kv::{KvStore, StoreConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

const HEADS: usize = 3;
const D: usize = 64;
const Q_HEADS: usize = 9;
const LAYERS: usize = 30;
const BUDGET: usize = 2048;

/// A K store of `depth` cells whose rows have a per-channel offset and scale and drift
/// slowly with the position, the shape of real post-RoPE keys.
fn store(depth: usize, rng: &mut StdRng) -> KvStore {
    let cfg = StoreConfig { quant: Some(Quant::Q4), window: 128, digests: true, centered: true, window_quant: None, recent: 0 };
    let mut s = KvStore::new(cfg, HEADS, D, depth, 1).expect("store");
    let offset: Vec<f32> = (0..HEADS * D).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let scale: Vec<f32> = (0..HEADS * D).map(|i| if i % 16 == 3 { 6.0 } else { rng.gen_range(0.5..1.5) }).collect();
    let mut row = vec![0.0f32; HEADS * D];
    for c in 0..depth {
        for (i, x) in row.iter_mut().enumerate() {
            let drift = ((c as f32) / (50.0 + i as f32)).sin();
            *x = offset[i] + scale[i] * (0.7 * drift + 0.5 * rng.gen_range(-1.0f32..1.0));
        }
        s.write_row(c, &row);
    }
    s
}

fn main() {
    let n_threads = std::env::var("DSPARK_BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let workers = Workers::new(n_threads);
    let mut rng = StdRng::seed_from_u64(7);
    println!("select, {LAYERS} layers of {HEADS} KV heads x d {D}, {Q_HEADS} query heads, budget {BUDGET}, {n_threads} threads");
    println!("{:>7} {:>12} {:>12}", "depth", "ms/token", "serial");
    let depths: Vec<usize> = std::env::var("DSPARK_BENCH_DEPTHS").map_or(vec![8192, 16384, 32768], |v| v.split(',').filter_map(|d| d.parse().ok()).collect());
    for depth in depths {
        // One store per layer, as in a model: a token's selection reads each layer's digests
        // once, from memory rather than from the cache.
        let layers: Vec<KvStore> = (0..LAYERS)
            .map(|_| {
                let mut s = store(depth, &mut rng);
                s.compact(workers.all());
                s
            })
            .collect();
        let q: Vec<f32> = (0..Q_HEADS * D).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let row = vec![half::f16::ZERO; depth];
        let mask = Mask { data: &row, stride: depth };
        let time = |threads| {
            let token = || {
                for s in &layers {
                    std::hint::black_box(s.select(0, 0, depth, |c| mask.sees(1, c), &q, 1, Q_HEADS, BUDGET, Unit::Block, threads).expect("selects"));
                }
            };
            for _ in 0..5 {
                token();
            }
            let reps = std::env::var("DSPARK_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
            let t = Instant::now();
            for _ in 0..reps {
                token();
            }
            t.elapsed().as_secs_f64() * 1e3 / f64::from(reps)
        };
        let (ms, serial) = (time(workers.all()), time(Threads::serial()));
        println!("{depth:>7} {ms:>12.3} {serial:>12.3}");
    }
}
