//! IST (`--method ist`) against the reference's formulas restated in torch
//! (tests/fixtures/ist/make_ist_fixtures.py: the score update for given rollout sets and
//! losses, the draws' probabilities), and through the trainer: a step's frozen layers keep
//! their bytes and their AdamW moments, the suppression scale acts only inside rollouts (LoRA,
//! DoRA and bottleneck bases), a resumed run is byte-identical, the saved adapter is the base
//! method's plain folder, and bad settings are errors naming them.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::method::fixture_source;
use common::*;
use ferrule::adapted::attach;
use ferrule::model::{Inputs, Model, ModelSource, Task};
use ferrule::ops::ComputeDtypeChoice;
use ferrule::peft_io::load_adapter;
use ferrule::train::rng::Rng;
use ferrule::train::TrainConfig;
use ferrule::tuners::ist::{self, scores, IstConfig, SCORES_KEY};
use ferrule::tuners::{AdapterConfig, BuildContext, LossProbe, Tuner};
use serde_json::{json, Value};

fn fixture() -> Value {
    let text = std::fs::read_to_string(fixtures().join("ist/ist_fixtures.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn score_updates_are_the_references() {
    for case in fixture()["updates"].as_array().unwrap() {
        let mut s = f32s(&case["scores"]);
        let sets: Vec<Vec<usize>> = case["sets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|set| f64s(set).iter().map(|&i| i as usize).collect())
            .collect();
        scores::update(&mut s, &sets, &f64s(&case["losses"]), 10.0);
        let want = f32s(&case["new_scores"]);
        let diff = max_abs_diff(&s, &want);
        assert!(diff <= 1e-8, "{s:?} against torch's {want:?}");
    }
}

#[test]
fn draws_follow_the_law_of_torchs_multinomial() {
    for case in fixture()["draws"].as_array().unwrap() {
        let s = f32s(&case["scores"]);
        let num = case["num"].as_u64().unwrap() as usize;
        let weights = match case["more_important"].as_bool().unwrap() {
            true => scores::training_weights(&s),
            false => scores::suppression_weights(&s),
        };
        assert!(max_abs_diff(&weights, &f32s(&case["weights"])) <= 1e-7);
        // 100,000 draws from a fixed seed against the exact inclusion probabilities (one
        // standard deviation is at most 0.0016 here, so 0.008 is five).
        let mut rng = Rng::seed_from_u64(11);
        let mut counts = vec![0usize; s.len()];
        let n = 100_000;
        for _ in 0..n {
            let d = scores::draw(&weights, num, &mut rng);
            assert_eq!(d.len(), num);
            d.iter().for_each(|&i| counts[i] += 1);
        }
        let freq: Vec<f32> = counts.iter().map(|&c| c as f32 / n as f32).collect();
        let exact = f32s(&case["inclusion"]);
        assert!(
            max_abs_diff(&freq, &exact) < 0.008,
            "{freq:?} against {exact:?}"
        );
    }
}

fn llama() -> ModelSource {
    fixture_source("llama", Task::CausalLm)
}

/// IST on the 2-layer fixture Llama: one layer trained per step, one suppressed per rollout,
/// two rollouts (the two distinct sets), around `base`.
fn ist_options(base: &str) -> Value {
    let mut o = json!({
        "peft_type": "IST", "ist_base": base, "ist_trainable_fraction": 0.5,
        "ist_rollouts": 2, "ist_update_interval": 2,
    });
    if base != "bottleneck" {
        o["r"] = json!(4);
        o["lora_alpha"] = json!(8);
        o["target_modules"] = json!(["q_proj", "v_proj"]);
    }
    o
}

fn attach_with(
    src: &ModelSource,
    adapter: &AdapterConfig,
    weights: Option<HashMap<String, Tensor>>,
) -> Result<ferrule::adapted::TunedModel, anyhow::Error> {
    let ctx = BuildContext {
        seed: 5,
        device: &Device::Cpu,
        weights,
        allow_unmatched: false,
        release_base: None,
    };
    attach(src, Task::CausalLm, adapter, ctx)
}

fn logits(model: &Model) -> Tensor {
    let ids = Tensor::new(&[[1u32, 7, 19, 3, 11, 5]], &Device::Cpu).unwrap();
    model
        .forward(&Inputs {
            input_ids: &ids,
            attention_mask: None,
            token_type_ids: None,
        })
        .unwrap()
}

/// Records what a rollout sees: the logits, whether the layers were in training mode.
struct Recorder<'a> {
    model: &'a Model,
    tuner: &'a dyn Tuner,
    seen: Vec<(Tensor, bool)>,
}

impl LossProbe for Recorder<'_> {
    fn loss(&mut self) -> anyhow::Result<f64> {
        let l = logits(self.model);
        let loss = l.abs()?.mean_all()?.to_scalar::<f32>()? as f64;
        self.seen.push((l, self.tuner.mode().training()));
        Ok(loss)
    }
}

/// The base method's model with the IST adapter's tensors, those of the layers in `scaled`
/// multiplied by 0.25 on the factor the output is linear in (LoRA's and DoRA's B: `s·B A`
/// with `s` inside DoRA's norm too; the bottleneck's U).
fn base_logits(
    src: &ModelSource,
    options: &Value,
    tensors: &[(String, Tensor)],
    scaled: &[usize],
) -> Tensor {
    let base = ist::base_config(options.as_object().unwrap()).unwrap();
    let weights = tensors
        .iter()
        .map(|(k, t)| {
            let layer = scaled.iter().any(|l| k.contains(&format!("layers.{l}.")));
            let linear = k.contains("lora_B") || k.contains("adapter_up");
            let t = if layer && linear {
                (t * 0.25).unwrap()
            } else {
                t.clone()
            };
            (k.clone(), t)
        })
        .collect();
    logits(&attach_with(src, &base, Some(weights)).unwrap().model)
}

#[test]
fn the_suppression_scale_acts_only_inside_rollouts() {
    let src = llama();
    for base in ["lora", "dora", "bottleneck"] {
        let options = ist_options(base);
        let adapter = AdapterConfig::from_json(options.clone()).unwrap();
        let tuned = attach_with(&src, &adapter, None).unwrap();
        // Nonzero B (U) everywhere, so that every adapter changes the output.
        for (i, (_, v)) in tuned.tuner.trainable().into_iter().enumerate() {
            let t = ferrule::init::normal(v.dims(), 0.5, i as u64, &Device::Cpu).unwrap();
            v.set(&(t + 0.01).unwrap()).unwrap();
        }
        let tensors: Vec<(String, Tensor)> = tuned
            .tuner
            .trainable()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().copy().unwrap()))
            .collect();
        let plain = base_logits(&src, &options, &tensors, &[]);
        let mut probe = Recorder {
            model: &tuned.model,
            tuner: tuned.tuner.as_ref(),
            seen: vec![],
        };
        tuned.tuner.mode().set_training(true);
        tuned.tuner.before_step(1, &mut probe).unwrap();
        assert!(probe.seen.is_empty(), "{base}: step 1 has no rollout");
        tuned.tuner.before_step(2, &mut probe).unwrap();
        assert_eq!(probe.seen.len(), 2, "{base}: two rollouts at step 2");
        // The two rollouts suppress {0} and {1}, in the order drawn: match each to its set.
        let scaled: Vec<Tensor> = (0..2)
            .map(|l| base_logits(&src, &options, &tensors, &[l]))
            .collect();
        let mut matched = vec![];
        for (seen, training) in &probe.seen {
            assert!(!training, "{base}: a rollout runs in eval mode");
            let d: Vec<f32> = scaled.iter().map(|s| max_diff(seen, s)).collect();
            let layer = if d[0] < d[1] { 0 } else { 1 };
            assert!(
                d[layer] < 1e-5,
                "{base}: rollout logits {d:?} off both suppressed models"
            );
            assert!(
                max_diff(seen, &plain) > 1e-3,
                "{base}: a rollout must differ from the unscaled adapter"
            );
            matched.push(layer);
        }
        matched.sort();
        assert_eq!(matched, vec![0, 1], "{base}");
        assert!(
            tuned.tuner.mode().training(),
            "{base}: training mode restored"
        );
        tuned.tuner.mode().set_training(false);
        assert!(
            max_diff(&logits(&tuned.model), &plain) < 1e-6,
            "{base}: after the rollouts, the plain adapter"
        );
    }
}

fn run_config(options: Value) -> impl Fn(&Path) -> TrainConfig {
    move |out| TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(AdapterConfig::from_json(options.clone()).unwrap()),
        max_len: Some(64),
        batch_size: Some(2),
        grad_accum: 2,
        max_steps: Some(6),
        lr: 3e-2,
        weight_decay: 0.1,
        seed: 3,
        compute_dtype: ComputeDtypeChoice::F32,
        ..Default::default()
    }
}

fn read(dir: &Path, file: &str) -> HashMap<String, Tensor> {
    ferrule::model::weights::load_safetensors_file(&dir.join(file), &Device::Cpu).unwrap()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn a_steps_frozen_layers_keep_their_tensors_and_moments() {
    let out = tempfile::tempdir().unwrap();
    let options = ist_options("lora");
    let cfg = TrainConfig {
        save_every: Some(1),
        keep_checkpoints: 10,
        ..run_config(options.clone())(out.path())
    };
    let s = ferrule::train::train(
        &cfg,
        &Device::Cpu,
        &mut ferrule::train::Silent,
        &Default::default(),
    )
    .unwrap();
    assert!(s.completed);
    let ist_cfg: IstConfig = AdapterConfig::from_json(options)
        .unwrap()
        .typed("ist")
        .unwrap();
    let ck = |n: usize| out.path().join(format!("checkpoint-{n}"));
    let mut trained_per_layer = [0; 2];
    for step in 1..=6usize {
        // Step `step` (1-based) is optimizer step index step − 1; checkpoint-(step−1) is the
        // state before it (checkpoint-0 does not exist: step 1 starts from scratch).
        let (after_a, after_o) = (
            read(&ck(step), "adapter_model.safetensors"),
            read(&ck(step), "optimizer.safetensors"),
        );
        let before = (step > 1).then(|| {
            (
                read(&ck(step - 1), "adapter_model.safetensors"),
                read(&ck(step - 1), "optimizer.safetensors"),
            )
        });
        // Replay the step's draws: rollouts (when due) on the scores before it, then the layer.
        let index = (step - 1) as u64;
        let scores_before: Vec<f32> = match &before {
            Some((a, _)) => a[SCORES_KEY].to_vec1().unwrap(),
            None => vec![0.0; 2],
        };
        let scores_after: Vec<f32> = after_a[SCORES_KEY].to_vec1().unwrap();
        let mut rng = ist::step_rng(3, index);
        if index > 0 && index.is_multiple_of(2) {
            scores::rollout_sets(&scores_before, 1, 2, &mut rng).unwrap();
            assert_ne!(
                scores_before, scores_after,
                "step {step}: the rollouts moved the scores"
            );
        } else {
            assert_eq!(
                scores_before, scores_after,
                "step {step}: no rollout, no score change"
            );
        }
        let trained = ist::trainable_layers(&ist_cfg, &scores_after, &mut rng);
        assert_eq!(trained.len(), 1);
        trained_per_layer[trained[0]] += 1;
        for (key, t) in after_a.iter().filter(|(k, _)| k.contains("lora_")) {
            let layer = if key.contains("layers.0.") { 0 } else { 1 };
            let step_count = after_o[&format!("{key}.step")].to_scalar::<i64>().unwrap();
            let prev_count = before.as_ref().map_or(0, |(_, o)| {
                o[&format!("{key}.step")].to_scalar::<i64>().unwrap()
            });
            if trained.contains(&layer) {
                assert_eq!(step_count, prev_count + 1, "step {step}: {key} trained");
                continue;
            }
            assert_eq!(
                step_count, prev_count,
                "step {step}: {key} is frozen: its own step count stays"
            );
            let Some((a, o)) = &before else {
                assert!(key.contains("lora_A") || max_diff(t, &t.zeros_like().unwrap()) == 0.0);
                continue;
            };
            assert_eq!(
                bytes(t),
                bytes(&a[key]),
                "step {step}: frozen {key} changed (decay or update)"
            );
            for m in ["exp_avg", "exp_avg_sq"] {
                let k = format!("{key}.{m}");
                assert_eq!(
                    bytes(&after_o[&k]),
                    bytes(&o[&k]),
                    "step {step}: frozen {k} changed"
                );
            }
        }
    }
    assert!(
        trained_per_layer.iter().all(|&n| n > 0),
        "each layer trained at some step: {trained_per_layer:?}"
    );
}

#[test]
fn a_resumed_run_is_byte_identical_and_saves_a_plain_lora() {
    for base in ["lora", "dora"] {
        let config = run_config(ist_options(base));
        let with_checkpoints = |out: &Path| TrainConfig {
            save_every: Some(3),
            ..config(out)
        };
        let whole = assert_resume_is_byte_identical(with_checkpoints, 3);
        let saved = load_adapter(whole.path(), &Device::Cpu).unwrap();
        assert_eq!(saved.peft_type(), "LORA", "{base}");
        assert_eq!(saved.config["use_dora"], json!(base == "dora"));
        assert!(saved.config.get("ist_base").is_none(), "{:?}", saved.config);
        assert!(!saved.tensors.contains_key(SCORES_KEY));
        let ck = read(
            &whole.path().join("checkpoint-6"),
            "adapter_model.safetensors",
        );
        let s: Vec<f32> = ck
            .get(SCORES_KEY)
            .map(|t| t.to_vec1().unwrap())
            .unwrap_or_default();
        assert!(
            s.len() == 2 && s.iter().any(|&x| x != 0.0),
            "{base}: scores {s:?}"
        );
    }
}

fn build_error(options: Value, src: &ModelSource) -> String {
    let adapter = AdapterConfig::from_json(options).unwrap();
    match attach_with(src, &adapter, None) {
        Ok(_) => panic!("built"),
        Err(e) => format!("{e:#}"),
    }
}

/// The fixture Llama cut to its first layer.
fn one_layer_llama(dir: &Path) -> ModelSource {
    let from = fixtures().join("models/llama");
    for entry in std::fs::read_dir(&from).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let tensors: Vec<(String, Tensor)> = read(&from, "model.safetensors")
        .into_iter()
        .filter(|(k, _)| !k.contains("layers.1."))
        .collect();
    ferrule::util::atomic::save_safetensors_atomic(&dir.join("model.safetensors"), &tensors, None)
        .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = json!(1);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    ModelSource::load(dir.to_str().unwrap(), &Device::Cpu).unwrap()
}

#[test]
fn bad_settings_are_named_errors() {
    let src = llama();
    let with = |k: &str, v: Value| {
        let mut o = ist_options("lora");
        o[k] = v;
        o
    };
    for (options, want) in [
        (
            with("ist_base", json!("adalora")),
            "ist_base (--ist-base) is \"adalora\"",
        ),
        (
            with("ist_trainable_fraction", json!(1.5)),
            "ist_trainable_fraction (--ist-trainable-fraction) is 1.5",
        ),
        (
            with("ist_suppressed_fraction", json!(0.0)),
            "ist_suppressed_fraction (--ist-suppressed-fraction) is 0",
        ),
        (
            with("ist_trainable_fraction", json!(0.25)),
            "int(2·0.25) = 0 layers",
        ),
        (with("ist_rollouts", json!(3)), "only 2 such sets"),
        (
            with("use_dora", json!(true)),
            "use_dora is true but ist_base is \"lora\"",
        ),
        (
            with("ist_base", json!("bottleneck")),
            "is not a BOTTLENECK option",
        ),
    ] {
        let e = build_error(options.clone(), &src);
        assert!(e.contains(want), "{options}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let one = one_layer_llama(dir.path());
    let mut o = ist_options("lora");
    o["ist_trainable_fraction"] = json!(1.0);
    let e = build_error(o, &one);
    assert!(
        e.contains("the model has 1 numbered layer; IST chooses which layers train"),
        "{e}"
    );
}
