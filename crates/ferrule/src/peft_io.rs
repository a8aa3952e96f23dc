//! PEFT adapter folders, both ways: `adapter_config.json` + `adapter_model.safetensors`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{Map, Value};

use crate::model::Task;
use crate::tuners::{registry, AdapterConfig, BuildContext, Tuner};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The PEFT version whose format ferrule writes.
pub const PEFT_VERSION: &str = "0.18.0";

/// A saved adapter read back from disk.
pub struct SavedAdapter {
    pub dir: PathBuf,
    pub config: Value,
    pub tensors: HashMap<String, Tensor>,
}

impl SavedAdapter {
    pub fn peft_type(&self) -> &str {
        self.config
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    pub fn task(&self) -> Option<Task> {
        match self.config.get("task_type").and_then(Value::as_str)? {
            "CAUSAL_LM" => Some(Task::CausalLm),
            "SEQ_CLS" => Some(Task::SeqCls),
            "FEATURE_EXTRACTION" => Some(Task::FeatureExtraction),
            _ => None,
        }
    }

    /// Whether the adapter holds whole token tables that trainable token rows were trained on
    /// (`…base_layer.weight` of a `TRAINABLE_TOKENS` adapter or of one with
    /// `trainable_token_indices`): peft saves them when the embeddings were resized.
    pub fn holds_resized_tables(&self) -> bool {
        let options = self.config.as_object().cloned().unwrap_or_default();
        AdapterConfig::new(self.peft_type(), options).trains_token_rows()
            && self
                .tensors
                .keys()
                .any(|k| k.ends_with(".base_layer.weight"))
    }

    /// The adapter's config: `peft_type` and the method's keys.
    pub fn adapter_config(&self) -> Result<AdapterConfig> {
        let origin = self.dir.join(CONFIG_FILE).display().to_string();
        let mut options = self.config.as_object().cloned().unwrap_or_default();
        options.remove("peft_type");
        let cfg = AdapterConfig::new(self.peft_type(), options);
        cfg.check_keys(&origin, false)?;
        Ok(cfg)
    }

    /// Builds the tuner this adapter describes, holding its weights.
    pub fn into_tuner(self, seed: u64, device: &Device) -> Result<Box<dyn Tuner>> {
        let cfg = self.adapter_config()?;
        let origin = self.dir.join(CONFIG_FILE).display().to_string();
        registry::build(
            &cfg,
            BuildContext {
                seed,
                device,
                weights: Some(self.tensors),
                allow_unmatched: false,
                release_base: None,
            },
        )
        .with_context(|| origin)
    }
}

/// Reads an adapter folder (or `<dir>/<name>/` for a named adapter). Refuses pickles.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<SavedAdapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.exists() {
        bail!(
            "{}: no {CONFIG_FILE}; not a PEFT adapter folder",
            dir.display()
        )
    }
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let config: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
    let obj = config
        .as_object()
        .ok_or_else(|| anyhow!("{}: expected a JSON object", cfg_path.display()))?;
    match obj.get("peft_type") {
        None => bail!("{}: missing \"peft_type\"", cfg_path.display()),
        Some(Value::String(t)) => {
            registry::by_peft_type(t).with_context(|| cfg_path.display().to_string())?;
        }
        Some(v) => bail!(
            "{}: \"peft_type\" must be a string such as \"LORA\", got {v}",
            cfg_path.display()
        ),
    }
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.exists() {
        if dir.join("adapter_model.bin").exists() {
            bail!("{}: only adapter_model.bin found; it is a pickle, which ferrule never loads (it can run arbitrary code). Re-save the adapter with safe_serialization=True", dir.display())
        }
        bail!("{}: no {WEIGHTS_FILE}", dir.display())
    }
    let tensors = crate::model::weights::load_safetensors_file(&weights, device)?;
    Ok(SavedAdapter {
        dir: dir.to_path_buf(),
        config,
        tensors,
    })
}

/// The adapters a folder holds, as `(name, folder)`, in PEFT's layouts:
/// - `DIR/adapter_config.json` alone: one adapter, named after the folder;
/// - subfolders `DIR/<name>/adapter_config.json` (what peft's `save_pretrained` writes for every
///   adapter not named "default"): one adapter each under its subfolder's name, sorted, and the
///   root's adapter, if any, as `"default"` (where peft writes that one).
///
/// `checkpoint-*` subfolders (ferrule's and the HF Trainer's checkpoints in a run folder) and
/// hidden ones are not adapters of the folder: name one by its own path. A folder with neither is an error.
pub fn find_adapters(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !dir.is_dir() {
        bail!("{}: no such adapter folder", dir.display())
    }
    if dir.join(crate::tuners::conpet::set::MANIFEST).is_file() {
        bail!(
            "{}: a ConPET task set, which runs only as a whole (`ferrule eval --adapter {}`: the selector routes each record); to use one expert alone name its folder, e.g. {}",
            dir.display(),
            dir.display(),
            dir.join(crate::tuners::conpet::set::task_dir(1)).display()
        )
    }
    let mut subs = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for e in entries {
        let path = e
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if path.join(CONFIG_FILE).is_file() && !is_checkpoint_name(&name) {
            subs.push((name, path));
        }
    }
    subs.sort();
    let root = dir.join(CONFIG_FILE).is_file();
    if subs.is_empty() {
        if !root {
            bail!(
                "{}: no {CONFIG_FILE} in the folder or its subfolders; not a PEFT adapter folder",
                dir.display()
            )
        }
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "default".into());
        return Ok(vec![(name, dir.to_path_buf())]);
    }
    if root {
        subs.insert(0, ("default".to_string(), dir.to_path_buf()));
    }
    Ok(subs)
}

/// `checkpoint-*` (checkpoints, complete or being written) and hidden folders.
fn is_checkpoint_name(name: &str) -> bool {
    name.starts_with("checkpoint-") || name.starts_with('.')
}

/// Writes `tuner` as a PEFT adapter folder. Each file is written to a temporary name,
/// synced and renamed, so an interrupted save never leaves a half-written adapter.
pub fn save_adapter(dir: &Path, tuner: &dyn Tuner, task: Task, base_model: &str) -> Result<()> {
    let form = AdapterFiles {
        peft_type: tuner.saved_method().peft_type.to_string(),
        config: tuner.config_json()?,
        tensors: tuner.saved_tensors()?,
    };
    write_adapter(dir, form, task, base_model)
}

/// `tuner` at its current rank as a plain PEFT LoRA folder ([`Tuner::plain_lora`]: DyLoRA at
/// a chosen rank), written as [`save_adapter`] writes. A method without that form is an error
/// naming it.
pub fn save_plain_lora(dir: &Path, tuner: &dyn Tuner, task: Task, base_model: &str) -> Result<()> {
    let Some(crate::tuners::PlainLora { config, tensors }) = tuner.plain_lora()? else {
        bail!(
            "a {} adapter has no plain LoRA form to export; `export lora` converts DyLoRA adapters (LoRA adapters are plain LoRA already)",
            tuner.method().peft_type
        )
    };
    let form = AdapterFiles {
        peft_type: config.peft_type,
        config: Value::Object(config.options),
        tensors,
    };
    write_adapter(dir, form, task, base_model)
}

/// What an adapter folder holds: its `peft_type`, the method's config keys and its tensors.
struct AdapterFiles {
    peft_type: String,
    config: Value,
    tensors: Vec<(String, Tensor)>,
}

fn write_adapter(dir: &Path, form: AdapterFiles, task: Task, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cfg = match form.config {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    cfg.insert("peft_type".into(), Value::from(form.peft_type));
    cfg.insert("task_type".into(), Value::from(task.peft_name()));
    cfg.insert("base_model_name_or_path".into(), Value::from(base_model));
    cfg.insert("revision".into(), Value::Null);
    cfg.insert("inference_mode".into(), Value::Bool(true));
    cfg.insert("peft_version".into(), Value::from(PEFT_VERSION));
    // PEFT writes sorted keys with indent 2.
    let sorted: BTreeMap<String, Value> = cfg.into_iter().collect();
    let json = serde_json::to_string_pretty(&sorted)? + "\n";
    write_safetensors(&dir.join(WEIGHTS_FILE), &form.tensors, &[("format", "pt")])?;
    crate::util::atomic::write_bytes_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
    Ok(())
}

/// Writes named tensors as safetensors (atomically) with string metadata.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &[(&str, &str)],
) -> Result<()> {
    let meta: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    crate::util::atomic::save_safetensors_atomic(path, tensors, Some(meta))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
