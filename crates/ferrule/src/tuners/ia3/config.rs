//! `IA3Config`, with PEFT's key names and defaults (peft `tuners/ia3/config.py`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tuners::flags::{names, text, FlagValue, OptionFlag};
use crate::tuners::target::ModuleSpec;

fn yes() -> bool {
    true
}

/// One IA3 adapter's configuration, as `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ia3Config {
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    /// Targets whose input is scaled (`[1, in]` vectors); the others scale their output.
    #[serde(default)]
    pub feedforward_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: every `ia3_l` starts at 1 (the adapter is a no-op); `false`: standard normal.
    #[serde(default = "yes")]
    pub init_ia3_weights: bool,
}

/// Keys of an IA3 `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &[
    "target_modules",
    "exclude_modules",
    "feedforward_modules",
    "fan_in_fan_out",
    "modules_to_save",
    "init_ia3_weights",
];

impl Ia3Config {
    /// PEFT's checks (`feedforward_modules` ⊆ `target_modules` when both are lists) and
    /// ferrule's (no Conv1D layers).
    pub fn validate(&self) -> Result<()> {
        if self.fan_in_fan_out {
            bail!("ia3: fan_in_fan_out (GPT-2 Conv1D layers) is not supported: no supported architecture uses Conv1D")
        }
        if let (Some(ModuleSpec::Names(ff)), Some(ModuleSpec::Names(t))) =
            (&self.feedforward_modules, &self.target_modules)
        {
            if let Some(extra) = ff.iter().find(|f| !t.contains(f)) {
                bail!("ia3: feedforward_modules should be a subset of target_modules; {extra:?} is not in target_modules {t:?}")
            }
        }
        Ok(())
    }
}

/// IA3's command-line flags beside the common ones.
pub static FLAGS: &[OptionFlag] = &[OptionFlag {
    name: "feedforward-modules",
    value: FlagValue::Text,
    value_name: None,
    help: "IA3: comma-separated targets whose input (not output) is scaled.",
    keys: |v| vec![("feedforward_modules", Value::from(names(text(&v))))],
}];
