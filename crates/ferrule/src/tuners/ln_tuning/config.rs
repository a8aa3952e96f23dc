//! `LNTuningConfig`, with PEFT's key names (peft `tuners/ln_tuning/config.py`).

use serde::{Deserialize, Serialize};

use crate::tuners::target::ModuleSpec;

/// One LN-tuning adapter's configuration, as `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LnTuningConfig {
    /// Norm layers whose weight (and bias) are trained.
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// Keys of an LN_TUNING `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &["target_modules", "exclude_modules", "modules_to_save"];
