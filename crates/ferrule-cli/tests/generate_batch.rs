//! `ferrule generate --prompts FILE`: a JSON Lines file of prompts decoded in left-padded
//! batches gives each prompt the completion it gets alone, one JSON line each; mistakes in
//! the file or the flags are named and write nothing.

mod common;
use common::{ferrule, fx};

const DECODING: [&str; 4] = ["--max-new-tokens", "6", "--compute-dtype", "f32"];

#[test]
fn every_prompt_of_a_batch_gets_its_completion_alone() {
    let t = tempfile::tempdir().unwrap();
    let model = fx("models/llama");
    // Lengths differ, so the batch of two is padded; the third prompt is a batch of its own.
    let prompts = [
        "hello there",
        "a much longer prompt than the first one, padded less",
        "hi",
    ];
    let file = t.path().join("prompts.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .map(|p| serde_json::json!({ "text": p }).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = t.path().join("out.jsonl");
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "--prompts",
        file.to_str().unwrap(),
        "--batch-size",
        "2",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend(DECODING);
    let (ok, stdout, err) = ferrule(&args);
    assert!(ok, "{err}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(err.contains("batch 1/2: 2 prompt(s)"), "{err}");
    assert!(err.contains("3 completions written to"), "{err}");
    let got: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 3);
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(got[i]["index"], i + 1);
        let mut one = vec!["generate", "--model", &model, "--prompt", p, "--raw"];
        one.extend(DECODING);
        let (ok, alone, err) = ferrule(&one);
        assert!(ok, "{err}");
        assert_eq!(got[i]["completion"], alone.trim_end_matches('\n'), "{p:?}");
        assert!(got[i]["new_tokens"].as_u64().unwrap() >= 1, "{}", got[i]);
    }
}

#[test]
fn mistakes_in_the_file_or_flags_are_named_and_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    let model = fx("models/llama");
    let file = t.path().join("prompts.jsonl");
    std::fs::write(&file, "{\"text\": \"fine\"}\n{\"promt\": \"typo\"}\n").unwrap();
    let out = t.path().join("out.jsonl");
    let (ok, _, err) = ferrule(&[
        "generate",
        "--model",
        &model,
        "--prompts",
        file.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("prompts.jsonl:2: no \"prompt\", \"messages\" or \"text\" key"),
        "{err}"
    );
    assert!(!out.exists());
    // Flags that need --prompts, and both ways of giving a prompt at once.
    for (args, needle) in [
        (vec!["--prompt", "hi", "--batch-size", "4"], "--prompts"),
        (
            vec!["--prompt", "hi", "--prompts", file.to_str().unwrap()],
            "cannot be used with",
        ),
        (
            vec!["--prompts", file.to_str().unwrap(), "--batch-size", "0"],
            "--batch-size",
        ),
    ] {
        let mut all = vec!["generate", "--model", &model];
        all.extend(args.iter().copied());
        let (ok, _, err) = ferrule(&all);
        assert!(!ok && err.contains(needle), "{all:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
