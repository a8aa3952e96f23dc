//! DyLoRA (`--method dylora`) against the reference's semantics restated in torch
//! (tests/fixtures/dylora/make_dylora_fixtures.py): the forward pass, loss, both factors'
//! gradients (frozen and unfrozen, with and without recomputation) and one clipped AdamW step
//! at a fixed training rank; evaluation at every rank; merge at a rank equals the unmerged
//! model; a plain LoRA exported at a rank gives peft's logits (tests/fixtures/dylora/roundtrip,
//! made by make_dylora_roundtrip.sh with peft 0.21); resumed runs are byte-identical; a rank
//! above r and a rank on another method are errors naming them.

mod common;

use candle_core::{Device, Tensor};
use common::method::*;
use common::*;
use ferrule::adapted::AdaptedModel;
use ferrule::model::{Frozen, Model, ModelSource, Task};
use ferrule::ops::ComputeDtypeChoice;
use ferrule::peft_io::load_adapter;
use ferrule::train::optim::{AdamW, AdamWConfig};
use ferrule::train::TrainConfig;
use ferrule::tuners::dylora::layer::RankChoice;
use ferrule::tuners::{AdapterConfig, Tuner};

const CASES: &[&str] = &["frozen_b3", "unfrozen_b3", "frozen_b1"];
const R: usize = 4;

fn llama() -> ModelSource {
    fixture_source("llama", Task::CausalLm)
}

/// The fixture's adapter, loaded as a saved adapter.
fn build(case: &str, src: &ModelSource) -> (Model, Box<dyn Tuner>) {
    let dir = fixtures().join("dylora").join(case);
    saved_tuned(&dir, "DYLORA", src, Task::CausalLm)
}

/// Puts the tuner in training at an optimizer step whose drawn rank is `b`: the rank comes
/// from the seed and the step only, so the test finds such a step rather than forcing it.
fn train_at_rank(tuner: &dyn Tuner, b: usize) {
    let clock = tuner.mode();
    clock.set_training(true);
    let choice = RankChoice::new(R);
    let step = (0..1000)
        .find(|&s| {
            clock.set_optimizer_step(s);
            choice.training_rank(clock) == b
        })
        .expect("a step drawing b");
    clock.set_optimizer_step(step);
}

/// Components (rows of A, columns of B) whose gradient is exactly zero.
fn dead_components(key: &str, g: &Tensor) -> Vec<bool> {
    let g = if key.contains("lora_B") {
        g.t().unwrap()
    } else {
        g.clone()
    };
    g.abs()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|s| *s == 0.0)
        .collect()
}

#[test]
fn a_training_step_at_rank_b_is_the_references() {
    let src = llama();
    let inp = load("inputs/decoder.safetensors");
    for case in CASES {
        let exp = load(&format!("dylora/{case}/expected.safetensors"));
        let b = exp["rank"].to_vec1::<i64>().unwrap()[0] as usize;
        let (model, tuner) = build(case, &src);
        // q_proj 4·(64+64), v_proj 4·(64+32), down_proj 4·(128+64), in 2 layers.
        assert_eq!(
            ferrule::tuners::trainable_params(tuner.as_ref()),
            2 * 4 * (128 + 96 + 192)
        );
        train_at_rank(tuner.as_ref(), b);
        let d = max_diff(&logits(&model, &inp), &exp["logits"]);
        assert!(d < 1e-4, "{case}: logits at b = {b} differ by {d}");
        let want_loss = exp["loss"].to_vec1::<f32>().unwrap()[0];
        let mut first = None;
        for recompute in [false, true] {
            let (loss, grads) = loss_grads(&model, tuner.as_ref(), &inp, &exp["labels"], recompute);
            assert!(
                (loss - want_loss).abs() < 1e-5,
                "{case}: loss {loss} vs {want_loss}"
            );
            for (k, g) in &grads {
                let want = &exp[&format!("grad.{k}")];
                let e = rel_err(g, want);
                assert!(
                    e < 1e-4,
                    "{case} (recompute {recompute}): gradient of {k}: {e}"
                );
                // The untrained components get exactly no gradient, as torch's detach gives.
                assert_eq!(
                    dead_components(k, g),
                    dead_components(k, want),
                    "{case}: {k}"
                );
            }
            first.get_or_insert(grads);
        }
        let cfg = AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(tuner.trainable(), cfg);
        opt.step_with(&clipped(&first.unwrap())).unwrap();
        for (k, v) in tuner.trainable() {
            let e = rel_err(v.as_tensor(), &exp[&format!("param.{k}")]);
            assert!(e < 1e-4, "{case}: {k} after the step: {e}");
        }
    }
}

#[test]
fn every_rank_evaluates_as_the_reference_and_merges_exactly() {
    let src = llama();
    let inp = load("inputs/decoder.safetensors");
    let exp = load("dylora/frozen_b3/expected.safetensors");
    let (model, tuner) = build("frozen_b3", &src);
    assert_eq!(tuner.max_rank(), Some(R));
    // Outside training the adapter runs at r until a rank is chosen.
    let d = max_diff(&logits(&model, &inp), &exp[&format!("logits_rank{R}")]);
    assert!(d < 1e-4, "default rank: {d}");
    let tmp = tempfile::tempdir().unwrap();
    for b in 1..=R {
        tuner.set_rank(b).unwrap();
        let adapted = logits(&model, &inp);
        let d = max_diff(&adapted, &exp[&format!("logits_rank{b}")]);
        assert!(d < 1e-4, "rank {b}: logits differ by {d}");
        let out = tmp.path().join(format!("merged{b}"));
        ferrule::merge::merge_to_dir(&src, tuner.as_ref(), Task::CausalLm, &out).unwrap();
        let merged_src = ModelSource::load(out.to_str().unwrap(), &Device::Cpu).unwrap();
        let merged = Model::build(&merged_src, Task::CausalLm, &Frozen, &Device::Cpu, 0).unwrap();
        let d = max_diff(&logits(&merged, &inp), &adapted);
        assert!(
            d < 1e-5,
            "rank {b}: merged vs unmerged logits differ by {d}"
        );
    }
    // The ranks differ from each other: a check that the rank is really applied.
    let d = max_diff(&exp["logits_rank1"], &exp["logits_rank4"]);
    assert!(d > 1e-2, "{d}");
}

/// The roundtrip fixture: a DyLoRA adapter ferrule trained, the plain LoRA `export lora`
/// wrote from it at rank 2, and peft's logits for that LoRA. ferrule's DyLoRA at rank 2 gives
/// peft's logits, and exporting again writes the same tensors and config.
#[test]
fn a_rank_exported_as_plain_lora_is_what_peft_loads() {
    let rt = fixtures().join("dylora/roundtrip");
    let model = fixtures().join("models/llama");
    let m = AdaptedModel::load(
        model.to_str().unwrap(),
        Some(&rt.join("dylora")),
        None,
        &Device::Cpu,
    )
    .unwrap();
    m.set_rank(2).unwrap();
    let inp = load("inputs/decoder.safetensors");
    let want = &load("dylora/roundtrip/peft_logits.safetensors")["logits"];
    let d = max_diff_masked(&logits(&m.model, &inp), want, Some(&inp["attention_mask"]));
    assert!(d < 1e-4, "ferrule's DyLoRA at rank 2 vs peft's LoRA: {d}");
    m.set_rank(4).unwrap();
    let d = max_diff_masked(&logits(&m.model, &inp), want, Some(&inp["attention_mask"]));
    assert!(d > 1e-3, "rank 4 should differ from rank 2: {d}");

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora_r2");
    let report = ferrule::export::lora::export_plain_lora(
        model.to_str().unwrap(),
        &rt.join("dylora"),
        Some(2),
        &out,
    )
    .unwrap();
    assert_eq!((report.rank, report.max_rank), (2, R));
    let (again, committed) = (
        load_adapter(&out, &Device::Cpu).unwrap(),
        load_adapter(&rt.join("lora_r2"), &Device::Cpu).unwrap(),
    );
    assert_eq!(again.config, committed.config);
    assert_eq!(again.config["r"], 2);
    assert_eq!(again.config["peft_type"], "LORA");
    assert_eq!(again.tensors.len(), committed.tensors.len());
    for (k, t) in &committed.tensors {
        assert_eq!(max_diff(&again.tensors[k], t), 0.0, "{k}");
        assert_eq!(t.dim(0).unwrap().min(t.dim(1).unwrap()), 2, "{k}");
    }
    let e = ferrule::export::lora::export_plain_lora(
        model.to_str().unwrap(),
        &rt.join("dylora"),
        Some(1),
        &out,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("already exists"), "{e:#}");
}

fn run_config(frozen: bool) -> impl Fn(&std::path::Path) -> TrainConfig {
    move |out| TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(
            AdapterConfig::from_json(serde_json::json!({
                "peft_type": "DYLORA", "r": R, "lora_alpha": 8, "lora_dropout": 0.1,
                "frozen": frozen, "target_modules": ["q_proj", "v_proj"]
            }))
            .unwrap(),
        ),
        max_len: Some(64),
        batch_size: Some(2),
        grad_accum: 2,
        max_steps: Some(4),
        lr: 3e-2,
        seed: 3,
        compute_dtype: ComputeDtypeChoice::F32,
        ..Default::default()
    }
}

#[test]
fn interrupted_runs_resume_to_the_same_adapter_in_both_variants() {
    for frozen in [true, false] {
        let whole = assert_resume_is_byte_identical(run_config(frozen), 2);
        let saved = load_adapter(whole.path(), &Device::Cpu).unwrap();
        assert_eq!(saved.peft_type(), "DYLORA");
        assert_eq!(saved.config["frozen"], frozen);
        // B started at zero and trained.
        let b = &saved.tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
        assert_eq!(b.dims(), [64, R]);
        assert!(max_diff(b, &b.zeros_like().unwrap()) > 0.0);
    }
}

#[test]
fn a_rank_above_r_or_on_another_method_is_refused_by_name() {
    let src = llama();
    let (_model, tuner) = build("frozen_b3", &src);
    for bad in [0, R + 1] {
        let e = tuner.set_rank(bad).unwrap_err().to_string();
        assert!(
            e.contains(&format!("--rank {bad}")) && e.contains("r = 4") && e.contains("1..=4"),
            "{e}"
        );
    }
    // A plain LoRA adapter has one rank.
    let dir = fixtures().join("dylora/roundtrip/lora_r2");
    let model = fixtures().join("models/llama");
    let m = AdaptedModel::load(model.to_str().unwrap(), Some(&dir), None, &Device::Cpu).unwrap();
    let e = format!("{:#}", m.set_rank(1).unwrap_err());
    assert!(e.contains("--rank 1: a LORA adapter has one rank"), "{e}");
    let e = format!("{:#}", m.ranks("--every-rank").unwrap_err());
    assert!(e.contains("--every-rank") && e.contains("LORA"), "{e}");
    let base = AdaptedModel::load(model.to_str().unwrap(), None, None, &Device::Cpu).unwrap();
    let e = format!("{:#}", base.set_rank(1).unwrap_err());
    assert!(e.contains("no adapter was loaded"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let e = ferrule::export::lora::export_plain_lora(
        model.to_str().unwrap(),
        &dir,
        None,
        &tmp.path().join("out"),
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("LORA, which has one rank"),
        "{e:#}"
    );
    assert!(!tmp.path().join("out").exists() && !tmp.path().join("out.tmp").exists());
}
