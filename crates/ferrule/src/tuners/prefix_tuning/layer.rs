//! Prefix tuning's keys and values (Li & Liang 2021, §4.2): a trained table
//! `P: [n, L · 2 · d_kv]`, or the MLP reparameterisation `P = W₂ tanh(W₁ E + b₁) + b₂` of a
//! trained `E: [n, d_kv]` (§4.3), split per layer into a key and a value prefix (peft
//! `tuners/prefix_tuning/model.py`, `PrefixEncoder`; `PeftModel.get_prompt`: the table is
//! viewed as `[n, L·2, heads, head_dim]`, so layer `l`'s key is columns `2l·d_kv ..`, its value
//! the next `d_kv`).

use candle_core::{Result, Tensor, Var};

use crate::model::KvPrefix;

/// Where the prefix comes from.
pub enum PrefixEncoder {
    /// `P: [n, L · 2 · d_kv]` trained directly (or a saved adapter's, however it was trained).
    Table(Var),
    /// `P = W₂ tanh(W₁ E + b₁) + b₂`, `E: [n, d_kv]`, `W₁: [h_enc, d_kv]`, `W₂: [L·2·d_kv, h_enc]`.
    Projected {
        embedding: Var,
        w1: Var,
        b1: Var,
        w2: Var,
        b2: Var,
    },
}

impl PrefixEncoder {
    /// `P: [n, L · 2 · d_kv]`.
    pub fn table(&self) -> Result<Tensor> {
        match self {
            PrefixEncoder::Table(t) => Ok(t.as_tensor().clone()),
            PrefixEncoder::Projected {
                embedding,
                w1,
                b1,
                w2,
                b2,
            } => {
                let h = embedding
                    .as_tensor()
                    .matmul(&w1.as_tensor().t()?)?
                    .broadcast_add(b1.as_tensor())?
                    .tanh()?;
                h.matmul(&w2.as_tensor().t()?)?
                    .broadcast_add(b2.as_tensor())
            }
        }
    }
}

/// The prefix of every layer: `n` positions of `d_kv = kv_heads · head_dim` keys and values.
pub struct Prefix {
    pub encoder: PrefixEncoder,
    pub num_tokens: usize,
    pub num_layers: usize,
    pub kv_dim: usize,
}

impl KvPrefix for Prefix {
    fn key_values(&self) -> Result<Vec<(Tensor, Tensor)>> {
        // Per layer, its keys then its values: `[tokens, num_layers · 2 · kv_dim]`.
        let table = self.encoder.table()?;
        let width = self.kv_dim;
        (0..self.num_layers)
            .map(|layer| {
                let keys = table.narrow(1, 2 * layer * width, width)?;
                let values = table.narrow(1, (2 * layer + 1) * width, width)?;
                Ok((keys, values))
            })
            .collect()
    }

    fn num_tokens(&self) -> usize {
        self.num_tokens
    }
}
