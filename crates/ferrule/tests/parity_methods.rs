//! Methods and LoRA variants (IA3, LN tuning, RandLoRA, embedding LoRA, `bias`, `lora_bias`, DoRA,
//! PiSSA/OLoRA) against adapters Python peft saved (tests/fixtures/methods, made by
//! make_method_fixtures.py): loading reproduces peft's logits, gradients and parameter counts;
//! recomputation gives the same gradients; merged folders equal the adapter; save → load
//! keeps the bytes; bad adapters fail clearly.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use ferrule::model::{Arch, Inputs, Model, ModelSource, Task};
use ferrule::ops::loss::cross_entropy;
use ferrule::ops::recompute::GradSink;
use ferrule::peft_io::{load_adapter, save_adapter};
use ferrule::tuners::Tuner;

struct Case {
    name: &'static str,
    model: &'static str,
    task: Task,
    peft_type: &'static str,
    grads: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "llama_ia3",
        model: "llama",
        task: Task::CausalLm,
        peft_type: "IA3",
        grads: true,
    },
    Case {
        name: "qwen2_ia3",
        model: "qwen2",
        task: Task::CausalLm,
        peft_type: "IA3",
        grads: false,
    },
    Case {
        name: "bert_ia3_seqcls",
        model: "bert",
        task: Task::SeqCls,
        peft_type: "IA3",
        grads: false,
    },
    Case {
        name: "llama_ln_tuning",
        model: "llama",
        task: Task::CausalLm,
        peft_type: "LN_TUNING",
        grads: true,
    },
    Case {
        name: "bert_ln_tuning_seqcls",
        model: "bert",
        task: Task::SeqCls,
        peft_type: "LN_TUNING",
        grads: false,
    },
    Case {
        name: "llama_lora_embed",
        model: "llama",
        task: Task::CausalLm,
        peft_type: "LORA",
        grads: true,
    },
    Case {
        name: "qwen2_lora_bias_all",
        model: "qwen2",
        task: Task::CausalLm,
        peft_type: "LORA",
        grads: true,
    },
    Case {
        name: "qwen2_lora_bias_lora_only",
        model: "qwen2",
        task: Task::CausalLm,
        peft_type: "LORA",
        grads: true,
    },
    Case {
        name: "bert_lora_bias_all_seqcls",
        model: "bert",
        task: Task::SeqCls,
        peft_type: "LORA",
        grads: false,
    },
    Case {
        name: "llama_lora_lora_bias",
        model: "llama",
        task: Task::CausalLm,
        peft_type: "LORA",
        grads: true,
    },
    Case {
        name: "llama_dora",
        model: "llama",
        task: Task::CausalLm,
        peft_type: "LORA",
        grads: true,
    },
    Case {
        name: "qwen2_dora",
        model: "qwen2",
        task: Task::CausalLm,
        peft_type: "LORA",
        grads: false,
    },
    Case {
        name: "bert_dora_seqcls",
        model: "bert",
        task: Task::SeqCls,
        peft_type: "LORA",
        grads: false,
    },
    Case {
        name: "llama_randlora",
        model: "llama",
        task: Task::CausalLm,
        peft_type: "RANDLORA",
        grads: true,
    },
];

/// Keys peft writes that ferrule does not: the unchanged embedding base layer
/// (`save_embedding_layers="auto"`), and under `bias="all"` the biases of a `modules_to_save`
/// wrapper's two inner copies (duplicates of the saved `classifier.bias`).
fn written_by_peft_only(key: &str) -> bool {
    key.ends_with(".base_layer.weight")
        || key.ends_with(".original_module.bias")
        || key.ends_with(".modules_to_save.bias")
}

fn source(case: &Case) -> ModelSource {
    let mut src = ModelSource::load(
        fixtures().join("models").join(case.model).to_str().unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    if case.task == Task::SeqCls {
        src.config["num_labels"] = serde_json::json!(2);
    }
    src
}

fn build(case: &Case) -> (Model, Box<dyn Tuner>, ModelSource) {
    let dev = Device::Cpu;
    let src = source(case);
    let saved = load_adapter(&fixtures().join("methods").join(case.name), &dev).unwrap();
    assert_eq!(saved.peft_type(), case.peft_type);
    assert_eq!(saved.task(), Some(case.task));
    let tuner = saved.into_tuner(0, &dev).unwrap();
    let model = Model::build(&src, case.task, tuner.as_ref(), &dev, 0).unwrap();
    tuner.finish().unwrap();
    (model, tuner, src)
}

fn inputs(case: &Case) -> HashMap<String, Tensor> {
    load(if case.task == Task::SeqCls {
        "inputs/bert.safetensors"
    } else {
        "inputs/decoder.safetensors"
    })
}

fn forward(model: &Model, inputs: &HashMap<String, Tensor>) -> Tensor {
    model
        .forward(&Inputs {
            input_ids: &inputs["input_ids"],
            attention_mask: Some(&inputs["attention_mask"]),
            token_type_ids: inputs.get("token_type_ids"),
        })
        .unwrap()
}

/// Max |a − b| over attended positions; NaN anywhere fails.
fn diff(case: &Case, got: &Tensor, want: &Tensor, inputs: &HashMap<String, Tensor>) -> f32 {
    let all: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        all.iter().all(|v| v.is_finite()),
        "{}: non-finite output",
        case.name
    );
    let mask = (case.task == Task::CausalLm).then(|| &inputs["attention_mask"]);
    max_diff_masked(got, want, mask)
}

#[test]
fn peft_adapters_reproduce_peft_logits() {
    for case in CASES {
        let (model, _, _) = build(case);
        let inp = inputs(case);
        let want = &load(&format!("methods/{}/logits.safetensors", case.name))["logits"];
        let d = diff(case, &forward(&model, &inp), want, &inp);
        assert!(d < 1e-4, "{}: max |Δlogits| = {d}", case.name);
    }
}

#[test]
fn trainable_and_total_parameters_equal_peft() {
    let counts: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("methods/param_counts.json")).unwrap(),
    )
    .unwrap();
    for case in CASES {
        let (model, tuner, _) = build(case);
        let trainable = ferrule::tuners::trainable_params(tuner.as_ref());
        assert_eq!(
            trainable as u64,
            counts[case.name]["trainable"].as_u64().unwrap(),
            "{} trainable",
            case.name
        );
        assert_eq!(
            ferrule::tuners::total_params(model.base_params, tuner.as_ref()) as u64,
            counts[case.name]["total"].as_u64().unwrap(),
            "{} total",
            case.name
        );
    }
}

/// The training loss's gradients for every trainable tensor, with or without recomputation.
fn loss_grads(case: &Case, recompute: bool) -> (f32, HashMap<String, Tensor>) {
    let (model, tuner, _) = build(case);
    let exp = load(&format!("methods/{}/grads.safetensors", case.name));
    let inp = inputs(case);
    let sink = recompute.then(|| {
        std::sync::Arc::new(GradSink::new(
            tuner.trainable().iter().map(|(_, v)| v.as_tensor().id()),
        ))
    });
    assert_eq!(model.set_recompute(sink.clone()), recompute);
    let (loss, _) = match &model.arch {
        Arch::Decoder(lm) => lm
            .causal_lm_loss(
                &inp["input_ids"],
                Some(&inp["attention_mask"]),
                None,
                &exp["labels"],
            )
            .unwrap(),
        Arch::Bert(_) => cross_entropy(&forward(&model, &inp), &exp["labels"]).unwrap(),
    };
    let mut grads = loss.backward().unwrap();
    if let Some(s) = &sink {
        s.drain_into(&mut grads).unwrap();
    }
    let out = tuner
        .trainable()
        .into_iter()
        .map(|(k, v)| {
            (
                k.clone(),
                grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{k}: no gradient"))
                    .clone(),
            )
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), out)
}

#[test]
fn gradients_match_torch_with_and_without_recomputation() {
    for case in CASES.iter().filter(|c| c.grads) {
        let exp = load(&format!("methods/{}/grads.safetensors", case.name));
        let want_loss = exp["loss"]
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        for recompute in [false, true] {
            let (loss, grads) = loss_grads(case, recompute);
            assert!(
                (loss - want_loss).abs() < 1e-4,
                "{}: loss {loss} vs {want_loss}",
                case.name
            );
            assert_eq!(
                grads.len() + 2,
                exp.len(),
                "{}: every saved tensor has a reference gradient",
                case.name
            );
            for (key, g) in &grads {
                let want = &exp[key];
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
                let d = max_diff_masked(g, want, None);
                assert!(
                    d.is_finite() && d / scale < 1e-4,
                    "{} (recompute {recompute}): {key}: max |Δgrad| = {d} (scale {scale})",
                    case.name
                );
                assert!(
                    g.sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0,
                    "{key}: zero gradient"
                );
            }
        }
    }
}

#[test]
fn merged_folders_reproduce_adapter_logits() {
    let dev = Device::Cpu;
    for case in CASES {
        let (model, tuner, src) = build(case);
        let inp = inputs(case);
        let want = forward(&model, &inp);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let merged = ferrule::merge::merge_to_dir(&src, tuner.as_ref(), case.task, &out);
        if case.name == "llama_lora_lora_bias" {
            // lora_B's bias has no base bias to merge into (llama has none): peft raises too.
            let e = format!(
                "{:#}",
                merged
                    .map(|_| ())
                    .expect_err("merging lora_bias into a bias-free layer must fail")
            );
            assert!(e.contains("lora_bias") && e.contains("q_proj.bias"), "{e}");
            assert!(!out.exists(), "a failed merge writes nothing");
            continue;
        }
        merged.unwrap();
        let merged_src = ModelSource::load(out.to_str().unwrap(), &dev).unwrap();
        let merged =
            Model::build(&merged_src, case.task, &ferrule::model::Frozen, &dev, 0).unwrap();
        let d = diff(case, &forward(&merged, &inp), &want, &inp);
        assert!(d < 1e-4, "{}: merged vs adapter max diff {d}", case.name);
    }
}

#[test]
fn save_then_load_keeps_keys_bytes_and_config() {
    for case in CASES {
        let (_, tuner, _) = build(case);
        let tmp = tempfile::tempdir().unwrap();
        save_adapter(tmp.path(), tuner.as_ref(), case.task, "base").unwrap();
        let peft = std::fs::read(
            fixtures()
                .join("methods")
                .join(case.name)
                .join("adapter_model.safetensors"),
        )
        .unwrap();
        let ours = std::fs::read(tmp.path().join("adapter_model.safetensors")).unwrap();
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&peft).unwrap(),
            safetensors::SafeTensors::deserialize(&ours).unwrap(),
        );
        let mut ka: Vec<String> = a
            .names()
            .into_iter()
            .filter(|k| !written_by_peft_only(k))
            .map(String::from)
            .collect();
        let mut kb: Vec<String> = b.names().into_iter().map(String::from).collect();
        ka.sort();
        kb.sort();
        assert_eq!(ka, kb, "{}: same keys as peft", case.name);
        for k in &ka {
            assert_eq!(
                a.tensor(k).unwrap().data(),
                b.tensor(k).unwrap().data(),
                "{}: {k} bytes",
                case.name
            );
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let theirs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                fixtures()
                    .join("methods")
                    .join(case.name)
                    .join("adapter_config.json"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], case.peft_type);
        for key in [
            "target_modules",
            "feedforward_modules",
            "init_ia3_weights",
            "modules_to_save",
            "r",
            "lora_alpha",
            "bias",
            "lora_bias",
            "use_dora",
        ] {
            let norm = |v: &serde_json::Value| {
                let mut v = v.clone();
                if let Some(a) = v.as_array_mut() {
                    a.sort_by_key(|x| x.to_string());
                }
                v
            };
            if theirs.get(key).is_some() {
                assert_eq!(norm(&cfg[key]), norm(&theirs[key]), "{}: {key}", case.name);
            }
        }
    }
}

/// Copies a fixture adapter, rewrites its tensors with `edit`, and returns the load error.
fn load_error(
    case: &Case,
    edit: impl Fn(&mut HashMap<String, Tensor>),
    config_edit: impl Fn(&mut serde_json::Value),
) -> String {
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let from = fixtures().join("methods").join(case.name);
    let mut tensors = ferrule::model::weights::load_safetensors_file(
        &from.join("adapter_model.safetensors"),
        &dev,
    )
    .unwrap();
    edit(&mut tensors);
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    ferrule::peft_io::write_safetensors(
        &tmp.path().join("adapter_model.safetensors"),
        &list,
        &[("format", "pt")],
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("adapter_config.json")).unwrap())
            .unwrap();
    config_edit(&mut cfg);
    std::fs::write(tmp.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    let r = ferrule::adapted::AdaptedModel::load(
        fixtures().join("models").join(case.model).to_str().unwrap(),
        Some(tmp.path()),
        Some(case.task),
        &dev,
    );
    format!("{:#}", r.err().expect("a broken adapter must not load"))
}

#[test]
fn broken_adapters_fail_clearly() {
    let ia3 = &CASES[0];
    let key = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l";
    let e = load_error(
        ia3,
        |t| {
            drop(t.insert(
                key.into(),
                Tensor::ones((1, 64), DType::F32, &Device::Cpu).unwrap(),
            ))
        },
        |_| {},
    );
    assert!(
        e.contains(key) && e.contains("[1, 64]") && e.contains("[32, 1]"),
        "{e}"
    );
    let e = load_error(ia3, |t| drop(t.remove(key)), |_| {});
    assert!(e.contains("has no tensor") && e.contains(key), "{e}");
    let e = load_error(ia3, |_| {}, |c| c["peft_type"] = "ADALORA".into());
    assert!(e.contains("peft_type \"ADALORA\" is not supported"), "{e}");
    let ln = &CASES[3];
    let e = load_error(
        ln,
        |_| {},
        |c| c["target_modules"] = serde_json::json!(["input_layernorm"]),
    );
    assert!(e.contains("the adapter has 3 tensor(s) for modules"), "{e}");
    let rand = CASES.iter().find(|c| c.peft_type == "RANDLORA").unwrap();
    let e = load_error(rand, |_| {}, |c| c["save_projection"] = false.into());
    assert!(e.contains("save_projection = false"), "{e}");
    let e = load_error(rand, |t| drop(t.remove("base_model.randlora_A")), |_| {});
    assert!(e.contains("base_model.randlora_A"), "{e}");
}

/// Adapters ferrule trained and saved (tests/fixtures/methods/roundtrip, checked with
/// `make_fixtures.py --check-roundtrip ... --save-peft-logits`): peft's logits for them equal
/// ferrule's.
#[test]
fn ferrule_saved_adapters_mean_the_same_to_peft() {
    let dev = Device::Cpu;
    let case = &CASES[0];
    let saved = [
        ("llama_ia3", "llama"),
        ("llama_ln_tuning", "llama"),
        ("llama_dora", "llama"),
        ("llama_lora_embed", "llama"),
        ("qwen2_lora_bias_all", "qwen2"),
        ("llama_pissa", "llama"),
        ("llama_prompt_tuning", "llama"),
        ("llama_prefix_tuning_proj", "llama"),
        ("llama_randlora", "llama"),
    ];
    for (name, model) in saved {
        let dir = fixtures().join("methods/roundtrip").join(name);
        let m = ferrule::adapted::AdaptedModel::load(
            fixtures().join("models").join(model).to_str().unwrap(),
            Some(&dir),
            None,
            &dev,
        )
        .unwrap();
        let inp = inputs(case);
        let want = &load(&format!("methods/roundtrip/{name}/peft_logits.safetensors"))["logits"];
        let d = diff(case, &forward(&m.model, &inp), want, &inp);
        assert!(
            d < 1e-4,
            "{name}: ferrule vs peft on a ferrule-saved adapter: {d}"
        );
    }
}

fn train_config(
    method: &str,
    out: &std::path::Path,
    quantize: Option<ferrule::quant::QuantSpec>,
) -> ferrule::train::TrainConfig {
    train_config_with(method, serde_json::json!({}), out, quantize)
}

fn train_config_with(
    method: &str,
    options: serde_json::Value,
    out: &std::path::Path,
    quantize: Option<ferrule::quant::QuantSpec>,
) -> ferrule::train::TrainConfig {
    let peft_type = ferrule::tuners::registry::by_name(method)
        .unwrap()
        .peft_type;
    let options = options.as_object().unwrap().clone();
    ferrule::train::TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(ferrule::tuners::AdapterConfig::new(peft_type, options)),
        max_len: Some(64),
        batch_size: Some(2),
        max_steps: Some(4),
        lr: 3e-2,
        quantize,
        ..Default::default()
    }
}

fn adapter_bytes(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

/// IA3, LN tuning and RandLoRA train on dense and NF4 bases (PEFT allows them on bitsandbytes 4-bit),
/// and an interrupted IA3 run resumes to the same adapter bytes.
#[test]
fn methods_train_on_dense_and_nf4_bases_and_resume_exactly() {
    use ferrule::train::{train, RunOptions, Silent};
    let dev = Device::Cpu;
    let nf4 = ferrule::quant::QuantSpec::new(ferrule::quant::QuantMethod::Nf4, 64, true).unwrap();
    for method in ["ia3", "ln-tuning", "randlora"] {
        for q in [None, Some(nf4)] {
            let tmp = tempfile::tempdir().unwrap();
            let s = train(
                &train_config(method, tmp.path(), q),
                &dev,
                &mut Silent,
                &RunOptions::default(),
            )
            .unwrap();
            assert!(
                s.completed && s.final_loss.is_some_and(f64::is_finite),
                "{method} {q:?}"
            );
            let saved: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(
                saved["peft_type"],
                ferrule::tuners::registry::by_name(method)
                    .unwrap()
                    .peft_type
            );
        }
    }
    let (whole, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(
        &train_config("ia3", whole.path(), None),
        &dev,
        &mut Silent,
        &RunOptions::default(),
    )
    .unwrap();
    train(
        &train_config("ia3", split.path(), None),
        &dev,
        &mut Silent,
        &RunOptions {
            stop_after: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    train(
        &train_config("ia3", split.path(), None),
        &dev,
        &mut Silent,
        &RunOptions {
            resume: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        adapter_bytes(whole.path()),
        adapter_bytes(split.path()),
        "resumed IA3 run diverged"
    );
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// PiSSA and OLoRA against peft (llama_pissa, llama_olora): the initial `B A` and the residual
/// base equal peft's; the trained factors on that residual give peft's logits; and the saved
/// adapter is peft's rank-2r conversion, which on the unchanged base gives peft's logits again.
#[test]
fn pissa_and_olora_match_peft_and_save_as_rank_2r_lora() {
    use ferrule::tuners::registry::{self, BuildContext};
    let dev = Device::Cpu;
    let case = &CASES[0];
    let inp = inputs(case);
    for name in ["llama_pissa", "llama_olora"] {
        let dir = fixtures().join("methods").join(name);
        let src =
            ModelSource::load(fixtures().join("models/llama").to_str().unwrap(), &dev).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("initial/adapter_config.json")).unwrap(),
        )
        .unwrap();
        let adapter = ferrule::tuners::AdapterConfig::from_json(cfg)
            .unwrap()
            .resolved("llama", Task::CausalLm)
            .unwrap();
        let tuner = registry::build(&adapter, BuildContext::fresh(&dev)).unwrap();
        let model = Model::build(&src, Task::CausalLm, tuner.as_ref(), &dev, 0).unwrap();
        tuner.finish().unwrap();
        let theirs = load(&format!("methods/{name}/initial/adapter_model.safetensors"));
        let residual = load(&format!("methods/{name}/residual.safetensors"));
        let ours: HashMap<String, Tensor> = tuner
            .trainable()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        let replaced: HashMap<String, Tensor> = tuner.replaced().unwrap().into_iter().collect();
        assert_eq!(
            replaced.len(),
            residual.len(),
            "{name}: one residual per targeted module"
        );
        for (weight, want) in &residual {
            let path = weight.trim_end_matches(".weight");
            let key = |s: &str| format!("base_model.model.{path}.{s}");
            let ba = |m: &HashMap<String, Tensor>| {
                m[&key("lora_B.weight")]
                    .matmul(&m[&key("lora_A.weight")])
                    .unwrap()
            };
            // Singular vectors and QR factors are defined up to sign: B A and the residual are not.
            let d = max_abs(&(ba(&ours) - ba(&theirs)).unwrap());
            assert!(
                d < 1e-4 * max_abs(&ba(&theirs)).max(1.0),
                "{name}: {path}: B A differs from peft's by {d}"
            );
            let d = max_abs(&(&replaced[weight] - want).unwrap());
            assert!(
                d < 1e-5,
                "{name}: {weight}: residual differs from peft's by {d}"
            );
        }
        let trained = load(&format!("methods/{name}/trained.safetensors"));
        for (k, v) in tuner.trainable() {
            v.set(&trained[&k]).unwrap();
        }
        let d = diff(
            case,
            &forward(&model, &inp),
            &load(&format!("methods/{name}/trained_logits.safetensors"))["logits"],
            &inp,
        );
        assert!(
            d < 1e-4,
            "{name}: trained factors on the residual base vs peft: {d}"
        );
        let tmp = tempfile::tempdir().unwrap();
        save_adapter(tmp.path(), tuner.as_ref(), Task::CausalLm, "base").unwrap();
        let saved: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let converted: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("converted/adapter_config.json")).unwrap(),
        )
        .unwrap();
        for key in [
            "r",
            "lora_alpha",
            "init_lora_weights",
            "rank_pattern",
            "alpha_pattern",
        ] {
            assert_eq!(
                saved[key], converted[key],
                "{name}: {key} of the rank-2r conversion"
            );
        }
        let plain = ferrule::adapted::AdaptedModel::load(
            fixtures().join("models/llama").to_str().unwrap(),
            Some(tmp.path()),
            None,
            &dev,
        )
        .unwrap();
        let d = diff(
            case,
            &forward(&plain.model, &inp),
            &load(&format!("methods/{name}/converted/logits.safetensors"))["logits"],
            &inp,
        );
        assert!(
            d < 1e-4,
            "{name}: converted adapter on the unchanged base vs peft: {d}"
        );
    }
}

/// The LoRA variants train on a dense and an NF4 base (peft allows each on bitsandbytes 4-bit,
/// PiSSA excepted: it needs the dense weight, and the NF4 run fails naming it), with and
/// without recomputation; DoRA and PiSSA runs interrupted half-way resume to the same bytes.
#[test]
fn lora_variants_train_on_dense_and_nf4_bases_and_resume_exactly() {
    use ferrule::train::{train, RunOptions, Silent};
    use serde_json::json;
    let dev = Device::Cpu;
    let nf4 = ferrule::quant::QuantSpec::new(ferrule::quant::QuantMethod::Nf4, 64, true).unwrap();
    let variants = [
        ("dora", json!({"use_dora": true, "lora_dropout": 0.1})),
        (
            "bias all",
            json!({"bias": "all", "target_modules": ["q_proj", "v_proj"]}),
        ),
        ("lora_bias", json!({"lora_bias": true})),
        (
            "embedding",
            json!({"target_modules": ["embed_tokens", "q_proj"]}),
        ),
        ("pissa", json!({"init_lora_weights": "pissa"})),
        ("olora", json!({"init_lora_weights": "olora"})),
    ];
    for (what, options) in &variants {
        for (q, recompute) in [(None, false), (Some(nf4), true)] {
            let tmp = tempfile::tempdir().unwrap();
            let mut cfg = train_config_with("lora", options.clone(), tmp.path(), q);
            cfg.recompute = recompute;
            let r = train(&cfg, &dev, &mut Silent, &RunOptions::default());
            if matches!(*what, "pissa" | "olora") && q.is_some() {
                let e = format!(
                    "{:#}",
                    r.map(|_| ())
                        .expect_err("PiSSA/OLoRA on a quantized base must fail")
                );
                assert!(
                    e.contains("quantized") && e.contains("init_lora_weights"),
                    "{what}: {e}"
                );
                assert!(
                    !tmp.path().join("adapter_model.safetensors").exists(),
                    "{what}: nothing written"
                );
                continue;
            }
            let s = r.unwrap_or_else(|e| panic!("{what} {q:?}: {e:#}"));
            assert!(
                s.completed && s.final_loss.is_some_and(f64::is_finite),
                "{what} {q:?}"
            );
        }
    }
    for (what, options) in [&variants[0], &variants[4]] {
        let (whole, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let cfg = |dir: &std::path::Path| train_config_with("lora", options.clone(), dir, None);
        train(
            &cfg(whole.path()),
            &dev,
            &mut Silent,
            &RunOptions::default(),
        )
        .unwrap();
        train(
            &cfg(split.path()),
            &dev,
            &mut Silent,
            &RunOptions {
                stop_after: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        train(
            &cfg(split.path()),
            &dev,
            &mut Silent,
            &RunOptions {
                resume: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            adapter_bytes(whole.path()),
            adapter_bytes(split.path()),
            "resumed {what} run diverged"
        );
    }
}
