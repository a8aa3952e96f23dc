//! Encoding f32 rows as the GGUF tensor types ferrule writes (F32, F16, Q8_0, Q4_0, Q4_1,
//! Q5_0, Q4_K), bit-exact to ggml's reference quantizers (`quantize_row_q8_0_ref`,
//! `quantize_row_q4_0_ref`, `quantize_row_q4_1_ref`, `quantize_row_q5_0_ref`,
//! `quantize_row_q4_K_ref` in
//! ggml/src/ggml-quants.c; gguf-py's `quants.py` reproduces the first three in numpy): the same
//! scale, the same rounding, the same f16 conversion (round to nearest even), the same order
//! of float operations (each rounded to f32; ggml-base is built without FMA contraction).

use half::f16;

/// A GGUF tensor type ferrule can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlWriteType {
    F32,
    F16,
    Q8_0,
    Q4_0,
    /// `d·q + m`, `q` in 0..=15: what L4Q's 4-bit groups of 32 are ([`q4_1_from_codes`]).
    Q4_1,
    /// Q4_K's fallback in llama-quantize for rows that are not whole 256-value super-blocks.
    Q5_0,
    Q4K,
}

/// Values per Q4_K super-block (ggml's `QK_K`).
const QK_K: usize = 256;

impl GgmlWriteType {
    /// The `ggml_type` id stored in the file (ggml.h).
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
        }
    }

    /// llama.cpp's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q4K => "Q4_K",
        }
    }

    /// Values per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q5_0 => 32,
            Self::Q4K => QK_K,
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
            // f16 d + f16 m + 32 nibbles
            Self::Q4_1 => 20,
            // f16 scale + 32 high bits + 32 nibbles
            Self::Q5_0 => 22,
            // f16 d + f16 dmin + 12 bytes of 6-bit scales and mins + 256 nibbles
            Self::Q4K => 144,
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

    /// The type rows of `cols` values that do not fit this type are written in: Q4_K's is
    /// Q5_0 when the rows are whole 32-value blocks (llama-quantize's
    /// `convert_incompatible_tensor`), everything else's F16 (convert_hf_to_gguf.py's).
    pub fn fallback(self, cols: usize) -> Self {
        match self {
            Self::Q4K if Self::Q5_0.fits_row(cols) => Self::Q5_0,
            _ => Self::F16,
        }
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
            Self::Q4_1 => values
                .chunks_exact(32)
                .for_each(|b| quantize_block_q4_1(b, &mut out)),
            Self::Q5_0 => values
                .chunks_exact(32)
                .for_each(|b| quantize_block_q5_0(b, &mut out)),
            Self::Q4K => values
                .chunks_exact(QK_K)
                .for_each(|b| quantize_block_q4_k(b, &mut out)),
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
            Self::Q4_1 => bytes
                .chunks_exact(20)
                .flat_map(|b| {
                    let (d, m) = (scale(b), scale(&b[2..]));
                    let qs = &b[4..];
                    let lo = qs.iter().map(move |&q| (q & 0x0F) as f32 * d + m);
                    let hi = qs.iter().map(move |&q| (q >> 4) as f32 * d + m);
                    lo.chain(hi).collect::<Vec<_>>()
                })
                .collect(),
            Self::Q5_0 => bytes
                .chunks_exact(22)
                .flat_map(dequantize_block_q5_0)
                .collect(),
            Self::Q4K => bytes
                .chunks_exact(144)
                .flat_map(dequantize_block_q4_k)
                .collect(),
        }
    }
}

/// ggml's `nearest_int`: rounds half to even through the float adder (for |x| < 2^22, which
/// every caller's argument is).
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// `quantize_row_q5_0_ref` for one block: as Q4_0 with 5 bits, `d = max / -16`, `q =
/// min(31, (int8)(x / d + 16.5))`; the low nibbles as Q4_0's, the fifth bits of values `j` and
/// `16 + j` in bits `j` and `16 + j` of a little-endian u32.
fn quantize_block_q5_0(x: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    let q = |v: f32| ((v * id + 16.5) as i8).min(31) as u8;
    let mut qh = 0u32;
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let (x0, x1) = (q(x[j]), q(x[16 + j]));
        qs[j] = (x0 & 0x0F) | ((x1 & 0x0F) << 4);
        qh |= (((x0 & 0x10) >> 4) as u32) << j;
        qh |= (((x1 & 0x10) >> 4) as u32) << (j + 16);
    }
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend_from_slice(&qs);
}

/// `dequantize_row_q5_0` for one block.
fn dequantize_block_q5_0(b: &[u8]) -> Vec<f32> {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    let mut y = vec![0f32; 32];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
    y
}

/// ggml's `make_qkx2_quants`: the scale and min (returned as `-min`) of an asymmetric
/// `nmax + 1`-level quantization of `x` with the levels in `l`, chosen by a weighted
/// least-squares fit at `nstep + 1` trial scales around `nmax / (max - min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let error = |scale: f32, min: f32, levels: &[u8]| {
        let mut e = 0f32;
        for i in 0..n {
            let diff = scale * levels[i] as f32 + min - x[i];
            let diff = if use_mad { diff.abs() } else { diff * diff };
            e += weights[i] * diff;
        }
        e
    };
    for i in 0..n {
        l[i] = nearest_int(iscale * (x[i] - min)).clamp(0, nmax) as u8;
    }
    let mut best_error = error(scale, min, l);
    if nstep < 1 {
        return (scale, -min);
    }
    let mut laux = vec![0u8; n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let (w, lf) = (weights[i], li as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error = error(this_scale, this_min, &laux);
            if cur_error < best_error {
                l.copy_from_slice(&laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from the 12 packed bytes.
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `quantize_row_q4_K_ref` for one 256-value super-block: eight sub-blocks of 32, each fitted
/// by [`make_qkx2_quants`] (15 levels, weights `sqrt(mean x²) + |x|`, rmin -1, rdelta 0.1, 20
/// steps); their scales and mins quantized to 6 bits against the largest of each (`d`, `dmin`
/// stored as f16); the values requantized with the stored scales. Layout: `d`, `dmin`,
/// `scales[12]`, then 128 bytes where byte `32k + l` holds value `64k + l` in its low nibble
/// and `64k + 32 + l` in its high one.
fn quantize_block_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let mut levels = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    let mut weights = [0f32; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        let mut sum_x2 = 0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let l = &mut levels[32 * j..32 * (j + 1)];
        (scales[j], mins[j]) = make_qkx2_quants(xs, &weights, 15, l, -1.0, 0.1, 20, false);
        max_scale = if scales[j] > max_scale {
            scales[j]
        } else {
            max_scale
        };
        max_min = if mins[j] > max_min { mins[j] } else { max_min };
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // C stores the int in a uint8_t (modulo 256) before the MIN.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 32 * j..32 * (j + 1) {
            levels[i] = nearest_int((x[i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&packed);
    for chunk in levels.chunks_exact(64) {
        out.extend((0..32).map(|l| chunk[l] | (chunk[l + 32] << 4)));
    }
}

/// `dequantize_row_q4_K` for one super-block.
fn dequantize_block_q4_k(b: &[u8]) -> Vec<f32> {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let min = f16::from_le_bytes([b[2], b[3]]).to_f32();
    let (scales, qs) = (&b[4..16], &b[16..144]);
    let mut y = Vec::with_capacity(QK_K);
    for (k, q) in qs.chunks_exact(32).enumerate() {
        let (sc, m) = get_scale_min_k4(2 * k, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        y.extend(q.iter().map(|v| d1 * (v & 0xF) as f32 - m1));
        let (sc, m) = get_scale_min_k4(2 * k + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        y.extend(q.iter().map(|v| d2 * (v >> 4) as f32 - m2));
    }
    y
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

/// `quantize_row_q4_1_ref` for one block: `d = (max − min)/15`, `m = min`, `q = min(15,
/// (int8)((x − min)·(1/d) + 0.5))`, both stored as f16; nibbles as Q4_0's.
fn quantize_block_q4_1(x: &[f32], out: &mut Vec<u8>) {
    let min = x.iter().fold(f32::MAX, |m, &v| if v < m { v } else { m });
    let max = x.iter().fold(-f32::MAX, |m, &v| if v > m { v } else { m });
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: Vec<u8> = x
        .iter()
        .map(|v| (((v - min) * id + 0.5) as i8).min(15) as u8)
        .collect();
    push_q4_1_block(&q, d, min, out);
}

/// One Q4_1 block from its 32 codes (0..=15) and its `d`, `m` (rounded to f16 here): value
/// `j` in the low nibble of byte `j`, value `16 + j` in its high nibble (`block_q4_1`).
fn push_q4_1_block(q: &[u8], d: f32, m: f32, out: &mut Vec<u8>) {
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&f16::from_f32(m).to_le_bytes());
    for j in 0..16 {
        out.push((q[j] & 0x0F) | ((q[16 + j] & 0x0F) << 4));
    }
}

/// Q4_1 blocks written from given codes instead of ggml's choice: `codes` (0..=15, a whole
/// number of 32-value blocks) with one `d` and one `m` per block, which the file holds as
/// f16, so a value reads back as `q·f16(d) + f16(m)`. L4Q's learned codes, steps and offsets
/// go to the file this way. A code above 15 is an error naming its index.
pub fn q4_1_from_codes(codes: &[u8], d: &[f32], m: &[f32]) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(
        codes.len() == 32 * d.len() && d.len() == m.len(),
        "Q4_1: {} codes need {} steps and offsets, got {} and {}",
        codes.len(),
        codes.len() / 32,
        d.len(),
        m.len()
    );
    if let Some(i) = codes.iter().position(|&q| q > 15) {
        anyhow::bail!("Q4_1: code {} at index {i} does not fit 4 bits", codes[i])
    }
    let mut out = Vec::with_capacity(GgmlWriteType::Q4_1.bytes_for(codes.len()));
    for (k, q) in codes.chunks_exact(32).enumerate() {
        push_q4_1_block(q, d[k], m[k], &mut out);
    }
    Ok(out)
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
            (GgmlWriteType::Q4_1, GgmlDType::Q4_1),
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

    /// Given codes, steps and offsets: ggml's own block re-encoded from its codes and its f16
    /// `d`, `m` is the same bytes; a value reads back as `q·f16(d) + f16(m)`; a 5-bit code is
    /// refused.
    #[test]
    fn q4_1_from_codes_writes_the_codes_given() {
        let vals = sample(64);
        let ggml = GgmlWriteType::Q4_1.encode(&vals);
        let (mut codes, mut d, mut m) = (vec![], vec![], vec![]);
        for b in ggml.chunks_exact(20) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            m.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
            let lo: Vec<u8> = b[4..].iter().map(|q| q & 0x0F).collect();
            codes.extend(lo);
            codes.extend(b[4..].iter().map(|q| q >> 4));
        }
        assert_eq!(q4_1_from_codes(&codes, &d, &m).unwrap(), ggml);
        let mine = q4_1_from_codes(&[3; 32], &[0.1], &[-1.0]).unwrap();
        let want = 3.0 * f16::from_f32(0.1).to_f32() + f16::from_f32(-1.0).to_f32();
        assert!(GgmlWriteType::Q4_1.decode(&mine).iter().all(|v| *v == want));
        let e = q4_1_from_codes(&[16; 32], &[0.1], &[0.0]).unwrap_err();
        assert!(e.to_string().contains("code 16 at index 0"), "{e}");
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

    #[test]
    fn nearest_int_rounds_half_to_even_as_ggml() {
        let got = [0.5f32, 1.5, 2.5, -0.5, -1.5, 2.4999, 7.0, -0.0].map(nearest_int);
        assert_eq!(got, [0, 2, 2, 0, -2, 2, 7, 0]);
    }

    #[test]
    fn q4_k_of_zeros_and_its_layout() {
        let z = GgmlWriteType::Q4K.encode(&[0.0; 512]);
        assert_eq!(z.len(), 2 * 144);
        assert!(z.iter().all(|&b| b == 0));
        assert_eq!(GgmlWriteType::Q4K.decode(&z), vec![0.0; 512]);
        // A ramp over one super-block comes back within half a sub-block step (a wrong
        // nibble or scale layout would put values a whole sub-block range away).
        let x: Vec<f32> = (0..256).map(|i| i as f32 / 256.0 - 0.25).collect();
        let q = GgmlWriteType::Q4K.encode(&x);
        let back = GgmlWriteType::Q4K.decode(&q);
        let worst = x
            .iter()
            .zip(&back)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // A sub-block's 15 steps span [min(0, min), max] (the min is never positive): the
        // last spans [0, 0.746], half a step 0.025 (measured 0.0237).
        assert!(worst > 0.004 && worst < 0.026, "{worst}");
        assert_eq!(GgmlWriteType::Q4K.fallback(96), GgmlWriteType::Q5_0);
        assert_eq!(GgmlWriteType::Q4K.fallback(48), GgmlWriteType::F16);
        assert_eq!(GgmlWriteType::Q8_0.fallback(48), GgmlWriteType::F16);
    }
}
