//! The arithmetic of peft's `add_weighted_adapter` on one tensor: the task-arithmetic family of
//! `peft/utils/merge_utils.py` (`task_arithmetic`, `magnitude_prune`, `ties`, `dare_linear`,
//! `dare_ties`), the truncated SVD of `_svd_generalized_task_arithmetic_weighted_adapter`, and
//! its quantile clamp. Tensors are flat `f32` (peft's dtype for these adapters).

use anyhow::{bail, Result};
use faer::Mat;
use rand::Rng;

use crate::merge::delta::{
    agrees, elect_signs, sparsify, MagnitudeCount, Rescale, SignElection, Sparsify,
};

/// Which of `merge_utils.py`'s functions combines the tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arithmetic {
    /// `task_arithmetic`: `Σ wᵢ τᵢ`.
    Linear,
    /// `magnitude_prune`: each `τᵢ` keeps its `⌊density·n⌋` largest entries, then `Σ wᵢ τᵢ`.
    MagnitudePrune,
    /// `ties`: magnitude pruning, signs elected on the pruned (unweighted) tensors, then the
    /// weighted entries that agree summed and divided by how many agree (`disjoint_merge`).
    Ties,
    /// `dare_linear`: each entry kept with probability `density`, the kept ones rescaled.
    DareLinear,
    /// `dare_ties`: DARE's pruning, then TIES' election and disjoint merge.
    DareTies,
}

/// What the pruning of an [`Arithmetic`] needs.
#[derive(Clone, Debug)]
pub struct Pruning {
    /// Fraction kept, in `(0, 1]`; unused by [`Arithmetic::Linear`].
    pub density: f32,
    pub majority_sign: SignElection,
    /// DARE's rescale of the kept entries: `1/density` in peft; `1/q` for DAREx-q
    /// (arXiv 2410.09344, eq. 4), `q` in `(0, 1]`.
    pub dare_rescale: f32,
    /// One DARE rescale per input instead (DAREx-q's analytic rule, per layer and input).
    pub per_input_rescale: Option<Vec<f32>>,
}

/// Combines `tensors` (equally long) with `weights` as `arithmetic` says. `rng(i)` draws the
/// DARE mask of input `i`.
pub fn combine<R: Rng>(
    arithmetic: Arithmetic,
    tensors: &[Vec<f32>],
    weights: &[f64],
    pruning: &Pruning,
    mut rng: impl FnMut(usize) -> R,
) -> Result<Vec<f32>> {
    let n = match tensors.first() {
        Some(t) => t.len(),
        None => bail!("nothing to combine"),
    };
    if tensors.iter().any(|t| t.len() != n) || tensors.len() != weights.len() {
        bail!("combine: tensors or weights of different lengths")
    }
    let mut pruned: Vec<Vec<f32>> = tensors.to_vec();
    let sparsifier = match arithmetic {
        Arithmetic::Linear => None,
        Arithmetic::MagnitudePrune | Arithmetic::Ties => {
            Some((Sparsify::Magnitude(MagnitudeCount::Peft), Rescale::None))
        }
        Arithmetic::DareLinear | Arithmetic::DareTies => {
            Some((Sparsify::Random, Rescale::Factor(pruning.dare_rescale)))
        }
    };
    if let Some((method, rescale)) = sparsifier {
        for (i, t) in pruned.iter_mut().enumerate() {
            // DAREx-q's analytic rule gives each input its own rescale.
            let rescale = match (&pruning.per_input_rescale, rescale) {
                (Some(r), Rescale::Factor(_)) => Rescale::Factor(r[i]),
                _ => rescale,
            };
            sparsify(t, 1, pruning.density, method, rescale, &mut rng(i))?;
        }
    }
    let disjoint = matches!(arithmetic, Arithmetic::Ties | Arithmetic::DareTies);
    let mut out = vec![0.0f32; n];
    if !disjoint {
        for (t, &w) in pruned.iter().zip(weights) {
            let w = w as f32;
            out.iter_mut().zip(t).for_each(|(o, x)| *o += x * w);
        }
        return Ok(out);
    }
    let views: Vec<&[f32]> = pruned.iter().map(Vec::as_slice).collect();
    let elected = elect_signs(&views, pruning.majority_sign);
    for (j, o) in out.iter_mut().enumerate() {
        let (mut sum, mut count) = (0.0f32, 0.0f32);
        for (t, &w) in pruned.iter().zip(weights) {
            if agrees(t[j], elected[j]) {
                sum += t[j] * w as f32;
                count += 1.0;
            }
        }
        *o = sum / count.max(1.0);
    }
    Ok(out)
}

/// `U[:, :rank]·diag(S[:rank])` (`[rows, rank]`, row-major) and `Vh[:rank, :]` (`[rank, cols]`)
/// of `m` (`[rows, cols]`, row-major): LoRA's B and A of the best rank-`rank` approximation.
/// The SVD is computed in f64. Its signs are arbitrary (as torch's are): only `B·A` is defined.
pub fn truncated_svd(
    m: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if rank == 0 || rank > rows.min(cols) {
        bail!(
            "svd rank {rank} does not fit a {rows}×{cols} update (at most {})",
            rows.min(cols)
        )
    }
    let mat = Mat::<f64>::from_fn(rows, cols, |i, j| m[i * cols + j] as f64);
    let svd = mat
        .thin_svd()
        .map_err(|e| anyhow::anyhow!("SVD did not converge: {e:?}"))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut b = vec![0.0f32; rows * rank];
    for i in 0..rows {
        for k in 0..rank {
            b[i * rank + k] = (u[(i, k)] * s[k]) as f32;
        }
    }
    let mut a = vec![0.0f32; rank * cols];
    for k in 0..rank {
        for j in 0..cols {
            a[k * cols + j] = v[(j, k)] as f32;
        }
    }
    Ok((b, a))
}

/// peft's `svd_clamp`: `hi = quantile(cat(B, A), q)` (torch's linear interpolation) and both
/// factors clamped to `[-hi, hi]` (torch's `clamp(min, max)`: `max` wins when `min > max`).
pub fn clamp_factors(b: &mut [f32], a: &mut [f32], q: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&q) {
        bail!("svd_clamp must be a quantile in [0, 1], got {q}")
    }
    let mut dist: Vec<f32> = b.iter().chain(a.iter()).copied().collect();
    if dist.is_empty() {
        return Ok(());
    }
    dist.sort_by(f32::total_cmp);
    let pos = q * (dist.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let hi_idx = (lo + 1).min(dist.len() - 1);
    let hi = (dist[lo] as f64 + frac * (dist[hi_idx] as f64 - dist[lo] as f64)) as f32;
    let low = -hi;
    for x in b.iter_mut().chain(a.iter_mut()) {
        *x = x.max(low).min(hi);
    }
    Ok(())
}

/// `B·A` for row-major `B: [rows, r]`, `A: [r, cols]`, scaled by `scale` (in f64).
pub fn product(b: &[f32], a: &[f32], rows: usize, r: usize, cols: usize, scale: f64) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let s: f64 = (0..r)
                .map(|k| b[i * r + k] as f64 * a[k * cols + j] as f64)
                .sum();
            out[i * cols + j] = (s * scale) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::delta::mask_rng;

    fn pruning(density: f32) -> Pruning {
        Pruning {
            density,
            majority_sign: SignElection::Total,
            dare_rescale: 1.0 / density,
            per_input_rescale: None,
        }
    }

    fn run(a: Arithmetic, t: &[Vec<f32>], w: &[f64], p: &Pruning) -> Vec<f32> {
        combine(a, t, w, p, |i| mask_rng(3, "t", i)).unwrap()
    }

    #[test]
    fn ties_divides_by_the_count_of_agreeing_entries_after_weighting() {
        let t = vec![vec![3.0, 1.0, -2.0, 0.5], vec![-1.0, 2.0, -4.0, 0.25]];
        let w = [0.5, 2.0];
        // Density 1: no pruning. Elected (on unweighted sums): +, +, −, +.
        // Entry 0: only 3.0 agrees → 0.5·3 / 1. Entry 1: 0.5·1 + 2·2 = 4.5, /2.
        // Entry 2: 0.5·−2 + 2·−4 = −9, /2. Entry 3: 0.25 + 0.5 = 0.75, /2.
        let out = run(Arithmetic::Ties, &t, &w, &pruning(1.0));
        assert_eq!(out, vec![1.5, 2.25, -4.5, 0.375]);
        // Density 0.5 keeps the two largest of each: [3, 0, -2, 0] and [0, 2, -4, 0].
        let out = run(Arithmetic::Ties, &t, &w, &pruning(0.5));
        assert_eq!(out, vec![1.5, 4.0, -4.5, 0.0]);
        let out = run(Arithmetic::MagnitudePrune, &t, &w, &pruning(0.5));
        assert_eq!(out, vec![1.5, 4.0, -9.0, 0.0]);
    }

    #[test]
    fn frequency_election_counts_signs() {
        // Entry 0: signs +, −, − → −; total 3 − 1 − 1 = 1 → +.
        let t = vec![vec![3.0], vec![-1.0], vec![-1.0]];
        let w = [1.0, 1.0, 1.0];
        let mut p = pruning(1.0);
        assert_eq!(run(Arithmetic::Ties, &t, &w, &p), vec![3.0]);
        p.majority_sign = SignElection::Frequency;
        assert_eq!(run(Arithmetic::Ties, &t, &w, &p), vec![-1.0]);
    }

    #[test]
    fn dare_rescales_kept_entries_and_is_seeded() {
        let t = vec![vec![1.0f32; 10_000]];
        let p = pruning(0.25);
        let out = run(Arithmetic::DareLinear, &t, &[2.0], &p);
        let kept = out.iter().filter(|x| **x != 0.0).count();
        assert!((kept as f64 / 1e4 - 0.25).abs() < 0.02, "kept {kept}");
        assert!(out.iter().all(|x| *x == 0.0 || *x == 8.0));
        assert_eq!(out, run(Arithmetic::DareLinear, &t, &[2.0], &p));
        // DAREx-q: the kept entries are divided by q instead.
        let q = Pruning {
            dare_rescale: 1.0 / 0.5,
            ..p
        };
        let out_q = run(Arithmetic::DareLinear, &t, &[2.0], &q);
        assert!(out_q.iter().all(|x| *x == 0.0 || *x == 4.0));
    }

    #[test]
    fn svd_reconstructs_and_clamp_follows_torch_quantile() {
        // A rank-2 4×3 matrix is reproduced by its rank-2 factors.
        let m: Vec<f32> = vec![1., 2., 3., 2., 4., 6., 1., 0., 1., 0., 1., 1.];
        let (b, a) = truncated_svd(&m, 4, 3, 2).unwrap();
        let back = product(&b, &a, 4, 2, 3, 1.0);
        for (x, y) in back.iter().zip(&m) {
            assert!((x - y).abs() < 1e-5, "{back:?}");
        }
        assert!(truncated_svd(&m, 4, 3, 4).is_err());
        // torch.quantile([-3, -1, 0, 2, 5], 0.9) = 2 + 0.6·3 = 3.8.
        let mut b = vec![-3.0, 5.0];
        let mut a = vec![-1.0, 0.0, 2.0];
        clamp_factors(&mut b, &mut a, 0.9).unwrap();
        assert_eq!(b, vec![-3.0, 3.8]);
        assert_eq!(a, vec![-1.0, 0.0, 2.0]);
        assert!(clamp_factors(&mut b, &mut a, 1.5).is_err());
    }
}
