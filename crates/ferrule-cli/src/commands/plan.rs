//! `ferrule plan`

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use ferrule::adapted::default_task;
use ferrule::dist::plan::{linear_bytes_per_param, plan, ModelShape, PlanRequest};
use ferrule::dist::ZeroStage;
use ferrule::model::{Model, ModelSource};
use ferrule::train::TrainConfig;
use ferrule::tuners::{registry, trainable_params, BuildContext};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder, its config.json alone (a model this machine does not hold), or .gguf file.
    #[arg(long)]
    model: String,
    /// causal-lm or seq-cls (default: by model family).
    #[arg(long)]
    task: Option<String>,
    /// What would train (train's adapter flags). Without weights only LoRA is counted (r (in + out)
    /// per targeted linear); with them the method is built and counted exactly.
    #[command(flatten)]
    adapter: super::adapter_args::AdapterArgs,
    #[command(flatten)]
    quant: super::QuantArgs,
    /// Ranks (processes) of the run.
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// ZeRO stage (0-3), as train's --zero-stage.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=3))]
    zero_stage: u8,
    /// Plan with the frozen base sharded over the ranks (train's --shard-base, FSDP-style).
    #[arg(long)]
    shard_base: bool,
    /// Records per micro-batch on each rank.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per record (the padded length).
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Plan with gradient checkpointing (train's --recompute).
    #[arg(long)]
    recompute: bool,
    /// Memory each rank has, in GB (10^9 bytes): say whether the plan fits.
    #[arg(long, value_name = "GB")]
    memory_per_rank: Option<f64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// The model's config.json, and whether its weights are there to count exactly.
fn read_config(model: &str) -> Result<(serde_json::Value, bool)> {
    let p = Path::new(model);
    if p.extension().is_some_and(|e| e == "gguf") {
        return Ok((serde_json::Value::Null, true));
    }
    let (dir, file) = if p.is_dir() {
        (p.to_path_buf(), p.join("config.json"))
    } else {
        (
            p.parent().unwrap_or(Path::new(".")).to_path_buf(),
            p.to_path_buf(),
        )
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let config =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))?;
    let has_weights = p.is_dir()
        && std::fs::read_dir(&dir)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"));
    Ok((config, has_weights))
}

pub fn run(a: Args) -> Result<()> {
    if a.world_size == 0 {
        bail!("--world-size is 0, expected at least 1")
    }
    if a.batch_size == 0 || a.max_len == 0 {
        bail!(
            "--batch-size and --max-len must be at least 1 (got {} and {})",
            a.batch_size,
            a.max_len
        )
    }
    if let Some(gb) = a.memory_per_rank {
        if !(gb.is_finite() && gb > 0.0) {
            bail!("--memory-per-rank is {gb}, expected a positive number of GB")
        }
    }
    if !Path::new(&a.model).exists() {
        bail!(
            "{}: no such file or folder (give a model folder, its config.json, or a .gguf file)",
            a.model
        )
    }
    let quant = a.quant.spec()?;
    let task = a.task.as_deref().map(super::parse_task).transpose()?;
    let (config, has_weights) = read_config(&a.model)?;
    let cfg = a.adapter.apply(&TrainConfig::default())?;
    let (shape, base_bytes, trainable) = if has_weights {
        let dev = Device::Cpu;
        let source = ModelSource::load_with(&a.model, &dev, quant.as_ref())?;
        let task = task.unwrap_or(default_task(&source)?);
        let adapter = cfg.resolved(source.model_type(), task)?;
        let tuner = registry::build(
            &adapter,
            BuildContext {
                seed: 0,
                device: &dev,
                weights: None,
                allow_unmatched: a.adapter.allow_unmatched,
            },
        )?;
        Model::build(&source, task, tuner.as_ref(), &dev, 0)?;
        tuner.finish()?;
        let mem = ferrule::quant::WeightMemory::of(&source.weights);
        (
            ModelShape::from_config(&source.config)?,
            mem.total_bytes() as f64,
            trainable_params(tuner.as_ref()),
        )
    } else {
        let shape = ModelShape::from_config(&config)
            .with_context(|| format!("{}: config.json", a.model))?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let task = task.unwrap_or(if shape.family == "bert" {
            ferrule::model::Task::FeatureExtraction
        } else {
            ferrule::model::Task::CausalLm
        });
        let adapter = cfg.resolved(model_type, task)?;
        if adapter.peft_type != "LORA"
            || adapter
                .options
                .get("use_dora")
                .is_some_and(|v| v == &serde_json::Value::Bool(true))
        {
            bail!(
                "{}: without the model's weights only plain LoRA's parameters are counted; give a model folder with its weights to plan --method {}",
                a.model,
                adapter.peft_type
            )
        }
        let r = adapter
            .options
            .get("r")
            .and_then(|v| v.as_u64())
            .unwrap_or(8) as usize;
        let targets: Vec<String> = match adapter.options.get("target_modules") {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(v)) => v
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            _ => bail!(
                "{}: no target_modules for model_type {model_type:?}; pass --target-modules",
                a.model
            ),
        };
        let trainable = shape.lora_params(&targets, r)?;
        let in_features = shape.hidden;
        let linear =
            shape.linear_params() as f64 * linear_bytes_per_param(quant.as_ref(), in_features);
        let embedding = shape.embedding_params as f64 * if quant.is_some() { 2.0 } else { 4.0 };
        let other = (shape.other_params - shape.embedding_params) as f64 * 4.0;
        (shape, linear + embedding + other, trainable)
    };
    let req = PlanRequest {
        shape,
        base_bytes,
        trainable,
        world: a.world_size,
        stage: ZeroStage::new(a.zero_stage)?,
        shard_base: a.shard_base,
        micro_batch: a.batch_size,
        seq_len: a.max_len,
        recompute: a.recompute,
    };
    let p = plan(&req);
    let fits = a.memory_per_rank.map(|gb| p.total_bytes <= gb * 1e9);
    if a.json {
        let mut v = serde_json::to_value(&p)?;
        v["fits"] = serde_json::json!(fits);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let gb = |b: f64| format!("{:>9.3} GB", b / 1e9);
    println!(
        "estimate per rank: {} ranks, ZeRO stage {}{}",
        p.world_size,
        p.zero_stage,
        if p.shard_base { ", base sharded" } else { "" }
    );
    println!("  base parameters       {}", p.base_params);
    println!("  trainable parameters  {}", p.trainable_params);
    println!("  frozen weights        {}", gb(p.weights_bytes));
    println!(
        "  trainable (f32 copy)  {}",
        gb(p.trainable_state.parameters)
    );
    println!(
        "  gradients             {}",
        gb(p.trainable_state.gradients)
    );
    println!(
        "  optimizer state       {}",
        gb(p.trainable_state.optimizer)
    );
    println!(
        "  activations           {}  ({} x {} tokens{})",
        gb(p.activation_bytes),
        a.batch_size,
        a.max_len,
        if a.recompute { ", recomputed" } else { "" }
    );
    println!("  runtime               {}", gb(p.runtime_bytes));
    println!("  total                 {}", gb(p.total_bytes));
    println!(
        "  (ZeRO paper's model states for this trainable count: {})",
        gb(p.paper_model_state_bytes).trim()
    );
    println!(
        "sent per step per rank  {:.3} MB (paper: {:.3} MB)",
        p.comm_bytes_per_step / 1e6,
        p.paper_comm_bytes_per_step / 1e6
    );
    if let (Some(f), Some(gbs)) = (fits, a.memory_per_rank) {
        println!(
            "fits in {gbs} GB per rank: {}",
            if f { "yes" } else { "no" }
        );
    }
    for n in &p.notes {
        println!("note: {n}");
    }
    Ok(())
}
