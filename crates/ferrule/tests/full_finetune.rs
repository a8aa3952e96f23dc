//! Full fine-tuning (`--method full`) against torch: the loss, gradients and AdamW updates of
//! every parameter of the tiny llama, untied and with its head tied to the embedding
//! (fixtures: tests/fixtures/full_finetune/make_full_finetune_fixtures.py), with and without
//! recomputation; the model folder a run writes reloads with the trained model's logits; a
//! `--trainable` subset leaves the rest bit for bit; resume is byte-identical; GaLore's
//! layer-wise step equals its whole-model step; a trained tensor is held once (its base is
//! dropped from the loaded weights), with the same loss and gradients.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use ferrule::adapted::attach;
use ferrule::model::{Arch, Frozen, Inputs, Model, ModelSource, Task};
use ferrule::ops::recompute::GradSink;
use ferrule::ops::ComputeDtypeChoice;
use ferrule::train::optim::{AdamW, AdamWConfig};
use ferrule::train::{train, RunOptions, Silent, TrainConfig};
use ferrule::tuners::{AdapterConfig, BuildContext, Tuner};

fn full(trainable: Option<&str>) -> AdapterConfig {
    let mut cfg = serde_json::json!({"peft_type": "FULL"});
    if let Some(p) = trainable {
        cfg["trainable"] = p.into();
    }
    AdapterConfig::from_json(cfg).unwrap()
}

/// The tiny llama with its head tied to the embedding, as the fixture script makes it: the
/// config says so and the file has no `lm_head.weight`.
fn tied_llama(dir: &Path) -> PathBuf {
    let from = fixtures().join("models/llama");
    let to = dir.join("tied");
    std::fs::create_dir_all(&to).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap()).unwrap();
    config["tie_word_embeddings"] = true.into();
    std::fs::write(to.join("config.json"), config.to_string()).unwrap();
    let mut w =
        candle_core::safetensors::load(from.join("model.safetensors"), &Device::Cpu).unwrap();
    w.remove("lm_head.weight");
    candle_core::safetensors::save(&w, to.join("model.safetensors")).unwrap();
    to
}

fn build(model_dir: &Path, adapter: &AdapterConfig) -> (ModelSource, Model, Box<dyn Tuner>) {
    let dev = Device::Cpu;
    let source = ModelSource::load(model_dir.to_str().unwrap(), &dev).unwrap();
    let ctx = BuildContext::fresh(&dev);
    let tuned = attach(&source, Task::CausalLm, adapter, ctx).unwrap();
    (source, tuned.model, tuned.tuner)
}

/// The loss on the fixture inputs and every trainable tensor's gradient.
fn loss_and_grads(
    model: &Model,
    tuner: &dyn Tuner,
    exp: &HashMap<String, Tensor>,
    recompute: bool,
) -> (f32, HashMap<String, Tensor>) {
    let inp = load("inputs/decoder.safetensors");
    let sink = recompute.then(|| {
        Arc::new(GradSink::new(
            tuner.trainable().iter().map(|(_, v)| v.as_tensor().id()),
        ))
    });
    assert_eq!(model.set_recompute(sink.clone()), recompute);
    let Arch::Decoder(lm) = &model.arch else {
        panic!("a decoder")
    };
    let (loss, _) = lm
        .causal_lm_loss(
            &exp["input_ids"],
            Some(&inp["attention_mask"]),
            None,
            &exp["labels"],
        )
        .unwrap();
    let mut grads = loss.backward().unwrap();
    if let Some(s) = &sink {
        s.drain_into(&mut grads).unwrap();
    }
    let by_name = tuner
        .trainable()
        .into_iter()
        .map(|(k, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{k}: no gradient"));
            (k, g.clone())
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), by_name)
}

fn first_rows(name: &str, t: &Tensor, want: &Tensor) -> Tensor {
    match name.ends_with("embed_tokens.weight") || name == "lm_head.weight" {
        true => t.narrow(0, 0, want.dim(0).unwrap()).unwrap(),
        false => t.clone(),
    }
}

fn relative_diff(got: &Tensor, want: &Tensor) -> f32 {
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    max_diff(got, want) / scale.to_scalar::<f32>().unwrap().max(1e-6)
}

/// Three AdamW steps on every parameter, as the fixture script runs them in torch.
fn three_steps_match_torch(case: &str, model_dir: &Path, recompute: bool) {
    let exp = load(&format!("full_finetune/{case}.safetensors"));
    let (_, model, tuner) = build(model_dir, &full(None));
    let mut opt = AdamW::new(
        tuner.trainable(),
        AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.01,
            ..Default::default()
        },
    );
    let want_losses: Vec<f32> = exp["losses"].to_vec1().unwrap();
    for (step, want_loss) in want_losses.iter().enumerate().take(3) {
        let (loss, grads) = loss_and_grads(&model, tuner.as_ref(), &exp, recompute);
        assert!(
            (loss - want_loss).abs() < 1e-4,
            "{case} step {step}: loss {loss} vs torch {want_loss}"
        );
        if step == 0 {
            for (key, want) in exp.iter().filter(|(k, _)| k.starts_with("grad.")) {
                let name = &key["grad.".len()..];
                let got = first_rows(name, &grads[name], want);
                let d = relative_diff(&got, want);
                assert!(d < 1e-4, "{case}: gradient of {name}: relative diff {d}");
            }
        }
        opt.step_with(&grads).unwrap();
    }
    let (loss, _) = loss_and_grads(&model, tuner.as_ref(), &exp, false);
    assert!(
        (loss - want_losses[3]).abs() < 1e-4,
        "{case}: loss after three updates {loss} vs torch {}",
        want_losses[3]
    );
    let params: HashMap<String, Tensor> = tuner
        .trainable()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    for (key, want) in exp.iter().filter(|(k, _)| k.starts_with("param.")) {
        let name = &key["param.".len()..];
        let d = relative_diff(&first_rows(name, &params[name], want), want);
        assert!(
            d < 1e-4,
            "{case}: {name} after three steps: relative diff {d}"
        );
    }
}

#[test]
fn every_parameter_trains_as_torch_adamw_trains_it() {
    let tmp = tempfile::tempdir().unwrap();
    let tied = tied_llama(tmp.path());
    for recompute in [false, true] {
        three_steps_match_torch("llama_untied", &fixtures().join("models/llama"), recompute);
        three_steps_match_torch("llama_tied", &tied, recompute);
    }
}

#[test]
fn a_tied_head_is_the_embedding_and_the_count_is_the_models() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, model, tuner) = build(&tied_llama(tmp.path()), &full(None));
    let names: Vec<String> = tuner.trainable().into_iter().map(|(k, _)| k).collect();
    assert!(names.contains(&"model.embed_tokens.weight".to_string()));
    assert!(!names.iter().any(|n| n.starts_with("lm_head")), "{names:?}");
    let trainable = ferrule::tuners::trainable_params(tuner.as_ref());
    assert_eq!(trainable, model.base_params);
    assert_eq!(
        ferrule::tuners::total_params(model.base_params, tuner.as_ref()),
        model.base_params
    );
}

fn train_config(model: &Path, out: &Path, trainable: Option<&str>) -> TrainConfig {
    TrainConfig {
        model: model.display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(full(trainable)),
        max_len: Some(64),
        batch_size: Some(4),
        max_steps: Some(4),
        lr: 1e-3,
        seed: 5,
        compute_dtype: ComputeDtypeChoice::F32,
        save_every: Some(2),
        ..Default::default()
    }
}

fn logits(model_dir: &Path) -> Tensor {
    let dev = Device::Cpu;
    let source = ModelSource::load(model_dir.to_str().unwrap(), &dev).unwrap();
    let model = Model::build(&source, Task::CausalLm, &Frozen, &dev, 0).unwrap();
    let inp = load("inputs/decoder.safetensors");
    model
        .forward(&Inputs {
            input_ids: &inp["input_ids"],
            attention_mask: Some(&inp["attention_mask"]),
            token_type_ids: None,
        })
        .unwrap()
}

#[test]
fn the_saved_folder_is_the_trained_model_and_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let base = fixtures().join("models/llama");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let summary = train(
        &train_config(&base, &a, None),
        &dev,
        &mut Silent,
        &RunOptions::default(),
    )
    .unwrap();
    assert!(summary.completed && summary.whole_model);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(a.join(f).is_file(), "{f}");
    }
    assert!(!a.join("adapter_config.json").exists());
    // The folder's weights are the checkpoint's trained tensors; its logits move off the base.
    let ckpt =
        candle_core::safetensors::load(a.join("checkpoint-4/adapter_model.safetensors"), &dev)
            .unwrap();
    let saved = candle_core::safetensors::load(a.join("model.safetensors"), &dev).unwrap();
    assert_eq!(ckpt.len(), saved.len());
    for (name, t) in &ckpt {
        assert_eq!(max_diff(t, &saved[name]), 0.0, "{name}");
    }
    assert!(max_diff(&logits(&a), &logits(&base)) > 1e-3);
    // Stopped after step 2 and resumed: the same bytes.
    let cfg = train_config(&base, &b, None);
    let stop = RunOptions {
        stop_after: Some(2),
        ..Default::default()
    };
    assert!(!train(&cfg, &dev, &mut Silent, &stop).unwrap().completed);
    let resume = RunOptions {
        resume: true,
        ..Default::default()
    };
    assert!(train(&cfg, &dev, &mut Silent, &resume).unwrap().completed);
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
}

#[test]
fn a_trainable_pattern_leaves_every_other_tensor_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let base = fixtures().join("models/llama");
    let out = tmp.path().join("out");
    let cfg = train_config(&base, &out, Some(r"layers\.1\.(mlp|post_attention)"));
    train(&cfg, &dev, &mut Silent, &RunOptions::default()).unwrap();
    let before = candle_core::safetensors::load(base.join("model.safetensors"), &dev).unwrap();
    let after = candle_core::safetensors::load(out.join("model.safetensors"), &dev).unwrap();
    assert_eq!(before.len(), after.len());
    let mut changed = vec![];
    for (name, t) in &before {
        if max_diff(t, &after[name]) > 0.0 {
            changed.push(name.as_str());
        }
    }
    changed.sort();
    assert_eq!(
        changed,
        [
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.layers.1.post_attention_layernorm.weight",
        ]
    );
}

#[test]
fn what_full_fine_tuning_cannot_do_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let base = fixtures().join("models/llama");
    let err = |cfg: TrainConfig| {
        format!(
            "{:#}",
            train(&cfg, &dev, &mut Silent, &RunOptions::default()).unwrap_err()
        )
    };
    let none = err(train_config(&base, &tmp.path().join("a"), Some("nope")));
    assert!(
        none.contains("--trainable \"nope\" matched no parameter"),
        "{none}"
    );
    let bad = err(train_config(&base, &tmp.path().join("b"), Some("(")));
    assert!(bad.contains("trainable = \"(\""), "{bad}");
    let mut nf4 = train_config(&base, &tmp.path().join("c"), None);
    nf4.quantize =
        Some(ferrule::quant::QuantSpec::new(ferrule::quant::QuantMethod::Nf4, 64, false).unwrap());
    let q = err(nf4);
    assert!(q.contains("--quantize with full fine-tuning"), "{q}");
    assert!(!tmp.path().join("c/model.safetensors").exists());
    let own = err(train_config(&base, &base, None));
    assert!(own.contains("is the model's own folder"), "{own}");
}

/// `galore_adamw_layerwise` steps each layer inside the recomputed backward and the embedding,
/// final norm and head after it; without clipping that is `galore_adamw`'s step, up to the
/// rounding of the gradient's division by the token count.
/// Once its trainable copy exists, a base tensor is dropped from the loaded weights
/// (`BuildContext::release_base`, which training sets): memory holds one copy. The model
/// built so computes the loss and gradients bit for bit as one built beside the whole base,
/// and counts the same parameters; a training run's summary counts only the tensors left
/// frozen as base weights.
#[test]
fn a_trained_tensor_is_held_once_and_computes_the_same() {
    use ferrule::quant::WeightMemory;
    use std::collections::BTreeSet;
    let dev = Device::Cpu;
    let base = fixtures().join("models/llama");
    let pattern = r"layers\.1\.|embed_tokens|lm_head";
    let adapter = full(Some(pattern));
    let source = ModelSource::load(base.to_str().unwrap(), &dev).unwrap();
    let whole_bytes = WeightMemory::of(&source.weights).dense_bytes;
    let ctx = BuildContext {
        seed: 0,
        device: &dev,
        weights: None,
        allow_unmatched: false,
        release_base: Some(source.weights.release_handle()),
    };
    let released = attach(&source, Task::CausalLm, &adapter, ctx).unwrap();
    let trained: BTreeSet<String> = released
        .tuner
        .trainable()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(trained.contains("lm_head.weight") && trained.len() > 10);
    assert_eq!(
        source
            .weights
            .released()
            .into_iter()
            .collect::<BTreeSet<_>>(),
        trained
    );
    for name in &trained {
        assert!(!source.weights.contains(name), "{name} is still held");
    }
    let trained_bytes = 4 * ferrule::tuners::trainable_params(released.tuner.as_ref());
    assert_eq!(
        WeightMemory::of(&source.weights).dense_bytes,
        whole_bytes - trained_bytes
    );
    let (_, model, tuner) = build(&base, &adapter);
    assert_eq!(released.model.base_params, model.base_params);
    let exp = load("full_finetune/llama_untied.safetensors");
    for recompute in [false, true] {
        let (loss_a, grads_a) =
            loss_and_grads(&released.model, released.tuner.as_ref(), &exp, recompute);
        let (loss_b, grads_b) = loss_and_grads(&model, tuner.as_ref(), &exp, recompute);
        assert_eq!(loss_a.to_bits(), loss_b.to_bits());
        for (name, g) in &grads_b {
            assert_eq!(max_diff(&grads_a[name], g), 0.0, "{name}");
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        max_steps: Some(1),
        ..train_config(&base, &tmp.path().join("out"), Some(pattern))
    };
    let summary = train(&cfg, &dev, &mut Silent, &RunOptions::default()).unwrap();
    assert_eq!(summary.base_weight_bytes, whole_bytes - trained_bytes);
}

#[test]
fn galore_layerwise_equals_the_whole_model_step() {
    use ferrule::train::OptimName;
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let base = fixtures().join("models/llama");
    let run = |optim: OptimName, out: &str| -> HashMap<String, Tensor> {
        let out = tmp.path().join(out);
        let cfg = TrainConfig {
            optim,
            // Rank 2 on every attention and MLP matrix, the basis refreshed at steps 2 and 4.
            optim_args: Some("rank=2,update_proj_gap=2".into()),
            recompute: true,
            max_grad_norm: Some(0.0),
            ..train_config(&base, &out, None)
        };
        train(&cfg, &dev, &mut Silent, &RunOptions::default()).unwrap();
        candle_core::safetensors::load(out.join("model.safetensors"), &dev).unwrap()
    };
    let whole = run(OptimName::GaloreAdamw, "whole");
    let layerwise = run(OptimName::GaloreAdamwLayerwise, "layerwise");
    let before = candle_core::safetensors::load(base.join("model.safetensors"), &dev).unwrap();
    assert_eq!(whole.len(), layerwise.len());
    for (name, t) in &whole {
        // Every tensor trained, in the layers and outside them.
        assert!(max_diff(t, &before[name]) > 0.0, "{name} did not move");
        let d = relative_diff(&layerwise[name], t);
        assert!(d < 1e-5, "{name}: layer-wise differs by {d}");
    }
}

#[test]
fn galore_layerwise_says_what_it_needs() {
    use ferrule::train::OptimName;
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let base = fixtures().join("models/llama");
    let err = |cfg: TrainConfig| {
        format!(
            "{:#}",
            train(&cfg, &dev, &mut Silent, &RunOptions::default()).unwrap_err()
        )
    };
    let layerwise = TrainConfig {
        optim: OptimName::GaloreAdamwLayerwise,
        recompute: true,
        ..train_config(&base, &tmp.path().join("a"), None)
    };
    let e = err(TrainConfig {
        recompute: false,
        ..layerwise.clone()
    });
    assert!(e.contains("add --recompute"), "{e}");
    let e = err(TrainConfig {
        grad_accum: 2,
        ..layerwise.clone()
    });
    assert!(e.contains("set grad_accum (--grad-accum) to 1"), "{e}");
    // GaLore's keys with another optimizer would be dropped without a word.
    let e = err(TrainConfig {
        optim_args: Some("rank=2".into()),
        ..train_config(&base, &tmp.path().join("b"), None)
    });
    assert!(
        e.contains("optim_args (--optim-args) is read by the GaLore optimizers only"),
        "{e}"
    );
    for dir in ["a", "b"] {
        assert!(!tmp.path().join(dir).exists(), "{dir} was created");
    }
}
