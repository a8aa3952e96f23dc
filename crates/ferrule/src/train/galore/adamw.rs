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
use candle_core::Tensor;

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
