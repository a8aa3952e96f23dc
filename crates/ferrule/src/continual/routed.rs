//! Running a ConPET set: the selector routes each record to its top-k experts, each expert's
//! head fills its own label columns, the rest stay at `null_expert_logit`
//! ([`crate::tuners::conpet::layer::continual_logits`]), and the prediction is the best column
//! over every task seen.

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::adapted::AdaptedModel;
use crate::data::{make_batch, read_records, Batch, EncodeOptions, Encoded, Encoder, LabelMap};
use crate::data::{Padding, Truncation};
use crate::model::{Inputs, Task};
use crate::tuners::conpet::layer::{self, ExpertOutput};
use crate::tuners::conpet::set::{self, Manifest};

/// A loaded set: every expert and the selector over the same base.
pub struct RoutedSet {
    pub manifest: Manifest,
    experts: Vec<AdaptedModel>,
    selector: Option<AdaptedModel>,
    columns: Vec<Range<usize>>,
}

/// One task's share of an evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct TaskEval {
    /// Its records in the evaluated data.
    pub records: usize,
    /// Of those, predicted right (over every label column of the set).
    pub accuracy: f64,
    /// Of those, sent to this task's expert by the selector.
    pub routed_to_own_expert: f64,
}

/// A set evaluated over every task seen.
#[derive(Clone, Debug, Serialize)]
pub struct SetEval {
    /// Mean negative log-probability of the true column.
    pub eval_loss: f64,
    pub eval_accuracy: f64,
    /// Records whose own task's expert was among the selector's top-k.
    pub routing_accuracy: f64,
    pub eval_records: usize,
    /// By task, in the set's order.
    pub tasks: Vec<TaskEval>,
}

impl RoutedSet {
    /// The set in `dir` on the base `model` (f32 compute). Each expert and the selector is
    /// loaded as its own LoRA model over its own copy of the base.
    pub fn load(dir: &Path, model: &str, device: &Device) -> Result<Self> {
        let manifest = Manifest::read(dir)?.with_context(|| {
            format!(
                "{}: not a ConPET task set (no {})",
                dir.display(),
                set::MANIFEST
            )
        })?;
        if manifest.tasks.is_empty() {
            bail!(
                "{}: a ConPET set without a finished task yet (its first task stopped early: resume it with the same `ferrule train --continual` command and --resume)",
                dir.display()
            )
        }
        let load = |sub: &str| {
            AdaptedModel::load(model, Some(&dir.join(sub)), Some(Task::SeqCls), device)
                .with_context(|| format!("loading {}", dir.join(sub).display()))
        };
        let experts = manifest
            .tasks
            .iter()
            .map(|t| load(&t.dir))
            .collect::<Result<Vec<_>>>()?;
        let selector = manifest.selector.as_deref().map(load).transpose()?;
        let columns = manifest.columns();
        Ok(RoutedSet {
            manifest,
            experts,
            selector,
            columns,
        })
    }

    /// Each task's label columns.
    pub fn columns(&self) -> &[Range<usize>] {
        &self.columns
    }

    /// The experts each row of a padded `batch` goes to (task indices, best first).
    pub fn routes(&self, batch: &Batch) -> Result<Vec<Vec<usize>>> {
        let b = batch.input_ids.dim(0)?;
        match &self.selector {
            None => Ok(vec![vec![0]; b]),
            Some(s) => {
                let logits = s.model.forward(&inputs(batch))?;
                layer::select_topk(&logits, self.manifest.config.expert_topk)
            }
        }
    }

    /// Log-probabilities over every label column of the set, `[b, columns]`, for a padded
    /// `batch`, and the routes taken.
    pub fn forward(&self, batch: &Batch) -> Result<(Tensor, Vec<Vec<usize>>)> {
        let b = batch.input_ids.dim(0)?;
        let routes = self.routes(batch)?;
        let mut outputs = Vec::new();
        for (task, rows) in layer::records_by_task(&routes, self.experts.len())
            .into_iter()
            .enumerate()
        {
            if rows.is_empty() {
                continue;
            }
            let idx = Tensor::new(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                batch.input_ids.device(),
            )?;
            let ids = batch.input_ids.index_select(&idx, 0)?;
            let mask = batch.attention_mask.index_select(&idx, 0)?;
            let logits = self.experts[task].model.forward(&Inputs {
                input_ids: &ids,
                attention_mask: Some(&mask),
                token_type_ids: None,
            })?;
            outputs.push(ExpertOutput { task, rows, logits });
        }
        let null = self.manifest.config.null_expert_logit as f32;
        Ok((
            layer::continual_logits(b, &self.columns, &outputs, null)?,
            routes,
        ))
    }

    /// The records of `path` encoded for the set: each label mapped to its column; a label no
    /// task owns is an error naming the file and line.
    pub fn encode_file(
        &self,
        path: &Path,
        max_len: usize,
        limit: Option<usize>,
    ) -> Result<Vec<Encoded>> {
        let mut records = read_records(path)?;
        if let Some(n) = limit {
            records.truncate(n);
        }
        let owners = format!("the ConPET set (its labels: {})", self.label_list());
        let remapped = set::remap(&records, |l| self.manifest.column_of(l), &owners)?;
        let source = &self.experts[0].source;
        let tok = source.tokenizer()?;
        let opts = EncodeOptions {
            max_len,
            truncation: Truncation::Right,
            completion_only: true,
        };
        let labels = LabelMap::with_num_labels(self.columns.last().map_or(0, |c| c.end));
        let enc = Encoder::new(tok, source.chat_template.as_ref(), opts)?.with_label_map(&labels);
        Ok(enc.encode_records(&remapped)?.items)
    }

    fn label_list(&self) -> String {
        let all: Vec<String> = self
            .manifest
            .tasks
            .iter()
            .flat_map(|t| t.labels.iter().map(|l| l.to_string()))
            .collect();
        all.join(", ")
    }

    /// The base model's context in positions, when its config gives one.
    pub fn context(&self) -> Option<usize> {
        self.experts.first()?.source.context()
    }

    /// [`RoutedSet::encode_file`] then [`RoutedSet::evaluate`].
    pub fn evaluate_file(
        &self,
        path: &Path,
        max_len: usize,
        batch_size: usize,
        limit: Option<usize>,
    ) -> Result<SetEval> {
        let items = self.encode_file(path, max_len, limit)?;
        self.evaluate(&items, batch_size)
    }

    /// Loss, accuracy over every label column, and how often the selector chose the record's
    /// own expert, over `items` (class labels are set columns).
    pub fn evaluate(&self, items: &[Encoded], batch_size: usize) -> Result<SetEval> {
        if items.is_empty() {
            bail!("evaluation set is empty")
        }
        let source = &self.experts[0].source;
        let (pad, dev) = (
            source.pad_token_id()?,
            self.experts[0].model.device().clone(),
        );
        let max_len = items.iter().map(Encoded::len).max().unwrap_or(0);
        let n = self.columns.len();
        let mut per_task = vec![[0f64; 3]; n]; // records, correct, routed right
        let mut loss = 0f64;
        for chunk in items.chunks(batch_size.max(1)) {
            let refs: Vec<&Encoded> = chunk.iter().collect();
            let batch = make_batch(&refs, Padding::Longest, pad, max_len, &dev)?;
            let (lp, routes) = self.forward(&batch)?;
            let lp = lp.to_vec2::<f32>()?;
            for ((row, item), route) in lp.iter().zip(chunk).zip(&routes) {
                let label = item.class_label.context("a record without a class")?;
                let task = self
                    .columns
                    .iter()
                    .position(|c| c.contains(&label))
                    .context("label column outside the set")?;
                let pred =
                    (0..row.len()).fold(0, |best, j| if row[j] > row[best] { j } else { best });
                loss -= row[label] as f64;
                let t = &mut per_task[task];
                t[0] += 1.0;
                t[1] += f64::from(u8::from(pred == label));
                t[2] += f64::from(u8::from(route.contains(&task)));
            }
        }
        let total = items.len() as f64;
        let sum = |k: usize| per_task.iter().map(|t| t[k]).sum::<f64>();
        Ok(SetEval {
            eval_loss: loss / total,
            eval_accuracy: sum(1) / total,
            routing_accuracy: sum(2) / total,
            eval_records: items.len(),
            tasks: per_task
                .iter()
                .map(|t| TaskEval {
                    records: t[0] as usize,
                    accuracy: t[1] / t[0].max(1.0),
                    routed_to_own_expert: t[2] / t[0].max(1.0),
                })
                .collect(),
        })
    }
}

fn inputs(batch: &Batch) -> Inputs<'_> {
    Inputs {
        input_ids: &batch.input_ids,
        attention_mask: Some(&batch.attention_mask),
        token_type_ids: None,
    }
}
