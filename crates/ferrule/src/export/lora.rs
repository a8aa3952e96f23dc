//! `ferrule export lora`: an adapter whose rank is chosen after training (DyLoRA) written at
//! one rank as a plain PEFT LoRA folder, which peft loads as any LoRA
//! ([`crate::tuners::Tuner::plain_lora`]).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use crate::adapted::AdaptedModel;
use crate::merge::BASE_RECORD_FILE;
use crate::model::LoadOptions;
use crate::peft_io::{save_plain_lora, CONFIG_FILE};

/// What [`export_plain_lora`] wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlainLoraReport {
    /// The rank written (`r` of the LoRA config).
    pub rank: usize,
    /// The adapter's largest rank.
    pub max_rank: usize,
    /// Modules it adapts.
    pub modules: usize,
    /// Elements of the tensors written.
    pub parameters: usize,
}

/// Writes the adapter at `adapter` (a DyLoRA folder, attached to the base `model` to build it)
/// at `rank` (default: its largest) as a plain PEFT LoRA folder `out`. The folder is written
/// as `<out>.tmp` and renamed into place, so a failure leaves nothing; an existing `out` is
/// refused. `base_model_name_or_path` and ferrule's base record (a quantized training base)
/// are carried over from the adapter.
pub fn export_plain_lora(
    model: &str,
    adapter: &Path,
    rank: Option<usize>,
    out: &Path,
) -> Result<PlainLoraReport> {
    if out.exists() {
        bail!(
            "{}: already exists; choose a new output folder",
            out.display()
        )
    }
    let m = AdaptedModel::load_with(
        model,
        Some(adapter),
        None,
        &Device::Cpu,
        LoadOptions::read_once(None, model),
    )?;
    let ranks = m.ranks("export lora")?;
    let rank = rank.unwrap_or(*ranks.end());
    m.set_rank(rank)?;
    let tuner = m.tuner.as_deref().context("no adapter was loaded")?;
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join(CONFIG_FILE))
            .with_context(|| format!("reading {}", adapter.join(CONFIG_FILE).display()))?,
    )?;
    let base_model = saved
        .get("base_model_name_or_path")
        .and_then(|v| v.as_str())
        .unwrap_or(model)
        .to_string();
    crate::util::atomic::write_folder_atomic(out, |tmp| {
        save_plain_lora(tmp, tuner, m.model.task, &base_model)?;
        copy_base_record(adapter, tmp)
    })?;
    let form = tuner.plain_lora()?.context("no plain LoRA form")?;
    Ok(PlainLoraReport {
        rank,
        max_rank: *ranks.end(),
        modules: tuner.adapted().len(),
        parameters: form.tensors.iter().map(|(_, t)| t.elem_count()).sum(),
    })
}

/// The record of a quantized training base (`ferrule_base.json`), so that merging the LoRA
/// warns as merging the DyLoRA adapter would.
fn copy_base_record(adapter: &Path, out: &Path) -> Result<()> {
    let from = adapter.join(BASE_RECORD_FILE);
    if from.is_file() {
        std::fs::copy(&from, out.join(BASE_RECORD_FILE))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}
