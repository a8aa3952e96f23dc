//! Bottleneck adapters (`--method bottleneck`) against LLM-Adapters' layer written out in torch
//! (tests/fixtures/bottleneck/make_bottleneck_fixtures.py): AdapterH, AdapterP and parallel
//! adapters read from the fork's keys, with `bias` none, `adapter_only` and `all`, their
//! logits, loss and every trained tensor's gradient
//! (with and without recomputation); the inits' distributions; `plan`'s count from shapes; a
//! resumed run on an NF4 base is byte-identical; merge, pickles and bad settings are refused by
//! name.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

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
use ferrule::tuners::{AdapterConfig, BuildContext, Tuner};
use serde_json::json;

/// (fixture case, model)
const CASES: &[(&str, &str)] = &[
    ("llama_h", "llama"),
    ("llama_parallel", "llama"),
    ("llama_p", "llama"),
    ("qwen2_parallel", "qwen2"),
    ("qwen2_bias_adapter_only", "qwen2"),
    ("qwen2_bias_all", "qwen2"),
];

fn source(model: &str) -> ModelSource {
    fixture_source(model, Task::CausalLm)
}

/// The fixture's adapter, loaded as a saved adapter.
fn build(case: &str, src: &ModelSource) -> (Model, Box<dyn Tuner>) {
    let dir = fixtures().join("bottleneck").join(case);
    saved_tuned(&dir, "BOTTLENECK", src, Task::CausalLm)
}

fn ctx(dev: &Device) -> BuildContext<'_> {
    BuildContext::fresh(dev)
}

#[test]
fn adapters_match_the_reference_layer() {
    let inp = load("inputs/decoder.safetensors");
    for &(case, model_name) in CASES {
        let exp = load(&format!("bottleneck/{case}/expected.safetensors"));
        let src = source(model_name);
        let (model, tuner) = build(case, &src);
        // Exactly the tensors torch trained: the adapters', and the biases `bias` names.
        let trained: BTreeSet<String> = tuner.trainable().into_iter().map(|(k, _)| k).collect();
        let want: BTreeSet<String> = exp
            .keys()
            .filter_map(|k| k.strip_prefix("grad.").map(str::to_string))
            .collect();
        assert_eq!(trained, want, "{case}: trained tensors");
        let counts: Vec<i64> = exp["counts"].to_vec1().unwrap();
        let n = ferrule::tuners::trainable_params(tuner.as_ref());
        assert_eq!(n as i64, counts[0], "{case}: trainable parameters");
        let got = logits(&model, &inp);
        let d = max_diff(&got, &exp["logits"]);
        assert!(d < 1e-4, "{case}: logits differ by {d}");
        // The adapter moves the logits far beyond that tolerance.
        let base = Model::build(&src, Task::CausalLm, &Frozen, &Device::Cpu, 0).unwrap();
        let moved = max_diff(&logits(&base, &inp), &got);
        assert!(
            moved > 1e-2,
            "{case}: the adapter moved the logits by {moved} only"
        );
        let want_loss: f32 = exp["loss"].to_vec1::<f32>().unwrap()[0];
        for recompute in [false, true] {
            let (loss, grads) = loss_grads(&model, tuner.as_ref(), &inp, &exp["labels"], recompute);
            assert!(
                (loss - want_loss).abs() < 1e-5,
                "{case}: loss {loss} vs {want_loss}"
            );
            for (k, g) in &grads {
                let d = rel_err(g, &exp[&format!("grad.{k}")]);
                assert!(
                    d < 1e-4,
                    "{case} (recompute {recompute}): gradient of {k}: relative {d}"
                );
            }
        }
    }
}

fn fresh(model: &str, options: serde_json::Value) -> anyhow::Result<ferrule::adapted::TunedModel> {
    let dev = Device::Cpu;
    let mut o = options;
    o["peft_type"] = json!("BOTTLENECK");
    let cfg = AdapterConfig::from_json(o).unwrap();
    attach(&source(model), Task::CausalLm, &cfg, ctx(&dev))
}

fn values(t: &Tensor) -> Vec<f64> {
    values_f64(t)
}

/// bert: both projections N(0, 0.02²); mam_adapter: down U(±1/√d_in) (Kaiming-uniform, a = √5),
/// up zero; a learned scale starts at 1 (bottleneck.py `reset_parameters`, `__init__`).
#[test]
fn fresh_adapters_start_as_the_reference_inits() {
    let bert = fresh("llama", json!({"bottleneck_size": 32})).unwrap();
    let all: Vec<f64> = bert
        .tuner
        .trainable()
        .iter()
        .flat_map(|(_, v)| values(v.as_tensor()))
        .collect();
    let n = all.len() as f64;
    let mean = all.iter().sum::<f64>() / n;
    let std = (all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        mean.abs() < 1e-3 && (std - 0.02).abs() < 5e-4,
        "mean {mean}, std {std}"
    );
    let mam = fresh(
        "llama",
        json!({"bottleneck_size": 32, "init_weights": "mam_adapter", "scaling": "learned"}),
    )
    .unwrap();
    for (k, v) in mam.tuner.trainable() {
        let x = values(v.as_tensor());
        let top = x.iter().fold(0f64, |a, b| a.max(b.abs()));
        if k.ends_with("adapter_up.weight") {
            assert_eq!(top, 0.0, "{k}");
        } else if k.ends_with("adapter_scaling") {
            assert_eq!(x, vec![1.0], "{k}");
        } else {
            // gate/up are mh adapters (d_in = 64), down an output adapter (d_in = 64 too).
            let bound = 1.0 / 64f64.sqrt();
            assert!(top <= bound && top > 0.9 * bound, "{k}: max {top}");
        }
    }
    // An identity at step 0: the logits are the base model's.
    let inp = load("inputs/decoder.safetensors");
    let base = Model::build(&source("llama"), Task::CausalLm, &Frozen, &Device::Cpu, 0).unwrap();
    let d = max_diff(&logits(&mam.model, &inp), &logits(&base, &inp));
    assert_eq!(d, 0.0);
}

/// `ferrule plan` on a `config.json` alone counts what the built adapter holds.
#[test]
fn plan_counts_from_shapes_what_the_adapter_holds() {
    for (model, options) in [
        ("llama", json!({"bottleneck_size": 8, "scaling": "learned"})),
        (
            "llama",
            json!({"bottleneck_size": 4, "use_parallel_adapter": true}),
        ),
        (
            "llama",
            json!({"bottleneck_size": 16, "use_adapterp": true}),
        ),
        (
            "qwen2",
            json!({"bottleneck_size": 4, "use_parallel_adapter": true,
                   "target_modules": ["q_proj", "o_proj"], "bias": "adapter_only"}),
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixtures().join("models").join(model).join("config.json"),
            tmp.path().join("config.json"),
        )
        .unwrap();
        let built = fresh(model, options.clone()).unwrap();
        let n = ferrule::tuners::trainable_params(built.tuner.as_ref());
        let mut o = options.clone();
        o["peft_type"] = json!("BOTTLENECK");
        let cfg = AdapterConfig::from_json(o).unwrap();
        let dir = tmp.path().to_str().unwrap();
        let plan = PlannedModel::load(
            dir,
            &cfg,
            Some(Task::CausalLm),
            LoadOptions::default(),
            false,
        )
        .unwrap();
        assert_eq!(plan.trainable, n, "{options}");
    }
}

fn error_of(model: &str, options: serde_json::Value) -> String {
    match fresh(model, options.clone()) {
        Ok(_) => panic!("bottleneck attached to {model} with {options}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_settings_merge_and_pickles_are_refused_by_name() {
    let e = error_of("llama", json!({"bottleneck_size": 0}));
    assert!(
        e.contains("bottleneck_size (--bottleneck-size) is 0"),
        "{e}"
    );
    let e = error_of("llama", json!({"non_linearity": "mish"}));
    assert!(
        e.contains("non_linearity (--non-linearity) \"mish\" is not implemented"),
        "{e}"
    );
    // q_proj has no adapter type in LLM-Adapters' map: parallel only.
    let e = error_of("llama", json!({"target_modules": ["q_proj"]}));
    assert!(
        e.contains("model.layers.0.self_attn.q_proj is targeted")
            && e.contains("--use-parallel-adapter"),
        "{e}"
    );
    let e = error_of("llama", json!({"target_modules": ["proj"]}));
    assert!(e.contains("\"proj\""), "{e}");
    // Merge: the existing merge path's error, and nothing written.
    let src = source("llama");
    let (_, tuner) = build("llama_h", &src);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let e = ferrule::merge::merge_to_dir(&src, tuner.as_ref(), Task::CausalLm, &out)
        .map(|_| ())
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("BOTTLENECK adapters apply a nonlinearity") && e.contains("cannot be merged"),
        "{e}"
    );
    assert!(!out.exists(), "a refused merge wrote {}", out.display());
    // The fork's own save is a pickle: refused with ferrule's message for every pickle.
    let dir = tmp.path().join("fork");
    std::fs::create_dir(&dir).unwrap();
    let config = fixtures().join("bottleneck/llama_h/adapter_config.json");
    std::fs::copy(config, dir.join("adapter_config.json")).unwrap();
    std::fs::write(dir.join("adapter_model.bin"), b"\x80\x02}q\x00.").unwrap();
    let e = load_adapter(&dir, &Device::Cpu).map(|_| ()).unwrap_err();
    assert!(
        e.to_string()
            .contains("only adapter_model.bin found; it is a pickle, which ferrule never loads"),
        "{e}"
    );
}

fn run_config(out: &Path) -> TrainConfig {
    TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(
            AdapterConfig::from_json(json!({
                "peft_type": "BOTTLENECK",
                "bottleneck_size": 8,
                "adapter_dropout": 0.1,
                "scaling": "learned",
            }))
            .unwrap(),
        ),
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

/// Dropout masks and the learned scales included, on an NF4 base; the saved adapter has the
/// fork's keys and a config the fork reads.
#[test]
fn a_run_on_an_nf4_base_resumes_to_the_same_adapter_and_reloads() {
    let whole = assert_resume_is_byte_identical(run_config, 2);
    let dev = Device::Cpu;
    let saved = load_adapter(whole.path(), &dev).unwrap();
    let keys: BTreeSet<&str> = saved.tensors.keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 2 * 3 * 3, "{keys:?}");
    for k in &keys {
        assert!(
            k.starts_with("base_model.model.model.layers.")
                && (k.ends_with(".adapter_down.weight")
                    || k.ends_with(".adapter_up.weight")
                    || k.ends_with(".adapter_scaling")),
            "{k}"
        );
    }
    let s = &saved.tensors["base_model.model.model.layers.0.mlp.down_proj.adapter_scaling"];
    assert_ne!(values(s), vec![1.0], "the learned scale trained");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(whole.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "BOTTLENECK");
    assert_eq!(cfg["scaling"], "learned");
    assert_eq!(
        cfg["target_modules"],
        json!(["gate_proj", "up_proj", "down_proj"])
    );
    assert!(cfg.get("exclude_modules").is_none(), "{cfg}");
}

/// A series adapter on Llama's MLP branch (`placement = "residual_branch"`, Pfeiffer's
/// placement) computes `f + h(f)` with `f` the branch output, which is `down_proj`'s output:
/// with the AdapterP fixture's tensors moved to the branch keys, the reference's logits and
/// gradients.
#[test]
fn a_series_adapter_on_the_mlp_branch_is_the_output_adapter_on_down_proj() {
    let dev = Device::Cpu;
    let exp = load("bottleneck/llama_p/expected.safetensors");
    let moved = |k: &str| k.replace("mlp.down_proj.adapter_", "mlp.adapter_");
    let weights: HashMap<String, Tensor> = load("bottleneck/llama_p/adapter_model.safetensors")
        .into_iter()
        .map(|(k, v)| (moved(&k), v))
        .collect();
    let cfg = AdapterConfig::from_json(json!({
        "peft_type": "BOTTLENECK",
        "placement": "residual_branch",
        "use_adapterp": true,
        "bottleneck_size": 16,
        "non_linearity": "gelu",
        "scaling": 2.0,
    }))
    .unwrap()
    .resolved("llama", Task::CausalLm)
    .unwrap();
    assert_eq!(cfg.options["target_modules"], json!(["mlp"]));
    let saved = BuildContext {
        weights: Some(weights),
        ..ctx(&dev)
    };
    let tuner = ferrule::tuners::registry::build(&cfg, saved).unwrap();
    let model = Model::build(&source("llama"), Task::CausalLm, tuner.as_ref(), &dev, 0).unwrap();
    tuner.finish().unwrap();
    let adapted: Vec<String> = tuner.adapted().into_iter().map(|m| m.path).collect();
    assert_eq!(adapted, ["model.layers.0.mlp", "model.layers.1.mlp"]);
    let inp = load("inputs/decoder.safetensors");
    let d = max_diff(&logits(&model, &inp), &exp["logits"]);
    assert!(d < 1e-4, "logits differ by {d}");
    for recompute in [false, true] {
        let (_, grads) = loss_grads(&model, tuner.as_ref(), &inp, &exp["labels"], recompute);
        assert_eq!(grads.len(), 4);
        for (k, g) in &grads {
            let want = &exp[&format!(
                "grad.{}",
                k.replace("mlp.adapter_", "mlp.down_proj.adapter_")
            )];
            let d = rel_err(g, want);
            assert!(
                d < 1e-4,
                "(recompute {recompute}) gradient of {k}: relative {d}"
            );
        }
    }
    // Parallel on both branches of every layer by default: 2 layers × 2 branches.
    let both = fresh(
        "llama",
        json!({"placement": "residual_branch", "use_parallel_adapter": true, "bottleneck_size": 4}),
    )
    .unwrap();
    assert_eq!(both.tuner.adapted().len(), 4);
    assert!(both.tuner.adapted()[0]
        .detail
        .starts_with("parallel attention branch"));
    // BERT: Houlsby's two branches of each layer by default (its SEQ_CLS head trains in full).
    let mut bert = source("bert");
    bert.config["num_labels"] = json!(2);
    let cfg = AdapterConfig::from_json(
        json!({"peft_type": "BOTTLENECK", "placement": "residual_branch", "bottleneck_size": 4}),
    )
    .unwrap();
    let tuned = attach(&bert, Task::SeqCls, &cfg, ctx(&dev)).unwrap();
    let paths: Vec<String> = tuned.tuner.adapted().into_iter().map(|m| m.path).collect();
    assert_eq!(
        paths,
        [
            "bert.encoder.layer.0.attention",
            "bert.encoder.layer.0.output",
            "bert.encoder.layer.1.attention",
            "bert.encoder.layer.1.output"
        ]
    );
    let e = error_of(
        "llama",
        json!({"placement": "residual_branch", "target_modules": "all-linear"}),
    );
    // all-linear selects no branch; the error lists the branches there are.
    assert!(
        e.contains("matched no module of the model") && e.contains("self_attn"),
        "{e}"
    );
}
