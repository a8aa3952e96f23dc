//! The DiffFit linear layer (Xie et al. 2023, "DiffFit", §3.2, eq. 5: the block output scaled
//! by a learned γ, with the bias terms trained), as LLaMA-DiffFit's port puts it on a linear
//! layer (`difffit.py`, `Linear.forward`): `y = γ ⊙ (W₀x + b₀ + b_f)`, `γ, b_f: [out]`, `W₀`
//! and `b₀` frozen, `b_f` starting at 0 and `γ` at `eta_scale`. Merge is exact:
//! `W' = diag(γ) W₀`, `b' = γ ⊙ (b₀ + b_f)`.

use candle_core::{Module, Result, Tensor, Var};

use crate::model::Linear;
use crate::ops::FrozenLinear;

/// A frozen linear with an added bias and, unless excluded, an output scale.
pub struct DiffFitLinear {
    pub base: FrozenLinear,
    /// `b_f: [out]`.
    pub bias: Var,
    /// `γ: [out]`; `None` for an `eta_exclude` target.
    pub gamma: Option<Var>,
}

impl Linear for DiffFitLinear {
    /// `x: [.., in]` → `[.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = Module::forward(&self.base, x)?.broadcast_add(self.bias.as_tensor())?;
        match &self.gamma {
            Some(g) => y.broadcast_mul(g.as_tensor()),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    /// W = [[1, 2, 0], [0, -1, 3]], b₀ = [0.5, -1], x = [1, 1, 2], b_f = [1, 2], γ = [2, -0.5]:
    /// W₀x + b₀ = [3.5, 4], + b_f = [4.5, 6], ⊙ γ = [9, -3]. For L = Σy: ∂L/∂γ = [4.5, 6],
    /// ∂L/∂b_f = γ = [2, -0.5].
    #[test]
    fn forward_and_gradients_by_hand() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2., 0.], [0., -1., 3.]], &dev).unwrap();
        let b0 = Tensor::new(&[0.5f32, -1.], &dev).unwrap();
        let layer = DiffFitLinear {
            base: FrozenLinear::new(w, Some(b0)).unwrap(),
            bias: Var::new(&[1f32, 2.], &dev).unwrap(),
            gamma: Some(Var::new(&[2f32, -0.5], &dev).unwrap()),
        };
        let x = Tensor::new(&[[1f32, 1., 2.]], &dev).unwrap();
        let y = layer.forward(&x).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![9., -3.]]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = |v: &Var| grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g(layer.gamma.as_ref().unwrap()), vec![4.5, 6.]);
        assert_eq!(g(&layer.bias), vec![2., -0.5]);
    }
}
