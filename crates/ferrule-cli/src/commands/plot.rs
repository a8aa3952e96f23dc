//! `ferrule plot RUN_DIR`: redraw a run's `loss.svg` from its `metrics.jsonl` (also while the
//! run is going on).

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The run folder (ferrule train's --output), holding metrics.jsonl.
    run_dir: PathBuf,
    /// Where to write the SVG (default: RUN_DIR/loss.svg).
    #[arg(long)]
    output: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let out = ferrule::train::write_loss_plot(&a.run_dir, a.output.as_deref())?;
    println!("{}", out.display());
    Ok(())
}
