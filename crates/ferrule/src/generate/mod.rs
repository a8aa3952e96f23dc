//! Text generation for decoder models over a KV cache: greedy or sampled, with transformers'
//! logits processors ([`sampling`]) and the defaults of the model's `generation_config.json`
//! ([`config`]).

pub mod config;
pub mod sampling;

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::SeedableRng;

pub use config::GenerationConfig;
pub use sampling::{processed_scores, SamplingOptions};

use crate::model::llama::DecoderLm;

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was generated (it is the last of the tokens).
    StopToken,
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// The model's `max_position_embeddings` is full.
    ContextFull,
}

/// What [`generate_with_reason`] produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new tokens, the stop token included when one ended generation.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` for each new token
/// (for streaming). Returns the new tokens (the stop token included when one was hit).
///
/// Errors: an empty prompt, options out of range ([`SamplingOptions::validate`]), or a
/// non-finite logit (naming the generated token's index).
pub fn generate(
    model: &DecoderLm,
    prompt: &[u32],
    opts: &SamplingOptions,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    Ok(generate_with_reason(model, prompt, opts, on_token)?.tokens)
}

/// [`generate`], also saying why it stopped.
pub fn generate_with_reason(
    model: &DecoderLm,
    prompt: &[u32],
    opts: &SamplingOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    if prompt.is_empty() {
        anyhow::bail!("generate: the prompt is empty")
    }
    opts.validate()?;
    let device = model.device().clone();
    let mut cache = model.new_cache();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    // The repetition penalty looks at the prompt and the output.
    let mut history = prompt.to_vec();
    let mut next_input = prompt.to_vec();
    let max_ctx = model.config.max_position_embeddings;
    for step in 0..opts.max_new_tokens {
        // The first pass also holds the positions a method adds (virtual tokens, a prefix).
        let held = if cache.is_empty() {
            model.added_positions()
        } else {
            cache.len()
        };
        if held + next_input.len() > max_ctx {
            return Ok(Generation {
                tokens: history.split_off(prompt.len()),
                stop: StopReason::ContextFull,
            });
        }
        let ids = Tensor::new(next_input.as_slice(), &device)?.unsqueeze(0)?;
        let logits = model
            .last_logits(&ids, None, None, Some(&mut cache))?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        if crate::util::finite::first_non_finite(&logits)?.is_some() {
            // Rerun the whole sequence so far (the history ends with the token just fed) without
            // the cache, checking each layer.
            let traced = Tensor::new(history.as_slice(), &device)?
                .unsqueeze(0)
                .map_err(Into::into)
                .and_then(|ids| model.trace.run(|| model.forward(&ids, None, None, None)));
            let origin = crate::util::finite::origin_clause(traced);
            crate::util::finite::ensure_finite(
                &logits,
                || {
                    format!(
                        "the logits of generated token {} (index [vocabulary id])",
                        step + 1
                    )
                },
                &format!(
                    "the model or adapter produced a non-finite output{origin}; generation stopped"
                ),
            )?;
        }
        let token = sampling::pick(&logits.to_vec1::<f32>()?, &history, opts, &mut rng);
        history.push(token);
        on_token(token);
        if opts.stop_tokens.contains(&token) {
            return Ok(Generation {
                tokens: history.split_off(prompt.len()),
                stop: StopReason::StopToken,
            });
        }
        next_input = vec![token];
    }
    Ok(Generation {
        tokens: history.split_off(prompt.len()),
        stop: StopReason::MaxNewTokens,
    })
}
