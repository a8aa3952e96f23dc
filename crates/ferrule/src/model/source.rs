//! Where a model comes from: a local Hugging Face folder, a GGUF file, or a hub id.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::Value;

use super::weights::Weights;

/// A model's config, weights and tokenizer, before any architecture is built.
pub struct ModelSource {
    /// The folder or file the model was read from.
    pub location: PathBuf,
    /// `config.json` (or its equivalent derived from GGUF metadata).
    pub config: Value,
    pub weights: Weights,
    /// `tokenizer.json`, or the tokenizer described by GGUF metadata.
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// The folder holding tokenizer/chat-template files, when there is one.
    pub dir: Option<PathBuf>,
}

impl ModelSource {
    /// Loads `spec`: a folder with `config.json`, a `.gguf` file, or a hub id (`org/name`,
    /// fetched into the hub cache; needs network access to the hub).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Self::from_dir(path, device);
        }
        if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
                return Self::from_gguf(path, device);
            }
            bail!("{spec}: expected a model folder (config.json + safetensors) or a .gguf file")
        }
        if is_hub_id(spec) {
            let dir = fetch_from_hub(spec).with_context(|| format!("{spec} is not a local path, and fetching it from the Hugging Face hub failed"))?;
            return Self::from_dir(&dir, device);
        }
        bail!("{spec}: no such file or folder")
    }

    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
        let config: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        super::config::family_of(&config).with_context(|| cfg_path.display().to_string())?;
        let weights = Weights::from_dir(dir, DType::F32, device)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| anyhow!("{}: {e}", tok_path.display()))?)
        } else {
            None
        };
        Ok(Self { location: dir.to_path_buf(), config, weights, tokenizer, dir: Some(dir.to_path_buf()) })
    }

    pub fn from_gguf(path: &Path, device: &Device) -> Result<Self> {
        let g = super::gguf::load_gguf(path, device)?;
        let tensors = g.tensors;
        Ok(Self {
            location: path.to_path_buf(),
            config: g.config,
            weights: Weights::new(tensors, path),
            tokenizer: Some(g.tokenizer),
            dir: None,
        })
    }

    pub fn model_type(&self) -> &str {
        self.config.get("model_type").and_then(Value::as_str).unwrap_or("?")
    }
}

fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// Downloads config, tokenizer and weights of a hub repository into the local HF cache.
fn fetch_from_hub(id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::Api::new()?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json")?;
    for optional in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
        let _ = repo.get(optional);
    }
    if repo.get("model.safetensors").is_err() {
        let index = repo.get("model.safetensors.index.json")?;
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
        let mut shards: Vec<String> = json["weight_map"].as_object().map(|m| m.values().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default();
        shards.sort();
        shards.dedup();
        for s in shards {
            repo.get(&s)?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}
