//! A run's output folder: what an earlier run left in it, and replacing that
//! (`--overwrite`) instead of mixing two runs' files or overwriting them without a word.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::config::TrainConfig;
use crate::model::ModelSource;
use crate::tuners::Tuner;

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

/// The model files a run that trains the whole model writes (full fine-tuning). They count
/// as an earlier run's only beside its other files: a model folder alone is not a run.
const MODEL_FILES: &[&str] = &["model.safetensors", "config.json"];

/// What a finished run leaves in `out`: the adapter and the record of the base it was trained
/// on, or, for a method that trains the whole model ([`Tuner::trains_whole_model`]), the model
/// as a Hugging Face folder (`model.safetensors` in f32 for the trained tensors, the tokenizer,
/// `config.json` last).
pub fn save_result(
    out: &Path,
    tuner: &dyn Tuner,
    source: &ModelSource,
    cfg: &TrainConfig,
) -> Result<()> {
    if tuner.trains_whole_model() {
        let replaced = tuner.replaced()?;
        let (tensors, config, _) = crate::merge::merged_tensors_from(
            source,
            replaced,
            vec![],
            cfg.task,
            Default::default(),
        )?;
        let dense = tensors
            .into_iter()
            .map(|(name, w)| match w {
                crate::ops::frozen_linear::FrozenWeight::Dense(t) => Ok((name, t)),
                _ => anyhow::bail!("full fine-tuning: {name} is not a dense tensor; a fully fine-tuned model is written in f32"),
            })
            .collect::<Result<Vec<_>>>()?;
        return crate::export::write_dense_model_files(source, out, &config, &dense);
    }
    let base = crate::merge::BaseRecord::of(&source.weights, cfg.quantize.as_ref());
    crate::peft_io::save_adapter(out, tuner, cfg.task, &cfg.model)?;
    base.save(out)
}

/// The names of what an earlier run left in `dir` (checkpoints and [`RUN_FILES`], and the
/// model files of a full fine-tuning run beside them), sorted; empty for a missing or foreign
/// folder.
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
    if !found.is_empty() {
        found.extend(
            MODEL_FILES
                .iter()
                .filter(|f| dir.join(f).is_file())
                .map(|f| f.to_string()),
        );
    }
    found.sort();
    found
}

/// A run that writes a whole model must not write it over the model it trains from.
pub fn check_not_the_base(output_dir: &Path, source: &ModelSource) -> Result<()> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if let Some(dir) = &source.dir {
        if same(output_dir, dir) {
            bail!(
                "output {} is the model's own folder: full fine-tuning writes a whole model there \
                 and would replace the base; choose another output folder",
                output_dir.display()
            )
        }
    }
    Ok(())
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

    #[test]
    fn model_files_count_as_a_run_only_beside_its_other_files() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), "").unwrap();
        assert!(
            earlier_run(dir).is_empty(),
            "a model folder alone is not a run"
        );
        std::fs::write(dir.join("metrics.jsonl"), "").unwrap();
        assert_eq!(
            earlier_run(dir),
            ["config.json", "metrics.jsonl", "model.safetensors"]
        );
    }
}
