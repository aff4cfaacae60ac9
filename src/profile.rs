//! Per-layer KV formats ("profiles"): which code width each layer's K and V get.
//!
//! `dspark calibrate` measures how sensitive each layer's K and V are and writes a profile;
//! `dspark:profile=FILE`, `DSPARK_PROFILE=FILE` and the C config's `profile` field use it.
//! A profile is JSON, versioned ([`VERSION`]), and names the model it was made for: a
//! profile for another model (another name, layer count or KV shape) is refused.
//!
//! # The prediction and the allocation ([`allocate`])
//! Calibration ([`Sensitivity`]) measures, on a short chunk of text, the mean KL divergence of
//! the model's next-token distribution against f16 KV:
//! - the **width curves**: every layer's K at width `b` (V at 8 bits), and every layer's V at
//!   `b` (K at 8 bits), for `b` from 2 to 8, less the 8/8 figure. They say how a width costs
//!   when all layers take it, and they carry what a formula would miss: 2-bit K is far worse
//!   than four times 3-bit K.
//! - the **layer weights**: starting from every side at [`PROBE`] bits, how much the KL
//!   divergence rises when one side of one layer alone drops to [`PROBE_LOW`]. A single side changed
//!   from all-f16 does not work as a probe: on the default model any change to an early
//!   layer, even 8-bit codes, moves the output by a KL divergence of ~0.003, as much as a
//!   4-bit probe does, and such moves do not add up. Measured from a configuration that is
//!   already perturbed, the differences are the side's own share.
//!
//! The prediction for an assignment of widths is `Σ weight(side) · curve(kind, width) / L`
//! over the `2L` sides, the weights of each kind normalised to a mean of 1 (and pulled
//! halfway to it, against noise): a uniform assignment predicts the curves' own figures.
//! The predicted error is separable, so [`allocate`] gives one more bit at a time to the side
//! with the most predicted error removed per bit spent, until the budget is met. Why it
//! predicts the end result: it is built from end results (KL divergences of the output), the
//! curves of the same kind of configuration it allocates, and the weights of each layer's
//! share; what it ignores is the interaction between sides, which made measured KL
//! divergences 1.4x the predicted ones at 4.5 bits on the default model.
//! The budget counts every byte the store holds at the context given: codes, row scales,
//! group multipliers, the pages' centroids ([`crate::kv::page`]), and the f16 sinks and
//! window. Version 2: pages are centred (version 1 profiles counted no centroids).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::codec::{Quant, RowCodec};
use crate::kv::{PageCodec, PAGE};

/// The profile format version this build reads and writes.
pub const VERSION: u32 = 2;

/// The width every side has in the configuration the layer weights are measured from.
pub const PROBE: Quant = Quant::Q4;

/// The width one side drops to in a layer-weight probe. Low, so that one layer's share stands
/// far above the noise of a short chunk: with centred pages, raising one side from 4 to 8
/// bits (the earlier probe) gave weights between −0.006 and +0.0004 on the default model,
/// nearly all negative, i.e. noise; dropping it to 2 bits gives 0.0006 to 0.05, all positive
/// (one layer's K stands out at 0.05), and the profiles allocated from them score 0.035
/// instead of 0.047 at 4.5 bits (ctx 2048).
pub const PROBE_LOW: Quant = Quant::Q2;

/// The widths an allocation chooses from.
pub const WIDTHS: std::ops::RangeInclusive<u32> = 2..=8;

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

/// How much the KL divergence rose when this layer's K (or V) alone went from [`PROBE`] to
/// [`PROBE_LOW`] bits, every other side at [`PROBE`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct LayerSensitivity {
    pub k: f64,
    pub v: f64,
}

/// What calibration measured (see the module documentation).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Sensitivity {
    /// KL divergence with every K at width `2 + i` (V at 8 bits), less that of 8/8.
    pub curve_k: Vec<f64>,
    /// The same for V (K at 8 bits).
    pub curve_v: Vec<f64>,
    /// One entry per layer.
    pub layers: Vec<LayerSensitivity>,
}

impl Sensitivity {
    /// The predicted KL divergence of each side at each width: `[side][width - 2]`, sides
    /// ordered K0, V0, K1, V1, ...
    fn table(&self) -> Vec<[f64; 7]> {
        let n = self.layers.len().max(1) as f64;
        let mean = |f: fn(&LayerSensitivity) -> f64| self.layers.iter().map(|l| f(l).max(0.0)).sum::<f64>() / n;
        let (mk, mv) = (mean(|l| l.k), mean(|l| l.v));
        // A curve is its measurements, each held to at most the one below it (a curve that
        // rises with width is noise). Above the probe width, where errors are small, each is
        // also held to at least a quarter of the one below: a code's squared error falls 4x
        // per bit (the step halves) and a small perturbation's KL divergence grows with its
        // square, so a steeper fall is noise too (on the default model's Q4_1 weights the
        // figures at 5 to 7 bits came out 2e-4 to -3e-4, which made 6-bit V look free).
        // Below it 2-bit codes are far worse than a quarter-per-bit rule says.
        let monotone = |c: &[f64]| {
            let mut out = [0.0; 7];
            let mut prev = f64::INFINITY;
            for (b, (o, &x)) in WIDTHS.zip(out.iter_mut().zip(c)) {
                let least = if b > PROBE.bits() { prev / 4.0 } else { 0.0 };
                prev = x.clamp(least, prev);
                *o = prev;
            }
            out
        };
        let (ck, cv) = (monotone(&self.curve_k), monotone(&self.curve_v));
        // A weight is a difference of two noisy KL divergences (some come out negative), so
        // each is pulled halfway to the mean: no side is predicted to be free to shrink.
        let weight = |w: f64, mean: f64| if mean > 0.0 { 0.5 + 0.5 * w.max(0.0) / mean } else { 1.0 };
        self.layers
            .iter()
            .flat_map(|l| [ck.map(|c| weight(l.k, mk) * c / n), cv.map(|c| weight(l.v, mv) * c / n)])
            .collect()
    }
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
    /// Bits per value of the cells kept out of compression (sink page, window): 16 (f16,
    /// profiles before this field) or a code width ([`crate::kv::StoreConfig::window_quant`]).
    #[serde(default = "f16_bits")]
    pub window_bits: u32,
    /// The latest rows kept in f16 besides their codes ([`crate::kv::StoreConfig::recent`]).
    #[serde(default)]
    pub recent: usize,
    /// Bits per value this profile holds at `ctx` (at most `bits`).
    pub bits_per_elem: f64,
    /// Predicted mean KL divergence against f16 KV (see the module documentation).
    pub predicted_kld: f64,
    /// The text and chunk calibration ran on.
    pub calibration: String,
    /// One entry per layer.
    pub layers: Vec<LayerWidths>,
    /// What calibration measured.
    pub sensitivity: Sensitivity,
    /// Where the profile was read from (not saved).
    #[serde(skip)]
    pub source: String,
}

fn f16_bits() -> u32 {
    F16_BITS
}

/// What a store keeps out of compression: the sink page, the pages of the last `cells` rows
/// (without a window, the page being filled), in f16 (`bits` 16) or in codes of `bits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub cells: usize,
    pub bits: u32,
    /// The latest rows, kept in f16 besides their codes ([`crate::kv::StoreConfig::recent`]).
    pub recent: usize,
}

impl Window {
    /// The window calibration probes run with: no copies of the latest rows. Probes score a
    /// batch, whose own rows attention reads in f16 anyway, so their measurements serve every
    /// `recent`.
    #[must_use]
    pub fn probed(self) -> Window {
        Window { recent: 0, ..self }
    }

    /// Bits per value of those cells at head size `head_dim`.
    #[must_use]
    pub fn bits_per_value(&self, head_dim: usize) -> f64 {
        match quant_of(self.bits) {
            // Window pages are centred as compressed pages are (their centroids counted).
            Ok(Some(q)) => RowCodec::new(q, head_dim).map_or(16.0, |rows| PageCodec { rows, n_head: 1, centered: true }.bits_per_elem()),
            _ => 16.0,
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.bits {
            F16_BITS => write!(f, "{}-cell f16 window", self.cells)?,
            b => write!(f, "{}-cell window in {b}-bit codes", self.cells)?,
        }
        if self.recent > 0 {
            write!(f, ", the latest {} rows also in f16", self.recent)?;
        }
        Ok(())
    }
}

/// The quant for a width in a profile (`None` = f16).
fn quant_of(bits: u32) -> Result<Option<Quant>, String> {
    if bits == F16_BITS {
        return Ok(None);
    }
    Quant::from_bits(bits).map(Some)
}

impl Profile {
    /// What the profile's budget assumed the store keeps out of compression.
    #[must_use]
    pub fn window(&self) -> Window {
        Window { cells: self.window, bits: self.window_bits, recent: self.recent }
    }

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
}

/// Cells whose bytes a store of `ctx` cells holds out of compression, at most, at any length
/// up to `ctx`: the sink page, the pages over the last `window` rows, and the page being
/// filled (kept until it is full), each a whole page of bytes (pages are allocated whole).
/// So a budget holds at every length, not only when the last page happens to be full: at
/// ctx 2048 without a window, counting the sink page alone, `dspark:auto3.5` held 3.66 bits
/// per value after 2047 tokens.
#[must_use]
pub fn kept_cells(ctx: usize, window: usize) -> usize {
    (PAGE * (2 + window.div_ceil(PAGE))).min(ctx.next_multiple_of(PAGE))
}

/// Bits per value of one side at width `bits` (16 = f16) over a context of `ctx` cells. Its
/// pages hold `ctx` rounded up to whole pages: at a `ctx` that is not a multiple of
/// [`PAGE`] the last compressed page's unused cells count too (`dspark bench --depths 8192`
/// runs a context of 8224 cells, where they made `auto4.5` hold 4.52 bits).
#[must_use]
pub fn side_bits(bits: u32, head_dim: usize, ctx: usize, window: Window) -> f64 {
    let allocated = ctx.next_multiple_of(PAGE) as f64;
    let Ok(Some(q)) = quant_of(bits) else { return 16.0 * allocated / ctx as f64 };
    let rows = RowCodec::new(q, head_dim).expect("head size checked by the caller");
    let packed = PageCodec { rows, n_head: 1, centered: true }.bits_per_elem();
    let kept = kept_cells(ctx, window.cells) as f64;
    // The f16 copies of the latest rows.
    let recent = (16 * window.recent) as f64;
    (kept * window.bits_per_value(head_dim) + (allocated - kept) * packed + recent) / ctx as f64
}

/// What the store holds for each layer at a context: `cells[layer]` cells of K and as many
/// of V. A layer that attends a sliding window keeps a ring of fewer cells than the context
/// (on Gemma 3 at ctx 2048: 1024 cells in 15 of 18 layers), in which the sink page and the
/// page being filled weigh more; counting every layer at `ctx`, profiles held 3.8 bits per
/// value on that model for a budget of 3.5.
#[derive(Clone, Debug, PartialEq)]
pub struct Cells {
    /// The context.
    pub ctx: usize,
    /// Per layer, the cells it holds at that context (at most `ctx`).
    pub layers: Vec<usize>,
}

impl Cells {
    /// Every one of `n_layer` layers holding the whole context.
    #[must_use]
    pub fn uniform(n_layer: usize, ctx: usize) -> Cells {
        Cells { ctx, layers: vec![ctx; n_layer] }
    }

    /// Bits per value of one side of `layer` at width `bits`, weighted by the layer's share of
    /// all cells (so that the mean over the sides is the bits per value held).
    /// A layer that holds no cells (none on the device) costs nothing.
    fn weighted_bits(&self, layer: usize, bits: u32, head_dim: usize, window: Window) -> f64 {
        let (cells, total) = (self.layers[layer], self.layers.iter().sum::<usize>());
        if cells == 0 {
            return 0.0;
        }
        side_bits(bits, head_dim, cells, window) * (cells * self.layers.len()) as f64 / total as f64
    }

    /// Bits per value that f16 copies of the latest `recent` rows of every coded side add.
    #[must_use]
    pub fn recent_bits(&self, recent: usize) -> f64 {
        let total: usize = self.layers.iter().sum();
        let holding = self.layers.iter().filter(|&&c| c > 0).count();
        if total == 0 {
            return 0.0;
        }
        (16 * recent * holding) as f64 / total as f64
    }

    /// Bits per value held with these widths, everything counted.
    #[must_use]
    pub fn held_bits(&self, layers: &[LayerWidths], head_dim: usize, window: Window) -> f64 {
        let sum: f64 = layers.iter().enumerate().map(|(l, w)| self.weighted_bits(l, w.k, head_dim, window) + self.weighted_bits(l, w.v, head_dim, window)).sum();
        sum / (2 * layers.len()) as f64
    }
}

/// Checks that `budget` bits per value can hold 2-bit codes everywhere at this context.
///
/// # Errors
/// If it cannot.
pub fn check_budget(head_dim: usize, cells: &Cells, window: Window, budget: f64) -> Result<(), String> {
    let least = cells.held_bits(&vec![LayerWidths { k: 2, v: 2 }; cells.layers.len()], head_dim, window);
    if least > budget + 1e-9 {
        return Err(format!("{budget} bits per value is below the least this context allows: {least:.2} (2-bit codes everywhere, with the sink page and a {window} at ctx {})", cells.ctx));
    }
    Ok(())
}

/// The widths that minimise the predicted KL divergence with at most `budget` bits per value
/// on average over the cells the layers hold (see the module documentation); returns them
/// with the predicted figure.
///
/// # Errors
/// If even 2-bit codes everywhere exceed the budget, or `cells` has another layer count.
pub fn allocate(sens: &Sensitivity, head_dim: usize, cells: &Cells, window: Window, budget: f64) -> Result<(Vec<LayerWidths>, f64), String> {
    if cells.layers.len() != sens.layers.len() {
        return Err(format!("cells given for {} layers, measurements for {}", cells.layers.len(), sens.layers.len()));
    }
    check_budget(head_dim, cells, window, budget)?;
    let table = sens.table();
    let n = table.len();
    // Side i is layer i / 2's K (even) or V (odd).
    let cost = |i: usize, b: u32| cells.weighted_bits(i / 2, b, head_dim, window);
    let err = |i: usize, b: u32| table[i][(b - WIDTHS.start()) as usize];
    let mut width = vec![*WIDTHS.start(); n];
    let mut total: f64 = (0..n).map(|i| cost(i, *WIDTHS.start())).sum();
    let limit = budget * n as f64;
    loop {
        // The side whose next width removes the most predicted error per bit spent.
        let best = (0..n)
            .filter(|&i| width[i] < *WIDTHS.end())
            .map(|i| {
                let b = width[i];
                let extra = cost(i, b + 1) - cost(i, b);
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
            window_bits: 16,
            recent: 0,
            bits_per_elem: 4.0,
            predicted_kld: 0.0,
            calibration: String::new(),
            sensitivity: Sensitivity::default(),
            layers,
            source: "test".into(),
        }
    }

    #[test]
    fn kept_cells_count_the_sink_page_the_window_and_the_page_being_filled() {
        assert_eq!(kept_cells(40, 128), 64);
        assert_eq!(kept_cells(150, 128), 192);
        assert_eq!(kept_cells(2048, 128), 64 + 128 + 64);
        assert_eq!(kept_cells(2048, 100), 64 + 128 + 64);
        assert_eq!(kept_cells(2048, 0), 64 + 64);
        assert_eq!(kept_cells(100, 0), 128);
    }

    /// K costs 4x per bit less of width, V 2x; layer 0's K weighs 10x the others.
    fn sensitivity() -> Sensitivity {
        let mut layers = vec![LayerSensitivity { k: 0.001, v: 0.001 }; 8];
        layers[0].k = 0.01;
        let curve = |f: f64| (0..7).map(|i| 0.1 * f.powi(-i)).collect();
        Sensitivity { curve_k: curve(4.0), curve_v: curve(2.0), layers }
    }

    #[test]
    fn a_uniform_assignment_predicts_the_curves() {
        let mut s = sensitivity();
        s.layers[0].k = 0.001;
        let t = s.table();
        for b in 0..7 {
            let k: f64 = t.iter().step_by(2).map(|x| x[b]).sum();
            assert!((k - s.curve_k[b]).abs() < 1e-12, "{k}");
        }
        // Noise that makes a wider code look worse is held to the narrower one's figure...
        s.curve_v[2] = 1.0;
        assert_eq!(s.table()[1][2], s.table()[1][1]);
        // ... and above the probe width (4 bits) one that falls more than 4x per bit is
        // held to a quarter of it.
        s.curve_v[4] = -1e-4;
        assert_eq!(s.table()[1][4], s.table()[1][3] / 4.0);
        // (The next point, 1/32 of width 2's, is within its bounds again: kept.)
        assert!((8.0 * s.table()[1][5] - s.curve_v[5]).abs() < 1e-15);
    }

    #[test]
    fn the_allocation_spends_the_budget_where_the_error_is() {
        let sens = sensitivity();
        let (d, ctx, w) = (64, 2048, Window { cells: 128, bits: 16, recent: 0 });
        let cells = Cells::uniform(8, ctx);
        let (widths, predicted) = allocate(&sens, d, &cells, w, 5.0).unwrap();
        let spent: f64 = widths.iter().map(|l| side_bits(l.k, d, ctx, w) + side_bits(l.v, d, ctx, w)).sum::<f64>() / 16.0;
        assert!((spent - cells.held_bits(&widths, d, w)).abs() < 1e-12);
        assert!(spent <= 5.0 + 1e-9 && spent > 4.5, "spent {spent}");
        assert!(widths[0].k > widths[1].k, "{widths:?}");
        // Better than any uniform assignment that fits the same budget.
        let t = sens.table();
        for b in 2..=8u32 {
            if side_bits(b, d, ctx, w) <= 5.0 {
                let uniform: f64 = t.iter().map(|x| x[b as usize - 2]).sum();
                assert!(predicted <= uniform, "{b}: {predicted} > {uniform}");
            }
        }
        assert!(allocate(&sens, d, &cells, w, 2.0).unwrap_err().contains("below the least"));
    }

    /// Layers that keep a ring of fewer cells count for their cells: the bits held per value
    /// over all cells stay within the budget (counted as if every layer held `ctx`, the same
    /// widths would seem to fit).
    #[test]
    fn layers_with_fewer_cells_weigh_their_share() {
        let sens = sensitivity();
        let (d, w) = (64, Window { cells: 0, bits: 8, recent: 0 });
        let mut ring = vec![512; 8];
        ring[0] = 2048;
        ring[5] = 2048;
        let cells = Cells { ctx: 2048, layers: ring };
        let (widths, _) = allocate(&sens, d, &cells, w, 4.5).unwrap();
        let by_value: f64 = widths.iter().enumerate().map(|(l, x)| (side_bits(x.k, d, cells.layers[l], w) + side_bits(x.v, d, cells.layers[l], w)) * cells.layers[l] as f64).sum::<f64>() / (2 * cells.layers.iter().sum::<usize>()) as f64;
        assert!(by_value <= 4.5 + 1e-9 && by_value > 4.0, "held {by_value}");
        assert!((by_value - cells.held_bits(&widths, d, w)).abs() < 1e-12);
        let (same, _) = allocate(&sens, d, &Cells::uniform(8, 2048), w, 4.5).unwrap();
        assert!(cells.held_bits(&same, d, w) > 4.5, "counted at ctx, the ring layers' kept pages were missed");
        assert!(allocate(&sens, d, &Cells::uniform(3, 2048), w, 4.5).unwrap_err().contains("3 layers"));
        // A layer with no cells on the device costs nothing and leaves the others' budget whole.
        let mut some = vec![2048; 8];
        some[3] = 0;
        let some = Cells { ctx: 2048, layers: some };
        let (widths, _) = allocate(&sens, d, &some, w, 4.5).unwrap();
        let held = some.held_bits(&widths, d, w);
        assert!(held.is_finite() && held <= 4.5 + 1e-9 && held > 4.0, "held {held}");
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
        for (edit, why) in [("\"dspark_profile\": 2", "\"dspark_profile\": 1"), ("\"k\": 5", "\"k\": 9")] {
            let text = std::fs::read_to_string(&path).unwrap().replace(edit, why);
            std::fs::write(dir.join("bad.json"), text).unwrap();
            let e = Profile::load(&dir.join("bad.json")).unwrap_err();
            assert!(e.contains("version 1") || e.contains("code width 9"), "{e}");
        }
        std::fs::write(dir.join("bad.json"), "{}").unwrap();
        assert!(Profile::load(&dir.join("bad.json")).unwrap_err().contains("not a DSpark profile"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
