//! An opened GGUF file: header, HF names and layout of its tensors, shape checks, the HF config.

#[allow(unused_imports)]
use super::*;

/// Model architectures we translate. They share llama's tensor set; qwen2 adds q/k/v biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
    pub(super) fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
    /// llama.cpp's `LlamaModel` converter (and its subclasses, Mistral among them) permutes q/k
    /// rows; the Qwen2 converter does not.
    pub(crate) fn permutes_qk(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral)
    }
}

/// Which rows of a tensor llama.cpp permuted, and into how many heads.
#[derive(Debug, Clone, Copy)]
pub(super) struct Permute {
    pub(super) heads: usize,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) gguf_name: String,
    pub(super) hf_name: String,
    pub(super) permute: Option<Permute>,
}

/// Model hyper-parameters read from the metadata.
#[derive(Debug, Clone)]
pub(super) struct Dims {
    pub(super) layers: usize,
    pub(super) hidden: usize,
    pub(super) intermediate: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) explicit_head_dim: Option<usize>,
}

/// An opened GGUF file: header parsed, tensor names mapped and shapes checked; tensor data is
/// read on demand, one tensor at a time.
pub struct GgufFile {
    pub(super) path: PathBuf,
    pub(super) mmap: memmap2::Mmap,
    pub(super) content: gguf_file::Content,
    pub(super) arch: Arch,
    pub(super) dims: Dims,
    pub(super) entries: Vec<Entry>,
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

    /// The shape (row-major, HF layout) of the tensor with this HF name.
    pub fn tensor_shape(&self, hf_name: &str) -> Option<Vec<usize>> {
        let e = self.entries.iter().find(|e| e.hf_name == hf_name)?;
        Some(
            self.content.tensor_infos[&e.gguf_name]
                .shape
                .dims()
                .to_vec(),
        )
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

    pub(super) fn qtensor_of(&self, entry: &Entry, device: &Device) -> Result<QTensor, GgufError> {
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
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            info.ggml_dtype,
            data,
            dims,
            device,
        )
        .map_err(|e| self.candle_err(&entry.gguf_name, e));
        // The tensor is copied out: let its file pages go (peak RSS while loading).
        crate::util::release_pages(&self.mmap, start, len);
        q
    }

    pub(super) fn data_range(&self, info: &gguf_file::TensorInfo) -> (usize, usize) {
        let dt = info.ggml_dtype;
        // Checked: a corrupt header's dims can overflow `Shape::elem_count` (found by fuzzing);
        // an overflowing size reads as usize::MAX, which no file holds.
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        let len = elems
            .and_then(|e| (e / dt.block_size()).checked_mul(dt.type_size()))
            .unwrap_or(usize::MAX);
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        (usize::try_from(start).unwrap_or(usize::MAX), len)
    }

    pub(super) fn candle_err(&self, tensor: &str, source: candle_core::Error) -> GgufError {
        GgufError::Candle {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            source: Box::new(source),
        }
    }

    pub(super) fn bad_tensor(&self, tensor: &str, detail: String) -> GgufError {
        GgufError::BadTensor {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            detail,
        }
    }

    /// Data inside the file, whole quantization blocks per row, shapes as the config says, and
    /// every tensor a decoder needs present.
    pub(super) fn check_tensors(&self) -> Result<(), GgufError> {
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
                    detail: format!("tensor {:?} needs bytes {start}..{} but the file has only {file_len} bytes", e.gguf_name, start.saturating_add(len)),
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
        // Checked as they are named (not collected first): a corrupt block_count of 2^32 made a
        // 4 KB file take 22 GB here (found by fuzzing); the first absent layer ends the check.
        let missing = |name: String| -> Result<(), GgufError> {
            if self.entries.iter().any(|e| e.hf_name == name) {
                return Ok(());
            }
            Err(GgufError::MissingTensor {
                path: self.path.clone(),
                name: format!("{name} ({})", gguf_tensor_name(&name)),
            })
        };
        missing("model.embed_tokens.weight".to_string())?;
        missing("model.norm.weight".to_string())?;
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
                missing(format!("model.layers.{l}.{leaf}.weight"))?;
            }
        }
        Ok(())
    }

    pub(super) fn has_tensor(&self, gguf_name: &str) -> bool {
        self.content.tensor_infos.contains_key(gguf_name)
    }

    pub(super) fn vocab_size(&self) -> Result<usize, GgufError> {
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
        let eps = meta_positive(p, md, &key("attention.layer_norm_rms_epsilon"))?;
        let rope_theta = opt_positive(p, md, &key("rope.freq_base"))?.unwrap_or(10_000.0);
        let ctx = meta_count(p, md, &key("context_length"))?;
        let vocab = self.vocab_size()?;
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
        c.insert("vocab_size".into(), json!(vocab));
        c.insert("tie_word_embeddings".into(), json!(tie));
        if self.arch != Arch::Qwen2 {
            // Qwen2 always has q/k/v biases; llama-family models have them when the file does.
            c.insert(
                "attention_bias".into(),
                json!(self.has_tensor("blk.0.attn_q.bias")),
            );
            c.insert(
                "mlp_bias".into(),
                json!(self.has_tensor("blk.0.ffn_gate.bias")),
            );
        }
        for (hf, gg) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            let id = opt_usize(p, md, gg)?;
            if let Some(id) = id.filter(|&id| id >= vocab) {
                return Err(bad(
                    p,
                    gg,
                    format!("token id {id} is not below the vocabulary size {vocab}"),
                ));
            }
            c.insert(hf.into(), json!(id));
        }
        c.insert("torch_dtype".into(), json!("float32"));
        Ok(Json::Object(c))
    }

    pub(super) fn rope_scaling(&self) -> Result<Option<Json>, GgufError> {
        let (p, md, a) = (&self.path, &self.content.metadata, self.arch.name());
        let ty = match md.get(&format!("{a}.rope.scaling.type")) {
            Some(gguf_file::Value::String(s)) if s != "none" => s.clone(),
            _ => return Ok(None),
        };
        let mut s = serde_json::Map::new();
        s.insert("rope_type".into(), json!(ty));
        if let Some(f) = opt_positive(p, md, &format!("{a}.rope.scaling.factor"))? {
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

// ---------------------------------------------------------------------------------------------
// Names and layout
// ---------------------------------------------------------------------------------------------

/// `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; `None` for a name with no HF
/// equivalent (or a layer index outside `0..layers`).
pub(crate) fn hf_tensor_name(name: &str, arch: Arch, layers: usize) -> Option<String> {
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
            // Qwen2 has q/k/v biases; a llama with `attention_bias` has them on all four, and
            // one with `mlp_bias` on its MLP (llama.cpp's "optional MLP bias").
            Arch::Qwen2 => matches!(leaf, "attn_q" | "attn_k" | "attn_v"),
            Arch::Llama | Arch::Mistral => matches!(
                leaf,
                "attn_q" | "attn_k" | "attn_v" | "attn_output" | "ffn_gate" | "ffn_up" | "ffn_down"
            ),
        };
        if !has_bias {
            return None;
        }
    }
    Some(format!("model.layers.{layer}.{hf_leaf}.{suffix}"))
}

/// The inverse of [`hf_tensor_name`] (for a name it maps; GGUF export checks the round trip).
pub(crate) fn gguf_tensor_name(hf: &str) -> String {
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
pub(crate) fn natural_key(name: &str) -> (usize, usize, &str) {
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
pub(super) fn unpermute_rows(raw: &[u8], rows: usize, heads: usize) -> Vec<u8> {
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
