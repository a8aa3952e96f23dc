//! Loading llama.cpp GGUF checkpoints as Hugging Face-layout models.
//!
//! A GGUF file carries everything a `config.json` + `tokenizer.json` + `*.safetensors` checkpoint
//! does, under llama.cpp's names and layouts. This module translates it:
//!
//! * metadata (`llama.block_count`, ...) becomes an HF `config.json` value,
//! * tensors (`blk.N.attn_q.weight`, ...) get their HF names (`model.layers.N.self_attn.q_proj.weight`)
//!   and HF layout: llama.cpp's converter permutes the rows of `q_proj` / `k_proj` for llama-family
//!   models (its rope pairs dimension `2i` with `2i+1`, HF pairs `i` with `i + head_dim/2`), which we
//!   undo exactly as transformers' `reverse_permute` does,
//! * `tokenizer.ggml.*` becomes a [`tokenizers::Tokenizer`], built the way transformers' GGUF
//!   loader builds it.
//!
//! Tensor data is read per tensor: [`GgufFile::qtensor`] yields a still-quantized [`QTensor`]
//! already in HF layout (the row permutation is applied to whole rows of quantization blocks, so it
//! needs no dequantization), and [`load_gguf`] dequantizes each one to f32 on top of that.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::{json, Value as Json};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Everything that can go wrong reading a GGUF file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read file: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (starts with {magic:?}, a GGUF file starts with \"GGUF\")")]
    NotGguf { path: PathBuf, magic: String },
    #[error("{path}: truncated or corrupt GGUF file: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{path}: unsupported GGUF architecture {arch:?} (general.architecture); supported: llama, mistral, qwen2"
    )]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error(
        "{path}: tensor {tensor:?} has GGUF type {ggml_type} (type id {type_id}), which candle cannot dequantize"
    )]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        ggml_type: String,
        type_id: u32,
    },
    #[error("{path}: missing required metadata key {key:?}")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key {key:?}: {detail}")]
    BadMetadata {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error("{path}: unknown tensor name {name:?} (no Hugging Face equivalent for {arch:?})")]
    UnknownTensor {
        path: PathBuf,
        name: String,
        arch: String,
    },
    #[error("{path}: missing tensor {name:?}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {tensor:?}: {detail}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        detail: String,
    },
    #[error("{path}: unsupported tokenizer model {model:?} (tokenizer.ggml.model); supported: gpt2 (byte-level BPE)")]
    UnsupportedTokenizer { path: PathBuf, model: String },
    #[error("{path}: cannot build tokenizer: {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    #[error("{path}: tensor {tensor:?}: {source}")]
    Candle {
        path: PathBuf,
        tensor: String,
        #[source]
        source: Box<candle_core::Error>,
    },
}

/// A GGUF checkpoint translated to Hugging Face names, layout and config.
#[derive(Clone)]
pub struct GgufModel {
    /// The equivalent Hugging Face `config.json`.
    pub config: Json,
    /// Tensors under HF names, dequantized to f32, in HF layout (q/k rows un-permuted).
    pub tensors: HashMap<String, Tensor>,
    /// With [`load_gguf_quantized`]: the 2-D block-quantized tensors, kept in their blocks (HF
    /// names and layout); they are then absent from `tensors`.
    pub quantized: HashMap<String, std::sync::Arc<dyn crate::quant::QuantMatrix>>,
    /// Built from the `tokenizer.ggml.*` metadata.
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template`, when the file has one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// GGUF tensor types (llama.cpp spelling, e.g. `Q4_1`) with how many tensors have each,
    /// most common first.
    pub tensor_types: Vec<(String, usize)>,
}

impl fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufModel")
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("tensor_types", &self.tensor_types)
            .finish_non_exhaustive()
    }
}

/// Loads a GGUF checkpoint: config, tokenizer, and every tensor dequantized to f32 on `device`.
pub fn load_gguf(path: &Path, device: &Device) -> Result<GgufModel, GgufError> {
    load(path, device, false)
}

/// Loads a GGUF checkpoint keeping its block-quantized matrices (Q4_1, Q8_0, the k-quants...)
/// in their blocks; F32/F16/BF16 and 1-D tensors are read as f32 tensors.
pub fn load_gguf_quantized(path: &Path, device: &Device) -> Result<GgufModel, GgufError> {
    load(path, device, true)
}

fn load(path: &Path, device: &Device, keep_quantized: bool) -> Result<GgufModel, GgufError> {
    let file = GgufFile::open(path)?;
    let config = file.hf_config()?;
    let tok = file.tokenizer()?;
    let mut tensors = HashMap::with_capacity(file.entries.len());
    let mut quantized: HashMap<String, std::sync::Arc<dyn crate::quant::QuantMatrix>> = HashMap::new();
    for entry in &file.entries {
        // One tensor at a time so that only one extra copy is alive.
        let q = file.qtensor_of(entry, &Device::Cpu)?;
        let is_blocks = !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if let (true, true, [rows, cols]) = (keep_quantized, is_blocks, q.shape().dims()) {
            let data = q.data().map_err(|e| file.candle_err(&entry.gguf_name, e))?;
            let m = crate::quant::ggml::GgmlMatrix::new(q.dtype(), *rows, *cols, &data)
                .map_err(|e| file.bad_tensor(&entry.gguf_name, e.to_string()))?;
            quantized.insert(entry.hf_name.clone(), std::sync::Arc::new(m));
            continue;
        }
        let t = q
            .dequantize(device)
            .map_err(|e| file.candle_err(&entry.gguf_name, e))?;
        tensors.insert(entry.hf_name.clone(), t);
    }
    Ok(GgufModel {
        config,
        tensors,
        quantized,
        tokenizer: tok.tokenizer,
        chat_template: tok.chat_template,
        bos_token: tok.bos_token,
        eos_token: tok.eos_token,
        tensor_types: file.tensor_types(),
    })
}

/// Model architectures we translate. They share llama's tensor set; qwen2 adds q/k/v biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
    fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
    /// llama.cpp's `LlamaModel` converter (and its subclasses, Mistral among them) permutes q/k
    /// rows; the Qwen2 converter does not.
    fn permutes_qk(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral)
    }
}

/// Which rows of a tensor llama.cpp permuted, and into how many heads.
#[derive(Debug, Clone, Copy)]
struct Permute {
    heads: usize,
}

#[derive(Debug)]
struct Entry {
    gguf_name: String,
    hf_name: String,
    permute: Option<Permute>,
}

/// Model hyper-parameters read from the metadata.
#[derive(Debug, Clone)]
struct Dims {
    layers: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    explicit_head_dim: Option<usize>,
}

/// An opened GGUF file: header parsed, tensor names mapped and shapes checked; tensor data is
/// read on demand, one tensor at a time.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    content: gguf_file::Content,
    arch: Arch,
    dims: Dims,
    entries: Vec<Entry>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("arch", &self.arch)
            .field("tensors", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Parses the header, checks the architecture, maps every tensor name, and checks that every
    /// tensor's shape fits the config and its data lies inside the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let p = path.to_path_buf();
        let file = std::fs::File::open(path).map_err(|source| GgufError::Io {
            path: p.clone(),
            source,
        })?;
        // SAFETY: the file is only read; as with any mmap, it must not be truncated while open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| GgufError::Io {
            path: p.clone(),
            source,
        })?;
        let bytes: &[u8] = &mmap;
        if bytes.len() < 4 || &bytes[..4] != b"GGUF" {
            let head = &bytes[..bytes.len().min(4)];
            return Err(GgufError::NotGguf {
                path: p,
                magic: String::from_utf8_lossy(head).escape_debug().to_string(),
            });
        }
        let content = match gguf_file::Content::read(&mut std::io::Cursor::new(bytes)) {
            Ok(c) => c,
            Err(e) => return Err(diagnose_header(&p, bytes, e)),
        };
        let arch_name = meta_str(&p, &content.metadata, "general.architecture")?;
        let arch = Arch::parse(arch_name).ok_or_else(|| GgufError::UnsupportedArchitecture {
            path: p.clone(),
            arch: arch_name.to_string(),
        })?;
        let dims = read_dims(&p, &content.metadata, arch)?;

        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort_by(|a, b| natural_key(a).cmp(&natural_key(b)));
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            let hf_name = hf_tensor_name(name, arch, dims.layers).ok_or_else(|| {
                GgufError::UnknownTensor {
                    path: p.clone(),
                    name: name.clone(),
                    arch: arch.name().to_string(),
                }
            })?;
            let permute = if arch.permutes_qk() {
                if name.contains(".attn_q.") {
                    Some(Permute { heads: dims.heads })
                } else if name.contains(".attn_k.") {
                    Some(Permute {
                        heads: dims.kv_heads,
                    })
                } else {
                    None
                }
            } else {
                None
            };
            entries.push(Entry {
                gguf_name: name.clone(),
                hf_name,
                permute,
            });
        }
        let f = Self {
            path: p,
            mmap,
            content,
            arch,
            dims,
            entries,
        };
        f.check_tensors()?;
        Ok(f)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> &'static str {
        self.arch.name()
    }

    /// The raw metadata, under llama.cpp's key names.
    pub fn metadata(&self) -> &HashMap<String, gguf_file::Value> {
        &self.content.metadata
    }

    /// `(hf_name, gguf_name)` for every tensor, in layer order.
    pub fn tensor_names(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .map(|e| (e.hf_name.as_str(), e.gguf_name.as_str()))
    }

    /// The GGUF type of the tensor with this HF name.
    pub fn tensor_type(&self, hf_name: &str) -> Option<GgmlDType> {
        let e = self.entries.iter().find(|e| e.hf_name == hf_name)?;
        Some(self.content.tensor_infos[&e.gguf_name].ggml_dtype)
    }

    /// GGUF tensor types (llama.cpp spelling) with their counts, most common first.
    pub fn tensor_types(&self) -> Vec<(String, usize)> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for info in self.content.tensor_infos.values() {
            *counts
                .entry(ggml_type_name(info.ggml_dtype).to_string())
                .or_default() += 1;
        }
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// The tensor with this HF name, still quantized, in HF layout (q/k rows un-permuted).
    pub fn qtensor(&self, hf_name: &str, device: &Device) -> Result<QTensor, GgufError> {
        let entry = self
            .entries
            .iter()
            .find(|e| e.hf_name == hf_name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                name: hf_name.to_string(),
            })?;
        self.qtensor_of(entry, device)
    }

    /// Every tensor as `(hf_name, QTensor)` in HF layout, read lazily one at a time.
    pub fn qtensors<'a>(
        &'a self,
        device: &'a Device,
    ) -> impl Iterator<Item = Result<(String, QTensor), GgufError>> + 'a {
        self.entries
            .iter()
            .map(move |e| Ok((e.hf_name.clone(), self.qtensor_of(e, device)?)))
    }

    fn qtensor_of(&self, entry: &Entry, device: &Device) -> Result<QTensor, GgufError> {
        let info = &self.content.tensor_infos[&entry.gguf_name];
        let (start, len) = self.data_range(info);
        // `check_tensors` made sure the range is inside the file.
        let raw = &self.mmap[start..start + len];
        let dims = info.shape.dims().to_vec();
        let permuted;
        let data = match entry.permute {
            Some(Permute { heads }) => {
                permuted = unpermute_rows(raw, dims[0], heads);
                &permuted[..]
            }
            None => raw,
        };
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(info.ggml_dtype, data, dims, device)
            .map_err(|e| self.candle_err(&entry.gguf_name, e));
        // The tensor is copied out: let its file pages go (peak RSS while loading).
        crate::util::release_pages(&self.mmap, start, len);
        q
    }

    fn data_range(&self, info: &gguf_file::TensorInfo) -> (usize, usize) {
        let dt = info.ggml_dtype;
        let len = info.shape.elem_count() / dt.block_size() * dt.type_size();
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        (usize::try_from(start).unwrap_or(usize::MAX), len)
    }

    fn candle_err(&self, tensor: &str, source: candle_core::Error) -> GgufError {
        GgufError::Candle {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            source: Box::new(source),
        }
    }

    fn bad_tensor(&self, tensor: &str, detail: String) -> GgufError {
        GgufError::BadTensor {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            detail,
        }
    }

    /// Data inside the file, whole quantization blocks per row, shapes as the config says, and
    /// every tensor a decoder needs present.
    fn check_tensors(&self) -> Result<(), GgufError> {
        let d = &self.dims;
        let file_len = self.mmap.len();
        let vocab = self.vocab_size()?;
        for e in &self.entries {
            let info = &self.content.tensor_infos[&e.gguf_name];
            let dims = info.shape.dims();
            let dt = info.ggml_dtype;
            let inner = *dims.last().unwrap_or(&1);
            if !inner.is_multiple_of(dt.block_size()) {
                return Err(self.bad_tensor(
                    &e.gguf_name,
                    format!(
                        "row length {inner} is not a multiple of the {} block size {}",
                        ggml_type_name(dt),
                        dt.block_size()
                    ),
                ));
            }
            let (start, len) = self.data_range(info);
            if start.saturating_add(len) > file_len {
                return Err(GgufError::Corrupt {
                    path: self.path.clone(),
                    detail: format!(
                        "tensor {:?} needs bytes {start}..{} but the file has only {file_len} bytes",
                        e.gguf_name,
                        start.saturating_add(len)
                    ),
                });
            }
            let q_rows = d.heads * d.head_dim;
            let kv_rows = d.kv_heads * d.head_dim;
            let leaf = e.hf_name.rsplit_once('.').map(|x| x.0).unwrap_or("");
            let is_bias = e.hf_name.ends_with(".bias");
            let want: Vec<usize> = match leaf.rsplit('.').next().unwrap_or("") {
                "embed_tokens" | "lm_head" => vec![vocab, d.hidden],
                "q_proj" => vec![q_rows, d.hidden],
                "k_proj" | "v_proj" => vec![kv_rows, d.hidden],
                "o_proj" => vec![d.hidden, q_rows],
                "gate_proj" | "up_proj" => vec![d.intermediate, d.hidden],
                "down_proj" => vec![d.hidden, d.intermediate],
                _ => vec![d.hidden], // the norms
            };
            let want = if is_bias { vec![want[0]] } else { want };
            if dims != want.as_slice() {
                return Err(self.bad_tensor(
                    &e.gguf_name,
                    format!("shape {dims:?} (HF order), expected {want:?} from the metadata"),
                ));
            }
            if let Some(Permute { heads }) = e.permute {
                if heads == 0 || !dims[0].is_multiple_of(2 * heads) {
                    return Err(self.bad_tensor(
                        &e.gguf_name,
                        format!(
                            "{} rows cannot be split into {heads} heads of pairs",
                            dims[0]
                        ),
                    ));
                }
            }
        }
        let mut required = vec![
            "model.embed_tokens.weight".to_string(),
            "model.norm.weight".to_string(),
        ];
        for l in 0..d.layers {
            for leaf in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
                "input_layernorm",
                "post_attention_layernorm",
            ] {
                required.push(format!("model.layers.{l}.{leaf}.weight"));
            }
        }
        for name in required {
            if !self.entries.iter().any(|e| e.hf_name == name) {
                return Err(GgufError::MissingTensor {
                    path: self.path.clone(),
                    name: format!("{name} ({})", gguf_tensor_name(&name)),
                });
            }
        }
        Ok(())
    }

    fn has_tensor(&self, gguf_name: &str) -> bool {
        self.content.tensor_infos.contains_key(gguf_name)
    }

    fn vocab_size(&self) -> Result<usize, GgufError> {
        let key = format!("{}.vocab_size", self.arch.name());
        if let Some(v) = opt_usize(&self.path, &self.content.metadata, &key)? {
            return Ok(v);
        }
        match self.content.metadata.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(a)) => Ok(a.len()),
            // Fall back to the embedding's row count.
            _ => match self.content.tensor_infos.get("token_embd.weight") {
                Some(info) => Ok(info.shape.dims()[0]),
                None => Err(GgufError::MissingKey {
                    path: self.path.clone(),
                    key,
                }),
            },
        }
    }

    /// The equivalent Hugging Face `config.json`.
    pub fn hf_config(&self) -> Result<Json, GgufError> {
        let p = &self.path;
        let md = &self.content.metadata;
        let a = self.arch.name();
        let d = &self.dims;
        let key = |k: &str| format!("{a}.{k}");
        let eps = meta_f64(p, md, &key("attention.layer_norm_rms_epsilon"))?;
        let rope_theta = opt_f64(p, md, &key("rope.freq_base"))?.unwrap_or(10_000.0);
        let ctx = meta_usize(p, md, &key("context_length"))?;
        let tie = !self.has_tensor("output.weight");
        let mut c = serde_json::Map::new();
        c.insert("architectures".into(), json!([self.arch.hf_class()]));
        c.insert("model_type".into(), json!(a));
        c.insert("hidden_size".into(), json!(d.hidden));
        c.insert("intermediate_size".into(), json!(d.intermediate));
        c.insert("num_hidden_layers".into(), json!(d.layers));
        c.insert("num_attention_heads".into(), json!(d.heads));
        c.insert("num_key_value_heads".into(), json!(d.kv_heads));
        if let Some(hd) = d.explicit_head_dim {
            c.insert("head_dim".into(), json!(hd));
        }
        c.insert("hidden_act".into(), json!("silu"));
        c.insert("max_position_embeddings".into(), json!(ctx));
        c.insert("rms_norm_eps".into(), json!(eps));
        c.insert("rope_theta".into(), json!(rope_theta));
        if let Some(scaling) = self.rope_scaling()? {
            c.insert("rope_scaling".into(), scaling);
        }
        c.insert("vocab_size".into(), json!(self.vocab_size()?));
        c.insert("tie_word_embeddings".into(), json!(tie));
        if self.arch != Arch::Qwen2 {
            // Qwen2 always has q/k/v biases; llama-family models have them when the file does.
            c.insert(
                "attention_bias".into(),
                json!(self.has_tensor("blk.0.attn_q.bias")),
            );
        }
        for (hf, gg) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            c.insert(hf.into(), json!(opt_usize(p, md, gg)?));
        }
        c.insert("torch_dtype".into(), json!("float32"));
        Ok(Json::Object(c))
    }

    fn rope_scaling(&self) -> Result<Option<Json>, GgufError> {
        let (p, md, a) = (&self.path, &self.content.metadata, self.arch.name());
        let ty = match md.get(&format!("{a}.rope.scaling.type")) {
            Some(gguf_file::Value::String(s)) if s != "none" => s.clone(),
            _ => return Ok(None),
        };
        let mut s = serde_json::Map::new();
        s.insert("rope_type".into(), json!(ty));
        if let Some(f) = opt_f64(p, md, &format!("{a}.rope.scaling.factor"))? {
            s.insert("factor".into(), json!(f));
        }
        if let Some(n) = opt_usize(p, md, &format!("{a}.rope.scaling.original_context_length"))? {
            s.insert("original_max_position_embeddings".into(), json!(n));
        }
        Ok(Some(Json::Object(s)))
    }

    /// The tokenizer described by `tokenizer.ggml.*`, with its special tokens and chat template.
    pub fn tokenizer(&self) -> Result<GgufTokenizer, GgufError> {
        build_tokenizer(&self.path, &self.content.metadata)
    }
}

/// The tokenizer half of a GGUF file.
#[derive(Clone, Debug)]
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Names and layout
// ---------------------------------------------------------------------------------------------

/// `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; `None` for a name with no HF
/// equivalent (or a layer index outside `0..layers`).
fn hf_tensor_name(name: &str, arch: Arch, layers: usize) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let top = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(top) = top {
        return (suffix == "weight").then(|| format!("{top}.weight"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (idx, leaf) = rest.split_once('.')?;
    let layer: usize = idx.parse().ok()?;
    if layer >= layers || idx != layer.to_string() {
        return None;
    }
    let hf_leaf = match leaf {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    if suffix == "bias" {
        let has_bias = match arch {
            // Qwen2 has q/k/v biases; a llama with `attention_bias` has them on all four.
            Arch::Qwen2 => matches!(leaf, "attn_q" | "attn_k" | "attn_v"),
            Arch::Llama | Arch::Mistral => {
                matches!(leaf, "attn_q" | "attn_k" | "attn_v" | "attn_output")
            }
        };
        if !has_bias {
            return None;
        }
    }
    Some(format!("model.layers.{layer}.{hf_leaf}.{suffix}"))
}

/// The inverse of [`hf_tensor_name`], for error messages.
fn gguf_tensor_name(hf: &str) -> String {
    let pairs = [
        ("model.embed_tokens", "token_embd"),
        ("model.norm", "output_norm"),
        ("lm_head", "output"),
        ("model.layers.", "blk."),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"),
        ("input_layernorm", "attn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let mut s = hf.to_string();
    for (a, b) in pairs {
        s = s.replace(a, b);
    }
    s
}

/// Sort key putting `blk.2` before `blk.10`.
fn natural_key(name: &str) -> (usize, usize, &str) {
    match name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(i, leaf)| Some((i.parse::<usize>().ok()?, leaf)))
    {
        Some((i, leaf)) => (1, i, leaf),
        None if name.starts_with("token_embd") => (0, 0, name),
        None => (2, 0, name),
    }
}

/// Undoes llama.cpp's rope permutation of q/k rows (transformers' `reverse_permute`).
///
/// llama.cpp writes `w.reshape(heads, 2, d, ...).swapaxes(1, 2)`, `d = rows / heads / 2`: within a
/// head, file row `2i + j` holds HF row `j*d + i`. So HF row `h*2d + j*d + i` is file row
/// `h*2d + 2i + j`. Rows are moved whole, so this works on quantized bytes as well as on floats
/// (each row is a whole number of quantization blocks).
fn unpermute_rows(raw: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let row_bytes = raw.len() / rows;
    let d = rows / heads / 2;
    let mut out = Vec::with_capacity(raw.len());
    for r in 0..rows {
        let (h, rem) = (r / (2 * d), r % (2 * d));
        let (j, i) = (rem / d, rem % d);
        let src = h * 2 * d + 2 * i + j;
        out.extend_from_slice(&raw[src * row_bytes..(src + 1) * row_bytes]);
    }
    out
}

/// llama.cpp's name for a GGUF tensor type.
pub fn ggml_type_name(dt: GgmlDType) -> &'static str {
    match dt {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// llama.cpp's name for a GGUF type id (ggml.h `ggml_type`), including those candle lacks.
fn ggml_type_id_name(id: u32) -> String {
    const NAMES: [&str; 42] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
        "NVFP4",
        "Q1_0",
    ];
    NAMES
        .get(id as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("unknown type {id}"))
}

// ---------------------------------------------------------------------------------------------
// Header problems
// ---------------------------------------------------------------------------------------------

/// candle's header reader failed: walk the header ourselves to say where and why (a tensor type
/// candle lacks is reported with its name and the tensor's; anything else is truncation or
/// corruption).
fn diagnose_header(path: &Path, bytes: &[u8], err: candle_core::Error) -> GgufError {
    match scan_tensor_types(bytes) {
        Ok(types) => {
            for (tensor, id) in types {
                if !candle_knows_type(id) {
                    return GgufError::UnsupportedTensorType {
                        path: path.to_path_buf(),
                        tensor,
                        ggml_type: ggml_type_id_name(id),
                        type_id: id,
                    };
                }
            }
            GgufError::Corrupt {
                path: path.to_path_buf(),
                detail: err.to_string(),
            }
        }
        Err(detail) => GgufError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("{detail} (file is {} bytes; candle: {err})", bytes.len()),
        },
    }
}

fn candle_knows_type(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=15 | 30)
}

/// `(tensor name, type id)` from a GGUF header, skipping the metadata values.
fn scan_tensor_types(b: &[u8]) -> Result<Vec<(String, u32)>, String> {
    struct R<'a> {
        b: &'a [u8],
        pos: usize,
        v1: bool,
    }
    impl R<'_> {
        fn take(&mut self, n: u64, what: &str) -> Result<&[u8], String> {
            let end = (self.pos as u64)
                .checked_add(n)
                .filter(|&e| e <= self.b.len() as u64);
            match end {
                Some(end) => {
                    let s = &self.b[self.pos..end as usize];
                    self.pos = end as usize;
                    Ok(s)
                }
                None => Err(format!(
                    "header ends early: {what} at byte {} needs {n} bytes",
                    self.pos
                )),
            }
        }
        fn u32(&mut self, what: &str) -> Result<u32, String> {
            Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
        }
        fn u64(&mut self, what: &str) -> Result<u64, String> {
            Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
        }
        fn len(&mut self, what: &str) -> Result<u64, String> {
            if self.v1 {
                self.u32(what).map(u64::from)
            } else {
                self.u64(what)
            }
        }
        fn string(&mut self, what: &str) -> Result<String, String> {
            let n = self.len(what)?;
            Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
        }
        fn skip_value(&mut self, ty: u32, depth: usize) -> Result<(), String> {
            let size = match ty {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                10..=12 => 8,
                8 => return self.string("string value").map(drop),
                9 => {
                    if depth > 8 {
                        return Err("metadata arrays nested too deep".into());
                    }
                    let elem = self.u32("array type")?;
                    let n = self.len("array length")?;
                    if n > self.b.len() as u64 {
                        return Err(format!("array of {n} elements is longer than the file"));
                    }
                    for _ in 0..n {
                        self.skip_value(elem, depth + 1)?;
                    }
                    return Ok(());
                }
                _ => return Err(format!("unknown metadata value type {ty}")),
            };
            self.take(size, "metadata value").map(drop)
        }
    }
    let mut r = R {
        b,
        pos: 4,
        v1: false,
    };
    let version = r.u32("version")?;
    r.v1 = version == 1;
    let n_tensors = r.len("tensor count")?;
    let n_kv = r.len("metadata count")?;
    for _ in 0..n_kv {
        r.string("metadata key")?;
        let ty = r.u32("metadata type")?;
        r.skip_value(ty, 0)?;
    }
    let mut out = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let nd = r.u32("tensor rank")?;
        if nd > 4 {
            return Err(format!("tensor {name:?} has {nd} dimensions"));
        }
        for _ in 0..nd {
            r.len("tensor dimension")?;
        }
        let ty = r.u32("tensor type")?;
        r.u64("tensor offset")?;
        out.push((name, ty));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Metadata access
// ---------------------------------------------------------------------------------------------

type Meta = HashMap<String, gguf_file::Value>;

fn missing(path: &Path, key: &str) -> GgufError {
    GgufError::MissingKey {
        path: path.to_path_buf(),
        key: key.to_string(),
    }
}

fn bad(path: &Path, key: &str, detail: impl Into<String>) -> GgufError {
    GgufError::BadMetadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        detail: detail.into(),
    }
}

fn meta_str<'a>(path: &Path, md: &'a Meta, key: &str) -> Result<&'a str, GgufError> {
    match md.get(key) {
        Some(gguf_file::Value::String(s)) => Ok(s),
        Some(v) => Err(bad(
            path,
            key,
            format!("expected a string, got {:?}", v.value_type()),
        )),
        None => Err(missing(path, key)),
    }
}

fn opt_usize(path: &Path, md: &Meta, key: &str) -> Result<Option<usize>, GgufError> {
    use gguf_file::Value as V;
    let v: i128 = match md.get(key) {
        None => return Ok(None),
        Some(V::U8(x)) => (*x).into(),
        Some(V::I8(x)) => (*x).into(),
        Some(V::U16(x)) => (*x).into(),
        Some(V::I16(x)) => (*x).into(),
        Some(V::U32(x)) => (*x).into(),
        Some(V::I32(x)) => (*x).into(),
        Some(V::U64(x)) => (*x).into(),
        Some(V::I64(x)) => (*x).into(),
        Some(v) => {
            return Err(bad(
                path,
                key,
                format!("expected an integer, got {:?}", v.value_type()),
            ))
        }
    };
    usize::try_from(v)
        .map(Some)
        .map_err(|_| bad(path, key, format!("{v} is out of range")))
}

fn meta_usize(path: &Path, md: &Meta, key: &str) -> Result<usize, GgufError> {
    opt_usize(path, md, key)?.ok_or_else(|| missing(path, key))
}

fn opt_f64(path: &Path, md: &Meta, key: &str) -> Result<Option<f64>, GgufError> {
    use gguf_file::Value as V;
    Ok(Some(match md.get(key) {
        None => return Ok(None),
        // An f32 like 1e-5 is stored as 9.99999974e-6: keep the decimal it was written from.
        Some(V::F32(x)) => format!("{x}").parse::<f64>().unwrap_or(*x as f64),
        Some(V::F64(x)) => *x,
        Some(v) => match opt_usize(path, md, key) {
            Ok(Some(n)) => n as f64,
            _ => {
                return Err(bad(
                    path,
                    key,
                    format!("expected a number, got {:?}", v.value_type()),
                ))
            }
        },
    }))
}

fn meta_f64(path: &Path, md: &Meta, key: &str) -> Result<f64, GgufError> {
    opt_f64(path, md, key)?.ok_or_else(|| missing(path, key))
}

fn read_dims(path: &Path, md: &Meta, arch: Arch) -> Result<Dims, GgufError> {
    let a = arch.name();
    let key = |k: &str| format!("{a}.{k}");
    let layers = meta_usize(path, md, &key("block_count"))?;
    let hidden = meta_usize(path, md, &key("embedding_length"))?;
    let intermediate = meta_usize(path, md, &key("feed_forward_length"))?;
    let heads = meta_usize(path, md, &key("attention.head_count"))?;
    let kv_heads = opt_usize(path, md, &key("attention.head_count_kv"))?.unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(bad(
            path,
            &key("attention.head_count_kv"),
            format!("{kv_heads} kv heads do not divide {heads} heads"),
        ));
    }
    // transformers reads head_dim from `rope.dimension_count` for llama/mistral (not qwen2).
    let mut explicit_head_dim = opt_usize(path, md, &key("attention.key_length"))?;
    if explicit_head_dim.is_none() && arch != Arch::Qwen2 {
        explicit_head_dim = opt_usize(path, md, &key("rope.dimension_count"))?;
    }
    let head_dim = match explicit_head_dim {
        Some(hd) => hd,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(bad(
                path,
                &key("attention.head_count"),
                format!("{heads} heads do not divide hidden size {hidden}"),
            ))
        }
    };
    Ok(Dims {
        layers,
        hidden,
        intermediate,
        heads,
        kv_heads,
        head_dim,
        explicit_head_dim,
    })
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// `tokenizer.ggml.pre` values whose merges were learned on a split other than GPT-2's, with that
/// split (transformers' `GGUF_PRE_TOKENIZER_SPLITS`). Anything else, `smollm` and `gpt-2`
/// included, gets the GPT-2 split built into the ByteLevel pre-tokenizer, as in transformers.
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// GPT-2's byte -> printable char table (the alphabet byte-level BPE vocabularies are spelled in).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap();
            n += 1;
            c
        };
    }
    table
}

fn string_array<'a>(path: &Path, md: &'a Meta, key: &str) -> Result<Vec<&'a str>, GgufError> {
    match md.get(key) {
        Some(gguf_file::Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                gguf_file::Value::String(s) => Ok(s.as_str()),
                other => Err(bad(
                    path,
                    key,
                    format!("expected strings, got {:?}", other.value_type()),
                )),
            })
            .collect(),
        Some(v) => Err(bad(
            path,
            key,
            format!("expected an array, got {:?}", v.value_type()),
        )),
        None => Err(missing(path, key)),
    }
}

fn build_tokenizer(path: &Path, md: &Meta) -> Result<GgufTokenizer, GgufError> {
    let model = meta_str(path, md, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(GgufError::UnsupportedTokenizer {
            path: path.to_path_buf(),
            model: model.to_string(),
        });
    }
    let tokens = string_array(path, md, "tokenizer.ggml.tokens")?;
    let merges = string_array(path, md, "tokenizer.ggml.merges")?;
    let token_types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
        Some(gguf_file::Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                gguf_file::Value::I32(x) => Ok(i64::from(*x)),
                gguf_file::Value::U32(x) => Ok(i64::from(*x)),
                other => Err(bad(
                    path,
                    "tokenizer.ggml.token_type",
                    format!("expected integers, got {:?}", other.value_type()),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(bad(
                path,
                "tokenizer.ggml.token_type",
                format!("expected an array, got {:?}", v.value_type()),
            ))
        }
        None => Vec::new(),
    };
    let tok_err = |detail: String| GgufError::Tokenizer {
        path: path.to_path_buf(),
        detail,
    };

    // The vocabulary, every token spelled in the byte-level alphabet. llama.cpp writes tokens in
    // that alphabet already; a token using any other character (an added token written as plain
    // UTF-8) is respelled byte by byte, as transformers does.
    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Vocab::default();
    for (id, t) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(t) {
            t.to_string()
        } else {
            t.bytes().map(|b| spelling[b as usize]).collect()
        };
        vocab.insert(spelled, id as u32);
    }
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    tok_err(format!(
                        "merge {m:?} is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .build()
        .map_err(|e| tok_err(format!("BPE: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let pre_tokenizer: PreTokenizerWrapper = match pre_tokenizer_split(pre) {
        Some(regex) => {
            let split = Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err(format!("pre-tokenizer regex for {pre:?}: {e}")))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        // GPT-2's split, inside ByteLevel.
        None => ByteLevel::new(false, true, true).into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));

    // Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
    // tokens, so that they are matched whole. A control token outside the byte alphabet is a
    // llama.cpp mislabel and is skipped, as transformers does.
    let mut control = Vec::new();
    let mut user = Vec::new();
    for (t, ty) in tokens.iter().zip(token_types.iter()) {
        match ty {
            3 if in_alphabet(t) => {
                control.push(AddedToken::from(t.to_string(), true).normalized(false))
            }
            4 if vocab.contains_key(*t) => {
                user.push(AddedToken::from(t.to_string(), false).normalized(false))
            }
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(control)
        .map_err(|e| tok_err(format!("special tokens: {e}")))?;
    tokenizer
        .add_tokens(user)
        .map_err(|e| tok_err(format!("added tokens: {e}")))?;

    let token_of = |key: &str| -> Result<Option<(String, u32)>, GgufError> {
        match opt_usize(path, md, key)? {
            None => Ok(None),
            Some(id) => match tokens.get(id) {
                Some(t) => Ok(Some((t.to_string(), id as u32))),
                None => Err(bad(
                    path,
                    key,
                    format!(
                        "token id {id} is outside the vocabulary of {}",
                        tokens.len()
                    ),
                )),
            },
        }
    };
    let bos = token_of("tokenizer.ggml.bos_token_id")?;
    let eos = token_of("tokenizer.ggml.eos_token_id")?;
    // BOS / EOS are added only when the file asks (SmolLM2 says `add_bos_token = false`).
    let flag = |key: &str| matches!(md.get(key), Some(gguf_file::Value::Bool(true)));
    let add_bos = bos.clone().filter(|_| flag("tokenizer.ggml.add_bos_token"));
    let add_eos = eos.clone().filter(|_| flag("tokenizer.ggml.add_eos_token"));
    if add_bos.is_some() || add_eos.is_some() {
        let around = |seq: &str| {
            let mut parts = Vec::new();
            if let Some((t, _)) = &add_bos {
                parts.push(format!("{t}:{}", &seq[seq.len() - 1..]));
            }
            parts.push(seq.to_string());
            if let Some((t, _)) = &add_eos {
                parts.push(format!("{t}:{}", &seq[seq.len() - 1..]));
            }
            parts.join(" ")
        };
        let single = around("$A:0");
        let pair = format!("{single} {}", around("$B:1"));
        let special: Vec<(String, u32)> = add_bos.iter().chain(add_eos.iter()).cloned().collect();
        let post = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single(single)
            .map_err(|e| tok_err(format!("post-processor: {e}")))?
            .try_pair(pair)
            .map_err(|e| tok_err(format!("post-processor: {e}")))?
            .special_tokens(special)
            .build()
            .map_err(|e| tok_err(format!("post-processor: {e}")))?;
        tokenizer.with_post_processor(Some(post));
    }

    let chat_template = md
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    Ok(GgufTokenizer {
        tokenizer,
        chat_template,
        bos_token: bos.map(|b| b.0),
        eos_token: eos.map(|e| e.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The permutation llama.cpp's converter applies (`LlamaModel.permute`), on row indices.
    fn llama_cpp_permute(rows: usize, heads: usize) -> Vec<usize> {
        // out = w.reshape(heads, 2, d, ...).swapaxes(1, 2).reshape(...): out[h, i, j] = w[h, j, i]
        let d = rows / heads / 2;
        let mut out = vec![0; rows];
        for h in 0..heads {
            for i in 0..d {
                for j in 0..2 {
                    out[h * 2 * d + i * 2 + j] = h * 2 * d + j * d + i;
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        for (rows, heads) in [(8, 1), (12, 3), (576, 9), (192, 3)] {
            let row_bytes = 3;
            let hf: Vec<u8> = (0..rows * row_bytes).map(|x| (x % 251) as u8).collect();
            let perm = llama_cpp_permute(rows, heads);
            let mut file = Vec::new();
            for &src in &perm {
                file.extend_from_slice(&hf[src * row_bytes..(src + 1) * row_bytes]);
            }
            assert_eq!(
                unpermute_rows(&file, rows, heads),
                hf,
                "rows {rows} heads {heads}"
            );
        }
    }

    #[test]
    fn maps_names() {
        let f = |n| hf_tensor_name(n, Arch::Llama, 30);
        assert_eq!(
            f("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(f("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(
            f("output_norm.weight").as_deref(),
            Some("model.norm.weight")
        );
        assert_eq!(
            f("blk.29.attn_k.weight").as_deref(),
            Some("model.layers.29.self_attn.k_proj.weight")
        );
        assert_eq!(
            f("blk.3.ffn_norm.weight").as_deref(),
            Some("model.layers.3.post_attention_layernorm.weight")
        );
        assert_eq!(f("blk.30.attn_k.weight"), None);
        assert_eq!(f("blk.01.attn_k.weight"), None);
        assert_eq!(f("rope_freqs.weight"), None);
        assert_eq!(f("blk.0.ffn_up.bias"), None);
        assert_eq!(
            hf_tensor_name("blk.0.attn_q.bias", Arch::Qwen2, 2).as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_tensor_name("blk.0.attn_output.bias", Arch::Qwen2, 2),
            None
        );
        assert_eq!(
            gguf_tensor_name("model.layers.4.post_attention_layernorm.weight"),
            "blk.4.ffn_norm.weight"
        );
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set, ByteLevel::alphabet().into_iter().collect());
    }
}
