//! `linear` for the methods peft has no combination for (RandLoRA, DoRA, mixes of methods):
//! task arithmetic on the merged weights, `W = W₀ + Σᵢ wᵢ (Wᵢ − W₀)` with `Wᵢ` the base merged
//! with adapter `i` alone. For every linear change this is what `--adapter-weights` computes at
//! inference (`f₀ + Σ wᵢ (fᵢ − f₀)`, [`crate::tuners::weighted`]); for LoRA it equals peft's
//! `cat` merged.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::merge::{merged_model, MergeOptions, MergeReport, MergedModel};
use crate::model::{ModelSource, Task};
use crate::tuners::Tuner;
use crate::util::atomic::{write_safetensors_streamed, write_tensor, HeaderEntry};

/// Writes `W₀ + Σ wᵢ (Wᵢ − W₀)` over `members` (`(name, weight, tuner)`, each tuner built on
/// the model of `source`) as a model folder at `out`, one tensor at a time. A quantized base
/// is refused (its merged weights would be requantized once per member), as are members that
/// replace base tensors outright (`modules_to_save`: no change to weight) and members that
/// disagree on tying the embeddings.
pub fn task_arithmetic_to_dir(
    source: &ModelSource,
    members: &[(String, f64, &dyn Tuner)],
    task: Task,
    out: &Path,
    options: MergeOptions,
) -> Result<MergeReport> {
    if !source.weights.quantized().is_empty() {
        bail!("merging several adapters of these methods into a quantized base is not supported: merge them into the dense base, or one at a time")
    }
    let mut merged: Vec<(MergedModel, BTreeSet<String>)> = Vec::new();
    for (name, _, tuner) in members {
        if !tuner.replaced()?.is_empty() {
            bail!("adapter {name}: replaces base tensors outright (modules_to_save, LN tuning or trained token rows); a replaced tensor has no change to weight. Merge it alone")
        }
        let updates = tuner.updates()?;
        let names: BTreeSet<String> = updates.iter().map(|(n, _)| n.clone()).collect();
        let model = merged_model(source, vec![], updates, task, options)
            .with_context(|| format!("adapter {name}"))?;
        if let Some((first, _)) = merged.first() {
            let tie = |m: &MergedModel| m.config().get("tie_word_embeddings").cloned();
            if tie(first) != tie(&model) {
                bail!("adapter {name} changes the tied embedding table and another does not; merge them one at a time")
            }
        }
        merged.push((model, names));
    }
    let (first, _) = merged.first().context("no adapter to merge")?;
    let base = merged_model(source, vec![], vec![], task, options)?;
    let mut report = first.report();
    report.merged_modules = merged.iter().map(|(_, c)| c.len()).sum();
    let entries: Vec<HeaderEntry> = first
        .names()
        .map(|n| HeaderEntry::new(n, safetensors::Dtype::F32, first.dims(n).expect("listed")))
        .collect();
    report.tensors_written = entries.len();
    let tensor = |name: &str| -> Result<Tensor> {
        if !merged.iter().any(|(_, changed)| changed.contains(name)) {
            return dense(first, name);
        }
        let w0 = base_tensor(&base, name)?;
        let mut sum = w0.clone();
        for ((model, changed), (_, w, _)) in merged.iter().zip(members) {
            if changed.contains(name) {
                sum = (sum + ((dense(model, name)? - &w0)? * *w)?)?;
            }
        }
        Ok(sum)
    };
    crate::export::write_model_folder_with(source, out, first.config(), |file| {
        write_safetensors_streamed(
            file,
            &entries,
            Some(crate::export::pt_format()),
            |i, out| {
                let name = &entries[i].name;
                write_tensor(name, &tensor(name)?.to_dtype(DType::F32)?, out)
            },
        )
    })?;
    Ok(report)
}

/// `name` of `model`, dense.
fn dense(model: &MergedModel, name: &str) -> Result<Tensor> {
    Ok(model.tensor(name)?.to_dense(&Device::Cpu)?)
}

/// The base's own value of a merged tensor (a tied head's is the embedding table).
fn base_tensor(base: &MergedModel, name: &str) -> Result<Tensor> {
    if base.contains(name) {
        return dense(base, name);
    }
    match name {
        "lm_head.weight" if base.contains("model.embed_tokens.weight") => {
            dense(base, "model.embed_tokens.weight")
        }
        _ => bail!("merge: an adapter changes {name:?}, which the base does not have"),
    }
}
