//! GGUF tensors kept in llama.cpp's block formats (Q4_0, Q4_1, Q5_x, Q8_0, the k-quants, F16,
//! BF16), dequantized row by row with candle's block decoders.

use anyhow::{bail, Result};
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1,
};
use candle_core::quantized::{GgmlDType, GgmlType};
use half::{bf16, f16};

use super::QuantMatrix;

/// A `[rows, cols]` matrix of GGUF blocks; each row is a whole number of blocks.
pub struct GgmlMatrix {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    /// The blocks, in a `u32` buffer so that every block type (alignment 1 to 4) can be read in
    /// place.
    words: Vec<u32>,
    bytes: usize,
}

impl std::fmt::Debug for GgmlMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GgmlMatrix({:?}, {}x{})",
            self.dtype, self.rows, self.cols
        )
    }
}

/// Runs `$body` with `$t` bound to the block type of `$dtype`.
macro_rules! with_block_type {
    ($dtype:expr, $t:ident, $body:block) => {
        match $dtype {
            GgmlDType::F32 => {
                type $t = f32;
                $body
            }
            GgmlDType::F16 => {
                type $t = f16;
                $body
            }
            GgmlDType::BF16 => {
                type $t = bf16;
                $body
            }
            GgmlDType::Q4_0 => {
                type $t = BlockQ4_0;
                $body
            }
            GgmlDType::Q4_1 => {
                type $t = BlockQ4_1;
                $body
            }
            GgmlDType::Q5_0 => {
                type $t = BlockQ5_0;
                $body
            }
            GgmlDType::Q5_1 => {
                type $t = BlockQ5_1;
                $body
            }
            GgmlDType::Q8_0 => {
                type $t = BlockQ8_0;
                $body
            }
            GgmlDType::Q8_1 => {
                type $t = BlockQ8_1;
                $body
            }
            GgmlDType::Q2K => {
                type $t = BlockQ2K;
                $body
            }
            GgmlDType::Q3K => {
                type $t = BlockQ3K;
                $body
            }
            GgmlDType::Q4K => {
                type $t = BlockQ4K;
                $body
            }
            GgmlDType::Q5K => {
                type $t = BlockQ5K;
                $body
            }
            GgmlDType::Q6K => {
                type $t = BlockQ6K;
                $body
            }
            GgmlDType::Q8K => {
                type $t = BlockQ8K;
                $body
            }
        }
    };
}

impl GgmlMatrix {
    /// Takes the raw bytes of a `[rows, cols]` tensor (HF layout) of type `dtype`.
    pub fn new(dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let bs = dtype.block_size();
        if !cols.is_multiple_of(bs) {
            bail!("a {dtype:?} row of {cols} values is not a whole number of {bs}-value blocks")
        }
        let want = rows * cols / bs * dtype.type_size();
        if data.len() != want {
            bail!(
                "{dtype:?} tensor [{rows}, {cols}] needs {want} bytes, got {}",
                data.len()
            )
        }
        let mut words = vec![0u32; data.len().div_ceil(4)];
        // SAFETY: `words` has at least `data.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), words.as_mut_ptr() as *mut u8, data.len())
        };
        Ok(Self {
            dtype,
            rows,
            cols,
            words,
            bytes: data.len(),
        })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }
}

impl QuantMatrix for GgmlMatrix {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let start = r0 * self.row_bytes();
        let len = (r1 - r0) * self.row_bytes();
        let out = &mut out[..(r1 - r0) * self.cols];
        with_block_type!(self.dtype, T, {
            let n = len / std::mem::size_of::<T>();
            // SAFETY: the buffer is 4-byte aligned and `start` is a multiple of the block size,
            // itself a multiple of the block's alignment (at most 4); every bit pattern is a
            // valid block (integers and floats only); `new` checked the length.
            let blocks: &[T] = unsafe {
                std::slice::from_raw_parts(
                    (self.words.as_ptr() as *const u8).add(start) as *const T,
                    n,
                )
            };
            T::to_float(blocks, out);
        })
    }

    fn storage_bytes(&self) -> usize {
        self.bytes
    }

    fn slice_rows(&self, r0: usize, r1: usize) -> anyhow::Result<std::sync::Arc<dyn QuantMatrix>> {
        let rb = self.row_bytes();
        // SAFETY: `words` holds `self.bytes` = rows · row_bytes initialized bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.bytes) };
        Ok(std::sync::Arc::new(Self::new(
            self.dtype,
            r1 - r0,
            self.cols,
            &bytes[r0 * rb..r1 * rb],
        )?))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn format(&self) -> String {
        crate::model::gguf::ggml_type_name(self.dtype).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn rows_match_candle_dequantization() {
        let vals: Vec<f32> = (0..4 * 64)
            .map(|i| ((i * 37) % 101) as f32 / 40.0 - 1.2)
            .collect();
        let t = Tensor::from_vec(vals, (4, 64), &Device::Cpu).unwrap();
        for dt in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q5_1,
            GgmlDType::F16,
        ] {
            let q = candle_core::quantized::QTensor::quantize(&t, dt).unwrap();
            let whole: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let m = GgmlMatrix::new(dt, 4, 64, &q.data().unwrap()).unwrap();
            let mut rows = vec![0f32; 2 * 64];
            m.dequantize_rows(1, 3, &mut rows);
            assert_eq!(rows, whole[64..192], "{dt:?}");
        }
    }
}
