//! The L4Q linear layer (Jeon et al., "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning
//! on Large Language Models", arXiv 2402.04902, §3; no reference code is published): LoRA's
//! update added to the frozen weight *inside* a group-wise learned-step-size quantizer,
//!
//! `W' = W₀ + (α/r)·B A`, `w̄ = round(clamp((W' − b)/s, Qn, Qp))`, `Ŵ = w̄·s + b`,
//! `y = Ŵ x (+ bias)`,
//!
//! with `A: [r, in]`, `B: [out, r]` and a step `s` and offset `b` per group of `group_size`
//! input features of each row (`[out, in / group_size]`), all four trained. The quantizer
//! and its gradients (straight-through for `round`, LSQ's for `s` and `b`) are
//! [`crate::quant::lsq`]; the fused op that forms `∂L/∂Ŵ` inside its backward and frees it is
//! [`crate::ops::lsq_linear`]. The trained layer *is* its quantized weight: integer codes
//! `w̄`, steps and offsets, with no adapter left beside it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor, Var};

use crate::model::Linear;
use crate::ops::low_rank::low_rank_linear;
use crate::ops::lsq_linear::{
    lsq_linear, quantized_weight, updated_weight, LsqFactors, LsqLinearSpec,
};
use crate::ops::FrozenLinear;
use crate::tuners::{GroupCodes, LearnedQuantization};

/// One L4Q layer: the frozen weight and the quantizer's shape, and its four trained tensors
/// (`A`, `B`, steps, offsets). `quantizing`, shared by the adapter's layers, is off during
/// the LoRA warm-up ([`super::L4qConfig::warmup_steps`]), when the layer is `base` plus LoRA.
pub struct L4qLinear {
    pub spec: LsqLinearSpec,
    pub vars: [Var; 4],
    pub base: FrozenLinear,
    pub quantizing: Arc<AtomicBool>,
}

/// The layer's tensors from its `Var`s (order `A, B, steps, offsets`).
pub fn factors_of(vars: &[Var; 4]) -> LsqFactors {
    let [a, b, steps, offsets] = vars.clone().map(|v| v.as_tensor().clone());
    LsqFactors {
        a,
        b,
        steps,
        offsets,
    }
}

impl Linear for L4qLinear {
    /// `x: [.., in]` → `[.., out]`: `x Ŵᵀ (+ bias)`; during the warm-up, LoRA's `x W₀ᵀ (+
    /// bias) + (α/r)·(x Aᵀ) Bᵀ` (the steps and offsets unused, so they get no gradient).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.quantizing.load(Ordering::Relaxed) {
            let [a, b, ..] = &self.vars;
            let (a, b) = (a.as_tensor(), b.as_tensor());
            return low_rank_linear(x, None, &self.base, a, b, self.spec.scale);
        }
        lsq_linear(x, &self.spec, &factors_of(&self.vars))
    }
}

/// A merge's `Ŵ` for one layer ([`crate::tuners::Update::Quantized`]): the layer's spec (its
/// weight replaced by the one the merge reads) and its trained tensors.
pub struct L4qMerge {
    pub spec: LsqLinearSpec,
    pub factors: LsqFactors,
}

impl L4qMerge {
    fn on(&self, w: &Tensor) -> Result<LsqLinearSpec> {
        Ok(LsqLinearSpec {
            weight: w.to_dtype(candle_core::DType::F32)?.contiguous()?,
            ..self.spec.clone()
        })
    }
}

impl LearnedQuantization for L4qMerge {
    fn dims(&self) -> Vec<usize> {
        self.spec.weight.dims().to_vec()
    }

    /// `Ŵ = w̄·s + b` of `W' = w + (α/r)·B A`: the layer's own forward-pass weight.
    fn apply(&self, w: &Tensor) -> Result<Tensor> {
        quantized_weight(&self.on(w)?, &self.factors)
    }

    /// The codes of `W' = w + (α/r)·B A` with the trained steps, as bytes `w̄ − Qn` with the
    /// offsets of byte 0 (`b + Qn·s`; [`crate::quant::lsq::GroupQuantizer::byte_offsets`]).
    fn quantized(&self, w: &Tensor) -> anyhow::Result<GroupCodes> {
        let spec = self.on(w)?;
        let (rows, cols) = spec.dims()?;
        let values = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
        let (steps, offsets) = (values(&self.factors.steps)?, values(&self.factors.offsets)?);
        let updated = updated_weight(&spec, &self.factors)?;
        let q = spec.quantizer;
        if let Some(bad) = q.check_steps(&steps, cols) {
            anyhow::bail!(
                "l4q: {}: the step size of row {} group {} is {}, not a positive number",
                spec.name,
                bad.row,
                bad.group,
                bad.value
            )
        }
        if let Some(i) = offsets.iter().position(|o| !o.is_finite()) {
            anyhow::bail!(
                "l4q: {}: the offset of group {i} is {}",
                spec.name,
                offsets[i]
            )
        }
        // Bytes `w̄ − Qn` with the offset of byte 0: Q4_1's `q` and `m` in either code range.
        let codes = q.codes(&updated, &steps, &offsets, cols);
        let offsets = q.byte_offsets(&steps, &offsets);
        let f16 = |v: &[f32]| -> Vec<f32> {
            v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
        };
        // What a reader of the f16 `d`, `m` would derive: the unsigned range's codes.
        let unsigned = crate::quant::lsq::GroupQuantizer { signed: false, ..q };
        let rederived = unsigned.codes(&updated, &f16(&steps), &f16(&offsets), cols);
        let changed_by_f16 = codes.iter().zip(&rederived).filter(|(a, b)| a != b).count();
        Ok(GroupCodes {
            rows,
            cols,
            bits: q.bits,
            group_size: q.group_size,
            codes,
            steps,
            offsets,
            changed_by_f16,
        })
    }
}
