//! Merging an adapter into a memory-mapped base (`LoadOptions::read_once`, what `ferrule
//! merge` loads) writes the same bytes as merging into the base held in memory, for every
//! mergeable method and base format (merge_stream_rss.rs measures its memory).

mod common;

use std::path::Path;

use candle_core::Device;
use common::*;
use ferrule::adapted::AdaptedModel;
use ferrule::merge::{merge_to_dir_with, MergeOptions};
use ferrule::model::{LoadOptions, ModelSource};
use ferrule::quant::{QuantMethod, QuantSpec};

/// `model` with `adapter` merged (`dequantize` as `--dequantize`), the base memory-mapped or
/// not; returns the folder's `model.safetensors` and `config.json`.
fn merged(
    model: &Path,
    adapter: &Path,
    mapped: bool,
    dequantize: bool,
    out: &Path,
) -> Vec<Vec<u8>> {
    let spec = model.to_str().unwrap();
    let options = match mapped {
        true => LoadOptions::read_once(None, spec),
        false => LoadOptions::default(),
    };
    let m = AdaptedModel::load_with(spec, Some(adapter), None, &Device::Cpu, options).unwrap();
    assert_eq!(m.source.weights.is_streamed(), mapped, "{spec}");
    let tuner = m.tuner.as_deref().unwrap();
    let options = MergeOptions { dequantize };
    merge_to_dir_with(&m.source, tuner, m.model.task, out, options).unwrap();
    ["model.safetensors", "config.json"]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect()
}

#[test]
fn a_mapped_base_merges_to_the_same_bytes_for_every_method() {
    let cases = [
        ("llama", "adapters/llama_lora"),
        ("llama", "methods/llama_lora_embed"),
        ("llama", "methods/llama_dora"),
        ("llama", "methods/llama_ia3"),
        ("llama", "methods/llama_ln_tuning"),
        ("llama", "methods/llama_randlora"),
        ("qwen2", "methods/qwen2_lora_bias_lora_only"),
        ("qwen2", "methods/qwen2_lora_bias_all"),
        ("mistral", "adapters/mistral_patterns"),
        ("bert", "adapters/bert_seqcls"),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, (model, adapter)) in cases.iter().enumerate() {
        let model = fixtures().join("models").join(model);
        let adapter = fixtures().join(adapter);
        let in_memory = merged(
            &model,
            &adapter,
            false,
            false,
            &tmp.path().join(format!("m{i}")),
        );
        let mapped = merged(
            &model,
            &adapter,
            true,
            false,
            &tmp.path().join(format!("s{i}")),
        );
        assert!(
            in_memory == mapped,
            "{}: the merged folders differ",
            adapter.display()
        );
    }
}

#[test]
fn a_mapped_nf4_base_merges_to_the_same_bytes_requantized_or_dequantized() {
    let tmp = tempfile::tempdir().unwrap();
    let nf4 = tmp.path().join("nf4");
    let source = ModelSource::load_with(
        fixtures().join("models/llama").to_str().unwrap(),
        &Device::Cpu,
        LoadOptions::default(),
    )
    .unwrap();
    let spec = QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap();
    // The folder quantized by `ferrule quantize` (through the same writer, quantized while read).
    let quantized = ModelSource::load_with(
        fixtures().join("models/llama").to_str().unwrap(),
        &Device::Cpu,
        LoadOptions::quantized(Some(&spec)),
    )
    .unwrap();
    drop(source);
    ferrule::export::quantize_to_dir(&quantized, &spec, &nf4).unwrap();
    let adapter = fixtures().join("adapters/llama_lora");
    for dequantize in [false, true] {
        let d = dequantize as u8;
        let in_memory = merged(
            &nf4,
            &adapter,
            false,
            dequantize,
            &tmp.path().join(format!("m{d}")),
        );
        let mapped = merged(
            &nf4,
            &adapter,
            true,
            dequantize,
            &tmp.path().join(format!("s{d}")),
        );
        assert!(
            in_memory == mapped,
            "dequantize {dequantize}: the merged folders differ"
        );
    }
}
