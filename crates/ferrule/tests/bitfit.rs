//! BitFit (`--method bitfit`) against the reference's rule run in torch
//! (tests/fixtures/bitfit/make_bitfit_fixtures.py): which biases train, the logits, the loss,
//! every trained tensor's gradient (with and without recomputation) and one clipped AdamW step;
//! the merged model equals the adapted one; a resumed run (on an NF4 base) is byte-identical;
//! a model without biases and bad `bias_terms` are refused by name.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::method::*;
use common::*;
use ferrule::adapted::attach;
use ferrule::model::{Frozen, Model, ModelSource, Task};
use ferrule::ops::ComputeDtypeChoice;
use ferrule::peft_io::load_adapter;
use ferrule::quant::{QuantMethod, QuantSpec};
use ferrule::train::optim::{AdamW, AdamWConfig};
use ferrule::train::TrainConfig;
use ferrule::tuners::{AdapterConfig, BuildContext, Tuner};

/// (fixture case, model, task)
const CASES: &[(&str, &str, Task)] = &[
    ("bert_seqcls_qvi", "bert", Task::SeqCls),
    ("bert_seqcls_all", "bert", Task::SeqCls),
    ("qwen2_all", "qwen2", Task::CausalLm),
];

fn inputs(task: Task) -> HashMap<String, Tensor> {
    load(match task {
        Task::SeqCls => "inputs/bert.safetensors",
        _ => "inputs/decoder.safetensors",
    })
}

/// Largest |value| of `t`.
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

/// A gradient that is zero in exact arithmetic: the key bias adds `q·b_k` to every score of a
/// query, which the softmax cancels, so torch's and ferrule's values are rounding noise.
fn is_noise(grad: &Tensor) -> bool {
    max_abs(grad) < 1e-6
}

fn relative_diff(got: &Tensor, want: &Tensor) -> f32 {
    let scale: f32 = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    max_diff(got, want) / scale.max(1e-6)
}

#[test]
fn biases_train_as_the_reference_trains_them() {
    for &(case, model_name, task) in CASES {
        let exp = load(&format!("bitfit/{case}/expected.safetensors"));
        let src = fixture_source(model_name, task);
        let (model, tuner) =
            saved_tuned(&fixtures().join("bitfit").join(case), "BITFIT", &src, task);
        let inp = inputs(task);
        // The selection: exactly the tensors torch trained.
        let trained: BTreeSet<String> = tuner.trainable().into_iter().map(|(k, _)| k).collect();
        let want: BTreeSet<String> = exp
            .keys()
            .filter_map(|k| k.strip_prefix("grad.").map(str::to_string))
            .collect();
        assert_eq!(trained, want, "{case}: trained tensors");
        let counts: Vec<i64> = exp["counts"].to_vec1().unwrap();
        let n = ferrule::tuners::trainable_params(tuner.as_ref());
        assert_eq!(n as i64, counts[0], "{case}: trainable parameters");
        let total = ferrule::tuners::total_params(model.base_params, tuner.as_ref());
        assert_eq!(total as i64, counts[1], "{case}: total parameters");
        // The forward pass is the base model's.
        let d = max_diff_masked(&logits(&model, &inp), &exp["logits"], None);
        assert!(d < 1e-4, "{case}: logits differ by {d}");
        let want_loss: f32 = exp["loss"].to_vec1::<f32>().unwrap()[0];
        let mut first = None;
        for recompute in [false, true] {
            let (loss, grads) = loss_grads(&model, tuner.as_ref(), &inp, &exp["labels"], recompute);
            assert!(
                (loss - want_loss).abs() < 1e-5,
                "{case}: loss {loss} vs {want_loss}"
            );
            for (k, g) in &grads {
                let want = &exp[&format!("grad.{k}")];
                let d = match is_noise(want) {
                    true => max_diff(g, want),
                    false => relative_diff(g, want),
                };
                assert!(
                    d < 1e-4,
                    "{case} (recompute {recompute}): gradient of {k}: {d}"
                );
            }
            first.get_or_insert(grads);
        }
        let cfg = AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(tuner.trainable(), cfg);
        opt.step_with(&clipped(&first.unwrap())).unwrap();
        for (k, v) in tuner.trainable() {
            let want = &exp[&format!("param.{k}")];
            let diff = (v.as_tensor() - want).unwrap().abs().unwrap();
            // Adam's first step is about ±lr per element whatever the gradient's size, so where
            // the gradient is rounding noise (|g| < 1e-6, near eps) the step's sign is noise too:
            // there both move by at most lr; elsewhere they agree within 1e-4 of the tensor.
            let grad = &exp[&format!("grad.{k}")];
            let noisy = grad
                .abs()
                .unwrap()
                .lt(1e-6)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let settled = diff.mul(&noisy.affine(-1.0, 1.0).unwrap()).unwrap();
            let d = max_abs(&settled) / max_abs(want).max(1e-6);
            assert!(d < 1e-4, "{case}: {k} after the step: relative diff {d}");
            assert!(max_abs(&diff) <= 2e-2, "{case}: {k} moved more than lr");
        }
        let after = logits(&model, &inp);
        let d = max_diff_masked(&after, &exp["logits_after"], None);
        assert!(d < 1e-4, "{case}: logits after the step differ by {d}");
        merged_equals_adapted(case, &src, task, tuner.as_ref(), &after, &inp);
    }
}

/// `ferrule merge`'s folder (the trained biases and head written over the base's) gives the
/// adapted model's logits.
fn merged_equals_adapted(
    case: &str,
    src: &ModelSource,
    task: Task,
    tuner: &dyn Tuner,
    adapted: &Tensor,
    inp: &HashMap<String, Tensor>,
) {
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    ferrule::merge::merge_to_dir(src, tuner, task, &out).unwrap();
    let merged_src = ModelSource::load(out.to_str().unwrap(), &dev).unwrap();
    let merged = Model::build(&merged_src, task, &Frozen, &dev, 0).unwrap();
    let d = max_diff_masked(&logits(&merged, inp), adapted, None);
    assert!(d < 1e-5, "{case}: merged vs adapted logits differ by {d}");
}

fn attach_error(model: &str, bias_terms: serde_json::Value) -> String {
    let dev = Device::Cpu;
    let dir = fixtures().join("models").join(model);
    let src = ModelSource::load(dir.to_str().unwrap(), &dev).unwrap();
    let cfg = AdapterConfig::from_json(
        serde_json::json!({"peft_type": "BITFIT", "bias_terms": bias_terms}),
    )
    .unwrap();
    let ctx = BuildContext::fresh(&dev);
    match attach(&src, Task::CausalLm, &cfg, ctx) {
        Ok(_) => panic!("bitfit attached to {model} with {bias_terms}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_model_without_biases_and_bad_terms_are_refused_by_name() {
    let e = attach_error("llama", serde_json::json!(["all"]));
    assert!(
        e.contains("models/llama (llama model)")
            && e.contains("bitfit: the model has no bias terms"),
        "{e}"
    );
    // Qwen2's only biases are q/k/v: a feed-forward term matches none, and the error lists them.
    let e = attach_error("qwen2", serde_json::json!(["query", "intermediate"]));
    assert!(
        e.contains("bias_terms entry [\"intermediate\"] matched no module")
            && e.contains("model.layers.*.self_attn.q_proj (2)"),
        "{e}"
    );
    let e = attach_error("qwen2", serde_json::json!(["query", "ffn"]));
    assert!(
        e.contains("unknown bias term \"ffn\"")
            && e.contains("query, key, value, attention_output, intermediate, output, attention_layernorm, output_layernorm, all"),
        "{e}"
    );
}

fn run_config(out: &Path) -> TrainConfig {
    TrainConfig {
        model: fixtures().join("models/qwen2").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(
            AdapterConfig::from_json(
                serde_json::json!({"peft_type": "BITFIT", "bias_terms": ["query", "value"]}),
            )
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

#[test]
fn a_run_on_an_nf4_base_resumes_to_the_same_adapter_and_reloads() {
    let whole = assert_resume_is_byte_identical(run_config, 2);
    let dev = Device::Cpu;
    // The adapter holds the q and v biases of both layers, changed by training.
    let saved = load_adapter(whole.path(), &dev).unwrap();
    let keys: BTreeSet<&str> = saved.tensors.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = [
        "base_model.model.model.layers.0.self_attn.q_proj.bias",
        "base_model.model.model.layers.0.self_attn.v_proj.bias",
        "base_model.model.model.layers.1.self_attn.q_proj.bias",
        "base_model.model.model.layers.1.self_attn.v_proj.bias",
    ]
    .into();
    assert_eq!(keys, want);
    let base = load("models/qwen2/model.safetensors");
    let trained = &saved.tensors["base_model.model.model.layers.0.self_attn.q_proj.bias"];
    assert!(max_diff(trained, &base["model.layers.0.self_attn.q_proj.bias"]) > 1e-4);
}
