//! The comparison's table: one row per run, read from each run's `train_summary.json`, the best
//! learning rate of each method marked; written as `compare.md` (for people) and
//! `compare.json` (for scripts) beside `compare.svg` ([`super::plot`]).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::{CompareSpec, PlannedRun};

/// File names of the report in the comparison's folder.
pub const TABLE_FILE: &str = "compare.md";
pub const JSON_FILE: &str = "compare.json";

/// How a run ended, as the caller that ran it saw it.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// It finished (now or in an earlier invocation): its summary is in its folder.
    Finished,
    /// It failed; the message is its error.
    Failed(String),
    /// It was stopped with a checkpoint, or not started yet: a rerun continues it.
    Pending,
}

/// One run's figures. Figures the run did not produce are `None` (`-` in the table).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub label: String,
    /// The `--methods` entry.
    pub method: String,
    pub peft_type: String,
    pub lr: f64,
    /// `ok`, `failed` or `pending`.
    pub status: &'static str,
    pub error: Option<String>,
    /// The method's best learning rate in a sweep (the only run otherwise, when it finished).
    pub best: bool,
    pub trainable_params: Option<u64>,
    pub steps: Option<u64>,
    pub median_step_seconds: Option<f64>,
    /// Real (non-padding) tokens per second over the run.
    pub tokens_per_sec: Option<f64>,
    /// The run's process's peak resident memory.
    pub peak_rss_bytes: Option<f64>,
    pub final_train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    /// Classification runs.
    pub eval_accuracy: Option<f64>,
    pub output_dir: String,
    /// The run's adapter settings (PEFT keys), so that the table says what was compared.
    pub adapter: Value,
}

/// The row of `run` after `outcome`. A finished run whose `train_summary.json` cannot be read
/// is an error naming the file.
pub fn row(run: &PlannedRun, spec: &CompareSpec, outcome: &Outcome) -> Result<Row> {
    let c = &spec.candidates[run.candidate];
    let mut row = Row {
        label: run.label.clone(),
        method: c.label.clone(),
        peft_type: c.adapter.peft_type.clone(),
        lr: run.lr,
        status: "pending",
        error: None,
        best: false,
        trainable_params: None,
        steps: None,
        median_step_seconds: None,
        tokens_per_sec: None,
        peak_rss_bytes: None,
        final_train_loss: None,
        eval_loss: None,
        eval_accuracy: None,
        output_dir: run.config.output_dir.display().to_string(),
        adapter: serde_json::to_value(&c.adapter)?,
    };
    match outcome {
        Outcome::Pending => {}
        Outcome::Failed(e) => (row.status, row.error) = ("failed", Some(e.clone())),
        Outcome::Finished => {
            row.status = "ok";
            fill_from_summary(&mut row, &run.config.output_dir)?;
        }
    }
    Ok(row)
}

fn fill_from_summary(row: &mut Row, dir: &Path) -> Result<()> {
    let path = dir.join("train_summary.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let s: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a run summary", path.display()))?;
    let num = |v: &Value| v.as_f64();
    row.trainable_params = s["trainable_params"].as_u64();
    row.steps = s["steps"].as_u64();
    row.median_step_seconds = num(&s["median_step_seconds"]);
    row.tokens_per_sec = num(&s["tokens_per_sec"]);
    row.peak_rss_bytes = s["peak_rss_bytes_per_rank"]
        .as_array()
        .and_then(|a| a.iter().filter_map(Value::as_f64).reduce(f64::max))
        .filter(|&b| b > 0.0);
    row.final_train_loss = num(&s["final_loss"]);
    row.eval_loss = num(&s["eval"]["eval_loss"]);
    row.eval_accuracy = num(&s["eval"]["eval_accuracy"]);
    Ok(())
}

/// Marks each method's best finished run: the lowest eval loss, or, without evaluation data,
/// the lowest final train loss (one step's loss: noisier, which the table's note says).
pub fn mark_best(rows: &mut [Row]) {
    let score = |r: &Row| r.eval_loss.or(r.final_train_loss).filter(|l| l.is_finite());
    let methods: Vec<String> = rows.iter().map(|r| r.method.clone()).collect();
    for method in methods {
        let best = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.method == method && r.status == "ok")
            .filter_map(|(i, r)| score(r).map(|s| (i, s)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i);
        for (i, r) in rows.iter_mut().enumerate() {
            if r.method == method {
                r.best = Some(i) == best;
            }
        }
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

/// The table as markdown: one line per run (in a sweep, the best run of each method first in
/// bold, its other rates after), then the failed runs' errors.
pub fn markdown(rows: &[Row], spec: &CompareSpec) -> String {
    let mut md = format!(
        "Budget: {} per run{}.\n\n| method | lr | trainable params | step time (s) | tokens/s | peak RSS (MB) | train loss | eval loss | eval accuracy | status |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
        spec.budget,
        match spec.lr_grid {
            Some(_) => "; each method at the learning rates of the sweep, its best in bold (lowest eval loss, else lowest final train loss)",
            None => "",
        }
    );
    for r in rows {
        let name = match (spec.lr_grid.is_some(), r.best) {
            (true, true) => format!("**{}**", r.method),
            _ => r.method.clone(),
        };
        md += &format!(
            "| {name} | {:e} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.lr,
            r.trainable_params.map_or("-".into(), |p| p.to_string()),
            opt(r.median_step_seconds, |s| format!("{s:.3}")),
            opt(r.tokens_per_sec, |t| format!("{t:.0}")),
            opt(r.peak_rss_bytes, |b| format!("{:.0}", b / 1e6)),
            opt(r.final_train_loss, |l| format!("{l:.4}")),
            opt(r.eval_loss, |l| format!("{l:.4}")),
            opt(r.eval_accuracy, |a| format!("{:.2}%", 100.0 * a)),
            r.status,
        );
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| r.error.is_some()).collect();
    if !failed.is_empty() {
        md += "\nFailed runs:\n\n";
        for r in failed {
            md += &format!(
                "- {}: {}\n",
                r.label,
                r.error.as_deref().unwrap_or_default()
            );
        }
        md += "\nA method's own keys are set with --method-option NAME:KEY=VALUE (e.g. prompt-tuning:num_virtual_tokens=20), not with train's flags.\n";
    }
    md
}

/// Writes `compare.md` and `compare.json` into `out`, each atomically.
pub fn write(out: &Path, rows: &[Row], spec: &CompareSpec) -> Result<()> {
    let json = serde_json::json!({"budget": spec.budget, "lr_grid": spec.lr_grid, "runs": rows});
    crate::util::atomic::write_bytes_atomic(
        &out.join(JSON_FILE),
        (serde_json::to_string_pretty(&json)? + "\n").as_bytes(),
    )?;
    let path = out.join(TABLE_FILE);
    crate::util::atomic::write_bytes_atomic(&path, markdown(rows, spec).as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::Budget;

    fn row(
        method: &str,
        lr: f64,
        status: &'static str,
        eval: Option<f64>,
        train: Option<f64>,
    ) -> Row {
        Row {
            label: format!("{method} lr={lr:e}"),
            method: method.into(),
            peft_type: "LORA".into(),
            lr,
            status,
            error: (status == "failed").then(|| "error: boom".to_string()),
            best: false,
            trainable_params: Some(10),
            steps: Some(3),
            median_step_seconds: Some(0.5),
            tokens_per_sec: Some(100.0),
            peak_rss_bytes: Some(2e8),
            final_train_loss: train,
            eval_loss: eval,
            eval_accuracy: None,
            output_dir: String::new(),
            adapter: Value::Null,
        }
    }

    #[test]
    fn the_best_rate_is_the_lowest_eval_loss_else_train_loss() {
        let mut rows = vec![
            row("lora", 1e-4, "ok", Some(2.0), Some(1.0)),
            row("lora", 1e-3, "ok", Some(1.5), Some(3.0)),
            row("lora", 1e-2, "failed", None, None),
            row("ia3", 1e-4, "ok", None, Some(4.0)),
            row("ia3", 1e-3, "ok", None, Some(f64::NAN)),
            row("ia3", 1e-2, "ok", None, Some(3.5)),
        ];
        mark_best(&mut rows);
        let best: Vec<bool> = rows.iter().map(|r| r.best).collect();
        assert_eq!(best, [false, true, false, false, false, true]);
        let spec = CompareSpec::new(
            "lora,ia3",
            &[],
            Budget::Steps(3),
            Some(vec![1e-4, 1e-3, 1e-2]),
        )
        .unwrap();
        let md = markdown(&rows, &spec);
        assert!(
            md.contains("| **lora** | 1e-3 | 10 | 0.500 | 100 | 200 | 3.0000 | 1.5000 | - | ok |"),
            "{md}"
        );
        assert!(md.contains("- lora lr=1e-2: error: boom"), "{md}");
    }
}
