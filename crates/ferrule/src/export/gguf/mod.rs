//! Writing models and LoRA adapters as GGUF files that llama.cpp loads (`ferrule export gguf`).
//!
//! A model is written as llama.cpp's `convert_hf_to_gguf.py` writes it for the llama family
//! (Llama, Mistral and SmolLM2 as architecture `llama`, Qwen2 as `qwen2`): the same metadata
//! keys and value types, tensor names (`blk.N.attn_q.weight`, ...), the rope permutation of
//! q/k rows for `llama` (which ferrule's GGUF reader undoes), norms and other 1-D tensors in
//! F32, and each matrix in the chosen [`OutType`]. A matrix whose rows are not a whole number
//! of 32-value blocks is written in F16, convert_hf_to_gguf.py's fallback; under `q4_k`
//! (llama-quantize's type, which the converter lacks) one whose rows are whole 32-value blocks
//! but not 256-value super-blocks is written in Q5_0, llama-quantize's fallback. Quantized
//! blocks are bit-exact to ggml's reference quantizers ([`crate::quant::ggml_quantize`]).
//!
//! A LoRA adapter is written in llama.cpp's adapter layout ([`lora`]), as
//! `convert_lora_to_gguf.py` writes it.

pub mod learned;
pub mod lora;
pub use learned::{learns_quantization, LearnedReport};
pub use lora::export_lora_gguf;
mod vocab;
pub mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde_json::Value;

use crate::merge::{merged_model, MergeOptions, MergedModel};
use crate::model::config::DecoderConfig;
use crate::model::gguf::{gguf_tensor_name, hf_tensor_name, natural_key, Arch};
use crate::model::{ModelSource, Task};
use crate::ops::rope::RopeScaling;
use crate::quant::ggml_quantize::GgmlWriteType;
use crate::quant::RoundTripError;
use crate::tuners::Tuner;
use writer::{MetaValue, TensorInfo};

/// `general.quantization_version` (`GGML_QNT_VERSION`).
const QUANTIZATION_VERSION: u32 = 2;

/// What the matrices of an exported model are stored as (`--outtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutType {
    F32,
    F16,
    Q8_0,
    Q4_0,
    /// `d·q + m` blocks of 32: ggml's reference quantizer, or an L4Q layer's learned codes.
    Q4_1,
    Q4K,
}

impl OutType {
    pub const NAMES: &'static str = "f32, f16, q8_0, q4_0, q4_1, q4_k";

    /// The tensor type of the 2-D weights.
    pub fn tensor_type(self) -> GgmlWriteType {
        match self {
            Self::F32 => GgmlWriteType::F32,
            Self::F16 => GgmlWriteType::F16,
            Self::Q8_0 => GgmlWriteType::Q8_0,
            Self::Q4_0 => GgmlWriteType::Q4_0,
            Self::Q4_1 => GgmlWriteType::Q4_1,
            Self::Q4K => GgmlWriteType::Q4K,
        }
    }

    /// `general.file_type` (gguf-py's `LlamaFileType`).
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            // MOSTLY_Q4_K_M, what `llama-quantize --pure … Q4_K_M` records.
            Self::Q4K => 15,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q4K => "q4_k",
        }
    }
}

impl FromStr for OutType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            "q4_k" => Self::Q4K,
            _ => bail!("unknown GGUF outtype {s:?}; valid ones are {}", Self::NAMES),
        })
    }
}

/// How to write.
#[derive(Clone, Copy, Debug)]
pub struct GgufExportOptions {
    pub outtype: OutType,
    /// Replace an existing output file (otherwise it is an error).
    pub overwrite: bool,
}

/// What was written, for the user to check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufExportReport {
    /// `general.architecture`.
    pub architecture: String,
    /// `general.type`: `model` or `adapter`.
    pub kind: String,
    pub outtype: String,
    pub tensors: usize,
    /// GGUF tensor type -> how many tensors have it.
    pub tensor_types: BTreeMap<String, usize>,
    /// Matrices written in F16 instead of the outtype, their rows not being whole blocks.
    pub f16_fallback: Vec<String>,
    /// Under `q4_k`: matrices written in Q5_0, their rows being whole 32-value blocks but not
    /// 256-value super-blocks (llama-quantize's fallback).
    pub q5_0_fallback: Vec<String>,
    /// Largest rounding error against the f32 weights, over the tensors not written in F32.
    pub max_error: Option<RoundTripError>,
    /// `tokenizer.ggml.pre`, and whether ferrule recognised the pre-tokenizer.
    pub tokenizer_pre: Option<String>,
    pub tokenizer_pre_recognised: Option<bool>,
    /// With an adapter merged first: how many modules it changed.
    pub merged_modules: Option<usize>,
    /// The model's sliding attention window, which llama.cpp's llama architecture does not
    /// have (convert_hf_to_gguf.py drops it too): attention past it differs in llama.cpp.
    pub sliding_window_dropped: Option<usize>,
    /// Matrices written from an adapter's learned codes (L4Q), and what the f16 rounding of
    /// their steps and offsets changed; absent when there are none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned: Option<LearnedReport>,
    pub bytes: u64,
}

/// The llama.cpp architecture a decoder is written as (`Arch::permutes_qk` says whether its q/k
/// rows are permuted).
pub(crate) fn gguf_arch(source: &ModelSource) -> Result<Arch> {
    match source.model_type() {
        // convert_hf_to_gguf.py's LlamaModel handles LlamaForCausalLM and MistralForCausalLM.
        "llama" | "mistral" => Ok(Arch::Llama),
        "qwen2" => Ok(Arch::Qwen2),
        other => bail!(
            "{}: GGUF export supports llama.cpp's llama and qwen2 architectures (Llama, Mistral, SmolLM2, Qwen2 models); this model is {other:?}{}",
            source.location.display(),
            if other == "bert" { ", an encoder that llama.cpp's llama-family loader cannot run" } else { "" }
        ),
    }
}

/// Refuses to replace `out` without `overwrite`, as `ferrule train` does with its output.
pub(crate) fn claim_output(out: &Path, overwrite: bool) -> Result<()> {
    if out.is_dir() {
        bail!("{}: is a folder; give a .gguf file path", out.display())
    }
    if out.exists() && !overwrite {
        bail!(
            "{}: already exists; pass --overwrite to replace it",
            out.display()
        )
    }
    Ok(())
}

/// The GGUF name of an HF tensor, checked both ways against the reader's mapping.
pub(crate) fn gguf_name(hf: &str, arch: Arch, layers: usize) -> Result<String> {
    let g = gguf_tensor_name(hf);
    match hf_tensor_name(&g, arch, layers) {
        Some(back) if back == hf => Ok(g),
        _ => bail!(
            "tensor {hf:?} has no llama.cpp {} tensor name; GGUF export writes decoder weights only (causal LM)",
            arch.name()
        ),
    }
}

/// llama.cpp's rope permutation of q/k rows (convert_hf_to_gguf.py `LlamaModel.permute`):
/// within each head of `2d` rows, output row `2i + j` is input row `j·d + i`. `values` holds
/// `rows` rows of equal length (a bias: rows of 1).
pub(crate) fn permute_rows<T: Copy>(values: &[T], rows: usize, heads: usize) -> Result<Vec<T>> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        bail!("{rows} rows cannot be split into {heads} heads of row pairs")
    }
    let cols = values.len() / rows;
    let d = rows / heads / 2;
    let mut out = Vec::with_capacity(values.len());
    for r in 0..rows {
        let (h, rem) = (r / (2 * d), r % (2 * d));
        let (i, j) = (rem / 2, rem % 2);
        let src = h * 2 * d + j * d + i;
        out.extend_from_slice(&values[src * cols..(src + 1) * cols]);
    }
    Ok(out)
}

/// How many heads the rows of this tensor were permuted in, if llama.cpp permutes it.
pub(crate) fn permuted_heads(gguf_name: &str, arch: Arch, cfg: &DecoderConfig) -> Option<usize> {
    if !arch.permutes_qk() {
        return None;
    }
    if gguf_name.contains(".attn_q.") {
        Some(cfg.num_attention_heads)
    } else if gguf_name.contains(".attn_k.") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    }
}

/// The type a tensor is written in, as convert_hf_to_gguf.py's `prepare_tensors` chooses it:
/// 1-D tensors, norms and anything not a `.weight` stay F32; matrices get the outtype, or when
/// a row is not a whole number of the outtype's blocks its fallback
/// ([`GgmlWriteType::fallback`]: F16, or Q5_0 for Q4_K). Returns the type and whether it fell
/// back.
pub(crate) fn tensor_type(
    name: &str,
    shape: &[usize],
    out: GgmlWriteType,
) -> (GgmlWriteType, bool) {
    if shape.len() <= 1 || name.ends_with("_norm.weight") || !name.ends_with(".weight") {
        return (GgmlWriteType::F32, false);
    }
    let cols = *shape.last().unwrap_or(&1);
    if out.fits_row(cols) {
        (out, false)
    } else {
        (out.fallback(cols), true)
    }
}

/// Encodes `values` as `ty`, returning the bytes and (for lossy types) the rounding error.
pub(crate) fn encode(values: &[f32], ty: GgmlWriteType) -> (Vec<u8>, Option<RoundTripError>) {
    let bytes = ty.encode(values);
    let err =
        (ty != GgmlWriteType::F32).then(|| RoundTripError::between(values, &ty.decode(&bytes)));
    (bytes, err)
}

fn worst(a: Option<RoundTripError>, b: Option<RoundTripError>) -> Option<RoundTripError> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.worst(b)),
        (a, b) => a.or(b),
    }
}

/// The model's weights as the export sees them, each made when the writer reaches it: merged
/// with `tuner` first when one is given, dequantized; with the number of merged modules.
fn weights_to_write(
    source: &ModelSource,
    tuner: Option<&dyn Tuner>,
) -> Result<(MergedModel, Option<usize>)> {
    let dequantize = MergeOptions {
        dequantize: true,
        ..MergeOptions::default()
    };
    let (replaced, updates) = match tuner {
        Some(t) => (t.replaced()?, t.updates()?),
        None => (vec![], vec![]),
    };
    let model = merged_model(source, replaced, updates, Task::CausalLm, dequantize)?;
    let merged = tuner.map(|_| model.report().merged_modules);
    Ok((model, merged))
}

/// The `general.*` and `<arch>.*` keys convert_hf_to_gguf.py writes for a llama-family model.
fn model_metadata(
    source: &ModelSource,
    arch: Arch,
    cfg: &DecoderConfig,
    raw_config: &Value,
    outtype: OutType,
) -> Result<Vec<(String, MetaValue)>> {
    let a = arch.name();
    let u = |k: &str, v: usize| -> Result<(String, MetaValue)> {
        let v = u32::try_from(v).with_context(|| format!("{a}.{k} = {v} does not fit a u32"))?;
        Ok((format!("{a}.{k}"), MetaValue::U32(v)))
    };
    let name = source
        .location
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut md = vec![
        ("general.architecture".into(), MetaValue::Str(a.into())),
        ("general.type".into(), MetaValue::Str("model".into())),
        ("general.name".into(), MetaValue::Str(name)),
        u("block_count", cfg.num_hidden_layers)?,
        u("context_length", cfg.max_position_embeddings)?,
        u("embedding_length", cfg.hidden_size)?,
        u("feed_forward_length", cfg.intermediate_size)?,
        u("attention.head_count", cfg.num_attention_heads)?,
        u("attention.head_count_kv", cfg.num_key_value_heads)?,
        (
            format!("{a}.rope.freq_base"),
            MetaValue::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            MetaValue::F32(cfg.rms_norm_eps as f32),
        ),
    ];
    // TextModel.set_gguf_parameters writes an explicit head_dim as the key/value lengths.
    if raw_config.get("head_dim").is_some_and(|v| !v.is_null()) {
        md.push(u("attention.key_length", cfg.head_dim)?);
        md.push(u("attention.value_length", cfg.head_dim)?);
    }
    md.push((
        "general.file_type".into(),
        MetaValue::U32(outtype.file_type()),
    ));
    if arch == Arch::Llama {
        md.push(u("vocab_size", cfg.vocab_size)?);
        md.push(u("rope.dimension_count", cfg.head_dim)?);
    }
    match cfg.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            md.push((format!("{a}.rope.scaling.type"), MetaValue::Str("linear".into())));
            md.push((format!("{a}.rope.scaling.factor"), MetaValue::F32(factor as f32)));
        }
        ref other => bail!(
            "{}: rope scaling {other:?} is not exported to GGUF yet (llama.cpp stores llama3 scaling as a rope_freqs tensor); default and linear rope are",
            source.location.display()
        ),
    }
    Ok(md)
}

/// Writes `source` (merged with `tuner` first, if given) as a GGUF model file at `out`.
pub fn export_model_gguf(
    source: &ModelSource,
    tuner: Option<&dyn Tuner>,
    out: &Path,
    options: GgufExportOptions,
) -> Result<GgufExportReport> {
    claim_output(out, options.overwrite)?;
    let arch = gguf_arch(source)?;
    let (weights, merged_modules) = weights_to_write(source, tuner)?;
    let config = weights.config().clone();
    let cfg = DecoderConfig::from_json(&config)
        .with_context(|| format!("{}: config", source.location.display()))?;
    let (metadata, vocab) = file_metadata(source, arch, &cfg, &config, options.outtype)?;
    let plan = tensor_plan(&weights, arch, &cfg, options.outtype)?;
    let infos: Vec<TensorInfo> = plan
        .iter()
        .map(|p| TensorInfo {
            name: p.name.clone(),
            shape: p.shape.clone(),
            ty: p.ty,
        })
        .collect();
    let mut max_error = None;
    let mut learned = LearnedReport::default();
    writer::write_gguf(out, &metadata, &infos, |i| {
        let (bytes, err) = tensor_bytes(&weights, &plan[i], arch, &cfg, &mut learned)?;
        max_error = worst(max_error, err);
        Ok(bytes)
    })?;
    let fell_back_to = |ty: GgmlWriteType| -> Vec<String> {
        plan.iter()
            .filter(|p| p.fell_back && p.ty == ty)
            .map(|p| p.name.clone())
            .collect()
    };
    Ok(GgufExportReport {
        architecture: arch.name().into(),
        kind: "model".into(),
        outtype: options.outtype.name().into(),
        tensors: infos.len(),
        tensor_types: writer::count_types(&infos),
        f16_fallback: fell_back_to(GgmlWriteType::F16),
        q5_0_fallback: fell_back_to(GgmlWriteType::Q5_0),
        max_error,
        tokenizer_pre: Some(vocab.pre),
        tokenizer_pre_recognised: Some(vocab.pre_recognised),
        merged_modules,
        sliding_window_dropped: cfg.sliding_window,
        learned: (learned.tensors > 0).then_some(learned),
        bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
    })
}

/// The file's metadata: the model's keys, the vocabulary's (moved out of the returned
/// [`vocab::VocabMeta`]) and the quantization version, with
/// warnings for what llama.cpp will not do as the source model does (a sliding window, an
/// unrecognised pre-tokenizer).
fn file_metadata(
    source: &ModelSource,
    arch: Arch,
    cfg: &DecoderConfig,
    config: &Value,
    outtype: OutType,
) -> Result<(Vec<(String, MetaValue)>, vocab::VocabMeta)> {
    let mut metadata = model_metadata(source, arch, cfg, config, outtype)?;
    if let Some(w) = cfg.sliding_window {
        tracing::warn!(
            "{}: sliding_window {w} is not written: llama.cpp's {} architecture attends to the whole context (convert_hf_to_gguf.py drops it too), so outputs past {w} tokens differ",
            source.location.display(),
            arch.name()
        );
    }
    let mut vocab = vocab::vocab_metadata(source, cfg.vocab_size)?;
    if !vocab.pre_recognised {
        tracing::warn!(
            "{}: ferrule does not recognise this tokenizer's pre-tokenizer; tokenizer.ggml.pre is written as \"default\", and llama.cpp may split text differently than the tokenizer does",
            source.location.display()
        );
    }
    metadata.extend(std::mem::take(&mut vocab.entries));
    metadata.push((
        "general.quantization_version".into(),
        MetaValue::U32(QUANTIZATION_VERSION),
    ));
    Ok((metadata, vocab))
}

/// One tensor of the file: its GGUF and Hugging Face names, shape and type, and whether the
/// type is a fallback from the asked-for one.
struct PlannedTensor<'a> {
    name: String,
    hf: &'a str,
    shape: Vec<usize>,
    ty: GgmlWriteType,
    fell_back: bool,
}

/// Every tensor of `weights` under its GGUF name and type, in llama.cpp's order.
fn tensor_plan<'a>(
    weights: &'a MergedModel,
    arch: Arch,
    cfg: &DecoderConfig,
    outtype: OutType,
) -> Result<Vec<PlannedTensor<'a>>> {
    let mut plan = Vec::new();
    for hf in weights.names() {
        let name = gguf_name(hf, arch, cfg.num_hidden_layers)?;
        let shape = weights.dims(hf).context("a listed tensor")?;
        let (ty, fell_back) = tensor_type(&name, &shape, outtype.tensor_type());
        plan.push(PlannedTensor {
            name,
            hf: hf.as_str(),
            shape,
            ty,
            fell_back,
        });
    }
    plan.sort_by(|a, b| natural_key(&a.name).cmp(&natural_key(&b.name)));
    Ok(plan)
}

/// The bytes of one planned tensor: an L4Q layer's learned codes as they are, else the merged
/// values encoded (with the rounding error), q/k rows rope-permuted for `llama`.
fn tensor_bytes(
    weights: &MergedModel,
    p: &PlannedTensor,
    arch: Arch,
    cfg: &DecoderConfig,
    learned: &mut LearnedReport,
) -> Result<(Vec<u8>, Option<RoundTripError>)> {
    let heads = permuted_heads(&p.name, arch, cfg);
    let codes = match p.ty {
        GgmlWriteType::F32 => None,
        _ => weights.learned_codes(p.hf)?,
    };
    if let Some(codes) = codes {
        let bytes = learned::learned_bytes(p.hf, &codes, p.ty, learned)?;
        return match heads {
            Some(heads) => Ok((
                permute_rows(&bytes, p.shape[0], heads)
                    .with_context(|| format!("{}: rope permutation", p.hf))?,
                None,
            )),
            None => Ok((bytes, None)),
        };
    }
    let t = weights.tensor(p.hf)?.to_dense(&Device::Cpu)?;
    let mut values: Vec<f32> = t.flatten_all()?.to_vec1()?;
    crate::quant::check_finite(p.hf, &values)?;
    if let Some(heads) = heads {
        values = permute_rows(&values, t.dims()[0], heads)
            .with_context(|| format!("{}: rope permutation", p.hf))?;
    }
    Ok(encode(&values, p.ty))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_llama_cpps_and_the_reader_undoes_it() {
        // 2 heads of 4 rows (d = 2), one value per row: within a head, rows [0 1 2 3] -> [0 2 1 3].
        let v: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(
            permute_rows(&v, 8, 2).unwrap(),
            vec![0., 2., 1., 3., 4., 6., 5., 7.]
        );
        assert!(permute_rows(&v, 8, 3).is_err());
    }

    #[test]
    fn types_follow_convert_hf_to_gguf() {
        let q = GgmlWriteType::Q4_0;
        assert_eq!(
            tensor_type("blk.0.attn_norm.weight", &[64], q).0,
            GgmlWriteType::F32
        );
        assert_eq!(
            tensor_type("blk.0.attn_q.bias", &[64], q).0,
            GgmlWriteType::F32
        );
        assert_eq!(tensor_type("blk.0.attn_q.weight", &[64, 64], q), (q, false));
        assert_eq!(
            tensor_type("blk.0.ffn_down.weight", &[64, 48], q),
            (GgmlWriteType::F16, true)
        );
        // Q4_K: rows of whole 256-value super-blocks; else Q5_0 (llama-quantize), else F16.
        let k = GgmlWriteType::Q4K;
        assert_eq!(tensor_type("output.weight", &[64, 512], k), (k, false));
        assert_eq!(
            tensor_type("output.weight", &[64, 96], k),
            (GgmlWriteType::Q5_0, true)
        );
        assert_eq!(
            tensor_type("output.weight", &[64, 48], k),
            (GgmlWriteType::F16, true)
        );
    }

    #[test]
    fn outtype_names_the_valid_ones() {
        let err = "q5_k".parse::<OutType>().unwrap_err().to_string();
        assert!(
            err.contains("q5_k") && err.contains(OutType::NAMES),
            "{err}"
        );
        assert_eq!("Q8_0".parse::<OutType>().unwrap(), OutType::Q8_0);
    }
}
