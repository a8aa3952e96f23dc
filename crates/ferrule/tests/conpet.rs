//! ConPET (`--method conpet --continual DIR`): the routing layout against a torch
//! reproduction of the reference's formula (tests/fixtures/conpet/make_conpet_fixtures.py),
//! and on MiniLM (skipped without the asset) two synthetic task splits with disjoint labels:
//! the first expert's bytes survive the second task, the selector routes the records it was
//! trained on to their own expert, resume is byte-identical, bad inputs are named.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::*;
use ferrule::continual::{add_task, RoutedSet};
use ferrule::model::Task;
use ferrule::train::{RunOptions, Silent, TrainConfig};
use ferrule::tuners::conpet::layer::{
    continual_logits, records_by_task, select_topk, ExpertOutput,
};
use ferrule::tuners::conpet::set::Manifest;
use ferrule::tuners::AdapterConfig;
use serde_json::json;

#[test]
fn continual_logits_match_the_reference_formula() {
    let f = load("conpet/case.safetensors");
    let labels = [2usize, 3, 1];
    let columns = [0..2, 2..5, 5..6];
    for k in 1..=3 {
        let routes = select_topk(&f["selector"], k).unwrap();
        let mut outputs = Vec::new();
        for (task, rows) in records_by_task(&routes, 3).into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let idx = Tensor::new(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                &Device::Cpu,
            )
            .unwrap();
            let logits = f[&format!("expert_{task}")].index_select(&idx, 0).unwrap();
            assert_eq!(logits.dim(1).unwrap(), labels[task]);
            outputs.push(ExpertOutput { task, rows, logits });
        }
        let got = continual_logits(5, &columns, &outputs, -100.0).unwrap();
        let want = &f[&format!("expected_k{k}")];
        assert!(
            max_diff(&got, want) < 1e-5,
            "k={k}: {}",
            max_diff(&got, want)
        );
    }
    // The tie in record 3 (0.5, 0.5, -1): the earlier task ranks first, as Python's sort.
    assert_eq!(select_topk(&f["selector"], 1).unwrap()[3], vec![0]);
}

/// Synthetic splits: each label has its own words, so both the experts and the selector
/// (which task a text is from) are learnable in a few steps.
const WORDS: &[(&str, [&str; 6])] = &[
    (
        "sports",
        ["football", "goal", "team", "match", "player", "score"],
    ),
    (
        "food",
        ["pizza", "bread", "cheese", "soup", "salad", "cake"],
    ),
    (
        "weather",
        ["rain", "snow", "storm", "sunny", "wind", "cloud"],
    ),
    (
        "music",
        ["guitar", "song", "piano", "drum", "melody", "concert"],
    ),
    ("animals", ["dog", "cat", "horse", "bird", "fish", "lion"]),
    (
        "colors",
        ["red", "blue", "green", "yellow", "purple", "orange"],
    ),
];

fn write_split(dir: &Path, name: &str, labels: &[&str]) -> PathBuf {
    let mut lines = Vec::new();
    for i in 0..36 {
        for label in labels {
            let words = WORDS.iter().find(|(l, _)| l == label).unwrap().1;
            let (a, b) = (words[i % 6], words[(i / 6 + i + 1) % 6]);
            lines.push(json!({"text": format!("the {a} and a {b}"), "label": label}).to_string());
        }
    }
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn config(model: &Path, data: &Path, set: &Path) -> TrainConfig {
    TrainConfig {
        model: model.display().to_string(),
        data: data.to_path_buf(),
        continual: Some(set.to_path_buf()),
        task: Task::SeqCls,
        adapter: Some(AdapterConfig::from_json(json!({"peft_type": "CONPET"})).unwrap()),
        max_len: Some(16),
        batch_size: Some(8),
        epochs: 2.0,
        lr: 2e-3,
        weight_decay: 0.01,
        compute_dtype: ferrule::ops::ComputeDtypeChoice::F32,
        ..Default::default()
    }
}

fn add(cfg: &TrainConfig, run: RunOptions) -> ferrule::continual::ContinualSummary {
    add_task(cfg, &Device::Cpu, &mut Silent, &run).unwrap()
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push((
            e.strip_prefix(dir).unwrap().display().to_string(),
            std::fs::read(&e).unwrap(),
        ));
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        // Run logs hold timings; checkpoints are pruned differently by a resumed run.
        if ["metrics.jsonl", "train_summary.json", "loss.svg"].contains(&name.as_str())
            || name.starts_with("checkpoint-")
        {
            continue;
        }
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_second_task_leaves_the_first_expert_byte_identical_and_routes_by_task() {
    let Some(model) = asset("minilm") else { return };
    let t = tempfile::tempdir().unwrap();
    let set = t.path().join("set");
    let a = write_split(t.path(), "a.jsonl", &["sports", "food"]);
    let b = write_split(t.path(), "b.jsonl", &["weather", "music"]);
    let s1 = add(&config(&model, &a, &set), RunOptions::default());
    assert!(
        s1.completed && s1.selector.is_none(),
        "the first task trains no selector"
    );
    let first = files(&set.join("task-1"));
    let s2 = add(&config(&model, &b, &set), RunOptions::default());
    assert!(s2.completed && s2.selector.is_some());
    assert_eq!(files(&set.join("task-1")), first, "task 1's expert changed");

    let m = Manifest::read(&set).unwrap().unwrap();
    assert_eq!(m.columns(), vec![0..2, 2..4]);
    assert_eq!(m.tasks[1].labels, vec![json!("music"), json!("weather")]);
    assert_eq!(m.selector.as_deref(), Some("selector-2"));
    // Each expert is a plain PEFT LoRA with its head in modules_to_save.
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(set.join("task-2/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    assert!(cfg["modules_to_save"]
        .as_array()
        .unwrap()
        .contains(&json!("classifier")));

    let routed = RoutedSet::load(&set, &model.display().to_string(), &Device::Cpu).unwrap();
    let both = t.path().join("both.jsonl");
    let text = std::fs::read_to_string(&a).unwrap() + &std::fs::read_to_string(&b).unwrap();
    std::fs::write(&both, text).unwrap();
    let e = routed.evaluate_file(&both, 16, 16, None).unwrap();
    assert!(
        e.routing_accuracy >= 0.95,
        "the selector misroutes records it trained on: {e:?}"
    );
    assert!(e.eval_accuracy >= 0.9, "{e:?}");

    // A split whose labels an earlier task owns is refused, naming the label and the task.
    let c = write_split(t.path(), "c.jsonl", &["food", "animals"]);
    let err = add_task(
        &config(&model, &c, &set),
        &Device::Cpu,
        &mut Silent,
        &RunOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("label \"food\" already belongs to task 1 (a.jsonl)"),
        "{err}"
    );

    // A third task starts its selector from the second's: the old projector rows copied.
    let d = write_split(t.path(), "d.jsonl", &["animals", "colors"]);
    let stopped = add(
        &config(&model, &d, &set),
        RunOptions {
            stop_after: Some(1),
            ..Default::default()
        },
    );
    assert!(!stopped.completed);
    let old = load_dir(&set.join("selector-2"));
    let init = load_dir(&set.join("pending-3/selector-init"));
    for k in [
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    ] {
        assert_eq!(init[k].dim(0).unwrap(), 3);
        assert_eq!(
            max_diff(&init[k].narrow(0, 0, 2).unwrap(), &old[k]),
            0.0,
            "{k}"
        );
    }
    assert_eq!(
        Manifest::read(&set).unwrap().unwrap().tasks.len(),
        2,
        "a stopped task is not listed"
    );
}

fn load_dir(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn adding_a_task_resumes_to_the_same_bytes() {
    let Some(model) = asset("minilm") else { return };
    let t = tempfile::tempdir().unwrap();
    let a = write_split(t.path(), "a.jsonl", &["sports", "food"]);
    let b = write_split(t.path(), "b.jsonl", &["weather", "music"]);
    let c = write_split(t.path(), "c.jsonl", &["animals", "colors"]);
    let (whole, split) = (t.path().join("whole"), t.path().join("split"));
    let in_set = |data: &Path, set: &Path| TrainConfig {
        epochs: 1.0,
        ..config(&model, data, set)
    };
    add(&in_set(&a, &whole), RunOptions::default());
    add(&in_set(&b, &whole), RunOptions::default());
    // The first task stopped in its expert's phase, the second in its selector's.
    for (data, stop) in [(&a, 3), (&b, 4)] {
        let stopped = add(
            &in_set(data, &split),
            RunOptions {
                stop_after: Some(stop),
                ..Default::default()
            },
        );
        assert!(!stopped.completed);
        // Neither a run without --resume nor one from another split continues it.
        let again = add_task(
            &in_set(data, &split),
            &Device::Cpu,
            &mut Silent,
            &RunOptions::default(),
        );
        let e = again.unwrap_err().to_string();
        assert!(
            e.contains("was started and not finished") && e.contains("--resume"),
            "{e}"
        );
        let other = &c;
        let resume = RunOptions {
            resume: true,
            ..Default::default()
        };
        let e = add_task(&in_set(other, &split), &Device::Cpu, &mut Silent, &resume)
            .unwrap_err()
            .to_string();
        assert!(e.contains("was started from another split"), "{e}");
        assert!(
            add(
                &in_set(data, &split),
                RunOptions {
                    resume: true,
                    ..Default::default()
                }
            )
            .completed
        );
    }
    assert_eq!(files(&whole), files(&split), "the resumed set differs");
}

#[test]
fn bad_inputs_are_named() {
    let t = tempfile::tempdir().unwrap();
    let a = write_split(t.path(), "a.jsonl", &["sports", "food"]);
    let model = repo_root().join("tests/fixtures/models/bert");
    let not_a_set = t.path().join("other");
    std::fs::create_dir_all(&not_a_set).unwrap();
    std::fs::write(not_a_set.join("notes.txt"), "x").unwrap();
    let err = |cfg: TrainConfig| {
        add_task(&cfg, &Device::Cpu, &mut Silent, &RunOptions::default())
            .unwrap_err()
            .to_string()
    };
    // --eval-data with a label of no task seen is refused before anything trains.
    let b = write_split(t.path(), "b.jsonl", &["weather", "music"]);
    let e = err(TrainConfig {
        eval_data: Some(b),
        ..config(&model, &a, &t.path().join("s"))
    });
    assert!(
        e.contains(
            "b.jsonl:1: label \"weather\" belongs to no task of the tasks seen after this run"
        ),
        "{e}"
    );
    let e = err(config(&model, &a, &not_a_set));
    assert!(
        e.contains("not a ConPET task set (it has no conpet.json)"),
        "{e}"
    );
    let e = err(TrainConfig {
        task: Task::CausalLm,
        ..config(&model, &a, &t.path().join("s"))
    });
    assert!(
        e.contains("generative (causal-LM) ConPET is not implemented"),
        "{e}"
    );
    let e = err(TrainConfig {
        continual: None,
        output_dir: t.path().join("o"),
        ..config(&model, &a, &t.path().join("s"))
    });
    assert!(
        e.contains("--method conpet adds a task to a ConPET task set"),
        "{e}"
    );
    let lora = AdapterConfig::from_json(json!({"peft_type": "LORA"})).unwrap();
    let e = err(TrainConfig {
        adapter: Some(lora),
        ..config(&model, &a, &t.path().join("s"))
    });
    assert!(
        e.contains("--continual DIR adds a task to a ConPET task set; it needs --method conpet"),
        "{e}"
    );
    let topk0 = AdapterConfig::from_json(json!({"peft_type": "CONPET", "expert_topk": 0})).unwrap();
    let e = err(TrainConfig {
        adapter: Some(topk0),
        ..config(&model, &a, &t.path().join("s"))
    });
    assert!(
        e.contains("expert_topk (--expert-topk) must be at least 1"),
        "{e}"
    );
    assert!(
        !t.path().join("s").exists(),
        "a refused run wrote its folder"
    );
    // A set folder given where one adapter is expected says what to do instead.
    let set = t.path().join("set");
    std::fs::create_dir_all(set.join("task-1")).unwrap();
    std::fs::write(set.join("conpet.json"), "{}").unwrap();
    let e = ferrule::peft_io::find_adapters(&set)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a ConPET task set, which runs only as a whole"),
        "{e}"
    );
}
