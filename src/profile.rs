//! Per-layer KV formats ("profiles"): which code width each layer's K and V get.
//!
//! `dspark calibrate` measures how sensitive each layer's K and V are and writes a profile;
//! `dspark:profile=FILE`, `DSPARK_PROFILE=FILE` and the C config's `profile` field use it.
//! A profile is JSON, versioned ([`VERSION`]), and names the model it was made for: a
//! profile for another model (another layer count or KV shape) is refused.
//!
//! # The allocation ([`allocate`])
//! Calibration gives, for each layer and side (K or V), the mean KL divergence of the
//! model's next-token distribution when only that side of that layer is coded at
//! [`PROBE`] bits and everything else stays f16, less a floor that does not depend on the
//! width ([`LayerSensitivity`]). Two assumptions turn these figures into a
//! prediction for any assignment of widths:
//! - **Additivity**: the errors of different layers are small and independent, so their KL
//!   divergences add (KL is quadratic in a small perturbation of the logits; cross terms of
//!   independent errors average out).
//! - **Width scaling**: a side's KL divergence scales with its codec's error energy, so at
//!   width `b` it is the probe's figure times `mse(b) / mse(PROBE)` ([`mse_ratio`]; about
//!   4x per bit).
//!
//! Under these the predicted KL divergence is a separable, convex sum, and a greedy
//! allocation that repeatedly gives one more bit to the side with the most error removed per
//! bit spent, until the budget is met, is optimal. The budget counts every byte the store
//! holds at the context given: codes, row scales, group multipliers, and the f16 sinks and
//! window.

use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::codec::{Quant, RowCodec};
use crate::kv::PAGE;

/// The profile format version this build reads and writes.
pub const VERSION: u32 = 1;

/// The width calibration probes each side at.
pub const PROBE: Quant = Quant::Q3;

/// The width of calibration's floor probe (see [`LayerSensitivity`]).
pub const FLOOR: Quant = Quant::Q8;

/// Width of a side that stays uncompressed (f16) in a profile.
pub const F16_BITS: u32 = 16;

/// The model a profile was made for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ModelId {
    /// `general.name` of the GGUF (or its file name).
    pub name: String,
    pub n_layer: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

/// Code widths of one layer: 2 to 8 bits, or [`F16_BITS`] for uncompressed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerWidths {
    pub k: u32,
    pub v: u32,
}

/// What calibration measured for one layer: the mean KL divergence with only this layer's K
/// (or V) at [`PROBE`] bits, less `floor`.
///
/// `floor` is the KL divergence with this layer's K and V at [`FLOOR`] bits, whose coding
/// error is 1/1000 of the probe's. On the default model it is not small: 0.0027 for an early
/// layer, about what a 4-bit probe of the same layer measures (0.0031-0.0034), falling to
/// 0.0005 at the last layer, and it does not add up over layers (all 30 K at 8 bits: 0.0030).
/// Any change to an early layer moves the logits this much; the part that grows with the
/// coding error, and adds up, is what is left above it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct LayerSensitivity {
    pub k: f64,
    pub v: f64,
    pub floor: f64,
}

/// A per-layer KV format.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Profile {
    /// Format version ([`VERSION`]).
    pub dspark_profile: u32,
    pub model: ModelId,
    /// Target average bits per K/V value, everything held included, at `ctx`.
    pub bits: f64,
    /// The context the budget was counted at.
    pub ctx: usize,
    /// The f16 window the budget assumed.
    pub window: usize,
    /// Bits per value this profile holds at `ctx` (at most `bits`).
    pub bits_per_elem: f64,
    /// Predicted mean KL divergence against f16 KV (see the module documentation).
    pub predicted_kld: f64,
    /// The text and chunk calibration ran on.
    pub calibration: String,
    /// One entry per layer.
    pub layers: Vec<LayerWidths>,
    /// What calibration measured, per layer.
    pub sensitivity: Vec<LayerSensitivity>,
    /// Where the profile was read from (not saved).
    #[serde(skip)]
    pub source: String,
}

/// The quant for a width in a profile (`None` = f16).
fn quant_of(bits: u32) -> Result<Option<Quant>, String> {
    if bits == F16_BITS {
        return Ok(None);
    }
    Quant::from_bits(bits).map(Some)
}

impl Profile {
    /// Reads and checks a profile file.
    ///
    /// # Errors
    /// If the file cannot be read, is not a profile, has another version, or names a width
    /// this build cannot code.
    pub fn load(path: &Path) -> Result<Profile, String> {
        let what = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read profile {what}: {e}"))?;
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("profile {what} is not JSON: {e}"))?;
        match raw.get("dspark_profile").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(VERSION) => {}
            Some(v) => return Err(format!("profile {what} has version {v}; this DSpark reads version {VERSION} (calibrate again with `dspark calibrate`)")),
            None => return Err(format!("{what} is not a DSpark profile (no `dspark_profile` version field)")),
        }
        let mut p: Profile = serde_json::from_value(raw).map_err(|e| format!("profile {what}: {e}"))?;
        p.check().map_err(|e| format!("profile {what}: {e}"))?;
        p.source = path.display().to_string();
        Ok(p)
    }

    /// Writes the profile as pretty JSON.
    ///
    /// # Errors
    /// If the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let json = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, json + "\n").map_err(|e| format!("cannot write profile {}: {e}", path.display()))
    }

    fn check(&self) -> Result<(), String> {
        if self.layers.len() != self.model.n_layer {
            return Err(format!("{} layer entries for a model of {} layers", self.layers.len(), self.model.n_layer));
        }
        for (il, l) in self.layers.iter().enumerate() {
            quant_of(l.k).and(quant_of(l.v)).map_err(|e| format!("layer {il}: {e}"))?;
        }
        Ok(())
    }

    /// The quant of layer `layer`'s K (`is_k`) or V, `None` for f16.
    ///
    /// # Errors
    /// If the profile has no such layer (it was made for a model with fewer layers).
    pub fn quant(&self, layer: Option<usize>, is_k: bool) -> Result<Option<Quant>, String> {
        let l = layer.and_then(|il| self.layers.get(il)).ok_or_else(|| {
            format!("profile {} was made for {} ({} layers), which has no KV layer {}", self.source, self.model.name, self.layers.len(), layer.map_or("?".into(), |l| l.to_string()))
        })?;
        Ok(quant_of(if is_k { l.k } else { l.v }).expect("checked on load"))
    }

    /// Checks that the profile was made for a model of this name and shape.
    ///
    /// # Errors
    /// If it was made for another model.
    pub fn check_model(&self, model: &ModelId) -> Result<(), String> {
        if &self.model == model {
            return Ok(());
        }
        let m = &self.model;
        Err(format!(
            "profile {} was made for {} ({} layers, {} KV heads of {}); this model is {} ({} layers, {} KV heads of {}): calibrate it with `dspark calibrate`",
            self.source, m.name, m.n_layer, m.n_head_kv, m.head_dim, model.name, model.n_layer, model.n_head_kv, model.head_dim
        ))
    }

    /// A compact name for tables: the widths of K and V over the layers, e.g. `k4-6v2-4`.
    #[must_use]
    pub fn summary(&self) -> String {
        let range = |f: fn(&LayerWidths) -> u32| {
            let lo = self.layers.iter().map(f).min().unwrap_or(0);
            let hi = self.layers.iter().map(f).max().unwrap_or(0);
            if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") }
        };
        format!("k{}v{}", range(|l| l.k), range(|l| l.v))
    }
}

/// A deterministic stream of standard normal values (splitmix64 + Box-Muller), so that the
/// width scaling is the same on every run.
fn gaussian(n: usize, mut seed: u64) -> Vec<f32> {
    let mut uniform = move || {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform().max(1e-300), uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

/// Mean relative error energy of the codec at `q` on Gaussian rows of `head_dim` values (what
/// the rotation makes of real K and V rows).
fn codec_mse(q: Quant, head_dim: usize) -> f64 {
    let rows = 256;
    let x = gaussian(rows * head_dim, 7);
    let c = RowCodec::new(q, head_dim).expect("head size checked by the caller");
    let mut buf = vec![0u8; c.row_bytes()];
    let mut y = vec![0.0f32; head_dim];
    let (mut err, mut sig) = (0.0f64, 0.0f64);
    for r in x.chunks_exact(head_dim) {
        c.encode(r, &mut buf);
        c.decode(&buf, &mut y);
        err += r.iter().zip(&y).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>();
        sig += r.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>();
    }
    err / sig
}

/// `mse(q) / mse(PROBE)` at this head size: how a side's KL divergence scales with its width.
#[must_use]
pub fn mse_ratio(q: Quant, head_dim: usize) -> f64 {
    static CACHE: OnceLock<std::sync::Mutex<Vec<(Quant, usize, f64)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(&(_, _, r)) = cache.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|e| e.0 == q && e.1 == head_dim) {
        return r;
    }
    let r = codec_mse(q, head_dim) / codec_mse(PROBE, head_dim);
    cache.lock().unwrap_or_else(|e| e.into_inner()).push((q, head_dim, r));
    r
}

/// Cells of a context of `ctx` cells that a store keeps in f16: the sink page and the pages
/// of the last `window` rows (as `kv::KvStore` compacts them).
#[must_use]
pub fn f16_cells(ctx: usize, window: usize) -> usize {
    if ctx <= PAGE {
        return ctx;
    }
    let window_from = ctx.saturating_sub(window) / PAGE * PAGE;
    (PAGE + (ctx - window_from.max(PAGE))).min(ctx)
}

/// Bits per value of one side at width `bits` (16 = f16) over a context of `ctx` cells.
#[must_use]
pub fn side_bits(bits: u32, head_dim: usize, ctx: usize, window: usize) -> f64 {
    let Ok(Some(q)) = quant_of(bits) else { return 16.0 };
    let packed = RowCodec::new(q, head_dim).expect("head size checked by the caller").bits_per_elem();
    let f16 = f16_cells(ctx, window) as f64;
    (f16 * 16.0 + (ctx as f64 - f16) * packed) / ctx as f64
}

/// Checks that `budget` bits per value can hold 2-bit codes everywhere at this context.
///
/// # Errors
/// If it cannot.
pub fn check_budget(head_dim: usize, ctx: usize, window: usize, budget: f64) -> Result<(), String> {
    let least = side_bits(2, head_dim, ctx, window);
    if least > budget + 1e-9 {
        return Err(format!("{budget} bits per value is below the least this context allows: {least:.2} (2-bit codes everywhere, with f16 sinks and a {window}-cell f16 window at ctx {ctx})"));
    }
    Ok(())
}

/// The widths that minimise the predicted KL divergence with at most `budget` bits per value
/// on average (see the module documentation); returns them with the predicted figure.
///
/// # Errors
/// If even 2-bit codes everywhere exceed the budget.
pub fn allocate(sens: &[LayerSensitivity], head_dim: usize, ctx: usize, window: usize, budget: f64) -> Result<(Vec<LayerWidths>, f64), String> {
    let n = 2 * sens.len();
    let s = |i: usize| if i % 2 == 0 { sens[i / 2].k } else { sens[i / 2].v };
    let cost = |b: u32| side_bits(b, head_dim, ctx, window);
    let err = |i: usize, b: u32| s(i).max(0.0) * mse_ratio(Quant::from_bits(b).expect("2..=8"), head_dim);
    check_budget(head_dim, ctx, window, budget)?;
    let mut width = vec![2u32; n];
    let mut total: f64 = (0..n).map(|_| cost(2)).sum();
    let limit = budget * n as f64;
    loop {
        // The side whose next width removes the most predicted error per bit spent.
        let best = (0..n)
            .filter(|&i| width[i] < 8)
            .map(|i| {
                let b = width[i];
                let extra = cost(b + 1) - cost(b);
                (i, extra, (err(i, b) - err(i, b + 1)) / extra)
            })
            .filter(|&(_, extra, _)| total + extra <= limit + 1e-9)
            .max_by(|a, b| a.2.total_cmp(&b.2).then(b.0.cmp(&a.0)));
        let Some((i, extra, _)) = best else { break };
        width[i] += 1;
        total += extra;
    }
    let predicted = (0..n).map(|i| err(i, width[i])).sum();
    Ok((width.chunks_exact(2).map(|w| LayerWidths { k: w[0], v: w[1] }).collect(), predicted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(layers: Vec<LayerWidths>) -> Profile {
        Profile {
            dspark_profile: VERSION,
            model: ModelId { name: "m".into(), n_layer: layers.len(), n_head_kv: 3, head_dim: 64 },
            bits: 4.0,
            ctx: 2048,
            window: 128,
            bits_per_elem: 4.0,
            predicted_kld: 0.0,
            calibration: String::new(),
            sensitivity: layers.iter().map(|_| LayerSensitivity { k: 0.0, v: 0.0, floor: 0.0 }).collect(),
            layers,
            source: "test".into(),
        }
    }

    #[test]
    fn widths_scale_the_error_by_about_four_per_bit() {
        for d in [64, 128] {
            let r: Vec<f64> = Quant::ALL.iter().map(|&q| mse_ratio(q, d)).collect();
            assert!((mse_ratio(PROBE, d) - 1.0).abs() < 1e-12);
            assert!(mse_ratio(FLOOR, d) < 1e-3);
            for w in r.windows(2) {
                assert!((3.0..5.5).contains(&(w[1] / w[0])), "{r:?}");
            }
        }
    }

    #[test]
    fn f16_cells_count_the_sink_page_and_the_window() {
        assert_eq!(f16_cells(40, 128), 40);
        assert_eq!(f16_cells(2048, 128), 64 + 128);
        assert_eq!(f16_cells(2048 + 10, 128), 64 + 128 + 10);
        assert_eq!(f16_cells(150, 128), 150);
        assert_eq!(f16_cells(2048, 0), 64);
    }

    #[test]
    fn the_allocation_spends_the_budget_where_the_error_is() {
        // Layer 0's K is 100x as sensitive as anything else.
        let mut sens = vec![LayerSensitivity { k: 0.001, v: 0.001, floor: 0.0 }; 8];
        sens[0].k = 0.1;
        let (d, ctx, w) = (64, 2048, 128);
        let (widths, predicted) = allocate(&sens, d, ctx, w, 4.0).unwrap();
        let spent: f64 = widths.iter().map(|l| side_bits(l.k, d, ctx, w) + side_bits(l.v, d, ctx, w)).sum::<f64>() / 16.0;
        assert!(spent <= 4.0 + 1e-9 && spent > 4.0 - 1.0, "spent {spent}");
        assert!(widths[0].k >= widths.iter().skip(1).map(|l| l.k.max(l.v)).max().unwrap() + 2, "{widths:?}");
        // Better than any uniform assignment that fits the same budget.
        for b in 2..=8u32 {
            if side_bits(b, d, ctx, w) <= 4.0 {
                let uniform: f64 = sens.iter().map(|s| (s.k + s.v) * mse_ratio(Quant::from_bits(b).unwrap(), d)).sum();
                assert!(predicted <= uniform, "{b}: {predicted} > {uniform}");
            }
        }
        assert!(allocate(&sens, d, ctx, w, 2.0).unwrap_err().contains("below the least"));
    }

    #[test]
    fn profiles_are_checked_on_load() {
        let dir = std::env::temp_dir().join(format!("dspark-profile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = profile(vec![LayerWidths { k: 5, v: 3 }, LayerWidths { k: 16, v: 8 }]);
        let path = dir.join("p.json");
        p.save(&path).unwrap();
        let q = Profile::load(&path).unwrap();
        assert_eq!(q.layers, p.layers);
        assert_eq!(q.quant(Some(0), true).unwrap(), Some(Quant::Q5));
        assert_eq!(q.quant(Some(1), true).unwrap(), None);
        assert!(q.quant(Some(2), true).unwrap_err().contains("no KV layer 2"));
        let other = ModelId { name: "other".into(), ..p.model.clone() };
        assert!(q.check_model(&other).unwrap_err().contains("was made for m"));
        assert!(q.check_model(&p.model).is_ok());
        for (edit, why) in [("\"dspark_profile\": 1", "\"dspark_profile\": 2"), ("\"k\": 5", "\"k\": 9")] {
            let text = std::fs::read_to_string(&path).unwrap().replace(edit, why);
            std::fs::write(dir.join("bad.json"), text).unwrap();
            let e = Profile::load(&dir.join("bad.json")).unwrap_err();
            assert!(e.contains("version 2") || e.contains("code width 9"), "{e}");
        }
        std::fs::write(dir.join("bad.json"), "{}").unwrap();
        assert!(Profile::load(&dir.join("bad.json")).unwrap_err().contains("not a DSpark profile"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
