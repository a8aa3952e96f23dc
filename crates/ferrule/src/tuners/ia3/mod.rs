//! IA3 (Liu et al. 2022) exactly as PEFT defines it: one vector `ia3_l` per targeted linear
//! layer, scaling the input of `feedforward_modules` and the output of the others.

pub mod config;
pub mod layer;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use regex::Regex;
use serde_json::{Map, Value};

pub use config::Ia3Config;
use layer::Ia3Linear;

use super::config::{default_list, AdapterConfig};
use super::core::{AnyTunerCore, LinearRoute, TunerCore};
use super::modules_to_save::ModulesToSave;
use super::registry::{BlockLinear, BlockShapes, BuildContext, Method};
use super::target::{ModuleSpec, Targets};
use super::{peft_key, AdaptedModule, Tuner, Update};
use crate::model::{Linear, LinearInfo, ModelHook};
use crate::ops::FrozenLinear;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "ia3",
    peft_type: "IA3",
    summary: "IA3: a learned vector scales each targeted layer's output, or its input for feed-forward modules (Liu et al. 2022)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: Some(count_from_shapes),
    trains_whole_model: false,
    f32_weights: None,
};

/// PEFT's `TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`.
pub fn default_targets(model_type: &str) -> Option<&'static [&'static str]> {
    match model_type {
        "llama" | "mistral" => Some(&["k_proj", "v_proj", "down_proj"]),
        "qwen2" => Some(&["q_proj", "v_proj", "down_proj"]),
        "bert" => Some(&["key", "value", "output.dense"]),
        _ => None,
    }
}

/// PEFT's `TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING`.
pub fn default_feedforward(model_type: &str) -> Option<&'static [&'static str]> {
    match model_type {
        "llama" | "mistral" | "qwen2" => Some(&["down_proj"]),
        "bert" => Some(&["output.dense"]),
        _ => None,
    }
}

fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    // PEFT's `_prepare_adapter_config`: each of the two defaults to the model type's when unset,
    // independently (user targets still get the default feed-forward list).
    default_list(options, "target_modules", model_type, default_targets)?;
    default_list(
        options,
        "feedforward_modules",
        model_type,
        default_feedforward,
    )
}

/// `ferrule plan` without weights: one vector per targeted linear of every block, of its input
/// size for a feed-forward module and of its output size otherwise (PEFT's
/// `IA3Layer.update_layer`). Regex targets, exclusions and `modules_to_save` are not counted
/// this way (`Ok(None)`).
fn count_from_shapes(options: &Map<String, Value>, blocks: &BlockShapes) -> Result<Option<usize>> {
    let names = |key: &str| -> Option<Vec<String>> {
        match options.get(key) {
            Some(Value::Array(v)) => v.iter().map(|x| x.as_str().map(String::from)).collect(),
            _ => None,
        }
    };
    let unset = |key: &str| options.get(key).is_none_or(Value::is_null);
    let (Some(targets), Some(feedforward)) =
        (names("target_modules"), names("feedforward_modules"))
    else {
        return Ok(None);
    };
    if !unset("exclude_modules") || !unset("modules_to_save") {
        return Ok(None);
    }
    let mut per_block = 0;
    for target in &targets {
        let matched: Vec<&BlockLinear> = blocks
            .linears
            .iter()
            .filter(|l| l.name == target || l.name.ends_with(&format!(".{target}")))
            .collect();
        if matched.is_empty() {
            bail!(
                "ia3: target_modules entry {target:?} names no linear layer of this {} model",
                blocks.family
            )
        }
        for l in matched {
            // PEFT's feed-forward test is a plain suffix (`key.endswith(entry)`).
            let ff = feedforward.iter().any(|f| l.name.ends_with(f.as_str()));
            per_block += if ff { l.in_features } else { l.out_features };
        }
    }
    Ok(Some(per_block * blocks.layers))
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: Ia3Config = config.typed("ia3")?;
    Ok(Box::new(Ia3::new(cfg, ctx)?))
}

/// PEFT's `_check_target_module_feedforward`: a regex matched in full, or a list whose
/// entries are matched as plain suffixes (`key.endswith(entry)`, no dot required).
enum Feedforward {
    Regex(Regex),
    Suffixes(Vec<String>),
}

impl Feedforward {
    fn new(spec: Option<&ModuleSpec>) -> Result<Self> {
        Ok(match spec {
            Some(ModuleSpec::Pattern(p)) => {
                Feedforward::Regex(Regex::new(&format!("^(?:{p})$")).with_context(|| {
                    format!("ia3: feedforward_modules: invalid regular expression {p:?}")
                })?)
            }
            Some(ModuleSpec::Names(n)) => Feedforward::Suffixes(n.clone()),
            None => Feedforward::Suffixes(vec![]),
        })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Feedforward::Regex(r) => r.is_match(path),
            Feedforward::Suffixes(s) => s.iter().any(|e| path.ends_with(e.as_str())),
        }
    }
}

/// Builds IA3 layers for the modules an [`Ia3Config`] targets.
pub struct Ia3 {
    core: TunerCore<Ia3Config, Ia3Layer>,
    feedforward: Feedforward,
}

/// What a merge needs of one adapted layer.
#[derive(Clone, Copy, Debug)]
struct Ia3Layer {
    /// `ia3_l` scales the input (`[1, in]`, a feed-forward module), else the output (`[out, 1]`).
    scales_input: bool,
    /// The base layer has a bias (output scaling scales it too).
    base_has_bias: bool,
}

impl Ia3 {
    pub fn new(config: Ia3Config, ctx: BuildContext) -> Result<Self> {
        config.validate()?;
        let target = config
            .target_modules
            .as_ref()
            .ok_or_else(|| anyhow!("ia3: target_modules is required"))?;
        let targets = Targets::new("target_modules", target, config.exclude_modules.as_ref())
            .context("ia3")?;
        let feedforward = Feedforward::new(config.feedforward_modules.as_ref())?;
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx).with_targets(targets),
            feedforward,
        })
    }
}

impl ModelHook for Ia3 {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let base = match self.core.route_linear(info, base)? {
            LinearRoute::Targeted(base) => base,
            other => return Ok(other.unadapted()),
        };
        let path = info.path.as_str();
        let scales_input = self.feedforward.matches(path);
        let shape = if scales_input {
            [1, base.in_features()]
        } else {
            [base.out_features(), 1]
        };
        let key = peft_key(path, "ia3_l");
        let params = &self.core.params;
        let dev = params.device().clone();
        let seed = self.core.init_seed(&key);
        let scales =
            params.take_or_init(&key, &shape, || match self.core.config.init_ia3_weights {
                true => Ok(Tensor::ones(&shape, DType::F32, &dev)?),
                false => crate::init::normal(&shape, 1.0, seed, &dev),
            })?;
        let detail = if scales_input {
            "scales input"
        } else {
            "scales output"
        };
        let module = AdaptedModule {
            path: path.to_string(),
            params: shape[0] * shape[1],
            detail: detail.into(),
        };
        let layer = Ia3Layer {
            scales_input,
            base_has_bias: base.bias().is_some(),
        };
        self.core.record(module, layer);
        Ok(Box::new(Ia3Linear::new(base, scales, scales_input)))
    }
}

impl Tuner for Ia3 {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    /// PEFT's `Linear.merge`: `W ⊙ l` (`l: [out, 1]` or `[1, in]`), and `b ⊙ l` for output
    /// scaling.
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        let mut out = Vec::new();
        for adapted in self.core.adapted().iter() {
            let path = &adapted.module.path;
            let scales = self
                .core
                .params
                .get(&peft_key(path, "ia3_l"))
                .ok_or_else(|| anyhow!("ia3: {path} has no ia3_l"))?;
            out.push((
                format!("{path}.weight"),
                Update::Scale(scales.as_tensor().clone()),
            ));
            if !adapted.layer.scales_input && adapted.layer.base_has_bias {
                out.push((
                    format!("{path}.bias"),
                    Update::Scale(scales.as_tensor().flatten_all()?),
                ));
            }
        }
        Ok(out)
    }
}
