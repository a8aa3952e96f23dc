//! Writing a standalone Hugging Face model folder (config.json, tokenizer files,
//! model.safetensors), for `ferrule merge` and `ferrule quantize`. The folder is built in
//! `<out>.tmp` and renamed into place, so a failure leaves no half-written output.
//! [`gguf`] writes GGUF files for llama.cpp (`ferrule export gguf`); [`lora`] a DyLoRA adapter at
//! one rank as a plain PEFT LoRA (`ferrule export lora`).

pub mod gguf;
pub mod lora;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::model::ModelSource;
use crate::util::atomic::{
    save_raw_safetensors_atomic, save_safetensors_atomic, sync_dir, write_bytes_atomic, RawTensor,
};

/// Tokenizer-side files copied from a model folder when present.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "generation_config.json",
    "added_tokens.json",
];

/// Writes `config`, the tokenizer of `source` and `tensors` as a model folder at `out`.
/// Refuses to overwrite an existing folder.
pub fn write_model_folder(
    source: &ModelSource,
    out: &Path,
    config: &Value,
    tensors: &BTreeMap<String, RawTensor>,
) -> Result<()> {
    write_model_folder_with(source, out, config, |file| {
        save_raw_safetensors_atomic(file, tensors, Some(pt_format()))
    })
}

/// [`write_model_folder`] with the weights written by `write_weights(path)`, which creates the
/// file `path` (`model.safetensors`, with [`pt_format`]'s metadata). The folder is built in
/// `<out>.tmp` and renamed into place; on an error it is removed.
pub fn write_model_folder_with(
    source: &ModelSource,
    out: &Path,
    config: &Value,
    write_weights: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    crate::util::atomic::write_folder_atomic(out, |tmp| {
        write_weights(&tmp.join("model.safetensors"))?;
        write_side_files(source, tmp, config)
    })
}

/// Writes a model's files into the existing folder `dir` (a training run's output folder),
/// each file atomically: `model.safetensors` from candle tensors, each converted to bytes as
/// the file reaches it (a fully fine-tuned model is written without a second copy of it in
/// memory), the tokenizer's files, then `config.json` last, so a folder that an interrupted
/// write left without `config.json` is not taken for a model.
pub fn write_dense_model_files(
    source: &ModelSource,
    dir: &Path,
    config: &Value,
    tensors: &[(String, candle_core::Tensor)],
) -> Result<()> {
    save_safetensors_atomic(&dir.join("model.safetensors"), tensors, Some(pt_format()))?;
    write_side_files(source, dir, config)
}

/// The `format: pt` metadata transformers writes.
pub fn pt_format() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// The tokenizer files and `config.json` (last) of a model folder.
fn write_side_files(source: &ModelSource, dir: &Path, config: &Value) -> Result<()> {
    match &source.dir {
        Some(from) => {
            for f in TOKENIZER_FILES {
                let p = from.join(f);
                if p.is_file() {
                    std::fs::copy(&p, dir.join(f))
                        .with_context(|| format!("copying {}", p.display()))?;
                }
            }
        }
        None => write_tokenizer_files(source, dir)?,
    }
    write_bytes_atomic(
        &dir.join("config.json"),
        (serde_json::to_string_pretty(config)? + "\n").as_bytes(),
    )?;
    Ok(sync_dir(dir)?)
}

/// Copies the tokenizer-side files of a model folder `from` into `out`; for a model without
/// one (a GGUF file), writes them from `source`'s metadata.
pub fn copy_tokenizer_files(
    from: Option<&Path>,
    source: Option<&ModelSource>,
    out: &Path,
) -> Result<()> {
    match (from, source) {
        (Some(dir), _) => {
            for f in TOKENIZER_FILES {
                let p = dir.join(f);
                if p.is_file() {
                    std::fs::copy(&p, out.join(f))
                        .with_context(|| format!("copying {}", p.display()))?;
                }
            }
            Ok(())
        }
        (None, Some(source)) => write_tokenizer_files(source, out),
        (None, None) => Ok(()),
    }
}

/// For a GGUF base: `tokenizer.json` and `tokenizer_config.json` from its metadata.
fn write_tokenizer_files(source: &ModelSource, dir: &Path) -> Result<()> {
    let tok = source.tokenizer()?;
    tok.save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("writing tokenizer.json: {e}"))?;
    let mut cfg = serde_json::Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    if let Some(tc) = &source.tokenizer_config {
        if let Some(b) = &tc.bos_token {
            cfg.insert("bos_token".into(), json!(b));
        }
        if let Some(e) = &tc.eos_token {
            cfg.insert("eos_token".into(), json!(e));
            cfg.insert(
                "pad_token".into(),
                json!(tc.pad_token.clone().unwrap_or_else(|| e.clone())),
            );
        }
        if let Some(t) = &tc.chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
    }
    write_bytes_atomic(
        &dir.join("tokenizer_config.json"),
        (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes(),
    )?;
    Ok(())
}

/// What `ferrule quantize` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeReport {
    pub quantized_tensors: usize,
    pub memory: crate::quant::WeightMemory,
    /// The largest error quantizing added (bf16 tables included), against the source's
    /// values.
    pub quantize_error: Option<crate::quant::RoundTripError>,
}

/// Writes the dense model `source` as a model folder with its linear weights quantized by
/// `spec`, in the bitsandbytes serialized layout that transformers + bitsandbytes load
/// ([`crate::merge::MergedModel::quantized`]): each weight quantized when the file reaches
/// it, so with `source` memory-mapped (`LoadOptions::read_once`) about one tensor is held at
/// a time. An already quantized source, or one without linear weights, is an error.
pub fn quantize_to_dir(
    source: &ModelSource,
    spec: &crate::quant::QuantSpec,
    out: &Path,
) -> Result<QuantizeReport> {
    let model = crate::merge::MergedModel::quantized(source, spec)?;
    write_model_folder_with(source, out, model.config(), |file| {
        model
            .write_safetensors(file, Some(pt_format()))
            .with_context(|| format!("quantizing {}", source.location.display()))
    })?;
    let memory = model.weight_memory();
    Ok(QuantizeReport {
        quantized_tensors: memory.formats.values().map(|f| f.tensors).sum(),
        memory,
        quantize_error: model.quantize_error(),
    })
}
