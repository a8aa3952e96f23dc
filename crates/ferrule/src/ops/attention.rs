//! Scaled dot-product attention (Vaswani et al. 2017, eq. 1) with grouped-query heads and
//! additive masks.
//!
//! On the CPU in f32 it runs as one fused custom op ([`super::fused_attention`]) with the mask
//! captured: candle stores no gradient for the mask and the graph keeps no scores or
//! probabilities. Elsewhere the composite [`attention_reference`].

use candle_core::{DType, Device, Result, Tensor, D};

use super::fused_attention::{FusedAttention, Seq};
use super::kernels;

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
pub fn build_mask(
    kind: MaskKind,
    q_len: usize,
    kv_len: usize,
    padding: Option<&Tensor>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let offset = kv_len - q_len;
    let structural = match kind {
        MaskKind::Bidirectional => None,
        MaskKind::Causal { sliding_window } => {
            let mut m = vec![0f32; q_len * kv_len];
            for i in 0..q_len {
                let qi = i + offset;
                for j in 0..kv_len {
                    let allowed = j <= qi && sliding_window.is_none_or(|w| qi - j < w);
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

/// `softmax(q kᵀ / sqrt(d) + mask) v` per head, token-major as the projections make them:
/// `q: [b, t, heads·d]`, `k, v: [b, s, h_kv·d]`, output `[b, t, heads·d]`. Query head `i`
/// reads key/value head `i / (heads / h_kv)` (GQA, Ainslie et al. 2023).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, hd) = q.dims3()?;
    let (_, s, kd) = k.dims3()?;
    let d = hd.checked_div(heads).unwrap_or(0);
    let shapes_ok = d > 0
        && hd == heads * d
        && kd.is_multiple_of(d)
        && kd > 0
        && heads.is_multiple_of(kd / d)
        && v.dims() == k.dims();
    if !shapes_ok {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not split into {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if [q, k, v].iter().all(|x| kernels::fused_ok(x)) && mask.is_none_or(|m| mask_fits(m, b, t, s))
    {
        let mask = match mask {
            Some(m) => Some(m.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        let op = FusedAttention::batched(mask, b, t, s, scale as f32, heads)?;
        return q.contiguous()?.apply_op3_arc(
            &k.contiguous()?,
            &v.contiguous()?,
            std::sync::Arc::new(Box::new(op)),
        );
    }
    attention_reference(q, k, v, heads, mask, scale)
}

/// Attention within each of several sequences laid end to end in one row (a padding-free
/// batch, FlashAttention's varlen form): `q: [1, n, heads·d]`, `lens` the sequences' lengths in
/// order (summing to `n`), and `k, v: [1, Σ (before + lᵢ), h_kv·d]`, each sequence's keys being
/// `before` rows that precede its queries (a prefix-tuning prefix, as if cached; 0 for none)
/// and then its own. Query `i` of a sequence sees its own sequence's keys only, as `kind`
/// allows with the query at key position `before + i` (causal with an optional sliding window,
/// or bidirectional); the result equals [`attention`] on each sequence alone with the same
/// keys before it. Output `[1, n, heads·d]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    lens: &[usize],
    before: usize,
    kind: MaskKind,
    scale: f64,
) -> Result<Tensor> {
    let (one, n, _) = q.dims3()?;
    let kv_rows = n + before * lens.len();
    if one != 1 || k.dims3()?.1 != kv_rows || lens.iter().sum::<usize>() != n || lens.contains(&0) {
        candle_core::bail!(
            "attention_varlen: q {:?}, k {:?} do not hold sequences of {lens:?} (with {before} keys before each) in one row",
            q.dims(),
            k.dims()
        )
    }
    if ![q, k, v].iter().all(|x| kernels::fused_ok(x)) {
        let mut outs = Vec::with_capacity(lens.len());
        let (mut q0, mut k0) = (0, 0);
        for &len in lens {
            let s = before + len;
            let mask = build_mask(kind, len, s, None, q.device())?;
            outs.push(attention_reference(
                &q.narrow(1, q0, len)?,
                &k.narrow(1, k0, s)?,
                &v.narrow(1, k0, s)?,
                heads,
                mask.as_ref(),
                scale,
            )?);
            (q0, k0) = (q0 + len, k0 + s);
        }
        return Tensor::cat(&outs, 1);
    }
    let (mask, seqs) = varlen_masks(kind, lens, before, q.device())?;
    let op = FusedAttention::varlen(mask, seqs, scale as f32, heads)?;
    q.contiguous()?.apply_op3_arc(
        &k.contiguous()?,
        &v.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}

/// The sequences of a varlen call and their masks, flat: each distinct length's
/// `[len, before + len]` causal mask once (none for bidirectional attention, which needs no
/// mask within a sequence).
fn varlen_masks(
    kind: MaskKind,
    lens: &[usize],
    before: usize,
    device: &Device,
) -> Result<(Option<Tensor>, Vec<Seq>)> {
    let mut data: Vec<f32> = Vec::new();
    let mut starts = std::collections::HashMap::new();
    let mut seqs = Vec::with_capacity(lens.len());
    let (mut q0, mut k0) = (0, 0);
    for &len in lens {
        let s = before + len;
        let mask = match kind {
            MaskKind::Bidirectional => None,
            MaskKind::Causal { sliding_window } => Some(*starts.entry(len).or_insert_with(|| {
                let start = data.len();
                data.extend((0..len * s).map(|ij| {
                    let (i, j) = (ij / s + before, ij % s);
                    if j <= i && sliding_window.is_none_or(|w| i - j < w) {
                        0.0
                    } else {
                        MASKED
                    }
                }));
                start
            })),
        };
        seqs.push(Seq {
            q0,
            t: len,
            k0,
            s,
            mask: mask.map(|start| (start, s)),
        });
        (q0, k0) = (q0 + len, k0 + s);
    }
    let n = data.len();
    let mask = if n == 0 {
        None
    } else {
        Some(Tensor::from_vec(data, n, device)?)
    };
    Ok((mask, seqs))
}

/// Whether the fused op can take `mask`: `[b|1, 1, t|1, s]`, a constant.
fn mask_fits(m: &Tensor, b: usize, t: usize, s: usize) -> bool {
    match m.dims() {
        &[mb, 1, mt, ms] => {
            (mb == 1 || mb == b)
                && (mt == 1 || mt == t)
                && ms == s
                && !m.track_op()
                && m.device().is_cpu()
        }
        _ => false,
    }
}

/// Composite attention from differentiable primitives (fallback and test reference), same
/// layouts as [`attention`].
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, hd) = q.dims3()?;
    let d = hd / heads;
    let s = k.dim(1)?;
    let h_kv = k.dim(2)? / d;
    let groups = heads / h_kv;
    // [b, n, len, d] per head; the query-head groups folded into the time axis so K/V need no
    // copy: q [b, h_kv, groups·t, d] against k [b, h_kv, s, d].
    let split = |x: &Tensor, n: usize, len: usize| -> Result<Tensor> {
        x.reshape((b, len, n, d))?.transpose(1, 2)?.contiguous()
    };
    let q = split(q, heads, t)?.reshape((b, h_kv, groups * t, d))?;
    let (k, v) = (split(k, h_kv, s)?, split(v, h_kv, s)?);
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => {
            let scores = scores.reshape((b, h_kv, groups, t, s))?;
            let m = m.unsqueeze(2)?; // [b|1, 1, 1, t, s]
            scores
                .broadcast_add(&m)?
                .reshape((b, h_kv, groups * t, s))?
        }
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?;
    probs
        .matmul(&v)?
        .reshape((b, heads, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, hd))
}

/// Differentiable softmax over the last axis (candle's fused one has no backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}
