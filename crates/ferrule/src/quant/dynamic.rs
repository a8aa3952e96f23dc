//! bitsandbytes' signed 8-bit *dynamic* map and the blockwise 8-bit quantization that double
//! quantization (QLoRA, Dettmers et al. 2023, §3 "Double Quantization") applies to the 4-bit
//! absmax statistics.

/// The 127 positive non-unit values of `create_dynamic_map(signed=True)` (bitsandbytes 0.50),
/// ascending, as f32 bit patterns. The map is `-POS[126..0], 0, POS[0..126], 1.0`.
///
/// A table rather than the formula: bitsandbytes builds the map with `torch.linspace` in f32,
/// whose last-bit rounding we could not reproduce for all 256 entries (42 differed by 1 ulp);
/// `tests/quant_bnb.rs` checks the table against the map bitsandbytes serializes.
#[rustfmt::skip]
const POS: [u32; 127] = [
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333,
];

/// The signed dynamic map, 256 ascending values from -0.99297 to 1.0, as bitsandbytes 0.50
/// serializes it (`nested_quant_map`).
pub fn signed_map() -> [f32; 256] {
    let mut code = [0f32; 256];
    for i in 0..127 {
        let v = f32::from_bits(POS[i]);
        code[128 + i] = v;
        code[126 - i] = -v;
    }
    code[127] = 0.0;
    code[255] = 1.0;
    code
}

/// Blockwise 8-bit quantization against `code` (ascending), exactly as bitsandbytes' CPU
/// kernel (`quantize_block` in csrc/common.cpp): per block `absmax = max |a|`; each value is
/// divided by it, binary-searched to the largest code `<=` it, and moved one up when the upper
/// neighbour is strictly closer. Returns `(indices, absmax per block)`.
///
/// A block of zeros has absmax 0; bitsandbytes then divides 0/0 and its search turns the NaN
/// into index 0, which we store too (it dequantizes to `code[0] · 0 = 0`).
pub fn quantize_blockwise(
    values: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let am = block.iter().fold(f32::MIN, |m, v| m.max(v.abs()));
        absmax.push(am);
        for &v in block {
            if am == 0.0 {
                q.push(0);
                continue;
            }
            let x = v / am;
            // Largest index with code[i] <= x, or 0 below code[0].
            let mut i = code.partition_point(|&c| c <= x).saturating_sub(1);
            if i < 255 && (x - code[i + 1]).abs() < (x - code[i]).abs() {
                i += 1;
            }
            q.push(i as u8);
        }
    }
    (q, absmax)
}

/// `code[q] * absmax[block]`, the CPU dequantization (csrc/cpu_ops.cpp).
pub fn dequantize_one(code: &[f32; 256], q: u8, absmax: f32) -> f32 {
    code[q as usize] * absmax
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_is_sorted_signed_and_spans_minus_one_to_one() {
        let c = signed_map();
        assert!(c.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((c[127], c[255]), (0.0, 1.0));
        assert!((c[0] + 0.992_968_75).abs() < 1e-7);
        // Smallest positive magnitude is 10^-6 times the first linspace midpoint (0.55).
        assert!((c[128] - 0.55e-6).abs() < 1e-12);
    }

    #[test]
    fn exact_codes_round_trip_and_ties_stay_low() {
        let c = signed_map();
        let vals: Vec<f32> = c.to_vec();
        let (q, am) = quantize_blockwise(&vals, &c, 256);
        // absmax is 1.0, so every code maps to itself.
        assert_eq!(am, vec![1.0]);
        assert_eq!(q, (0..=255).map(|i| i as u8).collect::<Vec<_>>());
        // The midpoint of two codes is equally far from both: the lower one wins.
        let mid = (c[200] + c[201]) / 2.0;
        let (q, _) = quantize_blockwise(&[mid, 1.0], &c, 256);
        let d_lo = (mid - c[200]).abs();
        let d_hi = (mid - c[201]).abs();
        assert_eq!(q[0], if d_hi < d_lo { 201 } else { 200 });
    }

    #[test]
    fn zero_block_dequantizes_to_zero() {
        let c = signed_map();
        let (q, am) = quantize_blockwise(&[0.0; 5], &c, 256);
        assert_eq!(am, vec![0.0]);
        assert!(q.iter().all(|&i| dequantize_one(&c, i, am[0]) == 0.0));
    }
}
