//! `ferrule plan`

use anyhow::{bail, Result};
use ferrule::dist::plan::{plan, Plan, PlanRequest, PlannedModel};
use ferrule::dist::ZeroStage;
use ferrule::ops::ComputeDtypeDecision;
use ferrule::train::TrainConfig;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder, its config.json alone (a model this machine does not hold), or .gguf file.
    #[arg(long)]
    model: String,
    /// causal-lm or seq-cls (default: by model family).
    #[arg(long)]
    task: Option<String>,
    /// What would train (train's adapter flags). Without weights only LoRA (r (in + out)
    /// per targeted linear) and IA3 (one vector per targeted linear) are counted; with them the method is built and counted exactly.
    #[command(flatten)]
    adapter: super::adapter_args::AdapterArgs,
    #[command(flatten)]
    quant: super::QuantArgs,
    /// The compute dtype the run would use (train's --compute-dtype; default auto, as decided
    /// on this machine): dense frozen matrices are held in it. f32 and bf16 are planned for
    /// any machine.
    #[arg(long, value_name = "DTYPE", default_value = "auto")]
    compute_dtype: ferrule::ops::ComputeDtypeChoice,
    /// Ranks (processes) of the run.
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// ZeRO stage (0-3), as train's --zero-stage.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=3))]
    zero_stage: u8,
    /// Plan with the frozen base sharded over the ranks (train's --shard-base, FSDP-style).
    #[arg(long)]
    shard_base: bool,
    /// Plan with the frozen base streamed from disk (train's --stream-base): the resident
    /// part of the base plus the matrix in use and the one read ahead.
    #[arg(long)]
    stream_base: bool,
    /// Plan with train's --max-resident-gb GB: the base streamed, with as many of its matrices
    /// kept resident as fit in GB (10^9 bytes) of frozen-base memory (with the weights there,
    /// chosen as train chooses them; from a config.json alone, the budget up to the whole base).
    #[arg(long, value_name = "GB")]
    max_resident_gb: Option<f64>,
    /// Records per micro-batch on each rank.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per record (the padded length).
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Plan with gradient checkpointing (train's --recompute).
    #[arg(long)]
    recompute: bool,
    /// The optimizer, as train's --optim: its state's bytes (8-bit: about a quarter of
    /// adamw's; paged: a file, not resident).
    #[arg(long, value_name = "NAME", default_value = "adamw")]
    optim: ferrule::train::OptimName,
    /// GaLore's settings, as train's --optim-args (`rank=128,proj_type=std,...`): with a model
    /// folder its state is counted per target from the low-rank shapes.
    #[arg(long, value_name = "K=V,...")]
    optim_args: Option<String>,
    /// Memory each rank has, in GB (10^9 bytes): say whether the plan fits.
    #[arg(long, value_name = "GB")]
    memory_per_rank: Option<f64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    check_sizes(&args)?;
    let (estimate, compute) = estimate(&args)?;
    let fits = args
        .memory_per_rank
        .map(|gb| estimate.total_bytes <= gb * 1e9);
    if args.json {
        let mut v = serde_json::to_value(&estimate)?;
        v["fits"] = serde_json::json!(fits);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_text(&args, &estimate, &compute, fits);
    Ok(())
}

/// Refuses sizes no run can have, naming the flag.
fn check_sizes(args: &Args) -> Result<()> {
    if args.world_size == 0 {
        bail!("--world-size is 0, expected at least 1")
    }
    if args.batch_size == 0 || args.max_len == 0 {
        bail!(
            "--batch-size and --max-len must be at least 1 (got {} and {})",
            args.batch_size,
            args.max_len
        )
    }
    if (args.stream_base || args.max_resident_gb.is_some()) && args.shard_base {
        bail!("--stream-base and --shard-base (or --max-resident-gb and --shard-base) both bound the base's memory, in ways train does not combine; plan one of them")
    }
    if args.stream_base && args.max_resident_gb.is_some() {
        bail!("--stream-base keeps no frozen matrix resident, and --max-resident-gb keeps as many as fit in its budget; plan one of them, as train takes one")
    }
    if let Some(gb) = args.memory_per_rank {
        if !(gb.is_finite() && gb > 0.0) {
            bail!("--memory-per-rank is {gb}, expected a positive number of GB")
        }
    }
    Ok(())
}

/// The model counted (or estimated from its config) and the per-rank memory and traffic of
/// the run the flags describe, with the compute dtype it was planned in.
fn estimate(args: &Args) -> Result<(Plan, ComputeDtypeDecision)> {
    let quant = args.quant.spec()?;
    let task = args.task.as_deref().map(super::parse_task).transpose()?;
    let adapter = args.adapter.apply(&TrainConfig {
        model: args.model.clone(),
        ..TrainConfig::default()
    })?;
    let compute = args.compute_dtype.planned()?;
    let options = ferrule::model::LoadOptions {
        quantize: quant.as_ref(),
        compute_dtype: compute.dtype,
        stream_base: args.stream_base || args.max_resident_gb.is_some(),
        max_resident: args
            .max_resident_gb
            .map(|gb| ferrule::model::residency::budget_bytes(gb, "--max-resident-gb"))
            .transpose()?,
        ..Default::default()
    };
    let planned = PlannedModel::load(
        &args.model,
        &adapter,
        task,
        options,
        args.adapter.allow_unmatched,
    )?;
    let galore = args
        .optim
        .is_galore()
        .then(|| {
            ferrule::train::galore::GaLoreConfig::from_optim_args(
                args.optim_args.as_deref(),
                None,
                args.optim == ferrule::train::OptimName::NaturalGaloreAdamw,
                Default::default(),
            )
        })
        .transpose()?;
    let req = PlanRequest {
        shape: planned.shape,
        base_bytes: planned.base_bytes,
        trainable: planned.trainable,
        world: args.world_size,
        stage: ZeroStage::new(args.zero_stage)?,
        shard_base: args.shard_base,
        micro_batch: args.batch_size,
        seq_len: args.max_len,
        recompute: args.recompute,
        optim: args.optim,
        trainable_shapes: planned.trainable_shapes,
        galore,
    };
    Ok((plan(&req), compute))
}

/// The estimate for people, one line per part.
fn print_text(args: &Args, estimate: &Plan, compute: &ComputeDtypeDecision, fits: Option<bool>) {
    let gb = |b: f64| format!("{:>9.3} GB", b / 1e9);
    println!(
        "estimate per rank: {} ranks, ZeRO stage {}{}",
        estimate.world_size,
        estimate.zero_stage,
        if estimate.shard_base {
            ", base sharded"
        } else if args.stream_base {
            ", base streamed from disk"
        } else if args.max_resident_gb.is_some() {
            ", base streamed beyond --max-resident-gb"
        } else {
            ""
        }
    );
    println!("  base parameters       {}", estimate.base_params);
    println!("  trainable parameters  {}", estimate.trainable_params);
    println!(
        "  frozen weights        {} (in {}: {})",
        gb(estimate.weights_bytes),
        compute.dtype,
        compute.reason
    );
    println!(
        "  trainable (f32 copy)  {}",
        gb(estimate.trainable_state.parameters)
    );
    println!(
        "  gradients             {}",
        gb(estimate.trainable_state.gradients)
    );
    println!(
        "  optimizer state       {}",
        gb(estimate.trainable_state.optimizer)
    );
    println!(
        "  activations           {}  ({} x {} tokens{})",
        gb(estimate.activation_bytes),
        args.batch_size,
        args.max_len,
        if args.recompute { ", recomputed" } else { "" }
    );
    println!("  runtime               {}", gb(estimate.runtime_bytes));
    println!("  total                 {}", gb(estimate.total_bytes));
    println!(
        "  (ZeRO paper's model states for this trainable count: {})",
        gb(estimate.paper_model_state_bytes).trim()
    );
    println!(
        "sent per step per rank  {:.3} MB (paper: {:.3} MB)",
        estimate.comm_bytes_per_step / 1e6,
        estimate.paper_comm_bytes_per_step / 1e6
    );
    if let (Some(f), Some(gbs)) = (fits, args.memory_per_rank) {
        println!(
            "fits in {gbs} GB per rank: {}",
            if f { "yes" } else { "no" }
        );
    }
    for n in &estimate.notes {
        println!("note: {n}");
    }
}
