//! Full fine-tuning's settings. Full fine-tuning is not a PEFT method: its `peft_type`
//! (`"FULL"`) appears only in a run's checkpoints, and a finished run is a Hugging Face model
//! folder, not an adapter.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tuners::flags::{text, FlagValue, OptionFlag};

/// Which parameters train.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FullConfig {
    /// A regular expression searched in each parameter's Hugging Face name
    /// (`model.layers.3.mlp.down_proj.weight`): the parameters it matches train, the others
    /// stay frozen. `None`: every parameter the model offers trains.
    #[serde(default)]
    pub trainable: Option<String>,
}

impl FullConfig {
    /// The compiled `trainable` pattern; an invalid one is an error naming the key.
    pub fn pattern(&self) -> Result<Option<regex::Regex>> {
        self.trainable
            .as_deref()
            .map(|p| regex::Regex::new(p).with_context(|| format!("full: trainable = {p:?}")))
            .transpose()
    }
}

/// Keys of a FULL config that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &["trainable"];

/// `--trainable REGEX`.
pub static FLAGS: &[OptionFlag] = &[OptionFlag {
    name: "trainable",
    value: FlagValue::Text,
    value_name: Some("REGEX"),
    help: "Full fine-tuning: train only the parameters whose Hugging Face name this regular expression matches (searched anywhere in the name, e.g. 'layers\\.(2[0-9])\\.|norm'); the others stay frozen.",
    keys: |v| vec![("trainable", Value::from(text(&v)))],
}];
