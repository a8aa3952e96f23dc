//! Initialisations that move part of the frozen weight into the adapter and leave the base
//! as the residual `W_res = W − s·B A` (peft `tuners/lora/layer.py`, `pissa_init`,
//! `olora_init`), so the adapted layer starts out equal to the pretrained one:
//!
//! - PiSSA (Meng et al. 2024): `W = V S Uᵀ` (SVD); with the top `r` singular triplets,
//!   `A = diag(√(S_r/s)) Uᵀ_r`, `B = V_r diag(√(S_r/s))`. `pissa_niter_N` takes the triplets
//!   from a randomized SVD with `N` subspace iterations (Halko et al. 2011, as
//!   `torch.svd_lowrank`), seeded.
//! - OLoRA (Büyükakyüz 2024): `W = Q R` (thin QR); `B = Q[:, :r]`, `A = R[:r]`.
//!
//! Singular vectors and QR factors are defined up to sign; `B A`, the residual and the
//! rank-2r conversion are not, and they are what tests compare against peft.
//!
//! SVD and QR come from `faer`: candle has neither. The SVDs are the ones SVFit shares
//! (`tuners/svd.rs`).

use anyhow::{bail, Result};
use candle_core::Tensor;
use faer::Mat;

use crate::tuners::svd::{descending, exact_svd, randomized_svd, to_mat, to_tensor};

/// Which residual initialisation `init_lora_weights` names.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ResidualInit {
    /// `"pissa"`: exact SVD.
    Pissa,
    /// `"pissa_niter_N"`: randomized SVD with `N` subspace iterations.
    PissaNiter(usize),
    /// `"olora"`: thin QR.
    Olora,
}

impl ResidualInit {
    /// `None` for the plain schemes (`true`, `false`, `"gaussian"`); an error for a malformed
    /// `pissa_niter_N`.
    pub fn parse(name: &str) -> Result<Option<Self>> {
        Ok(match name {
            "pissa" => Some(Self::Pissa),
            "olora" => Some(Self::Olora),
            n if n.starts_with("pissa_niter_") => match n["pissa_niter_".len()..].parse::<usize>() {
                Ok(k) => Some(Self::PissaNiter(k)),
                Err(_) => bail!("lora: init_lora_weights={n:?}: expected \"pissa_niter_<number of iterations>\", e.g. \"pissa_niter_4\""),
            },
            _ => None,
        })
    }
}

/// The initial factors and the residual base.
pub struct Residual {
    /// `A₀: [r, in]`
    pub a: Tensor,
    /// `B₀: [out, r]`
    pub b: Tensor,
    /// `W_res = W − s·B₀ A₀: [out, in]`
    pub residual: Tensor,
}

/// Decomposes the dense weight `w: [out, in]` per `init` for rank `r` and scaling `s`.
/// `seed` drives the randomized SVD only.
pub fn residual_init(
    init: ResidualInit,
    w: &Tensor,
    r: usize,
    scaling: f64,
    seed: u64,
) -> Result<Residual> {
    let (out_f, in_f) = w.dims2()?;
    if r > out_f.min(in_f) {
        bail!("lora: r={r} exceeds the rank a [{out_f}, {in_f}] weight can have; PiSSA/OLoRA need r ≤ {}", out_f.min(in_f))
    }
    let m = to_mat(w)?;
    let (a, b) = match init {
        ResidualInit::Olora => {
            let qr = m.qr();
            let (q, rr) = (qr.compute_thin_Q(), qr.thin_R().to_owned());
            let b = Mat::<f32>::from_fn(out_f, r, |i, k| q[(i, k)]);
            let a = Mat::<f32>::from_fn(r, in_f, |k, j| rr[(k, j)]);
            (a, b)
        }
        ResidualInit::Pissa | ResidualInit::PissaNiter(_) => {
            let (u, s, v) = match init {
                ResidualInit::PissaNiter(niter) => randomized_svd(&m, r, niter, seed)?,
                _ => exact_svd(&m)?,
            };
            // Top r triplets in decreasing order of singular value; each √(σ/s) goes to both factors.
            let order = descending(&s);
            let root: Vec<f32> = order[..r]
                .iter()
                .map(|&k| (s[k] / scaling as f32).max(0.0).sqrt())
                .collect();
            let b = Mat::<f32>::from_fn(out_f, r, |i, k| u[(i, order[k])] * root[k]);
            let a = Mat::<f32>::from_fn(r, in_f, |k, j| root[k] * v[(j, order[k])]);
            (a, b)
        }
    };
    let ba = &b * &a;
    let residual = Mat::<f32>::from_fn(out_f, in_f, |i, j| m[(i, j)] - scaling as f32 * ba[(i, j)]);
    let dev = w.device();
    Ok(Residual {
        a: to_tensor(&a, dev)?,
        b: to_tensor(&b, dev)?,
        residual: to_tensor(&residual, dev)?,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn weight(out_f: usize, in_f: usize) -> Tensor {
        let v: Vec<f32> = (0..out_f * in_f)
            .map(|k| ((k * 37 % 101) as f32 / 50.0 - 1.0) * (1.0 + (k % 7) as f32))
            .collect();
        Tensor::from_vec(v, (out_f, in_f), &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn every_scheme_leaves_the_layer_unchanged() {
        let w = weight(24, 16);
        for init in [
            ResidualInit::Pissa,
            ResidualInit::PissaNiter(4),
            ResidualInit::Olora,
        ] {
            let res = residual_init(init, &w, 4, 2.0, 7).unwrap();
            assert_eq!(res.a.dims(), [4, 16]);
            assert_eq!(res.b.dims(), [24, 4]);
            let back = (&res.residual + (res.b.matmul(&res.a).unwrap() * 2.0).unwrap()).unwrap();
            assert!(
                max_abs(&(back - &w).unwrap()) < 1e-4 * max_abs(&w),
                "{init:?}: W_res + s·B A = W"
            );
        }
    }

    #[test]
    fn pissa_takes_the_principal_part_and_olora_spans_the_first_columns() {
        // Rank 4 plus small noise: the top-4 subspace is well separated.
        let x = weight(24, 4);
        let y = weight(16, 4).t().unwrap();
        let w = (x.matmul(&y).unwrap() + (weight(24, 16) * 0.01).unwrap()).unwrap();
        let exact = residual_init(ResidualInit::Pissa, &w, 4, 1.0, 0).unwrap();
        // B A is the best rank-4 approximation: the randomized one with enough iterations agrees.
        let approx = residual_init(ResidualInit::PissaNiter(8), &w, 4, 1.0, 3).unwrap();
        let d = max_abs(
            &(exact.b.matmul(&exact.a).unwrap() - approx.b.matmul(&approx.a).unwrap()).unwrap(),
        );
        assert!(d < 1e-3 * max_abs(&w), "randomized SVD off by {d}");
        // OLoRA: B has orthonormal columns and A is upper triangular.
        let o = residual_init(ResidualInit::Olora, &weight(24, 16), 4, 1.0, 0).unwrap();
        let gram = o.b.t().unwrap().matmul(&o.b).unwrap();
        assert!(
            max_abs(
                &(gram - Tensor::eye(4, candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap()
            ) < 1e-5
        );
        let a: Vec<Vec<f32>> = o.a.to_vec2().unwrap();
        assert!(
            (0..4).all(|k| (0..k).all(|j| a[k][j].abs() < 1e-5)),
            "R is upper triangular"
        );
    }

    #[test]
    fn bad_names_and_ranks_are_errors() {
        assert!(ResidualInit::parse("pissa_niter_x").is_err());
        assert_eq!(
            ResidualInit::parse("pissa_niter_16").unwrap(),
            Some(ResidualInit::PissaNiter(16))
        );
        assert_eq!(ResidualInit::parse("gaussian").unwrap(), None);
        let e = residual_init(ResidualInit::Pissa, &weight(6, 4), 5, 1.0, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("r=5"), "{e}");
    }
}
