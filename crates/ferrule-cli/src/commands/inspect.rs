//! `ferrule inspect`

use anyhow::Result;
use candle_core::Device;
use ferrule::adapted::default_task;
use ferrule::model::{Model, ModelSource};
use ferrule::train::TrainConfig;
use ferrule::tuners::{registry, trainable_params, BuildContext};

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

pub fn run(a: Args) -> Result<()> {
    let dev = Device::Cpu;
    let task = a.model.task.as_deref().map(super::parse_task).transpose()?;
    let m = a.model.load()?;
    let mut info = serde_json::json!({
        "model": a.model.model,
        "model_type": m.source.model_type(),
        "task": m.model.task.peft_name(),
        "parameters": m.model.base_params,
        "config": m.source.config,
    });
    let mem = ferrule::quant::WeightMemory::of(&m.source.weights);
    info["weights"] = serde_json::json!({
        "bytes": mem.total_bytes(),
        "f32_bytes": mem.f32_bytes(),
        "quantized_parameters": mem.quantized_params,
        "quantized_bits_per_param": (mem.quantized_params > 0).then(|| mem.quantized_bits_per_param()),
        "bits_per_param": mem.total_bytes() as f64 * 8.0 / (mem.quantized_params + mem.dense_params).max(1) as f64,
        "formats": mem.formats,
    });
    if let Some(t) = &m.tuner {
        info["adapter"] = adapter_json(&m.active, t.as_ref(), m.model.base_params);
    }
    if let Some(w) = &m.weighted {
        let members: Vec<_> = w
            .members
            .iter()
            .map(|x| adapter_json(&x.name, x.tuner.as_ref(), m.model.base_params))
            .collect();
        info["weighted_sum"] = serde_json::json!({ "running": m.active, "members": members });
    }
    if !m.adapters.is_empty() {
        info["adapters_loaded"] = serde_json::json!(m
            .adapters
            .iter()
            .map(|a| serde_json::json!({"name": a.name, "dir": a.dir}))
            .collect::<Vec<_>>());
    }
    if a.adapter.given() {
        let source = ModelSource::load_with(&a.model.model, &dev, a.model.quant.spec()?.as_ref())?;
        let task = task.unwrap_or(default_task(&source)?);
        let adapter = a
            .adapter
            .apply(&TrainConfig::default())?
            .resolved(source.model_type(), task)?;
        let tuner = registry::build(
            &adapter,
            BuildContext {
                seed: 0,
                device: &dev,
                weights: None,
                allow_unmatched: a.adapter.allow_unmatched,
            },
        )?;
        let model = Model::build(&source, task, tuner.as_ref(), &dev, 0)?;
        let matches = tuner.finish()?;
        let trainable = trainable_params(tuner.as_ref());
        info["plan"] = serde_json::json!({
            "method": tuner.method().name,
            "peft_type": tuner.method().peft_type,
            "config": tuner.config_json()?,
            "matches": matches,
            "modules": tuner.adapted().len(),
            "trainable_parameters": trainable,
            "total_parameters": ferrule::tuners::total_params(model.base_params, tuner.as_ref()),
            "percent_trainable": 100.0 * trainable as f64 / ferrule::tuners::total_params(model.base_params, tuner.as_ref()) as f64,
            "adapted": tuner.adapted(),
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("model        {}", a.model.model);
    println!(
        "architecture {} ({})",
        m.source.model_type(),
        m.model.task.peft_name()
    );
    let c = &m.source.config;
    for k in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    ] {
        if let Some(v) = c.get(k) {
            println!("  {k:<24} {v}");
        }
    }
    println!("parameters   {}", m.model.base_params);
    let w = &info["weights"];
    println!(
        "weights      {:.1} MB ({:.3} bits/param; f32 would be {:.1} MB)",
        mem.total_bytes() as f64 / 1e6,
        w["bits_per_param"].as_f64().unwrap_or(0.0),
        mem.f32_bytes() as f64 / 1e6
    );
    for (format, f) in &mem.formats {
        println!(
            "  {:>4} x {format}: {} parameters at {:.3} bits/param (statistics included)",
            f.tensors, f.params, f.bits_per_param
        );
    }
    if m.adapters.len() > 1 {
        println!(
            "adapters     {} loaded: {}",
            m.adapters.len(),
            m.adapters
                .iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(ad) = info.get("adapter") {
        print_adapter("adapter     ", ad);
    }
    if let Some(w) = info.get("weighted_sum") {
        println!("running      {}", m.active);
        for ad in w["members"].as_array().into_iter().flatten() {
            print_adapter("  member    ", ad);
        }
    }
    if let Some(p) = info.get("plan") {
        print_plan(p);
    }
    Ok(())
}

/// One loaded adapter: its method, modules and parameters.
fn adapter_json(
    name: &str,
    t: &dyn ferrule::tuners::Tuner,
    base_params: usize,
) -> serde_json::Value {
    let trainable = trainable_params(t);
    serde_json::json!({
        "name": name,
        "peft_type": t.method().peft_type,
        "modules": t.adapted().len(),
        "parameters": trainable,
        "percent_of_total": 100.0 * trainable as f64 / ferrule::tuners::total_params(base_params, t) as f64,
        "example_module": t.adapted().first(),
    })
}

fn print_adapter(label: &str, ad: &serde_json::Value) {
    println!(
        "{label} {} {} on {} modules, {} parameters ({:.4}% of total)",
        ad["name"].as_str().unwrap_or(""),
        ad["peft_type"].as_str().unwrap_or(""),
        ad["modules"],
        ad["parameters"],
        ad["percent_of_total"].as_f64().unwrap_or(0.0)
    );
}

/// The text form of a method plan: what it trains, what each target entry matched, an example module.
fn print_plan(p: &serde_json::Value) {
    println!(
        "{} ({}) on {} modules: trainable {} of {} ({:.4}%)",
        p["method"].as_str().unwrap_or(""),
        p["peft_type"].as_str().unwrap_or(""),
        p["modules"],
        p["trainable_parameters"],
        p["total_parameters"],
        p["percent_trainable"].as_f64().unwrap_or(0.0)
    );
    for m in p["matches"].as_array().into_iter().flatten() {
        println!("  {} matched:", m["option"].as_str().unwrap_or(""));
        for e in m["entries"].as_array().into_iter().flatten() {
            println!("    {:<24} {} modules", e[0].as_str().unwrap_or(""), e[1]);
        }
    }
    if let Some(first) = p["adapted"].as_array().and_then(|a| a.first()) {
        println!(
            "  e.g. {} ({}, {} parameters)",
            first["path"].as_str().unwrap_or(""),
            first["detail"].as_str().unwrap_or(""),
            first["params"]
        );
    }
}
