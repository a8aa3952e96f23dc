//! DiffFit (Xie et al. 2023, "DiffFit: Unlocking Transferability of Large Diffusion Models via
//! Simple Parameter-Efficient Fine-Tuning"): on each targeted linear layer a scale `γ` and an
//! added bias `b_f` train (`y = γ ⊙ (W₀x + b₀ + b_f)`, [`layer`]), and, as in the paper, the
//! norm layers' weights and biases (`train_norms`). On a decoder the paper's block scales are
//! γ on `o_proj` and `down_proj` (the attention and MLP outputs); the port's defaults target
//! every projection. Keys and `peft_type` (`DIFFFIT`) are LLaMA-DiffFit's port's:
//! `base_model.model.<path>.difffit.bf`, `.difffit.gamma`; trained norms are saved under
//! `base_model.model.<path>.weight|bias`.
//!
//! Which targets get γ: those in the numbered layers `eta_layers` lists (every layer when it is
//! unset or lists 100, as the port reads it) and not in `eta_exclude`; the others train `b_f`
//! alone.
//!
//! Differences from the port: it applies γ only on Conv1D layers (a `fan_in_fan_out` branch),
//! so nn.Linear never gets one; here every target `eta_layers` and `eta_exclude` select does.
//! The port's test `eta_layers == 'all' or i in eta_layers and name not in eta_exclude` skips
//! `eta_exclude` when `eta_layers` holds 100; here `eta_exclude` always applies (the port's
//! Linear layers never reach that test's result, so no adapter of theirs depends on it). An
//! `eta_layers` entry that names no targeted layer is an error here, where the port is silent.
//! Its merge adds `b_f` only and fails on bias-free layers; here the merge folds γ into the
//! weight (exact), and a Llama without biases gets them through `attention_bias` / `mlp_bias`
//! (zero for the untargeted linears those options also cover); Mistral and Qwen2 have no such
//! option, so a bias-free target there is an error naming it.

pub mod config;
pub mod layer;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde_json::{Map, Value};

pub use config::DiffFitConfig;
use layer::DiffFitLinear;

use super::config::{default_list, AdapterConfig};
use super::core::{AnyTunerCore, LinearRoute, TunerCore};
use super::modules_to_save::ModulesToSave;
use super::registry::{BlockShapes, BuildContext, Method};
use super::target::{layer_index, suffix_match, MatchReport, ModuleSpec, Targets};
use super::{peft_key, AdaptedModule, Tuner, Update};
use crate::model::{Linear, LinearInfo, ModelHook, NormInfo, NormParams};
use crate::ops::FrozenLinear;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "difffit",
    peft_type: "DIFFFIT",
    summary: "DiffFit: a scale γ and an added bias on each targeted linear, and the norms, train (Xie et al. 2023; LLaMA-DiffFit's keys)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: Some(count_from_shapes),
    trains_whole_model: false,
    f32_weights: None,
};

/// LLaMA-DiffFit's targets (`finetune_difffit.py`: q, k, v, o, gate, down, up), and BERT's
/// linears of every layer.
pub fn default_targets(model_type: &str) -> Option<&'static [&'static str]> {
    match model_type {
        "llama" | "mistral" | "qwen2" => Some(&[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]),
        "bert" => Some(&[
            "query",
            "key",
            "value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ]),
        _ => None,
    }
}

fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    default_list(options, "target_modules", model_type, default_targets)
}

/// `ferrule plan` without weights: `out` (the added bias) per targeted linear of every block,
/// `out` for γ on those `eta_layers` and `eta_exclude` select, and with `train_norms` every
/// norm's weights and biases. A config with `exclude_modules`, `modules_to_save` or a
/// regex is not counted this way.
fn count_from_shapes(options: &Map<String, Value>, blocks: &BlockShapes) -> Result<Option<usize>> {
    let cfg: DiffFitConfig =
        AdapterConfig::new(METHOD.peft_type, options.clone()).typed("difffit")?;
    cfg.validate()?;
    let targets = match ModuleSpec::shape_targets(cfg.target_modules.as_ref()) {
        Some(t) => t,
        None => return Ok(None),
    };
    if cfg.exclude_modules.is_some() || cfg.modules_to_save.is_some() {
        return Ok(None);
    }
    let biases = blocks.sum_over_targets(&targets, |l| Ok(l.out_features))?;
    // γ in every layer, or in the listed blocks only (none outside the numbered layers).
    let gamma_blocks = match cfg.gamma_layers() {
        None => *blocks,
        Some(listed) => {
            let mut listed = listed;
            if let Some(i) = listed.iter().find(|&&i| i >= blocks.layers) {
                bail!("difffit: eta_layers entry {i} names no layer of this {}-layer model ({} stands for every layer)", blocks.layers, config::ALL_LAYERS)
            }
            listed.sort_unstable();
            listed.dedup();
            BlockShapes {
                layers: listed.len(),
                outside: &[],
                ..*blocks
            }
        }
    };
    let gammas = gamma_blocks.sum_over_targets(&targets, |l| {
        Ok(l.out_features * usize::from(!cfg.excluded_from_gamma(l.name)))
    })?;
    Ok(Some(
        biases
            + gammas
            + if cfg.train_norms {
                blocks.norm_params
            } else {
                0
            },
    ))
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: DiffFitConfig = config.typed("difffit")?;
    Ok(Box::new(DiffFit::new(cfg, ctx)?))
}

/// What a merge needs of one adapted module.
#[derive(Clone, Debug)]
struct DiffFitLayer {
    /// The base layer's bias `b₀` (a linear), `None` when it has none or for a norm.
    base_bias: Option<Tensor>,
    /// A linear with γ.
    gamma: bool,
    /// A trained norm rather than a linear.
    norm: bool,
}

/// Builds DiffFit layers for the modules a [`DiffFitConfig`] targets.
pub struct DiffFit {
    core: TunerCore<DiffFitConfig, DiffFitLayer>,
}

impl DiffFit {
    pub fn new(config: DiffFitConfig, ctx: BuildContext) -> Result<Self> {
        config.validate()?;
        let target = config
            .target_modules
            .as_ref()
            .ok_or_else(|| anyhow!("difffit: target_modules is required"))?;
        let targets = Targets::new("target_modules", target, config.exclude_modules.as_ref())
            .context("difffit")?;
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx).with_targets(targets),
        })
    }

    /// A `[n]` trainable tensor filled with `value` under `key`.
    fn filled(&self, key: &str, n: usize, value: f64) -> Result<Var> {
        let dev = self.core.params.device().clone();
        self.core.params.take_or_init(key, &[n], || {
            Ok((Tensor::ones(n, DType::F32, &dev)? * value)?)
        })
    }

    fn get(&self, path: &str, suffix: &str) -> Result<Tensor> {
        let key = peft_key(path, suffix);
        let v = self.core.params.get(&key);
        Ok(v.ok_or_else(|| anyhow!("difffit: {path} has no {suffix}"))?
            .as_tensor()
            .clone())
    }
}

impl ModelHook for DiffFit {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let base = match self.core.route_linear(info, base)? {
            LinearRoute::Targeted(base) => base,
            other => return Ok(other.unadapted()),
        };
        let path = info.path.as_str();
        let out = base.out_features();
        let bias = self.filled(&peft_key(path, "difffit.bf"), out, 0.0)?;
        let gamma = match self.core.config.has_gamma(path, layer_index(path, None)) {
            true => {
                let key = peft_key(path, "difffit.gamma");
                Some(self.filled(&key, out, self.core.config.eta_scale)?)
            }
            false => None,
        };
        let detail = if gamma.is_some() {
            "γ and bias"
        } else {
            "bias"
        };
        let module = AdaptedModule {
            path: path.to_string(),
            params: out * (1 + usize::from(gamma.is_some())),
            detail: detail.into(),
        };
        let layer = DiffFitLayer {
            base_bias: base.bias().cloned(),
            gamma: gamma.is_some(),
            norm: false,
        };
        self.core.record(module, layer);
        Ok(Box::new(DiffFitLinear { base, bias, gamma }))
    }

    fn norm(&self, info: &NormInfo, frozen: NormParams) -> Result<NormParams> {
        if !self.core.config.train_norms {
            return Ok(frozen);
        }
        let path = info.path.as_str();
        let params = &self.core.params;
        let copy = |suffix: &str, t: &Tensor| {
            params.take_or_init(&peft_key(path, suffix), t.dims(), || Ok(t.copy()?))
        };
        let weight = copy("weight", &frozen.weight)?;
        let bias = frozen.bias.as_ref().map(|b| copy("bias", b)).transpose()?;
        let module = AdaptedModule {
            path: path.to_string(),
            params: frozen.weight.elem_count() + frozen.bias.as_ref().map_or(0, |b| b.elem_count()),
            detail: "norm".into(),
        };
        let layer = DiffFitLayer {
            base_bias: None,
            gamma: false,
            norm: true,
        };
        self.core.record(module, layer);
        Ok(NormParams {
            weight: weight.as_tensor().clone(),
            bias: bias.map(|b| b.as_tensor().clone()),
        })
    }
}

impl Tuner for DiffFit {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    /// Also fails when an `eta_exclude` entry names no targeted layer (it would exclude
    /// nothing, silently), or an `eta_layers` entry no numbered layer holding a target.
    fn finish(&self) -> Result<Vec<MatchReport>> {
        let report = self
            .core
            .check_finished("target_modules matched no linear layer of the model")?;
        let adapted = self.core.adapted();
        let linears: Vec<&str> = adapted
            .iter()
            .filter(|a| !a.layer.norm)
            .map(|a| a.module.path.as_str())
            .collect();
        for entry in self.core.config.eta_exclude.as_deref().unwrap_or_default() {
            if !linears.iter().any(|p| suffix_match(p, entry)) {
                bail!("difffit: eta_exclude (--eta-exclude) entry {entry:?} matches no targeted layer; the targets are e.g. {:?}", linears.first().copied().unwrap_or_default())
            }
        }
        let layers: Vec<usize> = linears
            .iter()
            .filter_map(|p| layer_index(p, None))
            .collect();
        for i in self.core.config.gamma_layers().unwrap_or_default() {
            if !layers.contains(&i) {
                let last = layers
                    .iter()
                    .max()
                    .map_or("none".into(), |m| format!("0–{m}"));
                bail!("difffit: eta_layers entry {i} names no layer holding a targeted linear (the targeted layers are {last}; {} stands for every layer)", config::ALL_LAYERS)
            }
        }
        Ok(report)
    }

    /// `W' = diag(γ) W₀`: each output row scaled by its γ.
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        let mut out = Vec::new();
        for adapted in self.core.adapted().iter().filter(|a| a.layer.gamma) {
            let path = &adapted.module.path;
            let gamma = self.get(path, "difffit.gamma")?;
            let rows = gamma.dim(0)?;
            out.push((
                format!("{path}.weight"),
                Update::Scale(gamma.reshape((rows, 1))?),
            ));
        }
        Ok(out)
    }

    /// `b' = γ ⊙ (b₀ + b_f)` replaces each targeted layer's bias (`b₀ = 0` for a layer without
    /// one, which the merge writes through Llama's `attention_bias` / `mlp_bias` and refuses
    /// for model types without such an option); trained norms replace theirs.
    fn replaced(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.core.saved_replaced();
        for adapted in self.core.adapted().iter() {
            let path = &adapted.module.path;
            if adapted.layer.norm {
                for suffix in ["weight", "bias"] {
                    if let Some(v) = self.core.params.get(&peft_key(path, suffix)) {
                        out.push((format!("{path}.{suffix}"), v.as_tensor().clone()));
                    }
                }
                continue;
            }
            let bf = self.get(path, "difffit.bf")?;
            let mut b = match &adapted.layer.base_bias {
                Some(b0) => (b0 + bf)?,
                None => bf,
            };
            if adapted.layer.gamma {
                b = (b * self.get(path, "difffit.gamma")?)?;
            }
            out.push((format!("{path}.bias"), b));
        }
        Ok(out)
    }

    /// Trained norms are copies that replace the base's: the model's total counts them once.
    fn trained_in_place(&self) -> usize {
        let adapted = self.core.adapted();
        adapted
            .iter()
            .filter(|a| a.layer.norm)
            .map(|a| a.module.params)
            .sum()
    }
}
