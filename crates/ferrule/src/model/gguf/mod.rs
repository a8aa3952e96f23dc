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

mod error;
mod file;
mod header;
mod metadata;
mod tokenizer;

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

pub use error::GgufError;
pub use file::GgufFile;
use file::*;
pub(crate) use file::{gguf_tensor_name, hf_tensor_name, natural_key, Arch};
pub use header::ggml_type_name;
use header::*;
use metadata::*;
pub(crate) use tokenizer::pre_tokenizer_split;
pub use tokenizer::GgufTokenizer;
use tokenizer::*;

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

/// Opens a GGUF checkpoint and translates everything but its tensors (config, tokenizer, chat
/// template); the returned model's `tensors` and `quantized` are empty, and each tensor can be
/// read from the file on its own ([`GgufFile::qtensor`]).
pub fn load_gguf_metadata(path: &Path) -> Result<(GgufFile, GgufModel), GgufError> {
    let file = GgufFile::open(path)?;
    let tok = file.tokenizer()?;
    let model = GgufModel {
        config: file.hf_config()?,
        tensors: HashMap::new(),
        quantized: HashMap::new(),
        tokenizer: tok.tokenizer,
        chat_template: tok.chat_template,
        bos_token: tok.bos_token,
        eos_token: tok.eos_token,
        tensor_types: file.tensor_types(),
    };
    Ok((file, model))
}

fn load(path: &Path, device: &Device, keep_quantized: bool) -> Result<GgufModel, GgufError> {
    let (file, mut model) = load_gguf_metadata(path)?;
    let mut tensors = HashMap::with_capacity(file.entries.len());
    let mut quantized: HashMap<String, std::sync::Arc<dyn crate::quant::QuantMatrix>> =
        HashMap::new();
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
    model.tensors = tensors;
    model.quantized = quantized;
    Ok(model)
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
        // llama.cpp's optional MLP bias (`mlp_bias`); Qwen2 has none there.
        assert_eq!(
            f("blk.0.ffn_up.bias").as_deref(),
            Some("model.layers.0.mlp.up_proj.bias")
        );
        assert_eq!(hf_tensor_name("blk.0.ffn_up.bias", Arch::Qwen2, 2), None);
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
