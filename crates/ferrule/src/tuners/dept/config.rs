//! `PromptTuningLoRAConfig`, DePT's config, with the reference's key names and defaults
//! (ZhengxiangShi/DePT `peft/tuners/prompt_tuning_lora.py`, `PromptTuningLoRAConfig`; its
//! `peft_type` is `PROMPT_TUNING_LORA`). It is prompt tuning's config plus the low-rank pair's.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::tuners::flags::{FlagValue, OptionFlag};
use crate::tuners::lora::config::{ALPHA_FLAG, RANK_FLAG};
use crate::tuners::prompt_learning::NUM_VIRTUAL_TOKENS_FLAG;
use crate::tuners::prompt_tuning::config::{INIT_FLAG, INIT_TEXT_FLAG};
use crate::tuners::prompt_tuning::{PromptTuningConfig, PromptTuningInit};

/// One DePT adapter's configuration, as the reference's `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeptConfig {
    /// The prompt's keys (`num_virtual_tokens`, `prompt_tuning_init`, ...), as prompt tuning's.
    #[serde(flatten)]
    pub prompt: PromptTuningConfig,
    /// Rank of the pair `A: [max_length, r]`, `B: [r, token_dim]` (reference default 8).
    #[serde(default = "default_r")]
    pub r: usize,
    /// The update is scaled by `lora_alpha / √r` (reference default 8; its `scaling`).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Declared by the reference and never read by its DePT code: `"none"` only.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// `true`: A kaiming-uniform (a = √5), B zeros; `false`: both zeros, as the reference.
    #[serde(default = "yes")]
    pub init_lora_weights: bool,
    /// The reference records the model's hidden size here (default 768) but sizes B by
    /// `token_dim`; ferrule fills it from the model and does not read it.
    #[serde(default)]
    pub hidden_size: Option<usize>,
    /// Rows of A: the positions the update covers. The reference pads every input to exactly
    /// this length; a longer input is an error (default 256).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Whether the saved adapter holds A and B (`false` is refused, see [`DeptConfig::validate`]).
    #[serde(default = "yes")]
    pub save_lora_embeddings: bool,
    /// Whether loading reads A and B (`false` is refused).
    #[serde(default = "yes")]
    pub load_lora_embeddings: bool,
    /// Whether loading reads B (`false` is refused).
    #[serde(default = "yes", rename = "load_lora_embedding_B")]
    pub load_lora_embedding_b: bool,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn yes() -> bool {
    true
}
fn default_max_length() -> usize {
    256
}

/// Keys of a PROMPT_TUNING_LORA `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = crate::tuners::prompt_tuning::config::prompt_tuning_keys!(
    "r",
    "lora_alpha",
    "bias",
    "init_lora_weights",
    "hidden_size",
    "max_length",
    "save_lora_embeddings",
    "load_lora_embeddings",
    "load_lora_embedding_B",
);

impl DeptConfig {
    /// The scale of the update, `lora_alpha / √r` (`PromptEmbeddingLoRA.__init__`).
    pub fn scaling(&self) -> f64 {
        self.lora_alpha / (self.r as f64).sqrt()
    }

    /// Prompt tuning's checks, and what DePT's reference cannot do or ferrule does not: r = 0
    /// (the reference then scales by 0: the pair trains nothing), SAMPLE_VOCAB (the reference's
    /// init has RANDOM and TEXT only), `max_length` 0, `bias` other than none, and the
    /// switches that leave the pair out of the saved or loaded adapter (a run's adapter would
    /// then load without the update it trained).
    pub fn validate(&self) -> Result<()> {
        self.prompt.validate_as("dept")?;
        if self.r == 0 {
            bail!("dept: r must be at least 1 (--lora-r); with r = 0 the reference scales the low-rank pair by 0, so it would train nothing")
        }
        if self.max_length == 0 {
            bail!("dept: max_length must be at least 1 (--dept-max-length): it is the longest input the low-rank update covers")
        }
        crate::tuners::config::check_alpha("dept: lora_alpha", self.lora_alpha)?;
        if self.prompt.prompt_tuning_init == PromptTuningInit::SampleVocab {
            bail!(
                "dept: prompt_tuning_init = \"SAMPLE_VOCAB\" is not one of DePT's (RANDOM or TEXT)"
            )
        }
        if self.bias != "none" {
            bail!("dept: bias = {:?}: DePT's reference declares bias but never reads it; only \"none\" is accepted", self.bias)
        }
        let switches = [
            ("save_lora_embeddings", self.save_lora_embeddings),
            ("load_lora_embeddings", self.load_lora_embeddings),
            ("load_lora_embedding_B", self.load_lora_embedding_b),
        ];
        if let Some((key, _)) = switches.iter().find(|(_, on)| !on) {
            bail!("dept: {key} = false is not supported: the adapter would be saved or loaded without the low-rank pair it trained (the reference's loader fails on such an adapter too)")
        }
        Ok(())
    }
}

/// `--dept-max-length`: the rows of A.
pub const MAX_LENGTH_FLAG: OptionFlag = OptionFlag {
    name: "dept-max-length",
    value: FlagValue::Count,
    value_name: Some("N"),
    help: "DePT: max_length, the positions the low-rank update of the input embeddings covers (rows of lora_embedding_A; default 256). A longer input is an error.",
    keys: |v| vec![("max_length", v)],
};

/// DePT's command-line flags beside the common ones: prompt tuning's, LoRA's rank and α,
/// and `--dept-max-length`. Its second learning rate is a training setting
/// (`lora_embedding_lr`, `--lora-embedding-lr`), as in the reference's `train.py`.
pub static FLAGS: &[OptionFlag] = &[
    NUM_VIRTUAL_TOKENS_FLAG,
    INIT_TEXT_FLAG,
    INIT_FLAG,
    RANK_FLAG,
    ALPHA_FLAG,
    MAX_LENGTH_FLAG,
];

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::Value;

    fn parsed(v: Value) -> Result<DeptConfig> {
        let c: DeptConfig = serde_json::from_value(v)?;
        c.validate()?;
        Ok(c)
    }

    /// The reference's own saved config (checkpoints/cola/adapter_config.json of the DePT
    /// repository, its TEXT init aside) reads with its values.
    #[test]
    fn the_reference_config_reads_and_bad_values_are_named() {
        let c = parsed(serde_json::json!({
            "bias": "none", "hidden_size": 768, "init_lora_weights": true,
            "load_lora_embedding_B": true, "load_lora_embeddings": true, "lora_alpha": 8,
            "max_length": 256, "num_attention_heads": 12, "num_layers": 12,
            "num_transformer_submodules": 1, "num_virtual_tokens": 80,
            "prompt_tuning_init": "RANDOM", "r": 15, "save_lora_embeddings": true,
            "token_dim": 768
        }))
        .unwrap();
        assert_eq!((c.r, c.max_length), (15, 256));
        assert!((c.scaling() - 8.0 / 15f64.sqrt()).abs() < 1e-15);
        let err = |v: Value| format!("{:#}", parsed(v).unwrap_err());
        let e = err(serde_json::json!({"num_virtual_tokens": 4, "r": 0}));
        assert!(e.contains("dept: r must be at least 1"), "{e}");
        let e = err(serde_json::json!({"num_virtual_tokens": 4, "load_lora_embedding_B": false}));
        assert!(e.contains("load_lora_embedding_B = false"), "{e}");
        let e = err(serde_json::json!({"num_virtual_tokens": 4, "bias": "all"}));
        assert!(e.contains("bias = \"all\""), "{e}");
        let e = err(serde_json::json!({"r": 4}));
        assert!(e.contains("dept: num_virtual_tokens is required"), "{e}");
    }
}
