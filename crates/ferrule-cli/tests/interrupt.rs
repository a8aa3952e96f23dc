//! Ctrl-C (SIGINT) during `ferrule train`: the run stops after the current step with a
//! complete checkpoint, exits with 130 and writes no final adapter; `--resume` finishes it with
//! the adapter an uninterrupted run writes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn train_args(out: &Path) -> Vec<String> {
    let fx = |rel: &str| fixtures().join(rel).display().to_string();
    let args = [
        "train",
        "--model",
        &fx("models/llama"),
        "--data",
        &fx("data/chat.jsonl"),
        "--output",
        &out.display().to_string(),
    ];
    // About 0.5 ms a step here: long enough to be interrupted, short to finish.
    let more = [
        "--max-steps",
        "6000",
        "--batch-size",
        "1",
        "--log-every",
        "50",
        "--threads",
        "1",
    ];
    args.iter().chain(&more).map(|s| s.to_string()).collect()
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args(train_args(&out))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut err = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        err += &line;
        err.push('\n');
        if line.starts_with("step 50/") {
            break;
        }
    }
    assert!(err.contains("step 50/"), "no progress line:\n{err}");
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for line in lines {
        err += &line.unwrap();
        err.push('\n');
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C:\n{err}");
    assert!(
        err.contains("stopping after this step with a checkpoint"),
        "{err}"
    );
    assert!(err.contains("checkpoint saved"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "an interrupted run wrote the final adapter"
    );
    let checkpoints: Vec<u64> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    let step = checkpoints[0];
    assert!((50..6000).contains(&step), "checkpoint of step {step}");
    let state =
        std::fs::read_to_string(out.join(format!("checkpoint-{step}/trainer_state.json"))).unwrap();
    assert!(
        state.contains(&format!("\"step\": {step}")) || state.contains(&format!("\"step\":{step}")),
        "{state}"
    );

    let mut again = train_args(&out);
    again.push("--resume".into());
    let resumed = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args(&again)
        .output()
        .unwrap();
    let resumed_err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{resumed_err}");
    assert!(
        std::fs::read_to_string(out.join("loss.svg"))
            .unwrap()
            .starts_with("<svg"),
        "no loss plot"
    );
    assert!(
        resumed_err.contains(&format!(
            "resuming from {}",
            out.join(format!("checkpoint-{step}")).display()
        )),
        "the resume did not start at step {step}:\n{resumed_err}"
    );

    let plain = t.path().join("plain");
    let uninterrupted = Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args(train_args(&plain))
        .output()
        .unwrap();
    assert!(uninterrupted.status.success());
    let read = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert!(
        read(&out) == read(&plain),
        "the resumed adapter differs from the uninterrupted run's"
    );
}
