//! Scaled dot-product attention (Vaswani et al. 2017, eq. 1) with grouped-query heads and
//! additive masks, written with differentiable candle primitives.

use candle_core::{DType, Device, Result, Tensor, D};

/// The value added to masked scores. A large finite negative rather than −∞: a fully masked
/// row (a left-padding query) then gives a finite uniform softmax instead of NaN, which
/// would otherwise leak into real tokens in the next layer (REFERENCE.md, traps).
pub const MASKED: f32 = f32::MIN;

/// Which key positions each query may attend to.
#[derive(Clone, Copy, Debug)]
pub enum MaskKind {
    /// Bidirectional (encoders): only padding is masked.
    Bidirectional,
    /// Causal, optionally limited to a sliding window of `w` positions (Mistral: `i − j < w`).
    Causal { sliding_window: Option<usize> },
}

/// Builds the additive mask `[b, 1, q_len, kv_len]` (or `[1, 1, q, kv]` without padding).
/// `padding`: `[b, kv_len]` with 1 for real tokens. Queries sit at positions
/// `kv_len − q_len ..` (a KV cache holds the earlier ones).
pub fn build_mask(kind: MaskKind, q_len: usize, kv_len: usize, padding: Option<&Tensor>, device: &Device) -> Result<Option<Tensor>> {
    let offset = kv_len - q_len;
    let structural = match kind {
        MaskKind::Bidirectional => None,
        MaskKind::Causal { sliding_window } => {
            let mut m = vec![0f32; q_len * kv_len];
            for i in 0..q_len {
                let qi = i + offset;
                for j in 0..kv_len {
                    let allowed = j <= qi && sliding_window.map_or(true, |w| qi - j < w);
                    if !allowed {
                        m[i * kv_len + j] = MASKED;
                    }
                }
            }
            Some(Tensor::from_vec(m, (1, 1, q_len, kv_len), device)?)
        }
    };
    let pad = match padding {
        None => None,
        Some(p) => {
            let (b, l) = p.dims2()?;
            if l != kv_len {
                candle_core::bail!("attention mask has {l} positions, expected {kv_len}")
            }
            let keep = p.to_dtype(DType::F32)?;
            // 0 where kept, MASKED where padded.
            let add = ((keep - 1.0)?.neg()? * (MASKED as f64))?;
            Some(add.reshape((b, 1, 1, kv_len))?)
        }
    };
    Ok(match (structural, pad) {
        (None, None) => None,
        (Some(s), None) => Some(s),
        (None, Some(p)) => Some(p),
        // Clamp so MASKED + MASKED does not overflow to −∞.
        (Some(s), Some(p)) => Some(s.broadcast_add(&p)?.clamp(MASKED, 0f32)?),
    })
}

/// `softmax(q kᵀ / sqrt(d) + mask) v` for `q: [b, h, t, d]`, `k, v: [b, h_kv, s, d]`.
/// Key/value heads are repeated to match query heads (GQA, Ainslie et al. 2023).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let h_kv = k.dim(1)?;
    let groups = h / h_kv;
    // Fold the query-head groups into the time axis so K/V need no copy:
    // q [b, h_kv, groups*t, d] against k [b, h_kv, s, d].
    let q = q.reshape((b, h_kv, groups * t, d))?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => {
            let s = k.dim(2)?;
            let scores = scores.reshape((b, h_kv, groups, t, s))?;
            let m = m.unsqueeze(2)?; // [b|1, 1, 1, t, s]
            scores.broadcast_add(&m)?.reshape((b, h_kv, groups * t, s))?
        }
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?;
    probs.matmul(v)?.reshape((b, h, t, d))
}

/// Differentiable softmax over the last axis (candle's fused one has no backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}
