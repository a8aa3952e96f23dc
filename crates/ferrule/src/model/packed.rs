//! Padding-free batches with positions a method adds before every sequence (prompt tuning's
//! virtual tokens, prefix tuning's keys and values): the same rows put before each sequence
//! of the one row, so that every sequence sees them as it would in its own padded row.

use candle_core::{Result, Tensor};

use crate::ops::loss::IGNORE_INDEX;

/// `before: [1, m, d]` put before each sequence's rows of `x: [1, n, d]` (sequences of `lens`
/// end to end): `[1, Σ (m + lᵢ), d]`. The gradient of every copy flows back to `before`.
pub fn before_each(before: &Tensor, x: &Tensor, lens: &[usize]) -> Result<Tensor> {
    if before.dim(1)? == 0 {
        return Ok(x.clone());
    }
    let mut parts = Vec::with_capacity(2 * lens.len());
    let mut start = 0;
    for &l in lens {
        parts.push(before.clone());
        parts.push(x.narrow(1, start, l)?);
        start += l;
    }
    Tensor::cat(&parts, 1)
}

/// The lengths of the sequences once `m` rows precede each: `lᵢ + m`.
pub fn with_added(lens: &[usize], m: usize) -> Vec<usize> {
    lens.iter().map(|l| l + m).collect()
}

/// Each token's position within its own sequence, for sequences of `lens` end to end:
/// `0..l₀, 0..l₁, …` (what a method that changes tokens by position indexes by,
/// [`super::hooks::with_input_delta`]).
pub fn positions_within(lens: &[usize]) -> Vec<u32> {
    lens.iter().flat_map(|&l| 0..l as u32).collect()
}

/// The indices of the sequences' own rows in a stream where `m` rows precede each sequence
/// of `lens` ([`before_each`]), in order: `n = Σ lᵢ` indices.
pub fn own_rows(lens: &[usize], m: usize) -> Vec<u32> {
    let mut rows = Vec::with_capacity(lens.iter().sum());
    let mut start = 0;
    for &l in lens {
        rows.extend((start + m..start + m + l).map(|r| r as u32));
        start += m + l;
    }
    rows
}

/// Causal-LM labels of a padding-free batch (`labels: [1, n]`, sequences of `lens`) laid out
/// for a stream where `m` virtual tokens precede each sequence: `[1, Σ (m + lᵢ)]`, -100 on the
/// virtual rows. A sequence's first label is predicted by the row before it: its last virtual
/// token when `m > 0` (as peft's padded batch trains it), otherwise the previous sequence's
/// last token, so it is then -100 (transformers' `DataCollatorWithFlattening` does the same).
pub fn stream_labels(labels: &Tensor, lens: &[usize], m: usize) -> Result<Tensor> {
    let flat: Vec<i64> = labels
        .to_dtype(candle_core::DType::I64)?
        .flatten_all()?
        .to_vec1()?;
    if flat.len() != lens.iter().sum::<usize>() {
        candle_core::bail!(
            "padding-free labels: {} labels for sequences of {lens:?}",
            flat.len()
        )
    }
    let mut out = Vec::with_capacity(flat.len() + m * lens.len());
    let mut start = 0;
    for &l in lens {
        out.extend(std::iter::repeat_n(IGNORE_INDEX, m));
        out.push(if m > 0 { flat[start] } else { IGNORE_INDEX });
        out.extend_from_slice(&flat[start + 1..start + l]);
        start += l;
    }
    let n = out.len();
    Tensor::from_vec(out, (1, n), labels.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_before_each_sequence_by_hand() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32], [2.], [3.]]], &dev).unwrap();
        let before = Tensor::new(&[[[9f32], [8.]]], &dev).unwrap();
        let s = before_each(&before, &x, &[1, 2]).unwrap();
        let got: Vec<f32> = s.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, [9., 8., 1., 9., 8., 2., 3.]);
        assert_eq!(own_rows(&[1, 2], 2), [2, 5, 6]);
        assert_eq!(positions_within(&[1, 3]), [0, 0, 1, 2]);
        assert_eq!(with_added(&[1, 2], 2), [3, 4]);
        let labels = Tensor::new(&[[5i64, 6, 7]], &dev).unwrap();
        let with_m: Vec<i64> = stream_labels(&labels, &[1, 2], 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(with_m, [-100, -100, 5, -100, -100, 6, 7]);
        let without: Vec<i64> = stream_labels(&labels, &[1, 2], 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(without, [-100, -100, 7]);
    }
}
