//! `y = x Wᵀ (+ b)` for a weight that is never trained.
//!
//! candle's matmul backward always computes the weight gradient (DESIGN.md, fix 3), which for
//! a frozen base is a full wasted GEMM per layer and a weight-sized buffer. This custom op
//! runs the forward GEMM itself (gemm crate, AVX-512 kernels) and its backward returns only
//! `dX = dY W`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Storage, Tensor};
use gemm::Parallelism;

/// A frozen linear layer: weight `[out, in]` (HF layout), optional bias `[out]`.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = weight.detach().contiguous()?;
        let bias = bias.map(|b| b.detach());
        Ok(Self { weight, bias })
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    pub fn in_features(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }
    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            x.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(FrozenMatmul { weight: self.weight.clone() })))?
        } else {
            // Other devices/dtypes: candle's matmul (its backward also computes an unused dW).
            let w = self.weight.to_dtype(x.dtype())?;
            match x.dims() {
                [b, t, i] => x.reshape((b * t, *i))?.matmul(&w.t()?)?.reshape((*b, *t, ()))?,
                _ => x.matmul(&w.t()?)?,
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

struct FrozenMatmul {
    weight: Tensor,
}

fn parallelism() -> Parallelism {
    let n = candle_core::utils::get_num_threads();
    if n > 1 {
        Parallelism::Rayon(n)
    } else {
        Parallelism::None
    }
}

/// `dst[m, n] = lhs[m, k] · W-view`, where the W view is `Wᵀ` (`transpose_w`) or `W`.
fn gemm_f32(lhs: &[f32], m: usize, k: usize, w: &[f32], w_rows: usize, w_cols: usize, transpose_w: bool) -> Vec<f32> {
    let n = if transpose_w { w_rows } else { w_cols };
    let mut dst = vec![0f32; m * n];
    // rhs element (kk, j): Wᵀ → W[j, kk] (row stride 1, col stride w_cols); W → W[kk, j].
    let (rhs_cs, rhs_rs) = if transpose_w { (w_cols as isize, 1) } else { (1, w_cols as isize) };
    // SAFETY: all pointers point to buffers of the sizes the strides describe.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr(), 1, n as isize, false,
            lhs.as_ptr(), 1, k as isize,
            w.as_ptr(), rhs_cs, rhs_rs,
            0f32, 1f32, false, false, false,
            parallelism(),
        );
    }
    dst
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let k = *dims.last().ok_or_else(|| candle_core::Error::Msg("frozen-linear: scalar input".into()))?;
        let (out_f, in_f) = self.weight.dims2()?;
        if k != in_f {
            candle_core::bail!("frozen-linear: input has {k} features, weight expects {in_f}")
        }
        let m = layout.shape().elem_count() / k;
        let x = storage.as_slice::<f32>()?;
        let x = match layout.contiguous_offsets() {
            Some((a, b)) => &x[a..b],
            None => candle_core::bail!("frozen-linear: input must be contiguous"),
        };
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let w = match &*w_storage {
            Storage::Cpu(s) => s.as_slice::<f32>()?,
            _ => candle_core::bail!("frozen-linear: weight not on cpu"),
        };
        let (wa, wb) = w_layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("frozen-linear: weight not contiguous".into()))?;
        let y = gemm_f32(x, m, k, &w[wa..wb], out_f, in_f, true);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // dX = dY · W ; no dW: the weight is frozen.
        let g = grad_res.contiguous()?;
        let dims = g.dims().to_vec();
        let (out_f, in_f) = self.weight.dims2()?;
        let m = g.elem_count() / out_f;
        // Read dY in place (it is contiguous) instead of copying it into a Vec.
        let (g_storage, g_layout) = g.storage_and_layout();
        let gs = match &*g_storage {
            Storage::Cpu(s) => s.as_slice::<f32>()?,
            _ => candle_core::bail!("frozen-linear: gradient not on cpu"),
        };
        let (ga, gb) = g_layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("frozen-linear: gradient not contiguous".into()))?;
        let gs = &gs[ga..gb];
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let w = match &*w_storage {
            Storage::Cpu(s) => s.as_slice::<f32>()?,
            _ => candle_core::bail!("frozen-linear: weight not on cpu"),
        };
        let (wa, wb) = w_layout.contiguous_offsets().unwrap_or((0, out_f * in_f));
        let dx = gemm_f32(gs, m, out_f, &w[wa..wb], out_f, in_f, false);
        let mut in_dims = dims;
        *in_dims.last_mut().unwrap() = in_f;
        Ok(Some(Tensor::from_vec(dx, in_dims, grad_res.device())?))
    }
}
