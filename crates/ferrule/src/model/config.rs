//! Hugging Face `config.json` parsing for the supported families.

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

use crate::ops::rope::RopeScaling;

/// The architecture families ferrule implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama, Mistral, Qwen2, SmolLM2 (all Llama-shaped decoders).
    Decoder,
    /// BERT-family encoders (all-MiniLM-L6-v2 and friends).
    Bert,
}

pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "bert"];

/// Reads `model_type` and says which family implements it.
pub fn family_of(config: &Value) -> Result<Family> {
    let mt = config.get("model_type").and_then(Value::as_str).ok_or_else(|| anyhow!("config.json has no \"model_type\""))?;
    match mt {
        "llama" | "mistral" | "qwen2" => Ok(Family::Decoder),
        "bert" => Ok(Family::Bert),
        other => bail!("unsupported model_type {other:?}; ferrule supports {}", SUPPORTED_MODEL_TYPES.join(", ")),
    }
}

fn req_usize(c: &Value, key: &str) -> Result<usize> {
    c.get(key).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| anyhow!("config.json: missing or non-integer {key:?}"))
}
fn opt_usize(c: &Value, key: &str) -> Option<usize> {
    c.get(key).and_then(Value::as_u64).map(|v| v as usize)
}
fn opt_f64(c: &Value, key: &str) -> Option<f64> {
    c.get(key).and_then(Value::as_f64)
}
fn opt_bool(c: &Value, key: &str) -> Option<bool> {
    c.get(key).and_then(Value::as_bool)
}

/// A Llama-shaped decoder (Llama, Mistral, Qwen2, SmolLM2).
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    /// Bias on q/k/v projections (Qwen2 always; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// The embedding's `padding_idx` (transformers: `nn.Embedding(..., config.pad_token_id)`):
    /// its row gets no gradient.
    pub pad_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl DecoderConfig {
    pub fn from_json(c: &Value) -> Result<Self> {
        let model_type = c.get("model_type").and_then(Value::as_str).unwrap_or("llama").to_string();
        let hidden_size = req_usize(c, "hidden_size")?;
        let heads = req_usize(c, "num_attention_heads")?;
        let kv = opt_usize(c, "num_key_value_heads").unwrap_or(heads);
        if heads == 0 || kv == 0 || heads % kv != 0 {
            bail!("config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
        }
        let head_dim = opt_usize(c, "head_dim").unwrap_or(hidden_size / heads);
        if let Some(act) = c.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                bail!("config.json: hidden_act {act:?} is not supported for {model_type} (expected \"silu\")")
            }
        }
        // transformers 5 moves rope settings into `rope_parameters`; older files use
        // top-level `rope_theta` and `rope_scaling`.
        let params = c.get("rope_parameters").filter(|v| v.is_object());
        let scaling_obj = params.or_else(|| c.get("rope_scaling").filter(|v| v.is_object()));
        let rope_theta = params.and_then(|p| opt_f64(p, "rope_theta")).or_else(|| opt_f64(c, "rope_theta")).unwrap_or(10000.0);
        let rope_scaling = match scaling_obj {
            None => RopeScaling::Default,
            Some(s) => {
                let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
                let factor = opt_f64(s, "factor");
                match kind {
                    "default" => RopeScaling::Default,
                    "linear" => RopeScaling::Linear { factor: factor.ok_or_else(|| anyhow!("config.json: linear rope scaling needs \"factor\""))? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: factor.ok_or_else(|| anyhow!("config.json: llama3 rope scaling needs \"factor\""))?,
                        low_freq_factor: opt_f64(s, "low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: opt_f64(s, "high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: opt_f64(s, "original_max_position_embeddings").unwrap_or(8192.0),
                    },
                    other => bail!("config.json: rope type {other:?} is not supported (default, linear, llama3 are)"),
                }
            }
        };
        let (qkv_bias, o_bias) = match model_type.as_str() {
            "qwen2" => (true, false),
            _ => {
                let b = opt_bool(c, "attention_bias").unwrap_or(false);
                (b, b)
            }
        };
        let sliding_window = match model_type.as_str() {
            "mistral" => opt_usize(c, "sliding_window"),
            "qwen2" if opt_bool(c, "use_sliding_window").unwrap_or(false) => opt_usize(c, "sliding_window"),
            _ => None,
        };
        let eos_token_ids = match c.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
            _ => vec![],
        };
        Ok(Self {
            vocab_size: req_usize(c, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(c, "intermediate_size")?,
            num_hidden_layers: req_usize(c, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: opt_f64(c, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize(c, "max_position_embeddings").unwrap_or(2048),
            tie_word_embeddings: opt_bool(c, "tie_word_embeddings").unwrap_or(false),
            sliding_window,
            qkv_bias,
            o_bias,
            mlp_bias: opt_bool(c, "mlp_bias").unwrap_or(false),
            bos_token_id: opt_usize(c, "bos_token_id").map(|v| v as u32),
            pad_token_id: opt_usize(c, "pad_token_id").map(|v| v as u32),
            eos_token_ids,
            model_type,
        })
    }
}

/// A BERT-family encoder.
#[derive(Clone, Debug)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    pub initializer_range: f64,
    /// Number of classes for sequence classification (`num_labels` or `id2label`).
    pub num_labels: usize,
}

impl BertConfig {
    pub fn from_json(c: &Value) -> Result<Self> {
        if let Some(act) = c.get("hidden_act").and_then(Value::as_str) {
            if act != "gelu" {
                bail!("config.json: hidden_act {act:?} is not supported for bert (expected \"gelu\")")
            }
        }
        if let Some(p) = c.get("position_embedding_type").and_then(Value::as_str) {
            if p != "absolute" {
                bail!("config.json: position_embedding_type {p:?} is not supported (expected \"absolute\")")
            }
        }
        let num_labels = opt_usize(c, "num_labels").or_else(|| c.get("id2label").and_then(Value::as_object).map(|m| m.len())).unwrap_or(2);
        Ok(Self {
            vocab_size: req_usize(c, "vocab_size")?,
            hidden_size: req_usize(c, "hidden_size")?,
            num_hidden_layers: req_usize(c, "num_hidden_layers")?,
            num_attention_heads: req_usize(c, "num_attention_heads")?,
            intermediate_size: req_usize(c, "intermediate_size")?,
            max_position_embeddings: opt_usize(c, "max_position_embeddings").unwrap_or(512),
            type_vocab_size: opt_usize(c, "type_vocab_size").unwrap_or(2),
            layer_norm_eps: opt_f64(c, "layer_norm_eps").unwrap_or(1e-12),
            pad_token_id: opt_usize(c, "pad_token_id").unwrap_or(0) as u32,
            initializer_range: opt_f64(c, "initializer_range").unwrap_or(0.02),
            num_labels,
        })
    }
}
