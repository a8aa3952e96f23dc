//! `RandLoraConfig`, with PEFT's key names and defaults (peft `tuners/randlora/config.py`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::tuners::config::serialize_number;
use crate::tuners::flags::OptionFlag;
use crate::tuners::target::{LayersPattern, LayersToTransform, ModuleSpec};

fn r_default() -> usize {
    32
}
fn alpha_default() -> f64 {
    640.0
}
fn yes() -> bool {
    true
}
fn none() -> String {
    "none".into()
}

/// One RandLoRA adapter's configuration, as `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RandLoraConfig {
    /// Rank of each random base.
    #[serde(default = "r_default")]
    pub r: usize,
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    /// Seeds the shared random bases.
    #[serde(default)]
    pub projection_prng_key: u64,
    /// Save the bases with the adapter. ferrule needs them saved (see [`RandLoraConfig::validate`]).
    #[serde(default = "yes")]
    pub save_projection: bool,
    /// Ternary bases (−1, 0, 1 with probability 1/6 each side), Bingham & Mannila's sparse projection.
    #[serde(default)]
    pub sparse: bool,
    /// Ternary bases with sparsity `√min_dim`.
    #[serde(default)]
    pub very_sparse: bool,
    #[serde(default)]
    pub randlora_dropout: f64,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// The update is scaled by `randlora_alpha / r`.
    #[serde(default = "alpha_default", serialize_with = "serialize_number")]
    pub randlora_alpha: f64,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: λ = 0 (a no-op start), γ = 1/max(γ's shape); `false`: λ standard normal,
    /// γ = 1/max(in, out).
    #[serde(default = "yes")]
    pub init_weights: bool,
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
}

/// Keys of a RANDLORA `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &[
    "r",
    "target_modules",
    "projection_prng_key",
    "save_projection",
    "sparse",
    "very_sparse",
    "randlora_dropout",
    "fan_in_fan_out",
    "randlora_alpha",
    "bias",
    "modules_to_save",
    "init_weights",
    "layers_to_transform",
    "layers_pattern",
];

impl RandLoraConfig {
    /// PEFT's checks (`r > 0`) and ferrule's limits, each named.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("randlora: r must be a positive integer")
        }
        crate::tuners::config::check_alpha("randlora: randlora_alpha", self.randlora_alpha)?;
        if !(0.0..1.0).contains(&self.randlora_dropout) {
            bail!(
                "randlora: randlora_dropout must be in [0, 1), got {}",
                self.randlora_dropout
            )
        }
        if self.fan_in_fan_out {
            bail!("randlora: fan_in_fan_out (GPT-2 Conv1D layers) is not supported: no supported architecture uses Conv1D")
        }
        if self.bias != "none" {
            bail!(
                "randlora: bias = {:?} is not implemented for RandLoRA (only \"none\")",
                self.bias
            )
        }
        if !self.save_projection {
            bail!(
                "randlora: save_projection = false leaves the random bases out of the adapter, and peft regenerates them with torch's generator in bf16, which ferrule does not reproduce; set save_projection = true"
            )
        }
        Ok(())
    }
}

/// RandLoRA's command-line flags beside the common ones: LoRA's `--lora-r` sets its `r`.
pub static FLAGS: &[OptionFlag] = &[crate::tuners::lora::config::RANK_FLAG];
