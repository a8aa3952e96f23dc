//! Weights whose quantization was learned (L4Q, [`crate::tuners::Update::Quantized`]) written
//! as GGUF blocks from their own codes, steps and offsets rather than re-quantized by ggml's
//! rule. 4-bit codes in groups of 32 with an offset are exactly GGUF's Q4_1 block (`w = d·q +
//! m`, `q` in 0..=15, `d`, `m` as f16): a learned step goes to `d`, a learned offset to `m`,
//! the codes as they are. The only change is the f16 rounding of `d` and `m`, which this
//! module measures: the largest change of a value, and how many codes re-deriving them from
//! the f16 `d`, `m` (`round(clamp((w' − m)/d, 0, 15))`) would change.

use anyhow::{bail, Result};
use half::f16;

use crate::quant::ggml_quantize::{q4_1_from_codes, GgmlWriteType};
use crate::tuners::{GroupCodes, Tuner, Update};

/// What writing the learned codes changed, over all such tensors.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LearnedReport {
    /// Tensors written from learned codes.
    pub tensors: usize,
    /// Codes written (every one as learned).
    pub codes: usize,
    /// Of those, how many re-deriving from the f16 steps and offsets would have changed.
    pub codes_changed_by_f16: usize,
    /// Largest `|q·f16(d) + f16(m) − (q·s + b)|`: what the f16 rounding of the steps and
    /// offsets changes in a value.
    pub max_abs_f16: f32,
}

impl LearnedReport {
    fn add(&mut self, codes: &GroupCodes) {
        self.tensors += 1;
        self.codes += codes.codes.len();
        self.codes_changed_by_f16 += codes.changed_by_f16;
        let gs = codes.group_size;
        for (i, q) in codes.codes.iter().enumerate() {
            let g = i / gs;
            let (s, b) = (codes.steps[g], codes.offsets[g]);
            let exact = *q as f32 * s + b;
            let written = *q as f32 * f16::from_f32(s).to_f32() + f16::from_f32(b).to_f32();
            self.max_abs_f16 = self.max_abs_f16.max((written - exact).abs());
        }
    }
}

/// Whether any of `tuner`'s updates is a learned quantization (an L4Q adapter): its model is
/// written as Q4_1 unless told otherwise.
pub fn learns_quantization(tuner: Option<&dyn Tuner>) -> Result<bool> {
    let Some(t) = tuner else { return Ok(false) };
    Ok(t.updates()?
        .iter()
        .any(|(_, u)| matches!(u, Update::Quantized(_))))
}

/// The bytes of the learned `codes` of tensor `hf` as `ty` (Q4_1 only), before any row
/// permutation; recorded in `report`. Any other type, bit width or group size is an error
/// naming the tensor.
pub fn learned_bytes(
    hf: &str,
    codes: &GroupCodes,
    ty: GgmlWriteType,
    report: &mut LearnedReport,
) -> Result<Vec<u8>> {
    if ty != GgmlWriteType::Q4_1 {
        bail!("{hf}: its weight is learned {}-bit codes (L4Q); GGUF has them as learned only in Q4_1: export with --outtype q4_1 (or f32 for their values)", codes.bits)
    }
    if codes.bits != 4 || codes.group_size != 32 {
        bail!("{hf}: learned with bits={} and group_size={} (L4Q's --l4q-bits, --l4q-group-size); GGUF's Q4_1 block is 4 bits in groups of 32, so these codes cannot be written as learned. Train with --l4q-bits 4 --l4q-group-size 32, or export with --outtype f32 (their values)", codes.bits, codes.group_size)
    }
    report.add(codes);
    q4_1_from_codes(&codes.codes, &codes.steps, &codes.offsets)
}
