//! The scalar oracle: decompress each row to the model's space, then attend in f64.

use super::fast::quantize_queries;
use super::{alibi_slope, Problem, Rows};
use crate::codec::{rotate, unrotate, RowCodec};

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
        Rows::Packed { .. } => {
            row_rotated(rows, r, out);
            unrotate(out);
        }
    }
}

/// Packed row `r` of `rows` decoded into the rotated space, its centroid added.
fn row_rotated(rows: Rows, r: usize, out: &mut [f32]) {
    if let Rows::Packed { codec, data, center } = rows {
        let rb = codec.row_bytes();
        codec.decode_rotated(&data[r * rb..(r + 1) * rb], out);
        if let Some(c) = center {
            let mut cv = vec![0.0; out.len()];
            RowCodec::centroid(out.len()).decode_rotated(c, &mut cv);
            out.iter_mut().zip(&cv).for_each(|(o, c)| *o += c);
        }
    }
}

/// One output row: query `i`, head `h`. With `q8` (the rotated, scaled query rounded to
/// its int8 image, `[d]`), packed K rows are scored as `dot(q8, k_rotated)` (then softcap).
fn attend_one(pb: &Problem, i: usize, h: usize, q8: Option<&[f32]>, out: &mut [f32]) {
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
            row(seg.v, r, d, &mut v);
            let mut s = match (q8, seg.k) {
                (Some(q8), Rows::Packed { .. }) => {
                    row_rotated(seg.k, r, &mut k);
                    // q8 already carries `scale` (÷ softcap when softcapping).
                    let dot: f64 = q8.iter().zip(&k).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                    if pb.p.softcap == 0.0 {
                        dot
                    } else {
                        dot * f64::from(pb.p.softcap)
                    }
                }
                _ => {
                    row(seg.k, r, d, &mut k);
                    let dot: f64 = q.iter().zip(&k).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                    dot * f64::from(pb.p.scale)
                }
            };
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

/// The oracle. With `int8_q`, packed K is scored against the int8 image of the rotated
/// query, exactly as the fast kernels do (see `fast::quantize_queries`).
pub(crate) fn run(pb: &Problem, out: &mut [f32], int8_q: bool) {
    let d = pb.d;
    let mut q8 = Vec::new();
    if int8_q {
        let p = pb.p;
        let qscale = if p.softcap == 0.0 { p.scale } else { p.scale / p.softcap };
        q8 = pb.q.iter().map(|x| x * qscale).collect();
        q8.chunks_exact_mut(d).for_each(rotate);
        if quantize_queries(&mut q8).is_none() {
            q8.clear();
        }
    }
    for i in 0..pb.n_q {
        for h in 0..pb.n_head {
            let at = (i * pb.n_head + h) * d;
            let qr = if q8.is_empty() { None } else { Some(&q8[at..at + d]) };
            attend_one(pb, i, h, qr, &mut out[at..at + d]);
        }
    }
}
