//! L4Q (`--method l4q`). No reference code exists (the paper, arXiv 2402.04902, publishes
//! none), so the quantizer's forward pass and its straight-through / LSQ gradients are checked
//! by hand in `quant/lsq.rs` and `ops/lsq_linear.rs` (and the fused op against candle's
//! autograd of the composite form). Here, on the tiny Llama fixture: every trained tensor gets
//! a gradient and only those train; a step lowers the loss; a saved adapter reloads to
//! bit-identical logits; a run resumes to the same bytes; the GGUF written from the learned
//! codes is read back by ferrule with the in-training logits and the codes as learned (and by
//! transformers, through the reference venv, with ferrule's logits); bad inputs are named.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::*;
use ferrule::adapted::{attach, AdaptedModel};
use ferrule::export::gguf::{export_model_gguf, GgufExportOptions, OutType};
use ferrule::model::{Inputs, LoadOptions, Model, ModelSource, Task, Weights};
use ferrule::ops::ComputeDtypeChoice;
use ferrule::quant::ggml_quantize::GgmlWriteType;
use ferrule::train::TrainConfig;
use ferrule::tuners::{AdapterConfig, BuildContext, LossProbe, Tuner};
use half::f16;

const ALL_LINEARS: [&str; 8] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
];

fn l4q(options: serde_json::Value) -> AdapterConfig {
    let mut cfg = serde_json::json!({"peft_type": "L4Q"});
    cfg.as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    AdapterConfig::from_json(cfg).unwrap()
}

fn llama_dir() -> PathBuf {
    fixtures().join("models/llama")
}

fn source() -> ModelSource {
    ModelSource::load(llama_dir().to_str().unwrap(), &Device::Cpu).unwrap()
}

fn try_attach(src: &ModelSource, cfg: &AdapterConfig) -> anyhow::Result<(Model, Box<dyn Tuner>)> {
    let ctx = BuildContext {
        seed: 0,
        device: &Device::Cpu,
        weights: None,
        allow_unmatched: false,
        release_base: None,
    };
    let tuned = attach(src, Task::CausalLm, cfg, ctx)?;
    Ok((tuned.model, tuned.tuner))
}

fn inputs() -> std::collections::HashMap<String, Tensor> {
    load("inputs/decoder.safetensors")
}

fn logits(model: &Model) -> Tensor {
    let inp = inputs();
    model
        .forward(&Inputs {
            input_ids: &inp["input_ids"],
            attention_mask: Some(&inp["attention_mask"]),
            token_type_ids: None,
        })
        .unwrap()
}

fn loss(model: &Model) -> Tensor {
    let inp = inputs();
    let ferrule::model::Arch::Decoder(lm) = &model.arch else {
        panic!("a decoder")
    };
    let mask = Some(&inp["attention_mask"]);
    lm.causal_lm_loss(&inp["input_ids"], mask, None, &inp["input_ids"])
        .unwrap()
        .0
}

/// Moves B off zero and the steps and offsets off their init; with `f16_exact`, makes the
/// steps and the offsets of byte 0 (`b + Qn·s`, `Qn = −8` for the default signed 4-bit codes,
/// what a Q4_1 block's `m` holds) f16 values, so that a Q4_1 file holds them without rounding.
fn perturb(tuner: &dyn Tuner, f16_exact: bool) {
    let f16_round = |t: Tensor| -> Tensor {
        match f16_exact {
            true => t
                .to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
            false => t,
        }
    };
    let trainable = tuner.trainable();
    let eight_steps = |k: &str| {
        let key = k.replace("l4q_offset", "l4q_step");
        let (_, s) = trainable.iter().find(|(n, _)| *n == key).unwrap();
        (s.as_tensor() * 8.0).unwrap()
    };
    // Byte 0's value (the group's minimum at init) raised by 0.003: the lowest weights clamp.
    let byte0: Vec<Tensor> = trainable
        .iter()
        .filter(|(k, _)| k.ends_with("l4q_offset"))
        .map(|(k, v)| ((v.as_tensor() - eight_steps(k)).unwrap() + 0.003).unwrap())
        .collect();
    for (k, v) in &trainable {
        let t = v.as_tensor();
        if k.ends_with("lora_B.weight") {
            v.set(&Tensor::randn(0f32, 0.05, t.dims(), t.device()).unwrap())
                .unwrap();
        } else if k.ends_with("l4q_step") {
            v.set(&f16_round((t * 1.1).unwrap())).unwrap();
        }
    }
    let offsets = trainable.iter().filter(|(k, _)| k.ends_with("l4q_offset"));
    for ((k, v), m) in offsets.zip(byte0) {
        v.set(&(f16_round(m) + eight_steps(k)).unwrap()).unwrap();
    }
}

/// Each targeted linear trains A, B, a step and an offset per group, and each gets a
/// gradient; nothing else is trainable (the base weights are no variables, so they get none).
#[test]
fn a_b_steps_and_offsets_get_gradients_and_nothing_else_trains() {
    let src = source();
    let cfg = l4q(serde_json::json!({"r": 4, "target_modules": ["q_proj", "down_proj"]}));
    let (model, tuner) = try_attach(&src, &cfg).unwrap();
    perturb(tuner.as_ref(), false);
    // q_proj [64, 64]: 4·128 + 2·64·2; down_proj [64, 128]: 4·192 + 2·64·4; two layers.
    let want = 2 * (4 * 128 + 2 * 64 * 2 + 4 * 192 + 2 * 64 * 4);
    assert_eq!(ferrule::tuners::trainable_params(tuner.as_ref()), want);
    let trainable = tuner.trainable();
    assert_eq!(trainable.len(), 2 * 2 * 4);
    let suffixes = ["lora_A.weight", "lora_B.weight", "l4q_step", "l4q_offset"];
    assert!(trainable
        .iter()
        .all(|(k, _)| suffixes.iter().any(|s| k.ends_with(s))));
    let grads = loss(&model).backward().unwrap();
    for (k, v) in &trainable {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{k}: no gradient"));
        let norm: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{k}: gradient {norm}");
    }
    let w0 = src
        .weights
        .get("model.layers.0.self_attn.q_proj.weight", &[64, 64])
        .unwrap();
    assert!(!w0.is_variable() && grads.get(&w0).is_none());
}

/// One plain gradient step on every trained tensor lowers the loss.
#[test]
fn a_training_step_lowers_the_loss() {
    let src = source();
    let cfg = l4q(serde_json::json!({"target_modules": ALL_LINEARS}));
    let (model, tuner) = try_attach(&src, &cfg).unwrap();
    let before = loss(&model);
    let grads = before.backward().unwrap();
    for (_, v) in tuner.trainable() {
        let g = grads.get(v.as_tensor()).unwrap();
        v.set(&(v.as_tensor() - (g * 1e-3).unwrap()).unwrap())
            .unwrap();
    }
    let (l0, l1): (f32, f32) = (
        before.to_scalar().unwrap(),
        loss(&model).to_scalar().unwrap(),
    );
    assert!(l1 < l0, "loss {l0} -> {l1}");
}

/// The folder holds A, B, the steps and the offsets under their keys; reloading gives the
/// same bits.
#[test]
fn a_saved_adapter_reloads_to_bit_identical_logits() {
    let src = source();
    let cfg = l4q(serde_json::json!({"r": 4, "target_modules": ["q_proj", "v_proj"]}));
    let (adapted, tuner) = try_attach(&src, &cfg).unwrap();
    perturb(tuner.as_ref(), false);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    ferrule::peft_io::save_adapter(&dir, tuner.as_ref(), Task::CausalLm, "llama").unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "L4Q");
    assert_eq!(
        (config["bits"].as_u64(), config["group_size"].as_u64()),
        (Some(4), Some(32))
    );
    assert_eq!(
        (config["codes"].as_str(), config["lora_alpha"].as_f64()),
        (Some("signed"), Some(0.5))
    );
    let saved = ferrule::model::weights::load_safetensors_file(
        &dir.join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let v = "base_model.model.model.layers.0.self_attn.v_proj";
    assert_eq!(saved[&format!("{v}.lora_A.weight")].dims(), [4, 64]);
    assert_eq!(saved[&format!("{v}.lora_B.weight")].dims(), [32, 4]);
    assert_eq!(saved[&format!("{v}.l4q_step")].dims(), [32, 2]);
    assert_eq!(saved[&format!("{v}.l4q_offset")].dims(), [32, 2]);
    let reloaded = AdaptedModel::load(
        llama_dir().to_str().unwrap(),
        Some(&dir),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    assert_eq!(
        bits(&logits(&adapted)),
        bits(&logits(&reloaded.model)),
        "reloaded logits differ"
    );

    // The same folder read with the unsigned range: its offsets then mean other weights.
    let mut config = config;
    config["codes"] = "unsigned".into();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let unsigned = AdaptedModel::load(
        llama_dir().to_str().unwrap(),
        Some(&dir),
        None,
        &Device::Cpu,
    )
    .unwrap();
    assert_ne!(bits(&logits(&adapted)), bits(&logits(&unsigned.model)));
    an_adapter_saved_before_the_codes_key_is_read_as_unsigned(&dir, &config, &unsigned.model);
}

/// A folder without `codes` (saved before the key existed, with unsigned codes) reads as
/// `"unsigned"`: the same logits as the folder that says so.
fn an_adapter_saved_before_the_codes_key_is_read_as_unsigned(
    dir: &Path,
    config: &serde_json::Value,
    unsigned: &Model,
) {
    let mut config = config.clone();
    config.as_object_mut().unwrap().remove("codes");
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let old =
        AdaptedModel::load(llama_dir().to_str().unwrap(), Some(dir), None, &Device::Cpu).unwrap();
    assert_eq!(max_diff(&logits(&old.model), &logits(unsigned)), 0.0);
}

/// `before_step` without a trainer: L4Q never asks for the loss.
struct NoProbe;

impl LossProbe for NoProbe {
    fn loss(&mut self) -> anyhow::Result<f64> {
        anyhow::bail!("l4q asked for a loss")
    }
}

/// The LoRA warm-up (`warmup_steps`, v1's `T_wp`): before it ends the layers are `W₀` plus
/// LoRA (with B = 0, the base model's logits), and the steps and offsets get no gradient. At
/// its end (before step `warmup_steps`, 0-based) each group's step and offset are set from
/// `W' = W₀ + (α/r)·B A` as trained, checked here against the group's own min and max of `W'`
/// (`s = (max − min)/15`, byte 0's value `b − 8s` = min); then the layers are quantized.
#[test]
fn the_warm_up_trains_lora_then_sets_the_quantizer_from_the_update() {
    let src = source();
    let cfg = l4q(serde_json::json!({"r": 4, "warmup_steps": 2, "target_modules": ["q_proj"]}));
    let (model, tuner) = try_attach(&src, &cfg).unwrap();
    let frozen = Model::build(
        &src,
        Task::CausalLm,
        &ferrule::model::Frozen,
        &Device::Cpu,
        0,
    )
    .unwrap();
    let m = inputs()["attention_mask"].clone();
    let d = max_diff_masked(&logits(&model), &logits(&frozen), Some(&m));
    assert!(d < 1e-5, "warm-up with B = 0 vs the base model: {d}");
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    let var = |suffix: &str| {
        tuner
            .trainable()
            .into_iter()
            .find(|(k, _)| *k == format!("{q}.{suffix}"))
            .unwrap()
            .1
    };
    var("lora_B.weight")
        .set(&Tensor::randn(0f32, 0.05, (64, 4), &Device::Cpu).unwrap())
        .unwrap();
    let grads = loss(&model).backward().unwrap();
    for (k, v) in tuner.trainable() {
        let lora = k.contains("lora_");
        assert_eq!(grads.get(v.as_tensor()).is_some(), lora, "{k}");
    }
    let lora_logits = logits(&model);
    tuner.before_step(1, &mut NoProbe).unwrap();
    assert_eq!(max_diff_masked(&logits(&model), &lora_logits, None), 0.0);

    tuner.before_step(2, &mut NoProbe).unwrap();
    let w0 = src
        .weights
        .get("model.layers.0.self_attn.q_proj.weight", &[64, 64])
        .unwrap();
    let (a, b) = (var("lora_A.weight"), var("lora_B.weight"));
    let update = (b.as_tensor().matmul(a.as_tensor()).unwrap() * (0.5 / 4.0)).unwrap();
    let groups = (w0 + update).unwrap().reshape((64, 2, 32)).unwrap();
    let (min, max) = (groups.min(2).unwrap(), groups.max(2).unwrap());
    let want_s = ((&max - &min).unwrap() / 15.0).unwrap();
    let s = var("l4q_step").as_tensor().clone();
    let byte0 = (var("l4q_offset").as_tensor() - (&s * 8.0).unwrap()).unwrap();
    assert!(max_diff_masked(&s, &want_s, None) < 1e-7);
    assert!(max_diff_masked(&byte0, &min, None) < 1e-6);
    let d = max_diff_masked(&logits(&model), &lora_logits, Some(&m));
    assert!(d > 1e-4, "quantized after the warm-up: {d}");
    let grads = loss(&model).backward().unwrap();
    assert!(tuner
        .trainable()
        .iter()
        .all(|(_, v)| grads.get(v.as_tensor()).is_some()));
}

fn run_config(out: &Path) -> TrainConfig {
    TrainConfig {
        model: llama_dir().display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(l4q(
            serde_json::json!({"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
        )),
        max_len: Some(64),
        batch_size: Some(4),
        max_steps: Some(4),
        lr: 1e-3,
        seed: 5,
        compute_dtype: ComputeDtypeChoice::F32,
        ..Default::default()
    }
}

#[test]
fn a_run_resumes_to_the_same_adapter() {
    assert_resume_is_byte_identical(run_config, 2);
}

/// With a warm-up of 2 steps, a run resumed after step 2 (whose checkpoint's steps and offsets
/// were never trained: the resumed run sets them) ends in the same bytes.
#[test]
fn a_run_resumed_at_the_end_of_the_warm_up_ends_the_same() {
    assert_resume_is_byte_identical(
        |out| {
            let mut cfg = run_config(out);
            cfg.adapter = Some(l4q(serde_json::json!({
                "r": 4, "warmup_steps": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]
            })));
            cfg
        },
        2,
    );
}

/// The source with its token embedding replaced by its Q4_1 round trip: the one matrix L4Q
/// does not adapt, which the export writes by ggml's rule.
fn with_q4_1_embedding(mut src: ModelSource) -> ModelSource {
    let name = "model.embed_tokens.weight";
    let mut tensors = src.weights.tensors();
    let e = &tensors[name];
    let values: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap();
    let q = GgmlWriteType::Q4_1;
    let back = Tensor::from_vec(q.decode(&q.encode(&values)), e.dims(), &Device::Cpu).unwrap();
    tensors.insert(name.to_string(), back);
    src.weights = Weights::new(tensors, src.weights.source().to_path_buf());
    src
}

fn export(
    src: &ModelSource,
    tuner: &dyn Tuner,
    out: &Path,
) -> ferrule::export::gguf::GgufExportReport {
    let options = GgufExportOptions {
        outtype: OutType::Q4_1,
        overwrite: false,
    };
    export_model_gguf(src, Some(tuner), out, options).unwrap()
}

/// Every linear (the head too) trained with L4Q and written as Q4_1 from its learned codes:
/// with f16-exact steps and offsets, ferrule's GGUF reader gives the in-training logits (the
/// embedding, which L4Q leaves alone, taken as its Q4_1 round trip on both sides), and
/// `v_proj`'s values are `q·d + m` of the learned codes exactly. Without f16-exact steps the
/// report states what their rounding changed.
#[test]
fn the_exported_gguf_gives_the_in_training_logits_and_the_learned_codes() {
    let src = with_q4_1_embedding(source());
    let cfg = l4q(serde_json::json!({"target_modules": ALL_LINEARS}));
    let (adapted, tuner) = try_attach(&src, &cfg).unwrap();
    perturb(tuner.as_ref(), true);
    let want = logits(&adapted);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("l4q.gguf");
    let report = export(&src, tuner.as_ref(), &out);
    assert_eq!(report.tensor_types.get("Q4_1"), Some(&(2 * 7 + 2)));
    let learned = report.learned.as_ref().unwrap();
    assert_eq!(learned.tensors, 2 * 7 + 1, "every linear and the head");
    assert_eq!(learned.max_abs_f16, 0.0, "f16-exact steps and offsets");
    assert_eq!(learned.codes_changed_by_f16, 0);
    let back = ModelSource::load(out.to_str().unwrap(), &Device::Cpu).unwrap();
    let frozen = Model::build(
        &back,
        Task::CausalLm,
        &ferrule::model::Frozen,
        &Device::Cpu,
        0,
    )
    .unwrap();
    let m = inputs()["attention_mask"].clone();
    let d = max_diff_masked(&logits(&frozen), &want, Some(&m));
    eprintln!("max |GGUF - in-training logits| = {d:.3e}");
    assert!(d < 1e-4, "GGUF vs in-training logits differ by {d}");

    // v_proj of layer 1: the file's values are the learned codes times f16(s) plus f16(b).
    let name = "model.layers.1.self_attn.v_proj.weight";
    let updates = tuner.updates().unwrap();
    let Some((_, ferrule::tuners::Update::Quantized(q))) = updates.iter().find(|(n, _)| n == name)
    else {
        panic!("no learned quantization for {name}")
    };
    let w0 = src.weights.get(name, &[32, 64]).unwrap();
    let codes = q.quantized(&w0).unwrap();
    let expected: Vec<f32> = codes
        .codes
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let g = i / 32;
            c as f32 * f16::from_f32(codes.steps[g]).to_f32()
                + f16::from_f32(codes.offsets[g]).to_f32()
        })
        .collect();
    let read: Vec<f32> = back
        .weights
        .frozen(name, [32, 64])
        .unwrap()
        .to_dense(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(
        read, expected,
        "{name}: the file's values are not the learned codes'"
    );

    // Steps and offsets that f16 rounds: written as learned all the same, the change reported.
    perturb(tuner.as_ref(), false);
    let report = export(&src, tuner.as_ref(), &tmp.path().join("rounded.gguf"));
    let l = report.learned.unwrap();
    eprintln!(
        "f16 steps and offsets change a value by at most {:.3e}; re-derived, {} of {} codes would differ",
        l.max_abs_f16, l.codes_changed_by_f16, l.codes
    );
    assert!(l.codes_changed_by_f16 < l.codes / 10, "{l:?}");
    assert!(
        l.max_abs_f16 > 0.0 && l.max_abs_f16 < 1e-3,
        "{}",
        l.max_abs_f16
    );

    transformers_reads_the_same_logits(&out, &logits(&frozen), tmp.path());
}

/// transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`, gguf-py's Q4_1
/// dequantization) on the exported file gives ferrule's logits of it
/// (tests/fixtures/gguf_export/check_transformers_gguf.py); skipped without the reference venv.
fn transformers_reads_the_same_logits(gguf: &Path, ferrule_logits: &Tensor, tmp: &Path) {
    let venv = std::env::var("FERRULE_REF_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/ferrule/ref-venv")
        });
    let py = venv.join("bin/python");
    if !py.exists() {
        eprintln!(
            "skipping the transformers check: no reference venv at {}",
            venv.display()
        );
        return;
    }
    let want = tmp.join("ferrule_logits.safetensors");
    let mask = inputs()["attention_mask"].clone();
    ferrule::peft_io::write_safetensors(
        &want,
        &[
            ("logits".to_string(), ferrule_logits.clone()),
            ("attention_mask".to_string(), mask),
        ],
        &[("format", "pt")],
    )
    .unwrap();
    let script = fixtures().join("gguf_export/check_transformers_gguf.py");
    let inputs = fixtures().join("inputs/decoder.safetensors");
    let out = Command::new(&py)
        .arg(&script)
        .args([gguf, &inputs, &want])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "check_transformers_gguf.py failed:\n{text}"
    );
    assert!(text.contains("OK:"), "{text}");
}

/// Bits outside 2..=8, a group size that does not divide a layer (named), a quantized base
/// (named), a group size GGUF's Q4_1 cannot hold (named), and a non-q4_1 outtype.
#[test]
fn bad_inputs_are_named() {
    let src = source();
    let e = |cfg: serde_json::Value, src: &ModelSource| -> String {
        format!("{:#}", try_attach(src, &l4q(cfg)).err().unwrap())
    };
    assert!(
        e(serde_json::json!({"bits": 1}), &src).contains("bits (--l4q-bits) = 1 is not supported")
    );
    let msg = e(
        serde_json::json!({"group_size": 48, "target_modules": ["q_proj"]}),
        &src,
    );
    assert!(
        msg.contains("group_size=48 (--l4q-group-size) does not divide the 64 input features of model.layers.0.self_attn.q_proj"),
        "{msg}"
    );
    let nf4 = ferrule::quant::QuantSpec::new(ferrule::quant::QuantMethod::Nf4, 64, true).unwrap();
    let quantized = ModelSource::load_with(
        llama_dir().to_str().unwrap(),
        &Device::Cpu,
        LoadOptions::quantized(Some(&nf4)),
    )
    .unwrap();
    let msg = e(
        serde_json::json!({"target_modules": ["q_proj"]}),
        &quantized,
    );
    assert!(
        msg.contains("l4q: model.layers.0.self_attn.q_proj.weight is held quantized (nf4"),
        "{msg}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let (_, tuner) = try_attach(
        &src,
        &l4q(serde_json::json!({"group_size": 16, "target_modules": ["q_proj"]})),
    )
    .unwrap();
    let out = tmp.path().join("g16.gguf");
    let options = GgufExportOptions {
        outtype: OutType::Q4_1,
        overwrite: false,
    };
    let msg = format!(
        "{:#}",
        export_model_gguf(&src, Some(tuner.as_ref()), &out, options).unwrap_err()
    );
    assert!(
        msg.contains(
            "model.layers.0.self_attn.q_proj.weight: learned with bits=4 and group_size=16"
        ),
        "{msg}"
    );
    assert!(!out.exists(), "a refused export leaves nothing");
    let (_, tuner) = try_attach(
        &src,
        &l4q(serde_json::json!({"target_modules": ["q_proj"]})),
    )
    .unwrap();
    let options = GgufExportOptions {
        outtype: OutType::Q8_0,
        overwrite: false,
    };
    let msg = format!(
        "{:#}",
        export_model_gguf(&src, Some(tuner.as_ref()), &out, options).unwrap_err()
    );
    assert!(msg.contains("export with --outtype q4_1"), "{msg}");
    assert!(!out.exists());
}
