//! `ferrule data`: the records as training will see them. Trained spans are coloured on a
//! terminal and put in `[[ ]]` otherwise; counts and a length histogram follow.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Result};
use ferrule::data::preview::{spans, stats, DataStats};
use ferrule::data::{read_records, Encoder, LabelMap};
use ferrule::model::{ModelSource, Task};
use ferrule::train::{encode_options, TrainConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder, .gguf file or hub id (its tokenizer and chat template are used).
    #[arg(long)]
    model: String,
    /// JSONL records (the shapes `ferrule train --data` takes).
    #[arg(long)]
    data: PathBuf,
    /// How many records to print (the first N kept ones).
    #[arg(long, default_value_t = 3)]
    show: usize,
    /// causal-lm or seq-cls (as ferrule train --task).
    #[arg(long)]
    task: Option<String>,
    /// Longest sequence in tokens (default: the model's context, at most 512, as in train).
    #[arg(long)]
    max_len: Option<usize>,
    /// Fail on records longer than --max-len instead of truncating them (as in train).
    #[arg(long)]
    no_truncate: bool,
    /// Mark prompt tokens as trained too (as ferrule train --train-on-prompt).
    #[arg(long)]
    train_on_prompt: bool,
    /// Records per batch, for the padding and packing counts (default 8, as in train).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Token budget of the packed bins to count, as train's --batch-tokens with --packing
    /// (default --batch-size x --max-len).
    #[arg(long, value_name = "N")]
    batch_tokens: Option<usize>,
    /// Print the counts as one JSON object instead of text (no records).
    #[arg(long)]
    json: bool,
    /// Tokens added to the tokenizer past the embedding are fine: train grows the embedding
    /// to them (as ferrule train --resize-token-embeddings).
    #[arg(long)]
    resize_token_embeddings: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut cfg = TrainConfig {
        max_len: a.max_len,
        truncate: !a.no_truncate,
        completion_only: !a.train_on_prompt,
        ..Default::default()
    };
    if let Some(t) = &a.task {
        cfg.task = super::parse_task(t)?;
    }
    let options = ferrule::model::LoadOptions {
        resize_token_embeddings: a.resize_token_embeddings,
        ..Default::default()
    };
    let source = ModelSource::load_with(&a.model, &super::device(), options)?;
    let max_len = cfg.effective_max_len(source.context())?;
    let records = read_records(&a.data)?;
    let labels = if cfg.task == Task::SeqCls {
        Some(LabelMap::from_records(&records)?)
    } else {
        None
    };
    let tokenizer = source.tokenizer()?;
    let eos = source.eos_token_ids().first().copied();
    let mut encoder = Encoder::new(
        tokenizer,
        source.chat_template.as_ref(),
        encode_options(&cfg, max_len),
    )?
    .with_eos_token_id(eos);
    if let Some(l) = &labels {
        encoder = encoder.with_label_map(l);
    }
    // The records cut before their answer are counted below, not warned about.
    let set = encoder.encode_records(&records)?;
    if a.batch_size == 0 || a.batch_tokens == Some(0) {
        bail!(
            "--batch-size and --batch-tokens must be at least 1 (got {} and {:?})",
            a.batch_size,
            a.batch_tokens
        )
    }
    if let Some(t) = a.batch_tokens.filter(|&t| t < max_len) {
        bail!("--batch-tokens {t} is smaller than --max-len {max_len}: a record of max_len tokens would fit no bin")
    }
    let counts = stats(&set, &records, a.batch_size, max_len, a.batch_tokens);
    if a.json {
        println!("{}", serde_json::to_string(&counts)?);
        return Ok(());
    }
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    for (item, &record) in set.items.iter().zip(&set.record_indices).take(a.show) {
        println!(
            "── {}:{} ({} tokens) ──",
            a.data.display(),
            records.line(record),
            item.len()
        );
        let mut text = String::new();
        for s in spans(tokenizer, item)? {
            text += &match (s.trained, colour) {
                (false, _) => s.text,
                (true, true) => format!("\x1b[1;32m{}\x1b[0m", s.text),
                (true, false) => format!("[[{}]]", s.text),
            };
        }
        println!("{text}");
        if let Some(c) = item.class_label {
            println!("(label {c})");
        }
    }
    print_counts(&counts, cfg.task == Task::SeqCls, colour);
    Ok(())
}

fn print_counts(s: &DataStats, classification: bool, colour: bool) {
    let marked = if colour { "green" } else { "[[ ]]" };
    println!("──");
    if classification {
        println!("classification: the loss is one per record (its label), not per token; records longer than {} tokens are cut", s.max_len);
    } else {
        println!(
            "trained tokens are marked {marked}; records longer than {} tokens are cut (--max-len)",
            s.max_len
        );
    }
    println!(
        "records {} (kept {}, skipped {}: nothing left to train, truncated {})",
        s.records,
        s.kept,
        s.skipped_lines.len(),
        s.truncated
    );
    if let Some((lo, hi)) = prompt_range(s) {
        let n = s.skipped_past_max_len.len();
        let lines: Vec<String> = s
            .skipped_past_max_len
            .iter()
            .take(10)
            .map(|r| r.line.to_string())
            .collect();
        println!(
            "truncated and skipped {n}: their prompt{} ({}) fill{} --max-len {}, so nothing of \
             the answer is left to train (line{} {}{}); raise --max-len above {hi} to train on them",
            if n == 1 { "" } else { "s" },
            if lo == hi {
                format!("{lo} tokens")
            } else {
                format!("{lo}–{hi} tokens")
            },
            if n == 1 { "s" } else { "" },
            s.max_len,
            if n == 1 { "" } else { "s" },
            lines.join(", "),
            if n > 10 { ", ..." } else { "" }
        );
    }
    if !s.skipped_lines.is_empty() {
        let shown: Vec<String> = s
            .skipped_lines
            .iter()
            .take(10)
            .map(|l| l.to_string())
            .collect();
        println!(
            "skipped lines: {}{}",
            shown.join(", "),
            if s.skipped_lines.len() > 10 {
                ", ..."
            } else {
                ""
            }
        );
    }
    if classification {
        println!("tokens {}", s.tokens);
    } else {
        println!(
            "tokens {}, trained {} ({:.1}%)",
            s.tokens,
            s.trained_tokens,
            100.0 * s.trained_tokens as f64 / s.tokens.max(1) as f64
        );
    }
    println!(
        "padding: none in padding-free batches (train's default); in batches of {} padded to their longest record (--padding longest, \
         file order) {} positions, {:.1}% of what the batches compute ({:.1}% with --pad-to-max-len)",
        s.batch_size,
        s.padding_positions,
        100.0 * s.padding_fraction,
        100.0 * s.padding_fraction_at_max_len
    );
    println!(
        "packing (--packing, bins of {} tokens): {} bins, {:.1}% full",
        s.packed_budget,
        s.packed_bins,
        100.0 * s.packed_fill
    );
    println!("record length (tokens):");
    let most = s.length_histogram.iter().map(|b| b.2).max().unwrap_or(1);
    for &(lo, hi, n) in &s.length_histogram {
        println!(
            "  {:>6} – {:<6} {:>7}  {}",
            lo,
            hi - 1,
            n,
            "#".repeat((40 * n).div_ceil(most))
        );
    }
}

/// The shortest and longest prompt of the records skipped for `--max-len`.
fn prompt_range(s: &DataStats) -> Option<(usize, usize)> {
    let prompts = s.skipped_past_max_len.iter().map(|r| r.prompt_tokens);
    Some((prompts.clone().min()?, prompts.max()?))
}
