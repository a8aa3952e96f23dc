//! How an epoch's records become micro-batches, and how many optimizer steps that makes.
//!
//! Three ways to form a micro-batch ([`Batching`]):
//! * a fixed number of records (`batch_size`, the default), in the seeded order;
//! * a token budget (`batch_tokens`): consecutive records in the seeded order, as many as fit;
//! * packing (`packing`): the epoch's records bin-packed into budgets of `batch_tokens` tokens
//!   (default `batch_size × max_len`) by best-fit decreasing, the bins then in seeded order.
//!   This is what TRL's `packing=True` with `padding_free=True` does with its default
//!   `packing_strategy="bfd"` (trl/data_utils.py `_pack_bfd`), except that a ferrule bin is a
//!   whole micro-batch rather than one row of it; with padding-free batches a micro-batch is
//!   one row anyway.
//!
//! Token budgets need padding-free batches, so that every record keeps its own attention and
//! positions ([`crate::data::pack`]): packing never lets a record attend to another.
//!
//! The [`DataCursor`] walks the micro-batches of one epoch after another; its position, the
//! number of records consumed in the current epoch, is what a checkpoint stores.

use anyhow::{bail, Result};

use super::config::TrainConfig;
use super::rng::{stream, Rng};
use crate::data::best_fit_decreasing;

/// How micro-batches are formed (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batching {
    /// `batch_size` records per micro-batch.
    Records(usize),
    /// Consecutive records of at most this many tokens in all.
    Tokens(usize),
    /// Bins of at most this many tokens, packed by best-fit decreasing.
    Packed(usize),
}

impl Batching {
    /// The batching `cfg` asks for, for records of at most `max_len` tokens. Errors when a
    /// token budget is smaller than `max_len` (a record of `max_len` tokens would fit no
    /// micro-batch); the other conflicts are [`TrainConfig::validate`]'s.
    pub fn of(cfg: &TrainConfig, max_len: usize) -> Result<Batching> {
        let batching = match (cfg.packing, cfg.batch_tokens) {
            (false, None) => return Ok(Batching::Records(cfg.batch_size())),
            (false, Some(t)) => Batching::Tokens(t),
            (true, Some(t)) => Batching::Packed(t),
            (true, None) => Batching::Packed(cfg.batch_size() * max_len),
        };
        let budget = batching.budget().unwrap_or(0);
        if budget < max_len {
            bail!(
                "train: batch_tokens = {budget} is smaller than max_len = {max_len}: a record of max_len tokens would fit no \
                 micro-batch; raise --batch-tokens to at least {max_len} or lower --max-len"
            )
        }
        Ok(batching)
    }

    /// The token budget of a micro-batch, `None` for [`Batching::Records`].
    pub fn budget(self) -> Option<usize> {
        match self {
            Batching::Records(_) => None,
            Batching::Tokens(t) | Batching::Packed(t) => Some(t),
        }
    }

    /// The micro-batches of one epoch, as indices into `lengths` (the records' token counts),
    /// given the epoch's seeded `order` (a permutation of the indices). Packed bins are put in
    /// the order of `bin_rng`'s shuffle.
    pub fn epoch_batches(
        self,
        order: &[usize],
        lengths: &[usize],
        bin_rng: Rng,
    ) -> Vec<Vec<usize>> {
        match self {
            Batching::Records(b) => order.chunks(b.max(1)).map(<[usize]>::to_vec).collect(),
            Batching::Tokens(budget) => {
                let mut batches: Vec<Vec<usize>> = Vec::new();
                let mut used = 0;
                for &i in order {
                    match batches.last_mut() {
                        Some(last) if used + lengths[i] <= budget => last.push(i),
                        _ => {
                            batches.push(vec![i]);
                            used = 0;
                        }
                    }
                    used += lengths[i];
                }
                batches
            }
            Batching::Packed(budget) => {
                let mut bins = best_fit_decreasing(order, lengths, budget);
                let mut rng = bin_rng;
                rng.shuffle(&mut bins);
                bins
            }
        }
    }

    /// One line on how micro-batches are formed, with the first epoch's figures.
    pub fn describe(self, first_epoch: &[Vec<usize>], lengths: &[usize]) -> String {
        let tokens: usize = lengths.iter().sum();
        match self {
            Batching::Records(b) => format!("{b} records per micro-batch ({} per epoch)", first_epoch.len()),
            Batching::Tokens(t) => format!(
                "consecutive records of at most {t} tokens per micro-batch ({} per epoch, {:.1} records and {:.1}% of the budget on average)",
                first_epoch.len(),
                lengths.len() as f64 / first_epoch.len() as f64,
                100.0 * tokens as f64 / (first_epoch.len() * t) as f64
            ),
            Batching::Packed(t) => format!(
                "packed: {} records in {} bin{} of at most {t} tokens, one bin per micro-batch (best-fit decreasing, {:.1}% full)",
                lengths.len(),
                first_epoch.len(),
                if first_epoch.len() == 1 { "" } else { "s" },
                100.0 * tokens as f64 / (first_epoch.len() * t) as f64
            ),
        }
    }
}

/// The order of records in `epoch`: a seeded shuffle, a pure function of (seed, epoch).
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::seed_from_u64(seed)
        .fork(1_000 + epoch)
        .shuffle(&mut order);
    order
}

/// The micro-batches of `epoch`: a pure function of (batching, seed, epoch, lengths).
pub fn plan_epoch(batching: Batching, seed: u64, epoch: u64, lengths: &[usize]) -> Vec<Vec<usize>> {
    let order = epoch_order(seed, epoch, lengths.len());
    batching.epoch_batches(
        &order,
        lengths,
        Rng::seed_from_u64(seed)
            .fork(stream::PACKED_BINS)
            .fork(epoch),
    )
}

/// `ceil(x)`, except that a value within float error above a whole number is that number
/// (`1.1 × 10` is 11.000000000000002).
fn ceil_tolerant(x: f64) -> usize {
    (x - 1e-9 * x.abs().max(1.0)).ceil().max(0.0) as usize
}

/// Optimizer steps for `epochs` passes over the data from the start, each step `grad_accum`
/// global micro-batches of up to `world` micro-batches (cut short at an epoch's end), as
/// [`DataCursor::next`] takes them. At least 1. See [`steps_left`].
pub fn steps_for_epochs(
    batching: Batching,
    seed: u64,
    lengths: &[usize],
    epochs: f64,
    grad_accum: usize,
    world: usize,
) -> usize {
    steps_left(batching, seed, lengths, epochs, grad_accum, world, 0, 0).max(1)
}

/// Optimizer steps left until `epochs` passes over the data end, from micro-batch `index` of
/// `epoch` (a resumed run's cursor; with another `world` than the run had, the rest is counted
/// at the new one). A fractional last epoch ends after its share of that epoch's micro-batches,
/// rounded up.
#[allow(clippy::too_many_arguments)]
pub fn steps_left(
    batching: Batching,
    seed: u64,
    lengths: &[usize],
    epochs: f64,
    grad_accum: usize,
    world: usize,
    epoch: u64,
    index: usize,
) -> usize {
    global_left(batching, seed, lengths, epochs, world, epoch, index).div_ceil(grad_accum.max(1))
}

/// Global micro-batches (up to `world` micro-batches each, as [`DataCursor::next`] takes them)
/// left until `epochs` passes over the data end, from micro-batch `index` of `epoch`. The
/// trainer's last step takes only what is left of these, as transformers steps on the
/// remainder at the end.
pub fn global_left(
    batching: Batching,
    seed: u64,
    lengths: &[usize],
    epochs: f64,
    world: usize,
    epoch: u64,
    index: usize,
) -> usize {
    let world = world.max(1);
    let whole = epochs.floor() as u64;
    let frac = epochs - whole as f64;
    // Record and packed batches are the same number every epoch; a token budget's depend on the order.
    let fixed = matches!(batching, Batching::Records(_) | Batching::Packed(_))
        .then(|| plan_epoch(batching, seed, 0, lengths).len());
    let count = |e: u64| fixed.unwrap_or_else(|| plan_epoch(batching, seed, e, lengths).len());
    // Global micro-batches of epoch `e` from micro-batch `start` on (the last epoch: its share).
    let global_in = |e: u64, start: usize| {
        let end = if e == whole {
            ceil_tolerant(frac * count(e) as f64)
        } else {
            count(e)
        };
        end.saturating_sub(start).div_ceil(world)
    };
    let mut global = 0usize;
    if epoch < whole || (epoch == whole && frac > 0.0) {
        global += global_in(epoch, index);
        global += match fixed {
            Some(c) => c.div_ceil(world) * whole.saturating_sub(epoch + 1) as usize,
            None => (epoch + 1..whole).map(|e| count(e).div_ceil(world)).sum(),
        };
        if frac > 0.0 && epoch < whole {
            global += global_in(whole, 0);
        }
    }
    global
}

/// Where the next micro-batch starts in the seeded data order: the epoch, its micro-batches
/// and how many of them (and of its records) have been taken.
pub struct DataCursor {
    batching: Batching,
    seed: u64,
    lengths: Vec<usize>,
    epoch: u64,
    batches: Vec<Vec<usize>>,
    next: usize,
    consumed: usize,
    /// Global micro-batches [`DataCursor::take`] may still give (none: no limit).
    budget: Option<usize>,
}

impl DataCursor {
    /// A cursor at `epoch` after `position` of its records (a checkpoint's `epoch_position`).
    /// Errors when `position` does not fall between two micro-batches of that epoch.
    pub fn new(
        batching: Batching,
        seed: u64,
        lengths: Vec<usize>,
        epoch: u64,
        position: usize,
    ) -> Result<DataCursor> {
        let batches = plan_epoch(batching, seed, epoch, &lengths);
        let mut cursor = DataCursor {
            batching,
            seed,
            lengths,
            epoch,
            batches,
            next: 0,
            consumed: 0,
            budget: None,
        };
        while cursor.consumed < position && cursor.next < cursor.batches.len() {
            cursor.consumed += cursor.batches[cursor.next].len();
            cursor.next += 1;
        }
        if cursor.consumed != position {
            bail!("resume: {position} records into epoch {epoch} is not the end of a micro-batch of this run's batching")
        }
        Ok(cursor)
    }

    /// The next global micro-batch: the next `world` micro-batches of the epoch (fewer at its
    /// end; a new epoch starts when the last one is used up). Rank r trains the r-th.
    pub fn next(&mut self, world: usize) -> &[Vec<usize>] {
        if self.next >= self.batches.len() {
            self.epoch += 1;
            self.batches = plan_epoch(self.batching, self.seed, self.epoch, &self.lengths);
            (self.next, self.consumed) = (0, 0);
        }
        let start = self.next;
        self.next = (start + world.max(1)).min(self.batches.len());
        let taken = &self.batches[start..self.next];
        self.consumed += taken.iter().map(Vec::len).sum::<usize>();
        taken
    }

    /// The records of the micro-batch [`DataCursor::next`] gives first (rank 0's), without
    /// taking it: the first of the next epoch when this one is used up.
    pub fn peek(&self) -> Vec<usize> {
        match self.batches.get(self.next) {
            Some(first) => first.clone(),
            None => plan_epoch(self.batching, self.seed, self.epoch + 1, &self.lengths)
                .into_iter()
                .next()
                .unwrap_or_default(),
        }
    }

    /// Lets [`DataCursor::take`] give `n` more global micro-batches (the rest of a run's epochs).
    pub fn limit(&mut self, n: usize) {
        self.budget = Some(n);
    }

    /// [`DataCursor::next`], or `None` once the limit set by [`DataCursor::limit`] is used up.
    pub fn take(&mut self, world: usize) -> Option<&[Vec<usize>]> {
        match &mut self.budget {
            Some(0) => return None,
            Some(n) => *n -= 1,
            None => {}
        }
        Some(self.next(world))
    }

    /// The current epoch (0-based).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Micro-batches of the current epoch taken so far.
    pub fn index(&self) -> usize {
        self.next
    }

    /// Records of the current epoch taken so far.
    pub fn position(&self) -> usize {
        self.consumed
    }

    /// Epochs done, as a fraction.
    pub fn progress(&self) -> f64 {
        self.epoch as f64 + self.consumed as f64 / self.lengths.len().max(1) as f64
    }

    /// The current epoch's micro-batches.
    pub fn batches(&self) -> &[Vec<usize>] {
        &self.batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_puts_every_record_in_one_bin_within_budget() {
        let mut rng = Rng::seed_from_u64(3);
        let lengths: Vec<usize> = (0..500).map(|_| 1 + rng.below(128) as usize).collect();
        let bins = plan_epoch(Batching::Packed(512), 7, 0, &lengths);
        let mut seen: Vec<usize> = bins.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        assert!(bins
            .iter()
            .all(|b| b.iter().map(|&i| lengths[i]).sum::<usize>() <= 512));
        // No bound on best-fit decreasing follows from the tokens alone (they bound the optimum
        // from below); on these lengths it fills its bins to within one bin of that bound.
        let lower = lengths.iter().sum::<usize>().div_ceil(512);
        assert!(
            bins.len() <= lower + 1,
            "{} bins for at least {lower}",
            bins.len()
        );
        // The bins come in a seeded order, different per epoch, the same for the same seed.
        assert_eq!(bins, plan_epoch(Batching::Packed(512), 7, 0, &lengths));
        assert_ne!(bins, plan_epoch(Batching::Packed(512), 7, 1, &lengths));
    }

    #[test]
    fn token_budget_takes_consecutive_records() {
        let lengths = [3, 4, 2, 6, 1, 1, 5];
        let order = [6, 5, 4, 3, 2, 1, 0];
        let batches = Batching::Tokens(7).epoch_batches(&order, &lengths, Rng::seed_from_u64(0));
        assert_eq!(batches, vec![vec![6, 5, 4], vec![3], vec![2, 1], vec![0]]);
    }

    #[test]
    fn steps_count_every_micro_batch_of_every_epoch() {
        let lengths = vec![5; 10];
        // 10 records of batch 4: micro-batches of 4, 4, 2 per epoch, so 3 epochs are 9.
        assert_eq!(
            steps_for_epochs(Batching::Records(4), 1, &lengths, 3.0, 1, 1),
            9
        );
        assert_eq!(
            steps_for_epochs(Batching::Records(4), 1, &lengths, 3.0, 2, 1),
            5
        );
        // Two ranks: global micro-batches {4, 4}, {2} per epoch.
        assert_eq!(
            steps_for_epochs(Batching::Records(4), 1, &lengths, 1.0, 1, 2),
            2
        );
        assert_eq!(
            steps_for_epochs(Batching::Records(4), 1, &lengths, 0.5, 1, 1),
            2
        );
        // Packed bins of 20 tokens: 4 records each, 3 bins.
        assert_eq!(
            steps_for_epochs(Batching::Packed(20), 1, &lengths, 2.0, 1, 1),
            6
        );
        // 1.1 epochs of 10 micro-batches are 11, not 12 (1.1 x 10 is 11.000000000000002).
        let twenty = vec![5; 20];
        assert_eq!(
            steps_for_epochs(Batching::Records(2), 1, &twenty, 1.1, 1, 1),
            11
        );
        assert_eq!(
            steps_for_epochs(Batching::Records(2), 1, &twenty, 1.3, 1, 1),
            13
        );
    }

    #[test]
    fn steps_left_after_a_resume_add_up_to_the_whole_run() {
        let lengths: Vec<usize> = (0..37).map(|i| 1 + i % 9).collect();
        for batching in [
            Batching::Records(4),
            Batching::Tokens(12),
            Batching::Packed(16),
        ] {
            for (epochs, accum, world) in [(2.0, 1, 1), (2.5, 2, 1), (3.0, 1, 2), (1.7, 3, 2)] {
                let total = steps_for_epochs(batching, 9, &lengths, epochs, accum, world);
                // Walk the cursor as the trainer does and resume at every step.
                let mut cursor = DataCursor::new(batching, 9, lengths.clone(), 0, 0).unwrap();
                for done in 0..total {
                    let left = steps_left(
                        batching,
                        9,
                        &lengths,
                        epochs,
                        accum,
                        world,
                        cursor.epoch(),
                        cursor.index(),
                    );
                    assert_eq!(done + left, total, "{batching:?} epochs {epochs} accum {accum} world {world} after {done} steps");
                    for _ in 0..accum {
                        cursor.next(world);
                    }
                }
            }
        }
        // With twice the ranks, what is left takes half the steps (rounded up).
        let mut cursor = DataCursor::new(Batching::Records(4), 9, lengths.clone(), 0, 0).unwrap();
        for _ in 0..3 {
            cursor.next(1);
        }
        let (one, two) = (
            steps_left(
                Batching::Records(4),
                9,
                &lengths,
                1.0,
                1,
                1,
                cursor.epoch(),
                cursor.index(),
            ),
            steps_left(
                Batching::Records(4),
                9,
                &lengths,
                1.0,
                1,
                2,
                cursor.epoch(),
                cursor.index(),
            ),
        );
        assert_eq!((one, two), (10 - 3, 4));
    }

    #[test]
    fn peek_shows_the_next_first_micro_batch_without_taking_it_across_epochs() {
        let lengths: Vec<usize> = (0..10).map(|i| 3 + i % 4).collect();
        let mut cursor = DataCursor::new(Batching::Records(4), 9, lengths, 0, 0).unwrap();
        // 10 records in batches of 4: three micro-batches an epoch, taken two at a time.
        for _ in 0..4 {
            let peeked = cursor.peek();
            let (position, epoch) = (cursor.position(), cursor.epoch());
            assert_eq!(cursor.peek(), peeked, "peeking takes nothing");
            assert_eq!((cursor.position(), cursor.epoch()), (position, epoch));
            assert_eq!(cursor.next(2)[0], peeked);
        }
    }

    #[test]
    fn cursor_resumes_between_micro_batches_and_rolls_over_epochs() {
        let lengths: Vec<usize> = (0..11).map(|i| 1 + i % 4).collect();
        let mut a = DataCursor::new(Batching::Tokens(6), 5, lengths.clone(), 0, 0).unwrap();
        for _ in 0..3 {
            a.next(1);
        }
        let mut b = DataCursor::new(
            Batching::Tokens(6),
            5,
            lengths.clone(),
            a.epoch(),
            a.position(),
        )
        .unwrap();
        for _ in 0..20 {
            assert_eq!(a.next(2), b.next(2));
        }
        assert!(
            a.epoch() > 0,
            "20 global micro-batches cover more than one epoch"
        );
        // A position inside a micro-batch is no place to resume.
        let first = plan_epoch(Batching::Tokens(6), 5, 0, &lengths);
        let k = first.iter().position(|b| b.len() >= 2).unwrap();
        let inside = first[..k].iter().map(Vec::len).sum::<usize>() + 1;
        assert!(DataCursor::new(Batching::Tokens(6), 5, lengths, 0, inside).is_err());
    }
}
