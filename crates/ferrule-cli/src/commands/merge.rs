//! `ferrule merge`

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrule::adapted::AdaptedModel;
use ferrule::merge::merge_to_dir;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: String,
    #[arg(long)]
    adapter: PathBuf,
    /// New folder for the merged model.
    #[arg(long, short)]
    output: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let m = AdaptedModel::load(&a.model, Some(&a.adapter), None, &super::device())?;
    let tuner = m.tuner.as_ref().context("no adapter")?;
    let report = merge_to_dir(&m.source, tuner, m.model.task, &a.output)?;
    println!("{}", serde_json::to_string(&report)?);
    eprintln!("merged model written to {}", a.output.display());
    Ok(())
}
