//! The optimizers and what feeds them: AdamW with decoupled weight decay, gradient
//! accumulation and gradient clipping, numerically matching `torch.optim.AdamW` and
//! `torch.nn.utils.clip_grad_norm_` (this file); bitsandbytes' 8-bit and paged AdamW
//! ([`bnb`], state storage in [`arena`]); the `optim` setting, the [`Optimizer`] interface the
//! trainer drives and [`build_optimizer`] ([`choice`]); learning rates per parameter group
//! ([`groups`]); the layer-wise step driven from the
//! backward pass ([`layerwise`]).

mod arena;
pub mod bnb;
pub mod choice;
pub mod groups;
pub mod layerwise;

pub use bnb::{BnbAdamW, StateBits};
pub use choice::{build_optimizer, OptimName, Optimizer, OptimizerSpec, DEFAULT_MIN_8BIT_SIZE};
pub use groups::LrGroup;
pub use layerwise::LayerwiseStepper;

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Hyper-parameters of [`AdamW`]. Defaults are those of
/// `torch.optim.AdamW`: `lr = 1e-3`, `betas = (0.9, 0.999)`, `eps = 1e-8`,
/// `weight_decay = 1e-2`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Learning rate `lr` (usually overwritten each step by the schedule via
    /// [`AdamW::set_lr`]).
    pub lr: f64,
    /// Exponential decay rate of the first moment, `beta1`.
    pub beta1: f64,
    /// Exponential decay rate of the second moment, `beta2`.
    pub beta2: f64,
    /// Term added to the denominator for numerical stability, `eps`.
    pub eps: f64,
    /// Decoupled weight decay coefficient `lambda`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// Checks the ranges torch's constructor checks: `lr >= 0`, `eps >= 0`,
    /// `0 <= beta < 1`, `weight_decay >= 0` (all finite).
    pub fn validate(&self) -> Result<()> {
        let finite_nonneg = |x: f64| x.is_finite() && x >= 0.0;
        ensure!(finite_nonneg(self.lr), "invalid learning rate: {}", self.lr);
        ensure!(
            finite_nonneg(self.eps),
            "invalid epsilon value: {}",
            self.eps
        );
        ensure!(
            (0.0..1.0).contains(&self.beta1),
            "invalid beta1 (must be in [0, 1)): {}",
            self.beta1
        );
        ensure!(
            (0.0..1.0).contains(&self.beta2),
            "invalid beta2 (must be in [0, 1)): {}",
            self.beta2
        );
        ensure!(
            finite_nonneg(self.weight_decay),
            "invalid weight_decay value: {}",
            self.weight_decay
        );
        Ok(())
    }
}

/// Per-parameter optimizer state.
struct ParamState {
    name: String,
    var: Var,
    /// First moment `m` (torch's `exp_avg`); `None` until the parameter first
    /// receives a gradient, like torch's lazily created state.
    exp_avg: Option<Tensor>,
    /// Second moment `v` (torch's `exp_avg_sq`).
    exp_avg_sq: Option<Tensor>,
    /// Number of updates applied to this parameter (torch's per-parameter
    /// `state["step"]`), which drives its bias corrections.
    step: u64,
}

/// Dtype in which moments are kept and the update is computed: the
/// parameter's own dtype for `f32`/`f64`, `f32` for half-precision
/// parameters (see [`AdamW`]).
pub(crate) fn state_dtype(param: DType) -> DType {
    match param {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
/// ICLR 2019, Algorithm 2) over named [`Var`]s, following the operation order
/// of PyTorch's single-tensor `torch.optim.AdamW` implementation. For a
/// parameter `p` with gradient `g` at its `t`-th update (`t` starting at 1):
///
/// ```text
/// p  <- p * (1 - lr * lambda)                      // decoupled weight decay
/// m  <- m + (1 - beta1) * (g - m)                  // = beta1 m + (1 - beta1) g  (torch: lerp)
/// v  <- beta2 * v + (1 - beta2) * g^2
/// bc1 = 1 - beta1^t,   bc2 = 1 - beta2^t
/// denom = sqrt(v) / sqrt(bc2) + eps
/// p  <- p - (lr / bc1) * m / denom                 // = p - lr * m_hat / (sqrt(v_hat) + eps')
/// ```
///
/// Note that, as in torch, `eps` is added to `sqrt(v) / sqrt(bc2)`, i.e. to
/// `sqrt(v_hat)`, and the update uses the learning rate in effect at this
/// step for both the decay and the Adam step (`lr * lambda`, torch's
/// convention, rather than the paper's schedule multiplier `eta_t * lambda`).
///
/// Parameters without a gradient at a step are skipped entirely (no decay,
/// no moment update, their own step count does not advance), as in torch.
///
/// Deliberate difference from torch: for `f16`/`bf16` parameters the moments
/// are stored and the update computed in `f32` (torch keeps them in the
/// parameter dtype); the result is rounded back to the parameter dtype.
pub struct AdamW {
    params: Vec<ParamState>,
    cfg: AdamWConfig,
    /// Number of [`AdamW::step`] / [`AdamW::step_with`] calls.
    step: u64,
}

impl AdamW {
    /// Creates the optimizer. Moment buffers are allocated lazily, on a
    /// parameter's first gradient (as torch does), so this cannot fail;
    /// call [`AdamWConfig::validate`] to check user-provided settings.
    /// Names must be unique (duplicates make [`AdamW::state`] fail).
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Self {
        let params = params
            .into_iter()
            .map(|(name, var)| ParamState {
                name,
                var,
                exp_avg: None,
                exp_avg_sq: None,
                step: 0,
            })
            .collect();
        Self {
            params,
            cfg,
            step: 0,
        }
    }

    /// Sets the learning rate used by subsequent steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// The current hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Number of optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The optimized parameters, in construction order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// Applies one update using the gradients computed by `loss.backward()`.
    /// Parameters absent from `grads` are skipped.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let cfg = self.cfg;
        for p in &mut self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                update(p, g, &cfg)?;
            }
        }
        Ok(())
    }

    /// Applies one update with gradients given by parameter name (e.g. the
    /// output of [`GradAccumulator::take_mean`]). Parameters absent from
    /// `grads` are skipped; names that match no parameter are an error.
    pub fn step_with(&mut self, grads: &HashMap<String, Tensor>) -> Result<()> {
        for name in grads.keys() {
            ensure!(
                self.params.iter().any(|p| &p.name == name),
                "gradient given for unknown parameter {name:?}"
            );
        }
        self.step += 1;
        let cfg = self.cfg;
        for p in &mut self.params {
            if let Some(g) = grads.get(&p.name) {
                update(p, g, &cfg)?;
            }
        }
        Ok(())
    }

    /// The optimizer state as named tensors, for checkpointing:
    /// `"<name>.exp_avg"`, `"<name>.exp_avg_sq"` (zeros for parameters that
    /// never received a gradient) and `"<name>.step"` (`i64` scalar) for every
    /// parameter, plus `"step"` (`i64` scalar, the global step count).
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(3 * self.params.len() + 1);
        let mut seen = std::collections::HashSet::new();
        for p in &self.params {
            ensure!(
                seen.insert(&p.name),
                "duplicate parameter name {:?}",
                p.name
            );
            let (m, v) = match (&p.exp_avg, &p.exp_avg_sq) {
                (Some(m), Some(v)) => (m.clone(), v.clone()),
                _ => {
                    let z =
                        Tensor::zeros(p.var.shape(), state_dtype(p.var.dtype()), p.var.device())?;
                    (z.clone(), z)
                }
            };
            out.push((format!("{}.exp_avg", p.name), m));
            out.push((format!("{}.exp_avg_sq", p.name), v));
            out.push((format!("{}.step", p.name), step_tensor(p.step)?));
        }
        out.push(("step".to_string(), step_tensor(self.step)?));
        Ok(out)
    }

    /// Restores state produced by [`AdamW::state`] (possibly after a
    /// safetensors round trip). Every entry must be present with the
    /// parameter's shape, and no unknown entry may be present; moments are
    /// moved to each parameter's device. On error `self` is unchanged.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut expected = std::collections::HashSet::new();
        expected.insert("step".to_string());
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let get = |suffix: &str| -> Result<(String, &Tensor)> {
                let key = format!("{}.{suffix}", p.name);
                let t = state
                    .get(&key)
                    .with_context(|| format!("optimizer state is missing {key:?}"))?;
                Ok((key, t))
            };
            let mut moment = |suffix: &str| -> Result<Tensor> {
                let (key, t) = get(suffix)?;
                ensure!(
                    t.shape() == p.var.shape(),
                    "optimizer state {key:?} has shape {:?} but parameter {:?} has shape {:?}",
                    t.dims(),
                    p.name,
                    p.var.dims()
                );
                expected.insert(key);
                Ok(t.to_dtype(state_dtype(p.var.dtype()))?
                    .to_device(p.var.device())?)
            };
            let m = moment("exp_avg")?;
            let v = moment("exp_avg_sq")?;
            let key = format!("{}.step", p.name);
            let step = read_step(state, &key)?;
            expected.insert(key);
            restored.push((m, v, step));
        }
        for key in state.keys() {
            ensure!(
                expected.contains(key),
                "unexpected optimizer state entry {key:?}"
            );
        }
        let global = read_step(state, "step")?;
        for (p, (m, v, step)) in self.params.iter_mut().zip(restored) {
            // A parameter that never had a gradient has step 0 and zero
            // moments; keep it lazily uninitialized as a fresh one would be.
            if step == 0 {
                p.exp_avg = None;
                p.exp_avg_sq = None;
            } else {
                p.exp_avg = Some(m);
                p.exp_avg_sq = Some(v);
            }
            p.step = step;
        }
        self.step = global;
        Ok(())
    }
}

/// A step count as the `i64` scalar tensor torch's state dict holds.
pub(crate) fn step_tensor(step: u64) -> Result<Tensor> {
    let step = i64::try_from(step).context("step count overflows i64")?;
    Ok(Tensor::new(step, &Device::Cpu)?)
}

/// The step count stored under `key` in an optimizer state: a scalar holding a whole number
/// in `0..2^53` (what an `f64` holds exactly), any dtype.
pub(crate) fn read_step(state: &BTreeMap<String, Tensor>, key: &str) -> Result<u64> {
    let t = state
        .get(key)
        .with_context(|| format!("optimizer state is missing {key:?}"))?;
    ensure!(
        t.elem_count() == 1,
        "optimizer state {key:?} must be a scalar, has shape {:?}",
        t.dims()
    );
    let x = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
    ensure!(
        x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53),
        "optimizer state {key:?} is not a valid step count: {x}"
    );
    Ok(x as u64)
}

/// `grad` checked against the parameter `name` (a float parameter, the same shape) and put in
/// the state dtype ([`state_dtype`]) on the parameter's device: what every optimizer's update
/// starts from.
pub(crate) fn checked_grad(name: &str, var: &Var, grad: &Tensor) -> Result<Tensor> {
    let pdtype = var.dtype();
    ensure!(
        pdtype.is_float(),
        "parameter {name:?} has non-float dtype {pdtype:?}"
    );
    ensure!(
        grad.shape() == var.shape(),
        "gradient for {name:?} has shape {:?}, parameter has shape {:?}",
        grad.dims(),
        var.dims()
    );
    Ok(grad
        .detach()
        .to_dtype(state_dtype(pdtype))?
        .to_device(var.device())?)
}

/// One AdamW update of a single parameter (see [`AdamW`] for the formula).
fn update(p: &mut ParamState, grad: &Tensor, cfg: &AdamWConfig) -> Result<()> {
    let g = checked_grad(&p.name, &p.var, grad)?;
    let (pdtype, sdtype) = (p.var.dtype(), g.dtype());
    let param = p.var.as_detached_tensor().to_dtype(sdtype)?;
    let moments = p.exp_avg.as_ref().zip(p.exp_avg_sq.as_ref());
    let (param, m, v) = adamw_update(cfg, p.step + 1, &param, &g, moments)?;
    p.var.set(&param.to_dtype(pdtype)?)?;
    p.step += 1;
    p.exp_avg = Some(m);
    p.exp_avg_sq = Some(v);
    Ok(())
}

/// The AdamW update of [`AdamW`]'s doc comment, applied to `param` with gradient `g` at the
/// parameter's `t`-th update (from 1), with moments `(m, v)` (`None`: zeros, a first update).
/// Every tensor is in the state dtype; returns the new `(param, m, v)`. The update is
/// element-wise, so a slice of a parameter (ZeRO's partitions, `dist::zero`) updates exactly as
/// the same elements of the whole parameter do.
pub(crate) fn adamw_update(
    cfg: &AdamWConfig,
    t: u64,
    param: &Tensor,
    g: &Tensor,
    moments: Option<(&Tensor, &Tensor)>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (m, v) = match moments {
        Some((m, v)) => (m.clone(), v.clone()),
        None => {
            let z = g.zeros_like()?;
            (z.clone(), z)
        }
    };
    // torch keeps the step as a float and computes `beta ** step` with libm pow.
    let t = t as f64;
    let (lr, beta1, beta2) = (cfg.lr, cfg.beta1, cfg.beta2);

    // p <- p * (1 - lr * lambda)
    let mut param = param.clone();
    if cfg.weight_decay != 0.0 {
        param = (param * (1.0 - lr * cfg.weight_decay))?;
    }
    // m <- lerp(m, g, 1 - beta1), with torch's two-sided lerp formula.
    let w = 1.0 - beta1;
    let diff = (g - &m)?;
    let m = if w < 0.5 {
        (&m + (diff * w)?)?
    } else {
        (g - (diff * (1.0 - w))?)?
    };
    // v <- beta2 * v + (1 - beta2) * g^2
    let v = ((&v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
    let bias_correction1 = 1.0 - beta1.powf(t);
    let bias_correction2 = 1.0 - beta2.powf(t);
    let step_size = lr / bias_correction1;
    // denom = sqrt(v) / sqrt(bc2) + eps
    let denom = v.sqrt()?.affine(1.0 / bias_correction2.sqrt(), cfg.eps)?;
    // p <- p - step_size * m / denom
    let param = (param - (m.div(&denom)? * step_size)?)?;
    Ok((param, m, v))
}

/// Accumulates gradients over micro-batches (gradient accumulation).
///
/// Each call to [`GradAccumulator::add`] adds `weight * g` for every given
/// variable that has a gradient and adds `weight` to the total weight;
/// [`GradAccumulator::take_mean`] returns `sum_i(weight_i * g_i) /
/// sum_i(weight_i)`. With `weight = 1` this is the plain mean over
/// micro-batches (torch's `loss / accumulation_steps` idiom); with `weight =`
/// the number of target tokens of a micro-batch whose loss is a per-token
/// mean, it is the exact token-level mean over the whole batch. A variable
/// with no gradient in some micro-batch contributes zero for it.
///
/// Sums are kept in `f32` (`f64` for `f64` gradients) so that half-precision
/// gradients do not lose precision while accumulating.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: HashMap<String, Tensor>,
    total_weight: f64,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `weight *` the gradients of `vars` found in `grads`.
    pub fn add(&mut self, grads: &GradStore, vars: &[(String, Var)], weight: f64) -> Result<()> {
        self.check_weight(weight)?;
        for (name, var) in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                self.accumulate(name, g, weight)?;
            }
        }
        self.total_weight += weight;
        self.micro_batches += 1;
        Ok(())
    }

    /// Adds `weight *` each gradient of a by-name map.
    pub fn add_map(&mut self, grads: &HashMap<String, Tensor>, weight: f64) -> Result<()> {
        self.check_weight(weight)?;
        for (name, g) in grads {
            self.accumulate(name, g, weight)?;
        }
        self.total_weight += weight;
        self.micro_batches += 1;
        Ok(())
    }

    fn check_weight(&self, weight: f64) -> Result<()> {
        ensure!(
            weight.is_finite() && weight >= 0.0,
            "gradient accumulation weight must be finite and non-negative, got {weight}"
        );
        Ok(())
    }

    fn accumulate(&mut self, name: &str, g: &Tensor, weight: f64) -> Result<()> {
        let g = g.detach().to_dtype(state_dtype(g.dtype()))?;
        let scaled = if weight == 1.0 { g } else { (g * weight)? };
        let sum = match self.sums.remove(name) {
            Some(acc) => {
                ensure!(
                    acc.shape() == scaled.shape(),
                    "gradient for {name:?} changed shape from {:?} to {:?}",
                    acc.dims(),
                    scaled.dims()
                );
                (acc + scaled)?
            }
            None => scaled,
        };
        self.sums.insert(name.to_string(), sum);
        Ok(())
    }

    /// Number of micro-batches added since the last take.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Sum of the weights added since the last take.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// Whether nothing was added since the last take.
    pub fn is_empty(&self) -> bool {
        self.micro_batches == 0
    }

    /// Returns the weighted sums `sum_i(weight_i * g_i)` and resets.
    pub fn take_sum(&mut self) -> HashMap<String, Tensor> {
        self.total_weight = 0.0;
        self.micro_batches = 0;
        std::mem::take(&mut self.sums)
    }

    /// Returns the weighted mean `sum_i(weight_i * g_i) / sum_i(weight_i)`
    /// and resets. Errors if the total weight is zero.
    pub fn take_mean(&mut self) -> Result<HashMap<String, Tensor>> {
        let total = self.total_weight;
        ensure!(
            total > 0.0,
            "no gradients accumulated (total weight is {total})"
        );
        let sums = self.take_sum();
        sums.into_iter()
            .map(|(k, t)| Ok((k, (t / total)?)))
            .collect()
    }
}

/// Clips gradients in place to a maximum total L2 norm, with the semantics
/// of `torch.nn.utils.clip_grad_norm_(norm_type=2)`:
///
/// ```text
/// total_norm = sqrt(sum over all grads of sum(g^2))
/// coef = max_norm / (total_norm + 1e-6)
/// if coef < 1: g <- g * coef  for every gradient
/// ```
///
/// Returns `total_norm` *before* clipping. The sum of squares is computed in
/// `f32` (`f64` for `f64` gradients) and the norm returned as `f64`.
///
/// A non-finite norm is returned as is (torch's default
/// `error_if_nonfinite=False`); the gradients are then scaled by `0` when the
/// norm is infinite and left untouched when it is NaN (torch multiplies by
/// NaN), so callers should check the returned norm and skip the step.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    ensure!(
        max_norm.is_finite() && max_norm > 0.0,
        "max_norm must be finite and positive, got {max_norm}"
    );
    let total_norm = grad_norm(grads)?;
    let coef = max_norm / (total_norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(total_norm)
}

/// The total L2 norm of `grads`, as [`clip_grad_norm`] computes it (without clipping): the sum
/// of squares in `f32` (`f64` for `f64` gradients), the norm as `f64`; 0 for no gradient.
pub fn grad_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    // One device sync in total: per-tensor sums of squares are stacked on the
    // device (when all gradients share one) before reading back.
    let mut partial = Vec::with_capacity(grads.len());
    for g in grads.values() {
        let acc = g.to_dtype(state_dtype(g.dtype()))?;
        partial.push(acc.sqr()?.sum_all()?.to_dtype(DType::F64)?);
    }
    let first_dev = partial[0].device().clone();
    let same_device = partial.iter().all(|t| t.device().same_device(&first_dev));
    if !same_device {
        for t in &mut partial {
            *t = t.to_device(&Device::Cpu)?;
        }
    }
    Ok(Tensor::stack(&partial, 0)?
        .sum_all()?
        .to_scalar::<f64>()?
        .sqrt())
}

/// Collects the gradients of named variables from a [`GradStore`] into a
/// by-name map (variables without a gradient are omitted), e.g. to call
/// [`clip_grad_norm`] and [`AdamW::step_with`] without accumulation.
pub fn grads_by_name(grads: &GradStore, vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    vars.iter()
        .filter_map(|(name, var)| {
            grads
                .get(var.as_tensor())
                .map(|g| (name.clone(), g.clone()))
        })
        .collect()
}

/// Returns an error if `name` is duplicated in `vars` (helper for callers
/// building parameter lists).
pub fn check_unique_names(vars: &[(String, Var)]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (name, _) in vars {
        if !seen.insert(name.as_str()) {
            bail!("duplicate parameter name {name:?}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward scalar f64 AdamW (torch's formula) used as reference.
    fn reference_adamw(p0: &[f64], grads: &[Vec<f64>], cfg: &AdamWConfig) -> Vec<f64> {
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (k, g) in grads.iter().enumerate() {
            let t = (k + 1) as f64;
            for i in 0..p.len() {
                p[i] *= 1.0 - cfg.lr * cfg.weight_decay;
                m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g[i];
                v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
                let bc1 = 1.0 - cfg.beta1.powf(t);
                let bc2 = 1.0 - cfg.beta2.powf(t);
                let denom = v[i].sqrt() / bc2.sqrt() + cfg.eps;
                p[i] -= cfg.lr / bc1 * m[i] / denom;
            }
        }
        p
    }

    const P0_A: [f64; 6] = [0.5, -1.2, 3.0, 0.0, 1e-3, -0.7];
    fn grads_a() -> Vec<Vec<f64>> {
        vec![
            vec![0.1, -0.2, 0.3, 1.0, 0.0, -0.05],
            vec![-0.3, 0.1, 0.2, 0.5, 2.0, 0.0],
            vec![0.05, 0.05, -1.0, 0.0, -0.4, 0.3],
        ]
    }
    fn test_cfg() -> AdamWConfig {
        AdamWConfig {
            lr: 0.01,
            weight_decay: 0.1,
            ..AdamWConfig::default()
        }
    }

    fn vec_of(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    #[test]
    fn defaults_match_torch() {
        let c = AdamWConfig::default();
        assert_eq!(
            (c.lr, c.beta1, c.beta2, c.eps, c.weight_decay),
            (1e-3, 0.9, 0.999, 1e-8, 1e-2)
        );
        c.validate().unwrap();
        assert!(AdamWConfig { beta1: 1.0, ..c }.validate().is_err());
        assert!(AdamWConfig { lr: -1.0, ..c }.validate().is_err());
        let parsed: AdamWConfig = serde_json::from_str(r#"{"lr": 2e-4}"#).unwrap();
        assert_eq!(parsed, AdamWConfig { lr: 2e-4, ..c });
    }

    #[test]
    fn three_steps_match_scalar_reference_f64() {
        let dev = Device::Cpu;
        let cfg = test_cfg();
        let var = Var::from_tensor(&Tensor::from_slice(&P0_A, (2, 3), &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("a".into(), var.clone())], cfg);
        for g in grads_a() {
            let g = Tensor::from_slice(&g, (2, 3), &dev).unwrap();
            opt.step_with(&HashMap::from([("a".to_string(), g)]))
                .unwrap();
        }
        let want = reference_adamw(&P0_A, &grads_a(), &cfg);
        for (g, w) in vec_of(&var).iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-14 * w.abs().max(1.0),
                "got {g}, want {w}"
            );
        }
    }

    /// f32 parameters against torch 2.15 (CPU, single-tensor path), with a
    /// second parameter that has no gradient at step 2 (skipped, so its own
    /// step count lags). Produced by:
    ///
    /// ```python
    /// a = torch.nn.Parameter(torch.tensor([[0.5, -1.2, 3.0], [0.0, 1e-3, -0.7]]))
    /// b = torch.nn.Parameter(torch.tensor([0.25, -0.5]))
    /// opt = torch.optim.AdamW([a, b], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    /// ga = [torch.tensor([[0.1, -0.2, 0.3], [1.0, 0.0, -0.05]]),
    ///       torch.tensor([[-0.3, 0.1, 0.2], [0.5, 2.0, 0.0]]),
    ///       torch.tensor([[0.05, 0.05, -1.0], [0.0, -0.4, 0.3]])]
    /// gb = [torch.tensor([1.0, -1.0]), None, torch.tensor([0.2, 0.3])]
    /// for k in range(3):
    ///     a.grad = ga[k]; b.grad = gb[k]; opt.step()
    /// print(a, b, opt.state[b]["exp_avg"], opt.state[b]["step"])
    /// ```
    #[test]
    fn three_steps_match_torch_f32_with_skipped_param() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(
            &Tensor::from_slice(&P0_A, (2, 3), &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        )
        .unwrap();
        let b = Var::new(&[0.25f32, -0.5], &dev).unwrap();
        let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let mut opt = AdamW::new(vars, test_cfg());
        let gb = [Some([1.0f32, -1.0]), None, Some([0.2, 0.3])];
        for (ga, gb) in grads_a().into_iter().zip(gb) {
            let ga: Vec<f32> = ga.iter().map(|&x| x as f32).collect();
            let mut grads = HashMap::from([(
                "a".to_string(),
                Tensor::from_slice(&ga, (2, 3), &dev).unwrap(),
            )]);
            if let Some(gb) = gb {
                grads.insert("b".to_string(), Tensor::new(&gb, &dev).unwrap());
            }
            opt.step_with(&grads).unwrap();
        }
        let torch_a = [
            4.962334633e-01,
            -1.183149099e+00,
            2.974802971e+00,
            -2.649825998e-02,
            -1.082389057e-02,
            -6.866790056e-01,
        ];
        let torch_b = [2.314798385e-01, -4.847320318e-01];
        let torch_b_exp_avg = [1.099999994e-01, -5.999999866e-02];
        let bit_equal = |got: Vec<f64>, want: &[f64]| {
            for (g, w) in got.iter().zip(want) {
                // The hard-coded values carry 10 significant digits, enough to
                // identify an f32 uniquely: the results are bit-identical to torch.
                assert_eq!(*g as f32, *w as f32, "got {g}, want {w}");
            }
        };
        bit_equal(vec_of(&a), &torch_a);
        bit_equal(vec_of(&b), &torch_b);
        let state: BTreeMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
        bit_equal(vec_of(&state["b.exp_avg"]), &torch_b_exp_avg);
        assert_eq!(state["b.step"].to_scalar::<i64>().unwrap(), 2);
        assert_eq!(state["a.step"].to_scalar::<i64>().unwrap(), 3);
        assert_eq!(state["step"].to_scalar::<i64>().unwrap(), 3);
    }

    #[test]
    fn step_with_gradstore_from_backward() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let frozen = Var::new(&[5.0f32], &dev).unwrap();
        let mut opt = AdamW::new(
            vec![("w".into(), w.clone()), ("frozen".into(), frozen.clone())],
            AdamWConfig {
                lr: 0.1,
                weight_decay: 0.0,
                ..Default::default()
            },
        );
        // loss = sum(w^2): grad = 2w; `frozen` does not take part.
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads).unwrap();
        // First Adam step moves each coordinate by ~lr against the gradient sign.
        let got = w.to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-5 && (got[1] + 1.9).abs() < 1e-5,
            "{got:?}"
        );
        assert_eq!(frozen.to_vec1::<f32>().unwrap(), vec![5.0]);
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let dev = Device::Cpu;
        let cfg = test_cfg();
        let mk = || Var::from_tensor(&Tensor::from_slice(&P0_A, (2, 3), &dev).unwrap()).unwrap();
        let g = |k: usize| {
            HashMap::from([(
                "a".to_string(),
                Tensor::from_slice(&grads_a()[k], (2, 3), &dev).unwrap(),
            )])
        };
        // Uninterrupted: 3 steps.
        let v1 = mk();
        let mut o1 = AdamW::new(
            vec![
                ("a".into(), v1.clone()),
                ("unused".into(), Var::new(&[0f64], &dev).unwrap()),
            ],
            cfg,
        );
        for k in 0..3 {
            o1.step_with(&g(k)).unwrap();
        }
        // Interrupted after 1 step, state saved through safetensors bytes.
        let v2 = mk();
        let mut o2 = AdamW::new(
            vec![
                ("a".into(), v2.clone()),
                ("unused".into(), Var::new(&[0f64], &dev).unwrap()),
            ],
            cfg,
        );
        o2.step_with(&g(0)).unwrap();
        let bytes = crate::util::atomic::serialize_safetensors(&o2.state().unwrap(), None).unwrap();
        let (state, _) = crate::util::atomic::deserialize_safetensors(&bytes, &dev).unwrap();
        let v3 = Var::from_tensor(&v2.as_detached_tensor().copy().unwrap()).unwrap();
        let mut o3 = AdamW::new(
            vec![
                ("a".into(), v3.clone()),
                ("unused".into(), Var::new(&[0f64], &dev).unwrap()),
            ],
            cfg,
        );
        o3.load_state(&state).unwrap();
        assert_eq!(o3.step_count(), 1);
        for k in 1..3 {
            o3.step_with(&g(k)).unwrap();
        }
        assert_eq!(vec_of(&v1), vec_of(&v3));
    }

    #[test]
    fn load_state_rejects_bad_state() {
        let dev = Device::Cpu;
        let var = Var::new(&[1f32, 2.0], &dev).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), var)], AdamWConfig::default());
        let good: BTreeMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
        opt.load_state(&good).unwrap();

        let mut missing = good.clone();
        missing.remove("p.exp_avg_sq");
        let err = opt.load_state(&missing).unwrap_err();
        assert!(err.to_string().contains("p.exp_avg_sq"), "{err}");

        let mut wrong_shape = good.clone();
        wrong_shape.insert(
            "p.exp_avg".into(),
            Tensor::zeros(3, DType::F32, &dev).unwrap(),
        );
        let err = opt.load_state(&wrong_shape).unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");

        let mut extra = good.clone();
        extra.insert(
            "q.exp_avg".into(),
            Tensor::zeros(2, DType::F32, &dev).unwrap(),
        );
        assert!(opt.load_state(&extra).is_err());

        let mut no_step = good;
        no_step.remove("step");
        assert!(opt.load_state(&no_step).is_err());
    }

    #[test]
    fn step_with_unknown_name_or_wrong_shape_errors() {
        let dev = Device::Cpu;
        let var = Var::new(&[1f32, 2.0], &dev).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), var)], AdamWConfig::default());
        let bad = HashMap::from([("x".to_string(), Tensor::new(&[1f32, 2.0], &dev).unwrap())]);
        assert!(opt.step_with(&bad).is_err());
        let bad = HashMap::from([("p".to_string(), Tensor::new(&[1f32], &dev).unwrap())]);
        assert!(opt.step_with(&bad).is_err());
    }

    #[test]
    fn bf16_params_are_updated_with_f32_state() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(
            &Tensor::new(&[1f32, -1.0], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let mut opt = AdamW::new(
            vec![("p".into(), var.clone())],
            AdamWConfig {
                lr: 0.125,
                weight_decay: 0.0,
                ..Default::default()
            },
        );
        let g = HashMap::from([(
            "p".to_string(),
            Tensor::new(&[1f32, -1.0], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )]);
        opt.step_with(&g).unwrap();
        assert_eq!(var.dtype(), DType::BF16);
        let got = vec_of(&var);
        assert_eq!(got, vec![0.875, -0.875]);
        let state = opt.state().unwrap();
        assert!(state
            .iter()
            .filter(|(k, _)| k.ends_with("exp_avg"))
            .all(|(_, t)| t.dtype() == DType::F32));
    }

    #[test]
    fn accumulator_weighted_mean() {
        let dev = Device::Cpu;
        let mut acc = GradAccumulator::new();
        let g1 = HashMap::from([
            ("a".to_string(), Tensor::new(&[1f32, 2.0], &dev).unwrap()),
            ("b".to_string(), Tensor::new(&[4f32], &dev).unwrap()),
        ]);
        let g2 = HashMap::from([("a".to_string(), Tensor::new(&[3f32, 6.0], &dev).unwrap())]);
        acc.add_map(&g1, 1.0).unwrap();
        acc.add_map(&g2, 3.0).unwrap();
        assert_eq!(acc.micro_batches(), 2);
        assert_eq!(acc.total_weight(), 4.0);
        let mean = acc.take_mean().unwrap();
        // a: (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5]; b: 1*[4] / 4 = [1]
        assert_eq!(mean["a"].to_vec1::<f32>().unwrap(), vec![2.5, 5.0]);
        assert_eq!(mean["b"].to_vec1::<f32>().unwrap(), vec![1.0]);
        assert!(acc.is_empty());
        assert!(acc.take_mean().is_err());
        assert!(acc.add_map(&g2, f64::NAN).is_err());
    }

    #[test]
    fn accumulator_from_gradstore() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, 2.0], &dev).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let mut acc = GradAccumulator::new();
        for scale in [1.0f64, 3.0] {
            // loss = scale * sum(w): grad = scale
            let loss = (w.as_tensor().sum_all().unwrap() * scale).unwrap();
            acc.add(&loss.backward().unwrap(), &vars, 1.0).unwrap();
        }
        let mean = acc.take_mean().unwrap();
        assert_eq!(mean["w"].to_vec1::<f32>().unwrap(), vec![2.0, 2.0]);
        let direct = grads_by_name(
            &(w.as_tensor().sum_all().unwrap()).backward().unwrap(),
            &vars,
        );
        assert_eq!(direct["w"].to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
    }

    #[test]
    fn clip_grad_norm_matches_torch_semantics() {
        let dev = Device::Cpu;
        // total norm = sqrt(3^2 + 4^2 + 12^2) = 13
        let mut grads = HashMap::from([
            ("a".to_string(), Tensor::new(&[3f32, 4.0], &dev).unwrap()),
            ("b".to_string(), Tensor::new(&[[12f32]], &dev).unwrap()),
        ]);
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 13.0).abs() < 1e-6);
        let coef = 1.0 / (13.0 + 1e-6);
        let a = grads["a"].to_vec1::<f32>().unwrap();
        assert!((a[0] as f64 - 3.0 * coef).abs() < 1e-7 && (a[1] as f64 - 4.0 * coef).abs() < 1e-7);
        let b = grads["b"].to_vec2::<f32>().unwrap();
        assert!((b[0][0] as f64 - 12.0 * coef).abs() < 1e-7);
        // After clipping, the norm is max_norm (up to the 1e-6 term).
        let again = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((again - 1.0).abs() < 1e-5);

        // Below the threshold nothing changes.
        let mut small =
            HashMap::from([("a".to_string(), Tensor::new(&[0.3f32, 0.4], &dev).unwrap())]);
        let n = clip_grad_norm(&mut small, 1.0).unwrap();
        assert!((n - 0.5).abs() < 1e-7);
        assert_eq!(small["a"].to_vec1::<f32>().unwrap(), vec![0.3, 0.4]);

        assert_eq!(clip_grad_norm(&mut HashMap::new(), 1.0).unwrap(), 0.0);
        assert!(clip_grad_norm(&mut small, 0.0).is_err());

        let mut bad = HashMap::from([("a".to_string(), Tensor::new(&[f32::NAN], &dev).unwrap())]);
        assert!(clip_grad_norm(&mut bad, 1.0).unwrap().is_nan());
    }

    #[test]
    fn unique_names() {
        let dev = Device::Cpu;
        let v = Var::new(&[1f32], &dev).unwrap();
        check_unique_names(&[("a".into(), v.clone()), ("b".into(), v.clone())]).unwrap();
        assert!(check_unique_names(&[("a".into(), v.clone()), ("a".into(), v.clone())]).is_err());
        let opt = AdamW::new(
            vec![("a".into(), v.clone()), ("a".into(), v)],
            AdamWConfig::default(),
        );
        assert!(opt.state().is_err());
    }
}
