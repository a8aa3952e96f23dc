//! `ferrule merge`

use ferrule::model::LoadOptions;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ferrule::adapted::AdaptedModel;
use ferrule::merge::{merge_to_dir_with, BaseRecord, MergeOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Base model folder, .gguf file, or hub id (the one the adapter was trained on).
    #[arg(long, required_unless_present = "config")]
    model: Option<String>,
    /// The PEFT adapter folder to merge into the base.
    #[arg(long, required_unless_present = "config")]
    adapter: Option<PathBuf>,
    /// Merge whole models as a mergekit YAML says (merge_method, models or slices, parameters;
    /// docs/MERGING.md), instead of an adapter into its base.
    #[arg(long, value_name = "YAML", conflicts_with_all = ["model", "adapter", "dequantize"])]
    config: Option<PathBuf>,
    /// With --config: seed of the random masks of dare_* and della* (torch's generator is
    /// not reproduced: the same seed gives the same merge in ferrule, not mergekit's).
    #[arg(long, default_value_t = 0, requires = "config")]
    seed: u64,
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
    if let Some(config) = &a.config {
        return run_config(config, &a);
    }
    let (Some(model), Some(adapter)) = (&a.model, &a.adapter) else {
        bail!("merge: give --model and --adapter, or --config")
    };
    let spec = a.quant.spec()?;
    let m = AdaptedModel::load_with(
        model,
        Some(adapter.as_path()),
        None,
        &super::device(),
        LoadOptions::quantized(spec.as_ref()),
    )?;
    let target = BaseRecord::of(&m.source.weights, spec.as_ref());
    if a.dequantize && !target.is_quantized() {
        bail!(
            "--dequantize: the base {} is not quantized; add the --quantize flags the adapter was trained with",
            model
        )
    }
    if let Some(trained) = BaseRecord::read(adapter)? {
        if let Some(w) = trained.mismatch_warning(adapter, &target, model, true) {
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

fn run_config(config: &std::path::Path, a: &Args) -> Result<()> {
    let options = ferrule::merge::models::ModelMergeOptions {
        seed: a.seed,
        ..Default::default()
    };
    let spec = a.quant.spec()?;
    let report = ferrule::merge::models::merge_quantized(config, &a.output, &options, spec)?;
    println!("{}", serde_json::to_string(&report)?);
    eprintln!("merged model written to {}", a.output.display());
    Ok(())
}
