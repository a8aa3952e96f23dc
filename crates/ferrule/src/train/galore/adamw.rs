//! The Adam update of galore-torch 1.0's `AdamW` (`galore_torch/adamw.py`, copied there from
//! transformers' old `transformers.optimization.AdamW` with `correct_bias`), which every
//! parameter of a GaLore optimizer uses, projected or not: HF Trainer's `galore_adamw` puts
//! the targets and all other parameters in one `GaLoreAdamW`.
//!
//! For a gradient `g` (low-rank for projected parameters) at the parameter's `t`-th update:
//!
//! ```text
//! m  <- beta1 * m + (1 - beta1) * g
//! v  <- beta2 * v + (1 - beta2) * g^2
//! N  <- m / (sqrt(v) + eps)
//! step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)      // lr when correct_bias is false
//! p  <- p - step_size * back(N)                           // back: GaLore's project_back, or identity
//! p  <- p - lr * weight_decay * p                         // after the step, on the new p
//! ```
//!
//! It is not `torch.optim.AdamW` (ferrule's [`crate::train::AdamW`]): torch adds `eps` to
//! `sqrt(v) / sqrt(1 - beta2^t)` (here to `sqrt(v)`, so the effective epsilon changes with
//! `t`), decays the weights before the step rather than after, and its defaults are
//! `eps = 1e-8`, `weight_decay = 1e-2` (here `1e-6` and `0`, which HF Trainer keeps: it passes
//! GaLore only the learning rate). So `train::optim::adamw_update` is not reused.

use anyhow::Result;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor, Var};

use crate::train::optim::AdamWConfig;
use serde::{Deserialize, Serialize};

/// Hyper-parameters of galore-torch's `AdamW`, with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LegacyAdamWConfig {
    /// Learning rate (overwritten each step by the schedule).
    pub lr: f64,
    /// First-moment decay `beta1`.
    pub beta1: f64,
    /// Second-moment decay `beta2`.
    pub beta2: f64,
    /// Added to `sqrt(v)` (not bias-corrected); default `1e-6`.
    pub eps: f64,
    /// Decoupled weight decay, applied after the step; default `0`.
    pub weight_decay: f64,
    /// Whether the step size carries Adam's bias corrections (transformers' `correct_bias`).
    pub correct_bias: bool,
}

impl Default for LegacyAdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.0,
            correct_bias: true,
        }
    }
}

impl LegacyAdamWConfig {
    /// The ranges galore-torch's constructor checks (and a non-negative weight decay): those
    /// of torch's AdamW ([`AdamWConfig::validate`]).
    pub fn validate(&self) -> Result<()> {
        AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
        .validate()
    }

    /// The step size at the `t`-th update (from 1).
    pub fn step_size(&self, t: u64) -> f64 {
        if !self.correct_bias {
            return self.lr;
        }
        // Python's `beta ** step` with an int step is libm pow on floats.
        let t = t as f64;
        self.lr * (1.0 - self.beta2.powf(t)).sqrt() / (1.0 - self.beta1.powf(t))
    }
}

/// Updates the moments with `g` (zeros when `moments` is `None`) and returns
/// `(N, m, v)` with `N = m / (sqrt(v) + eps)`, the normalized direction before projection back.
pub fn adam_direction(
    cfg: &LegacyAdamWConfig,
    g: &Tensor,
    moments: Option<(&Tensor, &Tensor)>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (m, v) = match moments {
        Some((m, v)) => (m.clone(), v.clone()),
        None => (g.zeros_like()?, g.zeros_like()?),
    };
    // exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    let m = ((m * cfg.beta1)? + (g * (1.0 - cfg.beta1))?)?;
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let v = ((v * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?;
    let denom = (v.sqrt()? + cfg.eps)?;
    let n = m.div(&denom)?;
    Ok((n, m, v))
}

/// Applies the step and the decay: `p - step_size · update`, then `p ← p − lr·wd·p`.
pub fn apply_update(
    cfg: &LegacyAdamWConfig,
    t: u64,
    param: &Tensor,
    update: &Tensor,
) -> Result<Tensor> {
    let mut p = (param - (update * cfg.step_size(t))?)?;
    if cfg.weight_decay > 0.0 {
        p = (&p - (&p * (cfg.lr * cfg.weight_decay))?)?;
    }
    Ok(p)
}

/// [`adam_direction`] then [`apply_update`] for a parameter that is not projected, computed
/// element by element: the moments are made one at a time into new buffers (the old one is
/// dropped before the next is made) and the parameter is updated in place. Each element goes
/// through the same f32 operations in the same order as the tensor path (candle's
/// `x * a` is `affine(a, 0)`, i.e. `x·a + 0`; `x + e` is `x·1 + e`), so the result is
/// bit-identical to it (`tests::fused_step_is_bit_identical`).
///
/// Why: on the vocabulary table of a 1.07B Llama (100.7M parameters, 403 MB in f32) the tensor
/// path holds up to seven table-sized temporaries at once; this holds one, which lowers the
/// peak of a GaLore step by about 2 GB there (BENCHMARKS.md, "GaLore layer-wise").
///
/// Applies to an f32 parameter with an f32 gradient, both contiguous on the CPU, and moments
/// that are `None` (first step: zeros) or f32; returns `Ok(false)` without touching anything
/// otherwise, and the caller takes the tensor path. `t` is the update's index from 1.
pub fn fused_step(
    cfg: &LegacyAdamWConfig,
    t: u64,
    param: &Var,
    g: &Tensor,
    m: &mut Option<Tensor>,
    v: &mut Option<Tensor>,
) -> Result<bool> {
    let f32_cpu = |x: &Tensor| x.dtype() == DType::F32 && x.device().is_cpu() && x.is_contiguous();
    let moments_ok = [&*m, &*v].iter().all(|x| x.as_ref().is_none_or(f32_cpu));
    if !(f32_cpu(param.as_tensor()) && f32_cpu(g) && moments_ok) || m.is_some() != v.is_some() {
        return Ok(false);
    }
    let (b1, c1) = (cfg.beta1 as f32, (1.0 - cfg.beta1) as f32);
    let (b2, c2) = (cfg.beta2 as f32, (1.0 - cfg.beta2) as f32);
    let shape = g.shape().clone();
    let new_m = next_moment(m.take(), g, |old, g| (old * b1 + 0.0) + (g * c1 + 0.0))?;
    *m = Some(Tensor::from_vec(new_m, &shape, g.device())?);
    let new_v = next_moment(v.take(), g, |old, g| {
        (old * b2 + 0.0) + ((g * g) * c2 + 0.0)
    })?;
    *v = Some(Tensor::from_vec(new_v, &shape, g.device())?);
    let step = ParamStep {
        m: m.as_ref().expect("just set"),
        v: v.as_ref().expect("just set"),
        eps: cfg.eps as f32,
        step_size: cfg.step_size(t) as f32,
        decay: (cfg.weight_decay > 0.0).then_some((cfg.lr * cfg.weight_decay) as f32),
    };
    param.as_tensor().inplace_op1(&step)?;
    Ok(true)
}

/// `f(old, g)` element-wise into a new buffer; `old` is 0 everywhere when `None` (the tensor
/// path's `zeros_like`). `old` is dropped before returning.
fn next_moment(old: Option<Tensor>, g: &Tensor, f: impl Fn(f32, f32) -> f32) -> Result<Vec<f32>> {
    let op = "GaLore AdamW step";
    Ok(match old {
        Some(old) => crate::ops::kernels::with_f32s([&old, g], op, |[o, g]| {
            Ok(o.iter().zip(g).map(|(&o, &g)| f(o, g)).collect())
        })?,
        None => {
            crate::ops::kernels::with_f32(g, op, |g| Ok(g.iter().map(|&g| f(0.0, g)).collect()))?
        }
    })
}

/// The in-place parameter update of [`fused_step`]: `p ← p − (N·step_size + 0)` with
/// `N = m / (sqrt(v)·1 + eps)`, then `p ← p − (p·lr·λ + 0)` when decaying.
struct ParamStep<'a> {
    m: &'a Tensor,
    v: &'a Tensor,
    eps: f32,
    step_size: f32,
    decay: Option<f32>,
}

impl InplaceOp1 for ParamStep<'_> {
    fn name(&self) -> &'static str {
        "galore-adamw-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (a, b) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("GaLore AdamW step: parameter not contiguous".into())
        })?;
        let CpuStorage::F32(p) = storage else {
            candle_core::bail!("GaLore AdamW step: parameter is not f32")
        };
        let p = &mut p[a..b];
        let op = "GaLore AdamW step";
        crate::ops::kernels::with_f32s([self.m, self.v], op, |[m, v]| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                let n = m / (v.sqrt() * 1.0 + self.eps);
                *p -= n * self.step_size + 0.0;
                if let Some(d) = self.decay {
                    *p -= *p * d + 0.0;
                }
            }
            Ok(())
        })
        .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Three steps of the formula in plain f64 against the tensor code, with weight decay.
    #[test]
    fn matches_the_scalar_formula() {
        let cfg = LegacyAdamWConfig {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        };
        let grads = [[0.1, -0.2, 3.0], [-0.3, 0.1, 0.0], [0.05, 0.05, -1.0]];
        let mut p = vec![0.5f64, -1.2, 3.0];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        let dev = Device::Cpu;
        let mut tp = Tensor::new(p.as_slice(), &dev).unwrap();
        let mut state: Option<(Tensor, Tensor)> = None;
        for (k, g) in grads.iter().enumerate() {
            let t = k as u64 + 1;
            let tg = Tensor::new(g.as_slice(), &dev).unwrap();
            let (n, tm, tv) =
                adam_direction(&cfg, &tg, state.as_ref().map(|(a, b)| (a, b))).unwrap();
            tp = apply_update(&cfg, t, &tp, &n).unwrap();
            state = Some((tm, tv));
            let bc1 = 1.0 - 0.9f64.powi(t as i32);
            let bc2 = 1.0 - 0.999f64.powi(t as i32);
            for i in 0..3 {
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                p[i] -= 0.01 * bc2.sqrt() / bc1 * m[i] / (v[i].sqrt() + 1e-6);
                p[i] -= 0.01 * 0.1 * p[i];
            }
        }
        let got = tp.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        for (g, w) in got.iter().zip(&p) {
            assert!((g - w).abs() < 1e-12, "got {g}, want {w}");
        }
    }

    /// The fused step against the tensor path, bit for bit, over three updates with and
    /// without decay, on values that include zeros, negative zeros, tiny and huge magnitudes.
    #[test]
    fn fused_step_is_bit_identical() {
        let dev = Device::Cpu;
        let n = 4099;
        let val = |i: usize, k: u64| -> f32 {
            let x = ((i as f32 * 0.7548 + k as f32 * 0.31).sin() * 1e4).fract();
            match i % 9 {
                0 => 0.0,
                1 => -0.0,
                2 => x * 1e-30,
                3 => x * 1e20,
                _ => x,
            }
        };
        for wd in [0.0, 0.1] {
            let cfg = LegacyAdamWConfig {
                lr: 0.01,
                weight_decay: wd,
                ..Default::default()
            };
            let p0: Vec<f32> = (0..n).map(|i| val(i, 7)).collect();
            let var = Var::from_vec(p0.clone(), n, &dev).unwrap();
            let mut tp = Tensor::from_vec(p0, n, &dev).unwrap();
            let (mut m, mut v) = (None, None);
            let mut state: Option<(Tensor, Tensor)> = None;
            for t in 1..=3u64 {
                let g = Tensor::from_vec((0..n).map(|i| val(i, t)).collect(), n, &dev).unwrap();
                let (dir, tm, tv) =
                    adam_direction(&cfg, &g, state.as_ref().map(|(a, b)| (a, b))).unwrap();
                tp = apply_update(&cfg, t, &tp, &dir).unwrap();
                state = Some((tm, tv));
                assert!(fused_step(&cfg, t, &var, &g, &mut m, &mut v).unwrap());
                let bits = |x: &Tensor| -> Vec<u32> {
                    x.to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|f| f.to_bits())
                        .collect()
                };
                let (sm, sv) = state.as_ref().unwrap();
                assert_eq!(bits(m.as_ref().unwrap()), bits(sm), "m, step {t}, wd {wd}");
                assert_eq!(bits(v.as_ref().unwrap()), bits(sv), "v, step {t}, wd {wd}");
                assert_eq!(bits(var.as_tensor()), bits(&tp), "p, step {t}, wd {wd}");
            }
        }
        // Not applicable: f64 parameters take the tensor path.
        let var = Var::from_vec(vec![1f64; 3], 3, &dev).unwrap();
        let g = Tensor::from_vec(vec![1f64; 3], 3, &dev).unwrap();
        let cfg = LegacyAdamWConfig::default();
        assert!(!fused_step(&cfg, 1, &var, &g, &mut None, &mut None).unwrap());
    }

    #[test]
    fn step_size_without_bias_correction_is_lr() {
        let cfg = LegacyAdamWConfig {
            correct_bias: false,
            lr: 0.5,
            ..Default::default()
        };
        assert_eq!(cfg.step_size(7), 0.5);
        // t = 1 with correction: lr · sqrt(1 − β2) / (1 − β1) = 1e-3 · sqrt(1e-3) / 0.1.
        let d = LegacyAdamWConfig::default();
        assert!((d.step_size(1) - 1e-2 * 1e-3f64.sqrt()).abs() < 1e-15);
        assert!(LegacyAdamWConfig { beta2: 1.0, ..d }.validate().is_err());
    }
}
