//! GaLore (Zhao et al. 2024, arXiv 2403.03507) and Natural GaLore (Das 2024, arXiv
//! 2410.16029): full-parameter training whose Adam state lives in a low-rank projection of
//! each target weight's gradient, matching galore-torch 1.0's `GaLoreAdamW` (the optimizer HF
//! Trainer runs for `optim="galore_adamw"`).
//!
//! * [`projector`]: `GaLoreProjector`, the SVD basis refreshed every `update_proj_gap` steps;
//! * [`adamw`]: galore-torch's (transformers' legacy) AdamW update, which every parameter of
//!   the optimizer uses;
//! * [`natural`]: Natural GaLore's inverse-Fisher preconditioning by the Woodbury identity;
//! * [`targets`]: which parameters are projected (HF's `optim_target_modules`);
//! * [`optimizer`]: [`GaLoreAdamW`], with the public shape of [`crate::train::AdamW`]
//!   (`set_lr`, `lr`, `step`, `step_with`, `state`, `load_state`).

pub mod adamw;
pub mod natural;
pub mod optimizer;
pub mod projector;
pub mod targets;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

pub use adamw::LegacyAdamWConfig;
pub use natural::{NaturalConfig, NaturalGradient};
pub use optimizer::GaLoreAdamW;
pub use projector::{GaLoreProjector, ProjType};
pub use targets::{select_targets, TargetModules};

/// Settings of [`GaLoreAdamW`]. The GaLore defaults are HF Trainer's (`optim_args` absent:
/// `rank=128, update_proj_gap=200, scale=0.25, proj_type=std`); the Adam defaults are
/// galore-torch's (`eps = 1e-6`, `weight_decay = 0`, which HF keeps since it passes GaLore only
/// the learning rate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GaLoreConfig {
    /// The Adam update every parameter gets.
    #[serde(flatten)]
    pub adam: LegacyAdamWConfig,
    /// Rank `r` of the projection; at most the smaller dimension of every target.
    pub rank: usize,
    /// Steps between SVD refreshes of a target's basis.
    pub update_proj_gap: u64,
    /// Factor applied to the projected-back update (`alpha` in the paper).
    pub scale: f64,
    /// Which singular vectors to project onto.
    pub proj_type: ProjType,
    /// Which linear weights are projected (HF's `optim_target_modules`).
    pub target_modules: TargetModules,
    /// Natural GaLore's preconditioning of the projected gradient; `None`: plain GaLore.
    pub natural: Option<NaturalConfig>,
}

impl Default for GaLoreConfig {
    fn default() -> Self {
        Self {
            adam: LegacyAdamWConfig::default(),
            rank: 128,
            update_proj_gap: 200,
            scale: 0.25,
            proj_type: ProjType::Std,
            target_modules: TargetModules::default(),
            natural: None,
        }
    }
}

impl GaLoreConfig {
    /// Checks every setting's range (the rank against each target is checked by
    /// [`GaLoreAdamW::new`]).
    pub fn validate(&self) -> Result<()> {
        self.adam.validate()?;
        ensure!(self.rank >= 1, "GaLore rank must be at least 1");
        ensure!(
            self.update_proj_gap >= 1,
            "GaLore update_proj_gap must be at least 1"
        );
        ensure!(
            self.scale.is_finite(),
            "GaLore scale must be finite, got {}",
            self.scale
        );
        if let Some(n) = &self.natural {
            n.validate()?;
        }
        Ok(())
    }
}

impl GaLoreConfig {
    /// One entry per parameter of `params` (name and shape), in order: a [`GaLoreProjector`]
    /// for the targets that `target_modules` picks ([`select_targets`]), `None` for the others.
    /// The one place both GaLore optimizers ([`GaLoreAdamW`] and
    /// [`crate::train::optim::BnbAdamW::galore`]) choose their targets. Errors: no target
    /// matches (HF raises too), or `rank` exceeds a target's smaller dimension
    /// ([`projector::check_rank`], naming it).
    pub fn projectors<'a>(
        &self,
        params: impl IntoIterator<Item = (&'a str, &'a [usize])> + Clone,
    ) -> Result<Vec<Option<GaLoreProjector>>> {
        let targets: std::collections::HashSet<String> =
            select_targets(params.clone(), &self.target_modules)?
                .into_iter()
                .collect();
        params
            .into_iter()
            .map(|(name, dims)| {
                if !targets.contains(name) {
                    return Ok(None);
                }
                let (m, n) = (dims[0], dims[1]);
                projector::check_rank(name, (m, n), self.rank)?;
                let p = GaLoreProjector::new(
                    (m, n),
                    self.rank,
                    self.update_proj_gap,
                    self.scale,
                    self.proj_type,
                )?;
                Ok(Some(p))
            })
            .collect()
    }
}

impl GaLoreConfig {
    /// The settings of a run with `optim = "galore_adamw"` (or Natural GaLore when
    /// `natural`): HF Trainer's `optim_args` string (`"rank=64, update_proj_gap=100,
    /// scale=0.25, proj_type=std"`, spaces ignored, as transformers' `_get_galore_optimizer`
    /// parses it; Natural GaLore adds `history` and `damping`), HF's `optim_target_modules`,
    /// and the run's AdamW settings. HF hands GaLore only the learning rate (so eps 1e-6 and
    /// no decay); ferrule passes the run's betas, eps and weight decay too, so that a setting
    /// the user gave is not dropped. An unknown key or a bad value is an error naming it.
    pub fn from_optim_args(
        optim_args: Option<&str>,
        target_modules: Option<&TargetModules>,
        natural: bool,
        adam: LegacyAdamWConfig,
    ) -> Result<Self> {
        let mut cfg = GaLoreConfig {
            adam,
            natural: natural.then(NaturalConfig::default),
            ..Default::default()
        };
        if let Some(t) = target_modules {
            cfg.target_modules = t.clone();
        }
        let args = optim_args.unwrap_or_default().replace(' ', "");
        for pair in args.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("optim_args: {pair:?} is not key=value"))?;
            let bad =
                |e: &dyn std::fmt::Display| anyhow::anyhow!("optim_args: {key}={value:?}: {e}");
            match (key, cfg.natural.as_mut()) {
                ("rank", _) => cfg.rank = value.parse().map_err(|e| bad(&e))?,
                ("update_proj_gap", _) => cfg.update_proj_gap = value.parse().map_err(|e| bad(&e))?,
                ("scale", _) => cfg.scale = value.parse().map_err(|e| bad(&e))?,
                ("proj_type", _) => cfg.proj_type = value.parse().map_err(|e| bad(&e))?,
                ("history", Some(n)) => n.history = value.parse().map_err(|e| bad(&e))?,
                ("damping", Some(n)) => n.damping = value.parse().map_err(|e| bad(&e))?,
                _ => anyhow::bail!(
                    "optim_args: unknown key {key:?} for {}; expected rank, update_proj_gap, scale, proj_type{}",
                    if natural { "natural_galore_adamw" } else { "GaLore" },
                    if natural { ", history, damping" } else { "" }
                ),
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }
}
