//! `y = x W₀ᵀ (+ b) + s · (x Aᵀ) Bᵀ`: a frozen linear layer plus a trainable low-rank update
//! (LoRA, Hu et al. 2021, eq. 3), as one CPU custom op.
//!
//! As composite ops the update is two matmuls, a scale and an add beside the frozen op: the
//! graph keeps `(x Aᵀ) Bᵀ`, its scaled copy, the frozen output and their sum (four `[m, out]`
//! tensors per adapted layer), and the backward fills and accumulates a gradient buffer for
//! each, and a second one for `x`. The fused op keeps only `x`. Its backward recomputes
//! `h = x Aᵀ` (`r` columns, cheap) and forms
//!
//! `dB = s · dyᵀ h`, `dh = s · dy B`, `dA = dhᵀ x`, `dx = dy W₀ + dh A`.
//!
//! With LoRA dropout the update reads `u = x ⊙ mask` (the captured inverted-dropout mask), so
//! `h = u Aᵀ`, `dA = dhᵀ u` and the update's part of `dx` is `(dh A) ⊙ mask`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use super::frozen_linear::{add_bias, add_input_grad, add_product, FrozenWeight};
use super::kernels::{self, matmul_par, Mat};
use super::FrozenLinear;

/// `base(x) + scale · (u Aᵀ) Bᵀ` with `u = x ⊙ update_mask` (LoRA dropout) or `u = x`;
/// `a: [r, in]`, `b: [out, r]`. Fused on the CPU in f32; composite otherwise.
pub fn low_rank_linear(
    x: &Tensor,
    update_mask: Option<&Tensor>,
    base: &FrozenLinear,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let mask_ok = update_mask.is_none_or(|m| kernels::fused_ok(m) && m.dims() == x.dims());
    if mask_ok && base.fused_ok(x) && kernels::fused_ok(a) && kernels::fused_ok(b) {
        let update_mask = update_mask.map(|m| m.contiguous()).transpose()?;
        let op = LowRankLinear::new(base, update_mask, scale);
        return x.contiguous()?.apply_op3_arc(
            &a.contiguous()?,
            &b.contiguous()?,
            Arc::new(Box::new(op)),
        );
    }
    low_rank_linear_reference(x, update_mask, base, a, b, scale)
}

/// The same from candle's differentiable ops (other devices and dtypes; test reference).
pub fn low_rank_linear_reference(
    x: &Tensor,
    update_mask: Option<&Tensor>,
    base: &FrozenLinear,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let y = base.forward(x)?;
    let u = match update_mask {
        Some(m) => x.mul(&m.detach())?,
        None => x.clone(),
    };
    let dims = u.dims().to_vec();
    let in_f = *dims.last().unwrap_or(&0);
    let update = (u.reshape(((), in_f))?.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?;
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = update.dim(1)?;
    y + update.reshape(out_dims)?
}

/// Elements per parallel chunk of the element-wise dropout passes.
const CHUNK: usize = 16 * 1024;

/// The fused op over `(x, A, B)`; the frozen weight and bias are captured. DoRA
/// (`ops::dora`) runs its forward and backward inside its own op.
pub(crate) struct LowRankLinear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    /// The dropout mask on the update's input, shaped like `x`.
    update_mask: Option<Tensor>,
    scale: f32,
}

impl LowRankLinear {
    pub(crate) fn new(base: &FrozenLinear, update_mask: Option<Tensor>, scale: f64) -> Self {
        Self {
            weight: base.weight().clone(),
            bias: base.bias().cloned(),
            update_mask,
            scale: scale as f32,
        }
    }

    pub(crate) fn weight(&self) -> &FrozenWeight {
        &self.weight
    }

    /// Calls `f` with the update's input: `x`, or `x ⊙ mask` (a new buffer) under dropout.
    fn with_update_input<R>(&self, x: &[f32], f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        match &self.update_mask {
            None => f(x),
            Some(m) => kernels::with_f32(m, "low-rank-linear", |m| {
                let mut u = vec![0f32; x.len()];
                u.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK).zip(m.par_chunks(CHUNK)))
                    .for_each(|(u, (x, m))| {
                        u.iter_mut()
                            .zip(x)
                            .zip(m)
                            .for_each(|((u, x), m)| *u = x * m)
                    });
                f(&u)
            }),
        }
    }

    /// `(m, in, out, r)` for `x: [.., in]` and `a: [r, in]`.
    fn dims(&self, x: &Shape, a: &Shape) -> Result<(usize, usize, usize, usize)> {
        let (out_f, in_f) = self.weight.dims();
        let (r, a_in) = a.dims2()?;
        let k = *x.dims().last().unwrap_or(&0);
        if k != in_f || a_in != in_f {
            candle_core::bail!(
                "low-rank-linear: input has {k} features and A {a_in}, the weight expects {in_f}"
            )
        }
        Ok((x.elem_count() / in_f.max(1), in_f, out_f, r))
    }
}

impl CustomOp3 for LowRankLinear {
    fn name(&self) -> &'static str {
        "low-rank-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous_f32(s1, l1, self.name())?;
        let a = kernels::contiguous_f32(s2, l2, self.name())?;
        let b = kernels::contiguous_f32(s3, l3, self.name())?;
        let (y, shape) = self.forward_f32(x, l1.shape(), a, l2.shape(), b, l3.shape())?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, db) = self.backward(x, a, b, grad_res, x.track_op())?;
        Ok((dx, Some(da), Some(db)))
    }
}

impl LowRankLinear {
    /// `y = x W₀ᵀ (+ b) + s·(u Aᵀ) Bᵀ` for contiguous f32 `x: [.., in]`, `a: [r, in]`,
    /// `b: [out, r]`; returns `y` and its shape `[.., out]`.
    pub(crate) fn forward_f32(
        &self,
        x: &[f32],
        xs: &Shape,
        a: &[f32],
        as_: &Shape,
        b: &[f32],
        bs: &Shape,
    ) -> Result<(Vec<f32>, Shape)> {
        let (m, in_f, out_f, r) = self.dims(xs, as_)?;
        if bs.dims2()? != (out_f, r) {
            candle_core::bail!(
                "low-rank-linear: B is {:?}, expected [{out_f}, {r}]",
                bs.dims()
            )
        }
        let mut y = vec![0f32; m * out_f];
        add_product(&self.weight, x, m, &mut y)?;
        add_bias(self.bias.as_ref(), &mut y, out_f)?;
        let mut h = vec![0f32; m * r];
        self.with_update_input(x, |u| {
            matmul_par(m, r, in_f, &mut h, false, Mat::n(u), Mat::t(a), 1.0);
            Ok(())
        })?;
        matmul_par(m, out_f, r, &mut y, true, Mat::n(&h), Mat::t(b), self.scale);
        let mut dims = xs.dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((y, Shape::from(dims)))
    }

    /// `(dx, dA, dB)` for the output gradient `grad_res`; `dx` only when `need_dx` (a tracked
    /// `x`: something below it trains).
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad_res: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let (m, in_f, out_f, r) = self.dims(x.shape(), a.shape())?;
        // No dX when nothing below x is trained (the first layer's input): it would be a
        // full frozen GEMM, and candle would store it.
        let dy = grad_res.contiguous()?;
        let mut dx = vec![0f32; if need_dx { m * in_f } else { 0 }];
        let mut da = vec![0f32; r * in_f];
        let mut db = vec![0f32; out_f * r];
        kernels::with_f32s([x, a, b, &dy], self.name(), |[x, a, b, dy]| {
            let mut dh = vec![0f32; m * r];
            matmul_par(
                m,
                r,
                out_f,
                &mut dh,
                false,
                Mat::n(dy),
                Mat::n(b),
                self.scale,
            );
            self.with_update_input(x, |u| {
                let mut h = vec![0f32; m * r];
                matmul_par(m, r, in_f, &mut h, false, Mat::n(u), Mat::t(a), 1.0);
                matmul_par(
                    out_f,
                    r,
                    m,
                    &mut db,
                    false,
                    Mat::t(dy),
                    Mat::n(&h),
                    self.scale,
                );
                matmul_par(r, in_f, m, &mut da, false, Mat::t(&dh), Mat::n(u), 1.0);
                Ok(())
            })?;
            if !need_dx {
                return Ok(());
            }
            add_input_grad(&self.weight, dy, m, &mut dx)?;
            match &self.update_mask {
                // The update's share of dx goes through the mask: dx += (dh A) ⊙ mask.
                Some(mask) => kernels::with_f32(mask, self.name(), |mask| {
                    let mut du = vec![0f32; m * in_f];
                    matmul_par(m, in_f, r, &mut du, false, Mat::n(&dh), Mat::n(a), 1.0);
                    dx.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks(CHUNK).zip(mask.par_chunks(CHUNK)))
                        .for_each(|(dx, (du, m))| {
                            dx.iter_mut()
                                .zip(du)
                                .zip(m)
                                .for_each(|((dx, du), m)| *dx += du * m)
                        });
                    Ok(())
                })?,
                None => matmul_par(m, in_f, r, &mut dx, true, Mat::n(&dh), Mat::n(a), 1.0),
            }
            Ok(())
        })?;
        let dev = x.device();
        let dx = if need_dx {
            Some(Tensor::from_vec(dx, x.shape(), dev)?)
        } else {
            None
        };
        Ok((
            dx,
            Tensor::from_vec(da, a.shape(), dev)?,
            Tensor::from_vec(db, b.shape(), dev)?,
        ))
    }
}
