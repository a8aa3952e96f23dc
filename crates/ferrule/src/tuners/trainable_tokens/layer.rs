//! The math of peft's `TrainableTokensLayer` (`tuners/trainable_tokens/layer.py`): a table
//! `W: [vocab, hidden]` whose listed rows are replaced by trained ones,
//! `W' = W.index_copy(0, indices, delta)`, with `delta: [n, hidden]` (peft's
//! `trainable_tokens_delta`, despite its name the rows themselves, not a difference).
//!
//! As an embedding, `W'[ids]`; as an output head sharing the table (`tie_word_embeddings`) or
//! a listed head, `x W'ᵀ` (peft's `F.linear(x, W')`, no bias). Neither builds `W'`: the
//! embedding takes the base rows and swaps in the listed ones, the head computes `x Wᵀ` with the
//! frozen op and replaces the listed columns by `x deltaᵀ`, so the frozen table never gets a
//! gradient and only `delta` does.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var, D};

use crate::model::{Embedding, Linear};
use crate::ops::{FrozenLinear, FrozenWeight};

/// The rows a layer replaces: `indices[i]` is row `i` of `delta`.
#[derive(Clone, Debug)]
pub struct TokenRows {
    indices: Vec<u32>,
    /// Row of `delta` for each listed token id.
    slot: HashMap<u32, u32>,
    delta: Var,
}

impl TokenRows {
    /// `indices` (distinct, checked by the caller) and their trained rows `delta: [n, hidden]`.
    pub fn new(indices: Vec<u32>, delta: Var) -> Self {
        let slot = indices
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i as u32))
            .collect();
        Self {
            indices,
            slot,
            delta,
        }
    }

    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    pub fn delta(&self) -> &Var {
        &self.delta
    }

    /// `table` with the listed rows replaced (peft `get_merged_weights`), in `delta`'s dtype.
    pub fn replaced_in(&self, table: &Tensor) -> Result<Tensor> {
        let delta = self.delta.as_tensor();
        let table = table.to_dtype(delta.dtype())?;
        let keep = self
            .keep_mask(table.dim(0)?, table.device())?
            .unsqueeze(1)?;
        let idx = Tensor::new(self.indices.as_slice(), table.device())?;
        table.broadcast_mul(&keep)?.index_add(&idx, delta, 0)
    }

    /// `[rows]`: 1, and 0 at the listed indices.
    fn keep_mask(&self, rows: usize, device: &candle_core::Device) -> Result<Tensor> {
        let mut keep = vec![1f32; rows];
        for &i in &self.indices {
            keep[i as usize] = 0.0;
        }
        Tensor::from_vec(keep, rows, device)
    }
}

/// A token embedding with trainable rows: `W'[ids]`. The padding token's row, when listed,
/// is read without a gradient, as `F.embedding(padding_idx=...)` leaves it.
pub struct TokenRowsEmbedding {
    base: FrozenWeight,
    padding_idx: Option<u32>,
    rows: TokenRows,
}

impl TokenRowsEmbedding {
    pub fn new(base: FrozenWeight, padding_idx: Option<u32>, rows: TokenRows) -> Self {
        Self {
            base,
            padding_idx,
            rows,
        }
    }
}

impl Embedding for TokenRowsEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let delta = self.rows.delta.as_tensor();
        let looked_up = self.base.rows(ids)?.to_dtype(delta.dtype())?;
        let flat: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        let n = flat.len();
        // For each position: the delta row it reads (0 when unlisted, masked out), and whether
        // it takes that row with a gradient (listed) or without (the listed padding token).
        let (mut slot, mut trained, mut padding) = (vec![0u32; n], vec![0f32; n], vec![0f32; n]);
        for (i, id) in flat.iter().enumerate() {
            if let Some(&s) = self.rows.slot.get(id) {
                slot[i] = s;
                match self.padding_idx == Some(*id) {
                    true => padding[i] = 1.0,
                    false => trained[i] = 1.0,
                }
            }
        }
        let device = ids.device();
        let keep: Vec<f32> = (0..n).map(|i| 1.0 - trained[i] - padding[i]).collect();
        let column = |v: Vec<f32>| Tensor::from_vec(v, (n, 1), device)?.to_dtype(delta.dtype());
        // Always in the graph, so `delta` gets a (zero) gradient from a batch without its
        // tokens, as peft's index_copy gives it one.
        let picked = delta.index_select(&Tensor::from_vec(slot, n, device)?, 0)?;
        let out = (looked_up.broadcast_mul(&column(keep)?)?
            + picked.broadcast_mul(&column(trained)?)?)?;
        if padding.iter().any(|&p| p > 0.0) {
            return out + picked.detach().broadcast_mul(&column(padding)?)?;
        }
        Ok(out)
    }

    fn base(&self) -> &FrozenWeight {
        &self.base
    }
}

/// An output head with trainable rows (a head tied to the embedding, or one listed itself):
/// `x W'ᵀ`, the listed columns of `x Wᵀ` replaced by `x deltaᵀ`. No bias, as peft's
/// `F.linear(x, W')`.
pub struct TokenRowsHead {
    base: FrozenLinear,
    rows: TokenRows,
    /// `[vocab]`: 0 at the listed columns, else 1.
    keep: Tensor,
    /// The listed indices, u32.
    columns: Tensor,
}

impl TokenRowsHead {
    pub fn new(base: FrozenLinear, rows: TokenRows) -> Result<Self> {
        let device = rows.delta.device().clone();
        let keep = rows.keep_mask(base.out_features(), &device)?;
        let columns = Tensor::new(rows.indices.as_slice(), &device)?;
        let base = FrozenLinear::from_weight(base.weight().clone(), None);
        Ok(Self {
            base,
            rows,
            keep,
            columns,
        })
    }
}

impl Linear for TokenRowsHead {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let delta = self.rows.delta.as_tensor();
        let y = Linear::forward(&self.base, x)?;
        let keep = self.keep.to_dtype(y.dtype())?;
        let listed = x
            .to_dtype(delta.dtype())?
            .broadcast_matmul(&delta.t()?)?
            .to_dtype(y.dtype())?;
        y.broadcast_mul(&keep)?
            .index_add(&self.columns, &listed.contiguous()?, D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn table() -> Tensor {
        Tensor::arange(0f32, 15.0, &Device::Cpu)
            .unwrap()
            .reshape((5, 3))
            .unwrap()
    }

    fn rows(indices: &[u32]) -> TokenRows {
        let delta = Tensor::new(
            &[[100f32, 101.0, 102.0], [200.0, 201.0, 202.0]],
            &Device::Cpu,
        )
        .unwrap();
        TokenRows::new(indices.to_vec(), Var::from_tensor(&delta).unwrap())
    }

    /// The embedding and the head both equal the plain lookup / product with the merged table
    /// `W'`, and only the listed rows get a gradient (none for the listed padding token).
    #[test]
    fn embedding_and_head_equal_the_merged_table() {
        let dev = Device::Cpu;
        let rows = rows(&[3, 1]);
        let merged = rows.replaced_in(&table()).unwrap();
        assert_eq!(
            merged.to_vec2::<f32>().unwrap()[3],
            vec![100.0, 101.0, 102.0]
        );
        assert_eq!(
            merged.to_vec2::<f32>().unwrap()[1],
            vec![200.0, 201.0, 202.0]
        );
        assert_eq!(merged.to_vec2::<f32>().unwrap()[2], vec![6.0, 7.0, 8.0]);

        let emb = TokenRowsEmbedding::new(FrozenWeight::Dense(table()), Some(1), rows.clone());
        let ids = Tensor::new(&[3u32, 0, 1, 3], &dev).unwrap();
        let out = emb.forward(&ids).unwrap();
        let want = merged.index_select(&ids, 0).unwrap();
        assert_eq!(
            out.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        let grads = out.sum_all().unwrap().backward().unwrap();
        let g = grads.get(rows.delta().as_tensor()).unwrap();
        // Row 0 (id 3) read twice; row 1 (id 1, the padding token) no gradient.
        assert_eq!(
            g.to_vec2::<f32>().unwrap(),
            vec![vec![2.0, 2.0, 2.0], vec![0.0, 0.0, 0.0]]
        );

        let head =
            TokenRowsHead::new(FrozenLinear::new(table(), None).unwrap(), rows.clone()).unwrap();
        let x = Tensor::new(&[[[1f32, -1.0, 0.5]], [[0.0, 2.0, 1.0]]], &dev).unwrap();
        let y = head.forward(&x).unwrap();
        let want = x.broadcast_matmul(&merged.t().unwrap()).unwrap();
        assert_eq!(y.to_vec3::<f32>().unwrap(), want.to_vec3::<f32>().unwrap());
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(rows.delta().as_tensor()).unwrap();
        // d/d delta_i of Σ x·delta_i = Σ x over positions, for each listed row.
        assert_eq!(
            g.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 1.0, 1.5], vec![1.0, 1.0, 1.5]]
        );
    }

    /// A batch without a listed token still gives `delta` a gradient (zero), as peft's does.
    #[test]
    fn a_batch_without_listed_tokens_gives_a_zero_gradient() {
        let rows = rows(&[3, 1]);
        let emb = TokenRowsEmbedding::new(FrozenWeight::Dense(table()), None, rows.clone());
        let ids = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let out = emb.forward(&ids).unwrap();
        assert_eq!(
            out.to_vec2::<f32>().unwrap(),
            table()
                .index_select(&ids, 0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        );
        let grads = out.sum_all().unwrap().backward().unwrap();
        let g = grads.get(rows.delta().as_tensor()).unwrap();
        assert_eq!(g.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
