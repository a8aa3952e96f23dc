//! Scaled dot-product attention (Vaswani et al. 2017, eq. 1) with grouped-query heads and
//! additive masks.
//!
//! On the CPU in f32 the scaling, mask addition and softmax run as one fused custom op
//! ([`scaled_masked_softmax`]) with the mask captured: candle stores no gradient for the mask
//! (which it would otherwise broadcast to the full scores shape) and keeps no intermediates;
//! the backward works from the op's output. Elsewhere the composite [`attention_reference`].

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, D};

use super::kernels::{self, multiversion};

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
    let s = k.dim(2)?;
    if kernels::fused_ok(q) && h_kv > 0 && h % h_kv == 0 && mask.map_or(true, |m| mask_fits(m, b, t, s)) {
        let groups = h / h_kv;
        let q = q.reshape((b, h_kv, groups * t, d))?;
        let scores = q.matmul(&k.t()?)?;
        let probs = scaled_masked_softmax(&scores, mask, scale)?;
        return probs.matmul(v)?.reshape((b, h, t, d));
    }
    attention_reference(q, k, v, mask, scale)
}

/// Whether the fused op can take `mask`: `[b|1, 1, t|1, s]`, a constant.
fn mask_fits(m: &Tensor, b: usize, t: usize, s: usize) -> bool {
    match m.dims() {
        &[mb, 1, mt, ms] => (mb == 1 || mb == b) && (mt == 1 || mt == t) && ms == s && !m.track_op() && m.device().is_cpu(),
        _ => false,
    }
}

/// `softmax(scale · scores + mask)` over the last axis, fused (CPU, f32; composite otherwise).
/// `scores: [b, h_kv, groups·t, s]` (query-head groups folded into the time axis, as
/// [`attention`] lays them out), `mask: [b|1, 1, t|1, s]`, broadcast over heads and groups.
/// The gradient flows to `scores` only.
pub fn scaled_masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, _, gt, s) = scores.dims4()?;
    let (mb, mt) = match mask {
        Some(m) => (m.dim(0)?, m.dim(2)?),
        None => (1, 1),
    };
    let t_ok = mask.map_or(true, |_| mt == 1 || (mt > 0 && gt % mt == 0));
    if kernels::fused_ok(scores) && t_ok && mask.map_or(true, |m| mask_fits(m, b, mt, s)) {
        let mask = match mask {
            Some(m) => Some(m.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        let op = MaskedSoftmax { mask, scale: scale as f32, batch: mb > 1, mt };
        return scores.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(op)));
    }
    let (_, h_kv, _, _) = scores.dims4()?;
    let scores = (scores * scale)?;
    let scores = match mask {
        Some(m) => {
            let groups = gt / mt;
            let scores = scores.reshape((b, h_kv, groups, mt, s))?;
            scores.broadcast_add(&m.unsqueeze(2)?)?.reshape((b, h_kv, gt, s))?
        }
        None => scores,
    };
    softmax_last_dim(&scores)
}

/// Composite attention from differentiable primitives (fallback and test reference).
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
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

/// Fused `softmax(scale · x + mask)` over rows of `x: [b, h_kv, groups·t, s]`. Row `r` is in
/// batch `r / (h_kv·groups·t)` and at query `r mod t`; the mask `[b|1, 1, t|1, s]` is captured.
struct MaskedSoftmax {
    mask: Option<Tensor>,
    scale: f32,
    /// The mask has one slab per batch element (else one for all).
    batch: bool,
    /// The mask's query rows (`t`, or 1 when it only masks keys).
    mt: usize,
}

multiversion! {
    /// Rows `r0..` of `y = softmax(scale·x + mask)` (rows of `s` elements). `mask` is empty
    /// (none), else the mask row of row `r` starts at `(r / rows_per_batch)·batch_stride +
    /// (r mod mt)·s`.
    fn softmax_fwd_rows(x: &[f32], mask: &[f32], scale: f32, s: usize, r0: usize, rows_per_batch: usize, batch_stride: usize, mt: usize, y: &mut [f32]) {
        for (i, (x, y)) in x.chunks_exact(s).zip(y.chunks_exact_mut(s)).enumerate() {
            let r = r0 + i;
            if mask.is_empty() {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x * scale;
                }
            } else {
                let off = (r / rows_per_batch) * batch_stride + (r % mt) * s;
                for ((y, &x), &m) in y.iter_mut().zip(x).zip(&mask[off..off + s]) {
                    *y = x * scale + m;
                }
            }
            let mx = kernels::max(y);
            for y in y.iter_mut() {
                *y = kernels::exp(*y - mx);
            }
            let sum = kernels::sum(y);
            for y in y.iter_mut() {
                *y /= sum;
            }
        }
    }
}

multiversion! {
    /// `dx = scale · y·(g − Σ g·y)` per row of `s`.
    fn softmax_bwd_rows(y: &[f32], g: &[f32], scale: f32, s: usize, dx: &mut [f32]) {
        for ((y, g), dx) in y.chunks_exact(s).zip(g.chunks_exact(s)).zip(dx.chunks_exact_mut(s)) {
            let gy = kernels::dot(g, y);
            for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *dx = scale * (y * (g - gy));
            }
        }
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous_f32(storage, layout, self.name())?;
        let (_, h_kv, gt, s) = layout.shape().dims4()?;
        let mut y = vec![0f32; x.len()];
        let rows_per_batch = h_kv * gt;
        let batch_stride = if self.batch { self.mt * s } else { 0 };
        let run = |mask: &[f32], y: &mut [f32]| {
            kernels::par_rows(y, s, 2 * s, |r0, y| {
                softmax_fwd_rows(&x[r0 * s..r0 * s + y.len()], mask, self.scale, s, r0, rows_per_batch, batch_stride, self.mt, y)
            })
        };
        match &self.mask {
            Some(m) => kernels::with_f32(m, self.name(), |mask| {
                run(mask, &mut y);
                Ok(())
            })?,
            None => run(&[], &mut y),
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        let res = res.contiguous()?;
        let s = arg.dim(D::Minus1)?;
        let mut dx = vec![0f32; arg.elem_count()];
        kernels::with_f32(&res, self.name(), |y| {
            kernels::with_f32(&g, self.name(), |g| {
                kernels::par_rows(&mut dx, s, s, |r0, dx| {
                    let rows = r0 * s..r0 * s + dx.len();
                    softmax_bwd_rows(&y[rows.clone()], &g[rows], self.scale, s, dx)
                });
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
