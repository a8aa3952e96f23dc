//! One product of the frozen base, `dst += A·B`, in the compute dtype of its weight: through
//! [`super::blas::gemm_par`] in f32, or [`super::onednn::bf16_gemm`] in bf16 with f32
//! accumulation ([`super::compute_dtype`]).
//!
//! The frozen-linear, frozen-MLP and head ops walk a weight in tiles ([`super::frozen_linear`])
//! and multiply each tile with an activation. In bf16 the activation is rounded to bf16 once
//! ([`Operand::new`]) and every tile's product reads it, as torch autocast casts a linear
//! layer's input before its bf16 matmul.

use half::bf16;

use super::blas::{gemm_par, Strided};
use super::compute_dtype::ComputeDtype;
use super::onednn::{bf16_gemm, Bf16Strided};

/// A matrix's values as held: f32, or bf16.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> Values<'a> {
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }

    /// The values as a matrix starting at element `offset`, element `(i, j)` at
    /// `offset + i·rs + j·cs`.
    pub fn view(self, offset: usize, rs: usize, cs: usize) -> View<'a> {
        View {
            values: self,
            offset,
            rs: rs as isize,
            cs: cs as isize,
        }
    }

    /// The values in f32: borrowed, or widened (exact) when held in bf16.
    pub fn to_f32(self) -> std::borrow::Cow<'a, [f32]> {
        match self {
            Values::F32(v) => std::borrow::Cow::Borrowed(v),
            Values::Bf16(v) => std::borrow::Cow::Owned(super::bf16::to_f32(v)),
        }
    }
}

/// A strided matrix over [`Values`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    values: Values<'a>,
    offset: usize,
    rs: isize,
    cs: isize,
}

/// An f32 activation in a weight's compute dtype: borrowed in f32, rounded once in bf16.
pub(crate) enum Operand<'a> {
    F32(&'a [f32]),
    Bf16(Vec<bf16>),
}

impl<'a> Operand<'a> {
    pub fn new(x: &'a [f32], dtype: ComputeDtype) -> Self {
        match dtype {
            ComputeDtype::F32 => Operand::F32(x),
            ComputeDtype::Bf16 => Operand::Bf16(super::bf16::to_bf16(x)),
        }
    }

    pub fn values(&self) -> Values<'_> {
        match self {
            Operand::F32(v) => Values::F32(v),
            Operand::Bf16(v) => Values::Bf16(v),
        }
    }
}

/// `dst[i·dst_rs + j] (+)= Σ_l A(i, l)·B(l, j)` for `A: m×k`, `B: k×n` of the same dtype:
/// accumulated into `dst` when `accumulate`, else overwriting it.
///
/// # Safety
/// Every element the views address lies in its values (`debug_assert`ed); `dst` addresses
/// `m` rows of `n` values `dst_rs` apart and does not overlap the operands. Call it outside
/// rayon tasks: it is one large product over every thread.
///
/// # Errors
/// Operands of two dtypes (a bug of the caller), or oneDNN failed.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: View,
    b: View,
) -> candle_core::Result<()> {
    debug_assert!(
        covers(&a, m, k) && covers(&b, k, n),
        "product: view out of bounds"
    );
    match (a.values, b.values) {
        (Values::F32(av), Values::F32(bv)) => {
            let strided = |v: &[f32], w: &View| Strided {
                // SAFETY: the caller's offset lies in the values.
                ptr: unsafe { v.as_ptr().add(w.offset) },
                rs: w.rs,
                cs: w.cs,
            };
            // SAFETY: the caller's contract is gemm_par's.
            unsafe {
                gemm_par(
                    m,
                    n,
                    k,
                    dst,
                    dst_rs,
                    accumulate,
                    strided(av, &a),
                    strided(bv, &b),
                    1.0,
                )
            };
            Ok(())
        }
        (Values::Bf16(av), Values::Bf16(bv)) => {
            let strided = |v: &[bf16], w: &View| Bf16Strided {
                // SAFETY: as above.
                ptr: unsafe { v.as_ptr().add(w.offset) },
                rs: w.rs,
                cs: w.cs,
            };
            let threads = rayon::current_num_threads();
            // SAFETY: the caller's contract is bf16_gemm's.
            unsafe {
                bf16_gemm(
                    m,
                    n,
                    k,
                    dst,
                    dst_rs,
                    accumulate,
                    strided(av, &a),
                    strided(bv, &b),
                    threads,
                )
            }
            .map_err(candle_core::Error::wrap)
        }
        _ => candle_core::bail!("product: an f32 operand with a bf16 one"),
    }
}

/// Whether a `rows × cols` view stays inside its values.
fn covers(v: &View, rows: usize, cols: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = v.offset as isize + (rows as isize - 1) * v.rs + (cols as isize - 1) * v.cs;
    last >= 0 && (last as usize) < v.values.len()
}
