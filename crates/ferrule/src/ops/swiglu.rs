//! The SwiGLU gate of Llama-family MLPs, `silu(g) ⊙ u` with `silu(g) = g·σ(g)` (Shazeer 2020,
//! eq. 6), fused on the CPU.
//!
//! As composite candle ops it is a `silu` (libm `expf` per element) and a `mul`; the graph
//! keeps `silu(g)` alive and the backward runs five element-wise passes plus a zero-filled
//! buffer and an add for each of the three gradients it accumulates. This op keeps only its
//! two inputs, and its backward is one pass:
//! `du = dy·silu(g)`, `dg = dy·u·σ(g)·(1 + g·(1 − σ(g)))`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::kernels::{self, multiversion};

/// `silu(gate) ⊙ up`: fused on the CPU in f32 (same shapes), composite elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if kernels::fused_ok(gate) && kernels::fused_ok(up) && gate.dims() == up.dims() {
        return gate
            .contiguous()?
            .apply_op2_arc(&up.contiguous()?, Arc::new(Box::new(SwiGlu)));
    }
    swiglu_reference(gate, up)
}

/// Composite `silu(gate) ⊙ up` (other devices and dtypes; test reference).
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + kernels::exp(-x))
}

/// `silu(g)·u`.
#[inline(always)]
pub(super) fn swiglu_value(g: f32, u: f32) -> f32 {
    g * sigmoid(g) * u
}

/// `(dg, du)` for the output gradient `dy`.
#[inline(always)]
pub(super) fn swiglu_grads(g: f32, u: f32, dy: f32) -> (f32, f32) {
    let s = sigmoid(g);
    (dy * u * s * (1.0 + g * (1.0 - s)), dy * g * s)
}

multiversion! {
    fn swiglu_fwd(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = swiglu_value(g, u);
        }
    }
}

multiversion! {
    fn swiglu_bwd(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            (*dg, *du) = swiglu_grads(g, u, dy);
        }
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = kernels::contiguous_f32(s1, l1, self.name())?;
        let u = kernels::contiguous_f32(s2, l2, self.name())?;
        let mut y = vec![0f32; g.len()];
        kernels::par_rows(&mut y, 1, 16, |r0, out| {
            let r = r0..r0 + out.len();
            swiglu_fwd(&g[r.clone()], &u[r], out)
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad_res.contiguous()?;
        let n = gate.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        kernels::with_f32s([gate, up, &dy], self.name(), |[g, u, dy]| {
            const CHUNK: usize = 16 * 1024;
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(i, (dg, du))| {
                    let r = i * CHUNK..i * CHUNK + dg.len();
                    swiglu_bwd(&g[r.clone()], &u[r.clone()], &dy[r], dg, du)
                });
            Ok(())
        })?;
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), dev)?),
            Some(Tensor::from_vec(du, up.shape(), dev)?),
        ))
    }
}
