//! One file per subcommand: flags, then a call into the library.

pub mod eval;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod merge;
pub mod train;

use anyhow::{bail, Result};
use candle_core::Device;
use ferrule::model::Task;

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
