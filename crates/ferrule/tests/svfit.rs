//! SVFit (`--method svfit`). No reference code exists (the paper, arXiv 2409.05926, publishes
//! none), so the layer's equations are checked by hand in `tuners/svfit/layer.rs` and the SVD
//! on a matrix whose SVD is written down in `tuners/svd.rs`. Here, on the tiny fixtures: at
//! initialisation the adapted model is the base model (dense and NF4); only the singular values
//! train and each gets a gradient; the trainable count is r per targeted matrix; the merged
//! folder gives the adapted logits; a saved adapter reloads to bit-identical logits without an
//! SVD; a run on an NF4 base resumes to the same bytes; and an r above a targeted layer's
//! min(out, in) is an error naming the layer.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;
use ferrule::adapted::{attach, AdaptedModel};
use ferrule::model::{Frozen, Inputs, LoadOptions, Model, ModelSource, Task};
use ferrule::ops::ComputeDtypeChoice;
use ferrule::quant::{QuantMethod, QuantSpec};
use ferrule::train::TrainConfig;
use ferrule::tuners::{AdapterConfig, BuildContext, Tuner};

fn svfit(options: serde_json::Value) -> AdapterConfig {
    let mut cfg = serde_json::json!({"peft_type": "SVFIT"});
    cfg.as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    AdapterConfig::from_json(cfg).unwrap()
}

fn nf4() -> QuantSpec {
    QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap()
}

fn source(model: &str, task: Task, quantize: Option<&QuantSpec>) -> ModelSource {
    let dir = fixtures().join("models").join(model);
    let options = LoadOptions::quantized(quantize);
    let mut src = ModelSource::load_with(dir.to_str().unwrap(), &Device::Cpu, options).unwrap();
    if task == Task::SeqCls {
        src.config["num_labels"] = serde_json::json!(2);
    }
    src
}

fn try_attach(
    src: &ModelSource,
    task: Task,
    cfg: &AdapterConfig,
) -> anyhow::Result<(Model, Box<dyn Tuner>)> {
    let ctx = BuildContext {
        seed: 0,
        device: &Device::Cpu,
        weights: None,
        allow_unmatched: false,
        release_base: None,
    };
    let tuned = attach(src, task, cfg, ctx)?;
    Ok((tuned.model, tuned.tuner))
}

/// Moves every singular value off its initial value, so that the update is not zero.
fn perturb(tuner: &dyn Tuner) {
    for (_, v) in tuner.trainable() {
        let t = v.as_tensor();
        let noise = Tensor::randn(0f32, 0.3, t.dims(), t.device()).unwrap();
        v.set(&(t * (noise + 1.0).unwrap()).unwrap()).unwrap();
    }
}

fn inputs(task: Task) -> std::collections::HashMap<String, Tensor> {
    load(match task {
        Task::SeqCls => "inputs/bert.safetensors",
        _ => "inputs/decoder.safetensors",
    })
}

fn logits(model: &Model, task: Task) -> Tensor {
    let inp = inputs(task);
    model
        .forward(&Inputs {
            input_ids: &inp["input_ids"],
            attention_mask: Some(&inp["attention_mask"]),
            token_type_ids: inp.get("token_type_ids"),
        })
        .unwrap()
}

fn base_logits(src: &ModelSource, task: Task) -> Tensor {
    let base = Model::build(src, task, &Frozen, &Device::Cpu, 0).unwrap();
    logits(&base, task)
}

const CASES: [(&str, Task, Option<QuantMethod>); 3] = [
    ("qwen2", Task::CausalLm, None),
    ("bert", Task::SeqCls, None),
    ("llama", Task::CausalLm, Some(QuantMethod::Nf4)),
];

fn case_source(model: &str, task: Task, quant: Option<QuantMethod>) -> ModelSource {
    let spec = quant.map(|_| nf4());
    source(model, task, spec.as_ref())
}

/// `s = σ` at the start: `W_e + U_r diag(σ) V_rᵀ = W`, so the adapted model computes the base
/// model's logits (dense bases, and an NF4 one whose SVD is of the dequantized weight).
#[test]
fn at_initialisation_the_adapted_model_is_the_base_model() {
    for (model, task, quant) in CASES {
        let src = case_source(model, task, quant);
        let (adapted, tuner) = try_attach(&src, task, &svfit(serde_json::json!({}))).unwrap();
        assert!(!tuner.adapted().is_empty());
        let d = max_diff(&logits(&adapted, task), &base_logits(&src, task));
        assert!(
            d < 1e-5,
            "{model}: the adapted model at init differs by {d}"
        );
    }
}

/// Qwen2 with q_proj, k_proj, v_proj and r = 4: 3 matrices × 2 layers × 4 values; every
/// trainable tensor is a `svfit_s` and gets a gradient (the singular vectors are no variables).
#[test]
fn only_the_singular_values_train_and_each_gets_a_gradient() {
    let src = source("qwen2", Task::CausalLm, None);
    let cfg = svfit(serde_json::json!({"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj"]}));
    let (model, tuner) = try_attach(&src, Task::CausalLm, &cfg).unwrap();
    assert_eq!(ferrule::tuners::trainable_params(tuner.as_ref()), 3 * 2 * 4);
    let trainable = tuner.trainable();
    assert!(trainable.iter().all(|(k, _)| k.ends_with(".svfit_s")));
    let inp = inputs(Task::CausalLm);
    let ferrule::model::Arch::Decoder(lm) = &model.arch else {
        panic!("a decoder")
    };
    let mask = Some(&inp["attention_mask"]);
    let (loss, _) = lm
        .causal_lm_loss(&inp["input_ids"], mask, None, &inp["input_ids"])
        .unwrap();
    let grads = loss.backward().unwrap();
    for (k, v) in &trainable {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{k}: no gradient"));
        let norm: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{k}: gradient {norm}");
    }
    // The basis is held as plain tensors, not variables: nothing updates it (candle may still
    // form a gradient for an operand on the way to `s`).
    let frozen = tuner.frozen_state().unwrap();
    assert_eq!(frozen.len(), 3 * 6, "U, σ and Vh of each of the 6 matrices");
    for (k, t) in &frozen {
        assert!(!t.is_variable(), "{k} is a variable");
    }
}

/// `W' = W_e + U_r diag(s) V_rᵀ` written into a Hugging Face folder gives the adapted logits
/// (the NF4 base written dequantized, `merge --dequantize`).
#[test]
fn merged_model_equals_the_adapted_one() {
    for (model, task, quant) in CASES {
        let src = case_source(model, task, quant);
        let (adapted, tuner) = try_attach(&src, task, &svfit(serde_json::json!({}))).unwrap();
        perturb(tuner.as_ref());
        let want = logits(&adapted, task);
        let d_base = max_diff(&want, &base_logits(&src, task));
        assert!(
            d_base > 1e-3,
            "{model}: the perturbed adapter changes nothing ({d_base})"
        );
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        // Dequantized: `dequant(W) + ΔW` exactly, what the adapter computes (the default
        // requantizes an NF4 base's merged weights).
        let options = ferrule::merge::MergeOptions {
            dequantize: true,
            ..Default::default()
        };
        ferrule::merge::merge_to_dir_with(&src, tuner.as_ref(), task, &out, options).unwrap();
        let merged_src = ModelSource::load(out.to_str().unwrap(), &Device::Cpu).unwrap();
        let merged = Model::build(&merged_src, task, &Frozen, &Device::Cpu, 0).unwrap();
        let d = max_diff(&logits(&merged, task), &want);
        assert!(d < 1e-4, "{model}: merged vs adapted logits differ by {d}");
    }
}

/// The adapter folder holds the basis: loading it runs no SVD and gives the same bits.
#[test]
fn a_saved_adapter_reloads_to_bit_identical_logits() {
    let src = source("qwen2", Task::CausalLm, None);
    let cfg = svfit(serde_json::json!({"r": 6}));
    let (adapted, tuner) = try_attach(&src, Task::CausalLm, &cfg).unwrap();
    perturb(tuner.as_ref());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    let model_dir = fixtures().join("models/qwen2");
    ferrule::peft_io::save_adapter(&dir, tuner.as_ref(), Task::CausalLm, "qwen2").unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "SVFIT");
    assert_eq!(config["r"], 6);
    let saved = ferrule::model::weights::load_safetensors_file(
        &dir.join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    assert_eq!(saved[&format!("{q}.svfit_U")].dims(), [64, 6]);
    assert_eq!(saved[&format!("{q}.svfit_Vh")].dims(), [6, 64]);
    assert_eq!(saved[&format!("{q}.svfit_sigma")].dims(), [6]);
    assert_eq!(saved[&format!("{q}.svfit_s")].dims(), [6]);

    let reloaded =
        AdaptedModel::load(model_dir.to_str().unwrap(), Some(&dir), None, &Device::Cpu).unwrap();
    let (a, b) = (
        logits(&adapted, Task::CausalLm),
        logits(&reloaded.model, Task::CausalLm),
    );
    let bits = |t: &Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    assert_eq!(bits(&a), bits(&b), "reloaded logits differ");

    // Without its basis the folder is refused by name, not re-decomposed.
    let mut without: Vec<(String, Tensor)> = saved.into_iter().collect();
    without.retain(|(k, _)| !k.ends_with(".svfit_U"));
    ferrule::peft_io::write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &without,
        &[("format", "pt")],
    )
    .unwrap();
    let e = AdaptedModel::load(model_dir.to_str().unwrap(), Some(&dir), None, &Device::Cpu)
        .err()
        .unwrap();
    let e = format!("{e:#}");
    assert!(
        e.contains("svfit: the adapter has no") && e.contains("svfit_U"),
        "{e}"
    );
}

/// Qwen2's k_proj is [32, 64]: r = 33 cannot be taken from it.
/// `ferrule plan` on the weights counts the frozen basis SVFit derives: beside LoRA on the same
/// targets, r = 4 on q_proj ([64, 64]) and v_proj ([32, 64]) of two blocks hold
/// U_r, σ, V_r = 2 · ((64·4 + 4 + 4·64) + (32·4 + 4 + 4·64)) = 1808 more f32 values.
#[test]
fn plan_counts_the_frozen_basis() {
    use ferrule::dist::plan::PlannedModel;
    let model = fixtures().join("models/llama");
    let plan = |peft_type: &str| {
        let cfg = AdapterConfig::from_json(serde_json::json!({
            "peft_type": peft_type, "r": 4, "target_modules": ["q_proj", "v_proj"]
        }))
        .unwrap();
        let opts = ferrule::model::LoadOptions::default();
        PlannedModel::load(
            model.to_str().unwrap(),
            &cfg,
            Some(Task::CausalLm),
            opts,
            false,
        )
        .unwrap()
    };
    let (svfit, lora) = (plan("SVFIT"), plan("LORA"));
    assert_eq!(svfit.base_bytes - lora.base_bytes, 1808.0 * 4.0);
    assert_eq!(svfit.trainable, 2 * (4 + 4));
}

#[test]
fn a_rank_above_a_targeted_layer_is_an_error_naming_it() {
    let src = source("qwen2", Task::CausalLm, None);
    let cfg = svfit(serde_json::json!({"r": 33, "target_modules": ["q_proj", "k_proj"]}));
    let e = format!(
        "{:#}",
        try_attach(&src, Task::CausalLm, &cfg).err().unwrap()
    );
    assert!(
        e.contains("svfit: r=33 (--lora-r) exceeds min(out, in) = 32 of model.layers.0.self_attn.k_proj ([32, 64])"),
        "{e}"
    );
}

fn run_config(out: &Path) -> TrainConfig {
    TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(svfit(
            serde_json::json!({"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
        )),
        max_len: Some(64),
        batch_size: Some(4),
        max_steps: Some(4),
        lr: 1e-2,
        seed: 5,
        compute_dtype: ComputeDtypeChoice::F32,
        quantize: Some(nf4()),
        ..Default::default()
    }
}

/// The checkpoint keeps the basis (`Tuner::frozen_state`), so the resumed run reads the
/// singular vectors the first part trained with, and computes what the uninterrupted one did.
#[test]
fn a_run_on_an_nf4_base_resumes_to_the_same_adapter() {
    assert_resume_is_byte_identical(run_config, 2);
    let tmp = tempfile::tempdir().unwrap();
    let stop = ferrule::train::RunOptions {
        stop_after: Some(1),
        ..Default::default()
    };
    let cfg = run_config(tmp.path());
    ferrule::train::train(&cfg, &Device::Cpu, &mut ferrule::train::Silent, &stop).unwrap();
    let ck = tmp.path().join("checkpoint-1/adapter_model.safetensors");
    let t = ferrule::model::weights::load_safetensors_file(&ck, &Device::Cpu).unwrap();
    let q = "base_model.model.model.layers.1.self_attn.q_proj";
    for suffix in ["svfit_s", "svfit_U", "svfit_sigma", "svfit_Vh"] {
        assert!(
            t.contains_key(&format!("{q}.{suffix}")),
            "{suffix} not in the checkpoint"
        );
    }
}
