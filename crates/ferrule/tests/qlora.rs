//! LoRA on a quantized frozen base (QLoRA): the quantized linear op computes exactly what the
//! dense op computes on the dequantized weights, so training through an NF4 / int8 base gives
//! the adapter that training on the dequantized f32 model gives; bad quantization input is
//! refused with a clear error.

mod common;

use ferrule::model::LoadOptions;
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use common::*;
use ferrule::model::ModelSource;
use ferrule::quant::{QuantMethod, QuantSpec};
use ferrule::train::{train, RunOptions, Silent, TrainConfig};
use ferrule::tuners::AdapterConfig;
use ferrule::util::atomic::RawTensor;

fn config(model: &Path, out: &Path, quantize: Option<QuantSpec>) -> TrainConfig {
    TrainConfig {
        model: model.display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(
            AdapterConfig::from_json(serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"}))
                .unwrap(),
        ),
        max_len: Some(64),
        batch_size: Some(4),
        max_steps: Some(6),
        lr: 3e-2,
        seed: 5,
        quantize,
        ..Default::default()
    }
}

/// The f32 model whose linear weights are exactly the quantized ones, dequantized.
fn dequantized_copy(quantized: &ModelSource, out: &Path) {
    let mut raw = BTreeMap::new();
    for (name, t) in &quantized.weights.tensors() {
        raw.insert(
            name.clone(),
            ferrule::util::atomic::raw_tensor(name, t).unwrap(),
        );
    }
    for (name, q) in quantized.weights.quantized() {
        let (r, c) = q.dims();
        raw.insert(name.clone(), RawTensor::f32s(vec![r, c], &q.dequantize()));
    }
    let mut cfg = quantized.config.clone();
    cfg.as_object_mut().unwrap().remove("quantization_config");
    ferrule::export::write_model_folder(quantized, out, &cfg, &raw).unwrap();
}

fn adapter(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    load_abs(&dir.join("adapter_model.safetensors"))
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

fn load_abs(p: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    ferrule::model::weights::load_safetensors_file(p, &Device::Cpu).unwrap()
}

#[test]
fn training_through_a_quantized_base_equals_training_on_its_dequantized_weights() {
    let base = fixtures().join("models/llama");
    for spec in [
        QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap(),
        QuantSpec::new(QuantMethod::Int8, 64, false).unwrap(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let q = ModelSource::load_with(
            base.to_str().unwrap(),
            &Device::Cpu,
            LoadOptions::quantized(Some(&spec)),
        )
        .unwrap();
        assert_eq!(
            q.weights.quantized().len(),
            16,
            "every linear but lm_head, plus embedding and head in bf16"
        );
        let dense = dir.path().join("dense");
        dequantized_copy(&q, &dense);

        let (qa, da) = (dir.path().join("q"), dir.path().join("d"));
        let sq = train(
            &config(&base, &qa, Some(spec)),
            &Device::Cpu,
            &mut Silent,
            &RunOptions::default(),
        )
        .unwrap();
        let sd = train(
            &config(&dense, &da, None),
            &Device::Cpu,
            &mut Silent,
            &RunOptions::default(),
        )
        .unwrap();
        assert!(sq.completed && sq.steps == 6);
        assert_eq!(sq.trainable_params, sd.trainable_params);
        let losses = |d: &Path| -> Vec<f64> {
            ferrule::train::metrics::read_metrics(&d.join("metrics.jsonl"))
                .unwrap()
                .iter()
                .filter_map(|m| m.get("loss").and_then(|v| v.as_f64()))
                .collect()
        };
        let (lq, ld) = (losses(&qa), losses(&da));
        assert!(
            lq[5] < lq[0],
            "{:?}: loss did not fall: {lq:?}",
            spec.method
        );
        for (a, b) in lq.iter().zip(&ld) {
            assert!(
                (a - b).abs() < 1e-5,
                "{:?}: losses {lq:?} vs {ld:?}",
                spec.method
            );
        }
        let (aq, ad) = (adapter(&qa), adapter(&da));
        assert_eq!(aq.len(), ad.len());
        for (k, v) in &aq {
            let max = max_abs_diff(v, &ad[k]);
            assert!(max < 1e-5, "{:?}: {k} differs by {max}", spec.method);
            assert!(v.iter().any(|&x| x != 0.0), "{k} never moved");
        }
    }
}

#[test]
fn bad_quantization_input_gets_clear_errors() {
    let base = fixtures().join("models/llama");
    let dev = Device::Cpu;
    // A blocksize bitsandbytes does not have.
    let err = QuantSpec::new(QuantMethod::Nf4, 100, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blocksize 100") && err.contains("[32, 64"),
        "{err}"
    );

    // NaN weights are refused, naming the file, tensor and element.
    let dir = tempfile::tempdir().unwrap();
    let nan_dir = dir.path().join("nan");
    std::fs::create_dir(&nan_dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base.join(f), nan_dir.join(f)).unwrap();
    }
    let mut t = load_abs(&base.join("model.safetensors"));
    let k = "model.layers.1.mlp.up_proj.weight";
    let mut v: Vec<f32> = t[k].flatten_all().unwrap().to_vec1().unwrap();
    v[7] = f32::NAN;
    t.insert(
        k.into(),
        candle_core::Tensor::from_vec(v, t[k].dims(), &dev).unwrap(),
    );
    let list: Vec<(String, candle_core::Tensor)> = t.into_iter().collect();
    ferrule::peft_io::write_safetensors(&nan_dir.join("model.safetensors"), &list, &[]).unwrap();
    let spec = QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap();
    let err = format!(
        "{:#}",
        ModelSource::load_with(
            nan_dir.to_str().unwrap(),
            &dev,
            LoadOptions::quantized(Some(&spec))
        )
        .err()
        .unwrap()
    );
    assert!(
        err.contains(k) && err.contains("element 7") && err.contains("NaN"),
        "{err}"
    );

    // Statistics that do not fit the shape: a bitsandbytes folder with a truncated absmax.
    let q = fixtures().join("quant/llama-fp4");
    let bad = dir.path().join("badstats");
    std::fs::create_dir(&bad).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(q.join(f), bad.join(f)).unwrap();
    }
    let bytes = std::fs::read(q.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut raw: BTreeMap<String, RawTensor> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                RawTensor::new(v.dtype(), v.shape().to_vec(), v.data().to_vec()),
            )
        })
        .collect();
    let key = "model.layers.0.self_attn.q_proj.weight.absmax";
    let a = raw.get_mut(key).unwrap();
    a.shape = vec![a.shape[0] - 1];
    a.data.truncate(a.data.len() - 4);
    ferrule::util::atomic::save_raw_safetensors_atomic(&bad.join("model.safetensors"), &raw, None)
        .unwrap();
    let err = format!(
        "{:#}",
        ModelSource::load(bad.to_str().unwrap(), &dev)
            .err()
            .unwrap()
    );
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight")
            && err.contains("absmax has 63 values")
            && err.contains("needs 64"),
        "{err}"
    );

    // Quantizing what is already quantized.
    let err = format!(
        "{:#}",
        ModelSource::load_with(
            q.to_str().unwrap(),
            &dev,
            LoadOptions::quantized(Some(&spec))
        )
        .err()
        .unwrap()
    );
    assert!(err.contains("already quantized"), "{err}");
}
