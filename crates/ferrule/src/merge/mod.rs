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
mod merged;
pub mod models;

pub use base_record::{BaseRecord, FILE as BASE_RECORD_FILE};
pub use merged::MergedModel;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::model::{ModelSource, Task};
use crate::ops::FrozenWeight;
use crate::quant::RoundTripError;
use crate::tuners::{Tuner, Update};

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
    /// Each weight a mask pruned ([`Update::Masked`], PST): its zeros as made (before any
    /// requantization), once the model is written. Absent from the JSON when there are none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pruned: BTreeMap<String, Pruned>,
}

/// The zeros of one pruned weight ([`MergeReport::pruned`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Pruned {
    pub zeros: usize,
    pub elements: usize,
    /// `zeros / elements`.
    pub sparsity: f64,
}

impl Pruned {
    /// The zeros of `w`.
    pub fn of(w: &candle_core::Tensor) -> Result<Self> {
        let values: Vec<f32> = w
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        let zeros = values.iter().filter(|v| **v == 0.0).count();
        let elements = values.len();
        Ok(Self {
            zeros,
            elements,
            sparsity: zeros as f64 / elements.max(1) as f64,
        })
    }
}

/// How to merge.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MergeOptions {
    /// Write a quantized base's weights dequantized, in f32, rather than requantizing the
    /// merged ones.
    pub dequantize: bool,
    /// Quantize a dense base's linear weights (and keep its embedding and head in bf16) as
    /// they are made, exactly as loading it with `--quantize` holds them: the merged ones are
    /// `requantize(dequant(Q(W)) + ΔW)`. A memory-mapped base (`LoadOptions::read_once`) is so
    /// merged and written quantized one tensor at a time.
    pub quantize: Option<crate::quant::QuantSpec>,
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
/// [`Tuner::replaced`] and [`Tuner::updates`] give, or a combination of several adapters'),
/// every tensor made now. [`merged_model`] makes them one at a time instead.
pub fn merged_tensors_from(
    source: &ModelSource,
    replaced: Vec<(String, candle_core::Tensor)>,
    updates: Vec<(String, Update)>,
    task: Task,
    options: MergeOptions,
) -> Result<(BTreeMap<String, FrozenWeight>, Value, MergeReport)> {
    let model = merged_model(source, replaced, updates, task, options)?;
    let mut tensors = BTreeMap::new();
    for name in model.names() {
        tensors.insert(name.clone(), model.tensor(name)?);
    }
    model.warn_requantized();
    Ok((tensors, model.config().clone(), model.report()))
}

/// The merged model of [`merged_tensors_from`], each tensor made when it is read or written
/// ([`MergedModel`]); with a memory-mapped base (`LoadOptions::stream_base`) a merge holds
/// about one tensor at a time.
pub fn merged_model(
    source: &ModelSource,
    replaced: Vec<(String, candle_core::Tensor)>,
    updates: Vec<(String, Update)>,
    task: Task,
    options: MergeOptions,
) -> Result<MergedModel> {
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
    let mut base: BTreeMap<String, FrozenWeight> = source
        .weights
        .held()
        .into_iter()
        .map(|(k, w)| (format!("{prefix}{k}"), w))
        .collect();
    // A tied head shares the embedding's table, not its LoRA update (peft adds the update in
    // the embedding layer only): an updated embedding, or an adapted head, unties the head.
    // The table is the embedding as replaced, when it is (peft applies the update on top).
    let embed = "model.embed_tokens.weight";
    let tied = !base.contains_key("lm_head.weight")
        && !replaced.iter().any(|(n, _)| n == "lm_head.weight");
    if tied
        && updates
            .iter()
            .any(|(n, _)| n == embed || n == "lm_head.weight")
    {
        let table = match replaced.iter().find(|(n, _)| n == embed) {
            Some((_, t)) => FrozenWeight::Dense(t.clone()),
            None => base
                .get(embed)
                .context("tied lm_head without model.embed_tokens.weight")?
                .clone(),
        };
        base.insert("lm_head.weight".into(), table);
        config["tie_word_embeddings"] = json!(false);
    }
    let mut replaced = replaced;
    replaced.extend(added_biases(&base, &replaced, &mut config, &model_type)?);
    for (name, _) in &updates {
        if base.contains_key(name) || replaced.iter().any(|(n, _)| n == name) {
            continue;
        }
        if name.ends_with(".bias") {
            bail!("merge: the adapter adds to {name:?} (lora_bias), but that layer has no bias in the base checkpoint; peft refuses this merge too. Use the adapter unmerged")
        }
        bail!("merge: the adapter changes {name:?}, which the base checkpoint does not have")
    }
    let keep_quantized = !options.dequantize;
    let written_spec = keep_quantized
        .then(|| options.quantize.or_else(|| kept_spec(base.values())))
        .flatten();
    let classifier = "classifier.weight";
    let labels = match replaced.iter().find(|(n, _)| n == classifier) {
        Some((_, t)) => Some(t.dims()[0]),
        None => base.get(classifier).map(|w| w.dims().0),
    };
    set_merged_config(&mut config, &model_type, task, written_spec, labels);
    MergedModel::new(
        base.into_iter().collect(),
        replaced,
        updates,
        config,
        keep_quantized,
        options.quantize,
    )
}

/// The Llama option that gives every linear of a kind a bias (transformers' `LlamaConfig`
/// `attention_bias` for q, k, v, o; `mlp_bias` for gate, up, down), by the module path's end.
fn llama_bias_option(module: &str) -> Option<&'static str> {
    let name = module.rsplit_once('.').map_or(module, |(parent, name)| {
        if parent.ends_with(".self_attn") || parent.ends_with(".mlp") {
            name
        } else {
            ""
        }
    });
    match name {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => Some("attention_bias"),
        "gate_proj" | "up_proj" | "down_proj" => Some("mlp_bias"),
        _ => None,
    }
}

/// Biases a method gives linears the base has none for (DiffFit's added bias on a Llama):
/// written through Llama's `attention_bias` / `mlp_bias`, set in `config`, with zero biases for
/// the other linears the option covers, so that transformers builds the same model. Other
/// model types have no such option for these layers (Qwen2's q, k, v biases are fixed, its o
/// and MLP have none; Mistral has none): an error naming the layer.
fn added_biases(
    base: &BTreeMap<String, FrozenWeight>,
    replaced: &[(String, candle_core::Tensor)],
    config: &mut Value,
    model_type: &str,
) -> Result<Vec<(String, candle_core::Tensor)>> {
    let mut options = std::collections::BTreeSet::new();
    for (name, _) in replaced {
        let Some(module) = name.strip_suffix(".bias") else {
            continue;
        };
        if base.contains_key(name) || !base.contains_key(&format!("{module}.weight")) {
            continue;
        }
        match (model_type, llama_bias_option(module)) {
            ("llama", Some(option)) => {
                options.insert(option);
            }
            _ => bail!("merge: the adapter gives {module} a bias, which the base checkpoint has none of, and a Hugging Face {model_type} model has no option for a bias there (Llama's attention_bias / mlp_bias); use the adapter unmerged"),
        }
    }
    let mut zeros = Vec::new();
    for option in options {
        config[option] = json!(true);
        for (name, w) in base {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            let bias = format!("{module}.bias");
            let missing = !base.contains_key(&bias) && !replaced.iter().any(|(n, _)| *n == bias);
            if missing && llama_bias_option(module) == Some(option) {
                let out = w.dims().0;
                let device = &candle_core::Device::Cpu;
                zeros.push((
                    bias,
                    candle_core::Tensor::zeros(out, candle_core::DType::F32, device)?,
                ));
            }
        }
    }
    Ok(zeros)
}

/// The 4-bit or int8 format of the first base weight the merge writes quantized (a base
/// loaded with `--quantize`, or a bitsandbytes folder), if any.
fn kept_spec<'a>(base: impl Iterator<Item = &'a FrozenWeight>) -> Option<crate::quant::QuantSpec> {
    base.filter_map(|w| merged::keeps(w, true)).find_map(|q| {
        match crate::quant::bnb_format::Target::of(q.as_ref()) {
            Some(crate::quant::bnb_format::Target::Quantized(spec)) => Some(spec),
            _ => None,
        }
    })
}

/// The merged model's `config.json`: its class for `task`, f32, the `quantization_config`
/// of `quantized` when weights are written quantized (kept from the source where it has one,
/// so a bitsandbytes folder keeps its own; else made from the spec, as transformers writes
/// it) and none otherwise, and for sequence classification the labels of the classifier's
/// `labels` rows (transformers' `LABEL_i` defaults).
fn set_merged_config(
    config: &mut Value,
    model_type: &str,
    task: Task,
    quantized: Option<crate::quant::QuantSpec>,
    labels: Option<usize>,
) {
    let arch = match (model_type, task) {
        ("bert", Task::SeqCls) => "BertForSequenceClassification",
        ("bert", _) => "BertModel",
        ("mistral", _) => "MistralForCausalLM",
        ("qwen2", _) => "Qwen2ForCausalLM",
        _ => "LlamaForCausalLM",
    };
    config["architectures"] = json!([arch]);
    config["dtype"] = json!("float32");
    if let Value::Object(o) = config {
        o.remove("torch_dtype");
        match quantized {
            None => {
                o.remove("quantization_config");
            }
            Some(spec) => {
                o.entry("quantization_config")
                    .or_insert_with(|| crate::quant::bnb_format::quantization_config(&spec));
            }
        }
    }
    if let (Task::SeqCls, Some(n)) = (task, labels) {
        config["num_labels"] = json!(n);
        config["id2label"] = json!((0..n)
            .map(|i| (i.to_string(), format!("LABEL_{i}")))
            .collect::<BTreeMap<_, _>>());
        config["label2id"] = json!((0..n)
            .map(|i| (format!("LABEL_{i}"), i))
            .collect::<BTreeMap<_, _>>());
    }
}

/// `W'` for the dense base `dense` and one `update` of tensor `name` (the formulas at
/// [`Update`]; [`MergedModel`] checked the shapes when it was planned).
fn apply_update(
    name: &str,
    dense: candle_core::Tensor,
    update: &Update,
) -> Result<candle_core::Tensor> {
    let f32 = candle_core::DType::F32;
    let merged = match update {
        Update::Add(delta) => dense + delta.dense()?.to_dtype(f32)?,
        Update::Scale(s) => dense.broadcast_mul(&s.to_dtype(f32)?),
        Update::RowRescaled { delta, magnitude } => {
            let w = (dense + delta.dense()?.to_dtype(f32)?)?;
            let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?;
            w.broadcast_mul(
                &magnitude
                    .to_dtype(f32)?
                    .unsqueeze(1)?
                    .broadcast_div(&norm)?,
            )
        }
        Update::Masked(m) => m.apply(&dense),
        Update::Quantized(q) => q.apply(&dense),
    };
    merged.with_context(|| format!("merge: applying the adapter's update to {name:?}"))
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

/// Writes the base with `replaced` and `updates` applied ([`merged_model`]) to `out`, one
/// tensor at a time ([`MergedModel::write_safetensors`]).
pub fn merge_updates_to_dir(
    source: &ModelSource,
    replaced: Vec<(String, candle_core::Tensor)>,
    updates: Vec<(String, Update)>,
    task: Task,
    out: &Path,
    options: MergeOptions,
) -> Result<MergeReport> {
    let model = merged_model(source, replaced, updates, task, options)?;
    crate::export::write_model_folder_with(source, out, model.config(), |file| {
        model.write_safetensors(file, Some(crate::export::pt_format()))
    })?;
    Ok(model.report())
}
