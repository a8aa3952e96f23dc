//! A PEFT LoRA adapter as llama.cpp's LoRA GGUF, as `convert_lora_to_gguf.py` writes it:
//! `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (f32), and per
//! adapted weight `<gguf name>.lora_a` (PEFT's `lora_A`, `[r, in]`, stored `ne = [in, r]`) and
//! `<gguf name>.lora_b` (`lora_B`, `[out, r]`, `ne = [r, out]`), `lora_b`'s rows permuted like
//! the base weight's for q/k of architecture `llama`.
//!
//! llama.cpp scales each update by `alpha / r`, `r` read from the tensors. Where PEFT's scale
//! differs (`use_rslora`, an `alpha_pattern` entry), ferrule folds the ratio into `lora_b` so
//! that llama.cpp computes PEFT's `scale · B·A`; convert_lora_to_gguf.py writes such adapters
//! with the plain `alpha / r` scale instead.
//!
//! llama.cpp applies LoRA to linear weights only: DoRA, LoRA biases, `modules_to_save`,
//! trainable tokens, embedding LoRA, residual initialisations (PiSSA, OLoRA, which change the
//! base) and other methods are refused by name.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use super::writer::{MetaValue, TensorInfo};
use super::{
    claim_output, encode, gguf_arch, gguf_name, permuted_heads, tensor_type, worst,
    GgufExportOptions, GgufExportReport, OutType,
};
use crate::model::config::DecoderConfig;
use crate::model::gguf::Arch;
use crate::model::ModelSource;
use crate::tuners::lora::config::{InitLoraWeights, LoraConfig};

/// One adapted weight: its GGUF base name, PEFT's A and B, and the factor folded into B.
struct Pair {
    gguf: String,
    a: Tensor,
    b: Tensor,
    b_factor: f64,
}

/// The reasons llama.cpp cannot apply an adapter, checked before anything is written.
fn refuse_unsupported(cfg: &LoraConfig, dir: &Path) -> Result<()> {
    let d = dir.display();
    let why = if cfg.use_dora {
        Some("use_dora (DoRA rescales each row after the update; llama.cpp adds B·A only)")
    } else if cfg.lora_bias {
        Some("lora_bias (llama.cpp's LoRA has no bias term)")
    } else if cfg.bias != "none" {
        Some("bias other than \"none\" (trained base biases are not part of llama.cpp's LoRA)")
    } else if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        Some("modules_to_save (whole trained modules are not part of llama.cpp's LoRA)")
    } else if cfg.trainable_token_indices.is_some() {
        Some("trainable_token_indices (trained embedding rows are not part of llama.cpp's LoRA)")
    } else if matches!(&cfg.init_lora_weights, InitLoraWeights::Named(n) if n != "gaussian") {
        Some("a residual init_lora_weights (PiSSA / OLoRA change the base weights, which llama.cpp loads unchanged)")
    } else {
        None
    };
    match why {
        Some(w) => bail!(
            "{d}: this LoRA adapter uses {w}, so llama.cpp cannot load it as an adapter; merge it into the model instead (ferrule export gguf --model M --adapter A, without --adapter-only)"
        ),
        None => Ok(()),
    }
}

/// The adapted weights of a PEFT LoRA adapter, keyed by module path.
fn lora_pairs(
    tensors: &std::collections::HashMap<String, Tensor>,
    cfg: &LoraConfig,
    dir: &Path,
    source: &ModelSource,
    dcfg: &DecoderConfig,
) -> Result<Vec<Pair>> {
    let arch = gguf_arch(source)?;
    let patterns = cfg.patterns()?;
    let alpha = cfg.lora_alpha;
    let mut by_module: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (key, t) in tensors {
        let stripped = key.strip_prefix("base_model.model.").unwrap_or(key);
        if stripped.contains("lora_embedding_") {
            bail!("{}: {key}: LoRA on the token embeddings is not exported to GGUF yet; merge the adapter into the model instead", dir.display())
        }
        let (module, is_a) = if let Some(m) = stripped.strip_suffix(".lora_A.weight") {
            (m, true)
        } else if let Some(m) = stripped.strip_suffix(".lora_B.weight") {
            (m, false)
        } else {
            bail!(
                "{}: tensor {key:?} is not a lora_A / lora_B weight; llama.cpp's LoRA GGUF holds those only",
                dir.display()
            )
        };
        let slot = by_module.entry(module.to_string()).or_default();
        if is_a {
            slot.0 = Some(t.clone());
        } else {
            slot.1 = Some(t.clone());
        }
    }
    let mut pairs = Vec::new();
    for (module, (a, b)) in by_module {
        let (Some(a), Some(b)) = (a, b) else {
            bail!(
                "{}: {module} has only one of lora_A / lora_B",
                dir.display()
            )
        };
        let hf = format!("{module}.weight");
        if hf == "lm_head.weight" && !source.weights.names().iter().any(|n| n == "lm_head.weight") {
            // convert_lora_to_gguf.py: "lm_head is present in adapter, but is ignored in base model".
            bail!("{}: the adapter changes lm_head, but the base ties it to the embeddings (llama.cpp has no separate output weight to apply it to); merge the adapter into the model instead", dir.display())
        }
        let gguf = gguf_name(&hf, arch, dcfg.num_hidden_layers)
            .with_context(|| format!("{}: adapted module {module}", dir.display()))?;
        let (r, in_a) = a.dims2()?;
        let (out_b, r_b) = b.dims2()?;
        if r != r_b {
            bail!(
                "{}: {module}: lora_A has rank {r}, lora_B has {r_b}",
                dir.display()
            )
        }
        if let Some(base) = source.weights.tensors().get(&hf) {
            if base.dims() != [out_b, in_a] {
                bail!("{}: {module}: the update is [{out_b}, {in_a}] but the base weight {hf} is {:?}", dir.display(), base.dims())
            }
        }
        let ra = cfg.rank_and_alpha(&patterns, &module);
        let peft_scale = cfg.scaling(r, ra.alpha);
        let b_factor = peft_scale * r as f64 / alpha;
        pairs.push(Pair {
            gguf,
            a,
            b,
            b_factor,
        });
    }
    if pairs.is_empty() {
        bail!(
            "{}: the adapter holds no lora_A / lora_B weights",
            dir.display()
        )
    }
    Ok(pairs)
}

/// The LoRA adapter in `dir`: its checked config and tensors. Another method is an error that
/// says what to do instead.
fn read_lora(dir: &Path) -> Result<(LoraConfig, HashMap<String, Tensor>)> {
    let saved = crate::peft_io::load_adapter(dir, &Device::Cpu)?;
    if saved.peft_type() != "LORA" {
        bail!(
            "{}: a {} adapter; llama.cpp loads LoRA adapters only (adapter.type \"lora\"). Merge it into the model instead: ferrule export gguf --model M --adapter A, without --adapter-only (a DyLoRA adapter: write it at a rank as LoRA first, ferrule export lora --rank B)",
            dir.display(),
            saved.peft_type()
        )
    }
    let cfg: LoraConfig = serde_json::from_value(saved.config.clone())
        .with_context(|| format!("{}: adapter_config.json", dir.display()))?;
    cfg.validate()
        .with_context(|| format!("{}: adapter_config.json", dir.display()))?;
    refuse_unsupported(&cfg, dir)?;
    Ok((cfg, saved.tensors))
}

/// convert_lora_to_gguf.py's keys: the base architecture, the adapter type and α.
fn adapter_metadata(arch: Arch, cfg: &LoraConfig) -> Vec<(String, MetaValue)> {
    vec![
        (
            "general.architecture".to_string(),
            MetaValue::Str(arch.name().into()),
        ),
        ("general.type".to_string(), MetaValue::Str("adapter".into())),
        ("adapter.type".to_string(), MetaValue::Str("lora".into())),
        (
            "adapter.lora.alpha".to_string(),
            MetaValue::F32(cfg.lora_alpha as f32),
        ),
        (
            "general.quantization_version".to_string(),
            MetaValue::U32(super::QUANTIZATION_VERSION),
        ),
    ]
}

/// `<name>.lora_a` and `.lora_b` of every pair, typed on the base name (".weight"), as
/// convert_hf_to_gguf.py chooses; with the names that fell back to F16.
fn tensor_infos(pairs: &[Pair], outtype: OutType) -> (Vec<TensorInfo>, Vec<String>) {
    let mut infos = Vec::new();
    let mut fallback = Vec::new();
    for p in pairs {
        for (suffix, t) in [("lora_a", &p.a), ("lora_b", &p.b)] {
            let name = format!("{}.{suffix}", p.gguf);
            let shape = t.dims().to_vec();
            let (ty, fell_back) = tensor_type(&p.gguf, &shape, outtype.tensor_type());
            if fell_back {
                fallback.push(name.clone());
            }
            infos.push(TensorInfo { name, shape, ty });
        }
    }
    (infos, fallback)
}

/// The encoded bytes of a pair's A, or of its B (`is_b`: scaled by `b_factor`, its rows
/// rope-permuted like the base weight's for `llama`).
fn factor_bytes(
    p: &Pair,
    is_b: bool,
    info: &TensorInfo,
    arch: Arch,
    dcfg: &DecoderConfig,
) -> Result<(Vec<u8>, Option<crate::quant::RoundTripError>)> {
    let t = if is_b { &p.b } else { &p.a };
    let mut values: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    crate::quant::check_finite(&info.name, &values)?;
    if is_b {
        if p.b_factor != 1.0 {
            values.iter_mut().for_each(|v| *v *= p.b_factor as f32);
        }
        if let Some(heads) = permuted_heads(&p.gguf, arch, dcfg) {
            values = super::permute_rows(&values, t.dims()[0], heads)
                .with_context(|| format!("{}: rope permutation", info.name))?;
        }
    }
    Ok(encode(&values, info.ty))
}

/// Writes the LoRA adapter in `adapter_dir`, trained on `source`, as a llama.cpp LoRA GGUF.
pub fn export_lora_gguf(
    source: &ModelSource,
    adapter_dir: &Path,
    out: &Path,
    options: GgufExportOptions,
) -> Result<GgufExportReport> {
    claim_output(out, options.overwrite)?;
    if matches!(
        options.outtype,
        OutType::Q4_0 | OutType::Q4_1 | OutType::Q4K
    ) {
        bail!(
            "--outtype {}: a LoRA GGUF is written as f32, f16 or q8_0 (convert_lora_to_gguf.py's choices)",
            options.outtype.name()
        )
    }
    let arch = gguf_arch(source)?;
    let (cfg, tensors) = read_lora(adapter_dir)?;
    let dcfg = DecoderConfig::from_json(&source.config)
        .with_context(|| format!("{}: config", source.location.display()))?;
    let pairs = lora_pairs(&tensors, &cfg, adapter_dir, source, &dcfg)?;
    let metadata = adapter_metadata(arch, &cfg);
    let (infos, fallback) = tensor_infos(&pairs, options.outtype);
    let mut max_error = None;
    super::writer::write_gguf(out, &metadata, &infos, |i| {
        let (bytes, err) = factor_bytes(&pairs[i / 2], i % 2 == 1, &infos[i], arch, &dcfg)?;
        max_error = worst(max_error, err);
        Ok(bytes)
    })?;
    let tensor_types = super::writer::count_types(&infos);
    Ok(GgufExportReport {
        architecture: arch.name().into(),
        kind: "adapter".into(),
        outtype: options.outtype.name().into(),
        tensors: infos.len(),
        tensor_types,
        f16_fallback: fallback,
        q5_0_fallback: Vec::new(),
        max_error,
        tokenizer_pre: None,
        tokenizer_pre_recognised: None,
        merged_modules: None,
        sliding_window_dropped: None,
        learned: None,
        bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
    })
}
