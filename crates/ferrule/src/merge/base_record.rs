//! What base an adapter was trained on, as far as merging it needs to know: the formats its
//! frozen weights were held in. An adapter trained on a quantized base (QLoRA) learned the
//! update for the *dequantized* weights; added to the original dense weights it gives another
//! model (issue 25 measured 0.82 apart in the logits on SmolLM2-135M with NF4). peft records
//! nothing of this (its `adapter_config.json` has no key for it), so ferrule writes it beside
//! the adapter as [`FILE`], which peft passes over. Only a quantized base is recorded: an
//! adapter trained on a dense base is the two PEFT files alone, byte for byte as before.

use std::path::Path;

use anyhow::{Context, Result};

use crate::model::Weights;
use crate::quant::QuantSpec;

/// The file in an adapter folder that records a quantized training base.
pub const FILE: &str = "ferrule_base.json";

/// How the frozen base was held while an adapter trained.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseRecord {
    /// Formats of its compressed matrices, sorted and unique (`bf16`,
    /// `nf4 (blocksize 64, double quant)`, `Q4_1`, ...); empty for a dense base.
    pub formats: Vec<String>,
    /// The flags that quantized it while loading (`--quantize nf4 --double-quant`), if any.
    #[serde(rename = "quantize", skip_serializing_if = "Option::is_none", default)]
    pub quantize_flags: Option<String>,
}

impl BaseRecord {
    /// The record of a base held as `weights`, quantized while loading with `quantize`.
    pub fn of(weights: &Weights, quantize: Option<&QuantSpec>) -> Self {
        let mut formats: Vec<String> = weights
            .quantized()
            .values()
            .map(|q| q.format())
            .chain(
                weights
                    .sharded()
                    .values()
                    .map(|s| s.format().to_string())
                    .filter(|f| f != "f32"),
            )
            .collect();
        formats.sort();
        formats.dedup();
        Self {
            formats,
            quantize_flags: quantize.map(QuantSpec::flags),
        }
    }

    /// The record of the dense base `weights` as loading it with `--quantize` (`spec`) holds
    /// it, without quantizing anything: the formats [`QuantSpec::wants`] and
    /// [`QuantSpec::keeps_bf16`] give its matrices, as the loader chooses them. A merge that
    /// quantizes while it writes (`MergeOptions::quantize`) checks the adapter against it.
    pub fn planned(weights: &Weights, spec: &QuantSpec) -> Self {
        let mut formats: Vec<String> = weights
            .held()
            .iter()
            .filter_map(|(name, w)| {
                let dims = super::merged::base_dims(w);
                if spec.wants(name, &dims) {
                    Some(spec.format())
                } else {
                    QuantSpec::keeps_bf16(name, &dims).then(|| "bf16".to_string())
                }
            })
            .collect();
        formats.sort();
        formats.dedup();
        Self {
            formats,
            quantize_flags: Some(spec.flags()),
        }
    }

    /// Whether the base held any compressed weight.
    pub fn is_quantized(&self) -> bool {
        !self.formats.is_empty()
    }

    /// Writes the record into the adapter folder `dir` when the base was quantized (and
    /// removes a stale one otherwise).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(FILE);
        if !self.is_quantized() {
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
            return Ok(());
        }
        let json = serde_json::to_string_pretty(self)? + "\n";
        crate::util::atomic::write_bytes_atomic(&path, json.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The record saved in the adapter folder `dir`, or `None` when it holds none (a dense
    /// training base, an adapter from peft, or from a ferrule before it recorded this).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let record = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected {{\"formats\": [strings], \"quantize\": flags}}",
                path.display()
            )
        })?;
        Ok(Some(record))
    }

    /// A warning when an adapter trained on the base `self` describes is merged into (or, with
    /// `merging` false, run on) the base `base` held as `target`: a quantized training base
    /// replaced by a base held otherwise gives a model whose outputs differ from the trained
    /// one's. `None` when the bases agree, or the training base was dense.
    pub fn mismatch_warning(
        &self,
        adapter: &Path,
        target: &BaseRecord,
        base: &str,
        merging: bool,
    ) -> Option<String> {
        if !self.is_quantized() || self.formats == target.formats {
            return None;
        }
        let held = if target.is_quantized() {
            format!("held as {}", target.formats.join(", "))
        } else {
            "dense".to_string()
        };
        let fix = match (&self.quantize_flags, merging) {
            (Some(flags), true) => format!(
                "merge into the base as it was trained: add {flags} --dequantize to write the \
                 dequantized base plus the update in f32, which is exactly the trained model, \
                 or {flags} alone to keep the base quantized (the merged weights are then \
                 requantized, as peft merges into a quantized layer, which adds rounding)"
            ),
            (Some(flags), false) => format!("add {flags} to run it as it was trained"),
            (None, _) => "use the quantized base it was trained on (the .gguf file or quantized \
                          folder its adapter_config.json names in base_model_name_or_path)"
                .to_string(),
        };
        Some(format!(
            "{} was trained on a quantized base ({}), but the base {base} is {held} here: the \
             update was learned for the quantized weights, so the outputs differ from the \
             trained model's; {fix}",
            adapter.display(),
            self.formats.join(", "),
        ))
    }

    /// Warns (through `tracing`) about each adapter of `adapters` (their folders) that was
    /// trained on a quantized base other than `source`'s as loaded with `quantize`.
    pub fn warn_if_run_elsewhere<'a>(
        adapters: impl IntoIterator<Item = &'a Path>,
        source: &crate::model::ModelSource,
        quantize: Option<&QuantSpec>,
    ) -> Result<()> {
        let target = Self::of(&source.weights, quantize);
        let base = source.location.display().to_string();
        for dir in adapters {
            if let Some(w) =
                Self::read(dir)?.and_then(|r| r.mismatch_warning(dir, &target, &base, false))
            {
                tracing::warn!("{w}");
            }
        }
        Ok(())
    }
}
