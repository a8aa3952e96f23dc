//! Whole-model merges as mergekit does them (`ferrule merge --config merge.yaml`): mergekit's
//! YAML ([`config`]), its parameters with gradients and filters ([`parameters`]), its merge
//! methods over one tensor ([`methods`]), planned and checked in full before anything is
//! written ([`plan`]), then streamed: one output tensor at a time, read from memory-mapped
//! inputs ([`inputs`]) and appended to safetensors shards ([`writer`]) in a temporary folder
//! renamed into place at the end.
//!
//! Source: mergekit 0.1.5 (`mergekit/config.py`, `plan.py`, `parameter_resolver.py`,
//! `sparsify.py`, `merge_methods/`).

pub mod config;
pub mod inputs;
pub mod methods;
pub mod parameters;
pub mod plan;
pub mod stream;
pub mod tokenizer;
pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::json;

use config::MergeConfig;
use inputs::InputModel;
use methods::TensorInputs;

/// How to run a merge beyond what the YAML says.
#[derive(Clone, Debug)]
pub struct ModelMergeOptions {
    /// Seed of the random masks (DARE, DELLA).
    pub seed: u64,
    /// Largest output shard in bytes.
    pub max_shard_bytes: usize,
    /// Bytes of f32 rows each input holds at once: larger tensors are merged in blocks of
    /// rows ([`stream`]), smaller ones whole.
    pub block_bytes: usize,
}

impl Default for ModelMergeOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            max_shard_bytes: 5_000_000_000,
            block_bytes: 32 << 20,
        }
    }
}

/// What a merge wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelMergeReport {
    pub merge_method: String,
    pub tensors_written: usize,
    pub layers: usize,
    pub shards: usize,
    pub dtype: String,
    /// Elements of the largest tensor (merged in row blocks when larger than `block_bytes`
    /// per input).
    pub largest_tensor_elements: usize,
}

/// Reads the YAML at `config_path`, merges, and writes a model folder at `out`.
pub fn merge_from_config(
    config_path: &Path,
    out: &Path,
    options: &ModelMergeOptions,
) -> Result<ModelMergeReport> {
    let config = MergeConfig::read(config_path)?;
    let yaml_dir = config_path.parent().map(Path::to_path_buf);
    merge(&config, yaml_dir.as_deref(), out, options)
        .with_context(|| format!("merge config {}", config_path.display()))
}

/// A model path as mergekit finds it (relative to the working folder), or failing that
/// relative to the YAML's folder.
fn resolver(yaml_dir: Option<&Path>) -> impl Fn(&str) -> PathBuf + '_ {
    move |spec: &str| {
        let p = PathBuf::from(spec);
        match yaml_dir {
            Some(d) if !p.exists() && p.is_relative() && d.join(&p).exists() => d.join(p),
            _ => p,
        }
    }
}

/// Merges as `config` says into a new folder `out`.
pub fn merge(
    config: &MergeConfig,
    yaml_dir: Option<&Path>,
    out: &Path,
    options: &ModelMergeOptions,
) -> Result<ModelMergeReport> {
    if out.exists() {
        bail!(
            "{}: already exists; choose a new output folder",
            out.display()
        )
    }
    let resolve = resolver(yaml_dir);
    let mut models = BTreeMap::new();
    for spec in referenced(config) {
        let m = InputModel::open(&spec, &resolve)?;
        models.insert(spec, m);
    }
    let plan = plan::build(config, &models)?;
    crate::util::atomic::write_folder_atomic(out, |tmp| write(config, &plan, &models, tmp, options))
}

/// Every model the YAML names, in its order, the base first.
pub(super) fn referenced(config: &MergeConfig) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    let mut add = |s: &String| {
        if !v.contains(s) {
            v.push(s.clone())
        }
    };
    config.base_model.iter().for_each(&mut add);
    for m in config.models.iter().flatten() {
        add(&m.model);
    }
    for s in config.slices.iter().flatten() {
        s.base_model.iter().for_each(&mut add);
        for src in &s.sources {
            add(&src.model);
        }
    }
    v
}

fn write(
    config: &MergeConfig,
    plan: &plan::Plan,
    models: &BTreeMap<String, InputModel>,
    dir: &Path,
    options: &ModelMergeOptions,
) -> Result<ModelMergeReport> {
    let entries = plan
        .tensors
        .iter()
        .map(|t| writer::Entry {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let mut shards = writer::ShardWriter::new(dir, entries, options.max_shard_bytes);
    let total = plan.tensors.len();
    for (k, t) in plan.tensors.iter().enumerate() {
        let mut write = |merged: &[f32]| {
            if let Some(bad) = merged.iter().find(|v| !v.is_finite()) {
                bail!(
                    "merging {}: the result holds {bad}; nothing was written",
                    t.name
                )
            }
            shards.write_rows(&t.name, merged)
        };
        match block_rows(t, models, options.block_bytes) {
            Some(rows) => merge_blocks(plan, t, models, options, rows, &mut write),
            None => merge_whole(plan, t, models, options, &mut write),
        }
        .with_context(|| format!("merging {}", t.name))?;
        // About twenty progress lines for a whole merge.
        if (k + 1) % (total / 20).max(1) == 0 || k + 1 == total {
            tracing::info!("merged {}/{total} tensors ({})", k + 1, t.name);
        }
    }
    let n_shards = shards.finish()?;
    let reference = &models[&plan.reference];
    let dtype = plan
        .tensors
        .first()
        .map(|t| t.dtype)
        .unwrap_or(config::OutDtype::F32);
    write_config(reference, plan, dtype, dir)?;
    copy_tokenizer(config, reference, models, dir)?;
    if let Some(tok) = &plan.tokenizer {
        tokenizer::write_tokenizer(tok, dir)?;
    }
    crate::util::atomic::sync_dir(dir)?;
    Ok(ModelMergeReport {
        merge_method: config.merge_method.clone(),
        tensors_written: total,
        layers: plan.layers,
        shards: n_shards,
        dtype: dtype.name().to_string(),
        largest_tensor_elements: plan
            .tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .max()
            .unwrap_or(0),
    })
}

/// The rows per block when `t` is larger than `block_bytes` per input and can be read by
/// rows: every input memory-mapped, the rows not remapped.
fn block_rows(
    t: &plan::PlannedTensor,
    models: &BTreeMap<String, InputModel>,
    block_bytes: usize,
) -> Option<usize> {
    if t.shape.len() < 2 || t.remap.is_some() {
        return None;
    }
    let row_bytes = t.shape[1..].iter().product::<usize>().max(1) * 4;
    let rows = (block_bytes / row_bytes).max(1);
    let mapped = t.inputs.iter().all(|(m, _)| models[m].is_mapped());
    (mapped && rows < t.shape[0]).then_some(rows)
}

fn merge_whole(
    plan: &plan::Plan,
    t: &plan::PlannedTensor,
    models: &BTreeMap<String, InputModel>,
    options: &ModelMergeOptions,
    write: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    // Inputs are decoded in parallel; each is one tensor of one model.
    let mut values: Vec<Vec<f32>> = t
        .inputs
        .par_iter()
        .map(|(model, name)| models[model].read(name))
        .collect::<Result<_>>()?;
    if let Some(p) = &t.remap {
        let width = t.shape[1..].iter().product();
        values = p.apply(&values, width)?;
    }
    let inputs = TensorInputs {
        name: &t.name,
        shape: &t.shape,
        values,
        base: t.base,
        seed: options.seed,
    };
    write(&methods::merge(plan.method, inputs, &t.params)?)
}

fn merge_blocks(
    plan: &plan::Plan,
    t: &plan::PlannedTensor,
    models: &BTreeMap<String, InputModel>,
    options: &ModelMergeOptions,
    block_rows: usize,
    write: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    let read = |i: usize, rows: std::ops::Range<usize>| {
        let (model, name) = &t.inputs[i];
        models[model].read_rows(name, rows)
    };
    let blocks = stream::Blocks {
        name: &t.name,
        shape: &t.shape,
        inputs: t.inputs.len(),
        base: t.base,
        seed: options.seed,
        block_rows,
        read: &read,
    };
    stream::merge(plan.method, &blocks, &t.params, write)
}

fn write_config(
    reference: &InputModel,
    plan: &plan::Plan,
    dtype: config::OutDtype,
    dir: &Path,
) -> Result<()> {
    let mut cfg = reference.config.clone();
    if let Some(o) = cfg.as_object_mut() {
        o.remove("quantization_config");
        o.insert("torch_dtype".into(), json!(dtype.name()));
        if let Some(v) = plan.vocab_size {
            o.insert("vocab_size".into(), json!(v));
        }
        if o.contains_key("num_hidden_layers") {
            o.insert("num_hidden_layers".into(), json!(plan.layers));
        }
    }
    crate::util::atomic::write_bytes_atomic(
        &dir.join("config.json"),
        (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes(),
    )?;
    Ok(())
}

/// The tokenizer files of `tokenizer_source` (a model), else of the reference model (the base,
/// else the first), as mergekit copies them.
fn copy_tokenizer(
    config: &MergeConfig,
    reference: &InputModel,
    models: &BTreeMap<String, InputModel>,
    dir: &Path,
) -> Result<()> {
    let from = match config.vocabulary_source() {
        // The union is the base's tokenizer with tokens added: its other files are the base's.
        None | Some("base") | Some("union") => reference,
        Some(m) => models
            .get(m)
            .with_context(|| format!("tokenizer_source: {m} is not one of the merged models"))?,
    };
    crate::export::copy_tokenizer_files(from.dir.as_deref(), from.source.as_ref(), dir)?;
    if let Some(t) = &config.chat_template {
        crate::util::atomic::write_bytes_atomic(&dir.join("chat_template.jinja"), t.as_bytes())?;
    }
    Ok(())
}

/// What a merge with a quantized output wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QuantizedMergeReport {
    #[serde(flatten)]
    pub merge: ModelMergeReport,
    pub quantized_tensors: usize,
    /// Largest rounding error quantization added, against the merged f32 weights.
    pub quantize_error: Option<crate::quant::RoundTripError>,
}

/// [`merge_from_config`], then with `quantize` the merged linear weights quantized
/// (`--quantize nf4`) into the bitsandbytes layout, the rounding it added measured, by
/// [`crate::export::quantize_to_dir`] reading the merge memory-mapped. The unquantized merge
/// lives in a temporary folder beside `out` meanwhile.
pub fn merge_quantized(
    config_path: &Path,
    out: &Path,
    options: &ModelMergeOptions,
    quantize: Option<crate::quant::QuantSpec>,
) -> Result<QuantizedMergeReport> {
    let Some(spec) = quantize else {
        let merge = merge_from_config(config_path, out, options)?;
        return Ok(QuantizedMergeReport {
            merge,
            quantized_tensors: 0,
            quantize_error: None,
        });
    };
    if out.exists() {
        bail!(
            "{}: already exists; choose a new output folder",
            out.display()
        )
    }
    let mut name = out
        .file_name()
        .with_context(|| format!("{}: not a folder name", out.display()))?
        .to_os_string();
    name.push(".unquantized");
    let full = out.with_file_name(name);
    if full.exists() {
        std::fs::remove_dir_all(&full)
            .with_context(|| format!("removing stale {}", full.display()))?;
    }
    let result = (|| {
        let merge = merge_from_config(config_path, &full, options)?;
        let path = full.to_string_lossy();
        let source = crate::model::ModelSource::load_with(
            &path,
            &candle_core::Device::Cpu,
            crate::model::LoadOptions::read_once(None, &path),
        )?;
        let report = crate::export::quantize_to_dir(&source, &spec, out)?;
        Ok(QuantizedMergeReport {
            merge,
            quantized_tensors: report.quantized_tensors,
            quantize_error: report.quantize_error,
        })
    })();
    let _ = std::fs::remove_dir_all(&full);
    result
}
