//! Which optimizer a run uses (`optim`, `--optim`), the interface every optimizer offers the
//! trainer ([`Optimizer`]), and the one place that builds them ([`build_optimizer`]).
//!
//! A new optimizer (e.g. GaLore) plugs in as one more [`OptimName`] variant, its names in
//! [`OptimName::from_str`], an `impl Optimizer` and one arm of [`build_optimizer`]; the trainer,
//! its checkpoints and `--resume` need no change.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::bnb::{BnbAdamW, StateBits};
use super::groups::{Grouped, LrGroup};
use super::{AdamW, AdamWConfig};
use crate::train::galore::{GaLoreAdamW, GaLoreConfig, LegacyAdamWConfig, TargetModules};

/// bitsandbytes' `min_8bit_size`: parameters with fewer elements keep 32-bit state.
pub const DEFAULT_MIN_8BIT_SIZE: usize = 4096;

/// What the trainer asks of an optimizer over named [`Var`]s, with the shape of
/// [`AdamW`]'s own methods.
pub trait Optimizer: Send {
    /// Sets the learning rate of the next steps (the schedule's, each step).
    fn set_lr(&mut self, lr: f64);
    /// Steps taken so far.
    fn step_count(&self) -> u64;
    /// One update from gradients by parameter name (absent: skipped; unknown: an error).
    fn step_with(&mut self, grads: &HashMap<String, Tensor>) -> Result<()>;
    /// The whole state as named tensors, for a checkpoint's optimizer file (safetensors).
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores [`Optimizer::state`]'s output; a missing, unknown or misshapen entry is an
    /// error naming it, and leaves the optimizer as it was.
    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()>;
    /// The layer-wise form ([`OptimName::is_layerwise`]): one parameter's update as soon as
    /// its gradient is final. The step ends with [`Optimizer::finish_layerwise_step`].
    fn step_param(&mut self, name: &str, _grad: &Tensor) -> Result<()> {
        bail!("parameter {name:?}: this optimizer has no layer-wise form")
    }
    /// Ends a step made of [`Optimizer::step_param`] calls (the step count advances).
    fn finish_layerwise_step(&mut self) {}
}

impl Optimizer for AdamW {
    fn set_lr(&mut self, lr: f64) {
        AdamW::set_lr(self, lr)
    }
    fn step_count(&self) -> u64 {
        AdamW::step_count(self)
    }
    fn step_with(&mut self, grads: &HashMap<String, Tensor>) -> Result<()> {
        AdamW::step_with(self, grads)
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        AdamW::state(self)
    }
    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        AdamW::load_state(self, state)
    }
}

impl Optimizer for GaLoreAdamW {
    fn set_lr(&mut self, lr: f64) {
        GaLoreAdamW::set_lr(self, lr)
    }
    fn step_count(&self) -> u64 {
        GaLoreAdamW::step_count(self)
    }
    fn step_with(&mut self, grads: &HashMap<String, Tensor>) -> Result<()> {
        GaLoreAdamW::step_with(self, grads)
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        GaLoreAdamW::state(self)
    }
    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        GaLoreAdamW::load_state(self, state)
    }
    fn step_param(&mut self, name: &str, grad: &Tensor) -> Result<()> {
        GaLoreAdamW::step_param(self, name, grad)
    }
    fn finish_layerwise_step(&mut self) {
        GaLoreAdamW::finish_layerwise_step(self)
    }
}

impl Optimizer for BnbAdamW {
    fn set_lr(&mut self, lr: f64) {
        BnbAdamW::set_lr(self, lr)
    }
    fn step_param(&mut self, name: &str, grad: &Tensor) -> Result<()> {
        BnbAdamW::step_param(self, name, grad)
    }
    fn finish_layerwise_step(&mut self) {
        BnbAdamW::finish_layerwise_step(self)
    }
    fn step_count(&self) -> u64 {
        BnbAdamW::step_count(self)
    }
    fn step_with(&mut self, grads: &HashMap<String, Tensor>) -> Result<()> {
        BnbAdamW::step_with(self, grads)
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        BnbAdamW::state(self)
    }
    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        BnbAdamW::load_state(self, state)
    }
}

/// The optimizers ferrule has, by their `optim` name (transformers' `optim` names for the
/// same optimizers are accepted too, see [`OptimName::from_str`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum OptimName {
    /// `torch.optim.AdamW` ([`AdamW`]), state in memory.
    #[default]
    Adamw,
    /// bitsandbytes' `AdamW8bit`: both moments block-wise quantized to 8 bits ([`BnbAdamW`]).
    Adamw8bit,
    /// `adamw_8bit` with its state in a memory-mapped file (bitsandbytes' `PagedAdamW8bit`).
    PagedAdamw8bit,
    /// `adamw` with its state in a memory-mapped file (bitsandbytes' `PagedAdamW32bit`).
    PagedAdamw32bit,
    /// galore-torch's `GaLoreAdamW` ([`GaLoreAdamW`]): Adam on low-rank projections of the
    /// target weights' gradients (`optim_args`, `optim_target_modules`).
    GaloreAdamw,
    /// GaLore with the projected gradient preconditioned by the inverse empirical Fisher
    /// (Natural GaLore, arXiv 2410.16029).
    NaturalGaloreAdamw,
    /// `galore_adamw` stepped layer by layer during the backward pass, each gradient dropped
    /// once its layer has stepped (transformers' `galore_adamw_layerwise`): no full-model
    /// gradient is ever held. Needs `recompute`, one process and `grad_accum = 1`; gradients
    /// are not clipped.
    GaloreAdamwLayerwise,
    /// galore-torch's `GaLoreAdamW8bit`: GaLore's projection with bitsandbytes' 8-bit
    /// block-wise moments in the low-rank shape ([`BnbAdamW::galore`]).
    GaloreAdamw8bit,
    /// `galore_adamw_8bit` stepped layer by layer during the backward pass (as
    /// `galore_adamw_layerwise`).
    GaloreAdamw8bitLayerwise,
}

impl OptimName {
    /// Every optimizer, in the order error messages list them.
    pub const ALL: [OptimName; 9] = [
        OptimName::Adamw,
        OptimName::Adamw8bit,
        OptimName::PagedAdamw8bit,
        OptimName::PagedAdamw32bit,
        OptimName::GaloreAdamw,
        OptimName::NaturalGaloreAdamw,
        OptimName::GaloreAdamwLayerwise,
        OptimName::GaloreAdamw8bit,
        OptimName::GaloreAdamw8bitLayerwise,
    ];

    /// The name in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            OptimName::Adamw => "adamw",
            OptimName::Adamw8bit => "adamw_8bit",
            OptimName::PagedAdamw8bit => "paged_adamw_8bit",
            OptimName::PagedAdamw32bit => "paged_adamw_32bit",
            OptimName::GaloreAdamw => "galore_adamw",
            OptimName::NaturalGaloreAdamw => "natural_galore_adamw",
            OptimName::GaloreAdamwLayerwise => "galore_adamw_layerwise",
            OptimName::GaloreAdamw8bit => "galore_adamw_8bit",
            OptimName::GaloreAdamw8bitLayerwise => "galore_adamw_8bit_layerwise",
        }
    }

    /// transformers' (5.24) `OptimizerNames` values meaning the same optimizer.
    pub fn hf_names(self) -> &'static [&'static str] {
        match self {
            OptimName::Adamw => &["adamw_torch", "adamw_torch_fused"],
            OptimName::Adamw8bit => &["adamw_bnb_8bit"],
            OptimName::PagedAdamw8bit => &[],
            OptimName::PagedAdamw32bit => &[],
            OptimName::GaloreAdamw
            | OptimName::NaturalGaloreAdamw
            | OptimName::GaloreAdamwLayerwise
            | OptimName::GaloreAdamw8bit
            | OptimName::GaloreAdamw8bitLayerwise => &[],
        }
    }

    /// Whether the state lives in a memory-mapped file (`--offload-dir`).
    pub fn is_paged(self) -> bool {
        matches!(self, OptimName::PagedAdamw8bit | OptimName::PagedAdamw32bit)
    }

    /// Whether each parameter steps as soon as its gradient is final, during the backward
    /// pass ([`Optimizer::step_param`]).
    pub fn is_layerwise(self) -> bool {
        matches!(
            self,
            OptimName::GaloreAdamwLayerwise | OptimName::GaloreAdamw8bitLayerwise
        )
    }

    /// The optimizer a layer-wise one equals when stepped once per step (`galore_adamw` for
    /// `galore_adamw_layerwise`); itself for the others.
    pub fn whole_step(self) -> OptimName {
        match self {
            OptimName::GaloreAdamwLayerwise => OptimName::GaloreAdamw,
            OptimName::GaloreAdamw8bitLayerwise => OptimName::GaloreAdamw8bit,
            other => other,
        }
    }

    /// Whether the optimizer is GaLore (`optim_args` and `optim_target_modules` apply).
    pub fn is_galore(self) -> bool {
        matches!(
            self,
            OptimName::GaloreAdamw
                | OptimName::NaturalGaloreAdamw
                | OptimName::GaloreAdamwLayerwise
                | OptimName::GaloreAdamw8bit
                | OptimName::GaloreAdamw8bitLayerwise
        )
    }

    /// Whether `min_8bit_size` applies.
    pub fn is_8bit(self) -> bool {
        matches!(
            self,
            OptimName::Adamw8bit
                | OptimName::PagedAdamw8bit
                | OptimName::GaloreAdamw8bit
                | OptimName::GaloreAdamw8bitLayerwise
        )
    }

    /// "adamw (adamw_torch, adamw_torch_fused), adamw_8bit (adamw_bnb_8bit), ...".
    pub fn listing() -> String {
        OptimName::ALL
            .iter()
            .map(|o| match o.hf_names() {
                [] => o.as_str().to_string(),
                hf => format!("{} ({})", o.as_str(), hf.join(", ")),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// transformers' `OptimizerNames` (5.24) that ferrule does not have.
const HF_OPTIMIZERS_NOT_IN_FERRULE: &[&str] = &[
    "adamw_torch_xla",
    "adamw_torch_npu_fused",
    "adafactor",
    "adamw_anyprecision",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "ademamix",
    "sgd",
    "adagrad",
    "ademamix_8bit",
    "lion_8bit",
    "lion_32bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
    "galore_adafactor",
    "galore_adafactor_layerwise",
    "lomo",
    "adalomo",
    "grokadamw",
    "schedule_free_radam",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "apollo_adamw",
    "apollo_adamw_layerwise",
    "stable_adamw",
];

impl FromStr for OptimName {
    type Err = anyhow::Error;

    /// A ferrule name or one of its [`OptimName::hf_names`], case and `-`/`_` ignored
    /// (`--help` shows defaults with `-`).
    fn from_str(s: &str) -> Result<OptimName> {
        let key = s.trim().to_ascii_lowercase().replace('-', "_");
        for o in OptimName::ALL {
            if o.as_str() == key || o.hf_names().contains(&key.as_str()) {
                return Ok(o);
            }
        }
        if HF_OPTIMIZERS_NOT_IN_FERRULE.contains(&key.as_str()) {
            bail!(
                "optim {s:?} (--optim): transformers' optimizer {key} is not in ferrule; ferrule has {}",
                OptimName::listing()
            )
        }
        bail!(
            "optim {s:?} (--optim): unknown optimizer; expected one of {}",
            OptimName::listing()
        )
    }
}

impl fmt::Display for OptimName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for OptimName {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<OptimName> {
        s.parse()
    }
}

impl From<OptimName> for String {
    fn from(o: OptimName) -> String {
        o.as_str().to_string()
    }
}

/// Everything [`build_optimizer`] needs besides the parameters.
#[derive(Clone, Debug)]
pub struct OptimizerSpec<'a> {
    pub name: OptimName,
    /// Learning rate, betas, eps and weight decay (every optimizer here is an AdamW).
    pub adamw: AdamWConfig,
    /// 8-bit optimizers: parameters with fewer elements keep 32-bit state.
    pub min_8bit_size: usize,
    /// Paged optimizers: the folder of the state file.
    pub offload_dir: &'a Path,
    /// GaLore: HF's `optim_args` string (`rank=…, update_proj_gap=…, scale=…, proj_type=…`).
    pub optim_args: Option<&'a str>,
    /// GaLore: HF's `optim_target_modules` (default: modules whose path holds `attn` or `mlp`).
    pub target_modules: Option<&'a TargetModules>,
    /// Tensors with learning rates of their own ([`super::groups`]); empty: one rate.
    pub lr_groups: &'a [LrGroup],
}

impl OptimizerSpec<'_> {
    /// Plain [`AdamW`] with `adamw`'s settings.
    pub fn adamw(adamw: AdamWConfig) -> OptimizerSpec<'static> {
        OptimizerSpec {
            name: OptimName::Adamw,
            adamw,
            min_8bit_size: DEFAULT_MIN_8BIT_SIZE,
            offload_dir: Path::new("."),
            optim_args: None,
            target_modules: None,
            lr_groups: &[],
        }
    }
}

/// The optimizer `spec` names over `vars`. Paged optimizers create their state file here (an
/// error names the folder when it cannot be created or filled).
pub fn build_optimizer(
    vars: Vec<(String, Var)>,
    spec: &OptimizerSpec,
) -> Result<Box<dyn Optimizer>> {
    spec.adamw.validate()?;
    if !spec.lr_groups.is_empty() {
        return Ok(Box::new(Grouped::new(vars, spec)?));
    }
    Ok(match spec.name {
        OptimName::Adamw => Box::new(AdamW::new(vars, spec.adamw)),
        OptimName::Adamw8bit => Box::new(BnbAdamW::new(
            vars,
            spec.adamw,
            StateBits::Eight {
                min_8bit_size: spec.min_8bit_size,
            },
            None,
        )?),
        OptimName::PagedAdamw8bit => Box::new(BnbAdamW::new(
            vars,
            spec.adamw,
            StateBits::Eight {
                min_8bit_size: spec.min_8bit_size,
            },
            Some(spec.offload_dir),
        )?),
        OptimName::PagedAdamw32bit => Box::new(BnbAdamW::new(
            vars,
            spec.adamw,
            StateBits::ThirtyTwo,
            Some(spec.offload_dir),
        )?),
        OptimName::GaloreAdamw
        | OptimName::NaturalGaloreAdamw
        | OptimName::GaloreAdamwLayerwise
        | OptimName::GaloreAdamw8bit
        | OptimName::GaloreAdamw8bitLayerwise => {
            let a = spec.adamw;
            let adam = LegacyAdamWConfig {
                lr: a.lr,
                beta1: a.beta1,
                beta2: a.beta2,
                eps: a.eps,
                weight_decay: a.weight_decay,
                correct_bias: true,
            };
            let natural = spec.name == OptimName::NaturalGaloreAdamw;
            let cfg =
                GaLoreConfig::from_optim_args(spec.optim_args, spec.target_modules, natural, adam)?;
            if spec.name.is_8bit() {
                Box::new(BnbAdamW::galore(vars, &cfg, spec.min_8bit_size, None)?)
            } else {
                Box::new(GaLoreAdamW::new(vars, cfg)?)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_transformers_aliases() {
        for (s, want) in [
            ("adamw", OptimName::Adamw),
            ("adamw_torch", OptimName::Adamw),
            ("adamw_torch_fused", OptimName::Adamw),
            ("adamw_8bit", OptimName::Adamw8bit),
            ("adamw-8bit", OptimName::Adamw8bit),
            ("adamw_bnb_8bit", OptimName::Adamw8bit),
            ("paged_adamw_8bit", OptimName::PagedAdamw8bit),
            ("PAGED_ADAMW_32BIT", OptimName::PagedAdamw32bit),
        ] {
            assert_eq!(s.parse::<OptimName>().unwrap(), want, "{s}");
        }
        for o in OptimName::ALL {
            assert_eq!(o.to_string().parse::<OptimName>().unwrap(), o);
        }
    }

    #[test]
    fn a_transformers_optimizer_ferrule_lacks_is_named_with_what_works() {
        let err = "galore_adafactor_layerwise"
            .parse::<OptimName>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("transformers' optimizer galore_adafactor_layerwise is not in ferrule"),
            "{err}"
        );
        assert_eq!(
            "galore_adamw".parse::<OptimName>().unwrap(),
            OptimName::GaloreAdamw
        );
        assert!(
            err.contains("adamw_8bit (adamw_bnb_8bit)") && err.contains("paged_adamw_32bit"),
            "{err}"
        );
        let err = "adamw_hf".parse::<OptimName>().unwrap_err().to_string();
        assert!(err.contains("unknown optimizer"), "{err}");
        // Through serde, as a TOML file's `optim` key reaches it.
        let err = serde_json::from_value::<OptimName>(serde_json::json!("adafactor"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("adafactor"), "{err}");
    }
}
