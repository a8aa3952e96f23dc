//! Prefix tuning (PEFT `PREFIX_TUNING`; Li & Liang 2021): trained keys and values before every
//! attention layer's own, everything else frozen. On a grouped-query model the prefix has the
//! key/value heads' width, as peft makes it (`token_dim = hidden / heads · kv_heads`).

pub mod config;
pub mod layer;

use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde_json::{Map, Value};

pub use config::PrefixTuningConfig;
use layer::{Prefix, PrefixEncoder};

use super::config::AdapterConfig;
use super::core::{AnyTunerCore, TunerCore};
use super::prompt_learning::{self, ModelDims};
use super::registry::{BuildContext, Method};
use super::target::MatchReport;
use super::{AdaptedModule, Tuner, Update};
use crate::init::{kaiming_uniform, normal, uniform};
use crate::model::{AttentionInfo, KvPrefix, Linear, LinearInfo, ModelHook};
use crate::ops::FrozenLinear;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "prefix-tuning",
    peft_type: "PREFIX_TUNING",
    summary:
        "prefix tuning: trained keys and values before every attention layer's (Li & Liang 2021)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: None,
    trains_whole_model: false,
    f32_weights: None,
};

/// PEFT's key for the prefix table (`get_peft_model_state_dict`, prompt learning).
pub const PROMPT_KEY: &str = "prompt_embeddings";
/// Keys of the MLP reparameterisation while it trains (peft's parameter names, adapter name
/// dropped); checkpoints hold these, the final adapter the table they compute.
const EMBEDDING_KEY: &str = "prompt_encoder.embedding.weight";

fn complete(_options: &mut Map<String, Value>, _model_type: &str) -> Result<()> {
    Ok(())
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: PrefixTuningConfig = config.typed("prefix_tuning")?;
    cfg.validate()?;
    Ok(Box::new(PrefixTuning::new(cfg, ctx)))
}

/// Trains a key/value prefix for a [`PrefixTuningConfig`].
pub struct PrefixTuning {
    /// The config sits in a `Mutex`: the model's dimensions are filled in while it is built.
    core: TunerCore<Mutex<PrefixTuningConfig>>,
    /// The MLP's parameters when the prefix is computed (`prefix_projection`, not a saved table).
    projected: Mutex<Option<PrefixShape>>,
}

#[derive(Clone, Copy)]
struct PrefixShape {
    num_tokens: usize,
    num_layers: usize,
    kv_dim: usize,
}

impl PrefixTuning {
    pub fn new(config: PrefixTuningConfig, ctx: BuildContext) -> Self {
        let saved = prompt_learning::modules_to_save(&config.common);
        Self {
            core: TunerCore::new(&METHOD, Mutex::new(config), saved, ctx),
            projected: Mutex::new(None),
        }
    }

    /// A trainable tensor initialised as torch initialises the module (`nn.Embedding`:
    /// N(0, 1); `nn.Linear`: Kaiming-uniform weight with a = √5, bias U(±1/√fan_in)), or zeros.
    fn param(&self, key: &str, shape: &[usize], init: Init) -> Result<Var> {
        let (seed, dev) = (self.core.init_seed(key), self.core.params.device());
        self.core.params.take_or_init(key, shape, || match init {
            Init::Zero => Ok(Tensor::zeros(shape, candle_core::DType::F32, dev)?),
            Init::Embedding => normal(shape, 1.0, seed, dev),
            Init::Weight => kaiming_uniform(shape, 5f64.sqrt(), seed, dev),
            Init::Bias(fan_in) => uniform(shape, 1.0 / (fan_in as f64).sqrt(), seed, dev),
        })
    }

    fn encoder(&self, config: &PrefixTuningConfig, shape: PrefixShape) -> Result<PrefixEncoder> {
        let width = shape.num_layers * 2 * shape.kv_dim;
        let zero = config.zero_init();
        // A saved adapter holds the table whatever produced it (peft loads it the same way).
        let params = &self.core.params;
        let saved_table = params.loading() && !params.has_saved(EMBEDDING_KEY);
        if !config.prefix_projection || saved_table {
            let init = if zero { Init::Zero } else { Init::Embedding };
            return Ok(PrefixEncoder::Table(self.param(
                PROMPT_KEY,
                &[shape.num_tokens, width],
                init,
            )?));
        }
        let hidden = config.encoder_hidden_size.context("prefix_tuning: encoder_hidden_size is unset (kv_prefix fills it before the encoder is built)")?;
        let last = |fan_in| if zero { Init::Zero } else { Init::Bias(fan_in) };
        let enc = PrefixEncoder::Projected {
            embedding: self.param(
                EMBEDDING_KEY,
                &[shape.num_tokens, shape.kv_dim],
                Init::Embedding,
            )?,
            w1: self.param(
                "prompt_encoder.transform.0.weight",
                &[hidden, shape.kv_dim],
                Init::Weight,
            )?,
            b1: self.param(
                "prompt_encoder.transform.0.bias",
                &[hidden],
                Init::Bias(shape.kv_dim),
            )?,
            w2: self.param(
                "prompt_encoder.transform.2.weight",
                &[width, hidden],
                if zero { Init::Zero } else { Init::Weight },
            )?,
            b2: self.param("prompt_encoder.transform.2.bias", &[width], last(hidden))?,
        };
        *self.projected.lock().unwrap() = Some(shape);
        Ok(enc)
    }
}

#[derive(Clone, Copy)]
enum Init {
    Zero,
    Embedding,
    Weight,
    Bias(usize),
}

impl ModelHook for PrefixTuning {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        Ok(self.core.route_linear(info, base)?.unadapted())
    }

    /// Decoders only: peft 0.21 cannot run prefix tuning on BERT with transformers 5 (its
    /// forward looks for a `past_key_values` argument BERT no longer has), so there is no
    /// reference to match, and the encoder has no prefix point yet.
    fn kv_prefix(&self, info: &AttentionInfo) -> Result<Option<Box<dyn KvPrefix>>> {
        if info.num_heads * info.head_dim != info.hidden_size {
            bail!(
                "prefix_tuning: this model's head_dim ({}) is not hidden_size / num_attention_heads ({} / {}); peft's prefix layout assumes it is",
                info.head_dim,
                info.hidden_size,
                info.num_heads
            )
        }
        let mut config = self.core.config.lock().unwrap();
        let kv_dim = info.num_kv_heads * info.head_dim;
        let dims = ModelDims {
            token_dim: kv_dim,
            num_attention_heads: info.num_kv_heads,
            num_layers: info.num_layers,
        };
        config.common.fill_dims(
            "prefix_tuning",
            dims,
            &["token_dim", "num_attention_heads", "num_layers"],
        )?;
        config.encoder_hidden_size.get_or_insert(kv_dim);
        let shape = PrefixShape {
            num_tokens: config.common.virtual_tokens("prefix_tuning")?,
            num_layers: info.num_layers,
            kv_dim,
        };
        let encoder = self.encoder(&config, shape)?;
        let params = self
            .core
            .params
            .trainable()
            .iter()
            .filter(|(k, _)| k.starts_with("prompt_"))
            .map(|(_, v)| v.elem_count())
            .sum();
        let detail = format!(
            "{} prefix positions × {} layers, keys and values of {kv_dim}",
            shape.num_tokens, shape.num_layers
        );
        let module = AdaptedModule {
            path: "attention key/value prefix".into(),
            params,
            detail,
        };
        self.core.record(module, ());
        Ok(Some(Box::new(Prefix {
            encoder,
            num_tokens: shape.num_tokens,
            num_layers: shape.num_layers,
            kv_dim,
        })))
    }
}

impl Tuner for PrefixTuning {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        self.core.check_finished("this model's attention takes no key/value prefix (decoders do; BERT-family encoders do not yet, and peft 0.21 with transformers 5 cannot run prefix tuning on them either)")
    }

    /// With `prefix_projection`, the table the MLP computes, as peft's
    /// `get_prompt_embedding_to_save` saves it; the MLP itself is not saved.
    fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let trainable = self.core.params.trainable();
        if self.projected.lock().unwrap().is_none() {
            return Ok(trainable
                .into_iter()
                .map(|(k, v)| (k, v.as_tensor().clone()))
                .collect());
        }
        let get = |k: &str| {
            self.core
                .params
                .get(k)
                .with_context(|| format!("prefix_tuning: {k} missing"))
        };
        let enc = PrefixEncoder::Projected {
            embedding: get(EMBEDDING_KEY)?,
            w1: get("prompt_encoder.transform.0.weight")?,
            b1: get("prompt_encoder.transform.0.bias")?,
            w2: get("prompt_encoder.transform.2.weight")?,
            b2: get("prompt_encoder.transform.2.bias")?,
        };
        let mut out = vec![(PROMPT_KEY.to_string(), enc.table()?.detach())];
        out.extend(
            trainable
                .into_iter()
                .filter(|(k, _)| !k.starts_with("prompt_encoder."))
                .map(|(k, v)| (k, v.as_tensor().clone())),
        );
        Ok(out)
    }

    fn updates(&self) -> Result<Vec<(String, Update)>> {
        Err(prompt_learning::no_merge(METHOD.peft_type))
    }
}
