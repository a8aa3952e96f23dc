//! The LoRA linear layer (Hu et al. 2021, eq. 3): `h = W₀x + s·B A x`.

use std::sync::Arc;

use candle_core::{Result, Tensor, Var};

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
