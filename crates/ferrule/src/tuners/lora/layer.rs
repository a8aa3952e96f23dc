//! The LoRA linear layer (Hu et al. 2021, eq. 3): `h = W₀x + s·B A x`.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor, Var};

use crate::model::Linear;
use crate::ops::low_rank::low_rank_linear;
use crate::ops::FrozenLinear;
use crate::tuners::mode::{dropout_mask, Mode};

/// A frozen linear plus a trainable low-rank update.
pub struct LoraLinear {
    pub path: String,
    base: FrozenLinear,
    /// `[r, in]`
    a: Var,
    /// `[out, r]`
    b: Var,
    scaling: f64,
    dropout: f64,
    mode: Arc<Mode>,
}

impl LoraLinear {
    pub fn new(path: String, base: FrozenLinear, a: Var, b: Var, scaling: f64, dropout: f64, mode: Arc<Mode>) -> Self {
        Self { path, base, a, b, scaling, dropout, mode }
    }
}

impl Linear for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mask = if self.mode.training() { dropout_mask(x, self.dropout, self.mode.dropout_seed(&self.path))? } else { None };
        low_rank_linear(x, mask.as_ref(), &self.base, self.a.as_tensor(), self.b.as_tensor(), self.scaling)
    }
}

/// A layer trained in full (`modules_to_save`, e.g. a classification head).
pub struct FullLinear {
    weight: Var,
    bias: Option<Var>,
}

impl FullLinear {
    pub fn new(weight: Var, bias: Option<Var>) -> Self {
        Self { weight, bias }
    }
}

impl Linear for FullLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let l = candle_nn::Linear::new(self.weight.as_tensor().clone(), self.bias.as_ref().map(|b| b.as_tensor().clone()));
        l.forward(x)
    }
}
