//! A transformer MLP none of whose linears is trained, as one op: `down(act(up(x)))`, with
//! `act` the SwiGLU gate of Llama-family models (`silu(gate(x)) ⊙ up(x)`, Shazeer 2020,
//! eq. 6) or BERT's erf GELU.
//!
//! Built from separate frozen-linear and activation ops, candle's backward zero-fills and adds
//! into a buffer for every edge of the graph (down → activation → gate, up → x, five edges of
//! which three are `[tokens, intermediate]`), and keeps the activation output alive for the
//! down projection. None of it is needed: a frozen linear's input gradient needs only its
//! weight. This op keeps the activation's partial derivatives, written over the
//! pre-activations by the forward pass that evaluates the activation anyway
//! (`∂act/∂gate`, `∂act/∂up` for SwiGLU; `gelu′(h)`), and nothing else. Its backward is
//! `d = dY·W_down`, two multiplications by the kept derivatives, then
//! `dX = d_gate·W_gate + d_up·W_up` summed inside the GEMMs: no `exp` or `erf` again.
//!
//! Quantized weights go through the same tiled kernels as the frozen-linear op.
//!
//! The down projection may read its input scaled by a trainable vector `l: [intermediate]`
//! (IA3 on a feed-forward module, Liu et al. 2022: `down(l ⊙ act)`). The op then takes `l` as
//! a second input, also keeps `act`, and returns `dl = Σ_tokens act ⊙ (dY·W_down)`; the rest of
//! the backward runs on `d ⊙ l`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use super::frozen_linear::{add_bias, add_input_grad, add_product, add_product_of};
use super::gelu::{gelu, gelu_value_and_slope};
use super::kernels::{self, multiversion};
use super::product::Operand;
use super::swiglu::{swiglu, swiglu_grads, swiglu_value};
use super::FrozenLinear;

/// Elements per parallel chunk of the element-wise passes.
const CHUNK: usize = 16 * 1024;

/// `down(silu(gate(x)) ⊙ up(x))`: fused on the CPU in f32, composite elsewhere.
pub fn swiglu_mlp(
    x: &Tensor,
    gate: &FrozenLinear,
    up: &FrozenLinear,
    down: &FrozenLinear,
) -> Result<Tensor> {
    swiglu_mlp_scaled(x, gate, up, down, None)
}

/// `down(gelu(up(x)))` with the erf GELU: fused on the CPU in f32, composite elsewhere.
pub fn gelu_mlp(x: &Tensor, up: &FrozenLinear, down: &FrozenLinear) -> Result<Tensor> {
    gelu_mlp_scaled(x, up, down, None)
}

/// [`swiglu_mlp`] with the down projection's input scaled by `down_scale: [intermediate]`
/// (`down(l ⊙ act)`, IA3 on `down_proj`).
pub fn swiglu_mlp_scaled(
    x: &Tensor,
    gate: &FrozenLinear,
    up: &FrozenLinear,
    down: &FrozenLinear,
    down_scale: Option<&Tensor>,
) -> Result<Tensor> {
    if gate.fused_ok(x)
        && up.fused_ok(x)
        && down.fused_ok(x)
        && gate.out_features() == up.out_features()
        && down_scale.is_none_or(kernels::fused_ok)
    {
        return apply(
            x,
            Activation::SwiGlu { gate: gate.clone() },
            up,
            down,
            down_scale,
        );
    }
    down.forward(&scaled(
        swiglu(&gate.forward(x)?, &up.forward(x)?)?,
        down_scale,
    )?)
}

/// [`gelu_mlp`] with the down projection's input scaled by `down_scale: [intermediate]`
/// (IA3 on BERT's `output.dense`).
pub fn gelu_mlp_scaled(
    x: &Tensor,
    up: &FrozenLinear,
    down: &FrozenLinear,
    down_scale: Option<&Tensor>,
) -> Result<Tensor> {
    if up.fused_ok(x) && down.fused_ok(x) && down_scale.is_none_or(kernels::fused_ok) {
        return apply(x, Activation::Gelu, up, down, down_scale);
    }
    down.forward(&scaled(gelu(&up.forward(x)?)?, down_scale)?)
}

fn scaled(act: Tensor, down_scale: Option<&Tensor>) -> Result<Tensor> {
    match down_scale {
        Some(l) => act.broadcast_mul(&l.flatten_all()?),
        None => Ok(act),
    }
}

fn apply(
    x: &Tensor,
    activation: Activation,
    up: &FrozenLinear,
    down: &FrozenLinear,
    down_scale: Option<&Tensor>,
) -> Result<Tensor> {
    if down.in_features() != up.out_features() {
        candle_core::bail!(
            "frozen MLP: up projection gives {} features, down projection takes {}",
            up.out_features(),
            down.in_features()
        )
    }
    let keep = x.track_op() || down_scale.is_some_and(|l| l.track_op());
    let op = FrozenMlp {
        activation,
        up: up.clone(),
        down: down.clone(),
        keep,
        saved: Mutex::new(None),
        act: Mutex::new(None),
    };
    let x = x.contiguous()?;
    match down_scale {
        None => x.apply_op1_arc(Arc::new(Box::new(op))),
        Some(l) => {
            if l.elem_count() != up.out_features() {
                candle_core::bail!(
                    "frozen MLP: down-input scale has {} values, the MLP has {} features",
                    l.elem_count(),
                    up.out_features()
                )
            }
            x.apply_op2_arc(&l.flatten_all()?.contiguous()?, Arc::new(Box::new(op)))
        }
    }
}

enum Activation {
    SwiGlu { gate: FrozenLinear },
    Gelu,
}

struct FrozenMlp {
    activation: Activation,
    up: FrozenLinear,
    down: FrozenLinear,
    /// Whether a backward can follow (the input is tracked): only then are the derivatives
    /// kept.
    keep: bool,
    /// The activation's partial derivatives at the forward's pre-activations: `[gelu′(h)]`,
    /// or `[∂act/∂gate, ∂act/∂up]` for SwiGLU.
    saved: Mutex<Option<Vec<Vec<f32>>>>,
    /// With a down-input scale: the activation before scaling, for `dl`.
    act: Mutex<Option<Vec<f32>>>,
}

multiversion! {
    /// `y = silu(g)·u`; `g ← ∂y/∂g`, `u ← ∂y/∂u` in place.
    fn swiglu_fwd(g: &mut [f32], u: &mut [f32], y: &mut [f32]) {
        for ((y, g), u) in y.iter_mut().zip(g.iter_mut()).zip(u.iter_mut()) {
            *y = swiglu_value(*g, *u);
            (*g, *u) = swiglu_grads(*g, *u, 1.0);
        }
    }
}

multiversion! {
    /// `y = gelu(h)`; `h ← gelu′(h)` in place.
    fn gelu_fwd(h: &mut [f32], y: &mut [f32]) {
        for (y, h) in y.iter_mut().zip(h.iter_mut()) {
            (*y, *h) = gelu_value_and_slope(*h);
        }
    }
}

multiversion! {
    /// `a ← a·d`, `b ← b·d`.
    fn scale_pair(a: &mut [f32], b: &mut [f32], d: &[f32]) {
        for ((a, b), &d) in a.iter_mut().zip(b.iter_mut()).zip(d) {
            *a *= d;
            *b *= d;
        }
    }
}

multiversion! {
    /// `d ← d·s`.
    fn scale(d: &mut [f32], s: &[f32]) {
        for (d, &s) in d.iter_mut().zip(s) {
            *d *= s;
        }
    }
}

impl FrozenMlp {
    /// `[up(x)]` or `[gate(x), up(x)]`, biases included.
    fn pre_activations(&self, x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        let linears: Vec<&FrozenLinear> = match &self.activation {
            Activation::SwiGlu { gate } => vec![gate, &self.up],
            Activation::Gelu => vec![&self.up],
        };
        // Rounded once for both projections (they share a compute dtype).
        let x = Operand::new(
            &x[..m * self.up.in_features()],
            self.up.weight().compute_dtype(),
        );
        linears
            .into_iter()
            .map(|lin| {
                let mut h = vec![0f32; m * lin.out_features()];
                add_product_of(lin.weight(), &x, m, &mut h)?;
                add_bias(lin.bias(), &mut h, lin.out_features())?;
                Ok(h)
            })
            .collect()
    }
}

/// The activation of the pre-activations `[h]` or `[g, u]`, which are overwritten with its
/// partial derivatives.
fn activate(pre: &mut [Vec<f32>]) -> Vec<f32> {
    let mut act = vec![0f32; pre[0].len()];
    match pre {
        [g, u] => act
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks_mut(CHUNK))
            .zip(u.par_chunks_mut(CHUNK))
            .for_each(|((y, g), u)| swiglu_fwd(g, u, y)),
        [h] => act
            .par_chunks_mut(CHUNK)
            .zip(h.par_chunks_mut(CHUNK))
            .for_each(|(y, h)| gelu_fwd(h, y)),
        _ => unreachable!("one or two pre-activations"),
    }
    act
}

impl FrozenMlp {
    /// `y` for contiguous `x: [.., in]`, the down input scaled by `l` when given.
    fn forward(
        &self,
        x: &[f32],
        layout: &Layout,
        l: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let k = dims.last().copied().unwrap_or(0);
        if k != self.up.in_features() {
            candle_core::bail!(
                "frozen MLP: input has {k} features, the up projection expects {}",
                self.up.in_features()
            )
        }
        let m = layout.shape().elem_count() / k.max(1);
        let mut slopes = self.pre_activations(x, m)?;
        let mut act = activate(&mut slopes);
        if let Some(l) = l {
            if self.keep {
                *self.act.lock().unwrap() = Some(act.clone());
            }
            act.par_chunks_mut(l.len()).for_each(|row| scale(row, l));
        }
        let out_f = self.down.out_features();
        let mut y = vec![0f32; m * out_f];
        add_product(self.down.weight(), &act, m, &mut y)?;
        add_bias(self.down.bias(), &mut y, out_f)?;
        if self.keep {
            *self.saved.lock().unwrap() = Some(slopes);
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    /// `(dx, dl)`: `dl` only with a down-input scale `l`.
    fn backward(
        &self,
        arg: &Tensor,
        l: Option<&Tensor>,
        grad_res: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let in_f = self.up.in_features();
        let inter = self.up.out_features();
        let m = arg.elem_count() / in_f.max(1);
        let (saved, act) = (
            self.saved.lock().unwrap().take(),
            self.act.lock().unwrap().take(),
        );
        let (mut slopes, act) = match saved {
            Some(s) if l.is_none() || act.is_some() => (s, act),
            // Taken by an earlier backward over the same graph: recompute.
            _ => {
                let mut s = kernels::with_f32(&arg.contiguous()?, "frozen-mlp", |x| {
                    self.pre_activations(x, m)
                })?;
                let act = activate(&mut s);
                (s, Some(act))
            }
        };
        let dy = grad_res.contiguous()?;
        let mut d = vec![0f32; m * inter];
        kernels::with_f32(&dy, "frozen-mlp", |dy| {
            add_input_grad(self.down.weight(), dy, m, &mut d)
        })?;
        let dl = match l {
            None => None,
            Some(l) => {
                let act = act.expect("activation kept or recomputed with a scale");
                let lv: Vec<f32> = l.to_vec1()?;
                let dl = kernels::column_dot(&act, &d, inter);
                d.par_chunks_mut(inter).for_each(|row| scale(row, &lv));
                Some(Tensor::from_vec(dl, l.shape(), l.device())?)
            }
        };
        let mut dx = vec![0f32; m * in_f];
        match (&self.activation, slopes.as_mut_slice()) {
            (Activation::SwiGlu { gate }, [dg, du]) => {
                dg.par_chunks_mut(CHUNK)
                    .zip(du.par_chunks_mut(CHUNK))
                    .zip(d.par_chunks(CHUNK))
                    .for_each(|((dg, du), d)| scale_pair(dg, du, d));
                add_input_grad(gate.weight(), dg, m, &mut dx)?;
                add_input_grad(self.up.weight(), du, m, &mut dx)?;
            }
            (Activation::Gelu, [s]) => {
                d.par_chunks_mut(CHUNK)
                    .zip(s.par_chunks(CHUNK))
                    .for_each(|(d, s)| scale(d, s));
                add_input_grad(self.up.weight(), &d, m, &mut dx)?;
            }
            _ => unreachable!("kept derivatives match the activation"),
        }
        Ok((Tensor::from_vec(dx, arg.shape(), arg.device())?, dl))
    }
}

impl CustomOp1 for FrozenMlp {
    fn name(&self) -> &'static str {
        "frozen-mlp"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(
            kernels::contiguous_f32(storage, layout, "frozen-mlp")?,
            layout,
            None,
        )
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(arg, None, grad_res)?.0))
    }
}

impl CustomOp2 for FrozenMlp {
    fn name(&self) -> &'static str {
        "frozen-mlp-scaled"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let l = kernels::contiguous_f32(s2, l2, "frozen-mlp-scaled")?;
        self.forward(
            kernels::contiguous_f32(s1, l1, "frozen-mlp-scaled")?,
            l1,
            Some(l),
        )
    }

    fn bwd(
        &self,
        arg: &Tensor,
        l: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dl) = self.backward(arg, Some(l), grad_res)?;
        Ok((arg.track_op().then_some(dx), dl))
    }
}
