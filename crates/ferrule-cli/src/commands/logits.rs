//! `ferrule logits`: f32 outputs for given input tensors, for parity checks.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use ferrule::adapted::AdaptedModel;
use ferrule::model::Inputs;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: String,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// safetensors with `input_ids` and optionally `attention_mask`, `token_type_ids` ([b, t]).
    #[arg(long)]
    inputs: PathBuf,
    /// safetensors written with a `logits` tensor (f32).
    #[arg(long)]
    out: PathBuf,
    /// causal-lm, seq-cls or feature-extraction (default: the adapter's, else by model family).
    #[arg(long)]
    task: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let task = a.task.as_deref().map(super::parse_task).transpose()?;
    let dev = super::device();
    let m = AdaptedModel::load(&a.model, a.adapter.as_deref(), task, &dev)?;
    let t = ferrule::model::weights::load_safetensors_file(&a.inputs, &dev)?;
    let ids = t.get("input_ids").with_context(|| format!("{}: no \"input_ids\" tensor", a.inputs.display()))?;
    let logits = m.model.forward(&Inputs { input_ids: ids, attention_mask: t.get("attention_mask"), token_type_ids: t.get("token_type_ids") })?;
    ferrule::peft_io::write_safetensors(&a.out, &[("logits".to_string(), logits.to_dtype(DType::F32)?)], &[("format", "pt")])?;
    Ok(())
}
