//! DoRA (Liu et al. 2024, eq. 5): the LoRA-updated weight `W₀ + s·B A` split into a direction,
//! normalised per output row, and a trainable magnitude `m: [out]`:
//!
//! `y = (m / ‖W₀ + s·B A‖_row) ⊙ (x W₀ᵀ + s·(x Aᵀ) Bᵀ) + b`.
//!
//! As in peft (`tuners/lora/dora.py`, `DoraLinearLayer.forward`, after §4.3 of the paper) the
//! row norm `n = ‖W₀ + s·B A‖_row` is treated as a constant in the backward pass, so
//! `c = m / n` is a per-column scale of the LoRA output. With LoRA dropout peft applies the
//! DoRA part to the dropped input `u` only:
//!
//! `y = x W₀ᵀ + b + (c − 1) ⊙ (u W₀ᵀ) + c ⊙ s·(u Aᵀ) Bᵀ = (x − u) W₀ᵀ + b + c ⊙ (u W₀ᵀ + s·(u Aᵀ) Bᵀ)`,
//!
//! computed here in that second form: one frozen GEMM for `x − u` instead of peft's two.
//!
//! The fused op runs the LoRA kernel of `ops::low_rank` and scales its output; its backward is
//! LoRA's applied to `dy ⊙ c`, plus `dm_i = Σ_t dy_ti (y_ti − b_i) / m_i` (from
//! `∂y_ti/∂m_i = z_ti / n_i` and `z_ti = (y_ti − b_i)·n_i / m_i`), so it keeps nothing beyond
//! LoRA's `x`. peft's DoRA instead materialises `W₀ + s·B A` (an identity-matrix pass through
//! both factors) and keeps the unscaled outputs for autograd, which is why it runs at about 2x
//! LoRA's step time.
//!
//! The norm itself costs one `[r, in] × [in, out]` frozen product per call:
//! `n_i² = ‖W₀_i‖² + 2s·Σ_k B_ik (W₀ Aᵀ)_ik + s²·(B (A Aᵀ) Bᵀ)_ii`, with `‖W₀_i‖²` computed once
//! ([`row_sq_norms`]) and no dense copy of a quantized `W₀`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use super::frozen_linear::{add_input_grad, add_product, for_each_tile_f32, FrozenWeight};
use super::kernels;
use super::low_rank::{low_rank_linear_reference, LowRankLinear};
use super::FrozenLinear;

/// `‖W₀_i‖²` per output row, `[out]`, walking a quantized weight tile by tile.
pub fn row_sq_norms(weight: &FrozenWeight, device: &Device) -> Result<Tensor> {
    let (rows, cols) = weight.dims();
    let mut out = vec![0f32; rows];
    for_each_tile_f32(weight, |r0, r1, tile| {
        out[r0..r1]
            .par_iter_mut()
            .zip(tile.par_chunks(cols.max(1)))
            .for_each(|(o, row)| *o = row.iter().map(|v| v * v).sum());
    })?;
    Tensor::from_vec(out, rows, device)
}

/// `n = ‖W₀ + s·B A‖_row`, `[out]`, detached from `a: [r, in]` and `b: [out, r]` (peft's
/// `get_weight_norm` followed by `.detach()`). `base` must carry no bias; `w0_sq` is
/// [`row_sq_norms`] of its weight.
pub fn weight_norm(
    base: &FrozenLinear,
    w0_sq: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (a, b) = (a.detach(), b.detach());
    // A W₀ᵀ: [r, out], the frozen op applied to A's rows.
    let p = base.forward(&a)?;
    let cross = b.mul(&p.t()?)?.sum(1)?;
    let quad = b.matmul(&a.matmul(&a.t()?)?)?.mul(&b)?.sum(1)?;
    let sq = ((w0_sq + (cross * (2.0 * scale))?)? + (quad * (scale * scale))?)?;
    sq.relu()?.sqrt()
}

/// DoRA's linear layer (module docs). `x: [.., in]`; `update_mask` is LoRA dropout's mask on
/// `x` (`u = x ⊙ mask`); `base` has no bias and `bias: [out]` is the frozen base bias;
/// `norm: [out]` is [`weight_norm`]; `magnitude: [out]`. Fused on the CPU in f32, composite
/// otherwise.
#[allow(clippy::too_many_arguments)]
pub fn dora_linear(
    x: &Tensor,
    update_mask: Option<&Tensor>,
    base: &FrozenLinear,
    bias: Option<&Tensor>,
    norm: &Tensor,
    a: &Tensor,
    b: &Tensor,
    magnitude: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let mask_ok = update_mask.is_none_or(|m| kernels::fused_ok(m) && m.dims() == x.dims());
    let ok = mask_ok
        && base.fused_ok(x)
        && [a, b, magnitude, norm].iter().all(|t| kernels::fused_ok(t))
        && bias.is_none_or(|b| b.device().is_cpu());
    if !ok {
        return dora_linear_reference(x, update_mask, base, bias, norm, a, b, magnitude, scale);
    }
    let out_f = magnitude.elem_count();
    // B and m travel as one input [out, r + 1] (a CustomOp takes three); cat's backward splits the gradient.
    let bm = Tensor::cat(&[b, &magnitude.reshape((out_f, 1))?], 1)?;
    let op = DoraLinear {
        lora: LowRankLinear::new(base, None, scale),
        mask: update_mask.map(|m| m.contiguous()).transpose()?,
        bias: bias.cloned(),
        norm: norm.flatten_all()?.to_vec1()?,
        z: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3_arc(&a.contiguous()?, &bm, Arc::new(Box::new(op)))
}

/// The same from candle's differentiable ops (other devices and dtypes; test reference).
#[allow(clippy::too_many_arguments)]
pub fn dora_linear_reference(
    x: &Tensor,
    update_mask: Option<&Tensor>,
    base: &FrozenLinear,
    bias: Option<&Tensor>,
    norm: &Tensor,
    a: &Tensor,
    b: &Tensor,
    magnitude: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let c = magnitude.broadcast_div(&norm.detach())?;
    let (u, rest) = match update_mask {
        Some(m) => {
            let u = x.mul(&m.detach())?;
            let rest = x.sub(&u)?;
            (u, Some(rest))
        }
        None => (x.clone(), None),
    };
    let mut y = low_rank_linear_reference(&u, None, base, a, b, scale)?.broadcast_mul(&c)?;
    if let Some(rest) = rest {
        y = (y + base.forward(&rest)?)?;
    }
    match bias {
        Some(bias) => y.broadcast_add(bias),
        None => Ok(y),
    }
}

/// The fused op over `(x, A, [B | m])`.
struct DoraLinear {
    /// LoRA's kernel over the bias-free base, applied to `u`.
    lora: LowRankLinear,
    /// LoRA dropout's mask on `x`.
    mask: Option<Tensor>,
    bias: Option<Tensor>,
    /// `n = ‖W₀ + s·B A‖_row`, a constant of this call.
    norm: Vec<f32>,
    /// `z = u W₀ᵀ + s·(u Aᵀ) Bᵀ`, kept under dropout only (without dropout the backward
    /// recovers it from the output: `z = (y − b)·n / m`).
    z: Mutex<Option<Vec<f32>>>,
}

impl DoraLinear {
    /// `c = m / n` from the `[out, r + 1]` input's last column, and `r`.
    fn col_scale(&self, bm: &[f32], out_f: usize) -> (Vec<f32>, usize) {
        let cols = bm.len() / out_f.max(1);
        (
            (0..out_f)
                .map(|i| bm[i * cols + cols - 1] / self.norm[i])
                .collect(),
            cols - 1,
        )
    }

    fn bias_values(&self) -> Result<Option<Vec<f32>>> {
        self.bias
            .as_ref()
            .map(|b| b.flatten_all()?.to_vec1::<f32>())
            .transpose()
    }

    /// `(u, x − u)` for `x` under the mask.
    fn split(&self, x: &[f32], mask: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        kernels::with_f32(mask, self.name(), |mask| {
            let u: Vec<f32> = x
                .par_iter()
                .zip(mask.par_iter())
                .map(|(x, m)| x * m)
                .collect();
            let rest = x.par_iter().zip(u.par_iter()).map(|(x, u)| x - u).collect();
            Ok((u, rest))
        })
    }
}

impl CustomOp3 for DoraLinear {
    fn name(&self) -> &'static str {
        "dora-linear"
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
        let bm = kernels::contiguous_f32(s3, l3, self.name())?;
        let (out_f, cols) = l3.shape().dims2()?;
        if out_f != self.norm.len() || cols == 0 {
            candle_core::bail!(
                "dora-linear: [B | m] is {:?}, expected [{}, r + 1]",
                l3.shape().dims(),
                self.norm.len()
            )
        }
        let (c, r) = self.col_scale(bm, out_f);
        let b: Vec<f32> = bm
            .chunks(cols)
            .flat_map(|row| row[..r].iter().copied())
            .collect();
        let b_shape = Shape::from((out_f, r));
        let bias = self.bias_values()?;
        // y = c ⊙ z + (x − u) W₀ᵀ + b, with u = x (no rest) without dropout.
        let (z, rest, shape) = match &self.mask {
            None => {
                let (z, shape) =
                    self.lora
                        .forward_f32(x, l1.shape(), a, l2.shape(), &b, &b_shape)?;
                (z, None, shape)
            }
            Some(mask) => {
                let (u, rest) = self.split(x, mask)?;
                let (z, shape) =
                    self.lora
                        .forward_f32(&u, l1.shape(), a, l2.shape(), &b, &b_shape)?;
                let mut q = vec![0f32; z.len()];
                add_product(self.lora.weight(), &rest, z.len() / out_f.max(1), &mut q)?;
                (z, Some(q), shape)
            }
        };
        let mut y = rest.unwrap_or_else(|| vec![0f32; z.len()]);
        y.par_chunks_mut(out_f)
            .zip(z.par_chunks(out_f))
            .for_each(|(y, z)| {
                for i in 0..out_f {
                    y[i] += z[i] * c[i] + bias.as_ref().map_or(0.0, |b| b[i]);
                }
            });
        if self.mask.is_some() {
            *self.z.lock().unwrap() = Some(z);
        }
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bm: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_f, cols) = bm.dims2()?;
        let bm_v: Vec<f32> = bm.flatten_all()?.to_vec1()?;
        let (c, r) = self.col_scale(&bm_v, out_f);
        let m: Vec<f32> = (0..out_f).map(|i| bm_v[i * cols + r]).collect();
        let dy = grad_res.contiguous()?;
        let stashed = self.z.lock().unwrap().take();
        // z·n_i/m_i per element times dy: `dm_i = Σ_t dy_ti z_ti / n_i`.
        let (dz, dm) = kernels::with_f32s([&dy, &res.contiguous()?], self.name(), |[dy, y]| {
            let dz: Vec<f32> = dy
                .par_chunks(out_f)
                .flat_map_iter(|dy| dy.iter().zip(&c).map(|(dy, c)| dy * c).collect::<Vec<_>>())
                .collect();
            let dm = match &stashed {
                Some(z) => kernels::column_dot(dy, z, out_f)
                    .into_iter()
                    .zip(&self.norm)
                    .map(|(d, n)| d / n)
                    .collect(),
                None => {
                    if let Some(i) = m.iter().position(|v| *v == 0.0 || !v.is_finite()) {
                        candle_core::bail!("dora-linear: magnitude of output row {i} is {}; DoRA needs a finite, non-zero magnitude", m[i])
                    }
                    let bias = self.bias_values()?;
                    let centered: Vec<f32> = match &bias {
                        Some(b) => y
                            .par_chunks(out_f)
                            .flat_map_iter(|y| {
                                y.iter().zip(b).map(|(y, b)| y - b).collect::<Vec<_>>()
                            })
                            .collect(),
                        None => y.to_vec(),
                    };
                    kernels::column_dot(dy, &centered, out_f)
                        .into_iter()
                        .zip(&m)
                        .map(|(d, m)| d / m)
                        .collect()
                }
            };
            Ok((dz, dm))
        })?;
        let dev = x.device();
        let b = bm.narrow(1, 0, r)?.contiguous()?;
        let dz = Tensor::from_vec(dz, dy.shape(), dev)?;
        let need_dx = x.track_op();
        let (dx, da, db) = match &self.mask {
            None => self.lora.backward(x, a, &b, &dz, need_dx)?,
            Some(mask) => {
                let (u, _) =
                    kernels::with_f32(&x.contiguous()?, self.name(), |x| self.split(x, mask))?;
                let u = Tensor::from_vec(u, x.shape(), dev)?;
                let (du, da, db) = self.lora.backward(&u, a, &b, &dz, need_dx)?;
                let dx = match du {
                    Some(du) => Some(self.masked_input_grad(&du, &dy, mask)?),
                    None => None,
                };
                (dx, da, db)
            }
        };
        let dbm = Tensor::cat(&[&db, &Tensor::from_vec(dm, (out_f, 1), dev)?], 1)?;
        Ok((dx, Some(da), Some(dbm)))
    }
}

impl DoraLinear {
    /// `dx = du ⊙ mask + (dy W₀) ⊙ (1 − mask)`: `u = x ⊙ mask` feeds the DoRA part and
    /// `x − u = x ⊙ (1 − mask)` the plain frozen one.
    fn masked_input_grad(&self, du: &Tensor, dy: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let in_f = du.dims().last().copied().unwrap_or(0);
        let rows = du.elem_count() / in_f.max(1);
        let mut dx = vec![0f32; du.elem_count()];
        kernels::with_f32s([dy, du, mask], self.name(), |[dy, du, mask]| {
            add_input_grad(self.lora.weight(), dy, rows, &mut dx)?;
            dx.par_iter_mut()
                .zip(du.par_iter().zip(mask.par_iter()))
                .for_each(|(dx, (du, m))| *dx = *dx * (1.0 - m) + du * m);
            Ok(())
        })?;
        Tensor::from_vec(dx, du.shape(), du.device())
    }
}
