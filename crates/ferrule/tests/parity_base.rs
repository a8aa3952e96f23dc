//! Base-model outputs against transformers (fixtures from tests/fixtures/make_fixtures.py).

mod common;

use candle_core::Device;
use common::*;
use ferrule::model::{bert, Arch, Frozen, Inputs, Model, ModelSource, Task};

fn decoder_logits_match(name: &str) {
    let dev = Device::Cpu;
    let src =
        ModelSource::load(fixtures().join("models").join(name).to_str().unwrap(), &dev).unwrap();
    let model = Model::build(&src, Task::CausalLm, &Frozen, &dev, 0).unwrap();
    let inputs = load("inputs/decoder.safetensors");
    let (ids, mask) = (&inputs["input_ids"], &inputs["attention_mask"]);
    let logits = model
        .forward(&Inputs {
            input_ids: ids,
            attention_mask: Some(mask),
            token_type_ids: None,
        })
        .unwrap();
    let expected = &load(&format!("expected/{name}_logits.safetensors"))["logits"];
    // Padded query positions attend to nothing real; transformers' values there are arbitrary.
    let diff = max_diff_masked(&logits, expected, Some(mask));
    assert!(diff < 1e-4, "{name}: max |Δlogits| = {diff}");
}

#[test]
fn llama_logits() {
    decoder_logits_match("llama");
}

#[test]
fn llama3_rope_scaling_logits() {
    decoder_logits_match("llama3rope");
}

#[test]
fn mistral_sliding_window_logits() {
    decoder_logits_match("mistral");
}

#[test]
fn qwen2_qkv_bias_logits() {
    decoder_logits_match("qwen2");
}

#[test]
fn smollm_tied_embeddings_logits() {
    decoder_logits_match("smollm");
}

#[test]
fn bert_hidden_states_pooler_and_mean_pooling() {
    let dev = Device::Cpu;
    let src = ModelSource::load(fixtures().join("models/bert").to_str().unwrap(), &dev).unwrap();
    let model = Model::build(&src, Task::FeatureExtraction, &Frozen, &dev, 0).unwrap();
    let inputs = load("inputs/bert.safetensors");
    let Arch::Bert(b) = &model.arch else {
        panic!("not bert")
    };
    let mask = &inputs["attention_mask"];
    let out = b
        .forward(
            &inputs["input_ids"],
            Some(mask),
            Some(&inputs["token_type_ids"]),
        )
        .unwrap();
    let exp = load("expected/bert_logits.safetensors");
    assert!(
        max_diff_masked(
            &out.last_hidden_state,
            &exp["last_hidden_state"],
            Some(mask)
        ) < 1e-4
    );
    assert!(
        max_diff_masked(
            out.pooler_output.as_ref().unwrap(),
            &exp["pooler_output"],
            None
        ) < 1e-4
    );
    let pooled = bert::mean_pool(&out.last_hidden_state, Some(mask)).unwrap();
    assert!(max_diff_masked(&pooled, &exp["mean_pooled"], None) < 1e-4);
}

#[test]
fn minilm_real_model_mean_pooling() {
    let Some(dir) = asset("minilm") else { return };
    let dev = Device::Cpu;
    let src = ModelSource::load(dir.to_str().unwrap(), &dev).unwrap();
    let model = Model::build(&src, Task::FeatureExtraction, &Frozen, &dev, 0).unwrap();
    let exp = load("expected/minilm.safetensors");
    let pooled = model
        .forward(&Inputs {
            input_ids: &exp["input_ids"],
            attention_mask: Some(&exp["attention_mask"]),
            token_type_ids: Some(&exp["token_type_ids"]),
        })
        .unwrap();
    let diff = max_diff_masked(&pooled, &exp["mean_pooled"], None);
    assert!(diff < 1e-4, "MiniLM mean pooled max diff {diff}");
}

#[test]
fn smollm2_gguf_logits_match_transformers_gguf_load() {
    let Some(path) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let dev = Device::Cpu;
    let src = ModelSource::load(path.to_str().unwrap(), &dev).unwrap();
    let model = Model::build(&src, Task::CausalLm, &Frozen, &dev, 0).unwrap();
    let exp = load("expected/smollm2_gguf.safetensors");
    let logits = model
        .forward(&Inputs {
            input_ids: &exp["input_ids"],
            attention_mask: None,
            token_type_ids: None,
        })
        .unwrap();
    let t = logits.dim(1).unwrap();
    let last = logits.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
    let diff = max_diff_masked(&last, &exp["last_logits"], None);
    // The README's figure for every family: 1e-4 (measured 6.3e-5 on logits up to 19.8, with
    // OpenBLAS and with FERRULE_BLAS=off, 1 and 2 threads).
    assert!(
        diff < 1e-4,
        "SmolLM2 GGUF last-position logits differ by {diff}"
    );
    let argmax = logits
        .argmax(candle_core::D::Minus1)
        .unwrap()
        .to_dtype(candle_core::DType::I64)
        .unwrap();
    assert_eq!(
        argmax.to_vec2::<i64>().unwrap(),
        exp["argmax"].to_vec2::<i64>().unwrap()
    );
}
