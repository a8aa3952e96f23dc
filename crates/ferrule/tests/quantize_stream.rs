//! `ferrule quantize` streams: the model memory-mapped (`LoadOptions::read_once`), each weight
//! quantized as the file reaches it. It writes the bytes the in-memory path wrote (loading
//! the model quantized, serializing every tensor, writing the folder at once; kept below as
//! the reference), for every format, model family and source dtype, and the hashes of the
//! in-memory path's files recorded before the change. Bad input is an error naming it, with
//! no output left behind.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::*;
use ferrule::model::{LoadOptions, ModelSource};
use ferrule::quant::{bnb_format, QuantMethod, QuantSpec, WeightMemory};
use ferrule::util::atomic::{load_safetensors, raw_tensor, save_safetensors_atomic};

/// `ferrule quantize` before it streamed: the model loaded quantized in memory, every tensor
/// serialized into one map, the folder written from it. Returns what it reported.
fn quantize_in_memory(model: &Path, spec: &QuantSpec, out: &Path) -> WeightMemory {
    let source = ModelSource::load_with(
        model.to_str().unwrap(),
        &Device::Cpu,
        LoadOptions::quantized(Some(spec)),
    )
    .unwrap();
    let mut raw = BTreeMap::new();
    for (name, t) in &source.weights.tensors() {
        raw.insert(name.clone(), raw_tensor(name, t).unwrap());
    }
    for (name, q) in source.weights.quantized() {
        bnb_format::serialize(name, q.as_ref(), &mut raw).unwrap();
    }
    let mut config = source.config.clone();
    config["quantization_config"] = bnb_format::quantization_config(spec);
    ferrule::export::write_model_folder(&source, out, &config, &raw).unwrap();
    WeightMemory::of(&source.weights)
}

/// What `ferrule quantize` does now: the model mapped, quantized while written.
fn quantize_streamed(
    model: &Path,
    spec: &QuantSpec,
    out: &Path,
) -> ferrule::export::QuantizeReport {
    let path = model.to_str().unwrap();
    let source =
        ModelSource::load_with(path, &Device::Cpu, LoadOptions::read_once(None, path)).unwrap();
    assert!(source.weights.is_streamed(), "{path}: not mapped");
    ferrule::export::quantize_to_dir(&source, spec, out).unwrap()
}

/// FNV-1a (64-bit) of a file's bytes: enough to tell two outputs apart without a hashing
/// dependency (`python3 -c` in the test below computes the same).
fn fnv1a(path: &Path) -> u64 {
    std::fs::read(path)
        .unwrap()
        .iter()
        .fold(0xcbf29ce484222325, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        })
}

fn specs() -> Vec<(&'static str, QuantSpec)> {
    vec![
        (
            "nf4-dq",
            QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap(),
        ),
        ("fp4", QuantSpec::new(QuantMethod::Fp4, 64, false).unwrap()),
        (
            "int8",
            QuantSpec::new(QuantMethod::Int8, 64, false).unwrap(),
        ),
        (
            "nf4-128",
            QuantSpec::new(QuantMethod::Nf4, 128, false).unwrap(),
        ),
        (
            "fp4-dq-32",
            QuantSpec::new(QuantMethod::Fp4, 32, true).unwrap(),
        ),
    ]
}

/// Every file of both folders, byte for byte, and the memory reports.
fn assert_same_folders(reference: &Path, streamed: &Path, what: &str) {
    let list = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(list(reference), list(streamed), "{what}: files");
    for f in list(reference) {
        let (a, b) = (
            std::fs::read(reference.join(&f)).unwrap(),
            std::fs::read(streamed.join(&f)).unwrap(),
        );
        assert!(
            a == b,
            "{what}: {f} differs ({} and {} bytes)",
            a.len(),
            b.len()
        );
    }
}

#[test]
fn streamed_quantize_writes_the_in_memory_bytes_for_every_format_and_model() {
    let tmp = tempfile::tempdir().unwrap();
    for model in ["llama", "qwen2", "mistral", "bert", "smollm"] {
        let dir = fixtures().join("models").join(model);
        for (tag, spec) in specs() {
            let what = format!("{model} {tag}");
            let reference = tmp.path().join(format!("{model}-{tag}-ref"));
            let streamed = tmp.path().join(format!("{model}-{tag}"));
            let memory = quantize_in_memory(&dir, &spec, &reference);
            let report = quantize_streamed(&dir, &spec, &streamed);
            assert_same_folders(&reference, &streamed, &what);
            assert_eq!(
                serde_json::to_value(&report.memory).unwrap(),
                serde_json::to_value(&memory).unwrap(),
                "{what}: memory report"
            );
            assert_eq!(
                report.quantized_tensors,
                memory.formats.values().map(|f| f.tensors).sum::<usize>()
            );
            let err = report.quantize_error.unwrap();
            assert!(err.max_abs > 0.0 && err.rel < 0.2, "{what}: {err:?}");
        }
    }
}

/// The FNV-1a hash of `model.safetensors` as the in-memory `ferrule quantize` wrote it for
/// the Llama fixture, recorded with the binary of commit 4c6ecad (before streaming):
/// `ferrule quantize --model tests/fixtures/models/llama -o OUT --quantize nf4 --double-quant`
/// (and `--quantize fp4`, `--quantize int8`), hashed by
/// `python3 -c 'import sys; h=0xcbf29ce484222325
/// for b in open(sys.argv[1],"rb").read(): h=((h^b)*0x100000001b3)%2**64
/// print(hex(h))' OUT/model.safetensors`.
#[test]
fn streamed_quantize_matches_the_recorded_hashes_of_the_in_memory_command() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("models/llama");
    for (tag, spec) in specs().into_iter().take(3) {
        let out = tmp.path().join(tag);
        quantize_streamed(&dir, &spec, &out);
        let want = match tag {
            "nf4-dq" => 0xb7705a98fa6b8cc5,
            "fp4" => 0xa23c52266ab6e191,
            "int8" => 0xbceda14044a434e7,
            _ => unreachable!(),
        };
        assert_eq!(fnv1a(&out.join("model.safetensors")), want, "{tag}");
    }
}

/// A copy of the fixture `model` with its float tensors converted by `convert` and written
/// as `shards` safetensors files (with an index when more than one).
fn converted_copy(model: &str, out: &Path, shards: usize, dtype: DType) -> PathBuf {
    let from = fixtures().join("models").join(model);
    std::fs::create_dir_all(out).unwrap();
    for f in std::fs::read_dir(&from).unwrap() {
        let f = f.unwrap();
        if f.file_name() != "model.safetensors" {
            std::fs::copy(f.path(), out.join(f.file_name())).unwrap();
        }
    }
    let tensors: Vec<(String, candle_core::Tensor)> =
        load_safetensors(&from.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| {
                let t = if t.dtype().is_float() {
                    t.to_dtype(dtype).unwrap()
                } else {
                    t
                };
                (k, t)
            })
            .collect();
    if shards == 1 {
        save_safetensors_atomic(&out.join("model.safetensors"), &tensors, None).unwrap();
        return out.to_path_buf();
    }
    let mut map = serde_json::Map::new();
    for (i, part) in tensors.chunks(tensors.len().div_ceil(shards)).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        save_safetensors_atomic(&out.join(&file), part, None).unwrap();
        for (k, _) in part {
            map.insert(k.clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();
    out.to_path_buf()
}

#[test]
fn bf16_f16_and_sharded_sources_quantize_to_the_in_memory_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    for (dtype, shards) in [
        (DType::BF16, 1),
        (DType::F16, 1),
        (DType::F32, 3),
        (DType::BF16, 2),
    ] {
        let what = format!("llama {dtype:?} in {shards} file(s)");
        let src = converted_copy(
            "llama",
            &tmp.path().join(format!("src-{dtype:?}-{shards}")),
            shards,
            dtype,
        );
        for (tag, spec) in specs().into_iter().take(3) {
            let reference = tmp.path().join(format!("{dtype:?}-{shards}-{tag}-ref"));
            let streamed = tmp.path().join(format!("{dtype:?}-{shards}-{tag}"));
            quantize_in_memory(&src, &spec, &reference);
            quantize_streamed(&src, &spec, &streamed);
            assert_same_folders(&reference, &streamed, &format!("{what}, {tag}"));
        }
    }
}

fn leftovers(parent: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_non_finite_weight_is_an_error_naming_it_and_leaves_no_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let src = converted_copy("llama", &tmp.path().join("src"), 1, DType::F32);
    let file = src.join("model.safetensors");
    let mut tensors: Vec<(String, candle_core::Tensor)> = load_safetensors(&file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let bad = "model.layers.1.mlp.down_proj.weight";
    for (k, t) in tensors.iter_mut() {
        if k == bad {
            let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v[5] = f32::NAN;
            *t = candle_core::Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        }
    }
    save_safetensors_atomic(&file, &tensors, None).unwrap();
    let outputs = tmp.path().join("outputs");
    std::fs::create_dir_all(&outputs).unwrap();
    for (tag, spec) in specs() {
        let path = src.to_str().unwrap();
        let source =
            ModelSource::load_with(path, &Device::Cpu, LoadOptions::read_once(None, path)).unwrap();
        let err = ferrule::export::quantize_to_dir(&source, &spec, &outputs.join(tag)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(bad) && msg.contains("NaN"), "{tag}: {msg}");
        assert!(msg.contains(path), "{tag}: the source is named: {msg}");
        assert!(
            leftovers(&outputs).is_empty(),
            "{tag}: {:?}",
            leftovers(&outputs)
        );
    }
}

#[test]
fn a_quantized_source_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap();
    let nf4 = tmp.path().join("nf4");
    quantize_streamed(&fixtures().join("models/llama"), &spec, &nf4);
    let int8 = tmp.path().join("int8");
    quantize_streamed(
        &fixtures().join("models/llama"),
        &QuantSpec::new(QuantMethod::Int8, 64, false).unwrap(),
        &int8,
    );
    let mut sources = vec![nf4, int8];
    if let Some(gguf) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") {
        sources.push(gguf);
    }
    for src in sources {
        let path = src.to_str().unwrap();
        let source =
            ModelSource::load_with(path, &Device::Cpu, LoadOptions::read_once(None, path)).unwrap();
        let out = tmp.path().join("again");
        let err = ferrule::export::quantize_to_dir(&source, &spec, &out).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(path) && msg.contains("already quantized"),
            "{msg}"
        );
        assert!(!out.exists());
    }
}

/// `merge --quantize` with an adapter streams too: the dense base mapped, each weight
/// quantized as it is written (`MergeOptions::quantize`), the merged ones requantized. It
/// writes the bytes of the merge into the base loaded quantized first (as the adapter
/// trained), for every format, and both say in config.json how the weights are stored: a
/// folder of bitsandbytes tensors without `quantization_config` is read by transformers as
/// dense garbage.
#[test]
fn merging_an_adapter_quantized_while_written_equals_merging_into_the_quantized_base() {
    use ferrule::adapted::AdaptedModel;
    use ferrule::merge::{merge_to_dir_with, MergeOptions};
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/llama");
    let model = model.to_str().unwrap();
    let adapter = fixtures().join("adapters/llama_lora");
    for (tag, spec) in specs() {
        let merge = |load: LoadOptions, quantize: Option<QuantSpec>, out: &Path, dequantize| {
            let m =
                AdaptedModel::load_with(model, Some(&adapter), None, &Device::Cpu, load).unwrap();
            let options = MergeOptions {
                dequantize,
                quantize,
            };
            let tuner = m.tuner.as_deref().unwrap();
            merge_to_dir_with(&m.source, tuner, m.model.task, out, options).unwrap()
        };
        let (reference, streamed) = (tmp.path().join(format!("{tag}-ref")), tmp.path().join(tag));
        let in_memory = merge(LoadOptions::quantized(Some(&spec)), None, &reference, false);
        let written = merge(
            LoadOptions::read_once(None, model),
            Some(spec),
            &streamed,
            false,
        );
        assert_same_folders(&reference, &streamed, tag);
        // --dequantize: the weights the adapter trained on, in f32, plus the update.
        let (dq_ref, dq) = (
            tmp.path().join(format!("{tag}-dq-ref")),
            tmp.path().join(format!("{tag}-dq")),
        );
        merge(LoadOptions::quantized(Some(&spec)), None, &dq_ref, true);
        merge(LoadOptions::read_once(None, model), Some(spec), &dq, true);
        assert_same_folders(&dq_ref, &dq, &format!("{tag} --dequantize"));
        assert!(written.merged_modules > 0 && written.requantized == written.merged_modules);
        assert_eq!(
            serde_json::to_value(&written).unwrap(),
            serde_json::to_value(&in_memory).unwrap(),
            "{tag}: report"
        );
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(streamed.join("config.json")).unwrap()).unwrap();
        // The blocksize is not a `quantization_config` key: each tensor's quant_state has it.
        let declared = bnb_format::spec_from_config(&config).unwrap().unwrap();
        assert_eq!(
            (declared.method, declared.double_quant),
            (spec.method, spec.double_quant),
            "{tag}: config.json's quantization_config"
        );
    }
}
