//! Several prompts decoded together: left-padded into one batch over one KV cache, each row
//! with its own history, sampler and stop, as transformers' `generate` runs a batch.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{sampling, Generation, SamplingOptions, StopReason};
use crate::model::llama::DecoderLm;

/// One prompt's decoding: its tokens so far and its sampler.
struct Row {
    history: Vec<u32>,
    prompt_len: usize,
    rng: StdRng,
    stop: Option<StopReason>,
}

/// Generates up to `max_new_tokens` after each of `prompts` at once, calling
/// `on_token(row, token)` for each new token. Returns one [`Generation`] per prompt, in order.
///
/// Prompts of different lengths are padded on the left with `pad_id` (tokenizers'
/// `padding_side="left"`, which decoder generation needs), the pads masked out, and each row's
/// tokens placed at `cumsum(mask) − 1` (pads at 0), as transformers 5.24's
/// `_prepare_position_ids_for_generation` builds `position_ids`: a row's tokens sit where they sit
/// alone. A batch without padding passes no mask or positions. A finished row is fed
/// `pad_id` until every row has finished (transformers' `unfinished_sequences`). Row `i`
/// samples from its own generator, seeded `opts.seed + i`. The context limit counts the padded
/// length: every unfinished row stops with [`StopReason::ContextFull`] when the cache is full.
///
/// Errors: an empty prompt (naming its index from 1), options out of range
/// ([`SamplingOptions::validate`]), or a non-finite logit (naming the row and the generated
/// token's index, with the layer that made it).
pub fn generate_batch(
    model: &DecoderLm,
    prompts: &[Vec<u32>],
    opts: &SamplingOptions,
    pad_id: u32,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Generation>> {
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        match prompts.len() {
            1 => bail!("generate: the prompt is empty"),
            _ => bail!("generate: prompt {} of {} is empty", i + 1, prompts.len()),
        }
    }
    opts.validate()?;
    let device = model.device().clone();
    let mut rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Row {
            history: p.clone(),
            prompt_len: p.len(),
            rng: StdRng::seed_from_u64(opts.seed.wrapping_add(i as u64)),
            stop: None,
        })
        .collect();
    let (mut next, mut mask, mut positions) = left_padded(prompts, pad_id, &device)?;
    let mut cache = model.new_cache();
    let max_ctx = model.config.max_position_embeddings;
    for step in 0..opts.max_new_tokens {
        // The first pass also holds the positions a method adds (virtual tokens, a prefix).
        let held = if cache.is_empty() {
            model.added_positions()
        } else {
            cache.len()
        };
        if held + next.dim(1)? > max_ctx {
            finish_all(&mut rows, StopReason::ContextFull);
            break;
        }
        let logits = model
            .last_logits(&next, mask.as_ref(), positions.as_ref(), Some(&mut cache))?
            .to_dtype(DType::F32)?;
        check_finite(model, &rows, &logits, step)?;
        let logits = logits.to_vec2::<f32>()?;
        let mut fed = vec![pad_id; rows.len()];
        for (i, row) in rows.iter_mut().enumerate() {
            if row.stop.is_some() {
                continue;
            }
            let token = sampling::pick(&logits[i], &row.history, opts, &mut row.rng);
            row.history.push(token);
            on_token(i, token);
            fed[i] = token;
            if opts.stop_tokens.contains(&token) {
                row.stop = Some(StopReason::StopToken);
            }
        }
        if rows.iter().all(|r| r.stop.is_some()) {
            break;
        }
        next = Tensor::new(fed.as_slice(), &device)?.unsqueeze(1)?;
        mask = match mask {
            Some(m) => Some(Tensor::cat(&[&m, &m.narrow(1, 0, 1)?.ones_like()?], 1)?),
            None => None,
        };
        positions = match positions {
            Some(p) => Some((p.narrow(1, p.dim(1)? - 1, 1)? + 1.0)?),
            None => None,
        };
    }
    finish_all(&mut rows, StopReason::MaxNewTokens);
    Ok(rows
        .into_iter()
        .map(|mut r| Generation {
            tokens: r.history.split_off(r.prompt_len),
            stop: r.stop.unwrap_or(StopReason::MaxNewTokens),
        })
        .collect())
}

/// The prompts as one batch `[b, t]`, left-padded with `pad_id`; with padding, the mask
/// `[b, t]` (0 at pads) and `position_ids` `cumsum(mask) − 1` with pads at 0 (transformers 5.24's
/// `_prepare_position_ids_for_generation`), both i64.
fn left_padded(
    prompts: &[Vec<u32>],
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let b = prompts.len();
    let (mut ids, mut mask, mut pos) = (
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
    );
    for p in prompts {
        let pad = t - p.len();
        ids.extend(std::iter::repeat_n(pad_id, pad).chain(p.iter().copied()));
        mask.extend((0..t).map(|j| i64::from(j >= pad)));
        pos.extend((0..t).map(|j| if j < pad { 0 } else { (j - pad) as i64 }));
    }
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    if prompts.iter().all(|p| p.len() == t) {
        return Ok((ids, None, None));
    }
    Ok((
        ids,
        Some(Tensor::from_vec(mask, (b, t), device)?),
        Some(Tensor::from_vec(pos, (b, t), device)?),
    ))
}

fn finish_all(rows: &mut [Row], reason: StopReason) {
    for r in rows.iter_mut().filter(|r| r.stop.is_none()) {
        r.stop = Some(reason);
    }
}

/// An error when a row still decoding has a non-finite logit: its sequence so far (ending with
/// the token just fed) is rerun alone without the cache, checking each layer, so the message
/// names where the value first appeared.
fn check_finite(model: &DecoderLm, rows: &[Row], logits: &Tensor, step: usize) -> Result<()> {
    for (i, row) in rows.iter().enumerate() {
        if row.stop.is_some() {
            continue;
        }
        let row_logits = logits.get(i)?;
        if crate::util::finite::first_non_finite(&row_logits)?.is_none() {
            continue;
        }
        let traced = Tensor::new(row.history.as_slice(), model.device())?
            .unsqueeze(0)
            .map_err(Into::into)
            .and_then(|ids| model.trace.run(|| model.forward(&ids, None, None, None)));
        let origin = crate::util::finite::origin_clause(traced);
        let which = match rows.len() {
            1 => String::new(),
            _ => format!(" of prompt {}", i + 1),
        };
        crate::util::finite::ensure_finite(
            &row_logits,
            || {
                format!(
                    "the logits of generated token {}{which} (index [vocabulary id])",
                    step + 1
                )
            },
            &format!(
                "the model or adapter produced a non-finite output{origin}; generation stopped"
            ),
        )?;
    }
    Ok(())
}
