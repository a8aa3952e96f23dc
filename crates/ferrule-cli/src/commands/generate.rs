//! `ferrule generate`

use std::io::Write;

use anyhow::{bail, Result};
use ferrule::data::Message;
use ferrule::generate::{generate, SamplingOptions};
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
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P (1 = all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    let m = a.model.load()?;
    let Arch::Decoder(lm) = &m.model.arch else { bail!("generate needs a decoder model") };
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
    let enc = tok.encode(text.as_str(), m.source.chat_template.is_none() || a.raw).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let opts =
        SamplingOptions { max_new_tokens: a.max_new_tokens, temperature: a.temperature, top_p: a.top_p, seed: a.seed, stop_tokens: m.source.eos_token_ids() };
    let mut out = std::io::stdout();
    let mut ids: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let stops = opts.stop_tokens.clone();
    generate(lm, enc.get_ids(), &opts, |t| {
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
    Ok(())
}
