//! DiffFit (`--method difffit`): the layer's forward and gradients are checked by hand in
//! `tuners/difffit/layer.rs` (no reference code runs: LLaMA-DiffFit's port needs its own peft
//! fork). Here, on the tiny fixtures: the trainable count by hand, every trained tensor gets a
//! gradient (the same with recomputation), the merged folder (γ folded into the weight, the
//! biases and norms replaced; a bias-free Llama's through its bias options) gives the adapted
//! logits within 1e-5, a bias-free layer's merge where no option exists is refused by name, and a run on an NF4 base resumes to the same bytes.

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use ferrule::adapted::attach;
use ferrule::model::{Arch, Frozen, Inputs, Model, ModelSource, Task};
use ferrule::ops::recompute::GradSink;
use ferrule::ops::ComputeDtypeChoice;
use ferrule::quant::{QuantMethod, QuantSpec};
use ferrule::train::TrainConfig;
use ferrule::tuners::{AdapterConfig, BuildContext, Tuner};

fn difffit(options: serde_json::Value) -> AdapterConfig {
    let mut cfg = serde_json::json!({"peft_type": "DIFFFIT"});
    cfg.as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    AdapterConfig::from_json(cfg).unwrap()
}

fn attached(model: &str, task: Task, cfg: &AdapterConfig) -> (ModelSource, Model, Box<dyn Tuner>) {
    let dev = Device::Cpu;
    let dir = fixtures().join("models").join(model);
    let mut src = ModelSource::load(dir.to_str().unwrap(), &dev).unwrap();
    if task == Task::SeqCls {
        src.config["num_labels"] = serde_json::json!(2);
    }
    let ctx = BuildContext::fresh(&dev);
    let tuned = attach(&src, task, cfg, ctx).unwrap();
    (src, tuned.model, tuned.tuner)
}

/// Moves every trained tensor off its initial value (γ = 1, b_f = 0, the norms' own), so that
/// the merge has something to fold.
fn perturb(tuner: &dyn Tuner) {
    for (_, v) in tuner.trainable() {
        let t = v.as_tensor();
        let noise = Tensor::randn(0f32, 0.2, t.dims(), t.device()).unwrap();
        v.set(&(t + noise).unwrap()).unwrap();
    }
}

fn logits(model: &Model, task: Task) -> Tensor {
    let inp = load(match task {
        Task::SeqCls => "inputs/bert.safetensors",
        _ => "inputs/decoder.safetensors",
    });
    model
        .forward(&Inputs {
            input_ids: &inp["input_ids"],
            attention_mask: Some(&inp["attention_mask"]),
            token_type_ids: inp.get("token_type_ids"),
        })
        .unwrap()
}

#[test]
fn merged_model_equals_the_adapted_one() {
    let cases = [
        (
            "qwen2",
            Task::CausalLm,
            serde_json::json!({"target_modules": ["q_proj", "k_proj", "v_proj"], "eta_exclude": ["k_proj"]}),
        ),
        (
            "qwen2",
            Task::CausalLm,
            serde_json::json!({"target_modules": ["q_proj", "v_proj"], "eta_layers": [1]}),
        ),
        ("bert", Task::SeqCls, serde_json::json!({})),
    ];
    for (model, task, options) in cases {
        let (src, adapted, tuner) = attached(model, task, &difffit(options));
        perturb(tuner.as_ref());
        let want = logits(&adapted, task);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        ferrule::merge::merge_to_dir(&src, tuner.as_ref(), task, &out).unwrap();
        let dev = Device::Cpu;
        let merged_src = ModelSource::load(out.to_str().unwrap(), &dev).unwrap();
        let merged = Model::build(&merged_src, task, &Frozen, &dev, 0).unwrap();
        let d = max_diff_masked(&logits(&merged, task), &want, None);
        assert!(d < 1e-5, "{model}: merged vs adapted logits differ by {d}");
    }
}

/// `ferrule plan` on a `config.json` alone counts what the built adapter holds: the defaults
/// (every projection, the norms), an `eta_exclude` entry, the norms left frozen, and γ on some
/// layers only (`eta_layers`; BERT's `pooler.dense`, outside the layers, then has none), on
/// the tiny Llama and BERT.
#[test]
fn plan_counts_from_shapes_what_the_adapter_holds() {
    use ferrule::dist::plan::PlannedModel;
    let cases = [
        ("llama", Task::CausalLm, serde_json::json!({})),
        (
            "llama",
            Task::CausalLm,
            serde_json::json!({"eta_exclude": ["down_proj"], "train_norms": false}),
        ),
        (
            "llama",
            Task::CausalLm,
            serde_json::json!({"eta_layers": [1, 1]}),
        ),
        (
            "llama",
            Task::CausalLm,
            serde_json::json!({"eta_layers": [100]}),
        ),
        ("bert", Task::FeatureExtraction, serde_json::json!({})),
        (
            "bert",
            Task::FeatureExtraction,
            serde_json::json!({"target_modules": "all-linear", "eta_layers": [0]}),
        ),
    ];
    for (model, task, options) in cases {
        let cfg = difffit(options.clone());
        let (_, _, tuner) = attached(model, task, &cfg);
        let built = ferrule::tuners::trainable_params(tuner.as_ref());
        let tmp = tempfile::tempdir().unwrap();
        let config = fixtures().join("models").join(model).join("config.json");
        std::fs::copy(config, tmp.path().join("config.json")).unwrap();
        let opts = ferrule::model::LoadOptions::default();
        let plan = PlannedModel::load(tmp.path().to_str().unwrap(), &cfg, Some(task), opts, false)
            .unwrap();
        assert_eq!(plan.trainable, built, "{model} {options}");
    }
}

/// A bias-free Llama merges through `attention_bias` / `mlp_bias`: zero biases on the
/// untargeted linears those options cover, the same logits, in a folder and in GGUF. Qwen2's o_proj has no such option.
#[test]
fn a_bias_free_llama_merges_through_its_bias_options_and_qwen2_says_which_layer_cannot() {
    let options = serde_json::json!({"target_modules": ["q_proj", "down_proj"]});
    let (src, adapted, tuner) = attached("llama", Task::CausalLm, &difffit(options));
    perturb(tuner.as_ref());
    let want = logits(&adapted, Task::CausalLm);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    ferrule::merge::merge_to_dir(&src, tuner.as_ref(), Task::CausalLm, &out).unwrap();
    let merged_src = ModelSource::load(out.to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(merged_src.config["attention_bias"], true);
    assert_eq!(merged_src.config["mlp_bias"], true);
    let k_bias = merged_src
        .weights
        .get("model.layers.1.self_attn.k_proj.bias", &[32])
        .unwrap();
    assert_eq!(
        k_bias
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let merged = Model::build(&merged_src, Task::CausalLm, &Frozen, &Device::Cpu, 0).unwrap();
    let d = max_diff_masked(&logits(&merged, Task::CausalLm), &want, None);
    assert!(d < 1e-5, "merged vs adapted logits differ by {d}");
    // The same biases in GGUF (llama.cpp's optional attention and MLP biases), read back.
    use ferrule::export::gguf::{export_model_gguf, GgufExportOptions, OutType};
    let gguf = tmp.path().join("merged.gguf");
    let opts = GgufExportOptions {
        outtype: OutType::F32,
        overwrite: false,
    };
    export_model_gguf(&src, Some(tuner.as_ref()), &gguf, opts).unwrap();
    let back = ModelSource::load(gguf.to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(back.config["mlp_bias"], true);
    let back = Model::build(&back, Task::CausalLm, &Frozen, &Device::Cpu, 0).unwrap();
    let d = max_diff_masked(&logits(&back, Task::CausalLm), &want, None);
    assert!(d < 1e-5, "GGUF vs adapted logits differ by {d}");

    let options = serde_json::json!({"target_modules": ["o_proj"]});
    let (src, _, tuner) = attached("qwen2", Task::CausalLm, &difffit(options));
    let out = tmp.path().join("qwen2");
    let e = ferrule::merge::merge_to_dir(&src, tuner.as_ref(), Task::CausalLm, &out).unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("the adapter gives model.layers.0.self_attn.o_proj a bias, which the base checkpoint has none of, and a Hugging Face qwen2 model has no option"),
        "{e}"
    );
    assert!(!out.exists(), "a failed merge writes nothing");
}

/// γ on layer 1 only: layer 0's targets train their added bias alone.
#[test]
fn eta_layers_gives_gamma_to_the_listed_layers_only() {
    let cfg = difffit(serde_json::json!({"target_modules": ["q_proj"], "eta_layers": [1]}));
    let (_, _, tuner) = attached("llama", Task::CausalLm, &cfg);
    let keys: Vec<String> = tuner.trainable().into_iter().map(|(k, _)| k).collect();
    let has = |k: &str| keys.iter().any(|x| x.contains(k));
    assert!(has("layers.1.self_attn.q_proj.difffit.gamma"), "{keys:?}");
    assert!(!has("layers.0.self_attn.q_proj.difffit.gamma"), "{keys:?}");
    assert!(has("layers.0.self_attn.q_proj.difffit.bf"), "{keys:?}");
}

/// The error of attaching a DiffFit adapter with `options` to the fixture `model`.
fn attach_error(model: &str, options: serde_json::Value) -> String {
    let dev = Device::Cpu;
    let dir = fixtures().join("models").join(model);
    let src = ModelSource::load(dir.to_str().unwrap(), &dev).unwrap();
    let ctx = BuildContext::fresh(&dev);
    let attached = attach(&src, Task::CausalLm, &difffit(options), ctx);
    format!("{:#}", attached.err().expect("attached"))
}

#[test]
fn an_eta_layers_entry_beyond_the_model_is_named() {
    let e = attach_error("llama", serde_json::json!({"eta_layers": [0, 40]}));
    assert!(
        e.contains("eta_layers entry 40 names no layer holding a targeted linear (the targeted layers are 0–1; 100 stands for every layer)"),
        "{e}"
    );
}

#[test]
fn an_eta_exclude_entry_that_excludes_nothing_is_named() {
    let options = serde_json::json!({"target_modules": ["q_proj"], "eta_exclude": ["k_proj"]});
    let e = attach_error("qwen2", options);
    assert!(
        e.contains("eta_exclude (--eta-exclude) entry \"k_proj\" matches no targeted layer"),
        "{e}"
    );
}

/// Qwen2's default targets: per layer q 64, k 32, v 32, o 64, gate 128, up 128, down 64 outputs,
/// each with γ and b_f (1024), over 2 layers; the norms: 2 × (64 + 64) + the final 64.
#[test]
fn every_trained_tensor_gets_a_gradient_with_and_without_recomputation() {
    let (_, model, tuner) = attached("qwen2", Task::CausalLm, &difffit(serde_json::json!({})));
    assert_eq!(
        ferrule::tuners::trainable_params(tuner.as_ref()),
        2 * 1024 + 2 * 128 + 64
    );
    perturb(tuner.as_ref());
    let inp = load("inputs/decoder.safetensors");
    let labels = inp["input_ids"].clone();
    let Arch::Decoder(lm) = &model.arch else {
        panic!("a decoder")
    };
    let mut runs = Vec::new();
    for recompute in [false, true] {
        let sink = recompute.then(|| {
            Arc::new(GradSink::new(
                tuner.trainable().iter().map(|(_, v)| v.as_tensor().id()),
            ))
        });
        model.set_recompute(sink.clone());
        let mask = Some(&inp["attention_mask"]);
        let (loss, _) = lm
            .causal_lm_loss(&inp["input_ids"], mask, None, &labels)
            .unwrap();
        let mut grads = loss.backward().unwrap();
        if let Some(s) = &sink {
            s.drain_into(&mut grads).unwrap();
        }
        let got: Vec<(String, Tensor)> = tuner
            .trainable()
            .into_iter()
            .map(|(k, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{k}: no gradient"));
                (k, g.clone())
            })
            .collect();
        runs.push(got);
    }
    model.set_recompute(None);
    for ((k, a), (_, b)) in runs[0].iter().zip(&runs[1]) {
        assert!(
            max_diff(a, b) < 1e-5,
            "{k}: recomputation changes the gradient"
        );
    }
}

fn run_config(out: &Path) -> TrainConfig {
    TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(difffit(
            serde_json::json!({"target_modules": ["o_proj", "down_proj"]}),
        )),
        max_len: Some(64),
        batch_size: Some(4),
        max_steps: Some(4),
        lr: 1e-2,
        seed: 5,
        compute_dtype: ComputeDtypeChoice::F32,
        quantize: Some(QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap()),
        ..Default::default()
    }
}

#[test]
fn a_run_on_an_nf4_base_resumes_to_the_same_adapter() {
    assert_resume_is_byte_identical(run_config, 2);
}
