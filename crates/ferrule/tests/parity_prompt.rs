//! Prompt tuning and prefix tuning against adapters Python peft 0.21 saved
//! (tests/fixtures/methods/*prompt_tuning*, *prefix_tuning*, made by make_method_fixtures.py):
//! logits of the caller's positions, gradients with and without recomputation, parameter
//! counts, TEXT initialisation, cached greedy decoding against peft's full-forward loop, the
//! projected prefix against the MLP peft trained, save → load, training, and the errors of
//! adapters made for another model.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use ferrule::adapted::AdaptedModel;
use ferrule::model::{Arch, Inputs, Model, ModelSource, Task};
use ferrule::ops::recompute::GradSink;
use ferrule::peft_io::load_adapter;
use ferrule::tuners::{AdapterConfig, BuildContext, Tuner};

struct Case {
    name: &'static str,
    model: &'static str,
    task: Task,
    /// Positions peft's logits have before the caller's (prompt tuning's virtual tokens).
    virtual_positions: usize,
    grads: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "llama_prompt_tuning",
        model: "llama",
        task: Task::CausalLm,
        virtual_positions: 4,
        grads: true,
    },
    Case {
        name: "llama_prefix_tuning",
        model: "llama",
        task: Task::CausalLm,
        virtual_positions: 0,
        grads: true,
    },
    Case {
        name: "llama_prefix_tuning_proj",
        model: "llama",
        task: Task::CausalLm,
        virtual_positions: 0,
        grads: true,
    },
    Case {
        name: "bert_prompt_tuning_seqcls",
        model: "bert",
        task: Task::SeqCls,
        virtual_positions: 0,
        grads: false,
    },
];

fn model_dir(model: &str) -> String {
    fixtures().join("models").join(model).display().to_string()
}

fn source(case: &Case) -> ModelSource {
    let mut src = ModelSource::load(&model_dir(case.model), &Device::Cpu).unwrap();
    if case.task == Task::SeqCls {
        src.config["num_labels"] = serde_json::json!(2);
    }
    src
}

fn build(case: &Case) -> (Model, Box<dyn Tuner>) {
    let dev = Device::Cpu;
    let saved = load_adapter(&fixtures().join("methods").join(case.name), &dev).unwrap();
    let tuner = saved.into_tuner(0, &dev).unwrap();
    let model = Model::build(&source(case), case.task, tuner.as_ref(), &dev, 0).unwrap();
    tuner.finish().unwrap();
    (model, tuner)
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

fn keys_json(name: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("methods").join(name).join("keys.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn peft_adapters_reproduce_peft_logits_on_the_callers_positions() {
    for case in CASES {
        let (model, _) = build(case);
        let inp = inputs(case);
        let mut want = load(&format!("methods/{}/logits.safetensors", case.name))
            .remove("logits")
            .unwrap();
        if case.virtual_positions > 0 {
            // peft's output starts with the virtual positions; ferrule's covers the input's.
            let t = inp["input_ids"].dim(1).unwrap();
            assert_eq!(want.dim(1).unwrap(), case.virtual_positions + t);
            want = want.narrow(1, case.virtual_positions, t).unwrap();
        }
        let got = forward(&model, &inp);
        let mask = (case.task == Task::CausalLm).then(|| &inp["attention_mask"]);
        let d = max_diff_masked(&got, &want, mask);
        assert!(d < 1e-4, "{}: max |Δlogits| = {d}", case.name);
    }
}

#[test]
fn parameter_counts_equal_peft() {
    let counts: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("methods/param_counts.json")).unwrap(),
    )
    .unwrap();
    for case in CASES {
        let (model, tuner) = build(case);
        // A reloaded adapter holds what peft reloads (the projected prefix is a plain table
        // then); peft's inference-mode reload freezes the SEQ_CLS classifier copy, which
        // ferrule keeps trainable (66 elements, in the total either way).
        let reloaded = &keys_json(case.name)["counts_after_reload"];
        let (tr, tot) = (
            ferrule::tuners::trainable_params(tuner.as_ref()),
            ferrule::tuners::total_params(model.base_params, tuner.as_ref()),
        );
        let classifier = if case.task == Task::SeqCls { 66 } else { 0 };
        assert_eq!(
            tr as u64,
            reloaded[0].as_u64().unwrap() + classifier,
            "{} trainable",
            case.name
        );
        assert_eq!(
            tot as u64,
            reloaded[1].as_u64().unwrap(),
            "{} total",
            case.name
        );
    }
    // A fresh adapter of each config counts what peft counted when it made it (the prefix MLP
    // included).
    for case in CASES {
        let (model, tuner) = fresh(case);
        assert_eq!(
            ferrule::tuners::trainable_params(tuner.as_ref()) as u64,
            counts[case.name]["trainable"].as_u64().unwrap(),
            "{} fresh trainable",
            case.name
        );
        assert_eq!(
            ferrule::tuners::total_params(model.base_params, tuner.as_ref()) as u64,
            counts[case.name]["total"].as_u64().unwrap(),
            "{} fresh total",
            case.name
        );
    }
}

/// A fresh (untrained) adapter with the fixture's config.
fn fresh(case: &Case) -> (Model, Box<dyn Tuner>) {
    let dev = Device::Cpu;
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            fixtures()
                .join("methods")
                .join(case.name)
                .join("adapter_config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let config = AdapterConfig::from_json(cfg).unwrap();
    let tuner = ferrule::tuners::registry::build(
        &config,
        BuildContext {
            seed: 7,
            device: &dev,
            weights: None,
            allow_unmatched: false,
            release_base: None,
        },
    )
    .unwrap();
    let model = Model::build(&source(case), case.task, tuner.as_ref(), &dev, 0).unwrap();
    tuner.finish().unwrap();
    (model, tuner)
}

fn loss_grads(
    model: &Model,
    tuner: &dyn Tuner,
    labels: &Tensor,
    recompute: bool,
) -> (f32, HashMap<String, Tensor>) {
    let inp = load("inputs/decoder.safetensors");
    let sink = recompute.then(|| {
        std::sync::Arc::new(GradSink::new(
            tuner.trainable().iter().map(|(_, v)| v.as_tensor().id()),
        ))
    });
    assert_eq!(model.set_recompute(sink.clone()), recompute);
    let Arch::Decoder(lm) = &model.arch else {
        panic!("decoder expected")
    };
    let (loss, _) = lm
        .causal_lm_loss(
            &inp["input_ids"],
            Some(&inp["attention_mask"]),
            None,
            labels,
        )
        .unwrap();
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

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

#[test]
fn gradients_match_torch_with_and_without_recomputation() {
    for case in CASES.iter().filter(|c| c.grads) {
        let exp = load(&format!("methods/{}/grads.safetensors", case.name));
        for recompute in [false, true] {
            let (model, tuner) = build(case);
            let (loss, grads) = loss_grads(&model, tuner.as_ref(), &exp["labels"], recompute);
            assert!(
                (loss - scalar(&exp["loss"])).abs() < 1e-4,
                "{} loss {loss} vs {}",
                case.name,
                scalar(&exp["loss"])
            );
            for (k, g) in &grads {
                let d = max_diff_masked(g, &exp[k], None);
                assert!(
                    d < 1e-4,
                    "{} recompute={recompute} {k}: max |Δgrad| = {d}",
                    case.name
                );
            }
        }
    }
}

/// The prefix MLP peft trained (`encoder.safetensors`, which peft does not save) gives the
/// saved table, the same loss, and the MLP's gradients (`encoder_grads.safetensors`).
#[test]
fn projected_prefix_equals_the_mlp_peft_trained() {
    let dev = Device::Cpu;
    let case = &CASES[2];
    let encoder = load(&format!("methods/{}/encoder.safetensors", case.name));
    let exp = load(&format!("methods/{}/encoder_grads.safetensors", case.name));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            fixtures()
                .join("methods")
                .join(case.name)
                .join("adapter_config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let tuner = ferrule::tuners::registry::build(
        &AdapterConfig::from_json(cfg).unwrap(),
        BuildContext {
            seed: 0,
            device: &dev,
            weights: Some(encoder),
            allow_unmatched: false,
            release_base: None,
        },
    )
    .unwrap();
    let model = Model::build(&source(case), case.task, tuner.as_ref(), &dev, 0).unwrap();
    tuner.finish().unwrap();
    let saved = tuner.saved_tensors().unwrap();
    assert_eq!(saved.len(), 1);
    let want =
        &load(&format!("methods/{}/adapter_model.safetensors", case.name))["prompt_embeddings"];
    assert!(
        max_diff_masked(&saved[0].1, want, None) < 1e-5,
        "projected table differs from peft's saved one"
    );
    let labels = &load(&format!("methods/{}/grads.safetensors", case.name))["labels"];
    let (loss, grads) = loss_grads(&model, tuner.as_ref(), labels, false);
    assert!((loss - scalar(&exp["loss"])).abs() < 1e-4);
    assert_eq!(grads.len(), 5);
    for (k, g) in &grads {
        let d = max_diff_masked(g, &exp[k], None);
        assert!(d < 1e-4, "{k}: max |Δgrad| = {d}");
    }
}

/// TEXT init: the text's tokens repeated to num_virtual_tokens, their embedding rows.
#[test]
fn text_initialisation_equals_peft() {
    let case = Case {
        name: "llama_prompt_tuning_text",
        model: "llama",
        task: Task::CausalLm,
        virtual_positions: 6,
        grads: false,
    };
    let want = load("methods/llama_prompt_tuning_text/initial.safetensors");
    // The fixture config names the tokenizer repository-relative.
    let cwd = std::env::current_dir().unwrap();
    std::env::set_current_dir(repo_root()).unwrap();
    let (_, tuner) = fresh(&case);
    std::env::set_current_dir(cwd).unwrap();
    let (key, table) = &tuner.trainable()[0];
    assert_eq!(key, "prompt_embeddings");
    assert_eq!(
        max_diff_masked(table.as_tensor(), &want["prompt_embeddings"], None),
        0.0
    );
}

/// Cached greedy decoding (prefill with the padded batch, then one token at a time) picks the
/// tokens of peft's loop of full forwards (peft's own `generate` is broken for both methods
/// with transformers 5.24; keys.json records both).
#[test]
fn cached_greedy_decoding_equals_the_full_forward_loop() {
    for case in CASES
        .iter()
        .filter(|c| c.task == Task::CausalLm && c.name != "llama_prefix_tuning_proj")
    {
        let (model, _) = build(case);
        let Arch::Decoder(lm) = &model.arch else {
            unreachable!()
        };
        let want: Vec<Vec<u32>> = serde_json::from_value(
            keys_json(case.name)["generate"]["full_forward_greedy_new_tokens"].clone(),
        )
        .unwrap();
        let inp = inputs(case);
        let mut mask = inp["attention_mask"].clone();
        let mut cache = lm.new_cache();
        let mut next = inp["input_ids"].clone();
        let mut got: Vec<Vec<u32>> = vec![vec![]; want.len()];
        for _ in 0..want[0].len() {
            let logits = lm
                .last_logits(&next, Some(&mask), None, Some(&mut cache))
                .unwrap();
            let picked: Vec<u32> = logits
                .argmax(1)
                .unwrap()
                .to_dtype(DType::U32)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (row, p) in picked.iter().enumerate() {
                got[row].push(*p);
            }
            next = Tensor::new(picked.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(1)
                .unwrap()
                .to_dtype(inp["input_ids"].dtype())
                .unwrap();
            mask = Tensor::cat(
                &[
                    &mask,
                    &Tensor::ones((want.len(), 1), mask.dtype(), &Device::Cpu).unwrap(),
                ],
                1,
            )
            .unwrap();
        }
        assert_eq!(got, want, "{}", case.name);
        // The single-sequence generator on the unpadded row agrees.
        let prompt: Vec<u32> = inp["input_ids"]
            .i(0)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let opts = ferrule::generate::SamplingOptions {
            max_new_tokens: want[0].len(),
            ..Default::default()
        };
        assert_eq!(
            ferrule::generate::generate(lm, &prompt, &opts, |_| {}).unwrap(),
            want[0],
            "{} generate",
            case.name
        );
    }
}

fn copy_adapter(name: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let from = fixtures().join("methods").join(name);
    std::fs::copy(
        from.join("adapter_model.safetensors"),
        tmp.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(tmp.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    tmp
}

fn load_err(model: &str, adapter: &std::path::Path) -> String {
    let r = AdaptedModel::load(&model_dir(model), Some(adapter), None, &Device::Cpu);
    format!("{:#}", r.err().expect("the adapter must not load"))
}

#[test]
fn adapters_for_another_model_fail_clearly() {
    let e = load_err(
        "llama",
        copy_adapter("llama_prefix_tuning", |c| c["num_layers"] = 3.into()).path(),
    );
    assert!(e.contains("num_layers = 3") && e.contains("needs 2"), "{e}");
    let e = load_err(
        "llama",
        copy_adapter("llama_prompt_tuning", |c| c["token_dim"] = 32.into()).path(),
    );
    assert!(
        e.contains("token_dim = 32") && e.contains("needs 64"),
        "{e}"
    );
    // A prompt made for BERT's hidden size on the llama fixture: the table's shape says so.
    let e = load_err(
        "llama",
        copy_adapter("bert_prompt_tuning_seqcls", |c| {
            c["token_dim"] = serde_json::Value::Null;
            c["task_type"] = "CAUSAL_LM".into();
            c["modules_to_save"] = serde_json::Value::Null;
        })
        .path(),
    );
    assert!(
        e.contains("prompt_embeddings") && e.contains("[4, 32]") && e.contains("[4, 64]"),
        "{e}"
    );
    // Prefix tuning on an encoder: no reference (peft 0.21 + transformers 5 cannot run it) and no hook yet.
    let cfg = serde_json::json!({"peft_type": "PREFIX_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 3});
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    ferrule::peft_io::write_safetensors(
        &tmp.path().join("adapter_model.safetensors"),
        &[],
        &[("format", "pt")],
    )
    .unwrap();
    let mut src = ModelSource::load(&model_dir("bert"), &Device::Cpu).unwrap();
    src.config["num_labels"] = serde_json::json!(2);
    let tuner = load_adapter(tmp.path(), &Device::Cpu)
        .unwrap()
        .into_tuner(0, &Device::Cpu)
        .unwrap();
    let _model = Model::build(&src, Task::SeqCls, tuner.as_ref(), &Device::Cpu, 0).unwrap();
    let e = format!("{:#}", tuner.finish().unwrap_err());
    assert!(e.contains("BERT-family encoders do not yet"), "{e}");
}

#[test]
fn prompt_adapters_cannot_be_merged() {
    let (_, tuner) = build(&CASES[0]);
    let e = tuner
        .updates()
        .err()
        .expect("prompt tuning has no weight update")
        .to_string();
    assert!(
        e.contains("PROMPT_TUNING") && e.contains("cannot be merged"),
        "{e}"
    );
}

/// Training: prompt tuning and prefix tuning (with and without the MLP) learn on a dense and
/// an NF4 base with recomputation, save what peft loads (the projected table for the MLP),
/// and an interrupted prefix run resumes to the same bytes.
#[test]
fn prompt_methods_train_save_and_resume() {
    use ferrule::train::{train, RunOptions, Silent, TrainConfig};
    let dev = Device::Cpu;
    let nf4 = ferrule::quant::QuantSpec::new(ferrule::quant::QuantMethod::Nf4, 64, true).unwrap();
    let config = |peft_type: &str,
                  options: serde_json::Value,
                  out: &std::path::Path,
                  quantize,
                  recompute| TrainConfig {
        model: model_dir("llama"),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(AdapterConfig::new(
            peft_type,
            options.as_object().unwrap().clone(),
        )),
        max_len: Some(48),
        batch_size: Some(2),
        max_steps: Some(4),
        lr: 3e-2,
        quantize,
        recompute,
        ..Default::default()
    };
    let methods = [
        (
            "PROMPT_TUNING",
            serde_json::json!({"num_virtual_tokens": 5}),
            vec![("prompt_embeddings", vec![5, 64])],
        ),
        (
            "PREFIX_TUNING",
            serde_json::json!({"num_virtual_tokens": 3}),
            vec![("prompt_embeddings", vec![3, 128])],
        ),
        (
            "PREFIX_TUNING",
            serde_json::json!({"num_virtual_tokens": 3, "prefix_projection": true, "encoder_hidden_size": 8}),
            vec![("prompt_embeddings", vec![3, 128])],
        ),
    ];
    for (peft_type, options, want) in &methods {
        for (q, recompute) in [(None, false), (Some(nf4), true)] {
            let tmp = tempfile::tempdir().unwrap();
            let s = train(
                &config(peft_type, options.clone(), tmp.path(), q, recompute),
                &dev,
                &mut Silent,
                &RunOptions::default(),
            )
            .unwrap();
            let losses: Vec<f64> =
                ferrule::train::metrics::read_metrics(&tmp.path().join("metrics.jsonl"))
                    .unwrap()
                    .iter()
                    .filter_map(|m| m.get("loss").and_then(|v| v.as_f64()))
                    .collect();
            assert!(
                s.completed && losses.len() == 4 && losses[3] < losses[0],
                "{peft_type} {options} {q:?}: loss did not fall: {losses:?}"
            );
            let tensors = ferrule::model::weights::load_safetensors_file(
                &tmp.path().join("adapter_model.safetensors"),
                &dev,
            )
            .unwrap();
            let mut shapes: Vec<(String, Vec<usize>)> = tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect();
            shapes.sort();
            let want: Vec<(String, Vec<usize>)> = want
                .iter()
                .map(|(k, s)| (k.to_string(), s.clone()))
                .collect();
            assert_eq!(shapes, want, "{peft_type} {options}");
            // What was saved loads back and gives the trained model's outputs.
            AdaptedModel::load(&model_dir("llama"), Some(tmp.path()), None, &dev).unwrap();
        }
    }
    let opts = serde_json::json!({"num_virtual_tokens": 3, "prefix_projection": true, "encoder_hidden_size": 8});
    let (whole, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(
        &config("PREFIX_TUNING", opts.clone(), whole.path(), None, false),
        &dev,
        &mut Silent,
        &RunOptions::default(),
    )
    .unwrap();
    train(
        &config("PREFIX_TUNING", opts.clone(), split.path(), None, false),
        &dev,
        &mut Silent,
        &RunOptions {
            stop_after: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    train(
        &config("PREFIX_TUNING", opts, split.path(), None, false),
        &dev,
        &mut Silent,
        &RunOptions {
            resume: true,
            ..Default::default()
        },
    )
    .unwrap();
    let bytes = |d: &std::path::Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        bytes(whole.path()),
        bytes(split.path()),
        "resumed prefix-tuning run diverged"
    );
}

/// A left-padded batch (rows padded by 0, 2 and 6: more than either adapter's virtual
/// tokens) against peft 0.21 (tests/fixtures/left_padding, make_left_padding_fixtures.py):
/// logits at every position and the loss, without position ids and with generate's
/// (`cumsum(mask) − 1`; peft shifts them by the prefix for prefix tuning and ignores them for
/// prompt tuning), within 1e-5.
#[test]
fn left_padded_batches_equal_peft_with_and_without_position_ids() {
    let inp = load("left_padding/inputs.safetensors");
    let positions = &inp["position_ids"];
    for case in CASES.iter().take(2) {
        let (model, _) = build(case);
        let Arch::Decoder(lm) = &model.arch else {
            unreachable!()
        };
        let want = load(&format!("left_padding/{}.safetensors", case.name));
        let shifted = want.contains_key("logits_pos");
        for pos in [None, Some(positions)] {
            let what = format!("{} position_ids {}", case.name, pos.is_some());
            let suffix = if pos.is_some() && shifted { "_pos" } else { "" };
            let mut want_logits = want[&format!("logits{suffix}")].clone();
            let t = inp["input_ids"].dim(1).unwrap();
            want_logits = want_logits.narrow(1, case.virtual_positions, t).unwrap();
            let got = model
                .forward_at(
                    &Inputs {
                        input_ids: &inp["input_ids"],
                        attention_mask: Some(&inp["attention_mask"]),
                        token_type_ids: None,
                    },
                    pos,
                )
                .unwrap();
            let d = max_diff_masked(&got, &want_logits, None);
            assert!(d < 1e-5, "{what}: max |Δlogits| = {d}");
            let (loss, _) = lm
                .causal_lm_loss(
                    &inp["input_ids"],
                    Some(&inp["attention_mask"]),
                    pos,
                    &inp["labels"],
                )
                .unwrap();
            let (loss, peft) = (
                loss.to_scalar::<f32>().unwrap(),
                scalar(&want[&format!("loss{suffix}")]),
            );
            assert!((loss - peft).abs() < 1e-5, "{what}: loss {loss} vs {peft}");
        }
    }
}

/// Cached greedy decoding of the left-padded batch (prefill, then one token a step, the mask
/// extended with a one and, with position ids, each row's next position its last + 1) picks
/// the tokens of peft's loop of full forwards, with and without position ids.
#[test]
fn cached_decoding_of_a_left_padded_batch_equals_peft() {
    let inp = load("left_padding/inputs.safetensors");
    for case in CASES.iter().take(2) {
        let (model, _) = build(case);
        let Arch::Decoder(lm) = &model.arch else {
            unreachable!()
        };
        let record: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("left_padding/{}.json", case.name)))
                .unwrap(),
        )
        .unwrap();
        for (key, pos) in [
            ("greedy_new_tokens", None),
            ("greedy_new_tokens_pos", Some(&inp["position_ids"])),
        ] {
            let want: Vec<Vec<u32>> = serde_json::from_value(record[key].clone()).unwrap();
            let got = cached_greedy(lm, &inp["input_ids"], &inp["attention_mask"], pos, 4);
            assert_eq!(got, want, "{} {key}", case.name);
        }
        // `generate_batch` (`ferrule generate --prompts`) on the rows unpadded: it pads them
        // again and numbers positions as transformers' generate does.
        let ids: Vec<Vec<u32>> = inp["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mask: Vec<Vec<u32>> = inp["attention_mask"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2()
            .unwrap();
        let prompts: Vec<Vec<u32>> = ids
            .iter()
            .zip(&mask)
            .map(|(row, m)| {
                row.iter()
                    .zip(m)
                    .filter(|(_, &k)| k == 1)
                    .map(|(&t, _)| t)
                    .collect()
            })
            .collect();
        assert!(
            prompts.iter().any(|p| p.len() < ids[0].len()),
            "a padded row"
        );
        let opts = ferrule::generate::SamplingOptions {
            max_new_tokens: 4,
            do_sample: false,
            stop_tokens: vec![],
            ..Default::default()
        };
        let got: Vec<Vec<u32>> =
            ferrule::generate::generate_batch(lm, &prompts, &opts, 0, |_, _| {})
                .unwrap()
                .into_iter()
                .map(|g| g.tokens)
                .collect();
        let want: Vec<Vec<u32>> =
            serde_json::from_value(record["greedy_new_tokens_pos"].clone()).unwrap();
        assert_eq!(got, want, "{} generate_batch", case.name);
    }
}

/// Greedy decoding over a KV cache: `steps` new tokens per row of `ids`.
fn cached_greedy(
    lm: &ferrule::model::llama::DecoderLm,
    ids: &Tensor,
    mask: &Tensor,
    positions: Option<&Tensor>,
    steps: usize,
) -> Vec<Vec<u32>> {
    let b = ids.dim(0).unwrap();
    let ones = Tensor::ones((b, 1), mask.dtype(), &Device::Cpu).unwrap();
    let (mut next, mut mask) = (ids.clone(), mask.clone());
    let mut pos = positions.map(|p| p.to_dtype(DType::I64).unwrap());
    let mut cache = lm.new_cache();
    let mut got = vec![vec![]; b];
    for _ in 0..steps {
        let logits = lm
            .last_logits(&next, Some(&mask), pos.as_ref(), Some(&mut cache))
            .unwrap();
        let picked: Vec<u32> = logits
            .argmax(1)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (row, p) in picked.iter().enumerate() {
            got[row].push(*p);
        }
        next = Tensor::new(picked.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        mask = Tensor::cat(&[&mask, &ones], 1).unwrap();
        pos = pos.map(|p| {
            let t = p.dim(1).unwrap();
            (p.narrow(1, t - 1, 1).unwrap() + 1.0).unwrap()
        });
    }
    got
}

/// Prompt tuning on BERT with a left-padded row: the classification logits of peft, within
/// 1e-5 (positions count from the first virtual token in every row, padded or not).
#[test]
fn bert_prompt_tuning_on_a_left_padded_batch_equals_peft() {
    let (model, _) = build(&CASES[3]);
    let inp = load("left_padding/inputs.safetensors");
    let got = model
        .forward(&Inputs {
            input_ids: &inp["bert_input_ids"],
            attention_mask: Some(&inp["bert_attention_mask"]),
            token_type_ids: Some(&inp["bert_token_type_ids"]),
        })
        .unwrap();
    let want = &load("left_padding/bert_prompt_tuning_seqcls.safetensors")["logits"];
    let d = max_diff_masked(&got, want, None);
    assert!(d < 1e-5, "max |Δlogits| = {d}");
    let e = model
        .forward_at(
            &Inputs {
                input_ids: &inp["bert_input_ids"],
                attention_mask: Some(&inp["bert_attention_mask"]),
                token_type_ids: None,
            },
            Some(&inp["position_ids"]),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("position_ids"), "{e}");
}

/// The plain base with generate's position ids on the left-padded row (transformers,
/// expected/llama_logits_maskpos.safetensors), and position ids that do not fit: named errors.
#[test]
fn position_ids_number_each_row_as_transformers_does() {
    let dev = Device::Cpu;
    let src = ModelSource::load(&model_dir("llama"), &dev).unwrap();
    let model = Model::build(&src, Task::CausalLm, &ferrule::model::Frozen, &dev, 0).unwrap();
    let inp = load("inputs/decoder.safetensors");
    let want = load("expected/llama_logits_maskpos.safetensors");
    let inputs = Inputs {
        input_ids: &inp["input_ids"],
        attention_mask: Some(&inp["attention_mask"]),
        token_type_ids: None,
    };
    let got = model
        .forward_at(&inputs, Some(&want["position_ids"]))
        .unwrap();
    let d = max_diff_masked(&got, &want["logits"], Some(&inp["attention_mask"]));
    assert!(d < 1e-5, "max |Δlogits| = {d}");
    let short = want["position_ids"].narrow(1, 0, 5).unwrap();
    let e = format!("{:#}", model.forward_at(&inputs, Some(&short)).unwrap_err());
    assert!(e.contains("position_ids have shape [2, 5]"), "{e}");
    let far = (want["position_ids"].to_dtype(DType::F32).unwrap() + 500.0)
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap();
    let e = format!("{:#}", model.forward_at(&inputs, Some(&far)).unwrap_err());
    assert!(
        e.contains("position_ids hold 500") && e.contains("max_position_embeddings"),
        "{e}"
    );
}
