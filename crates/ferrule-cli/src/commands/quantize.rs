//! `ferrule quantize`

use ferrule::model::LoadOptions;
use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrule::model::ModelSource;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder (config.json + safetensors + tokenizer).
    #[arg(long)]
    model: String,
    /// New folder for the quantized model (bitsandbytes layout, loadable by transformers).
    #[arg(long, short)]
    output: PathBuf,
    #[command(flatten)]
    quant: super::QuantArgs,
}

pub fn run(a: Args) -> Result<()> {
    let spec = a
        .quant
        .spec()?
        .context("ferrule quantize needs --quantize nf4|fp4|int8")?;
    // Memory-mapped: each weight is read, quantized and written in turn.
    let source = ModelSource::load_with(
        &a.model,
        &super::device(),
        LoadOptions::read_once(None, &a.model),
    )?;
    let report = ferrule::export::quantize_to_dir(&source, &spec, &a.output)?;
    let m = &report.memory;
    for (format, f) in &m.formats {
        eprintln!(
            "{:>4} x {format}: {:.3} bits/param",
            f.tensors, f.bits_per_param
        );
    }
    eprintln!(
        "base weights {:.1} MB (f32: {:.1} MB, {:.3}x)",
        m.total_bytes() as f64 / 1e6,
        m.f32_bytes() as f64 / 1e6,
        m.total_bytes() as f64 / m.f32_bytes() as f64
    );
    let file = a.output.join("model.safetensors");
    let file_bytes = std::fs::metadata(&file)
        .with_context(|| format!("{}: reading its size", file.display()))?
        .len();
    if let Some(bf16) = m.formats.get("bf16") {
        // Held in bf16, written in f32: see ferrule::quant::bnb_format::serialize.
        eprintln!(
            "{}: {:.1} MB on disk: the {} bf16 table{} (embedding, head) {:.1} MB in memory are written \
             in f32 ({:.1} MB; the values are bf16-exact), as transformers needs to load the folder in f32",
            file.display(),
            file_bytes as f64 / 1e6,
            bf16.tensors,
            if bf16.tensors == 1 { "" } else { "s" },
            bf16.bytes as f64 / 1e6,
            2.0 * bf16.bytes as f64 / 1e6,
        );
    }
    if let Some(e) = report.quantize_error {
        eprintln!(
            "largest error quantizing added: {:.3e} ({:.2e} of the largest weight)",
            e.max_abs, e.rel
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    eprintln!("quantized model written to {}", a.output.display());
    Ok(())
}
