//! Method flags on `inspect` and `plan`, which take them from the method's own declaration
//! (`ferrule::tuners::flags`) as `train` does.

use std::path::PathBuf;
use std::process::Command;

fn model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llama")
        .display()
        .to_string()
}

/// Runs ferrule; returns (success, stdout, stderr).
fn ferrule(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args(args)
        .arg("--threads")
        .arg("1")
        .output()
        .expect("run ferrule");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const TEXT_INIT: [&str; 6] = [
    "--method",
    "prompt-tuning",
    "--num-virtual-tokens",
    "4",
    "--prompt-tuning-init-text",
    "hello",
];

/// `--prompt-tuning-init-text` tokenizes with the model's own tokenizer on `inspect` and `plan`
/// as on `train` (they passed no model path, so TEXT init found no tokenizer).
#[test]
fn text_init_reads_the_model_tokenizer_on_inspect_and_plan() {
    let model = model();
    let mut args = vec!["inspect", "--model", model.as_str(), "--json"];
    args.extend(TEXT_INIT);
    let (ok, out, err) = ferrule(&args);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let config = &info["plan"]["config"];
    assert_eq!(config["prompt_tuning_init"], "TEXT");
    assert_eq!(config["prompt_tuning_init_text"], "hello");
    assert_eq!(config["tokenizer_name_or_path"], model.as_str());
    assert_eq!(info["plan"]["trainable_parameters"], 4 * 64);

    let mut args = vec!["plan", "--model", model.as_str(), "--json"];
    args.extend(TEXT_INIT);
    let (ok, out, err) = ferrule(&args);
    assert!(ok, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["trainable_params"], 4 * 64);
}
