//! The IA3 linear layer (Liu et al. 2022, "(IA)³", §3.3): a learned vector `l` rescales a
//! frozen layer's output, `h = l ⊙ (W₀x + b)`, or, for feed-forward modules, its input,
//! `h = W₀(l ⊙ x) + b` (peft `tuners/ia3/layer.py`, `Linear.forward`).

use candle_core::{Result, Tensor, Var};

use crate::model::Linear;
use crate::ops::scaled_linear::scaled_linear;
use crate::ops::FrozenLinear;

/// A frozen linear with a trainable scaling vector.
pub struct Ia3Linear {
    base: FrozenLinear,
    /// peft's `ia3_l`: `[out, 1]` (output scaling) or `[1, in]` (input scaling, `is_feedforward`).
    scales: Var,
    is_feedforward: bool,
}

impl Ia3Linear {
    pub fn new(base: FrozenLinear, scales: Var, is_feedforward: bool) -> Self {
        Self {
            base,
            scales,
            is_feedforward,
        }
    }
}

impl Linear for Ia3Linear {
    fn as_input_scaled(&self) -> Option<(&FrozenLinear, &Tensor)> {
        self.is_feedforward
            .then(|| (&self.base, self.scales.as_tensor()))
    }

    /// `x: [.., in]` → `[.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        scaled_linear(x, &self.base, self.scales.as_tensor(), self.is_feedforward)
    }
}
