//! The arithmetic on task vectors (deltas `τ = θ_finetuned − θ_base`, or LoRA products) that
//! both adapter combinations (peft's `add_weighted_adapter`) and whole-model merges (mergekit)
//! are built from: sparsification, sign election and the disjoint sum.
//!
//! Every function works on one tensor, flat, in f32: merges go tensor by tensor. The two
//! upstream tools compose these pieces differently (peft elects signs on unweighted deltas and
//! divides by the count of agreeing entries; mergekit elects on weighted deltas and divides by
//! the agreeing weights); each caller states which it follows.
//!
//! Sources: `peft/utils/merge_utils.py` (peft 0.21.2) and `mergekit/sparsify.py`,
//! `mergekit/merge_methods/generalized_task_arithmetic.py` (mergekit 0.1.5).

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};

/// How a sparsified delta is scaled back up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rescale {
    /// Kept entries stay as they were.
    None,
    /// Kept entries are multiplied by a constant: `1/density` for DARE as in peft
    /// (`random_pruning(..., rescale=True)`), `1/q` for DAREx-q (arXiv 2410.09344, eq. 4).
    Factor(f32),
    /// The masked tensor is scaled so its norm equals the original's (mergekit's `rescale`,
    /// `rescaled_masked_tensor`; mergekit always passes L1). Skipped, as there, when either
    /// norm is below 1e-7.
    Norm(Norm),
}

/// The norms mergekit's `RescaleNorm` offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    L1,
    L2,
    Linf,
}

/// Which entries of a delta survive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sparsify {
    /// The `k` entries of largest magnitude (TIES' "trim"). `k = ⌊density·n⌋` in peft (which
    /// may keep none); mergekit keeps at least one (`max(1, ⌊density·n⌋)`), see
    /// [`MagnitudeCount`].
    Magnitude(MagnitudeCount),
    /// Each entry kept with probability `density` (DARE, arXiv 2311.03099).
    Random,
    /// Model Breadcrumbs (arXiv 2312.06795, mergekit's `magnitude_outliers`): drop the
    /// `⌊gamma·n⌋` largest, then the smallest, keeping `⌊density·n⌋` (outlier removal shrinks
    /// when both cannot hold).
    MagnitudeOutliers { gamma: f32 },
    /// DELLA's MAGPRUNE (arXiv 2406.11617, mergekit's `della_magprune`): per row, entry of
    /// ascending magnitude rank `r ∈ 1..=c` is kept with probability
    /// `density − ε + 2ε·(r−1)/(c−1)`.
    DellaMagprune { epsilon: f32 },
}

/// How many entries magnitude pruning keeps, as each upstream tool rounds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MagnitudeCount {
    /// `⌊density·n⌋` (`peft.utils.merge_utils.magnitude_based_pruning`).
    Peft,
    /// `max(1, ⌊density·n⌋)` (`mergekit.sparsify.magnitude`).
    Mergekit,
}

/// Sparsifies `delta` in place at `density ∈ (0, 1]`; `rows` is the length of the first axis
/// (DELLA ranks within rows; a 1-D tensor is one row). Density 1 (or more) leaves the delta
/// untouched, as both tools do, whatever `rescale` says.
///
/// Errors: a density outside `(0, 1]` other than the no-op `≥ 1`, and DELLA's
/// `density ± ε` outside `(0, 1)` (mergekit's own check).
pub fn sparsify(
    delta: &mut [f32],
    rows: usize,
    density: f32,
    method: Sparsify,
    rescale: Rescale,
    rng: &mut impl Rng,
) -> Result<()> {
    if density_is_no_op(density)? {
        return Ok(());
    }
    let n = delta.len();
    let before = match rescale {
        Rescale::Norm(norm) => Some(norm_of(delta, norm)),
        _ => None,
    };
    match method {
        Sparsify::Magnitude(_) | Sparsify::MagnitudeOutliers { .. } => {
            let (lo, hi) = rank_window(n, density, method).expect("a magnitude method");
            keep_magnitude_ranks(delta, lo, hi);
        }
        Sparsify::Random => {
            for x in delta.iter_mut() {
                if !rng.gen_bool(density as f64) {
                    *x = 0.0;
                }
            }
        }
        Sparsify::DellaMagprune { epsilon } => {
            if density + epsilon >= 1.0 || density - epsilon <= 0.0 {
                bail!("epsilon must be chosen such that density ± epsilon is in (0, 1); got density {density}, epsilon {epsilon}")
            }
            della_magprune(delta, rows.max(1), density, epsilon, rng);
        }
    }
    match rescale {
        Rescale::None => {}
        Rescale::Factor(f) => delta.iter_mut().for_each(|x| *x *= f),
        Rescale::Norm(norm) => {
            let before = before.unwrap_or(0.0);
            let after = norm_of(delta, norm);
            if before >= 1e-7 && after >= 1e-7 {
                let s = (before / after) as f32;
                delta.iter_mut().for_each(|x| *x *= s);
            }
        }
    }
    Ok(())
}

/// The ascending magnitude ranks `lo..hi` that a magnitude method keeps of `n` entries at
/// `density` (`None` for the other methods). Rows merged in blocks find these ranks over the
/// whole tensor without holding it (`merge::models::stream`).
pub fn rank_window(n: usize, density: f32, method: Sparsify) -> Option<(usize, usize)> {
    match method {
        Sparsify::Magnitude(count) => {
            let k = (density as f64 * n as f64).floor() as usize;
            let k = match count {
                MagnitudeCount::Peft => k,
                MagnitudeCount::Mergekit => k.max(1),
            };
            Some((n - k.min(n), n))
        }
        Sparsify::MagnitudeOutliers { gamma } => {
            let target = (density as f64 * n as f64).floor() as usize;
            let top = (gamma as f64 * n as f64).floor() as usize;
            let bottom = n.saturating_sub(target + top);
            Some((bottom, bottom + target))
        }
        _ => None,
    }
}

/// Whether `density` leaves a delta untouched (`≥ 1`); an error outside `(0, 1]`.
pub fn density_is_no_op(density: f32) -> Result<bool> {
    if density >= 1.0 {
        return Ok(true);
    }
    if density.is_nan() || density <= 0.0 {
        bail!("density must be in (0, 1], got {density}")
    }
    Ok(false)
}

/// Magnitude ranks compare `|x|` by its f32 bit pattern (monotone for every non-NaN value),
/// then by position.
pub fn magnitude_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Zeroes every entry whose ascending rank by magnitude lies outside `lo..hi`. Ties between
/// equal magnitudes are broken by position (torch's sort order for them is unspecified).
fn keep_magnitude_ranks(delta: &mut [f32], lo: usize, hi: usize) {
    let n = delta.len();
    if lo == 0 && hi >= n {
        return;
    }
    let mut order: Vec<u32> = (0..n as u32).collect();
    let key = |i: &u32| (delta[*i as usize].abs(), *i);
    let by = |a: &u32, b: &u32| {
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    };
    // Two selections instead of a full sort: O(n).
    if hi < n {
        order.select_nth_unstable_by(hi, by);
    }
    let kept_and_below = &mut order[..hi.min(n)];
    if lo > 0 && lo < kept_and_below.len() {
        kept_and_below.select_nth_unstable_by(lo, by);
    }
    let mut keep = vec![false; n];
    for &i in &order[lo.min(hi)..hi.min(n)] {
        keep[i as usize] = true;
    }
    for (x, k) in delta.iter_mut().zip(keep) {
        if !k {
            *x = 0.0;
        }
    }
}

fn della_magprune(delta: &mut [f32], rows: usize, density: f32, epsilon: f32, rng: &mut impl Rng) {
    let cols = delta.len() / rows;
    let mut order: Vec<usize> = Vec::with_capacity(cols);
    for row in delta.chunks_mut(cols.max(1)) {
        order.clear();
        order.extend(0..row.len());
        order.sort_by(|&a, &b| {
            (row[a].abs(), a)
                .partial_cmp(&(row[b].abs(), b))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let span = (row.len().max(2) - 1) as f64;
        for (rank, &i) in order.iter().enumerate() {
            let p = (density - epsilon) as f64 + 2.0 * epsilon as f64 * rank as f64 / span;
            if !rng.gen_bool(p.clamp(0.0, 1.0)) {
                row[i] = 0.0;
            }
        }
    }
}

fn norm_of(x: &[f32], norm: Norm) -> f64 {
    match norm {
        Norm::L1 => x.iter().map(|v| v.abs() as f64).sum(),
        Norm::L2 => x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt(),
        Norm::Linf => x.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)),
    }
}

/// How TIES elects each entry's sign across the task vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignElection {
    /// The sign of the sum of the deltas (TIES' rule; peft `"total"`, mergekit `"sum"`).
    Total,
    /// The sign held by more deltas (peft `"frequency"`, mergekit `"count"`).
    Frequency,
}

/// The elected sign of every entry, `+1` or `−1` (a tie or a zero sum elects `+1`, as both
/// tools' `>= 0` does). `deltas` are equally long.
pub fn elect_signs(deltas: &[&[f32]], method: SignElection) -> Vec<f32> {
    let n = deltas.first().map_or(0, |d| d.len());
    (0..n)
        .map(|i| {
            let s: f32 = match method {
                SignElection::Total => deltas.iter().map(|d| d[i]).sum(),
                SignElection::Frequency => deltas.iter().map(|d| sign(d[i])).sum(),
            };
            if s >= 0.0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect()
}

/// `torch.sign`: 0 for 0.
pub fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Whether delta entry `x` agrees with the elected sign (`sign(x) == elected`: a zero never does).
pub fn agrees(x: f32, elected: f32) -> bool {
    sign(x) == elected
}

/// A generator for the random masks of one tensor of one input, so that a merge is
/// reproducible from its seed whatever order tensors are visited in. torch's generator
/// (which peft and mergekit draw DARE's masks from) is not reproduced: the masks are tested
/// statistically, and exactly at density 1.
pub fn mask_rng(seed: u64, tensor: &str, input: usize) -> rand::rngs::StdRng {
    // FNV-1a over the name: stable across runs and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tensor.bytes().chain((input as u64).to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    rand::rngs::StdRng::seed_from_u64(seed ^ h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> rand::rngs::StdRng {
        mask_rng(0, "t", 0)
    }

    #[test]
    fn magnitude_keeps_the_largest_as_each_tool_counts_them() {
        let mut d = vec![0.1, -0.5, 0.3, -0.2, 0.05];
        let m = Sparsify::Magnitude(MagnitudeCount::Peft);
        sparsify(&mut d, 1, 0.4, m, Rescale::None, &mut rng()).unwrap();
        assert_eq!(d, vec![0.0, -0.5, 0.3, 0.0, 0.0]);
        // ⌊0.1·5⌋ = 0: peft keeps nothing, mergekit one.
        let mut d = vec![0.1, -0.5, 0.3];
        sparsify(&mut d, 1, 0.1, m, Rescale::None, &mut rng()).unwrap();
        assert_eq!(d, vec![0.0; 3]);
        let mut d = vec![0.1, -0.5, 0.3];
        let mk = Sparsify::Magnitude(MagnitudeCount::Mergekit);
        sparsify(&mut d, 1, 0.1, mk, Rescale::None, &mut rng()).unwrap();
        assert_eq!(d, vec![0.0, -0.5, 0.0]);
    }

    #[test]
    fn l1_rescale_restores_the_norm() {
        // Kept: -4, 3 (sum 7) of a total 10: scaled by 10/7.
        let mut d = vec![1.0, -4.0, 3.0, 2.0];
        let mk = Sparsify::Magnitude(MagnitudeCount::Mergekit);
        sparsify(&mut d, 1, 0.5, mk, Rescale::Norm(Norm::L1), &mut rng()).unwrap();
        let s = 10.0 / 7.0;
        assert_eq!(d, vec![0.0, -4.0 * s, 3.0 * s, 0.0]);
    }

    #[test]
    fn breadcrumbs_drops_outliers_and_the_smallest() {
        // 10 entries |x| = 1..10, density 0.5, gamma 0.2: drop the two largest (10, 9) and
        // the three smallest (1, 2, 3), keep 4..=8.
        let mut d: Vec<f32> = (1..=10)
            .map(|i| if i % 2 == 0 { i as f32 } else { -(i as f32) })
            .collect();
        let m = Sparsify::MagnitudeOutliers { gamma: 0.2 };
        sparsify(&mut d, 1, 0.5, m, Rescale::None, &mut rng()).unwrap();
        let kept: Vec<f32> = d.iter().map(|x| x.abs()).filter(|x| *x > 0.0).collect();
        assert_eq!(kept, vec![4.0, 5.0, 6.0, 7.0, 8.0]);
    }

    #[test]
    fn random_keeps_density_in_expectation_and_rescales() {
        let n = 200_000;
        let mut d = vec![1.0f32; n];
        sparsify(
            &mut d,
            1,
            0.3,
            Sparsify::Random,
            Rescale::Factor(1.0 / 0.3),
            &mut rng(),
        )
        .unwrap();
        let kept = d.iter().filter(|x| **x != 0.0).count() as f64 / n as f64;
        // Binomial sd = sqrt(0.3·0.7/n) ≈ 0.001: 5 sd.
        assert!((kept - 0.3).abs() < 0.005, "kept {kept}");
        assert!(d.iter().all(|x| *x == 0.0 || (*x - 1.0 / 0.3).abs() < 1e-6));
        // The same seed and name give the same mask; another name another.
        let mask = |name: &str| {
            let mut d = vec![1.0f32; 64];
            sparsify(
                &mut d,
                1,
                0.5,
                Sparsify::Random,
                Rescale::None,
                &mut mask_rng(7, name, 0),
            )
            .unwrap();
            d
        };
        assert_eq!(mask("a"), mask("a"));
        assert_ne!(mask("a"), mask("b"));
    }

    #[test]
    fn della_keeps_large_entries_more_often() {
        let cols = 1000;
        let rows = 200;
        let mut d: Vec<f32> = (0..rows * cols).map(|i| (i % cols) as f32 + 1.0).collect();
        let m = Sparsify::DellaMagprune { epsilon: 0.2 };
        sparsify(&mut d, rows, 0.5, m, Rescale::None, &mut rng()).unwrap();
        let kept_at =
            |c: usize| (0..rows).filter(|r| d[r * cols + c] != 0.0).count() as f64 / rows as f64;
        // Smallest rank: p = 0.3; largest: 0.7 (sd ≈ 0.032 over 200 rows).
        let low = (0..50).map(kept_at).sum::<f64>() / 50.0;
        let high = (cols - 50..cols).map(kept_at).sum::<f64>() / 50.0;
        assert!((low - 0.31).abs() < 0.03, "low {low}");
        assert!((high - 0.69).abs() < 0.03, "high {high}");
        let mut d = vec![1.0; 4];
        assert!(sparsify(&mut d, 1, 0.9, m, Rescale::None, &mut rng()).is_err());
    }

    #[test]
    fn density_one_is_a_no_op_and_zero_an_error() {
        let mut d = vec![1.0, -2.0];
        sparsify(
            &mut d,
            1,
            1.0,
            Sparsify::Random,
            Rescale::Factor(5.0),
            &mut rng(),
        )
        .unwrap();
        assert_eq!(d, vec![1.0, -2.0]);
        let err =
            sparsify(&mut d, 1, 0.0, Sparsify::Random, Rescale::None, &mut rng()).unwrap_err();
        assert!(err.to_string().contains("(0, 1]"));
    }

    #[test]
    fn signs_are_elected_by_total_or_by_count() {
        let a = [3.0, 1.0, 0.0];
        let b = [-1.0, -0.5, 0.0];
        let c = [-1.0, -0.7, 0.0];
        let d: Vec<&[f32]> = vec![&a, &b, &c];
        assert_eq!(elect_signs(&d, SignElection::Total), vec![1.0, -1.0, 1.0]);
        assert_eq!(
            elect_signs(&d, SignElection::Frequency),
            vec![-1.0, -1.0, 1.0]
        );
        assert!(!agrees(0.0, 1.0));
    }
}
