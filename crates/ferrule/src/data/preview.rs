//! What training will see, before it runs (`ferrule data`): each record's text as the model
//! gets it, cut into the spans that count towards the loss and those that do not, and counts
//! over the whole file (tokens, trained tokens, padding a batch adds, a length histogram).
//! Chat-template mistakes (a loss on the prompt, an assistant turn without its end token) show
//! here rather than after hours of training.

use serde::Serialize;
use tokenizers::Tokenizer;

use super::encode::{Encoded, EncodedSet, IGNORE_INDEX};
use super::jsonl::Records;

/// A run of consecutive tokens that are all trained, or all not, decoded to text (special
/// tokens included, as the model sees them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Span {
    pub text: String,
    pub trained: bool,
}

/// `item` as spans. The text of a span is the difference of the decoded prefixes, so a
/// character whose bytes straddle two tokens lands whole in one span (byte-level BPE).
pub fn spans(tokenizer: &Tokenizer, item: &Encoded) -> anyhow::Result<Vec<Span>> {
    let decode = |n: usize| {
        tokenizer
            .decode(&item.input_ids[..n], false)
            .map_err(|e| anyhow::anyhow!("decoding a record: {e}"))
    };
    let mut out: Vec<Span> = Vec::new();
    let mut done = String::new();
    let mut start = 0;
    let trained = |i: usize| item.labels.get(i).is_some_and(|&l| l != IGNORE_INDEX);
    for end in 1..=item.input_ids.len() {
        if end < item.input_ids.len() && trained(end) == trained(start) {
            continue;
        }
        let prefix = decode(end)?;
        // Decoders that are not prefix-stable (a leading-space rule, say) fall back to the run alone.
        let text = match prefix.strip_prefix(done.as_str()) {
            Some(rest) => rest.to_string(),
            None => tokenizer
                .decode(&item.input_ids[start..end], false)
                .map_err(|e| anyhow::anyhow!("decoding a record: {e}"))?,
        };
        out.push(Span {
            text,
            trained: trained(start),
        });
        done = prefix;
        start = end;
    }
    Ok(out)
}

/// Counts over an encoded file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataStats {
    /// Records in the file, and those kept (encoded).
    pub records: usize,
    pub kept: usize,
    /// Records dropped because no token was left to train (1-based line numbers).
    pub skipped_lines: Vec<usize>,
    /// Of those, the records whose prompt fills `max_len`, so that the cut takes their whole
    /// answer: counted as truncated and skipped.
    pub skipped_past_max_len: Vec<PastMaxLenRecord>,
    /// Kept records cut at `max_len`.
    pub truncated: usize,
    pub tokens: usize,
    /// Tokens whose label counts towards the loss (for classification: 0; each record is one
    /// example).
    pub trained_tokens: usize,
    /// Positions that padding adds when batches of `batch_size` records are formed in file
    /// order and padded to their longest record (the trainer shuffles, so this is a guide).
    pub padding_positions: usize,
    pub batch_size: usize,
    /// Share of all computed positions that is padding: `padding / (tokens + padding)`.
    pub padding_fraction: f64,
    /// The same share when every record is padded to `max_len` (`--pad-to-max-len`).
    pub max_len: usize,
    pub padding_fraction_at_max_len: f64,
    /// Bins of `packed_budget` tokens that `--packing` would fill (best-fit decreasing), and
    /// the share of their tokens that records fill.
    pub packed_budget: usize,
    pub packed_bins: usize,
    pub packed_fill: f64,
    /// Record lengths in tokens: `(lo, hi, count)` for `lo ≤ len < hi`, in powers of two.
    pub length_histogram: Vec<(usize, usize, usize)>,
}

/// A record skipped because its prompt fills `max_len`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PastMaxLenRecord {
    /// 1-based line in the file.
    pub line: usize,
    /// Tokens before its first trained token.
    pub prompt_tokens: usize,
}

/// Counts for `set`, which encoded `records`, at `batch_size` and `max_len`, with packed bins of
/// `pack_budget` tokens (default `batch_size × max_len`, as `--packing` takes them).
pub fn stats(
    set: &EncodedSet,
    records: &Records,
    batch_size: usize,
    max_len: usize,
    pack_budget: Option<usize>,
) -> DataStats {
    let tokens: usize = set.items.iter().map(Encoded::len).sum();
    let trained_tokens = set
        .items
        .iter()
        .map(|e| e.labels.iter().filter(|&&l| l != IGNORE_INDEX).count())
        .sum();
    let padding_positions = set
        .items
        .chunks(batch_size.max(1))
        .map(|b| {
            b.iter().map(Encoded::len).max().unwrap_or(0) * b.len()
                - b.iter().map(Encoded::len).sum::<usize>()
        })
        .sum();
    let mut length_histogram: Vec<(usize, usize, usize)> = Vec::new();
    for e in &set.items {
        let lo = if e.is_empty() {
            0
        } else {
            1usize << e.len().ilog2()
        };
        match length_histogram.iter_mut().find(|b| b.0 == lo) {
            Some(b) => b.2 += 1,
            None => length_histogram.push((lo, (lo * 2).max(1), 1)),
        }
    }
    length_histogram.sort();
    let lengths: Vec<usize> = set.items.iter().map(Encoded::len).collect();
    let order: Vec<usize> = (0..lengths.len()).collect();
    let budget = pack_budget.unwrap_or(batch_size.max(1) * max_len).max(1);
    let packed_bins = super::best_fit_decreasing(&order, &lengths, budget).len();
    DataStats {
        packed_budget: budget,
        packed_bins,
        packed_fill: tokens as f64 / (packed_bins * budget).max(1) as f64,
        records: records.examples.len(),
        kept: set.items.len(),
        skipped_lines: set.skipped.iter().map(|&i| records.line(i)).collect(),
        skipped_past_max_len: set
            .past_max_len
            .iter()
            .map(|&(i, prompt_tokens)| PastMaxLenRecord {
                line: records.line(i),
                prompt_tokens,
            })
            .collect(),
        truncated: set.truncated,
        tokens,
        trained_tokens,
        padding_positions,
        batch_size,
        padding_fraction: padding_positions as f64 / (tokens + padding_positions).max(1) as f64,
        max_len,
        padding_fraction_at_max_len: 1.0
            - tokens as f64 / (set.items.len() * max_len).max(1) as f64,
        length_histogram,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(lens: &[usize]) -> Encoded {
        let n: usize = lens.iter().sum();
        Encoded {
            input_ids: vec![1; n],
            labels: vec![IGNORE_INDEX; n],
            class_label: None,
        }
    }

    /// Hand-checked: lengths 3, 5, 8, 1 in batches of 2 pad (5−3) + (8−1) = 9 positions.
    #[test]
    fn counts_padding_per_batch_and_buckets_lengths() {
        let mut a = item(&[3]);
        a.labels[2] = 7;
        let set = EncodedSet {
            items: vec![a, item(&[5]), item(&[8]), item(&[1])],
            record_indices: vec![0, 1, 3, 4],
            skipped: vec![2],
            past_max_len: vec![(2, 9)],
            truncated: 1,
        };
        // Line 3 is blank: record 2 is on line 4.
        let records = Records {
            path: "t.jsonl".into(),
            examples: vec![crate::data::Example::Text { text: "x".into() }; 5],
            lines: vec![1, 2, 4, 5, 6],
            first_keys: vec!["text".into()],
        };
        let s = stats(&set, &records, 2, 8, None);
        assert_eq!(
            (
                s.records,
                s.kept,
                s.tokens,
                s.trained_tokens,
                s.padding_positions
            ),
            (5, 4, 17, 1, 9)
        );
        assert_eq!(s.skipped_lines, vec![4]);
        assert_eq!(
            s.skipped_past_max_len,
            vec![PastMaxLenRecord {
                line: 4,
                prompt_tokens: 9
            }]
        );
        assert_eq!(
            s.length_histogram,
            vec![(1, 2, 1), (2, 4, 1), (4, 8, 1), (8, 16, 1)]
        );
        assert!((s.padding_fraction - 9.0 / 26.0).abs() < 1e-12);
        assert!((s.padding_fraction_at_max_len - (1.0 - 17.0 / 32.0)).abs() < 1e-12);
        // Bins of 2 x 8 = 16 tokens, longest first: 8 + 5 + 3 fill one exactly, 1 opens a second.
        assert_eq!((s.packed_budget, s.packed_bins), (16, 2));
        assert!((s.packed_fill - 17.0 / 32.0).abs() < 1e-12);
        // Bins of 9: 8 | 5 + 3 | 1 would be three, but 1 fits beside 8: 8 + 1 | 5 + 3.
        let s = stats(&set, &records, 2, 8, Some(9));
        assert_eq!((s.packed_budget, s.packed_bins), (9, 2));
    }
}
