//! `PelaConfig`. PELA (Guo et al. 2023) publishes training code (guoyang9/PELA, for ALBEF) but
//! no adapter format, so `peft_type` `PELA` and these keys are ferrule's: `compress_ratio` is
//! the reference's `ModuleLowRank(compress_ratio=3)` (`ALBEF/models/low_rank.py`), `norm_weight`
//! and `norm_eps` the weight and target of its `inf_norm` term (`models/model_pretrain.py`,
//! `inf_norm(..., eps=1e-3)`, added with weight 1 in `Pretrain.py`), `distill_weight` the
//! weight of its feature distillation (`Pretrain.py`: `0.1 * loss_kd`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::tuners::config::serialize_number;
use crate::tuners::flags::{FlagValue, OptionFlag};
use crate::tuners::target::ModuleSpec;

fn ratio_default() -> f64 {
    3.0
}
fn one() -> f64 {
    1.0
}
fn eps_default() -> f64 {
    1e-3
}
fn distill_default() -> f64 {
    0.1
}

/// One PELA adapter's configuration, as `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PelaConfig {
    /// `c`: each targeted `[out, in]` linear gets rank `k = ⌊in·out / (c (in + out))⌋`, so the
    /// two factors hold `1/c` of its weights.
    #[serde(default = "ratio_default", serialize_with = "serialize_number")]
    pub compress_ratio: f64,
    /// Default `all-linear` (every linear but the output head), as the reference replaces every
    /// `nn.Linear` but its heads.
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Weight of the regulariser `mean_l (max|R_l L_l − W_l| − norm_eps)²`; 0 leaves it out.
    #[serde(default = "one", serialize_with = "serialize_number")]
    pub norm_weight: f64,
    /// Its target for the largest entry of `R L − W`.
    #[serde(default = "eps_default", serialize_with = "serialize_number")]
    pub norm_eps: f64,
    /// Weight of the feature distillation against the original model, `mean_s MSE(student_s,
    /// teacher_s)` over every stage output (`train::distill`); 0 leaves it out (and saves the
    /// teacher's forward pass per micro-batch).
    #[serde(default = "distill_default", serialize_with = "serialize_number")]
    pub distill_weight: f64,
}

/// Keys of a PELA `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &[
    "compress_ratio",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "norm_weight",
    "norm_eps",
    "distill_weight",
];

impl PelaConfig {
    /// A positive, finite `compress_ratio`, and a finite, non-negative `norm_weight`,
    /// `norm_eps` and `distill_weight`.
    pub fn validate(&self) -> Result<()> {
        if !(self.compress_ratio.is_finite() && self.compress_ratio > 0.0) {
            bail!(
                "pela: compress_ratio (--compress-ratio) is {}: expected a positive number (the reference uses 3)",
                self.compress_ratio
            )
        }
        for (key, v) in [
            ("norm_weight", self.norm_weight),
            ("norm_eps", self.norm_eps),
            ("distill_weight", self.distill_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("pela: {key} is {v}: expected a finite number ≥ 0")
            }
        }
        Ok(())
    }

    /// `k = ⌊in·out / (c (in + out))⌋` (low_rank.py, `ModuleLowRank._apply`).
    pub fn rank(&self, out_f: usize, in_f: usize) -> usize {
        ((in_f * out_f) as f64 / (self.compress_ratio * (in_f + out_f) as f64)).floor() as usize
    }

    /// [`Self::rank`] of the `[out_f, in_f]` linear at `path`; an error naming it when 0.
    pub fn checked_rank(&self, path: &str, out_f: usize, in_f: usize) -> Result<usize> {
        match self.rank(out_f, in_f) {
            0 => bail!("pela: {path} ([{out_f}, {in_f}]) gets rank ⌊in·out / (c (in + out))⌋ = 0 at compress_ratio {}; leave it out of target_modules (the reference skips layers with fewer than 10 outputs) or lower --compress-ratio", self.compress_ratio),
            k => Ok(k),
        }
    }
}

/// PELA's flags beside the common ones.
pub static FLAGS: &[OptionFlag] = &[
    OptionFlag {
        name: "compress-ratio",
        value: FlagValue::Number,
        value_name: Some("C"),
        help: "PELA: each targeted linear is factorised at rank in·out/(C·(in+out)) (default 3).",
        keys: |v| vec![("compress_ratio", v)],
    },
    OptionFlag {
        name: "distill-weight",
        value: FlagValue::Number,
        value_name: Some("W"),
        help: "PELA: weight of the feature distillation against the original model (default 0.1; 0 skips the teacher pass).",
        keys: |v| vec![("distill_weight", v)],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(c: f64) -> PelaConfig {
        let mut cfg: PelaConfig = serde_json::from_value(serde_json::json!({})).unwrap();
        cfg.compress_ratio = c;
        cfg
    }

    /// SmolLM2's q_proj (576 × 576) at c = 3: 576² / (3 · 1152) = 96; its gate_proj
    /// (1536 × 576): 884736 / 6336 = 139.6 → 139.
    #[test]
    fn the_rank_is_the_references_floor() {
        assert_eq!(cfg(3.0).rank(576, 576), 96);
        assert_eq!(cfg(3.0).rank(1536, 576), 139);
        assert_eq!(cfg(3.0).rank(2, 4), 0);
        assert!(cfg(0.0).validate().is_err());
        assert!(cfg(f64::NAN).validate().is_err());
        assert!(cfg(3.0).validate().is_ok());
    }
}
