//! Loading a model's tensors from a Hugging Face folder (single or sharded safetensors).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// Named tensors of a checkpoint, with the place they came from (for error messages).
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    source: PathBuf,
    /// Names a model has read, so it can count its parameters and spot unused tensors.
    used: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, source: impl Into<PathBuf>) -> Self {
        Self { tensors, source: source.into(), used: Default::default() }
    }

    /// Reads `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    /// Floating tensors are converted to `dtype`. A legacy `pytorch_model.bin` is refused:
    /// it is a pickle and loading it would run arbitrary code.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index.display()))?;
            let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| anyhow!("{}: no \"weight_map\" object", index.display()))?;
            let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if dir.join("pytorch_model.bin").exists() {
            bail!("{}: only pytorch_model.bin found; it is a pickle, which ferrule never loads. Convert it to safetensors first", dir.display())
        } else {
            bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
        };
        let mut tensors = HashMap::new();
        for f in &files {
            for (name, t) in load_safetensors_file(f, device)? {
                let t = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t };
                tensors.insert(name, t);
            }
        }
        Ok(Self::new(tensors, dir))
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, checked against the expected shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| anyhow!("{}: missing tensor {name:?}", self.source.display()))?;
        if t.dims() != shape {
            bail!("{}: tensor {name:?} has shape {:?}, expected {:?}", self.source.display(), t.dims(), shape)
        }
        self.used.lock().unwrap().insert(name.to_string());
        Ok(t.clone())
    }

    /// The first of `names` that exists (checkpoints differ in prefixes, e.g. `bert.`).
    pub fn get_any(&self, names: &[String], shape: &[usize]) -> Result<Tensor> {
        for n in names {
            if self.contains(n) {
                return self.get(n, shape);
            }
        }
        Err(anyhow!("{}: missing tensor {:?}", self.source.display(), names.first().map(String::as_str).unwrap_or("")))
    }

    /// Total elements of the distinct tensors read so far (a tied head counts once).
    pub fn used_elements(&self) -> usize {
        self.used.lock().unwrap().iter().filter_map(|n| self.tensors.get(n)).map(|t| t.elem_count()).sum()
    }

    /// Floating-point tensors in the checkpoint that no layer read.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        let mut v: Vec<String> = self.tensors.iter().filter(|(n, t)| t.dtype().is_float() && !used.contains(*n)).map(|(n, _)| n.clone()).collect();
        v.sort();
        v
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        self.tensors
    }
}

/// Reads one safetensors file with a clear error for a missing, truncated or corrupt file.
pub fn load_safetensors_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device).with_context(|| format!("{}: tensor {name:?}", path.display()))?;
        out.insert(name.to_string(), t);
    }
    Ok(out)
}
