//! `SvfitConfig`: SVFit has no reference code and no peft type, so `peft_type` `SVFIT` and
//! its keys are ferrule's own, named as peft names the same things in LoRA (`r`,
//! `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`,
//! `modules_to_save`). docs/PARITY.md ("SVFit") describes the folder.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::tuners::flags::OptionFlag;
use crate::tuners::target::{LayersPattern, LayersToTransform, ModuleSpec};

fn r_default() -> usize {
    8
}

/// One SVFit adapter's configuration, as `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SvfitConfig {
    /// The number of top singular values trained per targeted matrix (Sun et al. 2024, §III:
    /// the top-r singular values of `W`); at most `min(out, in)` of every targeted layer.
    #[serde(default = "r_default")]
    pub r: usize,
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// Keys of an SVFIT `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &[
    "r",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
];

impl SvfitConfig {
    /// `r > 0`; whether `r` fits a layer is checked per layer, where its shape is known.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("svfit: r (--lora-r) must be a positive integer")
        }
        Ok(())
    }
}

/// SVFit's flags beside the common ones: LoRA's `--lora-r` sets its `r`.
pub static FLAGS: &[OptionFlag] = &[crate::tuners::lora::config::RANK_FLAG];
