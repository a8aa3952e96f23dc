//! The frozen base streamed from disk (`--stream-base`): frozen matrices read in place from
//! the memory-mapped checkpoint instead of copied into owned buffers.
//!
//! A streamed matrix ([`StreamedWeight`]) is held as the in-memory load would hold it, only
//! its large bytes are a range of the file's mapping: a dense f32/f16/bf16 matrix of a
//! safetensors file, or the packed 4-bit codes of a bitsandbytes NF4/FP4 folder (as `ferrule
//! quantize` writes it; absmax and other statistics, a few percent of the bytes, are copied).
//! The ops walk it as they walk the in-memory matrix (`ops::frozen_linear::for_each_tile`):
//! one tile for a dense matrix, read in place when the file holds the compute dtype (else
//! converted, as the loader would have converted it, into a buffer for the duration of the
//! use), and the same dequantized row tiles for a quantized one. The arithmetic is the
//! in-memory path's, so results are equal bit for bit.
//!
//! **Residency.** A use of a matrix (its tiles in the forward pass, the recomputation or the
//! backward pass, an embedding lookup) is bracketed by [`StreamedWeight::use_pages`]: when it
//! ends, its pages are dropped from the process with `madvise(MADV_DONTNEED)`. A read-only
//! private file mapping makes that safe (the pages are read again on the next touch) and
//! cheap: the file stays in the kernel's page cache while memory allows, so the next use
//! costs minor faults, not disk reads, and the kernel evicts it under pressure as any cached
//! file. `MADV_PAGEOUT` would also push the pages out of the page cache and make every use
//! read the disk; plain reads into a small buffer would copy every byte once per use. So the
//! process holds the matrix in use and the one prefetched, about two layers' matrices, plus
//! the page cache the kernel shares with everyone (which RSS does not count).
//!
//! **Kept resident** (`--max-resident-gb`, [`crate::model::residency`]): a matrix can be
//! pinned ([`StreamedWeight::pin`]); its pages come in at its first use and are never dropped,
//! so it costs what the in-memory load's copy costs and no page faults after. The streamer
//! counts the mapped bytes it holds resident (pinned, in use, read ahead) and their high-water
//! mark ([`Streamer::peak_resident_bytes`]), which bounds the base's share of a run's RSS.
//!
//! **Read-ahead.** When a use begins, the matrix expected next is handed to a read-ahead
//! thread that populates its pages (`MADV_POPULATE_READ`). The next one is learnt from the run
//! itself: the matrix that followed the last two uses the previous time they occurred in that
//! order (forward, recomputation and backward walk the layers in different orders, and a pair
//! tells them apart); before that is known, the next matrix in the order the model was built.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::ops::product::Values;
use crate::ops::ComputeDtype;
use crate::quant::QuantMatrix;
use crate::util::mapped::MappedBytes;

/// What a streamed matrix is, in the form the in-memory load would hold it.
#[derive(Debug)]
pub enum Held {
    /// A dense `[rows, cols]` matrix stored in `dtype` (F32, F16 or BF16) in the file; the
    /// in-memory load holds it as a tensor in the compute dtype.
    Dense {
        dtype: DType,
        rows: usize,
        cols: usize,
    },
    /// A quantized matrix whose large bytes are mapped.
    Quantized(Arc<dyn QuantMatrix>),
}

/// A frozen matrix read in place from the checkpoint's mapping.
pub struct StreamedWeight {
    held: Held,
    /// The bytes paged in for a use and dropped after it: the dense values or packed codes.
    pages: MappedBytes,
    id: usize,
    slot: Arc<Slot>,
    streamer: Arc<Streamer>,
}

/// A streamed matrix's pages, as the read-ahead thread sees them, and how many uses hold them.
#[derive(Debug)]
struct Slot {
    pages: MappedBytes,
    in_use: AtomicUsize,
    /// Kept resident (`--max-resident-gb`): its pages are never dropped.
    pinned: AtomicBool,
    /// Counted in `meter` as resident (paged in and not dropped since).
    resident: AtomicBool,
    meter: Arc<Meter>,
}

/// Mapped bytes the streamer holds resident, their high-water mark, and the pinned share.
#[derive(Debug, Default)]
struct Meter {
    resident: AtomicUsize,
    peak: AtomicUsize,
    pinned: AtomicUsize,
}

impl Slot {
    /// Counts the pages as resident (a use or the read-ahead is about to touch them).
    fn page_in(&self) {
        if !self.resident.swap(true, Ordering::SeqCst) {
            let len = self.pages.len();
            let now = self.meter.resident.fetch_add(len, Ordering::SeqCst) + len;
            self.meter.peak.fetch_max(now, Ordering::SeqCst);
        }
    }

    /// Drops the pages from the process, unless the matrix is pinned.
    fn page_out(&self) {
        if self.pinned.load(Ordering::SeqCst) {
            return;
        }
        self.pages.release();
        if self.resident.swap(false, Ordering::SeqCst) {
            self.meter
                .resident
                .fetch_sub(self.pages.len(), Ordering::SeqCst);
        }
    }
}

impl fmt::Debug for StreamedWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamedWeight({:?}, {:?})", self.held, self.pages)
    }
}

impl StreamedWeight {
    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.held {
            Held::Dense { rows, cols, .. } => (*rows, *cols),
            Held::Quantized(q) => q.dims(),
        }
    }

    pub fn held(&self) -> &Held {
        &self.held
    }

    /// The read-ahead state this matrix reports its uses to.
    pub fn streamer(&self) -> &Streamer {
        &self.streamer
    }

    /// Bytes of the file the matrix reads.
    pub fn mapped_bytes(&self) -> usize {
        self.pages.len()
    }

    /// Keeps the matrix's pages resident from now on (`--max-resident-gb`): they come in at
    /// its next use, or the read-ahead's, and no use drops them after.
    pub fn pin(&self) {
        if !self.slot.pinned.swap(true, Ordering::SeqCst) {
            (self.slot.meter.pinned).fetch_add(self.pages.len(), Ordering::SeqCst);
        }
    }

    /// Whether [`StreamedWeight::pin`] kept the matrix resident.
    pub fn is_pinned(&self) -> bool {
        self.slot.pinned.load(Ordering::SeqCst)
    }

    /// Bytes a use makes resident: the mapped pages, and for a dense matrix stored in another
    /// dtype than `dtype` the converted copy [`StreamedWeight::with_dense`] makes (quantized
    /// matrices dequantize in tiles, which are not counted).
    pub fn use_bytes(&self, dtype: ComputeDtype) -> usize {
        let converted = match self.held {
            Held::Dense {
                dtype: stored,
                rows,
                cols,
            } if stored != dtype.dtype() => rows * cols * dtype.dtype().size_in_bytes(),
            _ => 0,
        };
        self.mapped_bytes() + converted
    }

    /// Starts a use: records it (for read-ahead), hands the matrix expected next to the
    /// read-ahead thread, and drops this matrix's pages when the returned guard goes.
    pub fn use_pages(&self) -> InUse<'_> {
        self.slot.in_use.fetch_add(1, Ordering::SeqCst);
        self.slot.page_in();
        self.streamer.begin(self.id);
        InUse { weight: self }
    }

    /// Calls `f` with the dense matrix exactly as the in-memory load holds it (the file's
    /// values converted to the compute dtype as `Tensor::to_dtype` converts them): the mapped
    /// values themselves when the file holds `dtype` (and they are aligned), else a converted
    /// copy that lives for the call.
    pub(crate) fn with_dense<R>(
        &self,
        dtype: ComputeDtype,
        f: impl FnOnce(Values) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let Held::Dense { dtype: stored, .. } = self.held else {
            candle_core::bail!("streamed weight: not a dense matrix")
        };
        let bytes: &[u8] = &self.pages;
        match (stored, dtype) {
            (DType::F32, ComputeDtype::F32) if is_aligned::<f32>(bytes) => {
                // SAFETY: aligned (checked), length a multiple of 4 (the loader checked the
                // shape), and every bit pattern is an f32; little-endian files on x86/ARM.
                f(Values::F32(unsafe { cast_slice(bytes) }))
            }
            (DType::BF16, ComputeDtype::Bf16) if is_aligned::<half::bf16>(bytes) => {
                // SAFETY: as above, for 2-byte bf16 values.
                f(Values::Bf16(unsafe { cast_slice(bytes) }))
            }
            _ => {
                let t = self.dense_tensor(dtype)?;
                let (storage, layout) = t.storage_and_layout();
                let candle_core::Storage::Cpu(s) = &*storage else {
                    candle_core::bail!("streamed weight: not on the cpu")
                };
                let (a, b) = layout.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("streamed weight: not contiguous".into())
                })?;
                match s {
                    candle_core::CpuStorage::BF16(v) => f(Values::Bf16(&v[a..b])),
                    _ => f(Values::F32(&s.as_slice::<f32>()?[a..b])),
                }
            }
        }
    }

    /// The dense matrix as a tensor in `dtype`, as the in-memory load makes it.
    pub fn dense_tensor(&self, dtype: ComputeDtype) -> candle_core::Result<Tensor> {
        let Held::Dense {
            dtype: stored,
            rows,
            cols,
        } = self.held
        else {
            candle_core::bail!("streamed weight: not a dense matrix")
        };
        Tensor::from_raw_buffer(&self.pages, stored, &[rows, cols], &Device::Cpu)?
            .to_dtype(dtype.dtype())
    }

    /// Rows `r0..r1` of a dense matrix in f32, row-major, converted from the file's dtype as
    /// [`StreamedWeight::dense_tensor`] converts the whole: for a writer that goes through a
    /// bf16 or f16 table a block at a time instead of holding all of it in f32.
    pub(crate) fn dense_row_block_f32(
        &self,
        r0: usize,
        r1: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let Held::Dense {
            dtype: stored,
            rows,
            cols,
        } = self.held
        else {
            candle_core::bail!("streamed weight: not a dense matrix")
        };
        if r0 > r1 || r1 > rows {
            candle_core::bail!("streamed weight: rows {r0}..{r1} of {rows}")
        }
        let row_bytes = cols * stored.size_in_bytes();
        let block = &self.pages[r0 * row_bytes..r1 * row_bytes];
        Tensor::from_raw_buffer(block, stored, &[r1 - r0, cols], &Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()
    }

    /// Rows `ids` of a dense matrix as `[n, cols]` in f32, as the in-memory lookup gives them
    /// (the file's values rounded to the compute dtype first, then widened).
    pub(crate) fn dense_rows(
        &self,
        ids: &[u32],
        dtype: ComputeDtype,
    ) -> candle_core::Result<Tensor> {
        let Held::Dense {
            dtype: stored,
            rows,
            cols,
        } = self.held
        else {
            candle_core::bail!("streamed weight: not a dense matrix")
        };
        let row_bytes = cols * stored.size_in_bytes();
        let mut picked = Vec::with_capacity(ids.len() * row_bytes);
        for &id in ids {
            let r = id as usize;
            if r >= rows {
                candle_core::bail!("embedding: id {r} out of range for {rows} rows")
            }
            picked.extend_from_slice(&self.pages[r * row_bytes..(r + 1) * row_bytes]);
        }
        Tensor::from_raw_buffer(&picked, stored, &[ids.len(), cols], &Device::Cpu)?
            .to_dtype(dtype.dtype())?
            .to_dtype(DType::F32)
    }
}

fn is_aligned<T>(bytes: &[u8]) -> bool {
    (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        && bytes.len().is_multiple_of(std::mem::size_of::<T>())
}

/// # Safety
/// `bytes` is aligned for `T`, its length a multiple of `T`'s size, and every bit pattern a
/// valid `T`.
unsafe fn cast_slice<T>(bytes: &[u8]) -> &[T] {
    std::slice::from_raw_parts(
        bytes.as_ptr() as *const T,
        bytes.len() / std::mem::size_of::<T>(),
    )
}

/// A use of a streamed matrix; its pages are dropped when it ends.
pub struct InUse<'a> {
    weight: &'a StreamedWeight,
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        self.weight.slot.page_out();
        self.weight.slot.in_use.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The uses of one model's streamed matrices, for read-ahead.
pub struct Streamer {
    order: Mutex<Order>,
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Uses begun so far: a read-ahead asked for by use n is stale once use n + 1 began.
    uses: Arc<AtomicU64>,
    ahead: Mutex<Option<mpsc::Sender<ReadAhead>>>,
    meter: Arc<Meter>,
}

/// The pages of `slot`, asked for by use number `issued`.
struct ReadAhead {
    slot: Arc<Slot>,
    issued: u64,
}

#[derive(Default)]
struct Order {
    /// The last two uses, older first.
    last: [Option<usize>; 2],
    /// Which matrix followed each pair of uses, the last time the pair occurred.
    next: HashMap<(Option<usize>, usize), usize>,
    /// The matrices in the order the model asked for them while it was built.
    built: Vec<usize>,
    /// The matrix read ahead for the use that comes next.
    predicted: Option<usize>,
}

impl fmt::Debug for Streamer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Streamer({} matrices)", self.slots.lock().unwrap().len())
    }
}

impl Streamer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            order: Mutex::default(),
            slots: Mutex::default(),
            uses: Arc::default(),
            ahead: Mutex::default(),
            meter: Arc::default(),
        })
    }

    /// Mapped bytes held resident now: pinned matrices once used, those in use, and those
    /// read ahead (the pages of a dense matrix's dtype conversion and of quantized tiles are
    /// the ops' buffers, not counted here).
    pub fn resident_bytes(&self) -> usize {
        self.meter.resident.load(Ordering::SeqCst)
    }

    /// The high-water mark of [`Streamer::resident_bytes`] since the model was mapped.
    pub fn peak_resident_bytes(&self) -> usize {
        self.meter.peak.load(Ordering::SeqCst)
    }

    /// Mapped bytes of the pinned matrices ([`StreamedWeight::pin`]).
    pub fn pinned_bytes(&self) -> usize {
        self.meter.pinned.load(Ordering::SeqCst)
    }

    /// A streamed matrix held as `held`, reading `pages`.
    pub fn add(self: &Arc<Self>, held: Held, pages: MappedBytes) -> Result<StreamedWeight> {
        let (rows, cols) = match &held {
            Held::Dense { rows, cols, .. } => (*rows, *cols),
            Held::Quantized(q) => q.dims(),
        };
        if let Held::Dense { dtype, .. } = &held {
            if pages.len() != rows * cols * dtype.size_in_bytes() {
                bail!(
                    "a [{rows}, {cols}] {dtype:?} matrix needs {} bytes, the file has {}",
                    rows * cols * dtype.size_in_bytes(),
                    pages.len()
                )
            }
        }
        // Nothing is resident until a use pages it in.
        pages.release();
        let slot = Arc::new(Slot {
            pages: pages.clone(),
            in_use: AtomicUsize::new(0),
            pinned: AtomicBool::new(false),
            resident: AtomicBool::new(false),
            meter: self.meter.clone(),
        });
        let mut all = self.slots.lock().unwrap();
        all.push(slot.clone());
        Ok(StreamedWeight {
            held,
            pages,
            id: all.len() - 1,
            slot,
            streamer: self.clone(),
        })
    }

    /// Notes that the model was built with `weight` next (the read-ahead order before the
    /// run has shown its own).
    pub fn built(&self, weight: &StreamedWeight) {
        let mut o = self.order.lock().unwrap();
        if !o.built.contains(&weight.id) {
            o.built.push(weight.id);
        }
    }

    fn begin(&self, id: usize) {
        let issued = self.uses.fetch_add(1, Ordering::SeqCst) + 1;
        let predicted = {
            let mut o = self.order.lock().unwrap();
            if let [prev, Some(cur)] = o.last {
                if cur == id {
                    // The same matrix again (a tied head after the embedding does not count).
                    return;
                }
                o.next.insert((prev, cur), id);
            }
            o.last = [o.last[1], Some(id)];
            let learnt = o.next.get(&(o.last[0], id)).copied();
            let predicted = learnt
                .or_else(|| along_build_order(&o.built, o.last[0], id))
                .filter(|&n| n != id);
            (std::mem::replace(&mut o.predicted, predicted), predicted)
        };
        let (guessed, predicted) = predicted;
        let slots = self.slots.lock().unwrap();
        // A wrong guess: drop what was read ahead for it, so that it does not stay resident
        // until its own next use.
        if let Some(wrong) = guessed.filter(|&g| g != id) {
            if slots[wrong].in_use.load(Ordering::SeqCst) == 0 {
                slots[wrong].page_out();
            }
        }
        if let Some(next) = predicted {
            let slot = slots[next].clone();
            drop(slots);
            self.read_ahead(ReadAhead { slot, issued });
        }
    }

    /// Hands `pages` to the read-ahead thread (started on first use).
    ///
    /// A thread that falls behind (descheduled on a busy machine) must not leave pages
    /// resident that no use will drop soon: a request is skipped once a later use has begun,
    /// and pages brought in while the matrix's own use came and went are dropped again.
    fn read_ahead(&self, request: ReadAhead) {
        let mut ahead = self.ahead.lock().unwrap();
        let sender = ahead.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<ReadAhead>();
            let uses = self.uses.clone();
            let spawned = std::thread::Builder::new()
                .name("ferrule-read-ahead".into())
                .spawn(move || {
                    for r in rx {
                        if uses.load(Ordering::SeqCst) != r.issued {
                            continue;
                        }
                        r.slot.page_in();
                        r.slot.pages.populate();
                        if uses.load(Ordering::SeqCst) > r.issued + 1
                            && r.slot.in_use.load(Ordering::SeqCst) == 0
                        {
                            r.slot.page_out();
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::debug!("--stream-base: no read-ahead thread ({e}); pages load on use");
            }
            tx
        });
        // A send fails only without the thread: the pages then load on use.
        let _ = sender.send(request);
    }
}

/// The next use when the last two walk the build order: forward (the matrix built after
/// `id`) or backward (the one built before it); `None` otherwise.
fn along_build_order(built: &[usize], prev: Option<usize>, id: usize) -> Option<usize> {
    let at = built.iter().position(|&b| b == id)?;
    let before = at.checked_sub(1).map(|i| built[i]);
    let after = built.get(at + 1).copied();
    match prev {
        None => after,
        Some(p) if Some(p) == before => after,
        Some(p) if Some(p) == after => before,
        Some(_) => None,
    }
}

/// A float matrix of a bitsandbytes folder (the embedding or head beside the 4-bit layers,
/// stored in f32 with values that bf16 holds exactly), read row by row from the mapping: what
/// the in-memory load holds as [`crate::quant::Bf16Rows`], with the same values and format
/// name.
#[derive(Debug)]
pub struct MappedRows {
    dtype: DType,
    rows: usize,
    cols: usize,
    bytes: MappedBytes,
}

impl MappedRows {
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: MappedBytes) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
            || bytes.len() != rows * cols * dtype.size_in_bytes()
        {
            bail!(
                "a [{rows}, {cols}] {dtype:?} table does not fit its {} bytes",
                bytes.len()
            )
        }
        Ok(Self {
            dtype,
            rows,
            cols,
            bytes,
        })
    }
}

impl QuantMatrix for MappedRows {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let size = self.dtype.size_in_bytes();
        let bytes = &self.bytes[r0 * self.cols * size..r1 * self.cols * size];
        let out = &mut out[..(r1 - r0) * self.cols];
        match self.dtype {
            DType::F32 => out
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            DType::BF16 => out
                .iter_mut()
                .zip(bytes.chunks_exact(2))
                .for_each(|(o, b)| *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            _ => out
                .iter_mut()
                .zip(bytes.chunks_exact(2))
                .for_each(|(o, b)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        }
    }

    fn storage_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The in-memory load's name for the same table ([`crate::quant::Bf16Rows`]), so that an
    /// adapter records the same base (`ferrule_base.json`) streamed or not.
    fn format(&self) -> String {
        "bf16".to_string()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn slice_rows(&self, _r0: usize, _r1: usize) -> Result<Arc<dyn QuantMatrix>> {
        bail!("a streamed table cannot be sharded (--stream-base with --shard-base)")
    }
}
