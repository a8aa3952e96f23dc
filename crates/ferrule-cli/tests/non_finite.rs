//! NaN and infinite results are refused: `logits`, `eval`, `generate` and `merge` with an
//! adapter holding a NaN stop with an error naming the tensor and where, and write nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
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

/// The llama LoRA fixture with `value` written into one `lora_B` entry of layer 1 (of 2), so
/// that layer 0's output stays finite and the trace must name layer 1.
fn poisoned_adapter(dir: &Path, value: f32) {
    let src = fixtures().join("adapters/llama_lora");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let (tensors, _) =
        ferrule::util::atomic::deserialize_safetensors(&bytes, &Device::Cpu).unwrap();
    let mut out: Vec<(String, Tensor)> = tensors.into_iter().collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let (name, t) = out
        .iter_mut()
        .find(|(n, _)| n.contains("layers.1.") && n.contains("lora_B"))
        .expect("a lora_B tensor of layer 1");
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v[0] = value;
    *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
    eprintln!("poisoned {name}");
    ferrule::peft_io::write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &out,
        &[("format", "pt")],
    )
    .unwrap();
}

fn refused(args: &[&str], needles: &[&str]) {
    let (ok, err) = ferrule(args);
    assert!(!ok, "{args:?} accepted a non-finite result");
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    for n in needles {
        assert!(
            err.contains(n),
            "{args:?}: the error should mention {n:?}, got:\n{err}"
        );
    }
}

/// What the rerun that checks each layer says about the poisoned adapter.
const TRACED: &str = "the first stage with a non-finite output: layer 1 (model.layers.1)";

#[test]
fn commands_refuse_non_finite_outputs_and_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/llama").display().to_string();
    for (value, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let adapter = t.path().join(format!("adapter-{shown}"));
        poisoned_adapter(&adapter, value);
        let adapter = adapter.display().to_string();

        let out = t.path().join(format!("logits-{shown}.safetensors"));
        let inputs = fixtures()
            .join("inputs/decoder.safetensors")
            .display()
            .to_string();
        refused(
            &[
                "logits",
                "--model",
                &model,
                "--adapter",
                &adapter,
                "--inputs",
                &inputs,
                "--out",
                &out.display().to_string(),
            ],
            &[
                "the logits for",
                "[batch, position, output]",
                "was not written",
                TRACED,
            ],
        );
        assert!(!out.exists(), "logits were written");

        let data = fixtures().join("data/chat.jsonl").display().to_string();
        refused(
            &[
                "eval",
                "--model",
                &model,
                "--adapter",
                &adapter,
                "--data",
                &data,
            ],
            &["NaN or infinite loss", "eval record 1", TRACED],
        );

        refused(
            &[
                "generate",
                "--model",
                &model,
                "--adapter",
                &adapter,
                "--prompt",
                "hi",
                "--max-new-tokens",
                "3",
            ],
            &[
                "the logits of generated token 1",
                "generation stopped",
                TRACED,
            ],
        );

        let merged = t.path().join(format!("merged-{shown}"));
        refused(
            &[
                "merge",
                "--model",
                &model,
                "--adapter",
                &adapter,
                "--output",
                &merged.display().to_string(),
            ],
            &[
                "the merged weight model.layers.",
                &format!("{shown} at ["),
                "nothing was written",
            ],
        );
        assert!(!merged.exists(), "a merged folder was written");
    }
}
