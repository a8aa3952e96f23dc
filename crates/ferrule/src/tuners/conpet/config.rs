//! ConPET's settings (Song et al. 2023, "ConPET: Continual Parameter-Efficient Tuning for
//! Large Language Models"; reference Raincleared-Song/ConPET, `configs/*_continual_typing.yaml`).
//!
//! A ConPET set is not a PEFT adapter: its `peft_type` (`"CONPET"`) is ferrule's own and lives
//! in the set's `conpet.json`, while every expert and the selector are saved as plain PEFT LoRA
//! folders ([`ConpetConfig::lora`]).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::tuners::config::AdapterConfig;
use crate::tuners::flags::{FlagValue, OptionFlag};
use crate::tuners::lora::config::{ALPHA_FLAG, DROPOUT_FLAG, RANK_FLAG};

fn default_r() -> usize {
    // `plm.lora_r: 4` in every reference config.
    4
}
fn default_alpha() -> f64 {
    // The reference's LoRA module (`bert_lora.py`) is not in its published tree; α = 2r is
    // ferrule's LoRA ratio (docs/METHODS.md, "ConPET").
    8.0
}
fn default_topk() -> usize {
    // `train.expert_topk: 1`.
    1
}
fn default_replay_budget() -> usize {
    // `dataset.batch_limit: 400` with `batch_limit_policy: 2` (a fixed budget per split),
    // `configs/fewrel_continual_typing.yaml`.
    400
}
fn default_null_logit() -> f64 {
    // `train.null_expert_logit: -100`.
    -100.0
}

/// A ConPET set's configuration, as `conpet.json` stores it under `"config"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConpetConfig {
    /// LoRA rank of every expert and of the selector (default 4).
    #[serde(default = "default_r")]
    pub r: usize,
    /// LoRA α: updates are scaled by α / r (default 8).
    #[serde(
        default = "default_alpha",
        serialize_with = "crate::tuners::config::serialize_number"
    )]
    pub lora_alpha: f64,
    /// Dropout on the LoRA input while training (default 0).
    #[serde(default, serialize_with = "crate::tuners::config::serialize_number")]
    pub lora_dropout: f64,
    /// Modules the LoRAs adapt (PEFT's matching; default: LoRA's for the model type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<Value>,
    /// Experts the selector picks per record (`expert_topk`, default 1); each fills its own
    /// label columns.
    #[serde(default = "default_topk")]
    pub expert_topk: usize,
    /// Records of each task kept for replay when later tasks train the selector (the
    /// reference's `batch_limit`, default 400).
    #[serde(default = "default_replay_budget")]
    pub replay_budget: usize,
    /// Layers each expert and the selector train in full beside their LoRA (the classifier
    /// head is added for SEQ_CLS, as for every method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// The logit of a label column no chosen expert fills (`null_expert_logit`, default −100).
    #[serde(
        default = "default_null_logit",
        serialize_with = "crate::tuners::config::serialize_number"
    )]
    pub null_expert_logit: f64,
}

/// Keys of ConPET's `[adapter]` table (and `conpet.json`'s `"config"`) that ferrule implements.
pub const KNOWN_KEYS: &[&str] = &[
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "expert_topk",
    "replay_budget",
    "null_expert_logit",
    "modules_to_save",
];

impl ConpetConfig {
    /// What ConPET cannot run with, named by key.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("conpet: r (--lora-r) must be at least 1")
        }
        if self.expert_topk == 0 {
            bail!("conpet: expert_topk (--expert-topk) must be at least 1: every record needs an expert")
        }
        if self.replay_budget == 0 {
            bail!("conpet: replay_budget (--replay-budget) must be at least 1: the selector of a later task learns the earlier tasks from their replayed records only")
        }
        if !self.null_expert_logit.is_finite() {
            bail!(
                "conpet: null_expert_logit must be a finite number, got {}",
                self.null_expert_logit
            )
        }
        crate::tuners::config::check_alpha("conpet: lora_alpha", self.lora_alpha)
    }

    /// The LoRA each expert and the selector train: `r`, `lora_alpha`, `lora_dropout` and the
    /// targets; the classification head goes to `modules_to_save` as for any SEQ_CLS LoRA.
    pub fn lora(&self) -> AdapterConfig {
        let mut options = Map::new();
        options.insert("r".into(), json!(self.r));
        options.insert(
            "lora_alpha".into(),
            crate::tuners::config::json_number(self.lora_alpha),
        );
        options.insert(
            "lora_dropout".into(),
            crate::tuners::config::json_number(self.lora_dropout),
        );
        if let Some(t) = &self.target_modules {
            options.insert("target_modules".into(), t.clone());
        }
        if let Some(m) = &self.modules_to_save {
            options.insert("modules_to_save".into(), json!(m));
        }
        AdapterConfig::new(crate::tuners::lora::METHOD.peft_type, options)
    }
}

/// ConPET's command-line flags: LoRA's rank, α and dropout, and its own two.
pub static FLAGS: &[OptionFlag] = &[
    RANK_FLAG,
    ALPHA_FLAG,
    DROPOUT_FLAG,
    OptionFlag {
        name: "expert-topk",
        value: FlagValue::Count,
        value_name: Some("K"),
        help: "ConPET: experts the selector picks per record (default 1).",
        keys: |v| vec![("expert_topk", v)],
    },
    OptionFlag {
        name: "replay-budget",
        value: FlagValue::Count,
        value_name: Some("N"),
        help: "ConPET: records of each task kept to replay when later tasks train the selector (default 400).",
        keys: |v| vec![("replay_budget", v)],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ConpetConfig> {
        AdapterConfig::new("CONPET", v.as_object().unwrap().clone()).typed("conpet")
    }

    #[test]
    fn defaults_are_the_reference_configs() {
        let c = parse(json!({})).unwrap();
        assert_eq!((c.r, c.expert_topk, c.replay_budget), (4, 1, 400));
        assert_eq!((c.lora_alpha, c.null_expert_logit), (8.0, -100.0));
        let lora = c.lora();
        assert_eq!(lora.peft_type, "LORA");
        assert_eq!(lora.options["r"], json!(4));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (v, want) in [
            (json!({"expert_topk": 0}), "expert_topk (--expert-topk)"),
            (
                json!({"replay_budget": 0}),
                "replay_budget (--replay-budget)",
            ),
            (json!({"r": 0}), "r (--lora-r)"),
        ] {
            let e = parse(v).unwrap().validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
