//! Writes that fail: a file-size limit (RLIMIT_FSIZE, what a full disk looks like to a
//! writer) while saving a checkpoint, the final adapter or a merged model; an output path that
//! is a file; a folder ferrule may not write in. Each gives an error naming the file, leaves no
//! partial output, keeps every earlier file as it was, and `--resume` continues afterwards.

mod common;
use common::fx;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs ferrule with a file-size limit of `blocks` KiB (bash's `ulimit -f` unit; none when `None`).
fn ferrule(limit_blocks: Option<u64>, args: &[&str]) -> (bool, String) {
    let bin = env!("CARGO_BIN_EXE_ferrule");
    let mut cmd = match limit_blocks {
        Some(b) => {
            let mut c = Command::new("bash");
            c.args(["-c", &format!("ulimit -f {b}; exec \"$0\" \"$@\""), bin]);
            c
        }
        None => Command::new(bin),
    };
    let out = cmd
        .args(args)
        .args(["--threads", "1"])
        .output()
        .expect("run ferrule");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    (out.status.success(), err)
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            files.extend(snapshot(&e.path()));
        } else {
            files.insert(e.path(), std::fs::read(e.path()).unwrap());
        }
    }
    files
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

fn train_args(out: &str) -> Vec<&str> {
    let (model, data) = (
        Box::leak(fx("models/llama").into_boxed_str()),
        Box::leak(fx("data/chat.jsonl").into_boxed_str()),
    );
    vec![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--output",
        out,
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--save-every",
        "2",
        "-q",
    ]
}

#[test]
fn a_file_size_limit_while_checkpointing_keeps_the_last_checkpoint_and_resume_continues() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run");
    let run_s = run.display().to_string();
    let (ok, err) = ferrule(
        None,
        &[&train_args(&run_s)[..], &["--stop-after", "2"]].concat(),
    );
    assert!(ok, "{err}");
    let before = snapshot(&run.join("checkpoint-2"));
    // 10 KiB: the 14 KB adapter of checkpoint-4 cannot be written.
    let (ok, err) = ferrule(Some(10), &[&train_args(&run_s)[..], &["--resume"]].concat());
    assert!(!ok, "a run that could not write its checkpoint succeeded");
    assert!(
        err.contains("checkpoint-4") && err.contains("File too large"),
        "{err}"
    );
    assert_eq!(
        names(&run),
        ["checkpoint-2", "loss.svg", "metrics.jsonl"],
        "a partial checkpoint or adapter was left"
    );
    assert_eq!(
        snapshot(&run.join("checkpoint-2")),
        before,
        "the earlier checkpoint changed"
    );
    let (ok, err) = ferrule(None, &[&train_args(&run_s)[..], &["--resume"]].concat());
    assert!(ok, "{err}");
    let plain = t.path().join("plain");
    assert!(ferrule(None, &train_args(&plain.display().to_string())).0);
    let adapter = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(
        adapter(&run) == adapter(&plain),
        "resuming after the failure trained another adapter"
    );
}

#[test]
fn a_file_size_limit_while_saving_the_adapter_or_a_merged_model_leaves_nothing_partial() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run");
    let run_s = run.display().to_string();
    let args = train_args(&run_s);
    let (ok, err) = ferrule(Some(10), &args[..args.len() - 3]); // no checkpoints: only the adapter
    assert!(!ok);
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("File too large"),
        "{err}"
    );
    let left = names(&run);
    assert!(
        !left
            .iter()
            .any(|n| n.starts_with("adapter") || n.contains(".tmp")),
        "{left:?}"
    );

    let merged = t.path().join("merged");
    let (ok, err) = ferrule(
        Some(100),
        &[
            "merge",
            "--model",
            &fx("models/llama"),
            "--adapter",
            &fx("adapters/llama_lora"),
            "--output",
            &merged.display().to_string(),
        ],
    );
    assert!(!ok);
    assert!(err.contains("File too large"), "{err}");
    assert_eq!(names(t.path()), ["run"], "the merge left a folder behind");
    let quantized = t.path().join("q.v2");
    let (ok, err) = ferrule(
        Some(10),
        &[
            "quantize",
            "--model",
            &fx("models/llama"),
            "--quantize",
            "nf4",
            "--output",
            &quantized.display().to_string(),
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("q.v2.tmp/model.safetensors") && err.contains("File too large"),
        "{err}"
    );
    assert_eq!(
        names(t.path()),
        ["run"],
        "the quantize left a folder behind"
    );
}

#[test]
fn an_output_path_that_is_a_file_is_refused_and_kept() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let f = file.display().to_string();
    let model = fx("models/llama");
    for (args, needle) in [
        (train_args(&f), "is a file, not a folder"),
        (
            vec![
                "merge",
                "--model",
                &model,
                "--adapter",
                &fx("adapters/llama_lora"),
                "--output",
                &f,
            ],
            "already exists",
        ),
        (
            vec![
                "quantize",
                "--model",
                &model,
                "--quantize",
                "nf4",
                "--output",
                &f,
            ],
            "already exists",
        ),
    ] {
        let (ok, err) = ferrule(None, &args);
        assert!(
            !ok && err.contains(needle) && err.contains("notes.txt"),
            "{args:?}:\n{err}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }
}

/// A folder no one may write in: mode 555, and for root (who ignores modes) the immutable
/// attribute. Where neither takes (root without CAP_LINUX_IMMUTABLE), the test says so.
#[test]
fn a_folder_without_write_permission_is_an_error_naming_it() {
    let t = tempfile::tempdir().unwrap();
    let ro = t.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let chmod = |mode: &str| {
        Command::new("chmod")
            .args([mode, &ro.display().to_string()])
            .status()
            .unwrap()
    };
    chmod("555");
    let writable = || {
        std::fs::write(ro.join("probe"), "")
            .map(|_| std::fs::remove_file(ro.join("probe")))
            .is_ok()
    };
    let mut immutable = false;
    if writable() {
        immutable = Command::new("chattr")
            .args(["+i", &ro.display().to_string()])
            .status()
            .is_ok_and(|s| s.success());
    }
    if writable() {
        eprintln!(
            "skipping: cannot make a read-only folder here (root without CAP_LINUX_IMMUTABLE)"
        );
        chmod("755");
        return;
    }
    let out = ro.join("run").display().to_string();
    let (ok, err) = ferrule(None, &train_args(&out));
    let (ok2, err2) = ferrule(None, &train_args(&ro.display().to_string()));
    if immutable {
        Command::new("chattr")
            .args(["-i", &ro.display().to_string()])
            .status()
            .unwrap();
    }
    chmod("755");
    assert!(
        !ok && err.contains("creating the output folder") && err.contains("ro/run"),
        "{err}"
    );
    assert!(!ok2 && err2.contains("ro/metrics.jsonl"), "{err2}");
    assert!(names(&ro).is_empty(), "{:?}", names(&ro));
}
