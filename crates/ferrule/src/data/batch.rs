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

/// A padded batch of `b` sequences of `t` tokens.
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
}

/// Pads `items` to the longest among them and stacks them into a [`Batch`].
///
/// A batch holds either classification records (all with [`Encoded::class_label`]), giving
/// `class_labels` and no `labels`, or language-modelling records (none with a class label),
/// giving `labels`. Mixing them, or an empty `items`, is an error.
pub fn collate(items: &[&Encoded], pad_id: u32, side: PaddingSide, device: &Device) -> candle_core::Result<Batch> {
    if items.is_empty() {
        candle_core::bail!("collate: cannot build a batch of no records");
    }
    let classification = items[0].class_label.is_some();
    if items.iter().any(|e| e.class_label.is_some() != classification) {
        candle_core::bail!("collate: a batch mixes classification and language-modelling records");
    }
    for (i, item) in items.iter().enumerate() {
        if item.input_ids.len() != item.labels.len() {
            candle_core::bail!("collate: record {i} of the batch has {} tokens but {} labels", item.input_ids.len(), item.labels.len());
        }
    }

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
        let real_labels = item.labels.iter().copied().take(if classification { 0 } else { n });
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
        let classes = items
            .iter()
            .map(|e| {
                let c = e.class_label.expect("checked above");
                u32::try_from(c).map_err(|_| candle_core::Error::Msg(format!("collate: class index {c} does not fit u32")))
            })
            .collect::<candle_core::Result<Vec<u32>>>()?;
        (None, Some(Tensor::from_vec(classes, b, device)?))
    } else {
        (Some(Tensor::from_vec(labels, (b, t), device)?), None)
    };
    Ok(Batch { input_ids, attention_mask, labels, class_labels, num_tokens })
}
