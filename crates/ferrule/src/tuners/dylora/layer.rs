//! The DyLoRA linear layer (Valipour et al. 2023; huawei-noah/Efficient-NLP
//! `DyLoRA/loralib/{layers.py,DyLoRA.py}`): LoRA's factors `A: [r, in]`, `B: [out, r]` run at a
//! rank `b` in `1..=r`,
//!
//! `y = W₀x + (α/b) · B[:, :b] A[:b] u`, `u = dropout(x)`.
//!
//! The reference scales by `α/r` (layers.py:124) and each truncated factor by `√(r/b)`
//! (DyLoRA.py:56-62), which is `α/b`. While training, `b` is drawn once per optimizer step for
//! every layer ([`RankChoice::training_rank`]); with `frozen`, components `< b` are detached
//! (DyLoRA.py:47-53), so only row `b` of A and column `b` of B learn. Outside training the
//! layer runs at the chosen rank (`r` unless `--rank` says otherwise).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor, Var};

use crate::model::Linear;
use crate::ops::low_rank::low_rank_linear;
use crate::ops::FrozenLinear;
use crate::train::rng::Rng;
use crate::tuners::training_clock::{dropout_mask, TrainingClock};

/// The rank every layer of one adapter runs at: drawn per optimizer step while training, the
/// chosen one otherwise. Shared by the tuner and its layers.
#[derive(Debug)]
pub struct RankChoice {
    /// `r`, the largest rank.
    pub max: usize,
    /// The rank outside training (`1..=max`; `max` until [`RankChoice::choose`]).
    chosen: AtomicUsize,
}

impl RankChoice {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            chosen: AtomicUsize::new(max),
        }
    }

    /// The rank outside training.
    pub fn chosen(&self) -> usize {
        self.chosen.load(Ordering::Relaxed)
    }

    /// Sets the rank outside training; the caller has checked `1..=max`.
    pub fn choose(&self, rank: usize) {
        self.chosen.store(rank, Ordering::Relaxed)
    }

    /// The reference's draw (run_glue.py `callback_step.on_step_begin`:
    /// `torch.randint(0, r)`, then `set_rank` keeps that many + 1 components): `b` uniform in
    /// `1..=r`, here a pure function of the run's seed and the optimizer step, so every layer,
    /// micro-batch and rank of a step, and a resumed run, draws the same `b`.
    pub fn training_rank(&self, clock: &TrainingClock) -> usize {
        let mut rng = Rng::seed_from_u64(clock.optimizer_step_seed("dylora rank"));
        1 + rng.below(self.max as u64) as usize
    }

    /// The rank a forward pass runs at now.
    pub fn current(&self, clock: &TrainingClock) -> usize {
        match clock.training() {
            true => self.training_rank(clock),
            false => self.chosen(),
        }
    }
}

/// `(A[:b], B[:, :b])`; with `detach_lower`, components `< b` carry no gradient (the frozen
/// variant: `torch.cat([inputs[:, :b-1].detach(), inputs[:, b-1]])`, DyLoRA.py:48-53).
pub fn truncated(
    a: &Tensor,
    b: &Tensor,
    rank: usize,
    detach_lower: bool,
) -> Result<(Tensor, Tensor)> {
    let (a_b, b_b) = (a.narrow(0, 0, rank)?, b.narrow(1, 0, rank)?);
    if !detach_lower || rank == 1 {
        return Ok((a_b, b_b));
    }
    let a_b = Tensor::cat(
        &[
            &a.narrow(0, 0, rank - 1)?.detach(),
            &a.narrow(0, rank - 1, 1)?,
        ],
        0,
    )?;
    let b_b = Tensor::cat(
        &[
            &b.narrow(1, 0, rank - 1)?.detach(),
            &b.narrow(1, rank - 1, 1)?,
        ],
        1,
    )?;
    Ok((a_b, b_b))
}

/// A frozen linear plus DyLoRA's update at the current rank.
pub struct DyloraLinear {
    pub path: String,
    pub base: FrozenLinear,
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
    pub alpha: f64,
    /// Detach components below the step's rank while training.
    pub frozen: bool,
    pub dropout: f64,
    pub clock: Arc<TrainingClock>,
    pub rank: Arc<RankChoice>,
}

impl Linear for DyloraLinear {
    /// `x: [.., in]` → `[.., out]`: LoRA's fused low-rank op on the truncated factors, whose
    /// gradients candle carries back into the full `A` and `B`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let training = self.clock.training();
        let mask = match training {
            true => dropout_mask(x, self.dropout, self.clock.dropout_seed(&self.path))?,
            false => None,
        };
        let rank = self.rank.current(&self.clock);
        let (a, b) = truncated(
            self.a.as_tensor(),
            self.b.as_tensor(),
            rank,
            training && self.frozen,
        )?;
        low_rank_linear(
            x,
            mask.as_ref(),
            &self.base,
            &a,
            &b,
            self.alpha / rank as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    #[test]
    fn frozen_truncation_trains_only_the_last_component() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(
            &Tensor::arange(0f32, 12.0, &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        )
        .unwrap();
        let b = Var::from_tensor(
            &Tensor::arange(0f32, 6.0, &dev)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
        )
        .unwrap();
        for (frozen, trained_rows) in [
            (true, vec![false, true, false]),
            (false, vec![true, true, false]),
        ] {
            let (ta, tb) = truncated(a.as_tensor(), b.as_tensor(), 2, frozen).unwrap();
            assert_eq!(
                ta.to_vec2::<f32>().unwrap(),
                vec![vec![0.0, 1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0, 7.0]]
            );
            assert_eq!(
                tb.to_vec2::<f32>().unwrap(),
                vec![vec![0.0, 1.0], vec![3.0, 4.0]]
            );
            let grads = (tb.matmul(&ta).unwrap())
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let ga = grads.get(a.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            let gb = grads.get(b.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            for (k, trained) in trained_rows.iter().enumerate() {
                let row_moves = ga[k].iter().any(|g| *g != 0.0);
                let col_moves = gb.iter().any(|row| row[k] != 0.0);
                assert_eq!(
                    (row_moves, col_moves),
                    (*trained, *trained),
                    "frozen {frozen}, component {k}"
                );
            }
        }
    }

    #[test]
    fn the_training_rank_is_uniform_in_one_to_r_and_a_function_of_seed_and_step() {
        let clock = TrainingClock::new(7);
        let choice = RankChoice::new(4);
        let mut counts = [0usize; 5];
        for step in 0..4000 {
            clock.set_optimizer_step(step);
            let b = choice.training_rank(&clock);
            counts[b] += 1;
            clock.set_step(step * 3 + 1); // micro-steps do not move it
            assert_eq!(choice.training_rank(&clock), b);
        }
        assert_eq!(counts[0], 0);
        assert!(
            counts[1..].iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
        clock.set_optimizer_step(11);
        let again = TrainingClock::new(7);
        again.set_optimizer_step(11);
        assert_eq!(choice.training_rank(&clock), choice.training_rank(&again));
    }
}
