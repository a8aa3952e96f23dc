//! The frozen base streamed from disk (`--stream-base`): training reads the matrices in place
//! from the mapped checkpoint and ends with the adapter the in-memory run ends with, byte for
//! byte, on f32, bf16 and NF4 checkpoints (forward, recomputation and backward all read the
//! streamed weights); logits through the adapter are equal; what cannot be streamed is refused
//! with the reason.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use ferrule::adapted::AdaptedModel;
use ferrule::model::{residency, Inputs, LoadOptions, ModelSource};
use ferrule::ops::{ComputeDtype, ComputeDtypeChoice};
use ferrule::quant::{QuantMethod, QuantSpec};
use ferrule::train::{train, RunOptions, Silent, TrainConfig};
use ferrule::tuners::AdapterConfig;

fn config(model: &Path, out: &Path, stream_base: bool, dtype: ComputeDtypeChoice) -> TrainConfig {
    TrainConfig {
        model: model.display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(
            AdapterConfig::from_json(serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}))
                .unwrap(),
        ),
        max_len: Some(64),
        batch_size: Some(4),
        max_steps: Some(3),
        lr: 3e-2,
        seed: 5,
        recompute: true,
        compute_dtype: dtype,
        stream_base,
        ..Default::default()
    }
}

/// The bytes of every file of an adapter folder, by name.
fn folder_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("adapter_") || name == "ferrule_base.json"
        })
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

fn logits(model: &Path, adapter: &Path, stream_base: bool, dtype: ComputeDtype) -> Tensor {
    let options = LoadOptions {
        compute_dtype: dtype,
        stream_base,
        ..Default::default()
    };
    let m = AdaptedModel::load_with(
        model.to_str().unwrap(),
        Some(adapter),
        None,
        &Device::Cpu,
        options,
    )
    .unwrap();
    let t = load("inputs/decoder.safetensors");
    m.model
        .forward(&Inputs {
            input_ids: &t["input_ids"],
            attention_mask: t.get("attention_mask"),
            token_type_ids: None,
        })
        .unwrap()
}

/// The tiny Llama's checkpoint with every float tensor stored in bf16.
fn bf16_copy(out: &Path) {
    let base = fixtures().join("models/llama");
    let mut raw = std::collections::BTreeMap::new();
    for (name, t) in load_abs(&base.join("model.safetensors")) {
        let t = t.to_dtype(DType::BF16).unwrap();
        raw.insert(
            name.clone(),
            ferrule::util::atomic::raw_tensor(&name, &t).unwrap(),
        );
    }
    let source = ModelSource::load(base.to_str().unwrap(), &Device::Cpu).unwrap();
    ferrule::export::write_model_folder(&source, out, &source.config, &raw).unwrap();
}

fn load_abs(p: &Path) -> std::collections::HashMap<String, Tensor> {
    ferrule::model::weights::load_safetensors_file(p, &Device::Cpu).unwrap()
}

/// The tiny Llama quantized to NF4 (double quant) as `ferrule quantize` writes it.
fn nf4_copy(out: &Path) {
    let base = fixtures().join("models/llama");
    let spec = QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap();
    let base = base.to_str().unwrap();
    let source =
        ModelSource::load_with(base, &Device::Cpu, LoadOptions::read_once(None, base)).unwrap();
    ferrule::export::quantize_to_dir(&source, &spec, out).unwrap();
}

/// Trains in memory and streamed; the adapters are byte-identical and so are the logits.
fn streamed_equals_in_memory(model: &Path, dtype: ComputeDtypeChoice) {
    let dir = tempfile::tempdir().unwrap();
    let (mem, streamed) = (dir.path().join("mem"), dir.path().join("streamed"));
    let run = |out: &Path, stream: bool| {
        train(
            &config(model, out, stream, dtype),
            &Device::Cpu,
            &mut Silent,
            &RunOptions::default(),
        )
        .unwrap()
    };
    let (a, b) = (run(&mem, false), run(&streamed, true));
    assert!(a.completed && b.completed && a.steps == 3 && b.steps == 3);
    let (fa, fb) = (folder_bytes(&mem), folder_bytes(&streamed));
    assert!(
        fa.iter().any(|(n, _)| n == "adapter_model.safetensors"),
        "{fa:?}"
    );
    assert_eq!(
        fa.iter().map(|f| &f.0).collect::<Vec<_>>(),
        fb.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in fa.iter().zip(&fb) {
        assert!(
            x == y,
            "{}: {name} differs streamed ({dtype:?})",
            model.display()
        );
    }
    let compute = dtype.resolve().unwrap().dtype;
    let (la, lb) = (
        logits(model, &mem, false, compute),
        logits(model, &mem, true, compute),
    );
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert!(
        bits(&la) == bits(&lb),
        "{}: logits differ streamed ({dtype:?})",
        model.display()
    );
}

#[test]
fn streamed_f32_checkpoints_train_the_in_memory_adapter() {
    // An untied head, and a head tied to the embedding (one streamed table used twice).
    for model in ["models/llama", "models/smollm"] {
        streamed_equals_in_memory(&fixtures().join(model), ComputeDtypeChoice::F32);
    }
}

#[test]
fn a_streamed_bf16_checkpoint_trains_the_in_memory_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let bf16 = dir.path().join("bf16");
    bf16_copy(&bf16);
    // In f32 each use widens the layer into a buffer; in bf16 the mapped values are used as
    // they are (where the CPU computes bf16 at all).
    streamed_equals_in_memory(&bf16, ComputeDtypeChoice::F32);
    if ComputeDtypeChoice::Bf16.resolve().is_ok() {
        streamed_equals_in_memory(&bf16, ComputeDtypeChoice::Bf16);
        streamed_equals_in_memory(&fixtures().join("models/llama"), ComputeDtypeChoice::Bf16);
    } else {
        eprintln!("skipping the bf16 compute cases: this CPU does not compute bf16");
    }
}

#[test]
fn a_streamed_nf4_folder_trains_the_in_memory_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let nf4 = dir.path().join("nf4");
    nf4_copy(&nf4);
    let source = ModelSource::load_with(
        nf4.to_str().unwrap(),
        &Device::Cpu,
        LoadOptions {
            stream_base: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(source.weights.is_streamed());
    streamed_equals_in_memory(&nf4, ComputeDtypeChoice::F32);
}

#[test]
fn what_cannot_be_streamed_is_refused_with_the_reason() {
    let base = fixtures().join("models/llama");
    let dir = tempfile::tempdir().unwrap();
    let run = |cfg: TrainConfig| {
        let e = train(&cfg, &Device::Cpu, &mut Silent, &RunOptions::default()).unwrap_err();
        format!("{e:#}")
    };
    // PiSSA replaces the base by a residual, which is no longer what the file holds.
    let mut pissa = config(&base, &dir.path().join("p"), true, ComputeDtypeChoice::F32);
    pissa.adapter = Some(
        AdapterConfig::from_json(serde_json::json!({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "init_lora_weights": "pissa"}))
            .unwrap(),
    );
    let e = run(pissa);
    assert!(e.contains("--stream-base") && e.contains("residual"), "{e}");
    // --quantize converts while loading.
    let mut quantize = config(&base, &dir.path().join("q"), true, ComputeDtypeChoice::F32);
    quantize.quantize = Some(QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap());
    let e = run(quantize);
    assert!(
        e.contains("--stream-base") && e.contains("ferrule quantize"),
        "{e}"
    );
    // A GGUF file is not mapped.
    let gguf = dir.path().join("m.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let e = ModelSource::load_with(
        gguf.to_str().unwrap(),
        &Device::Cpu,
        LoadOptions {
            stream_base: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--stream-base") && e.contains("GGUF"), "{e}");
}

/// The tiny Llama's frozen base in bytes, streamed: the least `--max-resident-gb` accepts
/// (nothing kept) and the whole base kept.
fn least_and_whole(model: &Path) -> (usize, usize) {
    let source = ModelSource::load_with(
        model.to_str().unwrap(),
        &Device::Cpu,
        LoadOptions {
            stream_base: true,
            ..Default::default()
        },
    )
    .unwrap();
    let w = &source.weights;
    let least = residency::of(w).total();
    let (all, kept) = residency::choose(w, usize::MAX, "--max-resident-gb").unwrap();
    assert_eq!(all.streamed_matrices, 0, "{all:?}");
    assert_eq!(all.window, 0);
    assert_eq!(kept.len(), w.streamed().len());
    (least, all.total())
}

/// `--max-resident-gb` between streaming's least and the whole base: the adapter is the
/// in-memory and the streamed runs' byte for byte; some matrices are kept and some streamed;
/// the streamer's high-water mark of resident mapped bytes stays within the budget less what
/// is held anyway, and above what it keeps. With the whole base as budget, everything is kept.
#[test]
fn a_resident_budget_trains_the_same_adapter_within_it() {
    let model = fixtures().join("models/llama");
    let (least, whole) = least_and_whole(&model);
    assert!(least < whole, "{least} {whole}");
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, stream: bool, budget: Option<usize>| {
        let out = dir.path().join(name);
        let mut cfg = config(&model, &out, stream, ComputeDtypeChoice::F32);
        cfg.max_resident_gb = budget.map(|b| b as f64 / 1e9);
        let s = train(&cfg, &Device::Cpu, &mut Silent, &RunOptions::default()).unwrap();
        assert!(s.completed && s.steps == 3);
        (folder_bytes(&out), s)
    };
    let (mem, s) = run("mem", false, None);
    assert!(s.streamed_base.is_none());
    let (streamed, s) = run("streamed", true, None);
    let all_streamed = s.streamed_base.unwrap();
    assert_eq!(all_streamed.residency.kept_matrices, 0);
    let budget = (least + whole) / 2;
    let (half, s) = run("half", false, Some(budget));
    assert!(mem == streamed && mem == half, "the adapters differ");
    let b = s.streamed_base.unwrap();
    let r = b.residency;
    assert!(r.kept_matrices > 0 && r.streamed_matrices > 0, "{r:?}");
    assert!(r.total() <= budget, "{r:?} over {budget}");
    let peak = b.peak_mapped_resident_bytes;
    assert!(
        peak >= r.kept && peak <= budget - r.held,
        "peak {peak} outside [{}, {}] ({r:?})",
        r.kept,
        budget - r.held
    );
    // Streamed alone, the peak is the window's; with the budget, more stays.
    assert!(all_streamed.peak_mapped_resident_bytes < peak);
    let (full, s) = run("full", false, Some(whole));
    assert!(full == mem);
    let b = s.streamed_base.unwrap();
    assert_eq!(b.residency.streamed_matrices, 0);
    assert_eq!(b.residency.total(), whole);
    assert_eq!(b.peak_mapped_resident_bytes, b.residency.kept);
}

/// A budget below what streaming needs names the least; with --stream-base, or negative, it
/// is refused by name; nothing is written.
#[test]
fn a_resident_budget_too_small_or_doubled_is_refused_by_name() {
    let model = fixtures().join("models/llama");
    let (least, _) = least_and_whole(&model);
    let dir = tempfile::tempdir().unwrap();
    let run = |stream: bool, gb: f64| {
        let out = dir.path().join("out");
        let mut cfg = config(&model, &out, stream, ComputeDtypeChoice::F32);
        cfg.max_resident_gb = Some(gb);
        let e = train(&cfg, &Device::Cpu, &mut Silent, &RunOptions::default()).unwrap_err();
        assert!(!out.join("adapter_model.safetensors").exists());
        format!("{e:#}")
    };
    let e = run(false, (least - 1) as f64 / 1e9);
    let named = format!(
        "needs at least {:.3} GB ({least} bytes)",
        least as f64 / 1e9
    );
    assert!(e.contains("--max-resident-gb") && e.contains(&named), "{e}");
    let e = run(true, 1.0);
    assert!(
        e.contains("--stream-base") && e.contains("--max-resident-gb"),
        "{e}"
    );
    let e = run(false, -1.0);
    assert!(
        e.contains("--max-resident-gb") && e.contains("-1") && e.contains("0 or more"),
        "{e}"
    );
}
