//! The models a merge reads, one tensor at a time.
//!
//! A plain safetensors folder is memory-mapped and each tensor decoded to f32 when the merge
//! reaches it, its file pages released right after: the process never holds a whole model.
//! Inputs mergekit cannot read go through ferrule's own loaders: a bitsandbytes (NF4/FP4)
//! folder is memory-mapped as `--stream-base` maps it ([`crate::model::stream`]), each matrix
//! dequantized when it is read and its pages dropped after (int8 folders are held in memory);
//! a GGUF file is memory-mapped too, each tensor read from it and dequantized when it is
//! reached.
//! `base+adapter` (mergekit's spelling) is the base, mapped likewise, with the PEFT adapter
//! merged into each tensor as it is read ([`crate::merge::MergedModel`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use serde_json::Value;

use super::config::OutDtype;
use crate::adapted::AdaptedModel;
use crate::model::gguf::{load_gguf_metadata, GgufFile};
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
    /// A GGUF file, each tensor read from it (and dequantized) when the merge reaches it.
    Gguf(GgufFile),
    /// The base with an adapter merged into each tensor as it is read.
    Merged(crate::merge::MergedModel),
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
            return Self::gguf(spec, path);
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
            let source = ModelSource::load_with(&path_str, &Device::Cpu, mapped())
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
        let tensors = source.weights.held().into_iter().collect();
        Self {
            spec: spec.to_string(),
            config: source.config.clone(),
            dir: dir.or_else(|| source.dir.clone()),
            source: Some(source),
            tensors: Tensors::Loaded(tensors),
        }
    }

    /// A GGUF file: its config and tokenizer translated now, its tensors read when merged.
    fn gguf(spec: &str, path: &Path) -> Result<Self> {
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            bail!("model {spec}: expected a model folder (config.json + safetensors) or a .gguf file ({})", path.display())
        }
        let (file, meta) = load_gguf_metadata(path).with_context(|| format!("model {spec}"))?;
        let source = ModelSource::from_gguf_model(path, meta, ComputeDtype::F32)
            .with_context(|| format!("model {spec}"))?;
        Ok(Self {
            spec: spec.to_string(),
            config: source.config.clone(),
            dir: None,
            source: Some(source),
            tensors: Tensors::Gguf(file),
        })
    }

    fn with_adapter(spec: &str, base: &Path, adapter: &Path) -> Result<Self> {
        let options = match base.is_dir() {
            true => mapped(),
            false => LoadOptions::default(),
        };
        let m = AdaptedModel::load_with(
            &base.to_string_lossy(),
            Some(adapter),
            None,
            &Device::Cpu,
            options,
        )
        .with_context(|| format!("model {spec}"))?;
        let tuner = m
            .tuner
            .as_deref()
            .with_context(|| format!("model {spec}: no adapter in {}", adapter.display()))?;
        let options = crate::merge::MergeOptions {
            dequantize: true,
            ..Default::default()
        };
        let merged = crate::merge::merged_model(
            &m.source,
            tuner.replaced()?,
            tuner.updates()?,
            m.model.task,
            options,
        )
        .with_context(|| format!("model {spec}: merging the adapter"))?;
        let dir = m.source.dir.clone();
        Ok(Self {
            spec: spec.to_string(),
            config: merged.config().clone(),
            dir,
            source: Some(m.source),
            tensors: Tensors::Merged(merged),
        })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.tensors {
            Tensors::Mapped { index, .. } => index.keys().cloned().collect(),
            Tensors::Loaded(t) => t.keys().cloned().collect(),
            Tensors::Merged(m) => m.names().cloned().collect(),
            Tensors::Gguf(f) => f.tensor_names().map(|(hf, _)| hf.to_string()).collect(),
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
            Tensors::Merged(m) => m.dims(name),
            Tensors::Gguf(f) => f.tensor_shape(name),
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
            Tensors::Loaded(_) | Tensors::Merged(_) | Tensors::Gguf(_) => Some(OutDtype::F32),
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
            Tensors::Merged(m) => m.contains(name),
            Tensors::Gguf(f) => f.tensor_type(name).is_some(),
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
            Tensors::Merged(m) => Ok(m
                .tensor(name)?
                .to_dense(&Device::Cpu)?
                .flatten_all()?
                .to_vec1()?),
            Tensors::Gguf(f) => {
                let q = f.qtensor(name, &Device::Cpu)?;
                let t = q
                    .dequantize(&Device::Cpu)
                    .with_context(|| format!("{}: dequantizing {name:?}", f.path().display()))?;
                Ok(t.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?)
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

/// How a bitsandbytes folder or an adapter's base folder is read: memory-mapped, each matrix's
/// pages dropped after it is read (`--stream-base`'s loading).
fn mapped() -> LoadOptions<'static> {
    LoadOptions {
        stream_base: true,
        ..LoadOptions::default()
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
