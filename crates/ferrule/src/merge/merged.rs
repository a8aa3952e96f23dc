//! A merged model made one tensor at a time.
//!
//! [`MergedModel`] records, for every tensor of the merged model, where it comes from: the
//! base's own (held in memory, quantized, or memory-mapped with `--stream-base`'s
//! [`crate::model::stream`]), a replacement, or a base tensor plus its updates. Nothing is
//! computed until a tensor is asked for ([`MergedModel::tensor`]) or written
//! ([`MergedModel::write_safetensors`], in [`write`]); an update's `ΔW` is kept as its low-rank
//! factors until then ([`crate::tuners::Delta`]). So a merge of a memory-mapped base holds
//! about one tensor's values at a time, plus the adapter.
//!
//! With a quantization spec ([`super::MergeOptions::quantize`]), the base's dense linear
//! weights are quantized as they are made, as loading with `--quantize` holds them, so a
//! memory-mapped dense base is written quantized one tensor at a time: `ferrule quantize` is
//! this model with no update ([`MergedModel::quantized`]).

mod write;

use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::MergeReport;
use crate::model::stream::Held;
use crate::ops::product::Values;
use crate::ops::{ComputeDtype, FrozenWeight};
use crate::quant::{
    bnb_format, ErrorMeter, QuantMatrix, QuantSpec, RoundTripError, Statistics, Target,
    WeightMemory,
};
use crate::tuners::Update;
use crate::util::atomic::{raw_tensor, RawTensor};

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
    /// Quantize the base's dense linear weights (and keep its embedding and head in bf16) as
    /// they are made, as `--quantize` does while loading.
    quantize: Option<QuantSpec>,
    report: MergeReport,
    /// The largest requantization error of the merged weights made so far.
    requantize_error: Mutex<Option<RoundTripError>>,
    /// The zeros of each masked weight made so far ([`Update::Masked`]).
    pruned: Mutex<BTreeMap<String, super::Pruned>>,
    /// What `quantize` made so far: each tensor's format, parameters and bytes, and the
    /// largest error it added.
    quantized: Mutex<BTreeMap<String, (String, usize, usize)>>,
    quantize_error: Mutex<Option<RoundTripError>>,
}

impl MergedModel {
    /// The merged model's tensors under the given names, with its `config.json`; `keep_quantized`
    /// as [`super::MergeOptions::dequantize`]'s opposite, `quantize` as
    /// [`super::MergeOptions::quantize`]. Each update's shape is checked against its tensor's
    /// here, so that a mismatch is an error before anything is written.
    pub(super) fn new(
        base: Vec<(String, FrozenWeight)>,
        replaced: Vec<(String, Tensor)>,
        updates: Vec<(String, Update)>,
        config: Value,
        keep_quantized: bool,
        quantize: Option<QuantSpec>,
    ) -> Result<Self> {
        let mut parts: BTreeMap<String, Part> =
            base.into_iter().map(|(k, w)| (k, Part::Base(w))).collect();
        let mut report = MergeReport {
            merged_modules: 0,
            replaced_tensors: 0,
            tensors_written: 0,
            requantized: 0,
            requantize_error: None,
            pruned: BTreeMap::new(),
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
        report.tensors_written = parts.len();
        let mut model = Self {
            parts,
            config,
            keep_quantized,
            quantize,
            report,
            requantize_error: Mutex::new(None),
            pruned: Mutex::new(BTreeMap::new()),
            quantized: Mutex::new(BTreeMap::new()),
            quantize_error: Mutex::new(None),
        };
        model.report.requantized = model
            .parts
            .iter()
            .filter(|(name, p)| match p {
                Part::Updated { base, .. } => model.target(name, base).is_some(),
                _ => false,
            })
            .count();
        Ok(model)
    }

    /// `source` as `ferrule quantize` writes it: its config with `spec`'s
    /// `quantization_config`, every dense linear weight quantized with `spec` and the
    /// embedding and head kept in bf16, each when it is written. A base already quantized (a
    /// bitsandbytes folder, a GGUF file) is an error naming it.
    pub fn quantized(source: &crate::model::ModelSource, spec: &QuantSpec) -> Result<Self> {
        let formats = crate::merge::BaseRecord::of(&source.weights, None).formats;
        if !formats.is_empty() {
            bail!(
                "{}: already quantized ({}); quantize reads a dense model folder (f32, f16 or bf16 safetensors)",
                source.location.display(),
                formats.join(", ")
            )
        }
        let mut config = source.config.clone();
        config["quantization_config"] = bnb_format::quantization_config(spec);
        // Integer tensors (BERT's `position_ids`) too, written as they are: merges leave them
        // out, the quantized folder keeps every tensor of the source.
        let mut base = source.weights.held();
        base.extend(
            source
                .weights
                .tensors()
                .into_iter()
                .filter(|(_, t)| !t.dtype().is_float())
                .map(|(k, t)| (k, FrozenWeight::Dense(t))),
        );
        let model = Self::new(base, vec![], vec![], config, true, Some(*spec))?;
        if model.parts.iter().all(|(n, w)| match w {
            Part::Base(w) => model.target(n, w).is_none(),
            _ => true,
        }) {
            bail!(
                "{}: no linear weights to quantize",
                source.location.display()
            )
        }
        Ok(model)
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
        r.pruned = self.pruned.lock().unwrap().clone();
        r
    }

    /// The largest error [`super::MergeOptions::quantize`] added to the tensors it quantized
    /// so far (against their dense values, merged where an update applies), or `None`.
    pub fn quantize_error(&self) -> Option<RoundTripError> {
        *self.quantize_error.lock().unwrap()
    }

    /// The weights as written (once the model is written): the tensors
    /// [`super::MergeOptions::quantize`] quantized in their formats, the rest dense in f32.
    pub fn weight_memory(&self) -> WeightMemory {
        let mut m = WeightMemory::default();
        let quantized = self.quantized.lock().unwrap();
        for (name, part) in &self.parts {
            if let Some((format, params, bytes)) = quantized.get(name) {
                m.add_compressed(format.clone(), *params, *bytes);
            } else if let Some(DType::F32 | DType::F16 | DType::BF16) = self.dense_dtype(name) {
                let elems = match part {
                    Part::Replaced(t) => t.elem_count(),
                    Part::Base(w) | Part::Updated { base: w, .. } => base_dims(w).iter().product(),
                };
                m.dense_params += elems;
                m.dense_bytes += elems * 4;
            }
        }
        m
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

    /// The learned codes of `name` when its only update is a learned quantization
    /// ([`Update::Quantized`], L4Q), made now from its base weight; `None` for any other tensor.
    pub fn learned_codes(&self, name: &str) -> Result<Option<crate::tuners::GroupCodes>> {
        let Part::Updated { base, updates } = self.part(name)? else {
            return Ok(None);
        };
        let [Update::Quantized(q)] = updates.as_slice() else {
            if updates.iter().any(|u| matches!(u, Update::Quantized(_))) {
                bail!("merge: {name:?} has a learned quantization and other updates on top of it; its codes cannot be written as learned")
            }
            return Ok(None);
        };
        let w = self.held(name, base)?.to_dense(&Device::Cpu)?;
        Ok(Some(q.quantized(&w)?))
    }

    /// The merged tensor `name`, made now: dense in f32 (a base tensor held dense keeps its
    /// dtype), or quantized in the base's bitsandbytes format when that is kept (a merged one
    /// requantized, its rounding error recorded for [`MergedModel::report`]); with a
    /// quantization spec, the base's linear weights quantized first.
    pub fn tensor(&self, name: &str) -> Result<FrozenWeight> {
        let device = Device::Cpu;
        match self.part(name)? {
            Part::Replaced(t) => Ok(FrozenWeight::Dense(t.clone())),
            Part::Base(w) => match self.held(name, w)? {
                w @ FrozenWeight::Dense(_) => Ok(w),
                w if keeps(&w, self.keep_quantized).is_some() => Ok(w),
                w => Ok(FrozenWeight::Dense(w.to_dense(&device)?)),
            },
            Part::Updated { base, .. } => {
                let merged = self.merged(name)?;
                match self.target(name, base) {
                    Some(target) => self.requantize(name, target, &merged),
                    None => Ok(FrozenWeight::Dense(merged)),
                }
            }
        }
    }

    fn part(&self, name: &str) -> Result<&Part> {
        self.parts
            .get(name)
            .with_context(|| format!("merge: no tensor {name:?}"))
    }

    /// The updated tensor `name`, dense in f32: its base (as held, quantized first with a
    /// quantization spec) plus its updates, checked finite.
    fn merged(&self, name: &str) -> Result<Tensor> {
        let Part::Updated { base, updates } = self.part(name)? else {
            bail!("internal: {name:?} has no update")
        };
        let mut merged = self.held(name, base)?.to_dense(&Device::Cpu)?;
        for update in updates {
            merged = super::apply_update(name, merged, update)?;
        }
        crate::util::finite::ensure_finite(
            &merged,
            || format!("the merged weight {name}"),
            "the adapter's update is not finite; nothing was written",
        )?;
        if updates.iter().any(|u| matches!(u, Update::Masked(_))) {
            let pruned = super::Pruned::of(&merged)?;
            self.pruned.lock().unwrap().insert(name.to_string(), pruned);
        }
        Ok(merged)
    }

    /// The format the quantization spec gives the base weight `w` of `name`: its linear
    /// weights quantized, its embedding and head in bf16; `None` for anything else, and for
    /// weights already held quantized.
    fn spec_target(&self, name: &str, w: &FrozenWeight) -> Option<Target> {
        let spec = self.quantize.as_ref()?;
        let dense = match w {
            FrozenWeight::Dense(t) => t.dtype().is_float(),
            FrozenWeight::Streamed(s, _) => matches!(s.held(), Held::Dense { .. }),
            FrozenWeight::Quantized(..) | FrozenWeight::Sharded(..) => false,
        };
        let dims = base_dims(w);
        if !dense {
            None
        } else if spec.wants(name, &dims) {
            Some(Target::Quantized(*spec))
        } else {
            QuantSpec::keeps_bf16(name, &dims).then_some(Target::Bf16)
        }
    }

    /// The bitsandbytes format `name` (of base `w`) is written in, if it is written quantized.
    fn target(&self, name: &str, w: &FrozenWeight) -> Option<Target> {
        if !self.keep_quantized {
            return None;
        }
        match keeps(w, true) {
            Some(q) => Target::of(q.as_ref()),
            None => self.spec_target(name, w),
        }
    }

    /// The base weight `w` of `name` as the merge holds it: quantized now when the
    /// quantization spec applies to it (its format, size and error recorded), else itself.
    fn held(&self, name: &str, w: &FrozenWeight) -> Result<FrozenWeight> {
        let Some(target) = self.spec_target(name, w) else {
            return Ok(w.clone());
        };
        let (rows, cols) = w.dims();
        let q = with_f32(w, |values| {
            let q = target.quantize(name, values, rows, cols)?;
            self.note_quantized(name, q.as_ref(), values);
            Ok(q)
        })?;
        Ok(FrozenWeight::Quantized(q, ComputeDtype::F32))
    }

    /// Records what quantizing `name` made: its format and size, and its error against
    /// `values` (dequantized a band of rows at a time).
    fn note_quantized(&self, name: &str, q: &dyn QuantMatrix, values: &[f32]) {
        let (rows, cols) = q.dims();
        let band = (1 << 16) / cols.max(1) + 1;
        let mut meter = ErrorMeter::default();
        let mut buf = vec![0f32; band.min(rows) * cols];
        for r0 in (0..rows).step_by(band) {
            let r1 = (r0 + band).min(rows);
            let out = &mut buf[..(r1 - r0) * cols];
            q.dequantize_rows(r0, r1, out);
            meter.add(&values[r0 * cols..r1 * cols], out);
        }
        self.note_error(name, q.format(), rows * cols, q.storage_bytes(), meter);
    }

    fn note_error(&self, name: &str, format: String, params: usize, bytes: usize, m: ErrorMeter) {
        let mut worst = self.quantize_error.lock().unwrap();
        *worst = Some(worst.map_or(m.error(), |e| e.worst(m.error())));
        self.quantized
            .lock()
            .unwrap()
            .insert(name.to_string(), (format, params, bytes));
    }

    /// `merged` requantized in its base's format `target`, as peft's merge into `Linear4bit` /
    /// `Linear8bitLt` does; the rounding error it adds is recorded.
    fn requantize(&self, name: &str, target: Target, merged: &Tensor) -> Result<FrozenWeight> {
        let exact: Vec<f32> = merged.flatten_all()?.to_vec1()?;
        let (rows, cols) = merged.dims2()?;
        let requantized = target.quantize(name, &exact, rows, cols)?;
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

    /// The bitsandbytes statistics of the quantized tensor `name` (all it writes but its
    /// codes), made without quantizing it: a kept base weight's own, or those of its values.
    fn statistics(&self, name: &str, target: Target) -> Result<Statistics> {
        let (rows, cols) = match self.part(name)? {
            Part::Base(w) => {
                if let Some(q) = keeps(w, self.keep_quantized) {
                    return Statistics::of(q.as_ref());
                }
                return with_f32(w, |v| {
                    let (rows, cols) = w.dims();
                    Statistics::compute(target, v, rows, cols)
                });
            }
            Part::Updated { base, .. } => base.dims(),
            Part::Replaced(_) => bail!("internal: {name:?} is a dense replacement"),
        };
        let merged: Vec<f32> = self.merged(name)?.flatten_all()?.to_vec1()?;
        Statistics::compute(target, &merged, rows, cols)
    }

    /// The bitsandbytes format `name` is written in, if it is written quantized.
    fn written(&self, name: &str) -> Option<Target> {
        match &self.parts[name] {
            Part::Replaced(_) => None,
            Part::Base(w) | Part::Updated { base: w, .. } => self.target(name, w),
        }
    }

    /// The dtype `name` is written in when it is written dense; `None` when it is written in
    /// a bitsandbytes layout.
    fn dense_dtype(&self, name: &str) -> Option<DType> {
        if self.written(name).is_some() {
            return None;
        }
        Some(match &self.parts[name] {
            Part::Replaced(t) => t.dtype(),
            Part::Base(w @ FrozenWeight::Dense(t)) if self.spec_target(name, w).is_none() => {
                t.dtype()
            }
            Part::Base(_) | Part::Updated { .. } => DType::F32,
        })
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

pub(super) fn base_dims(w: &FrozenWeight) -> Vec<usize> {
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

/// Calls `f` with `w`'s values in f32, row-major, in pieces of whole rows of about
/// `piece_bytes` of f32 each: a streamed matrix stored in bf16 or f16 is converted one piece at
/// a time (a 1B Llama's embedding would be 403 MB in f32 at once); anything else is
/// [`with_f32`] cut into pieces.
fn with_f32_pieces(
    w: &FrozenWeight,
    piece_bytes: usize,
    mut f: impl FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    let (rows, cols) = w.dims();
    let rows_per_piece = (piece_bytes / (4 * cols.max(1))).max(1);
    if let FrozenWeight::Streamed(s, _) = w {
        if let Held::Dense { dtype, .. } = s.held() {
            if *dtype != DType::F32 {
                let _in_use = s.use_pages();
                for r0 in (0..rows).step_by(rows_per_piece) {
                    f(&s.dense_row_block_f32(r0, (r0 + rows_per_piece).min(rows))?)?;
                }
                return Ok(());
            }
        }
    }
    with_f32(w, |values| {
        values
            .chunks(rows_per_piece * cols.max(1))
            .try_for_each(&mut f)
    })
}

/// Calls `f` with `w`'s values in f32, row-major: a streamed f32 matrix's mapped values
/// themselves (its pages dropped after), anything else converted or dequantized first.
fn with_f32<R>(w: &FrozenWeight, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    if let FrozenWeight::Streamed(s, _) = w {
        if let Held::Dense { .. } = s.held() {
            let _in_use = s.use_pages();
            return s.with_dense(ComputeDtype::F32, |values| match values {
                Values::F32(v) => Ok(f(v)),
                Values::Bf16(_) => candle_core::bail!("internal: f32 asked, bf16 given"),
            })?;
        }
    }
    let values: Vec<f32> = w.to_dense(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    f(&values)
}
