//! The SVFit linear layer (Sun et al. 2024, "SVFit", arXiv 2409.05926, §III): with the top-r
//! SVD of the pretrained weight, `W = U_r Σ_r V_rᵀ + W_e`, the residual `W_e` and the singular
//! vectors `U_r: [out, r]`, `V_rᵀ: [r, in]` stay frozen and only the singular values train,
//! `s: [r]` starting at `σ_1..σ_r`:
//!
//! `y = W_e x + U_r diag(s) V_rᵀ x (+ b)`.
//!
//! ferrule computes the same as `y = W x + U_r diag(s − σ) V_rᵀ x (+ b)`, equal by `W_e`'s
//! definition (`σ` the initial singular values, saved with the adapter). That form keeps the
//! base weight as loaded (a quantized, memory-mapped or bf16 base stays so, where a dense
//! `W_e` would be a new f32 matrix per layer), runs LoRA's fused low-rank op
//! ([`low_rank_linear`]) with `A = V_rᵀ`, `B = U_r diag(s − σ)`, and starts exactly at the
//! base layer (`s − σ = 0`). `W_e` is then the dequantized weight minus `U_r Σ_r V_rᵀ`.
//! Merge: `W' = W_e + U_r diag(s) V_rᵀ = W + U_r diag(s − σ) V_rᵀ`.

use candle_core::{Result, Tensor, Var};

use crate::model::Linear;
use crate::ops::low_rank::low_rank_linear;
use crate::ops::FrozenLinear;

/// The frozen part of one SVFit layer: the top-r singular triplets of its base weight.
#[derive(Clone, Debug)]
pub struct Basis {
    /// `U_r: [out, r]`.
    pub u: Tensor,
    /// `σ_1..σ_r: [r]`, the initial singular values.
    pub sigma: Tensor,
    /// `V_rᵀ: [r, in]`.
    pub vh: Tensor,
}

impl Basis {
    /// `B = U_r diag(s − σ): [out, r]`, the update's left factor for the trained values `s: [r]`
    /// (its right factor is `V_rᵀ`); candle carries its gradient on to `s`.
    pub fn left_factor(&self, s: &Tensor) -> Result<Tensor> {
        let scale = (s - &self.sigma)?.unsqueeze(0)?;
        self.u.broadcast_mul(&scale)
    }
}

/// A frozen linear whose top-r singular values train.
pub struct SvfitLinear {
    pub base: FrozenLinear,
    pub basis: Basis,
    /// `s: [r]`.
    pub s: Var,
}

impl Linear for SvfitLinear {
    /// `x: [.., in]` → `[.., out]`: `W x + U_r diag(s − σ) V_rᵀ x (+ b)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = self.basis.left_factor(self.s.as_tensor())?;
        low_rank_linear(x, None, &self.base, &self.basis.vh, &b, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    /// `W = R(θ) diag(3, 1)` with cos θ = 0.6, sin θ = 0.8: `W = [[1.8, −0.8], [2.4, 0.6]]`,
    /// whose top singular triplet is `u = (0.6, 0.8)`, `σ = 3`, `v = (1, 0)`. With r = 1,
    /// `W_e = W − 3 u vᵀ = [[0, −0.8], [0, 0.6]]`. For `x = (2, 1)`, `b = (0.5, −1)`, `s = 5`:
    /// `W_e x = (−0.8, 0.6)`, `u s vᵀx = (6, 8)`, so `y = (5.7, 7.6)` (the paper's form); at
    /// `s = σ`, `y = W x + b = (3.3, 4.4)`. For `L = Σ y`: `∂L/∂s = (Σ u)(vᵀ x) = 1.4 · 2 = 2.8`.
    #[test]
    fn forward_and_gradient_by_hand() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1.8f32, -0.8], [2.4, 0.6]], &dev).unwrap();
        let bias = Tensor::new(&[0.5f32, -1.], &dev).unwrap();
        let basis = Basis {
            u: Tensor::new(&[[0.6f32], [0.8]], &dev).unwrap(),
            sigma: Tensor::new(&[3f32], &dev).unwrap(),
            vh: Tensor::new(&[[1f32, 0.]], &dev).unwrap(),
        };
        let layer = |s: f32| SvfitLinear {
            base: FrozenLinear::new(w.clone(), Some(bias.clone())).unwrap(),
            basis: basis.clone(),
            s: Var::new(&[s], &dev).unwrap(),
        };
        let x = Tensor::new(&[[2f32, 1.]], &dev).unwrap();
        let at_init = layer(3.0).forward(&x).unwrap();
        close(&at_init.to_vec2::<f32>().unwrap()[0], &[3.3, 4.4]);
        let trained = layer(5.0);
        let y = trained.forward(&x).unwrap();
        close(&y.to_vec2::<f32>().unwrap()[0], &[5.7, 7.6]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(trained.s.as_tensor()).unwrap();
        close(&g.to_vec1::<f32>().unwrap(), &[2.8]);
        // The paper's form, W_e x + U diag(s) Vᵀ x + b, written out with W_e by hand.
        let w_e = Tensor::new(&[[0f32, -0.8], [0., 0.6]], &dev).unwrap();
        let paper = (x.matmul(&w_e.t().unwrap()).unwrap()
            + x.matmul(&basis.vh.t().unwrap())
                .unwrap()
                .matmul(&(basis.u.t().unwrap() * 5.0).unwrap())
                .unwrap())
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
        close(
            &y.to_vec2::<f32>().unwrap()[0],
            &paper.to_vec2::<f32>().unwrap()[0],
        );
    }
}
