//! `ferrule merge` with several adapters: combined as peft's `add_weighted_adapter`, written as
//! an adapter or merged into the base; a folder of several adapters without a choice, and each
//! bad input, a named error that writes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}
fn fx(rel: &str) -> String {
    root()
        .join("tests/fixtures")
        .join(rel)
        .display()
        .to_string()
}
fn input(name: &str) -> String {
    fx(&format!("merge_adapters/in/{name}"))
}

fn ferrule(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args(args)
        .arg("--threads")
        .arg("1")
        .output()
        .expect("run ferrule");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn merge(extra: &[&str]) -> (bool, String) {
    let llama = fx("models/llama");
    let mut args = vec!["merge", "--model", llama.as_str()];
    args.extend_from_slice(extra);
    ferrule(&args)
}

fn tensors(file: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(file, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn several_adapters_combine_into_peft_equal_adapter_and_into_the_base() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("ties");
    let (ok, err) = merge(&[
        "--adapter",
        &input("a"),
        "--adapter",
        &input("b"),
        "--combination",
        "ties",
        "--weights",
        "0.7,-0.4",
        "--density",
        "0.5",
        "--output-adapter",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("0.7×a + -0.4×b (ties)"), "{err}");
    let ours = tensors(&out.join("adapter_model.safetensors"));
    let peft =
        tensors(&root().join("tests/fixtures/merge_adapters/out/ties/adapter_model.safetensors"));
    assert_eq!(ours.len(), peft.len());
    for (k, v) in &peft {
        assert!(max_diff(&ours[k], v) < 1e-5, "{k}");
    }

    // Merged into the base: the same model as merging peft's combined adapter alone.
    let (m1, m2) = (t.path().join("m1"), t.path().join("m2"));
    let (ok, err) = merge(&[
        "--adapter",
        &input("a"),
        "--adapter",
        &input("b"),
        "--weights",
        "0.7,-0.4",
        "--output",
        m1.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("(linear)"), "linear is the default: {err}");
    let (ok, err) = merge(&[
        "--adapter",
        &fx("merge_adapters/out/linear"),
        "--output",
        m2.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (w1, w2) = (
        tensors(&m1.join("model.safetensors")),
        tensors(&m2.join("model.safetensors")),
    );
    let base = tensors(&root().join("tests/fixtures/models/llama/model.safetensors"));
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert!(
        max_diff(&w1[q], &base[q]) > 1e-3,
        "the merge changed nothing"
    );
    for (k, v) in &w2 {
        assert!(max_diff(&w1[k], v) < 1e-5, "{k}");
    }
}

#[test]
fn a_folder_of_several_adapters_needs_a_choice() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m");
    let layout = fx("multi_adapter/peft_layout");
    let (ok, err) = merge(&["--adapter", &layout, "--output", out.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("2 adapters found: default (")
            && err.contains("other (")
            && err.contains("--active-adapter NAME")
            && err.contains("--combination TYPE"),
        "{err}"
    );
    assert!(!out.exists());
    let (ok, err) = merge(&[
        "--adapter",
        &layout,
        "--active-adapter",
        "other",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn bad_inputs_are_named_errors_that_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("x");
    let o = out.to_str().unwrap();
    let (a, b, c) = (input("a"), input("b"), input("c"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--adapter", &a, "--adapter", &b, "--weights", "1,2,3"],
            "--weights gives 3 weight(s) for 2 adapter(s) (a, b)",
        ),
        (
            vec![
                "--adapter",
                &a,
                "--adapter",
                &b,
                "--combination",
                "ties",
                "--density",
                "1.5",
            ],
            "density must be in (0, 1], got 1.5",
        ),
        (
            vec!["--adapter", &a, "--adapter", &b, "--combination", "tie"],
            "valid: linear, cat, svd, ties, ties_svd",
        ),
        (
            vec!["--adapter", &a, "--adapter", &c],
            "needs adapters of one rank",
        ),
        (
            vec![
                "--adapter",
                &a,
                "--adapter",
                &c,
                "--combination",
                "svd",
                "--svd-rank",
                "40",
            ],
            "does not fit a 32×64 update",
        ),
        (
            vec!["--adapter", &a, "--adapter", &b, "--combination", "ties"],
            "needs a density",
        ),
        (
            vec![
                "--adapter",
                &a,
                "--adapter",
                &b,
                "--majority-sign-method",
                "most",
            ],
            "--majority-sign-method",
        ),
    ];
    for (args, needle) in cases {
        for flag in ["--output", "--output-adapter"] {
            let mut full = args.clone();
            full.extend_from_slice(&[flag, o]);
            let (ok, err) = merge(&full);
            assert!(!ok, "{full:?} should fail");
            assert!(err.contains(needle), "{full:?}: {err}");
            assert!(!err.contains("panicked"), "{err}");
            assert!(!out.exists(), "{full:?} wrote {o}");
            assert!(!t.path().join("x.tmp").exists());
        }
    }
}

#[test]
fn other_methods_and_mixes_merge_by_task_arithmetic_on_the_merged_weights() {
    let t = tempfile::tempdir().unwrap();
    let path = |n: &str| t.path().join(n).display().to_string();
    let (randlora, dora) = (fx("methods/llama_randlora"), fx("methods/llama_dora"));
    for (adapter, out) in [(&randlora, "r"), (&dora, "d")] {
        let (ok, err) = merge(&["--adapter", adapter, "--output", &path(out)]);
        assert!(ok, "{err}");
    }
    let (ok, err) = merge(&[
        "--adapter",
        &randlora,
        "--adapter",
        &dora,
        "--weights",
        "0.6,-0.3",
        "--output",
        &path("mix"),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("task arithmetic"), "{err}");
    let load = |n: &str| tensors(&t.path().join(n).join("model.safetensors"));
    let (r, d, mix) = (load("r"), load("d"), load("mix"));
    let base = tensors(&root().join("tests/fixtures/models/llama/model.safetensors"));
    let mut moved = 0.0f32;
    for (k, w0) in &base {
        let want: Vec<f32> = (0..w0.len())
            .map(|i| w0[i] + 0.6 * (r[k][i] - w0[i]) - 0.3 * (d[k][i] - w0[i]))
            .collect();
        assert!(max_diff(&mix[k], &want) < 1e-5, "{k}");
        moved = moved.max(max_diff(&mix[k], w0));
    }
    assert!(moved > 1e-3, "the merge changed nothing");
    // peft's options do not apply to them, and no adapter folder can hold a mix of methods.
    let (ok, err) = merge(&[
        "--adapter",
        &randlora,
        "--adapter",
        &dora,
        "--density",
        "0.5",
        "--output",
        &path("bad"),
    ]);
    assert!(!ok && err.contains("linear task arithmetic only"), "{err}");
    let (ok, err) = merge(&[
        "--adapter",
        &randlora,
        "--adapter",
        &dora,
        "--output-adapter",
        &path("bad"),
    ]);
    assert!(!ok && err.contains("different methods"), "{err}");
    assert!(!t.path().join("bad").exists());
}

#[test]
fn darex_analytic_q_runs_from_a_batch_and_only_for_the_svd_dare_types() {
    let t = tempfile::tempdir().unwrap();
    let batch = fx("inputs/decoder.safetensors");
    let (a, b) = (input("a"), input("b"));
    let args = |kind: &'static str, out: &str| -> Vec<String> {
        [
            "--adapter",
            &a,
            "--adapter",
            &b,
            "--combination",
            kind,
            "--density",
            "0.3",
            "--analytic-q",
            &batch,
            "--output-adapter",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let ok_out = t.path().join("q").display().to_string();
    let full = args("dare_ties_svd", &ok_out);
    let (ok, err) = merge(&full.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let bad_out = t.path().join("bad").display().to_string();
    let full = args("dare_linear", &bad_out);
    let (ok, err) = merge(&full.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !ok && err.contains("applies to dare_linear_svd and dare_ties_svd"),
        "{err}"
    );
    assert!(!t.path().join("bad").exists());
}

/// `dare_linear_dense`: DARE on the dense updates, q chosen on a batch (DAREx-q), merged into
/// the base; the flags that do not fit it are refused with nothing written.
#[test]
fn dense_dare_chooses_q_on_a_batch_and_refuses_what_does_not_fit() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("darex");
    let (a, b) = (
        fx("adapters/llama_lora"),
        fx("multi_adapter/peft_layout/other"),
    );
    let inputs = fx("inputs/decoder.safetensors");
    let base = [
        "--adapter",
        a.as_str(),
        "--adapter",
        b.as_str(),
        "--combination",
        "dare_linear_dense",
    ];
    let run = |extra: &[&str]| {
        let mut args = vec!["merge", "--model"];
        let llama = fx("models/llama");
        args.push(llama.as_str());
        args.extend_from_slice(&base);
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_ferrule"))
            .args(&args)
            .output()
            .expect("run ferrule")
    };
    let o = run(&[
        "--density",
        "0.2",
        "--choose-q",
        &inputs,
        "--output",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let q = report["q"].as_f64().unwrap();
    let search = &report["search"];
    assert!((0.2..=1.0).contains(&q), "{report}");
    assert!(search["change"].as_f64().unwrap() <= search["dare_change"].as_f64().unwrap());
    assert!(out.join("model.safetensors").is_file());

    for (extra, says) in [
        (
            vec!["--choose-q", inputs.as_str(), "--output", "x"],
            "needs --density",
        ),
        (
            vec!["--density", "0.2", "--output-adapter", "x"],
            "give --output",
        ),
        (
            vec!["--density", "0.2", "--svd-rank", "2", "--output", "x"],
            "do not apply",
        ),
    ] {
        let dir = t.path().join("refused");
        let mut extra: Vec<&str> = extra;
        let target = dir.to_str().unwrap();
        for e in extra.iter_mut() {
            if *e == "x" {
                *e = target;
            }
        }
        let o = run(&extra);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.contains(says),
            "{extra:?}: {stderr}"
        );
        assert!(!dir.exists(), "{extra:?} wrote {}", dir.display());
    }
    let (ok, err) = merge(&[
        "--adapter",
        &a,
        "--adapter",
        &b,
        "--combination",
        "dare_linear",
        "--density",
        "0.5",
        "--choose-q",
        &inputs,
        "--output-adapter",
        t.path().join("y").to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("--choose-q applies to --combination dare_linear_dense"),
        "{err}"
    );
}
