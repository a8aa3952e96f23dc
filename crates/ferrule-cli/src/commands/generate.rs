//! `ferrule generate`

use ferrule::ops::ComputeDtypeChoice;
use std::io::Write;

use anyhow::{bail, Result};
use ferrule::data::Message;
use ferrule::generate::{generate_with_reason, GenerationConfig, SamplingOptions, StopReason};
use ferrule::model::Arch;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    /// The user message (rendered with the model's chat template unless --raw).
    #[arg(long)]
    prompt: String,
    /// Optional system message (chat models).
    #[arg(long)]
    system: Option<String>,
    /// Use the prompt as raw text even when the model has a chat template.
    #[arg(long)]
    raw: bool,
    /// Tokens to generate at most (generation also stops at an end-of-sequence token).
    /// Default: generation_config.json's max_new_tokens (or max_length), else 64.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sample with this temperature (> 0); 0 = greedy. Default: generation_config.json's
    /// do_sample and temperature, else greedy (transformers' default).
    #[arg(long)]
    temperature: Option<f64>,
    /// Greedy decoding even when generation_config.json asks for sampling.
    #[arg(long, conflicts_with = "temperature")]
    greedy: bool,
    /// When sampling, keep the K most likely tokens (0 = all). Default: generation_config.json's
    /// top_k, else 50 (transformers' default).
    #[arg(long)]
    top_k: Option<usize>,
    /// When sampling, keep the smallest set of tokens whose probability reaches P, in (0, 1].
    /// Default: generation_config.json's top_p, else 1 (all).
    #[arg(long)]
    top_p: Option<f64>,
    /// Divide (multiply when negative) the logits of tokens already in the prompt or output by
    /// this (> 0; 1 = off). Default: generation_config.json's repetition_penalty, else 1.
    #[arg(long)]
    repetition_penalty: Option<f64>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Decoding options: the flags given, over the model's generation_config.json, over
/// transformers' defaults. Prints where sampling settings came from.
fn sampling_options(
    a: &Args,
    generation_config: Option<&GenerationConfig>,
    prompt_len: usize,
    stop_tokens: Vec<u32>,
) -> Result<SamplingOptions> {
    let mut opts = match (generation_config, a.max_new_tokens) {
        (Some(g), None) => g.sampling_options(prompt_len)?,
        (Some(g), Some(_)) => GenerationConfig {
            max_length: None,
            ..g.clone()
        }
        .sampling_options(prompt_len)?,
        (None, _) => SamplingOptions::default(),
    };
    if let Some(g) = generation_config {
        for key in &g.unsupported {
            tracing::warn!(
                "{}: {key} is not implemented by ferrule generate; decoding ignores it",
                g.path.display()
            );
        }
    }
    if let Some(n) = a.max_new_tokens {
        opts.max_new_tokens = n;
    }
    match a.temperature {
        Some(0.0) => opts.do_sample = false,
        Some(t) => (opts.do_sample, opts.temperature) = (true, t),
        None if a.greedy => opts.do_sample = false,
        None => {}
    }
    if let Some(k) = a.top_k {
        opts.top_k = k;
    }
    if let Some(p) = a.top_p {
        opts.top_p = p;
    }
    if let Some(p) = a.repetition_penalty {
        opts.repetition_penalty = p;
    }
    if !opts.do_sample && (a.top_k.is_some() || a.top_p.is_some()) {
        bail!("--top-k and --top-p apply only when sampling, and decoding is greedy; add --temperature T (T > 0) to sample")
    }
    opts.seed = a.seed;
    opts.stop_tokens = stop_tokens;
    opts.validate().map_err(|e| {
        anyhow::anyhow!("{e}").context("decoding options (flags over generation_config.json)")
    })?;
    let from = match generation_config {
        Some(g) => format!("flags over {}", g.path.display()),
        None => "flags over transformers' defaults".to_string(),
    };
    eprintln!(
        "decoding: {} ({from}); stop tokens {:?}",
        opts.describe(),
        opts.stop_tokens
    );
    Ok(opts)
}

pub fn run(a: Args) -> Result<()> {
    // f32 by default: decoding multiplies one row at a time, and on a 2-core Zen 4 the SmolLM2
    // Q4_1 GGUF generated 48 tokens in 3.9-4.6 s in f32 against 5.3-5.7 s in bf16 (each bf16
    // step dequantizes every tile to f32 and rounds it again); prompts are short.
    let m = a.model.load(ComputeDtypeChoice::F32)?;
    ferrule::merge::BaseRecord::warn_if_run_elsewhere(
        m.adapters.iter().map(|l| l.dir.as_path()),
        &m.source,
        a.model.quant.spec()?.as_ref(),
    )?;
    let Arch::Decoder(lm) = &m.model.arch else {
        bail!("generate needs a decoder model")
    };
    let tok = m.source.tokenizer()?;
    let text = match (&m.source.chat_template, a.raw) {
        (Some(t), false) => {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(Message::new("system", s.clone()));
            }
            msgs.push(Message::new("user", a.prompt.clone()));
            t.render(&msgs, true)?
        }
        _ => a.prompt.clone(),
    };
    let enc = tok
        .encode(text.as_str(), m.source.chat_template.is_none() || a.raw)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let opts = sampling_options(
        &a,
        m.source.generation_config.as_ref(),
        enc.get_ids().len(),
        m.source.eos_token_ids(),
    )?;
    let mut out = std::io::stdout();
    let mut ids: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let stops = opts.stop_tokens.clone();
    let generation = generate_with_reason(lm, enc.get_ids(), &opts, |t| {
        if stops.contains(&t) {
            return;
        }
        ids.push(t);
        // Decode the whole continuation each time so multi-byte characters print whole.
        if let Ok(s) = tok.decode(&ids, true) {
            if s.len() > printed && s.is_char_boundary(printed) {
                let _ = out.write_all(&s.as_bytes()[printed..]);
                let _ = out.flush();
                printed = s.len();
            }
        }
    })?;
    println!();
    let n = generation.tokens.len();
    match generation.stop {
        StopReason::StopToken => eprintln!(
            "stopped: stop token {} after {n} token(s)",
            generation.tokens[n - 1]
        ),
        StopReason::MaxNewTokens => eprintln!("stopped: --max-new-tokens ({n}) reached"),
        StopReason::ContextFull => eprintln!(
            "stopped: the model's context ({} positions) is full after {n} token(s)",
            lm.config.max_position_embeddings
        ),
    }
    Ok(())
}
