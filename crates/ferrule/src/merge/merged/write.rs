//! Writing a [`MergedModel`] as one safetensors file, one tensor at a time.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{with_f32, with_f32_pieces, MergedModel, Part};
use crate::model::stream::Held;
use crate::ops::FrozenWeight;
use crate::quant::{bnb_format, ErrorMeter, Target};
use crate::util::atomic::{write_safetensors_streamed, write_tensor, HeaderEntry, RawTensor};

/// The tensors of the quantized weight made last that are still to be written (its
/// statistics and tables beside its codes), by key; never its codes.
type Kept = Option<(String, BTreeMap<String, RawTensor>)>;

impl MergedModel {
    /// Writes the merged model as one safetensors file at `path` (atomically, with
    /// `metadata`), making each tensor as the file reaches it.
    ///
    /// The header comes first and needs every tensor's byte count. A dense tensor's follows
    /// from its shape, and so do a quantized weight's ([`bnb_format::entries`]), except with
    /// double quantization: its quant state's JSON prints the mean absmax, so that one
    /// statistic is computed first from a pass over the weight's values (a merged weight is
    /// made for it) and dropped. The data follows in safetensors' order, by dtype then name,
    /// so a quantized weight's f32 statistics come long before its 8-bit codes: they are made
    /// from one pass over its values ([`crate::quant::Statistics::compute`]) when the file
    /// reaches them, and the codes, with the weight's remaining tensors kept until written,
    /// when it reaches those. So about one tensor is held at a time.
    pub fn write_safetensors(
        &self,
        path: &Path,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<()> {
        let mut entries = Vec::new();
        let mut owner = Vec::new();
        for name in self.parts.keys() {
            for e in self.header_entries(name)? {
                entries.push(e);
                owner.push(name.as_str());
            }
        }
        let mut kept: Kept = None;
        write_safetensors_streamed(path, &entries, metadata, |i, out| {
            self.write_entry(owner[i], &entries[i].name, &mut kept, out)
        })?;
        self.warn_requantized();
        Ok(())
    }

    /// The header entries of `name`: one for a dense tensor, a quantized weight's codes and
    /// statistics otherwise.
    fn header_entries(&self, name: &str) -> Result<Vec<HeaderEntry>> {
        let dims = self.dims(name).context("internal: a listed tensor")?;
        let Some(target) = self.written(name) else {
            let dtype = self.dense_dtype(name).context("internal: a dense tensor")?;
            return Ok(vec![HeaderEntry::new(name, dtype.into(), dims)]);
        };
        let offset = match target.needs_offset() {
            true => self.statistics(name, target)?.offset(),
            false => None,
        };
        bnb_format::entries(name, target, dims[0], dims[1], offset)
    }

    /// Writes `key`'s bytes, `key` being `name` or one of its quantization statistics.
    fn write_entry(
        &self,
        name: &str,
        key: &str,
        kept: &mut Kept,
        out: &mut dyn Write,
    ) -> Result<()> {
        let part = &self.parts[name];
        let target = match (self.written(name), part) {
            (None, Part::Base(w @ FrozenWeight::Streamed(s, _)))
                if matches!(s.held(), Held::Dense { .. })
                    && self.spec_target(name, w).is_none() =>
            {
                // (With a quantization spec and --dequantize, it is dequant(Q(W)) instead.)
                // The file's f32 values (or their conversion) written as they are mapped.
                return with_f32(w, |v| Ok(out.write_all(bytemuck::cast_slice(v))?));
            }
            (None, _) => {
                return match self.tensor(name)? {
                    FrozenWeight::Dense(t) => write_tensor(name, &t, out),
                    _ => bail!("internal: {name:?} planned dense, made otherwise"),
                };
            }
            (Some(Target::Bf16), Part::Base(w)) => return self.write_bf16(name, w, out),
            (Some(target), _) => target,
        };
        if let Some((_, made)) = kept.as_mut().filter(|(owner, _)| owner == name) {
            if let Some(raw) = made.remove(key) {
                return Ok(out.write_all(&raw.data)?);
            }
        }
        let mut made = if key == name {
            self.serialized(name)?
        } else {
            let mut stats = BTreeMap::new();
            self.statistics(name, target)?.insert(name, &mut stats);
            stats
        };
        let raw = made
            .remove(key)
            .with_context(|| format!("internal: {key:?} not made"))?;
        out.write_all(&raw.data)?;
        *kept = Some((name.to_string(), made));
        Ok(())
    }

    /// Writes the base table `w` of `name` rounded to bf16 and widened back to f32, as
    /// [`bnb_format::serialize`] writes a bf16 table, a slice at a time (an embedding is the
    /// largest tensor: no bf16 copy of it is made).
    fn write_bf16(&self, name: &str, w: &FrozenWeight, out: &mut dyn Write) -> Result<()> {
        let (rows, cols) = w.dims();
        let quantized_now = self.spec_target(name, w).is_some();
        let mut meter = ErrorMeter::default();
        let mut widened = Vec::new();
        let mut done = 0;
        with_f32_pieces(w, 4 << 20, |piece| {
            crate::quant::check_finite_from(name, piece, done)?;
            widened.clear();
            widened.extend(piece.iter().map(|&v| half::bf16::from_f32(v).to_f32()));
            meter.add(piece, &widened);
            out.write_all(bytemuck::cast_slice(&widened))?;
            done += piece.len();
            Ok(())
        })?;
        if quantized_now {
            // As `Bf16Rows` counts itself: format "bf16", two bytes a value.
            self.note_error(name, "bf16".into(), rows * cols, 2 * rows * cols, meter);
        }
        Ok(())
    }
}
