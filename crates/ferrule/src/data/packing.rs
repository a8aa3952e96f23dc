//! Bin packing of records into token budgets (`--packing`, `train::batching`; the fill that
//! `ferrule data` reports).

/// Best-fit decreasing bin packing: the records of `order` taken longest first (records of
/// equal length in `order`'s order), each into the open bin with the least room that still
/// holds it, else into a new bin of `budget` tokens. Returns the bins, as indices into
/// `lengths`, in the order they were opened. A record longer than `budget` gets a bin of its
/// own (callers ensure none is). O(n log n): the open bins sit in an ordered set keyed by
/// their room.
pub fn best_fit_decreasing(order: &[usize], lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut sorted = order.to_vec();
    sorted.sort_by(|&a, &b| lengths[b].cmp(&lengths[a])); // stable: ties keep `order`
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut room: std::collections::BTreeSet<(usize, usize)> = std::collections::BTreeSet::new();
    for i in sorted {
        let len = lengths[i];
        match room.range((len, 0)..).next().copied() {
            Some((left, bin)) => {
                room.remove(&(left, bin));
                bins[bin].push(i);
                room.insert((left - len, bin));
            }
            None => {
                bins.push(vec![i]);
                room.insert((budget.saturating_sub(len), bins.len() - 1));
            }
        }
    }
    bins
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_decreasing_by_hand() {
        // Lengths 7, 5, 4, 3, 2, 2, 1 into bins of 8: 7 opens bin 0 (room 1), 5 opens bin 1
        // (room 3), 4 opens bin 2 (room 4), 3 fits bin 1 exactly (best fit, room 0) rather
        // than bin 2, 2 goes to bin 2 (room 2), the next 2 to bin 2 (room 0), 1 to bin 0.
        let lengths = [2, 7, 3, 1, 5, 2, 4];
        let order: Vec<usize> = (0..lengths.len()).collect();
        let bins = best_fit_decreasing(&order, &lengths, 8);
        assert_eq!(bins, vec![vec![1, 3], vec![4, 2], vec![6, 0, 5]]);
    }
}
