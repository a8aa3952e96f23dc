//! LN tuning (PEFT `LN_TUNING`): the weights and biases of the targeted norm layers are
//! trained, everything else stays frozen.

pub mod config;
pub mod layer;

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use candle_core::{Tensor, Var};
use serde_json::{Map, Value};

pub use config::LnTuningConfig;
use layer::TunedNorm;

use super::config::{default_list, AdapterConfig};
use super::mode::Mode;
use super::modules_to_save::ModulesToSave;
use super::params::ParamStore;
use super::registry::{BuildContext, Method};
use super::target::{MatchReport, Targets};
use super::{check_finished, peft_key, AdaptedModule, Tuner, Update};
use crate::model::{Linear, LinearInfo, ModelHook, NormInfo, NormParams};
use crate::ops::FrozenLinear;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "ln-tuning",
    peft_type: "LN_TUNING",
    summary:
        "LN tuning: the targeted norm layers' weights and biases are trained (Zhao et al. 2023)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
};

/// PEFT's `TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING` (it has none for BERT).
pub fn default_targets(model_type: &str) -> Option<&'static [&'static str]> {
    match model_type {
        "llama" | "mistral" => Some(&["input_layernorm", "post_attention_layernorm", "norm"]),
        "qwen2" => Some(&["post_attention_layernorm"]),
        _ => None,
    }
}

fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    default_list(options, "target_modules", model_type, default_targets)
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: LnTuningConfig = config.typed("ln_tuning")?;
    Ok(Box::new(LnTuning::new(cfg, ctx)?))
}

/// Trains the norm layers an [`LnTuningConfig`] targets.
pub struct LnTuning {
    config: LnTuningConfig,
    targets: Targets,
    allow_unmatched: bool,
    mode: Arc<Mode>,
    params: ParamStore,
    saved: ModulesToSave,
    adapted: Mutex<Vec<AdaptedModule>>,
}

impl LnTuning {
    pub fn new(config: LnTuningConfig, ctx: BuildContext) -> Result<Self> {
        let target = config.target_modules.as_ref().ok_or_else(|| {
            anyhow!(
                "ln_tuning: target_modules is required (norm layer names, e.g. [\"LayerNorm\"])"
            )
        })?;
        let targets = Targets::new("target_modules", target, config.exclude_modules.as_ref())
            .context("ln_tuning")?;
        Ok(Self {
            saved: ModulesToSave::new(config.modules_to_save.as_deref()),
            targets,
            allow_unmatched: ctx.allow_unmatched,
            mode: Arc::new(Mode::new(ctx.seed)),
            params: ParamStore::new(ctx.device, ctx.weights),
            adapted: Mutex::new(Vec::new()),
            config,
        })
    }
}

impl ModelHook for LnTuning {
    /// Linear layers change only when listed in `modules_to_save`.
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        Ok(match self.saved.wrap(info, base, &self.params)? {
            Ok(full) => full,
            Err(base) => Box::new(base),
        })
    }

    fn norm(&self, info: &NormInfo, params: NormParams) -> Result<NormParams> {
        let path = info.path.as_str();
        if !self.targets.select(path, false) {
            return Ok(params);
        }
        let weight = self.params.take_or_init(
            &peft_key(path, "ln_tuning_layers.weight"),
            params.weight.dims(),
            || Ok(params.weight.copy()?),
        )?;
        let bias = match &params.bias {
            Some(b) => Some(self.params.take_or_init(
                &peft_key(path, "ln_tuning_layers.bias"),
                b.dims(),
                || Ok(b.copy()?),
            )?),
            None => None,
        };
        let tuned = TunedNorm { weight, bias };
        let n = params.weight.elem_count() + params.bias.as_ref().map_or(0, |b| b.elem_count());
        let detail = if tuned.bias.is_some() {
            "weight and bias"
        } else {
            "weight"
        };
        self.adapted.lock().unwrap().push(AdaptedModule {
            path: path.to_string(),
            params: n,
            detail: detail.into(),
        });
        Ok(tuned.params()?)
    }
}

impl Tuner for LnTuning {
    fn method(&self) -> &'static Method {
        &METHOD
    }

    fn mode(&self) -> &Arc<Mode> {
        &self.mode
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        let adapted_any = !self.adapted.lock().unwrap().is_empty();
        Ok(vec![check_finished(
            "ln_tuning",
            &self.targets,
            &self.params,
            self.allow_unmatched,
            adapted_any,
            "norm layer",
        )?])
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    fn adapted(&self) -> Vec<AdaptedModule> {
        self.adapted.lock().unwrap().clone()
    }

    fn config_json(&self) -> Result<Value> {
        Ok(serde_json::to_value(&self.config)?)
    }

    fn updates(&self) -> Result<Vec<(String, Update)>> {
        Ok(vec![])
    }

    /// PEFT's merge swaps the trained copy in: the norm tensors are replaced whole.
    fn replaced(&self) -> Vec<(String, Tensor)> {
        let mut out = self.saved.replaced(&self.params);
        for m in self.adapted.lock().unwrap().iter() {
            for suffix in ["weight", "bias"] {
                if let Some(v) = self
                    .params
                    .get(&peft_key(&m.path, &format!("ln_tuning_layers.{suffix}")))
                {
                    out.push((format!("{}.{suffix}", m.path), v.as_tensor().clone()));
                }
            }
        }
        out
    }
}
