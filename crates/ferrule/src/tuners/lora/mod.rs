//! LoRA (Hu et al. 2021) exactly as PEFT defines it: targets, rank/alpha patterns, rsLoRA,
//! init schemes, `modules_to_save`, and the on-disk keys.

pub mod config;
pub mod layer;

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde_json::{Map, Value};

pub use config::{InitLoraWeights, LoraConfig};
use layer::LoraLinear;

use super::config::{default_list, AdapterConfig};
use super::mode::Mode;
use super::modules_to_save::ModulesToSave;
use super::params::ParamStore;
use super::registry::{BuildContext, Method};
use super::target::{layer_index, MatchReport, Targets};
use super::{check_finished, peft_key, AdaptedModule, Tuner, Update};
use crate::init;
use crate::model::{Linear, LinearInfo, ModelHook};
use crate::ops::FrozenLinear;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "lora",
    peft_type: "LORA",
    summary: "LoRA: h = W₀x + (α/r)·B A x on the targeted linear layers (Hu et al. 2021)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
};

/// PEFT's default LoRA targets per model type (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
pub fn default_targets(model_type: &str) -> Option<&'static [&'static str]> {
    match model_type {
        "llama" | "mistral" | "qwen2" => Some(&["q_proj", "v_proj"]),
        "bert" => Some(&["query", "value"]),
        _ => None,
    }
}

fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    default_list(options, "target_modules", model_type, default_targets)
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: LoraConfig = serde_json::from_value(config.options_json()).context("lora: invalid config")?;
    Ok(Box::new(Lora::new(cfg, ctx)?))
}

/// Builds LoRA layers for the modules a [`LoraConfig`] targets.
pub struct Lora {
    config: LoraConfig,
    patterns: config::Patterns,
    targets: Targets,
    allow_unmatched: bool,
    seed: u64,
    mode: Arc<Mode>,
    params: ParamStore,
    saved: ModulesToSave,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Adapted modules with their scaling `s`.
    adapted: Vec<(AdaptedModule, f64)>,
    /// Which `rank_pattern` / `alpha_pattern` keys decided some module.
    rank_keys_used: Vec<bool>,
    alpha_keys_used: Vec<bool>,
}

impl Lora {
    /// An adapter initialised per `init_lora_weights` from `ctx.seed`, or holding
    /// `ctx.weights` (PEFT keys).
    pub fn new(config: LoraConfig, ctx: BuildContext) -> Result<Self> {
        config.validate()?;
        let target =
            config.target_modules.as_ref().ok_or_else(|| anyhow!("lora: target_modules is required (a list of module names, a regex, or \"all-linear\")"))?;
        let targets = Targets::new("target_modules", target, config.exclude_modules.as_ref()).context("lora")?;
        let patterns = config.patterns()?;
        let state = State { rank_keys_used: vec![false; patterns.rank.len()], alpha_keys_used: vec![false; patterns.alpha.len()], ..Default::default() };
        Ok(Self {
            saved: ModulesToSave::new(config.modules_to_save.as_deref()),
            patterns,
            targets,
            allow_unmatched: ctx.allow_unmatched,
            seed: ctx.seed,
            mode: Arc::new(Mode::new(ctx.seed)),
            params: ParamStore::new(ctx.device, ctx.weights),
            state: Mutex::new(state),
            config,
        })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    fn in_layers(&self, path: &str) -> bool {
        let Some(ltt) = &self.config.layers_to_transform else { return true };
        let pats: Option<Vec<String>> = self.config.layers_pattern.as_ref().map(|p| match p {
            config::LayersPattern::One(s) => vec![s.clone()],
            config::LayersPattern::Many(v) => v.clone(),
        });
        let Some(idx) = layer_index(path, pats.as_deref()) else { return false };
        match ltt {
            config::LayersToTransform::One(i) => *i == idx,
            config::LayersToTransform::Many(v) => v.contains(&idx),
        }
    }

    /// `A: [r, in]` and `B: [out, r]`, saved or initialised per `init_lora_weights`.
    fn factors(&self, path: &str, r: usize, in_f: usize, out_f: usize) -> Result<(Var, Var)> {
        let key_a = peft_key(path, "lora_A.weight");
        let key_b = peft_key(path, "lora_B.weight");
        let dev = self.params.device().clone();
        let (seed_a, seed_b) = (init::seed_for(self.seed, &key_a), init::seed_for(self.seed, &key_b));
        let a = self.params.take_or_init(&key_a, &[r, in_f], || match &self.config.init_lora_weights {
            // PEFT "gaussian": normal(0, 1/r) for A.
            InitLoraWeights::Named(n) if n == "gaussian" => init::normal(&[r, in_f], 1.0 / r as f64, seed_a, &dev),
            // PEFT default: kaiming_uniform_(a=sqrt(5)).
            _ => init::kaiming_uniform(&[r, in_f], 5f64.sqrt(), seed_a, &dev),
        })?;
        let b = self.params.take_or_init(&key_b, &[out_f, r], || match &self.config.init_lora_weights {
            // init_lora_weights=false: B random too, so the adapter is not a no-op (tests).
            InitLoraWeights::Flag(false) => init::kaiming_uniform(&[out_f, r], 5f64.sqrt(), seed_b, &dev),
            _ => Ok(Tensor::zeros((out_f, r), DType::F32, &dev)?),
        })?;
        Ok((a, b))
    }

    /// `rank_pattern` / `alpha_pattern` keys that decided no targeted module: errors (or
    /// warnings with `allow_unmatched`), since such a key silently trains another rank.
    fn check_pattern_keys(&self, st: &State) -> Result<()> {
        let unused: Vec<String> = (self.patterns.rank.iter().zip(&st.rank_keys_used).map(|((k, _), u)| ("rank_pattern", k, *u)))
            .chain(self.patterns.alpha.iter().zip(&st.alpha_keys_used).map(|((k, _), u)| ("alpha_pattern", k, *u)))
            .filter(|(_, _, used)| !used)
            .map(|(opt, k, _)| format!("{opt}[{k:?}]"))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let msg = format!("lora: {} matched no targeted module", unused.join(", "));
        if self.allow_unmatched {
            tracing::warn!("{msg} (continuing: --allow-unmatched)");
            return Ok(());
        }
        bail!("{msg}. A pattern key is a regex matched against the end of a targeted module's path (e.g. \"k_proj\" or \"layers.0.self_attn.q_proj\"); fix it, or pass --allow-unmatched")
    }
}

impl ModelHook for Lora {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let base = match self.saved.wrap(info, base, &self.params)? {
            Ok(full) => return Ok(full),
            Err(base) => base,
        };
        let path = info.path.as_str();
        if !self.targets.select(path, info.is_output_head) || !self.in_layers(path) {
            return Ok(Box::new(base));
        }
        let (r, alpha, ri, ai) = self.config.rank_and_alpha(&self.patterns, path);
        let scaling = self.config.scaling(r, alpha);
        let (out_f, in_f) = (base.out_features(), base.in_features());
        let (a, b) = self.factors(path, r, in_f, out_f)?;
        let mut st = self.state.lock().unwrap();
        if let Some(i) = ri {
            st.rank_keys_used[i] = true;
        }
        if let Some(i) = ai {
            st.alpha_keys_used[i] = true;
        }
        let detail = format!("r={r} alpha={alpha} scaling={scaling}");
        st.adapted.push((AdaptedModule { path: path.to_string(), params: r * (in_f + out_f), detail }, scaling));
        Ok(Box::new(LoraLinear::new(path.to_string(), base, a, b, scaling, self.config.lora_dropout, self.mode.clone())))
    }
}

impl Tuner for Lora {
    fn method(&self) -> &'static Method {
        &METHOD
    }

    fn mode(&self) -> &Arc<Mode> {
        &self.mode
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        let st = self.state.lock().unwrap();
        let report = check_finished("lora", &self.targets, &self.params, self.allow_unmatched, !st.adapted.is_empty(), "linear layer")?;
        self.check_pattern_keys(&st)?;
        Ok(vec![report])
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    fn adapted(&self) -> Vec<AdaptedModule> {
        self.state.lock().unwrap().adapted.iter().map(|(m, _)| m.clone()).collect()
    }

    fn config_json(&self) -> Result<Value> {
        let mut v = serde_json::to_value(&self.config)?;
        let obj = v.as_object_mut().ok_or_else(|| anyhow!("config is not an object"))?;
        // PEFT writes the explicit list of full module paths when "all-linear" was asked for.
        if self.config.target_modules.as_ref().is_some_and(|t| t.is_all_linear()) {
            let mut names: Vec<String> = self.adapted().iter().map(|m| m.path.clone()).collect();
            names.sort();
            names.dedup();
            obj.insert("target_modules".into(), serde_json::json!(names));
        }
        Ok(v)
    }

    /// `ΔW = s · B A` per adapted module (merge: `W' = W + ΔW`).
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        let st = self.state.lock().unwrap();
        let mut out = Vec::new();
        for (m, scaling) in &st.adapted {
            let get = |suffix: &str| self.params.get(&peft_key(&m.path, suffix)).ok_or_else(|| anyhow!("lora: {} has no {suffix}", m.path));
            let (a, b) = (get("lora_A.weight")?, get("lora_B.weight")?);
            out.push((format!("{}.weight", m.path), Update::Add((b.as_tensor().matmul(a.as_tensor())? * *scaling)?)));
        }
        Ok(out)
    }

    fn replaced(&self) -> Vec<(String, Tensor)> {
        self.saved.replaced(&self.params)
    }
}
