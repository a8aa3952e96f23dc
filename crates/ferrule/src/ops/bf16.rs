//! f32 ↔ bf16 conversions of whole buffers, for the bf16 products' operands.
//!
//! Round to nearest even, as `half::bf16::from_f32` and torch's `.to(torch.bfloat16)` round
//! (NaN stays NaN). Written as an integer loop that vectorises (the `half` crate converts one
//! value at a time), compiled for AVX2 as well ([`super::kernels::multiversion`]) and spread over
//! rayon: an activation of 4096 × 1536 values is converted before every product that reads it.

use half::bf16;
use rayon::prelude::*;

use super::kernels::multiversion;

/// Values per rayon task (below this, one thread converts).
const CHUNK: usize = 1 << 16;

/// `x` rounded to bf16.
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; x.len()];
    to_bf16_into(x, &mut out);
    out
}

/// Writes `x` rounded to bf16 into `out` (of the same length).
pub fn to_bf16_into(x: &[f32], out: &mut [bf16]) {
    assert_eq!(x.len(), out.len(), "to_bf16_into: lengths differ");
    if x.len() <= CHUNK {
        round_slice(x, out);
        return;
    }
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| round_slice(x, o));
}

/// `x` widened to f32 (exact).
pub fn to_f32(x: &[bf16]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| widen_slice(x, o));
    out
}

multiversion! {
    fn round_slice(x: &[f32], out: &mut [bf16]) {
        for (o, &v) in out.iter_mut().zip(x) {
            let bits = v.to_bits();
            let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
            // A NaN keeps its sign and becomes a quiet NaN (rounding could carry it to inf).
            let nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
            let b = if nan { (bits >> 16) | 0x40 } else { rounded };
            *o = bf16::from_bits(b as u16);
        }
    }
}

multiversion! {
    fn widen_slice(x: &[bf16], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(x) {
            *o = f32::from_bits((v.to_bits() as u32) << 16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rounding case agrees bit for bit with `half`'s scalar conversion: ties to even,
    /// carries into the exponent, overflow to infinity, subnormals, signed zeros and NaN.
    #[test]
    fn rounds_as_half_does() {
        let mut values = vec![
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x3f80_8000), // a tie, rounds down to even
            f32::from_bits(0x3f81_8000), // a tie, rounds up to even
            f32::from_bits(0x7f7f_ffff), // rounds to infinity
        ];
        values.extend((0..200_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        let got = to_bf16(&values);
        for (v, g) in values.iter().zip(&got) {
            let want = bf16::from_f32(*v);
            if v.is_nan() {
                assert!(g.is_nan(), "{v:?}");
            } else {
                assert_eq!(g.to_bits(), want.to_bits(), "{v:e} ({:#x})", v.to_bits());
            }
        }
        let back = to_f32(&got);
        for (g, b) in got.iter().zip(&back) {
            assert!(b.to_bits() == g.to_f32().to_bits() || b.is_nan());
        }
    }
}
