//! Differentiable normalisations. candle's fused `rms_norm` / `layer_norm` have no backward
//! (docs/ARCHITECTURE.md, decisions, fix 4): gradients would silently stop at every norm.
//!
//! On the CPU in f32 they run as fused custom ops whose backward returns only `dx`: the norm
//! weight and bias are frozen, captured in the op, and get no gradient (candle would otherwise
//! store an activation-sized gradient for each broadcast constant). When the weight or bias is
//! trained (LN tuning, LoRA `bias = "all"`), the fused op normalises with a unit weight and zero
//! bias and the affine part `x̂ ⊙ w + b` runs as two differentiable element-wise ops, which give
//! `dw = Σ g ⊙ x̂` and `db = Σ g`. Elsewhere the composite versions (`*_reference`) run.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use super::kernels::{self, multiversion};

/// RMSNorm (Zhang & Sennrich 2019), as `LlamaRMSNorm`: `w · x / sqrt(mean(x²) + eps)`,
/// computed in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if kernels::fused_ok(x) && d > 0 && weight.dims() == [d] {
        if weight.track_op() {
            return rms_norm(x, &Tensor::ones(d, DType::F32, x.device())?, eps)?
                .broadcast_mul(weight);
        }
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        return x
            .contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(RmsNormOp {
                weight,
                eps: eps as f32,
            })));
    }
    rms_norm_reference(x, weight, eps)
}

/// Composite RMSNorm from differentiable primitives (the fallback, and the reference the
/// fused op is tested against).
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let y = x.broadcast_mul(&inv)?;
    y.broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

/// LayerNorm (Ba et al. 2016): `(x − mean) / sqrt(var + eps) · w + b`, biased variance as torch.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if kernels::fused_ok(x)
        && d > 0
        && (weight.track_op() || bias.track_op())
        && weight.dims() == [d]
        && bias.dims() == [d]
    {
        let (ones, zeros) = unit_affine(d, x.device())?;
        return layer_norm(x, &ones, &zeros, eps)?
            .broadcast_mul(weight)?
            .broadcast_add(bias);
    }
    if kernels::fused_ok(x)
        && d > 0
        && !weight.track_op()
        && !bias.track_op()
        && weight.dims() == [d]
        && bias.dims() == [d]
    {
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let bias = bias.to_dtype(DType::F32)?.contiguous()?;
        return x
            .contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(LayerNormOp {
                weight,
                bias,
                eps: eps as f32,
            })));
    }
    layer_norm_reference(x, weight, bias, eps)
}

/// `LayerNorm(a + b)`: a post-norm residual (BERT's `LayerNorm(sublayer(x) + x)`). On the CPU
/// one op that forms the sum row by row and neither stores it nor leaves an add node in the
/// graph (whose backward would zero-fill and add a buffer for the sum); elsewhere composite.
pub fn add_layer_norm(
    a: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let d = a.dim(D::Minus1)?;
    let fusable = kernels::fused_ok(a)
        && kernels::fused_ok(b)
        && a.dims() == b.dims()
        && d > 0
        && weight.dims() == [d]
        && bias.dims() == [d];
    if fusable && (weight.track_op() || bias.track_op()) {
        let (ones, zeros) = unit_affine(d, a.device())?;
        return add_layer_norm(a, b, &ones, &zeros, eps)?
            .broadcast_mul(weight)?
            .broadcast_add(bias);
    }
    if kernels::fused_ok(a)
        && kernels::fused_ok(b)
        && a.dims() == b.dims()
        && d > 0
        && !weight.track_op()
        && !bias.track_op()
        && weight.dims() == [d]
        && bias.dims() == [d]
    {
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let bias = bias.to_dtype(DType::F32)?.contiguous()?;
        return a.contiguous()?.apply_op2_arc(
            &b.contiguous()?,
            std::sync::Arc::new(Box::new(AddLayerNormOp(LayerNormOp {
                weight,
                bias,
                eps: eps as f32,
            }))),
        );
    }
    layer_norm(&(a + b)?, weight, bias, eps)
}

/// A unit weight and a zero bias `[d]`: the fused ops' constants when the affine part trains.
fn unit_affine(d: usize, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
    Ok((
        Tensor::ones(d, DType::F32, device)?,
        Tensor::zeros(d, DType::F32, device)?,
    ))
}

/// Composite LayerNorm from differentiable primitives (fallback and test reference).
pub fn layer_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    y.broadcast_mul(weight)?.broadcast_add(bias)
}

struct RmsNormOp {
    weight: Tensor,
    eps: f32,
}

multiversion! {
    /// `y = x · inv · w` per row, `inv = 1/sqrt(mean(x²) + eps)`.
    fn rms_fwd_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
        let d = w.len();
        for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let inv = 1.0 / (kernels::sum_sq_centered(x, 0.0) / d as f32 + eps).sqrt();
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * inv * w;
            }
        }
    }
}

multiversion! {
    /// `dx = inv·(g·w) − x·inv³·mean(g·w·x)` per row.
    fn rms_bwd_rows(x: &[f32], g: &[f32], w: &[f32], eps: f32, dx: &mut [f32]) {
        let d = w.len();
        for ((x, g), dx) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let inv = 1.0 / (kernels::sum_sq_centered(x, 0.0) / d as f32 + eps).sqrt();
            let c = inv * inv * inv * (kernels::dot3(g, w, x) / d as f32);
            for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                *dx = inv * (g * w) - x * c;
            }
        }
    }
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous_f32(storage, layout, self.name())?;
        let mut y = vec![0f32; x.len()];
        kernels::with_f32(&self.weight, self.name(), |w| {
            let d = w.len();
            kernels::par_rows(&mut y, d, d, |r0, y| {
                rms_fwd_rows(&x[r0 * d..r0 * d + y.len()], w, self.eps, y)
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        rows_bwd(
            self.name(),
            arg,
            grad_res,
            &self.weight,
            self.eps,
            2,
            rms_bwd_rows,
        )
    }
}

struct LayerNormOp {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

/// Row mean and `1/sqrt(var + eps)` (biased variance, two passes as the composite).
#[inline(always)]
fn ln_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = kernels::sum(x) / d;
    let var = kernels::sum_sq_centered(x, mean) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

multiversion! {
    /// `y = (x − mean)·inv·w + b` per row.
    fn ln_fwd_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
        let d = w.len();
        for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (mean, inv) = ln_stats(x, eps);
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mean) * inv * w + b;
            }
        }
    }
}

multiversion! {
    /// `dx = inv·(gw − mean(gw) − x̂·mean(gw·x̂))` per row, `gw = g·w`, `x̂ = (x − mean)·inv`.
    fn ln_bwd_rows(x: &[f32], g: &[f32], w: &[f32], eps: f32, dx: &mut [f32]) {
        let d = w.len();
        for ((x, g), dx) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let (mean, inv) = ln_stats(x, eps);
            let mean_gw = kernels::dot(g, w) / d as f32;
            let mean_gwxh = inv * (kernels::dot3_centered(g, w, x, mean) / d as f32);
            for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                let xh = (x - mean) * inv;
                *dx = inv * (g * w - mean_gw - xh * mean_gwxh);
            }
        }
    }
}

impl CustomOp1 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous_f32(storage, layout, self.name())?;
        let mut y = vec![0f32; x.len()];
        kernels::with_f32s([&self.weight, &self.bias], self.name(), |[w, b]| {
            let d = w.len();
            kernels::par_rows(&mut y, d, 2 * d, |r0, y| {
                ln_fwd_rows(&x[r0 * d..r0 * d + y.len()], w, b, self.eps, y)
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        rows_bwd(
            self.name(),
            arg,
            grad_res,
            &self.weight,
            self.eps,
            3,
            ln_bwd_rows,
        )
    }
}

/// Spreads rows of `d` over threads like [`kernels::par_rows`] and calls `f(span, a + b, out)`
/// for each chunk: the chunk's element range, its rows of `a + b` in a scratch buffer, and its
/// rows of `out`.
fn par_row_sums(
    a: &[f32],
    b: &[f32],
    d: usize,
    out: &mut [f32],
    passes: usize,
    f: impl Fn(std::ops::Range<usize>, &[f32], &mut [f32]) + Sync,
) {
    kernels::par_rows(out, d, passes * d, |r0, out| {
        let span = r0 * d..r0 * d + out.len();
        let sum: Vec<f32> = a[span.clone()]
            .iter()
            .zip(&b[span.clone()])
            .map(|(a, b)| a + b)
            .collect();
        f(span, &sum, out)
    });
}

/// [`add_layer_norm`]'s op: the LayerNorm's constants, two inputs.
struct AddLayerNormOp(LayerNormOp);

impl CustomOp2 for AddLayerNormOp {
    fn name(&self) -> &'static str {
        "fused-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = kernels::contiguous_f32(s1, l1, self.name())?;
        let b = kernels::contiguous_f32(s2, l2, self.name())?;
        let mut y = vec![0f32; a.len()];
        kernels::with_f32s([&self.0.weight, &self.0.bias], self.name(), |[w, bias]| {
            par_row_sums(a, b, w.len(), &mut y, 3, |_, x, y| {
                ln_fwd_rows(x, w, bias, self.0.eps, y)
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.contiguous()?;
        let mut dx = vec![0f32; a.elem_count()];
        kernels::with_f32s([a, b, &g, &self.0.weight], self.name(), |[a, b, g, w]| {
            par_row_sums(a, b, w.len(), &mut dx, 4, |span, x, dx| {
                ln_bwd_rows(x, &g[span], w, self.0.eps, dx)
            });
            Ok(())
        })?;
        // d(a + b)/da = d(a + b)/db = 1: both inputs get the same gradient.
        let dx = Tensor::from_vec(dx, a.shape(), a.device())?;
        Ok((a.track_op().then(|| dx.clone()), b.track_op().then_some(dx)))
    }
}

/// A norm's backward over rows: `(x, dy, weight, eps, dx)`.
type RowBwdKernel = fn(&[f32], &[f32], &[f32], f32, &mut [f32]);

/// The input gradient of a row-wise norm: `kernel(x, dy, weight, eps, dx)` over rows of
/// `weight.len()`, spread over threads (`passes`: the kernel's passes over a row, for chunking).
fn rows_bwd(
    name: &str,
    arg: &Tensor,
    grad_res: &Tensor,
    weight: &Tensor,
    eps: f32,
    passes: usize,
    kernel: RowBwdKernel,
) -> Result<Option<Tensor>> {
    let g = grad_res.contiguous()?;
    let mut dx = vec![0f32; arg.elem_count()];
    kernels::with_f32s([arg, &g, weight], name, |[x, g, w]| {
        let d = w.len();
        kernels::par_rows(&mut dx, d, passes * d, |r0, dx| {
            let s = r0 * d..r0 * d + dx.len();
            kernel(&x[s.clone()], &g[s], w, eps, dx)
        });
        Ok(())
    })?;
    Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
}
