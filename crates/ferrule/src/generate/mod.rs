//! Text generation for decoder models over a KV cache: greedy or sampled, with transformers'
//! logits processors ([`sampling`]) and the defaults of the model's `generation_config.json`
//! ([`config`]).

mod batch;
pub mod config;
pub mod prompts;
pub mod sampling;

pub use batch::generate_batch;

use anyhow::Result;

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

/// [`generate`], also saying why it stopped: [`generate_batch`] on one prompt (no padding, so
/// no mask or position ids: the bits of an unbatched pass).
pub fn generate_with_reason(
    model: &DecoderLm,
    prompt: &[u32],
    opts: &SamplingOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    let mut out = generate_batch(model, &[prompt.to_vec()], opts, 0, |_, t| on_token(t))?;
    Ok(out.remove(0))
}
