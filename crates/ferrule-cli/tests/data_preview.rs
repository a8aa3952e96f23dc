//! `ferrule data` marks exactly what training trains: on the chat fixture, the assistant turns
//! with their end token, and nothing of the prompts.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn data(extra: &[&str]) -> String {
    let fx = |rel: &str| fixtures().join(rel).display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args([
            "data",
            "--model",
            &fx("models/llama"),
            "--data",
            &fx("data/chat.jsonl"),
            "--show",
            "100",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The `[[...]]` spans of each printed record, in order.
fn marked(stdout: &str) -> Vec<Vec<String>> {
    let (records, _counts) = stdout.rsplit_once("\n──\n").expect("the counts section");
    let records: Vec<&str> = records
        .split("── ")
        .filter(|r| r.contains(" tokens) ──"))
        .collect();
    records
        .iter()
        .map(|r| {
            r.split("[[")
                .skip(1)
                .map(|s| s.split_once("]]").expect("a closed span").0.to_string())
                .collect()
        })
        .collect()
}

#[test]
fn marks_exactly_the_assistant_turns_of_a_chat_dataset() {
    let text = std::fs::read_to_string(fixtures().join("data/chat.jsonl")).unwrap();
    let want: Vec<Vec<String>> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let turns = v["messages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["role"] == "assistant");
            turns
                .map(|m| format!("{}<|im_end|>", m["content"].as_str().unwrap()))
                .collect()
        })
        .collect();
    let out = data(&[]);
    assert_eq!(marked(&out), want, "{out}");
    assert!(out.contains("records 24 (kept 24, skipped 0"), "{out}");

    // With the prompt trained too, the whole record is one marked span.
    let all = data(&["--train-on-prompt"]);
    for spans in marked(&all) {
        assert_eq!(spans.len(), 1);
        assert!(spans[0].starts_with("<|im_start|>user\n"), "{spans:?}");
    }

    // The counts agree with the spans: --json's trained tokens are the marked text's tokens.
    let counts: serde_json::Value = serde_json::from_str(&data(&["--json"])).unwrap();
    assert_eq!(counts["kept"], 24);
    let tok = ferrule::data::load_tokenizer(&fixtures().join("models/llama")).unwrap();
    let trained: usize = want
        .iter()
        .flatten()
        .map(|span| tok.encode(span.as_str(), false).unwrap().len())
        .sum();
    assert_eq!(counts["trained_tokens"].as_u64().unwrap() as usize, trained);
}

#[test]
fn a_missing_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args([
            "data",
            "--model",
            &fixtures().join("models/llama").display().to_string(),
            "--data",
            "no-such.jsonl",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such.jsonl: cannot read"));
}

#[test]
fn the_packing_count_is_what_training_packs() {
    let counts: serde_json::Value = serde_json::from_str(&data(&[
        "--json",
        "--max-len",
        "64",
        "--batch-tokens",
        "160",
    ]))
    .unwrap();
    // The trainer's bins for the same records and budget (any epoch: best-fit decreasing gives
    // the same number of bins whatever the order).
    let cfg = ferrule::train::TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: "unused".into(),
        max_len: Some(64),
        packing: true,
        batch_tokens: Some(160),
        ..Default::default()
    };
    let p = ferrule::train::prepare(&cfg, &candle_core::Device::Cpu, None).unwrap();
    let lengths: Vec<usize> = p.train.iter().map(|e| e.input_ids.len()).collect();
    let bins = ferrule::train::batching::plan_epoch(p.batching, cfg.seed, 0, &lengths);
    assert_eq!(
        (
            counts["packed_budget"].as_u64(),
            counts["packed_bins"].as_u64()
        ),
        (Some(160), Some(bins.len() as u64))
    );
    // A budget below --max-len cannot hold a record of max_len tokens.
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args([
            "data",
            "--model",
            &fixtures().join("models/llama").display().to_string(),
            "--data",
        ])
        .arg(fixtures().join("data/chat.jsonl"))
        .args(["--max-len", "64", "--batch-tokens", "32"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--batch-tokens 32 is smaller than --max-len 64"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A batch of no records is a mistake, not a batch of one.
    let out = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args([
            "data",
            "--model",
            &fixtures().join("models/llama").display().to_string(),
            "--data",
        ])
        .arg(fixtures().join("data/chat.jsonl"))
        .args(["--batch-size", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--batch-size and --batch-tokens must be at least 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
