//! The RandLoRA linear layer (Albert et al. 2025, eq. 3; peft `tuners/randlora/layer.py`):
//! frozen random bases `A: [r, 1, min_dim]`, `B: [max_dim, n_b, r]` shared by every layer,
//! scaled by trained `λ: [r, n_b]` and `γ: [n_b, min]` of each layer, `n_b = ⌈min / r⌉`:
//!
//! `U_A[k·n_b + b, j] = λ[k, b] · A[k, 0, j] · γ[b, j]` (`[r·n_b, min]`, peft's
//! `UniqueBaseGrad`), `U_B = B[:max, :n_b, :]` flattened to `[max, n_b·r]`, and
//! `y = W₀x + b + s · ΔW x` with `ΔW = U_B U_A` when `in ≤ out`, else `(U_B U_A)ᵀ`, `s = α / r`.
//! The two flattenings pair different `(k, b)`; ferrule keeps peft's as they are.

use std::sync::{Arc, OnceLock};

use candle_core::{Result, Tensor, Var};

use crate::model::Linear;
use crate::ops::low_rank::low_rank_linear;
use crate::ops::FrozenLinear;
use crate::tuners::training_clock::{dropout_mask, TrainingClock};

/// The shared random bases: `a: [r, 1, min_dim]`, `b: [max_dim, n_b, r]` over the largest
/// targeted shape.
#[derive(Clone)]
pub struct Bases {
    pub a: Tensor,
    pub b: Tensor,
}

/// A frozen linear with a RandLoRA update.
pub struct RandLoraLinear {
    pub path: String,
    pub base: FrozenLinear,
    /// `[r, n_b]`.
    pub lambda: Var,
    /// `[n_b, min(in, out)]`.
    pub gamma: Var,
    /// Set once every targeted layer is known (`Tuner::finish`).
    pub bases: Arc<OnceLock<Bases>>,
    pub scaling: f64,
    pub dropout: f64,
    pub clock: Arc<TrainingClock>,
}

impl RandLoraLinear {
    /// `(A_eff: [r·n_b, in], B_eff: [out, r·n_b])` with `ΔW = s · B_eff A_eff`.
    pub fn factors(&self) -> Result<(Tensor, Tensor)> {
        let bases = self.bases.get().ok_or_else(|| {
            candle_core::Error::Msg(
                "randlora: the random bases are not set (Tuner::finish was not called)".into(),
            )
        })?;
        let (r, nb) = self.lambda.dims2()?;
        let (in_f, out_f) = (self.base.in_features(), self.base.out_features());
        let (min, max) = (in_f.min(out_f), in_f.max(out_f));
        let a = bases.a.narrow(2, 0, min)?;
        let ua = self
            .lambda
            .as_tensor()
            .unsqueeze(2)?
            .broadcast_mul(&a)?
            .broadcast_mul(&self.gamma.as_tensor().unsqueeze(0)?)?
            .reshape((r * nb, min))?;
        let ub = bases
            .b
            .narrow(0, 0, max)?
            .narrow(1, 0, nb)?
            .contiguous()?
            .reshape((max, nb * r))?;
        if in_f == min {
            Ok((ua, ub))
        } else {
            Ok((ub.t()?.contiguous()?, ua.t()?.contiguous()?))
        }
    }

    /// `ΔW = s · B_eff A_eff`, `[out, in]` (peft `get_delta_weight`).
    pub fn delta_weight(&self) -> Result<Tensor> {
        let (a, b) = self.factors()?;
        b.matmul(&a)?.affine(self.scaling, 0.0)
    }
}

impl Linear for RandLoraLinear {
    /// `x: [.., in]` → `[.., out]`; LoRA's fused low-rank op over the effective factors, whose
    /// gradients candle carries on to `λ` and `γ`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mask = if self.clock.training() {
            dropout_mask(x, self.dropout, self.clock.dropout_seed(&self.path))?
        } else {
            None
        };
        let (a, b) = self.factors()?;
        low_rank_linear(x, mask.as_ref(), &self.base, &a, &b, self.scaling)
    }
}
