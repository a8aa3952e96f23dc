//! Micro-batches by token budget (`batch_tokens`) and packed bins (`packing`,
//! `train::batching`) through whole training runs on the tiny fixture model: a packed step
//! trains exactly the records of its bin, each as if alone (no record attends to another; with
//! prompt and prefix tuning, each record has the virtual tokens or prefix before it); an
//! epoch covers every record once in the stated number of steps; budgets hold; resuming
//! across an epoch boundary ends with the uninterrupted run's adapter; and the settings that
//! cannot work are errors.

mod common;

use std::path::Path;

use candle_core::Device;
use common::*;
use ferrule::data::{make_batch, Padding};
use ferrule::train::batching::{plan_epoch, Batching};
use ferrule::train::{batch_loss, prepare};
use ferrule::train::{train, RunOptions, Silent, TrainConfig, TrainSummary};
use ferrule::tuners::AdapterConfig;

/// LoRA on the llama fixture over the 24 chat records (19 to 64 tokens), one epoch.
fn config(out: &Path) -> TrainConfig {
    TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(
            AdapterConfig::from_json(serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}))
                .unwrap(),
        ),
        max_len: Some(64),
        lr: 1e-2,
        seed: 3,
        ..Default::default()
    }
}

fn run(cfg: &TrainConfig) -> (TrainSummary, Vec<serde_json::Value>) {
    let s = train(cfg, &Device::Cpu, &mut Silent, &RunOptions::default()).unwrap();
    let steps = ferrule::train::metrics::read_metrics(&cfg.output_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|m| m.get("loss").is_some())
        .collect();
    (s, steps)
}

fn field(m: &serde_json::Value, key: &str) -> f64 {
    m[key].as_f64().unwrap_or_else(|| panic!("no {key} in {m}"))
}

/// The records' token counts, as the trainer encodes them.
fn lengths(cfg: &TrainConfig) -> Vec<usize> {
    prepare(cfg, &Device::Cpu, None)
        .unwrap()
        .train
        .iter()
        .map(|e| e.input_ids.len())
        .collect()
}

#[test]
fn a_packed_step_trains_the_records_of_its_bin_each_as_if_alone() {
    // LoRA, and the methods that put virtual tokens or a key/value prefix before every record.
    let adapters = [
        None,
        Some(serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3})),
        Some(serde_json::json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3})),
    ];
    for adapter in adapters {
        let out = tempfile::tempdir().unwrap();
        let base = config(out.path());
        let cfg = TrainConfig {
            packing: true,
            batch_tokens: Some(160),
            max_steps: Some(1),
            adapter: match &adapter {
                Some(a) => Some(AdapterConfig::from_json(a.clone()).unwrap()),
                None => base.adapter.clone(),
            },
            ..base
        };
        packed_step_equals_records_alone(&cfg);
    }
}

/// The first packed step of `cfg` against each record of its bin on its own.
fn packed_step_equals_records_alone(cfg: &TrainConfig) {
    let p = prepare(cfg, &Device::Cpu, None).unwrap();
    let what = cfg.adapter().unwrap().peft_type;
    let lengths: Vec<usize> = p.train.iter().map(|e| e.input_ids.len()).collect();
    let bin = &plan_epoch(p.batching, cfg.seed, 0, &lengths)[0];
    assert!(bin.len() >= 3, "the first bin holds {} records", bin.len());
    // Each record of the bin on its own (a batch of one, padded layout): the token-weighted mean.
    let (mut sum, mut count) = (0f64, 0usize);
    for &i in bin {
        let one = make_batch(
            &[&p.train[i]],
            Padding::Longest,
            p.pad_id,
            p.max_len,
            &Device::Cpu,
        )
        .unwrap();
        let (loss, n, _) = batch_loss(&p.model, &one).unwrap();
        sum += loss.to_scalar::<f32>().unwrap() as f64 * n as f64;
        count += n;
    }
    let alone = sum / count as f64;
    let (_, steps) = run(cfg);
    let packed = field(&steps[0], "loss");
    // A record attending to another's tokens moves this by far more than float rounding.
    assert!(
        (packed - alone).abs() <= 1e-5 * alone.abs(),
        "{what}: packed step loss {packed}, records alone {alone}"
    );
    assert_eq!(
        field(&steps[0], "tokens") as usize,
        bin.iter().map(|&i| lengths[i]).sum::<usize>()
    );
}

#[test]
fn an_epoch_of_packed_bins_trains_every_record_once_in_the_stated_steps() {
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        packing: true,
        batch_tokens: Some(160),
        ..config(out.path())
    };
    let lengths = lengths(&cfg);
    let bins = plan_epoch(Batching::Packed(160), cfg.seed, 0, &lengths);
    let (s, steps) = run(&cfg);
    assert_eq!(
        (s.steps, s.micro_batches_per_epoch, s.steps_per_epoch),
        (bins.len(), bins.len(), bins.len() as f64)
    );
    assert!(
        s.batching.starts_with(&format!(
            "packed: 24 records in {} bins of at most 160 tokens",
            bins.len()
        )),
        "{}",
        s.batching
    );
    let tokens: Vec<usize> = steps.iter().map(|m| field(m, "tokens") as usize).collect();
    assert!(tokens.iter().all(|&t| t <= 160), "{tokens:?}");
    assert_eq!(tokens.iter().sum::<usize>(), lengths.iter().sum::<usize>());
    // Best-fit decreasing packs these 24 records into as few bins as their tokens allow, or one more.
    assert!(
        bins.len() <= lengths.iter().sum::<usize>().div_ceil(160) + 1,
        "{} bins",
        bins.len()
    );

    // Accumulating 2 micro-batches per step: half the steps, rounded up, and with an odd
    // number of bins the last step takes the one bin left, not one of the next epoch.
    assert_eq!(
        bins.len() % 2,
        1,
        "the fixture should give an odd number of bins"
    );
    let out2 = tempfile::tempdir().unwrap();
    let (s2, steps2) = run(&TrainConfig {
        grad_accum: 2,
        output_dir: out2.path().to_path_buf(),
        ..cfg
    });
    assert_eq!(s2.steps, bins.len().div_ceil(2));
    assert_eq!(
        steps2
            .iter()
            .map(|m| field(m, "tokens") as usize)
            .sum::<usize>(),
        lengths.iter().sum::<usize>()
    );
    assert_eq!(field(steps2.last().unwrap(), "epoch"), 1.0);
}

#[test]
fn batch_tokens_takes_consecutive_records_within_the_budget() {
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        batch_tokens: Some(100),
        ..config(out.path())
    };
    let lengths = lengths(&cfg);
    let batches = plan_epoch(Batching::Tokens(100), cfg.seed, 0, &lengths);
    let (s, steps) = run(&cfg);
    assert_eq!(s.steps, batches.len());
    let tokens: Vec<usize> = steps.iter().map(|m| field(m, "tokens") as usize).collect();
    let planned: Vec<usize> = batches
        .iter()
        .map(|b| b.iter().map(|&i| lengths[i]).sum())
        .collect();
    assert_eq!(tokens, planned);
    assert!(
        tokens.iter().all(|&t| t <= 100) && tokens.iter().any(|&t| t > 64),
        "{tokens:?}"
    );
}

#[test]
fn a_packed_run_resumed_across_an_epoch_boundary_ends_with_the_same_adapter() {
    let (whole, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = |out: &Path| TrainConfig {
        packing: true,
        batch_tokens: Some(160),
        epochs: 2.0,
        ..config(out)
    };
    let (s, _) = run(&cfg(whole.path()));
    let per_epoch = s.micro_batches_per_epoch;
    assert_eq!(s.steps, 2 * per_epoch);
    let dev = Device::Cpu;
    let stop = RunOptions {
        stop_after: Some(per_epoch - 1),
        ..Default::default()
    };
    assert!(
        !train(&cfg(split.path()), &dev, &mut Silent, &stop)
            .unwrap()
            .completed
    );
    let stop = RunOptions {
        resume: true,
        stop_after: Some(per_epoch + 1),
        ..Default::default()
    };
    assert!(
        !train(&cfg(split.path()), &dev, &mut Silent, &stop)
            .unwrap()
            .completed
    );
    assert!(
        train(
            &cfg(split.path()),
            &dev,
            &mut Silent,
            &RunOptions {
                resume: true,
                ..Default::default()
            }
        )
        .unwrap()
        .completed
    );
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(whole.path()), bytes(split.path()));
}

#[test]
fn token_budgets_refuse_what_they_cannot_do() {
    let out = tempfile::tempdir().unwrap();
    let error = |cfg: TrainConfig| {
        format!(
            "{:#}",
            train(&cfg, &Device::Cpu, &mut Silent, &RunOptions::default()).unwrap_err()
        )
    };
    let run_dir = out.path().join("run");
    let base = || config(&run_dir);
    let e = error(TrainConfig {
        packing: true,
        padding: Some(Padding::Longest),
        ..base()
    });
    assert!(
        e.contains("packing needs padding-free batches") && e.contains("padding = \"longest\""),
        "{e}"
    );
    let e = error(TrainConfig {
        batch_tokens: Some(128),
        pad_to_max_len: true,
        ..base()
    });
    assert!(e.contains("batch_tokens needs padding-free batches"), "{e}");
    let e = error(TrainConfig {
        batch_tokens: Some(32),
        ..base()
    });
    assert!(
        e.contains("batch_tokens = 32 is smaller than max_len = 64"),
        "{e}"
    );
    // Packing without a budget packs bins of batch_size x max_len tokens.
    assert_eq!(
        Batching::of(
            &TrainConfig {
                packing: true,
                batch_size: Some(3),
                ..base()
            },
            64
        )
        .unwrap(),
        Batching::Packed(192)
    );
    let e = error(TrainConfig {
        batch_size: Some(4),
        batch_tokens: Some(128),
        ..base()
    });
    assert!(
        e.contains("batch_size = 4 and batch_tokens = 128") && e.contains("set one of them"),
        "{e}"
    );
    let e = error(TrainConfig {
        batch_tokens: Some(0),
        ..base()
    });
    assert!(e.contains("at least 1"), "{e}");
    assert!(
        !run_dir.exists(),
        "a run refused for its settings created its output folder"
    );
}
