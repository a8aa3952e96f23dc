//! Learning-rate schedules with linear warmup, matching Hugging Face
//! `transformers.optimization` exactly.
//!
//! transformers wraps each schedule in `torch.optim.lr_scheduler.LambdaLR`,
//! so the learning rate used by the optimizer step with 0-based index `k` is
//! `base_lr * lambda(k)` (`scheduler.step()` is called *after*
//! `optimizer.step()`). In particular, with `warmup_steps > 0` the very first
//! update uses a learning rate of `0`, as in transformers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Shape of the learning-rate curve after warmup. Serialized in lowercase
/// (`"constant"`, `"linear"`, `"cosine"`), like transformers'
/// `lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `get_constant_schedule_with_warmup`: `lambda = 1` after warmup.
    Constant,
    /// `get_linear_schedule_with_warmup` (transformers' default): decays
    /// linearly from `base_lr` at the end of warmup to `0` at `total_steps`.
    #[default]
    Linear,
    /// `get_cosine_schedule_with_warmup` with `num_cycles = 0.5`: half a
    /// cosine wave from `base_lr` to `0` at `total_steps`.
    Cosine,
}

impl LrSchedule {
    /// The lowercase name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Linear => "linear",
            LrSchedule::Cosine => "cosine",
        }
    }
}

impl fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LrSchedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "constant" => Ok(LrSchedule::Constant),
            "linear" => Ok(LrSchedule::Linear),
            "cosine" => Ok(LrSchedule::Cosine),
            other => anyhow::bail!(
                "unknown learning-rate schedule {other:?} (expected constant, linear or cosine)"
            ),
        }
    }
}

/// The multiplier `lambda(step)` applied to the base learning rate.
///
/// With `w = warmup_steps`, `T = total_steps` and `k = step` (0-based):
///
/// * warmup (all schedules), `k < w`: `k / max(1, w)`
/// * constant: `1`
/// * linear: `max(0, (T - k) / max(1, T - w))`
/// * cosine: `max(0, 0.5 * (1 + cos(pi * 2 * 0.5 * progress)))` with
///   `progress = (k - w) / max(1, T - w)`
///
/// These are transformers' `_get_*_schedule_with_warmup_lr_lambda` functions
/// verbatim, including their behaviour past `total_steps` (linear stays at
/// `0`, cosine rises again since `progress > 1`) and when `w > T`.
pub fn lr_lambda(
    schedule: LrSchedule,
    step: usize,
    warmup_steps: usize,
    total_steps: usize,
) -> f64 {
    let k = step as f64;
    if step < warmup_steps {
        // transformers: float(current_step) / float(max(1, num_warmup_steps))
        return k / (warmup_steps.max(1) as f64);
    }
    // Python ints are signed: `num_training_steps - num_warmup_steps` may be
    // negative, in which case `max(1, ...)` picks 1.
    let decay_steps = (total_steps as i128 - warmup_steps as i128).max(1) as f64;
    match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::Linear => {
            let remaining = (total_steps as i128 - step as i128) as f64;
            (remaining / decay_steps).max(0.0)
        }
        LrSchedule::Cosine => {
            const NUM_CYCLES: f64 = 0.5;
            let progress = (step - warmup_steps) as f64 / decay_steps;
            (0.5 * (1.0 + (std::f64::consts::PI * NUM_CYCLES * 2.0 * progress).cos())).max(0.0)
        }
    }
}

/// Learning rate for the optimizer step with 0-based index `step`:
/// `base_lr * lr_lambda(schedule, step, warmup_steps, total_steps)`, exactly
/// as `LambdaLR` computes it. `step` counts optimizer steps (not
/// micro-batches under gradient accumulation).
pub fn lr_at(
    schedule: LrSchedule,
    base_lr: f64,
    step: usize,
    warmup_steps: usize,
    total_steps: usize,
) -> f64 {
    base_lr * lr_lambda(schedule, step, warmup_steps, total_steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-12 * w.abs().max(1e-12),
                "step {k}: got {g}, want {w}"
            );
        }
    }

    fn curve(s: LrSchedule, w: usize, t: usize) -> Vec<f64> {
        (0..16).map(|k| lr_at(s, 2e-4, k, w, t)).collect()
    }

    #[test]
    fn hand_checked_values() {
        use LrSchedule::*;
        // warmup 10, total 100, base 1e-3
        assert_eq!(lr_at(Constant, 1e-3, 0, 10, 100), 0.0);
        assert_eq!(lr_at(Constant, 1e-3, 5, 10, 100), 1e-3 * 0.5);
        assert_eq!(lr_at(Constant, 1e-3, 10, 10, 100), 1e-3);
        assert_eq!(lr_at(Constant, 1e-3, 10_000, 10, 100), 1e-3);
        assert_eq!(lr_at(Linear, 1e-3, 10, 10, 100), 1e-3);
        assert_eq!(lr_at(Linear, 1e-3, 55, 10, 100), 1e-3 * 0.5);
        assert_eq!(lr_at(Linear, 1e-3, 100, 10, 100), 0.0);
        assert_eq!(lr_at(Linear, 1e-3, 120, 10, 100), 0.0);
        assert_eq!(lr_at(Cosine, 1e-3, 10, 10, 100), 1e-3);
        assert!((lr_at(Cosine, 1e-3, 55, 10, 100) - 0.5e-3).abs() < 1e-18);
        // No warmup: the first step already uses the full rate.
        assert_eq!(lr_at(Linear, 1e-3, 0, 0, 100), 1e-3);
        // progress 1/4: 0.5 * (1 + cos(pi/4)) = 0.8535533905932737
        assert!((lr_lambda(Cosine, 25, 0, 100) - 0.853_553_390_593_273_8).abs() < 1e-15);
        assert!(lr_lambda(Cosine, 100, 0, 100).abs() < 1e-15);
        // transformers' cosine rises again after total_steps.
        assert!((lr_lambda(Cosine, 150, 0, 100) - 0.5).abs() < 1e-15);
    }

    /// Reference values from transformers 5.24 / torch 2.15:
    ///
    /// ```python
    /// p = torch.nn.Parameter(torch.zeros(1)); opt = torch.optim.SGD([p], lr=2e-4)
    /// s = get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=13)
    /// for k in range(16):
    ///     print(opt.param_groups[0]["lr"]); opt.step(); s.step()
    /// ```
    /// (and likewise for the other schedules / arguments below).
    #[test]
    fn matches_transformers() {
        use LrSchedule::*;
        #[rustfmt::skip]
        let constant = [0.0, 6.666666666666667e-05, 0.00013333333333333334, 0.0002, 0.0002, 0.0002, 0.0002, 0.0002, 0.0002, 0.0002, 0.0002, 0.0002, 0.0002, 0.0002, 0.0002, 0.0002];
        #[rustfmt::skip]
        let linear = [0.0, 6.666666666666667e-05, 0.00013333333333333334, 0.0002, 0.00018, 0.00016, 0.00014, 0.00012, 0.0001, 8e-05, 6e-05, 4e-05, 2e-05, 0.0, 0.0, 0.0];
        #[rustfmt::skip]
        let cosine = [0.0, 6.666666666666667e-05, 0.00013333333333333334, 0.0002, 0.00019510565162951537, 0.00018090169943749476, 0.00015877852522924732, 0.00013090169943749476, 0.0001, 6.909830056250527e-05, 4.12214747707527e-05, 1.9098300562505266e-05, 4.8943483704846475e-06, 0.0, 4.8943483704846475e-06, 1.9098300562505246e-05];
        #[rustfmt::skip]
        let cosine_no_warmup = [0.0002, 0.0001900968867902419, 0.00016234898018587337, 0.00012225209339563145, 7.774790660436858e-05, 3.7651019814126654e-05, 9.903113209758096e-06, 0.0, 9.903113209758086e-06, 3.765101981412663e-05, 7.774790660436855e-05, 0.00012225209339563145, 0.00016234898018587334, 0.0001900968867902419, 0.0002, 0.00019009688679024194];
        #[rustfmt::skip]
        let linear_warmup_longer_than_total = [0.0, 4e-05, 8e-05, 0.00012, 0.00016, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        assert_close(&curve(Constant, 3, 13), &constant);
        assert_close(&curve(Linear, 3, 13), &linear);
        assert_close(&curve(Cosine, 3, 13), &cosine);
        assert_close(&curve(Cosine, 0, 7), &cosine_no_warmup);
        assert_close(&curve(Linear, 5, 3), &linear_warmup_longer_than_total);
    }

    #[test]
    fn serde_and_parse() {
        for (s, name) in [
            (LrSchedule::Constant, "constant"),
            (LrSchedule::Linear, "linear"),
            (LrSchedule::Cosine, "cosine"),
        ] {
            let json = format!("\"{name}\"");
            assert_eq!(serde_json::to_string(&s).unwrap(), json);
            assert_eq!(serde_json::from_str::<LrSchedule>(&json).unwrap(), s);
            assert_eq!(name.parse::<LrSchedule>().unwrap(), s);
            assert_eq!(s.to_string(), name);
        }
        assert!(serde_json::from_str::<LrSchedule>("\"Cosine\"").is_err());
        assert!("warmup".parse::<LrSchedule>().is_err());
        assert_eq!(LrSchedule::default(), LrSchedule::Linear);
    }
}
