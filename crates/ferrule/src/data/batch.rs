//! Padding encoded records into batches of tensors.

use candle_core::{Device, Tensor};

use super::encode::{Encoded, IGNORE_INDEX};

/// Which side of a sequence padding goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PaddingSide {
    /// Pads before the tokens (usual for generation with decoder-only models).
    Left,
    /// Pads after the tokens (usual for training).
    #[default]
    Right,
}

/// How the sequences of a batch are laid out (`padding` in a training config, `--padding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// Padding-free: the records end to end in one row ([`pack`]); no position is padding.
    #[default]
    Free,
    /// Padded on the right to the batch's longest record ([`collate`]).
    Longest,
    /// Padded on the right to the longest sequence allowed (`max_len`): the same shape every
    /// step, for benchmarks.
    MaxLen,
}

impl Padding {
    /// The spelling of `--padding` and of the config key's value.
    pub fn name(self) -> &'static str {
        match self {
            Padding::Free => "free",
            Padding::Longest => "longest",
            Padding::MaxLen => "max_len",
        }
    }
}

/// A training or evaluation batch of `items` laid out as `padding` says (`max_len` is used by
/// [`Padding::MaxLen`] only; shorter batches pad up to it).
pub fn make_batch(
    items: &[&Encoded],
    padding: Padding,
    pad_id: u32,
    max_len: usize,
    device: &Device,
) -> candle_core::Result<Batch> {
    match padding {
        Padding::Free => pack(items, device),
        Padding::Longest => collate(items, pad_id, PaddingSide::Right, device),
        Padding::MaxLen => pad_to(
            collate(items, pad_id, PaddingSide::Right, device)?,
            max_len,
            pad_id,
        ),
    }
}

/// Pads a right-padded batch on the right up to `len` positions.
fn pad_to(batch: Batch, len: usize, pad_id: u32) -> candle_core::Result<Batch> {
    let (b, t) = batch.input_ids.dims2()?;
    if t >= len {
        return Ok(batch);
    }
    let dev = batch.input_ids.device().clone();
    let extra = len - t;
    let cat = |x: &Tensor, fill: Tensor| Tensor::cat(&[x, &fill], 1);
    Ok(Batch {
        input_ids: cat(&batch.input_ids, Tensor::full(pad_id, (b, extra), &dev)?)?,
        attention_mask: cat(
            &batch.attention_mask,
            Tensor::zeros((b, extra), candle_core::DType::U32, &dev)?,
        )?,
        labels: batch
            .labels
            .as_ref()
            .map(|l| cat(l, Tensor::full(IGNORE_INDEX, (b, extra), &dev)?))
            .transpose()?,
        ..batch
    })
}

/// A batch of sequences: padded, `b` rows of `t` tokens ([`collate`]), or padding-free, one
/// row of the sequences end to end ([`pack`], `seq_lens` set).
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids, `u32 [b, t]`; padded positions hold the pad id.
    pub input_ids: Tensor,
    /// `u32 [b, t]`: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Loss labels, `i64 [b, t]`, -100 on padding; `None` for classification batches.
    pub labels: Option<Tensor>,
    /// Class indices, `u32 [b]`; `Some` for classification batches.
    pub class_labels: Option<Tensor>,
    /// Number of real (non-padding) tokens.
    pub num_tokens: usize,
    /// Padding-free: the lengths of the sequences laid end to end in the one row (`b = 1`,
    /// `t` = their sum, no padding); `None` for a padded batch.
    pub seq_lens: Option<Vec<usize>>,
}

/// Lays `items` end to end in one row, without padding (the padding-free batches of
/// transformers' `DataCollatorWithFlattening`): `input_ids`, `attention_mask` (all ones) and
/// `labels` are `[1, n]`, `n` the total of the records' tokens, and `seq_lens` their lengths.
/// The labels are the records' own: that collator sets every record's first label to
/// `IGNORE_INDEX`, so that no record's last token learns to predict the next record's first,
/// and the model's padding-free loss does the same from `seq_lens`
/// (`DecoderLm::causal_lm_loss_packed`), except where prompt tuning's virtual tokens precede
/// the record and predict its first label, as in a padded batch.
/// Classification records give `class_labels: [records]`. Errors as [`collate`], and on a
/// record of no tokens.
pub fn pack(items: &[&Encoded], device: &Device) -> candle_core::Result<Batch> {
    check_items(items)?;
    if let Some(i) = items.iter().position(|e| e.input_ids.is_empty()) {
        candle_core::bail!("pack: record {i} of the batch has no tokens")
    }
    let classification = items[0].class_label.is_some();
    let n: usize = items.iter().map(|e| e.input_ids.len()).sum();
    let ids: Vec<u32> = items
        .iter()
        .flat_map(|e| e.input_ids.iter().copied())
        .collect();
    let input_ids = Tensor::from_vec(ids, (1, n), device)?;
    let attention_mask = Tensor::ones((1, n), candle_core::DType::U32, device)?;
    let labels = if classification {
        None
    } else {
        let labels: Vec<i64> = items
            .iter()
            .flat_map(|e| e.labels.iter().copied())
            .collect();
        Some(Tensor::from_vec(labels, (1, n), device)?)
    };
    let class_labels = if classification {
        Some(class_tensor(items, device)?)
    } else {
        None
    };
    Ok(Batch {
        input_ids,
        attention_mask,
        labels,
        class_labels,
        num_tokens: n,
        seq_lens: Some(items.iter().map(|e| e.input_ids.len()).collect()),
    })
}

/// The checks every batch makes: records present, all of one kind, labels matching tokens.
fn check_items(items: &[&Encoded]) -> candle_core::Result<()> {
    if items.is_empty() {
        candle_core::bail!("collate: cannot build a batch of no records");
    }
    let classification = items[0].class_label.is_some();
    if items
        .iter()
        .any(|e| e.class_label.is_some() != classification)
    {
        candle_core::bail!("collate: a batch mixes classification and language-modelling records");
    }
    for (i, item) in items.iter().enumerate() {
        if item.input_ids.len() != item.labels.len() {
            candle_core::bail!(
                "collate: record {i} of the batch has {} tokens but {} labels",
                item.input_ids.len(),
                item.labels.len()
            );
        }
    }
    Ok(())
}

/// The records' class indices, `u32 [records]`.
fn class_tensor(items: &[&Encoded], device: &Device) -> candle_core::Result<Tensor> {
    let classes = items
        .iter()
        .map(|e| {
            let c = e.class_label.ok_or_else(|| {
                candle_core::Error::Msg("collate: a classification record without a class".into())
            })?;
            u32::try_from(c).map_err(|_| {
                candle_core::Error::Msg(format!("collate: class index {c} does not fit u32"))
            })
        })
        .collect::<candle_core::Result<Vec<u32>>>()?;
    Tensor::from_vec(classes, items.len(), device)
}

/// Pads `items` to the longest among them and stacks them into a [`Batch`].
///
/// A batch holds either classification records (all with [`Encoded::class_label`]), giving
/// `class_labels` and no `labels`, or language-modelling records (none with a class label),
/// giving `labels`. Mixing them, or an empty `items`, is an error.
pub fn collate(
    items: &[&Encoded],
    pad_id: u32,
    side: PaddingSide,
    device: &Device,
) -> candle_core::Result<Batch> {
    check_items(items)?;
    let classification = items[0].class_label.is_some();
    let b = items.len();
    let t = items.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    let mut labels = Vec::with_capacity(if classification { 0 } else { b * t });
    let mut num_tokens = 0;
    for item in items {
        let n = item.input_ids.len();
        let pad = t - n;
        num_tokens += n;
        let pad_ids = std::iter::repeat_n(pad_id, pad);
        let pad_mask = std::iter::repeat_n(0u32, pad);
        let pad_labels = std::iter::repeat_n(IGNORE_INDEX, if classification { 0 } else { pad });
        let real_mask = std::iter::repeat_n(1u32, n);
        let real_labels = item
            .labels
            .iter()
            .copied()
            .take(if classification { 0 } else { n });
        match side {
            PaddingSide::Left => {
                ids.extend(pad_ids.chain(item.input_ids.iter().copied()));
                mask.extend(pad_mask.chain(real_mask));
                labels.extend(pad_labels.chain(real_labels));
            }
            PaddingSide::Right => {
                ids.extend(item.input_ids.iter().copied().chain(pad_ids));
                mask.extend(real_mask.chain(pad_mask));
                labels.extend(real_labels.chain(pad_labels));
            }
        }
    }

    let input_ids = Tensor::from_vec(ids, (b, t), device)?;
    let attention_mask = Tensor::from_vec(mask, (b, t), device)?;
    let (labels, class_labels) = if classification {
        (None, Some(class_tensor(items, device)?))
    } else {
        (Some(Tensor::from_vec(labels, (b, t), device)?), None)
    };
    Ok(Batch {
        input_ids,
        attention_mask,
        labels,
        class_labels,
        num_tokens,
        seq_lens: None,
    })
}
