//! `ferrule`: the command-line face of the library. Each subcommand parses its flags and
//! calls the library; nothing here computes anything itself.

mod commands;
mod progress;

use clap::{CommandFactory, FromArgMatches, Subcommand};

#[global_allocator]
// docs/ARCHITECTURE.md, decisions, fix 2: glibc malloc's page faults dominate tensor-heavy loops; mimalloc does not.
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(clap::Parser)]
#[command(
    name = "ferrule",
    version,
    about = "Parameter-efficient fine-tuning of pretrained transformers (LoRA, IA3, LN tuning; PEFT-compatible)"
)]
struct Cli {
    /// Worker threads for tensor math (default: all cores, divided among the ranks of an mpirun job on this machine).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune an adapter (LoRA, DyLoRA, IA3, LN tuning, prompt or prefix tuning, DePT, RandLoRA, BitFit, DiffFit, bottleneck adapters, PST, SVFit, PELA, L4Q, ConPET with --continual, or any of LoRA, DoRA and bottleneck adapters under IST's layer schedule: --method) on a JSONL dataset.
    Train(Box<commands::train::Args>),
    /// Train several methods on the same records under one budget (steps, tokens or seconds)
    /// and write one table and one plot (--lr-sweep: each at its best learning rate).
    Compare(Box<commands::compare::Args>),
    /// Show records as training sees them (trained tokens marked) and count tokens, padding, lengths.
    Data(commands::data::Args),
    /// Loss / perplexity (and accuracy for classification) on a JSONL dataset.
    Eval(commands::eval::Args),
    /// Generate text from a decoder model, with or without an adapter.
    Generate(commands::generate::Args),
    /// Merge adapters into their base or into one adapter (peft's combinations, DARE/DAREx), or whole models from a mergekit YAML (--config).
    Merge(commands::merge::Args),
    /// Quantize a model's linear layers (nf4/fp4 with optional double quantization, or int8)
    /// and write it in the bitsandbytes layout that transformers loads.
    Quantize(commands::quantize::Args),
    /// Write a model or adapter in another ecosystem's format (GGUF for llama.cpp; a DyLoRA adapter at one rank as peft's LoRA).
    #[command(subcommand)]
    Export(commands::export::Command),
    /// Show a model's architecture and parameters, and what an adapter config would train.
    Inspect(Box<commands::inspect::Args>),
    /// Write f32 logits for given input tensors (for parity checks).
    Logits(commands::logits::Args),
    /// Estimate per-rank memory and communication of a (multi-process) training run.
    Plan(Box<commands::plan::Args>),
    /// Draw a run's loss.svg (train and eval loss, learning rate) from its metrics.jsonl.
    Plot(commands::plot::Args),
    /// Work on a training run's checkpoints (consolidate a sharded one).
    #[command(subcommand)]
    Checkpoint(commands::checkpoint::Command),
}

/// Runs candle's own element-wise ops (the gradient sums of its backward pass) on the calling
/// thread, unless `CANDLE_NUM_THREADS` is set: ferrule's kernels use rayon and oneDNN, and
/// candle 0.11's separate spinning worker pool mostly waited. In `perf` on a 2-core Zen 4 its
/// join (`BarrierGuard::drop`, under `Tensor::backward`'s adds) took 12% of a MiniLM step and
/// its worker another 10%; with one thread MiniLM trained 1.22x faster in f32 (3532-3548
/// against 2869-2912 tokens/s) and 1.17-1.27x in bf16, with the same bytes (element-wise ops
/// do not depend on how they are split).
fn single_threaded_candle_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any candle op: candle reads it once, when its pool is first used.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// mimalloc's `mi_option_purge_delay` (see mimalloc.h; not named in libmimalloc-sys).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Training frees and reallocates the same large activation buffers every step; returning
    // them to the OS in between made page faults ~30% of a step (measured with perf,
    // 24.6 s -> 17.4 s per SmolLM2 step). Keep freed memory for reuse instead.
    // `MIMALLOC_PURGE_DELAY` set in the environment (mimalloc reads it at start) wins, to
    // trade speed for a lower peak RSS (BENCHMARKS.md, "GaLore layer-wise").
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option; no allocation is in flight.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    // A file-size limit (`ulimit -f`, RLIMIT_FSIZE) kills a process that writes past it with
    // SIGXFSZ unless the signal is ignored; ignored, the write fails with EFBIG and ferrule
    // reports which file it was writing and removes the partial copy.
    // SAFETY: setting a signal's disposition to SIG_IGN before any thread starts.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN)
    };
    let cli = parse_command_line();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRULE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // MPI first (when a launcher started this process): the default thread count depends on
    // how many ranks share this machine.
    let comm = match ferrule::dist::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cli
        .threads
        .unwrap_or_else(|| (cores / comm.local_size()).max(1));
    if cli.threads.is_some() || comm.local_size() > 1 {
        // candle and gemm both size their work from rayon's global pool.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    single_threaded_candle_elementwise();
    // 130 (128 + SIGINT, as shells report it) when training stopped on a signal.
    let mut exit_code = 0;
    let result = if comm.world_size() > 1 && !matches!(cli.command, Command::Train(_)) {
        Err(anyhow::anyhow!(
            "only `ferrule train` runs on several processes; run this command without mpirun"
        ))
    } else {
        match cli.command {
            Command::Train(a) => commands::train::run(*a, comm.as_ref())
                .map(|interrupted| exit_code = if interrupted { 130 } else { 0 }),
            Command::Compare(a) => commands::compare::run(*a, cli.threads),
            Command::Eval(a) => commands::eval::run(a),
            Command::Data(a) => commands::data::run(a),
            Command::Generate(a) => commands::generate::run(a),
            Command::Merge(a) => commands::merge::run(a),
            Command::Quantize(a) => commands::quantize::run(a),
            Command::Export(c) => commands::export::run(c),
            Command::Inspect(a) => commands::inspect::run(*a),
            Command::Logits(a) => commands::logits::run(a),
            Command::Checkpoint(c) => commands::checkpoint::run(c),
            Command::Plan(a) => commands::plan::run(*a),
            Command::Plot(a) => commands::plot::run(a),
        }
    };
    if let Err(e) = result {
        if comm.world_size() > 1 {
            eprintln!(
                "error (rank {} of {}): {e:#}",
                comm.rank(),
                comm.world_size()
            );
            // Stop the other ranks now rather than leave them waiting in a collective.
            comm.abort(1);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    if exit_code != 0 {
        drop(comm); // MPI_Finalize before exiting
        std::process::exit(exit_code);
    }
}

/// The command line, parsed; `train` also learns which of its settings were given as flags
/// (they override its config file).
fn parse_command_line() -> Cli {
    let mut cmd = Cli::command()
        .mut_subcommand("train", commands::train::with_defaults)
        .mut_subcommand("compare", commands::train::with_defaults);
    let matches = cmd.get_matches_mut();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit());
    match (&mut cli.command, matches.subcommand()) {
        (Command::Train(args), Some((_, m))) => args.given = commands::train::given_settings(m),
        (Command::Compare(args), Some((_, m))) => args.given = commands::train::given_settings(m),
        _ => {}
    }
    cli
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag of every subcommand says what it does in `--help`.
    #[test]
    fn every_flag_has_a_help_line() {
        fn walk(cmd: &clap::Command, name: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if let (None, Some(long)) = (arg.get_help(), arg.get_long()) {
                    if !arg.is_hide_set() {
                        missing.push(format!("{name} --{long}"));
                    }
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{name} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "ferrule", &mut missing);
        assert!(
            missing.is_empty(),
            "flags without a help line:\n{}",
            missing.join("\n")
        );
    }
}
