//! GELU with the exact (erf) form, `gelu(x) = x·Φ(x) = ½x(1 + erf(x/√2))` (Hendrycks & Gimpel
//! 2016, eq. 1), as BERT's `hidden_act = "gelu"`, fused on the CPU.
//!
//! candle's `gelu_erf` calls libm's scalar `erf` per element (13% of a MiniLM training step
//! under perf) and builds its backward from several tensor ops. This op evaluates erf with a
//! branch-free polynomial that vectorises, and its backward is one pass:
//! `dx = g·(Φ(x) + x·φ(x))`, `φ(x) = e^{−x²/2}/√(2π)`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::kernels::{self, multiversion};

/// `gelu(x)` with the erf form: fused on the CPU in f32, candle's `gelu_erf` elsewhere.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if kernels::fused_ok(x) {
        return x.contiguous()?.apply_op1_arc(Arc::new(Box::new(Gelu)));
    }
    x.gelu_erf()
}

/// `(erf(x), e^{−x²})`. erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5·10⁻⁷; 6.5·10⁻⁷
/// evaluated in f32): with t = 1/(1 + p|x|), erf(|x|) = 1 − (a₁t + a₂t² + a₃t³ + a₄t⁴ + a₅t⁵)·e^{−x²},
/// odd in x.
#[inline(always)]
fn erf_with_gauss(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let gauss = kernels::exp(-ax * ax);
    ((1.0 - poly * gauss).copysign(x), gauss)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `gelu(x) = x·Φ(x)`.
#[inline(always)]
fn gelu_value(x: f32) -> f32 {
    gelu_value_and_slope(x).0
}

/// `gelu′(x) = Φ(x) + x·φ(x)`.
#[inline(always)]
fn gelu_slope(x: f32) -> f32 {
    gelu_value_and_slope(x).1
}

/// `(gelu(x), gelu′(x))` with one `exp`: `e^{−x²/2}` is both erf(x/√2)'s factor and φ(x)'s.
#[inline(always)]
pub(super) fn gelu_value_and_slope(x: f32) -> (f32, f32) {
    let (erf, gauss) = erf_with_gauss(x * FRAC_1_SQRT_2);
    let cdf = 0.5 * (1.0 + erf);
    (x * cdf, cdf + x * FRAC_1_SQRT_2PI * gauss)
}

multiversion! {
    fn gelu_fwd(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = gelu_value(x);
        }
    }
}

multiversion! {
    fn gelu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            *dx = g * gelu_slope(x);
        }
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous_f32(storage, layout, self.name())?;
        let mut y = vec![0f32; x.len()];
        kernels::par_rows(&mut y, 1, 16, |r0, out| {
            gelu_fwd(&x[r0..r0 + out.len()], out)
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        let mut dx = vec![0f32; arg.elem_count()];
        kernels::with_f32s([arg, &g], self.name(), |[x, g]| {
            kernels::par_rows(&mut dx, 1, 24, |r0, out| {
                gelu_bwd(&x[r0..r0 + out.len()], &g[r0..r0 + out.len()], out)
            });
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn erf_is_within_1e6_of_libm() {
        let mut worst = 0f64;
        for i in -60000..=60000 {
            let x = i as f32 * 1e-4;
            let d = (erf_with_gauss(x).0 as f64 - libm_erf(x as f64)).abs();
            worst = worst.max(d);
        }
        // 1.5e-7 from the approximation, the rest from f32 rounding of 1 − poly·e^{−x²}.
        assert!(worst < 1e-6, "max |erf - libm| = {worst}");
    }

    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }

    /// Forward and gradient equal candle's libm-based gelu_erf.
    #[test]
    fn matches_candle_gelu_erf() {
        let vals: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.004).collect();
        let x = Var::from_vec(vals.clone(), vals.len(), &Device::Cpu).unwrap();
        let ours = gelu(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().gelu_erf().unwrap();
        let w = Tensor::from_vec(
            (0..vals.len())
                .map(|i| (i as f32 * 0.7).sin())
                .collect::<Vec<f32>>(),
            vals.len(),
            &Device::Cpu,
        )
        .unwrap();
        let go = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (&theirs * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(
            diff(&ours, &theirs) < 1e-6,
            "forward {}",
            diff(&ours, &theirs)
        );
        let (a, b) = (
            go.get(x.as_tensor()).unwrap(),
            gt.get(x.as_tensor()).unwrap(),
        );
        assert!(diff(a, b) < 2e-6, "gradient {}", diff(a, b));
    }
}
