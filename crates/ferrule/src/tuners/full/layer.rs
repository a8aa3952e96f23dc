//! The layers of a model trained in full: a linear layer and a token embedding whose tensors
//! are trainable copies of the base's (`torch.nn.Linear`, `torch.nn.Embedding` with
//! `padding_idx`).

use candle_core::{DType, Result, Tensor, Var};

use crate::model::{Embedding, Linear};
use crate::ops::FrozenWeight;

/// `y = x Wᵀ + b` with `W: [out, in]` trainable and `b: [out]` trainable or frozen.
pub struct TrainedLinear {
    pub weight: Var,
    pub bias: Option<Tensor>,
}

impl Linear for TrainedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_core::Module::forward(
            &candle_nn::Linear::new(self.weight.as_tensor().clone(), self.bias.clone()),
            x,
        )
    }
}

/// A token embedding whose whole table trains: `W[ids]`. The padding token's row
/// (`padding_idx`) is read without a gradient, as `F.embedding(padding_idx=...)` leaves it,
/// so it never changes.
pub struct TrainedEmbedding {
    weight: Var,
    padding_idx: Option<u32>,
    /// The same table as a [`FrozenWeight`], for what reads the table itself
    /// ([`Embedding::base`]); it shares the trainable tensor's storage.
    view: FrozenWeight,
}

impl TrainedEmbedding {
    pub fn new(weight: Var, padding_idx: Option<u32>) -> Self {
        let view = FrozenWeight::Dense(weight.as_tensor().clone());
        Self {
            weight,
            padding_idx,
            view,
        }
    }
}

impl Embedding for TrainedEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let table = self.weight.as_tensor();
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        let rows = table.index_select(&flat, 0)?;
        let Some(pad) = self.padding_idx else {
            return Ok(rows);
        };
        let is_pad: Vec<f32> = flat
            .to_vec1::<u32>()?
            .iter()
            .map(|&id| f32::from(u8::from(id == pad)))
            .collect();
        if is_pad.iter().all(|&p| p == 0.0) {
            return Ok(rows);
        }
        let n = is_pad.len();
        let pad_col = Tensor::from_vec(is_pad, (n, 1), ids.device())?;
        let keep_col = pad_col.affine(-1.0, 1.0)?;
        rows.broadcast_mul(&keep_col)? + rows.detach().broadcast_mul(&pad_col)?
    }

    fn base(&self) -> &FrozenWeight {
        &self.view
    }
}
