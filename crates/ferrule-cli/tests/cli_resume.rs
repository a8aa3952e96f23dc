//! `ferrule train --resume` as a user runs it: a run stopped at a checkpoint (twice) and resumed
//! with the same command ends with the adapter, config and per-step metrics of the
//! uninterrupted run, with dropout, gradient accumulation, warmup + cosine schedule and
//! periodic evaluation in play; also through an FP4-quantized base (`--quantize fp4`).

mod common;
use common::fx;

use std::path::Path;
use std::process::Command;

/// Runs ferrule with `args`; returns (stdout, stderr), panicking with stderr on failure.
fn ferrule(args: &[String]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args(args)
        .arg("--threads")
        .arg("1")
        .output()
        .expect("run ferrule");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "ferrule {args:?} failed:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    (stdout, stderr)
}

fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let base = [
        "train",
        // The FP4 run is compared with the f32 one by bytes held.
        "--compute-dtype",
        "f32",
        "--model",
        &fx("models/llama"),
        "--data",
        &fx("data/chat.jsonl"),
        "--eval-data",
        &fx("data/chat.jsonl"),
        "--output",
        &out.display().to_string(),
        "--target-modules",
        "q_proj,v_proj,down_proj",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0.1",
        "--batch-size",
        "3",
        "--grad-accum",
        "2",
        "--max-steps",
        "8",
        "--lr",
        "2e-2",
        "--warmup-steps",
        "2",
        "--schedule",
        "cosine",
        "--eval-every",
        "3",
        "--save-every",
        "2",
        "--seed",
        "9",
        "--log-every",
        "1",
        "--json",
    ]
    .map(String::from);
    base.into_iter()
        .chain(extra.iter().map(|s| s.to_string()))
        .collect()
}

/// `(step, loss, lr, grad_norm)` of a training line of metrics.jsonl.
type TrainLine = (u64, f64, f64, f64);

/// `(step, loss, lr, grad_norm)` of each training line of metrics.jsonl, and the eval losses
/// with their steps (timings left out: they differ between runs).
fn metrics(dir: &Path) -> (Vec<TrainLine>, Vec<(u64, f64)>) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = m["step"].as_u64().unwrap_or(u64::MAX);
        if let Some(loss) = m.get("loss").and_then(|v| v.as_f64()) {
            train.push((
                step,
                loss,
                m["lr"].as_f64().unwrap(),
                m["grad_norm"].as_f64().unwrap(),
            ));
        }
        if let Some(loss) = m.get("eval_loss").and_then(|v| v.as_f64()) {
            eval.push((step, loss));
        }
    }
    (train, eval)
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
}

fn stopped_and_resumed(out: &Path, extra: &[&str], stops: &[usize]) {
    for (i, &stop) in stops.iter().enumerate() {
        let mut args = train_args(out, extra);
        args.extend(["--stop-after".to_string(), stop.to_string()]);
        if i > 0 {
            args.push("--resume".into());
        }
        let (_, err) = ferrule(&args);
        assert!(
            err.contains("checkpoint saved") || err.contains("stopped after step"),
            "stop at {stop}:\n{err}"
        );
        assert!(
            !out.join("adapter_model.safetensors").exists(),
            "a run stopped at step {stop} wrote the final adapter"
        );
        assert!(
            out.join(format!("checkpoint-{stop}/trainer_state.json"))
                .exists(),
            "no checkpoint of step {stop}"
        );
    }
    let mut args = train_args(out, extra);
    args.push("--resume".into());
    let (stdout, err) = ferrule(&args);
    let last = stops.last().unwrap();
    let from = out.join(format!("checkpoint-{last}")).display().to_string();
    assert!(
        err.contains(&format!("resuming from {from}")),
        "the last run did not resume from step {last}:\n{err}"
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["steps"], 8, "{summary}");
}

#[test]
fn stopping_twice_and_resuming_ends_with_the_uninterrupted_adapter_and_metrics() {
    let t = tempfile::tempdir().unwrap();
    let (whole, split) = (t.path().join("whole"), t.path().join("split"));
    ferrule(&train_args(&whole, &[]));
    // Stopped at step 3 (between save-every checkpoints, mid-schedule), then at 5, then finished.
    stopped_and_resumed(&split, &[], &[3, 5]);

    assert!(
        read(&whole, "adapter_model.safetensors") == read(&split, "adapter_model.safetensors"),
        "the resumed adapter's bytes differ"
    );
    assert_eq!(
        read(&whole, "adapter_config.json"),
        read(&split, "adapter_config.json")
    );
    let (tw, ew) = metrics(&whole);
    let (ts, es) = metrics(&split);
    assert_eq!(
        tw.iter().map(|m| m.0).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<u64>>(),
        "one training line per step"
    );
    assert_eq!(tw, ts, "per-step loss, lr and grad norm of the resumed run differ (or steps were repeated or lost)");
    assert_eq!(
        ew.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![3, 6, 8],
        "evaluations at --eval-every 3 and the end"
    );
    assert_eq!(ew, es, "eval losses differ");
    // The schedule was in play: the learning rate rose through the warmup, then fell.
    assert!(
        tw[0].2 < tw[1].2 && tw[7].2 < tw[2].2,
        "lr {:?}",
        tw.iter().map(|m| m.2).collect::<Vec<_>>()
    );
}

#[test]
fn resume_through_an_fp4_base_ends_with_the_uninterrupted_adapter() {
    let t = tempfile::tempdir().unwrap();
    let (whole, split, dense) = (
        t.path().join("whole"),
        t.path().join("split"),
        t.path().join("dense"),
    );
    let fp4 = ["--quantize", "fp4"];
    let (stdout, _) = ferrule(&train_args(&whole, &fp4));
    let fp4_summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    stopped_and_resumed(&split, &fp4, &[4]);
    assert!(
        read(&whole, "adapter_model.safetensors") == read(&split, "adapter_model.safetensors"),
        "the resumed FP4 adapter's bytes differ"
    );
    assert_eq!(metrics(&whole), metrics(&split));

    // The FP4 run trained on another (quantized) base than the f32 one, held in fewer bytes.
    let (stdout, _) = ferrule(&train_args(&dense, &[]));
    let dense_summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let bytes = |s: &serde_json::Value| s["base_weight_bytes"].as_u64().unwrap();
    assert!(
        3 * bytes(&fp4_summary) < bytes(&dense_summary),
        "fp4 {fp4_summary}\nf32 {dense_summary}"
    );
    assert_ne!(
        metrics(&whole).0[0].1,
        metrics(&dense).0[0].1,
        "the FP4 base gave the f32 base's first loss"
    );
}
