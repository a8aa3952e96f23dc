//! IST's layer scores and draws, as the reference computes them (antgroup/importance-aware-
//! sparse-tuning-IST-paper `ist.py`): the weighted draws of layers (lines 64-72), the rollouts'
//! distinct sets (103-107), their rewards and the score update (117-130).
//!
//! A layer's score `s_l` starts at 0. A high score means that suppressing the layer's adapter
//! did not raise the loss, i.e. the layer matters less: rollouts suppress layers drawn ∝ σ(s),
//! and each step trains layers drawn ∝ σ(−s).

use anyhow::{bail, Result};

use crate::train::rng::Rng;

/// σ(x) in f32, as torch's `sigmoid` on an f32 tensor.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The weights a rollout draws the layers it suppresses with: σ(s)
/// (`sampling_less_important_selection`).
pub fn suppression_weights(scores: &[f32]) -> Vec<f32> {
    scores.iter().map(|&s| sigmoid(s)).collect()
}

/// The weights a step draws the layers it trains with: σ(−s)
/// (`sampling_more_important_selection`).
pub fn training_weights(scores: &[f32]) -> Vec<f32> {
    scores.iter().map(|&s| sigmoid(-s)).collect()
}

/// `num` distinct indices of `weights`, drawn without replacement with probability ∝ weight,
/// sorted: `torch.sort(torch.multinomial(weights, num))[0]`. torch draws such a sample as the
/// `num` largest keys `w_i / E_i` with `E_i ~ Exp(1)` (ATen `multinomial`, its no-replacement
/// path), which picks each next index with probability `w_i / Σ_remaining w` (Efraimidis and
/// Spirakis 2006); so does this, from `rng`. A zero weight sorts last (torch refuses a draw of
/// more indices than nonzero weights; scores that far out need σ to underflow f32).
pub fn draw(weights: &[f32], num: usize, rng: &mut Rng) -> Vec<usize> {
    let mut keys: Vec<(f64, usize)> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            // E = −ln(1 − U), U in [0, 1): E in [0, ∞); E = 0 gives an infinite key.
            let e = -(1.0 - rng.uniform_f64()).ln();
            (w as f64 / e, i)
        })
        .collect();
    keys.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut chosen: Vec<usize> = keys.into_iter().take(num).map(|(_, i)| i).collect();
    chosen.sort_unstable();
    chosen
}

/// The sets of layers `rollouts` rollouts suppress: each `num` layers drawn ∝ σ(s), drawn again
/// while equal to an earlier rollout's (ist.py 103-107). The caller has checked that there are
/// at least `rollouts` such sets (`C(L, num)`); a draw that still finds no new set in 10,000
/// tries (scores so far apart that σ leaves almost no weight elsewhere) is an error.
pub fn rollout_sets(
    scores: &[f32],
    num: usize,
    rollouts: usize,
    rng: &mut Rng,
) -> Result<Vec<Vec<usize>>> {
    let weights = suppression_weights(scores);
    let mut sets: Vec<Vec<usize>> = Vec::with_capacity(rollouts);
    for k in 0..rollouts {
        let mut tries = 0;
        let set = loop {
            let set = draw(&weights, num, rng);
            if !sets.contains(&set) {
                break set;
            }
            tries += 1;
            if tries == 10_000 {
                bail!("ist: rollout {} of {rollouts}: 10000 draws of {num} layers repeated an earlier rollout's set (scores {scores:?}); the scores have drifted so far apart that almost all the weight is on one set", k + 1)
            }
        };
        sets.push(set);
    }
    Ok(sets)
}

/// The rollouts' rewards `R_k = e^{−loss_k} − mean_j e^{−loss_j}`, in f64 as ist.py's
/// `math.exp` and `np.mean` (lines 117-123).
pub fn rewards(losses: &[f64]) -> Vec<f64> {
    let r: Vec<f64> = losses.iter().map(|l| (-l).exp()).collect();
    let mean = r.iter().sum::<f64>() / r.len() as f64;
    r.iter().map(|x| x - mean).collect()
}

/// One score update from the rollouts' suppressed `sets` and their `losses` (ist.py 125-130):
/// `p = σ(s)` taken once, then for each rollout k and each layer i in `sets[k]`,
/// `s_i += R_k · p_i · (1 − p_i) · lr`. In f32 in torch's order: the f64 reward meets an f32
/// tensor element, so it is rounded to f32 first, and each product is an f32 product.
pub fn update(scores: &mut [f32], sets: &[Vec<usize>], losses: &[f64], lr: f64) {
    let p = suppression_weights(scores);
    let lr = lr as f32;
    for (set, reward) in sets.iter().zip(rewards(losses)) {
        for &i in set {
            scores[i] += reward as f32 * p[i] * (1.0 - p[i]) * lr;
        }
    }
}

/// `C(n, k)`, saturating at `usize::MAX`: how many distinct sets of `k` of `n` layers there are.
pub fn binomial(n: usize, k: usize) -> usize {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    let mut c: u128 = 1;
    for i in 0..k {
        c = c * (n - i) as u128 / (i + 1) as u128;
        if c > usize::MAX as u128 {
            return usize::MAX;
        }
    }
    c as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomials_count_distinct_sets() {
        assert_eq!(binomial(2, 1), 2);
        assert_eq!(binomial(4, 2), 6);
        assert_eq!(binomial(30, 15), 155_117_520);
        assert_eq!(binomial(3, 3), 1);
        assert_eq!(binomial(3, 0), 1);
        assert_eq!(binomial(1, 2), 0);
    }

    #[test]
    fn a_draw_is_sorted_distinct_and_skips_zero_weights_while_it_can() {
        let mut rng = Rng::seed_from_u64(7);
        for _ in 0..200 {
            let d = draw(&[0.5, 0.0, 0.2, 0.9, 0.0], 3, &mut rng);
            assert_eq!(d.len(), 3);
            assert!(d.windows(2).all(|w| w[0] < w[1]), "{d:?}");
            assert_eq!(d, vec![0, 2, 3], "only three layers have weight");
        }
    }

    #[test]
    fn rollout_sets_are_distinct_even_when_one_set_carries_most_weight() {
        let mut rng = Rng::seed_from_u64(1);
        // σ(6) ≈ 0.9975 against σ(−6) ≈ 0.0025: {0, 1} is drawn almost always.
        let sets = rollout_sets(&[6.0, 6.0, -6.0, -6.0], 2, 3, &mut rng).unwrap();
        assert_eq!(sets.len(), 3);
        assert!(sets[0] != sets[1] && sets[1] != sets[2] && sets[0] != sets[2]);
    }

    #[test]
    fn rewards_are_centred_and_update_moves_only_suppressed_layers() {
        let r = rewards(&[1.0, 2.0]);
        assert!((r[0] + r[1]).abs() < 1e-15);
        assert!((r[0] - ((-1f64).exp() - (-2f64).exp()) / 2.0).abs() < 1e-15);
        let mut s = [0f32; 3];
        update(&mut s, &[vec![0], vec![1]], &[1.0, 2.0], 10.0);
        // p = 0.5: Δ = R · 0.25 · 10.
        assert!((s[0] as f64 - r[0] * 2.5).abs() < 1e-6, "{s:?}");
        assert!((s[1] as f64 - r[1] * 2.5).abs() < 1e-6, "{s:?}");
        assert_eq!(s[2], 0.0, "a layer in no rollout keeps its score");
    }
}
