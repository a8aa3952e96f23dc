//! `ferrule export gguf` and `ferrule export lora`

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrule::adapted::AdaptedModel;
use ferrule::export::gguf::{
    export_lora_gguf, export_model_gguf, learns_quantization, GgufExportOptions, OutType,
};
use ferrule::export::lora::export_plain_lora;
use ferrule::model::{LoadOptions, ModelSource};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Write a model (optionally with an adapter merged in), or a LoRA adapter alone
    /// (--adapter-only), as a GGUF file that llama.cpp loads.
    Gguf(GgufArgs),
    /// Write a DyLoRA adapter at one rank as a plain PEFT LoRA folder (r = B, lora_alpha = alpha,
    /// the first B components of A and B), which peft loads as any LoRA.
    Lora(LoraArgs),
}

#[derive(clap::Args)]
pub struct LoraArgs {
    /// The base model the adapter was trained on (folder, .gguf file or hub id).
    #[arg(long)]
    model: String,
    /// The DyLoRA adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// The rank to write, 1..r (default r).
    #[arg(long, value_name = "B")]
    rank: Option<usize>,
    /// The new adapter folder.
    #[arg(long, short)]
    output: PathBuf,
}

#[derive(clap::Args)]
pub struct GgufArgs {
    /// Model folder, .gguf file, or hub id (Llama, Mistral, Qwen2, SmolLM2).
    #[arg(long)]
    model: String,
    /// A PEFT adapter folder: merged into the model first, or with --adapter-only written alone
    /// as a llama.cpp LoRA adapter.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Write the LoRA adapter alone in llama.cpp's LoRA GGUF layout (use it with
    /// `llama-cli -m MODEL.gguf --lora FILE.gguf`); the model gives the architecture.
    #[arg(long, requires = "adapter")]
    adapter_only: bool,
    /// Type of the weight matrices: f32, f16, q8_0, q4_0, q4_1 or q4_k (norms and other 1-D
    /// tensors stay f32). Default: f16 for a model, f32 for an adapter, as llama.cpp's
    /// converters; q4_1 for a model with an L4Q adapter, whose learned codes it writes.
    #[arg(long, value_name = "TYPE", value_parser = parse_outtype)]
    outtype: Option<OutType>,
    /// The .gguf file to write.
    #[arg(long, short)]
    output: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    overwrite: bool,
}

fn parse_outtype(s: &str) -> Result<OutType> {
    s.parse()
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Gguf(a) => gguf(a),
        Command::Lora(a) => lora(a),
    }
}

fn lora(a: LoraArgs) -> Result<()> {
    let report = export_plain_lora(&a.model, &a.adapter, a.rank, &a.output)?;
    println!("{}", serde_json::to_string(&report)?);
    eprintln!(
        "LoRA adapter of rank {} (of {}) written to {}",
        report.rank,
        report.max_rank,
        a.output.display()
    );
    Ok(())
}

fn gguf(a: GgufArgs) -> Result<()> {
    let options = |learned: bool| GgufExportOptions {
        outtype: a.outtype.unwrap_or(match (a.adapter_only, learned) {
            (true, _) => OutType::F32,
            (false, true) => OutType::Q4_1,
            (false, false) => OutType::F16,
        }),
        overwrite: a.overwrite,
    };
    let device = super::device();
    let report = match (&a.adapter, a.adapter_only) {
        (Some(adapter), true) => {
            let source =
                ModelSource::load_with(&a.model, &device, LoadOptions::read_once(None, &a.model))?;
            export_lora_gguf(&source, adapter, &a.output, options(false))?
        }
        (adapter, _) => {
            let m = AdaptedModel::load_with(
                &a.model,
                adapter.as_deref(),
                None,
                &device,
                LoadOptions::read_once(None, &a.model),
            )?;
            let tuner = match adapter {
                Some(_) => Some(m.tuner.as_deref().context("no adapter was loaded")?),
                None => None,
            };
            let options = options(learns_quantization(tuner)?);
            export_model_gguf(&m.source, tuner, &a.output, options)?
        }
    };
    if !report.f16_fallback.is_empty() {
        eprintln!(
            "{} matri{} written in F16: rows not a whole number of {} blocks (convert_hf_to_gguf.py falls back the same way): {}",
            report.f16_fallback.len(),
            if report.f16_fallback.len() == 1 { "x" } else { "ces" },
            report.outtype,
            report.f16_fallback.join(", ")
        );
    }
    if let Some(l) = &report.learned {
        eprintln!(
            "{} matrices written from their learned codes ({} codes, as learned); the f16 steps and offsets change a value by at most {:.3e}; re-deriving the codes from them would change {}",
            l.tensors, l.codes, l.max_abs_f16, l.codes_changed_by_f16
        );
    }
    if let Some(e) = &report.max_error {
        eprintln!(
            "largest rounding error: {:.3e} ({:.2e} of the largest weight)",
            e.max_abs, e.rel
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    eprintln!(
        "GGUF {} written to {} ({:.1} MB)",
        report.kind,
        a.output.display(),
        report.bytes as f64 / 1e6
    );
    Ok(())
}
