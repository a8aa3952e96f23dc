//! `ferrule merge`

use ferrule::model::LoadOptions;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ferrule::adapted::AdaptedModel;
use ferrule::merge::{merge_to_dir_with, BaseRecord, MergeOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Base model folder, .gguf file, or hub id (the one the adapter was trained on).
    #[arg(long)]
    model: String,
    /// The PEFT adapter folder to merge into the base.
    #[arg(long)]
    adapter: PathBuf,
    /// New folder for the merged model.
    #[arg(long, short)]
    output: PathBuf,
    /// Quantize the base first (as the adapter was trained); the merged weights are then
    /// requantized in the same format and written in the bitsandbytes layout.
    #[command(flatten)]
    quant: super::QuantArgs,
    /// With a quantized base: write it dequantized, in f32, plus the update (no requantizing),
    /// which is exactly the model an adapter trained on that quantized base computes.
    #[arg(long)]
    dequantize: bool,
}

pub fn run(a: Args) -> Result<()> {
    let spec = a.quant.spec()?;
    let m = AdaptedModel::load_with(
        &a.model,
        Some(&a.adapter),
        None,
        &super::device(),
        LoadOptions::quantized(spec.as_ref()),
    )?;
    let target = BaseRecord::of(&m.source.weights, spec.as_ref());
    if a.dequantize && !target.is_quantized() {
        bail!(
            "--dequantize: the base {} is not quantized; add the --quantize flags the adapter was trained with",
            a.model
        )
    }
    if let Some(trained) = BaseRecord::read(&a.adapter)? {
        if let Some(w) = trained.mismatch_warning(&a.adapter, &target, &a.model, true) {
            tracing::warn!("{w}");
        }
    }
    let tuner = m.tuner.as_deref().context("no adapter")?;
    let options = MergeOptions {
        dequantize: a.dequantize,
    };
    let report = merge_to_dir_with(&m.source, tuner, m.model.task, &a.output, options)?;
    println!("{}", serde_json::to_string(&report)?);
    eprintln!("merged model written to {}", a.output.display());
    Ok(())
}
