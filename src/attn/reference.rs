//! The scalar oracle: decompress each row to the model's space, then attend in f64.

use super::{alibi_slope, Problem, Rows};

/// f16 → f32 with the attention rule for non-finite values (read as 0).
pub(crate) fn f16_value(h: half::f16) -> f32 {
    let v = h.to_f32();
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

/// Row `r` of `rows` in the model's space.
fn row(rows: Rows, r: usize, d: usize, out: &mut [f32]) {
    match rows {
        Rows::F16(v) => {
            for (o, h) in out.iter_mut().zip(&v[r * d..(r + 1) * d]) {
                *o = f16_value(*h);
            }
        }
        Rows::Packed { codec, data } => {
            let rb = codec.row_bytes();
            codec.decode(&data[r * rb..(r + 1) * rb], out);
        }
    }
}

/// One output row: query `i`, head `h`.
fn attend_one(pb: &Problem, i: usize, h: usize, out: &mut [f32]) {
    let d = pb.d;
    let kh = h / pb.group();
    let slope = alibi_slope(pb.p.max_bias, h, pb.n_head);
    let q = &pb.q[(i * pb.n_head + h) * d..][..d];
    let mut k = vec![0.0f32; d];
    let mut v = vec![0.0f32; d];
    let mut scores: Vec<f64> = Vec::new();
    let mut values: Vec<Vec<f32>> = Vec::new();
    for seg in &pb.kv[kh] {
        for r in 0..seg.n {
            let cell = seg.first_cell + r;
            let mv = pb.mask.map_or(0.0, |m| slope * m.data[i * m.stride + cell].to_f32());
            if mv == f32::NEG_INFINITY {
                continue;
            }
            row(seg.k, r, d, &mut k);
            row(seg.v, r, d, &mut v);
            let dot: f64 = q.iter().zip(&k).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            let mut s = dot * f64::from(pb.p.scale);
            if pb.p.softcap != 0.0 {
                let c = f64::from(pb.p.softcap);
                s = c * (s / c).tanh();
            }
            scores.push(s + f64::from(mv));
            values.push(v.clone());
        }
    }
    let sink = pb.sinks.map(|s| f64::from(s[h]));
    let m = scores
        .iter()
        .copied()
        .chain(sink)
        .fold(f64::NEG_INFINITY, f64::max);
    let mut acc = vec![0.0f64; d];
    let mut sum = sink.map_or(0.0, |s| (s - m).exp());
    for (s, val) in scores.iter().zip(&values) {
        let w = (s - m).exp();
        sum += w;
        for (a, x) in acc.iter_mut().zip(val) {
            *a += w * f64::from(*x);
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        #[allow(clippy::cast_possible_truncation)]
        let y = if sum == 0.0 || scores.is_empty() { 0.0 } else { (a / sum) as f32 };
        *o = y;
    }
}

pub(crate) fn run(pb: &Problem, out: &mut [f32]) {
    let d = pb.d;
    for i in 0..pb.n_q {
        for h in 0..pb.n_head {
            attend_one(pb, i, h, &mut out[(i * pb.n_head + h) * d..][..d]);
        }
    }
}
