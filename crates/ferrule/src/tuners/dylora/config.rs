//! `DyloraConfig`: DyLoRA's settings under LoRA's key names where they mean the same (`r`,
//! `lora_alpha`, `lora_dropout`, the targets), plus `frozen`. The reference
//! (huawei-noah/Efficient-NLP `DyLoRA/loralib/layers.py`) is not a peft method, so
//! `peft_type` `DYLORA` is ferrule's own; a chosen rank is exported as a plain `LORA`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::tuners::config::serialize_number;
use crate::tuners::flags::{FlagValue, OptionFlag};
use crate::tuners::lora::config::{ALPHA_FLAG, DROPOUT_FLAG, RANK_FLAG};
use crate::tuners::target::{LayersPattern, LayersToTransform, ModuleSpec};

/// The reference's runs use r 8 and α 16 (`DyLoRA/examples/NLU/roberta_base_*.sh`).
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn yes() -> bool {
    true
}

/// One DyLoRA adapter's configuration, as its `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DyloraConfig {
    /// The largest rank: `A: [r, in]`, `B: [out, r]`; the adapter runs at any `b` in `1..=r`.
    #[serde(default = "default_r")]
    pub r: usize,
    /// The update at rank `b` is scaled by `lora_alpha / b` (layers.py:124 `α/r` times
    /// `√(r/b)` on each factor, DyLoRA.py:56-62).
    #[serde(default = "default_alpha", serialize_with = "serialize_number")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// The reference's `set_rank(b, frozen=True)` (run_glue.py's step callback): components
    /// before the step's `b`-th are detached, so only the `b`-th row of A and column of B
    /// learn (DyLoRA.py:47-56). `false`: all first `b` learn.
    #[serde(default = "yes")]
    pub frozen: bool,
}

/// Keys of a DYLORA `adapter_config.json`.
pub const KNOWN_KEYS: &[&str] = &[
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "frozen",
];

impl DyloraConfig {
    /// `r ≥ 1`, a usable α and dropout, and LoRA's rule on layer selection with a regex.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("dylora: r must be at least 1")
        }
        crate::tuners::config::check_alpha("dylora: lora_alpha", self.lora_alpha)?;
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!(
                "dylora: lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            )
        }
        let selects_layers = self.layers_to_transform.is_some() || self.layers_pattern.is_some();
        if let Some(ModuleSpec::Pattern(p)) = &self.target_modules {
            if p != "all-linear" && selects_layers {
                bail!("dylora: layers_to_transform / layers_pattern cannot be used when target_modules is a regex ({p:?}), as in peft's LoRA (the exported LoRA would not load there); list the module names instead")
            }
        }
        Ok(())
    }
}

/// DyLoRA's command-line flags beside the common ones: LoRA's `--lora-r`, `--lora-alpha` and
/// `--lora-dropout` set the keys of the same names, and `--dylora-unfrozen` the variant.
pub static FLAGS: &[OptionFlag] = &[
    RANK_FLAG,
    ALPHA_FLAG,
    DROPOUT_FLAG,
    OptionFlag {
        name: "dylora-unfrozen",
        value: FlagValue::Switch,
        value_name: None,
        help: "DyLoRA: train all first b components at each step's rank b (the non-frozen variant) instead of only the b-th, the reference's default.",
        keys: |_| vec![("frozen", serde_json::Value::Bool(false))],
    },
];

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::DyloraConfig;
    use crate::tuners::AdapterConfig;

    fn parse(options: serde_json::Value) -> anyhow::Result<DyloraConfig> {
        let c: DyloraConfig =
            AdapterConfig::new("DYLORA", options.as_object().unwrap().clone()).typed("dylora")?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_are_the_reference_runs_and_bad_values_are_named() {
        let c = parse(json!({})).unwrap();
        assert_eq!((c.r, c.lora_alpha, c.frozen), (8, 16.0, true));
        for (options, key) in [
            (json!({"r": 0}), "r must be at least 1"),
            (json!({"lora_dropout": 1.0}), "lora_dropout"),
            (json!({"frozen": "yes"}), "\"frozen\""),
            (json!({"lora_alpha": 1e39}), "lora_alpha"),
        ] {
            let e = format!("{:#}", parse(options.clone()).unwrap_err());
            assert!(e.contains(key), "{options}: {e}");
        }
    }
}
