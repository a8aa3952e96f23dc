//! `PstConfig`: PST's settings under the reference's argument names (alibaba/AliceMind
//! `S4/PST/NLU/run_glue.py`: `--sparsity`, `--initial_sparsity`, `--weight_rank`,
//! `--weight_beta`, `--mask_rank`, `--mask_alpha1`, `--mask_alpha2`, `--initial_warmup`,
//! `--final_warmup`) and their defaults, plus peft's target keys. The reference writes no
//! adapter folder (its `save_sparse_model` pickles the pruned dense state dict), so
//! `peft_type` `PST` is ferrule's own.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::tuners::config::serialize_number;
use crate::tuners::flags::{FlagValue, OptionFlag};
use crate::tuners::target::{LayersPattern, LayersToTransform, ModuleSpec};

fn default_sparsity() -> f64 {
    0.9
}
fn default_rank() -> usize {
    8
}
fn one() -> f64 {
    1.0
}
fn default_initial_warmup() -> f64 {
    0.1
}
fn default_final_warmup() -> f64 {
    0.3
}

/// One PST adapter's configuration, as its `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PstConfig {
    /// The fraction of each targeted matrix's entries pruned at the schedule's end, in
    /// `[0, 1)` (run_glue.py `--sparsity`, default 0.9). A saved adapter runs at it.
    #[serde(default = "default_sparsity", serialize_with = "serialize_number")]
    pub sparsity: f64,
    /// The fraction pruned before the schedule rises (`--initial_sparsity`, default 0), in
    /// `[0, sparsity]`.
    #[serde(default, serialize_with = "serialize_number")]
    pub initial_sparsity: f64,
    /// The rank of the weight update `U: [out, r]`, `V: [r, in]` (`--weight_rank`, 8).
    #[serde(default = "default_rank")]
    pub weight_rank: usize,
    /// β in `W̃ = W + β U V` (`--weight_beta`, 1).
    #[serde(default = "one", serialize_with = "serialize_number")]
    pub weight_beta: f64,
    /// The rank of the low-rank score `A: [out, r]`, `B: [r, in]` (`--mask_rank`, 8).
    #[serde(default = "default_rank")]
    pub mask_rank: usize,
    /// α1, the low-rank score's scale (`--mask_alpha1`, 1).
    #[serde(default = "one", serialize_with = "serialize_number")]
    pub mask_alpha1: f64,
    /// α2, the row and column scores' scale (`--mask_alpha2`, 1).
    #[serde(default = "one", serialize_with = "serialize_number")]
    pub mask_alpha2: f64,
    /// The fraction of the run's steps at `initial_sparsity` before the cubic rise
    /// (`--initial_warmup`, 0.1).
    #[serde(
        default = "default_initial_warmup",
        serialize_with = "serialize_number"
    )]
    pub initial_warmup: f64,
    /// The fraction of the run's steps at `sparsity` after it (`--final_warmup`, 0.3).
    #[serde(default = "default_final_warmup", serialize_with = "serialize_number")]
    pub final_warmup: f64,
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
}

/// Keys of a PST `adapter_config.json`.
pub const KNOWN_KEYS: &[&str] = &[
    "sparsity",
    "initial_sparsity",
    "weight_rank",
    "weight_beta",
    "mask_rank",
    "mask_alpha1",
    "mask_alpha2",
    "initial_warmup",
    "final_warmup",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
];

impl PstConfig {
    /// Each value in the range the reference's schedule and layer can use, else an error
    /// naming the key and its flag: sparsity in `[0, 1)` (1 would prune every weight),
    /// `initial_sparsity` in `[0, sparsity]`, ranks ≥ 1, finite scales, warmup fractions in
    /// `[0, 1]` that do not overlap (`initial_warmup + final_warmup ≤ 1`).
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.sparsity) {
            bail!("pst: sparsity (--pst-sparsity) is {}: expected a fraction in [0, 1) of each matrix's entries to prune", self.sparsity)
        }
        if !(0.0..=self.sparsity).contains(&self.initial_sparsity) {
            bail!(
                "pst: initial_sparsity (--pst-initial-sparsity) is {}: expected a fraction in [0, sparsity = {}]",
                self.initial_sparsity,
                self.sparsity
            )
        }
        for (key, flag, rank) in [
            ("weight_rank", "--pst-weight-rank", self.weight_rank),
            ("mask_rank", "--pst-mask-rank", self.mask_rank),
        ] {
            if rank == 0 {
                bail!("pst: {key} ({flag}) is 0: expected a rank of at least 1")
            }
        }
        for (key, flag, v) in [
            ("weight_beta", "--pst-weight-beta", self.weight_beta),
            ("mask_alpha1", "--pst-mask-alpha1", self.mask_alpha1),
            ("mask_alpha2", "--pst-mask-alpha2", self.mask_alpha2),
        ] {
            if !v.is_finite() {
                bail!("pst: {key} ({flag}) is {v}: expected a finite number")
            }
        }
        for (key, flag, v) in [
            (
                "initial_warmup",
                "--pst-initial-warmup",
                self.initial_warmup,
            ),
            ("final_warmup", "--pst-final-warmup", self.final_warmup),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!(
                    "pst: {key} ({flag}) is {v}: expected a fraction in [0, 1] of the run's steps"
                )
            }
        }
        if self.initial_warmup + self.final_warmup > 1.0 {
            bail!(
                "pst: initial_warmup + final_warmup = {} + {} is more than the whole run: the sparsity would reach its target before it starts rising",
                self.initial_warmup,
                self.final_warmup
            )
        }
        Ok(())
    }
}

/// PST's command-line flags beside the common ones, one per key.
pub static FLAGS: &[OptionFlag] = &[
    OptionFlag {
        name: "pst-sparsity",
        value: FlagValue::Number,
        value_name: Some("FRACTION"),
        help: "PST: the fraction of each targeted matrix's entries pruned at the schedule's end (default 0.9).",
        keys: |v| vec![("sparsity", v)],
    },
    OptionFlag {
        name: "pst-initial-sparsity",
        value: FlagValue::Number,
        value_name: Some("FRACTION"),
        help: "PST: the fraction pruned before the sparsity starts rising (default 0).",
        keys: |v| vec![("initial_sparsity", v)],
    },
    OptionFlag {
        name: "pst-weight-rank",
        value: FlagValue::Count,
        value_name: Some("R"),
        help: "PST: the rank of the weight update β·U V (default 8).",
        keys: |v| vec![("weight_rank", v)],
    },
    OptionFlag {
        name: "pst-weight-beta",
        value: FlagValue::Number,
        value_name: Some("BETA"),
        help: "PST: β, the weight update's scale (default 1).",
        keys: |v| vec![("weight_beta", v)],
    },
    OptionFlag {
        name: "pst-mask-rank",
        value: FlagValue::Count,
        value_name: Some("R"),
        help: "PST: the rank of the low-rank score A B (default 8).",
        keys: |v| vec![("mask_rank", v)],
    },
    OptionFlag {
        name: "pst-mask-alpha1",
        value: FlagValue::Number,
        value_name: Some("ALPHA"),
        help: "PST: α1, the low-rank score's scale (default 1).",
        keys: |v| vec![("mask_alpha1", v)],
    },
    OptionFlag {
        name: "pst-mask-alpha2",
        value: FlagValue::Number,
        value_name: Some("ALPHA"),
        help: "PST: α2, the row and column scores' scale (default 1).",
        keys: |v| vec![("mask_alpha2", v)],
    },
    OptionFlag {
        name: "pst-initial-warmup",
        value: FlagValue::Number,
        value_name: Some("FRACTION"),
        help: "PST: the fraction of the run's steps before the sparsity rises (default 0.1).",
        keys: |v| vec![("initial_warmup", v)],
    },
    OptionFlag {
        name: "pst-final-warmup",
        value: FlagValue::Number,
        value_name: Some("FRACTION"),
        help: "PST: the fraction of the run's steps at the target sparsity at the end (default 0.3).",
        keys: |v| vec![("final_warmup", v)],
    },
];

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::PstConfig;
    use crate::tuners::AdapterConfig;

    fn parse(options: serde_json::Value) -> anyhow::Result<PstConfig> {
        let c: PstConfig =
            AdapterConfig::new("PST", options.as_object().unwrap().clone()).typed("pst")?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_are_run_glues_and_bad_values_are_named() {
        let c = parse(json!({})).unwrap();
        assert_eq!(
            (c.sparsity, c.initial_sparsity, c.weight_rank, c.mask_rank),
            (0.9, 0.0, 8, 8)
        );
        assert_eq!(
            (c.weight_beta, c.mask_alpha1, c.mask_alpha2),
            (1.0, 1.0, 1.0)
        );
        assert_eq!((c.initial_warmup, c.final_warmup), (0.1, 0.3));
        for (options, key) in [
            (json!({"sparsity": 1.0}), "sparsity (--pst-sparsity) is 1"),
            (
                json!({"sparsity": -0.1}),
                "sparsity (--pst-sparsity) is -0.1",
            ),
            (
                json!({"sparsity": 0.5, "initial_sparsity": 0.6}),
                "initial_sparsity (--pst-initial-sparsity) is 0.6",
            ),
            (
                json!({"weight_rank": 0}),
                "weight_rank (--pst-weight-rank) is 0",
            ),
            (json!({"mask_rank": 0}), "mask_rank (--pst-mask-rank) is 0"),
            (
                json!({"final_warmup": 1.5}),
                "final_warmup (--pst-final-warmup)",
            ),
            (
                json!({"initial_warmup": 0.5, "final_warmup": 0.6}),
                "initial_warmup + final_warmup",
            ),
            (json!({"sparsity": "high"}), "\"sparsity\""),
        ] {
            let e = format!("{:#}", parse(options.clone()).unwrap_err());
            assert!(e.contains(key), "{options}: {e}");
        }
    }
}
