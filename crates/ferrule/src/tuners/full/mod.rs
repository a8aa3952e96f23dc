//! Full fine-tuning (`--method full`): every parameter the model offers trains, or those whose
//! Hugging Face name `--trainable REGEX` matches. The trainable tensors are f32 copies of the
//! base's, kept under their Hugging Face names (`model.layers.0.mlp.up_proj.weight`), and a
//! finished run writes the whole model as a Hugging Face folder ([`Tuner::trains_whole_model`]).
//! Once a copy exists its base tensor is dropped from the loaded weights
//! ([`BuildContext::release_base`]), so memory holds one copy of each trained tensor.
//!
//! What trains: linear weights and biases (heads included), norm weights and biases, and the
//! token embedding. A head tied to the embedding (`tie_word_embeddings`) is that one tensor,
//! as in transformers. Tables the hook points do not offer stay frozen: BERT's position and
//! token-type embeddings. Weight decay applies to every trained tensor, as
//! `torch.optim.AdamW(model.parameters())` does (HF Trainer leaves biases and norm weights
//! undecayed; ferrule's default decay is 0).

pub mod config;
pub mod layer;

use std::sync::Mutex;

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde_json::{Map, Value};

pub use config::FullConfig;
use layer::{TrainedEmbedding, TrainedLinear};

use super::bias::BiasTrainedLinear;
use super::core::{AnyTunerCore, TunerCore};
use super::modules_to_save::ModulesToSave;
use super::registry::{BuildContext, Method};
use super::target::MatchReport;
use super::{AdaptedModule, AdapterConfig, Tuner, Update};
use crate::model::{
    BaseRelease, Embedding, EmbeddingInfo, Linear, LinearInfo, ModelHook, NormInfo, NormParams,
};
use crate::ops::{FrozenLinear, FrozenWeight};

/// The registry entry.
pub static METHOD: Method = Method {
    name: "full",
    peft_type: "FULL",
    summary: "Full fine-tuning: every parameter trains (or those --trainable matches); the run saves a Hugging Face model folder",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: None,
    trains_whole_model: true,
    f32_weights: None,
};

fn complete(_options: &mut Map<String, Value>, _model_type: &str) -> Result<()> {
    Ok(())
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: FullConfig = config.typed("full")?;
    Ok(Box::new(Full::new(cfg, ctx)?))
}

/// The tuner: trainable copies of the selected base tensors.
pub struct Full {
    core: TunerCore<FullConfig>,
    pattern: Option<regex::Regex>,
    /// The trained token table and its module path, which a tied head shares.
    embedding: Mutex<Option<(String, Var)>>,
    /// Drops each base tensor from the loaded weights once its trainable copy exists.
    release: Option<BaseRelease>,
}

impl Full {
    pub fn new(config: FullConfig, mut ctx: BuildContext) -> Result<Self> {
        let pattern = config.pattern()?;
        let release = ctx.release_base.take();
        Ok(Self {
            core: TunerCore::new(&METHOD, config, ModulesToSave::new(None), ctx),
            pattern,
            embedding: Mutex::new(None),
            release,
        })
    }

    /// The base tensor `base` now has its trainable copy: the loaded weights stop holding it.
    fn release(&self, base: &Tensor) {
        if let Some(release) = &self.release {
            release.release(base);
        }
    }

    /// Whether the parameter named `name` (`path.weight`) trains.
    fn selects(&self, name: &str) -> bool {
        self.pattern.as_ref().is_none_or(|p| p.is_match(name))
    }

    /// A trainable copy of `tensor`, under its Hugging Face `name`.
    fn trainable_copy(&self, name: &str, tensor: &Tensor) -> Result<Var> {
        let v = self
            .core
            .params
            .take_or_init(name, tensor.dims(), || Ok(tensor.copy()?))?;
        self.release(tensor);
        Ok(v)
    }

    /// A trainable f32 copy of a frozen matrix: a quantized checkpoint's (GGUF blocks,
    /// bitsandbytes) dequantized, as the user who fine-tunes it in full means. `--quantize`
    /// is refused before loading (`train::prepare`); a matrix sharded over ranks is refused.
    fn trainable_matrix(&self, name: &str, weight: &FrozenWeight) -> Result<Var> {
        if let FrozenWeight::Sharded(..) = weight {
            bail!(
                "full fine-tuning: {name} is sharded across ranks (--shard-base shards the \
                 frozen base); trained parameters are partitioned by --zero-stage 3 instead"
            )
        }
        let (rows, cols) = weight.dims();
        let dev = self.core.params.device().clone();
        let v =
            self.core
                .params
                .take_or_init(name, &[rows, cols], || Ok(weight.to_dense(&dev)?))?;
        if let FrozenWeight::Dense(base) = weight {
            self.release(base);
        }
        Ok(v)
    }

    fn record(&self, path: &str, tensors: &[&Tensor], detail: &str) {
        let module = AdaptedModule {
            path: path.to_string(),
            params: tensors.iter().map(|t| t.elem_count()).sum(),
            detail: detail.to_string(),
        };
        self.core.record(module, ());
    }

    /// The head shares the trained table when it is tied to it.
    fn tied_head(&self, info: &LinearInfo) -> Option<Box<dyn Linear>> {
        let tied_to = info.tied_to.as_deref()?;
        let embedding = self.embedding.lock().unwrap();
        let (path, table) = embedding.as_ref().filter(|(p, _)| p == tied_to)?;
        self.record(&info.path, &[], &format!("tied to {path}.weight"));
        Some(Box::new(TrainedLinear {
            weight: table.clone(),
            bias: None,
        }))
    }
}

impl ModelHook for Full {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        if info.tied_to.is_some() {
            // A tied head is the embedding's tensor: it trains exactly when the table does.
            return Ok(self.tied_head(info).unwrap_or_else(|| Box::new(base)));
        }
        let path = info.path.as_str();
        let (weight_name, bias_name) = (format!("{path}.weight"), format!("{path}.bias"));
        let bias = base.bias().filter(|_| self.selects(&bias_name));
        let bias = bias
            .map(|b| self.trainable_copy(&bias_name, b))
            .transpose()?;
        if !self.selects(&weight_name) {
            return Ok(match bias {
                Some(bias) => {
                    self.record(path, &[bias.as_tensor()], "bias");
                    Box::new(BiasTrainedLinear {
                        base: FrozenLinear::from_weight(base.weight().clone(), None),
                        bias,
                    })
                }
                None => Box::new(base),
            });
        }
        let weight = self.trainable_matrix(&weight_name, base.weight())?;
        let bias_tensor = match bias {
            Some(v) => Some(v.as_tensor().clone()),
            None => base.bias().cloned(),
        };
        let trained_bias = bias_tensor.as_ref().filter(|b| b.track_op());
        let detail = if trained_bias.is_some() {
            "weight and bias"
        } else {
            "weight"
        };
        let tensors: Vec<&Tensor> = [Some(weight.as_tensor()), trained_bias]
            .into_iter()
            .flatten()
            .collect();
        self.record(path, &tensors, detail);
        Ok(Box::new(TrainedLinear {
            weight,
            bias: bias_tensor,
        }))
    }

    fn norm(&self, info: &NormInfo, frozen: NormParams) -> Result<NormParams> {
        let path = info.path.as_str();
        let mut trained: Vec<Tensor> = Vec::new();
        let mut take = |suffix: &str, t: Tensor| -> Result<Tensor> {
            let name = format!("{path}.{suffix}");
            if !self.selects(&name) {
                return Ok(t);
            }
            let v = self.trainable_copy(&name, &t)?.as_tensor().clone();
            trained.push(v.clone());
            Ok(v)
        };
        let weight = take("weight", frozen.weight)?;
        let bias = frozen.bias.map(|b| take("bias", b)).transpose()?;
        if !trained.is_empty() {
            let refs: Vec<&Tensor> = trained.iter().collect();
            self.record(path, &refs, "norm");
        }
        Ok(NormParams { weight, bias })
    }

    fn embedding(&self, info: &EmbeddingInfo, base: FrozenWeight) -> Result<Box<dyn Embedding>> {
        let name = format!("{}.weight", info.path);
        if !self.selects(&name) {
            return Ok(Box::new(base));
        }
        let table = self.trainable_matrix(&name, &base)?;
        self.record(&info.path, &[table.as_tensor()], "token embedding");
        *self.embedding.lock().unwrap() = Some((info.path.clone(), table.clone()));
        Ok(Box::new(TrainedEmbedding::new(table, info.padding_idx)))
    }
}

impl Tuner for Full {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        let nothing = match &self.core.config.trainable {
            Some(p) => format!("--trainable {p:?} matched no parameter of the model"),
            None => "the model offered no parameter to train".to_string(),
        };
        self.core.check_finished(&nothing)?;
        Ok(vec![])
    }

    fn updates(&self) -> Result<Vec<(String, Update)>> {
        Ok(vec![])
    }

    /// Every trained tensor replaces the base tensor of its name.
    fn replaced(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .trainable()
            .into_iter()
            .map(|(name, v)| (name, v.as_tensor().clone()))
            .collect())
    }

    /// The trained tensors are the model's own (copies that replace the base's): counted once.
    fn trained_in_place(&self) -> usize {
        super::trainable_params(self)
    }
}
