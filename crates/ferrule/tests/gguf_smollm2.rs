//! Parity of the GGUF loader with transformers' own load of SmolLM2-135M-Instruct.Q4_1.gguf.
//!
//! Fixtures come from `tests/fixtures/gguf/make_gguf_fixtures.py`. The model file is an asset
//! (`scripts/fetch-assets.sh`, under `$FERRULE_ASSETS` like every asset); without it these
//! tests print a message and pass, except under CI, where they fail (`common::asset`).

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use ferrule::model::gguf::{load_gguf, GgufError, GgufFile, GgufModel};
use serde_json::Value;

fn asset() -> Option<PathBuf> {
    common::asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

fn fixture() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("smollm2_tokens.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The model, loaded once for all tests in this file (dequantizing it takes a few seconds).
fn model() -> Option<&'static GgufModel> {
    static MODEL: OnceLock<Option<GgufModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| asset().map(|p| load_gguf(&p, &Device::Cpu).expect("load gguf")))
        .as_ref()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

#[test]
fn config_matches_transformers() {
    let Some(m) = model() else { return };
    let want = &fixture()["config"];
    let got = &m.config;
    for (key, w) in want.as_object().unwrap() {
        let g = &got[key];
        match (w.as_f64(), g.as_f64()) {
            (Some(w), Some(g)) if !w.is_nan() => {
                assert!(
                    (w - g).abs() <= 1e-6 * w.abs().max(1.0),
                    "{key}: {g} vs {w}"
                )
            }
            _ => assert_eq!(g, w, "{key}"),
        }
    }
    assert_eq!(got["rms_norm_eps"], serde_json::json!(1e-5));
    assert_eq!(got["architectures"][0], "LlamaForCausalLM");
}

#[test]
fn tensor_types_and_names() {
    let Some(m) = model() else { return };
    assert_eq!(
        m.tensor_types,
        vec![
            ("Q4_1".to_string(), 210),
            ("F32".to_string(), 61),
            ("Q8_0".to_string(), 1)
        ]
    );
    // 30 layers x 9 tensors + embed + final norm; tied, so no lm_head.
    assert_eq!(m.tensors.len(), 272);
    assert!(!m.tensors.contains_key("lm_head.weight"));
    for t in m.tensors.values() {
        assert_eq!(t.dtype(), DType::F32);
    }
    let path = asset().unwrap();
    let file = GgufFile::open(&path).unwrap();
    // The one Q8_0 tensor is the (tied) embedding.
    let q8: Vec<_> = file
        .tensor_names()
        .filter(|(hf, _)| file.tensor_type(hf) == Some(candle_core::quantized::GgmlDType::Q8_0))
        .collect();
    assert_eq!(q8, vec![("model.embed_tokens.weight", "token_embd.weight")]);
}

#[test]
fn chat_template_and_special_tokens() {
    let Some(m) = model() else { return };
    let fx = fixture();
    let tok = &fx["tokenizer"];
    assert_eq!(m.bos_token.as_deref(), tok["bos_token"].as_str());
    assert_eq!(m.eos_token.as_deref(), tok["eos_token"].as_str());
    let template = m.chat_template.as_deref().unwrap();
    assert_eq!(
        template.chars().count() as u64,
        tok["chat_template_len"].as_u64().unwrap()
    );
    assert!(template.contains("<|im_start|>"));
}

#[test]
fn token_ids_match_transformers() {
    let Some(m) = model() else { return };
    let fx = fixture();
    let mut failures = Vec::new();
    for case in fx["tokens"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = m.tokenizer.encode(text, true).unwrap().get_ids().to_vec();
        if got != want {
            failures.push(format!("{text:?}\n  got  {got:?}\n  want {want:?}"));
        }
        let decoded = m.tokenizer.decode(&want, false).unwrap();
        if decoded != case["decoded"].as_str().unwrap() {
            failures.push(format!("decode {text:?}: got {decoded:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tensor_slices_match_transformers() {
    let Some(m) = model() else { return };
    let slices = candle_core::safetensors::load(
        fixture_dir().join("smollm2_slices.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(slices.len(), 13);
    for (key, want) in &slices {
        let (name, kind) = key.split_once(':').unwrap();
        let t = &m.tensors[name];
        let got = match kind {
            "rows" if t.rank() == 2 => t.narrow(0, 0, want.dim(0).unwrap()).unwrap(),
            "rows" => t.clone(),
            "row_sums" => t.to_dtype(DType::F64).unwrap().sum(1).unwrap(),
            _ => panic!("unknown fixture {key}"),
        };
        assert_eq!(got.dims(), want.dims(), "{key}");
        let (g, w) = (f64s(&got), f64s(want));
        let tol = if kind == "row_sums" { 1e-9 } else { 1e-6 };
        // NaN compares false: `all` fails on it where a max fold would skip it.
        let worst = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, |m, d| {
                if d.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(d)
                }
            });
        assert!(worst <= tol, "{key}: max abs diff {worst}");
    }
}

#[test]
fn every_tensor_sum_matches_transformers() {
    let Some(m) = model() else { return };
    let fx = fixture();
    let stats = fx["tensor_stats"].as_object().unwrap();
    let tied = m.config["tie_word_embeddings"].as_bool().unwrap();
    let mut seen = 0;
    for (name, s) in stats {
        if tied && name == "lm_head.weight" {
            continue;
        }
        let t = m
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("missing {name}"));
        let shape: Vec<usize> = s["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        let v = f64s(t);
        let sum: f64 = v.iter().sum();
        let sumsq: f64 = v.iter().map(|x| x * x).sum();
        let (ws, wq) = (s["sum"].as_f64().unwrap(), s["sumsq"].as_f64().unwrap());
        assert!(
            (sum - ws).abs() <= 1e-6 * ws.abs().max(1.0),
            "{name} sum {sum} vs {ws}"
        );
        assert!(
            (sumsq - wq).abs() <= 1e-6 * wq.abs().max(1.0),
            "{name} sumsq {sumsq} vs {wq}"
        );
        seen += 1;
    }
    assert_eq!(seen, m.tensors.len());
}

#[test]
fn qtensors_dequantize_to_the_same_tensors() {
    let Some(m) = model() else { return };
    let path = asset().unwrap();
    let file = GgufFile::open(&path).unwrap();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.3.mlp.up_proj.weight",
    ] {
        let q = file.qtensor(name, &Device::Cpu).unwrap();
        let t = q.dequantize(&Device::Cpu).unwrap();
        let diff = (t - &m.tensors[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
}

fn truncated_copy(
    len_from_end: Option<u64>,
    len: Option<usize>,
) -> Option<(tempfile::TempDir, PathBuf)> {
    let src = asset()?;
    let bytes = std::fs::read(&src).unwrap();
    let keep = match (len, len_from_end) {
        (Some(n), _) => n,
        (None, Some(k)) => bytes.len() - k as usize,
        _ => bytes.len(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    std::fs::write(&path, &bytes[..keep]).unwrap();
    Some((dir, path))
}

#[test]
fn truncated_in_header_is_reported() {
    let Some((_dir, path)) = truncated_copy(None, Some(100_000)) else {
        return;
    };
    let err = load_gguf(&path, &Device::Cpu).unwrap_err();
    assert!(matches!(err, GgufError::Corrupt { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("cut.gguf") && msg.contains("truncated or corrupt"),
        "{msg}"
    );
}

#[test]
fn truncated_in_data_names_the_tensor() {
    let Some((_dir, path)) = truncated_copy(Some(1000), None) else {
        return;
    };
    let err = load_gguf(&path, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GgufError::Corrupt { .. }), "{err:?}");
    assert!(
        msg.contains("cut.gguf") && msg.contains("tensor \"") && msg.contains("needs bytes"),
        "{msg}"
    );
}

/// Kept in its blocks (210 Q4_1 + the Q8_0 token embedding, 0.18x the f32 bytes), the model
/// computes the logits of its fully dequantized copy: the quantized linear op and the
/// quantized embedding lookup dequantize exactly what `load_gguf` dequantizes.
#[test]
fn blocks_kept_quantized_give_the_dequantized_logits() {
    use ferrule::model::{Frozen, Inputs, Model, ModelSource, Task, Weights};
    let (Some(path), Some(dense)) = (asset(), model()) else {
        return;
    };
    let dev = Device::Cpu;
    let q = ModelSource::load(path.to_str().unwrap(), &dev).unwrap();
    let mem = ferrule::quant::WeightMemory::of(&q.weights);
    assert_eq!(mem.formats["Q4_1"].tensors, 210);
    assert_eq!(mem.formats["Q8_0"].tensors, 1);
    assert!((mem.formats["Q4_1"].bits_per_param - 5.0).abs() < 1e-9);
    assert!(
        (mem.total_bytes() as f64) < 0.2 * mem.f32_bytes() as f64,
        "{mem:?}"
    );
    let mut d = ModelSource::load(path.to_str().unwrap(), &dev).unwrap();
    d.weights = Weights::new(dense.tensors.clone(), &path);
    let ids = Tensor::new(&[[1u32, 504, 3458, 314, 260, 1345, 28, 2]], &dev).unwrap();
    let inp = Inputs {
        input_ids: &ids,
        attention_mask: None,
        token_type_ids: None,
    };
    let yq = Model::build(&q, Task::CausalLm, &Frozen, &dev, 0)
        .unwrap()
        .forward(&inp)
        .unwrap();
    let yd = Model::build(&d, Task::CausalLm, &Frozen, &dev, 0)
        .unwrap()
        .forward(&inp)
        .unwrap();
    let diff = common::max_diff(&yq, &yd);
    assert!(
        diff < 1e-4,
        "quantized vs dequantized logits differ by {diff}"
    );
}
