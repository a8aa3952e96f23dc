//! `DiffFitConfig`, with the key names of LLaMA-DiffFit's peft port (`peft_type` `DIFFFIT`,
//! lawrence-cj/LLaMA-DiffFit `peft/src/peft/tuners/difffit.py`): `target_modules`,
//! `eta_scale`, `eta_exclude`. Its `eta_layers` (γ on some layers only) is not implemented: a
//! set value is refused by name rather than ignored.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tuners::config::serialize_number;
use crate::tuners::flags::{names, text, FlagValue, OptionFlag};
use crate::tuners::target::ModuleSpec;

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

/// One DiffFit adapter's configuration, as `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiffFitConfig {
    /// Linear layers that get an added bias `b_f` and a scale `γ`.
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    /// γ's initial value (the paper's and the port's η); 1 makes the adapter a no-op.
    #[serde(default = "one", serialize_with = "serialize_number")]
    pub eta_scale: f64,
    /// Targets (matched as suffixes) that get the added bias only, no γ.
    #[serde(default)]
    pub eta_exclude: Option<Vec<String>>,
    /// Train the norm layers' weights and biases too, as the paper does.
    #[serde(default = "yes")]
    pub train_norms: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// The port's layer subset for γ; read only to refuse it when set (not implemented).
    #[serde(default, skip_serializing)]
    pub eta_layers: Option<Value>,
}

/// Keys of a DIFFFIT `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &[
    "target_modules",
    "exclude_modules",
    "eta_scale",
    "eta_exclude",
    "train_norms",
    "modules_to_save",
    "eta_layers",
];

impl DiffFitConfig {
    /// γ must start finite and non-zero (a zero γ cuts the layer's gradient to `b_f`), and
    /// `eta_layers` must be unset.
    pub fn validate(&self) -> Result<()> {
        if let Some(layers) = self.eta_layers.as_ref().filter(|v| !v.is_null()) {
            bail!("difffit: eta_layers = {layers} (γ on some layers only) is not implemented; ferrule gives every targeted layer γ. Remove eta_layers, or use eta_exclude for targets that should get the added bias only")
        }
        if !self.eta_scale.is_finite() || self.eta_scale == 0.0 {
            bail!(
                "difffit: eta_scale (--eta-scale) is {}: expected a finite, non-zero initial γ",
                self.eta_scale
            )
        }
        Ok(())
    }
}

/// DiffFit's flags beside the common ones.
pub static FLAGS: &[OptionFlag] = &[
    OptionFlag {
        name: "eta-scale",
        value: FlagValue::Number,
        value_name: Some("ETA"),
        help: "DiffFit: the initial value of every scale γ (default 1).",
        keys: |v| vec![("eta_scale", v)],
    },
    OptionFlag {
        name: "eta-exclude",
        value: FlagValue::Text,
        value_name: None,
        help: "DiffFit: comma-separated targets that get the added bias but no scale γ.",
        keys: |v| vec![("eta_exclude", Value::from(names(text(&v))))],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_or_infinite_initial_gamma_is_refused() {
        let cfg = |eta: f64| DiffFitConfig {
            target_modules: None,
            exclude_modules: None,
            eta_scale: eta,
            eta_exclude: None,
            train_norms: true,
            modules_to_save: None,
            eta_layers: None,
        };
        assert!(cfg(0.5).validate().is_ok());
        let mut layers = cfg(1.0);
        layers.eta_layers = Some(serde_json::json!([0, 1]));
        let e = layers.validate().unwrap_err().to_string();
        assert!(
            e.contains("eta_layers = [0,1]") && e.contains("not implemented"),
            "{e}"
        );
        for bad in [0.0, f64::INFINITY, f64::NAN] {
            let e = cfg(bad).validate().unwrap_err().to_string();
            assert!(e.contains("eta_scale (--eta-scale)"), "{e}");
        }
    }
}
