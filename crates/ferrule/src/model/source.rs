//! Where a model comes from: a local Hugging Face folder, a GGUF file, or a hub id.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use serde_json::Value;

use super::weights::Weights;
use crate::ops::ComputeDtype;
use crate::quant::QuantSpec;

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
    /// The model's chat template (tokenizer_config.json, chat_template.jinja, or GGUF metadata).
    pub chat_template: Option<crate::data::ChatTemplate>,
    /// Special tokens from tokenizer_config.json (or GGUF metadata).
    pub tokenizer_config: Option<crate::data::TokenizerConfig>,
    /// The decoding defaults of generation_config.json, when the folder has one.
    pub generation_config: Option<crate::generate::GenerationConfig>,
}

/// How a model's weights are loaded.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions<'a> {
    /// Quantize the linear weights of a safetensors checkpoint while reading it (`--quantize`).
    pub quantize: Option<&'a QuantSpec>,
    /// The frozen matrices' compute dtype: dense ones are held in it, quantized ones
    /// dequantize to it ([`crate::ops::compute_dtype`]).
    pub compute_dtype: ComputeDtype,
    /// Grow the token embeddings to the tokenizer (`--resize-token-embeddings`) instead of
    /// refusing tokens past them.
    pub resize_token_embeddings: bool,
    /// Read the frozen matrices in place from the memory-mapped checkpoint, paged in for each
    /// use and dropped after it (`--stream-base`, [`super::stream`]), instead of copying them.
    pub stream_base: bool,
    /// With `stream_base`: keep as many of the streamed matrices resident as fit in this many
    /// bytes of frozen base (`--max-resident-gb`, [`super::residency`]); too few to stream at
    /// all is an error naming the least. `None`: nothing kept (plain `--stream-base`).
    pub max_resident: Option<usize>,
}

impl<'a> LoadOptions<'a> {
    /// f32, quantized as `quantize` says.
    pub fn quantized(quantize: Option<&'a QuantSpec>) -> Self {
        Self {
            quantize,
            ..Self::default()
        }
    }

    /// For a command that reads each weight about once (merge, export): f32, quantized as
    /// `quantize` says, and a model folder `spec` memory-mapped as `stream_base` maps it
    /// unless it is quantized while loading, so that only the weights in use are resident.
    pub fn read_once(quantize: Option<&'a QuantSpec>, spec: &str) -> Self {
        Self {
            quantize,
            stream_base: quantize.is_none() && Path::new(spec).is_dir(),
            ..Self::default()
        }
    }
}

impl ModelSource {
    /// The model's context in positions (`max_position_embeddings`), when its config gives one.
    pub fn context(&self) -> Option<usize> {
        self.config
            .get("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    }

    /// Loads `spec`: a folder with `config.json`, a `.gguf` file, or a hub id (`org/name`,
    /// fetched into the hub cache; needs network access to the hub).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        Self::load_with(spec, device, LoadOptions::default())
    }

    /// [`ModelSource::load`] with `options`: the linear weights of a safetensors checkpoint
    /// quantized while reading it, the compute dtype, and the token embeddings grown to the
    /// tokenizer's size where its tokens run past them
    /// ([`ModelSource::resize_token_embeddings`]) instead of the error that names those
    /// tokens. A GGUF file or a bitsandbytes checkpoint is already quantized and keeps its own
    /// format; asking to quantize it again is an error.
    pub fn load_with(spec: &str, device: &Device, options: LoadOptions) -> Result<Self> {
        let mut source = Self::open(spec, device, options)?;
        if options.resize_token_embeddings {
            source.resize_token_embeddings()?;
        }
        Ok(source)
    }

    fn open(spec: &str, device: &Device, options: LoadOptions) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Self::read_dir(path, device, options);
        }
        if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
                if options.quantize.is_some() {
                    bail!("{spec}: a GGUF file is already quantized and is trained in its own blocks; drop --quantize")
                }
                if options.stream_base {
                    bail!("{spec}: --stream-base maps safetensors folders (f32/f16/bf16, or the NF4/FP4 folder `ferrule quantize` writes); a GGUF file is not streamed yet (its q/k rows are reordered while loading). Drop --stream-base, or stream the safetensors model")
                }
                return Self::from_gguf(path, device, options.compute_dtype);
            }
            bail!("{spec}: expected a model folder (config.json + safetensors) or a .gguf file")
        }
        if is_hub_id(spec) {
            let dir = fetch_from_hub(spec).with_context(|| {
                format!(
                    "{spec} is not a local path, and fetching it from the Hugging Face hub failed"
                )
            })?;
            return Self::read_dir(&dir, device, options);
        }
        bail!("{spec}: no such file or folder")
    }

    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_dir_with(dir, device, LoadOptions::default())
    }

    pub fn from_dir_with(dir: &Path, device: &Device, options: LoadOptions) -> Result<Self> {
        Self::read_dir(dir, device, options)
    }

    fn read_dir(dir: &Path, device: &Device, options: LoadOptions) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            bail!("{}", missing_config(dir))
        }
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let config: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        super::config::check(&config).with_context(|| cfg_path.display().to_string())?;
        crate::quant::bnb_format::spec_from_config(&config)
            .with_context(|| cfg_path.display().to_string())?;
        if options.max_resident.is_some() && !options.stream_base {
            bail!("{}: a resident-memory budget (--max-resident-gb) bounds a base streamed from disk; it needs stream_base", dir.display())
        }
        let weights = Weights::load_dir_with(
            dir,
            options.compute_dtype,
            device,
            options.quantize,
            options.stream_base,
        )?;
        if let Some(budget) = options.max_resident {
            super::residency::keep_resident(&weights, budget, "--max-resident-gb")
                .with_context(|| dir.display().to_string())?;
        }
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(crate::data::load_tokenizer(dir)?)
        } else {
            None
        };
        let chat_template = crate::data::ChatTemplate::from_model_dir(dir)?;
        let tokenizer_config = crate::data::TokenizerConfig::from_model_dir(dir)?;
        let vocab_size = config
            .get("vocab_size")
            .and_then(Value::as_u64)
            .unwrap_or(u32::MAX as u64) as usize; // checked above
        let generation_config = crate::generate::GenerationConfig::from_model_dir(dir, vocab_size)?;
        if let Some(t) = &tokenizer {
            if !options.resize_token_embeddings {
                check_token_ids(t, vocab_size, dir)?;
            }
            warn_unknown_special_tokens(t, tokenizer_config.as_ref());
        }
        Ok(Self {
            location: dir.to_path_buf(),
            config,
            weights,
            tokenizer,
            dir: Some(dir.to_path_buf()),
            chat_template,
            tokenizer_config,
            generation_config,
        })
    }

    pub fn from_gguf(path: &Path, device: &Device, compute_dtype: ComputeDtype) -> Result<Self> {
        Self::from_gguf_model(
            path,
            super::gguf::load_gguf_quantized(path, device)?,
            compute_dtype,
        )
    }

    /// The model a loaded GGUF checkpoint `g` (of the file `path`) describes; with
    /// [`super::gguf::load_gguf_metadata`]'s `g`, a source without weights whose tensors are
    /// read from the file one at a time.
    pub fn from_gguf_model(
        path: &Path,
        g: super::gguf::GgufModel,
        compute_dtype: ComputeDtype,
    ) -> Result<Self> {
        let chat_template = match &g.chat_template {
            Some(src) => Some(crate::data::ChatTemplate::new(
                src.clone(),
                g.bos_token.as_deref(),
                g.eos_token.as_deref(),
            )?),
            None => None,
        };
        let tokenizer_config = Some(crate::data::TokenizerConfig {
            bos_token: g.bos_token.clone(),
            eos_token: g.eos_token.clone(),
            chat_template: g.chat_template.clone(),
            ..Default::default()
        });
        super::config::check(&g.config)
            .with_context(|| format!("{}: the config derived from its metadata", path.display()))?;
        Ok(Self {
            location: path.to_path_buf(),
            config: g.config,
            weights: Weights::with_quantized(g.tensors, g.quantized, path)
                .with_compute_dtype(compute_dtype)?,
            tokenizer: Some(g.tokenizer),
            dir: None,
            chat_template,
            tokenizer_config,
            generation_config: None,
        })
    }

    /// The tokenizer, or an error naming where it was expected.
    pub fn tokenizer(&self) -> Result<&tokenizers::Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| anyhow!("{}: no tokenizer.json", self.location.display()))
    }

    /// Padding id: pad token, else eos, else 0 (as transformers' collators fall back).
    pub fn pad_token_id(&self) -> Result<u32> {
        Ok(crate::data::pad_token_id(
            self.tokenizer()?,
            self.tokenizer_config.as_ref(),
        ))
    }

    /// End-of-sequence ids: config.json's `eos_token_id`(s) (typed and checked when the model
    /// loaded), then generation_config.json's, then the tokenizer's `eos_token`. transformers'
    /// `generate` stops on the first two; the tokenizer's is added because chat models end a
    /// turn with it.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = match super::config::family_of(&self.config) {
            Ok(super::config::Family::Decoder) => {
                super::config::DecoderConfig::from_json(&self.config)
                    .map(|c| c.eos_token_ids)
                    .unwrap_or_default()
            }
            _ => vec![],
        };
        let more = self
            .generation_config
            .iter()
            .flat_map(|g| g.eos_token_ids.iter().copied());
        let tokenizer_eos = self
            .tokenizer
            .as_ref()
            .and_then(|t| crate::data::eos_token_id(t, self.tokenizer_config.as_ref()));
        for id in more.chain(tokenizer_eos) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// transformers' `model.resize_token_embeddings(len(tokenizer))`, for a tokenizer that holds
    /// more tokens than the embedding has rows (tokens added to it): the token embedding, and
    /// an output head that is not tied to it, grow to the tokenizer's size, the new rows the
    /// mean of the old ([`Weights::grow_rows`]), and `vocab_size` in the config with them.
    /// Returns `(rows before, rows after)`; a tokenizer that fits changes nothing (the table
    /// never shrinks, where transformers' would to `len(tokenizer)`).
    pub fn resize_token_embeddings(&mut self) -> Result<Option<(usize, usize)>> {
        let Some(tokenizer) = &self.tokenizer else {
            return Ok(None);
        };
        let needed = tokenizer_rows(tokenizer);
        let rows = self
            .config
            .get("vocab_size")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        if needed <= rows {
            return Ok(None);
        }
        let names: Vec<&str> = match super::config::family_of(&self.config)? {
            super::config::Family::Decoder => {
                let tied = self.config.get("tie_word_embeddings") == Some(&Value::Bool(true));
                let mut names = vec!["model.embed_tokens.weight"];
                if !tied && self.weights.contains("lm_head.weight") {
                    names.push("lm_head.weight");
                }
                names
            }
            super::config::Family::Bert => [
                "embeddings.word_embeddings.weight",
                "bert.embeddings.word_embeddings.weight",
            ]
            .into_iter()
            .filter(|n| self.weights.contains(n))
            .collect(),
        };
        for name in names {
            self.weights.grow_rows(name, needed).with_context(|| {
                format!(
                    "{}: resizing the token embeddings to the tokenizer's {needed} tokens",
                    self.location.display()
                )
            })?;
        }
        self.config["vocab_size"] = Value::from(needed);
        tracing::info!(
            "token embeddings resized from {rows} to {needed} rows (the tokenizer's size); the {} new rows start as the mean of the old",
            needed - rows
        );
        Ok(Some((rows, needed)))
    }

    pub fn model_type(&self) -> &str {
        self.config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("?")
    }
}

/// Why a folder without `config.json` is no model folder, and what to pass instead: the `.gguf`
/// files it holds, if any.
fn missing_config(dir: &Path) -> String {
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().and_then(|e| e.to_str()) == Some("gguf"))
        .collect();
    ggufs.sort();
    let base = format!(
        "{}: no config.json, so this is no Hugging Face model folder (config.json + safetensors)",
        dir.display()
    );
    match ggufs.as_slice() {
        [] => base,
        [one] => format!(
            "{base}; it holds a GGUF file: pass --model {}",
            one.display()
        ),
        many => {
            let names: Vec<String> = many.iter().map(|p| p.display().to_string()).collect();
            format!(
                "{base}; it holds GGUF files: pass one of them as --model ({})",
                names.join(", ")
            )
        }
    }
}

fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Without the `hub` feature there is no hub client.
#[cfg(not(feature = "hub"))]
fn fetch_from_hub(_id: &str) -> Result<PathBuf> {
    bail!("this build has no Hugging Face hub support; rebuild with `--features hub`, or pass a local folder or .gguf file")
}

/// Downloads config, tokenizer and weights of a hub repository into the local HF cache.
#[cfg(feature = "hub")]
fn fetch_from_hub(id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::Api::new()?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json")?;
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        let _ = repo.get(optional);
    }
    if repo.get("model.safetensors").is_err() {
        let index = repo.get("model.safetensors.index.json")?;
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
        let mut shards: Vec<String> = json["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for s in shards {
            repo.get(&s)?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The rows an embedding needs for every id of `tokenizer` (transformers' `len(tokenizer)`
/// where ids are dense): its largest id plus one.
fn tokenizer_rows(tokenizer: &tokenizers::Tokenizer) -> usize {
    let vocab = tokenizer.get_vocab(true);
    vocab.values().max().map_or(0, |&m| m as usize + 1)
}

/// Every token id must index a row of the embedding table. Tokens added to a tokenizer
/// (`tokenizer.add_tokens`) without resizing the model's embeddings get ids past its last row,
/// which would fail deep inside the first forward pass that meets one.
fn check_token_ids(tokenizer: &tokenizers::Tokenizer, rows: usize, dir: &Path) -> Result<()> {
    let vocab = tokenizer.get_vocab(true);
    let mut beyond: Vec<(u32, &String)> = vocab
        .iter()
        .filter(|(_, &id)| id as usize >= rows)
        .map(|(t, &id)| (id, t))
        .collect();
    if beyond.is_empty() {
        return Ok(());
    }
    beyond.sort();
    let (first_id, first) = beyond[0];
    let tokenizer_size = tokenizer_rows(tokenizer);
    let others = match beyond.len() {
        1 => String::new(),
        n => format!(
            " (and {} more token{} past it)",
            n - 1,
            if n == 2 { "" } else { "s" }
        ),
    };
    bail!(
        "{}: token {first:?} has id {first_id}{others}, but the model's embedding has {rows} rows \
         (config.json vocab_size {rows}) and the tokenizer needs {tokenizer_size}: the tokens were \
         added to the tokenizer without resizing the embeddings. To train them, pass \
         --resize-token-embeddings and list their ids in --trainable-token-indices (LoRA); or \
         resize them and save the model (transformers: \
         model.resize_token_embeddings(len(tokenizer)), then save_pretrained), or use the \
         tokenizer the model was saved with",
        dir.join("tokenizer.json").display()
    )
}

/// A special token that tokenizer_config.json names but tokenizer.json does not hold is never
/// produced or recognised; ferrule falls back (padding with eos, then id 0), so say so.
fn warn_unknown_special_tokens(
    tokenizer: &tokenizers::Tokenizer,
    config: Option<&crate::data::TokenizerConfig>,
) {
    let Some(c) = config else { return };
    let named = [
        ("bos_token", &c.bos_token),
        ("eos_token", &c.eos_token),
        ("pad_token", &c.pad_token),
        ("unk_token", &c.unk_token),
    ];
    for (key, token) in named {
        if let Some(t) = token
            .as_deref()
            .filter(|t| tokenizer.token_to_id(t).is_none())
        {
            let file = c
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "tokenizer_config.json".into());
            tracing::warn!(
                "{file}: {key} {t:?} is not in tokenizer.json's vocabulary; it is ignored"
            );
        }
    }
}
