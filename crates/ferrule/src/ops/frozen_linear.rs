//! `y = x Wᵀ (+ b)` for a weight that is never trained, dense or quantized.
//!
//! candle's matmul backward always computes the weight gradient (docs/ARCHITECTURE.md, decisions, fix 3), which for
//! a frozen base is a full wasted GEMM per layer and a weight-sized buffer. This custom op
//! runs the forward GEMM itself (gemm crate) and its backward returns only `dX = dY W`.
//!
//! A quantized weight ([`QuantMatrix`]: NF4/FP4, int8, GGUF blocks) goes through the same op:
//! forward and backward walk the weight in tiles of rows, dequantize one tile into a scratch
//! buffer and multiply it, so at most [`TILE_ELEMS`] values of the layer are ever in f32 (QLoRA,
//! Dettmers et al. 2023, eq. 5: the 4-bit storage is dequantized to the compute type only for
//! the matmul). A dense weight is one tile, read in place.
//!
//! This is the kernel interface a GPU implementation fills in: `cuda_fwd` over the same packed
//! data. Until one exists, other devices dequantize the whole weight and use candle's matmul.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use super::compute_dtype::ComputeDtype;
use super::product::{self, Operand, Values};
use crate::dist::ShardedWeight;
use crate::model::stream::{Held, StreamedWeight};
use crate::quant::QuantMatrix;

/// Most weight values dequantized at once (4 MiB of f32); a SmolLM2 projection fits in one
/// tile, its 49152-row embedding head takes 28.
pub const TILE_ELEMS: usize = 1 << 20;

/// A frozen `[out, in]` weight: a dense tensor, a quantized matrix, this rank's rows of
/// either (`--shard-base`; reading it is a collective, see [`crate::dist::sharded_base`]), or
/// either read in place from the checkpoint's mapping (`--stream-base`,
/// [`crate::model::stream`]).
///
/// Its products run in its compute dtype ([`FrozenWeight::compute_dtype`]): a dense weight's
/// is its tensor's dtype (f32, or bf16 held in bf16); a quantized or sharded weight carries
/// it, and its tiles are dequantized to it.
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    /// An f32 or bf16 tensor.
    Dense(Tensor),
    Quantized(Arc<dyn QuantMatrix>, ComputeDtype),
    Sharded(Arc<ShardedWeight>, ComputeDtype),
    /// Paged in from the checkpoint file for each use and dropped after it; computes exactly
    /// as the dense or quantized weight the in-memory load holds.
    Streamed(Arc<StreamedWeight>, ComputeDtype),
}

impl FrozenWeight {
    /// `(rows, cols)` = `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            FrozenWeight::Dense(t) => t.dims2().unwrap_or((0, 0)),
            FrozenWeight::Quantized(q, _) => q.dims(),
            FrozenWeight::Sharded(s, _) => s.dims(),
            FrozenWeight::Streamed(s, _) => s.dims(),
        }
    }

    /// The dtype its products run in.
    pub fn compute_dtype(&self) -> ComputeDtype {
        match self {
            FrozenWeight::Dense(t) if t.dtype() == DType::BF16 => ComputeDtype::Bf16,
            FrozenWeight::Dense(_) => ComputeDtype::F32,
            FrozenWeight::Quantized(_, d)
            | FrozenWeight::Sharded(_, d)
            | FrozenWeight::Streamed(_, d) => *d,
        }
    }

    /// The weight in f32 (a copy when quantized or held in bf16; gathered from every rank
    /// when sharded).
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => t.to_dtype(DType::F32),
            FrozenWeight::Quantized(q, _) => Tensor::from_vec(q.dequantize(), q.dims(), device),
            FrozenWeight::Sharded(s, _) => Tensor::from_vec(
                s.gather().map_err(candle_core::Error::wrap)?,
                s.dims(),
                device,
            ),
            FrozenWeight::Streamed(s, dtype) => {
                let _in_use = s.use_pages();
                match s.held() {
                    Held::Dense { .. } => s.dense_tensor(*dtype)?.to_dtype(DType::F32),
                    Held::Quantized(q) => Tensor::from_vec(q.dequantize(), q.dims(), device),
                }
            }
        }
    }

    /// Rows `ids` (flattened) as `[n, cols]` in f32: an embedding lookup that dequantizes only
    /// the rows it reads.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => t.index_select(ids, 0)?.to_dtype(DType::F32),
            FrozenWeight::Quantized(q, _) => quantized_rows(q.as_ref(), ids),
            FrozenWeight::Streamed(s, dtype) => {
                let _in_use = s.use_pages();
                match s.held() {
                    Held::Dense { .. } => {
                        let flat: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
                        s.dense_rows(&flat, *dtype)?.to_device(ids.device())
                    }
                    Held::Quantized(q) => quantized_rows(q.as_ref(), ids),
                }
            }
            FrozenWeight::Sharded(s, _) => {
                let device = ids.device().clone();
                let ids: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
                let out = s.rows(&ids).map_err(candle_core::Error::wrap)?;
                Tensor::from_vec(out, (ids.len(), s.dims().1), &device)
            }
        }
    }

    /// Bytes the weight occupies (quantization statistics included).
    pub fn storage_bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            FrozenWeight::Quantized(q, _) => q.storage_bytes(),
            FrozenWeight::Sharded(s, _) => s.local_bytes(),
            FrozenWeight::Streamed(s, _) => s.mapped_bytes(),
        }
    }

    /// A dense f32 `weight` (e.g. a base modified by an adapter's initialisation) held in
    /// `dtype`, the compute dtype of the weight it replaces.
    pub fn dense_in(weight: Tensor, dtype: ComputeDtype) -> Result<Self> {
        Ok(FrozenWeight::Dense(weight.to_dtype(dtype.dtype())?))
    }
}

/// A frozen linear layer: weight `[out, in]` (HF layout), optional bias `[out]`.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self::from_weight(
            FrozenWeight::Dense(weight.detach().contiguous()?),
            bias,
        ))
    }

    pub fn from_weight(weight: FrozenWeight, bias: Option<Tensor>) -> Self {
        let weight = match weight {
            FrozenWeight::Dense(t) => FrozenWeight::Dense(t.detach()),
            q => q,
        };
        Self {
            weight,
            bias: bias.map(|b| b.detach()),
        }
    }

    pub fn weight(&self) -> &FrozenWeight {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused_ok(x) {
            // The bias is added inside the op: no node (and no gradient buffer) for the sum.
            return x
                .contiguous()?
                .apply_op1_arc(Arc::new(Box::new(FrozenMatmul {
                    weight: self.weight.clone(),
                    bias: self.bias.clone(),
                })));
        }
        // Other devices/dtypes: candle's matmul (its backward also computes an unused dW).
        let w = self.weight.to_dense(x.device())?.to_dtype(x.dtype())?;
        let y = match x.dims() {
            [b, t, i] => x
                .reshape((b * t, *i))?
                .matmul(&w.t()?)?
                .reshape((*b, *t, ()))?,
            _ => x.matmul(&w.t()?)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

impl FrozenLinear {
    /// Whether the CPU custom ops take `x` with this weight: f32 input on the CPU, and a
    /// contiguous f32 or bf16 or a quantized weight.
    pub(crate) fn fused_ok(&self, x: &Tensor) -> bool {
        let weight_ok = match &self.weight {
            FrozenWeight::Dense(w) => {
                matches!(w.dtype(), DType::F32 | DType::BF16)
                    && w.is_contiguous()
                    && w.device().is_cpu()
            }
            FrozenWeight::Quantized(..)
            | FrozenWeight::Sharded(..)
            | FrozenWeight::Streamed(..) => true,
        };
        let bias_ok = self.bias.as_ref().is_none_or(|b| b.device().is_cpu());
        super::kernels::fused_ok(x) && weight_ok && bias_ok
    }
}

struct FrozenMatmul {
    weight: FrozenWeight,
    bias: Option<Tensor>,
}

/// A dense weight's values, in place.
fn dense_values<'a>(storage: &'a Storage, layout: &Layout) -> Result<Values<'a>> {
    let Storage::Cpu(s) = storage else {
        candle_core::bail!("frozen-linear: weight not on cpu")
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("frozen-linear: weight not contiguous".into()))?;
    Ok(match s {
        CpuStorage::BF16(v) => Values::Bf16(&v[a..b]),
        _ => Values::F32(&s.as_slice::<f32>()?[a..b]),
    })
}

/// Calls `f(r0, r1, tile)` for consecutive row tiles of the weight, `tile` holding rows
/// `r0..r1` in the weight's compute dtype: the dense weight itself, or a quantized tile
/// dequantized (in parallel) into a reused buffer. Stops at `f`'s first error, except for a
/// sharded weight, whose tiles are a collective every rank walks to the end.
pub(crate) fn for_each_tile(
    weight: &FrozenWeight,
    mut f: impl FnMut(usize, usize, Values) -> Result<()>,
) -> Result<()> {
    match weight {
        FrozenWeight::Dense(w) => {
            let (rows, _) = w.dims2()?;
            let (storage, layout) = w.storage_and_layout();
            f(0, rows, dense_values(&storage, layout)?)?;
        }
        FrozenWeight::Quantized(q, dtype) => quantized_tiles(q.as_ref(), *dtype, f)?,
        FrozenWeight::Streamed(s, dtype) => {
            // The pages are dropped when the walk ends, also on an error.
            let _in_use = s.use_pages();
            match s.held() {
                Held::Dense { .. } => {
                    let (rows, _) = s.dims();
                    s.with_dense(*dtype, |values| f(0, rows, values))?
                }
                Held::Quantized(q) => quantized_tiles(q.as_ref(), *dtype, f)?,
            }
        }
        FrozenWeight::Sharded(s, dtype) => {
            let mut rounded = Vec::new();
            let mut first_error = Ok(());
            s.for_each_tile(|r0, r1, tile| {
                if first_error.is_err() {
                    return;
                }
                first_error = match dtype {
                    ComputeDtype::F32 => f(r0, r1, Values::F32(tile)),
                    ComputeDtype::Bf16 => {
                        rounded.resize(tile.len(), half::bf16::ZERO);
                        super::bf16::to_bf16_into(tile, &mut rounded);
                        f(r0, r1, Values::Bf16(&rounded))
                    }
                };
            })
            .map_err(candle_core::Error::wrap)?;
            first_error?
        }
    }
    Ok(())
}

/// A quantized weight's tiles: rows dequantized (in parallel) into a reused buffer.
fn quantized_tiles(
    q: &dyn QuantMatrix,
    dtype: ComputeDtype,
    mut f: impl FnMut(usize, usize, Values) -> Result<()>,
) -> Result<()> {
    let (rows, cols) = q.dims();
    let tile_rows = (TILE_ELEMS / cols.max(1)).clamp(1, rows.max(1));
    let chunk_rows = tile_rows
        .div_ceil(rayon::current_num_threads().max(1))
        .max(1);
    let mut tile = TileBuffer::new(dtype, tile_rows * cols);
    for r0 in (0..rows).step_by(tile_rows) {
        let r1 = (r0 + tile_rows).min(rows);
        tile.fill(r1 - r0, cols, chunk_rows, |a, b, out| {
            q.dequantize_rows(r0 + a, r0 + b, out)
        });
        f(r0, r1, tile.values((r1 - r0) * cols))?;
    }
    Ok(())
}

/// Rows `ids` of a quantized table in f32, dequantizing only those rows.
fn quantized_rows(q: &dyn QuantMatrix, ids: &Tensor) -> Result<Tensor> {
    let (rows, cols) = q.dims();
    let device = ids.device().clone();
    let ids: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    let mut out = vec![0f32; ids.len() * cols];
    for (i, &id) in ids.iter().enumerate() {
        let r = id as usize;
        if r >= rows {
            candle_core::bail!("embedding: id {r} out of range for {rows} rows")
        }
        q.dequantize_rows(r, r + 1, &mut out[i * cols..(i + 1) * cols]);
    }
    Tensor::from_vec(out, (ids.len(), cols), &device)
}

/// [`for_each_tile`] with every tile in f32 (widened when held in bf16), for the callers that
/// read weight values rather than multiply with them (DoRA's row norms).
pub(crate) fn for_each_tile_f32(
    weight: &FrozenWeight,
    mut f: impl FnMut(usize, usize, &[f32]),
) -> Result<()> {
    for_each_tile(weight, |r0, r1, tile| {
        f(r0, r1, &tile.to_f32());
        Ok(())
    })
}

/// The reused buffer of a quantized weight's tiles, in its compute dtype.
enum TileBuffer {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl TileBuffer {
    fn new(dtype: ComputeDtype, len: usize) -> Self {
        match dtype {
            ComputeDtype::F32 => TileBuffer::F32(vec![0f32; len]),
            ComputeDtype::Bf16 => TileBuffer::Bf16(vec![half::bf16::ZERO; len]),
        }
    }

    /// Fills the first `rows × cols` values, `chunk_rows` rows per rayon task, with
    /// `dequantize(first row, end row, out)` (rows counted from the tile's first); in bf16 each task dequantizes into f32 scratch
    /// and rounds.
    fn fill(
        &mut self,
        rows: usize,
        cols: usize,
        chunk_rows: usize,
        dequantize: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) {
        let len = rows * cols;
        match self {
            TileBuffer::F32(buf) => buf[..len]
                .par_chunks_mut(chunk_rows * cols)
                .enumerate()
                .for_each(|(i, part)| {
                    let a = i * chunk_rows;
                    dequantize(a, a + part.len() / cols, part)
                }),
            TileBuffer::Bf16(buf) => buf[..len]
                .par_chunks_mut(chunk_rows * cols)
                .enumerate()
                .for_each(|(i, part)| {
                    let a = i * chunk_rows;
                    let mut scratch = vec![0f32; part.len()];
                    dequantize(a, a + part.len() / cols, &mut scratch);
                    super::bf16::to_bf16_into(&scratch, part);
                }),
        }
    }

    fn values(&self, len: usize) -> Values<'_> {
        match self {
            TileBuffer::F32(b) => Values::F32(&b[..len]),
            TileBuffer::Bf16(b) => Values::Bf16(&b[..len]),
        }
    }
}

/// `y += x Wᵀ` into `y: [m, out]` for row-major `x: [m, in]`, one weight tile at a time, each
/// tile's product added in place into its columns of `y`. In bf16, `x` is rounded once.
///
/// Callers pass a freshly zeroed `y`: adding to it costs nothing extra in a BLAS, whose kernels
/// add to the output anyway, while overwriting (β = 0) makes OpenBLAS zero it in a pass of its
/// own (2.5% of a MiniLM step in perf).
pub(crate) fn add_product(weight: &FrozenWeight, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
    let (_, in_f) = weight.dims();
    assert!(x.len() >= m * in_f, "frozen-linear: buffer too short");
    let x = Operand::new(&x[..m * in_f], weight.compute_dtype());
    add_product_of(weight, &x, m, y)
}

/// [`add_product`] for an `x` already in the weight's compute dtype, for callers that
/// multiply one activation with several weights (the frozen MLP's gate and up projections).
pub(crate) fn add_product_of(
    weight: &FrozenWeight,
    x: &Operand,
    m: usize,
    y: &mut [f32],
) -> Result<()> {
    let (out_f, in_f) = weight.dims();
    assert!(
        x.values().len() >= m * in_f && y.len() >= m * out_f,
        "frozen-linear: buffer too short"
    );
    for_each_tile(weight, |r0, r1, tile| {
        // SAFETY: Y's sub-block starts at column r0 with row stride out_f; X is [m, in]
        // row-major; the tile is [r1 - r0, in] row-major, read transposed (col stride in).
        unsafe {
            product::gemm(
                m,
                r1 - r0,
                in_f,
                y.as_mut_ptr().add(r0),
                out_f,
                true,
                x.values().view(0, in_f, 1),
                tile.view(0, 1, in_f),
            )
        }
    })
}

/// `dx += dy W` (the frozen layer's input gradient) for row-major `dy: [m, out]`, summed
/// over the weight's tiles: `Σ dY[:, r0..r1] · W[r0..r1, :]`. As in [`add_product`], callers
/// start from a zeroed `dx`. In bf16, `dy` is rounded once.
pub(crate) fn add_input_grad(
    weight: &FrozenWeight,
    dy: &[f32],
    m: usize,
    dx: &mut [f32],
) -> Result<()> {
    let (out_f, in_f) = weight.dims();
    assert!(
        dy.len() >= m * out_f && dx.len() >= m * in_f,
        "frozen-linear: buffer too short"
    );
    let dy = Operand::new(&dy[..m * out_f], weight.compute_dtype());
    for_each_tile(weight, |r0, r1, tile| {
        // SAFETY: the dY sub-block starts at column r0 with row stride out_f; the tile is
        // [r1 - r0, in] row-major; dX is [m, in].
        unsafe {
            product::gemm(
                m,
                in_f,
                r1 - r0,
                dx.as_mut_ptr(),
                in_f,
                true,
                dy.values().view(r0, out_f, 1),
                tile.view(0, in_f, 1),
            )
        }
    })
}

/// Adds the bias `[out]` to every row of `y`.
pub(crate) fn add_bias(bias: Option<&Tensor>, y: &mut [f32], out_f: usize) -> Result<()> {
    let Some(b) = bias else { return Ok(()) };
    let b = b.to_dtype(DType::F32)?;
    super::kernels::with_f32(&b, "frozen-linear bias", |b| {
        y.par_chunks_mut(out_f)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
        Ok(())
    })
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let k = *dims
            .last()
            .ok_or_else(|| candle_core::Error::Msg("frozen-linear: scalar input".into()))?;
        let (out_f, in_f) = self.weight.dims();
        if k != in_f {
            candle_core::bail!("frozen-linear: input has {k} features, weight expects {in_f}")
        }
        let m = layout.shape().elem_count() / k;
        let x = super::kernels::contiguous_f32(storage, layout, self.name())?;
        let mut y = vec![0f32; m * out_f];
        add_product(&self.weight, x, m, &mut y)?;
        add_bias(self.bias.as_ref(), &mut y, out_f)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // No dW and no bias gradient: both are frozen.
        let g = grad_res.contiguous()?;
        let (_, in_f) = self.weight.dims();
        let m = arg.elem_count() / in_f.max(1);
        let mut dx = vec![0f32; m * in_f];
        // Read dY in place (it is contiguous) instead of copying it into a Vec.
        super::kernels::with_f32(&g, self.name(), |dy| {
            add_input_grad(&self.weight, dy, m, &mut dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Blockwise4, Code4};
    use candle_core::Var;

    /// The quantized op computes exactly what the dense op computes on the dequantized weight,
    /// forward and backward, also when the weight spans several tiles.
    #[test]
    fn quantized_tiles_match_the_dequantized_dense_weight() {
        let (rows, cols) = (TILE_ELEMS / 64 + 37, 64); // two tiles, the second partial
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| (((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0) * 0.05)
            .collect();
        let q = Arc::new(Blockwise4::quantize(&vals, &[rows, cols], Code4::Nf4, 64, true).unwrap());
        let dense = Tensor::from_vec(q.dequantize(), (rows, cols), &Device::Cpu).unwrap();
        let lin_q = FrozenLinear::from_weight(FrozenWeight::Quantized(q, ComputeDtype::F32), None);
        let lin_d = FrozenLinear::new(dense, None).unwrap();
        let x0: Vec<f32> = (0..3 * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut results = vec![];
        for lin in [&lin_q, &lin_d] {
            let x = Var::from_vec(x0.clone(), (3, cols), &Device::Cpu).unwrap();
            let y = lin.forward(x.as_tensor()).unwrap();
            let loss = (&y * &y).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let dx: Vec<f32> = grads
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            results.push((y, dx));
        }
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
        };
        assert!(close(&results[0].0, &results[1].0), "forward differs");
        assert!(close(&results[0].1, &results[1].1), "dX differs");
    }
}
