//! `y = x Q(W₀ + s·B A)ᵀ (+ bias)`: a linear layer whose weight is a frozen `W₀` plus a
//! low-rank update, passed through a group-wise learned-step-size quantizer `Q`
//! ([`crate::quant::lsq`]) with trainable steps and offsets. This is L4Q's layer (Jeon et al.,
//! arXiv 2402.04902, §3), as one CPU custom op.
//!
//! Memory (the paper's "memory-optimised layer design"): as composite ops the graph would keep
//! `W' = W₀ + s·B A`, `Q(W')` and their intermediates per layer, and the backward would form
//! `∂L/∂Q(W') = dyᵀ x` per layer and hold it in candle's gradient store, which costs what full
//! quantization-aware training costs. The op keeps only `x`; its backward recomputes `W'` and
//! `Q(W')`, forms `G = dyᵀ x: [out, in]`, turns it into the quantizer's gradients and
//! `dA = s·Bᵀ M`, `dB = s·M Aᵀ` (`M` = `G` masked to the unclamped weights, the
//! straight-through estimator), and frees `G` before it returns: one `[out, in]` gradient
//! exists at a time, in the layer being differentiated. `dx = dy Q(W')`.
//!
//! The op takes three tensors: `x`, `[A | B]` flattened into one vector and `[steps; offsets]`
//! stacked `[2, out, groups]`; candle carries the gradients of the concatenation and the stack
//! back to the four trained tensors.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::frozen_linear::add_bias;
use super::kernels::{self, matmul_par, Mat};
use crate::quant::lsq::GroupQuantizer;

/// The layer's constants: the frozen weight (dense f32 `[out, in]`), its bias, the rank and
/// scale of the update, the quantizer, and a name for errors (the module path).
#[derive(Clone, Debug)]
pub struct LsqLinearSpec {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub scale: f64,
    pub quantizer: GroupQuantizer,
    pub name: String,
}

impl LsqLinearSpec {
    /// `(out, in)` of the weight.
    pub fn dims(&self) -> Result<(usize, usize)> {
        self.weight.dims2()
    }
}

/// The trained tensors of one layer: `a: [r, in]`, `b: [out, r]`, `steps`, `offsets`:
/// `[out, in / group_size]`.
#[derive(Clone, Debug)]
pub struct LsqFactors {
    pub a: Tensor,
    pub b: Tensor,
    pub steps: Tensor,
    pub offsets: Tensor,
}

/// `x: [.., in]` → `[.., out]`: `x Q(W₀ + s·B A)ᵀ (+ bias)`. Fused on the CPU in f32; the
/// composite [`lsq_linear_reference`] elsewhere.
pub fn lsq_linear(x: &Tensor, spec: &LsqLinearSpec, f: &LsqFactors) -> Result<Tensor> {
    let fused = [x, &f.a, &f.b, &f.steps, &f.offsets]
        .iter()
        .all(|t| kernels::fused_ok(t));
    if !fused || !kernels::fused_ok(&spec.weight) {
        return lsq_linear_reference(x, spec, f);
    }
    let ab = Tensor::cat(&[f.a.flatten_all()?, f.b.flatten_all()?], 0)?;
    let sb = Tensor::stack(&[&f.steps, &f.offsets], 0)?;
    let op = LsqLinear {
        spec: spec.clone(),
        r: f.a.dim(0)?,
    };
    x.contiguous()?
        .apply_op3_arc(&ab, &sb, Arc::new(Box::new(op)))
}

/// `Q(W₀ + s·B A)` as a dense `[out, in]` tensor (no gradient): the weight the layer computes
/// with, and what a merge writes.
pub fn quantized_weight(spec: &LsqLinearSpec, f: &LsqFactors) -> Result<Tensor> {
    let (out_f, in_f) = spec.dims()?;
    let op = LsqLinear {
        spec: spec.clone(),
        r: f.a.dim(0)?,
    };
    let (a, b) = (f.a.detach().contiguous()?, f.b.detach().contiguous()?);
    let (s, o) = (
        f.steps.detach().contiguous()?,
        f.offsets.detach().contiguous()?,
    );
    let w = kernels::with_f32s([&a, &b, &s, &o], "lsq-linear", |[a, b, s, o]| {
        let mut w = op.updated_weight(a, b)?;
        op.fake_quantize(&mut w, s, o)?;
        Ok(w)
    })?;
    Tensor::from_vec(w, (out_f, in_f), spec.weight.device())
}

/// `W' = W₀ + s·B A` (no gradient), row-major `[out, in]`: what the quantizer codes.
pub fn updated_weight(spec: &LsqLinearSpec, f: &LsqFactors) -> Result<Vec<f32>> {
    let op = LsqLinear {
        spec: spec.clone(),
        r: f.a.dim(0)?,
    };
    let (a, b) = (f.a.detach().contiguous()?, f.b.detach().contiguous()?);
    kernels::with_f32s([&a, &b], "lsq-linear", |[a, b]| op.updated_weight(a, b))
}

/// The same from candle's differentiable ops (other devices and dtypes; the test reference).
/// the rounding passes its gradient straight through (`v + (⌊v + ½⌋ − v).detach()`), and candle's
/// `clamp` gives the unclamped mask, so autograd yields LSQ's gradients; with the gradient
/// scale, `s` and `b` enter as `g·t + (t − g·t).detach()` (LSQ's `grad_scale`).
pub fn lsq_linear_reference(x: &Tensor, spec: &LsqLinearSpec, f: &LsqFactors) -> Result<Tensor> {
    let (out_f, in_f) = spec.dims()?;
    let q = spec.quantizer;
    let g = q.gradient_factor() as f64;
    let scaled = |t: &Tensor| -> Result<Tensor> { (t * g)? + (t - (t * g)?)?.detach() };
    let per_value = |t: &Tensor| -> Result<Tensor> {
        let t = scaled(t)?.unsqueeze(2)?;
        t.broadcast_as((out_f, q.groups(in_f), q.group_size))?
            .reshape((out_f, in_f))
    };
    let (s, o) = (per_value(&f.steps)?, per_value(&f.offsets)?);
    let w = (spec.weight.to_dtype(DType::F32)? + (f.b.matmul(&f.a)? * spec.scale)?)?;
    let v = ((w - &o)? / &s)?.clamp(q.qn(), q.qp())?;
    let code = (&v + ((&v + 0.5)?.floor()? - &v)?.detach())?;
    let wq = ((code * s)? + o)?;
    let dims = x.dims().to_vec();
    let y = x.reshape(((), in_f))?.matmul(&wq.t()?)?;
    let y = match &spec.bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().unwrap() = out_f;
    y.reshape(out)
}

/// The fused op over `(x, [A | B], [steps; offsets])`.
struct LsqLinear {
    spec: LsqLinearSpec,
    r: usize,
}

impl LsqLinear {
    /// `W' = W₀ + s·B A` for `a: [r, in]`, `b: [out, r]`.
    fn updated_weight(&self, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        let (out_f, in_f) = self.spec.dims()?;
        let mut w = kernels::with_f32(&self.spec.weight, "lsq-linear", |w| Ok(w.to_vec()))?;
        let s = self.spec.scale as f32;
        matmul_par(out_f, in_f, self.r, &mut w, true, Mat::n(b), Mat::n(a), s);
        Ok(w)
    }

    /// `W'` quantized in place; a step that is not positive is an error naming the layer.
    fn fake_quantize(&self, w: &mut [f32], steps: &[f32], offsets: &[f32]) -> Result<()> {
        let (_, in_f) = self.spec.dims()?;
        let q = &self.spec.quantizer;
        if let Some(bad) = q.check_steps(steps, in_f) {
            candle_core::bail!(
                "l4q: {}: the step size of row {} group {} is {}, not a positive number, so the quantizer is undefined (a learning rate too large for the steps?)",
                self.spec.name, bad.row, bad.group, bad.value
            )
        }
        q.fake_quantize(w, steps, offsets, in_f);
        Ok(())
    }

    /// `(m, in, out)` for `x: [.., in]`, with the packed operands' lengths checked.
    fn dims(&self, x: &Shape, ab: usize, sb: usize) -> Result<(usize, usize, usize)> {
        let (out_f, in_f) = self.spec.dims()?;
        let k = *x.dims().last().unwrap_or(&0);
        let groups = self.spec.quantizer.groups(in_f);
        if k != in_f || ab != self.r * (in_f + out_f) || sb != 2 * out_f * groups {
            candle_core::bail!(
                "lsq-linear: {}: input has {k} features, the weight expects {in_f}",
                self.spec.name
            )
        }
        Ok((x.elem_count() / in_f.max(1), in_f, out_f))
    }

    /// `Q(W')` for the packed `[A | B]` and `[steps; offsets]`.
    fn quantized(&self, ab: &[f32], sb: &[f32]) -> Result<Vec<f32>> {
        let (a, b) = ab.split_at(self.r * self.spec.dims()?.1);
        let (s, o) = sb.split_at(sb.len() / 2);
        let mut w = self.updated_weight(a, b)?;
        self.fake_quantize(&mut w, s, o)?;
        Ok(w)
    }
}

impl CustomOp3 for LsqLinear {
    fn name(&self) -> &'static str {
        "lsq-linear"
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
        let ab = kernels::contiguous_f32(s2, l2, self.name())?;
        let sb = kernels::contiguous_f32(s3, l3, self.name())?;
        let (m, in_f, out_f) = self.dims(l1.shape(), ab.len(), sb.len())?;
        let wq = self.quantized(ab, sb)?;
        let mut y = vec![0f32; m * out_f];
        matmul_par(m, out_f, in_f, &mut y, false, Mat::n(x), Mat::t(&wq), 1.0);
        add_bias(self.spec.bias.as_ref(), &mut y, out_f)?;
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        ab: &Tensor,
        sb: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, in_f, out_f) = self.dims(x.shape(), ab.elem_count(), sb.elem_count())?;
        let need_dx = x.track_op();
        let dy = grad_res.contiguous()?;
        let (ab_c, sb_c) = (ab.contiguous()?, sb.contiguous()?);
        let q = self.spec.quantizer;
        let mut dx = vec![0f32; if need_dx { m * in_f } else { 0 }];
        let mut dab = vec![0f32; ab.elem_count()];
        let mut dsb = vec![0f32; sb.elem_count()];
        kernels::with_f32s([x, &ab_c, &sb_c, &dy], self.name(), |[x, ab, sb, dy]| {
            let (a, b) = ab.split_at(self.r * in_f);
            let (s, o) = sb.split_at(sb.len() / 2);
            let w = self.updated_weight(a, b)?;
            if need_dx {
                let mut wq = w.clone();
                self.fake_quantize(&mut wq, s, o)?;
                matmul_par(m, in_f, out_f, &mut dx, false, Mat::n(dy), Mat::n(&wq), 1.0);
            }
            // G = ∂L/∂Q(W') = dyᵀ x, masked in place to ∂L/∂W'; freed when this block ends.
            let mut g = vec![0f32; out_f * in_f];
            matmul_par(out_f, in_f, m, &mut g, false, Mat::t(dy), Mat::n(x), 1.0);
            let (ds, doff) = dsb.split_at_mut(s.len());
            q.backward(&w, s, o, &mut g, ds, doff, in_f);
            drop(w);
            let (da, db) = dab.split_at_mut(self.r * in_f);
            let scale = self.spec.scale as f32;
            matmul_par(self.r, in_f, out_f, da, false, Mat::t(b), Mat::n(&g), scale);
            matmul_par(out_f, self.r, in_f, db, false, Mat::n(&g), Mat::t(a), scale);
            Ok(())
        })?;
        let dev = x.device();
        let dx = match need_dx {
            true => Some(Tensor::from_vec(dx, x.shape(), dev)?),
            false => None,
        };
        Ok((
            dx,
            Some(Tensor::from_vec(dab, ab.shape(), dev)?),
            Some(Tensor::from_vec(dsb, sb.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    fn close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < tol, "{got:?} vs {want:?}");
        }
    }

    fn vars(f: &LsqFactors) -> [Var; 4] {
        [&f.a, &f.b, &f.steps, &f.offsets].map(|t| Var::from_tensor(t).unwrap())
    }

    fn factors_of(v: &[Var; 4]) -> LsqFactors {
        LsqFactors {
            a: v[0].as_tensor().clone(),
            b: v[1].as_tensor().clone(),
            steps: v[2].as_tensor().clone(),
            offsets: v[3].as_tensor().clone(),
        }
    }

    /// By hand (the quantizer's example in `quant::lsq`, reached through the update): 2 signed
    /// bits (`Qn = −2`, `Qp = 1`), one group of 4, `W₀ = (−0.5, 0.1, 0.4, 1.6)`, `A = (0, 0,
    /// 0.1, 0)`, `B = 1`, scale 2, so `W' = (−0.5, 0.1, 0.6, 1.6)`; `s = 0.5`, `b = 0.8` give
    /// `v = (−2.6, −1.4, −0.4, 1.6)`, codes `(−2, −1, 0, 1)`, `Q(W') = (−0.2, 0.3, 0.8, 1.3)`.
    /// For `x = (1, 0, 2, 1)` and bias 0.5: `y = −0.2 + 1.6 + 1.3 + 0.5 = 3.2`. For `L = y`:
    /// `G = x`, masked `M = (0, 0, 2, 0)` (values 1 and 4 are clamped); `dA = 2·B·M = (0, 0, 4,
    /// 0)`, `dB = 2·M·Aᵀ = 0.4`; `ds = 1·Qn + 0·0.4 + 2·0.4 + 1·Qp = −2 + 0.8 + 1 = −0.2`; `db =
    /// 1 + 1 = 2`; `dx = Q(W')`.
    #[test]
    fn forward_and_gradients_by_hand() {
        let dev = Device::Cpu;
        let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &dev).unwrap();
        let spec = LsqLinearSpec {
            weight: t(&[-0.5, 0.1, 0.4, 1.6], &[1, 4]),
            bias: Some(t(&[0.5], &[1])),
            scale: 2.0,
            quantizer: GroupQuantizer {
                bits: 2,
                group_size: 4,
                grad_scale: false,
                signed: true,
            },
            name: "layer".into(),
        };
        let v = vars(&LsqFactors {
            a: t(&[0.0, 0.0, 0.1, 0.0], &[1, 4]),
            b: t(&[1.0], &[1, 1]),
            steps: t(&[0.5], &[1, 1]),
            offsets: t(&[0.8], &[1, 1]),
        });
        let x = Var::from_tensor(&t(&[1.0, 0.0, 2.0, 1.0], &[1, 4])).unwrap();
        let y = lsq_linear(x.as_tensor(), &spec, &factors_of(&v)).unwrap();
        close(&y.flatten_all().unwrap().to_vec1().unwrap(), &[3.2], 1e-5);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = |t: &Tensor| -> Vec<f32> {
            grads
                .get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        close(&g(v[0].as_tensor()), &[0.0, 0.0, 4.0, 0.0], 1e-5);
        close(&g(v[1].as_tensor()), &[0.4], 1e-5);
        close(&g(v[2].as_tensor()), &[-0.2], 1e-5);
        close(&g(v[3].as_tensor()), &[2.0], 1e-5);
        close(&g(x.as_tensor()), &[-0.2, 0.3, 0.8, 1.3], 1e-5);
        let wq = quantized_weight(&spec, &factors_of(&v)).unwrap();
        close(
            &wq.flatten_all().unwrap().to_vec1().unwrap(),
            &[-0.2, 0.3, 0.8, 1.3],
            1e-6,
        );
    }

    /// On random values (4 bits, groups of 8, rank 3, a batch of 2 × 3), the fused op's output
    /// and gradients equal candle's autograd through the composite form, with and without
    /// LSQ's gradient scale.
    #[test]
    fn the_fused_op_equals_autograd_of_the_composite_form() {
        let dev = Device::Cpu;
        let (out_f, in_f, r) = (5, 16, 3);
        for grad_scale in [false, true] {
            let quantizer = GroupQuantizer {
                bits: 4,
                group_size: 8,
                grad_scale,
                signed: true,
            };
            let w0 = Tensor::randn(0f32, 1.0, (out_f, in_f), &dev).unwrap();
            let w: Vec<f32> = w0.flatten_all().unwrap().to_vec1().unwrap();
            let (s, o) = quantizer.init_from_min_max(&w, in_f);
            // Steps a little smaller than the range and offsets above each minimum: some
            // values clamp at each end, none sits exactly on a bound (where candle's clamp
            // splits the gradient in two).
            let s: Vec<f32> = s.iter().map(|s| s * 0.8).collect();
            let o: Vec<f32> = o.iter().zip(&s).map(|(o, s)| o + 0.3 * s).collect();
            let groups = in_f / 8;
            let spec = LsqLinearSpec {
                weight: w0,
                bias: Some(Tensor::randn(0f32, 1.0, out_f, &dev).unwrap()),
                scale: 1.5,
                quantizer,
                name: "layer".into(),
            };
            let f = LsqFactors {
                a: Tensor::randn(0f32, 0.3, (r, in_f), &dev).unwrap(),
                b: Tensor::randn(0f32, 0.3, (out_f, r), &dev).unwrap(),
                steps: Tensor::from_vec(s, (out_f, groups), &dev).unwrap(),
                offsets: Tensor::from_vec(o, (out_f, groups), &dev).unwrap(),
            };
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, in_f), &dev).unwrap()).unwrap();
            let c = Tensor::randn(0f32, 1.0, (2, 3, out_f), &dev).unwrap();
            let run = |fused: bool| {
                let v = vars(&f);
                let y = match fused {
                    true => lsq_linear(x.as_tensor(), &spec, &factors_of(&v)),
                    false => lsq_linear_reference(x.as_tensor(), &spec, &factors_of(&v)),
                }
                .unwrap();
                let grads = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                let mut out = vec![y.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
                for t in v.iter().map(|v| v.as_tensor()).chain([x.as_tensor()]) {
                    out.push(
                        grads
                            .get(t)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap(),
                    );
                }
                out
            };
            let (fused, composite) = (run(true), run(false));
            for (i, (a, b)) in fused.iter().zip(&composite).enumerate() {
                close(a, b, 1e-4 * (1.0 + i as f32));
            }
        }
    }
}
