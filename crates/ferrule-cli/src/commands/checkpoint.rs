//! `ferrule checkpoint`

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Join a checkpoint's per-rank optimizer shards (ZeRO stage >= 1 on several ranks) into one
    /// optimizer file, in place, so that the run resumes on any number of ranks and any stage.
    Consolidate {
        /// The checkpoint folder (OUTPUT/checkpoint-STEP).
        dir: PathBuf,
    },
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Consolidate { dir } => {
            let out = ferrule::train::consolidate_checkpoint(&dir)?;
            eprintln!(
                "{}: optimizer state consolidated; it resumes with any number of ranks",
                out.display()
            );
            Ok(())
        }
    }
}
