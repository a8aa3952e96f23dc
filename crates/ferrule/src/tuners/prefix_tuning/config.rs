//! `PrefixTuningConfig`, with PEFT's key names and defaults (peft
//! `tuners/prefix_tuning/config.py`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tuners::flags::{FlagValue, OptionFlag};
use crate::tuners::prompt_learning::{PromptLearningConfig, NUM_VIRTUAL_TOKENS_FLAG};

/// One prefix-tuning adapter's configuration, as `adapter_config.json` stores it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PrefixTuningConfig {
    #[serde(flatten)]
    pub common: PromptLearningConfig,
    /// Unset: random start; `"zero"`: the prefix starts at zero (its last layer, with
    /// `prefix_projection`).
    #[serde(default)]
    pub init_weights: Option<String>,
    /// Hidden width of the reparameterisation MLP (`prefix_projection`); unset, `token_dim`, as
    /// PEFT fills it (`_prepare_prompt_learning_config`, peft `utils/other.py`).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Train `embedding → Linear → tanh → Linear` instead of the prefix itself (Li & Liang
    /// 2021, §4.3). The saved adapter holds the prefix the MLP computes.
    #[serde(default)]
    pub prefix_projection: bool,
}

/// Keys of a PREFIX_TUNING `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &[
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "modules_to_save",
    "init_weights",
    "encoder_hidden_size",
    "prefix_projection",
];

impl PrefixTuningConfig {
    /// PEFT's constraints (`init_weights` is `"zero"` or unset; a set MLP width is positive).
    pub fn validate(&self) -> Result<()> {
        self.common.validate("prefix_tuning")?;
        if let Some(w) = self.init_weights.as_deref().filter(|w| *w != "zero") {
            bail!("prefix_tuning: init_weights = {w:?}; expected \"zero\" or unset")
        }
        if self.encoder_hidden_size == Some(0) {
            bail!("prefix_tuning: encoder_hidden_size must be at least 1")
        }
        Ok(())
    }

    pub fn zero_init(&self) -> bool {
        self.init_weights.as_deref() == Some("zero")
    }
}

/// Prefix tuning's command-line flags beside the common ones.
pub static FLAGS: &[OptionFlag] = &[
    NUM_VIRTUAL_TOKENS_FLAG,
    OptionFlag {
        name: "prefix-projection",
        value: FlagValue::Count,
        value_name: Some("WIDTH"),
        help: "Prefix tuning: train the prefix through an MLP of this hidden width (prefix_projection).",
        keys: |v| {
            vec![
                ("prefix_projection", Value::Bool(true)),
                ("encoder_hidden_size", v),
            ]
        },
    },
];
