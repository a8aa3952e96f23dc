//! Singular value decompositions of a base weight, shared by the methods that start from one:
//! PiSSA's residual initialisation (`lora/residual_init.rs`) and SVFit (`svfit/`).
//!
//! The SVD comes from `faer` (candle has none), in f32. Singular vectors are defined up to
//! sign (and, for tied singular values, up to a rotation of their subspace): what a method
//! keeps must not depend on that choice, or it must save the vectors it used (SVFit does).

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use faer::Mat;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// The top `r` singular triplets of a weight `W: [out, in]`, in decreasing order of singular
/// value: `W ≈ U diag(σ) Vh` (Eckart–Young: the best rank-`r` approximation).
pub struct TopSvd {
    /// `U_r: [out, r]`, orthonormal columns.
    pub u: Tensor,
    /// `σ_1 ≥ … ≥ σ_r ≥ 0: [r]`.
    pub sigma: Tensor,
    /// `V_rᵀ: [r, in]`, orthonormal rows (torch's `Vh`).
    pub vh: Tensor,
}

/// The top `r` singular triplets of `w: [out, in]` by the exact thin SVD, computed in f32 on
/// the CPU (whatever `w`'s dtype; the result is f32 on `w`'s device). Errors: `r` above
/// `min(out, in)`, or an SVD that does not converge (a non-finite weight).
pub fn top_svd(w: &Tensor, r: usize) -> Result<TopSvd> {
    let (out_f, in_f) = w.dims2()?;
    if r > out_f.min(in_f) {
        bail!(
            "r={r} exceeds the rank a [{out_f}, {in_f}] weight can have (at most {})",
            out_f.min(in_f)
        )
    }
    let m = to_mat(w)?;
    let (u, s, v) = exact_svd(&m)?;
    let order = descending(&s);
    let u_r = Mat::<f32>::from_fn(out_f, r, |i, k| u[(i, order[k])]);
    let vh_r = Mat::<f32>::from_fn(r, in_f, |k, j| v[(j, order[k])]);
    let sigma: Vec<f32> = order[..r].iter().map(|&k| s[k]).collect();
    let dev = w.device();
    Ok(TopSvd {
        u: to_tensor(&u_r, dev)?,
        sigma: Tensor::from_vec(sigma, r, dev)?,
        vh: to_tensor(&vh_r, dev)?,
    })
}

/// Indices of `s` in decreasing order of value (faer returns them sorted already; this does not
/// rely on it).
pub(crate) fn descending(s: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    order
}

/// `(U, σ, V)` with `W = U diag(σ) Vᵀ` (thin).
pub(crate) fn exact_svd(m: &Mat<f32>) -> Result<(Mat<f32>, Vec<f32>, Mat<f32>)> {
    let svd = m
        .thin_svd()
        .map_err(|e| anyhow!("SVD did not converge: {e:?}"))?;
    let s = svd.S().column_vector();
    Ok((
        svd.U().to_owned(),
        (0..s.nrows()).map(|i| s[i]).collect(),
        svd.V().to_owned(),
    ))
}

/// `torch.svd_lowrank(W, q=r, niter)` (Halko et al. 2011, alg. 4.4): a Gaussian sketch
/// `Q = orth(W Ω)`, `niter` power iterations `Q = orth(W orth(Wᵀ Q))`, then the exact SVD of
/// the small `Qᵀ W`.
pub(crate) fn randomized_svd(
    m: &Mat<f32>,
    r: usize,
    niter: usize,
    seed: u64,
) -> Result<(Mat<f32>, Vec<f32>, Mat<f32>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let omega = Mat::<f32>::from_fn(m.ncols(), r, |_, _| StandardNormal.sample(&mut rng));
    let orth = |x: Mat<f32>| x.qr().compute_thin_Q();
    let mut q = orth(m * &omega);
    for _ in 0..niter {
        let z = orth(m.transpose() * &q);
        q = orth(m * &z);
    }
    let small = q.transpose() * m;
    let (ub, s, v) = exact_svd(&small)?;
    Ok((&q * &ub, s, v))
}

/// A `[rows, cols]` tensor as an f32 matrix.
pub(crate) fn to_mat(w: &Tensor) -> Result<Mat<f32>> {
    let (rows, cols) = w.dims2()?;
    let values: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(Mat::<f32>::from_fn(rows, cols, |i, j| values[i * cols + j]))
}

/// An f32 matrix as a `[rows, cols]` tensor on `device`.
pub(crate) fn to_tensor(m: &Mat<f32>, device: &Device) -> Result<Tensor> {
    let (rows, cols) = (m.nrows(), m.ncols());
    let v: Vec<f32> = (0..rows)
        .flat_map(|i| (0..cols).map(move |j| m[(i, j)]))
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `W = R(θ) diag(3, 1)` with `R(θ)` the rotation by θ: its SVD is `U = R(θ)`, `σ = (3, 1)`,
    /// `Vh = I` (up to the signs of matching columns of U and rows of Vh).
    #[test]
    fn a_rotated_diagonal_matrix_has_the_svd_written_down() {
        let (c, s) = (0.6f32, 0.8f32); // cos θ, sin θ
        let w = Tensor::new(&[[3.0 * c, -s], [3.0 * s, c]], &Device::Cpu).unwrap();
        let top = top_svd(&w, 2).unwrap();
        let sigma: Vec<f32> = top.sigma.to_vec1().unwrap();
        assert!((sigma[0] - 3.0).abs() < 1e-6 && (sigma[1] - 1.0).abs() < 1e-6);
        let u: Vec<Vec<f32>> = top.u.to_vec2().unwrap();
        let vh: Vec<Vec<f32>> = top.vh.to_vec2().unwrap();
        let want_u = [[c, -s], [s, c]];
        for k in 0..2 {
            // One sign per triplet: u_k and vh_k flip together.
            let sign = vh[k][k].signum();
            assert!((vh[k][k].abs() - 1.0).abs() < 1e-6 && vh[k][1 - k].abs() < 1e-6);
            for i in 0..2 {
                assert!((u[i][k] * sign - want_u[i][k]).abs() < 1e-6, "U[{i}][{k}]");
            }
        }
        // Rank 1 keeps the larger value only.
        let one = top_svd(&w, 1).unwrap();
        assert_eq!(one.u.dims(), [2, 1]);
        assert_eq!(one.vh.dims(), [1, 2]);
        assert!((one.sigma.to_vec1::<f32>().unwrap()[0] - 3.0).abs() < 1e-6);
    }

    #[test]
    fn a_rank_above_the_weights_is_refused() {
        let w = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap();
        let e = top_svd(&w, 4).err().unwrap().to_string();
        assert!(e.contains("r=4 exceeds") && e.contains("at most 3"), "{e}");
    }
}
