//! Adapters made by Python peft: loading reproduces peft's logits, gradients and parameter
//! counts; a fresh adapter is a no-op; trainable tensors get gradients and frozen ones none.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use ferrule::model::{Arch, Frozen, Inputs, Model, ModelSource, Task};
use ferrule::ops::loss::{causal_lm_loss, cross_entropy};
use ferrule::peft_io::load_adapter;
use ferrule::tuners::{registry, AdapterConfig, BuildContext, Tuner};

struct Case {
    model: &'static str,
    adapter: &'static str,
    task: Task,
    inputs: &'static str,
}

const CASES: &[Case] = &[
    Case {
        model: "llama",
        adapter: "llama_lora",
        task: Task::CausalLm,
        inputs: "decoder",
    },
    Case {
        model: "qwen2",
        adapter: "qwen2_allin_rslora",
        task: Task::CausalLm,
        inputs: "decoder",
    },
    Case {
        model: "mistral",
        adapter: "mistral_patterns",
        task: Task::CausalLm,
        inputs: "decoder",
    },
    Case {
        model: "smollm",
        adapter: "smollm_lora",
        task: Task::CausalLm,
        inputs: "decoder",
    },
    Case {
        model: "bert",
        adapter: "bert_seqcls",
        task: Task::SeqCls,
        inputs: "bert",
    },
];

fn build(case: &Case) -> (Model, Box<dyn Tuner>, ModelSource) {
    let dev = Device::Cpu;
    let src = ModelSource::load(
        fixtures().join("models").join(case.model).to_str().unwrap(),
        &dev,
    )
    .unwrap();
    let saved = load_adapter(&fixtures().join("adapters").join(case.adapter), &dev).unwrap();
    assert_eq!(saved.task(), Some(case.task));
    let lora = saved.into_tuner(0, &dev).unwrap();
    let model = Model::build(&src, case.task, lora.as_ref(), &dev, 0).unwrap();
    lora.finish().unwrap();
    (model, lora, src)
}

fn run(model: &Model, case: &Case) -> (Tensor, std::collections::HashMap<String, Tensor>) {
    let inputs = load(&format!("inputs/{}.safetensors", case.inputs));
    let out = model
        .forward(&Inputs {
            input_ids: &inputs["input_ids"],
            attention_mask: Some(&inputs["attention_mask"]),
            token_type_ids: inputs.get("token_type_ids"),
        })
        .unwrap();
    (out, inputs)
}

#[test]
fn peft_adapters_reproduce_peft_logits() {
    for case in CASES {
        let (model, _lora, _) = build(case);
        let (logits, inputs) = run(&model, case);
        let expected = &load(&format!("expected/{}_logits.safetensors", case.adapter))["logits"];
        let mask = (case.task == Task::CausalLm).then(|| &inputs["attention_mask"]);
        let diff = max_diff_masked(&logits, expected, mask);
        assert!(diff < 1e-4, "{}: max |Δlogits| = {diff}", case.adapter);
    }
}

#[test]
fn trainable_and_total_parameters_equal_peft() {
    let counts: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected/param_counts.json")).unwrap(),
    )
    .unwrap();
    for case in CASES {
        let (model, lora, _) = build(case);
        let trainable: usize = lora.trainable().iter().map(|(_, v)| v.elem_count()).sum();
        let expected = &counts[case.adapter];
        assert_eq!(
            trainable as u64,
            expected["trainable"].as_u64().unwrap(),
            "{} trainable",
            case.adapter
        );
        assert_eq!(
            ferrule::tuners::total_params(model.base_params, lora.as_ref()) as u64,
            expected["total"].as_u64().unwrap(),
            "{} total",
            case.adapter
        );
    }
}

fn assert_grads(case: &Case, grads_file: &str) {
    let (model, lora, src) = build(case);
    lora.mode().set_training(false); // the reference grads were taken in eval mode (no dropout)
    let (out, _) = run(&model, case);
    let exp = load(grads_file);
    let (loss, _) = match (case.task, &model.arch) {
        // The training path: logits only where a label is counted.
        (Task::CausalLm, Arch::Decoder(lm)) => {
            let inputs = load("inputs/decoder.safetensors");
            let (sparse, n) = lm
                .causal_lm_loss(
                    &inputs["input_ids"],
                    Some(&inputs["attention_mask"]),
                    None,
                    &exp["labels"],
                )
                .unwrap();
            let (full, m) = causal_lm_loss(&out, &exp["labels"]).unwrap();
            assert_eq!(n, m);
            assert!(
                (sparse.to_scalar::<f32>().unwrap() - full.to_scalar::<f32>().unwrap()).abs()
                    < 1e-5
            );
            (sparse, n)
        }
        _ => cross_entropy(&out, &exp["labels"]).unwrap(),
    };
    let want_loss = exp["loss"]
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let got_loss = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got_loss - want_loss).abs() < 1e-4,
        "{}: loss {got_loss} vs {want_loss}",
        case.adapter
    );
    let grads = loss.backward().unwrap();
    for (key, var) in lora.trainable() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{key}: no gradient"));
        let want = &exp[&key];
        let scale = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-3);
        let diff = max_diff_masked(g, want, None);
        assert!(
            diff / scale < 1e-4,
            "{}: {key}: max |Δgrad| = {diff} (scale {scale})",
            case.adapter
        );
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{key}: zero gradient");
    }
    // Frozen base weights never get a gradient (docs/ARCHITECTURE.md, decisions, fix 3). Looking
    // a base tensor up by id is not enough: a composite `x.matmul(&w.t())` would store the
    // gradient under the id of `w.t()`, a new tensor. So: the store holds the trainable tensors
    // and, besides them, only batched activations `[b, t, hidden]` (the embedding output, a
    // constant the first adapted layer reads), nothing shaped like a weight.
    for (name, t) in &src.weights.tensors() {
        assert!(
            grads.get(t).is_none(),
            "{}: frozen tensor {name} received a gradient",
            case.adapter
        );
    }
    let trainable: Vec<_> = lora
        .trainable()
        .iter()
        .map(|(_, v)| v.as_tensor().id())
        .collect();
    let ids = load(&format!("inputs/{}.safetensors", case.inputs));
    let (b, t) = ids["input_ids"].dims2().unwrap();
    let hidden = src.config["hidden_size"].as_u64().unwrap() as usize;
    for id in grads.get_ids().filter(|id| !trainable.contains(id)) {
        let dims = grads.get_id(*id).unwrap().dims().to_vec();
        assert!(
            dims == [b, t, hidden],
            "{}: the gradient store holds a {dims:?} entry that is neither a trainable tensor nor the [{b}, {t}, {hidden}] input stream",
            case.adapter
        );
    }
}

#[test]
fn llama_lora_gradients_match_torch() {
    assert_grads(&CASES[0], "expected/llama_lora_grads.safetensors");
}

#[test]
fn bert_seqcls_gradients_match_torch() {
    assert_grads(&CASES[4], "expected/bert_seqcls_grads.safetensors");
}

#[test]
fn fresh_adapter_is_a_no_op_and_b_starts_at_zero() {
    let dev = Device::Cpu;
    let src = ModelSource::load(fixtures().join("models/llama").to_str().unwrap(), &dev).unwrap();
    let cfg = AdapterConfig::from_json(serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"})).unwrap();
    let lora = registry::build(
        &cfg,
        BuildContext {
            seed: 7,
            device: &dev,
            weights: None,
            allow_unmatched: false,
            release_base: None,
        },
    )
    .unwrap();
    let adapted = Model::build(&src, Task::CausalLm, lora.as_ref(), &dev, 0).unwrap();
    lora.finish().unwrap();
    let base = Model::build(&src, Task::CausalLm, &Frozen, &dev, 0).unwrap();
    let inputs = load("inputs/decoder.safetensors");
    let inp = Inputs {
        input_ids: &inputs["input_ids"],
        attention_mask: Some(&inputs["attention_mask"]),
        token_type_ids: None,
    };
    assert_eq!(
        max_diff_masked(
            &adapted.forward(&inp).unwrap(),
            &base.forward(&inp).unwrap(),
            None
        ),
        0.0
    );
    // 2 layers x 7 linears, lm_head excluded by all-linear.
    assert_eq!(lora.adapted().len(), 14);
    assert!(lora.adapted().iter().all(|m| m.path != "lm_head"));
    // Kaiming-uniform(a=√5) A: |A| ≤ 1/√in_features.
    for (k, v) in lora.trainable() {
        let max = v
            .as_tensor()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if k.contains("lora_B") {
            assert_eq!(max, 0.0, "{k}");
        } else {
            assert!(
                max > 0.0 && max <= 1.0 / (v.as_tensor().dim(1).unwrap() as f32).sqrt() + 1e-6,
                "{k}: {max}"
            );
        }
    }
    let Arch::Decoder(_) = adapted.arch else {
        panic!()
    };
}

#[test]
fn merged_folders_reproduce_adapter_logits() {
    let dev = Device::Cpu;
    for case in CASES {
        let (model, lora, src) = build(case);
        let (want, inputs) = run(&model, case);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let report = ferrule::merge::merge_to_dir(&src, lora.as_ref(), case.task, &out).unwrap();
        assert_eq!(report.merged_modules, lora.adapted().len());
        assert!(out.join("config.json").exists() && !tmp.path().join("merged.tmp").exists());
        // A second merge into the same folder is refused, not overwritten.
        assert!(ferrule::merge::merge_to_dir(&src, lora.as_ref(), case.task, &out).is_err());
        let merged_src = ModelSource::load(out.to_str().unwrap(), &dev).unwrap();
        let merged = Model::build(&merged_src, case.task, &Frozen, &dev, 0).unwrap();
        let got = merged
            .forward(&Inputs {
                input_ids: &inputs["input_ids"],
                attention_mask: Some(&inputs["attention_mask"]),
                token_type_ids: inputs.get("token_type_ids"),
            })
            .unwrap();
        let mask = (case.task == Task::CausalLm).then(|| &inputs["attention_mask"]);
        let diff = max_diff_masked(&got, &want, mask);
        assert!(
            diff < 1e-4,
            "{}: merged vs adapter max diff {diff}",
            case.adapter
        );
    }
}

/// Adapters trained and saved by ferrule, loaded by Python peft (tests/fixtures/roundtrip,
/// made with `make_fixtures.py --check-roundtrip ... --save-peft-logits`): ferrule's logits
/// for them equal peft's, so the files mean the same to both.
#[test]
fn ferrule_saved_adapters_mean_the_same_to_peft() {
    let dev = Device::Cpu;
    for name in ["llama", "qwen2"] {
        let src = ModelSource::load(fixtures().join("models").join(name).to_str().unwrap(), &dev)
            .unwrap();
        let lora = load_adapter(&fixtures().join("roundtrip").join(name), &dev)
            .unwrap()
            .into_tuner(0, &dev)
            .unwrap();
        let model = Model::build(&src, Task::CausalLm, lora.as_ref(), &dev, 0).unwrap();
        lora.finish().unwrap();
        let inputs = load("inputs/decoder.safetensors");
        let got = model
            .forward(&Inputs {
                input_ids: &inputs["input_ids"],
                attention_mask: Some(&inputs["attention_mask"]),
                token_type_ids: None,
            })
            .unwrap();
        let want = &load(&format!("roundtrip/{name}/peft_logits.safetensors"))["logits"];
        let diff = max_diff_masked(&got, want, Some(&inputs["attention_mask"]));
        assert!(
            diff < 1e-4,
            "{name}: ferrule vs peft on a ferrule-saved adapter: {diff}"
        );
    }
}
