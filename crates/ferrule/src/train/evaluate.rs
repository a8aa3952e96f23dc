//! The loss of one batch and the token-weighted evaluation over a data set, on one rank or
//! spread over several.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use super::report::EvalReport;
use crate::data::{make_batch, Batch, Encoded, Padding};
use crate::dist::{Collective, SingleProcess};
use crate::model::{Inputs, Model, Task};
use crate::ops::loss::{causal_lm_loss, cross_entropy};

fn batch_inputs(batch: &Batch) -> Inputs<'_> {
    Inputs {
        input_ids: &batch.input_ids,
        attention_mask: Some(&batch.attention_mask),
        token_type_ids: None,
    }
}

/// Where the first non-finite output of `batch` arose, as a clause for an error message
/// ([`Model::non_finite_origin`]).
pub(super) fn non_finite_origin(model: &Model, batch: &Batch) -> String {
    if model.lockstep {
        // Tracing reruns the batch on this rank alone, which a sharded base cannot do.
        return " (the layer is not traced with --shard-base; rerun without it to find it)".into();
    }
    match &batch.seq_lens {
        Some(lens) => crate::util::finite::origin_clause(
            model.trace_non_finite_packed(&batch.input_ids, lens),
        ),
        None => model.non_finite_origin(&batch_inputs(batch), None),
    }
}

/// The loss a method asks for between optimizer steps ([`crate::tuners::LossProbe`]: IST's
/// rollouts): the step's first micro-batch (`cursor`'s next, the same on every rank), made
/// into a batch on the first call only, its loss taken in whatever mode the method has set
/// (IST: eval) and never differentiated.
pub(super) struct FirstBatchProbe<'a> {
    p: &'a super::prepare::Prepared,
    cursor: &'a super::batching::DataCursor,
    batch: Option<Batch>,
}

impl<'a> FirstBatchProbe<'a> {
    pub(super) fn new(
        p: &'a super::prepare::Prepared,
        cursor: &'a super::batching::DataCursor,
    ) -> Self {
        Self {
            p,
            cursor,
            batch: None,
        }
    }
}

impl crate::tuners::LossProbe for FirstBatchProbe<'_> {
    fn loss(&mut self) -> Result<f64> {
        let p = self.p;
        if self.batch.is_none() {
            let records = self.cursor.peek();
            let items: Vec<&Encoded> = records.iter().map(|&i| &p.train[i]).collect();
            let dev = p.model.device().clone();
            self.batch = Some(make_batch(&items, p.padding, p.pad_id, p.max_len, &dev)?);
        }
        let batch = self.batch.as_ref().expect("made above");
        let (loss, counted, _) = batch_loss(&p.model, batch)?;
        if counted == 0 {
            bail!("the step's first micro-batch has no trained token, so it has no loss to compare")
        }
        Ok(loss.to_scalar::<f32>()? as f64)
    }
}

/// Forward pass and loss of one batch (padded or padding-free): `(loss, counted targets,
/// correct predictions)`.
pub fn batch_loss(model: &Model, batch: &Batch) -> Result<(Tensor, usize, usize)> {
    if let (Task::CausalLm, crate::model::Arch::Decoder(lm)) = (model.task, &model.arch) {
        let labels = batch
            .labels
            .as_ref()
            .context("causal-LM batch without labels")?;
        let (loss, n) = match &batch.seq_lens {
            Some(lens) => lm.causal_lm_loss_packed(&batch.input_ids, lens, labels)?,
            None => {
                lm.causal_lm_loss(&batch.input_ids, Some(&batch.attention_mask), None, labels)?
            }
        };
        return Ok((loss, n, 0));
    }
    let out = match &batch.seq_lens {
        Some(lens) => model.forward_packed(&batch.input_ids, lens)?,
        None => model.forward(&batch_inputs(batch))?,
    };
    match model.task {
        Task::CausalLm => {
            let labels = batch
                .labels
                .as_ref()
                .context("causal-LM batch without labels")?;
            let (loss, n) = causal_lm_loss(&out, labels)?;
            Ok((loss, n, 0))
        }
        Task::SeqCls => {
            let labels = batch
                .class_labels
                .as_ref()
                .context("classification batch without class labels")?;
            let (loss, n) = cross_entropy(&out, &labels.to_dtype(DType::I64)?)?;
            let pred = out.argmax(candle_core::D::Minus1)?.to_dtype(DType::U32)?;
            let correct = pred
                .eq(&labels.to_dtype(DType::U32)?)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()? as usize;
            Ok((loss, n, correct))
        }
        Task::FeatureExtraction => bail!("FEATURE_EXTRACTION has no loss"),
    }
}

/// Token-weighted eval loss (and accuracy for classification) over `items`, in batches laid
/// out as `padding` says (the result is the same either way, within float rounding).
/// Adapter layers must be in eval mode (no dropout).
pub fn evaluate(
    model: &Model,
    pad_id: u32,
    padding: Padding,
    items: &[Encoded],
    batch_size: usize,
    step: usize,
) -> Result<EvalReport> {
    evaluate_on(
        model,
        pad_id,
        padding,
        items,
        batch_size,
        step,
        &SingleProcess,
    )
}

/// [`evaluate`] spread over the ranks of `comm`: rank `r` takes records `r, r + N, ...` and the
/// sums are all-reduced, so every rank returns the report of the whole set.
pub fn evaluate_on(
    model: &Model,
    pad_id: u32,
    padding: Padding,
    items: &[Encoded],
    batch_size: usize,
    step: usize,
    comm: &dyn Collective,
) -> Result<EvalReport> {
    if items.is_empty() {
        bail!("evaluation set is empty")
    }
    let max_len = items.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let dev = model.device().clone();
    let _no_grad = model.no_grad();
    let mine: Vec<&Encoded> = items
        .iter()
        .skip(comm.rank())
        .step_by(comm.world_size())
        .collect();
    let mut sums = [0f64; 4]; // loss·n, n, correct, batches with a non-finite loss
    let mut first_bad = None;
    let bs = batch_size.max(1);
    if model.lockstep {
        // Every rank runs as many batches as rank 0 (which has the most records): the extra
        // one repeats a record and is not counted.
        let most = items.len().div_ceil(comm.world_size()).div_ceil(bs);
        for _ in mine.len().div_ceil(bs)..most {
            batch_loss(
                model,
                &make_batch(
                    &items[..1].iter().collect::<Vec<_>>(),
                    padding,
                    pad_id,
                    max_len,
                    &dev,
                )?,
            )?;
        }
    }
    for (j, chunk) in mine.chunks(bs).enumerate() {
        let batch = make_batch(chunk, padding, pad_id, max_len, &dev)?;
        let (loss, n, c) = batch_loss(model, &batch)?;
        let lv = loss.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            sums[3] += 1.0;
            if first_bad.is_none() {
                first_bad = Some((j, lv, non_finite_origin(model, &batch)));
            }
            continue;
        }
        sums[0] += lv * n as f64;
        sums[1] += n as f64;
        sums[2] += c as f64;
    }
    // Every rank learns of a bad batch anywhere, so all stop together.
    comm.all_reduce_sum_f64(&mut sums)?;
    if sums[3] > 0.0 {
        let (world, rank, bs) = (comm.world_size(), comm.rank(), batch_size.max(1));
        let here = first_bad.map_or_else(
            || "on another rank".to_string(),
            |(j, lv, origin)| {
                // Rank r evaluates records r, r + world, ...: the batch's first record.
                let first = (j * bs) * world + rank + 1;
                format!("first: loss {lv} in the eval batch starting at eval record {first} (batch size {bs}){origin}")
            },
        );
        bail!("evaluation at step {step}: {} batch(es) gave a NaN or infinite loss ({here}); the model or adapter produces non-finite outputs", sums[3])
    }
    let eval_loss = sums[0] / sums[1].max(1.0);
    let classification = model.task == Task::SeqCls;
    Ok(EvalReport {
        step,
        eval_loss,
        eval_perplexity: (!classification).then(|| eval_loss.exp()),
        eval_accuracy: classification.then(|| sums[2] / items.len() as f64),
        eval_records: items.len(),
    })
}
