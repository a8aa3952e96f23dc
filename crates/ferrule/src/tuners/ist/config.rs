//! `IstConfig`: IST's settings (Yao et al. 2024, "IST: Importance-aware Sparse Tuning"), under
//! ferrule's key names with the reference's defaults (antgroup/importance-aware-sparse-tuning-
//! IST-paper `ist.py`, `ISTCallback.__init__`, lines 35-43: `rl_step = 3`, `rl_lr = 10`,
//! `response_suppression_factor = 0.25`, `update_importance_interval_steps = 10`,
//! `n_layers_updated = int(L·0.25)`, `n_layers_suppressed = int(L·0.5)`). IST writes no adapter
//! of its own: it schedules which layers of another method train (`finetune.py --use_ist`
//! beside `--adapter_name lora|dora|bottleneck`), so its keys sit beside that method's and the
//! saved folder is that method's ([`super::Ist`]).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tuners::flags::{text, FlagValue, OptionFlag};

/// The method IST schedules (`finetune.py --adapter_name`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IstBase {
    /// LoRA (`--method lora`'s defaults: r 8, α 16).
    #[default]
    Lora,
    /// DoRA: LoRA with `use_dora` (the reference's `DoraConfig`).
    Dora,
    /// LLM-Adapters' bottleneck adapters (`--method bottleneck`).
    Bottleneck,
}

impl IstBase {
    /// The name `ist_base` takes.
    pub fn name(self) -> &'static str {
        match self {
            IstBase::Lora => "lora",
            IstBase::Dora => "dora",
            IstBase::Bottleneck => "bottleneck",
        }
    }
}

fn interval() -> usize {
    10
}
fn rollouts() -> usize {
    3
}
fn score_lr() -> f64 {
    10.0
}
fn quarter() -> f64 {
    0.25
}
fn half() -> f64 {
    0.5
}

/// IST's own keys. The base method's keys sit beside them in the same config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IstConfig {
    /// The method whose layers IST schedules (default `lora`).
    #[serde(default)]
    pub ist_base: IstBase,
    /// Optimizer steps between score updates (`update_importance_interval_steps`, 10): the
    /// rollouts run before step k for every k > 0 that it divides.
    #[serde(default = "interval")]
    pub ist_update_interval: usize,
    /// Rollouts per score update (`rl_step`, 3), each on a distinct set of layers.
    #[serde(default = "rollouts")]
    pub ist_rollouts: usize,
    /// The score's learning rate (`rl_lr`, 10).
    #[serde(default = "score_lr")]
    pub ist_score_lr: f64,
    /// What a suppressed layer's adapter output is multiplied by in a rollout
    /// (`response_suppression_factor`, 0.25).
    #[serde(default = "quarter")]
    pub ist_suppression_factor: f64,
    /// The fraction of layers trained in each step (`n_layers_updated = int(L·0.25)`).
    #[serde(default = "quarter")]
    pub ist_trainable_fraction: f64,
    /// The fraction of layers suppressed in each rollout (`n_layers_suppressed = int(L·0.5)`).
    #[serde(default = "half")]
    pub ist_suppressed_fraction: f64,
}

/// IST's own keys (the base method's are added in [`super::KEYS`]).
pub const IST_KEYS: &[&str] = &[
    "ist_base",
    "ist_update_interval",
    "ist_rollouts",
    "ist_score_lr",
    "ist_suppression_factor",
    "ist_trainable_fraction",
    "ist_suppressed_fraction",
];

impl IstConfig {
    /// Each value in the range the reference's schedule can use, else an error naming the key
    /// and its flag: fractions in (0, 1], at least 2 rollouts (rewards are centred on their
    /// mean, so a single rollout's reward is always 0 and no score would move), an interval of
    /// at least 1, a finite positive score rate, a suppression factor in [0, 1].
    pub fn validate(&self) -> Result<()> {
        for (key, flag, v) in [
            (
                "ist_trainable_fraction",
                "--ist-trainable-fraction",
                self.ist_trainable_fraction,
            ),
            (
                "ist_suppressed_fraction",
                "--ist-suppressed-fraction",
                self.ist_suppressed_fraction,
            ),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                bail!("ist: {key} ({flag}) is {v}: expected a fraction of the model's layers in (0, 1]")
            }
        }
        if self.ist_rollouts < 2 {
            bail!(
                "ist: ist_rollouts (--ist-rollouts) is {}: expected at least 2 (each rollout's reward is exp(-loss) minus the rollouts' mean, so one rollout always scores 0 and no layer's score would move)",
                self.ist_rollouts
            )
        }
        if self.ist_update_interval == 0 {
            bail!("ist: ist_update_interval (--ist-update-interval) is 0: expected at least 1 optimizer step between score updates")
        }
        if !(self.ist_score_lr.is_finite() && self.ist_score_lr > 0.0) {
            bail!(
                "ist: ist_score_lr (--ist-score-lr) is {}: expected a finite number above 0",
                self.ist_score_lr
            )
        }
        let f = self.ist_suppression_factor;
        if !(0.0..=1.0).contains(&f) {
            bail!("ist: ist_suppression_factor (--ist-suppression-factor) is {f}: expected a factor in [0, 1] for a suppressed layer's adapter output")
        }
        Ok(())
    }

    /// Layers trained per step, `int(L·ist_trainable_fraction)` as the reference counts.
    pub fn trainable_layers(&self, layers: usize) -> usize {
        (layers as f64 * self.ist_trainable_fraction) as usize
    }

    /// Layers suppressed per rollout, `int(L·ist_suppressed_fraction)`.
    pub fn suppressed_layers(&self, layers: usize) -> usize {
        (layers as f64 * self.ist_suppressed_fraction) as usize
    }
}

/// IST's command-line flags, one per key; the base method's flags (`--lora-r`,
/// `--bottleneck-size`, ...) set its keys as they do for that method.
pub static FLAGS: &[OptionFlag] = &[
    OptionFlag {
        name: "ist-base",
        value: FlagValue::Text,
        value_name: Some("lora|dora|bottleneck"),
        help: "IST: the method whose layers it schedules (default lora); the run saves that method's adapter.",
        keys: |v| vec![("ist_base", Value::from(text(&v).trim().to_ascii_lowercase()))],
    },
    OptionFlag {
        name: "ist-update-interval",
        value: FlagValue::Count,
        value_name: Some("STEPS"),
        help: "IST: optimizer steps between layer-score updates (default 10).",
        keys: |v| vec![("ist_update_interval", v)],
    },
    OptionFlag {
        name: "ist-rollouts",
        value: FlagValue::Count,
        value_name: Some("N"),
        help: "IST: rollouts per score update, each suppressing a distinct set of layers (default 3).",
        keys: |v| vec![("ist_rollouts", v)],
    },
    OptionFlag {
        name: "ist-score-lr",
        value: FlagValue::Number,
        value_name: Some("RATE"),
        help: "IST: the layer scores' learning rate (default 10).",
        keys: |v| vec![("ist_score_lr", v)],
    },
    OptionFlag {
        name: "ist-suppression-factor",
        value: FlagValue::Number,
        value_name: Some("FACTOR"),
        help: "IST: what a suppressed layer's adapter output is multiplied by in a rollout (default 0.25).",
        keys: |v| vec![("ist_suppression_factor", v)],
    },
    OptionFlag {
        name: "ist-trainable-fraction",
        value: FlagValue::Number,
        value_name: Some("FRACTION"),
        help: "IST: the fraction of layers trained in each step, drawn by importance (default 0.25).",
        keys: |v| vec![("ist_trainable_fraction", v)],
    },
    OptionFlag {
        name: "ist-suppressed-fraction",
        value: FlagValue::Number,
        value_name: Some("FRACTION"),
        help: "IST: the fraction of layers suppressed in each rollout (default 0.5).",
        keys: |v| vec![("ist_suppressed_fraction", v)],
    },
];

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::tuners::AdapterConfig;

    fn parse(options: serde_json::Value) -> Result<IstConfig> {
        let c: IstConfig =
            AdapterConfig::new("IST", options.as_object().unwrap().clone()).typed("ist")?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_are_the_references_and_bad_values_are_named() {
        let c = parse(json!({})).unwrap();
        assert_eq!(c.ist_base, IstBase::Lora);
        assert_eq!((c.ist_update_interval, c.ist_rollouts), (10, 3));
        assert_eq!(
            (
                c.ist_score_lr,
                c.ist_suppression_factor,
                c.ist_trainable_fraction,
                c.ist_suppressed_fraction
            ),
            (10.0, 0.25, 0.25, 0.5)
        );
        // int(L·0.25) and int(L·0.5) as the reference counts: 30 layers → 7 and 15.
        assert_eq!((c.trainable_layers(30), c.suppressed_layers(30)), (7, 15));
        for (options, want) in [
            (
                json!({"ist_trainable_fraction": 0.0}),
                "ist_trainable_fraction (--ist-trainable-fraction) is 0",
            ),
            (
                json!({"ist_trainable_fraction": 1.5}),
                "ist_trainable_fraction (--ist-trainable-fraction) is 1.5",
            ),
            (
                json!({"ist_suppressed_fraction": -0.5}),
                "ist_suppressed_fraction (--ist-suppressed-fraction) is -0.5",
            ),
            (
                json!({"ist_rollouts": 1}),
                "ist_rollouts (--ist-rollouts) is 1",
            ),
            (
                json!({"ist_update_interval": 0}),
                "ist_update_interval (--ist-update-interval) is 0",
            ),
            (
                json!({"ist_score_lr": 0.0}),
                "ist_score_lr (--ist-score-lr) is 0",
            ),
            (
                json!({"ist_suppression_factor": 2.0}),
                "ist_suppression_factor (--ist-suppression-factor) is 2",
            ),
            (json!({"ist_base": "adalora"}), "\"ist_base\""),
        ] {
            let e = format!("{:#}", parse(options.clone()).unwrap_err());
            assert!(e.contains(want), "{options}: {e}");
        }
        assert_eq!(
            parse(json!({"ist_base": "dora"})).unwrap().ist_base,
            IstBase::Dora
        );
    }
}
