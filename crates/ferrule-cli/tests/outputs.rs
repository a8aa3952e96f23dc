//! What `ferrule train` shows and leaves behind: the summary for people (and `--json` for
//! scripts), progress lines when stderr is not a terminal, the bar on one, TensorBoard event
//! files, and an output folder that an earlier run is not silently lost from.

mod common;
use common::fx;

use std::path::{Path, PathBuf};
use std::process::Command;

/// `ferrule train` on the tiny fixture model into `out`, with `extra` flags: (success,
/// stdout, stderr).
fn train(out: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args([
            "train",
            "--threads",
            "1",
            "--model",
            &fx("models/llama"),
            "--data",
            &fx("data/chat.jsonl"),
            "--output",
            &out.display().to_string(),
        ])
        .args(extra)
        .output()
        .expect("run ferrule");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn eval_flags() -> Vec<String> {
    vec!["--eval-data".into(), fx("data/chat.jsonl")]
}

#[test]
fn the_summary_is_a_few_lines_for_people_and_one_json_line_with_json() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run");
    let mut args = eval_flags();
    args.extend(["--max-steps", "3", "-q"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = train(&run, &args);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() <= 6, "a few lines:\n{out}");
    assert!(lines.iter().all(|l| !l.starts_with('{')), "no JSON:\n{out}");
    for needle in [
        "3 steps",
        "final loss ",
        "eval loss ",
        "perplexity ",
        " tokens/s",
        "peak memory ",
        &format!("adapter saved to {}", run.display()),
    ] {
        assert!(out.contains(needle), "{needle:?} missing:\n{out}");
    }

    let scripted = t.path().join("scripted");
    let (ok, out, err) = train(&scripted, &["--max-steps", "2", "-q", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(scripted.join("train_summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["steps"], 2);
    assert_eq!(summary["steps"], file["steps"]);
}

/// With stderr not a terminal: a line for the first step (not only at --log-every), and each
/// evaluation announced and its loss shown.
#[test]
fn plain_progress_shows_the_first_step_and_every_evaluation() {
    let t = tempfile::tempdir().unwrap();
    let mut args = eval_flags();
    args.extend(["--max-steps", "4", "--eval-every", "2", "--log-every", "10"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = train(&t.path().join("run"), &args);
    assert!(ok, "{err}");
    assert!(err.contains("step 1/4  loss "), "first step:\n{err}");
    assert!(!err.contains("step 2/4  loss "), "then every 10:\n{err}");
    assert_eq!(err.matches("evaluating 24 records").count(), 2, "{err}");
    assert!(
        err.contains("step 2: eval loss ") && err.contains("step 4: eval loss "),
        "{err}"
    );
}

#[test]
fn an_earlier_run_is_kept_unless_overwrite_is_given() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run");
    let (ok, _, err) = train(&run, &["--max-steps", "2", "-q"]);
    assert!(ok, "{err}");
    let adapter = std::fs::read(run.join("adapter_model.safetensors")).unwrap();

    // A finished run without checkpoints.
    let (ok, _, err) = train(&run, &["--max-steps", "3", "--seed", "7", "-q"]);
    assert!(!ok, "a finished run was overwritten");
    assert!(
        err.contains("holds an earlier run (adapter_config.json, adapter_model.safetensors")
            && err.contains("--overwrite")
            && !err.contains("--resume"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(run.join("adapter_model.safetensors")).unwrap(),
        adapter
    );
    let (ok, _, err) = train(
        &run,
        &["--max-steps", "3", "--seed", "7", "-q", "--overwrite"],
    );
    assert!(ok, "{err}");
    assert_ne!(
        std::fs::read(run.join("adapter_model.safetensors")).unwrap(),
        adapter,
        "--overwrite trains anew"
    );

    // A run with checkpoints: --resume or --overwrite.
    let ckpt = t.path().join("ckpt");
    let (ok, _, err) = train(&ckpt, &["--max-steps", "2", "--save-every", "1", "-q"]);
    assert!(ok, "{err}");
    let (ok, _, err) = train(&ckpt, &["--max-steps", "2", "-q"]);
    assert!(
        !ok && err.contains("--resume to continue it, --overwrite"),
        "{err}"
    );
    let (ok, _, err) = train(
        &ckpt,
        &["--max-steps", "2", "-q", "--overwrite", "--resume"],
    );
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let (ok, _, err) = train(&ckpt, &["--max-steps", "1", "-q", "--overwrite"]);
    assert!(ok, "{err}");
    assert!(
        !ckpt.join("checkpoint-1").exists() && !ckpt.join("checkpoint-2").exists(),
        "the earlier run's checkpoints are gone"
    );
    let metrics = std::fs::read_to_string(ckpt.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "{metrics}");
}

/// `--report-to tensorboard`: one event file in runs/, every step's and evaluation's scalars
/// equal to metrics.jsonl's (as f32), each record's CRCs checked
/// (scripts/check-interop.sh reads them with the tensorboard package too).
#[test]
fn tensorboard_events_hold_the_metrics() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run");
    let mut args = eval_flags();
    args.extend(
        [
            "--max-steps",
            "4",
            "--eval-every",
            "2",
            "-q",
            "--report-to",
            "tensorboard",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = train(&run, &args);
    assert!(ok, "{err}");
    assert!(out.contains("TensorBoard events in"), "{out}");
    let files: Vec<PathBuf> = std::fs::read_dir(run.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let scalars = ferrule::train::tensorboard::read_scalars(&files[0]).unwrap();
    let of = |tag: &str| -> Vec<(i64, f32)> {
        scalars
            .iter()
            .filter(|s| s.1 == tag)
            .map(|s| (s.0, s.2))
            .collect()
    };
    let (mut loss, mut lr, mut eval) = (Vec::new(), Vec::new(), Vec::new());
    for line in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = m["step"].as_i64().unwrap();
        match m.get("eval_loss") {
            Some(e) => eval.push((step, e.as_f64().unwrap() as f32)),
            None => {
                loss.push((step, m["loss"].as_f64().unwrap() as f32));
                lr.push((step, m["lr"].as_f64().unwrap() as f32));
            }
        }
    }
    assert_eq!(loss.len(), 4);
    assert_eq!(of("train/loss"), loss);
    assert_eq!(of("train/learning_rate"), lr);
    assert_eq!(of("eval/loss"), eval);
    assert_eq!(eval.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 4]);
    for tag in [
        "train/grad_norm",
        "train/tokens_per_second",
        "train/epoch",
        "eval/perplexity",
    ] {
        assert!(!of(tag).is_empty(), "{tag} missing");
    }

    let plain = t.path().join("plain");
    let (ok, _, err) = train(&plain, &["--max-steps", "1", "-q"]);
    assert!(ok, "{err}");
    assert!(!plain.join("runs").exists(), "no events unless asked");
}

/// On a terminal (a pseudo-terminal from util-linux `script`): a run stopped early leaves its
/// bar at the step it reached (not drawn full), and the summary starts on a line of its own.
#[test]
fn the_bar_stays_where_the_run_stopped_and_the_summary_starts_a_line() {
    let script = Path::new("/usr/bin/script");
    if !script.exists() {
        let required = ["CI", "FERRULE_REQUIRE_ASSETS"]
            .iter()
            .any(|v| std::env::var(v).is_ok_and(|x| !x.is_empty() && x != "0"));
        assert!(
            !required,
            "util-linux `script` is needed for the terminal test"
        );
        eprintln!("skipped: no /usr/bin/script to give ferrule a terminal");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let command = [
        env!("CARGO_BIN_EXE_ferrule"),
        "train",
        "--threads",
        "1",
        "--model",
        &fx("models/llama"),
        "--data",
        &fx("data/chat.jsonl"),
        "--output",
        &t.path().join("run").display().to_string(),
        "--max-steps",
        "4",
        "--stop-after",
        "2",
    ]
    .map(quote)
    .join(" ");
    let log = t.path().join("pty.log");
    let status = Command::new(script)
        .args(["-qec", &command, &log.display().to_string()])
        .env("TERM", "xterm")
        .env("COLUMNS", "120")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("2/4 steps"), "no bar drawn:\n{text}");
    assert!(
        !text.contains("4/4 steps"),
        "the bar was drawn full:\n{text}"
    );
    assert!(
        text.contains("\n2 steps, stopped early"),
        "the summary does not start a line:\n{text}"
    );
}
