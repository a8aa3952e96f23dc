//! Real models from the fetched assets (scripts/fetch-assets.sh): a few LoRA steps on
//! MiniLM (classification) and SmolLM2-135M (GGUF, causal LM), and a few steps of every other
//! method on the GGUF; save, reload, identical outputs.
//! Skipped with a message when the assets are missing.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;
use ferrule::adapted::AdaptedModel;
use ferrule::model::{Inputs, Task};
use ferrule::train::{train, RunOptions, Silent, TrainConfig};
use ferrule::tuners::AdapterConfig;
use serde_json::json;

fn head(src: &Path, dst: &Path, n: usize) {
    let text = std::fs::read_to_string(src).unwrap();
    std::fs::write(dst, text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n").unwrap();
}

fn reload_matches(model: &str, out: &Path, ids: &Tensor) {
    let dev = Device::Cpu;
    // The adapter as saved, applied by a fresh process-equivalent load, twice: same outputs.
    let a = AdaptedModel::load(model, Some(out), None, &dev).unwrap();
    let b = AdaptedModel::load(model, Some(out), None, &dev).unwrap();
    let inp = Inputs { input_ids: ids, attention_mask: None, token_type_ids: None };
    let (ya, yb) = (a.model.forward(&inp).unwrap(), b.model.forward(&inp).unwrap());
    assert_eq!(max_diff_masked(&ya, &yb, None), 0.0);
    let base = AdaptedModel::load(model, None, Some(a.model.task), &dev).unwrap();
    if a.model.task == Task::CausalLm {
        assert!(max_diff_masked(&ya, &base.model.forward(&inp).unwrap(), None) > 0.0, "trained adapter changed nothing");
    }
}

#[test]
fn minilm_sequence_classification_few_steps() {
    let (Some(model), Some(data)) = (asset("minilm"), asset("data/rotten_tomatoes/train.jsonl")) else { return };
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("rt.jsonl");
    head(&data, &small, 64);
    let out = t.path().join("run");
    let cfg = TrainConfig {
        model: model.display().to_string(),
        data: small.clone(),
        eval_data: Some(small),
        output_dir: out.clone(),
        task: Task::SeqCls,
        adapter: Some(AdapterConfig::from_json(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]})).unwrap()),
        max_len: Some(64),
        batch_size: 16,
        max_steps: Some(3),
        lr: 1e-3,
        ..Default::default()
    };
    let s = train(&cfg, &Device::Cpu, &mut Silent, &RunOptions::default()).unwrap();
    assert!(s.eval.unwrap().eval_accuracy.is_some());
    // LoRA r=8 on query,value of 6 layers (384x384) + the 2-class head.
    assert_eq!(s.trainable_params, 6 * 2 * (8 * 384 + 384 * 8) + 2 * 384 + 2);
    let ids = Tensor::new(&[[101u32, 2023, 3185, 2001, 2307, 102]], &Device::Cpu).unwrap();
    reload_matches(&cfg.model, &out, &ids);
}

#[test]
fn smollm2_gguf_causal_lm_few_steps() {
    let (Some(model), Some(data)) = (asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), asset("data/chatterbot/train.jsonl")) else { return };
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("chat.jsonl");
    head(&data, &small, 8);
    let out = t.path().join("run");
    let cfg = TrainConfig {
        model: model.display().to_string(),
        data: small,
        output_dir: out.clone(),
        adapter: Some(
            AdapterConfig::from_json(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
                .unwrap(),
        ),
        max_len: Some(64),
        batch_size: 2,
        max_steps: Some(2),
        lr: 1e-3,
        ..Default::default()
    };
    let s = train(&cfg, &Device::Cpu, &mut Silent, &RunOptions::default()).unwrap();
    assert_eq!(s.trainable_params, 921_600);
    assert!(s.final_loss.unwrap().is_finite());
    let ids = Tensor::new(&[[1u32, 504, 3458, 282, 4649, 314]], &Device::Cpu).unwrap();
    reload_matches(&cfg.model, &out, &ids);
}

/// Every method other than plain LoRA trains on the quantized GGUF base (its Q4_1 blocks kept),
/// saves, and reloads to the same outputs: DoRA, IA3 and LN tuning with PEFT's llama defaults,
/// prompt tuning initialised from a text tokenized with the GGUF's own tokenizer, prefix tuning
/// through its MLP, RandLoRA.
#[test]
fn smollm2_gguf_every_method_few_steps() {
    let (Some(model), Some(data)) = (asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), asset("data/chatterbot/train.jsonl")) else { return };
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("chat.jsonl");
    head(&data, &small, 4);
    let gguf = model.display().to_string();
    let methods = [
        json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true}),
        json!({"peft_type": "IA3"}),
        json!({"peft_type": "LN_TUNING"}),
        json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 6, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Answer kindly.", "tokenizer_name_or_path": gguf}),
        json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "prefix_projection": true, "encoder_hidden_size": 16}),
        json!({"peft_type": "RANDLORA", "r": 64, "target_modules": ["v_proj"]}),
    ];
    for (i, adapter) in methods.into_iter().enumerate() {
        let out = t.path().join(format!("run{i}"));
        let cfg = TrainConfig {
            model: gguf.clone(),
            data: small.clone(),
            output_dir: out.clone(),
            adapter: Some(AdapterConfig::from_json(adapter.clone()).unwrap()),
            max_len: Some(48),
            batch_size: 2,
            max_steps: Some(2),
            lr: 1e-3,
            ..Default::default()
        };
        let s = train(&cfg, &Device::Cpu, &mut Silent, &RunOptions::default()).unwrap_or_else(|e| panic!("{adapter}: {e:#}"));
        assert!(s.completed && s.final_loss.unwrap().is_finite(), "{adapter}");
        let ids = Tensor::new(&[[1u32, 504, 3458, 282, 4649, 314]], &Device::Cpu).unwrap();
        reload_matches(&cfg.model, &out, &ids);
    }
}
