//! An adapter's configuration independent of its method: PEFT's `peft_type` and the method's
//! own keys, as `adapter_config.json` and the `[adapter]` table of a training config hold them.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::registry::{self, Method};
use crate::model::Task;

/// Keys of `adapter_config.json` that belong to PEFT's base config, not to a method.
pub const COMMON_KEYS: &[&str] = &[
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
];

/// PEFT options whose default values carry no meaning for the methods ferrule runs.
const IGNORABLE_KEYS: &[&str] = &[
    "megatron_core",
    "megatron_config",
    "runtime_config",
    "qalora_group_size",
    "use_qalora",
    "ensure_weight_tying",
];

/// `peft_type` plus the method's keys (PEFT's names and JSON values).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// PEFT's `peft_type` (`LORA`, `IA3`, `LN_TUNING`, ...).
    pub peft_type: String,
    #[serde(flatten)]
    pub options: Map<String, Value>,
}

/// null, false, "", [], {} or an object of such values: an option left at its default.
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_unset),
        _ => false,
    }
}

impl AdapterConfig {
    pub fn new(peft_type: &str, options: Map<String, Value>) -> Self {
        Self {
            peft_type: peft_type.to_string(),
            options,
        }
    }

    /// From one JSON object holding `peft_type` and the method's keys, as
    /// `adapter_config.json` has them.
    pub fn from_json(v: Value) -> Result<Self> {
        serde_json::from_value(v)
            .context("adapter config: expected an object with a \"peft_type\" string")
    }

    /// The registered method of `peft_type`; an unsupported one is an error naming it.
    pub fn method(&self) -> Result<&'static Method> {
        registry::by_peft_type(&self.peft_type)
    }

    /// Whether the adapter trains rows of token tables: LoRA's `trainable_token_indices` or
    /// the standalone `TRAINABLE_TOKENS` method (what a resized embedding needs to train).
    pub fn trains_token_rows(&self) -> bool {
        self.peft_type == super::trainable_tokens::METHOD.peft_type
            || self
                .options
                .get("trainable_token_indices")
                .is_some_and(|v| !v.is_null())
    }

    /// The method's options as one JSON object (what its typed config deserializes from).
    pub fn options_json(&self) -> Value {
        Value::Object(self.options.clone())
    }

    /// The options as the method's typed config `T`. A value of the wrong type is an error
    /// naming `method`, the key, the value found and what was expected, e.g.
    /// `lora: "r" is -1: invalid value: integer `-1`, expected usize`.
    pub fn typed<T: serde::de::DeserializeOwned>(&self, method: &str) -> Result<T> {
        serde_path_to_error::deserialize(self.options_json()).map_err(|e| {
            let key = e
                .path()
                .iter()
                .next()
                .map(|s| s.to_string())
                .unwrap_or_default();
            let found = self.options.get(key.trim_matches('"')).map_or_else(
                || "missing".to_string(),
                |v| format!("is {}", crate::util::shown_value(v)),
            );
            anyhow::anyhow!(
                "{method}: {:?} {found}: {}",
                e.path().to_string(),
                e.inner()
            )
        })
    }

    /// Rejects keys the method does not have. `origin` names the file or table in the error.
    /// For a training config (`strict`) an unknown key is an error; for a saved adapter
    /// (PEFT writes every option it knows, mostly at defaults) a set unknown key is a warning.
    pub fn check_keys(&self, origin: &str, strict: bool) -> Result<()> {
        let method = self.method().with_context(|| origin.to_string())?;
        for (k, v) in &self.options {
            let known = method.keys.contains(&k.as_str()) || COMMON_KEYS.contains(&k.as_str());
            if known || (!strict && (IGNORABLE_KEYS.contains(&k.as_str()) || is_unset(v))) {
                continue;
            }
            if strict {
                bail!(
                    "{origin}: {k:?} is not a {} option; its options are: {}",
                    method.peft_type,
                    method.keys.join(", ")
                )
            }
            tracing::warn!(
                "{origin}: ignoring {k:?} = {v}, which ferrule does not implement for {}",
                method.peft_type
            );
        }
        Ok(())
    }

    /// Completes the config as PEFT would for a model of `model_type` trained for `task`: the
    /// method's default targets, and the classification head trained in full for SEQ_CLS.
    pub fn resolved(&self, model_type: &str, task: Task) -> Result<AdapterConfig> {
        let method = self.method()?;
        let mut out = self.clone();
        (method.complete)(&mut out.options, model_type)?;
        if task == Task::SeqCls && method.keys.contains(&"modules_to_save") {
            let list = out
                .options
                .entry("modules_to_save")
                .or_insert(Value::Array(vec![]));
            if list.is_null() {
                *list = Value::Array(vec![]);
            }
            let Value::Array(items) = list else {
                bail!("modules_to_save must be a list of module names, got {list}")
            };
            for head in ["classifier", "score"] {
                if !items.iter().any(|x| x.as_str() == Some(head)) {
                    items.push(Value::from(head));
                }
            }
        }
        Ok(out)
    }
}

/// Sets `target_modules` (and any other listed key) to PEFT's default for `model_type` when
/// the config leaves it unset; an unknown model type is an error naming the key.
pub fn default_list(
    options: &mut Map<String, Value>,
    key: &str,
    model_type: &str,
    defaults: fn(&str) -> Option<&'static [&'static str]>,
) -> Result<()> {
    if options.get(key).is_some_and(|v| !v.is_null()) {
        return Ok(());
    }
    match defaults(model_type) {
        Some(d) => {
            options.insert(
                key.to_string(),
                Value::from(d.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            );
            Ok(())
        }
        None => bail!("no default {key} for model type {model_type:?}; set {key}"),
    }
}

/// A float as JSON the way Python's `json` writes the number a user gave: `16` for an
/// integral value (PEFT's `lora_alpha: int`), `16.5` otherwise.
pub fn json_number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

/// serde `serialize_with` for [`json_number`].
pub fn serialize_number<S: serde::Serializer>(
    v: &f64,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&json_number(*v), s)
}

/// An α (LoRA's `lora_alpha`, RandLoRA's `randlora_alpha`) whose scale α/r or α/√r is a finite
/// f32 for every r ≥ 1: so |α| ≤ f32::MAX (3.4e38). peft accepts any float; a larger α makes
/// every adapted output infinite. `what` names the key in the error.
pub fn check_alpha(what: &str, alpha: f64) -> Result<()> {
    if !(alpha as f32).is_finite() {
        anyhow::bail!("{what} is {alpha:e}: expected a finite number of at most {:e} in magnitude (its scale α/r must be a finite f32)", f32::MAX)
    }
    Ok(())
}
