//! What a training run does: a TOML-friendly, serde-defaulted description.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::optim::{OptimName, DEFAULT_MIN_8BIT_SIZE};
use super::schedule::LrSchedule;
use crate::data::Padding;
use crate::model::Task;
use crate::ops::{ComputeDtype, ComputeDtypeChoice, ComputeDtypeDecision};
use crate::quant::QuantSpec;
use crate::tuners::AdapterConfig;

/// A training run. Every field has a default except `model`, `data` and `output_dir`.
///
/// Each setting is declared here once: its doc comment is the `ferrule train --help` line,
/// its name the TOML key (and the flag's id), its default the `Default` impl below (which
/// `--help` shows). With the `cli` feature the struct is also the flags' clap definition:
/// `ferrule train` flattens it and overlays the flags given on the command line over the
/// config file ([`TrainConfig::with_keys_from`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Model folder (config.json + safetensors + tokenizer.json), .gguf file, or hub id.
    /// Required (the flag or the config file's key).
    #[cfg_attr(feature = "cli", arg(long, value_name = "PATH", help_heading = heading::RUN))]
    pub model: String,
    /// Training data (JSONL: {"text"}, alpaca, {"messages"} chat, or {"text","label"}).
    /// Required (the flag or the config file's key).
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE", value_parser = path, help_heading = heading::RUN))]
    pub data: PathBuf,
    /// Held-out JSONL records (same shapes as the training data), evaluated at the end and
    /// every eval-every steps (default: none, no evaluation).
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE", help_heading = heading::DATA))]
    pub eval_data: Option<PathBuf>,
    /// Output folder: adapter, checkpoints, metrics.jsonl, train_summary.json. Required
    /// (the flag or the config file's output_dir).
    #[cfg_attr(feature = "cli", arg(long = "output", short = 'o', value_name = "DIR", value_parser = path, help_heading = heading::RUN))]
    pub output_dir: PathBuf,
    /// What the model learns: causal-lm or seq-cls (PEFT's names, e.g. SEQ_CLS, work too).
    #[cfg_attr(feature = "cli", arg(long, value_parser = parse_task, help_heading = heading::DATA))]
    pub task: Task,
    /// The method and its settings with PEFT's keys: `[adapter]` in TOML, with `peft_type`
    /// (default: `tuners::registry::default_adapter`). See [`TrainConfig::adapter`].
    #[cfg_attr(feature = "cli", arg(skip))]
    pub adapter: Option<AdapterConfig>,
    /// LoRA settings under `[lora]` (the older spelling of `[adapter]` with `peft_type = "LORA"`).
    #[cfg_attr(feature = "cli", arg(skip))]
    pub lora: Option<serde_json::Map<String, serde_json::Value>>,
    /// A `target_modules` entry or pattern key that matches no module is a warning, not an
    /// error (the flag is among the method's, `--allow-unmatched`).
    #[cfg_attr(feature = "cli", arg(skip))]
    pub allow_unmatched: bool,
    /// Grow the token embeddings (and an untied lm_head) to the tokenizer's size when tokens
    /// were added to it, the new rows the mean of the old (transformers'
    /// resize_token_embeddings); list the rows to train in trainable_token_indices. The adapter
    /// then holds the resized tables, as peft saves them.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::METHOD))]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resize_token_embeddings: bool,
    /// Longest sequence in tokens (default: the model's context, at most 512).
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::DATA))]
    pub max_len: Option<usize>,
    /// Records longer than max-len are cut to it (true, the default) or are an error (false:
    /// the flag --no-truncate).
    #[cfg_attr(feature = "cli", arg(long = "no-truncate", action = clap::ArgAction::SetFalse, help_heading = heading::DATA))]
    pub truncate: bool,
    /// Loss on completions only: assistant turns, Alpaca outputs (true, the default), or on
    /// prompt tokens too (false: the flag --train-on-prompt).
    #[cfg_attr(feature = "cli", arg(long = "train-on-prompt", action = clap::ArgAction::SetFalse, help_heading = heading::DATA))]
    pub completion_only: bool,
    /// Batch layout: free (padding-free: records end to end, attention within each; the
    /// default), longest (padded to each batch's longest record) or max-len (padded to max-len).
    #[cfg_attr(feature = "cli", arg(long, value_parser = parse_padding, help_heading = heading::DATA))]
    pub padding: Option<Padding>,
    /// Pad every batch to max-len: the older spelling of padding max-len (fixed shapes, e.g.
    /// for benchmarks).
    #[cfg_attr(feature = "cli", arg(long, conflicts_with = "padding", help_heading = heading::DATA))]
    pub pad_to_max_len: bool,
    /// Records per micro-batch (default 8).
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::DATA))]
    pub batch_size: Option<usize>,
    /// Micro-batches by tokens: consecutive records of at most N tokens in all, instead of
    /// batch-size records (padding-free batches only). With packing, the size of each bin
    /// (default: none, batches of batch-size records).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", conflicts_with = "batch_size", help_heading = heading::DATA))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_tokens: Option<usize>,
    /// Bin-pack each epoch's records into micro-batches of batch-tokens tokens (default
    /// batch-size x max-len) by best-fit decreasing; no record attends to another.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::DATA))]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub packing: bool,
    /// Micro-batches per optimizer step; the step averages over all their trained tokens.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub grad_accum: usize,
    /// Optimizer steps to run (default: epochs passes over the data).
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub max_steps: Option<usize>,
    /// Passes over the data when max-steps is not given (fractions allowed).
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub epochs: f64,
    /// Train on N tokens of the data (padding excluded), instead of max-steps or epochs: the
    /// run takes the steps whose micro-batches first reach N tokens in the seeded data order,
    /// so the learning-rate schedule spans them (default: none).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", conflicts_with = "max_steps", help_heading = heading::OPTIM))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Stop after the step that reaches S seconds of training (steps and evaluations, summed
    /// over resumed invocations; loading not counted) and save the result as a finished run.
    /// The schedule stays planned over max-steps or epochs, as Lightning's max_time does
    /// (default: none).
    #[cfg_attr(feature = "cli", arg(long, value_name = "S", help_heading = heading::OPTIM))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_seconds: Option<f64>,
    /// Peak learning rate of AdamW.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub lr: f64,
    /// DePT (--method dept): the learning rate of its low-rank pair (lora_embedding_A/B), as
    /// the reference train.py's lora_embedding_lr; the prompt takes lr. It follows lr's
    /// schedule (default: none, every tensor at lr). Other methods refuse it.
    #[cfg_attr(feature = "cli", arg(long, value_name = "LR", help_heading = heading::OPTIM))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_embedding_lr: Option<f64>,
    /// Steps of linear warmup from 0 to lr.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub warmup_steps: usize,
    /// Learning rate after warmup: constant, linear or cosine (decaying to 0 at the last step).
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub schedule: LrSchedule,
    /// AdamW's decoupled weight decay.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub weight_decay: f64,
    /// AdamW's beta1 (decay of the gradient's running mean).
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub adam_beta1: f64,
    /// AdamW's beta2 (decay of the squared gradient's running mean).
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub adam_beta2: f64,
    /// AdamW's epsilon (added to the denominator).
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub adam_eps: f64,
    /// The optimizer (default adamw): adamw, adamw_8bit (bitsandbytes' AdamW8bit: both moments
    /// block-wise quantized to 8 bits), paged_adamw_8bit or paged_adamw_32bit (the state in a
    /// memory-mapped file in offload-dir), galore_adamw, natural_galore_adamw, galore_adamw_8bit
    /// (GaLore with 8-bit moments), galore_adamw_layerwise and galore_adamw_8bit_layerwise
    /// (step each layer during backward: need --recompute);
    /// transformers' names (adamw_torch, adamw_bnb_8bit, ...) work too. GaLore needs
    /// --zero-stage 0.
    // Defaults spelled out for clap: the serialized default (`with_defaults`) leaves these out
    // (old checkpoints' fingerprints), and a flag without a default would be required.
    #[cfg_attr(feature = "cli", arg(long, value_name = "NAME", default_value = "adamw", help_heading = heading::OPTIM))]
    #[serde(skip_serializing_if = "is_default")]
    pub optim: OptimName,
    /// 8-bit optimizers: parameters with fewer elements keep 32-bit state (default 4096, as
    /// bitsandbytes).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", default_value_t = DEFAULT_MIN_8BIT_SIZE, help_heading = heading::OPTIM))]
    #[serde(skip_serializing_if = "is_default_min_8bit_size")]
    pub min_8bit_size: usize,
    /// Paged optimizers: the folder whose disk holds the optimizer state file (default: the
    /// output folder). The file has no name, so the space it takes is freed when the run
    /// ends, killed or not.
    #[cfg_attr(feature = "cli", arg(long, value_name = "DIR", value_parser = path, help_heading = heading::OPTIM))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offload_dir: Option<PathBuf>,
    /// GaLore (`--optim galore_adamw` and the other GaLore optimizers): HF's optim_args,
    /// "rank=128,update_proj_gap=200,scale=0.25,proj_type=std" (those defaults; Natural GaLore
    /// also history=20,damping=1e-3).
    #[cfg_attr(feature = "cli", arg(long, value_name = "K=V,...", help_heading = heading::OPTIM))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optim_args: Option<String>,
    /// GaLore: which linear modules are projected, as HF's optim_target_modules: one name is a
    /// regex matching whole module paths ("all-linear": every linear), a comma-separated list
    /// matches names, substrings or regexes (default: paths holding attn or mlp).
    #[cfg_attr(feature = "cli", arg(long, value_name = "MODULES", value_parser = optim_target_modules, help_heading = heading::OPTIM))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optim_target_modules: Option<crate::train::galore::TargetModules>,
    /// Clip the global gradient L2 norm to this; 0 disables clipping.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    #[serde(deserialize_with = "clip_norm")]
    pub max_grad_norm: Option<f64>,
    /// Seed of initialisation, data order and dropout.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub seed: u64,
    /// Recompute each decoder layer's activations in backward instead of keeping them
    /// (gradient checkpointing): much less memory for about one extra forward pass.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    pub recompute: bool,
    /// Quantize the frozen base's linear weights while loading it (QLoRA): `[quantize]` table
    /// with `method = "nf4" | "fp4" | "int8"`, `blocksize`, `double_quant` (flags: --quantize,
    /// --quant-blocksize, --double-quant).
    #[cfg_attr(feature = "cli", arg(skip))]
    pub quantize: Option<QuantSpec>,
    /// The frozen base's products: f32, bf16 (bf16 weights and products, f32 accumulation;
    /// trainable parameters, optimizer, norms and loss stay f32), or auto (bf16 where the CPU
    /// computes it faster: AMX-BF16, or AVX512-BF16 when a measured product says so; a resume
    /// keeps the run's dtype).
    #[cfg_attr(feature = "cli", arg(long, value_name = "DTYPE", help_heading = heading::METHOD))]
    pub compute_dtype: ComputeDtypeChoice,
    /// Evaluate every N steps as well as at the end (needs eval-data; default: at the end only).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", help_heading = heading::OUTPUT))]
    pub eval_every: Option<usize>,
    /// Records per evaluation batch (default: batch-size).
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OUTPUT))]
    pub eval_batch_size: Option<usize>,
    /// Evaluate on the first N eval-data records only (default: all).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", help_heading = heading::OUTPUT))]
    pub eval_limit: Option<usize>,
    /// Write a checkpoint every N steps, for resuming (default: none; an interrupted run
    /// still saves one).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", help_heading = heading::OUTPUT))]
    pub save_every: Option<usize>,
    /// Checkpoints kept in the output folder; older ones are deleted.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OUTPUT))]
    pub keep_checkpoints: usize,
    /// Where else the run reports its metrics (as transformers' report_to): tensorboard writes
    /// event files to the output folder's runs/ (default: none; metrics.jsonl is always written).
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ',', value_name = "NAME", hide_possible_values = true, help_heading = heading::OUTPUT))]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub report_to: Vec<ReportTo>,
    /// Under mpirun: each rank keeps 1/N of every frozen matrix's rows; layers gather the rest
    /// tile by tile as they run (FSDP-style). Changes memory and traffic, not the result.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::SCALE_OUT))]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shard_base: bool,
    /// Read the frozen base in place from its memory-mapped checkpoint (safetensors f32/f16/bf16,
    /// or the NF4/FP4 folder `ferrule quantize` writes): each matrix is paged in when a layer
    /// uses it and dropped after, the next one read ahead. Same result, far less resident memory.
    #[cfg_attr(feature = "cli", arg(long, help_heading = heading::OPTIM))]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stream_base: bool,
    /// Stream the frozen base from its memory-mapped checkpoint as --stream-base does, but keep
    /// as many of its matrices resident as fit in this many GB (10^9 bytes) of frozen-base
    /// memory: a base that fits runs as in memory, a larger one streams the rest. Below what
    /// streaming needs (held tensors, the matrix in use and the one read ahead) it is an error
    /// naming that minimum; `ferrule plan --max-resident-gb` shows the split. Not with
    /// --stream-base, which is the smallest budget (default: none, the base in memory).
    #[cfg_attr(feature = "cli", arg(long, value_name = "GB", help_heading = heading::OPTIM))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_resident_gb: Option<f64>,
    /// Start a new run from the weights of this adapter folder (a PEFT folder of the same
    /// method and shapes) instead of a fresh adapter (default: none, a fresh adapter).
    #[cfg_attr(feature = "cli", arg(long, value_name = "DIR", value_parser = path, help_heading = heading::METHOD))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
    /// ConPET (--method conpet): the task set this run adds its training split to, as a new
    /// task (created when the folder is new or empty); the set is the run's output, so
    /// --output is not given with it (default: none, an ordinary run).
    #[cfg_attr(feature = "cli", arg(long, value_name = "DIR", value_parser = path, help_heading = heading::METHOD))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continual: Option<PathBuf>,
}

/// Where a run's metrics go besides `metrics.jsonl` (transformers' `report_to`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    /// TensorBoard event files in `<output_dir>/runs/` ([`super::tensorboard`]).
    Tensorboard,
}

/// The `--help` headings of `ferrule train`'s settings.
pub mod heading {
    /// The run's inputs and output folder: the required settings.
    pub const RUN: &str = "Run (model, data and output are required, as flags or in --config)";
    /// How records become batches.
    pub const DATA: &str = "Data";
    /// The adapter method and the base's quantization.
    pub const METHOD: &str = "Method";
    /// Steps, learning rate, AdamW and memory.
    pub const OPTIM: &str = "Optimisation";
    /// Evaluation, checkpoints, metrics and what is printed.
    pub const OUTPUT: &str = "Evaluation and output";
    /// Several processes under mpirun.
    pub const SCALE_OUT: &str = "Scale-out (under mpirun)";
}

/// `--optim-target-modules`: a comma-separated list, or one name (a regex, or "all-linear").
#[cfg(feature = "cli")]
fn optim_target_modules(
    s: &str,
) -> Result<crate::train::galore::TargetModules, std::convert::Infallible> {
    use crate::train::galore::TargetModules;
    Ok(match s.contains(',') {
        true => TargetModules::List(crate::tuners::flags::names(s)),
        false => TargetModules::One(s.trim().to_string()),
    })
}

/// A path flag's value as given (an empty one is left for [`TrainConfig::validate`] to name).
#[cfg(feature = "cli")]
fn path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// `task` values: causal-lm, seq-cls or feature-extraction, PEFT's names (`CAUSAL_LM`) too.
pub fn parse_task(s: &str) -> Result<Task> {
    Ok(match s.to_ascii_lowercase().replace('_', "-").as_str() {
        "causal-lm" | "clm" => Task::CausalLm,
        "seq-cls" | "classification" => Task::SeqCls,
        "feature-extraction" | "embedding" => Task::FeatureExtraction,
        other => bail!("unknown task {other:?}; expected causal-lm, seq-cls or feature-extraction"),
    })
}

/// `padding` values: free, longest or max-len (`max_len`, the config file's spelling, too).
pub fn parse_padding(s: &str) -> Result<Padding> {
    Ok(match s.to_ascii_lowercase().replace('_', "-").as_str() {
        "free" => Padding::Free,
        "longest" => Padding::Longest,
        "max-len" => Padding::MaxLen,
        other => bail!("unknown padding {other:?}; expected free, longest or max-len"),
    })
}

/// `max_grad_norm`: 0 means no clipping, since a TOML file cannot say `none`; a negative value
/// is kept for [`TrainConfig::validate`] to refuse by name.
fn clip_norm<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.filter(|&g| g != 0.0))
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
            resize_token_embeddings: false,
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
            max_tokens: None,
            max_seconds: None,
            lr: 2e-4,
            lora_embedding_lr: None,
            warmup_steps: 0,
            schedule: LrSchedule::Linear,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            optim: OptimName::Adamw,
            min_8bit_size: DEFAULT_MIN_8BIT_SIZE,
            offload_dir: None,
            optim_args: None,
            optim_target_modules: None,
            max_grad_norm: Some(1.0),
            seed: 42,
            recompute: false,
            shard_base: false,
            stream_base: false,
            max_resident_gb: None,
            quantize: None,
            compute_dtype: ComputeDtypeChoice::Auto,
            eval_every: None,
            eval_batch_size: None,
            eval_limit: None,
            save_every: None,
            keep_checkpoints: 2,
            report_to: Vec::new(),
            init_adapter: None,
            continual: None,
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn is_default_min_8bit_size(n: &usize) -> bool {
    *n == DEFAULT_MIN_8BIT_SIZE
}

/// The most `epochs` a run may ask for: each epoch's micro-batches are planned to count the steps.
pub const MAX_EPOCHS: f64 = 100_000.0;

/// Settings a resumed run may change: its length (the schedule is planned again) and how its
/// global batch is split (`batch_size` × `grad_accum` × ranks; the trainer compares the
/// product). They are kept in a checkpoint but left out of [`TrainConfig::resume_fingerprint`].
pub const RESUMABLE_SETTINGS: [&str; 6] = [
    "max_steps",
    "epochs",
    "max_tokens",
    "max_seconds",
    "batch_size",
    "grad_accum",
];

/// Records per micro-batch when neither `batch_size` nor a token budget is given.
pub const DEFAULT_BATCH_SIZE: usize = 8;

/// Settings that describe one thing together: a value for any of them replaces all of them
/// (the micro-batch is `batch_size` records or `batch_tokens` tokens, never both).
const SET_TOGETHER: &[&[&str]] = &[&["batch_size", "batch_tokens"]];

impl TrainConfig {
    /// This config with the settings named in `keys` taken from `values` (flags given on the
    /// command line over a config file's settings). A key of [`SET_TOGETHER`] brings its
    /// group along; a key that is not a setting is an error naming it.
    pub fn with_keys_from(&self, values: &TrainConfig, keys: &[&str]) -> Result<TrainConfig> {
        let mut merged = serde_json::to_value(self)?;
        let from = serde_json::to_value(values)?;
        let (Some(into), Some(from)) = (merged.as_object_mut(), from.as_object()) else {
            bail!("train: settings that are not a table")
        };
        let mut all: Vec<&str> = keys.to_vec();
        for group in SET_TOGETHER {
            if group.iter().any(|k| keys.contains(k)) {
                all.extend_from_slice(group);
            }
        }
        for key in all {
            if !Self::is_key(key) {
                bail!("train: {key:?} is not a training setting")
            }
            // A value its type leaves out when serialized (None, false, []) is the default.
            match from.get(key) {
                Some(v) => into.insert(key.to_string(), v.clone()),
                None => into.remove(key),
            };
        }
        serde_json::from_value(merged).context("train: the settings given as flags")
    }

    /// Whether `key` names a setting (a top-level key of the TOML file).
    pub fn is_key(key: &str) -> bool {
        Self::keys().iter().any(|k| k == key)
    }

    /// Every setting's key (the TOML file's top-level keys), in declaration order.
    pub fn keys() -> Vec<String> {
        // Keys left out of the serialized default when unset: set them to see them.
        let every = TrainConfig {
            batch_tokens: Some(1),
            max_tokens: Some(1),
            max_seconds: Some(1.0),
            lora_embedding_lr: Some(1.0),
            packing: true,
            shard_base: true,
            stream_base: true,
            max_resident_gb: Some(1.0),
            resize_token_embeddings: true,
            report_to: vec![ReportTo::Tensorboard],
            init_adapter: Some(PathBuf::from("adapter")),
            continual: Some(PathBuf::from("set")),
            optim: OptimName::Adamw8bit,
            optim_args: Some("rank=1".into()),
            optim_target_modules: Some(crate::train::galore::TargetModules::One("x".into())),
            min_8bit_size: 1,
            offload_dir: Some(PathBuf::from("offload")),
            ..Default::default()
        };
        match serde_json::to_value(every) {
            Ok(serde_json::Value::Object(o)) => o.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

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
        self.validate_continual()?;
        if let Some(q) = &self.quantize {
            q.validate()?;
        }
        self.validate_stream_base()?;
        if self.batch_size == Some(0) || self.grad_accum == 0 || self.batch_tokens == Some(0) {
            bail!("train: batch_size, batch_tokens and grad_accum (--batch-size, --batch-tokens, --grad-accum) must be at least 1")
        }
        self.validate_batching()?;
        self.validate_optim()?;
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
        self.validate_length()?;
        if self.task == Task::FeatureExtraction {
            bail!("train: FEATURE_EXTRACTION has no training objective; use CAUSAL_LM or SEQ_CLS")
        }
        self.validate_resize()
    }

    /// The output folder, or for ConPET the task set (`continual`) instead; each without the
    /// other's method is an error.
    fn validate_continual(&self) -> Result<()> {
        let conpet = self
            .adapter()
            .is_ok_and(|a| a.peft_type == crate::tuners::conpet::METHOD.peft_type);
        let has_output = !self.output_dir.as_os_str().is_empty();
        match (&self.continual, conpet, has_output) {
            (None, true, _) => bail!("train: --method conpet adds a task to a ConPET task set: give the set's folder with --continual DIR (a new or empty folder starts one)"),
            (Some(_), false, _) => bail!("train: --continual DIR adds a task to a ConPET task set; it needs --method conpet (`[adapter] peft_type = \"CONPET\"`)"),
            (Some(_), true, _) if self.task != Task::SeqCls => bail!("train: ConPET here is for sequence classification (--task seq-cls): each expert owns label columns and the selector routes by task; generative (causal-LM) ConPET is not implemented (the reference defines its selector's target for classification only)"),
            (Some(dir), true, true) => bail!("train: --continual {} is where a ConPET run writes; drop --output {}", dir.display(), self.output_dir.display()),
            (None, false, false) => bail!("train: no output folder given (--output or `output_dir = ...`)"),
            _ => Ok(()),
        }
    }

    /// The run's length: max_steps, max_tokens or epochs, and the time limit.
    fn validate_length(&self) -> Result<()> {
        if self.max_steps.is_some() && self.max_tokens.is_some() {
            bail!("train: max_steps and max_tokens (--max-steps, --max-tokens) both set the run's length; give one of them")
        }
        let by_epochs = self.max_steps.is_none() && self.max_tokens.is_none();
        if self.max_steps == Some(0)
            || self.max_tokens == Some(0)
            || (by_epochs && self.epochs <= 0.0)
        {
            bail!("train: nothing to do (max_steps = 0, max_tokens = 0 or epochs <= 0)")
        }
        if let Some(s) = self.max_seconds.filter(|s| !(s.is_finite() && *s > 0.0)) {
            bail!(
                "train: max_seconds (--max-seconds) must be a positive number of seconds, got {s}"
            )
        }
        Ok(())
    }

    /// Rows added by `resize_token_embeddings` start as a mean row: unless they train
    /// (`trainable_token_indices`), every added token reads the same embedding.
    /// Whether the frozen base is read from its mapped checkpoint: `stream_base`, or a
    /// `max_resident_gb` budget (which streams what does not fit).
    pub fn streams_base(&self) -> bool {
        self.stream_base || self.max_resident_gb.is_some()
    }

    /// The resident-memory budget in bytes (`max_resident_gb`), checked.
    pub fn max_resident_bytes(&self) -> Result<Option<usize>> {
        self.max_resident_gb
            .map(|gb| {
                crate::model::residency::budget_bytes(
                    gb,
                    "train: max_resident_gb (--max-resident-gb)",
                )
            })
            .transpose()
    }

    /// A streamed base reads the checkpoint as stored: nothing may convert or split it first.
    fn validate_stream_base(&self) -> Result<()> {
        if !self.streams_base() {
            return Ok(());
        }
        let flag = match self.stream_base {
            true => "stream_base (--stream-base)",
            false => "max_resident_gb (--max-resident-gb)",
        };
        if self.stream_base && self.max_resident_gb.is_some() {
            bail!("train: stream_base (--stream-base) keeps no frozen matrix resident, and max_resident_gb (--max-resident-gb) keeps as many as fit in its budget and streams the rest; pass one of them")
        }
        self.max_resident_bytes()?;
        if self.quantize.is_some() {
            bail!("train: {flag} reads the checkpoint as it is stored, and quantize (--quantize) converts it while loading; quantize it once with `ferrule quantize` and stream the folder that writes")
        }
        if self.shard_base {
            bail!("train: {flag} and shard_base (--shard-base) both bound the base's memory, in ways that do not combine; pass one of them")
        }
        if self.resize_token_embeddings {
            bail!("train: resize_token_embeddings (--resize-token-embeddings) grows the embedding table, which {flag} reads unchanged from the file; drop one of them")
        }
        Ok(())
    }

    /// Optimizer settings this run's optimizer does not read (warnings: transformers accepts
    /// them silently): `min_8bit_size` without an 8-bit optimizer, `offload_dir` without a
    /// paged one.
    pub fn unread_optim_settings(&self) -> Vec<String> {
        let optim = self.optim;
        let mut out = Vec::new();
        if self.min_8bit_size != DEFAULT_MIN_8BIT_SIZE && !optim.is_8bit() {
            out.push(format!("min_8bit_size (--min-8bit-size {}) is read by the 8-bit optimizers only, and optim is {optim}; it has no effect", self.min_8bit_size));
        }
        if self.offload_dir.is_some() && !optim.is_paged() {
            out.push(format!("offload_dir (--offload-dir) holds the state file of paged_adamw_8bit / paged_adamw_32bit only, and optim is {optim}; nothing is written there"));
        }
        out
    }

    /// GaLore's own keys go with a GaLore optimizer, and the layer-wise form with what it
    /// needs: recomputed layers (whose backward hands each gradient over as it ends) and no
    /// accumulation (transformers refuses it too: a layer steps before the next micro-batch).
    fn validate_optim(&self) -> Result<()> {
        let optim = self.optim;
        if !optim.is_galore() {
            for (set, key, flag) in [
                (self.optim_args.is_some(), "optim_args", "--optim-args"),
                (
                    self.optim_target_modules.is_some(),
                    "optim_target_modules",
                    "--optim-target-modules",
                ),
            ] {
                if set {
                    bail!("train: {key} ({flag}) is read by the GaLore optimizers only, and optim is {optim}; pass --optim galore_adamw (or natural_galore_adamw, galore_adamw_8bit, a layer-wise form) or drop {flag}")
                }
            }
        }
        if optim.is_layerwise() && !self.recompute {
            bail!("train: optim {optim} steps each layer while the backward pass of recomputed layers runs; add --recompute (`recompute = true`)")
        }
        if optim.is_layerwise() && self.grad_accum != 1 {
            bail!("train: optim {optim} steps each layer as soon as its gradient is ready, so gradients cannot accumulate; set grad_accum (--grad-accum) to 1 and raise --batch-size instead")
        }
        Ok(())
    }

    fn validate_resize(&self) -> Result<()> {
        if self.resize_token_embeddings && !self.adapter()?.trains_token_rows() {
            bail!("train: resize_token_embeddings (--resize-token-embeddings) adds embedding rows that nothing would train; list their ids in trainable_token_indices (--trainable-token-indices, LoRA), or train them alone with --method trainable-tokens --token-indices")
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
        // Where metrics are reported, not what is trained.
        c.report_to = Vec::new();
        // Memory layout only: a run may resume with or without it.
        c.shard_base = false;
        c.stream_base = false;
        c.max_resident_gb = None;
        // Where the paged state file goes: a resumed run may put it elsewhere.
        c.offload_dir = None;
        // Resolved before a run starts (`TrainConfig::with_compute_dtype_resolved`). f32 is
        // left out, so that checkpoints of runs from before the setting existed still match.
        let f32_compute = c.compute_dtype == ComputeDtypeChoice::F32;
        // The default spelled out: a resume compares the global batch it makes (and checkpoints
        // of runs before `batch_size` became optional, when it was `8`, keep their fingerprint).
        c.batch_size = Some(c.batch_size());
        let mut settings = serde_json::to_value(c)?;
        if let (true, Some(table)) = (f32_compute, settings.as_object_mut()) {
            table.remove("compute_dtype");
        }
        Ok(settings)
    }

    /// This config with `compute_dtype` resolved on this machine (`auto` replaced by the
    /// dtype it chose), and the decision with its reason, for the run's first lines and
    /// summary. `resumed` is the dtype of the checkpoint a resume continues: `auto` takes it
    /// (a run resumes as it ran); an explicit other dtype is refused by name when the
    /// checkpoint's settings are compared. A fresh `auto` run of a method that needs f32
    /// weights ([`Method::f32_weights`](crate::tuners::Method::f32_weights)) takes f32.
    ///
    /// # Errors
    /// `bf16` where the CPU or oneDNN cannot do it ([`ComputeDtypeChoice::resolve`]), also
    /// when an `auto` resume continues a bf16 run.
    pub fn with_compute_dtype_resolved(
        &self,
        resumed: Option<ComputeDtype>,
    ) -> Result<(TrainConfig, ComputeDtypeDecision)> {
        let decision = match (self.compute_dtype, resumed) {
            (ComputeDtypeChoice::Auto, Some(dtype)) => {
                let explicit = match dtype {
                    ComputeDtype::F32 => ComputeDtypeChoice::F32,
                    ComputeDtype::Bf16 => ComputeDtypeChoice::Bf16,
                };
                let mut decision = explicit.resolve().with_context(|| {
                    format!("resuming a run that computed in {dtype} (compute_dtype auto)")
                })?;
                decision.reason = format!("auto: the resumed run computed in {dtype}");
                decision
            }
            (ComputeDtypeChoice::Auto, None) => match self.adapter()?.method()?.f32_weights {
                Some(why) => ComputeDtypeDecision {
                    dtype: ComputeDtype::F32,
                    reason: format!("auto: {why}"),
                },
                None => ComputeDtypeChoice::Auto.resolve()?,
            },
            (choice, _) => choice.resolve()?,
        };
        let mut cfg = self.clone();
        cfg.compute_dtype = match decision.dtype {
            ComputeDtype::F32 => ComputeDtypeChoice::F32,
            ComputeDtype::Bf16 => ComputeDtypeChoice::Bf16,
        };
        Ok((cfg, decision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` takes f32 for a method that needs f32 weights, whatever this CPU offers, and
    /// keeps its own choice for the others.
    #[test]
    fn auto_compute_dtype_is_f32_for_a_method_that_needs_f32_weights() {
        let l4q = TrainConfig {
            adapter: Some(AdapterConfig::new("L4Q", serde_json::Map::new())),
            ..Default::default()
        };
        let (cfg, decision) = l4q.with_compute_dtype_resolved(None).unwrap();
        assert_eq!(decision.dtype, ComputeDtype::F32);
        assert!(
            decision.reason.contains("L4Q quantizes"),
            "{}",
            decision.reason
        );
        assert_eq!(cfg.compute_dtype, ComputeDtypeChoice::F32);
        let lora = TrainConfig::default()
            .with_compute_dtype_resolved(None)
            .unwrap()
            .1;
        assert_eq!(
            lora.dtype,
            ComputeDtypeChoice::Auto.resolve().unwrap().dtype
        );
    }

    #[test]
    fn optimizer_settings_the_optimizer_does_not_read_are_named() {
        let cfg = TrainConfig {
            min_8bit_size: 256,
            offload_dir: Some("state".into()),
            ..Default::default()
        };
        let w = cfg.unread_optim_settings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("--min-8bit-size 256") && w[0].contains("optim is adamw"),
            "{w:?}"
        );
        assert!(w[1].contains("--offload-dir"), "{w:?}");
        for optim in [OptimName::PagedAdamw8bit, OptimName::GaloreAdamw8bit] {
            let w = TrainConfig {
                optim,
                ..cfg.clone()
            }
            .unread_optim_settings();
            assert_eq!(w.len(), usize::from(!optim.is_paged()), "{optim}: {w:?}");
        }
        assert!(TrainConfig::default().unread_optim_settings().is_empty());
    }

    #[test]
    fn keys_set_on_the_command_line_replace_the_files() {
        let file: TrainConfig =
            serde_json::from_str(r#"{"lr": 0.1, "batch_tokens": 512, "seed": 3}"#).unwrap();
        let flags = TrainConfig {
            batch_size: Some(4),
            seed: 9,
            lr: 0.5,
            ..Default::default()
        };
        let c = file
            .with_keys_from(&flags, &["batch_size", "seed"])
            .unwrap();
        assert_eq!((c.lr, c.seed), (0.1, 9));
        assert_eq!((c.batch_size, c.batch_tokens), (Some(4), None));
        let err = file.with_keys_from(&flags, &["learning_rate"]).unwrap_err();
        assert!(format!("{err:#}").contains("\"learning_rate\" is not a training setting"));
    }

    #[test]
    fn a_max_grad_norm_of_zero_disables_clipping() {
        let c: TrainConfig = serde_json::from_str(r#"{"max_grad_norm": 0}"#).unwrap();
        assert_eq!(c.max_grad_norm, None);
        let c: TrainConfig = serde_json::from_str(r#"{"max_grad_norm": 0.5}"#).unwrap();
        assert_eq!(c.max_grad_norm, Some(0.5));
        let c: TrainConfig = serde_json::from_str(
            r#"{"model": "m", "data": "d", "output_dir": "o", "max_grad_norm": -1}"#,
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("max_grad_norm (--max-grad-norm)"), "{err}");
        assert_eq!(TrainConfig::default().max_grad_norm, Some(1.0));
    }

    #[test]
    fn report_to_is_a_key_outside_the_resume_fingerprint() {
        assert!(TrainConfig::is_key("report_to") && TrainConfig::is_key("packing"));
        let c: TrainConfig = serde_json::from_str(r#"{"report_to": ["tensorboard"]}"#).unwrap();
        assert_eq!(c.report_to, vec![ReportTo::Tensorboard]);
        assert_eq!(
            c.resume_fingerprint().unwrap(),
            TrainConfig::default().resume_fingerprint().unwrap()
        );
    }
}
