//! `ferrule compare`: several methods trained on the same records, in the same order, under
//! one budget (steps, tokens or seconds), then one table and one plot. The surveys behind
//! this project (the critical review of PEFT methods; PEFT for code and for unit-test
//! generation) compare methods this way; `--lr-sweep` compares each at its own best learning
//! rate.
//!
//! This module plans the runs ([`plan_runs`]: one `TrainConfig` per method and learning rate,
//! differing from the others in the adapter, the learning rate and the output folder alone),
//! says where each stands on disk ([`RunState`]) and writes the report ([`report`], [`plot`]).
//! Running them is the caller's: the CLI runs each as its own `ferrule train` process, so that
//! each method's peak memory is its own and a failing method does not stop the others.

pub mod plot;
pub mod report;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::train::TrainConfig;
use crate::tuners::{registry, AdapterConfig};

/// The comparison's settings, written beside the runs so that a rerun continues only the
/// same comparison.
pub const SPEC_FILE: &str = "compare_spec.json";
/// Each run's `ferrule train` config (TOML), under the comparison's folder.
pub const CONFIGS_DIR: &str = "configs";
/// Each run's `ferrule train` output (stderr), under the comparison's folder.
pub const LOGS_DIR: &str = "logs";

/// The learning rates `--lr-sweep` tries when given no list.
pub const DEFAULT_LR_GRID: &str = "1e-4,3e-4,1e-3,3e-3,1e-2";

/// What every method gets the same of.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Budget {
    /// Optimizer steps (`max_steps`).
    Steps(usize),
    /// Tokens of the data, padding excluded (`max_tokens`).
    Tokens(u64),
    /// Seconds of training (`max_seconds`); the schedule spans the epochs' steps.
    Seconds(f64),
}

impl FromStr for Budget {
    type Err = anyhow::Error;

    /// `steps=N`, `tokens=T` or `seconds=S`.
    fn from_str(s: &str) -> Result<Budget> {
        let expected = "expected steps=N, tokens=T or seconds=S";
        let (kind, value) = s
            .split_once('=')
            .with_context(|| format!("budget {s:?}: {expected}"))?;
        // One positive number, whichever the kind; each kind keeps its own type.
        let number = value
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n > 0.0)
            .with_context(|| {
                format!("budget {s:?}: {value:?} is not a positive number ({expected})")
            })?;
        let whole = || match number.fract() == 0.0 {
            true => Ok(number),
            false => bail!("budget {s:?}: {value:?} is not a whole number ({expected})"),
        };
        let budget = match kind.trim() {
            "steps" => Budget::Steps(whole()? as usize),
            "tokens" => Budget::Tokens(whole()? as u64),
            "seconds" => Budget::Seconds(number),
            other => bail!("budget {s:?}: unknown kind {other:?}; {expected}"),
        };
        Ok(budget)
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Steps(n) => write!(f, "{n} steps"),
            Budget::Tokens(t) => write!(f, "{t} tokens"),
            Budget::Seconds(s) => write!(f, "{s} seconds"),
        }
    }
}

/// One entry of `--methods`: its name and the adapter it trains.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    /// The name as given (`lora`, `dora`, `prefix-tuning`): the run's folder and row.
    pub label: String,
    pub adapter: AdapterConfig,
}

/// What `ferrule compare` was asked.
#[derive(Clone, Debug, Serialize)]
pub struct CompareSpec {
    pub candidates: Vec<Candidate>,
    pub budget: Budget,
    /// The learning rates each method tries (`--lr-sweep`); `None`: the run's `lr` for all.
    pub lr_grid: Option<Vec<f64>>,
}

impl CompareSpec {
    /// `methods` comma-separated (method or variant names, [`registry::adapter_named`]);
    /// `options` are `NAME:KEY=VALUE` (VALUE as JSON, else a string) set on the candidate
    /// NAME. Errors name the unknown method, a repeated one, or an option for a method not in
    /// the list or a key the method does not have.
    pub fn new(
        methods: &str,
        options: &[String],
        budget: Budget,
        lr_grid: Option<Vec<f64>>,
    ) -> Result<CompareSpec> {
        let mut candidates: Vec<Candidate> = Vec::new();
        for name in methods.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let label = name.to_ascii_lowercase();
            if candidates.iter().any(|c| c.label == label) {
                bail!("--methods: {name:?} is listed twice")
            }
            let adapter = registry::adapter_named(name).context("--methods")?;
            candidates.push(Candidate { label, adapter });
        }
        if candidates.is_empty() {
            bail!("--methods: no method given (e.g. --methods lora,dora,ia3)")
        }
        for option in options {
            set_option(&mut candidates, option)?;
        }
        if let Some(lr) = lr_grid
            .iter()
            .flatten()
            .find(|lr| !(lr.is_finite() && **lr > 0.0))
        {
            bail!("--lr-sweep: {lr} is not a positive learning rate")
        }
        Ok(CompareSpec {
            candidates,
            budget,
            lr_grid,
        })
    }
}

/// Applies one `--method-option NAME:KEY=VALUE`.
fn set_option(candidates: &mut [Candidate], option: &str) -> Result<()> {
    let expected = "expected NAME:KEY=VALUE, e.g. prompt-tuning:num_virtual_tokens=20";
    let (name, kv) = option
        .split_once(':')
        .with_context(|| format!("--method-option {option:?}: {expected}"))?;
    let (key, value) = kv
        .split_once('=')
        .with_context(|| format!("--method-option {option:?}: {expected}"))?;
    let Some(c) = candidates.iter_mut().find(|c| c.label == name.trim()) else {
        bail!("--method-option {option:?}: {name:?} is not in --methods")
    };
    let method = c.adapter.method()?;
    if !method.keys.contains(&key.trim()) {
        bail!(
            "--method-option {option:?}: the {} method has no key {key:?} (its keys: {})",
            method.name,
            method.keys.join(", ")
        )
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::from(value));
    c.adapter.options.insert(key.trim().to_string(), value);
    Ok(())
}

/// One training run of the comparison.
#[derive(Clone, Debug)]
pub struct PlannedRun {
    /// `lora`, or `lora lr=3e-4` in a sweep.
    pub label: String,
    /// Index into [`CompareSpec::candidates`].
    pub candidate: usize,
    pub lr: f64,
    /// The run's whole config; `output_dir` is its folder.
    pub config: TrainConfig,
}

/// The runs of `spec` over `base` (the settings every run shares; its `output_dir` is the
/// comparison's folder): one per method, or per method and learning rate in a sweep, in the
/// order of `--methods`. Each differs from `base` in the adapter, the learning rate, the
/// budget and the output folder alone, so the records and their order are the same.
///
/// Errors when `base` already sets what the comparison sets: an adapter, or a length the
/// budget would contradict.
pub fn plan_runs(base: &TrainConfig, spec: &CompareSpec) -> Result<Vec<PlannedRun>> {
    if base.adapter.is_some() || base.lora.is_some() {
        bail!("compare: the config file's [adapter] (or [lora]) table would train one method for all; name the methods in --methods and their keys with --method-option")
    }
    let sets_length = base.max_steps.is_some() || base.max_tokens.is_some();
    if sets_length && !matches!(spec.budget, Budget::Seconds(_)) {
        bail!("compare: max_steps or max_tokens is set, and --budget sets the runs' length; drop one of them")
    }
    let mut runs = Vec::new();
    for (i, c) in spec.candidates.iter().enumerate() {
        let lrs = spec.lr_grid.clone().unwrap_or_else(|| vec![base.lr]);
        for lr in lrs {
            let (label, dir) = match spec.lr_grid {
                Some(_) => (
                    format!("{} lr={lr:e}", c.label),
                    base.output_dir.join(&c.label).join(format!("lr-{lr:e}")),
                ),
                None => (c.label.clone(), base.output_dir.join(&c.label)),
            };
            let mut config = base.clone();
            config.adapter = Some(c.adapter.clone());
            config.lr = lr;
            config.output_dir = dir;
            match spec.budget {
                Budget::Steps(n) => config.max_steps = Some(n),
                Budget::Tokens(t) => config.max_tokens = Some(t),
                Budget::Seconds(s) => config.max_seconds = Some(s),
            }
            runs.push(PlannedRun {
                label,
                candidate: i,
                lr,
                config,
            });
        }
    }
    Ok(runs)
}

impl PlannedRun {
    /// Its config file, `<comparison>/configs/<label>.toml` (spaces and `=` as `-`).
    pub fn config_path(&self, out: &Path) -> PathBuf {
        out.join(CONFIGS_DIR)
            .join(format!("{}.toml", self.file_stem()))
    }

    /// Its log, `<comparison>/logs/<label>.log`.
    pub fn log_path(&self, out: &Path) -> PathBuf {
        out.join(LOGS_DIR).join(format!("{}.log", self.file_stem()))
    }

    fn file_stem(&self) -> String {
        self.label.replace([' ', '='], "-")
    }

    /// Writes the run's config as `ferrule train --config` reads it.
    pub fn write_config(&self, out: &Path) -> Result<PathBuf> {
        let path = self.config_path(out);
        let text = toml::to_string(&self.config)
            .with_context(|| format!("{}: writing the run's config as TOML", self.label))?;
        std::fs::create_dir_all(out.join(CONFIGS_DIR))?;
        crate::util::atomic::write_bytes_atomic(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Whether an earlier invocation wrote this run's config with other settings (a method
    /// option changed): its folder's run is then not this one's.
    pub fn config_changed(&self, out: &Path) -> Result<bool> {
        let path = self.config_path(out);
        if !path.is_file() {
            return Ok(false);
        }
        let before = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(before != toml::to_string(&self.config)?)
    }

    /// Where the run stands in its folder.
    pub fn state(&self) -> RunState {
        RunState::of(&self.config.output_dir)
    }
}

/// Where a run stands on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Finished: `train_summary.json` is there (read, not rerun).
    Done,
    /// Stopped with a checkpoint: continued with `--resume`.
    Resumable,
    /// Started and stopped before its first checkpoint: started again (`--overwrite`).
    Stale,
    /// Not started.
    Fresh,
}

impl RunState {
    /// The state of the run whose output folder is `dir`.
    pub fn of(dir: &Path) -> RunState {
        if dir.join("train_summary.json").is_file() {
            RunState::Done
        } else if crate::train::latest_checkpoint(dir).is_some() {
            RunState::Resumable
        } else if dir.exists() {
            RunState::Stale
        } else {
            RunState::Fresh
        }
    }
}

/// Makes `out` the comparison's folder: writes [`SPEC_FILE`], or checks that the one there has
/// the same budget, learning-rate grid and shared settings, so that a rerun continues it.
/// Methods may be added or their keys changed between invocations: a run whose own config
/// changed starts again ([`PlannedRun::config_changed`]), the others are kept. Another budget,
/// grid or shared setting is an error, unless `overwrite` (every run then starts again).
pub fn claim_folder(
    out: &Path,
    spec: &CompareSpec,
    base: &TrainConfig,
    overwrite: bool,
) -> Result<()> {
    let mut shared = serde_json::to_value(base)?;
    // The folder may move between invocations; the settings may not.
    if let Some(o) = shared.as_object_mut() {
        o.remove("output_dir");
    }
    let record =
        serde_json::json!({"budget": spec.budget, "lr_grid": spec.lr_grid, "settings": shared});
    let path = out.join(SPEC_FILE);
    if path.is_file() && !overwrite {
        let text = std::fs::read_to_string(&path)?;
        let before: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a comparison's settings", path.display()))?;
        if before != record {
            bail!(
                "{}: this folder holds a comparison with another budget, learning-rate grid or shared settings; use another --output, or --overwrite to start its runs again",
                out.display()
            )
        }
        return Ok(());
    }
    if out.exists() && !path.is_file() && std::fs::read_dir(out)?.next().is_some() {
        bail!(
            "{}: the folder is not empty and holds no comparison; use another --output",
            out.display()
        )
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::util::atomic::write_bytes_atomic(
        &path,
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )
    .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_and_bad_ones_are_named() {
        assert_eq!("steps=300".parse::<Budget>().unwrap(), Budget::Steps(300));
        assert_eq!(
            "tokens=1000000".parse::<Budget>().unwrap(),
            Budget::Tokens(1_000_000)
        );
        assert_eq!(
            "seconds=90.5".parse::<Budget>().unwrap(),
            Budget::Seconds(90.5)
        );
        for bad in [
            "steps",
            "steps=0",
            "minutes=3",
            "seconds=-1",
            "tokens=x",
            "steps=2.5",
        ] {
            let e = bad.parse::<Budget>().unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn methods_variants_and_options_make_the_candidates() {
        let options = ["prompt-tuning:num_virtual_tokens=20".to_string()];
        let spec =
            CompareSpec::new("lora, dora,prompt-tuning", &options, Budget::Steps(3), None).unwrap();
        let labels: Vec<&str> = spec.candidates.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(labels, ["lora", "dora", "prompt-tuning"]);
        assert_eq!(spec.candidates[1].adapter.peft_type, "LORA");
        assert_eq!(spec.candidates[1].adapter.options["use_dora"], true);
        assert_eq!(spec.candidates[0].adapter.options["r"], 8);
        assert_eq!(spec.candidates[2].adapter.options["num_virtual_tokens"], 20);
        let err = |m: &str, o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            format!(
                "{:#}",
                CompareSpec::new(m, &o, Budget::Steps(1), None).unwrap_err()
            )
        };
        assert!(err("lora,lorax", &[]).contains("unknown method \"lorax\""));
        assert!(err("lora,lora", &[]).contains("listed twice"));
        assert!(err("", &[]).contains("no method"));
        assert!(err("lora", &["ia3:x=1"]).contains("\"ia3\" is not in --methods"));
        assert!(err("lora", &["lora:rank=4"]).contains("no key \"rank\""));
        assert!(err("lora", &["lora"]).contains("expected NAME:KEY=VALUE"));
    }

    #[test]
    fn runs_differ_in_adapter_lr_budget_and_folder_only() {
        let base = TrainConfig {
            output_dir: "cmp".into(),
            lr: 5e-4,
            ..Default::default()
        };
        let spec =
            CompareSpec::new("lora,ia3", &[], Budget::Tokens(900), Some(vec![1e-4, 3e-3])).unwrap();
        let runs = plan_runs(&base, &spec).unwrap();
        let labels: Vec<&str> = runs.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(
            labels,
            ["lora lr=1e-4", "lora lr=3e-3", "ia3 lr=1e-4", "ia3 lr=3e-3"]
        );
        assert_eq!(runs[1].config.output_dir, Path::new("cmp/lora/lr-3e-3"));
        assert_eq!(runs[3].config.lr, 3e-3);
        assert_eq!(runs[2].config.max_tokens, Some(900));
        assert_eq!(runs[2].config.adapter.as_ref().unwrap().peft_type, "IA3");
        // Without a grid: the base's lr, one folder per method.
        let spec = CompareSpec::new("lora", &[], Budget::Steps(4), None).unwrap();
        let runs = plan_runs(&base, &spec).unwrap();
        assert_eq!((runs[0].lr, runs[0].config.max_steps), (5e-4, Some(4)));
        assert_eq!(runs[0].config.output_dir, Path::new("cmp/lora"));
        // A length in the settings contradicts a steps budget.
        let base = TrainConfig {
            max_steps: Some(9),
            ..base
        };
        assert!(plan_runs(&base, &spec)
            .unwrap_err()
            .to_string()
            .contains("max_steps"));
    }

    #[test]
    fn a_run_config_reads_back_as_written() {
        let base = TrainConfig {
            model: "m".into(),
            data: "d.jsonl".into(),
            output_dir: "cmp".into(),
            ..Default::default()
        };
        let options = ["prefix-tuning:num_virtual_tokens=4".to_string()];
        let spec =
            CompareSpec::new("dora,prefix-tuning", &options, Budget::Seconds(2.5), None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for run in plan_runs(&base, &spec).unwrap() {
            let path = run.write_config(tmp.path()).unwrap();
            let back: TrainConfig =
                toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&run.config).unwrap()
            );
        }
    }
}
