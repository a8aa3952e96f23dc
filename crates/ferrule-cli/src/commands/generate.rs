//! `ferrule generate`

use ferrule::ops::ComputeDtypeChoice;
use std::io::Write;

use anyhow::{bail, Context, Result};
use ferrule::data::Message;
use ferrule::generate::prompts::Prompt;
use ferrule::generate::{
    generate_with_reason, Generation, GenerationConfig, SamplingOptions, StopReason,
};
use ferrule::model::llama::DecoderLm;
use ferrule::model::{Arch, ModelSource};

mod batch;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    /// The user message (rendered with the model's chat template unless --raw).
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    prompt: Option<String>,
    /// Optional system message (chat models).
    #[arg(long, conflicts_with = "prompts")]
    system: Option<String>,
    /// Use the prompt as raw text even when the model has a chat template.
    #[arg(long)]
    raw: bool,
    /// A JSON Lines file of prompts, one a line: {"prompt": ..., "system": ...},
    /// {"messages": [...]} (chat template) or {"text": ...} (raw). Generates for each, batched
    /// and left-padded, and writes one JSON line per prompt: the prompt, its completion, the
    /// new tokens' count and why it stopped.
    #[arg(long, value_name = "FILE")]
    prompts: Option<std::path::PathBuf>,
    /// With --prompts: prompts decoded together (default 8).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: Option<u64>,
    /// With --prompts: write the JSON lines here (default: standard output). Written whole at
    /// the end, so a failed run leaves no partial file.
    #[arg(long, short, value_name = "FILE")]
    output: Option<std::path::PathBuf>,
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
/// transformers' defaults, for a prompt (a padded batch) of `prompt_len` tokens.
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
    Ok(opts)
}

/// Says on stderr how decoding runs and where its settings came from.
fn print_decoding(opts: &SamplingOptions, generation_config: Option<&GenerationConfig>) {
    let from = match generation_config {
        Some(g) => format!("flags over {}", g.path.display()),
        None => "flags over transformers' defaults".to_string(),
    };
    eprintln!(
        "decoding: {} ({from}); stop tokens {:?}",
        opts.describe(),
        opts.stop_tokens
    );
}

pub fn run(a: Args) -> Result<()> {
    check_flags(&a)?;
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
    match &a.prompts {
        Some(file) => batch::run(&a, file, &m.source, lm),
        None => run_one(&a, &m.source, lm),
    }
}

/// The flags that need `--prompts`, checked before the model loads (clap 4.6 did not enforce
/// `requires = "prompts"` on them here).
fn check_flags(a: &Args) -> Result<()> {
    if a.prompts.is_none() {
        for (given, flag) in [
            (a.batch_size.is_some(), "--batch-size"),
            (a.output.is_some(), "--output"),
        ] {
            if given {
                bail!("{flag} applies to --prompts FILE (a file of prompts); --prompt prints its completion as it comes")
            }
        }
    }
    Ok(())
}

/// The prompt as the model reads it: `messages` through the chat template (with the
/// assistant's turn opened), or `text` as it is (`--raw`, or a model without a template).
fn encode(source: &ModelSource, prompt: &Prompt, raw: bool) -> Result<Vec<u32>> {
    let tok = source.tokenizer()?;
    let (text, add_special) = match (prompt, &source.chat_template, raw) {
        (Prompt::Chat(msgs), Some(t), false) => (t.render(msgs, true)?, false),
        (Prompt::Chat(msgs), _, _) => match msgs.as_slice() {
            [m] if m.role == "user" => (m.content.clone(), true),
            _ => bail!("messages and a system message need the model's chat template; without one (or with --raw) give the prompt as one text"),
        },
        (Prompt::Text(t), _, _) => (t.clone(), true),
    };
    Ok(tok
        .encode(text.as_str(), add_special)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
        .get_ids()
        .to_vec())
}

/// One prompt, its tokens printed as they come.
fn run_one(a: &Args, source: &ModelSource, lm: &DecoderLm) -> Result<()> {
    let mut msgs = Vec::new();
    if let Some(s) = &a.system {
        msgs.push(Message::new("system", s.clone()));
    }
    let user = a
        .prompt
        .clone()
        .context("give --prompt TEXT, or --prompts FILE for a file of prompts")?;
    msgs.push(Message::new("user", user.clone()));
    let prompt = match (&source.chat_template, a.raw) {
        (Some(_), false) => Prompt::Chat(msgs),
        _ => Prompt::Text(user),
    };
    let ids = encode(source, &prompt, a.raw)?;
    let tok = source.tokenizer()?;
    let opts = sampling_options(
        a,
        source.generation_config.as_ref(),
        ids.len(),
        source.eos_token_ids(),
    )?;
    print_decoding(&opts, source.generation_config.as_ref());
    let mut out = std::io::stdout();
    let mut new: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let stops = opts.stop_tokens.clone();
    let generation = generate_with_reason(lm, &ids, &opts, |t| {
        if stops.contains(&t) {
            return;
        }
        new.push(t);
        // Decode the whole continuation each time so multi-byte characters print whole.
        if let Ok(s) = tok.decode(&new, true) {
            if s.len() > printed && s.is_char_boundary(printed) {
                let _ = out.write_all(&s.as_bytes()[printed..]);
                let _ = out.flush();
                printed = s.len();
            }
        }
    })?;
    println!();
    eprintln!("stopped: {}", stop_text(&generation, lm));
    Ok(())
}

/// Why `g` ended, in words.
fn stop_text(g: &Generation, lm: &DecoderLm) -> String {
    let n = g.tokens.len();
    match g.stop {
        StopReason::StopToken => format!("stop token {} after {n} token(s)", g.tokens[n - 1]),
        StopReason::MaxNewTokens => format!("--max-new-tokens ({n}) reached"),
        StopReason::ContextFull => format!(
            "the model's context ({} positions) is full after {n} token(s)",
            lm.config.max_position_embeddings
        ),
    }
}
