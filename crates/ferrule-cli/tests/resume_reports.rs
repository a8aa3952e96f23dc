//! Trainer failures users report (issue 25, item 7), each tried as a user runs it on the small
//! fixture model: `--max-grad-norm 0`, a run that stops learning, a data file changed before
//! `--resume`, a resume with the same global batch split otherwise, a longer run on resume and
//! `--init-adapter`, and a corrupt newest checkpoint.

mod common;
use common::fx;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

/// Runs ferrule with `args` on one thread.
fn ferrule(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrule"))
        .args(args)
        .args(["--threads", "1"])
        .output()
        .expect("run ferrule")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs ferrule and returns its stderr, panicking with it when the command fails.
fn ok(args: &[String]) -> String {
    let out = ferrule(args);
    let err = stderr(&out);
    assert!(out.status.success(), "ferrule {args:?} failed:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Runs ferrule and returns its stderr, panicking when the command succeeds.
fn fails(args: &[String]) -> String {
    let out = ferrule(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "ferrule {args:?} succeeded:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// `train` on the fixture model; a flag in `extra` replaces the default one.
fn train_args(data: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let out = out.display().to_string();
    let model = fx("models/llama");
    let defaults = [
        ("--model", model.as_str()),
        ("--data", data),
        ("--output", out.as_str()),
        ("--target-modules", "q_proj,v_proj"),
        ("--lora-r", "4"),
        // A learning rate at which the small model moves.
        ("--lr", "2e-2"),
        ("--seed", "3"),
        // Resumes are compared bit for bit with runs of other batch splits: f32.
        ("--compute-dtype", "f32"),
    ];
    let mut args = vec!["train".to_string()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn adapter(dir: &Path) -> BTreeMap<String, Tensor> {
    let path = dir.join("adapter_model.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn max_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(k, x)| {
            (x - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

/// `(step, loss, grad_norm)` of each training line of `metrics.jsonl`.
fn train_lines(dir: &Path) -> Vec<(u64, f64, f64)> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| {
            let m: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((
                m["step"].as_u64()?,
                m.get("loss")?.as_f64()?,
                m["grad_norm"].as_f64()?,
            ))
        })
        .collect()
}

#[test]
fn max_grad_norm_zero_disables_clipping() {
    let t = tempfile::tempdir().unwrap();
    let data = fx("data/chat.jsonl");
    let steps = ["--max-steps", "3", "--batch-size", "4"];
    let off = t.path().join("off");
    ok(&train_args(
        &data,
        &off,
        &[&steps[..], &["--max-grad-norm", "0"]].concat(),
    ));
    // A bound far above every norm never clips: the same adapter, bit for bit.
    let huge = t.path().join("huge");
    ok(&train_args(
        &data,
        &huge,
        &[&steps[..], &["--max-grad-norm", "1e30"]].concat(),
    ));
    assert_eq!(max_diff(&adapter(&off), &adapter(&huge)), 0.0);
    assert_eq!(train_lines(&off).len(), 3);
    // A small bound does clip, so the comparison above tells clipping from none.
    let small = t.path().join("small");
    ok(&train_args(
        &data,
        &small,
        &[&steps[..], &["--max-grad-norm", "1e-3"]].concat(),
    ));
    assert!(max_diff(&adapter(&off), &adapter(&small)) > 0.0);
    // The same setting in a config file.
    let cfg = t.path().join("run.toml");
    std::fs::write(&cfg, "max_grad_norm = 0.0\n").unwrap();
    let toml = t.path().join("toml");
    ok(&train_args(
        &data,
        &toml,
        &[&steps[..], &["--config", cfg.to_str().unwrap()]].concat(),
    ));
    assert_eq!(max_diff(&adapter(&off), &adapter(&toml)), 0.0);
}

#[test]
fn a_run_that_stops_learning_is_named_with_its_likely_cause() {
    let t = tempfile::tempdir().unwrap();
    let data = fx("data/chat.jsonl");
    let out = t.path().join("run");
    let args = train_args(
        &data,
        &out,
        &["--max-steps", "12", "--batch-size", "4", "--lr", "1e30"],
    );
    let err = ok(&args);
    let lines = train_lines(&out);
    assert!(
        lines.iter().any(|l| l.2 == 0.0) || lines.windows(2).any(|w| w[0].1 == w[1].1),
        "the run was expected to stall: {lines:?}"
    );
    assert!(
        err.contains("WARN") && err.contains("learning rate") && err.contains("--lr"),
        "{err}"
    );
    // A run that learns says nothing of the kind.
    let fine = t.path().join("fine");
    let err = ok(&train_args(
        &data,
        &fine,
        &["--max-steps", "12", "--batch-size", "4"],
    ));
    assert!(!err.contains("learning rate"), "{err}");
}

#[test]
fn a_data_file_changed_before_resume_is_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data.jsonl");
    std::fs::copy(fx("data/chat.jsonl"), &data).unwrap();
    let data_arg = data.display().to_string();
    let out = t.path().join("run");
    let flags = ["--max-steps", "4", "--batch-size", "4"];
    ok(&train_args(
        &data_arg,
        &out,
        &[&flags[..], &["--stop-after", "2"]].concat(),
    ));
    // One answer edited in place: the same number of records, other tokens.
    let text = std::fs::read_to_string(&data)
        .unwrap()
        .replace("hello there", "hello world");
    std::fs::write(&data, text).unwrap();
    let err = fails(&train_args(
        &data_arg,
        &out,
        &[&flags[..], &["--resume"]].concat(),
    ));
    assert!(
        err.contains(&data_arg) && err.contains("changed") && err.contains("checkpoint-2"),
        "{err}"
    );
    // Restored, the run resumes.
    std::fs::copy(fx("data/chat.jsonl"), &data).unwrap();
    ok(&train_args(
        &data_arg,
        &out,
        &[&flags[..], &["--resume"]].concat(),
    ));
}

#[test]
fn a_resume_with_the_same_global_batch_split_otherwise_continues() {
    let t = tempfile::tempdir().unwrap();
    let data = fx("data/chat.jsonl");
    let steps = ["--max-steps", "4", "--lr", "1e-2"];
    // 4 records per step, as 2 micro-batches of 2.
    let split = t.path().join("split");
    ok(&train_args(
        &data,
        &split,
        &[
            &steps[..],
            &[
                "--batch-size",
                "2",
                "--grad-accum",
                "2",
                "--stop-after",
                "2",
            ],
        ]
        .concat(),
    ));
    // Resumed as one micro-batch of 4: the same global batch, so the run continues.
    let err = ok(&train_args(
        &data,
        &split,
        &[&steps[..], &["--batch-size", "4", "--resume"]].concat(),
    ));
    assert!(err.contains("resuming from"), "{err}");
    // It ends where a run of micro-batches of 4 throughout ends (the same records in every
    // step; only the gradient's summation order differs).
    let whole = t.path().join("whole");
    ok(&train_args(
        &data,
        &whole,
        &[&steps[..], &["--batch-size", "4"]].concat(),
    ));
    let d = max_diff(&adapter(&split), &adapter(&whole));
    assert!(d < 1e-5, "resumed adapter differs by {d}");

    // Another global batch on the same number of ranks is another run: refused, named.
    let other = t.path().join("other");
    ok(&train_args(
        &data,
        &other,
        &[&steps[..], &["--batch-size", "2", "--stop-after", "2"]].concat(),
    ));
    let err = fails(&train_args(
        &data,
        &other,
        &[&steps[..], &["--batch-size", "4", "--resume"]].concat(),
    ));
    assert!(
        err.contains("global batch") && err.contains("batch_size"),
        "{err}"
    );
}

/// The user's report: a two-rank run's checkpoint, consolidated, resumes on one process with
/// the same global batch (twice the batch size).
#[cfg(feature = "mpi")]
#[test]
fn a_consolidated_two_rank_checkpoint_resumes_on_one_process_with_the_same_global_batch() {
    let t = tempfile::tempdir().unwrap();
    let data = fx("data/chat.jsonl");
    let steps = ["--max-steps", "4", "--lr", "1e-2", "--zero-stage", "1"];
    let split = t.path().join("split");
    let two = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(env!("CARGO_BIN_EXE_ferrule"))
        .args(train_args(
            &data,
            &split,
            &[&steps[..], &["--batch-size", "2", "--stop-after", "2"]].concat(),
        ))
        .args(["--threads", "1"])
        .output()
        .expect("start mpirun (is Open MPI installed? scripts/install-deps.sh)");
    assert!(two.status.success(), "{}", stderr(&two));
    let checkpoint = split.join("checkpoint-2").display().to_string();
    ok(&[
        "checkpoint".to_string(),
        "consolidate".to_string(),
        checkpoint,
    ]);
    let err = ok(&train_args(
        &data,
        &split,
        &[&steps[..], &["--batch-size", "4", "--resume"]].concat(),
    ));
    assert!(err.contains("the global batch stays 4 records"), "{err}");
    let whole = t.path().join("whole");
    ok(&train_args(
        &data,
        &whole,
        &[&steps[..], &["--batch-size", "4"]].concat(),
    ));
    let d = max_diff(&adapter(&split), &adapter(&whole));
    assert!(d < 1e-5, "resumed adapter differs by {d}");
}

#[test]
fn raising_max_steps_or_epochs_on_resume_continues_and_says_so() {
    let t = tempfile::tempdir().unwrap();
    let data = fx("data/chat.jsonl");
    let out = t.path().join("run");
    let common = ["--batch-size", "4", "--save-every", "2"];
    ok(&train_args(
        &data,
        &out,
        &[&common[..], &["--max-steps", "4"]].concat(),
    ));
    let err = ok(&train_args(
        &data,
        &out,
        &[&common[..], &["--max-steps", "6", "--resume"]].concat(),
    ));
    assert!(
        err.contains("from 4 to 6 steps") && err.contains("learning-rate schedule"),
        "{err}"
    );
    let steps: Vec<u64> = train_lines(&out).iter().map(|l| l.0).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    // Fewer steps than the checkpoint has done is an error that says so.
    let err = fails(&train_args(
        &data,
        &out,
        &[&common[..], &["--max-steps", "3", "--resume"]].concat(),
    ));
    assert!(err.contains("--max-steps 3"), "{err}");

    // Epochs: one epoch of 24 records in steps of 4 is 6 steps; two are 12.
    let epochs = t.path().join("epochs");
    ok(&train_args(
        &data,
        &epochs,
        &[&common[..], &["--epochs", "1"]].concat(),
    ));
    let err = ok(&train_args(
        &data,
        &epochs,
        &[&common[..], &["--epochs", "2", "--resume"]].concat(),
    ));
    assert!(err.contains("from 6 to 12 steps"), "{err}");
    assert_eq!(train_lines(&epochs).len(), 12);
}

#[test]
fn init_adapter_starts_a_new_run_from_an_adapters_weights() {
    let t = tempfile::tempdir().unwrap();
    let data = fx("data/chat.jsonl");
    let first = t.path().join("first");
    ok(&train_args(
        &data,
        &first,
        &["--max-steps", "4", "--batch-size", "4"],
    ));
    // A new run from those weights with a negligible step stays where they were.
    let tiny = ["--max-steps", "1", "--batch-size", "4", "--lr", "1e-30"];
    let second = t.path().join("second");
    ok(&train_args(
        &data,
        &second,
        &[&tiny[..], &["--init-adapter", first.to_str().unwrap()]].concat(),
    ));
    let d = max_diff(&adapter(&first), &adapter(&second));
    assert!(d < 1e-6, "the new run did not start from the adapter: {d}");
    // Without the flag it starts from a fresh adapter.
    let fresh = t.path().join("fresh");
    ok(&train_args(&data, &fresh, &tiny));
    assert!(max_diff(&adapter(&first), &adapter(&fresh)) > 1e-3);
    // An adapter of another shape is refused, naming the folder.
    let err = fails(&train_args(
        &data,
        &t.path().join("bad"),
        &[
            &tiny[..],
            &["--init-adapter", first.to_str().unwrap(), "--lora-r", "8"],
        ]
        .concat(),
    ));
    assert!(err.contains(first.to_str().unwrap()), "{err}");
}

#[test]
fn a_corrupt_newest_checkpoint_is_named_when_an_older_one_is_resumed() {
    let t = tempfile::tempdir().unwrap();
    let data = fx("data/chat.jsonl");
    let out = t.path().join("run");
    let flags = ["--max-steps", "6", "--batch-size", "4", "--save-every", "2"];
    ok(&train_args(
        &data,
        &out,
        &[&flags[..], &["--stop-after", "4"]].concat(),
    ));
    let state = out.join("checkpoint-4").join("trainer_state.json");
    std::fs::write(&state, "{\"step\": 4, \"epo").unwrap();
    let err = ok(&train_args(
        &data,
        &out,
        &[&flags[..], &["--resume"]].concat(),
    ));
    assert!(
        err.contains("checkpoint-4")
            && err.contains("trainer_state.json")
            && err.contains("checkpoint-2"),
        "{err}"
    );
    let steps: Vec<u64> = train_lines(&out).iter().map(|l| l.0).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
}

/// A run in bf16 resumes in bf16 to the uninterrupted run's bytes; resuming it in f32 is
/// refused, naming the setting (on a CPU without bf16 the bf16 run itself is refused, naming
/// the missing CPU feature).
#[test]
fn a_resume_in_another_compute_dtype_is_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let data = fx("data/chat.jsonl");
    let run = t.path().join("run");
    let bf16 = [
        "--compute-dtype",
        "bf16",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
    ];
    let first = ferrule(&train_args(
        &data,
        &run,
        &[&bf16[..], &["--stop-after", "1"]].concat(),
    ));
    if !first.status.success() {
        let err = stderr(&first);
        assert!(
            err.contains("neither avx512_bf16 nor amx_bf16") || err.contains("oneDNN"),
            "{err}"
        );
        eprintln!("skipping: no bf16 here: {err}");
        return;
    }
    // The run's first lines say which dtype computes and why.
    let said = stderr(&first);
    assert!(said.contains("compute dtype: bf16 (asked for)"), "{said}");
    let f32 = [
        "--compute-dtype",
        "f32",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--resume",
    ];
    let err = fails(&train_args(&data, &run, &f32));
    assert!(
        err.contains("different settings")
            && err.contains("compute_dtype: \"bf16\" -> \"f32\"")
            && err.contains("--compute-dtype"),
        "{err}"
    );
    // auto resumes in the dtype the run computed in, whatever this machine would choose.
    let auto = [
        "--compute-dtype",
        "auto",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
    ];
    let resumed = ok(&train_args(
        &data,
        &run,
        &[&auto[..], &["--resume"]].concat(),
    ));
    assert!(
        resumed.contains("compute dtype: bf16 (auto: the resumed run computed in bf16)"),
        "{resumed}"
    );
    let whole = t.path().join("whole");
    ok(&train_args(&data, &whole, &bf16));
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(
        bytes(&run) == bytes(&whole),
        "the bf16 resume trained another adapter"
    );
    // And an f32 run (or one from before the setting) resumes under auto in f32.
    let f32_run = t.path().join("f32");
    let f32_steps = &f32[..f32.len() - 1];
    ok(&train_args(
        &data,
        &f32_run,
        &[f32_steps, &["--stop-after", "1"]].concat(),
    ));
    let resumed = ok(&train_args(
        &data,
        &f32_run,
        &[&auto[..], &["--resume"]].concat(),
    ));
    let want = "compute dtype: f32 (auto: the resumed run computed in f32)";
    assert!(resumed.contains(want), "{resumed}");
}
