//! Trainer failures users report (issue 25, item 7), each tried as a user runs it on the small
//! fixture model: `--max-grad-norm 0`, and a run that stops learning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

fn fx(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
        .display()
        .to_string()
}

/// Runs ferrule with `args` on one thread.
fn ferrule(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args(args)
        .args(["--threads", "1"])
        .output()
        .expect("run ferrule")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs ferrule and returns its stderr, panicking with it when the command fails.
fn ok(args: &[String]) -> String {
    let out = ferrule(args);
    let err = stderr(&out);
    assert!(out.status.success(), "ferrule {args:?} failed:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// `train` on the fixture model; a flag in `extra` replaces the default one.
fn train_args(data: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let out = out.display().to_string();
    let model = fx("models/llama");
    let defaults = [
        ("--model", model.as_str()),
        ("--data", data),
        ("--output", out.as_str()),
        ("--target-modules", "q_proj,v_proj"),
        ("--lora-r", "4"),
        // A learning rate at which the small model moves.
        ("--lr", "2e-2"),
        ("--seed", "3"),
    ];
    let mut args = vec!["train".to_string()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn adapter(dir: &Path) -> BTreeMap<String, Tensor> {
    let path = dir.join("adapter_model.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn max_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(k, x)| {
            (x - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

/// `(step, loss, grad_norm)` of each training line of `metrics.jsonl`.
fn train_lines(dir: &Path) -> Vec<(u64, f64, f64)> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| {
            let m: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((
                m["step"].as_u64()?,
                m.get("loss")?.as_f64()?,
                m["grad_norm"].as_f64()?,
            ))
        })
        .collect()
}

#[test]
fn max_grad_norm_zero_disables_clipping() {
    let t = tempfile::tempdir().unwrap();
    let data = fx("data/chat.jsonl");
    let steps = ["--max-steps", "3", "--batch-size", "4"];
    let off = t.path().join("off");
    ok(&train_args(
        &data,
        &off,
        &[&steps[..], &["--max-grad-norm", "0"]].concat(),
    ));
    // A bound far above every norm never clips: the same adapter, bit for bit.
    let huge = t.path().join("huge");
    ok(&train_args(
        &data,
        &huge,
        &[&steps[..], &["--max-grad-norm", "1e30"]].concat(),
    ));
    assert_eq!(max_diff(&adapter(&off), &adapter(&huge)), 0.0);
    assert_eq!(train_lines(&off).len(), 3);
    // A small bound does clip, so the comparison above tells clipping from none.
    let small = t.path().join("small");
    ok(&train_args(
        &data,
        &small,
        &[&steps[..], &["--max-grad-norm", "1e-3"]].concat(),
    ));
    assert!(max_diff(&adapter(&off), &adapter(&small)) > 0.0);
    // The same setting in a config file.
    let cfg = t.path().join("run.toml");
    std::fs::write(&cfg, "max_grad_norm = 0.0\n").unwrap();
    let toml = t.path().join("toml");
    ok(&train_args(
        &data,
        &toml,
        &[&steps[..], &["--config", cfg.to_str().unwrap()]].concat(),
    ));
    assert_eq!(max_diff(&adapter(&off), &adapter(&toml)), 0.0);
}

#[test]
fn a_run_that_stops_learning_is_named_with_its_likely_cause() {
    let t = tempfile::tempdir().unwrap();
    let data = fx("data/chat.jsonl");
    let out = t.path().join("run");
    let args = train_args(
        &data,
        &out,
        &["--max-steps", "12", "--batch-size", "4", "--lr", "1e30"],
    );
    let err = ok(&args);
    let lines = train_lines(&out);
    assert!(
        lines.iter().any(|l| l.2 == 0.0) || lines.windows(2).any(|w| w[0].1 == w[1].1),
        "the run was expected to stall: {lines:?}"
    );
    assert!(
        err.contains("WARN") && err.contains("learning rate") && err.contains("--lr"),
        "{err}"
    );
    // A run that learns says nothing of the kind.
    let fine = t.path().join("fine");
    let err = ok(&train_args(
        &data,
        &fine,
        &["--max-steps", "12", "--batch-size", "4"],
    ));
    assert!(!err.contains("learning rate"), "{err}");
}
