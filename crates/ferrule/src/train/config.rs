//! What a training run does: a TOML-friendly, serde-defaulted description.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::schedule::LrSchedule;
use crate::data::Padding;
use crate::model::Task;
use crate::quant::QuantSpec;
use crate::tuners::AdapterConfig;

/// A training run. Every field has a default except `model`, `data` and `output_dir`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Model folder, `.gguf` file, or hub id.
    pub model: String,
    /// Training records (JSONL).
    pub data: PathBuf,
    /// Held-out records for eval loss / accuracy.
    pub eval_data: Option<PathBuf>,
    /// Where the adapter, checkpoints and `metrics.jsonl` go.
    pub output_dir: PathBuf,
    pub task: Task,
    /// The method and its settings with PEFT's keys: `[adapter]` in TOML, with `peft_type`
    /// (default: `tuners::registry::default_adapter`). See [`TrainConfig::adapter`].
    pub adapter: Option<AdapterConfig>,
    /// LoRA settings under `[lora]` (the older spelling of `[adapter]` with `peft_type = "LORA"`).
    pub lora: Option<serde_json::Map<String, serde_json::Value>>,
    /// A `target_modules` entry or pattern key that matches no module is a warning, not an error.
    pub allow_unmatched: bool,
    /// Longest sequence in tokens (default: the model's context, at most 512).
    pub max_len: Option<usize>,
    /// Cut longer records to `max_len` instead of failing.
    pub truncate: bool,
    /// Loss only on completions (assistant turns, Alpaca outputs).
    pub completion_only: bool,
    /// How batches lay out their records: `"free"` (padding-free, the default), `"longest"`
    /// (padded to the batch's longest record) or `"max_len"` (padded to `max_len`).
    pub padding: Option<Padding>,
    /// The older spelling of `padding = "max_len"` (fixed shapes, e.g. for benchmarks).
    pub pad_to_max_len: bool,
    /// Records per micro-batch (default [`DEFAULT_BATCH_SIZE`]); see [`TrainConfig::batch_size`].
    pub batch_size: Option<usize>,
    /// Micro-batches of consecutive records of at most this many tokens instead of
    /// `batch_size` records; with `packing`, the size of the packed bins. Needs padding-free
    /// batches (`train::batching`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_tokens: Option<usize>,
    /// Bin-pack each epoch's records into micro-batches of `batch_tokens` tokens (default
    /// `batch_size × max_len`) by best-fit decreasing (`train::batching`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub packing: bool,
    pub grad_accum: usize,
    /// Optimizer steps; when absent, `epochs` passes over the data.
    pub max_steps: Option<usize>,
    pub epochs: f64,
    pub lr: f64,
    pub warmup_steps: usize,
    pub schedule: LrSchedule,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Clip the global gradient L2 norm to this (none or 0: no clipping).
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// Recompute each decoder layer's activations in backward instead of keeping them
    /// (gradient checkpointing): much less memory for about one extra forward pass.
    pub recompute: bool,
    /// With several ranks, each keeps 1/N of every frozen matrix's rows and the others are
    /// broadcast tile by tile when a layer reads them (FSDP-style, `dist::sharded_base`).
    /// Changes memory and traffic, not the result.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shard_base: bool,
    /// Quantize the frozen base's linear weights while loading it (QLoRA): `[quantize]` table
    /// with `method = "nf4" | "fp4" | "int8"`, `blocksize`, `double_quant`.
    pub quantize: Option<QuantSpec>,
    pub eval_every: Option<usize>,
    pub eval_batch_size: Option<usize>,
    /// Evaluate on the first N eval records only.
    pub eval_limit: Option<usize>,
    pub save_every: Option<usize>,
    /// Checkpoints kept on disk (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Start a new run from the weights of this adapter folder (a PEFT folder of the same
    /// method and shapes) instead of a fresh adapter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            data: PathBuf::new(),
            eval_data: None,
            output_dir: PathBuf::new(),
            task: Task::CausalLm,
            adapter: None,
            lora: None,
            allow_unmatched: false,
            max_len: None,
            truncate: true,
            completion_only: true,
            padding: None,
            pad_to_max_len: false,
            batch_size: None,
            batch_tokens: None,
            packing: false,
            grad_accum: 1,
            max_steps: None,
            epochs: 1.0,
            lr: 2e-4,
            warmup_steps: 0,
            schedule: LrSchedule::Linear,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: Some(1.0),
            seed: 42,
            recompute: false,
            shard_base: false,
            quantize: None,
            eval_every: None,
            eval_batch_size: None,
            eval_limit: None,
            save_every: None,
            keep_checkpoints: 2,
            init_adapter: None,
        }
    }
}

/// The most `epochs` a run may ask for: each epoch's micro-batches are planned to count the steps.
pub const MAX_EPOCHS: f64 = 100_000.0;

/// Settings a resumed run may change: its length (the schedule is planned again) and how its
/// global batch is split (`batch_size` × `grad_accum` × ranks; the trainer compares the
/// product). They are kept in a checkpoint but left out of [`TrainConfig::resume_fingerprint`].
pub const RESUMABLE_SETTINGS: [&str; 4] = ["max_steps", "epochs", "batch_size", "grad_accum"];

/// Records per micro-batch when neither `batch_size` nor a token budget is given.
pub const DEFAULT_BATCH_SIZE: usize = 8;

impl TrainConfig {
    /// Records per micro-batch: `batch_size`, else [`DEFAULT_BATCH_SIZE`]. With `batch_tokens`
    /// and no `packing`, micro-batches are formed by tokens and this is the eval batch size only.
    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(DEFAULT_BATCH_SIZE)
    }

    /// The batch layout: `padding`, or `"max_len"` for `pad_to_max_len = true`; the two
    /// saying different things is an error.
    pub fn padding(&self) -> Result<Padding> {
        match (self.padding, self.pad_to_max_len) {
            (Some(p), true) if p != Padding::MaxLen => {
                bail!("train: `pad_to_max_len = true` (--pad-to-max-len) contradicts `padding = \"{}\"`; set one of them", p.name())
            }
            (_, true) => Ok(Padding::MaxLen),
            (p, false) => Ok(p.unwrap_or_default()),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.padding()?;
        if self.model.is_empty() {
            bail!("train: no model given (--model or `model = ...` in the config file)")
        }
        if self.data.as_os_str().is_empty() {
            bail!("train: no training data given (--data or `data = ...`)")
        }
        if self.output_dir.as_os_str().is_empty() {
            bail!("train: no output folder given (--output or `output_dir = ...`)")
        }
        if let Some(q) = &self.quantize {
            q.validate()?;
        }
        if self.batch_size == Some(0) || self.grad_accum == 0 || self.batch_tokens == Some(0) {
            bail!("train: batch_size, batch_tokens and grad_accum (--batch-size, --batch-tokens, --grad-accum) must be at least 1")
        }
        self.validate_batching()?;
        if self.max_len.is_some_and(|m| m < 2) {
            bail!("train: max_len must be at least 2")
        }
        if let Some(g) = self.max_grad_norm.filter(|g| g.is_nan() || *g < 0.0) {
            bail!("train: max_grad_norm (--max-grad-norm) must be a positive number, or 0 for no clipping; got {g}")
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("train: lr must be a positive number, got {}", self.lr)
        }
        if !(self.epochs.is_finite() && self.epochs <= MAX_EPOCHS) {
            bail!("train: epochs = {} is not a number of passes ferrule can plan (at most {MAX_EPOCHS}); use max_steps for longer runs", self.epochs)
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs <= 0.0) {
            bail!("train: nothing to do (max_steps = 0 or epochs <= 0)")
        }
        if self.task == Task::FeatureExtraction {
            bail!("train: FEATURE_EXTRACTION has no training objective; use CAUSAL_LM or SEQ_CLS")
        }
        Ok(())
    }

    /// The option that forms micro-batches by tokens, as (config key, flag): `packing`, else
    /// `batch_tokens`; `None` when micro-batches are `batch_size` records.
    pub fn token_batching(&self) -> Option<(&'static str, &'static str)> {
        match (self.packing, self.batch_tokens) {
            (true, _) => Some(("packing", "--packing")),
            (false, Some(_)) => Some(("batch_tokens", "--batch-tokens")),
            (false, None) => None,
        }
    }

    /// The batching keys that contradict each other: a token budget with a record count, or
    /// either token-based batching with padded batches.
    fn validate_batching(&self) -> Result<()> {
        if let (Some(b), Some(t)) = (self.batch_size, self.batch_tokens) {
            let what = if self.packing {
                "the size of the packed bins"
            } else {
                "micro-batches by tokens"
            };
            bail!(
                "train: batch_size = {b} and batch_tokens = {t} (--batch-size, --batch-tokens) both set the micro-batch: \
                 batch_tokens gives {what}; set one of them"
            )
        }
        let padding = self.padding()?;
        if let Some((key, flag)) = self.token_batching().filter(|_| padding != Padding::Free) {
            bail!(
                "train: {key} needs padding-free batches (records end to end, attention within each), but padding = \"{}\"; \
                 drop --padding / --pad-to-max-len (padding, pad_to_max_len) or {flag}",
                padding.name()
            )
        }
        Ok(())
    }

    /// The adapter to train: `[adapter]`, else `[lora]` as LoRA, else
    /// [`crate::tuners::registry::default_adapter`]. Both tables at once is an error. Unknown
    /// keys are errors.
    pub fn adapter(&self) -> Result<AdapterConfig> {
        let cfg = match (&self.adapter, &self.lora) {
            (Some(_), Some(_)) => bail!("train: both [adapter] and [lora] are given; put the method's keys under [adapter] with peft_type"),
            (Some(a), None) => a.clone(),
            (None, Some(l)) => AdapterConfig::new(crate::tuners::lora::METHOD.peft_type, l.clone()),
            (None, None) => crate::tuners::registry::default_adapter(),
        };
        cfg.check_keys("train config [adapter]", true)?;
        Ok(cfg)
    }

    /// `max_len`, or the model's context capped at 512; an explicit value longer than the
    /// context is an error.
    pub fn effective_max_len(&self, context: Option<usize>) -> Result<usize> {
        match (self.max_len, context) {
            (Some(m), Some(ctx)) if m > ctx => {
                bail!("max_len {m} exceeds the model's context of {ctx} positions (max_position_embeddings); lower --max-len")
            }
            (Some(m), _) => Ok(m),
            (None, Some(ctx)) => Ok(ctx.min(512)),
            (None, None) => Ok(512),
        }
    }

    /// The settings a resumed run must share with the interrupted one: [`resume_settings`]
    /// less [`RESUMABLE_SETTINGS`].
    ///
    /// [`resume_settings`]: TrainConfig::resume_settings
    pub fn resume_fingerprint(&self) -> Result<String> {
        let mut settings = self.resume_settings()?;
        if let Some(table) = settings.as_object_mut() {
            for key in RESUMABLE_SETTINGS {
                table.remove(key);
            }
        }
        super::checkpoint::config_hash(&settings)
    }

    /// The settings of the run as a checkpoint keeps them (logging and checkpoint cadence
    /// left out: a resumed run may change them), so that a refused resume can name what
    /// differs.
    pub fn resume_settings(&self) -> Result<serde_json::Value> {
        let mut c = self.clone();
        c.eval_every = None;
        c.save_every = None;
        c.keep_checkpoints = 0;
        c.eval_batch_size = None;
        // Memory layout only: a run may resume with or without it.
        c.shard_base = false;
        // The default spelled out: a resume compares the global batch it makes.
        c.batch_size = Some(c.batch_size());
        Ok(serde_json::to_value(c)?)
    }
}
