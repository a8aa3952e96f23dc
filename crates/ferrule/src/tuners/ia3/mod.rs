//! IA3 (Liu et al. 2022) exactly as PEFT defines it: one vector `ia3_l` per targeted linear
//! layer, scaling the input of `feedforward_modules` and the output of the others.

pub mod config;
pub mod layer;

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor, Var};
use regex::Regex;
use serde_json::{Map, Value};

pub use config::Ia3Config;
use layer::Ia3Linear;

use super::config::{default_list, AdapterConfig};
use super::mode::Mode;
use super::modules_to_save::ModulesToSave;
use super::params::ParamStore;
use super::registry::{BuildContext, Method};
use super::target::{MatchReport, ModuleSpec, Targets};
use super::{check_finished, peft_key, AdaptedModule, Tuner, Update};
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
    config: Ia3Config,
    targets: Targets,
    feedforward: Feedforward,
    allow_unmatched: bool,
    seed: u64,
    mode: Arc<Mode>,
    params: ParamStore,
    saved: ModulesToSave,
    /// Adapted modules, whether each scales its input, and whether its base has a bias.
    adapted: Mutex<Vec<(AdaptedModule, bool, bool)>>,
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
        Ok(Self {
            feedforward: Feedforward::new(config.feedforward_modules.as_ref())?,
            saved: ModulesToSave::new(config.modules_to_save.as_deref()),
            targets,
            allow_unmatched: ctx.allow_unmatched,
            seed: ctx.seed,
            mode: Arc::new(Mode::new(ctx.seed)),
            params: ParamStore::new(ctx.device, ctx.weights),
            adapted: Mutex::new(Vec::new()),
            config,
        })
    }
}

impl ModelHook for Ia3 {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let base = match self.saved.wrap(info, base, &self.params)? {
            Ok(full) => return Ok(full),
            Err(base) => base,
        };
        let path = info.path.as_str();
        if !self.targets.select(path, info.is_output_head) {
            return Ok(Box::new(base));
        }
        let ff = self.feedforward.matches(path);
        let shape = if ff {
            [1, base.in_features()]
        } else {
            [base.out_features(), 1]
        };
        let key = peft_key(path, "ia3_l");
        let dev = self.params.device().clone();
        let seed = crate::init::seed_for(self.seed, &key);
        let l = self
            .params
            .take_or_init(&key, &shape, || match self.config.init_ia3_weights {
                true => Ok(Tensor::ones(&shape, DType::F32, &dev)?),
                false => crate::init::normal(&shape, 1.0, seed, &dev),
            })?;
        let detail = if ff { "scales input" } else { "scales output" };
        let module = AdaptedModule {
            path: path.to_string(),
            params: shape[0] * shape[1],
            detail: detail.into(),
        };
        self.adapted
            .lock()
            .unwrap()
            .push((module, ff, base.bias().is_some()));
        Ok(Box::new(Ia3Linear::new(base, l, ff)))
    }
}

impl Tuner for Ia3 {
    fn method(&self) -> &'static Method {
        &METHOD
    }

    fn mode(&self) -> &Arc<Mode> {
        &self.mode
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        let adapted_any = !self.adapted.lock().unwrap().is_empty();
        Ok(vec![check_finished(
            "ia3",
            &self.targets,
            &self.params,
            self.allow_unmatched,
            adapted_any,
            "linear layer",
        )?])
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    fn adapted(&self) -> Vec<AdaptedModule> {
        self.adapted
            .lock()
            .unwrap()
            .iter()
            .map(|(m, _, _)| m.clone())
            .collect()
    }

    fn config_json(&self) -> Result<Value> {
        Ok(serde_json::to_value(&self.config)?)
    }

    /// PEFT's `Linear.merge`: `W ⊙ l` (`l: [out, 1]` or `[1, in]`), and `b ⊙ l` for output
    /// scaling.
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        let mut out = Vec::new();
        for (m, ff, has_bias) in self.adapted.lock().unwrap().iter() {
            let l = self
                .params
                .get(&peft_key(&m.path, "ia3_l"))
                .ok_or_else(|| anyhow!("ia3: {} has no ia3_l", m.path))?;
            out.push((
                format!("{}.weight", m.path),
                Update::Scale(l.as_tensor().clone()),
            ));
            if !ff && *has_bias {
                out.push((
                    format!("{}.bias", m.path),
                    Update::Scale(l.as_tensor().flatten_all()?),
                ));
            }
        }
        Ok(out)
    }

    fn replaced(&self) -> Vec<(String, Tensor)> {
        self.saved.replaced(&self.params)
    }
}
