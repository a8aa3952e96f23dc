//! A merged model made one tensor at a time.
//!
//! [`MergedModel`] records, for every tensor of the merged model, where it comes from: the
//! base's own (held in memory, quantized, or memory-mapped with `--stream-base`'s
//! [`crate::model::stream`]), a replacement, or a base tensor plus its updates. Nothing is
//! computed until a tensor is asked for ([`MergedModel::tensor`]) or written
//! ([`MergedModel::write_safetensors`]); an update's `ΔW` is kept as its low-rank factors
//! until then ([`crate::tuners::Delta`]). So a merge of a memory-mapped base holds about one
//! tensor's values at a time, plus the adapter.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::MergeReport;
use crate::model::stream::{Held, StreamedWeight};
use crate::ops::product::Values;
use crate::ops::{ComputeDtype, FrozenWeight};
use crate::quant::{bnb_format, QuantMatrix, RoundTripError};
use crate::tuners::Update;
use crate::util::atomic::{raw_tensor, write_safetensors_streamed, HeaderEntry, RawTensor};

/// Where one tensor of the merged model comes from.
enum Part {
    /// The base's tensor, unchanged.
    Base(FrozenWeight),
    /// A trained copy that replaces the base's (`modules_to_save`, LN tuning).
    Replaced(Tensor),
    /// A base (or replaced) tensor with `updates` applied in order.
    Updated {
        base: FrozenWeight,
        updates: Vec<Update>,
    },
}

/// The tensors of a merged model, each made when it is read or written.
pub struct MergedModel {
    parts: BTreeMap<String, Part>,
    config: Value,
    /// Write bitsandbytes-quantized base weights back in their layout (merged ones
    /// requantized) rather than dequantized.
    keep_quantized: bool,
    report: MergeReport,
    /// The largest requantization error of the merged weights made so far.
    requantize_error: Mutex<Option<RoundTripError>>,
}

impl MergedModel {
    /// The merged model's tensors under the given names, with its `config.json`; `keep_quantized`
    /// as [`super::MergeOptions::dequantize`]'s opposite. Each update's shape is checked
    /// against its tensor's here, so that a mismatch is an error before anything is written.
    pub(super) fn new(
        base: Vec<(String, FrozenWeight)>,
        replaced: Vec<(String, Tensor)>,
        updates: Vec<(String, Update)>,
        config: Value,
        keep_quantized: bool,
    ) -> Result<Self> {
        let mut parts: BTreeMap<String, Part> =
            base.into_iter().map(|(k, w)| (k, Part::Base(w))).collect();
        let mut report = MergeReport {
            merged_modules: 0,
            replaced_tensors: 0,
            tensors_written: 0,
            requantized: 0,
            requantize_error: None,
        };
        for (name, t) in replaced {
            crate::util::finite::ensure_finite(
                &t,
                || format!("the adapter's replacement for {name}"),
                "the adapter holds a non-finite value; nothing was written",
            )?;
            parts.insert(name, Part::Replaced(t));
            report.replaced_tensors += 1;
        }
        for (name, update) in updates {
            let part = parts
                .remove(&name)
                .with_context(|| format!("internal: no tensor {name:?} to update"))?;
            let (base, mut list) = match part {
                Part::Base(w) => (w, vec![]),
                Part::Replaced(t) => (FrozenWeight::Dense(t), vec![]),
                Part::Updated { base, updates } => (base, updates),
            };
            check_fits(&name, &base_dims(&base), &update)?;
            list.push(update);
            parts.insert(
                name,
                Part::Updated {
                    base,
                    updates: list,
                },
            );
            report.merged_modules += 1;
        }
        report.requantized = parts
            .values()
            .filter(|p| match p {
                Part::Updated { base, .. } => keeps(base, keep_quantized).is_some(),
                _ => false,
            })
            .count();
        report.tensors_written = parts.len();
        Ok(Self {
            parts,
            config,
            keep_quantized,
            report,
            requantize_error: Mutex::new(None),
        })
    }

    /// The merged model's `config.json`.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// What the merge changes; the requantization error covers the tensors made so far (all
    /// of them once the model is written).
    pub fn report(&self) -> MergeReport {
        let mut r = self.report.clone();
        r.requantize_error = *self.requantize_error.lock().unwrap();
        r
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.parts.keys()
    }

    /// Whether the model has a tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.parts.contains_key(name)
    }

    /// The shape of `name`.
    pub fn dims(&self, name: &str) -> Option<Vec<usize>> {
        Some(match self.parts.get(name)? {
            Part::Base(w) | Part::Updated { base: w, .. } => base_dims(w),
            Part::Replaced(t) => t.dims().to_vec(),
        })
    }

    /// The merged tensor `name`, made now: dense in f32 (a base tensor held dense keeps its
    /// dtype), or quantized in the base's bitsandbytes format when that is kept (a merged one
    /// requantized, its rounding error recorded for [`MergedModel::report`]).
    pub fn tensor(&self, name: &str) -> Result<FrozenWeight> {
        let part = self
            .parts
            .get(name)
            .with_context(|| format!("merge: no tensor {name:?}"))?;
        let device = Device::Cpu;
        match part {
            Part::Replaced(t) => Ok(FrozenWeight::Dense(t.clone())),
            Part::Base(w @ FrozenWeight::Dense(_)) => Ok(w.clone()),
            Part::Base(w) if keeps(w, self.keep_quantized).is_some() => Ok(w.clone()),
            Part::Base(w) => Ok(FrozenWeight::Dense(w.to_dense(&device)?)),
            Part::Updated { base, updates } => {
                let mut merged = base.to_dense(&device)?;
                for update in updates {
                    merged = super::apply_update(name, merged, update)?;
                }
                crate::util::finite::ensure_finite(
                    &merged,
                    || format!("the merged weight {name}"),
                    "the adapter's update is not finite; nothing was written",
                )?;
                match keeps(base, self.keep_quantized) {
                    Some(q) => self.requantize(name, q.as_ref(), &merged),
                    None => Ok(FrozenWeight::Dense(merged)),
                }
            }
        }
    }

    /// `merged` requantized in `q`'s format, as peft's merge into `Linear4bit` /
    /// `Linear8bitLt` does; the rounding error it adds is recorded.
    fn requantize(&self, name: &str, q: &dyn QuantMatrix, merged: &Tensor) -> Result<FrozenWeight> {
        let exact: Vec<f32> = merged.flatten_all()?.to_vec1()?;
        let requantized = bnb_format::requantize(q, name, &exact)?;
        let err = RoundTripError::between(&exact, &requantized.dequantize());
        let mut worst = self.requantize_error.lock().unwrap();
        *worst = Some(worst.map_or(err, |e| e.worst(err)));
        Ok(FrozenWeight::Quantized(requantized, ComputeDtype::F32))
    }

    /// The tensors `name` is stored as: itself, or a quantized weight in bitsandbytes' layout
    /// (its codes and statistics).
    fn serialized(&self, name: &str) -> Result<BTreeMap<String, RawTensor>> {
        let mut out = BTreeMap::new();
        match &self.tensor(name)? {
            FrozenWeight::Dense(t) => {
                out.insert(name.to_string(), raw_tensor(name, t)?);
            }
            FrozenWeight::Quantized(q, _) => bnb_format::serialize(name, q.as_ref(), &mut out)?,
            FrozenWeight::Streamed(s, _) => {
                let _in_use = s.use_pages();
                let Held::Quantized(q) = s.held() else {
                    bail!("internal: {name:?} is a streamed dense matrix")
                };
                bnb_format::serialize(name, q.as_ref(), &mut out)?
            }
            FrozenWeight::Sharded(..) => {
                bail!("merge: {name:?} is sharded across ranks; merge runs in one process")
            }
        }
        Ok(out)
    }

    /// The header entry of `name` when its layout is known without making it (a dense
    /// tensor); `None` for a quantized one, whose statistics' sizes depend on its values.
    fn dense_entry(&self, name: &str) -> Option<HeaderEntry> {
        let dtype = match &self.parts[name] {
            Part::Replaced(t) | Part::Base(FrozenWeight::Dense(t)) => t.dtype(),
            Part::Base(w) | Part::Updated { base: w, .. } => {
                if keeps(w, self.keep_quantized).is_some() {
                    return None;
                }
                DType::F32
            }
        };
        Some(HeaderEntry::new(
            name,
            dtype.into(),
            self.dims(name).expect("a part"),
        ))
    }

    /// Writes the merged model as one safetensors file at `path` (atomically, with
    /// `metadata`), making each tensor as the file reaches it. A quantized tensor is made once
    /// first, for the sizes of its statistics (which are kept, being small), and again for its
    /// codes when they are written: its header must precede the data.
    pub fn write_safetensors(
        &self,
        path: &Path,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<()> {
        let mut entries = Vec::new();
        let mut owner = Vec::new();
        let mut kept: HashMap<String, Vec<u8>> = HashMap::new();
        for name in self.parts.keys() {
            if let Some(e) = self.dense_entry(name) {
                entries.push(e);
                owner.push(name.clone());
                continue;
            }
            for (key, raw) in self.serialized(name)? {
                entries.push(HeaderEntry::new(&key, raw.dtype, raw.shape.clone()));
                owner.push(name.clone());
                if &key != name {
                    kept.insert(key, raw.data);
                }
            }
        }
        write_safetensors_streamed(path, &entries, metadata, |i, out| {
            let key = &entries[i].name;
            if let Some(bytes) = kept.remove(key) {
                return Ok(out.write_all(&bytes)?);
            }
            self.write_tensor(&owner[i], key, out)
        })?;
        self.warn_requantized();
        Ok(())
    }

    /// Writes `key`'s bytes, `key` being `name` or one of its quantization statistics.
    fn write_tensor(&self, name: &str, key: &str, out: &mut dyn Write) -> Result<()> {
        match self.parts.get(name) {
            Some(Part::Base(FrozenWeight::Streamed(s, _)))
                if matches!(s.held(), Held::Dense { .. }) =>
            {
                write_streamed_f32(s, out)
            }
            Some(_) if self.dense_entry(name).is_some() => match self.tensor(name)? {
                FrozenWeight::Dense(t) => crate::util::atomic::write_tensor(name, &t, out),
                _ => bail!("internal: {name:?} planned dense, made otherwise"),
            },
            _ => {
                let mut made = self.serialized(name)?;
                let raw = made
                    .remove(key)
                    .with_context(|| format!("internal: {key:?} not made"))?;
                Ok(out.write_all(&raw.data)?)
            }
        }
    }

    /// peft's warning for a merge into quantized weights, with the measured error.
    pub(super) fn warn_requantized(&self) {
        if let Some(e) = *self.requantize_error.lock().unwrap() {
            tracing::warn!(
                "Merge lora module to a quantized linear may get different generations due to rounding errors: requantizing {} merged weight(s) added max |error| {:.3e} ({:.2e} of the largest weight)",
                self.report.requantized, e.max_abs, e.rel
            );
        }
    }
}

/// The quantized matrix of `w` when it is written back in bitsandbytes' layout.
pub(super) fn keeps(
    w: &FrozenWeight,
    keep_quantized: bool,
) -> Option<std::sync::Arc<dyn QuantMatrix>> {
    let q = match w {
        FrozenWeight::Quantized(q, _) => q.clone(),
        FrozenWeight::Streamed(s, _) => match s.held() {
            Held::Quantized(q) => q.clone(),
            Held::Dense { .. } => return None,
        },
        FrozenWeight::Dense(_) | FrozenWeight::Sharded(..) => return None,
    };
    (keep_quantized && bnb_format::has_layout(q.as_ref())).then_some(q)
}

fn base_dims(w: &FrozenWeight) -> Vec<usize> {
    match w {
        FrozenWeight::Dense(t) => t.dims().to_vec(),
        FrozenWeight::Quantized(q, _) => vec![q.dims().0, q.dims().1],
        FrozenWeight::Sharded(s, _) => vec![s.dims().0, s.dims().1],
        FrozenWeight::Streamed(s, _) => vec![s.dims().0, s.dims().1],
    }
}

/// Errors naming `name` unless `update` fits a tensor of shape `dims`.
fn check_fits(name: &str, dims: &[usize], update: &Update) -> Result<()> {
    let fits = match update {
        // Broadcasting, right-aligned: each axis of `s` is 1 or the tensor's.
        Update::Scale(s) => {
            s.rank() <= dims.len()
                && s.dims()
                    .iter()
                    .rev()
                    .zip(dims.iter().rev())
                    .all(|(&a, &d)| a == 1 || a == d)
        }
        _ => update.dims() == dims,
    };
    if !fits {
        bail!(
            "merge: {name:?} has shape {dims:?} but the adapter's update has {:?}",
            update.dims()
        )
    }
    Ok(())
}

/// A streamed dense matrix's values as f32 bytes: straight from the mapping when the file
/// holds f32, else converted as the in-memory load converts them; its pages dropped after.
fn write_streamed_f32(s: &StreamedWeight, out: &mut dyn Write) -> Result<()> {
    let _in_use = s.use_pages();
    s.with_dense(ComputeDtype::F32, |values| match values {
        Values::F32(v) => out
            .write_all(bytemuck::cast_slice(v))
            .map_err(candle_core::Error::wrap),
        Values::Bf16(_) => candle_core::bail!("internal: f32 asked, bf16 given"),
    })?;
    Ok(())
}
