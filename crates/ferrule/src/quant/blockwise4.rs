//! 4-bit blockwise quantization as bitsandbytes does it: NF4 (QLoRA, Dettmers et al. 2023,
//! §3 "4-bit NormalFloat") and FP4, optionally with double-quantized absmax statistics.
//!
//! Bit-exact with bitsandbytes 0.50's CPU path (`backends/default/ops.py` `quantize_4bit`,
//! `csrc/cpu_ops.cpp` dequantization): blocks of `blocksize` over the flattened tensor, the
//! last one possibly partial; `x · (1/absmax)` clamped to [-1, 1] and bucketized against the
//! midpoints of the sorted code (ties go to the lower code); two codes per byte, first in the
//! high nibble. An all-zero block stores absmax 0 (a partial last one stores 1e-38, as
//! bitsandbytes clamps it) and every value in it encodes to the code 0, so it dequantizes to
//! exact zeros.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::dynamic;
use super::QuantMatrix;
use crate::util::mapped::Bytes;

/// Blocksizes bitsandbytes accepts.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// Blocksize of the nested (double) quantization of the absmax statistics.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Which 16-value code the 4-bit indices select from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Code4 {
    /// NormalFloat: quantiles of N(0, 1), normalized to [-1, 1].
    Nf4,
    /// 1 sign, 2 exponent, 1 mantissa bit (bitsandbytes' encoding), normalized to [-1, 1].
    Fp4,
}

/// `get_4bit_type("nf4")` (bitsandbytes), as REFERENCE.md lists it.
#[allow(clippy::excessive_precision)]
#[rustfmt::skip]
const NF4: [f32; 16] = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
];

/// FP4 values in bit-pattern order before normalization (`get_4bit_type("fp4")`). Index 8
/// ("-0") is +0.0 there: Python's `-0` is the integer 0.
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

impl Code4 {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nf4" => Some(Self::Nf4),
            "fp4" => Some(Self::Fp4),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }

    /// The code: value of each 4-bit index (bitsandbytes' `quant_map`).
    pub fn table(self) -> [f32; 16] {
        match self {
            Self::Nf4 => NF4,
            Self::Fp4 => FP4_RAW.map(|v| v / 12.0),
        }
    }

    /// Code indices in ascending order of value. For FP4 the two zeros (indices 0 and 8) are
    /// equal; bitsandbytes' `torch.argsort` puts index 0 first, so values in (0, 0.0026] get
    /// index 8 and the rest of the zero bucket index 0.
    fn order(self) -> [u8; 16] {
        match self {
            Self::Nf4 => std::array::from_fn(|i| i as u8),
            Self::Fp4 => [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3],
        }
    }

    /// Midpoints between neighbouring sorted code values.
    fn bounds(self) -> [f32; 15] {
        let t = self.table();
        let o = self.order();
        std::array::from_fn(|i| (t[o[i] as usize] + t[o[i + 1] as usize]) / 2.0)
    }
}

/// The absmax statistics of a 4-bit tensor, one per block.
#[derive(Clone, Debug)]
pub enum Absmax {
    Plain(Vec<f32>),
    /// Double quantization: `absmax = nested_code[q] · nested_absmax[block / 256] + offset`.
    Double {
        q: Vec<u8>,
        nested_absmax: Vec<f32>,
        nested_code: Arc<[f32; 256]>,
        offset: f32,
    },
}

impl Absmax {
    fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double { q, .. } => q.len(),
        }
    }

    /// The absmax of block `b` in f32, exactly as bitsandbytes reconstructs it.
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Double {
                q,
                nested_absmax,
                nested_code,
                offset,
            } => {
                dynamic::dequantize_one(nested_code, q[b], nested_absmax[b / NESTED_BLOCKSIZE])
                    + offset
            }
        }
    }
}

/// A tensor quantized to 4 bits per value.
#[derive(Clone, Debug)]
pub struct Blockwise4 {
    pub code: Code4,
    pub shape: Vec<usize>,
    pub blocksize: usize,
    /// Two indices per byte, the first in the high nibble; `ceil(n / 2)` bytes, in memory or
    /// mapped from the checkpoint (`--stream-base`).
    pub packed: Bytes,
    pub absmax: Absmax,
    /// `(code[hi], code[lo])` for every byte value: dequantizes two values per lookup.
    pairs: Box<[[f32; 2]; 256]>,
}

impl Blockwise4 {
    /// Quantizes `values` (row-major, `shape`) like `bitsandbytes.functional.quantize_4bit`
    /// with `compress_statistics = double_quant`.
    pub fn quantize(
        values: &[f32],
        shape: &[usize],
        code: Code4,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        check_blocksize(blocksize)?;
        let n: usize = shape.iter().product();
        if n != values.len() {
            bail!(
                "quantize: shape {shape:?} has {n} elements, got {}",
                values.len()
            )
        }
        let bounds = code.bounds();
        let order = code.order();
        let index = |x: f32| -> u8 { order[bounds.partition_point(|&b| b < x)] };
        let absmax = block_absmax(values, blocksize);
        let full = n - n % blocksize;
        let mut q = Vec::with_capacity(n + 1);
        for (block, &am) in values[..full].chunks(blocksize).zip(&absmax) {
            let inv = 1.0 / am.max(1e-38);
            q.extend(block.iter().map(|&v| index((v * inv).clamp(-1.0, 1.0))));
        }
        if full < n {
            // bitsandbytes divides (not multiplies by the reciprocal) in the partial block.
            let am = absmax[absmax.len() - 1];
            q.extend(
                values[full..]
                    .iter()
                    .map(|&v| index((v / am).clamp(-1.0, 1.0))),
            );
        }
        if q.len() % 2 == 1 {
            q.push(index(0.0));
        }
        let packed: Vec<u8> = q.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        Self::from_parts(
            code,
            shape.to_vec(),
            blocksize,
            packed,
            absmax_statistics(absmax, double_quant),
        )
    }

    /// The absmax statistics [`Blockwise4::quantize`] gives `values` (any code), without
    /// encoding the values: one pass for the block maxima. A streaming writer needs them
    /// before the codes (they come first in the file), and the double-quantization offset
    /// sets the length of the quant state's JSON, which the header holds.
    pub fn statistics(values: &[f32], blocksize: usize, double_quant: bool) -> Result<Absmax> {
        check_blocksize(blocksize)?;
        Ok(absmax_statistics(
            block_absmax(values, blocksize),
            double_quant,
        ))
    }

    /// Assembles a quantized tensor from its serialized parts, checking that they fit.
    pub fn from_parts(
        code: Code4,
        shape: Vec<usize>,
        blocksize: usize,
        packed: impl Into<Bytes>,
        absmax: Absmax,
    ) -> Result<Self> {
        check_blocksize(blocksize)?;
        let packed = packed.into();
        let n: usize = shape.iter().product();
        if packed.len() != n.div_ceil(2) {
            bail!(
                "{} data has {} bytes; shape {shape:?} needs {}",
                code.name(),
                packed.len(),
                n.div_ceil(2)
            )
        }
        let blocks = n.div_ceil(blocksize);
        if absmax.len() != blocks {
            bail!(
                "{} absmax has {} values; shape {shape:?} in blocks of {blocksize} needs {blocks}",
                code.name(),
                absmax.len()
            )
        }
        if let Absmax::Double { nested_absmax, .. } = &absmax {
            let nested = blocks.div_ceil(NESTED_BLOCKSIZE);
            if nested_absmax.len() != nested {
                bail!("nested absmax has {} values; {blocks} blocks in nested blocks of {NESTED_BLOCKSIZE} need {nested}", nested_absmax.len())
            }
        }
        let mut t = code.table();
        if code == Code4::Fp4 {
            // bitsandbytes' CPU dequantization decodes FP4's sign bit itself: index 8 gives
            // -0.0 although the serialized code has +0.0 there.
            t[8] = -0.0;
        }
        let pairs = Box::new(std::array::from_fn(|b| [t[b >> 4], t[b & 15]]));
        Ok(Self {
            code,
            shape,
            blocksize,
            packed,
            absmax,
            pairs,
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Double { .. })
    }

    /// Absmax of every block, reconstructed in f32.
    pub fn absmax_f32(&self) -> Vec<f32> {
        (0..self.absmax.len()).map(|b| self.absmax.get(b)).collect()
    }

    /// Dequantizes flattened elements `start..start + out.len()`.
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        let bs = self.blocksize;
        let mut e = start;
        while e < end {
            let b = e / bs;
            let seg_end = ((b + 1) * bs).min(end);
            let scale = self.absmax.get(b);
            let dst = &mut out[e - start..seg_end - start];
            let mut k = 0;
            let mut i = e;
            if i % 2 == 1 {
                dst[0] = self.pairs[self.packed[i / 2] as usize][1] * scale;
                k = 1;
                i += 1;
            }
            let pairs_n = (seg_end - i) / 2;
            for (p, byte) in self.packed[i / 2..i / 2 + pairs_n].iter().enumerate() {
                let [hi, lo] = self.pairs[*byte as usize];
                dst[k + 2 * p] = hi * scale;
                dst[k + 2 * p + 1] = lo * scale;
            }
            i += 2 * pairs_n;
            if i < seg_end {
                dst[seg_end - 1 - e] = self.pairs[self.packed[i / 2] as usize][0] * scale;
            }
            e = seg_end;
        }
    }
}

/// The absmax of each block of `values`, the last one (partial) clamped to 1e-38 as
/// bitsandbytes stores it.
fn block_absmax(values: &[f32], blocksize: usize) -> Vec<f32> {
    let full = values.len() - values.len() % blocksize;
    let fold = |b: &[f32]| b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut absmax: Vec<f32> = values[..full].chunks(blocksize).map(fold).collect();
    if full < values.len() {
        absmax.push(fold(&values[full..]).max(1e-38));
    }
    absmax
}

fn absmax_statistics(absmax: Vec<f32>, double_quant: bool) -> Absmax {
    if double_quant {
        double_quantize(&absmax)
    } else {
        Absmax::Plain(absmax)
    }
}

/// Offset = mean(absmax); `absmax − offset` quantized with the signed dynamic map in blocks of
/// 256 (QLoRA §3, eq. 6).
///
/// bitsandbytes takes the mean with torch's cascade summation; we sum in f64 and round, which
/// agrees to the last bit or one ulp (the fixtures check it).
fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset =
        (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let code = dynamic::signed_map();
    let (q, nested_absmax) = dynamic::quantize_blockwise(&centred, &code, NESTED_BLOCKSIZE);
    Absmax::Double {
        q,
        nested_absmax,
        nested_code: Arc::new(code),
        offset,
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if !BLOCKSIZES.contains(&blocksize) {
        bail!("invalid 4-bit blocksize {blocksize}: expected one of {BLOCKSIZES:?}")
    }
    Ok(())
}

impl QuantMatrix for Blockwise4 {
    fn dims(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            s => (s[0], s[1..].iter().product()),
        }
    }

    fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let cols = self.dims().1;
        self.dequantize_range(r0 * cols, &mut out[..(r1 - r0) * cols]);
    }

    /// Packed indices and per-block statistics. The code tables (16 and 256 floats) are
    /// shared constants and not counted, as in the QLoRA paper's 4.127 bits per parameter.
    fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(v) => 4 * v.len(),
                Absmax::Double {
                    q, nested_absmax, ..
                } => q.len() + 4 * nested_absmax.len() + 4,
            }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    /// The slice keeps the packed codes and the blocks' absmax as reconstructed in f32 (plain
    /// statistics, 4 bytes per block instead of double quantization's 1 + 4/256): a nested
    /// block of 256 absmax values would straddle the shards.
    fn slice_rows(&self, r0: usize, r1: usize) -> Result<std::sync::Arc<dyn QuantMatrix>> {
        let cols = self.dims().1;
        let (e0, e1) = (r0 * cols, r1 * cols);
        if !e0.is_multiple_of(self.blocksize)
            || (e1 != self.numel() && !e1.is_multiple_of(self.blocksize))
        {
            bail!(
                "{}: rows {r0}..{r1} do not hold whole blocks of {}",
                self.code.name(),
                self.blocksize
            )
        }
        let (b0, b1) = (e0 / self.blocksize, e1.div_ceil(self.blocksize));
        let absmax = Absmax::Plain((b0..b1).map(|b| self.absmax.get(b)).collect());
        let shape = vec![r1 - r0, cols];
        Ok(std::sync::Arc::new(Self::from_parts(
            self.code,
            shape,
            self.blocksize,
            self.packed[e0 / 2..e1.div_ceil(2)].to_vec(),
            absmax,
        )?))
    }

    fn row_granularity(&self) -> usize {
        let cols = self.dims().1.max(1);
        self.blocksize / gcd(self.blocksize, cols)
    }

    fn format(&self) -> String {
        super::QuantSpec {
            method: match self.code {
                Code4::Nf4 => super::QuantMethod::Nf4,
                Code4::Fp4 => super::QuantMethod::Fp4,
            },
            blocksize: self.blocksize,
            double_quant: self.double_quant(),
        }
        .format()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_exactly_and_zero_blocks_stay_zero() {
        for code in [Code4::Nf4, Code4::Fp4] {
            let t = code.table();
            // One block per code: the values are the code itself (absmax 1).
            let mut vals: Vec<f32> = t.iter().copied().chain(std::iter::once(1.0)).collect();
            vals.resize(32, 0.0);
            vals.extend([0f32; 32]);
            let q = Blockwise4::quantize(&vals, &[2, 32], code, 32, false).unwrap();
            let d = q.dequantize();
            assert_eq!(&d[..16], &t[..], "{code:?}");
            assert!(d[32..].iter().all(|&v| v == 0.0));
            assert_eq!(q.absmax_f32()[1], 0.0);
        }
    }

    #[test]
    fn ranges_agree_with_the_whole() {
        let vals: Vec<f32> = (0..3 * 37)
            .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.1)
            .collect();
        for dq in [false, true] {
            let q = Blockwise4::quantize(&vals, &[3, 37], Code4::Nf4, 32, dq).unwrap();
            let whole = q.dequantize();
            for (s, e) in [(0, 111), (1, 2), (5, 64), (31, 33), (33, 110), (110, 111)] {
                let mut part = vec![0f32; e - s];
                q.dequantize_range(s, &mut part);
                assert_eq!(part, whole[s..e], "{s}..{e}");
            }
        }
    }

    #[test]
    fn bad_blocksize_and_sizes_are_refused() {
        assert!(Blockwise4::quantize(&[1.0; 8], &[8], Code4::Nf4, 48, false)
            .unwrap_err()
            .to_string()
            .contains("blocksize 48"));
        let err = Blockwise4::from_parts(
            Code4::Nf4,
            vec![4, 64],
            64,
            vec![0; 100],
            Absmax::Plain(vec![1.0; 4]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("needs 128"), "{err}");
        let err = Blockwise4::from_parts(
            Code4::Nf4,
            vec![4, 64],
            64,
            vec![0; 128],
            Absmax::Plain(vec![1.0; 3]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("needs 4"), "{err}");
    }
}
