//! `ferrule train`

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use ferrule::dist::{Collective, ZeroStage};
use ferrule::train::{train_on, LrSchedule, RunOptions, TrainConfig};

use crate::progress::Bar;

#[derive(clap::Args)]
pub struct Args {
    /// TOML file with the run's settings (the TrainConfig keys; the method's PEFT keys under [adapter] with
    /// peft_type, or LoRA's under [lora]). Flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model folder (config.json + safetensors + tokenizer.json), .gguf file, or hub id.
    #[arg(long)]
    model: Option<String>,
    /// Training data (JSONL: {"text"}, alpaca, {"messages"} chat, or {"text","label"}).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out JSONL records (same shapes as --data), evaluated at the end and every --eval-every steps.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Output folder: adapter, checkpoints, metrics.jsonl.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// causal-lm or seq-cls.
    #[arg(long)]
    task: Option<String>,
    #[command(flatten)]
    adapter: super::adapter_args::AdapterArgs,
    /// Longest sequence in tokens (default: the model's context, at most 512).
    #[arg(long)]
    max_len: Option<usize>,
    /// Fail on records longer than --max-len instead of truncating them.
    #[arg(long)]
    no_truncate: bool,
    /// Train on prompt tokens too (default: completions only).
    #[arg(long)]
    train_on_prompt: bool,
    /// Batch layout: free (padding-free: records end to end, attention within each; the
    /// default), longest (padded to each batch's longest record) or max-len (padded to --max-len).
    #[arg(long, value_parser = super::parse_padding)]
    padding: Option<ferrule::data::Padding>,
    /// Pad every batch to --max-len (the same as --padding max-len; fixed shapes for benchmarks).
    #[arg(long, conflicts_with = "padding")]
    pad_to_max_len: bool,
    /// Records per micro-batch (default 8).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches by tokens: consecutive records of at most N tokens in all, instead of
    /// --batch-size records (padding-free batches only). With --packing, the size of each bin.
    #[arg(long, value_name = "N", conflicts_with = "batch_size")]
    batch_tokens: Option<usize>,
    /// Bin-pack each epoch's records into micro-batches of --batch-tokens tokens (default
    /// --batch-size x --max-len) by best-fit decreasing; no record attends to another.
    #[arg(long)]
    packing: bool,
    /// Micro-batches per optimizer step (default 1); the step averages over all their trained tokens.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Optimizer steps to run (default: --epochs passes over the data).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Passes over the data when --max-steps is not given (default 1; fractions allowed).
    #[arg(long)]
    epochs: Option<f64>,
    /// Peak learning rate of AdamW (default 2e-4).
    #[arg(long)]
    lr: Option<f64>,
    /// Steps of linear warmup from 0 to --lr (default 0).
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// constant, linear or cosine.
    #[arg(long)]
    schedule: Option<LrSchedule>,
    /// AdamW decoupled weight decay (default 0).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// 0 disables clipping.
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Seed of initialisation, data order and dropout (default 42).
    #[arg(long)]
    seed: Option<u64>,
    /// Recompute layer activations in backward (gradient checkpointing): less memory, ~1 extra forward.
    #[arg(long)]
    recompute: bool,
    /// Under mpirun: each rank keeps 1/N of the frozen base's rows; layers gather the rest as they run.
    #[arg(long)]
    shard_base: bool,
    #[command(flatten)]
    quant: super::QuantArgs,
    /// Evaluate every N steps as well as at the end (needs --eval-data).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Records per evaluation batch (default: --batch-size).
    #[arg(long)]
    eval_batch_size: Option<usize>,
    /// Evaluate on the first N --eval-data records only.
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Write a checkpoint every N steps (for --resume).
    #[arg(long)]
    save_every: Option<usize>,
    /// Checkpoints kept in the output folder; older ones are deleted (default 2).
    #[arg(long)]
    keep_checkpoints: Option<usize>,
    /// Continue from the newest checkpoint in the output folder.
    #[arg(long)]
    resume: bool,
    /// Start a new run from this adapter folder's weights (same method and shapes).
    #[arg(long, value_name = "DIR")]
    init_adapter: Option<PathBuf>,
    /// When stderr is not a terminal (nohup, CI, a file): a plain progress line every N steps.
    #[arg(long, value_name = "N", default_value_t = 10)]
    log_every: usize,
    /// No progress bar or messages; the summary JSON is still printed.
    #[arg(long, short)]
    quiet: bool,
    /// Under mpirun: how the trainable state is spread over the ranks (ZeRO, Rajbhandari et al. 2020):
    /// 0 gradients all-reduced, 1 also AdamW state partitioned, 2 gradients reduce-scattered too,
    /// 3 trainable parameters partitioned too. Every stage trains the same adapter.
    #[arg(long, value_name = "0-3", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=3))]
    zero_stage: u8,
    /// Stop after this many steps as if interrupted (a checkpoint is written; resume later).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
}

pub fn build_config(a: &Args) -> Result<TrainConfig> {
    let mut c: TrainConfig = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("{}: invalid training config", p.display()))?
        }
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($field:expr, $flag:expr) => {
            if let Some(v) = $flag.clone() {
                $field = v;
            }
        };
    }
    set!(c.model, a.model);
    set!(c.data, a.data);
    if a.eval_data.is_some() {
        c.eval_data = a.eval_data.clone();
    }
    set!(c.output_dir, a.output);
    if let Some(t) = &a.task {
        c.task = super::parse_task(t)?;
    }
    c.adapter = Some(a.adapter.apply(&c)?);
    c.lora = None;
    if a.adapter.allow_unmatched {
        c.allow_unmatched = true;
    }
    if a.max_len.is_some() {
        c.max_len = a.max_len;
    }
    if a.no_truncate {
        c.truncate = false;
    }
    if a.train_on_prompt {
        c.completion_only = false;
    }
    if a.padding.is_some() {
        c.padding = a.padding;
    }
    if a.pad_to_max_len {
        c.pad_to_max_len = true;
    }
    // Either flag replaces both keys of the file: they set the same thing.
    if a.batch_size.is_some() {
        (c.batch_size, c.batch_tokens) = (a.batch_size, None);
    }
    if a.batch_tokens.is_some() {
        (c.batch_size, c.batch_tokens) = (None, a.batch_tokens);
    }
    if a.packing {
        c.packing = true;
    }
    set!(c.grad_accum, a.grad_accum);
    if a.max_steps.is_some() {
        c.max_steps = a.max_steps;
    }
    set!(c.epochs, a.epochs);
    set!(c.lr, a.lr);
    set!(c.warmup_steps, a.warmup_steps);
    set!(c.schedule, a.schedule);
    set!(c.weight_decay, a.weight_decay);
    if let Some(g) = a.max_grad_norm {
        c.max_grad_norm = (g > 0.0).then_some(g);
    }
    set!(c.seed, a.seed);
    if a.recompute {
        c.recompute = true;
    }
    if a.shard_base {
        c.shard_base = true;
    }
    c.quantize = a.quant.apply(c.quantize.take())?;
    if a.eval_every.is_some() {
        c.eval_every = a.eval_every;
    }
    if a.eval_batch_size.is_some() {
        c.eval_batch_size = a.eval_batch_size;
    }
    if a.eval_limit.is_some() {
        c.eval_limit = a.eval_limit;
    }
    if a.save_every.is_some() {
        c.save_every = a.save_every;
    }
    set!(c.keep_checkpoints, a.keep_checkpoints);
    if a.init_adapter.is_some() {
        c.init_adapter = a.init_adapter.clone();
    }
    Ok(c)
}

/// Trains on every rank of `comm` (the world of one without a launcher); rank 0 prints.
/// Returns whether a signal stopped the run (after saving a checkpoint).
pub fn run(a: Args, comm: &dyn Collective) -> Result<bool> {
    let cfg = build_config(&a)?;
    let mut bar = Bar::new(a.quiet, a.log_every);
    let interrupt = stop_on_signal(comm.rank() == 0)?;
    let run = RunOptions {
        resume: a.resume,
        stop_after: a.stop_after,
        zero_stage: ZeroStage::new(a.zero_stage)?,
        interrupt: Some(interrupt),
    };
    let summary = train_on(&cfg, &super::device(), &mut bar, &run, comm)?;
    if comm.rank() != 0 {
        return Ok(summary.interrupted);
    }
    println!("{}", serde_json::to_string(&summary)?);
    if !a.quiet || summary.interrupted {
        if summary.completed {
            eprintln!(
                "adapter saved to {} (adapter_config.json + adapter_model.safetensors)",
                summary.output_dir.display()
            );
        } else {
            eprintln!("stopped after step {} (checkpoint saved); run the same command with --resume to continue", summary.steps);
        }
    }
    Ok(summary.interrupted)
}

/// Ctrl-C, SIGTERM or SIGHUP: the first asks training to stop after the current step with a
/// checkpoint; a second one exits at once (130), as an unhandled Ctrl-C would. Under mpirun,
/// Open MPI turns Ctrl-C into SIGTERM for every rank and kills them a few seconds later:
/// the checkpoint is only written if the step ends in that time.
fn stop_on_signal(announce: bool) -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    ctrlc::set_handler(move || {
        if seen.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        if announce {
            eprintln!(
                "\nstopping after this step with a checkpoint (interrupt again to stop at once)"
            );
        }
    })
    .context("installing the Ctrl-C handler")?;
    Ok(flag)
}
