//! Encoding f32 rows as the GGUF tensor types ferrule writes (F32, F16, Q8_0, Q4_0), bit-exact
//! to ggml's reference quantizers (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref` in
//! ggml/src/ggml-quants.c, which gguf-py's `quants.py` reproduces in numpy): the same scale,
//! the same rounding, the same f16 conversion (round to nearest even).

use half::f16;

/// A GGUF tensor type ferrule can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlWriteType {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl GgmlWriteType {
    /// The `ggml_type` id stored in the file (ggml.h).
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 8,
        }
    }

    /// llama.cpp's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
        }
    }

    /// Values per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q8_0 | Self::Q4_0 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            // f16 scale + 32 int8
            Self::Q8_0 => 34,
            // f16 scale + 32 nibbles
            Self::Q4_0 => 18,
        }
    }

    /// Bytes of `n` values (`n` a multiple of the block size).
    pub fn bytes_for(self, n: usize) -> usize {
        n / self.block_size() * self.block_bytes()
    }

    /// Whether rows of `cols` values can be stored in this type (whole blocks per row).
    pub fn fits_row(self, cols: usize) -> bool {
        cols.is_multiple_of(self.block_size())
    }

    /// Encodes `values` (a whole number of blocks) as little-endian bytes of this type.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        debug_assert!(values.len().is_multiple_of(self.block_size()));
        let mut out = Vec::with_capacity(self.bytes_for(values.len()));
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            Self::Q8_0 => values
                .chunks_exact(32)
                .for_each(|b| quantize_block_q8_0(b, &mut out)),
            Self::Q4_0 => values
                .chunks_exact(32)
                .for_each(|b| quantize_block_q4_0(b, &mut out)),
        }
        out
    }

    /// Decodes bytes written by [`GgmlWriteType::encode`] back to f32 (ggml's
    /// `dequantize_row_*`).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let scale = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        match self {
            Self::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Self::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Self::Q8_0 => bytes
                .chunks_exact(34)
                .flat_map(|b| {
                    let d = scale(b);
                    b[2..].iter().map(move |&q| q as i8 as f32 * d)
                })
                .collect(),
            Self::Q4_0 => bytes
                .chunks_exact(18)
                .flat_map(|b| {
                    let d = scale(b);
                    let qs = &b[2..];
                    let lo = qs.iter().map(move |&q| ((q & 0x0F) as i32 - 8) as f32 * d);
                    let hi = qs.iter().map(move |&q| ((q >> 4) as i32 - 8) as f32 * d);
                    lo.chain(hi).collect::<Vec<_>>()
                })
                .collect(),
        }
    }
}

/// `quantize_row_q8_0_ref` for one block: `d = amax / 127`, `q = roundf(x / d)` (half away
/// from zero, as C's `roundf` and Rust's `f32::round`), `d` stored as f16.
fn quantize_block_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// `quantize_row_q4_0_ref` for one block: `d = max / -8` where `max` is the value of largest
/// magnitude (the first one on a tie), `q = min(15, (int8)(x / d + 8.5))`; value `j` goes to
/// the low nibble of byte `j`, value `16 + j` to its high nibble.
fn quantize_block_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    // C truncates toward zero into an int8; x·id lies in [-8, 8], so the sum is in [0.5, 16.5].
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for j in 0..16 {
        out.push(q(x[j]) | (q(x[16 + j]) << 4));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i % 5) as f32))
            .collect()
    }

    /// candle's quantizers follow ggml's reference ones too: the bytes must agree.
    #[test]
    fn blocks_equal_candles_reference_quantizers() {
        let vals = sample(4 * 64);
        let t = Tensor::from_vec(vals.clone(), (4, 64), &Device::Cpu).unwrap();
        for (ours, theirs) in [
            (GgmlWriteType::Q8_0, GgmlDType::Q8_0),
            (GgmlWriteType::Q4_0, GgmlDType::Q4_0),
            (GgmlWriteType::F16, GgmlDType::F16),
        ] {
            let q = QTensor::quantize(&t, theirs).unwrap();
            assert_eq!(ours.encode(&vals), q.data().unwrap().to_vec(), "{ours:?}");
            let back: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(ours.decode(&ours.encode(&vals)), back, "{ours:?}");
        }
    }

    #[test]
    fn q4_0_edge_cases() {
        // All zeros: scale 0 / -8 = -0.0 (f16 0x8000, as ggml writes it), every nibble 8.
        let z = GgmlWriteType::Q4_0.encode(&[0.0; 32]);
        assert_eq!(&z[..2], &[0x00, 0x80]);
        assert!(z[2..].iter().all(|&b| b == 0x88));
        // The largest magnitude is negative: d = max / -8 > 0 and that value maps to 0.
        let mut x = [0.25f32; 32];
        x[3] = -2.0;
        let q = GgmlWriteType::Q4_0.encode(&x);
        assert_eq!(f16::from_le_bytes([q[0], q[1]]).to_f32(), 0.25);
        assert_eq!(q[2 + 3] & 0x0F, 0);
        // A positive largest magnitude gives a negative d; that value maps to nibble 0 too.
        x[3] = 2.0;
        let q = GgmlWriteType::Q4_0.encode(&x);
        assert_eq!(f16::from_le_bytes([q[0], q[1]]).to_f32(), -0.25);
        assert_eq!(q[2 + 3] & 0x0F, 0);
    }

    #[test]
    fn q8_0_rounds_half_away_from_zero() {
        // amax 127 gives d = 1: 2.5 -> 3, -2.5 -> -3 (roundf), not banker's rounding.
        let mut x = [0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        let q = GgmlWriteType::Q8_0.encode(&x);
        assert_eq!(q[2] as i8, 127);
        assert_eq!(q[3] as i8, 3);
        assert_eq!(q[4] as i8, -3);
    }
}
