//! The LN-tuning layer (Zhao et al. 2023, "Tuning LayerNorm in Attention"): a trainable copy
//! of a norm's weight `γ` and bias `β` replaces the frozen ones, `y = γ ⊙ norm(x) + β`
//! (peft `tuners/ln_tuning/layer.py` deep-copies the module and trains the copy).

use candle_core::{Result, Var};

use crate::model::NormParams;

/// The trainable copy of one norm layer's parameters (`[hidden]` each).
pub struct TunedNorm {
    pub weight: Var,
    pub bias: Option<Var>,
}

impl TunedNorm {
    /// The parameters the model runs with: tracked tensors, so the model takes the
    /// differentiable norm path.
    pub fn params(&self) -> Result<NormParams> {
        Ok(NormParams {
            weight: self.weight.as_tensor().clone(),
            bias: self.bias.as_ref().map(|b| b.as_tensor().clone()),
        })
    }
}
