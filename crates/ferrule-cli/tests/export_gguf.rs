//! `ferrule export gguf` as a user runs it: a model (with an adapter merged in), an adapter
//! alone, and the bad inputs, each a clear error that writes nothing.

mod common;
use common::{fails_with, ferrule, fx};

#[test]
fn exports_a_merged_model_and_an_adapter_then_generates_from_the_gguf() {
    let t = tempfile::tempdir().unwrap();
    let model = fx("models/llama");
    let adapter = fx("adapters/llama_lora");
    let out = t.path().join("merged.gguf");
    let out_s = out.to_str().unwrap();
    let (ok, stdout, err) = ferrule(&[
        "export",
        "gguf",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--outtype",
        "q8_0",
        "--output",
        out_s,
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["kind"], "model");
    assert_eq!(report["merged_modules"], 4);
    assert_eq!(report["tensor_types"]["Q8_0"], 16, "{report}");
    assert!(err.contains("largest rounding error"), "{err}");

    // ferrule runs the file it wrote.
    let (ok, _, err) = ferrule(&[
        "generate",
        "--model",
        out_s,
        "--prompt",
        "hello",
        "--max-new-tokens",
        "3",
    ]);
    assert!(ok, "generate on the exported GGUF: {err}");

    // The same output again: refused, then replaced with --overwrite.
    let before = std::fs::read(&out).unwrap();
    fails_with(
        &["export", "gguf", "--model", &model, "--output", out_s],
        "already exists; pass --overwrite",
    );
    assert_eq!(std::fs::read(&out).unwrap(), before);
    let (ok, stdout, err) = ferrule(&[
        "export",
        "gguf",
        "--model",
        &model,
        "--output",
        out_s,
        "--overwrite",
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("\"outtype\":\"f16\""),
        "default outtype: {stdout}"
    );

    let lora = t.path().join("lora.gguf");
    let (ok, stdout, err) = ferrule(&[
        "export",
        "gguf",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--adapter-only",
        "--output",
        lora.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("\"kind\":\"adapter\"") && stdout.contains("\"outtype\":\"f32\""),
        "{stdout}"
    );
}

#[test]
fn bad_inputs_are_named_and_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("x.gguf");
    let out_s = out.to_str().unwrap();
    let model = fx("models/llama");
    fails_with(
        &[
            "export",
            "gguf",
            "--model",
            &model,
            "--outtype",
            "q5_k",
            "--output",
            out_s,
        ],
        "valid ones are f32, f16, q8_0, q4_0",
    );
    fails_with(
        &[
            "export",
            "gguf",
            "--model",
            &fx("models/bert"),
            "--output",
            out_s,
        ],
        "\"bert\"",
    );
    fails_with(
        &[
            "export",
            "gguf",
            "--model",
            &model,
            "--adapter",
            &fx("methods/llama_ia3"),
            "--adapter-only",
            "--output",
            out_s,
        ],
        "llama.cpp loads LoRA adapters only",
    );
    fails_with(
        &[
            "export",
            "gguf",
            "--model",
            &model,
            "--adapter-only",
            "--output",
            out_s,
        ],
        "--adapter",
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(t.path()).unwrap().count(),
        0,
        "no temp files left"
    );
}
