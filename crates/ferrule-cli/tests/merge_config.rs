//! `ferrule merge --config` as a user runs it: a mergekit YAML from its own folder (paths
//! relative to the working folder, as mergekit resolves them), and the errors it answers.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/merge_models")
}

fn ferrule(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args(args)
        .current_dir(fixtures())
        .output()
        .expect("run ferrule");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn merges_a_mergekit_yaml_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let (ok, stdout, stderr) = ferrule(&[
        "merge",
        "--config",
        "cases/llama_ties.yaml",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["merge_method"], "ties");
    assert_eq!(report["tensors_written"], 30);
    assert!(out.join("model.safetensors").is_file());
    assert!(out.join("tokenizer.json").is_file());
}

#[test]
fn bad_configs_and_missing_flags_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "merge_method: frankenstein\nbase_model: models/llama/base\nmodels: [{model: models/llama/ft1}]\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (ok, _, stderr) = ferrule(&[
        "merge",
        "--config",
        cfg.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("unknown method \"frankenstein\""),
        "{stderr}"
    );
    assert!(stderr.contains("bad.yaml"), "{stderr}");
    assert!(!out.exists());
    let (ok, _, stderr) = ferrule(&["merge", "--output", out.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("--model"), "{stderr}");
}
