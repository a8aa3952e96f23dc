//! A base model with an optional saved adapter attached: what `eval`, `generate`, `logits`,
//! `merge` and `inspect` work on.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::model::{family_of, Family, Frozen, Model, ModelHook, ModelSource, Task};
use crate::peft_io::load_adapter;
use crate::quant::QuantSpec;
use crate::tuners::Tuner;

pub struct AdaptedModel {
    pub source: ModelSource,
    pub model: Model,
    pub tuner: Option<Box<dyn Tuner>>,
}

/// The task a model is run for when nobody says: the adapter's `task_type`, else causal
/// LM for decoders and feature extraction for encoders.
pub fn default_task(source: &ModelSource) -> Result<Task> {
    Ok(match family_of(&source.config)? {
        Family::Decoder => Task::CausalLm,
        Family::Bert => Task::FeatureExtraction,
    })
}

impl AdaptedModel {
    pub fn load(model: &str, adapter: Option<&Path>, task: Option<Task>, device: &Device) -> Result<Self> {
        Self::load_with(model, adapter, task, device, None)
    }

    /// [`AdaptedModel::load`] with the base's linear layers quantized while loading (the same
    /// `--quantize` an adapter was trained with).
    pub fn load_with(model: &str, adapter: Option<&Path>, task: Option<Task>, device: &Device, quantize: Option<&QuantSpec>) -> Result<Self> {
        let mut source = ModelSource::load_with(model, device, quantize)?;
        let saved = adapter.map(|a| load_adapter(a, device)).transpose()?;
        let task = match (task, saved.as_ref().and_then(|s| s.task())) {
            (Some(t), _) => t,
            (None, Some(t)) => t,
            (None, None) => default_task(&source)?,
        };
        // A classification head saved with the adapter decides the number of labels.
        if let Some(s) = &saved {
            if let Some(w) = s.tensors.get("base_model.model.classifier.weight") {
                source.config["num_labels"] = serde_json::json!(w.dim(0)?);
                if let Some(o) = source.config.as_object_mut() {
                    o.remove("id2label");
                }
            }
        }
        let tuner = match saved {
            Some(s) => {
                let dir = s.dir.clone();
                Some(s.into_tuner(0, device).with_context(|| format!("loading adapter {}", dir.display()))?)
            }
            None => None,
        };
        let hook: &dyn ModelHook = match &tuner {
            Some(t) => t.as_ref(),
            None => &Frozen,
        };
        let model = Model::build(&source, task, hook, device, 0)?;
        if let Some(t) = &tuner {
            t.finish().with_context(|| format!("adapter {} does not fit {}", adapter.unwrap().display(), model_name(&source)))?;
        }
        Ok(Self { source, model, tuner })
    }

    pub fn trainable_params(&self) -> usize {
        self.tuner.as_deref().map_or(0, crate::tuners::trainable_params)
    }
}

fn model_name(s: &ModelSource) -> String {
    s.location.display().to_string()
}
