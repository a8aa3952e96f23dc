//! Text generation for decoder models: greedy or temperature / nucleus (top-p) sampling
//! (Holtzman et al. 2020) over a KV cache.

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use crate::model::llama::DecoderLm;

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct SamplingOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = all).
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after any of these tokens.
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, seed: 0, stop_tokens: vec![] }
    }
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` for each new token
/// (for streaming). Returns the new tokens (the stop token included when one was hit).
pub fn generate(model: &DecoderLm, prompt: &[u32], opts: &SamplingOptions, mut on_token: impl FnMut(u32)) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        anyhow::bail!("generate: the prompt is empty")
    }
    let device = model.device().clone();
    let mut cache = model.new_cache();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut out = Vec::new();
    let mut next_input = prompt.to_vec();
    let max_ctx = model.config.max_position_embeddings;
    for step in 0..opts.max_new_tokens {
        // The first pass also holds the positions a method adds (virtual tokens, a prefix).
        let held = if cache.is_empty() { model.added_positions() } else { cache.len() };
        if held + next_input.len() > max_ctx {
            break;
        }
        let ids = Tensor::new(next_input.as_slice(), &device)?.unsqueeze(0)?;
        let logits = model.last_logits(&ids, None, Some(&mut cache))?.squeeze(0)?.to_dtype(DType::F32)?;
        crate::util::finite::ensure_finite(
            &logits,
            || format!("the logits of generated token {} (index [vocabulary id])", step + 1),
            "the model or adapter produced a non-finite output; generation stopped",
        )?;
        let token = pick(&logits.to_vec1::<f32>()?, opts, &mut rng);
        out.push(token);
        on_token(token);
        if opts.stop_tokens.contains(&token) {
            break;
        }
        next_input = vec![token];
    }
    Ok(out)
}

fn pick(logits: &[f32], opts: &SamplingOptions, rng: &mut impl Rng) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32;
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let t = opts.temperature as f32;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = logits.iter().enumerate().map(|(i, &l)| (i, ((l - max) / t).exp())).collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    let mut kept = 0;
    let mut acc = 0f32;
    for p in &probs {
        kept += 1;
        acc += p.1;
        if acc as f64 >= opts.top_p {
            break;
        }
    }
    let probs = &probs[..kept];
    let mut u = rng.gen::<f32>() * acc;
    for p in probs {
        if u < p.1 {
            return p.0 as u32;
        }
        u -= p.1;
    }
    probs[kept - 1].0 as u32
}
