//! Merging an adapter into its base: a standalone Hugging Face model folder (config,
//! tokenizer, `model.safetensors`) that transformers loads without peft.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::{json, Value};

use crate::model::{ModelSource, Task};
use crate::tuners::Tuner;

/// Tokenizer-side files copied from a model folder when present.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.txt",
    "merges.txt", "vocab.json", "generation_config.json", "added_tokens.json",
];

/// What a merge changed, for the user to check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    pub merged_modules: usize,
    pub replaced_tensors: usize,
    pub tensors_written: usize,
}

/// The base weights with `W' = W + ΔW` applied for every adapted module and the
/// `modules_to_save` copies put in place, under the tensor names of the task's HF class.
pub fn merged_tensors(source: &ModelSource, tuner: &dyn Tuner, task: Task) -> Result<(BTreeMap<String, Tensor>, Value, MergeReport)> {
    let mut config = source.config.clone();
    let model_type = source.model_type().to_string();
    // A bare encoder checkpoint gains the `bert.` prefix of BertForSequenceClassification.
    let prefix = if task == Task::SeqCls && model_type == "bert" && !source.weights.names().any(|n| n.starts_with("bert.")) { "bert." } else { "" };
    let mut tensors: BTreeMap<String, Tensor> = source
        .weights
        .tensors()
        .iter()
        .filter(|(_, t)| t.dtype().is_float())
        .map(|(k, t)| (format!("{prefix}{k}"), t.clone()))
        .collect();
    let mut report = MergeReport { merged_modules: 0, replaced_tensors: 0, tensors_written: 0 };
    for (name, delta) in tuner.deltas()? {
        let base = match tensors.get(&name) {
            Some(t) => t.clone(),
            // A tied head that was adapted gets its own weight: untie it.
            None if name == "lm_head.weight" => {
                let embed = tensors.get("model.embed_tokens.weight").context("tied lm_head without model.embed_tokens.weight")?.clone();
                config["tie_word_embeddings"] = json!(false);
                embed
            }
            None => bail!("merge: the adapter changes {name:?}, which the base checkpoint does not have"),
        };
        if base.dims() != delta.dims() {
            bail!("merge: {name:?} has shape {:?} but the adapter's update has {:?}", base.dims(), delta.dims())
        }
        tensors.insert(name, (base + delta.to_dtype(candle_core::DType::F32)?)?);
        report.merged_modules += 1;
    }
    for (name, t) in tuner.replaced() {
        tensors.insert(name, t);
        report.replaced_tensors += 1;
    }
    let arch = match (model_type.as_str(), task) {
        ("bert", Task::SeqCls) => "BertForSequenceClassification",
        ("bert", _) => "BertModel",
        ("mistral", _) => "MistralForCausalLM",
        ("qwen2", _) => "Qwen2ForCausalLM",
        _ => "LlamaForCausalLM",
    };
    config["architectures"] = json!([arch]);
    config["dtype"] = json!("float32");
    if let Value::Object(o) = &mut config {
        o.remove("torch_dtype");
    }
    if task == Task::SeqCls {
        if let Some(t) = tensors.get("classifier.weight") {
            config["num_labels"] = json!(t.dim(0)?);
            let n = t.dim(0)?;
            config["id2label"] = json!((0..n).map(|i| (i.to_string(), format!("LABEL_{i}"))).collect::<BTreeMap<_, _>>());
            config["label2id"] = json!((0..n).map(|i| (format!("LABEL_{i}"), i)).collect::<BTreeMap<_, _>>());
        }
    }
    report.tensors_written = tensors.len();
    Ok((tensors, config, report))
}

/// Writes the merged model to `out`: built in `<out>.tmp`, then renamed, so a failed merge
/// leaves no half-written folder. Refuses to overwrite an existing folder.
pub fn merge_to_dir(source: &ModelSource, tuner: &dyn Tuner, task: Task, out: &Path) -> Result<MergeReport> {
    if out.exists() {
        bail!("{}: already exists; choose a new output folder", out.display())
    }
    let (tensors, config, report) = merged_tensors(source, tuner, task)?;
    let tmp = out.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    crate::peft_io::write_safetensors(&tmp.join("model.safetensors"), &list, &[("format", "pt")])?;
    crate::util::atomic::write_bytes_atomic(&tmp.join("config.json"), (serde_json::to_string_pretty(&config)? + "\n").as_bytes())?;
    match &source.dir {
        Some(dir) => {
            for f in TOKENIZER_FILES {
                let p = dir.join(f);
                if p.is_file() {
                    std::fs::copy(&p, tmp.join(f)).with_context(|| format!("copying {}", p.display()))?;
                }
            }
        }
        None => write_tokenizer_files(source, &tmp)?,
    }
    crate::util::atomic::sync_dir(&tmp)?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(report)
}

/// For a GGUF base: `tokenizer.json` and `tokenizer_config.json` from its metadata.
fn write_tokenizer_files(source: &ModelSource, dir: &Path) -> Result<()> {
    let tok = source.tokenizer()?;
    tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("writing tokenizer.json: {e}"))?;
    let mut cfg = serde_json::Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    if let Some(tc) = &source.tokenizer_config {
        if let Some(b) = &tc.bos_token {
            cfg.insert("bos_token".into(), json!(b));
        }
        if let Some(e) = &tc.eos_token {
            cfg.insert("eos_token".into(), json!(e));
            cfg.insert("pad_token".into(), json!(tc.pad_token.clone().unwrap_or_else(|| e.clone())));
        }
        if let Some(t) = &tc.chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
    }
    crate::util::atomic::write_bytes_atomic(&dir.join("tokenizer_config.json"), (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes())?;
    Ok(())
}
