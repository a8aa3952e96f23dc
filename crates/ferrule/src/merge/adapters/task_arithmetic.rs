//! `linear` for the methods peft has no combination for (RandLoRA, DoRA, mixes of methods):
//! task arithmetic on the merged weights, `W = W₀ + Σᵢ wᵢ (Wᵢ − W₀)` with `Wᵢ` the base merged
//! with adapter `i` alone. For every linear change this is what `--adapter-weights` computes at
//! inference (`f₀ + Σ wᵢ (fᵢ − f₀)`, [`crate::tuners::weighted`]); for LoRA it equals peft's
//! `cat` merged.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::Value;

use crate::merge::{merged_tensors_with, MergeOptions, MergeReport};
use crate::model::{ModelSource, Task};
use crate::ops::FrozenWeight;
use crate::tuners::Tuner;
use crate::util::atomic::raw_tensor;

/// Writes `W₀ + Σ wᵢ (Wᵢ − W₀)` over `members` (`(name, weight, tuner)`, each tuner built on
/// the model of `source`) as a model folder at `out`. A quantized base is refused (its merged
/// weights would be requantized once per member), as are members that replace base tensors
/// outright (`modules_to_save`: no change to weight) and members that disagree on tying the
/// embeddings.
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
    let mut merged: Vec<BTreeMap<String, FrozenWeight>> = Vec::new();
    let mut changed: Vec<BTreeSet<String>> = Vec::new();
    let mut first: Option<(Value, MergeReport)> = None;
    for (name, _, tuner) in members {
        if !tuner.replaced()?.is_empty() {
            bail!("adapter {name}: replaces base tensors outright (modules_to_save, LN tuning or trained token rows); a replaced tensor has no change to weight. Merge it alone")
        }
        let names: BTreeSet<String> = tuner.updates()?.into_iter().map(|(n, _)| n).collect();
        let (tensors, config, report) = merged_tensors_with(source, *tuner, task, options)
            .with_context(|| format!("adapter {name}"))?;
        match &first {
            None => first = Some((config, report)),
            Some((c, _)) if c.get("tie_word_embeddings") != config.get("tie_word_embeddings") => {
                bail!("adapter {name} changes the tied embedding table and another does not; merge them one at a time")
            }
            _ => {}
        }
        merged.push(tensors);
        changed.push(names);
    }
    let (config, mut report) = first.context("no adapter to merge")?;
    let mut tensors = merged[0].clone();
    let all: BTreeSet<&String> = changed.iter().flatten().collect();
    for name in all {
        let base = base_tensor(source, name)?;
        let mut sum = base.clone();
        for (i, (_, w, _)) in members.iter().enumerate() {
            if !changed[i].contains(name) {
                continue;
            }
            let Some(FrozenWeight::Dense(t)) = merged[i].get(name) else {
                bail!("merge: {name} is not a dense tensor after merging")
            };
            let delta = (t.to_dtype(DType::F32)? - &base)?;
            sum = (sum + (delta * *w)?)?;
        }
        tensors.insert(name.clone(), FrozenWeight::Dense(sum));
    }
    report.merged_modules = changed.iter().map(BTreeSet::len).sum();
    report.tensors_written = tensors.len();
    let mut raw = BTreeMap::new();
    for (name, w) in &tensors {
        let FrozenWeight::Dense(t) = w else {
            bail!("merge: {name} is not dense")
        };
        raw.insert(name.clone(), raw_tensor(name, t)?);
    }
    crate::export::write_model_folder(source, out, &config, &raw)?;
    Ok(report)
}

/// The base's own value of a merged tensor (a tied head's is the embedding table; a bare
/// encoder's classification names carry `bert.`).
fn base_tensor(source: &ModelSource, name: &str) -> Result<Tensor> {
    let tensors = source.weights.tensors();
    let found = tensors
        .get(name)
        .or_else(|| name.strip_prefix("bert.").and_then(|n| tensors.get(n)))
        .or_else(|| {
            (name == "lm_head.weight")
                .then(|| tensors.get("model.embed_tokens.weight"))
                .flatten()
        });
    match found {
        Some(t) => Ok(t.to_dtype(DType::F32)?),
        None => bail!("merge: an adapter changes {name:?}, which the base does not have"),
    }
}
