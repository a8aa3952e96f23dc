//! DARE and DAREx-q on the dense deltas of adapters, merged into the base; `q` given or chosen
//! by the output-change criterion (see the module above).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::merge::delta::{mask_rng, sparsify, Rescale, Sparsify};
use crate::model::hooks::{Linear, LinearInfo, ModelHook};
use crate::model::{Model, ModelSource, Task};
use crate::ops::FrozenLinear;
use crate::tuners::{Delta, Tuner, Update};

/// The weighted sum `Σ w_i m_i ⊙ ΔW_i` of the adapters' updates, per base tensor name, where
/// `m_i` keeps each entry with probability `keep` (`1 − p`; the masks drawn from `seed`, the
/// tensor's name and the adapter's index) and nothing is rescaled yet. `keep = 1` keeps
/// every entry: the plain weighted sum.
///
/// Errors: an adapter whose merge is not a plain `W + ΔW` (IA3's scaling, DoRA's row norms,
/// trained copies of whole modules), named with the tensor; `keep` outside `(0, 1]`.
pub fn dropped_deltas(
    adapters: &[(&str, &dyn Tuner, f32)],
    keep: f32,
    seed: u64,
) -> Result<BTreeMap<String, Tensor>> {
    if !(keep > 0.0 && keep <= 1.0) {
        bail!("DARE: the keep rate 1 − p must be in (0, 1], got {keep}")
    }
    let mut sums: BTreeMap<String, Tensor> = BTreeMap::new();
    for (index, (name, tuner, weight)) in adapters.iter().enumerate() {
        if let Some((t, _)) = tuner.replaced()?.first() {
            bail!("DARE: adapter {name} replaces {t} outright (modules_to_save or a trained copy); only additive updates (W + ΔW) can be dropped and rescaled")
        }
        for (tensor, update) in tuner.updates()? {
            let Update::Add(delta) = update else {
                bail!("DARE: adapter {name} ({}) changes {tensor} by scaling, row renormalisation or a mask, not by adding ΔW; DARE applies to additive deltas only", tuner.method().peft_type)
            };
            let delta = delta.dense()?;
            let dims = delta.dims().to_vec();
            let mut values: Vec<f32> = delta.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut rng = mask_rng(seed, &tensor, index);
            sparsify(
                &mut values,
                dims[0],
                keep,
                Sparsify::Random,
                Rescale::None,
                &mut rng,
            )?;
            let dropped = (Tensor::from_vec(values, dims, &Device::Cpu)? * *weight as f64)?;
            let sum = match sums.remove(&tensor) {
                Some(s) if s.dims() == dropped.dims() => (s + dropped)?,
                Some(s) => bail!(
                    "DARE: adapter {name} changes {tensor} with shape {:?}, an earlier adapter with {:?}",
                    dropped.dims(),
                    s.dims()
                ),
                None => dropped,
            };
            sums.insert(tensor, sum);
        }
    }
    Ok(sums)
}

/// A model hook adding `scale · Δ` to every linear layer that has a delta (keyed by base
/// tensor name `path.weight`); `scale` can be changed between forward passes, so one built
/// model serves every candidate `q`.
pub struct ScaledDeltas {
    deltas: HashMap<String, Tensor>,
    scale: Arc<RwLock<f32>>,
}

impl ScaledDeltas {
    pub fn new(deltas: &BTreeMap<String, Tensor>) -> Self {
        Self {
            deltas: deltas
                .iter()
                .filter_map(|(k, v)| Some((k.strip_suffix(".weight")?.to_string(), v.clone())))
                .collect(),
            scale: Arc::new(RwLock::new(1.0)),
        }
    }

    pub fn set_scale(&self, scale: f32) {
        *self.scale.write().expect("scale lock") = scale;
    }
}

struct DeltaLinear {
    base: FrozenLinear,
    /// `Δᵀ: [in, out]`.
    delta_t: Tensor,
    scale: Arc<RwLock<f32>>,
}

impl Linear for DeltaLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = candle_core::Module::forward(&self.base, x)?;
        let s = *self.scale.read().expect("scale lock") as f64;
        y + (x.broadcast_matmul(&self.delta_t)? * s)?
    }
}

impl ModelHook for ScaledDeltas {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        Ok(match self.deltas.get(&info.path) {
            Some(delta) => Box::new(DeltaLinear {
                base,
                delta_t: delta.t()?.contiguous()?,
                scale: self.scale.clone(),
            }),
            None => Box::new(base),
        })
    }
}

/// The outcome of the output-change search.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QChoice {
    /// The chosen `q`; the kept deltas are scaled by `1/q`.
    pub q: f32,
    /// Mean squared difference of the logits from the unpruned merge's at the chosen `q`.
    pub change: f64,
    /// The same at DARE's `q = 1 − p`.
    pub dare_change: f64,
    /// Every `(q, change)` evaluated, in order.
    pub tried: Vec<(f32, f64)>,
}

/// Chooses `q ∈ [keep, 1]` minimising the mean squared change of the logits on one packed
/// batch (`input_ids: [1, n]` u32, `lens` its records' lengths) between the model with
/// `W + Σ w_i ΔW_i` (`full`) and with `W + (1/q)·dropped` (both from [`dropped_deltas`], with
/// the same adapters and weights).
pub fn choose_q_by_output_change(
    source: &ModelSource,
    task: Task,
    full: &BTreeMap<String, Tensor>,
    dropped: &BTreeMap<String, Tensor>,
    keep: f32,
    input_ids: &Tensor,
    lens: &[usize],
) -> Result<QChoice> {
    let device = Device::Cpu;
    let logits_of = |model: &Model| -> Result<Tensor> {
        let _no_grad = model.no_grad();
        Ok(model
            .forward_packed(input_ids, lens)?
            .to_dtype(DType::F32)?)
    };
    let reference = {
        let hook = ScaledDeltas::new(full);
        logits_of(&Model::build(source, task, &hook, &device, 0)?)?
    };
    let hook = ScaledDeltas::new(dropped);
    let model = Model::build(source, task, &hook, &device, 0)?;
    let mut tried: Vec<(f32, f64)> = Vec::new();
    let mut change = |q: f32| -> Result<f64> {
        hook.set_scale(1.0 / q);
        let diff = (logits_of(&model)? - &reference)?;
        let mse = diff.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        tried.push((q, mse));
        Ok(mse)
    };
    let dare_change = change(keep)?;
    if keep < 1.0 {
        golden_section(keep, 1.0, 16, &mut change)?;
    }
    let (q, change) = tried
        .iter()
        .copied()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .context("no q was tried")?;
    Ok(QChoice {
        q,
        change,
        dare_change,
        tried,
    })
}

/// Golden-section search for the minimum of `f` on `[lo, hi]` in `steps` evaluations after
/// the first two (the points are recorded by `f` itself).
fn golden_section(
    mut lo: f32,
    mut hi: f32,
    steps: usize,
    f: &mut impl FnMut(f32) -> Result<f64>,
) -> Result<()> {
    let r = (5f32.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (hi - r * (hi - lo), lo + r * (hi - lo));
    let (mut fa, mut fb) = (f(a)?, f(b)?);
    for _ in 0..steps {
        if fa <= fb {
            hi = b;
            (b, fb) = (a, fa);
            a = hi - r * (hi - lo);
            fa = f(a)?;
        } else {
            lo = a;
            (a, fa) = (b, fb);
            b = lo + r * (hi - lo);
            fb = f(b)?;
        }
    }
    Ok(())
}

/// How `q` is chosen.
#[derive(Clone, Debug)]
pub enum QRule {
    /// `q = 1 − p`: plain DARE.
    Dare,
    /// A given `q` for every layer.
    Fixed(f32),
    /// [`choose_q_by_output_change`] on these inputs (`input_ids: [b, t]` with an optional
    /// 1/0 `attention_mask`, each row's real tokens contiguous).
    OutputChange {
        input_ids: Tensor,
        attention_mask: Option<Tensor>,
    },
}

/// DARE on dense deltas, as [`merge_dense_dare`] runs it.
#[derive(Clone, Debug)]
pub struct DenseDare {
    /// The keep rate `1 − p`, in `(0, 1]`.
    pub density: f32,
    /// Seed of the masks ([`crate::merge::delta::mask_rng`]).
    pub seed: u64,
    /// How `q` is chosen.
    pub q: QRule,
}

/// What [`merge_dense_dare`] did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DenseDareReport {
    /// The keep rate `1 − p`.
    pub density: f32,
    /// The rescale was `1/q`.
    pub q: f32,
    /// The search, with [`QRule::OutputChange`].
    pub search: Option<QChoice>,
    #[serde(flatten)]
    pub merge: crate::merge::MergeReport,
}

/// DARE (or DAREx-q) on each adapter's dense update, weighted and summed
/// ([`dropped_deltas`]), merged into the base and written to `out` as a model folder.
pub fn merge_dense_dare(
    source: &ModelSource,
    task: Task,
    adapters: &[(&str, &dyn Tuner, f32)],
    dare: &DenseDare,
    out: &std::path::Path,
    options: crate::merge::MergeOptions,
) -> Result<DenseDareReport> {
    let (density, seed) = (dare.density, dare.seed);
    let dropped = dropped_deltas(adapters, density, seed)?;
    let (q, search) = match &dare.q {
        QRule::Dare => (density, None),
        QRule::Fixed(q) => (*q, None),
        QRule::OutputChange {
            input_ids,
            attention_mask,
        } => {
            let (ids, lens) = packed(input_ids, attention_mask.as_ref())?;
            let full = dropped_deltas(adapters, 1.0, seed)?;
            let c = choose_q_by_output_change(source, task, &full, &dropped, density, &ids, &lens)?;
            (c.q, Some(c))
        }
    };
    let updates = rescaled_updates(dropped, q)?;
    let merge = crate::merge::merge_updates_to_dir(source, vec![], updates, task, out, options)?;
    Ok(DenseDareReport {
        density,
        q,
        search,
        merge,
    })
}

/// A padded batch as one padding-free row: each row's tokens where the mask is 1.
fn packed(input_ids: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Vec<usize>)> {
    let ids: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
    let mask: Option<Vec<Vec<u32>>> = match mask {
        Some(m) => Some(m.to_dtype(DType::U32)?.to_vec2()?),
        None => None,
    };
    let (mut flat, mut lens) = (Vec::new(), Vec::new());
    for (i, row) in ids.iter().enumerate() {
        let kept: Vec<u32> = match &mask {
            Some(m) => row
                .iter()
                .zip(&m[i])
                .filter(|(_, k)| **k != 0)
                .map(|(t, _)| *t)
                .collect(),
            None => row.clone(),
        };
        if !kept.is_empty() {
            lens.push(kept.len());
            flat.extend(kept);
        }
    }
    if flat.is_empty() {
        bail!("the calibration batch holds no tokens")
    }
    let n = flat.len();
    Ok((Tensor::from_vec(flat, (1, n), &Device::Cpu)?, lens))
}

/// The updates a merge applies: the dropped deltas scaled by `1/q`.
pub fn rescaled_updates(
    dropped: BTreeMap<String, Tensor>,
    q: f32,
) -> Result<Vec<(String, Update)>> {
    if !(q > 0.0 && q <= 1.0) {
        bail!("DAREx: q must be in (0, 1], got {q}")
    }
    dropped
        .into_iter()
        .map(|(k, d)| Ok((k, Update::Add(Delta::Dense((d / q as f64)?)))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_section_finds_the_minimum_of_a_parabola() {
        let mut seen = Vec::new();
        golden_section(0.1, 1.0, 20, &mut |x| {
            seen.push(x);
            Ok(((x - 0.37) as f64).powi(2))
        })
        .unwrap();
        let best = seen
            .iter()
            .copied()
            .min_by(|a, b| (a - 0.37).abs().total_cmp(&(b - 0.37).abs()))
            .unwrap();
        assert!((best - 0.37).abs() < 1e-3, "best {best}");
    }
}
