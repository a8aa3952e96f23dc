//! A frozen linear layer with a trainable scale vector `l` (IA3, Liu et al. 2022, §3.3; peft
//! `tuners/ia3/layer.py`, `Linear.forward`), as one CPU custom op:
//!
//! - output side: `y = (x W₀ᵀ + b) ⊙ l`, `l: [out]` (the bias is scaled too, as in peft);
//!   backward `dl = Σ_t z_t ⊙ dy_t` with `z = x W₀ᵀ + b` kept from the forward, and
//!   `dx = (dy ⊙ l) W₀`;
//! - input side (feed-forward modules): `y = (x ⊙ l) W₀ᵀ + b`, `l: [in]`; backward
//!   `d = dy W₀`, `dl = Σ_t x_t ⊙ d_t`, `dx = d ⊙ l`, with nothing kept beyond `x`.
//!
//! As composite ops (a broadcast multiply beside the frozen op) each side materialises the
//! scaled tensor, a broadcast copy of `l` and zero-filled gradient buffers per edge; measured on
//! MiniLM IA3 that was about a quarter of the step (perf: candle's unary/binary maps, page
//! zeroing).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use super::frozen_linear::{add_bias, add_input_grad, add_product, FrozenWeight};
use super::kernels;
use super::FrozenLinear;

/// `base(x) ⊙ l` (`input_side = false`, `l: [out]`) or `base(x ⊙ l)` (`l: [in]`), `x: [.., in]`.
/// `l` may have any shape with that many elements (peft stores `[out, 1]` / `[1, in]`).
/// Fused on the CPU in f32, composite otherwise.
pub fn scaled_linear(
    x: &Tensor,
    base: &FrozenLinear,
    l: &Tensor,
    input_side: bool,
) -> Result<Tensor> {
    let l = l.flatten_all()?;
    let want = if input_side {
        base.in_features()
    } else {
        base.out_features()
    };
    if l.elem_count() != want {
        candle_core::bail!(
            "scaled-linear: scale has {} values, the layer needs {want}",
            l.elem_count()
        )
    }
    if base.fused_ok(x) && kernels::fused_ok(&l) {
        let keep = l.track_op();
        let op = ScaledLinear {
            weight: base.weight().clone(),
            bias: base.bias().cloned(),
            input_side,
            keep,
            z: Mutex::new(None),
        };
        return x
            .contiguous()?
            .apply_op2_arc(&l.contiguous()?, Arc::new(Box::new(op)));
    }
    scaled_linear_reference(x, base, &l, input_side)
}

/// The same from candle's differentiable ops (other devices and dtypes; test reference).
pub fn scaled_linear_reference(
    x: &Tensor,
    base: &FrozenLinear,
    l: &Tensor,
    input_side: bool,
) -> Result<Tensor> {
    let l = l.flatten_all()?;
    if input_side {
        base.forward(&x.broadcast_mul(&l)?)
    } else {
        base.forward(x)?.broadcast_mul(&l)
    }
}

struct ScaledLinear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    input_side: bool,
    /// Whether a backward can ask for `dl` (the scale is tracked): only then is `z` kept.
    keep: bool,
    /// Output side: `z = x W₀ᵀ + b`, for `dl`.
    z: Mutex<Option<Vec<f32>>>,
}

/// `rows ← rows ⊙ l`, row by row.
fn scale_rows(rows: &mut [f32], l: &[f32]) {
    rows.par_chunks_mut(l.len().max(1))
        .for_each(|row| row.iter_mut().zip(l).for_each(|(v, s)| *v *= s));
}

impl CustomOp2 for ScaledLinear {
    fn name(&self) -> &'static str {
        "scaled-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous_f32(s1, l1, self.name())?;
        let l = kernels::contiguous_f32(s2, l2, self.name())?;
        let (out_f, in_f) = self.weight.dims();
        let k = l1.shape().dims().last().copied().unwrap_or(0);
        if k != in_f {
            candle_core::bail!("scaled-linear: input has {k} features, the weight expects {in_f}")
        }
        let scaled = if self.input_side { in_f } else { out_f };
        if l.len() != scaled {
            candle_core::bail!(
                "scaled-linear: the scale has {} elements, the {} side has {scaled}",
                l.len(),
                if self.input_side { "input" } else { "output" }
            )
        }
        let m = x.len() / in_f.max(1);
        let mut y = vec![0f32; m * out_f];
        if self.input_side {
            let mut u = x.to_vec();
            scale_rows(&mut u, l);
            add_product(&self.weight, &u, m, &mut y)?;
            add_bias(self.bias.as_ref(), &mut y, out_f)?;
        } else {
            add_product(&self.weight, x, m, &mut y)?;
            add_bias(self.bias.as_ref(), &mut y, out_f)?;
            if self.keep {
                *self.z.lock().unwrap() = Some(y.clone());
            }
            scale_rows(&mut y, l);
        }
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        l: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, in_f) = self.weight.dims();
        let m = x.elem_count() / in_f.max(1);
        let lv: Vec<f32> = l.to_vec1()?;
        let dy = grad_res.contiguous()?;
        let need_dx = x.track_op();
        let (dx, dl) = kernels::with_f32s([&x.contiguous()?, &dy], self.name(), |[x, dy]| {
            if self.input_side {
                let mut d = vec![0f32; m * in_f];
                add_input_grad(&self.weight, dy, m, &mut d)?;
                let dl = kernels::column_dot(x, &d, in_f);
                scale_rows(&mut d, &lv);
                Ok((d, dl))
            } else {
                let z = match self.z.lock().unwrap().take() {
                    Some(z) => z,
                    // Taken by an earlier backward over the same graph: recompute.
                    None => {
                        let mut z = vec![0f32; dy.len()];
                        add_product(&self.weight, x, m, &mut z)?;
                        add_bias(self.bias.as_ref(), &mut z, lv.len())?;
                        z
                    }
                };
                let dl = kernels::column_dot(&z, dy, lv.len());
                let mut g = dy.to_vec();
                scale_rows(&mut g, &lv);
                let mut dx = vec![0f32; if need_dx { m * in_f } else { 0 }];
                if need_dx {
                    add_input_grad(&self.weight, &g, m, &mut dx)?;
                }
                Ok((dx, dl))
            }
        })?;
        let dev = x.device();
        let dx = if need_dx {
            Some(Tensor::from_vec(dx, x.shape(), dev)?)
        } else {
            None
        };
        Ok((dx, Some(Tensor::from_vec(dl, l.shape(), dev)?)))
    }
}
