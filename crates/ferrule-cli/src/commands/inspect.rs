//! `ferrule inspect`

use anyhow::Result;
use ferrule::adapted::{AdaptedModel, AdapterSummary, TrainingPlan};
use ferrule::ops::ComputeDtypeChoice;
use ferrule::train::TrainConfig;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    /// Show what this adapter would train (any of train's adapter flags; --method alone uses
    /// the method's defaults, e.g. PEFT's targets for the model type).
    #[command(flatten)]
    adapter: super::adapter_args::AdapterArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let task = args
        .model
        .task
        .as_deref()
        .map(super::parse_task)
        .transpose()?;
    let loaded = args.model.load(ComputeDtypeChoice::F32)?;
    let mut info = serde_json::json!({
        "model": args.model.model,
        "model_type": loaded.source.model_type(),
        "task": loaded.model.task.peft_name(),
        "parameters": loaded.model.base_params,
        "config": loaded.source.config,
    });
    let mem = ferrule::quant::WeightMemory::of(&loaded.source.weights);
    info["weights"] = serde_json::json!({
        "bytes": mem.total_bytes(),
        "f32_bytes": mem.f32_bytes(),
        "quantized_parameters": mem.quantized_params,
        "quantized_bits_per_param": (mem.quantized_params > 0).then(|| mem.quantized_bits_per_param()),
        "bits_per_param": bits_per_param(&mem),
        "formats": mem.formats,
    });
    let base_params = loaded.model.base_params;
    let running = loaded
        .tuner
        .as_ref()
        .map(|tuner| AdapterSummary::of(&loaded.active, tuner.as_ref(), base_params));
    if let Some(summary) = &running {
        info["adapter"] = serde_json::to_value(summary)?;
    }
    let members: Option<Vec<AdapterSummary>> = loaded.weighted.as_ref().map(|weighted| {
        weighted
            .members
            .iter()
            .map(|x| AdapterSummary::of(&x.name, x.tuner.as_ref(), base_params))
            .collect()
    });
    if let Some(members) = &members {
        info["weighted_sum"] = serde_json::json!({ "running": loaded.active, "members": members });
    }
    if !loaded.adapters.is_empty() {
        info["adapters_loaded"] = serde_json::json!(loaded
            .adapters
            .iter()
            .map(|found| serde_json::json!({"name": found.name, "dir": found.dir}))
            .collect::<Vec<_>>());
    }
    let plan = training_plan(&args, task)?;
    if let Some(plan) = &plan {
        info["plan"] = serde_json::to_value(plan)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    print_model(&args.model.model, &loaded, &mem);
    if loaded.adapters.len() > 1 {
        println!(
            "adapters     {} loaded: {}",
            loaded.adapters.len(),
            loaded
                .adapters
                .iter()
                .map(|found| found.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(summary) = &running {
        print_adapter("adapter     ", summary);
    }
    if let Some(members) = &members {
        println!("running      {}", loaded.active);
        for summary in members {
            print_adapter("  member    ", summary);
        }
    }
    if let Some(plan) = &plan {
        print_plan(plan);
    }
    Ok(())
}

/// What the adapter flags given would train, or None when none was given.
fn training_plan(args: &Args, task: Option<ferrule::model::Task>) -> Result<Option<TrainingPlan>> {
    if !args.adapter.given() {
        return Ok(None);
    }
    let adapter = args.adapter.apply(&TrainConfig {
        model: args.model.model.clone(),
        ..TrainConfig::default()
    })?;
    let quant = args.model.quant.spec()?;
    let options = ferrule::model::LoadOptions {
        quantize: quant.as_ref(),
        resize_token_embeddings: args.model.resize_token_embeddings,
        ..Default::default()
    };
    Ok(Some(TrainingPlan::of(
        &args.model.model,
        &adapter,
        task,
        options,
        args.adapter.allow_unmatched,
    )?))
}

/// Bits per base parameter over every weight, statistics included.
fn bits_per_param(mem: &ferrule::quant::WeightMemory) -> f64 {
    mem.total_bytes() as f64 * 8.0 / (mem.quantized_params + mem.dense_params).max(1) as f64
}

/// The model's architecture, sizes and weight formats, as text.
fn print_model(model: &str, loaded: &AdaptedModel, mem: &ferrule::quant::WeightMemory) {
    println!("model        {model}");
    println!(
        "architecture {} ({})",
        loaded.source.model_type(),
        loaded.model.task.peft_name()
    );
    let config = &loaded.source.config;
    for k in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    ] {
        if let Some(v) = config.get(k) {
            println!("  {k:<24} {v}");
        }
    }
    println!("parameters   {}", loaded.model.base_params);
    println!(
        "weights      {:.1} MB ({:.3} bits/param; f32 would be {:.1} MB)",
        mem.total_bytes() as f64 / 1e6,
        bits_per_param(mem),
        mem.f32_bytes() as f64 / 1e6
    );
    for (format, stats) in &mem.formats {
        println!(
            "  {:>4} x {format}: {} parameters at {:.3} bits/param (statistics included)",
            stats.tensors, stats.params, stats.bits_per_param
        );
    }
}

fn print_adapter(label: &str, summary: &AdapterSummary) {
    println!(
        "{label} {} {} on {} modules, {} parameters ({:.4}% of total)",
        summary.name,
        summary.peft_type,
        summary.modules,
        summary.parameters,
        summary.percent_of_total
    );
}

/// The text form of a method plan: what it trains, what each target entry matched, an example module.
fn print_plan(plan: &TrainingPlan) {
    println!(
        "{} ({}) on {} modules: trainable {} of {} ({:.4}%)",
        plan.method,
        plan.peft_type,
        plan.modules,
        plan.trainable_parameters,
        plan.total_parameters,
        plan.percent_trainable
    );
    for report in &plan.matches {
        println!("  {} matched:", report.option);
        for (entry, count) in &report.entries {
            println!("    {entry:<24} {count} modules");
        }
    }
    if let Some(first) = plan.adapted.first() {
        println!(
            "  e.g. {} ({}, {} parameters)",
            first.path, first.detail, first.params
        );
    }
}
