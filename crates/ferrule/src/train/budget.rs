//! A run's length given as a budget rather than steps: `max_tokens` (planned into steps before
//! the first one, so the learning-rate schedule spans them) and `max_seconds` (a wall-clock
//! limit checked after each step, as PyTorch Lightning's `max_time`).

use std::time::Instant;

use anyhow::{bail, Result};

use super::batching::{Batching, DataCursor};
use super::config::MAX_EPOCHS;

/// Optimizer steps until the run has trained on `tokens` tokens: the first step whose global
/// micro-batches (`world` micro-batches each, `grad_accum` of them per step) bring the sum of
/// their records' lengths to `tokens` or more, in the seeded order the trainer takes them
/// ([`DataCursor::next`]), from the run's first record. Padding is not counted: `lengths` are
/// the records' token counts.
///
/// Errors when the budget needs more than [`MAX_EPOCHS`] passes over the data.
pub fn steps_for_tokens(
    batching: Batching,
    seed: u64,
    lengths: &[usize],
    world: usize,
    grad_accum: usize,
    tokens: u64,
) -> Result<usize> {
    let per_epoch: u64 = lengths.iter().map(|&l| l as u64).sum();
    if per_epoch == 0 || tokens as f64 / per_epoch as f64 > MAX_EPOCHS {
        bail!("train: max_tokens = {tokens} needs more than {MAX_EPOCHS} passes over the data's {per_epoch} tokens")
    }
    let mut cursor = DataCursor::new(batching, seed, lengths.to_vec(), 0, 0)?;
    let (mut seen, mut steps) = (0u64, 0usize);
    while seen < tokens {
        for _ in 0..grad_accum.max(1) {
            let group = cursor.next(world);
            seen += group
                .iter()
                .flatten()
                .map(|&i| lengths[i] as u64)
                .sum::<u64>();
        }
        steps += 1;
    }
    Ok(steps)
}

/// The wall-clock budget of `max_seconds`: training time of this invocation (from its first
/// step) plus what earlier invocations of the run recorded in their checkpoints.
pub struct TimeBudget {
    limit: Option<f64>,
    before: f64,
    started: Option<Instant>,
}

/// The checkpoint key (`TrainerState::extra`) holding the training seconds so far.
pub const TRAIN_SECONDS_KEY: &str = "train_seconds";

impl TimeBudget {
    /// `limit` seconds in all (none: no limit), `before` of them spent by earlier invocations.
    pub fn new(limit: Option<f64>, before: f64) -> TimeBudget {
        TimeBudget {
            limit,
            before,
            started: None,
        }
    }

    /// Starts this invocation's clock (before its first step; later calls do nothing).
    pub fn start(&mut self) {
        self.started.get_or_insert_with(Instant::now);
    }

    /// Training seconds of the run so far.
    pub fn seconds(&self) -> f64 {
        self.before + self.started.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    /// Whether the limit is reached.
    pub fn spent(&self) -> bool {
        self.limit.is_some_and(|l| self.seconds() >= l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records of 10, 20, 30, 40 tokens, two per micro-batch: an epoch is 100 tokens in two
    /// micro-batches whose sums depend on the seeded order; counted by hand from that order.
    #[test]
    fn token_budget_counts_the_steps_that_reach_it() {
        let lengths = [10, 20, 30, 40];
        let b = Batching::Records(2);
        let order = super::super::batching::plan_epoch(b, 7, 0, &lengths);
        let first: u64 = order[0].iter().map(|&i| lengths[i] as u64).sum();
        // One micro-batch per step.
        assert_eq!(steps_for_tokens(b, 7, &lengths, 1, 1, 1).unwrap(), 1);
        assert_eq!(steps_for_tokens(b, 7, &lengths, 1, 1, first).unwrap(), 1);
        assert_eq!(
            steps_for_tokens(b, 7, &lengths, 1, 1, first + 1).unwrap(),
            2
        );
        assert_eq!(steps_for_tokens(b, 7, &lengths, 1, 1, 100).unwrap(), 2);
        // The second epoch begins with its own order's first micro-batch.
        assert_eq!(steps_for_tokens(b, 7, &lengths, 1, 1, 101).unwrap(), 3);
        // Two micro-batches per step (accumulation, or two ranks): one step is the epoch.
        assert_eq!(steps_for_tokens(b, 7, &lengths, 1, 2, 100).unwrap(), 1);
        assert_eq!(steps_for_tokens(b, 7, &lengths, 2, 1, 100).unwrap(), 1);
        assert_eq!(steps_for_tokens(b, 7, &lengths, 2, 1, 101).unwrap(), 2);
    }

    #[test]
    fn token_budget_beyond_the_epoch_limit_is_an_error() {
        let e = steps_for_tokens(Batching::Records(1), 0, &[1], 1, 1, u64::MAX).unwrap_err();
        assert!(e.to_string().contains("max_tokens"), "{e}");
    }

    #[test]
    fn time_budget_adds_earlier_invocations() {
        let mut t = TimeBudget::new(Some(5.0), 4.0);
        assert!(!t.spent());
        assert_eq!(t.seconds(), 4.0);
        t.start();
        assert!(t.seconds() >= 4.0);
        assert!(TimeBudget::new(Some(5.0), 5.0).spent());
        assert!(!TimeBudget::new(None, 1e9).spent());
    }
}
