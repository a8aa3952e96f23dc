//! Method flags on `inspect` and `plan`, which take them from the method's own declaration
//! (`ferrule::tuners::flags`) as `train` does.

mod common;

use common::ferrule;

use std::path::PathBuf;

fn model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llama")
        .display()
        .to_string()
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

/// DyLoRA through the CLI: `inspect` with its variant flag, `plan` counting it from the
/// weights and from `config.json` alone, `eval --every-rank` one line per rank, and `--rank`
/// above r or on a LoRA adapter refused by name.
#[test]
fn dylora_counts_and_runs_at_chosen_ranks() {
    let model = model();
    let dylora = ["--method", "dylora", "--lora-r", "4"];
    let mut args = vec![
        "inspect",
        "--model",
        model.as_str(),
        "--json",
        "--dylora-unfrozen",
    ];
    args.extend(dylora);
    let (ok, out, err) = ferrule(&args);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["plan"]["config"]["frozen"], false);
    // q_proj 4·(64 + 64) and v_proj 4·(64 + 32) in each of 2 layers.
    let by_hand = 2 * (4 * 128 + 4 * 96);
    assert_eq!(info["plan"]["trainable_parameters"], by_hand);
    let config = format!("{model}/config.json");
    for m in [model.as_str(), config.as_str()] {
        let mut args = vec!["plan", "--model", m, "--json"];
        args.extend(dylora);
        let (ok, out, err) = ferrule(&args);
        assert!(ok, "{m}: {err}");
        let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(plan["trainable_params"], by_hand, "{m}");
    }

    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let adapter = fixtures.join("dylora/frozen_b3").display().to_string();
    let data = fixtures.join("data/chat.jsonl").display().to_string();
    let eval = [
        "eval",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--data",
        &data,
    ];
    let mut args = eval.to_vec();
    args.push("--every-rank");
    let (ok, out, err) = ferrule(&args);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ranks: Vec<u64> = lines.iter().map(|l| l["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, [1, 2, 3, 4]);
    let loss = |l: &serde_json::Value| l["eval_loss"].as_f64().unwrap();
    assert_ne!(loss(&lines[0]), loss(&lines[3]));
    let mut args = eval.to_vec();
    args.extend(["--rank", "4"]);
    let (ok, out, err) = ferrule(&args);
    assert!(ok, "{err}");
    let at_r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(loss(&at_r), loss(&lines[3]));

    let mut args = eval.to_vec();
    args.extend(["--rank", "5"]);
    let (ok, _, err) = ferrule(&args);
    assert!(
        !ok && err.contains("--rank 5") && err.contains("r = 4"),
        "{err}"
    );
    let lora = fixtures
        .join("dylora/roundtrip/lora_r2")
        .display()
        .to_string();
    let mut args = vec![
        "eval",
        "--model",
        &model,
        "--adapter",
        &lora,
        "--data",
        &data,
    ];
    args.extend(["--rank", "2"]);
    let (ok, _, err) = ferrule(&args);
    assert!(!ok && err.contains("a LORA adapter has one rank"), "{err}");
}
