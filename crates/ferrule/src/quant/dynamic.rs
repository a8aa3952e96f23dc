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

/// The 254 values of `create_dynamic_map(signed=False)` (bitsandbytes 0.50) strictly between
/// 0 and 1, ascending, as f32 bit patterns: the map of 8-bit optimizers' second moment
/// (`udynamic`). The map is `0, UPOS[0..254], 1.0`. A table for the reason [`POS`] is one;
/// `tests/fixtures/optim/make_bnb_optim.py` prints it.
#[rustfmt::skip]
const UPOS: [u32; 254] = [
    0x34ae7baa, 0x35500998, 0x360e9b38, 0x3692ccf6, 0x36de4c51, 0x3714e5d5, 0x3783126e, 0x37e171a0,
    0x381fe868, 0x384f1800, 0x387e479a, 0x3896bb99, 0x38ae5364, 0x38c5eb31, 0x3906594b, 0x394154ca,
    0x397c5049, 0x399ba5e4, 0x39b923a2, 0x39d6a163, 0x39f41f22, 0x3a08ce71, 0x3a178d50, 0x3a264c30,
    0x3a350b10, 0x3a43c9ef, 0x3a5288d0, 0x3a6147af, 0x3a70068e, 0x3a7ec56e, 0x3a958106, 0x3aba5e35,
    0x3adf3b64, 0x3b020c4a, 0x3b147ae1, 0x3b26e978, 0x3b395810, 0x3b4bc6a7, 0x3b5e3540, 0x3b70a3d7,
    0x3b818937, 0x3b8ac082, 0x3b93f7cf, 0x3b9d2f1a, 0x3ba66666, 0x3baf9db2, 0x3bb8d4fd, 0x3bc20c4a,
    0x3bcb4395, 0x3bd47ae1, 0x3bddb22e, 0x3be6e978, 0x3bf020c5, 0x3bf9580f, 0x3c0147ae, 0x3c05e354,
    0x3c0a7ef9, 0x3c0f1aa0, 0x3c13b645, 0x3c1851eb, 0x3c1ced92, 0x3c218937, 0x3c2f5c2a, 0x3c466667,
    0x3c5d70a3, 0x3c747ae2, 0x3c85c28f, 0x3c9147af, 0x3c9ccccd, 0x3ca851eb, 0x3cb3d70b, 0x3cbf5c29,
    0x3ccae147, 0x3cd66667, 0x3ce1eb87, 0x3ced70a3, 0x3cf8f5c3, 0x3d023d70, 0x3d080000, 0x3d0dc28f,
    0x3d13851f, 0x3d1947af, 0x3d1f0a3d, 0x3d24cccd, 0x3d2a8f5c, 0x3d3051eb, 0x3d36147b, 0x3d3bd70a,
    0x3d41999a, 0x3d475c28, 0x3d4d1eb8, 0x3d52e147, 0x3d58a3d7, 0x3d5e6667, 0x3d6428f7, 0x3d69eb87,
    0x3d6fae15, 0x3d7570a3, 0x3d7b3333, 0x3d807ae2, 0x3d835c2a, 0x3d863d71, 0x3d891eb8, 0x3d8c0000,
    0x3d8ee148, 0x3d91c290, 0x3d94a3d7, 0x3d97851f, 0x3d9a6667, 0x3d9d47af, 0x3da028f6, 0x3da30a3e,
    0x3da5eb85, 0x3da8cccd, 0x3dabae15, 0x3dae8f5c, 0x3db170a4, 0x3db451eb, 0x3db73333, 0x3dba147b,
    0x3dbcf5c3, 0x3dbfd70b, 0x3dc2b852, 0x3dc5999a, 0x3dc87ae2, 0x3dcb5c29, 0x3dd40000, 0x3de26666,
    0x3df0cccd, 0x3dff3333, 0x3e06cccc, 0x3e0e0000, 0x3e153334, 0x3e1c6666, 0x3e23999a, 0x3e2acccc,
    0x3e320000, 0x3e393334, 0x3e406666, 0x3e47999a, 0x3e4ecccc, 0x3e560000, 0x3e5d3334, 0x3e646666,
    0x3e6b999a, 0x3e72cccc, 0x3e7a0000, 0x3e809999, 0x3e843333, 0x3e87cccd, 0x3e8b6666, 0x3e8f0000,
    0x3e92999a, 0x3e963333, 0x3e99cccc, 0x3e9d6666, 0x3ea10000, 0x3ea4999a, 0x3ea83333, 0x3eabcccc,
    0x3eaf6666, 0x3eb30000, 0x3eb6999a, 0x3eba3333, 0x3ebdcccc, 0x3ec16666, 0x3ec50000, 0x3ec8999a,
    0x3ecc3333, 0x3ecfcccc, 0x3ed36666, 0x3ed70000, 0x3eda999a, 0x3ede3333, 0x3ee1cccc, 0x3ee56666,
    0x3ee90000, 0x3eec999a, 0x3ef03333, 0x3ef3cccc, 0x3ef76666, 0x3efb0000, 0x3efe9999, 0x3f01199a,
    0x3f02e666, 0x3f04b333, 0x3f068000, 0x3f084ccc, 0x3f0a199a, 0x3f0be666, 0x3f0db334, 0x3f0f8000,
    0x3f114ccd, 0x3f13199a, 0x3f14e666, 0x3f16b334, 0x3f188000, 0x3f1a4ccd, 0x3f1c199a, 0x3f1de666,
    0x3f1fb334, 0x3f218000, 0x3f234ccd, 0x3f25199a, 0x3f26e666, 0x3f28b334, 0x3f2a8000, 0x3f2c4ccd,
    0x3f2e199a, 0x3f2fe666, 0x3f31b334, 0x3f338000, 0x3f354ccd, 0x3f37199a, 0x3f38e666, 0x3f3ab334,
    0x3f3c8000, 0x3f3e4ccd, 0x3f40199a, 0x3f41e666, 0x3f43b334, 0x3f458000, 0x3f474ccc, 0x3f49199a,
    0x3f4ae666, 0x3f4cb334, 0x3f4e8000, 0x3f504ccc, 0x3f52199a, 0x3f53e666, 0x3f55b334, 0x3f578000,
    0x3f594ccc, 0x3f5b199a, 0x3f5ce666, 0x3f5eb334, 0x3f608000, 0x3f624ccc, 0x3f64199a, 0x3f65e666,
    0x3f67b334, 0x3f698000, 0x3f6b4ccc, 0x3f6d199a, 0x3f6ee666, 0x3f70b334, 0x3f728000, 0x3f744ccc,
    0x3f76199a, 0x3f77e666, 0x3f79b334, 0x3f7b8000, 0x3f7d4ccc, 0x3f7f199a,
];

/// The unsigned dynamic map, 256 ascending values from 0 to 1.0, as bitsandbytes 0.50 builds
/// it for 8-bit optimizers' second moment (`name2qmap["udynamic"]`).
pub fn unsigned_map() -> [f32; 256] {
    let mut code = [0f32; 256];
    for (c, bits) in code[1..255].iter_mut().zip(UPOS) {
        *c = f32::from_bits(bits);
    }
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
    let mut q = vec![0u8; values.len()];
    let absmax = values
        .chunks(blocksize)
        .zip(q.chunks_mut(blocksize))
        .map(|(block, out)| quantize_block_into(block, code, out))
        .collect();
    (q, absmax)
}

/// One block of [`quantize_blockwise`]: writes the indices of `block` into `out` (the same
/// length) and returns the block's absmax.
fn quantize_block_into(block: &[f32], code: &[f32; 256], out: &mut [u8]) -> f32 {
    let am = block.iter().fold(f32::MIN, |m, v| m.max(v.abs()));
    for (&v, o) in block.iter().zip(out.iter_mut()) {
        if am == 0.0 {
            *o = 0;
            continue;
        }
        let x = v / am;
        // Largest index with code[i] <= x, or 0 below code[0].
        let mut i = code.partition_point(|&c| c <= x).saturating_sub(1);
        if i < 255 && (x - code[i + 1]).abs() < (x - code[i]).abs() {
            i += 1;
        }
        *o = i as u8;
    }
    am
}

/// Where bitsandbytes 0.50.2's CPU quantizer (`cquantize_blockwise_cpu_fp32`, the kernel its
/// 8-bit optimizers requantize their state with) moves from one code to the next, for the
/// signed map: index `i` is the count of thresholds `<= x`. Its search (`BinAlgo<Direct2>`) is
/// approximate where codes crowd together near 0: 0 and every value below `2.1e-5` quantize to
/// code 131, not 127 (the code of 0), which [`quantize_blockwise`]'s exact search gives.
/// Measured by bisection against the kernel (`tests/fixtures/optim/make_bnb_optim.py
/// --thresholds`); it reproduced all of 400,000 random values.
#[rustfmt::skip]
const SIGNED_CPU_THRESHOLDS: [u32; 255] = [
    0xbf7c66fc, 0xbf78ccf8, 0xbf7532f5, 0xbf7198f1, 0xbf6e00ee, 0xbf6a66ea, 0xbf66cce6, 0xbf6332e3,
    0xbf5f98df, 0xbf5c00dc, 0xbf5866d8, 0xbf54ccd4, 0xbf5132d1, 0xbf4d98cd, 0xbf4a00ca, 0xbf4666c6,
    0xbf42ccc2, 0xbf3f32bf, 0xbf3b98bb, 0xbf3800b8, 0xbf3466b4, 0xbf30ccb1, 0xbf2d32ad, 0xbf2998a9,
    0xbf2600a6, 0xbf2266a2, 0xbf1ecc9f, 0xbf1b329b, 0xbf179a97, 0xbf140094, 0xbf106690, 0xbf0ccc8d,
    0xbf093289, 0xbf059a85, 0xbf020082, 0xbefcccfd, 0xbef598f6, 0xbeee64ee, 0xbee734e9, 0xbee000e1,
    0xbed8ccd9, 0xbed198d2, 0xbeca64ca, 0xbec334c5, 0xbebc00bd, 0xbeb4ccb5, 0xbead98ae, 0xbea664a6,
    0xbe9f34a1, 0xbe980099, 0xbe90cc91, 0xbe89988a, 0xbe826482, 0xbe7668fa, 0xbe6800ea, 0xbe5998da,
    0xbe4b30cd, 0xbe3cd0bd, 0xbe2e68b2, 0xbe2000a2, 0xbe119892, 0xbe033085, 0xbde9a0eb, 0xbdd290d4,
    0xbdc710cb, 0xbdc140c4, 0xbdbb80bb, 0xbdb5c0bb, 0xbdb000b4, 0xbdaa40ab, 0xbda480ab, 0xbd9eb0a4,
    0xbd98f09b, 0xbd933094, 0xbd8d7094, 0xbd87b08b, 0xbd81f084, 0xbd786108, 0xbd6cc0f7, 0xbd6140e8,
    0xbd55c0d7, 0xbd4a40d7, 0xbd3ec0c8, 0xbd3340b7, 0xbd27a0a8, 0xbd1c20a8, 0xbd10a097, 0xbd052088,
    0xbcf34110, 0xbcdc40ef, 0xbcc500d0, 0xbcae00af, 0xbc9700af, 0xbc800090, 0xbc5200df, 0xbc2d00df,
    0xbc1a80a0, 0xbc1180a0, 0xbc0800a0, 0xbbfe0140, 0xbbec0140, 0xbbd90140, 0xbbc70140, 0xbbb400bf,
    0xbba200bf, 0xbb8f00bf, 0xbb7a017f, 0xbb54017f, 0xbb30017f, 0xbb0c017f, 0xbacc0100, 0xba900100,
    0xba680200, 0xba480200, 0xba300200, 0xba100200, 0xb9e00400, 0xb9b00400, 0xb9600800, 0xb9000800,
    0xb8c01000, 0xb8801000, 0xb8002000, 0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000,
    0xb3000000, 0xb3000000, 0xb3000000, 0x37ff8000, 0x387fc000, 0x38bfe000, 0x38ffe000, 0x395ff000,
    0x39aff800, 0x39dff800, 0x3a0ffc00, 0x3a2ffc00, 0x3a47fc00, 0x3a67fc00, 0x3a8ffe00, 0x3acbfe00,
    0x3b0bff00, 0x3b2fff00, 0x3b53ff00, 0x3b79ff00, 0x3b8f0081, 0x3ba20081, 0x3bb40081, 0x3bc70081,
    0x3bd90081, 0x3bec0081, 0x3bfe0081, 0x3c080041, 0x3c118041, 0x3c1a8041, 0x3c2d0041, 0x3c5200c0,
    0x3c800060, 0x3c970060, 0x3cae00a1, 0x3cc500a1, 0x3cdc40a1, 0x3cf340e0, 0x3d052070, 0x3d10a091,
    0x3d1c2091, 0x3d27a091, 0x3d3340b0, 0x3d3ec0b0, 0x3d4a40b0, 0x3d55c0d1, 0x3d6140d1, 0x3d6cc0d1,
    0x3d7860f0, 0x3d81f078, 0x3d87b078, 0x3d8d7089, 0x3d933089, 0x3d98f098, 0x3d9eb098, 0x3da48098,
    0x3daa40a9, 0x3db000a9, 0x3db5c0a9, 0x3dbb80b8, 0x3dc140b8, 0x3dc710b8, 0x3dd290c9, 0x3de9a0e9,
    0x3e03307c, 0x3e11988c, 0x3e20009c, 0x3e2e68ac, 0x3e3cd0bc, 0x3e4b30c5, 0x3e5998d5, 0x3e6800e5,
    0x3e7668f5, 0x3e826483, 0x3e899886, 0x3e90cc8e, 0x3e980096, 0x3e9f349e, 0x3ea664a6, 0x3ead98ab,
    0x3eb4ccb3, 0x3ebc00bb, 0x3ec334c3, 0x3eca64cb, 0x3ed198ce, 0x3ed8ccd6, 0x3ee000de, 0x3ee734e6,
    0x3eee64ee, 0x3ef598f3, 0x3efcccfb, 0x3f020082, 0x3f059a86, 0x3f09328a, 0x3f0ccc8b, 0x3f10668f,
    0x3f140093, 0x3f179a97, 0x3f1b329b, 0x3f1ecc9e, 0x3f2266a2, 0x3f2600a6, 0x3f2998aa, 0x3f2d32ae,
    0x3f30ccaf, 0x3f3466b3, 0x3f3800b7, 0x3f3b98bb, 0x3f3f32bf, 0x3f42ccc2, 0x3f4666c6, 0x3f4a00ca,
    0x3f4d98ce, 0x3f5132d2, 0x3f54ccd3, 0x3f5866d7, 0x3f5c00db, 0x3f5f98df, 0x3f6332e3, 0x3f66cce6,
    0x3f6a66ea, 0x3f6e00ee, 0x3f7198f2, 0x3f7532f6, 0x3f78ccf7, 0x3f7c66fb, 0x3f7f18ff,
];

/// [`SIGNED_CPU_THRESHOLDS`] for the unsigned map.
#[rustfmt::skip]
const UNSIGNED_CPU_THRESHOLDS: [u32; 255] = [
    0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000, 0xb3000000, 0x37ff8000,
    0x37ff8000, 0x37ff8000, 0x387fc000, 0x387fc000, 0x38bfe000, 0x38bfe000, 0x38ffe000, 0x391ff000,
    0x395ff000, 0x398ff800, 0x39aff800, 0x39bff800, 0x39dff800, 0x39fff800, 0x3a0ffc00, 0x3a1ffc00,
    0x3a2ffc00, 0x3a3ffc00, 0x3a47fc00, 0x3a57fc00, 0x3a67fc00, 0x3a77fc00, 0x3a8bfe00, 0x3aa7fe00,
    0x3acbfe00, 0x3aeffe00, 0x3b0bff00, 0x3b1dff00, 0x3b2fff00, 0x3b41ff00, 0x3b53ff00, 0x3b67ff00,
    0x3b79ff00, 0x3b860081, 0x3b8f0081, 0x3b990081, 0x3ba20081, 0x3bab0081, 0x3bb40081, 0x3bbd0081,
    0x3bc70081, 0x3bd00081, 0x3bd90081, 0x3be20081, 0x3bec0081, 0x3bf50081, 0x3bfe0081, 0x3c038041,
    0x3c080041, 0x3c0d0041, 0x3c118041, 0x3c160041, 0x3c1a8041, 0x3c1f0041, 0x3c288041, 0x3c3b0041,
    0x3c5200c0, 0x3c6900c0, 0x3c800060, 0x3c8b8060, 0x3c970060, 0x3ca280a1, 0x3cae00a1, 0x3cb980a1,
    0x3cc500a1, 0x3cd0c0a1, 0x3cdc40a1, 0x3ce7c0e0, 0x3cf340e0, 0x3cfec0e0, 0x3d052070, 0x3d0ae070,
    0x3d10a091, 0x3d166091, 0x3d1c2091, 0x3d21e091, 0x3d27a091, 0x3d2d8091, 0x3d3340b0, 0x3d3900b0,
    0x3d3ec0b0, 0x3d4480b0, 0x3d4a40b0, 0x3d5000d1, 0x3d55c0d1, 0x3d5b80d1, 0x3d6140d1, 0x3d6700d1,
    0x3d6cc0d1, 0x3d7280f0, 0x3d7860f0, 0x3d7e20f0, 0x3d81f078, 0x3d84d078, 0x3d87b078, 0x3d8a9089,
    0x3d8d7089, 0x3d905089, 0x3d933089, 0x3d961089, 0x3d98f098, 0x3d9bd098, 0x3d9eb098, 0x3da1a098,
    0x3da48098, 0x3da76098, 0x3daa40a9, 0x3dad20a9, 0x3db000a9, 0x3db2e0a9, 0x3db5c0a9, 0x3db8a0b8,
    0x3dbb80b8, 0x3dbe60b8, 0x3dc140b8, 0x3dc430b8, 0x3dc710b8, 0x3dc9f0c9, 0x3dcfb0c9, 0x3ddb30d8,
    0x3de9a0e9, 0x3df800f8, 0x3e03307c, 0x3e0a6885, 0x3e11988c, 0x3e18d095, 0x3e20009c, 0x3e2730a5,
    0x3e2e68ac, 0x3e3598b5, 0x3e3cd0bc, 0x3e4400c5, 0x3e4b30c5, 0x3e5268cc, 0x3e5998d5, 0x3e60c8dc,
    0x3e6800e5, 0x3e6f30ec, 0x3e7668f5, 0x3e7d98fc, 0x3e826483, 0x3e860086, 0x3e899886, 0x3e8d348b,
    0x3e90cc8e, 0x3e946493, 0x3e980096, 0x3e9b989b, 0x3e9f349e, 0x3ea2cca3, 0x3ea664a6, 0x3eaa00ab,
    0x3ead98ab, 0x3eb134ae, 0x3eb4ccb3, 0x3eb864b6, 0x3ebc00bb, 0x3ebf98be, 0x3ec334c3, 0x3ec6ccc6,
    0x3eca64cb, 0x3ece00ce, 0x3ed198ce, 0x3ed534d3, 0x3ed8ccd6, 0x3edc64db, 0x3ee000de, 0x3ee398e3,
    0x3ee734e6, 0x3eeacceb, 0x3eee64ee, 0x3ef200f3, 0x3ef598f3, 0x3ef934f6, 0x3efcccfb, 0x3f00327f,
    0x3f020082, 0x3f03cc83, 0x3f059a86, 0x3f076687, 0x3f09328a, 0x3f0b008b, 0x3f0ccc8b, 0x3f0e9a8e,
    0x3f10668f, 0x3f123292, 0x3f140093, 0x3f15cc96, 0x3f179a97, 0x3f19669a, 0x3f1b329b, 0x3f1d009e,
    0x3f1ecc9e, 0x3f20989f, 0x3f2266a2, 0x3f2432a3, 0x3f2600a6, 0x3f27cca7, 0x3f2998aa, 0x3f2b66ab,
    0x3f2d32ae, 0x3f2f00af, 0x3f30ccaf, 0x3f3298b2, 0x3f3466b3, 0x3f3632b6, 0x3f3800b7, 0x3f39ccba,
    0x3f3b98bb, 0x3f3d66be, 0x3f3f32bf, 0x3f4100c2, 0x3f42ccc2, 0x3f4498c3, 0x3f4666c6, 0x3f4832c7,
    0x3f4a00ca, 0x3f4bcccb, 0x3f4d98ce, 0x3f4f66cf, 0x3f5132d2, 0x3f5300d3, 0x3f54ccd3, 0x3f5698d6,
    0x3f5866d7, 0x3f5a32da, 0x3f5c00db, 0x3f5dccde, 0x3f5f98df, 0x3f6166e2, 0x3f6332e3, 0x3f6500e6,
    0x3f66cce6, 0x3f6898e7, 0x3f6a66ea, 0x3f6c32eb, 0x3f6e00ee, 0x3f6fccef, 0x3f7198f2, 0x3f7366f3,
    0x3f7532f6, 0x3f7700f7, 0x3f78ccf7, 0x3f7a98fa, 0x3f7c66fb, 0x3f7e32fe, 0x3f7f8cff,
];

/// Which map a block is quantized against, for [`quantize_block_like_cpu`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DynamicMap {
    /// [`signed_map`]
    Signed,
    /// [`unsigned_map`]
    Unsigned,
}

/// The decision thresholds of bitsandbytes' CPU quantizer for `map`, as f32.
pub fn cpu_thresholds(map: DynamicMap) -> [f32; 255] {
    let bits = match map {
        DynamicMap::Signed => &SIGNED_CPU_THRESHOLDS,
        DynamicMap::Unsigned => &UNSIGNED_CPU_THRESHOLDS,
    };
    bits.map(f32::from_bits)
}

/// One block quantized as bitsandbytes' CPU kernel does it (`thresholds` from
/// [`cpu_thresholds`]): `absmax = max |a|`, each value divided by it and given the index its
/// search returns (0 for a block of zeros, whose 0/0 its search turns into index 0). Writes the
/// indices into `out` and returns the absmax.
pub fn quantize_block_like_cpu(block: &[f32], thresholds: &[f32; 255], out: &mut [u8]) -> f32 {
    let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (&v, o) in block.iter().zip(out.iter_mut()) {
        *o = if am == 0.0 {
            0
        } else {
            let x = v / am;
            thresholds.partition_point(|&t| t <= x) as u8
        };
    }
    am
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
    fn unsigned_map_is_sorted_from_zero_to_one() {
        let c = unsigned_map();
        assert!(c.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((c[0], c[255]), (0.0, 1.0));
        // Smallest positive value: 10^-6 times the first linspace(0.1, 1, 3) midpoint (0.325).
        assert!((c[1] - 0.325e-6).abs() < 1e-12);
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
    fn the_cpu_kernels_thresholds_reproduce_its_indices() {
        // Values the fixture's probe gave (make_bnb_optim.py): 0 and small positives go to 131,
        // small negatives to 123; each code itself, away from 0, maps to itself.
        let t = cpu_thresholds(DynamicMap::Signed);
        let c = signed_map();
        let block = [0.0, 5.5e-7, 2.1e-5, 4.375e-5, -5.5e-7, c[200], c[10], 1.0];
        let mut q = [0u8; 8];
        assert_eq!(quantize_block_like_cpu(&block, &t, &mut q), 1.0);
        assert_eq!(q, [131, 131, 131, 132, 123, 200, 10, 255]);
        let u = cpu_thresholds(DynamicMap::Unsigned);
        assert!(u.windows(2).all(|w| w[0] <= w[1]) && t.windows(2).all(|w| w[0] <= w[1]));
        let mut q = [0u8; 3];
        quantize_block_like_cpu(&[0.0, unsigned_map()[100], 1.0], &u, &mut q);
        assert_eq!(q[1..], [100, 255]);
    }

    #[test]
    fn zero_block_dequantizes_to_zero() {
        let c = signed_map();
        let (q, am) = quantize_blockwise(&[0.0; 5], &c, 256);
        assert_eq!(am, vec![0.0]);
        assert!(q.iter().all(|&i| dequantize_one(&c, i, am[0]) == 0.0));
    }
}
