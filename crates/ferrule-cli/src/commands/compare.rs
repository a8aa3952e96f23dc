//! `ferrule compare`: plans the runs in the library (`ferrule::compare`), runs each as its own
//! `ferrule train` process (so that its peak memory is its own and a failing method leaves the
//! others running), then writes the library's table and plot.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use ferrule::compare::report::{self, Outcome};
use ferrule::compare::{self, Budget, CompareSpec, PlannedRun, RunState};
use ferrule::train::config::heading;
use ferrule::train::TrainConfig;

#[derive(clap::Args)]
pub struct Args {
    /// TOML file with the settings every run shares, as `ferrule train --config` reads it,
    /// without an [adapter] table (the methods come from --methods). Flags override it.
    #[arg(long, value_name = "FILE", help_heading = heading::RUN)]
    config: Option<PathBuf>,
    /// The methods, comma-separated: method names as `train --method` takes them, and the
    /// variants dora, rslora and pissa (LoRA with use_dora, use_rslora, init_lora_weights=pissa).
    /// Each trains with its defaults; set its keys with --method-option.
    #[arg(long, value_name = "M1,M2,...", help_heading = heading::RUN)]
    methods: String,
    /// A PEFT key of one method of the comparison, NAME:KEY=VALUE with VALUE as JSON (e.g.
    /// prompt-tuning:num_virtual_tokens=20); repeatable.
    #[arg(long = "method-option", value_name = "NAME:KEY=VALUE", help_heading = heading::RUN)]
    method_option: Vec<String>,
    /// What every method gets the same of: steps=N (optimizer steps), tokens=T (data tokens,
    /// padding excluded) or seconds=S (training time; the schedule spans the epochs' steps).
    #[arg(long, value_name = "KIND=N", value_parser = parse_budget, help_heading = heading::RUN)]
    budget: Budget,
    /// Train each method at each of these learning rates (comma-separated) and report its best
    /// by eval loss (else final train loss); without a list, 1e-4,3e-4,1e-3,3e-3,1e-2.
    #[arg(long, value_name = "LR,...", num_args = 0..=1,
          default_missing_value = compare::DEFAULT_LR_GRID, help_heading = heading::OPTIM)]
    lr_sweep: Option<String>,
    /// Start every run of the comparison again (their folders' runs are replaced); without it
    /// a rerun continues the comparison: finished runs are kept, stopped ones resumed.
    #[arg(long, help_heading = heading::OUTPUT)]
    overwrite: bool,
    /// The settings every run shares, declared once in the library (`TrainConfig`); --output is
    /// the comparison's folder, each run in a subfolder named after its method.
    #[command(flatten)]
    settings: TrainConfig,
    /// The settings given as flags on the command line.
    #[arg(skip)]
    pub given: Vec<String>,
}

fn parse_budget(s: &str) -> Result<Budget> {
    s.parse()
}

fn parse_grid(grid: &str) -> Result<Vec<f64>> {
    grid.split(',')
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .with_context(|| format!("--lr-sweep: {v:?} is not a learning rate"))
        })
        .collect()
}

pub fn run(a: Args, threads: Option<usize>) -> Result<()> {
    let base = super::train::settings_from(a.config.as_deref(), &a.settings, &a.given)?;
    let grid = a.lr_sweep.as_deref().map(parse_grid).transpose()?;
    let spec = CompareSpec::new(&a.methods, &a.method_option, a.budget, grid)?;
    let runs = compare::plan_runs(&base, &spec)?;
    // A mistyped setting fails before any run starts.
    for r in &runs {
        r.config.validate()?;
    }
    let out = base.output_dir.clone();
    compare::claim_folder(&out, &spec, &base, a.overwrite)?;
    let stop = stop_on_signal()?;
    let mut outcomes = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let outcome = match stop.load(Ordering::SeqCst) {
            true => Outcome::Pending,
            false => {
                eprintln!("[{}/{}] {}", i + 1, runs.len(), r.label);
                run_one(r, &out, a.overwrite, threads)?
            }
        };
        outcomes.push(outcome);
    }
    let mut rows = runs
        .iter()
        .zip(&outcomes)
        .map(|(r, o)| report::row(r, &spec, o))
        .collect::<Result<Vec<_>>>()?;
    report::mark_best(&mut rows);
    report::write(&out, &rows, &spec)?;
    if let Err(e) = compare::plot::write(&out, &rows) {
        eprintln!("warning: {} not written: {e:#}", compare::plot::PLOT_FILE);
    }
    print!("{}", report::markdown(&rows, &spec));
    println!(
        "\n{} and {} in {}",
        report::TABLE_FILE,
        compare::plot::PLOT_FILE,
        out.display()
    );
    if outcomes.iter().any(|o| matches!(o, Outcome::Pending)) {
        eprintln!("stopped before every run finished; run the same command again to continue");
        std::process::exit(130);
    }
    Ok(())
}

/// Runs (or resumes, or reads) one run. Its stderr goes to its log and, prefixed with its
/// label, to ours; a failure is the run's outcome, not an error of the comparison.
fn run_one(r: &PlannedRun, out: &Path, overwrite: bool, threads: Option<usize>) -> Result<Outcome> {
    let state = r.state();
    let changed = state != RunState::Fresh && r.config_changed(out)?;
    if changed {
        eprintln!("  its settings changed since the last invocation: starting it again");
    }
    let overwrite = overwrite || changed;
    if state == RunState::Done && !overwrite {
        eprintln!("  finished earlier: {}", r.config.output_dir.display());
        return Ok(Outcome::Finished);
    }
    let config = r.write_config(out)?;
    let exe = std::env::current_exe().context("finding the ferrule executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("train").arg("--config").arg(&config).arg("--json");
    match (overwrite, state) {
        (_, RunState::Fresh) => {}
        (false, RunState::Resumable) => drop(cmd.arg("--resume")),
        _ => drop(cmd.arg("--overwrite")),
    }
    if let Some(n) = threads {
        cmd.arg("--threads").arg(n.to_string());
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ferrule train")?;
    let last_error = forward_log(child.stderr.take().expect("piped"), r, out)?;
    let status = child.wait().context("waiting for ferrule train")?;
    Ok(match status.code() {
        Some(0) if r.state() == RunState::Done => Outcome::Finished,
        Some(0) | Some(130) | None => Outcome::Pending,
        Some(code) => Outcome::Failed(
            last_error.unwrap_or_else(|| format!("ferrule train exited with status {code}")),
        ),
    })
}

/// Copies a run's stderr to its log file and to ours (each line prefixed), and returns its
/// last `error:` line.
fn forward_log(
    stderr: std::process::ChildStderr,
    r: &PlannedRun,
    out: &Path,
) -> Result<Option<String>> {
    let path = r.log_path(out);
    std::fs::create_dir_all(path.parent().expect("logs folder"))?;
    let mut log =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut last_error = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading ferrule train's output")?;
        writeln!(log, "{line}").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("  {line}");
        if let Some(e) = line.strip_prefix("error: ") {
            last_error = Some(e.to_string());
        }
    }
    Ok(last_error)
}

/// Ctrl-C reaches the runs too (one process group): each saves a checkpoint and stops; the
/// comparison then starts no other run and writes what it has.
fn stop_on_signal() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    ctrlc::set_handler(move || seen.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    Ok(flag)
}
