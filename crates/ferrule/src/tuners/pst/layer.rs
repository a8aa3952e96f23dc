//! The PST linear layer (Li et al. 2022, "Parameter-Efficient Sparsity for Large Language
//! Models Fine-Tuning", IJCAI; reference alibaba/AliceMind `S4/PST/pst/sparse.py`
//! `SparseLinear.forward`, `SparseBinarizer`), for a frozen `W: [out, in]` and bias `b`:
//!
//! - `W̃ = W + β·U V`, `U: [out, r_w]`, `V: [r_w, in]`;
//! - `S = |W̃| + α1·A B + α2·(R 1ᵀ + 1 Cᵀ)`, `A: [out, r_m]`, `B: [r_m, in]`, `R: [out]`,
//!   `C: [in]` (`R.unsqueeze(1) + C.unsqueeze(0)`: R scores rows, C columns);
//! - `M` zeroes the `⌊sparsity · out · in⌋` lowest scores of the matrix (`int(numel ·
//!   sparsity)` entries of `argsort(S)`), ones elsewhere;
//! - `y = (M ⊙ W̃) x + b`, with the straight-through estimator `∂L/∂S = ∂L/∂M`
//!   (`SparseBinarizer.backward` returns the incoming gradient), so `U` and `V` learn through
//!   both `W̃` and `|W̃|` inside `S`.
//!
//! Ties in the scores: the reference's `torch.argsort` (not stable) leaves their order
//! unspecified; here the lower flat index (row-major) is pruned first. `|W̃|`'s gradient is
//! `sign(W̃)`, 0 at 0, as torch's `abs`.

use std::sync::Arc;

use candle_core::{Result, Tensor, Var};

use super::config::PstConfig;
use crate::model::Linear;
use crate::ops::FrozenLinear;
use crate::tuners::training_clock::TrainingClock;
use crate::tuners::MaskedWeight;

/// The sparsity at optimizer step `step` of a run of `total` steps: the reference's
/// `schedule_sparsity_ratio` (pst/utils.py) with its f64 arithmetic in its order, so the
/// value is the same double. `initial_sparsity` until `initial_warmup · total`, the target
/// after `total − final_warmup · total`, between them the cubic
/// `s_f + (s_i − s_f)(1 − (step − w)/(total − (w + f)))³` (Zhu & Gupta 2017's schedule).
pub fn scheduled_sparsity(step: u64, total: u64, c: &PstConfig) -> f64 {
    let (step, total) = (step as f64, total as f64);
    let (initial, target) = (c.initial_sparsity, c.sparsity);
    if step <= c.initial_warmup * total {
        initial
    } else if step > total - c.final_warmup * total {
        target
    } else {
        let warmup = c.initial_warmup * total;
        let outside = (c.final_warmup + c.initial_warmup) * total;
        let rest = 1.0 - (step - warmup) / (total - outside);
        target + (initial - target) * rest.powf(3.0)
    }
}

/// The sparsity every PST layer of one adapter runs at, shared by its layers.
#[derive(Debug)]
pub struct SparsitySchedule {
    pub config: PstConfig,
}

impl SparsitySchedule {
    /// In a training run ([`TrainingClock::total_steps`] known), the schedule at the clock's
    /// optimizer step: the step being taken while training, the steps done in an evaluation
    /// between steps (the reference updates `cur_sparsity` after each step). Outside a run
    /// (an adapter loaded to evaluate, generate or merge), the target `sparsity`, which the
    /// schedule reaches at the run's last step.
    pub fn current(&self, clock: &TrainingClock) -> f64 {
        match clock.total_steps() {
            Some(total) => scheduled_sparsity(clock.optimizer_step(), total, &self.config),
            None => self.config.sparsity,
        }
    }
}

/// Entries pruned of a matrix of `elements` at `sparsity`: `int(numel * sparsity)` in f64,
/// as `SparseBinarizer.forward`.
pub fn pruned_count(elements: usize, sparsity: f64) -> usize {
    (elements as f64 * sparsity).floor() as usize
}

/// `M` for `scores`: 0 at the `pruned` lowest scores (ties: lower index first), 1 elsewhere.
/// A NaN score is an error (it has no place in the order).
pub fn keep_mask(scores: &[f32], pruned: usize) -> Result<Vec<f32>> {
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        candle_core::bail!("pst: the mask score at flat index {i} is NaN")
    }
    let mut mask = vec![1f32; scores.len()];
    if pruned == 0 {
        return Ok(mask);
    }
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    let by_score = |a: &u32, b: &u32| {
        let (x, y) = (scores[*a as usize], scores[*b as usize]);
        x.partial_cmp(&y).expect("no NaN").then(a.cmp(b))
    };
    // A total order, so the set of the `pruned` first is unique: no full sort needed.
    if pruned < order.len() {
        order.select_nth_unstable_by(pruned, by_score);
    }
    for &i in &order[..pruned.min(order.len())] {
        mask[i as usize] = 0.0;
    }
    Ok(mask)
}

/// A PST layer's trained tensors (`Var`s in a layer, their values in a merge).
#[derive(Clone, Debug)]
pub struct Factors {
    /// `U: [out, r_w]`, `V: [r_w, in]`.
    pub u: Tensor,
    pub v: Tensor,
    /// `A: [out, r_m]`, `B: [r_m, in]`.
    pub a: Tensor,
    pub b: Tensor,
    /// `R: [out]`, `C: [in]`.
    pub r: Tensor,
    pub c: Tensor,
}

/// β, α1, α2.
#[derive(Clone, Copy, Debug)]
pub struct Scales {
    pub beta: f64,
    pub alpha1: f64,
    pub alpha2: f64,
}

/// `M ⊙ W̃` for the frozen `w: [out, in]` (f32) at `sparsity` (formulas in the module doc),
/// differentiable in the factors, `M` passing its gradient to `S` unchanged. The forward pass
/// and the merge both call it, so a merged weight is the one the layer used.
pub fn masked_weight(w: &Tensor, f: &Factors, s: Scales, sparsity: f64) -> Result<Tensor> {
    // `β * U @ V` in Python is `(β U) V`; the same product here.
    let wt = (w + (&f.u * s.beta)?.matmul(&f.v)?)?;
    let abs = (&wt * wt.detach().sign()?)?;
    let low_rank = (&f.a * s.alpha1)?.matmul(&f.b)?;
    let rows_cols = f.r.unsqueeze(1)?.broadcast_add(&f.c.unsqueeze(0)?)?;
    let scores = ((abs + low_rank)? + (rows_cols * s.alpha2)?)?;
    let fixed = scores.detach();
    let values: Vec<f32> = fixed.flatten_all()?.to_vec1()?;
    let mask = keep_mask(&values, pruned_count(values.len(), sparsity))?;
    let mask = Tensor::from_vec(mask, scores.shape(), scores.device())?;
    // The straight-through estimator: the value is M, the gradient S's.
    let ste = ((scores - fixed)? + mask)?;
    ste * wt
}

/// A frozen linear whose weight PST updates and prunes.
pub struct PstLinear {
    pub base: FrozenLinear,
    /// `U, V, A, B, R, C` as trainable tensors.
    pub factors: Factors,
    pub scales: Scales,
    pub schedule: Arc<SparsitySchedule>,
    pub clock: Arc<TrainingClock>,
}

impl PstLinear {
    /// The layer's tensors from its `Var`s (order `U, V, A, B, R, C`).
    pub fn factors_of(vars: [&Var; 6]) -> Factors {
        let [u, v, a, b, r, c] = vars.map(|v| v.as_tensor().clone());
        Factors { u, v, a, b, r, c }
    }
}

impl Linear for PstLinear {
    /// `x: [.., in]` → `[.., out]`: `x (M ⊙ W̃)ᵀ + b` at the schedule's sparsity.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.base.weight().to_dense(x.device())?;
        let sparsity = self.schedule.current(&self.clock);
        let weight = masked_weight(&w, &self.factors, self.scales, sparsity)?;
        candle_core::Module::forward(
            &candle_nn::Linear::new(weight, self.base.bias().cloned()),
            x,
        )
    }
}

/// A merge's `W' = M ⊙ W̃` for one layer ([`crate::tuners::Update::Masked`]).
pub struct PstMerge {
    pub dims: Vec<usize>,
    pub factors: Factors,
    pub scales: Scales,
    pub sparsity: f64,
}

impl MaskedWeight for PstMerge {
    fn dims(&self) -> Vec<usize> {
        self.dims.clone()
    }

    fn apply(&self, w: &Tensor) -> Result<Tensor> {
        Ok(masked_weight(w, &self.factors, self.scales, self.sparsity)?.detach())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    fn config(initial: f64, target: f64) -> PstConfig {
        let mut c: PstConfig = serde_json::from_value(serde_json::json!({})).unwrap();
        (c.initial_sparsity, c.sparsity) = (initial, target);
        c
    }

    #[test]
    fn the_schedule_holds_rises_cubically_and_holds_again() {
        // 100 steps, the defaults: flat to step 10, the target after step 70.
        let c = config(0.0, 0.9);
        assert_eq!(scheduled_sparsity(0, 100, &c), 0.0);
        assert_eq!(scheduled_sparsity(10, 100, &c), 0.0);
        assert_eq!(scheduled_sparsity(71, 100, &c), 0.9);
        assert_eq!(scheduled_sparsity(100, 100, &c), 0.9);
        // Step 40 is halfway: 0.9 + (0 − 0.9)·0.5³ = 0.7875 (by hand).
        assert!((scheduled_sparsity(40, 100, &c) - 0.7875).abs() < 1e-12);
        // Step 70 is the rise's end, still inside it: 0.9 exactly from the formula.
        assert!((scheduled_sparsity(70, 100, &c) - 0.9).abs() < 1e-12);
        let rising: Vec<f64> = (10..=70).map(|s| scheduled_sparsity(s, 100, &c)).collect();
        assert!(rising.windows(2).all(|w| w[0] <= w[1]), "{rising:?}");
        // From an initial sparsity.
        let c = config(0.2, 0.6);
        assert_eq!(scheduled_sparsity(5, 100, &c), 0.2);
        assert!((scheduled_sparsity(40, 100, &c) - (0.6 - 0.4 * 0.125)).abs() < 1e-12);
    }

    #[test]
    fn the_mask_prunes_the_lowest_scores_and_breaks_ties_by_index() {
        let scores = [0.5f32, -1.0, 0.2, 0.2, 3.0, 0.2];
        assert_eq!(
            keep_mask(&scores, 3).unwrap(),
            vec![1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
        );
        assert_eq!(keep_mask(&scores, 0).unwrap(), vec![1.0; 6]);
        assert_eq!(keep_mask(&scores, 6).unwrap(), vec![0.0; 6]);
        assert_eq!(pruned_count(4096, 0.55), 2252);
        assert_eq!(pruned_count(10, 0.0), 0);
        let e = keep_mask(&[1.0, f32::NAN], 1).unwrap_err().to_string();
        assert!(e.contains("flat index 1 is NaN"), "{e}");
    }

    /// By hand on a 2 × 2 weight: the value, and the straight-through gradient reaching R and
    /// C (∂L/∂S = ∂L/∂M = ∂L/∂(M ⊙ W̃) ⊙ W̃) and U through both paths.
    #[test]
    fn the_masked_weight_and_its_gradients_by_hand() {
        let dev = Device::Cpu;
        let t = |v: &[f32], shape: &[usize]| {
            Var::from_tensor(&Tensor::from_slice(v, shape, &dev).unwrap()).unwrap()
        };
        let w = Tensor::from_slice(&[1f32, -2.0, 0.5, 4.0], (2, 2), &dev).unwrap();
        let (u, v) = (t(&[1.0, 0.0], &[2, 1]), t(&[0.25, 0.0], &[1, 2]));
        let (a, b) = (t(&[0.0, 0.0], &[2, 1]), t(&[0.0, 0.0], &[1, 2]));
        let (r, c) = (t(&[0.0, 0.0], &[2]), t(&[0.0, 0.0], &[2]));
        let f = PstLinear::factors_of([&u, &v, &a, &b, &r, &c]);
        let scales = Scales {
            beta: 2.0,
            alpha1: 1.0,
            alpha2: 1.0,
        };
        // W̃ = [[1.5, -2], [0.5, 4]]; S = |W̃|: 0.5 (index 2) is pruned at sparsity 0.25.
        let m = masked_weight(&w, &f, scales, 0.25).unwrap();
        assert_eq!(
            m.to_vec2::<f32>().unwrap(),
            vec![vec![1.5, -2.0], vec![0.0, 4.0]]
        );
        let grads = m.sum_all().unwrap().backward().unwrap();
        let g = |v: &Var| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap();
        // ∂L/∂S = W̃: R gets row sums [-0.5, 4.5], C column sums [2, 2].
        assert_eq!(g(&r).to_vec1::<f32>().unwrap(), vec![-0.5, 4.5]);
        assert_eq!(g(&c).to_vec1::<f32>().unwrap(), vec![2.0, 2.0]);
        // ∂L/∂W̃ = M + sign(W̃) ⊙ W̃ = [[2.5, 3], [0.5, 5]]; ∂L/∂U = β (∂L/∂W̃) Vᵀ.
        assert_eq!(g(&u).to_vec1::<f32>().unwrap(), vec![1.25, 0.25]);
    }
}
