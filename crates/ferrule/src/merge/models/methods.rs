//! The merge methods, each a function over one output tensor's inputs in f32
//! (`mergekit/merge_methods/*.py`, mergekit 0.1.5). The task-vector methods share
//! [`crate::merge::delta`] with the adapter combinations.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::parameters::{self, ParamSpec, Value};
use crate::merge::delta::{self, MagnitudeCount, Norm, Rescale, SignElection, Sparsify};

/// The sparsification of a generalized-task-arithmetic method (`SparsificationMethod`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsification {
    Magnitude,
    Random,
    MagnitudeOutliers,
    DellaMagprune,
}

/// `GeneralizedTaskArithmeticMerge`: deltas from the base, optionally sparsified, weighted,
/// optionally sign-elected (`consensus_method: sum`), summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskArithmetic {
    pub consensus: bool,
    pub sparsification: Option<Sparsification>,
    pub default_normalize: bool,
    pub default_rescale: bool,
}

/// A merge method by its mergekit name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Linear,
    TaskArithmetic(TaskArithmetic),
    Slerp,
    ModelStock,
    Passthrough,
}

/// The names `merge_method` accepts, as mergekit's registry spells them.
pub const METHODS: &[&str] = &[
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "model_stock",
    "passthrough",
];

impl Method {
    /// The method named `name`, with mergekit's registry defaults
    /// (`mergekit/merge_methods/registry.py`).
    pub fn from_name(name: &str) -> Result<Self> {
        use Sparsification::*;
        let gta = |consensus, sparsification, default_normalize, default_rescale| {
            Method::TaskArithmetic(TaskArithmetic {
                consensus,
                sparsification,
                default_normalize,
                default_rescale,
            })
        };
        Ok(match name {
            "linear" => Method::Linear,
            "slerp" => Method::Slerp,
            "model_stock" => Method::ModelStock,
            "passthrough" => Method::Passthrough,
            "task_arithmetic" => gta(false, None, false, false),
            "ties" => gta(true, Some(Magnitude), true, false),
            "dare_ties" => gta(true, Some(Random), false, true),
            "dare_linear" => gta(false, Some(Random), false, true),
            "breadcrumbs" => gta(false, Some(MagnitudeOutliers), false, false),
            "breadcrumbs_ties" => gta(true, Some(MagnitudeOutliers), false, false),
            "della" => gta(true, Some(DellaMagprune), true, true),
            "della_linear" => gta(false, Some(DellaMagprune), false, true),
            _ => bail!(
                "merge_method: unknown method {name:?}; ferrule supports {}",
                METHODS.join(", ")
            ),
        })
    }

    /// The parameters it takes.
    pub fn params(self) -> Vec<ParamSpec> {
        match self {
            Method::Linear => parameters::linear_params(),
            Method::Slerp => parameters::slerp_params(),
            Method::ModelStock => parameters::model_stock_params(),
            Method::Passthrough => parameters::passthrough_params(),
            Method::TaskArithmetic(g) => parameters::task_arithmetic_params(
                g.default_normalize,
                g.default_rescale,
                g.sparsification == Some(Sparsification::MagnitudeOutliers),
                g.sparsification == Some(Sparsification::DellaMagprune),
            ),
        }
    }

    /// Whether it needs `base_model`.
    pub fn needs_base(self) -> bool {
        !matches!(self, Method::Linear | Method::Passthrough)
    }

    /// Whether its result depends on a random mask.
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Method::TaskArithmetic(TaskArithmetic {
                sparsification: Some(Sparsification::Random | Sparsification::DellaMagprune),
                ..
            })
        )
    }

    /// mergekit's input contract: the number of inputs (base included) it accepts.
    pub fn check_inputs(self, name: &str, inputs: usize, where_: &str) -> Result<()> {
        let ok = match self {
            Method::Slerp => inputs == 2,
            Method::ModelStock => inputs >= 3,
            Method::Passthrough => inputs == 1,
            _ => inputs >= 1,
        };
        if !ok {
            let need = match self {
                Method::Slerp => "a base and exactly one other model",
                Method::ModelStock => "a base and at least two other models",
                _ => "exactly one model per slice",
            };
            bail!("{where_}: {name} takes {need}; got {inputs} input(s)")
        }
        Ok(())
    }
}

/// Resolved parameters for one output tensor.
#[derive(Clone, Debug, Default)]
pub struct TensorParams {
    pub shared: BTreeMap<&'static str, Value>,
    /// Per input, in input order (the base has only its `Input`-scoped ones).
    pub per_input: Vec<BTreeMap<&'static str, Value>>,
}

impl TensorParams {
    pub(super) fn shared(&self, name: &str) -> Value {
        self.shared.get(name).copied().unwrap_or(Value::Unset)
    }

    pub(super) fn input(&self, i: usize, name: &str) -> Value {
        self.per_input[i].get(name).copied().unwrap_or(Value::Unset)
    }
}

/// One output tensor's inputs.
pub struct TensorInputs<'a> {
    /// The output tensor's name (for the random masks and errors).
    pub name: &'a str,
    pub shape: &'a [usize],
    /// Every input's values, in input order.
    pub values: Vec<Vec<f32>>,
    /// The index of the base among them.
    pub base: Option<usize>,
    /// Seed of the random masks.
    pub seed: u64,
}

/// Merges one tensor. The inputs are consumed: their buffers become the deltas and the result,
/// so that a merge holds as few copies of the tensor as it can.
pub fn merge(method: Method, mut inputs: TensorInputs, params: &TensorParams) -> Result<Vec<f32>> {
    let inputs = &mut inputs;
    match method {
        Method::Linear => linear(inputs, params),
        Method::TaskArithmetic(g) => task_arithmetic(g, inputs, params),
        Method::Slerp => {
            let b = inputs.base.expect("checked when planned");
            let t = params.shared("t").float();
            Ok(slerp(t, &inputs.values[b], &inputs.values[1 - b]))
        }
        Method::ModelStock => model_stock(inputs, params),
        Method::Passthrough => {
            let mut v = inputs.values[0].clone();
            if let Value::Float(s) = params.input(0, "scale") {
                v.iter_mut().for_each(|x| *x *= s as f32);
            }
            Ok(v)
        }
    }
}

/// `linear`: `Σ wᵢ xᵢ`, divided by `Σ wᵢ` when `normalize`.
fn linear(inputs: &TensorInputs, params: &TensorParams) -> Result<Vec<f32>> {
    let weights: Vec<f32> = (0..inputs.values.len())
        .map(|i| params.input(i, "weight").float() as f32)
        .collect();
    let mut out = vec![0f32; inputs.values[0].len()];
    for (x, w) in inputs.values.iter().zip(&weights) {
        out.iter_mut().zip(x).for_each(|(o, x)| *o += x * w);
    }
    if params.shared("normalize").bool() {
        let sum: f32 = weights.iter().sum();
        if sum == 0.0 {
            bail!(
                "linear: the weights of {} sum to 0 and normalize is on",
                inputs.name
            )
        }
        out.iter_mut().for_each(|o| *o /= sum);
    }
    Ok(out)
}

fn rows_of(shape: &[usize]) -> usize {
    if shape.len() >= 2 {
        shape[0]
    } else {
        1
    }
}

/// The generalized task arithmetic of `generalized_task_arithmetic.py`.
fn task_arithmetic(
    g: TaskArithmetic,
    inputs: &mut TensorInputs,
    params: &TensorParams,
) -> Result<Vec<f32>> {
    let b = inputs.base.expect("checked when planned");
    let mut values = std::mem::take(&mut inputs.values);
    let base = std::mem::take(&mut values[b]);
    let rescale = params.shared("rescale").bool();
    let meta: &TensorInputs = inputs;
    // Each input's delta is sparsified on its own (its own mask generator): in parallel, in
    // the input's own buffer.
    let weighted: Vec<(Vec<f32>, f32)> = values
        .into_par_iter()
        .enumerate()
        .filter(|(i, _)| *i != b)
        .map(|(i, x)| weighted_delta(g, meta, params, i, x, &base, rescale))
        .collect::<Result<_>>()?;
    Ok(mix(g, base, weighted, params))
}

/// The task-arithmetic sum of the weighted (sparsified) deltas, added to `base`: sign-elected
/// with `consensus`, divided by the (agreeing) weights with `normalize`, times `lambda`.
/// Elementwise, so rows merged in blocks give the same result.
pub(super) fn mix(
    g: TaskArithmetic,
    mut base: Vec<f32>,
    weighted: Vec<(Vec<f32>, f32)>,
    params: &TensorParams,
) -> Vec<f32> {
    let (deltas, weights): (Vec<Vec<f32>>, Vec<f32>) = weighted.into_iter().unzip();
    if deltas.is_empty() {
        return base;
    }
    let n = base.len();
    let normalize = params.shared("normalize").bool();
    let mut mixed = vec![0f32; n];
    if g.consensus {
        let refs: Vec<&[f32]> = deltas.iter().map(|d| d.as_slice()).collect();
        let signs = delta::elect_signs(&refs, SignElection::Total);
        // The agreeing weights, the divisor of `normalize` (0 → 1, as mergekit).
        let mut divisor = vec![0f32; if normalize { n } else { 0 }];
        for (d, w) in deltas.iter().zip(&weights) {
            for j in 0..n {
                if delta::agrees(d[j], signs[j]) {
                    mixed[j] += d[j];
                    if normalize {
                        divisor[j] += w;
                    }
                }
            }
        }
        for (m, d) in mixed.iter_mut().zip(&divisor) {
            *m /= if *d == 0.0 { 1.0 } else { *d };
        }
    } else {
        for d in &deltas {
            mixed.iter_mut().zip(d).for_each(|(m, d)| *m += d);
        }
        if normalize {
            let mut sum: f32 = weights.iter().sum();
            if sum.abs() < 1e-8 {
                sum = 1.0;
            }
            mixed.iter_mut().for_each(|m| *m /= sum);
        }
    }
    let lambda = params.shared("lambda").float() as f32;
    if lambda != 1.0 {
        mixed.iter_mut().for_each(|m| *m *= lambda);
    }
    base.iter_mut().zip(&mixed).for_each(|(b, m)| *b += m);
    base
}

/// Input `i`'s delta from the base, sparsified as the method says, times its weight.
fn weighted_delta(
    g: TaskArithmetic,
    inputs: &TensorInputs,
    params: &TensorParams,
    i: usize,
    mut d: Vec<f32>,
    base: &[f32],
    rescale: bool,
) -> Result<(Vec<f32>, f32)> {
    d.iter_mut().zip(base).for_each(|(x, b)| *x -= b);
    if let Some(s) = g.sparsification {
        let density = params.input(i, "density").float() as f32;
        let rescale = if rescale {
            Rescale::Norm(Norm::L1)
        } else {
            Rescale::None
        };
        let mut rng = delta::mask_rng(inputs.seed, inputs.name, i);
        delta::sparsify(
            &mut d,
            rows_of(inputs.shape),
            density,
            sparsify_method(s, params, i),
            rescale,
            &mut rng,
        )
        .map_err(|e| anyhow::anyhow!("{} (input {i}): {e}", inputs.name))?;
    }
    let w = params.input(i, "weight").float() as f32;
    d.iter_mut().for_each(|x| *x *= w);
    Ok((d, w))
}

/// Input `i`'s sparsification, with its parameters.
pub(super) fn sparsify_method(s: Sparsification, params: &TensorParams, i: usize) -> Sparsify {
    match s {
        Sparsification::Magnitude => Sparsify::Magnitude(MagnitudeCount::Mergekit),
        Sparsification::Random => Sparsify::Random,
        Sparsification::MagnitudeOutliers => Sparsify::MagnitudeOutliers {
            gamma: params.input(i, "gamma").float() as f32,
        },
        Sparsification::DellaMagprune => Sparsify::DellaMagprune {
            epsilon: params.input(i, "epsilon").float() as f32,
        },
    }
}

/// Spherical interpolation of the whole tensors seen as vectors (`slerp.py`): linear when
/// they are (anti)collinear, `|cos| > 0.9995`.
pub fn slerp(t: f64, v0: &[f32], v1: &[f32]) -> Vec<f32> {
    let norm = |v: &[f32]| v.iter().fold(0.0, |s, x| s + (*x as f64).powi(2)).sqrt();
    let (na, nb) = slerp_norms(norm(v0), norm(v1));
    let dot = v0
        .iter()
        .zip(v1)
        .fold(0.0, |s, (a, b)| s + slerp_dot(*a, *b, na, nb));
    let (ca, cb) = slerp_factors(t, dot);
    v0.iter().zip(v1).map(|(a, b)| ca * a + cb * b).collect()
}

/// The norms slerp normalises by: 1 for a norm at or below 1e-8.
pub(super) fn slerp_norms(na: f64, nb: f64) -> (f64, f64) {
    let fix = |n: f64| if n > 1e-8 { n } else { 1.0 };
    (fix(na), fix(nb))
}

/// One term of slerp's cosine.
pub(super) fn slerp_dot(a: f32, b: f32, na: f64, nb: f64) -> f64 {
    (a as f64 / na) * (b as f64 / nb)
}

/// Slerp's coefficients of the two tensors from their cosine `dot`: linear when they are
/// (anti)collinear, `|cos| > 0.9995`.
pub(super) fn slerp_factors(t: f64, dot: f64) -> (f32, f32) {
    let dot = dot.clamp(-1.0, 1.0);
    let (ca, cb) = if dot.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta = dot.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    };
    (ca as f32, cb as f32)
}

/// Model Stock (arXiv 2403.19522, `model_stock.py`): interpolate between the base and the
/// average of the others by `t = N·cosθ / (1 + (N−1)·cosθ)`, `cosθ` the mean pairwise cosine
/// of their deltas, over the whole tensor or (`filter_wise`) per row.
fn model_stock(inputs: &TensorInputs, params: &TensorParams) -> Result<Vec<f32>> {
    let b = inputs.base.expect("checked when planned");
    let w0 = &inputs.values[b];
    let ws: Vec<&Vec<f32>> = (0..inputs.values.len())
        .filter(|i| *i != b)
        .map(|i| &inputs.values[i])
        .collect();
    let rows = if params.shared("filter_wise").bool() {
        rows_of(inputs.shape)
    } else {
        1
    };
    let cols = w0.len() / rows.max(1);
    let count = ws.len() as f64;
    let mut out = vec![0f32; w0.len()];
    for r in 0..rows {
        let range = r * cols..(r + 1) * cols;
        let offsets: Vec<Vec<f64>> = ws
            .iter()
            .map(|w| {
                w[range.clone()]
                    .iter()
                    .zip(&w0[range.clone()])
                    .map(|(a, b)| (*a - *b) as f64)
                    .collect()
            })
            .collect();
        let sq = |v: &[f64]| v.iter().fold(0.0, |s, x| s + x * x);
        let mut cos = Vec::new();
        for (i, a) in offsets.iter().enumerate() {
            for bb in &offsets[i + 1..] {
                let dot = a.iter().zip(bb).fold(0.0, |s, (x, y)| s + x * y);
                cos.push(stock_cos(dot, sq(a), sq(bb)));
            }
        }
        let t = stock_t(&cos, count);
        for j in range {
            out[j] = stock_value(t, ws.iter().map(|w| w[j]), count, w0[j]);
        }
    }
    Ok(out)
}

/// Model Stock's interpolation factor from the pairwise cosines of `count` deltas.
pub(super) fn stock_t(cos: &[f64], count: f64) -> f32 {
    let cos = cos.iter().sum::<f64>() / cos.len() as f64;
    let den = 1.0 + (count - 1.0) * cos;
    (if den.abs() < 1e-6 {
        0.0
    } else {
        count * cos / den
    }) as f32
}

/// One merged entry of Model Stock: `t·avg + (1−t)·base`.
pub(super) fn stock_value(t: f32, ws: impl Iterator<Item = f32>, count: f64, base: f32) -> f32 {
    let avg = ws.sum::<f32>() / count as f32;
    t * avg + (1.0 - t) * base
}

/// Model Stock's cosine of two deltas from their dot product and squared norms.
pub(super) fn stock_cos(dot: f64, sq_a: f64, sq_b: f64) -> f64 {
    (dot / (sq_a.sqrt() * sq_b.sqrt()).max(1e-6)).clamp(-1.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_list_the_known_ones() {
        let err = Method::from_name("tie").unwrap_err().to_string();
        assert!(err.contains("\"tie\"") && err.contains("dare_ties, dare_linear"));
    }

    #[test]
    fn slerp_is_spherical_and_linear_when_collinear() {
        let a = [1.0, 0.0];
        let b = [0.0, 1.0];
        let m = slerp(0.5, &a, &b);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((m[0] - h).abs() < 1e-6 && (m[1] - h).abs() < 1e-6);
        assert_eq!(slerp(0.25, &[2.0, 0.0], &[4.0, 0.0]), vec![2.5, 0.0]);
    }
}
