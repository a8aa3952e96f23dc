//! A run's inputs made ready: the model loaded, the method attached, the data encoded and
//! laid out in micro-batches ([`Prepared`]), with the adapter the run starts from.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use super::batching::Batching;
use super::checkpoint::Checkpoint;
use super::config::TrainConfig;
use crate::adapted::{attach, TunedModel};
use crate::data::{self, EncodeOptions, Encoded, Encoder, LabelMap, Padding, Truncation};
use crate::dist::BaseComm;
use crate::model::{LoadOptions, Model, ModelSource, Task};
use crate::tuners::{BuildContext, MatchReport, Tuner};

/// A model with its tokenizer and encoded data, ready to train or evaluate.
pub struct Prepared {
    pub source: ModelSource,
    pub model: Model,
    pub tuner: Box<dyn Tuner>,
    /// What each `target_modules` entry matched.
    pub matches: Vec<MatchReport>,
    pub train: Vec<Encoded>,
    pub eval: Vec<Encoded>,
    pub label_map: Option<LabelMap>,
    pub pad_id: u32,
    /// Longest sequence, in tokens.
    pub max_len: usize,
    /// How batches are laid out (the config's choice).
    pub padding: Padding,
    /// How micro-batches are formed: a record count, a token budget, or packed bins.
    pub batching: Batching,
    pub skipped: usize,
    pub truncated: usize,
}

/// Encoding settings of a training config, for sequences of at most `max_len` tokens.
pub fn encode_options(cfg: &TrainConfig, max_len: usize) -> EncodeOptions {
    EncodeOptions {
        max_len,
        truncation: if cfg.truncate {
            Truncation::Right
        } else {
            Truncation::Error
        },
        completion_only: cfg.completion_only,
    }
}

/// Reads and encodes a JSONL file with the model's tokenizer and chat template.
pub fn encode_file(
    path: &Path,
    source: &ModelSource,
    opts: EncodeOptions,
    labels: Option<&LabelMap>,
    limit: Option<usize>,
) -> Result<data::EncodedSet> {
    let mut records = data::read_records(path)?;
    if let Some(n) = limit {
        records.truncate(n);
    }
    let tok = source.tokenizer()?;
    let eos = source.eos_token_ids().first().copied();
    let mut enc = Encoder::new(tok, source.chat_template.as_ref(), opts)?.with_eos_token_id(eos);
    if let Some(l) = labels {
        enc = enc.with_label_map(l);
    }
    let set = enc.encode_records(&records)?;
    set.warn_past_max_len(&records, enc.options().max_len);
    Ok(set)
}

/// Loads the model and data and builds the adapter (fresh, or from `adapter_weights`).
pub fn prepare(
    cfg: &TrainConfig,
    device: &Device,
    adapter_weights: Option<BTreeMap<String, Tensor>>,
) -> Result<Prepared> {
    prepare_sharded(cfg, device, adapter_weights, None)
}

/// [`prepare`] with the frozen base sharded over the ranks of `base` (`--shard-base`): every
/// rank calls it alike, since building the model then reads the weights collectively.
pub fn prepare_sharded(
    cfg: &TrainConfig,
    device: &Device,
    adapter_weights: Option<BTreeMap<String, Tensor>>,
    base: Option<Arc<dyn BaseComm>>,
) -> Result<Prepared> {
    cfg.validate()?;
    if cfg.adapter()?.method()?.trains_whole_model && cfg.quantize.is_some() {
        bail!(
            "--quantize with full fine-tuning: every weight trains as an f32 copy, so a \
             quantized base would not be used; drop --quantize (a quantized frozen base is for \
             adapter methods: QLoRA)"
        )
    }
    let options = LoadOptions {
        quantize: cfg.quantize.as_ref(),
        compute_dtype: cfg.compute_dtype.resolve()?.dtype,
        resize_token_embeddings: cfg.resize_token_embeddings,
        stream_base: cfg.streams_base(),
        max_resident: cfg.max_resident_bytes()?,
    };
    let mut source = ModelSource::load_with(&cfg.model, device, options)?;
    if let Some(comm) = base {
        source.weights.shard(comm)?;
    }
    let label_map = if cfg.task == Task::SeqCls {
        let map = LabelMap::from_records(&data::read_records(&cfg.data)?)?;
        if let serde_json::Value::Object(o) = &mut source.config {
            o.insert("num_labels".into(), serde_json::json!(map.num_labels()));
            o.remove("id2label");
        }
        Some(map)
    } else {
        None
    };
    let max_len = cfg.effective_max_len(source.context())?;
    let train = encode_file(
        &cfg.data,
        &source,
        encode_options(cfg, max_len),
        label_map.as_ref(),
        None,
    )?;
    let eval = match &cfg.eval_data {
        Some(p) => {
            encode_file(
                p,
                &source,
                encode_options(cfg, max_len),
                label_map.as_ref(),
                cfg.eval_limit,
            )?
            .items
        }
        None => vec![],
    };
    let ctx = BuildContext {
        seed: cfg.seed,
        device,
        weights: adapter_weights.map(|w| w.into_iter().collect()),
        allow_unmatched: cfg.allow_unmatched,
        // The run builds its one model from these weights: full fine-tuning's copies replace
        // the base tensors they are made from.
        release_base: Some(source.weights.release_handle()),
    };
    let TunedModel {
        model,
        tuner,
        matches,
        ..
    } = attach(&source, cfg.task, &cfg.adapter()?, ctx)?;
    if tuner.trains_whole_model() {
        super::output::check_not_the_base(&cfg.output_dir, &source)?;
    }
    let pad_id = source.pad_token_id()?;
    let padding = cfg.padding()?;
    let batching = Batching::of(cfg, max_len)?;
    Ok(Prepared {
        batching,
        pad_id,
        max_len,
        padding,
        skipped: train.skipped.len(),
        truncated: train.truncated,
        train: train.items,
        eval,
        label_map,
        source,
        model,
        tuner,
        matches,
    })
}

impl Prepared {
    pub fn trainable_params(&self) -> usize {
        crate::tuners::trainable_params(self.tuner.as_ref())
    }
}

/// [`prepare_sharded`] with the adapter a run starts from: the checkpoint's, the one
/// `init_adapter` names, or a fresh one.
pub(super) fn prepare_run(
    cfg: &TrainConfig,
    checkpoint: Option<&Checkpoint>,
    device: &Device,
    base: Option<Arc<dyn BaseComm>>,
) -> Result<Prepared> {
    match (checkpoint, &cfg.init_adapter) {
        (Some(ck), _) => prepare_sharded(cfg, device, Some(ck.adapter.clone()), base),
        (None, Some(dir)) => {
            let weights = initial_adapter(cfg, dir, device)?;
            prepare_sharded(cfg, device, Some(weights), base).with_context(|| {
                format!(
                    "training from the adapter in {} (--init-adapter)",
                    dir.display()
                )
            })
        }
        (None, None) => prepare_sharded(cfg, device, None, base),
    }
}

/// The weights of the adapter folder `dir` (`--init-adapter`), which must hold the method this
/// run trains.
fn initial_adapter(
    cfg: &TrainConfig,
    dir: &Path,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let saved = crate::peft_io::load_adapter(dir, device)
        .with_context(|| format!("--init-adapter {}", dir.display()))?;
    let method = cfg.adapter()?.peft_type;
    if saved.peft_type() != method {
        bail!(
            "--init-adapter {}: its adapter is {}, this run trains {method}; start from an adapter of the same method",
            dir.display(),
            saved.peft_type()
        )
    }
    Ok(saved.tensors.into_iter().collect())
}
