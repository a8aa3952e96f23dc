//! PELA (`--method pela`) against its reference, guoyang9/PELA, whose factorisation
//! (`low_rank.py`) and regulariser (`model_pretrain.py`, `inf_norm`) the committed script
//! `tests/fixtures/pela/make_pela_fixtures.py` writes out in torch on the tiny Llama: loading
//! the reference's factors gives its logits, its regulariser and the gradients of
//! `loss + regulariser`; a fresh adapter starts at the reference's products `R L` (its
//! factors differ only by the SVD's signs); the merged dense folder gives the factorised
//! model's logits; the feature distillation against the unfactorised model gives the
//! reference's term and gradients; a run with the regulariser and the distillation resumes to
//! the same bytes; and a layer whose rank
//! would be 0 is an error naming it.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::method::*;
use common::*;
use ferrule::adapted::attach;
use ferrule::data::Batch;
use ferrule::dist::plan::PlannedModel;
use ferrule::model::{Arch, Frozen, LoadOptions, Model, ModelSource, Task};
use ferrule::ops::ComputeDtypeChoice;
use ferrule::peft_io::load_adapter;
use ferrule::train::distill::loss_with_distillation;
use ferrule::train::TrainConfig;
use ferrule::tuners::{AdapterConfig, BuildContext, Tuner};

fn source() -> ModelSource {
    fixture_source("llama", Task::CausalLm)
}

fn expected() -> HashMap<String, Tensor> {
    load("pela/llama/expected.safetensors")
}

fn fresh(options: serde_json::Value) -> anyhow::Result<(Model, Box<dyn Tuner>)> {
    fresh_on("llama", Task::CausalLm, options)
}

fn fresh_on(
    model: &str,
    task: Task,
    options: serde_json::Value,
) -> anyhow::Result<(Model, Box<dyn Tuner>)> {
    let mut cfg = serde_json::json!({"peft_type": "PELA"});
    cfg.as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    let ctx = BuildContext {
        seed: 0,
        device: &Device::Cpu,
        weights: None,
        allow_unmatched: false,
        release_base: None,
    };
    let tuned = attach(
        &fixture_source(model, task),
        task,
        &AdapterConfig::from_json(cfg)?,
        ctx,
    )?;
    Ok((tuned.model, tuned.tuner))
}

/// `ferrule plan` on a `config.json` alone counts what the built adapter holds: the tiny
/// Llama's linears have no bias, BERT's have.
#[test]
fn plan_counts_from_shapes_what_the_adapter_holds() {
    let cases = [
        ("llama", Task::CausalLm, serde_json::json!({})),
        (
            "llama",
            Task::CausalLm,
            serde_json::json!({"target_modules": ["q_proj", "down_proj"], "compress_ratio": 2}),
        ),
        ("bert", Task::FeatureExtraction, serde_json::json!({})),
    ];
    for (model, task, options) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let config = fixtures().join("models").join(model).join("config.json");
        std::fs::copy(config, tmp.path().join("config.json")).unwrap();
        let (_, tuner) = fresh_on(model, task, options.clone()).unwrap();
        let built = ferrule::tuners::trainable_params(tuner.as_ref());
        let mut cfg = serde_json::json!({"peft_type": "PELA"});
        cfg.as_object_mut()
            .unwrap()
            .extend(options.as_object().unwrap().clone());
        let plan = PlannedModel::load(
            tmp.path().to_str().unwrap(),
            &AdapterConfig::from_json(cfg).unwrap(),
            Some(task),
            LoadOptions::default(),
            false,
        )
        .unwrap();
        assert_eq!(plan.trainable, built, "{model} {options}");
    }
}

#[test]
fn the_references_factors_give_its_logits_regulariser_and_gradients() {
    let dev = Device::Cpu;
    let saved = load_adapter(&fixtures().join("pela/llama"), &dev).unwrap();
    assert_eq!(saved.peft_type(), "PELA");
    let tuner = saved.into_tuner(0, &dev).unwrap();
    let model = Model::build(&source(), Task::CausalLm, tuner.as_ref(), &dev, 0).unwrap();
    tuner.finish().unwrap();
    assert_eq!(tuner.adapted().len(), 14, "every linear but lm_head");
    let exp = expected();
    let inp = load("inputs/decoder.safetensors");
    let d = max_diff(&logits(&model, &inp), &exp["logits"]);
    assert!(d < 1e-4, "logits differ from the reference's by {d}");

    let Arch::Decoder(lm) = &model.arch else {
        panic!("a decoder")
    };
    let mask = Some(&inp["attention_mask"]);
    let (loss, _) = lm
        .causal_lm_loss(&inp["input_ids"], mask, None, &exp["labels"])
        .unwrap();
    let reg = tuner.regularizer().unwrap().expect("norm_weight is 1");
    let scalar = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((scalar(&loss) - scalar(&exp["loss"])).abs() < 1e-5);
    let (r, want) = (scalar(&reg), scalar(&exp["reg"]));
    assert!((r - want).abs() < 1e-5 * want, "regulariser {r} vs {want}");
    let grads = (loss + reg).unwrap().backward().unwrap();
    for (k, v) in tuner.trainable() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{k}: no gradient"));
        let e = rel_err(g, &exp[&format!("grad.{k}")]);
        assert!(e < 1e-4, "{k}: gradient off by {e} of its largest entry");
    }
}

/// At c = 3 the tiny Llama's q_proj ([64, 64]) gets k = 4096 / 384 = 10, k_proj ([32, 64])
/// 2048 / 288 = 7, gate_proj ([128, 64]) 8192 / 576 = 14.
#[test]
fn a_fresh_adapter_starts_at_the_references_low_rank_products() {
    let (model, tuner) = fresh(serde_json::json!({})).unwrap();
    // The factorised model's total: the base less the 14 replaced [out, in] weights (per block
    // 2·64·64 + 2·32·64 + 3·128·64 = 36864) plus the factors (per block 10·128 + 2·7·96 +
    // 10·128 + 3·14·192 = 11968).
    assert_eq!(
        ferrule::tuners::total_params(model.base_params, tuner.as_ref()),
        model.base_params - 2 * 36864 + 2 * 11968
    );
    let exp = expected();
    let trainable: HashMap<String, Tensor> = tuner
        .trainable()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    let layer0 = "model.layers.0";
    assert_eq!(
        trainable[&format!("{layer0}.self_attn.q_proj.0.weight")].dims(),
        [10, 64]
    );
    assert_eq!(
        trainable[&format!("{layer0}.self_attn.k_proj.1.weight")].dims(),
        [32, 7]
    );
    assert_eq!(
        trainable[&format!("{layer0}.mlp.gate_proj.0.weight")].dims(),
        [14, 64]
    );
    for (name, want) in exp.iter().filter(|(k, _)| k.starts_with("product.")) {
        let path = &name["product.".len()..];
        let (l, r) = (
            &trainable[&format!("{path}.0.weight")],
            &trainable[&format!("{path}.1.weight")],
        );
        let e = rel_err(&r.matmul(l).unwrap(), want);
        assert!(e < 1e-4, "{path}: R L off by {e}");
    }
}

/// The feature distillation against the unfactorised model (`Pretrain.py`'s `0.1 · loss_kd`
/// over transformers' hidden states, real tokens only): its value and its gradients in every
/// factor are the reference's.
#[test]
fn the_distillation_term_and_its_gradients_are_the_references() {
    let dev = Device::Cpu;
    let saved = load_adapter(&fixtures().join("pela/llama"), &dev).unwrap();
    let tuner = saved.into_tuner(0, &dev).unwrap();
    let model = Model::build(&source(), Task::CausalLm, tuner.as_ref(), &dev, 0).unwrap();
    tuner.finish().unwrap();
    assert_eq!(
        tuner.distillation_weight(),
        Some(0.1),
        "the reference's weight"
    );
    let (exp, inp) = (expected(), load("inputs/decoder.safetensors"));
    let batch = Batch {
        input_ids: inp["input_ids"].clone(),
        attention_mask: inp["attention_mask"].clone(),
        labels: Some(exp["labels"].clone()),
        class_labels: None,
        num_tokens: 0,
        seq_lens: None,
    };
    let (loss, _, term) = loss_with_distillation(&model, tuner.as_ref(), &batch).unwrap();
    let scalar = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!(
        (scalar(&loss) - scalar(&exp["loss"])).abs() < 1e-5,
        "the task loss is the student's"
    );
    let term = term.expect("distill_weight 0.1");
    let (got, want) = (scalar(&term), 0.1 * scalar(&exp["kd"]));
    assert!(
        (got - want).abs() < 1e-5 * want,
        "distillation {got} vs {want}"
    );
    let grads = term.backward().unwrap();
    for (k, v) in tuner.trainable() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{k}: no gradient"));
        let e = rel_err(g, &exp[&format!("grad_kd.{k}")]);
        assert!(
            e < 1e-4,
            "{k}: distillation gradient off by {e} of its largest entry"
        );
    }
}

#[test]
fn the_merged_dense_folder_gives_the_factorised_models_logits() {
    let (model, tuner) = fresh(serde_json::json!({})).unwrap();
    let inp = load("inputs/decoder.safetensors");
    let want = logits(&model, &inp);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    ferrule::merge::merge_to_dir(&source(), tuner.as_ref(), Task::CausalLm, &out).unwrap();
    let merged_src = ModelSource::load(out.to_str().unwrap(), &Device::Cpu).unwrap();
    let merged = Model::build(&merged_src, Task::CausalLm, &Frozen, &Device::Cpu, 0).unwrap();
    let d = max_diff(&logits(&merged, &inp), &want);
    assert!(d < 1e-4, "merged vs factorised logits differ by {d}");
    let base = Model::build(&source(), Task::CausalLm, &Frozen, &Device::Cpu, 0).unwrap();
    assert!(
        max_diff(&logits(&base, &inp), &want) > 1e-3,
        "the factorisation is lossy"
    );
}

#[test]
fn a_layer_whose_rank_would_be_zero_is_named() {
    let e = fresh(serde_json::json!({"compress_ratio": 40, "target_modules": ["k_proj"]}))
        .err()
        .unwrap();
    let e = format!("{e:#}");
    assert!(
        e.contains("pela: model.layers.0.self_attn.k_proj ([32, 64]) gets rank")
            && e.contains("= 0 at compress_ratio 40"),
        "{e}"
    );
}

fn run_config(out: &std::path::Path) -> TrainConfig {
    TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(AdapterConfig::from_json(serde_json::json!({"peft_type": "PELA"})).unwrap()),
        max_len: Some(64),
        batch_size: Some(4),
        max_steps: Some(4),
        lr: 1e-3,
        seed: 5,
        compute_dtype: ComputeDtypeChoice::F32,
        ..Default::default()
    }
}

/// The regulariser and the distillation (defaults: weights 1 and 0.1) join every micro-batch's
/// loss; the run resumes to the same bytes.
#[test]
fn a_run_with_the_regulariser_resumes_to_the_same_adapter() {
    assert_resume_is_byte_identical(run_config, 2);
}
