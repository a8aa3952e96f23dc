//! Frozen base weights kept quantized: bitsandbytes-exact NF4/FP4 with double quantization
//! ([`blockwise4`], [`dynamic`]), LLM.int8 row-wise int8 ([`int8`]), and GGUF blocks as
//! llama.cpp stores them ([`ggml`]).
//!
//! Every format is a [`QuantMatrix`]: a `[rows, cols]` matrix that can dequantize any range of
//! rows into f32. That is the whole kernel interface the quantized linear op
//! (`ops::frozen_linear`) needs on the CPU: it dequantizes a tile of rows at a time inside the
//! matmul, so no more than one tile of a layer is ever held in f32. A GPU kernel implements the
//! same op over the same packed data.

pub mod bf16;
pub mod blockwise4;
pub mod bnb_format;
pub mod dynamic;
pub mod ggml;
pub mod ggml_quantize;
pub mod int8;
pub mod lsq;
pub mod policy;

use std::fmt;

pub use bf16::Bf16Rows;
pub use blockwise4::{Blockwise4, Code4};
pub use bnb_format::{Statistics, Target};
pub use int8::Int8Rows;
pub use policy::{QuantMethod, QuantSpec};

/// A frozen weight matrix stored in a compressed format.
pub trait QuantMatrix: Send + Sync + fmt::Debug {
    /// `(rows, cols)`: `(out_features, in_features)` for a linear weight.
    fn dims(&self) -> (usize, usize);

    /// Writes rows `r0..r1`, dequantized, row-major into `out` (`(r1 - r0) * cols` values).
    fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]);

    /// Bytes this matrix occupies, quantization statistics included.
    fn storage_bytes(&self) -> usize;

    /// A short name of the format, e.g. `nf4 (blocksize 64, double quant)` or `Q4_1`.
    fn format(&self) -> String;

    /// For writers that need the concrete format (the bitsandbytes layout).
    fn as_any(&self) -> &dyn std::any::Any;

    /// Rows `r0..r1` as a matrix of the same format (one rank's shard with `--shard-base`).
    /// `r0` and `r1` are multiples of [`QuantMatrix::row_granularity`] (or `r1` the last row);
    /// dequantizing the slice gives exactly the rows this matrix gives.
    fn slice_rows(&self, r0: usize, r1: usize) -> anyhow::Result<std::sync::Arc<dyn QuantMatrix>>;

    /// The smallest run of rows that holds whole quantization blocks (1 for row-wise formats).
    fn row_granularity(&self) -> usize {
        1
    }

    /// The whole matrix in f32.
    fn dequantize(&self) -> Vec<f32> {
        let (r, c) = self.dims();
        let mut out = vec![0f32; r * c];
        self.dequantize_rows(0, r, &mut out);
        out
    }

    /// Bits per parameter, statistics included.
    fn bits_per_param(&self) -> f64 {
        let (r, c) = self.dims();
        self.storage_bytes() as f64 * 8.0 / (r * c).max(1) as f64
    }
}

/// Refuses NaN and infinite weights: quantizing them gives a silently wrong model.
pub fn check_finite(name: &str, values: &[f32]) -> anyhow::Result<()> {
    check_finite_from(name, values, 0)
}

/// [`check_finite`] on a piece of a tensor that starts at element `offset` (the error names
/// the element's index in the whole tensor).
pub fn check_finite_from(name: &str, values: &[f32], offset: usize) -> anyhow::Result<()> {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        anyhow::bail!(
            "{name}: element {} is {}; refusing to quantize a tensor with NaN/inf values",
            offset + i,
            values[i]
        )
    }
    Ok(())
}

/// Error introduced by a lossy round trip: max absolute and max-relative (to the largest
/// reference magnitude) difference.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct RoundTripError {
    pub max_abs: f32,
    /// `max_abs / max |reference|`.
    pub rel: f32,
}

impl RoundTripError {
    pub fn between(reference: &[f32], approx: &[f32]) -> Self {
        let mut meter = ErrorMeter::default();
        meter.add(reference, approx);
        meter.error()
    }

    pub fn worst(self, other: Self) -> Self {
        Self {
            max_abs: self.max_abs.max(other.max_abs),
            rel: self.rel.max(other.rel),
        }
    }
}

/// [`RoundTripError`] of one tensor measured a piece at a time (a streaming writer's rows).
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorMeter {
    max_abs: f32,
    max_ref: f32,
}

impl ErrorMeter {
    /// Takes in one piece: reference values and their approximations.
    pub fn add(&mut self, reference: &[f32], approx: &[f32]) {
        for (a, b) in reference.iter().zip(approx) {
            self.max_abs = self.max_abs.max((a - b).abs());
            self.max_ref = self.max_ref.max(a.abs());
        }
    }

    /// The error over every piece taken in.
    pub fn error(&self) -> RoundTripError {
        RoundTripError {
            max_abs: self.max_abs,
            rel: if self.max_ref > 0.0 {
                self.max_abs / self.max_ref
            } else {
                0.0
            },
        }
    }
}

/// Memory of a model's base weights: what is compressed, in which formats, at how many bits.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WeightMemory {
    /// Parameters held in a compressed format (quantized or bf16), and their bytes.
    pub quantized_params: usize,
    pub quantized_bytes: usize,
    /// Parameters held dense (f32), and their bytes.
    pub dense_params: usize,
    pub dense_bytes: usize,
    /// Matrices sharded across ranks (`--shard-base`): their parameters (whole matrices) and
    /// the bytes of this rank's rows.
    pub sharded_params: usize,
    pub sharded_bytes: usize,
    /// Per format (e.g. `nf4 (blocksize 64, double quant)`, `Q4_1`, `bf16`; a sharded matrix
    /// as `f32, this rank's rows`), counting the parameters and bytes held.
    pub formats: std::collections::BTreeMap<String, FormatMemory>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FormatMemory {
    pub tensors: usize,
    pub params: usize,
    pub bytes: usize,
    /// Statistics included.
    pub bits_per_param: f64,
}

impl WeightMemory {
    pub fn of(weights: &crate::model::Weights) -> Self {
        let mut m = Self::default();
        for (_, t) in weights
            .tensors()
            .iter()
            .filter(|(_, t)| t.dtype().is_float())
        {
            m.dense_params += t.elem_count();
            m.dense_bytes += t.elem_count() * t.dtype().size_in_bytes();
        }
        for q in weights.quantized().values() {
            let (r, c) = q.dims();
            m.add_compressed(q.format(), r * c, q.storage_bytes());
        }
        for s in weights.sharded().values() {
            let (r, c) = s.dims();
            m.sharded_params += r * c;
            m.sharded_bytes += s.local_bytes();
            let f = m
                .formats
                .entry(format!("{}, this rank's rows", s.format()))
                .or_default();
            f.tensors += 1;
            f.params += s.local_rows() * c;
            f.bytes += s.local_bytes();
            f.bits_per_param = f.bytes as f64 * 8.0 / f.params.max(1) as f64;
        }
        m
    }

    /// Counts one compressed matrix of `params` parameters in `bytes`, in `format`
    /// ([`QuantMatrix::format`], [`QuantMatrix::storage_bytes`]).
    pub fn add_compressed(&mut self, format: String, params: usize, bytes: usize) {
        self.quantized_params += params;
        self.quantized_bytes += bytes;
        let f = self.formats.entry(format).or_default();
        f.tensors += 1;
        f.params += params;
        f.bytes += bytes;
        f.bits_per_param = f.bytes as f64 * 8.0 / f.params.max(1) as f64;
    }

    /// Bits per parameter of the compressed weights (statistics included).
    pub fn quantized_bits_per_param(&self) -> f64 {
        self.quantized_bytes as f64 * 8.0 / self.quantized_params.max(1) as f64
    }

    /// Bytes held by this process (of a sharded matrix, this rank's rows).
    pub fn total_bytes(&self) -> usize {
        self.quantized_bytes + self.dense_bytes + self.sharded_bytes
    }

    /// Bytes the whole weights take in f32.
    pub fn f32_bytes(&self) -> usize {
        4 * (self.quantized_params + self.dense_params + self.sharded_params)
    }
}
