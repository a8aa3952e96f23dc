//! `ferrule train`

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args as _;
use ferrule::dist::{Collective, ZeroStage};
use ferrule::train::config::heading;
use ferrule::train::output::claim_output_dir;
use ferrule::train::{train_on, RunOptions, TrainConfig, TrainSummary};

use crate::progress::{clock, Bar};

#[derive(clap::Args)]
pub struct Args {
    /// TOML file with the run's settings (the keys are the flags' names with underscores, e.g.
    /// max_len; the method's PEFT keys under [adapter] with peft_type, or LoRA's under [lora]).
    /// Flags override it (default: none, the flags and the defaults alone).
    #[arg(long, value_name = "FILE", help_heading = heading::RUN)]
    config: Option<PathBuf>,
    #[command(flatten, next_help_heading = heading::METHOD)]
    adapter: super::adapter_args::AdapterArgs,
    #[command(flatten, next_help_heading = heading::METHOD)]
    quant: super::QuantArgs,
    /// The run's settings, declared once in the library (`TrainConfig`'s fields are the flags).
    #[command(flatten)]
    settings: TrainConfig,
    /// Continue from the newest checkpoint in the output folder.
    #[arg(long, help_heading = heading::OUTPUT)]
    resume: bool,
    /// Replace an earlier run in the output folder (its adapter, checkpoints, metrics and
    /// events are removed first); without it such a folder is an error.
    #[arg(long, conflicts_with = "resume", help_heading = heading::OUTPUT)]
    overwrite: bool,
    /// When stderr is not a terminal (nohup, CI, a file): a plain progress line for the first
    /// step and every N steps.
    #[arg(long, value_name = "N", default_value_t = 10, help_heading = heading::OUTPUT)]
    log_every: usize,
    /// No progress bar or messages; the summary is still printed.
    #[arg(long, short, help_heading = heading::OUTPUT)]
    quiet: bool,
    /// Print the summary as one JSON line on stdout (train_summary.json's object, for scripts)
    /// instead of a few lines for people.
    #[arg(long, help_heading = heading::OUTPUT)]
    json: bool,
    /// How the trainable state is spread over the ranks (ZeRO, Rajbhandari et al. 2020):
    /// 0 gradients all-reduced, 1 also AdamW state partitioned, 2 gradients reduce-scattered too,
    /// 3 trainable parameters partitioned too. Every stage trains the same adapter.
    #[arg(long, value_name = "0-3", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=3),
          help_heading = heading::SCALE_OUT)]
    zero_stage: u8,
    /// Stop after this many steps as if interrupted (a checkpoint is written; resume later).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    /// The settings given as flags on the command line ([`given_settings`]); the others come
    /// from the config file or the defaults.
    #[arg(skip)]
    pub given: Vec<String>,
}

/// The ids of the flags that are settings: `TrainConfig`'s fields.
fn setting_ids() -> Vec<String> {
    TrainConfig::augment_args(clap::Command::new("train"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect()
}

/// `ferrule train`'s command with each setting's default (`TrainConfig::default()`, declared
/// there once) shown in `--help`; the settings without one say what their absence means.
pub fn with_defaults(mut train: clap::Command) -> clap::Command {
    let defaults = serde_json::to_value(TrainConfig::default()).unwrap_or_default();
    for id in setting_ids() {
        let Some(value) = defaults.get(&id) else {
            continue;
        };
        let text = match value {
            serde_json::Value::Number(n) => n.to_string(),
            // Enum values in the flags' spelling: CAUSAL_LM -> causal-lm.
            serde_json::Value::String(s) => s.to_ascii_lowercase().replace('_', "-"),
            _ => continue,
        };
        // clap keeps default values as &'static str; these are a few short strings, once.
        let text: &'static str = Box::leak(text.into_boxed_str());
        train = train.mut_arg(id, |arg| {
            if !arg.get_action().takes_values() {
                return arg;
            }
            // A required setting (model, data, output) may come from --config instead; an
            // empty default lets TrainConfig::validate name what is missing.
            arg.required(false)
                .default_value(text)
                .hide_default_value(text.is_empty())
        });
    }
    train
}

/// The settings whose flags were given on the command line (`train`'s matches).
pub fn given_settings(matches: &clap::ArgMatches) -> Vec<String> {
    setting_ids()
        .into_iter()
        .filter(|id| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        .collect()
}

/// The settings of a `--config` file (or the defaults) with those given as flags over them.
pub fn settings_from(
    config: Option<&std::path::Path>,
    flags: &TrainConfig,
    given: &[String],
) -> Result<TrainConfig> {
    let file: TrainConfig = match config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("{}: invalid training config", p.display()))?
        }
        None => TrainConfig::default(),
    };
    let given: Vec<&str> = given.iter().map(String::as_str).collect();
    file.with_keys_from(flags, &given)
}

pub fn build_config(a: &Args) -> Result<TrainConfig> {
    let mut c = settings_from(a.config.as_deref(), &a.settings, &a.given)?;
    c.adapter = Some(a.adapter.apply(&c)?);
    c.lora = None;
    if a.adapter.allow_unmatched {
        c.allow_unmatched = true;
    }
    c.quantize = a.quant.apply(c.quantize.take())?;
    Ok(c)
}

/// Trains on every rank of `comm` (the world of one without a launcher); rank 0 prints.
/// Returns whether a signal stopped the run (after saving a checkpoint).
pub fn run(a: Args, comm: &dyn Collective) -> Result<bool> {
    let cfg = build_config(&a)?;
    let mut bar = Bar::new(a.quiet, a.log_every);
    let interrupt = stop_on_signal(comm.rank() == 0)?;
    let run = RunOptions {
        resume: a.resume,
        stop_after: a.stop_after,
        zero_stage: ZeroStage::new(a.zero_stage)?,
        interrupt: Some(interrupt),
    };
    // A mistyped setting must not cost the earlier run that --overwrite would remove.
    cfg.validate()?;
    if cfg.continual.is_some() {
        return run_continual(&cfg, &a, &mut bar, run, comm);
    }
    let claimed = if comm.rank() == 0 {
        claim_output_dir(&cfg.output_dir, a.resume, a.overwrite)
    } else {
        Ok(())
    };
    comm.all_ok(claimed.is_ok(), "checking the output folder")?;
    claimed?;
    let summary = train_on(&cfg, &super::device(), &mut bar, &run, comm)?;
    if comm.rank() != 0 {
        return Ok(summary.interrupted);
    }
    if !summary.completed {
        // On stderr whatever stdout carries, and with -q too: the run has not finished.
        eprintln!(
            "stopped after step {} (checkpoint saved); run the same command with --resume to continue",
            summary.steps
        );
    }
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
        if summary.completed && !a.quiet {
            let (what, files) = saved_what(&summary);
            eprintln!("{what} saved to {} ({files})", summary.output_dir.display());
        }
    } else {
        for line in summary_lines(&summary, &cfg) {
            println!("{line}");
        }
    }
    Ok(summary.interrupted)
}

/// `--method conpet --continual DIR`: adds the training split to the set as a new task
/// (`ferrule::continual::add_task`), one process only.
fn run_continual(
    cfg: &TrainConfig,
    a: &Args,
    bar: &mut Bar,
    run: RunOptions,
    comm: &dyn Collective,
) -> Result<bool> {
    if comm.world_size() > 1 {
        anyhow::bail!("--continual trains in one process; run it without mpirun")
    }
    if a.overwrite {
        anyhow::bail!("--overwrite with --continual: a ConPET set keeps its earlier tasks; to redo an unfinished task pass --resume, to start over give a new folder")
    }
    let s = ferrule::continual::add_task(cfg, &super::device(), bar, &run)?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else if s.completed {
        println!(
            "task {} added to the ConPET set in {}",
            s.task,
            s.set_dir.display()
        );
        for (what, r) in [("selector", &s.selector), ("expert", &s.expert)] {
            if let Some(r) = r {
                let loss = r.final_loss.map_or("-".into(), |l| format!("{l:.4}"));
                println!("{what}: {} steps, final loss {loss}", r.steps);
            }
        }
        if let Some(e) = &s.eval {
            println!(
                "eval over every task: accuracy {:.2}%, routed to the right expert {:.2}% ({} records)",
                100.0 * e.eval_accuracy,
                100.0 * e.routing_accuracy,
                e.eval_records
            );
        }
    } else {
        eprintln!("stopped before task {} was added (checkpoint saved); run the same command with --resume to continue", s.task);
    }
    Ok(!s.completed)
}

/// `4.2 s` under a minute, else `1:02:03`.
fn duration(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        clock(secs)
    }
}

/// The summary for people: steps and losses, speed and memory, where the results went.
pub fn summary_lines(s: &TrainSummary, cfg: &TrainConfig) -> Vec<String> {
    let out = s.output_dir.display();
    let mut lines = vec![format!(
        "{} step{}{} ({} in this run): final loss {}",
        s.steps,
        if s.steps == 1 { "" } else { "s" },
        match (s.completed, s.time_limit_reached) {
            (true, true) => ", max-seconds reached",
            (true, false) => "",
            (false, _) => ", stopped early",
        },
        duration(s.seconds),
        s.final_loss
            .map_or("- (no step in this run)".to_string(), |l| format!("{l:.4}"))
    )];
    if let Some(e) = &s.eval {
        let figure = match (e.eval_accuracy, e.eval_perplexity) {
            (Some(acc), _) => format!("accuracy {:.2}%", 100.0 * acc),
            (None, Some(ppl)) => format!("perplexity {ppl:.2}"),
            (None, None) => String::new(),
        };
        lines.push(format!(
            "eval loss {:.4}, {figure} ({} records, step {})",
            e.eval_loss, e.eval_records, e.step
        ));
    }
    let peak = s
        .peak_rss_bytes_per_rank
        .iter()
        .copied()
        .fold(0.0, f64::max);
    let per_rank = if s.world_size > 1 {
        format!(" (the largest of {} ranks)", s.world_size)
    } else {
        String::new()
    };
    lines.push(format!(
        "{} tokens/s in {}, peak memory {:.1} MB{per_rank}, base weights {:.1} MB",
        s.tokens_per_sec
            .map_or("-".to_string(), |t| format!("{t:.0}")),
        s.compute_dtype.dtype,
        peak / 1e6,
        s.base_weight_bytes as f64 / 1e6
    ));
    if s.completed {
        lines.push(format!(
            "{} saved to {out} (with metrics.jsonl, loss.svg, train_summary.json)",
            saved_what(s).0
        ));
    } else {
        lines.push(format!("checkpoint of step {} in {out}", s.steps));
    }
    if cfg
        .report_to
        .contains(&ferrule::train::ReportTo::Tensorboard)
    {
        lines.push(format!(
            "TensorBoard events in {}",
            s.output_dir
                .join(ferrule::train::tensorboard::RUNS_DIR)
                .display()
        ));
    }
    lines
}

/// Ctrl-C, SIGTERM or SIGHUP: the first asks training to stop after the current step with a
/// checkpoint; a second one exits at once (130), as an unhandled Ctrl-C would. Under mpirun,
/// Open MPI turns Ctrl-C into SIGTERM for every rank and kills them a few seconds later:
/// the checkpoint is only written if the step ends in that time.
fn stop_on_signal(announce: bool) -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    ctrlc::set_handler(move || {
        if seen.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        if announce {
            eprintln!(
                "\nstopping after this step with a checkpoint (interrupt again to stop at once)"
            );
        }
    })
    .context("installing the Ctrl-C handler")?;
    Ok(flag)
}

/// What a completed run left in its output folder, and its files.
fn saved_what(s: &TrainSummary) -> (&'static str, &'static str) {
    match s.whole_model {
        true => ("model", "config.json + model.safetensors"),
        false => ("adapter", "adapter_config.json + adapter_model.safetensors"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};
    use serde_json::{json, Value};

    /// `ferrule train ARGS` parsed as `main` parses it, with the config it builds.
    fn parse(args: &[&str]) -> Result<TrainConfig> {
        let mut cmd = crate::Cli::command().mut_subcommand("train", with_defaults);
        let argv = ["ferrule", "train"].iter().chain(args);
        let matches = cmd.try_get_matches_from_mut(argv)?;
        let crate::Command::Train(mut a) = crate::Cli::from_arg_matches(&matches)?.command else {
            unreachable!()
        };
        a.given = given_settings(matches.subcommand_matches("train").unwrap());
        build_config(&a)
    }

    fn as_json(c: &TrainConfig) -> serde_json::Map<String, Value> {
        match serde_json::to_value(c).unwrap() {
            Value::Object(o) => o,
            _ => unreachable!(),
        }
    }

    /// One use of each setting's flag, with the value its key gets.
    fn samples() -> Vec<(Vec<&'static str>, &'static str, Value)> {
        vec![
            (vec!["--model", "m"], "model", json!("m")),
            (vec!["--data", "d.jsonl"], "data", json!("d.jsonl")),
            (
                vec!["--eval-data", "e.jsonl"],
                "eval_data",
                json!("e.jsonl"),
            ),
            (vec!["-o", "out"], "output_dir", json!("out")),
            (vec!["--task", "seq-cls"], "task", json!("SEQ_CLS")),
            (vec!["--max-len", "64"], "max_len", json!(64)),
            (vec!["--no-truncate"], "truncate", json!(false)),
            (vec!["--train-on-prompt"], "completion_only", json!(false)),
            (vec!["--padding", "longest"], "padding", json!("longest")),
            (vec!["--pad-to-max-len"], "pad_to_max_len", json!(true)),
            (vec!["--batch-size", "3"], "batch_size", json!(3)),
            (vec!["--batch-tokens", "96"], "batch_tokens", json!(96)),
            (vec!["--packing"], "packing", json!(true)),
            (vec!["--grad-accum", "4"], "grad_accum", json!(4)),
            (vec!["--max-steps", "7"], "max_steps", json!(7)),
            (vec!["--epochs", "2.5"], "epochs", json!(2.5)),
            (vec!["--max-tokens", "4096"], "max_tokens", json!(4096)),
            (vec!["--max-seconds", "90"], "max_seconds", json!(90.0)),
            (vec!["--lr", "0.01"], "lr", json!(0.01)),
            (
                vec!["--lora-embedding-lr", "0.005"],
                "lora_embedding_lr",
                json!(0.005),
            ),
            (vec!["--warmup-steps", "5"], "warmup_steps", json!(5)),
            (vec!["--schedule", "cosine"], "schedule", json!("cosine")),
            (vec!["--weight-decay", "0.1"], "weight_decay", json!(0.1)),
            (vec!["--adam-beta1", "0.8"], "adam_beta1", json!(0.8)),
            (vec!["--adam-beta2", "0.99"], "adam_beta2", json!(0.99)),
            (vec!["--adam-eps", "1e-6"], "adam_eps", json!(1e-6)),
            (
                vec!["--optim", "adamw_bnb_8bit"],
                "optim",
                json!("adamw_8bit"),
            ),
            (vec!["--min-8bit-size", "64"], "min_8bit_size", json!(64)),
            (
                vec!["--optim-args", "rank=4"],
                "optim_args",
                json!("rank=4"),
            ),
            (
                vec!["--optim-target-modules", "q_proj,v_proj"],
                "optim_target_modules",
                json!(["q_proj", "v_proj"]),
            ),
            (
                vec!["--offload-dir", "/tmp/x"],
                "offload_dir",
                json!("/tmp/x"),
            ),
            (vec!["--max-grad-norm", "0"], "max_grad_norm", Value::Null),
            (vec!["--seed", "7"], "seed", json!(7)),
            (vec!["--recompute"], "recompute", json!(true)),
            (vec!["--eval-every", "2"], "eval_every", json!(2)),
            (
                vec!["--eval-batch-size", "16"],
                "eval_batch_size",
                json!(16),
            ),
            (vec!["--eval-limit", "9"], "eval_limit", json!(9)),
            (vec!["--save-every", "3"], "save_every", json!(3)),
            (
                vec!["--keep-checkpoints", "5"],
                "keep_checkpoints",
                json!(5),
            ),
            (
                vec!["--report-to", "tensorboard"],
                "report_to",
                json!(["tensorboard"]),
            ),
            (vec!["--shard-base"], "shard_base", json!(true)),
            (vec!["--stream-base"], "stream_base", json!(true)),
            (
                vec!["--max-resident-gb", "2.5"],
                "max_resident_gb",
                json!(2.5),
            ),
            (
                vec!["--compute-dtype", "bf16"],
                "compute_dtype",
                json!("bf16"),
            ),
            (
                vec!["--resize-token-embeddings"],
                "resize_token_embeddings",
                json!(true),
            ),
            (
                vec!["--init-adapter", "runs/a"],
                "init_adapter",
                json!("runs/a"),
            ),
            (
                vec!["--continual", "runs/set"],
                "continual",
                json!("runs/set"),
            ),
        ]
    }

    /// The keys set by the method's flags (`adapter_args`, `QuantArgs`), not by a flag each.
    const METHOD_KEYS: &[&str] = &["adapter", "lora", "allow_unmatched", "quantize"];

    /// Each setting's flag sets its key and no other; every key has a flag; every flag of
    /// `train` is a setting, a method flag or an option of the invocation.
    #[test]
    fn every_flag_maps_to_a_config_key_and_back() {
        let baseline = as_json(&parse(&[]).unwrap());
        let samples = samples();
        for (args, key, want) in &samples {
            let got = as_json(&parse(args).unwrap_or_else(|e| panic!("{args:?}: {e:#}")));
            assert_eq!(got.get(*key).unwrap_or(&Value::Null), want, "{args:?}");
            for (k, v) in &baseline {
                if k != key {
                    assert_eq!(got.get(k), Some(v), "{args:?} changed {k}");
                }
            }
        }
        let flag_keys: Vec<&str> = samples.iter().map(|s| s.1).collect();
        let ids = setting_ids();
        assert_eq!(ids.len(), flag_keys.len(), "settings {ids:?}");
        for id in &ids {
            assert!(flag_keys.contains(&id.as_str()), "flag of {id} untested");
            assert!(TrainConfig::is_key(id), "flag {id} is no config key");
        }
        for key in TrainConfig::keys() {
            assert!(
                ids.contains(&key) || METHOD_KEYS.contains(&key.as_str()),
                "config key {key} has no flag"
            );
        }
        let method: Vec<String> = [
            super::super::adapter_args::AdapterArgs::augment_args(clap::Command::new("a")),
            super::super::QuantArgs::augment_args(clap::Command::new("q")),
        ]
        .iter()
        .flat_map(|c| c.get_arguments().map(|a| a.get_id().to_string()))
        .collect();
        let invocation = [
            "config",
            "resume",
            "overwrite",
            "json",
            "log_every",
            "quiet",
            "zero_stage",
            "stop_after",
            "help",
            "threads",
        ];
        let cmd = crate::Cli::command();
        for arg in cmd.find_subcommand("train").unwrap().get_arguments() {
            let id = arg.get_id().as_str();
            assert!(
                ids.iter().any(|i| i == id)
                    || method.iter().any(|i| i == id)
                    || invocation.contains(&id),
                "train flag {id} is neither a setting, a method flag nor an invocation option"
            );
        }
    }

    #[test]
    fn method_flags_set_their_keys() {
        let c = parse(&[
            "--allow-unmatched",
            "--quantize",
            "nf4",
            "--quant-blocksize",
            "128",
            "--double-quant",
        ])
        .unwrap();
        assert!(c.allow_unmatched);
        let q = c.quantize.unwrap();
        assert_eq!((q.blocksize, q.double_quant), (128, true));
    }

    /// Flags override the file's keys; the file's others stay; a micro-batch flag replaces
    /// both micro-batch keys.
    #[test]
    fn flags_override_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(
            &file,
            "lr = 0.1\nbatch_tokens = 512\nseed = 3\nmax_grad_norm = 0\nschedule = \"cosine\"\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let c = parse(&["--config", file]).unwrap();
        assert_eq!((c.lr, c.batch_tokens, c.seed), (0.1, Some(512), 3));
        assert_eq!(c.max_grad_norm, None, "0 in the file disables clipping");
        assert_eq!(c.schedule, ferrule::train::LrSchedule::Cosine);
        let c = parse(&["--config", file, "--batch-size", "4", "--seed", "42"]).unwrap();
        assert_eq!((c.batch_size, c.batch_tokens), (Some(4), None));
        assert_eq!(
            (c.lr, c.seed),
            (0.1, 42),
            "a flag at its default value still wins"
        );
    }

    /// `--help` shows a default for every setting that takes a value, or says what its absence
    /// means (the method's flags are `adapter_args`').
    #[test]
    fn every_setting_shows_its_default() {
        let cmd = crate::Cli::command().mut_subcommand("train", with_defaults);
        let train = cmd.find_subcommand("train").unwrap();
        let method = super::super::adapter_args::AdapterArgs::augment_args(clap::Command::new("a"));
        for arg in train.get_arguments() {
            let is_method = method.get_arguments().any(|m| m.get_id() == arg.get_id());
            if !arg.get_action().takes_values() || arg.is_hide_set() || is_method {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(
                !arg.get_default_values().is_empty()
                    || help.contains("default")
                    || arg.is_hide_default_value_set(),
                "--{} shows no default",
                arg.get_long().unwrap_or_default()
            );
        }
    }
}
