//! Hugging Face `config.json` parsing for the supported families.

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

use crate::ops::rope::RopeScaling;
use crate::util::json_keys::Keys;

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
    let mt = config
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            anyhow!(
                "no \"model_type\"; ferrule supports {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            )
        })?;
    match mt {
        "llama" | "mistral" | "qwen2" => Ok(Family::Decoder),
        "bert" => Ok(Family::Bert),
        other => bail!(
            "unsupported model_type {other:?}; ferrule supports {}",
            SUPPORTED_MODEL_TYPES.join(", ")
        ),
    }
}

/// Parses `config` for its family, so that a bad key fails when the model is loaded.
pub fn check(config: &Value) -> Result<()> {
    match family_of(config)? {
        Family::Decoder => DecoderConfig::from_json(config).map(drop),
        Family::Bert => BertConfig::from_json(config).map(drop),
    }
}

/// Defaults of keys a `config.json` may leave out, as transformers 5 documents them for each
/// model type (`LlamaConfig`, `MistralConfig`, `Qwen2Config`, `BertConfig` in
/// `transformers/models/<type>/configuration_<type>.py`).
pub mod defaults {
    /// `LlamaConfig.rms_norm_eps` (Qwen2 and Mistral also 1e-6).
    pub const RMS_NORM_EPS: f64 = 1e-6;
    /// `rope_theta` of Llama and Mistral (Qwen2 writes its own in every released config).
    pub const ROPE_THETA: f64 = 10000.0;
    /// `LlamaConfig.max_position_embeddings`.
    pub const MAX_POSITION_EMBEDDINGS: usize = 2048;
    /// `BertConfig.layer_norm_eps`, `max_position_embeddings`, `type_vocab_size`,
    /// `pad_token_id`, `initializer_range`, and `PretrainedConfig.num_labels`.
    pub const BERT_LAYER_NORM_EPS: f64 = 1e-12;
    pub const BERT_MAX_POSITION_EMBEDDINGS: usize = 512;
    pub const BERT_TYPE_VOCAB_SIZE: usize = 2;
    pub const BERT_PAD_TOKEN_ID: usize = 0;
    pub const BERT_INITIALIZER_RANGE: f64 = 0.02;
    pub const NUM_LABELS: usize = 2;
    /// Llama 3's rope scaling (`_compute_llama3_parameters` in `modeling_rope_utils.py`).
    pub const LLAMA3_LOW_FREQ_FACTOR: f64 = 1.0;
    pub const LLAMA3_HIGH_FREQ_FACTOR: f64 = 4.0;
    pub const LLAMA3_ORIGINAL_MAX_POSITION_EMBEDDINGS: f64 = 8192.0;
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
    /// Parses and range-checks a decoder `config.json`; errors name the key and what it holds.
    pub fn from_json(c: &Value) -> Result<Self> {
        let k = Keys::new(c);
        let model_type = k
            .str("model_type")?
            .ok_or_else(|| {
                anyhow!(
                    "no \"model_type\"; ferrule supports {}",
                    SUPPORTED_MODEL_TYPES.join(", ")
                )
            })?
            .to_string();
        let vocab_size = k.required_count("vocab_size")?;
        let hidden_size = k.required_count("hidden_size")?;
        let heads = k.required_count("num_attention_heads")?;
        // `null` or missing: as many as the query heads (transformers' LlamaConfig).
        let kv = match k.raw("num_key_value_heads") {
            None | Some(Value::Null) => heads,
            Some(_) => k.required_count("num_key_value_heads")?,
        };
        if heads % kv != 0 {
            bail!("num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
        }
        let head_dim = match k.nullable_usize("head_dim")? {
            Some(0) => bail!("\"head_dim\" is 0, expected an integer of at least 1"),
            Some(d) => d,
            None if hidden_size % heads != 0 => {
                bail!("hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({heads}) and no \"head_dim\" is given")
            }
            None => hidden_size / heads,
        };
        if let Some(act) = k.str("hidden_act")? {
            if act != "silu" {
                bail!("hidden_act {act:?} is not supported for {model_type} (expected \"silu\")")
            }
        }
        // transformers 5 moves rope settings into `rope_parameters`; older files use
        // top-level `rope_theta` and `rope_scaling`.
        let params = k.object("rope_parameters")?;
        let scaling_obj = match params {
            Some(p) => Some(p),
            None => k.object("rope_scaling")?,
        };
        let theta_in_params = match params {
            Some(p) => Keys::new(p)
                .positive("rope_theta")
                .map_err(|e| e.context("in \"rope_parameters\""))?,
            None => None,
        };
        let rope_theta = match theta_in_params {
            Some(t) => t,
            None => k.positive("rope_theta")?.unwrap_or(defaults::ROPE_THETA),
        };
        let rope_scaling = match scaling_obj {
            None => RopeScaling::Default,
            Some(obj) => rope_scaling(obj)?,
        };
        let (qkv_bias, o_bias) = match model_type.as_str() {
            "qwen2" => (true, false),
            _ => {
                let b = k.bool("attention_bias")?.unwrap_or(false);
                (b, b)
            }
        };
        let window = k.nullable_usize("sliding_window")?;
        if window == Some(0) {
            bail!("\"sliding_window\" is 0, expected an integer of at least 1 or null")
        }
        let sliding_window = match model_type.as_str() {
            "mistral" => window,
            "qwen2" if k.bool("use_sliding_window")?.unwrap_or(false) => window,
            _ => None,
        };
        let eos_token_ids = match k.raw("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => {
                let ids: Option<Vec<i64>> = a.iter().map(Value::as_i64).collect();
                let ids =
                    ids.ok_or_else(|| k.wrong("eos_token_id", "an integer or a list of integers"))?;
                ids.into_iter()
                    .filter(|&i| i >= 0)
                    .map(|i| i as u32)
                    .collect()
            }
            Some(_) => k.marker_id("eos_token_id")?.into_iter().collect(),
        };
        let config = Self {
            vocab_size,
            hidden_size,
            intermediate_size: k.required_count("intermediate_size")?,
            num_hidden_layers: k.required_count("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: k
                .positive("rms_norm_eps")?
                .unwrap_or(defaults::RMS_NORM_EPS),
            rope_theta,
            rope_scaling,
            max_position_embeddings: k
                .count("max_position_embeddings")?
                .unwrap_or(defaults::MAX_POSITION_EMBEDDINGS),
            tie_word_embeddings: k.bool("tie_word_embeddings")?.unwrap_or(false),
            sliding_window,
            qkv_bias,
            o_bias,
            mlp_bias: k.bool("mlp_bias")?.unwrap_or(false),
            bos_token_id: k.marker_id("bos_token_id")?,
            pad_token_id: k.token_id("pad_token_id", vocab_size)?,
            eos_token_ids,
            model_type,
        };
        note_unread(&k);
        Ok(config)
    }
}

/// Debug-level note of the `config.json` keys nothing reads (`quantization_config` is read by
/// `quant::bnb_format`, `label2id` goes with `id2label`).
fn note_unread(k: &Keys) {
    for elsewhere in ["quantization_config", "label2id"] {
        k.raw(elsewhere);
    }
    k.note_unread("config.json");
}

/// `rope_scaling` / `rope_parameters` (transformers `modeling_rope_utils.py`).
fn rope_scaling(obj: &Value) -> Result<RopeScaling> {
    let s = Keys::new(obj);
    let inner = || -> Result<RopeScaling> {
        let kind = match s.str("rope_type")? {
            Some(t) => t,
            None => s.str("type")?.unwrap_or("default"),
        };
        let factor = s.positive("factor")?;
        Ok(match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: factor.ok_or_else(|| anyhow!("linear rope scaling needs \"factor\""))?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: factor.ok_or_else(|| anyhow!("llama3 rope scaling needs \"factor\""))?,
                low_freq_factor: s
                    .positive("low_freq_factor")?
                    .unwrap_or(defaults::LLAMA3_LOW_FREQ_FACTOR),
                high_freq_factor: s
                    .positive("high_freq_factor")?
                    .unwrap_or(defaults::LLAMA3_HIGH_FREQ_FACTOR),
                original_max_position_embeddings: s
                    .positive("original_max_position_embeddings")?
                    .unwrap_or(defaults::LLAMA3_ORIGINAL_MAX_POSITION_EMBEDDINGS),
            },
            other => bail!("rope type {other:?} is not supported (default, linear, llama3 are)"),
        })
    };
    inner().map_err(|e| anyhow!("{e} (in rope_scaling / rope_parameters)"))
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
    /// Parses and range-checks a BERT `config.json`; errors name the key and what it holds.
    pub fn from_json(c: &Value) -> Result<Self> {
        let k = Keys::new(c);
        if let Some(act) = k.str("hidden_act")? {
            if act != "gelu" {
                bail!("hidden_act {act:?} is not supported for bert (expected \"gelu\")")
            }
        }
        if let Some(p) = k.str("position_embedding_type")? {
            if p != "absolute" {
                bail!("position_embedding_type {p:?} is not supported (expected \"absolute\")")
            }
        }
        let num_labels = match k.count("num_labels")? {
            Some(n) => n,
            None => match k.raw("id2label") {
                None | Some(Value::Null) => defaults::NUM_LABELS,
                Some(Value::Object(m)) if !m.is_empty() => m.len(),
                Some(_) => return Err(k.wrong("id2label", "a non-empty object")),
            },
        };
        let vocab_size = k.required_count("vocab_size")?;
        let hidden_size = k.required_count("hidden_size")?;
        let num_attention_heads = k.required_count("num_attention_heads")?;
        if hidden_size % num_attention_heads != 0 {
            bail!("hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads})")
        }
        let config = Self {
            vocab_size,
            hidden_size,
            num_hidden_layers: k.required_count("num_hidden_layers")?,
            num_attention_heads,
            intermediate_size: k.required_count("intermediate_size")?,
            max_position_embeddings: k
                .count("max_position_embeddings")?
                .unwrap_or(defaults::BERT_MAX_POSITION_EMBEDDINGS),
            type_vocab_size: k
                .count("type_vocab_size")?
                .unwrap_or(defaults::BERT_TYPE_VOCAB_SIZE),
            layer_norm_eps: k
                .positive("layer_norm_eps")?
                .unwrap_or(defaults::BERT_LAYER_NORM_EPS),
            pad_token_id: k
                .token_id("pad_token_id", vocab_size)?
                .unwrap_or(defaults::BERT_PAD_TOKEN_ID as u32),
            initializer_range: k
                .positive("initializer_range")?
                .unwrap_or(defaults::BERT_INITIALIZER_RANGE),
            num_labels,
        };
        note_unread(&k);
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(model: &str) -> Value {
        let path = format!(
            "{}/../../tests/fixtures/models/{model}/config.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn err_with(model: &str, key: &str, value: Value) -> String {
        let mut c = fixture(model);
        c[key] = value;
        check(&c)
            .expect_err(&format!("{key} = {} must be refused", c[key]))
            .to_string()
    }

    /// The values the fuzzing of issue 13 found accepted; each now fails naming the key.
    #[test]
    fn wrong_types_and_ranges_name_the_key() {
        use serde_json::json;
        for v in [
            json!("x"),
            json!([]),
            json!(true),
            json!(null),
            json!(-1),
            json!(0),
        ] {
            let e = err_with("llama", "rms_norm_eps", v.clone());
            assert!(
                e.contains("\"rms_norm_eps\" is")
                    && (e.contains("finite number") || e.contains("greater than 0")),
                "{v}: {e}"
            );
        }
        assert!(err_with("llama", "rope_parameters", json!("x"))
            .contains("\"rope_parameters\" is \"x\", expected an object or null"));
        assert!(err_with("llama", "sliding_window", json!(0)).contains("\"sliding_window\" is 0"));
        assert!(err_with("llama", "num_key_value_heads", json!(3))
            .contains("multiple of num_key_value_heads (3)"));
        assert!(err_with("llama", "num_attention_heads", json!(0))
            .contains("\"num_attention_heads\" is 0, expected an integer of at least 1"));
        assert!(err_with("llama", "hidden_size", json!(2.5)).contains("\"hidden_size\" is 2.5"));
        assert!(err_with("llama", "vocab_size", json!(1u64 << 40)).contains("\"vocab_size\""));
        assert!(err_with("llama", "pad_token_id", json!(100000)).contains("below vocab_size (320)"));
        assert!(err_with("llama", "tie_word_embeddings", json!("yes"))
            .contains("expected true or false"));
        assert!(err_with("llama", "eos_token_id", json!(["nope"])).contains("\"eos_token_id\""));
        assert!(err_with("llama", "rms_norm_eps", json!("é".repeat(80))).contains("...")); // cut at a character
        let mut c = fixture("llama");
        c["pad_token_id"] = json!(-1);
        c["bos_token_id"] = json!(-1);
        c["eos_token_id"] = json!([-1, 2]);
        c["num_key_value_heads"] = Value::Null;
        let d = DecoderConfig::from_json(&c).unwrap();
        assert_eq!(
            (
                d.pad_token_id,
                d.bos_token_id,
                d.eos_token_ids.as_slice(),
                d.num_key_value_heads
            ),
            (Some(319), None, &[2u32][..], d.num_attention_heads)
        );
        assert!(err_with("llama", "head_dim", json!(0)).contains("\"head_dim\" is 0"));
        assert!(
            err_with("bert", "layer_norm_eps", json!("x")).contains("\"layer_norm_eps\" is \"x\"")
        );
        assert!(err_with("bert", "num_attention_heads", json!(5))
            .contains("not a multiple of num_attention_heads (5)"));
        assert!(err_with("bert", "id2label", json!([])).contains("\"id2label\""));
        let mut c = fixture("llama");
        c["rope_parameters"] = json!({"rope_type": "linear", "factor": "x"});
        assert!(check(&c)
            .unwrap_err()
            .to_string()
            .contains("\"factor\" is \"x\""));
        c.as_object_mut().unwrap().remove("model_type");
        let e = check(&c).unwrap_err().to_string();
        assert!(
            e.contains("no \"model_type\"") && e.contains("llama, mistral, qwen2, bert"),
            "{e}"
        );
    }

    #[test]
    fn missing_and_null_keys_take_the_documented_defaults() {
        let mut c = fixture("llama");
        let o = c.as_object_mut().unwrap();
        for k in [
            "rms_norm_eps",
            "max_position_embeddings",
            "rope_parameters",
            "rope_theta",
            "num_key_value_heads",
        ] {
            o.remove(k);
        }
        o.insert("sliding_window".into(), Value::Null);
        o.insert("pad_token_id".into(), Value::Null);
        let d = DecoderConfig::from_json(&c).unwrap();
        assert_eq!(
            (d.rms_norm_eps, d.rope_theta, d.max_position_embeddings),
            (
                defaults::RMS_NORM_EPS,
                defaults::ROPE_THETA,
                defaults::MAX_POSITION_EMBEDDINGS
            )
        );
        assert_eq!(
            (d.num_key_value_heads, d.sliding_window, d.pad_token_id),
            (d.num_attention_heads, None, None)
        );
        assert!(check(&fixture("bert")).is_ok() && check(&fixture("qwen2")).is_ok());
    }
}
