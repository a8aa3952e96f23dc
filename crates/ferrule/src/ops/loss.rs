//! Losses as transformers computes them.

use candle_core::{DType, Result, Tensor, D};

/// Label value that contributes no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy over positions whose label is not `IGNORE_INDEX`.
/// `logits: [n, classes]`, `labels: [n]` (i64). Returns `(loss, counted_positions)`;
/// the loss is 0 when nothing is counted.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let labels = labels.to_dtype(DType::I64)?;
    let keep = labels.ge(0i64)?;
    let count = keep.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
    let safe = keep.where_cond(&labels, &labels.zeros_like()?)?.to_dtype(DType::U32)?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let masked = (picked * keep.to_dtype(DType::F32)?)?;
    let loss = (masked.sum_all()?.neg()? / (count.max(1) as f64))?;
    Ok((loss, count))
}

/// Causal-LM loss: logits at position i predict label i+1 (transformers shifts labels).
/// `logits: [b, t, v]`, `labels: [b, t]`.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        return cross_entropy(&logits.narrow(1, 0, 0)?.reshape((0, v))?, &labels.narrow(1, 0, 0)?.reshape(0)?);
    }
    let l = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let y = labels.narrow(1, 1, t - 1)?.contiguous()?.reshape(b * (t - 1))?;
    cross_entropy(&l, &y)
}
