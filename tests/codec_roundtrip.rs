//! Round-trip properties of the K/V row codec.

use dspark::codec::{rotate, unrotate, Format, Quant, RowCodec};
use proptest::prelude::*;

const QUANTS: [Quant; 7] = Quant::ALL;

/// Per-row bound on relative MSE (error energy / row energy) for Gaussian-like rows. The
/// average figures are ~10x lower (see `src/codec/mod.rs`); this bounds single short rows.
fn rel_mse_bound(q: Quant) -> f64 {
    match q {
        Quant::Q8 => 2e-4,
        Quant::Q7 => 6e-4,
        Quant::Q6 => 2e-3,
        Quant::Q5 => 8e-3,
        Quant::Q4 => 0.03,
        Quant::Q3 => 0.09,
        Quant::Q2 => 0.3,
    }
}

fn rel_mse(x: &[f32], y: &[f32]) -> f64 {
    let e: f64 = x.iter().zip(y).map(|(a, b)| f64::from(a - b).powi(2)).sum();
    let s: f64 = x.iter().map(|a| f64::from(*a).powi(2)).sum();
    if s == 0.0 {
        e
    } else {
        e / s
    }
}

fn roundtrip(q: Quant, x: &[f32]) -> Vec<f32> {
    let c = RowCodec::new(q, x.len()).unwrap();
    let mut buf = vec![0u8; c.row_bytes()];
    c.encode(x, &mut buf);
    let mut y = vec![0.0; x.len()];
    c.decode(&buf, &mut y);
    y
}

fn dims() -> impl Strategy<Value = usize> {
    prop_oneof![Just(32usize), Just(64), Just(96), Just(128), Just(192), Just(256)]
}

/// Rows of Gaussian-ish values (sum of uniforms), some with outlier channels.
fn rows() -> impl Strategy<Value = Vec<f32>> {
    (dims(), any::<u64>(), 0.01f32..100.0, any::<bool>()).prop_map(|(d, seed, scale, outl)| {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            #[allow(clippy::cast_precision_loss)]
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            u - 0.5
        };
        (0..d)
            .map(|i| {
                let g = (0..6).map(|_| next()).sum::<f32>() * scale;
                if outl && i % 37 == 3 {
                    g * 20.0
                } else {
                    g
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn roundtrip_error_within_bound(x in rows()) {
        for q in QUANTS {
            let y = roundtrip(q, &x);
            let e = rel_mse(&x, &y);
            prop_assert!(e <= rel_mse_bound(q), "{q:?} d={} rel mse {e}", x.len());
        }
    }

    #[test]
    fn rotation_is_orthonormal(x in rows(), k in rows()) {
        let d = x.len().min(k.len());
        let (mut a, mut b) = (x[..d].to_vec(), k[..d].to_vec());
        let dot = |u: &[f32], v: &[f32]| u.iter().zip(v).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum::<f64>();
        let before = dot(&a, &b);
        let norm = (dot(&a, &a) * dot(&b, &b)).sqrt();
        rotate(&mut a);
        rotate(&mut b);
        prop_assert!((dot(&a, &b) - before).abs() <= 1e-5 * norm + 1e-30);
        unrotate(&mut a);
        let xnorm = x[..d].iter().map(|v| v * v).sum::<f32>().sqrt();
        for (u, v) in a.iter().zip(&x[..d]) {
            prop_assert!((u - v).abs() <= 1e-6 * xnorm, "{u} vs {v}");
        }
    }

    #[test]
    fn decode_is_deterministic_and_rotated_helpers_agree(x in rows()) {
        for q in QUANTS {
            let c = RowCodec::new(q, x.len()).unwrap();
            let mut buf = vec![0u8; c.row_bytes()];
            c.encode(&x, &mut buf);
            let mut rot = vec![0.0; x.len()];
            c.decode_rotated(&buf, &mut rot);
            let mut plain = vec![0.0; x.len()];
            c.decode(&buf, &mut plain);
            unrotate(&mut rot);
            prop_assert_eq!(rot, plain);
            // Encoding the rotated row directly gives the same bytes.
            let mut y = x.clone();
            rotate(&mut y);
            let mut buf2 = vec![0u8; c.row_bytes()];
            c.encode_rotated(&y, &mut buf2);
            prop_assert_eq!(buf, buf2);
        }
    }
}

/// Each extra bit of code divides the error energy by about 4 on Gaussian rows: a packing
/// mistake in any width (a swapped or lost bit plane) breaks the ladder.
#[test]
fn every_extra_bit_quarters_the_error() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(5);
    let d = 128;
    let rows: Vec<Vec<f32>> = (0..256).map(|_| (0..d).map(|_| rng.gen::<f32>() - rng.gen::<f32>()).collect()).collect();
    let mse = |q: Quant| rows.iter().map(|x| rel_mse(x, &roundtrip(q, x))).sum::<f64>() / rows.len() as f64;
    for w in Quant::ALL.windows(2) {
        let (wide, narrow) = (mse(w[0]), mse(w[1]));
        let ratio = narrow / wide;
        assert!((3.0..5.5).contains(&ratio), "{:?} -> {:?}: error ratio {ratio} ({narrow} / {wide})", w[1], w[0]);
    }
}

#[test]
fn zero_and_constant_rows() {
    for q in QUANTS {
        for d in [64, 128, 256] {
            let y = roundtrip(q, &vec![0.0; d]);
            assert!(y.iter().all(|v| *v == 0.0), "{q:?}: zero row must decode to zeros");
            for c in [1.0f32, -3.5, 1e-4, 1e4] {
                let x = vec![c; d];
                let y = roundtrip(q, &x);
                // A constant row rotates into one spike per Hadamard block: easy for absmax.
                assert!(rel_mse(&x, &y) <= rel_mse_bound(q), "{q:?} d={d} c={c}");
            }
        }
    }
}

#[test]
fn non_finite_values_are_zeroed_and_stay_local() {
    let d = 128;
    for q in QUANTS {
        let c = RowCodec::new(q, d).unwrap();
        let clean: Vec<f32> = (0..d).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.3).collect();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = clean.clone();
            x[5] = bad;
            x[77] = bad;
            let mut rows = vec![0u8; 3 * c.row_bytes()];
            let rb = c.row_bytes();
            c.encode(&clean, &mut rows[..rb]);
            c.encode(&x, &mut rows[rb..2 * rb]);
            c.encode(&clean, &mut rows[2 * rb..]);
            let mut out = vec![0.0; 3 * d];
            c.decode_rows(&rows, &mut out);
            assert!(out.iter().all(|v| v.is_finite()), "{q:?}: decode must be finite");
            // The bad row decodes like the clean row with those two values set to 0.
            let mut zeroed = clean.clone();
            zeroed[5] = 0.0;
            zeroed[77] = 0.0;
            assert!(rel_mse(&zeroed, &out[d..2 * d]) <= rel_mse_bound(q));
            // Neighbours are untouched.
            assert_eq!(out[..d], out[2 * d..]);
            assert_eq!(out[..d], roundtrip(q, &clean)[..]);
        }
        // Values that overflow during the rotation are dropped, not propagated.
        let huge = vec![3.0e38f32; d];
        let mut buf = vec![0u8; c.row_bytes()];
        c.encode(&huge, &mut buf);
        let mut y = vec![0.0; d];
        c.decode(&buf, &mut y);
        assert!(y.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn sizes_and_bits_per_elem() {
    for (q, d, bytes) in [
        (Quant::Q4, 128, 70),
        (Quant::Q4, 64, 36),
        (Quant::Q8, 128, 134),
        (Quant::Q3, 128, 54),
        (Quant::Q2, 256, 74),
        (Quant::Q5, 64, 2 + 2 + 2 * 20),
        (Quant::Q6, 128, 2 + 4 + 4 * 24),
        (Quant::Q7, 64, 2 + 2 + 2 * 28),
    ] {
        let c = RowCodec::new(q, d).unwrap();
        assert_eq!(c.row_bytes(), bytes, "{q:?} d={d}");
        assert!((c.bits_per_elem() - bytes as f64 * 8.0 / d as f64).abs() < 1e-12);
    }
    assert!(RowCodec::new(Quant::Q4, 100).is_err());
    assert!(RowCodec::new(Quant::Q4, 0).is_err());
    assert!(RowCodec::new(Quant::Q4, 96).is_ok());
}

#[test]
fn format_names() {
    for k in 2..=8 {
        for v in 2..=8 {
            let name = format!("k{k}v{v}");
            let f = Format::parse(&name).unwrap();
            assert_eq!(f.k.bits(), k);
            assert_eq!(f.v.bits(), v);
            assert_eq!(f.name(), name);
        }
    }
    for bad in ["", "k4", "v4", "k9v4", "k4v1", "k0v4", "q4_0", "k4v4x", "kv", "k10v4"] {
        assert!(Format::parse(bad).is_err(), "{bad:?} must not parse");
    }
    for f in Format::ALL_PRESETS {
        assert_eq!(Format::parse(&f.name()).unwrap(), f);
    }
}
