//! Building blocks of the fused CPU custom ops (`norm`, `rope`, `attention`, `loss`).
//!
//! candle's autograd stores a gradient for every argument of every tracked node, constants
//! included, and composite ops keep their intermediates alive until backward ends. The fused
//! ops capture their constants (norm weights, rope tables, masks, labels) in the op struct, so
//! the graph holds one node whose backward returns only the input gradient.
//!
//! Inner loops are written over slices with fixed-width lane accumulators so they vectorise;
//! row kernels are compiled twice (baseline and AVX2+FMA) and picked at run time
//! ([`multiversion!`]); rows are spread over rayon with about four chunks per thread.

use super::blas::Strided;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Width of the lane accumulators in the reductions (two AVX2 registers, four SSE ones).
const LANES: usize = 16;

/// Defines `fn $name(args) -> ret` twice, as a baseline build and as an AVX2+FMA build
/// (`#[target_feature]`), and dispatches at run time. The body is inlined into both, so
/// the slice loops inside it are vectorised for each target.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[inline(always)]
fn hsum(acc: [f32; LANES]) -> f32 {
    // Pairwise, so the result does not depend on the target's vector width.
    let mut a = acc;
    let mut w = LANES / 2;
    while w > 0 {
        for k in 0..w {
            a[k] += a[k + w];
        }
        w /= 2;
    }
    a[0]
}

/// `Σ a`.
#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let ch = a.chunks_exact(LANES);
    let rem = ch.remainder();
    for c in ch {
        for k in 0..LANES {
            acc[k] += c[k];
        }
    }
    let mut s = hsum(acc);
    for &v in rem {
        s += v;
    }
    s
}

/// `Σ (a − m)²`.
#[inline(always)]
pub(crate) fn sum_sq_centered(a: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let ch = a.chunks_exact(LANES);
    let rem = ch.remainder();
    for c in ch {
        for k in 0..LANES {
            let d = c[k] - m;
            acc[k] += d * d;
        }
    }
    let mut s = hsum(acc);
    for &v in rem {
        s += (v - m) * (v - m);
    }
    s
}

/// `Σ a·b`.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let full = n / LANES * LANES;
    for (ca, cb) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for k in 0..LANES {
            acc[k] += ca[k] * cb[k];
        }
    }
    let mut s = hsum(acc);
    for i in full..n {
        s += a[i] * b[i];
    }
    s
}

/// `Σ a·b·c`.
#[inline(always)]
pub(crate) fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0f32; LANES];
    let full = n / LANES * LANES;
    for ((ca, cb), cc) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
        .zip(c[..full].chunks_exact(LANES))
    {
        for k in 0..LANES {
            acc[k] += ca[k] * cb[k] * cc[k];
        }
    }
    let mut s = hsum(acc);
    for i in full..n {
        s += a[i] * b[i] * c[i];
    }
    s
}

/// `Σ a·b·(c − m)`.
#[inline(always)]
pub(crate) fn dot3_centered(a: &[f32], b: &[f32], c: &[f32], m: f32) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0f32; LANES];
    let full = n / LANES * LANES;
    for ((ca, cb), cc) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
        .zip(c[..full].chunks_exact(LANES))
    {
        for k in 0..LANES {
            acc[k] += ca[k] * cb[k] * (cc[k] - m);
        }
    }
    let mut s = hsum(acc);
    for i in full..n {
        s += a[i] * b[i] * (c[i] - m);
    }
    s
}

/// `max a` (−∞ for an empty slice). NaNs are skipped, as candle's `max_keepdim` does.
#[inline(always)]
pub(crate) fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let ch = a.chunks_exact(LANES);
    let rem = ch.remainder();
    for c in ch {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in acc.into_iter().chain(rem.iter().copied()) {
        if v > m {
            m = v;
        }
    }
    m
}

/// `eˣ` in f32, branch-free so loops over it vectorise (Cephes `expf`: range reduction by
/// ln 2, degree-5 polynomial; within 2 ulp of `f32::exp`). Below −87.3 it returns 0
/// (flushing the subnormal range), above 88.3 it saturates at about 2·10³⁸.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const LO: f32 = -87.3;
    const HI: f32 = 88.3;
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = r * r * p + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    let y = e * scale;
    if x < LO {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Runs `f(first_row, chunk)` over `out` cut into chunks of whole rows of `row_len`
/// elements, on rayon: about four chunks per thread (`candle_core::utils::get_num_threads`),
/// none smaller than ~32K elements of work (`row_cost` per row), serially when that leaves one.
pub(crate) fn par_rows<T: Send>(
    out: &mut [T],
    row_len: usize,
    row_cost: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if row_len == 0 || out.is_empty() {
        return;
    }
    let rows = out.len() / row_len;
    let threads = candle_core::utils::get_num_threads().max(1);
    let min_rows = (32 * 1024 / row_cost.max(1)).max(1);
    let rows_per = rows.div_ceil(threads * 4).max(min_rows);
    if threads == 1 || rows_per >= rows {
        f(0, out);
        return;
    }
    out.par_chunks_mut(rows_per * row_len)
        .enumerate()
        .for_each(|(i, c)| f(i * rows_per, c));
}

/// A matrix operand for [`matmul`]: row-major `data` of the stored shape, rows `rs` apart
/// (0: packed); `transposed` reads it as its transpose.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub transposed: bool,
    pub rs: usize,
}

impl<'a> Mat<'a> {
    pub fn n(data: &'a [f32]) -> Self {
        Self {
            data,
            transposed: false,
            rs: 0,
        }
    }
    pub fn t(data: &'a [f32]) -> Self {
        Self {
            data,
            transposed: true,
            rs: 0,
        }
    }
    /// The same operand with its stored rows `rs` elements apart (a strided view).
    pub fn rows_apart(self, rs: usize) -> Self {
        Self { rs, ..self }
    }
    /// The operand from stored row `rows` on, rows `rs` apart.
    pub fn skip_rows(self, rows: usize, rs: usize) -> Self {
        Self {
            data: &self.data[rows * rs..],
            rs,
            ..self
        }
    }
    /// (column stride, row stride, elements spanned) as a `rows × cols` matrix.
    fn strides(&self, rows: usize, cols: usize) -> (usize, usize, usize) {
        let (stored_rows, stored_cols) = if self.transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let rs = if self.rs == 0 { stored_cols } else { self.rs };
        let span = if stored_rows == 0 || stored_cols == 0 {
            0
        } else {
            (stored_rows - 1) * rs + stored_cols
        };
        if self.transposed {
            (rs, 1, span)
        } else {
            (1, rs, span)
        }
    }
}

/// `dst (m×n, row-major) = [dst +] scale · A·B` with `A` m×k and `B` k×n as [`Mat`]s, on the
/// calling thread (callers parallelise over independent blocks). The argument list is a BLAS
/// gemm's (sizes, output, operands, scale).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
) {
    let (a, b) = operands(m, n, k, dst, a, b);
    // SAFETY: `operands` checked that the strides address only elements of the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1f32,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// [`matmul`] as one large product over all threads (through [`super::blas`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_par(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
) {
    let (a, b) = operands(m, n, k, dst, a, b);
    // SAFETY: as in `matmul`.
    unsafe { super::blas::gemm_par(m, n, k, dst.as_mut_ptr(), n, accumulate, a, b, scale) }
}

/// The two operands as strided pointers, after checking that the slices cover them.
fn operands(m: usize, n: usize, k: usize, dst: &[f32], a: Mat, b: Mat) -> (Strided, Strided) {
    let (a_cs, a_rs, a_span) = a.strides(m, k);
    let (b_cs, b_rs, b_span) = b.strides(k, n);
    assert!(
        dst.len() >= m * n && a.data.len() >= a_span && b.data.len() >= b_span,
        "matmul: operand too short"
    );
    (
        Strided {
            ptr: a.data.as_ptr(),
            cs: a_cs as isize,
            rs: a_rs as isize,
        },
        Strided {
            ptr: b.data.as_ptr(),
            cs: b_cs as isize,
            rs: b_rs as isize,
        },
    )
}

/// The f32 elements of a CPU storage under a contiguous layout.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Calls `f` with the f32 elements of a contiguous CPU tensor (a captured constant, or an
/// argument/gradient in a backward pass).
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(contiguous_f32(s, layout, op)?),
        _ => candle_core::bail!("{op}: tensor not on cpu"),
    }
}

/// [`with_f32`] for several tensors at once: `f` gets their elements in the same order.
pub(crate) fn with_f32s<const N: usize, R>(
    ts: [&Tensor; N],
    op: &str,
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    let guards = ts.map(|t| t.storage_and_layout());
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slot, (storage, layout)) in slices.iter_mut().zip(&guards) {
        *slot = match &**storage {
            Storage::Cpu(s) => contiguous_f32(s, layout, op)?,
            _ => candle_core::bail!("{op}: tensor not on cpu"),
        };
    }
    f(slices)
}

/// True when the fused CPU path applies: f32 on the CPU.
pub(crate) fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// `Σ_t a_ti b_ti` per column `i` of two row-major `[rows, cols]` matrices, over blocks of rows
/// in parallel (a scale vector's gradient: DoRA's magnitude, IA3's `l`).
pub(crate) fn column_dot(a: &[f32], b: &[f32], cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    a.par_chunks(cols.max(1) * 64)
        .zip(b.par_chunks(cols.max(1) * 64))
        .map(|(a, b)| {
            let mut acc = vec![0f32; cols];
            for (a, b) in a.chunks(cols.max(1)).zip(b.chunks(cols.max(1))) {
                acc.iter_mut()
                    .zip(a.iter().zip(b))
                    .for_each(|(s, (a, b))| *s += a * b);
            }
            acc
        })
        .reduce(
            || vec![0f32; cols],
            |mut s, t| {
                s.iter_mut().zip(t).for_each(|(s, t)| *s += t);
                s
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn matmul_reads_transposed_operands() {
        // A (2×3) = [[1,2,3],[4,5,6]], B (3×2) = [[1,0],[0,1],[1,1]]: A·B = [[4,5],[10,11]].
        let a = [1., 2., 3., 4., 5., 6.];
        let a_t = [1., 4., 2., 5., 3., 6.];
        let b = [1., 0., 0., 1., 1., 1.];
        let b_t = [1., 0., 1., 0., 1., 1.];
        for (am, bm) in [
            (Mat::n(&a), Mat::n(&b)),
            (Mat::t(&a_t), Mat::n(&b)),
            (Mat::n(&a), Mat::t(&b_t)),
            (Mat::t(&a_t), Mat::t(&b_t)),
        ] {
            let mut c = [0f32; 4];
            matmul(2, 2, 3, &mut c, false, am, bm, 1.0);
            assert_eq!(c, [4., 5., 10., 11.]);
            matmul(2, 2, 3, &mut c, true, am, bm, 0.5);
            assert_eq!(c, [6., 7.5, 15., 16.5]);
        }
    }

    #[test]
    fn matmul_reads_strided_rows() {
        // The same A and B as above, their rows padded to 5 elements with junk.
        let a = [1., 2., 3., -9., -9., 4., 5., 6.];
        let b_t = [1., 0., 1., -9., -9., 0., 1., 1.];
        let mut c = [0f32; 4];
        matmul(
            2,
            2,
            3,
            &mut c,
            false,
            Mat::n(&a).rows_apart(5),
            Mat::t(&b_t).rows_apart(5),
            1.0,
        );
        assert_eq!(c, [4., 5., 10., 11.]);
    }

    #[test]
    fn reductions() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let s: f32 = a.iter().sum();
        assert!((sum(&a) - s).abs() < 1e-5);
        let d: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - d).abs() < 1e-5);
        let d3: f32 = a.iter().zip(&b).map(|(x, y)| x * y * y).sum();
        assert!((dot3(&a, &b, &b) - d3).abs() < 1e-5);
        assert_eq!(max(&a), a.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    }
}
