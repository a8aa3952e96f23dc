//! Choosing the next token from a decoder's logits, with transformers' logits processors:
//! repetition penalty, then (when sampling) temperature, top-k and top-p (nucleus, Holtzman et
//! al. 2020), in the order `GenerationMixin._get_logits_processor` applies them
//! (`transformers/generation/utils.py`, 5.24; the processors in `generation/logits_process.py`).

use anyhow::{bail, Result};
use rand::Rng;

/// How the next token is chosen. [`Default`] is transformers' `GenerationConfig` default
/// (`_get_default_generation_params`): greedy, and when sampling temperature 1, top-k 50,
/// top-p 1; ferrule's own default length is 64 new tokens (transformers': `max_length` 20).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    /// New tokens at most (≥ 1).
    pub max_new_tokens: usize,
    /// Sample from the processed distribution (`do_sample`); `false` takes its argmax.
    pub do_sample: bool,
    /// Logits are divided by it when sampling (`TemperatureLogitsWarper`); > 0.
    pub temperature: f64,
    /// Keep the `top_k` highest logits when sampling (ties with the k-th kept); 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` when
    /// sampling; in (0, 1], 1 keeps all.
    pub top_p: f64,
    /// Logits of tokens already in the prompt or the output are divided by it when positive
    /// and multiplied by it when negative (`RepetitionPenaltyLogitsProcessor`, CTRL, Keskar et
    /// al. 2019); > 0, 1 = off. Applies to greedy decoding too.
    pub repetition_penalty: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// Generation stops after any of these tokens.
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            stop_tokens: vec![],
        }
    }
}

impl SamplingOptions {
    /// Errors naming the option when a value is out of the range transformers' processors
    /// accept (they raise `ValueError` for the same values).
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            bail!("max_new_tokens is 0, expected at least 1")
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!("temperature is {}, expected a finite number greater than 0 (greedy decoding is do_sample = false)", self.temperature)
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p is {}, expected a number in (0, 1]", self.top_p)
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            bail!(
                "repetition_penalty is {}, expected a finite number greater than 0 (1 = off)",
                self.repetition_penalty
            )
        }
        Ok(())
    }

    /// One line for the user: how tokens are chosen.
    pub fn describe(&self) -> String {
        let penalty = if self.repetition_penalty != 1.0 {
            format!(", repetition_penalty {}", self.repetition_penalty)
        } else {
            String::new()
        };
        if self.do_sample {
            let k = if self.top_k == 0 {
                "off".to_string()
            } else {
                self.top_k.to_string()
            };
            format!(
                "sampling (temperature {}, top_k {k}, top_p {}{penalty}, seed {})",
                self.temperature, self.top_p, self.seed
            )
        } else {
            format!("greedy{penalty}")
        }
    }
}

/// The scores transformers' processors leave for the next token: `logits` [vocab] after the
/// repetition penalty over `history` (the prompt and the tokens generated so far) and, when
/// `do_sample`, temperature, top-k and top-p; removed tokens are `-inf`.
pub fn processed_scores(logits: &[f32], history: &[u32], opts: &SamplingOptions) -> Vec<f32> {
    let mut s = logits.to_vec();
    if opts.repetition_penalty != 1.0 {
        let p = opts.repetition_penalty as f32;
        let mut seen = vec![false; s.len()];
        for &id in history {
            let i = id as usize;
            if i < s.len() && !seen[i] {
                seen[i] = true;
                s[i] = if s[i] < 0.0 { s[i] * p } else { s[i] / p };
            }
        }
    }
    if !opts.do_sample {
        return s;
    }
    if opts.temperature != 1.0 {
        let t = opts.temperature as f32;
        s.iter_mut().for_each(|v| *v /= t);
    }
    if opts.top_k != 0 && opts.top_k < s.len() {
        // TopKLogitsWarper: remove scores below the k-th largest (ties with it stay).
        let mut sorted = s.clone();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let kth = sorted[opts.top_k - 1];
        s.iter_mut()
            .filter(|v| **v < kth)
            .for_each(|v| *v = f32::NEG_INFINITY);
    }
    if opts.top_p < 1.0 {
        top_p_filter(&mut s, opts.top_p as f32);
    }
    s
}

/// TopPLogitsWarper: sort ascending, and remove the tokens whose cumulative probability is at
/// most `1 - top_p`, keeping the most likely one always.
fn top_p_filter(s: &mut [f32], top_p: f32) {
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&a, &b| s[a].total_cmp(&s[b]));
    let probs = softmax(&order.iter().map(|&i| s[i]).collect::<Vec<_>>());
    let mut cumulative = 0f32;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        cumulative += probs[rank];
        if rank < last && cumulative <= 1.0 - top_p {
            s[i] = f32::NEG_INFINITY;
        }
    }
}

/// `softmax(x)` in f32, max-subtracted; `-inf` entries get probability 0.
fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|&v| (v - max).exp()).collect();
    let total: f32 = e.iter().sum();
    e.into_iter().map(|v| v / total).collect()
}

/// The next token: the argmax of the processed scores (the first on ties, as `torch.argmax`),
/// or, when sampling, a draw from their softmax.
pub fn pick(logits: &[f32], history: &[u32], opts: &SamplingOptions, rng: &mut impl Rng) -> u32 {
    let s = processed_scores(logits, history, opts);
    if !opts.do_sample {
        return s
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32;
    }
    let probs = softmax(&s);
    let mut u = rng.gen::<f32>();
    let mut last_kept = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            if u < p {
                return i as u32;
            }
            u -= p;
            last_kept = i;
        }
    }
    last_kept as u32 // rounding left u just above the total
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn sampling(temperature: f64, top_k: usize, top_p: f64) -> SamplingOptions {
        SamplingOptions {
            do_sample: true,
            temperature,
            top_k,
            top_p,
            ..Default::default()
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_once() {
        let opts = SamplingOptions {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // Token 0 appears twice in the history and is still penalised once.
        assert_eq!(
            processed_scores(&[4.0, -1.0, 3.0], &[0, 1, 0], &opts),
            vec![2.0, -2.0, 3.0]
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(pick(&[4.0, -1.0, 3.0], &[0], &opts, &mut rng), 2);
    }

    #[test]
    fn top_k_keeps_ties_with_the_kth() {
        let s = processed_scores(&[1.0, 3.0, 2.0, 2.0, 0.0], &[], &sampling(1.0, 2, 1.0));
        assert_eq!(s, vec![f32::NEG_INFINITY, 3.0, 2.0, 2.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 (logits ln of them); ascending cumulative
        // 0.125, 0.25, 0.5, 1: with top_p 0.7 the two below 0.3 go, 0.5 + 0.25 ≥ 0.7 stays.
        let l: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125]
            .iter()
            .map(|p| p.ln())
            .collect();
        let s = processed_scores(&l, &[], &sampling(1.0, 0, 0.7));
        assert!(
            s[0].is_finite()
                && s[1].is_finite()
                && s[2] == f32::NEG_INFINITY
                && s[3] == f32::NEG_INFINITY,
            "{s:?}"
        );
        // A tiny top_p keeps the most likely token only.
        let s = processed_scores(&l, &[], &sampling(1.0, 0, 1e-6));
        assert_eq!(s.iter().filter(|v| v.is_finite()).count(), 1);
    }

    #[test]
    fn sampling_draws_only_kept_tokens_in_proportion() {
        let l: Vec<f32> = [0.5f32, 0.3, 0.2, 1e-3].iter().map(|p| p.ln()).collect();
        let opts = sampling(1.0, 3, 1.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = [0usize; 4];
        let n = 20_000;
        for _ in 0..n {
            counts[pick(&l, &[], &opts, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[3], 0, "top_k 3 removed token 3");
        // Kept probabilities renormalise to 0.5, 0.3, 0.2; 5 standard deviations of a binomial.
        for (i, want) in [0.5f64, 0.3, 0.2].iter().enumerate() {
            let got = counts[i] as f64 / n as f64;
            let sd = (want * (1.0 - want) / n as f64).sqrt();
            assert!((got - want).abs() < 5.0 * sd, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn out_of_range_options_are_refused_by_name() {
        for (opts, needle) in [
            (
                SamplingOptions {
                    temperature: 0.0,
                    ..Default::default()
                },
                "temperature is 0",
            ),
            (
                SamplingOptions {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p is 1.5",
            ),
            (
                SamplingOptions {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p is 0",
            ),
            (
                SamplingOptions {
                    repetition_penalty: -1.0,
                    ..Default::default()
                },
                "repetition_penalty is -1",
            ),
            (
                SamplingOptions {
                    max_new_tokens: 0,
                    ..Default::default()
                },
                "max_new_tokens is 0",
            ),
        ] {
            let e = opts.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        SamplingOptions::default().validate().unwrap();
    }
}
