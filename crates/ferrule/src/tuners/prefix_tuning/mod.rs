//! Prefix tuning (PEFT `PREFIX_TUNING`; Li & Liang 2021): trained keys and values before every
//! attention layer's own, everything else frozen. On a grouped-query model the prefix has the
//! key/value heads' width, as peft makes it (`token_dim = hidden / heads · kv_heads`).

pub mod config;
pub mod layer;

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde_json::{Map, Value};

pub use config::PrefixTuningConfig;
use layer::{Prefix, PrefixEncoder};

use super::config::AdapterConfig;
use super::mode::Mode;
use super::modules_to_save::ModulesToSave;
use super::params::ParamStore;
use super::prompt_learning::{self, ModelDims};
use super::registry::{BuildContext, Method};
use super::target::MatchReport;
use super::{AdaptedModule, Tuner, Update};
use crate::init::{kaiming_uniform, normal, seed_for, uniform};
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
    config: Mutex<PrefixTuningConfig>,
    seed: u64,
    mode: Arc<Mode>,
    params: ParamStore,
    saved: ModulesToSave,
    /// The MLP's parameters when the prefix is computed (`prefix_projection`, not a saved table).
    projected: Mutex<Option<PrefixShape>>,
    adapted: Mutex<Vec<AdaptedModule>>,
}

#[derive(Clone, Copy)]
struct PrefixShape {
    num_tokens: usize,
    num_layers: usize,
    kv_dim: usize,
}

impl PrefixTuning {
    pub fn new(config: PrefixTuningConfig, ctx: BuildContext) -> Self {
        Self {
            saved: prompt_learning::modules_to_save(&config.common),
            config: Mutex::new(config),
            seed: ctx.seed,
            mode: Arc::new(Mode::new(ctx.seed)),
            params: ParamStore::new(ctx.device, ctx.weights),
            projected: Mutex::new(None),
            adapted: Mutex::new(Vec::new()),
        }
    }

    /// A trainable tensor initialised as torch initialises the module (`nn.Embedding`:
    /// N(0, 1); `nn.Linear`: Kaiming-uniform weight with a = √5, bias U(±1/√fan_in)), or zeros.
    fn param(&self, key: &str, shape: &[usize], init: Init) -> Result<Var> {
        let (seed, dev) = (seed_for(self.seed, key), self.params.device());
        self.params.take_or_init(key, shape, || match init {
            Init::Zero => Ok(Tensor::zeros(shape, candle_core::DType::F32, dev)?),
            Init::Embedding => normal(shape, 1.0, seed, dev),
            Init::Weight => kaiming_uniform(shape, 5f64.sqrt(), seed, dev),
            Init::Bias(fan_in) => uniform(shape, 1.0 / (fan_in as f64).sqrt(), seed, dev),
        })
    }

    fn encoder(&self, cfg: &PrefixTuningConfig, s: PrefixShape) -> Result<PrefixEncoder> {
        let width = s.num_layers * 2 * s.kv_dim;
        let zero = cfg.zero_init();
        // A saved adapter holds the table whatever produced it (peft loads it the same way).
        let saved_table = self.params.loading() && !self.params.has_saved(EMBEDDING_KEY);
        if !cfg.prefix_projection || saved_table {
            let init = if zero { Init::Zero } else { Init::Embedding };
            return Ok(PrefixEncoder::Table(self.param(
                PROMPT_KEY,
                &[s.num_tokens, width],
                init,
            )?));
        }
        let h = cfg.encoder_hidden_size.context("prefix_tuning: encoder_hidden_size is unset (kv_prefix fills it before the encoder is built)")?;
        let last = |fan_in| if zero { Init::Zero } else { Init::Bias(fan_in) };
        let enc = PrefixEncoder::Projected {
            embedding: self.param(EMBEDDING_KEY, &[s.num_tokens, s.kv_dim], Init::Embedding)?,
            w1: self.param(
                "prompt_encoder.transform.0.weight",
                &[h, s.kv_dim],
                Init::Weight,
            )?,
            b1: self.param(
                "prompt_encoder.transform.0.bias",
                &[h],
                Init::Bias(s.kv_dim),
            )?,
            w2: self.param(
                "prompt_encoder.transform.2.weight",
                &[width, h],
                if zero { Init::Zero } else { Init::Weight },
            )?,
            b2: self.param("prompt_encoder.transform.2.bias", &[width], last(h))?,
        };
        *self.projected.lock().unwrap() = Some(s);
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
        prompt_learning::linear(&self.saved, info, base, &self.params)
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
        let mut cfg = self.config.lock().unwrap();
        let kv_dim = info.num_kv_heads * info.head_dim;
        let dims = ModelDims {
            token_dim: kv_dim,
            num_attention_heads: info.num_kv_heads,
            num_layers: info.num_layers,
        };
        cfg.common.fill_dims(
            "prefix_tuning",
            dims,
            &["token_dim", "num_attention_heads", "num_layers"],
        )?;
        cfg.encoder_hidden_size.get_or_insert(kv_dim);
        let shape = PrefixShape {
            num_tokens: cfg.common.virtual_tokens("prefix_tuning")?,
            num_layers: info.num_layers,
            kv_dim,
        };
        let encoder = self.encoder(&cfg, shape)?;
        let params = self
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
        self.adapted.lock().unwrap().push(AdaptedModule {
            path: "attention key/value prefix".into(),
            params,
            detail,
        });
        Ok(Some(Box::new(Prefix {
            encoder,
            num_tokens: shape.num_tokens,
            num_layers: shape.num_layers,
            kv_dim,
        })))
    }
}

impl Tuner for PrefixTuning {
    fn method(&self) -> &'static Method {
        &METHOD
    }

    fn mode(&self) -> &Arc<Mode> {
        &self.mode
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        if self.adapted.lock().unwrap().is_empty() {
            bail!("prefix_tuning: this model's attention takes no key/value prefix (decoders do; BERT-family encoders do not yet, and peft 0.21 with transformers 5 cannot run prefix tuning on them either)")
        }
        self.params.check_all_used()?;
        Ok(vec![])
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    fn adapted(&self) -> Vec<AdaptedModule> {
        self.adapted.lock().unwrap().clone()
    }

    fn config_json(&self) -> Result<Value> {
        Ok(serde_json::to_value(&*self.config.lock().unwrap())?)
    }

    /// With `prefix_projection`, the table the MLP computes, as peft's
    /// `get_prompt_embedding_to_save` saves it; the MLP itself is not saved.
    fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let trainable = self.params.trainable();
        if self.projected.lock().unwrap().is_none() {
            return Ok(trainable
                .into_iter()
                .map(|(k, v)| (k, v.as_tensor().clone()))
                .collect());
        }
        let get = |k: &str| {
            self.params
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

    fn replaced(&self) -> Vec<(String, Tensor)> {
        self.saved.replaced(&self.params)
    }
}
