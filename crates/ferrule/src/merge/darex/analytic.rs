//! DAREx-q's analytic rescale (Deng et al., "DARE the Extreme", arXiv 2410.09344, §4.1), as the
//! authors' code chooses it per layer (vengdeng/DAREx `utils/analyticalq.py`,
//! `analytical_resolve_new` and `optimal_q_calculation`; the inputs come from `utils/getwx.py`).
//!
//! For a layer with delta `Δw` (`[rows, cols]`) and the mean of its inputs over a batch `x̄`
//! (`[cols]`), `c = Δw ⊙ x̄` row by row. For each row, the rescale `q` is searched on the grid
//! `⌊1000(1−p)⌋/1000, …, 0.998` (`p` the pruning rate, `1 − density`) for the smallest
//!
//! `|η·(1 − (1−p)/q)·Σⱼ cⱼ + η²·φ(p)·Σⱼ cⱼ²/(4q²) + ln(2/(1−γ))|`, `φ(p) = (1−2p)/ln((1−p)/p)`,
//!
//! and the search stops once `stop_fraction` of the rows have met a grid step that did not
//! improve on their best. The layer's `q` is the mean of the rows'. The reference computes in
//! float16 on a GPU; this in f64, so a row whose objective is flat between two grid points may
//! land one step (0.001) apart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::model::{
    AttentionInfo, BranchInfo, Embedding, EmbeddingInfo, InputInfo, Inputs, KvPrefix, Linear,
    LinearInfo, Model, ModelHook, ModelSource, NormInfo, NormParams, ResidualBranch, Task,
    VirtualTokens,
};
use crate::ops::{FrozenLinear, FrozenWeight};

/// The rule's constants; the defaults are `analytical_resolve_new`'s (`eta=0.45`,
/// `prob=0.95`, `stop_iter=0.8`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AnalyticQ {
    /// `η`, balancing the two terms of the bound.
    pub eta: f64,
    /// `γ`, the probability the bound holds with.
    pub prob: f64,
    /// Fraction of rows that must have stopped improving to end the search (guards against
    /// outlier features).
    pub stop_fraction: f64,
}

impl Default for AnalyticQ {
    fn default() -> Self {
        Self {
            eta: 0.45,
            prob: 0.95,
            stop_fraction: 0.8,
        }
    }
}

/// `φ(p) = (1−2p)/ln((1−p)/p)`, with its limit 1/2 at `p = 1/2`.
fn phi(p: f64) -> f64 {
    if (p - 0.5).abs() < 1e-12 {
        0.5
    } else {
        (1.0 - 2.0 * p) / ((1.0 - p) / p).ln()
    }
}

/// Each row's `q` for `c` (`[rows, cols]`, row-major) at pruning rate `p ∈ (0, 1)`.
pub fn rows_q(c: &[f32], rows: usize, cols: usize, p: f64, rule: AnalyticQ) -> Result<Vec<f64>> {
    if !(p > 0.0 && p < 1.0) {
        bail!("DAREx analytic q: the pruning rate must be in (0, 1), got {p}")
    }
    if c.len() != rows * cols || rows == 0 {
        bail!(
            "DAREx analytic q: {} values do not make {rows} rows of {cols}",
            c.len()
        )
    }
    let sums: Vec<(f64, f64)> = c
        .chunks(cols.max(1))
        .map(|row| {
            row.iter().fold((0.0, 0.0), |(s, s2), &x| {
                (s + x as f64, s2 + (x as f64).powi(2))
            })
        })
        .collect();
    let (eta, tail) = (rule.eta, (2.0 / (1.0 - rule.prob)).ln());
    let mut q_best = vec![1.0 - p; rows];
    let mut best = vec![10_000.0f64; rows];
    let mut stopped = vec![false; rows];
    // Python's int() of (1−p)·1000: truncation (0.1·1000 is 99.999… there, so 99).
    let start = ((1.0 - p) * 1000.0) as i64;
    for step in start..999 {
        let q = step as f64 * 0.001;
        for (i, &(s, s2)) in sums.iter().enumerate() {
            let term1 = (1.0 - (1.0 - p) / q) * s;
            let term2 = eta * eta * phi(p) * s2 / (4.0 * q * q) + tail;
            let res = (eta * term1 + term2).abs();
            // Both comparisons against the best before this step, as in the reference.
            let (improves, stalls) = (res <= best[i], res >= best[i]);
            if improves {
                best[i] = res;
                q_best[i] = q;
            }
            if stalls {
                stopped[i] = true;
            }
        }
        if stopped.iter().filter(|s| **s).count() as f64 / rows as f64 >= rule.stop_fraction {
            break;
        }
    }
    Ok(q_best)
}

/// A layer's `q`: the mean over rows of [`rows_q`] for `c = delta ⊙ input_mean` (`delta`
/// `[rows, cols]`, `input_mean` `[cols]`, the mean input of the layer over a batch).
pub fn layer_q(
    delta: &[f32],
    rows: usize,
    cols: usize,
    input_mean: &[f32],
    p: f64,
    rule: AnalyticQ,
) -> Result<f64> {
    if input_mean.len() != cols {
        bail!(
            "DAREx analytic q: the mean input has {} features but the layer takes {cols}",
            input_mean.len()
        )
    }
    let c: Vec<f32> = delta
        .chunks(cols.max(1))
        .flat_map(|row| row.iter().zip(input_mean).map(|(d, x)| d * x))
        .collect();
    let q = rows_q(&c, rows, cols, p, rule)?;
    Ok(q.iter().sum::<f64>() / q.len() as f64)
}

/// Mean inputs of a model's linear layers, by module path ([`mean_inputs`]).
pub type MeanInputs = BTreeMap<String, Vec<f32>>;

/// The analytic rule with what it reads: each input adapter's [`MeanInputs`], in input order.
#[derive(Clone, Debug)]
pub struct Analytic {
    pub rule: AnalyticQ,
    pub means: Vec<MeanInputs>,
}

/// The mean input of every linear layer over the tokens of `inputs` (padding included: give
/// an unpadded batch), in the model of `source` built through `hook` (an adapter's tuner: the
/// fine-tuned model, as the reference measures it), by module path.
pub fn mean_inputs(
    source: &ModelSource,
    task: Task,
    hook: &dyn ModelHook,
    inputs: &Inputs,
) -> Result<MeanInputs> {
    let sums: Sums = Arc::new(Mutex::new(BTreeMap::new()));
    let recording = Recording {
        inner: hook,
        sums: sums.clone(),
    };
    let model = Model::build(source, task, &recording, &Device::Cpu, 0)?;
    model.set_grad_enabled(false);
    model.forward(inputs)?;
    drop(model);
    let sums = sums
        .lock()
        .map_err(|_| anyhow::anyhow!("a recorder panicked"))?;
    Ok(sums
        .iter()
        .map(|(k, (s, n))| {
            (
                k.clone(),
                s.iter().map(|x| (x / *n as f64) as f32).collect(),
            )
        })
        .collect())
}

type Sums = Arc<Mutex<BTreeMap<String, (Vec<f64>, usize)>>>;

/// A hook that wraps every linear layer `inner` makes in a [`Recorder`].
struct Recording<'a> {
    inner: &'a dyn ModelHook,
    sums: Sums,
}

impl ModelHook for Recording<'_> {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        Ok(Box::new(Recorder {
            path: info.path.clone(),
            inner: self.inner.linear(info, base)?,
            sums: self.sums.clone(),
        }))
    }
    fn norm(&self, info: &NormInfo, params: NormParams) -> Result<NormParams> {
        self.inner.norm(info, params)
    }
    fn embedding(&self, info: &EmbeddingInfo, base: FrozenWeight) -> Result<Box<dyn Embedding>> {
        self.inner.embedding(info, base)
    }
    fn virtual_tokens(&self, info: &InputInfo) -> Result<Option<Box<dyn VirtualTokens>>> {
        self.inner.virtual_tokens(info)
    }
    fn kv_prefix(&self, info: &AttentionInfo) -> Result<Option<Box<dyn KvPrefix>>> {
        self.inner.kv_prefix(info)
    }
    fn residual_branch(&self, info: &BranchInfo) -> Result<Option<Box<dyn ResidualBranch>>> {
        self.inner.residual_branch(info)
    }
}

/// A linear layer that adds up its inputs (per feature, over tokens) before running.
struct Recorder {
    path: String,
    inner: Box<dyn Linear>,
    sums: Sums,
}

impl Linear for Recorder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let d = x.dim(candle_core::D::Minus1)?;
        let rows: Vec<Vec<f32>> = x.reshape(((), d))?.to_dtype(DType::F32)?.to_vec2()?;
        if let Ok(mut sums) = self.sums.lock() {
            let (s, n) = sums
                .entry(self.path.clone())
                .or_insert_with(|| (vec![0.0; d], 0));
            for row in &rows {
                s.iter_mut().zip(row).for_each(|(a, b)| *a += *b as f64);
            }
            *n += rows.len();
        }
        self.inner.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_minimizes_the_bound_on_the_grid() {
        // c = [1, 1], p = 0.9: the objective is 0.9 − 0.09/q + 0.0368651/q² + ln 40 (φ(0.9) =
        // 0.364096), smallest at q = 2·0.0368651/0.09 = 0.8192: grid point 0.819.
        let q = rows_q(&[1.0, 1.0], 1, 2, 0.9, AnalyticQ::default()).unwrap();
        assert!((q[0] - 0.819).abs() < 1e-9, "{q:?}");
        // c = [−30, 1]: −13.05 + 1.305/q + 16.61/q² + ln 40 falls all the way: the last point.
        let q = rows_q(&[-30.0, 1.0], 1, 2, 0.9, AnalyticQ::default()).unwrap();
        assert!((q[0] - 0.998).abs() < 1e-9, "{q:?}");
    }

    #[test]
    fn the_search_stops_when_enough_rows_stall() {
        let c = [1.0, 1.0, -30.0, 1.0];
        // Half the rows suffice: the first stalls at 0.820, which ends the search for both.
        let half = AnalyticQ {
            stop_fraction: 0.5,
            ..Default::default()
        };
        let q = rows_q(&c, 2, 2, 0.9, half).unwrap();
        assert!(
            (q[0] - 0.819).abs() < 1e-9 && (q[1] - 0.820).abs() < 1e-9,
            "{q:?}"
        );
        let all = AnalyticQ {
            stop_fraction: 1.0,
            ..Default::default()
        };
        let q = rows_q(&c, 2, 2, 0.9, all).unwrap();
        assert!((q[1] - 0.998).abs() < 1e-9, "{q:?}");
        // The layer's q is the mean of its rows', on delta ⊙ mean input.
        let delta = [0.5, 2.0, -15.0, 2.0];
        let layer = layer_q(&delta, 2, 2, &[2.0, 0.5], 0.9, all).unwrap();
        assert!((layer - (0.819 + 0.998) / 2.0).abs() < 1e-9, "{layer}");
        assert!(rows_q(&c, 2, 2, 1.0, all).is_err());
        assert!(layer_q(&delta, 2, 2, &[1.0], 0.9, all).is_err());
    }
}
