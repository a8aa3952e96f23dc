//! The PELA linear layer (Guo et al. 2023, "PELA: Learning Parameter-Efficient Models with
//! Low-Rank Approximation", §3; guoyang9/PELA `ALBEF/models/low_rank.py`): a targeted
//! `[out, in]` linear becomes `Linear(in → k, no bias)` then `Linear(k → out, bias)`,
//!
//! `y = R (L x) + b`, `L: [k, in]`, `R: [out, k]`, `b: [out]` (when the base has one),
//!
//! all three trained. `L` and `R` start from the top-k SVD `W ≈ U_k Σ_k V_kᵀ` with `√Σ_k` on
//! each side, `L = √Σ_k V_kᵀ`, `R = U_k √Σ_k` (`low_rank_approximate`, which takes the SVD of
//! `Wᵀ`: the same factors), and `b` from the base's bias.
//!
//! The paper's weight regulariser (`models/model_pretrain.py`, `inf_norm`) keeps each product
//! near the original weight: `(max|R L − W| − ε)²`, averaged over the layers; `torch.norm(M,
//! inf)` of a matrix without `dim` is its largest absolute entry, not the matrix ∞-norm.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor, Var};

use crate::model::Linear;
use crate::ops::FrozenLinear;

/// A linear factorised into two trained linears.
pub struct PelaLinear {
    /// The linear it replaces, which computes the output while `teaching` is on (the teacher
    /// of the feature distillation).
    pub original: FrozenLinear,
    /// Shared by every layer of the tuner ([`crate::tuners::Tuner::set_teaching`]).
    pub teaching: Arc<AtomicBool>,
    /// `L: [k, in]` (the reference's `<path>.0.weight`).
    pub first: Var,
    /// `R: [out, k]` (`<path>.1.weight`).
    pub second: Var,
    /// `b: [out]` (`<path>.1.bias`), where the base layer has a bias.
    pub bias: Option<Var>,
}

impl Linear for PelaLinear {
    /// `x: [.., in]` → `[.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.teaching.load(Ordering::Relaxed) {
            return Linear::forward(&self.original, x);
        }
        let mut dims = x.dims().to_vec();
        let in_f = *dims.last().unwrap_or(&0);
        let h = x
            .reshape(((), in_f))?
            .matmul(&self.first.as_tensor().t()?)?;
        let mut y = h.matmul(&self.second.as_tensor().t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b.as_tensor())?;
        }
        *dims.last_mut().unwrap() = y.dim(1)?;
        y.reshape(dims)
    }
}

/// `(max|R L − W| − ε)²` for one layer, differentiable in `R: [out, k]` and `L: [k, in]`
/// (`w: [out, in]` f32).
///
/// The maximum's gradient reaches only its entry `(i, j)`, so the entry is found without a
/// graph and the term is built from `R[i, :] · L[:, j]` alone: the same value and gradients as
/// differentiating through the whole `|R L − W|`, whose graph would hold an `[out, in]`
/// product per layer until the backward pass (5 GB for SmolLM2-135M's linears).
pub fn inf_norm_term(first: &Tensor, second: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let in_f = w.dim(1)?;
    let residual = (second.detach().matmul(&first.detach())? - w)?;
    let at = residual
        .abs()?
        .flatten_all()?
        .argmax(0)?
        .to_scalar::<u32>()? as usize;
    let (i, j) = (at / in_f, at % in_f);
    let entry = second.narrow(0, i, 1)?.matmul(&first.narrow(1, j, 1)?)?;
    // A scalar, not a view: a view would keep all of `w` alive in the graph.
    let target = w
        .get(i)?
        .get(j)?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    let largest = entry.affine(1.0, -target)?.abs()?.reshape(())?;
    (largest - eps)?.sqr()
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    /// `L = [[1, 0, 2]]`, `R = [[1], [−2]]`, `b = (0.5, 0)`, `x = (1, 1, 1)`: `L x = 3`,
    /// `y = (3.5, −6)`. For `L = Σ y`: `∂/∂R = (3, 3)`, `∂/∂L = (Σ R) x = −1 · (1, 1, 1)`,
    /// `∂/∂b = (1, 1)`.
    #[test]
    fn forward_and_gradients_by_hand() {
        let dev = Device::Cpu;
        let original = Tensor::new(&[[1f32, 2., 3.], [0., 0., -1.]], &dev).unwrap();
        let layer = PelaLinear {
            original: FrozenLinear::new(original, None).unwrap(),
            teaching: Arc::new(AtomicBool::new(false)),
            first: Var::new(&[[1f32, 0., 2.]], &dev).unwrap(),
            second: Var::new(&[[1f32], [-2.]], &dev).unwrap(),
            bias: Some(Var::new(&[0.5f32, 0.], &dev).unwrap()),
        };
        let x = Tensor::new(&[[[1f32, 1., 1.]]], &dev).unwrap();
        // The teacher is the replaced linear: W x = (6, −1).
        layer.teaching.store(true, Ordering::Relaxed);
        let taught = layer.forward(&x).unwrap().flatten_all().unwrap();
        assert_eq!(taught.to_vec1::<f32>().unwrap(), [6., -1.]);
        layer.teaching.store(false, Ordering::Relaxed);
        let y = layer.forward(&x).unwrap();
        assert_eq!(y.dims(), [1, 1, 2]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [3.5, -6.]
        );
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = |v: &Var| -> Vec<f32> {
            let t = grads.get(v.as_tensor()).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        assert_eq!(g(&layer.second), [3., 3.]);
        assert_eq!(g(&layer.first), [-1., -1., -1.]);
        assert_eq!(g(layer.bias.as_ref().unwrap()), [1., 1.]);
    }

    /// `R L = [[1, 0, 2], [−2, 0, −4]]` against `W = [[1, 0, 2], [−2, 0.5, −4]]`: the largest
    /// entry of `|R L − W|` is 0.5 (at [1, 1]), so the term is `(0.5 − 0.1)² = 0.16`, and its
    /// gradient reaches `R` and `L` only through that entry: `∂/∂(RL)[1,1] = 2 · 0.4 · sign(−0.5)
    /// = −0.8`, so `∂/∂R[1] = −0.8 · L[0,1] = 0` and `∂/∂L[0,1] = −0.8 · R[1] = 1.6`.
    #[test]
    fn the_regulariser_is_the_largest_entry_by_hand() {
        let dev = Device::Cpu;
        let first = Var::new(&[[1f32, 0., 2.]], &dev).unwrap();
        let second = Var::new(&[[1f32], [-2.]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0., 2.], [-2., 0.5, -4.]], &dev).unwrap();
        let t = inf_norm_term(first.as_tensor(), second.as_tensor(), &w, 0.1).unwrap();
        assert!((t.to_scalar::<f32>().unwrap() - 0.16).abs() < 1e-6);
        let grads = t.backward().unwrap();
        let gl: Vec<f32> = grads
            .get(first.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let gr: Vec<f32> = grads
            .get(second.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (gl[1] - 1.6).abs() < 1e-6 && gl[0] == 0.0 && gl[2] == 0.0,
            "{gl:?}"
        );
        assert_eq!(gr, [0., 0.]);
    }
}
