//! PST (`--method pst`) against the reference's formulas restated in torch
//! (tests/fixtures/pst/make_pst_fixtures.py, alibaba/AliceMind `S4/PST/pst`): the forward
//! pass, loss and the gradients of all six trained tensors at a fixed sparsity (with and
//! without recomputation); the sparsity schedule at every step of three runs; merge writes
//! the pruned weights under the base's keys (the reference's masks, the reported sparsity per
//! matrix) and equals the unmerged model; a run resumes to the same bytes; `plan` counts from
//! shapes what the adapter holds; bad settings and quantized bases are errors naming them.

mod common;

use std::collections::{BTreeSet, HashMap};

use candle_core::{Device, Tensor};
use common::method::*;
use common::*;
use ferrule::adapted::attach;
use ferrule::dist::plan::PlannedModel;
use ferrule::model::{Frozen, LoadOptions, Model, ModelSource, Task};
use ferrule::ops::ComputeDtypeChoice;
use ferrule::peft_io::load_adapter;
use ferrule::quant::{QuantMethod, QuantSpec};
use ferrule::train::TrainConfig;
use ferrule::tuners::pst::layer::scheduled_sparsity;
use ferrule::tuners::pst::PstConfig;
use ferrule::tuners::{AdapterConfig, BuildContext, Tuner};
use serde_json::json;

/// The fixture's sparsity (its adapter_config.json).
const SPARSITY: f64 = 0.55;

fn llama() -> ModelSource {
    fixture_source("llama", Task::CausalLm)
}

/// The fixture's adapter, loaded as a saved adapter (outside a run: at its `sparsity`).
fn build(src: &ModelSource) -> (Model, Box<dyn Tuner>) {
    saved_tuned(&fixtures().join("pst/case"), "PST", src, Task::CausalLm)
}

#[test]
fn the_forward_pass_and_every_gradient_are_the_references() {
    let src = llama();
    let inp = load("inputs/decoder.safetensors");
    let exp = load("pst/case/expected.safetensors");
    let (model, tuner) = build(&src);
    // (4 + 3 + 1)(in + out) per layer: q_proj 64+64, v_proj 64+32, down_proj 128+64; 2 layers.
    assert_eq!(
        ferrule::tuners::trainable_params(tuner.as_ref()),
        2 * 8 * (128 + 96 + 192)
    );
    assert_eq!(tuner.trainable().len(), 2 * 3 * 6);
    let d = max_diff(&logits(&model, &inp), &exp["logits"]);
    assert!(d < 1e-4, "logits differ by {d}");
    let want_loss = exp["loss"].to_vec1::<f32>().unwrap()[0];
    for recompute in [false, true] {
        let (loss, grads) = loss_grads(&model, tuner.as_ref(), &inp, &exp["labels"], recompute);
        assert!(
            (loss - want_loss).abs() < 1e-5,
            "loss {loss} vs {want_loss}"
        );
        for (k, g) in &grads {
            let want = &exp[&format!("grad.{k}")];
            let e = rel_err(g, want);
            assert!(e < 1e-4, "recompute {recompute}: gradient of {k}: {e}");
            // Every tensor learns: U through W̃ and |W̃|, R and C through the straight-through mask.
            assert!(max_diff(g, &g.zeros_like().unwrap()) > 0.0, "{k}");
        }
    }
}

#[test]
fn the_schedule_is_the_references_at_every_step() {
    let rows = load("pst/case/expected.safetensors")["schedule"]
        .to_vec2::<f64>()
        .unwrap();
    assert_eq!(rows.len(), 101 + 8 + 34);
    for row in rows {
        let [step, total, iw, fw, si, sf, want] = row[..] else {
            panic!("7 columns")
        };
        let c: PstConfig = serde_json::from_value(json!({
            "initial_warmup": iw, "final_warmup": fw, "initial_sparsity": si, "sparsity": sf,
        }))
        .unwrap();
        c.validate().unwrap();
        let got = scheduled_sparsity(step as u64, total as u64, &c);
        assert_eq!(
            got, want,
            "step {step} of {total} ({iw}, {fw}, {si} -> {sf})"
        );
    }
}

/// `ferrule merge` writes `M ⊙ W̃` under each base key (the reference's masks: zero exactly
/// where the reference pruned), reports each matrix's zeros, drops PST's tensors, and the
/// merged model computes what the adapted one does.
#[test]
fn merge_writes_the_references_sparse_weights_and_equals_the_unmerged_model() {
    let src = llama();
    let inp = load("inputs/decoder.safetensors");
    let exp = load("pst/case/expected.safetensors");
    let (model, tuner) = build(&src);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = ferrule::merge::merge_to_dir(&src, tuner.as_ref(), Task::CausalLm, &out).unwrap();
    assert_eq!(report.merged_modules, 6);
    assert_eq!(report.pruned.len(), 6, "{:?}", report.pruned);
    let merged_weights = load_abs(&out.join("model.safetensors"));
    let base_keys: BTreeSet<String> = src.weights.names().into_iter().collect();
    let merged_keys: BTreeSet<String> = merged_weights.keys().cloned().collect();
    assert_eq!(merged_keys, base_keys, "the base's keys, no PST tensor");
    for (name, pruned) in &report.pruned {
        let path = name.strip_suffix(".weight").unwrap();
        let kept = &exp[&format!("kept.{path}")];
        let n = kept.elem_count();
        let want = (n as f64 * SPARSITY).floor() as usize;
        assert_eq!((pruned.zeros, pruned.elements), (want, n), "{name}");
        assert_eq!(pruned.sparsity, want as f64 / n as f64);
        let zero_here: Vec<bool> = values_f64(&merged_weights[name])
            .iter()
            .map(|v| *v == 0.0)
            .collect();
        let pruned_there: Vec<bool> = values_f64(kept).iter().map(|v| *v == 0.0).collect();
        assert_eq!(zero_here, pruned_there, "{name}: the reference's mask");
    }
    let merged_src = ModelSource::load(out.to_str().unwrap(), &Device::Cpu).unwrap();
    let merged = Model::build(&merged_src, Task::CausalLm, &Frozen, &Device::Cpu, 0).unwrap();
    let d = max_diff(&logits(&merged, &inp), &logits(&model, &inp));
    assert!(d < 1e-5, "merged vs unmerged logits differ by {d}");
}

fn load_abs(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn run_config(out: &std::path::Path) -> TrainConfig {
    TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(
            AdapterConfig::from_json(json!({
                "peft_type": "PST", "sparsity": 0.5, "weight_rank": 4, "mask_rank": 2,
                "initial_warmup": 0.2, "final_warmup": 0.3,
                "target_modules": ["q_proj", "up_proj"]
            }))
            .unwrap(),
        ),
        max_len: Some(64),
        batch_size: Some(2),
        grad_accum: 2,
        max_steps: Some(6),
        lr: 1e-2,
        seed: 3,
        compute_dtype: ComputeDtypeChoice::F32,
        ..Default::default()
    }
}

/// Six steps: sparsity 0 at steps 0-1, rising at 2-4, 0.5 at 5. Stopped at 3, mid-rise, and
/// resumed, the adapter has the same bytes; the saved adapter has the reference's names and
/// merges at its target sparsity.
#[test]
fn a_run_resumes_to_the_same_adapter_and_merges_at_its_sparsity() {
    let whole = assert_resume_is_byte_identical(run_config, 3);
    let dev = Device::Cpu;
    let saved = load_adapter(whole.path(), &dev).unwrap();
    assert_eq!(saved.peft_type(), "PST");
    for key in [
        "sparsity",
        "weight_rank",
        "mask_rank",
        "weight_beta",
        "mask_alpha1",
    ] {
        assert!(saved.config.get(key).is_some(), "{key}: {}", saved.config);
    }
    assert_eq!(saved.config["initial_warmup"], 0.2);
    assert_eq!(saved.tensors.len(), 2 * 2 * 6);
    // V, B, R and C started at zero and trained.
    for suffix in [
        "weight_V",
        "mask_scores_B",
        "mask_scores_R",
        "mask_scores_C",
    ] {
        let t = &saved.tensors[&format!("base_model.model.model.layers.0.mlp.up_proj.{suffix}")];
        assert!(max_diff(t, &t.zeros_like().unwrap()) > 0.0, "{suffix}");
    }
    let model = fixtures().join("models/llama");
    let out = whole.path().join("merged");
    let m = ferrule::adapted::AdaptedModel::load(
        model.to_str().unwrap(),
        Some(whole.path()),
        None,
        &dev,
    )
    .unwrap();
    let report =
        ferrule::merge::merge_to_dir(&m.source, m.tuner.as_deref().unwrap(), Task::CausalLm, &out)
            .unwrap();
    assert_eq!(report.pruned.len(), 4);
    for (name, p) in &report.pruned {
        assert_eq!(p.zeros, p.elements / 2, "{name}");
    }
}

/// `ferrule plan` on a `config.json` alone counts what the built adapter holds.
#[test]
fn plan_counts_from_shapes_what_the_adapter_holds() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("models/llama/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    for options in [json!({}), json!({"weight_rank": 2, "mask_rank": 5})] {
        let built = fresh(&llama(), options.clone()).unwrap();
        let n = ferrule::tuners::trainable_params(built.tuner.as_ref());
        let cfg = adapter(options.clone());
        let plan = PlannedModel::load(
            tmp.path().to_str().unwrap(),
            &cfg,
            Some(Task::CausalLm),
            LoadOptions::default(),
            false,
        )
        .unwrap();
        assert_eq!(plan.trainable, n, "{options}");
    }
    // The defaults (ranks 8, every linear of both blocks): 17 (in + out) per linear; q and o
    // 64 + 64, k and v 64 + 32, gate, up and down 64 + 128.
    let per_block = 2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128);
    assert_eq!(
        ferrule::tuners::trainable_params(fresh(&llama(), json!({})).unwrap().tuner.as_ref()),
        2 * 17 * per_block
    );
}

fn adapter(options: serde_json::Value) -> AdapterConfig {
    let mut o = options;
    o["peft_type"] = json!("PST");
    AdapterConfig::from_json(o).unwrap()
}

fn fresh(
    src: &ModelSource,
    options: serde_json::Value,
) -> anyhow::Result<ferrule::adapted::TunedModel> {
    let dev = Device::Cpu;
    let ctx = BuildContext::fresh(&dev);
    attach(src, Task::CausalLm, &adapter(options), ctx)
}

fn error_of(src: &ModelSource, options: serde_json::Value) -> String {
    match fresh(src, options.clone()) {
        Ok(_) => panic!("pst attached with {options}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_settings_and_quantized_bases_are_refused_by_name() {
    let src = llama();
    let e = error_of(&src, json!({"sparsity": 1.0}));
    assert!(e.contains("sparsity (--pst-sparsity) is 1"), "{e}");
    let e = error_of(&src, json!({"weight_rank": 0}));
    assert!(e.contains("weight_rank (--pst-weight-rank) is 0"), "{e}");
    let e = error_of(&src, json!({"mask_rank": 0}));
    assert!(e.contains("mask_rank (--pst-mask-rank) is 0"), "{e}");
    let spec = QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap();
    let dir = fixtures().join("models/llama");
    let nf4 = ModelSource::load_with(
        dir.to_str().unwrap(),
        &Device::Cpu,
        LoadOptions::quantized(Some(&spec)),
    )
    .unwrap();
    let e = error_of(&nf4, json!({"target_modules": ["q_proj"]}));
    assert!(
        e.contains("pst: model.layers.0.self_attn.q_proj.weight is held quantized (nf4")
            && e.contains("needs the dense weight"),
        "{e}"
    );
}
