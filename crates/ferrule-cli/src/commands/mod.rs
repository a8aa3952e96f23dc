//! One file per subcommand: flags, then a call into the library.

pub mod eval;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod merge;
pub mod train;

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use ferrule::adapted::AdaptedModel;
use ferrule::model::Task;

/// The model flags shared by the inference commands.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model folder (config.json + safetensors + tokenizer.json), .gguf file, or hub id.
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter folder to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// causal-lm, seq-cls or feature-extraction (default: the adapter's task_type, else by model family).
    #[arg(long)]
    pub task: Option<String>,
}

impl ModelArgs {
    pub fn load(&self) -> Result<AdaptedModel> {
        let task = self.task.as_deref().map(parse_task).transpose()?;
        AdaptedModel::load(&self.model, self.adapter.as_deref(), task, &device())
    }
}

/// `--task` values (PEFT names accepted too).
pub fn parse_task(s: &str) -> Result<Task> {
    Ok(match s.to_ascii_lowercase().replace('_', "-").as_str() {
        "causal-lm" | "clm" => Task::CausalLm,
        "seq-cls" | "classification" => Task::SeqCls,
        "feature-extraction" | "embedding" => Task::FeatureExtraction,
        other => bail!("unknown task {other:?}; expected causal-lm, seq-cls or feature-extraction"),
    })
}

pub fn device() -> Device {
    Device::Cpu
}
