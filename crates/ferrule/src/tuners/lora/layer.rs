//! The LoRA layers (Hu et al. 2021, eq. 3): `h = W₀x + s·B A x` on a linear layer, and its
//! embedding form (peft `tuners/lora/layer.py`, `Linear` and `Embedding`).

use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor, Var};

use crate::model::{Embedding, Linear};
use crate::ops::dora::{dora_linear, weight_norm};
use crate::ops::low_rank::low_rank_linear;
use crate::ops::{FrozenLinear, FrozenWeight};
use crate::tuners::training_clock::{dropout_mask, TrainingClock};

/// A frozen linear plus a trainable low-rank update:
/// `y = x W₀ᵀ + s·(B A u + b_B) + b` with `u = dropout(x)`.
pub struct LoraLinear {
    pub path: String,
    base: FrozenLinear,
    /// `[r, in]`
    a: Var,
    /// `[out, r]`
    b: Var,
    scaling: f64,
    dropout: f64,
    clock: Arc<TrainingClock>,
    /// `lora_bias = true`: `lora_B`'s bias `b_B: [out]`, scaled with the update.
    lora_b_bias: Option<Var>,
    /// The base bias `b: [out]` when it trains (`bias = "all" | "lora_only"`); `base` then has none.
    base_bias: Option<Var>,
    /// `use_dora`: the magnitude, and the frozen bias split off `base`.
    dora: Option<Dora>,
}

/// DoRA's part of a layer (Liu et al. 2024; `ops::dora`).
pub struct Dora {
    /// `m: [out]`, peft's `lora_magnitude_vector`.
    pub magnitude: Var,
    /// `‖W₀_i‖²: [out]`, computed once.
    pub w0_sq: Tensor,
    /// The frozen base bias (the op adds it after the magnitude scale).
    bias: Option<Tensor>,
    /// `‖W₀ + s·B A‖_row` of the last eval forward and the `s` it was taken at: A and B only
    /// change after a training step, and generation calls the layer once per token.
    eval_norm: Mutex<Option<(f64, Tensor)>>,
}

impl LoraLinear {
    pub fn new(
        path: String,
        base: FrozenLinear,
        a: Var,
        b: Var,
        scaling: f64,
        dropout: f64,
        clock: Arc<TrainingClock>,
    ) -> Self {
        Self {
            path,
            base,
            a,
            b,
            scaling,
            dropout,
            clock,
            lora_b_bias: None,
            base_bias: None,
            dora: None,
        }
    }

    /// DoRA with magnitude `m: [out]`; `w0_sq` is `ops::dora::row_sq_norms` of the base weight.
    pub fn with_dora(mut self, magnitude: Var, w0_sq: Tensor) -> Self {
        let bias = self.base.bias().cloned();
        self.base = FrozenLinear::from_weight(self.base.weight().clone(), None);
        self.dora = Some(Dora {
            magnitude,
            w0_sq,
            bias,
            eval_norm: Mutex::new(None),
        });
        self
    }

    /// `‖W₀ + s·B A‖_row` for this forward at scale `scaling` (cached across eval forwards at
    /// the same scale, recomputed in training: IST's rollouts evaluate at other scales).
    fn dora_norm(&self, d: &Dora, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
        let fresh = || weight_norm(&self.base, &d.w0_sq, a, b, scaling);
        let mut cache = d.eval_norm.lock().unwrap();
        if self.clock.training() {
            *cache = None;
            return fresh();
        }
        match &*cache {
            Some((s, norm)) if *s == scaling => Ok(norm.clone()),
            _ => {
                let norm = fresh()?;
                *cache = Some((scaling, norm.clone()));
                Ok(norm)
            }
        }
    }

    /// With `lora_B`'s bias (`lora_bias = true`) and/or a trained base bias.
    pub fn with_biases(mut self, lora_b_bias: Option<Var>, base_bias: Option<Var>) -> Self {
        self.lora_b_bias = lora_b_bias;
        self.base_bias = base_bias;
        self
    }
}

impl Linear for LoraLinear {
    /// The layer's [`LayerGate`](crate::tuners::training_clock::LayerGate) (IST) scales `s`
    /// and, when frozen, detaches its tensors; without one it is the plain layer.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mask = if self.clock.training() {
            dropout_mask(x, self.dropout, self.clock.dropout_seed(&self.path))?
        } else {
            None
        };
        let gate = self.clock.gate(&self.path);
        let scaling = self.scaling * gate.scale;
        let track = |v: &Var| self.clock.tracked(gate, v);
        let (a, b) = (track(&self.a), track(&self.b));
        let y = match &self.dora {
            Some(d) => dora_linear(
                x,
                mask.as_ref(),
                &self.base,
                d.bias.as_ref(),
                &self.dora_norm(d, &a, &b, scaling)?,
                &a,
                &b,
                &track(&d.magnitude),
                scaling,
            )?,
            None => low_rank_linear(x, mask.as_ref(), &self.base, &a, &b, scaling)?,
        };
        let y = match &self.lora_b_bias {
            Some(bb) => y.broadcast_add(&(track(bb) * scaling)?)?,
            None => y,
        };
        match &self.base_bias {
            Some(b) => y.broadcast_add(&track(b)),
            None => Ok(y),
        }
    }
}

/// LoRA on a token embedding: `h = W₀[ids] + s · Aᵀ[ids] Bᵀ`, with `A: [r, vocab]` and
/// `B: [hidden, r]` (peft `lora.Embedding`: `lora_embedding_A`, `lora_embedding_B`). PEFT
/// applies no dropout here, and neither does this layer. As in peft (which passes the base
/// layer's `padding_idx` to `F.embedding`), A's column for the padding token gets no gradient.
pub struct LoraEmbedding {
    base: FrozenWeight,
    padding_idx: Option<u32>,
    /// `[r, vocab]`
    a: Var,
    /// `[hidden, r]`
    b: Var,
    scaling: f64,
}

impl LoraEmbedding {
    pub fn new(base: FrozenWeight, padding_idx: Option<u32>, a: Var, b: Var, scaling: f64) -> Self {
        Self {
            base,
            padding_idx,
            a,
            b,
            scaling,
        }
    }
}

impl Embedding for LoraEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let rows = self.base.rows(ids)?;
        // A[:, ids]ᵀ: [n, r]; its backward scatters into the [r, vocab] gradient of A.
        let mut after_a = self.a.as_tensor().index_select(ids, 1)?.t()?;
        if let Some(pad) = self.padding_idx {
            // Rows of the padding token read A without tracking it.
            let is_pad = ids
                .to_dtype(candle_core::DType::U32)?
                .eq(pad)?
                .to_dtype(candle_core::DType::F32)?
                .unsqueeze(1)?;
            if is_pad.sum_all()?.to_scalar::<f32>()? > 0.0 {
                after_a = (after_a.broadcast_mul(&(1.0 - &is_pad)?)?
                    + after_a.detach().broadcast_mul(&is_pad)?)?;
            }
        }
        rows + (after_a.matmul(&self.b.as_tensor().t()?)? * self.scaling)?
    }

    fn base(&self) -> &FrozenWeight {
        &self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn embedding_lora_adds_the_scaled_update_and_skips_the_padding_row_in_backward() {
        let dev = Device::Cpu;
        let table = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((4, 3))
            .unwrap();
        let a = Var::from_tensor(
            &Tensor::new(&[[1f32, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]], &dev).unwrap(),
        )
        .unwrap();
        let b =
            Var::from_tensor(&Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &dev).unwrap())
                .unwrap();
        let layer = LoraEmbedding::new(FrozenWeight::Dense(table), Some(0), a.clone(), b, 2.0);
        let ids = Tensor::new(&[2u32, 0, 1], &dev).unwrap();
        let h = layer.forward(&ids).unwrap();
        // Row for id 2: W₀[2] + 2·(A[:,2]ᵀ Bᵀ) = [6, 7, 8] + 2·[3, 0, 3].
        assert_eq!(h.to_vec2::<f32>().unwrap()[0], vec![12.0, 7.0, 14.0]);
        let grads = h.sum_all().unwrap().backward().unwrap();
        let ga: Vec<Vec<f32>> = grads
            .get(a.as_tensor())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!(
            ga.iter().all(|row| row[0] == 0.0),
            "padding column gets no gradient: {ga:?}"
        );
        assert!(
            ga.iter()
                .all(|row| row[1] != 0.0 && row[2] != 0.0 && row[3] == 0.0),
            "used columns only: {ga:?}"
        );
    }
}
