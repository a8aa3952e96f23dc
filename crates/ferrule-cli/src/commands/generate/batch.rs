//! `ferrule generate --prompts FILE`: every prompt of a JSON Lines file, decoded in batches.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use ferrule::generate::generate_batch;
use ferrule::generate::prompts::read_prompts;
use ferrule::model::llama::DecoderLm;
use ferrule::model::ModelSource;
use serde_json::json;

use super::{encode, print_decoding, sampling_options, stop_text, Args};

/// transformers' `generate` batch: the prompts decoded together, left-padded.
const DEFAULT_BATCH: u64 = 8;

pub(super) fn run(a: &Args, file: &Path, source: &ModelSource, lm: &DecoderLm) -> Result<()> {
    let prompts = read_prompts(file)?;
    let ids = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            encode(source, p, a.raw)
                .with_context(|| format!("--prompts {}: prompt {}", file.display(), i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    // The tokenizer's pad id, else its eos, else 0: pads are masked out, so any id serves.
    let pad = source.pad_token_id()?;
    let tok = source.tokenizer()?;
    let size = a.batch_size.unwrap_or(DEFAULT_BATCH) as usize;
    let batches = ids.len().div_ceil(size);
    let mut lines = Vec::new();
    for (k, chunk) in ids.chunks(size).enumerate() {
        let started = Instant::now();
        let longest = chunk.iter().map(Vec::len).max().unwrap_or(0);
        let gen_config = source.generation_config.as_ref();
        let mut opts = sampling_options(a, gen_config, longest, source.eos_token_ids())?;
        if k == 0 {
            print_decoding(&opts, gen_config);
        }
        // Prompt i of the file samples with seed + i, whatever the batch size.
        opts.seed = a.seed.wrapping_add((k * size) as u64);
        let out = generate_batch(lm, chunk, &opts, pad, |_, _| {})?;
        let mut new_tokens = 0;
        for (j, g) in out.iter().enumerate() {
            let kept: Vec<u32> = g
                .tokens
                .iter()
                .copied()
                .filter(|t| !opts.stop_tokens.contains(t))
                .collect();
            new_tokens += g.tokens.len();
            let completion = tok
                .decode(&kept, true)
                .map_err(|e| anyhow::anyhow!("decoding the completion: {e}"))?;
            let line = json!({
                "index": k * size + j + 1,
                "completion": completion,
                "new_tokens": g.tokens.len(),
                "stop": stop_text(g, lm),
            });
            lines.push(line.to_string());
            if a.output.is_none() {
                println!("{line}");
            }
        }
        std::io::stdout().flush()?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "batch {}/{batches}: {} prompt(s), {new_tokens} new tokens in {secs:.1} s ({:.1} tokens/s)",
            k + 1,
            chunk.len(),
            new_tokens as f64 / secs.max(1e-9)
        );
    }
    if let Some(path) = &a.output {
        let mut text = lines.join("\n");
        text.push('\n');
        ferrule::util::atomic::write_bytes_atomic(path, text.as_bytes())
            .with_context(|| format!("--output {}", path.display()))?;
        eprintln!("{} completions written to {}", lines.len(), path.display());
    }
    Ok(())
}
