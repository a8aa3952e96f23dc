//! One file per subcommand: flags, then a call into the library.

pub mod adapter_args;
pub mod checkpoint;
pub mod compare;
pub mod data;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod merge;
pub mod plan;
pub mod plot;
pub mod quantize;
pub mod train;

use anyhow::Result;
use candle_core::Device;
use ferrule::adapted::{AdaptedModel, AdapterSource, Selection};
use ferrule::model::LoadOptions;
use ferrule::ops::ComputeDtypeChoice;
use ferrule::quant::{QuantMethod, QuantSpec};

/// The model flags shared by the inference commands.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model folder (config.json + safetensors + tokenizer.json), .gguf file, or hub id.
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter folder to apply, as DIR or NAME=DIR; repeatable. A folder in PEFT's
    /// several-adapter layout (one subfolder per adapter, "default" at the root) offers each of them.
    #[arg(long, value_name = "[NAME=]DIR")]
    pub adapter: Vec<String>,
    /// With several adapters loaded: the one to run.
    #[arg(long, value_name = "NAME", conflicts_with = "adapter_weights")]
    pub active_adapter: Option<String>,
    /// Run a weighted sum of loaded adapters' changes, f0 + sum of w*(f_adapter - f0) at every
    /// adapted module (for LoRA: W0 + sum of w*s*B*A), e.g. default=0.7,other=-0.4.
    #[arg(long, value_name = "NAME=W,...")]
    pub adapter_weights: Option<String>,
    /// causal-lm, seq-cls or feature-extraction (default: the adapter's task_type, else by model family).
    #[arg(long)]
    pub task: Option<String>,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// The frozen base's products: f32, bf16 (f32 accumulation) or auto (bf16 where the CPU
    /// computes it faster). Default: auto for eval, f32 for generate (one-token steps ran slower
    /// in bf16), logits and inspect.
    #[arg(long, value_name = "DTYPE")]
    pub compute_dtype: Option<ComputeDtypeChoice>,
    /// Grow the token embeddings to the tokenizer's tokens (added tokens), as train's flag
    /// does; an adapter that holds resized tables resizes the base without it.
    #[arg(long)]
    pub resize_token_embeddings: bool,
    /// Read the frozen base in place from its memory-mapped checkpoint, each matrix paged in
    /// when used and dropped after (as train's --stream-base): same results, less memory.
    #[arg(long)]
    pub stream_base: bool,
    /// Stream the base as --stream-base does, keeping as many of its matrices resident as fit
    /// in GB (10^9 bytes) of frozen-base memory (as train's --max-resident-gb).
    #[arg(long, value_name = "GB", conflicts_with = "stream_base")]
    pub max_resident_gb: Option<f64>,
    /// Run a DyLoRA adapter at rank B (1..r; default r): the update (alpha/B)·B[:, :B]·A[:B].
    #[arg(long, value_name = "B")]
    pub rank: Option<usize>,
}

impl ModelArgs {
    /// Loads the model and adapters, computing in `--compute-dtype` (else `default`); the
    /// choice and its reason go to stderr.
    pub fn load(&self, default: ComputeDtypeChoice) -> Result<AdaptedModel> {
        let compute = self.compute_dtype.unwrap_or(default).resolve()?;
        eprintln!("compute dtype: {compute}");
        let task = self.task.as_deref().map(parse_task).transpose()?;
        let sources: Vec<AdapterSource> = self
            .adapter
            .iter()
            .map(|s| AdapterSource::parse(s))
            .collect();
        let selection = match (&self.active_adapter, &self.adapter_weights) {
            (Some(name), _) => Selection::Active(name.clone()),
            (None, Some(w)) => Selection::parse_weights(w)?,
            (None, None) => Selection::Only,
        };
        let m = AdaptedModel::load_adapters(
            &self.model,
            &sources,
            &selection,
            task,
            &device(),
            LoadOptions {
                quantize: self.quant.spec()?.as_ref(),
                compute_dtype: compute.dtype,
                resize_token_embeddings: self.resize_token_embeddings,
                stream_base: self.stream_base || self.max_resident_gb.is_some(),
                max_resident: (self.max_resident_gb)
                    .map(|gb| ferrule::model::residency::budget_bytes(gb, "--max-resident-gb"))
                    .transpose()?,
            },
        )?;
        if let Some(rank) = self.rank {
            m.set_rank(rank)?;
        }
        if m.adapters.len() > 1 || m.weighted.is_some() {
            let names: Vec<_> = m.adapters.iter().map(|a| a.name.as_str()).collect();
            eprintln!(
                "adapters loaded: {}; running: {}",
                names.join(", "),
                m.active
            );
        }
        Ok(m)
    }
}

/// Quantizing a base model's linear layers while loading it.
#[derive(clap::Args, Default)]
pub struct QuantArgs {
    /// Quantize the frozen base's linear layers while loading (QLoRA): nf4, fp4 or int8 (default:
    /// none, the weights as stored).
    #[arg(long, value_name = "METHOD")]
    pub quantize: Option<QuantMethod>,
    /// With nf4/fp4: quantize the absmax statistics too (QLoRA double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// With nf4/fp4: values per absmax block (32..4096; default 64).
    #[arg(long, value_name = "N")]
    pub quant_blocksize: Option<usize>,
}

impl QuantArgs {
    /// The spec these flags ask for, applied over `base` (a config file's `[quantize]`).
    pub fn apply(&self, base: Option<QuantSpec>) -> Result<Option<QuantSpec>> {
        let mut spec = match self.quantize {
            Some(m) => Some(QuantSpec {
                method: m,
                blocksize: 64,
                double_quant: false,
            }),
            None => base,
        };
        if self.double_quant || self.quant_blocksize.is_some() {
            let q = spec.as_mut().ok_or_else(|| {
                anyhow::anyhow!("--double-quant / --quant-blocksize need --quantize")
            })?;
            q.double_quant |= self.double_quant;
            if let Some(bs) = self.quant_blocksize {
                q.blocksize = bs;
            }
        }
        if let Some(q) = &spec {
            q.validate()?;
        }
        Ok(spec)
    }

    pub fn spec(&self) -> Result<Option<QuantSpec>> {
        self.apply(None)
    }
}

pub use ferrule::train::config::{parse_padding, parse_task};

pub fn device() -> Device {
    Device::Cpu
}
