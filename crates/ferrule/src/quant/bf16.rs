//! Frozen matrices stored in bfloat16: the embedding table and output head of a quantized
//! base. QLoRA keeps every weight it does not quantize in the 16-bit compute dtype; ferrule
//! computes in f32 but stores these in bf16 (half the bytes) and widens rows as it reads them.

use half::bf16;

use super::QuantMatrix;

#[derive(Clone, Debug)]
pub struct Bf16Rows {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<bf16>,
}

impl Bf16Rows {
    /// Rounds to nearest (ties to even), as torch's `.to(torch.bfloat16)`.
    pub fn from_f32(values: &[f32], rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: values.iter().map(|&v| bf16::from_f32(v)).collect(),
        }
    }
}

impl QuantMatrix for Bf16Rows {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        for (o, v) in out
            .iter_mut()
            .zip(&self.data[r0 * self.cols..r1 * self.cols])
        {
            *o = v.to_f32();
        }
    }

    fn storage_bytes(&self) -> usize {
        2 * self.data.len()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn slice_rows(&self, r0: usize, r1: usize) -> anyhow::Result<std::sync::Arc<dyn QuantMatrix>> {
        Ok(std::sync::Arc::new(Self {
            rows: r1 - r0,
            cols: self.cols,
            data: self.data[r0 * self.cols..r1 * self.cols].to_vec(),
        }))
    }

    fn format(&self) -> String {
        "bf16".to_string()
    }
}
