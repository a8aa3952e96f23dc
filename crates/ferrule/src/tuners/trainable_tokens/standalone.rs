//! peft's standalone trainable tokens (`TrainableTokensModel`, `peft_type` `TRAINABLE_TOKENS`):
//! only the listed rows of the token embedding (and of what `target_modules` selects) train.
//! The layers are [`super::TrainableTokens`]'s, saved in its [`Layout::Direct`] keys.

use anyhow::{anyhow, Result};
use candle_core::Tensor;
use serde_json::{Map, Value};

use super::config::{TrainableTokensConfig, KNOWN_KEYS, TOKEN_INDICES_FLAG};
use super::{Layout, Listed, TokenLinear, TrainableTokens};
use crate::model::{Embedding, EmbeddingInfo, Linear, LinearInfo, ModelHook};
use crate::ops::{FrozenLinear, FrozenWeight};
use crate::tuners::core::{AnyTunerCore, TunerCore};
use crate::tuners::modules_to_save::ModulesToSave;
use crate::tuners::registry::{BuildContext, Method};
use crate::tuners::target::{MatchReport, Targets};
use crate::tuners::{AdaptedModule, AdapterConfig, Tuner, Update};

/// The registry entry.
pub static METHOD: Method = Method {
    name: "trainable-tokens",
    peft_type: "TRAINABLE_TOKENS",
    summary: "Trainable tokens: only the listed rows of the token embedding train (peft's TrainableTokensModel)",
    keys: KNOWN_KEYS,
    complete,
    build,
    flags: &[TOKEN_INDICES_FLAG],
    complete_flags: Some(super::config::complete_flags),
    count_from_shapes: None,
    trains_whole_model: false,
    f32_weights: None,
};

/// `target_modules` left unset means the token embedding, whatever its path.
fn complete(_options: &mut Map<String, Value>, _model_type: &str) -> Result<()> {
    Ok(())
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: TrainableTokensConfig = config.typed("trainable_tokens")?;
    Ok(Box::new(StandaloneTokens::new(cfg, ctx)?))
}

/// The tuner: rows of tables, no other module.
pub struct StandaloneTokens {
    core: TunerCore<TrainableTokensConfig>,
    tokens: TrainableTokens,
}

impl StandaloneTokens {
    pub fn new(config: TrainableTokensConfig, ctx: BuildContext) -> Result<Self> {
        config.validate()?;
        let label = "trainable_tokens: token_indices";
        let ids = config.token_indices.clone();
        let listed = match &config.target_modules {
            None => Listed::Lora(super::TokenIndices::Embedding(ids)),
            Some(spec) => Listed::Targets {
                targets: Box::new(
                    Targets::new("target_modules", spec, None)
                        .map_err(|e| anyhow!("trainable_tokens: {e:#}"))?,
                ),
                ids,
            },
        };
        let random = (!config.init_weights).then_some(ctx.seed);
        let tokens = TrainableTokens::with(Some(listed), label, Layout::Direct).random_rows(random);
        Ok(Self {
            core: TunerCore::new(&METHOD, config, ModulesToSave::new(None), ctx),
            tokens,
        })
    }
}

impl ModelHook for StandaloneTokens {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        Ok(match self.tokens.linear(info, base, &self.core.params)? {
            TokenLinear::Rows(layer) => layer,
            TokenLinear::NotListed(base) => Box::new(base),
        })
    }

    fn embedding(&self, info: &EmbeddingInfo, base: FrozenWeight) -> Result<Box<dyn Embedding>> {
        if !self.tokens.takes_embedding(&info.path) {
            return Ok(Box::new(base));
        }
        self.tokens.embedding(info, base, &self.core.params)
    }
}

impl Tuner for StandaloneTokens {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        self.tokens.check_finished()?;
        self.core.params.check_all_used()?;
        Ok(vec![])
    }

    fn adapted(&self) -> Vec<AdaptedModule> {
        self.tokens.adapted()
    }

    /// peft fills `target_modules` in with the embedding's path when it was left unset.
    fn config_json(&self) -> Result<Value> {
        let mut json = serde_json::to_value(&self.core.config)?;
        if self.core.config.target_modules.is_none() {
            if let Some(path) = self.tokens.embedding_path() {
                json["target_modules"] = Value::from(path);
            }
        }
        Ok(json)
    }

    fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .trainable()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        out.extend(self.tokens.saved_tables()?);
        Ok(out)
    }

    /// The rows replace the table's: nothing is added.
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        Ok(vec![])
    }

    fn replaced(&self) -> Result<Vec<(String, Tensor)>> {
        self.tokens.replaced()
    }
}
