//! `DiffFitConfig`, with the key names of LLaMA-DiffFit's peft port (`peft_type` `DIFFFIT`,
//! lawrence-cj/LLaMA-DiffFit `peft/src/peft/tuners/difffit.py`): `target_modules`,
//! `eta_scale`, `eta_exclude`, `eta_layers`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tuners::config::serialize_number;
use crate::tuners::flags::{names, text, FlagValue, OptionFlag};
use crate::tuners::target::{suffix_match, LayersToTransform, ModuleSpec};

/// The `eta_layers` entry that stands for every layer (the port's `100 in eta_layers`).
pub const ALL_LAYERS: usize = 100;

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
    /// The numbered layers whose targets get γ (the port's `eta_layers`): unset, or holding
    /// [`ALL_LAYERS`], for every layer; otherwise only the listed ones, so `[]` gives no
    /// layer γ. Targets outside numbered layers get γ only with every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_layers: Option<LayersToTransform>,
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
    /// γ must start finite and non-zero (a zero γ cuts the layer's gradient to `b_f`).
    pub fn validate(&self) -> Result<()> {
        if !self.eta_scale.is_finite() || self.eta_scale == 0.0 {
            bail!(
                "difffit: eta_scale (--eta-scale) is {}: expected a finite, non-zero initial γ",
                self.eta_scale
            )
        }
        Ok(())
    }

    /// The layers `eta_layers` gives γ: `None` for every layer.
    pub fn gamma_layers(&self) -> Option<Vec<usize>> {
        let listed = match self.eta_layers.as_ref()? {
            LayersToTransform::One(i) => vec![*i],
            LayersToTransform::Many(v) => v.clone(),
        };
        match listed.contains(&ALL_LAYERS) {
            true => None,
            false => Some(listed),
        }
    }

    /// Whether the targeted linear at `path`, in numbered layer `layer`, gets γ: in
    /// `eta_layers` and not in `eta_exclude` (port `difffit.py` `_find_and_replace`).
    pub fn has_gamma(&self, path: &str, layer: Option<usize>) -> bool {
        let in_layers = match (self.gamma_layers(), layer) {
            (None, _) => true,
            (Some(listed), Some(i)) => listed.contains(&i),
            (Some(_), None) => false,
        };
        in_layers && !self.excluded_from_gamma(path)
    }

    /// Whether `eta_exclude` names the linear at `path` (matched as a suffix).
    pub fn excluded_from_gamma(&self, path: &str) -> bool {
        let exclude = self.eta_exclude.as_deref().unwrap_or_default();
        exclude.iter().any(|e| suffix_match(path, e))
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
        for bad in [0.0, f64::INFINITY, f64::NAN] {
            let e = cfg(bad).validate().unwrap_err().to_string();
            assert!(e.contains("eta_scale (--eta-scale)"), "{e}");
        }
    }

    /// The port's reading of `eta_layers`: listed layers only, 100 for all, `[]` for none;
    /// `eta_exclude` applies in every case.
    #[test]
    fn eta_layers_selects_the_layers_with_gamma() {
        let cfg = |layers: serde_json::Value| -> DiffFitConfig {
            serde_json::from_value(
                serde_json::json!({"eta_layers": layers, "eta_exclude": ["down_proj"]}),
            )
            .unwrap()
        };
        let q = |i: usize| format!("model.layers.{i}.self_attn.q_proj");
        let listed = cfg(serde_json::json!([0, 2]));
        assert!(listed.has_gamma(&q(0), Some(0)) && listed.has_gamma(&q(2), Some(2)));
        assert!(!listed.has_gamma(&q(1), Some(1)));
        assert!(
            !listed.has_gamma("pooler.dense", None),
            "outside the numbered layers"
        );
        assert!(
            !listed.has_gamma("model.layers.0.mlp.down_proj", Some(0)),
            "excluded"
        );
        let one = cfg(serde_json::json!(1));
        assert!(one.has_gamma(&q(1), Some(1)) && !one.has_gamma(&q(0), Some(0)));
        let all = cfg(serde_json::json!([3, 100]));
        assert!(all.has_gamma(&q(7), Some(7)) && all.has_gamma("pooler.dense", None));
        assert!(!all.has_gamma("model.layers.7.mlp.down_proj", Some(7)));
        assert!(!cfg(serde_json::json!([])).has_gamma(&q(0), Some(0)));
        let bad = serde_json::from_value::<DiffFitConfig>(serde_json::json!({"eta_layers": "all"}));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("a layer index or a list of layer indices"));
    }
}
