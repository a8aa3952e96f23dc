//! Real models from the fetched assets (scripts/fetch-assets.sh): a few LoRA steps on
//! MiniLM (classification) and SmolLM2-135M (GGUF, causal LM), and a few steps of every other
//! method on the GGUF; save, reload: the reloaded adapter evaluates as the trained one did.
//! Skipped with a message when the assets are missing.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;
use ferrule::adapted::AdaptedModel;
use ferrule::data::{read_jsonl, LabelMap};
use ferrule::model::{Inputs, LoadOptions, Task};
use ferrule::train::{
    encode_file, encode_options, evaluate, train, RunOptions, Silent, TrainConfig, TrainSummary,
};
use ferrule::tuners::AdapterConfig;
use serde_json::json;

fn head(src: &Path, dst: &Path, n: usize) {
    let text = std::fs::read_to_string(src).unwrap();
    std::fs::write(
        dst,
        text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
}

/// The adapter as saved, reloaded by a fresh load, gives what the trained model in memory gave:
/// the eval loss (and accuracy) of the run's final evaluation, which ran on the trained
/// parameters before they were written, equals that of the reloaded adapter on the same
/// records. And a trained causal-LM adapter changes the base's logits.
fn reload_matches(cfg: &TrainConfig, s: &TrainSummary, ids: &Tensor) {
    let dev = Device::Cpu;
    let trained = s.eval.as_ref().expect("the run evaluates at its last step");
    // In the dtype the run computed in (auto: bf16 on CPUs that compute it faster).
    let options = LoadOptions {
        quantize: cfg.quantize.as_ref(),
        compute_dtype: s.compute_dtype.dtype,
        ..Default::default()
    };
    let a =
        AdaptedModel::load_with(&cfg.model, Some(&cfg.output_dir), None, &dev, options).unwrap();
    let eval_data = cfg.eval_data.as_ref().unwrap();
    let labels = (a.model.task == Task::SeqCls)
        .then(|| LabelMap::from_examples(&read_jsonl(&cfg.data).unwrap()).unwrap());
    let set = encode_file(
        eval_data,
        &a.source,
        encode_options(cfg, cfg.max_len.unwrap()),
        labels.as_ref(),
        cfg.eval_limit,
    )
    .unwrap();
    assert_eq!(set.items.len(), trained.eval_records);
    let r = evaluate(
        &a.model,
        a.source.pad_token_id().unwrap(),
        ferrule::data::Padding::Free,
        &set.items,
        cfg.eval_batch_size.unwrap_or(cfg.batch_size()),
        0,
    )
    .unwrap();
    let tol = 1e-6 * trained.eval_loss.abs().max(1.0);
    assert!(
        (r.eval_loss - trained.eval_loss).abs() <= tol,
        "reloaded adapter: eval loss {} vs {} in training",
        r.eval_loss,
        trained.eval_loss
    );
    assert_eq!(r.eval_accuracy, trained.eval_accuracy);
    if a.model.task == Task::CausalLm {
        let inp = Inputs {
            input_ids: ids,
            attention_mask: None,
            token_type_ids: None,
        };
        let base = AdaptedModel::load(&cfg.model, None, Some(a.model.task), &dev).unwrap();
        assert!(
            max_diff_masked(
                &a.model.forward(&inp).unwrap(),
                &base.model.forward(&inp).unwrap(),
                None
            ) > 0.0,
            "trained adapter changed nothing"
        );
    }
}

#[test]
fn minilm_sequence_classification_few_steps() {
    let (Some(model), Some(data)) = (asset("minilm"), asset("data/rotten_tomatoes/train.jsonl"))
    else {
        return;
    };
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
        batch_size: Some(16),
        max_steps: Some(3),
        lr: 1e-3,
        ..Default::default()
    };
    let s = train(&cfg, &Device::Cpu, &mut Silent, &RunOptions::default()).unwrap();
    assert!(s.eval.as_ref().unwrap().eval_accuracy.is_some());
    // LoRA r=8 on query,value of 6 layers (384x384) + the 2-class head.
    assert_eq!(
        s.trainable_params,
        6 * 2 * (8 * 384 + 384 * 8) + 2 * 384 + 2
    );
    let ids = Tensor::new(&[[101u32, 2023, 3185, 2001, 2307, 102]], &Device::Cpu).unwrap();
    reload_matches(&cfg, &s, &ids);
}

#[test]
fn smollm2_gguf_causal_lm_few_steps() {
    let (Some(model), Some(data)) = (
        asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        asset("data/chatterbot/train.jsonl"),
    ) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("chat.jsonl");
    head(&data, &small, 8);
    let out = t.path().join("run");
    let cfg = TrainConfig {
        model: model.display().to_string(),
        data: small.clone(),
        eval_data: Some(small),
        output_dir: out.clone(),
        adapter: Some(
            AdapterConfig::from_json(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
                .unwrap(),
        ),
        max_len: Some(64),
        batch_size: Some(2),
        max_steps: Some(2),
        lr: 1e-3,
        ..Default::default()
    };
    let s = train(&cfg, &Device::Cpu, &mut Silent, &RunOptions::default()).unwrap();
    assert_eq!(s.trainable_params, 921_600);
    assert!(s.final_loss.unwrap().is_finite());
    let ids = Tensor::new(&[[1u32, 504, 3458, 282, 4649, 314]], &Device::Cpu).unwrap();
    reload_matches(&cfg, &s, &ids);
}

/// Every method other than plain LoRA trains on the quantized GGUF base (its Q4_1 blocks kept),
/// saves, and reloads to the same outputs: DoRA, IA3 and LN tuning with PEFT's llama defaults,
/// prompt tuning initialised from a text tokenized with the GGUF's own tokenizer, prefix tuning
/// through its MLP, RandLoRA.
#[test]
fn smollm2_gguf_every_method_few_steps() {
    let (Some(model), Some(data)) = (
        asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        asset("data/chatterbot/train.jsonl"),
    ) else {
        return;
    };
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
            eval_data: Some(small.clone()),
            output_dir: out.clone(),
            adapter: Some(AdapterConfig::from_json(adapter.clone()).unwrap()),
            max_len: Some(48),
            batch_size: Some(2),
            max_steps: Some(2),
            lr: 1e-3,
            ..Default::default()
        };
        let s = train(&cfg, &Device::Cpu, &mut Silent, &RunOptions::default())
            .unwrap_or_else(|e| panic!("{adapter}: {e:#}"));
        assert!(
            s.completed && s.final_loss.unwrap().is_finite(),
            "{adapter}"
        );
        let ids = Tensor::new(&[[1u32, 504, 3458, 282, 4649, 314]], &Device::Cpu).unwrap();
        reload_matches(&cfg, &s, &ids);
    }
}
