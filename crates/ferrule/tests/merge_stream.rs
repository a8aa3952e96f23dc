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

/// `model` with `adapter` merged (`dequantize` as `--dequantize`) into `out` twice, the base
/// held in memory and memory-mapped; asserts that both folders' `model.safetensors` and
/// `config.json` are the same bytes.
fn assert_mapped_merge_equal(model: &Path, adapter: &Path, dequantize: bool, out: &Path) {
    let files = |mapped: bool| -> Vec<Vec<u8>> {
        let spec = model.to_str().unwrap();
        let options = match mapped {
            true => LoadOptions::read_once(None, spec),
            false => LoadOptions::default(),
        };
        let m = AdaptedModel::load_with(spec, Some(adapter), None, &Device::Cpu, options).unwrap();
        assert_eq!(m.source.weights.is_streamed(), mapped, "{spec}");
        let dir = out.join(if mapped { "mapped" } else { "in-memory" });
        let tuner = m.tuner.as_deref().unwrap();
        merge_to_dir_with(
            &m.source,
            tuner,
            m.model.task,
            &dir,
            MergeOptions {
                dequantize,
                quantize: None,
            },
        )
        .unwrap();
        ["model.safetensors", "config.json"]
            .iter()
            .map(|f| std::fs::read(dir.join(f)).unwrap())
            .collect()
    };
    assert!(
        files(false) == files(true),
        "{} into {} (dequantize {dequantize}): the merged folders differ",
        adapter.display(),
        model.display()
    );
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
        let out = tmp.path().join(i.to_string());
        assert_mapped_merge_equal(&model, &fixtures().join(adapter), false, &out);
    }
}

#[test]
fn a_mapped_nf4_base_merges_to_the_same_bytes_requantized_or_dequantized() {
    let tmp = tempfile::tempdir().unwrap();
    let nf4 = tmp.path().join("nf4");
    // The folder `ferrule quantize` writes: the base mapped, quantized while written.
    let spec = QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap();
    let llama = fixtures().join("models/llama");
    let llama = llama.to_str().unwrap();
    let quantized =
        ModelSource::load_with(llama, &Device::Cpu, LoadOptions::read_once(None, llama)).unwrap();
    ferrule::export::quantize_to_dir(&quantized, &spec, &nf4).unwrap();
    let adapter = fixtures().join("adapters/llama_lora");
    for dequantize in [false, true] {
        let out = tmp.path().join(format!("dequantize-{dequantize}"));
        assert_mapped_merge_equal(&nf4, &adapter, dequantize, &out);
    }
}
