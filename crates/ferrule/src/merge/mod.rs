//! Merging an adapter into its base: a standalone Hugging Face model folder (config,
//! tokenizer, `model.safetensors`) that transformers loads without peft.
//!
//! A bitsandbytes-quantized base stays quantized: each adapted weight is dequantized, the
//! update added, and the sum requantized in the same format (as peft's `merge` does for
//! `Linear4bit`/`Linear8bitLt`); the rounding this adds is measured and reported. With
//! [`MergeOptions::dequantize`] it is written dequantized instead, `dequant(W) + ΔW` in f32:
//! exactly the model an adapter trained on that quantized base computes. A GGUF base is
//! written dequantized to f32 (safetensors has no GGUF block types).
//!
//! An adapter trained by ferrule records how its base was held ([`BaseRecord`]); merging one
//! trained on a quantized base into a base held otherwise is warned about.

pub mod adapters;
mod base_record;
pub mod darex;
pub mod delta;
pub mod models;

pub use base_record::{BaseRecord, FILE as BASE_RECORD_FILE};

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde_json::{json, Value};

use crate::model::{ModelSource, Task};
use crate::ops::{ComputeDtype, FrozenWeight};
use crate::quant::{bnb_format, RoundTripError};
use crate::tuners::{Tuner, Update};
use crate::util::atomic::{raw_tensor, RawTensor};

/// What a merge changed, for the user to check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    pub merged_modules: usize,
    pub replaced_tensors: usize,
    pub tensors_written: usize,
    /// Adapted weights of a quantized base that were requantized after the merge.
    pub requantized: usize,
    /// Largest rounding error requantization added, against the exact `dequant(W) + ΔW`.
    pub requantize_error: Option<RoundTripError>,
}

/// How to merge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeOptions {
    /// Write a quantized base's weights dequantized, in f32, rather than requantizing the
    /// merged ones.
    pub dequantize: bool,
}

/// The base weights with `W' = W + ΔW` applied for every adapted module and the
/// `modules_to_save` copies put in place, under the tensor names of the task's HF class.
pub fn merged_tensors(
    source: &ModelSource,
    tuner: &dyn Tuner,
    task: Task,
) -> Result<(BTreeMap<String, FrozenWeight>, Value, MergeReport)> {
    merged_tensors_with(source, tuner, task, MergeOptions::default())
}

/// [`merged_tensors`] with options.
pub fn merged_tensors_with(
    source: &ModelSource,
    tuner: &dyn Tuner,
    task: Task,
    options: MergeOptions,
) -> Result<(BTreeMap<String, FrozenWeight>, Value, MergeReport)> {
    merged_tensors_from(source, tuner.replaced()?, tuner.updates()?, task, options)
}

/// The base weights with `replaced` tensors put in place, then `updates` applied (what
/// [`Tuner::replaced`] and [`Tuner::updates`] give, or a combination of several adapters').
pub fn merged_tensors_from(
    source: &ModelSource,
    replaced: Vec<(String, candle_core::Tensor)>,
    updates: Vec<(String, Update)>,
    task: Task,
    options: MergeOptions,
) -> Result<(BTreeMap<String, FrozenWeight>, Value, MergeReport)> {
    let mut config = source.config.clone();
    let model_type = source.model_type().to_string();
    // A bare encoder checkpoint gains the `bert.` prefix of BertForSequenceClassification.
    let prefix = if task == Task::SeqCls
        && model_type == "bert"
        && !source
            .weights
            .names()
            .iter()
            .any(|n| n.starts_with("bert."))
    {
        "bert."
    } else {
        ""
    };
    let device = Device::Cpu;
    let mut tensors: BTreeMap<String, FrozenWeight> = BTreeMap::new();
    for (k, t) in source
        .weights
        .tensors()
        .iter()
        .filter(|(_, t)| t.dtype().is_float())
    {
        tensors.insert(format!("{prefix}{k}"), FrozenWeight::Dense(t.clone()));
    }
    for (k, q) in source.weights.quantized() {
        // bitsandbytes formats are written back in their layout; GGUF blocks are dequantized.
        let w = if bnb_format::has_layout(q.as_ref()) && !options.dequantize {
            FrozenWeight::Quantized(q.clone(), ComputeDtype::F32)
        } else {
            FrozenWeight::Quantized(q.clone(), ComputeDtype::F32)
                .to_dense(&device)
                .map(FrozenWeight::Dense)?
        };
        tensors.insert(format!("{prefix}{k}"), w);
    }
    let mut report = MergeReport {
        merged_modules: 0,
        replaced_tensors: 0,
        tensors_written: 0,
        requantized: 0,
        requantize_error: None,
    };
    // Replacements first: an update may apply on top of one (a LoRA delta on PEFT's saved
    // embedding base layer, lora_B's bias on a trained base bias), as in peft.
    for (name, t) in replaced {
        crate::util::finite::ensure_finite(
            &t,
            || format!("the adapter's replacement for {name}"),
            "the adapter holds a non-finite value; nothing was written",
        )?;
        tensors.insert(name, FrozenWeight::Dense(t));
        report.replaced_tensors += 1;
    }
    // A tied head shares the embedding's table, not its LoRA update (peft adds the update in
    // the embedding layer only): an updated embedding unties the head.
    let tied = !tensors.contains_key("lm_head.weight")
        && tensors.contains_key("model.embed_tokens.weight");
    if tied
        && updates
            .iter()
            .any(|(n, _)| n == "model.embed_tokens.weight")
    {
        let table = tensors["model.embed_tokens.weight"].clone();
        tensors.insert("lm_head.weight".into(), table);
        config["tie_word_embeddings"] = json!(false);
    }
    for (name, update) in updates {
        let base = match tensors.get(&name) {
            Some(t) => t.clone(),
            // A tied head that was adapted gets its own weight: untie it.
            None if name == "lm_head.weight" => {
                let embed = tensors.get("model.embed_tokens.weight").context("tied lm_head without model.embed_tokens.weight")?.clone();
                config["tie_word_embeddings"] = json!(false);
                embed
            }
            None if name.ends_with(".bias") => bail!(
                "merge: the adapter adds to {name:?} (lora_bias), but that layer has no bias in the base checkpoint; peft refuses this merge too. Use the adapter unmerged"
            ),
            None => bail!("merge: the adapter changes {name:?}, which the base checkpoint does not have"),
        };
        // Dequantized once: it is both the shape check and the sum's left side.
        let dense = base.to_dense(&device)?;
        let merged = apply_update(&name, dense, update)?;
        crate::util::finite::ensure_finite(
            &merged,
            || format!("the merged weight {name}"),
            "the adapter's update is not finite; nothing was written",
        )?;
        let merged = match &base {
            FrozenWeight::Quantized(q, dtype) => {
                let exact: Vec<f32> = merged.flatten_all()?.to_vec1()?;
                let requantized = bnb_format::requantize(q.as_ref(), &name, &exact)?;
                let err = RoundTripError::between(&exact, &requantized.dequantize());
                report.requantize_error =
                    Some(report.requantize_error.map_or(err, |e| e.worst(err)));
                report.requantized += 1;
                FrozenWeight::Quantized(requantized, *dtype)
            }
            // merge loads the model in one process: nothing is sharded or streamed.
            FrozenWeight::Dense(_) | FrozenWeight::Sharded(..) | FrozenWeight::Streamed(..) => {
                FrozenWeight::Dense(merged)
            }
        };
        tensors.insert(name, merged);
        report.merged_modules += 1;
    }
    if let Some(e) = report.requantize_error {
        // peft's warning for the same operation, with the measured error.
        tracing::warn!(
            "Merge lora module to a quantized linear may get different generations due to rounding errors: requantizing {} merged weight(s) added max |error| {:.3e} ({:.2e} of the largest weight)",
            report.requantized, e.max_abs, e.rel
        );
    }
    let arch = match (model_type.as_str(), task) {
        ("bert", Task::SeqCls) => "BertForSequenceClassification",
        ("bert", _) => "BertModel",
        ("mistral", _) => "MistralForCausalLM",
        ("qwen2", _) => "Qwen2ForCausalLM",
        _ => "LlamaForCausalLM",
    };
    config["architectures"] = json!([arch]);
    config["dtype"] = json!("float32");
    let quantized = tensors
        .values()
        .any(|w| matches!(w, FrozenWeight::Quantized(..)));
    if let Value::Object(o) = &mut config {
        o.remove("torch_dtype");
        if !quantized {
            o.remove("quantization_config");
        }
    }
    if task == Task::SeqCls {
        if let Some(t) = tensors.get("classifier.weight") {
            let n = t.dims().0;
            config["num_labels"] = json!(n);
            config["id2label"] = json!((0..n)
                .map(|i| (i.to_string(), format!("LABEL_{i}")))
                .collect::<BTreeMap<_, _>>());
            config["label2id"] = json!((0..n)
                .map(|i| (format!("LABEL_{i}"), i))
                .collect::<BTreeMap<_, _>>());
        }
    }
    report.tensors_written = tensors.len();
    Ok((tensors, config, report))
}

/// `W'` for the dense base `dense` and one `update` of tensor `name` (the formulas at
/// [`Update`]); a shape the update does not fit is an error naming the tensor.
fn apply_update(
    name: &str,
    dense: candle_core::Tensor,
    update: Update,
) -> Result<candle_core::Tensor> {
    Ok(match update {
        Update::Add(delta) if delta.dims() == dense.dims() => {
            (dense + delta.to_dtype(candle_core::DType::F32)?)?
        }
        Update::Scale(s) if s.broadcast_as(dense.shape()).is_ok() => {
            dense.broadcast_mul(&s.to_dtype(candle_core::DType::F32)?)?
        }
        Update::RowRescaled { delta, magnitude }
            if delta.dims() == dense.dims() && magnitude.dims() == [dense.dims()[0]] =>
        {
            let w = (dense + delta.to_dtype(candle_core::DType::F32)?)?;
            let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?;
            w.broadcast_mul(
                &magnitude
                    .to_dtype(candle_core::DType::F32)?
                    .unsqueeze(1)?
                    .broadcast_div(&norm)?,
            )?
        }
        Update::Add(u) | Update::Scale(u) | Update::RowRescaled { delta: u, .. } => {
            bail!(
                "merge: {name:?} has shape {:?} but the adapter's update has {:?}",
                dense.dims(),
                u.dims()
            )
        }
    })
}

/// Writes the merged model to `out` (see [`crate::export::write_model_folder`]).
pub fn merge_to_dir(
    source: &ModelSource,
    tuner: &dyn Tuner,
    task: Task,
    out: &Path,
) -> Result<MergeReport> {
    merge_to_dir_with(source, tuner, task, out, MergeOptions::default())
}

/// [`merge_to_dir`] with options.
pub fn merge_to_dir_with(
    source: &ModelSource,
    tuner: &dyn Tuner,
    task: Task,
    out: &Path,
    options: MergeOptions,
) -> Result<MergeReport> {
    merge_updates_to_dir(
        source,
        tuner.replaced()?,
        tuner.updates()?,
        task,
        out,
        options,
    )
}

/// Writes the base with `replaced` and `updates` applied ([`merged_tensors_from`]) to `out`.
pub fn merge_updates_to_dir(
    source: &ModelSource,
    replaced: Vec<(String, candle_core::Tensor)>,
    updates: Vec<(String, Update)>,
    task: Task,
    out: &Path,
    options: MergeOptions,
) -> Result<MergeReport> {
    let (raw, config, report) = merged_raw(source, replaced, updates, task, options)?;
    crate::export::write_model_folder(source, out, &config, &raw)?;
    Ok(report)
}

/// The base with `replaced` and `updates` applied, serialized tensor by tensor as the
/// model folder stores them (quantized ones in bitsandbytes' layout), with its `config.json`.
pub fn merged_raw(
    source: &ModelSource,
    replaced: Vec<(String, candle_core::Tensor)>,
    updates: Vec<(String, Update)>,
    task: Task,
    options: MergeOptions,
) -> Result<(BTreeMap<String, RawTensor>, Value, MergeReport)> {
    let (tensors, config, report) = merged_tensors_from(source, replaced, updates, task, options)?;
    let mut raw = BTreeMap::new();
    for (name, w) in &tensors {
        match w {
            FrozenWeight::Dense(t) => {
                raw.insert(name.clone(), raw_tensor(name, t)?);
            }
            FrozenWeight::Quantized(q, _) => bnb_format::serialize(name, q.as_ref(), &mut raw)?,
            FrozenWeight::Sharded(..) => {
                bail!("merge: {name:?} is sharded across ranks; merge runs in one process")
            }
            FrozenWeight::Streamed(..) => {
                bail!("merge: {name:?} is streamed from disk; merge loads the base in memory")
            }
        }
    }
    Ok((raw, config, report))
}
