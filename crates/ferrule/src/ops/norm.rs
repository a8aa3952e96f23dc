//! Differentiable normalisations. candle's fused `rms_norm` / `layer_norm` have no backward
//! (DESIGN.md, fix 4): gradients would silently stop at every norm. These are written with
//! differentiable primitives.

use candle_core::{DType, Result, Tensor, D};

/// RMSNorm (Zhang & Sennrich 2019), as `LlamaRMSNorm`: `w · x / sqrt(mean(x²) + eps)`,
/// computed in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let y = x.broadcast_mul(&inv)?;
    y.broadcast_mul(&weight.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// LayerNorm (Ba et al. 2016): `(x − mean) / sqrt(var + eps) · w + b`, biased variance as torch.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    y.broadcast_mul(weight)?.broadcast_add(bias)
}
