//! Loading a model's tensors from a Hugging Face folder (single or sharded safetensors).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::stream::{Held, MappedRows, StreamedWeight, Streamer};
use crate::dist::{BaseComm, ShardedWeight};
use crate::ops::{ComputeDtype, FrozenWeight};
use crate::quant::{bnb_format, Bf16Rows, QuantMatrix, QuantSpec};
use crate::util::atomic::RawTensor;
use crate::util::mapped::MappedBytes;

/// Named tensors of a checkpoint, with the place they came from (for error messages). Linear
/// weights may be held quantized ([`QuantMatrix`]): read from a bitsandbytes-quantized
/// checkpoint or a GGUF file, or quantized while loading (`--quantize`).
#[derive(Debug)]
pub struct Weights {
    /// The dense tensors, shared with the [`BaseRelease`] handles of these weights.
    dense: Arc<RwLock<Dense>>,
    quantized: HashMap<String, Arc<dyn QuantMatrix>>,
    /// Matrices of which this rank holds a run of rows (`--shard-base`).
    sharded: HashMap<String, Arc<ShardedWeight>>,
    /// Matrices read in place from the checkpoint's mapping (`--stream-base`); the quantized
    /// ones are also in `quantized`, which describes the base (formats, memory).
    streamed: HashMap<String, Arc<StreamedWeight>>,
    source: PathBuf,
    /// Names a model has read, so it can count its parameters and spot unused tensors.
    used: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// The dtype of the frozen matrices' products: dense matrices are held in it, quantized
    /// and sharded ones dequantize their tiles to it ([`FrozenWeight::compute_dtype`]).
    compute_dtype: ComputeDtype,
    /// Tables grown by [`Weights::grow_rows`], with the rows the checkpoint had.
    grown: HashMap<String, usize>,
}

/// The dense tensors of [`Weights`], and those released to a trainable copy.
#[derive(Debug, Default, Clone)]
struct Dense {
    tensors: HashMap<String, Tensor>,
    /// Tensors dropped by [`BaseRelease::release`], with their elements: a model built from
    /// these weights read them, and still counts them among its parameters.
    released: BTreeMap<String, usize>,
}

/// [`Weights::stream_window_bytes`] of the streamed matrices `(name, matrix)`: the largest
/// use, and the largest other one, read ahead while it is used. The other vocabulary table of
/// the same shape is not that one: the embedding's lookup touches only its rows' pages, so the
/// head is read ahead of no lookup and the lookup's table of no head use. Any other matrix
/// may be (gate and up of one layer share a shape and are used one after the other; down's
/// is their transpose). Tables are told by their names (`embed`, `lm_head`).
pub(crate) fn window_bytes<'a>(
    streamed: impl Iterator<Item = (&'a str, &'a StreamedWeight)>,
    dtype: ComputeDtype,
) -> usize {
    let is_table = |name: &str| name.contains("embed") || name.starts_with("lm_head");
    let mut uses: Vec<(usize, (usize, usize), bool)> = streamed
        .map(|(name, s)| (s.use_bytes(dtype), s.dims(), is_table(name)))
        .collect();
    uses.sort_unstable_by(|a, b| b.cmp(a));
    let Some(&(largest, dims, table)) = uses.first() else {
        return 0;
    };
    let next = uses[1..]
        .iter()
        .find(|(_, d, t)| !(table && *t && *d == dims))
        .map_or(0, |&(bytes, _, _)| bytes);
    largest + next
}

/// A clone holds the same tensors (candle tensors share their storage) in a map of its own:
/// releasing a tensor from one leaves the other's.
impl Clone for Weights {
    fn clone(&self) -> Self {
        Self {
            dense: Arc::new(RwLock::new(self.dense().clone())),
            quantized: self.quantized.clone(),
            sharded: self.sharded.clone(),
            streamed: self.streamed.clone(),
            source: self.source.clone(),
            used: self.used.clone(),
            compute_dtype: self.compute_dtype,
            grown: self.grown.clone(),
        }
    }
}

/// Drops dense tensors of a [`Weights`] while a model is built from it: a method that trains a
/// base tensor as a copy of its own (full fine-tuning) releases the base once the copy exists,
/// so that memory holds one copy. Later reads of a released tensor are an error naming it
/// ("missing tensor"), so a run releases only from the weights it builds its one model from
/// (`train::prepare`, `ferrule plan`).
#[derive(Clone, Debug)]
pub struct BaseRelease(Arc<RwLock<Dense>>);

impl BaseRelease {
    /// Drops the dense tensor `t` is (the tensor [`Weights::frozen`] or [`Weights::get`]
    /// returned: the same tensor, by id) and returns its name; `None` when `t` is not one
    /// of them (quantized, streamed or sharded matrices, a converted copy, or one already
    /// released).
    pub fn release(&self, t: &Tensor) -> Option<String> {
        let mut dense = self.0.write().unwrap_or_else(|e| e.into_inner());
        let name = dense
            .tensors
            .iter()
            .find(|(_, held)| held.id() == t.id())
            .map(|(n, _)| n.clone())?;
        dense.tensors.remove(&name);
        dense.released.insert(name.clone(), t.elem_count());
        Some(name)
    }
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, source: impl Into<PathBuf>) -> Self {
        Self::with_quantized(tensors, HashMap::new(), source)
    }

    pub fn with_quantized(
        tensors: HashMap<String, Tensor>,
        quantized: HashMap<String, Arc<dyn QuantMatrix>>,
        source: impl Into<PathBuf>,
    ) -> Self {
        Self {
            dense: Arc::new(RwLock::new(Dense {
                tensors,
                released: BTreeMap::new(),
            })),
            quantized,
            sharded: HashMap::new(),
            streamed: HashMap::new(),
            source: source.into(),
            used: Default::default(),
            compute_dtype: ComputeDtype::F32,
            grown: HashMap::new(),
        }
    }

    /// These weights computing in `dtype`: every dense matrix (2-D floating tensor) converted
    /// to it, one at a time. [`Weights::load_dir`] converts while reading instead, so that a
    /// checkpoint in f32 is never whole in f32.
    pub fn with_compute_dtype(mut self, dtype: ComputeDtype) -> Result<Self> {
        for t in self.dense_mut().tensors.values_mut() {
            if t.rank() == 2 && t.dtype().is_float() {
                *t = t.to_dtype(dtype.dtype())?;
            }
        }
        self.compute_dtype = dtype;
        Ok(self)
    }

    /// The dtype the frozen matrices compute in.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.compute_dtype
    }

    /// The dense tensors (a poisoned lock still holds whole tensors: a release is one removal).
    fn dense(&self) -> RwLockReadGuard<'_, Dense> {
        self.dense.read().unwrap_or_else(|e| e.into_inner())
    }

    fn dense_mut(&self) -> RwLockWriteGuard<'_, Dense> {
        self.dense.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle that drops dense tensors of these weights while a model is built from them
    /// ([`BaseRelease`]).
    pub fn release_handle(&self) -> BaseRelease {
        BaseRelease(self.dense.clone())
    }

    /// The dense tensors released to a trainable copy ([`BaseRelease::release`]), by name.
    pub fn released(&self) -> Vec<String> {
        self.dense().released.keys().cloned().collect()
    }

    /// Keeps only this rank's rows of every frozen matrix: each 2-D floating tensor and each
    /// quantized one (`--shard-base`, [`crate::dist::sharded_base`]). Norms and biases stay
    /// whole. Every rank must call it on the same checkpoint; the names and shapes are checked
    /// to agree first (a collective).
    pub fn shard(&mut self, comm: Arc<dyn BaseComm>) -> Result<()> {
        if !self.streamed.is_empty() {
            bail!(
                "{}: --shard-base cannot shard a base streamed from disk (--stream-base); pass one of the two",
                self.source.display()
            )
        }
        self.ensure_same_matrices(comm.as_ref())?;
        let mut names: Vec<String> = self
            .dense()
            .tensors
            .iter()
            .filter(|(_, t)| t.rank() == 2 && t.dtype().is_float())
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        for name in names {
            let t = self
                .dense_mut()
                .tensors
                .remove(&name)
                .expect("listed above");
            let (rows, cols) = t.dims2()?;
            let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            drop(t);
            let s = ShardedWeight::from_dense(&values, rows, cols, comm.clone())
                .with_context(|| format!("{}: sharding {name:?}", self.source.display()))?;
            self.sharded.insert(name, Arc::new(s));
        }
        for (name, q) in std::mem::take(&mut self.quantized) {
            let s = ShardedWeight::from_quantized(q.as_ref(), comm.clone())
                .with_context(|| format!("{}: sharding {name:?}", self.source.display()))?;
            self.sharded.insert(name, Arc::new(s));
        }
        Ok(())
    }

    /// Errors on every rank unless all ranks hold matrices of the same names and shapes.
    fn ensure_same_matrices(&self, comm: &dyn BaseComm) -> Result<()> {
        let mut shapes: Vec<(String, Vec<usize>)> = self
            .dense()
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        shapes.extend(
            self.quantized
                .iter()
                .map(|(n, q)| (n.clone(), vec![q.dims().0, q.dims().1])),
        );
        shapes.sort();
        let digest = crate::util::fnv1a(format!("{shapes:?}").as_bytes());
        // Four 16-bit pieces: exact in f32.
        let mine: Vec<f32> = (0..4)
            .map(|i| ((digest >> (16 * i)) & 0xffff) as f32)
            .collect();
        let mut all = vec![0f32; 4 * comm.world_size()];
        comm.all_gather_f32(&mine, &mut all)?;
        if let Some(k) = all.chunks(4).position(|d| d != mine.as_slice()) {
            bail!(
                "{}: rank {k} loaded other tensors or shapes than rank {}; every rank must load the same model to shard it",
                self.source.display(),
                comm.rank()
            )
        }
        Ok(())
    }

    /// The matrices this rank holds a shard of, by tensor name.
    pub fn sharded(&self) -> &HashMap<String, Arc<ShardedWeight>> {
        &self.sharded
    }

    /// Reads `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    /// Matrices (2-D floating tensors) are held in `compute_dtype`, other floating tensors in
    /// f32. A legacy `pytorch_model.bin` is refused: it is a pickle and loading it would run
    /// arbitrary code.
    pub fn from_dir(dir: &Path, compute_dtype: ComputeDtype, device: &Device) -> Result<Self> {
        Self::load_dir(dir, compute_dtype, device, None)
    }

    /// Like [`Weights::from_dir`]; bitsandbytes-quantized weights stay quantized, and with
    /// `quantize` every linear weight it [wants](QuantSpec::wants) is quantized as it is read,
    /// one tensor at a time, so the whole model is never in f32 at once.
    pub fn load_dir(
        dir: &Path,
        compute_dtype: ComputeDtype,
        device: &Device,
        quantize: Option<&QuantSpec>,
    ) -> Result<Self> {
        Self::load_dir_with(dir, compute_dtype, device, quantize, false)
    }

    /// [`Weights::load_dir`]; with `stream`, the frozen matrices (2-D float tensors and the
    /// packed codes of bitsandbytes 4-bit weights) are read in place from the file's mapping
    /// ([`super::stream`]) instead of copied, and `quantize` is refused (it converts).
    pub fn load_dir_with(
        dir: &Path,
        compute_dtype: ComputeDtype,
        device: &Device,
        quantize: Option<&QuantSpec>,
        stream: bool,
    ) -> Result<Self> {
        if stream && quantize.is_some() {
            bail!("{}: --stream-base reads the checkpoint as it is stored, and --quantize converts it while loading; quantize it once with `ferrule quantize` and stream the folder that writes", dir.display())
        }
        let streamer = Streamer::new();
        let mut streamed: HashMap<String, Held> = HashMap::new();
        let mut pages: HashMap<String, MappedBytes> = HashMap::new();
        let mut tensors = HashMap::new();
        let mut quantized: HashMap<String, Arc<dyn QuantMatrix>> = HashMap::new();
        let mut bnb: HashMap<String, RawTensor> = HashMap::new();
        for (f, listed) in &checkpoint_files(dir)? {
            let file =
                std::fs::File::open(f).with_context(|| format!("reading {}", f.display()))?;
            // SAFETY: read-only map of a checkpoint file we do not modify while it is mapped.
            let mmap = Arc::new(
                unsafe { memmap2::Mmap::map(&file) }
                    .with_context(|| format!("mapping {}", f.display()))?,
            );
            let st = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", f.display()))?;
            let names: Vec<String> = st.names().into_iter().map(String::from).collect();
            // A tensor the index places in this shard must be there (a stale or mixed-up index
            // would otherwise surface later as a "missing tensor" of the folder, or not at all).
            if let Some(missing) = listed.iter().find(|n| !names.contains(n)) {
                bail!("{}: model.safetensors.index.json lists tensor {missing:?} in this shard, but the file has no such tensor", f.display())
            }
            let has_bnb = names.iter().any(|n| bnb_format::is_component(n));
            for name in names {
                let view = st
                    .tensor(&name)
                    .map_err(|e| anyhow!("{}: tensor {name:?}: {e}", f.display()))?;
                let _release = ReleasePages {
                    mmap: &mmap,
                    data: view.data(),
                };
                if stream
                    && has_bnb
                    && view.dtype() == safetensors::Dtype::U8
                    && !bnb_format::is_component(&name)
                {
                    // A 4-bit weight's packed codes: mapped, not copied.
                    pages.insert(name.clone(), MappedBytes::of_slice(&mmap, view.data())?);
                    bnb.insert(
                        name,
                        RawTensor::new(view.dtype(), view.shape().to_vec(), Vec::new()),
                    );
                    continue;
                }
                if bnb_format::is_component(&name)
                    || (has_bnb && bnb_format::is_packed_dtype(view.dtype()))
                {
                    bnb.insert(
                        name,
                        RawTensor::new(view.dtype(), view.shape().to_vec(), view.data().to_vec()),
                    );
                    continue;
                }
                if let Some(spec) = quantize.filter(|_| is_float(view.dtype())) {
                    let shape = view.shape();
                    if spec.wants(&name, shape) || QuantSpec::keeps_bf16(&name, shape) {
                        let q: Arc<dyn QuantMatrix> = if spec.wants(&name, shape) {
                            let values = to_f32(&view)
                                .with_context(|| format!("{}: tensor {name:?}", f.display()))?;
                            spec.quantize(
                                &format!("{}: {name}", f.display()),
                                &values,
                                shape[0],
                                shape[1],
                            )?
                        } else {
                            // Converted slice by slice, releasing the file pages as it goes: the
                            // embedding is the largest tensor and is never whole in f32.
                            Arc::new(
                                bf16_rows(&mmap, &view, &name, true)
                                    .with_context(|| format!("{}: tensor {name:?}", f.display()))?,
                            )
                        };
                        quantized.insert(name, q);
                        continue;
                    }
                }
                // The embedding/head of a bitsandbytes checkpoint whose values are all exactly
                // representable in bf16 (as `ferrule quantize` writes them) is held in bf16: no
                // loss, half the bytes.
                if has_bnb
                    && is_float(view.dtype())
                    && QuantSpec::keeps_bf16(&name, view.shape())
                    && is_bf16_exact(&mmap, &view)?
                {
                    if stream {
                        let bytes = MappedBytes::of_slice(&mmap, view.data())?;
                        let (rows, cols) = (view.shape()[0], view.shape()[1]);
                        let dtype = candle_dtype(view.dtype())?;
                        let q: Arc<dyn QuantMatrix> =
                            Arc::new(MappedRows::new(dtype, rows, cols, bytes.clone())?);
                        pages.insert(name.clone(), bytes);
                        streamed.insert(name.clone(), Held::Quantized(q.clone()));
                        quantized.insert(name, q);
                        continue;
                    }
                    let rows = bf16_rows(&mmap, &view, &name, false)
                        .with_context(|| format!("{}: tensor {name:?}", f.display()))?;
                    quantized.insert(name, Arc::new(rows));
                    continue;
                }
                if stream && is_float(view.dtype()) && view.shape().len() == 2 {
                    pages.insert(name.clone(), MappedBytes::of_slice(&mmap, view.data())?);
                    let held = Held::Dense {
                        dtype: candle_dtype(view.dtype())?,
                        rows: view.shape()[0],
                        cols: view.shape()[1],
                    };
                    streamed.insert(name, held);
                    continue;
                }
                let t = candle_core::safetensors::Load::load(&view, device)
                    .with_context(|| format!("{}: tensor {name:?}", f.display()))?;
                let t = match t.rank() {
                    _ if !t.dtype().is_float() => t,
                    2 => t.to_dtype(compute_dtype.dtype())?,
                    _ => t.to_dtype(DType::F32)?,
                };
                tensors.insert(name, t);
            }
        }
        if !bnb.is_empty() {
            if quantize.is_some() {
                bail!(
                    "{}: the checkpoint is already quantized with bitsandbytes; drop --quantize",
                    dir.display()
                )
            }
            let assembled = bnb_format::assemble_mapped(&mut bnb, &mut pages, dir)?;
            let mut in_memory = Vec::new();
            for (name, q) in assembled {
                if let Some(b) = q.as_any().downcast_ref::<crate::quant::Blockwise4>() {
                    if let Some(m) = b.packed.mapped() {
                        pages.insert(name.clone(), m.clone());
                        streamed.insert(name.clone(), Held::Quantized(q.clone()));
                    }
                }
                if stream && !streamed.contains_key(&name) {
                    in_memory.push(format!("{name} ({})", q.format()));
                }
                quantized.insert(name, q);
            }
            if let Some(first) = in_memory.first() {
                tracing::warn!("{}: {} quantized weight(s), e.g. {first}, are held in memory; of the bitsandbytes formats only 4-bit (NF4/FP4) weights are read in place from the file (--stream-base, and merge)", dir.display(), in_memory.len());
            }
        }
        let mut weights = Self::with_quantized(tensors, quantized, dir);
        weights.compute_dtype = compute_dtype;
        let mut names: Vec<String> = streamed.keys().cloned().collect();
        // The file's order: the read-ahead's guess before the model's build order is known.
        names.sort();
        for name in names {
            let held = streamed.remove(&name).expect("listed above");
            let range = pages
                .remove(&name)
                .expect("every streamed matrix has its pages");
            let w = streamer
                .add(held, range)
                .with_context(|| format!("{}: tensor {name:?}", dir.display()))?;
            weights.streamed.insert(name, Arc::new(w));
        }
        Ok(weights)
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Whether these weights hold `name` (a released tensor is no longer held).
    pub fn contains(&self, name: &str) -> bool {
        self.dense().tensors.contains_key(name)
            || self.quantized.contains_key(name)
            || self.sharded.contains_key(name)
            || self.streamed.contains_key(name)
    }

    /// The tensor `name`, checked against the expected shape, in f32 (a copy of a matrix held
    /// in bf16). A sharded tensor is gathered (a collective: every rank asks for it in the
    /// same order).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.get_as_held(name, shape)?.to_dtype(DType::F32)?)
    }

    /// [`Weights::get`] without widening: a matrix in the dtype it is held in.
    fn get_as_held(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(s) = self.sharded.get(name) {
            let (r, c) = s.dims();
            if [r, c] != shape {
                bail!(
                    "{}: tensor {name:?} has shape [{r}, {c}], expected {shape:?}",
                    self.source.display()
                )
            }
            self.used.lock().unwrap().insert(name.to_string());
            return Tensor::from_vec(s.gather()?, (r, c), &Device::Cpu).map_err(Into::into);
        }
        if let Some(q) = self.quantized.get(name) {
            bail!(
                "{}: tensor {name:?} is stored quantized ({}), but this layer needs it dense",
                self.source.display(),
                q.format()
            )
        }
        if let Some(s) = self.streamed.get(name) {
            self.check_shape(name, s.dims(), shape)?;
            self.used.lock().unwrap().insert(name.to_string());
            let _in_use = s.use_pages();
            return Ok(s.dense_tensor(self.compute_dtype)?);
        }
        let t = self
            .dense()
            .tensors
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("{}: missing tensor {name:?}", self.source.display()))?;
        if t.dims() != shape {
            bail!(
                "{}: tensor {name:?} has shape {:?}, expected {:?}",
                self.source.display(),
                t.dims(),
                shape
            )
        }
        self.used.lock().unwrap().insert(name.to_string());
        Ok(t)
    }

    /// Errors naming `name` unless `dims` is `shape`.
    fn check_shape(&self, name: &str, (r, c): (usize, usize), shape: &[usize]) -> Result<()> {
        if [r, c] != shape {
            bail!(
                "{}: tensor {name:?} has shape [{r}, {c}], expected {shape:?}",
                self.source.display()
            )
        }
        Ok(())
    }

    /// With `--stream-base`, what the streamed matrices make resident at the peak of a run:
    /// the largest use ([`StreamedWeight::use_bytes`]) while the next matrix is read ahead
    /// ([`window_bytes`]). An estimate for `ferrule plan` (the read-ahead's order is learnt as
    /// the run goes); BENCHMARKS.md compares it with measured runs.
    pub fn stream_window_bytes(&self, dtype: ComputeDtype) -> usize {
        window_bytes(
            self.streamed.iter().map(|(n, s)| (n.as_str(), s.as_ref())),
            dtype,
        )
    }

    /// The matrices read in place from the checkpoint's mapping (`--stream-base`), by name.
    pub fn streamed(&self) -> &HashMap<String, Arc<StreamedWeight>> {
        &self.streamed
    }

    /// Bytes held in memory besides the streamed matrices' mapped pages: everything for a base
    /// loaded in memory; for a streamed one the tensors that are not mapped matrices and the
    /// copied statistics of quantized ones.
    pub fn held_bytes(&self) -> usize {
        crate::quant::WeightMemory::of(self).total_bytes() - self.streamed_quantized_mapped_bytes()
    }

    /// Bytes of the streamed matrices' mapped pages that [`crate::quant::WeightMemory`]
    /// counts as held (a streamed quantized matrix reports its codes as its storage).
    pub fn streamed_quantized_mapped_bytes(&self) -> usize {
        self.streamed
            .values()
            .filter(|s| matches!(s.held(), Held::Quantized(_)))
            .map(|s| s.mapped_bytes())
            .sum()
    }

    /// Whether any matrix is streamed from disk (`--stream-base`).
    pub fn is_streamed(&self) -> bool {
        !self.streamed.is_empty()
    }

    /// Names of the streamed matrices held dense (the quantized ones are in `quantized`).
    fn streamed_dense(&self) -> impl Iterator<Item = (&String, &Arc<StreamedWeight>)> {
        self.streamed
            .iter()
            .filter(|(_, s)| matches!(s.held(), Held::Dense { .. }))
    }

    /// A frozen matrix (linear weight or embedding table): quantized when it is stored so,
    /// dense otherwise; read in place from the file when streamed.
    pub fn frozen(&self, name: &str, shape: [usize; 2]) -> Result<FrozenWeight> {
        if let Some(s) = self.streamed.get(name) {
            self.check_shape(name, s.dims(), &shape)?;
            self.used.lock().unwrap().insert(name.to_string());
            s.streamer().built(s);
            return Ok(FrozenWeight::Streamed(s.clone(), self.compute_dtype));
        }
        if let Some(s) = self.sharded.get(name) {
            let (r, c) = s.dims();
            if [r, c] != shape {
                bail!(
                    "{}: tensor {name:?} has shape [{r}, {c}], expected {shape:?}",
                    self.source.display()
                )
            }
            self.used.lock().unwrap().insert(name.to_string());
            return Ok(FrozenWeight::Sharded(s.clone(), self.compute_dtype));
        }
        match self.quantized.get(name) {
            Some(q) => {
                let (r, c) = q.dims();
                if [r, c] != shape {
                    bail!(
                        "{}: tensor {name:?} has shape [{r}, {c}], expected {shape:?}",
                        self.source.display()
                    )
                }
                self.used.lock().unwrap().insert(name.to_string());
                Ok(FrozenWeight::Quantized(q.clone(), self.compute_dtype))
            }
            None => Ok(FrozenWeight::Dense(self.get_as_held(name, &shape)?)),
        }
    }

    /// Every float tensor as a merge or an export reads it, by name: dense ones as held,
    /// quantized ones in their blocks, sharded ones by their shards, and streamed ones
    /// (`--stream-base`) as mapped matrices, each read bracketing its pages. Integer tensors
    /// are left out.
    pub fn held(&self) -> Vec<(String, FrozenWeight)> {
        let dtype = self.compute_dtype;
        let held = self.dense();
        let dense = held
            .tensors
            .iter()
            .filter(|(_, t)| t.dtype().is_float())
            .map(|(k, t)| (k.clone(), FrozenWeight::Dense(t.clone())));
        let quantized = self
            .quantized
            .iter()
            .filter(|(k, _)| !self.streamed.contains_key(*k))
            .map(|(k, q)| (k.clone(), FrozenWeight::Quantized(q.clone(), dtype)));
        let sharded = self
            .sharded
            .iter()
            .map(|(k, s)| (k.clone(), FrozenWeight::Sharded(s.clone(), dtype)));
        let streamed = self
            .streamed
            .iter()
            .map(|(k, s)| (k.clone(), FrozenWeight::Streamed(s.clone(), dtype)));
        dense
            .chain(quantized)
            .chain(sharded)
            .chain(streamed)
            .collect()
    }

    /// [`Weights::frozen`] for the first of `names` that exists.
    pub fn frozen_any(&self, names: &[String], shape: [usize; 2]) -> Result<FrozenWeight> {
        match names.iter().find(|n| self.contains(n)) {
            Some(n) => self.frozen(n, shape),
            None => Err(anyhow!(
                "{}: missing tensor {:?}",
                self.source.display(),
                names.first().map(String::as_str).unwrap_or("")
            )),
        }
    }

    /// The first of `names` that exists (checkpoints differ in prefixes, e.g. `bert.`).
    pub fn get_any(&self, names: &[String], shape: &[usize]) -> Result<Tensor> {
        for n in names {
            if self.dense().tensors.contains_key(n)
                || self.sharded.contains_key(n)
                || self.streamed_dense().any(|(s, _)| s == n)
            {
                return self.get(n, shape);
            }
        }
        Err(anyhow!(
            "{}: missing tensor {:?}",
            self.source.display(),
            names.first().map(String::as_str).unwrap_or("")
        ))
    }

    /// Total elements of the distinct tensors read so far (a tied head counts once), those
    /// released since included.
    pub fn used_elements(&self) -> usize {
        let used = self.used.lock().unwrap();
        let held = self.dense();
        let dense: usize = used
            .iter()
            .filter_map(|n| {
                held.tensors
                    .get(n)
                    .map(|t| t.elem_count())
                    .or_else(|| held.released.get(n).copied())
            })
            .sum();
        let quantized: usize = used
            .iter()
            .filter_map(|n| self.quantized.get(n))
            .map(|q| q.dims().0 * q.dims().1)
            .sum();
        let sharded: usize = used
            .iter()
            .filter_map(|n| self.sharded.get(n))
            .map(|s| s.dims().0 * s.dims().1)
            .sum();
        let streamed: usize = self
            .streamed_dense()
            .filter(|(n, _)| used.contains(*n))
            .map(|(_, s)| s.dims().0 * s.dims().1)
            .sum();
        dense + quantized + sharded + streamed
    }

    /// Floating-point tensors in the checkpoint that no layer read.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        let mut v: Vec<String> = self
            .dense()
            .tensors
            .iter()
            .filter(|(n, t)| t.dtype().is_float() && !used.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        v.extend(
            self.quantized
                .keys()
                .chain(self.sharded.keys())
                .chain(self.streamed_dense().map(|(n, _)| n))
                .filter(|n| !used.contains(*n))
                .cloned(),
        );
        v.sort();
        v
    }

    /// The names of the tensors held (a released one is not).
    pub fn names(&self) -> Vec<String> {
        let dense = self.dense();
        dense
            .tensors
            .keys()
            .chain(self.quantized.keys())
            .chain(self.sharded.keys())
            .chain(self.streamed_dense().map(|(n, _)| n))
            .cloned()
            .collect()
    }

    /// The weights held quantized, by tensor name.
    pub fn quantized(&self) -> &HashMap<String, Arc<dyn QuantMatrix>> {
        &self.quantized
    }

    /// The dense tensors held, by name (the tensors share their storage with these weights').
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.dense().tensors.clone()
    }

    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        std::mem::take(&mut self.dense_mut().tensors)
    }

    /// Grows the dense table `name` (`[rows₀, cols]`) to `rows` rows, each new row the mean of
    /// the old ones, in the table's dtype. transformers' `resize_token_embeddings` (with its
    /// default `mean_resizing=True`) draws the new rows from a normal of that mean and 1e-9 times
    /// the rows' covariance (`_init_added_embeddings_weights_with_mean`): a noise of about
    /// 3·10⁻⁵ standard deviations, left out here so a resumed run rebuilds the same table.
    pub fn grow_rows(&mut self, name: &str, rows: usize) -> Result<()> {
        if let Some(table) = self.quantized.get(name) {
            if let Some(b) = table.as_any().downcast_ref::<Bf16Rows>() {
                return self.grow_bf16_rows(name, b.clone(), rows);
            }
        }
        if self.streamed.contains_key(name) {
            bail!(
                "{}: tensor {name:?} is streamed from the file (--stream-base), which cannot grow it; resize the embeddings without --stream-base",
                self.source.display()
            )
        }
        if self.quantized.contains_key(name) || self.sharded.contains_key(name) {
            bail!(
                "{}: tensor {name:?} is held quantized or sharded; only a dense table can grow",
                self.source.display()
            )
        }
        let t = self
            .dense()
            .tensors
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("{}: missing tensor {name:?}", self.source.display()))?;
        let (old, cols) = t.dims2()?;
        if rows <= old {
            return Ok(());
        }
        let mean = t.to_dtype(DType::F32)?.mean_keepdim(0)?;
        let added = mean.broadcast_as((rows - old, cols))?.to_dtype(t.dtype())?;
        let grown = Tensor::cat(&[&t, &added], 0)?;
        self.dense_mut().tensors.insert(name.to_string(), grown);
        self.grown.entry(name.to_string()).or_insert(old);
        Ok(())
    }

    /// [`Weights::grow_rows`] for a table held in bf16 rows (the embedding and head beside a
    /// `--quantize`d base): the mean taken in f32, rounded to bf16 as the old rows are.
    fn grow_bf16_rows(&mut self, name: &str, table: Bf16Rows, rows: usize) -> Result<()> {
        let (old, cols) = (table.rows, table.cols);
        if rows <= old {
            return Ok(());
        }
        let mut mean = vec![0f64; cols];
        for row in table.data.chunks(cols) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v.to_f32() as f64;
            }
        }
        let mean: Vec<half::bf16> = mean
            .iter()
            .map(|m| half::bf16::from_f32((m / old as f64) as f32))
            .collect();
        let mut data = table.data;
        for _ in old..rows {
            data.extend_from_slice(&mean);
        }
        let grown = Bf16Rows { rows, cols, data };
        self.quantized.insert(name.to_string(), Arc::new(grown));
        self.grown.entry(name.to_string()).or_insert(old);
        Ok(())
    }

    /// The rows table `name` had in the checkpoint, when [`Weights::grow_rows`] grew it.
    pub fn grown_from(&self, name: &str) -> Option<usize> {
        self.grown.get(name).copied()
    }
}

/// Drops a tensor's file pages from the process once it has been copied or quantized, so that
/// loading never holds the mapped checkpoint and its converted copy at once (peak RSS).
struct ReleasePages<'a> {
    mmap: &'a memmap2::Mmap,
    data: &'a [u8],
}

impl Drop for ReleasePages<'_> {
    fn drop(&mut self) {
        let offset = self.data.as_ptr() as usize - self.mmap.as_ptr() as usize;
        crate::util::release_pages(self.mmap, offset, self.data.len());
    }
}

/// `model.safetensors`, or the shards of `model.safetensors.index.json`, each with the tensor
/// names the index places in it (none for a single file).
pub(crate) fn checkpoint_files(dir: &Path) -> Result<Vec<(PathBuf, Vec<String>)>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        Ok(vec![(single, Vec::new())])
    } else if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: no \"weight_map\" object", index.display()))?;
        let mut shards: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                anyhow!(
                    "{}: weight_map[{name:?}] is {shard}, expected a file name",
                    index.display()
                )
            })?;
            shards
                .entry(shard.to_string())
                .or_default()
                .push(name.clone());
        }
        Ok(shards
            .into_iter()
            .map(|(s, names)| (dir.join(s), names))
            .collect())
    } else if dir.join("pytorch_model.bin").exists()
        || dir.join("pytorch_model.bin.index.json").exists()
    {
        let found = if dir.join("pytorch_model.bin").exists() {
            "pytorch_model.bin"
        } else {
            "pytorch_model.bin.index.json (sharded pytorch_model-*.bin)"
        };
        bail!(
            "{}: only {found} found; it is a pickle, which ferrule never loads (it can run arbitrary code). Convert it to safetensors first (e.g. load it in transformers and save_pretrained)",
            dir.display()
        )
    } else {
        bail!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        )
    }
}

/// Calls `f(first_element, values)` on a float tensor's values in 4 MB slices of the file,
/// releasing each slice's pages after it, until `f` returns `false`. A vocabulary table is the
/// largest tensor, and a whole f32 copy of it (1 GB for a 13B Llama's) outlived the load in
/// the allocator's free memory.
fn for_each_f32_slice(
    mmap: &memmap2::Mmap,
    view: &safetensors::tensor::TensorView<'_>,
    mut f: impl FnMut(usize, &[f32]) -> Result<bool>,
) -> Result<()> {
    const SLICE: usize = 1 << 22;
    let data = view.data();
    let base = data.as_ptr() as usize - mmap.as_ptr() as usize;
    let elem = view.dtype().bitsize() / 8;
    for (i, chunk) in data.chunks(SLICE).enumerate() {
        let go_on = f(i * SLICE / elem, &decode_f32(view.dtype(), chunk)?)?;
        crate::util::release_pages(mmap, base + i * SLICE, chunk.len());
        if !go_on {
            break;
        }
    }
    Ok(())
}

/// A 2-D float tensor `name` as [`Bf16Rows`]; with `refuse_non_finite` (a model being
/// quantized) a NaN or inf is an error naming the element.
fn bf16_rows(
    mmap: &memmap2::Mmap,
    view: &safetensors::tensor::TensorView<'_>,
    name: &str,
    refuse_non_finite: bool,
) -> Result<Bf16Rows> {
    let (rows, cols) = (view.shape()[0], view.shape()[1]);
    let mut out = Vec::with_capacity(rows * cols);
    for_each_f32_slice(mmap, view, |first, values| {
        if refuse_non_finite {
            crate::quant::check_finite(&format!("{name} (slice from element {first})"), values)?;
        }
        out.extend(values.iter().map(|&v| half::bf16::from_f32(v)));
        Ok(true)
    })?;
    Ok(Bf16Rows {
        rows,
        cols,
        data: out,
    })
}

/// Whether every value of a float tensor is exactly a bf16 ([`for_each_f32_slice`]: no copy
/// of the tensor is made).
fn is_bf16_exact(mmap: &memmap2::Mmap, view: &safetensors::tensor::TensorView<'_>) -> Result<bool> {
    if view.dtype() == safetensors::Dtype::BF16 {
        return Ok(true);
    }
    let mut exact = true;
    for_each_f32_slice(mmap, view, |_, values| {
        exact = values
            .iter()
            .all(|&v| half::bf16::from_f32(v).to_f32().to_bits() == v.to_bits());
        Ok(exact)
    })?;
    Ok(exact)
}

/// The candle dtype of a float safetensors dtype.
fn candle_dtype(dt: safetensors::Dtype) -> Result<DType> {
    Ok(match dt {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        other => bail!("dtype {other:?} is not a float type"),
    })
}

fn is_float(dt: safetensors::Dtype) -> bool {
    matches!(
        dt,
        safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
    )
}

/// A float tensor's values in f32.
fn to_f32(view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    decode_f32(view.dtype(), view.data())
}

/// Little-endian f32/f16/bf16 bytes as f32 values.
pub(crate) fn decode_f32(dtype: safetensors::Dtype, d: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        safetensors::Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        safetensors::Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("dtype {other:?} is not a float type"),
    })
}

/// Reads one safetensors file with a clear error for a missing, truncated or corrupt file.
pub fn load_safetensors_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device)
            .with_context(|| format!("{}: tensor {name:?}", path.display()))?;
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// New rows are the old rows' mean, in the table's dtype; the table never shrinks; a
    /// quantized table cannot grow, and the error names it.
    #[test]
    fn grown_rows_are_the_mean_and_only_dense_tables_grow() {
        let dev = Device::Cpu;
        let table = Tensor::new(&[[1f32, 2.0], [3.0, 6.0]], &dev).unwrap();
        let mut w = Weights::new(
            HashMap::from([
                ("t".to_string(), table.clone()),
                ("h".to_string(), table.to_dtype(DType::BF16).unwrap()),
            ]),
            "m",
        );
        w.grow_rows("t", 4).unwrap();
        let grown: Vec<Vec<f32>> = w.get("t", &[4, 2]).unwrap().to_vec2().unwrap();
        assert_eq!(grown[2..], [vec![2.0, 4.0], vec![2.0, 4.0]]);
        assert_eq!(w.grown_from("t"), Some(2));
        w.grow_rows("t", 3).unwrap();
        assert_eq!(w.get("t", &[4, 2]).unwrap().dims(), [4, 2], "never shrinks");
        w.grow_rows("h", 3).unwrap();
        let h = w.frozen("h", [3, 2]).unwrap();
        assert_eq!(
            h.compute_dtype(),
            ComputeDtype::Bf16,
            "held in bf16 as before"
        );
        assert_eq!(w.grown_from("x"), None);

        let spec = QuantSpec::new(crate::quant::QuantMethod::Nf4, 64, false).unwrap();
        let q = spec.quantize("q", &[0.5f32; 2 * 64], 2, 64).unwrap();
        let mut quantized =
            Weights::with_quantized(HashMap::new(), HashMap::from([("q".to_string(), q)]), "m");
        let e = quantized.grow_rows("q", 3).unwrap_err().to_string();
        assert!(
            e.contains("\"q\"") && e.contains("only a dense table can grow"),
            "{e}"
        );

        // A bf16-row table (beside a quantized base) grows in bf16.
        let rows = Bf16Rows::from_f32(&[1.0, 2.0, 3.0, 6.0], 2, 2);
        let mut held = Weights::with_quantized(
            HashMap::new(),
            HashMap::from([("e".to_string(), Arc::new(rows) as Arc<dyn QuantMatrix>)]),
            "m",
        );
        held.grow_rows("e", 3).unwrap();
        let grown = held.quantized()["e"].dequantize();
        assert_eq!(grown, vec![1.0, 2.0, 3.0, 6.0, 2.0, 4.0]);
        assert_eq!(held.grown_from("e"), Some(2));
    }
}
