//! A run's output folder: what an earlier run left in it, and replacing that
//! (`--overwrite`) instead of mixing two runs' files or overwriting them without a word.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The files and folders a run writes into its output folder, besides `checkpoint-<step>/`.
pub const RUN_FILES: &[&str] = &[
    crate::peft_io::CONFIG_FILE,
    crate::peft_io::WEIGHTS_FILE,
    crate::merge::BASE_RECORD_FILE,
    "metrics.jsonl",
    "train_summary.json",
    super::plot::PLOT_FILE,
    super::tensorboard::RUNS_DIR,
];

/// The names of what an earlier run left in `dir` (checkpoints and [`RUN_FILES`]), sorted;
/// empty for a missing or foreign folder.
pub fn earlier_run(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| {
            RUN_FILES.contains(&name.as_str())
                || name.strip_prefix("checkpoint-").is_some_and(|s| {
                    s.split('.')
                        .next()
                        .is_some_and(|d| d.parse::<u64>().is_ok())
                })
        })
        .collect();
    found.sort();
    found
}

/// Makes `dir` ready for a run: an earlier run's files there are an error naming
/// `--overwrite` and `--resume`, unless `resume` (the run continues from them) or `overwrite`
/// (they are removed first; other files in the folder stay).
pub fn claim_output_dir(dir: &Path, resume: bool, overwrite: bool) -> Result<()> {
    let found = earlier_run(dir);
    if found.is_empty() || resume {
        return Ok(());
    }
    if !overwrite {
        let shown: Vec<&str> = found.iter().take(6).map(String::as_str).collect();
        let more = if found.len() > shown.len() {
            ", ..."
        } else {
            ""
        };
        let resume_hint = if found.iter().any(|n| n.starts_with("checkpoint-")) {
            "--resume to continue it, "
        } else {
            ""
        };
        bail!(
            "output {} holds an earlier run ({}{more}); pass {resume_hint}--overwrite to replace it, \
             or choose another output folder",
            dir.display(),
            shown.join(", ")
        )
    }
    for name in &found {
        let path = dir.join(name);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("--overwrite: removing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_run_is_refused_unless_overwritten_or_resumed() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        claim_output_dir(&dir.join("missing"), false, false).unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        claim_output_dir(dir, false, false).unwrap();
        std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
        std::fs::create_dir_all(dir.join("checkpoint-4")).unwrap();
        std::fs::create_dir_all(dir.join("runs")).unwrap();
        let err = format!("{:#}", claim_output_dir(dir, false, false).unwrap_err());
        assert!(
            err.contains("(adapter_config.json, checkpoint-4, runs)")
                && err.contains("--resume to continue it, --overwrite"),
            "{err}"
        );
        claim_output_dir(dir, true, false).unwrap();
        assert!(dir.join("checkpoint-4").exists(), "--resume keeps the run");
        claim_output_dir(dir, false, true).unwrap();
        assert!(earlier_run(dir).is_empty());
        assert!(dir.join("notes.txt").exists(), "other files stay");
    }
}
