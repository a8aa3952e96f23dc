//! Natural GaLore (Das 2024, arXiv 2410.16029, §3; reference `code/natural_galore/
//! galore_projector_tensor.py`, `_natural_gradient_transform`): the projected gradient is
//! preconditioned by the inverse of the damped empirical Fisher built from the last `s`
//! projected gradients, before Adam sees it.
//!
//! With `g` the current projected gradient flattened to `k` entries and `G = [g_1 … g_s]`
//! (`k × s`, oldest first, the current one last), the empirical Fisher is `F = G Gᵀ` and
//!
//! ```text
//! (F + λI)⁻¹ g = g/λ − G S⁻¹ Gᵀ g / λ²,      S = I_s + Gᵀ G / λ        (Woodbury)
//! ```
//!
//! so only an `s × s` system is solved (Cholesky, as the reference does). The reference keeps
//! the history across projector refreshes (gradients from an older basis stay in it) and hard-codes
//! `λ = 1e-3`; its default history is 20. ferrule does the same, with `λ` and `s` as settings.
//!
//! Differences from the reference: the transform is computed in `f64` (the reference: `f32`).
//! `g/λ` and the correction nearly cancel along the history's span, so the reference's result
//! carries a relative error of about `1e-7 · |g|²/λ`; `f64` makes that negligible. The reference
//! projects with a Tucker decomposition of the gradient (both modes, `r × r` states); ferrule
//! applies the transform to any of GaLore's projections, the paper's one-sided form included.

use std::collections::VecDeque;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// Settings of Natural GaLore, with the reference's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NaturalConfig {
    /// `s`: how many projected gradients (the current one included) form the Fisher.
    pub history: usize,
    /// `λ`: the damping added to the Fisher's diagonal.
    pub damping: f64,
}

impl Default for NaturalConfig {
    fn default() -> Self {
        Self {
            history: 20,
            damping: 1e-3,
        }
    }
}

impl NaturalConfig {
    /// `history ≥ 1` and a finite `damping > 0`.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.history >= 1,
            "Natural GaLore history must be at least 1, got {}",
            self.history
        );
        ensure!(
            self.damping.is_finite() && self.damping > 0.0,
            "Natural GaLore damping must be a positive number, got {}",
            self.damping
        );
        Ok(())
    }
}

/// The history of projected gradients of one parameter and the preconditioner it defines.
#[derive(Debug, Clone)]
pub struct NaturalGradient {
    cfg: NaturalConfig,
    /// Flattened projected gradients, oldest first, at most `cfg.history`.
    history: VecDeque<Tensor>,
}

impl NaturalGradient {
    /// An empty history.
    pub fn new(cfg: NaturalConfig) -> Self {
        Self {
            cfg,
            history: VecDeque::with_capacity(cfg.history),
        }
    }

    /// The stored gradients, oldest first, each flattened.
    pub fn history(&self) -> impl Iterator<Item = &Tensor> {
        self.history.iter()
    }

    /// Replaces the history (restoring a checkpoint); at most `history` flattened gradients.
    pub fn set_history(&mut self, grads: Vec<Tensor>) -> Result<()> {
        ensure!(
            grads.len() <= self.cfg.history,
            "Natural GaLore history holds {} gradients, more than its size {}",
            grads.len(),
            self.cfg.history
        );
        self.history = grads.into();
        Ok(())
    }

    /// Appends `g` to the history (dropping the oldest beyond `s`) and returns
    /// `(F + λI)⁻¹ g` in `g`'s shape and dtype.
    pub fn precondition(&mut self, g: &Tensor) -> Result<Tensor> {
        let flat = g.flatten_all()?;
        if self.history.len() == self.cfg.history {
            self.history.pop_front();
        }
        self.history.push_back(flat.clone());
        let refs: Vec<&Tensor> = self.history.iter().collect();
        let out = woodbury_solve(&refs, &flat, self.cfg.damping)?;
        Ok(out.to_dtype(g.dtype())?.reshape(g.shape())?)
    }
}

/// `(G Gᵀ + λI)⁻¹ g` for the columns `G = [history…]` (each `[k]`) by the Woodbury identity,
/// in `f64`. Returns a `[k]` `f64` tensor.
pub fn woodbury_solve(history: &[&Tensor], g: &Tensor, damping: f64) -> Result<Tensor> {
    let g = g.to_dtype(DType::F64)?;
    let rows: Vec<Tensor> = history
        .iter()
        .map(|h| h.to_dtype(DType::F64))
        .collect::<candle_core::Result<_>>()?;
    let gs = Tensor::stack(&rows, 0)?; // Gᵀ, [s, k]
    let s = rows.len();
    let gram = gs.matmul(&gs.t()?)?.to_vec2::<f64>()?; // Gᵀ G, [s, s]
    let gtg = gs
        .matmul(&g.unsqueeze(1)?)?
        .flatten_all()?
        .to_vec1::<f64>()?; // Gᵀ g
    let lambda_inv = 1.0 / damping;
    let mut sys = vec![vec![0.0; s]; s];
    for i in 0..s {
        for j in 0..s {
            sys[i][j] = lambda_inv * gram[i][j] + if i == j { 1.0 } else { 0.0 };
        }
    }
    let temp = cholesky_solve(&sys, &gtg)?;
    let temp = Tensor::from_vec(temp, (1, s), g.device())?;
    let g_temp = temp.matmul(&gs)?.flatten_all()?; // G temp, [k]
    Ok(((g * lambda_inv)? - (g_temp * (lambda_inv * lambda_inv))?)?)
}

/// Solves `A x = b` for a symmetric positive-definite `A` by Cholesky (`A = L Lᵀ`).
fn cholesky_solve(a: &[Vec<f64>], b: &[f64]) -> Result<Vec<f64>> {
    let n = b.len();
    let mut l = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let d = a[i][i] - dot;
                ensure!(
                    d > 0.0 && d.is_finite(),
                    "Natural GaLore: the Woodbury system is not positive definite \
                     (non-finite gradients?)"
                );
                l[i][i] = d.sqrt();
            } else {
                l[i][j] = (a[i][j] - dot) / l[j][j];
            }
        }
    }
    let mut y = vec![0.0; n];
    for i in 0..n {
        y[i] = (b[i] - (0..i).map(|k| l[i][k] * y[k]).sum::<f64>()) / l[i][i];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        x[i] = (y[i] - (i + 1..n).map(|k| l[k][i] * x[k]).sum::<f64>()) / l[i][i];
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn vec1(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
    }

    /// With one gradient, `(g gᵀ + λI)⁻¹ g = g / (λ + |g|²)`: g = (3, 4), λ = 1e-3 gives
    /// g / 25.001.
    #[test]
    fn single_gradient_by_hand() {
        let g = Tensor::new(&[3f64, 4.0], &Device::Cpu).unwrap();
        let got = vec1(&woodbury_solve(&[&g], &g, 1e-3).unwrap());
        let want = [3.0 / 25.001, 4.0 / 25.001];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{got:?}");
        }
    }

    /// Against `(F + λI)⁻¹ g` solved densely (k × k Gaussian elimination) for s = 3 gradients
    /// of k = 5 entries and a g outside their span.
    #[test]
    fn equals_the_dense_inverse() {
        let dev = Device::Cpu;
        let hist = [
            [0.3, -1.0, 0.2, 0.0, 0.7],
            [1.1, 0.4, -0.5, 0.9, 0.0],
            [-0.2, 0.6, 0.8, -0.3, 0.5],
        ];
        let g = [0.5, 0.1, -0.4, 1.0, -0.6];
        let lambda = 0.05;
        let k = g.len();
        // F + λI, dense.
        let mut a = vec![vec![0.0; k]; k];
        for (i, row) in a.iter_mut().enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = hist.iter().map(|h| h[i] * h[j]).sum::<f64>();
                if i == j {
                    *x += lambda;
                }
            }
        }
        let want = cholesky_solve(&a, &g).unwrap();
        let ts: Vec<Tensor> = hist.iter().map(|h| Tensor::new(h, &dev).unwrap()).collect();
        let refs: Vec<&Tensor> = ts.iter().collect();
        let got = vec1(&woodbury_solve(&refs, &Tensor::new(&g, &dev).unwrap(), lambda).unwrap());
        for (x, y) in got.iter().zip(&want) {
            assert!((x - y).abs() < 1e-10, "got {got:?}, want {want:?}");
        }
        // And (F + λI) · result = g, checked by multiplying back.
        for i in 0..k {
            let back: f64 = (0..k).map(|j| a[i][j] * got[j]).sum();
            assert!((back - g[i]).abs() < 1e-10);
        }
    }

    /// The history keeps the last s gradients, the current one included.
    #[test]
    fn history_is_a_window_of_s() {
        let dev = Device::Cpu;
        let mut ng = NaturalGradient::new(NaturalConfig {
            history: 2,
            damping: 1.0,
        });
        for x in [1f32, 2.0, 3.0] {
            ng.precondition(&Tensor::new(&[[x, 0.0]], &dev).unwrap())
                .unwrap();
        }
        let kept: Vec<f64> = ng.history().map(|t| vec1(t)[0]).collect();
        assert_eq!(kept, vec![2.0, 3.0]);
        let out = ng
            .precondition(&Tensor::new(&[[3f32, 0.0]], &dev).unwrap())
            .unwrap();
        // The history is now (3, 3): F = diag(9 + 9, 0), λ = 1, so (F + I)⁻¹ (3, 0) = (3/19, 0).
        let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 3.0 / 19.0).abs() < 1e-7 && got[1] == 0.0,
            "{got:?}"
        );
        assert!(NaturalConfig {
            history: 0,
            damping: 1.0
        }
        .validate()
        .is_err());
    }
}
