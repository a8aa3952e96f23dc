//! `L4qConfig`: L4Q has no reference code and no peft type, so `peft_type` `L4Q` and its
//! keys are ferrule's own: LoRA's names for what is LoRA's (`r`, `lora_alpha`, the targets),
//! and `bits`, `group_size`, `codes`, `lsq_grad_scale` for the quantizer. docs/PARITY.md
//! ("L4Q") describes the folder and which defaults come from which version of the paper.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::tuners::config::serialize_number;
use crate::tuners::flags::{FlagValue, OptionFlag};
use crate::tuners::lora::config::{ALPHA_FLAG, RANK_FLAG};
use crate::tuners::target::{LayersPattern, LayersToTransform, ModuleSpec};

/// ferrule's LoRA train default (the paper's rank is not stated in what could be read).
fn default_r() -> usize {
    8
}
/// 0.5, so that the update's scale `lora_alpha / r` is L4Q's `α = 1/(2r)` (v1, Algorithm 1:
/// "Initialize A ∼ N(0, σ²), B = 0, α = 1/(2r)", with `W₀ + αBA` quantized).
fn default_alpha() -> f64 {
    0.5
}
/// 4-bit codes, the paper's main setting.
fn default_bits() -> u32 {
    4
}
/// 32: with 4 bits, GGUF's Q4_1 block, so the result is written as learned. The paper's own
/// group size (128 in a third-party summary) is unverified.
fn default_group_size() -> usize {
    32
}

/// The code range: L4Q's signed `−2^(bits−1)..=2^(bits−1) − 1` (v1, Algorithm 1: "Qn =
/// −2^(n−1), Qp = 2^(n−1) − 1"), or the unsigned `0..=2^bits − 1` of ferrule's L4Q before it
/// followed the paper. The grids are the same; the meaning of the saved offsets and the step's
/// gradient on clamped weights differ ([`crate::quant::lsq`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeRange {
    #[default]
    Signed,
    Unsigned,
}

/// The bits ferrule's quantizer takes: codes are stored in a byte, and 1 bit leaves an
/// asymmetric quantizer two levels, which this quantizer's min/max init would map onto the
/// range's ends only.
pub const BITS: std::ops::RangeInclusive<u32> = 2..=8;

/// One L4Q adapter's configuration, as its `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct L4qConfig {
    /// LoRA's rank: `A: [r, in]`, `B: [out, r]`.
    #[serde(default = "default_r")]
    pub r: usize,
    /// The update inside the quantizer is `(lora_alpha / r)·B A`.
    #[serde(default = "default_alpha", serialize_with = "serialize_number")]
    pub lora_alpha: f64,
    /// Bits per code: codes `0..=2^bits − 1`.
    #[serde(default = "default_bits")]
    pub bits: u32,
    /// Consecutive input features of a row that share one step and one offset; must divide
    /// every targeted layer's `in_features`.
    #[serde(default = "default_group_size")]
    pub group_size: usize,
    /// The code range (always written to a saved folder; a saved folder without the key was
    /// written before it existed, with unsigned codes, and is read so: `l4q::build`).
    #[serde(default)]
    pub codes: CodeRange,
    /// L4Q's LoRA warm-up `T_wp` (v1, Algorithm 1: "Lora warm-up step T_wp ≪ Total training
    /// step T"): the first `warmup_steps` optimizer steps train A and B as plain LoRA
    /// (`y = x(W₀ + (α/r)·B A)ᵀ`, no quantizer; the steps and offsets get no gradient); before
    /// step `warmup_steps` (0-based) the steps and offsets are initialized from `W₀ + (α/r)·B
    /// A` as it then is, and all four train inside the quantizer. 0 (the default: the paper
    /// gives no value in what could be read) quantizes from the first step, with steps and
    /// offsets from `W₀`.
    #[serde(default)]
    pub warmup_steps: u64,
    /// LSQ's gradient scale `1/√(group_size · Qp)` on the steps' and offsets' gradients (Esser
    /// et al. 2020, §2.2). Off by default: whether L4Q applies it is unverified.
    #[serde(default)]
    pub lsq_grad_scale: bool,
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

/// Keys of an L4Q `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &[
    "r",
    "lora_alpha",
    "bits",
    "group_size",
    "codes",
    "warmup_steps",
    "lsq_grad_scale",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
];

impl L4qConfig {
    /// `r ≥ 1`, a usable α, `bits` in [`BITS`], `group_size ≥ 1`; whether the group size
    /// divides a layer is checked per layer, where its shape is known.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("l4q: r (--lora-r) must be at least 1")
        }
        crate::tuners::config::check_alpha("l4q: lora_alpha", self.lora_alpha)?;
        if !BITS.contains(&self.bits) {
            bail!(
                "l4q: bits (--l4q-bits) = {} is not supported; ferrule's L4Q quantizes to {} to {} bits",
                self.bits,
                BITS.start(),
                BITS.end()
            )
        }
        if self.group_size == 0 {
            bail!("l4q: group_size (--l4q-group-size) must be at least 1")
        }
        Ok(())
    }
}

/// L4Q's flags beside the common ones: LoRA's `--lora-r` and `--lora-alpha`, and the
/// quantizer's.
pub static FLAGS: &[OptionFlag] = &[
    RANK_FLAG,
    ALPHA_FLAG,
    OptionFlag {
        name: "l4q-bits",
        value: FlagValue::Count,
        value_name: Some("BITS"),
        help: "L4Q: bits per quantized weight, 2 to 8 (default 4; GGUF export needs 4).",
        keys: |v| vec![("bits", v)],
    },
    OptionFlag {
        name: "l4q-group-size",
        value: FlagValue::Count,
        value_name: Some("N"),
        help: "L4Q: input features per quantization group, each with its own trained step and offset (default 32, GGUF Q4_1's block; GGUF export needs 32).",
        keys: |v| vec![("group_size", v)],
    },
    OptionFlag {
        name: "l4q-warmup-steps",
        value: FlagValue::Count,
        value_name: Some("N"),
        help: "L4Q: train A and B as plain LoRA for the first N optimizer steps, then set the steps and offsets from W0 + (alpha/r)·B A and train inside the quantizer (the paper's LoRA warm-up; default 0).",
        keys: |v| vec![("warmup_steps", v)],
    },
    OptionFlag {
        name: "l4q-lsq-grad-scale",
        value: FlagValue::Switch,
        value_name: None,
        help: "L4Q: scale the steps' and offsets' gradients by 1/sqrt(group_size * (2^bits - 1)), LSQ's gradient scale.",
        keys: |v| vec![("lsq_grad_scale", v)],
    },
];

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::L4qConfig;
    use crate::tuners::AdapterConfig;

    fn parse(options: serde_json::Value) -> anyhow::Result<L4qConfig> {
        let c: L4qConfig =
            AdapterConfig::new("L4Q", options.as_object().unwrap().clone()).typed("l4q")?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_and_bad_values_are_named() {
        let c = parse(json!({})).unwrap();
        assert_eq!((c.r, c.lora_alpha, c.bits, c.group_size), (8, 0.5, 4, 32));
        assert_eq!(c.codes, super::CodeRange::Signed);
        assert_eq!(c.warmup_steps, 0);
        assert!(!c.lsq_grad_scale);
        let c = parse(json!({"codes": "unsigned"})).unwrap();
        assert_eq!(c.codes, super::CodeRange::Unsigned);
        for (options, want) in [
            (json!({"r": 0}), "r (--lora-r) must be at least 1"),
            (json!({"bits": 1}), "bits (--l4q-bits) = 1 is not supported"),
            (json!({"bits": 9}), "quantizes to 2 to 8 bits"),
            (json!({"group_size": 0}), "group_size (--l4q-group-size)"),
            (json!({"lora_alpha": 1e39}), "lora_alpha"),
            (json!({"codes": "twos"}), "codes"),
        ] {
            let e = format!("{:#}", parse(options.clone()).unwrap_err());
            assert!(e.contains(want), "{options}: {e}");
        }
    }
}
