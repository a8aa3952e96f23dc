//! Row-wise absmax int8 weights as bitsandbytes' LLM.int8 stores them (Dettmers et al. 2022,
//! §3.1 "vector-wise quantization"): `CB = round(W · 127 / SCB)` with `SCB = max |row|`;
//! dequantized as `CB · SCB · (1/127)`.

use anyhow::{bail, Result};

use super::QuantMatrix;

/// bitsandbytes' `1/127` constant (`int8_vectorwise_dequant`).
#[allow(clippy::excessive_precision)]
const INV_127: f32 = 7.874015718698502e-3;

/// An int8 matrix with one f32 scale per row.
#[derive(Clone, Debug)]
pub struct Int8Rows {
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols]`, row-major (`weight`, int8, in the serialized layout).
    pub cb: Vec<i8>,
    /// Row absmax (`SCB`).
    pub scb: Vec<f32>,
}

impl Int8Rows {
    /// `int8_vectorwise_quant` without outlier threshold: `round(x · (127 / absmax))`, ties to
    /// even as torch rounds. A row of zeros (absmax 0, where torch computes 0·∞ = NaN) stores
    /// zeros.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if values.len() != rows * cols {
            bail!(
                "int8 quantize: {rows}x{cols} needs {} values, got {}",
                rows * cols,
                values.len()
            )
        }
        let mut cb = Vec::with_capacity(values.len());
        let scb = Self::row_absmax(values, rows, cols);
        for (row, &am) in values.chunks(cols.max(1)).take(rows).zip(&scb) {
            // torch evaluates `127.0 / t` as `reciprocal(t) * 127.0`.
            let s = (1.0 / am) * 127.0;
            cb.extend(row.iter().map(|&v| {
                if am == 0.0 {
                    0
                } else {
                    (v * s).round_ties_even() as i8
                }
            }));
        }
        Self::from_parts(rows, cols, cb, scb)
    }

    /// `SCB`: the absmax of each row of `values` (`[rows, cols]`), what [`Int8Rows::quantize`]
    /// stores, without the codes.
    pub fn row_absmax(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        values
            .chunks(cols.max(1))
            .take(rows)
            .map(|row| row.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect()
    }

    pub fn from_parts(rows: usize, cols: usize, cb: Vec<i8>, scb: Vec<f32>) -> Result<Self> {
        if cb.len() != rows * cols {
            bail!(
                "int8 weight has {} values; shape [{rows}, {cols}] needs {}",
                cb.len(),
                rows * cols
            )
        }
        if scb.len() != rows {
            bail!(
                "int8 SCB has {} values; {rows} rows need one each",
                scb.len()
            )
        }
        Ok(Self {
            rows,
            cols,
            cb,
            scb,
        })
    }
}

impl QuantMatrix for Int8Rows {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let c = self.cols;
        for r in r0..r1 {
            let s = self.scb[r];
            let dst = &mut out[(r - r0) * c..(r - r0 + 1) * c];
            for (d, &q) in dst.iter_mut().zip(&self.cb[r * c..(r + 1) * c]) {
                *d = q as f32 * s * INV_127;
            }
        }
    }

    fn storage_bytes(&self) -> usize {
        self.cb.len() + 4 * self.scb.len()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn slice_rows(&self, r0: usize, r1: usize) -> Result<std::sync::Arc<dyn QuantMatrix>> {
        let c = self.cols;
        Ok(std::sync::Arc::new(Self::from_parts(
            r1 - r0,
            c,
            self.cb[r0 * c..r1 * c].to_vec(),
            self.scb[r0..r1].to_vec(),
        )?))
    }

    fn format(&self) -> String {
        super::QuantSpec {
            method: super::QuantMethod::Int8,
            blocksize: 64,
            double_quant: false,
        }
        .format()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_scale_to_127_and_zero_rows_stay_zero() {
        let v = [1.0, -0.5, 0.25, 0.0, 0.0, 0.0, 2.0, 1.0, -2.0];
        let q = Int8Rows::quantize(&v, 3, 3).unwrap();
        assert_eq!(q.scb, vec![1.0, 0.0, 2.0]);
        // 0.5 * 127 = 63.5 -> 64 (ties to even), 0.25 * 127 = 31.75 -> 32.
        assert_eq!(q.cb, vec![127, -64, 32, 0, 0, 0, 127, 64, -127]);
        let d = q.dequantize();
        assert_eq!(&d[3..6], &[0.0; 3]);
        assert!((d[6] - 2.0).abs() < 1e-6 && (d[1] + 0.503937).abs() < 1e-5);
    }
}
