//! LN tuning (PEFT `LN_TUNING`): the weights and biases of the targeted norm layers are
//! trained, everything else stays frozen.

pub mod config;
pub mod layer;

use anyhow::{anyhow, Context, Result};
use candle_core::Tensor;
use serde_json::{Map, Value};

pub use config::LnTuningConfig;
use layer::TunedNorm;

use super::config::{default_list, AdapterConfig};
use super::core::{AnyTunerCore, TunerCore};
use super::modules_to_save::ModulesToSave;
use super::registry::{BuildContext, Method};
use super::target::{MatchReport, Targets};
use super::{peft_key, AdaptedModule, Tuner, Update};
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
    flags: &[],
    complete_flags: None,
    count_from_shapes: None,
    trains_whole_model: false,
    f32_weights: None,
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
    core: TunerCore<LnTuningConfig>,
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
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx).with_targets(targets),
        })
    }
}

impl ModelHook for LnTuning {
    /// Linear layers change only when listed in `modules_to_save`.
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        Ok(self.core.route_linear(info, base)?.unadapted())
    }

    fn norm(&self, info: &NormInfo, frozen: NormParams) -> Result<NormParams> {
        let path = info.path.as_str();
        if !self.core.adapts(path, false) {
            return Ok(frozen);
        }
        let params = &self.core.params;
        let weight = params.take_or_init(
            &peft_key(path, "ln_tuning_layers.weight"),
            frozen.weight.dims(),
            || Ok(frozen.weight.copy()?),
        )?;
        let bias = match &frozen.bias {
            Some(b) => Some(params.take_or_init(
                &peft_key(path, "ln_tuning_layers.bias"),
                b.dims(),
                || Ok(b.copy()?),
            )?),
            None => None,
        };
        let tuned = TunedNorm { weight, bias };
        let elements =
            frozen.weight.elem_count() + frozen.bias.as_ref().map_or(0, |b| b.elem_count());
        let detail = if tuned.bias.is_some() {
            "weight and bias"
        } else {
            "weight"
        };
        let module = AdaptedModule {
            path: path.to_string(),
            params: elements,
            detail: detail.into(),
        };
        self.core.record(module, ());
        Ok(tuned.params()?)
    }
}

impl Tuner for LnTuning {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        self.core
            .check_finished("target_modules matched no norm layer of the model")
    }

    fn updates(&self) -> Result<Vec<(String, Update)>> {
        Ok(vec![])
    }

    /// PEFT's merge swaps the trained copy in: the norm tensors are replaced whole.
    fn replaced(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.core.saved_replaced();
        for adapted in self.core.adapted().iter() {
            let path = &adapted.module.path;
            for suffix in ["weight", "bias"] {
                let key = peft_key(path, &format!("ln_tuning_layers.{suffix}"));
                if let Some(v) = self.core.params.get(&key) {
                    out.push((format!("{path}.{suffix}"), v.as_tensor().clone()));
                }
            }
        }
        Ok(out)
    }
}
