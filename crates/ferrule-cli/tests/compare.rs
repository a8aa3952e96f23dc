//! `ferrule compare` as a user runs it on the tiny fixtures: every method reported (a failing
//! one with its error, the others going on), every run on the same micro-batches, a rerun
//! that continues (finished runs kept, a stopped one resumed), a learning-rate sweep that
//! marks each method's best, and mistakes named before anything runs.

mod common;
use common::{ferrule, fx};

use std::path::Path;

use serde_json::Value;

fn compare_args<'a>(
    out: &'a str,
    model: &'a str,
    data: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "compare",
        "--model",
        model,
        "--data",
        data,
        "--eval-data",
        data,
    ];
    a.extend(["--output", out, "--batch-size", "4"]);
    a.extend(extra);
    a
}

fn runs(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out.join("compare.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["runs"].as_array().unwrap().clone()
}

/// `(step, tokens)` of each training line of a run's metrics.jsonl.
fn step_tokens(dir: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|m| m.get("loss").is_some())
        .map(|m| (m["step"].as_u64().unwrap(), m["tokens"].as_u64().unwrap()))
        .collect()
}

#[test]
fn every_method_is_reported_and_a_rerun_continues_the_comparison() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let (model, data) = (fx("models/llama"), fx("data/chat.jsonl"));
    let o = out.display().to_string();
    let methods = [
        "--methods",
        "lora,dora,ia3,prompt-tuning,bitfit",
        "--method-option",
        "prompt-tuning:num_virtual_tokens=4",
        "--budget",
        "steps=3",
    ];
    let (ok, _, stderr) = ferrule(&compare_args(&o, &model, &data, &methods));
    assert!(ok, "{stderr}");
    let first = runs(&out);
    let status: Vec<(&str, &str)> = first
        .iter()
        .map(|r| (r["method"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        status,
        [
            ("lora", "ok"),
            ("dora", "ok"),
            ("ia3", "ok"),
            ("prompt-tuning", "ok"),
            ("bitfit", "failed")
        ]
    );
    // The failure is BitFit's own error (a Llama has no biases), and the others went on.
    assert!(
        first[4]["error"]
            .as_str()
            .unwrap()
            .contains("no bias terms"),
        "{:?}",
        first[4]
    );
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(
        md.contains("- bitfit: ") && md.contains("| dora | 2e-4 | "),
        "{md}"
    );
    assert!(
        md.contains("are set with --method-option NAME:KEY=VALUE"),
        "{md}"
    );
    // Figures from each run's summary, and the same micro-batches for every method.
    let tokens = step_tokens(&out.join("lora"));
    assert_eq!(tokens.len(), 3);
    for r in &first[..4] {
        assert_eq!(r["steps"], 3, "{r}");
        assert!(r["trainable_params"].as_u64().unwrap() > 0);
        assert!(r["peak_rss_bytes"].as_f64().unwrap() > 1e6);
        assert!(r["eval_loss"].as_f64().unwrap().is_finite());
        let dir = Path::new(r["output_dir"].as_str().unwrap());
        assert_eq!(step_tokens(dir), tokens, "{}", r["method"]);
        assert!(dir.join("adapter_model.safetensors").is_file());
    }
    assert_eq!(first[1]["adapter"]["use_dora"], true);
    // The plot draws the four finished methods' curves.
    // The plot: a coloured curve and legend mark per finished method, and a point each.
    let svg = std::fs::read_to_string(out.join("compare.svg")).unwrap();
    let coloured = svg
        .split("<polyline")
        .skip(1)
        .filter(|p| !p[..p.find('>').unwrap()].contains("#000000"))
        .count();
    assert_eq!((coloured, svg.matches("<circle").count()), (8, 4), "{svg}");

    // A rerun: finished runs are read, not trained again; a run stopped at a checkpoint resumes.
    let dora = out.join("dora");
    std::fs::remove_dir_all(&dora).unwrap();
    let config = out.join("configs/dora.toml").display().to_string();
    let (ok, _, stderr) = ferrule(&["train", "--config", &config, "--stop-after", "1", "-q"]);
    assert!(ok && stderr.contains("stopped after step 1"), "{stderr}");
    let (ok, _, stderr) = ferrule(&compare_args(&o, &model, &data, &methods));
    assert!(ok, "{stderr}");
    assert_eq!(stderr.matches("finished earlier").count(), 3, "{stderr}");
    assert!(stderr.contains("resuming from"), "{stderr}");
    let again = runs(&out);
    assert_eq!(again[0]["final_train_loss"], first[0]["final_train_loss"]);
    assert_eq!(again[1]["status"], "ok");
    assert_eq!(step_tokens(&dora), tokens);
    assert_eq!(
        again[1]["final_train_loss"], first[1]["final_train_loss"],
        "resumed equals uninterrupted"
    );

    // A method added and another's keys changed: only those two runs train; the rest is kept.
    let changed = [
        "--methods",
        "lora,dora,ia3,prompt-tuning,bitfit,ln-tuning",
        "--method-option",
        "prompt-tuning:num_virtual_tokens=3",
        "--budget",
        "steps=3",
    ];
    let (ok, _, stderr) = ferrule(&compare_args(&o, &model, &data, &changed));
    assert!(ok, "{stderr}");
    assert_eq!(stderr.matches("finished earlier").count(), 3, "{stderr}");
    assert_eq!(stderr.matches("settings changed").count(), 1, "{stderr}");
    let third = runs(&out);
    assert_eq!((third.len(), third[5]["status"].as_str()), (6, Some("ok")));
    assert_eq!(third[3]["adapter"]["num_virtual_tokens"], 3);
    assert_eq!(third[0]["final_train_loss"], first[0]["final_train_loss"]);

    // Another budget in the same folder is refused.
    let other = ["--methods", "lora", "--budget", "steps=4"];
    let (ok, _, stderr) = ferrule(&compare_args(&o, &model, &data, &other));
    assert!(
        !ok && stderr.contains("holds a comparison with another budget"),
        "{stderr}"
    );
}

#[test]
fn a_sweep_marks_each_methods_best_learning_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let (model, data) = (fx("models/llama"), fx("data/chat.jsonl"));
    let o = out.display().to_string();
    let extra = [
        "--methods",
        "lora,ia3",
        "--budget",
        "tokens=400",
        "--lr-sweep",
        "1e-3,3e-2",
    ];
    let (ok, _, stderr) = ferrule(&compare_args(&o, &model, &data, &extra));
    assert!(ok, "{stderr}");
    let rows = runs(&out);
    assert_eq!(rows.len(), 4);
    for method in ["lora", "ia3"] {
        let mine: Vec<&Value> = rows.iter().filter(|r| r["method"] == method).collect();
        let losses: Vec<f64> = mine
            .iter()
            .map(|r| r["eval_loss"].as_f64().unwrap())
            .collect();
        let best: Vec<bool> = mine.iter().map(|r| r["best"].as_bool().unwrap()).collect();
        let lowest = losses.iter().cloned().fold(f64::INFINITY, f64::min);
        assert_eq!(
            best,
            losses.iter().map(|&l| l == lowest).collect::<Vec<_>>(),
            "{method}"
        );
    }
    assert!(out.join("lora/lr-3e-2/adapter_model.safetensors").is_file());
    // The token budget: the steps whose micro-batches first reach 400 tokens.
    let tokens: Vec<u64> = step_tokens(&out.join("ia3/lr-1e-3"))
        .iter()
        .map(|t| t.1)
        .collect();
    let before: u64 = tokens[..tokens.len() - 1].iter().sum();
    assert!(
        before < 400 && before + tokens[tokens.len() - 1] >= 400,
        "{tokens:?}"
    );
}

#[test]
fn mistakes_are_named_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (fx("models/llama"), fx("data/chat.jsonl"));
    let adapter_config = tmp.path().join("with-adapter.toml");
    std::fs::write(&adapter_config, "[adapter]\npeft_type = \"IA3\"\n").unwrap();
    let ac = adapter_config.display().to_string();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--methods", "lora,lorra", "--budget", "steps=2"],
            "unknown method \"lorra\"",
        ),
        (
            &["--methods", "lora", "--budget", "minutes=2"],
            "unknown kind \"minutes\"",
        ),
        (
            &[
                "--methods",
                "lora",
                "--budget",
                "steps=2",
                "--max-steps",
                "5",
            ],
            "max_steps",
        ),
        (
            &[
                "--methods",
                "lora",
                "--budget",
                "steps=2",
                "--lr-sweep",
                "1e-3,fast",
            ],
            "\"fast\" is not a learning rate",
        ),
        (
            &["--methods", "lora", "--budget", "steps=2", "--config", &ac],
            "[adapter]",
        ),
    ];
    for (i, (extra, expected)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("bad{i}"));
        let o = out.display().to_string();
        let (ok, _, stderr) = ferrule(&compare_args(&o, &model, &data, extra));
        assert!(!ok, "{extra:?} was accepted");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} created the folder");
    }
}
