//! `ferrule inspect`

use anyhow::Result;
use candle_core::Device;
use ferrule::adapted::default_task;
use ferrule::model::{Model, ModelSource};
use ferrule::train::config::default_lora_targets;
use ferrule::tuners::lora::{Lora, LoraConfig};
use ferrule::tuners::target::ModuleSpec;
use ferrule::tuners::Tuner;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: super::ModelArgs,
    /// Show what LoRA with this rank would train.
    #[arg(long)]
    lora_r: Option<usize>,
    /// Modules for that LoRA (comma list or all-linear; default: PEFT's for the model type).
    #[arg(long)]
    target_modules: Option<String>,
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
        let trainable = m.trainable_params();
        info["adapter"] = serde_json::json!({
            "peft_type": t.peft_type(),
            "modules": t.adapted().len(),
            "parameters": trainable,
            "percent_of_total": 100.0 * trainable as f64 / (m.model.base_params + trainable) as f64,
            "example_module": t.adapted().first(),
        });
    }
    if a.lora_r.is_some() || a.target_modules.is_some() {
        let source = ModelSource::load_with(&a.model.model, &dev, a.model.quant.spec()?.as_ref())?;
        let targets = match &a.target_modules {
            Some(s) if s == "all-linear" => ModuleSpec::Pattern(s.clone()),
            Some(s) => ModuleSpec::Names(s.split(',').map(|x| x.trim().to_string()).collect()),
            None => ModuleSpec::Names(default_lora_targets(source.model_type()).unwrap_or_default()),
        };
        let r = a.lora_r.unwrap_or(8);
        let lora = Lora::new(LoraConfig { r, lora_alpha: 2.0 * r as f64, target_modules: Some(targets), ..Default::default() }, 0, &dev)?;
        let model = Model::build(&source, task.unwrap_or(default_task(&source)?), &lora, &dev, 0)?;
        lora.finish()?;
        let trainable: usize = lora.trainable().iter().map(|(_, v)| v.elem_count()).sum();
        info["lora_plan"] = serde_json::json!({
            "r": r,
            "modules": lora.adapted().len(),
            "trainable_parameters": trainable,
            "total_parameters": model.base_params + trainable,
            "percent_trainable": 100.0 * trainable as f64 / (model.base_params + trainable) as f64,
            "module_paths": lora.adapted().iter().map(|m| m.path.clone()).collect::<Vec<_>>(),
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("model        {}", a.model.model);
    println!("architecture {} ({})", m.source.model_type(), m.model.task.peft_name());
    let c = &m.source.config;
    for k in ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings"] {
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
        println!("  {:>4} x {format}: {} parameters at {:.3} bits/param (statistics included)", f.tensors, f.params, f.bits_per_param);
    }
    if let Some(ad) = info.get("adapter") {
        println!(
            "adapter      {} on {} modules, {} parameters ({:.4}% of total)",
            ad["peft_type"].as_str().unwrap_or(""),
            ad["modules"],
            ad["parameters"],
            ad["percent_of_total"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(p) = info.get("lora_plan") {
        println!(
            "LoRA r={} on {} modules: trainable {} of {} ({:.4}%)",
            p["r"],
            p["modules"],
            p["trainable_parameters"],
            p["total_parameters"],
            p["percent_trainable"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
