//! A run's length as a budget: `--max-tokens` plans the steps whose batches first reach the
//! tokens (checked against the tokens each step logged), and `--max-seconds` ends the run after
//! the step that spends the time, evaluated and saved as a finished run.

mod common;
use common::fx;

use std::path::Path;
use std::process::Command;

/// `ferrule train` on the tiny Llama with `extra`; returns (success, stdout, stderr).
fn train(out: &Path, extra: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args(["train", "--model", &fx("models/llama"), "--data"])
        .arg(fx("data/chat.jsonl"))
        .args(["--eval-data", &fx("data/chat.jsonl"), "--output"])
        .arg(out)
        .args(["--batch-size", "3", "--json", "-q", "--threads", "1"])
        .args(extra)
        .output()
        .expect("run ferrule");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    (o.status.success(), stdout, stderr)
}

fn summary(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The `tokens` of each training line of metrics.jsonl.
fn step_tokens(dir: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m.get("loss").is_some())
        .map(|m| m["tokens"].as_u64().unwrap())
        .collect()
}

#[test]
fn max_tokens_runs_the_steps_that_first_reach_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    for budget in [1u64, 700, 2500] {
        let out = tmp.path().join(format!("t{budget}"));
        let (ok, stdout, stderr) = train(&out, &["--max-tokens", &budget.to_string()]);
        assert!(ok, "{stderr}");
        let tokens = step_tokens(&out);
        let (last, before) = tokens.split_last().unwrap();
        let before: u64 = before.iter().sum();
        assert!(
            before < budget && before + last >= budget,
            "budget {budget}: steps' tokens {tokens:?}"
        );
        let s = summary(&stdout);
        assert_eq!(s["steps"].as_u64().unwrap() as usize, tokens.len());
        assert_eq!(s["completed"], true);
        assert!(out.join("adapter_model.safetensors").is_file());
    }
    // 2500 tokens are more than one pass over the 24 records: the run goes on into epoch two.
    let tokens = step_tokens(&tmp.path().join("t2500"));
    assert!(tokens.len() > 8, "{tokens:?}");
}

#[test]
fn max_seconds_ends_the_run_as_its_last_step_would() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // Any step takes longer than a nanosecond: the run ends after its first.
    let (ok, stdout, stderr) = train(&out, &["--max-steps", "6", "--max-seconds", "1e-9"]);
    assert!(ok, "{stderr}");
    let s = summary(&stdout);
    assert_eq!(s["steps"], 1);
    assert_eq!(s["completed"], true);
    assert_eq!(s["time_limit_reached"], true);
    assert_eq!(s["eval"]["step"], 1, "the end of the run is evaluated");
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(out.join("train_summary.json").is_file());
    // No limit reached: the flag stays false.
    let out = tmp.path().join("long");
    let (ok, stdout, stderr) = train(&out, &["--max-steps", "2", "--max-seconds", "1e6"]);
    assert!(ok, "{stderr}");
    let s = summary(&stdout);
    assert_eq!(
        (s["steps"].as_u64(), s["time_limit_reached"].as_bool()),
        (Some(2), Some(false))
    );
}

#[test]
fn budgets_that_cannot_work_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--max-tokens", "0"], "max_tokens = 0"),
        (
            &["--max-seconds=-1"],
            "max_seconds (--max-seconds) must be a positive",
        ),
        (&["--max-tokens", "5", "--max-steps", "3"], "--max-steps"),
    ];
    for (i, (flags, expected)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("bad{i}"));
        let (ok, _, stderr) = train(&out, flags);
        assert!(!ok, "{flags:?} was accepted");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        assert!(!out.exists(), "{flags:?} created the output folder");
    }
}

#[test]
fn max_seconds_counts_the_invocations_before_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (ok, _, stderr) = train(&out, &["--max-steps", "4", "--stop-after", "1"]);
    assert!(ok, "{stderr}");
    let state = std::fs::read_to_string(out.join("checkpoint-1/trainer_state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let before = state["extra"]["train_seconds"].as_f64().unwrap();
    assert!(before > 0.0, "{state}");
    // A limit below the seconds already spent ends the resumed run after its first step.
    let limit = format!("{}", before / 2.0);
    let (ok, stdout, stderr) = train(
        &out,
        &["--max-steps", "4", "--max-seconds", &limit, "--resume"],
    );
    assert!(ok, "{stderr}");
    let s = summary(&stdout);
    assert_eq!(
        (s["steps"].as_u64(), s["time_limit_reached"].as_bool()),
        (Some(2), Some(true))
    );
}
