//! DePT (`--method dept`, peft_type `PROMPT_TUNING_LORA`) against the reference's forward,
//! restated in torch by tests/fixtures/dept/make_dept_fixtures.py (ZhengxiangShi/DePT
//! `peft_model.py:827-838`): the reference's saved adapter loads, gives its logits, loss and
//! the gradients of the prompt and the low-rank pair on its padded batch and on the same
//! sequences packed padding-free; a fresh adapter trains what it should; two learning rates;
//! resume to the same bytes; and the named errors (an input longer than max_length, r = 0,
//! an adapter without its pair, a second learning rate for a method without one).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use ferrule::adapted::attach;
use ferrule::model::{Arch, Inputs, Model, ModelSource, Task};
use ferrule::ops::recompute::GradSink;
use ferrule::ops::ComputeDtypeChoice;
use ferrule::peft_io::load_adapter;
use ferrule::train::TrainConfig;
use ferrule::tuners::{AdapterConfig, BuildContext, Tuner};

const A_KEY: &str = "prompt_encoder.lora_embedding_A";
const B_KEY: &str = "prompt_encoder.lora_embedding_B";

fn llama() -> ModelSource {
    let dir = fixtures().join("models/llama");
    ModelSource::load(dir.to_str().unwrap(), &Device::Cpu).unwrap()
}

/// The reference's adapter (tests/fixtures/dept/llama), loaded as `eval` and `logits` load it.
fn reference() -> (Model, Box<dyn Tuner>) {
    let dev = Device::Cpu;
    let saved = load_adapter(&fixtures().join("dept/llama"), &dev).unwrap();
    let tuner = saved.into_tuner(0, &dev).unwrap();
    let model = Model::build(&llama(), Task::CausalLm, tuner.as_ref(), &dev, 0).unwrap();
    tuner.finish().unwrap();
    (model, tuner)
}

fn decoder(model: &Model) -> &ferrule::model::llama::DecoderLm {
    match &model.arch {
        Arch::Decoder(lm) => lm,
        _ => panic!("a decoder"),
    }
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

/// Every trainable tensor's gradient of `loss`, by key (a missing one fails).
fn grads_of(tuner: &dyn Tuner, loss: &Tensor, sink: Option<&GradSink>) -> HashMap<String, Tensor> {
    let mut grads = loss.backward().unwrap();
    if let Some(s) = sink {
        s.drain_into(&mut grads).unwrap();
    }
    tuner
        .trainable()
        .into_iter()
        .map(|(k, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{k}: no gradient"));
            (k, g.clone())
        })
        .collect()
}

fn assert_matches_reference(what: &str, loss: &Tensor, grads: &HashMap<String, Tensor>) {
    let exp = load("dept/llama/expected.safetensors");
    let (got, want) = (scalar(loss), scalar(&exp["loss"]));
    assert!((got - want).abs() < 1e-4, "{what}: loss {got} vs {want}");
    assert_eq!(grads.len(), 3, "{what}: prompt, A and B train");
    for (k, g) in grads {
        let d = max_diff(g, &exp[&format!("grad.{k}")]);
        assert!(d < 1e-4, "{what}: {k}: max |Δgrad| = {d}");
    }
}

/// The real tokens' lengths of the fixture's right-padded batch.
fn lengths(exp: &HashMap<String, Tensor>) -> Vec<usize> {
    let mask: Vec<Vec<i64>> = exp["attention_mask"].to_vec2().unwrap();
    mask.iter()
        .map(|r| r.iter().sum::<i64>() as usize)
        .collect()
}

/// The first `lens[i]` positions of each row of `t: [b, t, ...]` end to end, `[1, Σ lᵢ, ...]`.
fn pack(t: &Tensor, lens: &[usize]) -> Tensor {
    let rows: Vec<Tensor> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| t.get(i).unwrap().narrow(0, 0, l).unwrap())
        .collect();
    Tensor::cat(&rows, 0).unwrap().unsqueeze(0).unwrap()
}

#[test]
fn the_references_adapter_gives_its_logits_loss_and_gradients_padded() {
    let exp = load("dept/llama/expected.safetensors");
    for recompute in [false, true] {
        let (model, tuner) = reference();
        let logits = model
            .forward(&Inputs {
                input_ids: &exp["input_ids"],
                attention_mask: Some(&exp["attention_mask"]),
                token_type_ids: None,
            })
            .unwrap();
        let mask = exp["attention_mask"].to_dtype(DType::F32).unwrap();
        let d = max_diff_masked(&logits, &exp["logits"], Some(&mask));
        assert!(d < 1e-4, "logits of the real positions differ by {d}");
        let sink = recompute.then(|| {
            std::sync::Arc::new(GradSink::new(
                tuner.trainable().iter().map(|(_, v)| v.as_tensor().id()),
            ))
        });
        model.set_recompute(sink.clone());
        let (loss, _) = decoder(&model)
            .causal_lm_loss(
                &exp["input_ids"],
                Some(&exp["attention_mask"]),
                None,
                &exp["labels"],
            )
            .unwrap();
        let grads = grads_of(tuner.as_ref(), &loss, sink.as_deref());
        assert_matches_reference(&format!("padded, recompute={recompute}"), &loss, &grads);
    }
}

/// Padding-free, the update is indexed by each token's position within its own sequence, so
/// the packed sequences give the padded batch's logits, loss and gradients.
#[test]
fn packed_sequences_take_the_update_by_their_own_positions() {
    let exp = load("dept/llama/expected.safetensors");
    let lens = lengths(&exp);
    let (ids, labels) = (pack(&exp["input_ids"], &lens), pack(&exp["labels"], &lens));
    let (model, tuner) = reference();
    let lm = decoder(&model);
    let logits = lm.forward_packed(&ids, &lens).unwrap();
    let d = max_diff(&logits, &pack(&exp["logits"], &lens));
    assert!(d < 1e-4, "packed logits differ from the reference's by {d}");
    let (loss, _) = lm.causal_lm_loss_packed(&ids, &lens, &labels).unwrap();
    let grads = grads_of(tuner.as_ref(), &loss, None);
    assert_matches_reference("packed", &loss, &grads);
}

fn dept(options: serde_json::Value) -> AdapterConfig {
    let mut cfg = serde_json::json!({"peft_type": "PROMPT_TUNING_LORA", "num_virtual_tokens": 3});
    cfg.as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    AdapterConfig::from_json(cfg).unwrap()
}

fn fresh(cfg: &AdapterConfig) -> anyhow::Result<(Model, Box<dyn Tuner>)> {
    let dev = Device::Cpu;
    let ctx = BuildContext {
        seed: 3,
        device: &dev,
        weights: None,
        allow_unmatched: false,
        release_base: None,
    };
    let tuned = attach(&llama(), Task::CausalLm, cfg, ctx)?;
    Ok((tuned.model, tuned.tuner))
}

/// A fresh adapter trains `m·d + max_length·r + r·d` elements (3·64 + 16·4 + 4·64 here, what
/// `inspect` and `plan` report) under the reference's keys; B starts at zero as the
/// reference's, so A's first gradient is exactly zero while the prompt's and B's are not.
#[test]
fn a_fresh_adapter_trains_the_prompt_and_the_pair_b_first() {
    let (model, tuner) = fresh(&dept(serde_json::json!({"r": 4, "max_length": 16}))).unwrap();
    assert_eq!(
        ferrule::tuners::trainable_params(tuner.as_ref()),
        3 * 64 + 16 * 4 + 4 * 64
    );
    let keys: Vec<String> = tuner.trainable().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["prompt_embeddings", A_KEY, B_KEY]);
    assert_eq!(tuner.adapted()[0].params, 3 * 64 + 16 * 4 + 4 * 64);
    assert_eq!(tuner.lr_group_keys(), [A_KEY, B_KEY]);
    let exp = load("dept/llama/expected.safetensors");
    let (loss, _) = decoder(&model)
        .causal_lm_loss(
            &exp["input_ids"],
            Some(&exp["attention_mask"]),
            None,
            &exp["labels"],
        )
        .unwrap();
    let grads = grads_of(tuner.as_ref(), &loss, None);
    let norm = |k: &str| scalar(&grads[k].sqr().unwrap().sum_all().unwrap());
    assert_eq!(norm(A_KEY), 0.0, "B = 0: A has no gradient yet");
    assert!(norm(B_KEY) > 0.0 && norm("prompt_embeddings") > 0.0);
    let config = tuner.config_json().unwrap();
    assert_eq!(config["max_length"], 16);
    assert_eq!(config["hidden_size"], 64);
}

#[test]
fn an_input_longer_than_max_length_is_an_error_naming_it() {
    let (model, _) = reference();
    let ids = Tensor::new(&[[5u32, 6, 7, 8, 9, 10, 11, 12, 13]], &Device::Cpu).unwrap();
    for packed in [false, true] {
        let e = match packed {
            false => model
                .forward(&Inputs {
                    input_ids: &ids,
                    attention_mask: None,
                    token_type_ids: None,
                })
                .unwrap_err(),
            true => decoder(&model).forward_packed(&ids, &[9]).unwrap_err(),
        };
        let e = format!("{e:#}");
        assert!(
            e.contains("a sequence of 9 tokens is longer than max_length = 8"),
            "packed={packed}: {e}"
        );
    }
}

#[test]
fn rank_zero_is_refused() {
    let e = fresh(&dept(serde_json::json!({"r": 0}))).err().unwrap();
    let e = format!("{e:#}");
    assert!(e.contains("dept: r must be at least 1"), "{e}");
}

#[test]
fn an_adapter_without_its_low_rank_pair_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("dept/llama");
    std::fs::copy(
        src.join("adapter_config.json"),
        tmp.path().join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors = load("dept/llama/adapter_model.safetensors");
    tensors.remove(B_KEY);
    candle_core::safetensors::save(&tensors, tmp.path().join("adapter_model.safetensors")).unwrap();
    let dev = Device::Cpu;
    let saved = load_adapter(tmp.path(), &dev).unwrap();
    let tuner = saved.into_tuner(0, &dev).unwrap();
    let e = Model::build(&llama(), Task::CausalLm, tuner.as_ref(), &dev, 0)
        .err()
        .unwrap();
    let e = format!("{e:#}");
    assert!(
        e.contains("dept: the adapter has no prompt_encoder.lora_embedding_B"),
        "{e}"
    );
}

fn run_config(out: &Path) -> TrainConfig {
    TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(dept(serde_json::json!({"r": 4, "max_length": 64}))),
        max_len: Some(64),
        batch_size: Some(4),
        max_steps: Some(4),
        lr: 1e-2,
        lora_embedding_lr: Some(5e-2),
        seed: 5,
        compute_dtype: ComputeDtypeChoice::F32,
        ..Default::default()
    }
}

/// Padding-free batches (the default), both learning rates; stopped after 2 of 4 steps and
/// resumed, the adapter has the same bytes, and it holds the reference's three keys.
#[test]
fn a_run_with_two_learning_rates_resumes_to_the_same_adapter() {
    let whole = assert_resume_is_byte_identical(run_config, 2);
    let saved = ferrule::model::weights::load_safetensors_file(
        &whole.path().join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut keys: Vec<&String> = saved.keys().collect();
    keys.sort();
    assert_eq!(keys, ["prompt_embeddings", A_KEY, B_KEY]);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(whole.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "PROMPT_TUNING_LORA");
}

#[test]
fn a_second_learning_rate_for_a_method_without_one_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = TrainConfig {
        adapter: Some(
            AdapterConfig::from_json(
                serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}),
            )
            .unwrap(),
        ),
        ..run_config(&out)
    };
    let e = ferrule::train::train(
        &cfg,
        &Device::Cpu,
        &mut ferrule::train::Silent,
        &Default::default(),
    )
    .err()
    .unwrap();
    let e = format!("{e:#}");
    assert!(
        e.contains("lora_embedding_lr (--lora-embedding-lr)")
            && e.contains("--method prompt-tuning has one learning rate"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written");
}
