//! The models a merge reads, one tensor at a time.
//!
//! A plain safetensors folder is memory-mapped and each tensor decoded to f32 when the merge
//! reaches it, its file pages released right after: the process never holds a whole model.
//! Inputs mergekit cannot read are loaded through ferrule's own loaders and held in their
//! compact form: a GGUF file and a bitsandbytes (NF4/int8) folder stay quantized and each
//! tensor is dequantized when it is read. `base+adapter` (mergekit's spelling) is the base
//! with the PEFT adapter merged in ([`crate::merge::merged_tensors_with`]), held whole.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use serde_json::Value;

use super::config::OutDtype;
use crate::adapted::AdaptedModel;
use crate::model::weights::{checkpoint_files, decode_f32};
use crate::model::{LoadOptions, ModelSource};
use crate::ops::{ComputeDtype, FrozenWeight};

/// Where a mapped tensor lies.
struct MappedTensor {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

enum Tensors {
    Mapped {
        maps: Vec<(PathBuf, memmap2::Mmap)>,
        index: HashMap<String, MappedTensor>,
    },
    Loaded(BTreeMap<String, FrozenWeight>),
}

/// One input model: its config, where its tokenizer files are, and its tensors.
pub struct InputModel {
    /// As the YAML names it.
    pub spec: String,
    pub config: Value,
    /// The folder holding tokenizer files, if any.
    pub dir: Option<PathBuf>,
    /// For a GGUF file: its source, which carries the tokenizer.
    pub source: Option<ModelSource>,
    tensors: Tensors,
}

impl InputModel {
    /// Opens `spec`: a folder, a `.gguf` file or `folder+adapter`, each path found by
    /// `resolve`.
    pub fn open(spec: &str, resolve: &dyn Fn(&str) -> PathBuf) -> Result<Self> {
        if let Some((base, adapter)) = split_adapter(spec, resolve) {
            return Self::with_adapter(spec, &base, &adapter);
        }
        let path = &resolve(spec);
        let path_str = path.to_string_lossy().to_string();
        if path.is_file() {
            let source = ModelSource::load_with(&path_str, &Device::Cpu, LoadOptions::default())
                .with_context(|| format!("model {spec}"))?;
            return Ok(Self::loaded(spec, source, None));
        }
        if !path.is_dir() {
            bail!("model {spec}: no such folder or file ({})", path.display())
        }
        let cfg_path = path.join("config.json");
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("model {spec}: reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        if config.get("quantization_config").is_some() {
            let source = ModelSource::load_with(&path_str, &Device::Cpu, LoadOptions::default())
                .with_context(|| format!("model {spec}"))?;
            return Ok(Self::loaded(spec, source, Some(path.to_path_buf())));
        }
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (i, (file, _)) in checkpoint_files(path)
            .with_context(|| format!("model {spec}"))?
            .into_iter()
            .enumerate()
        {
            let f = std::fs::File::open(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // SAFETY: read-only map of an input we do not modify while it is mapped.
            let mmap = unsafe { memmap2::Mmap::map(&f) }
                .with_context(|| format!("mapping {}", file.display()))?;
            let st = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", file.display()))?;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                index.insert(
                    name,
                    MappedTensor {
                        file: i,
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        start,
                        end: start + view.data().len(),
                    },
                );
            }
            maps.push((file, mmap));
        }
        Ok(Self {
            spec: spec.to_string(),
            config,
            dir: Some(path.to_path_buf()),
            source: None,
            tensors: Tensors::Mapped { maps, index },
        })
    }

    fn loaded(spec: &str, source: ModelSource, dir: Option<PathBuf>) -> Self {
        let mut tensors = BTreeMap::new();
        for (k, t) in &source.weights.tensors() {
            if t.dtype().is_float() {
                tensors.insert(k.clone(), FrozenWeight::Dense(t.clone()));
            }
        }
        for (k, q) in source.weights.quantized() {
            tensors.insert(
                k.clone(),
                FrozenWeight::Quantized(q.clone(), ComputeDtype::F32),
            );
        }
        Self {
            spec: spec.to_string(),
            config: source.config.clone(),
            dir: dir.or_else(|| source.dir.clone()),
            source: Some(source),
            tensors: Tensors::Loaded(tensors),
        }
    }

    fn with_adapter(spec: &str, base: &Path, adapter: &Path) -> Result<Self> {
        let m = AdaptedModel::load_with(
            &base.to_string_lossy(),
            Some(adapter),
            None,
            &Device::Cpu,
            LoadOptions::default(),
        )
        .with_context(|| format!("model {spec}"))?;
        let tuner = m
            .tuner
            .as_deref()
            .with_context(|| format!("model {spec}: no adapter in {}", adapter.display()))?;
        let options = crate::merge::MergeOptions { dequantize: true };
        let (tensors, config, _) =
            crate::merge::merged_tensors_with(&m.source, tuner, m.model.task, options)
                .with_context(|| format!("model {spec}: merging the adapter"))?;
        let dir = m.source.dir.clone();
        Ok(Self {
            spec: spec.to_string(),
            config,
            dir,
            source: Some(m.source),
            tensors: Tensors::Loaded(tensors),
        })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.tensors {
            Tensors::Mapped { index, .. } => index.keys().cloned().collect(),
            Tensors::Loaded(t) => t.keys().cloned().collect(),
        };
        v.sort();
        v
    }

    /// The shape of `name`, if the model has it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.tensors {
            Tensors::Mapped { index, .. } => index.get(name).map(|t| t.shape.clone()),
            Tensors::Loaded(t) => t.get(name).map(|w| match w {
                FrozenWeight::Dense(t) => t.dims().to_vec(),
                FrozenWeight::Quantized(q, _) => vec![q.dims().0, q.dims().1],
                FrozenWeight::Sharded(s, _) => vec![s.dims().0, s.dims().1],
                FrozenWeight::Streamed(s, _) => vec![s.dims().0, s.dims().1],
            }),
        }
    }

    /// The dtype `name` is stored in, when it is a float type a merge writes.
    pub fn dtype(&self, name: &str) -> Option<OutDtype> {
        match &self.tensors {
            Tensors::Mapped { index, .. } => match index.get(name)?.dtype {
                safetensors::Dtype::F32 => Some(OutDtype::F32),
                safetensors::Dtype::BF16 => Some(OutDtype::Bf16),
                safetensors::Dtype::F16 => Some(OutDtype::F16),
                _ => None,
            },
            Tensors::Loaded(_) => Some(OutDtype::F32),
        }
    }

    /// Whether `name` is a float tensor (merged) rather than an integer one (refused).
    pub fn is_float(&self, name: &str) -> bool {
        match &self.tensors {
            Tensors::Mapped { index, .. } => index.get(name).is_some_and(|t| {
                matches!(
                    t.dtype,
                    safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16
                )
            }),
            Tensors::Loaded(t) => t.contains_key(name),
        }
    }

    /// `name`'s values in f32. A mapped tensor's file pages are released once decoded.
    pub fn read(&self, name: &str) -> Result<Vec<f32>> {
        match &self.tensors {
            Tensors::Mapped { maps, index } => {
                let t = index
                    .get(name)
                    .with_context(|| format!("model {}: no tensor {name:?}", self.spec))?;
                let (file, mmap) = &maps[t.file];
                let values = decode_f32(t.dtype, &mmap[t.start..t.end])
                    .with_context(|| format!("{}: tensor {name:?}", file.display()))?;
                crate::util::release_pages(mmap, t.start, t.end - t.start);
                Ok(values)
            }
            Tensors::Loaded(t) => {
                let w = t
                    .get(name)
                    .with_context(|| format!("model {}: no tensor {name:?}", self.spec))?;
                Ok(w.to_dense(&Device::Cpu)?.flatten_all()?.to_vec1()?)
            }
        }
    }

    /// Whether tensors are read from memory-mapped files, so that rows can be read alone.
    pub fn is_mapped(&self) -> bool {
        matches!(self.tensors, Tensors::Mapped { .. })
    }

    /// Rows `rows` (of the first axis) of `name` in f32, their file pages released once
    /// decoded; a loaded (quantized or adapted) tensor is decoded whole and sliced.
    pub fn read_rows(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let shape = self
            .shape(name)
            .with_context(|| format!("model {}: no tensor {name:?}", self.spec))?;
        let width: usize = shape.iter().skip(1).product();
        let Tensors::Mapped { maps, index } = &self.tensors else {
            let all = self.read(name)?;
            return Ok(all[rows.start * width..rows.end * width].to_vec());
        };
        let t = &index[name];
        let size = t.dtype.bitsize() / 8;
        let start = t.start + rows.start * width * size;
        let end = t.start + rows.end * width * size;
        if end > t.end {
            bail!("internal: rows {rows:?} of {name:?} outside its shape {shape:?}")
        }
        let (file, mmap) = &maps[t.file];
        let values = decode_f32(t.dtype, &mmap[start..end])
            .with_context(|| format!("{}: tensor {name:?}", file.display()))?;
        crate::util::release_pages(mmap, start, end - start);
        Ok(values)
    }

    /// The tokenizer's vocabulary (token → id, added tokens included).
    pub fn vocab(&self) -> Result<super::tokenizer::Vocab> {
        Ok(self.tokenizer()?.get_vocab(true))
    }

    /// The tokenizer (`tokenizer.json`, or a GGUF file's); the error names the file.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        if let Some(tok) = self.source.as_ref().and_then(|s| s.tokenizer.as_ref()) {
            return Ok(tok.clone());
        }
        match &self.dir {
            Some(d) => super::tokenizer::read_tokenizer(d, &self.spec),
            None => bail!(
                "model {}: no tokenizer to remap the vocabulary with",
                self.spec
            ),
        }
    }

    /// `vocab_size` in the config: the rows of its embedding, which tokens past it lack.
    pub fn vocab_size(&self) -> Option<usize> {
        self.config
            .get("vocab_size")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    }

    /// The number of decoder layers (`num_hidden_layers`), if the config says.
    pub fn num_layers(&self) -> Option<usize> {
        self.config
            .get("num_hidden_layers")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    }
}

/// `folder+adapter` as mergekit writes a LoRA applied to a model: split at the last `+` whose
/// right side is a folder holding `adapter_config.json` (a `+` may also be part of a name).
fn split_adapter(spec: &str, resolve: &dyn Fn(&str) -> PathBuf) -> Option<(PathBuf, PathBuf)> {
    spec.char_indices()
        .filter(|(_, c)| *c == '+')
        .find_map(|(i, _)| {
            let adapter = resolve(&spec[i + 1..]);
            adapter
                .join("adapter_config.json")
                .is_file()
                .then(|| (resolve(&spec[..i]), adapter))
        })
}
