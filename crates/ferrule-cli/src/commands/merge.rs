//! `ferrule merge`

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrule::adapted::AdaptedModel;
use ferrule::merge::merge_to_dir;

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
}

pub fn run(a: Args) -> Result<()> {
    let m = AdaptedModel::load_with(
        &a.model,
        Some(&a.adapter),
        None,
        &super::device(),
        a.quant.spec()?.as_ref(),
    )?;
    let tuner = m.tuner.as_deref().context("no adapter")?;
    let report = merge_to_dir(&m.source, tuner, m.model.task, &a.output)?;
    println!("{}", serde_json::to_string(&report)?);
    eprintln!("merged model written to {}", a.output.display());
    Ok(())
}
