//! What prompt tuning and prefix tuning share: PEFT's `PromptLearningConfig` keys (peft
//! `config.py`), the model dimensions PEFT records in them, and the parts of a tuner that add
//! positions instead of changing modules (no targets, no merge).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::flags::{FlagValue, OptionFlag};
use super::modules_to_save::ModulesToSave;

/// PEFT's `PromptLearningConfig` fields, flattened into each method's config.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PromptLearningConfig {
    /// Virtual tokens (prompt tuning) or prefix positions (prefix tuning).
    #[serde(default)]
    pub num_virtual_tokens: Option<usize>,
    /// Width of one virtual token: the hidden size for prompt tuning; for prefix tuning
    /// `kv_heads · head_dim` (PEFT rescales it for grouped-query attention,
    /// `_prepare_prompt_learning_config` in peft `utils/other.py`). PEFT fills it from the model.
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for decoder-only and encoder models, 2 for encoder-decoder ones (not supported).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// Attention heads (key/value heads for prefix tuning on a GQA model).
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Modules trained in full beside the virtual tokens (the classifier for SEQ_CLS).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// The `PromptLearningConfig` keys every prompt-learning method has.
pub const COMMON_KEYS: [&str; 6] = [
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "modules_to_save",
];

/// `--num-virtual-tokens`, which prompt and prefix tuning share.
pub const NUM_VIRTUAL_TOKENS_FLAG: OptionFlag = OptionFlag {
    name: "num-virtual-tokens",
    value: FlagValue::Count,
    value_name: None,
    help: "Prompt / prefix tuning: virtual tokens (prefix positions) to train.",
    keys: |v| vec![("num_virtual_tokens", v)],
};

/// The model dimensions PEFT writes into a prompt-learning config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelDims {
    pub token_dim: usize,
    pub num_attention_heads: usize,
    pub num_layers: usize,
}

impl PromptLearningConfig {
    /// `num_virtual_tokens`, which must be set and positive (`method` names the method).
    pub fn virtual_tokens(&self, method: &str) -> Result<usize> {
        match self.num_virtual_tokens {
            Some(n) if n > 0 => Ok(n),
            Some(_) => bail!("{method}: num_virtual_tokens must be at least 1"),
            None => {
                bail!("{method}: num_virtual_tokens is required (e.g. 20; --num-virtual-tokens)")
            }
        }
    }

    /// Rejects what no ferrule model has: an encoder-decoder adapter.
    pub fn validate(&self, method: &str) -> Result<()> {
        self.virtual_tokens(method)?;
        if let Some(s) = self.num_transformer_submodules.filter(|&s| s != 1) {
            bail!("{method}: num_transformer_submodules = {s} is for encoder-decoder models; ferrule's models have one transformer stack (1)")
        }
        Ok(())
    }

    /// Checks the dimensions a saved (or hand-written) config records against the model's, and
    /// fills the ones left unset, as PEFT does when it attaches the adapter. A mismatch of a
    /// dimension the method's tensors depend on (`checked`) means the adapter was made for
    /// another model: an error naming the key. Others are only recorded (a warning if they differ).
    pub fn fill_dims(&mut self, method: &str, model: ModelDims, checked: &[&str]) -> Result<()> {
        let fields = [
            ("token_dim", &mut self.token_dim, model.token_dim),
            (
                "num_attention_heads",
                &mut self.num_attention_heads,
                model.num_attention_heads,
            ),
            ("num_layers", &mut self.num_layers, model.num_layers),
        ];
        for (key, slot, want) in fields {
            match *slot {
                Some(have) if have != want && checked.contains(&key) => {
                    bail!("{method}: the adapter config has {key} = {have}, but this model needs {want}: the adapter was made for another model")
                }
                Some(have) if have != want => tracing::warn!("{method}: the adapter config has {key} = {have}; this model has {want} (unused by {method})"),
                Some(_) => {}
                None => *slot = Some(want),
            }
        }
        self.num_transformer_submodules = Some(1);
        Ok(())
    }
}

/// The modules a prompt-learning tuner trains in full: PEFT keys them `base_model.<path>`
/// (the transformer is the PEFT model's `base_model` itself, without LoRA's `model.` level).
pub fn modules_to_save(config: &PromptLearningConfig) -> ModulesToSave {
    ModulesToSave::with_key_prefix(config.modules_to_save.as_deref(), "base_model.")
}

/// The error a merge of a prompt-learning adapter gets: it adds positions, not weights.
pub fn no_merge(peft_type: &str) -> anyhow::Error {
    anyhow::anyhow!("{peft_type} adds positions before the input instead of changing weights, so it cannot be merged into the base (peft cannot merge it either); use the adapter with eval, generate or logits")
}
