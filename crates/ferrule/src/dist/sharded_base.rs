//! The frozen base sharded across ranks (`--shard-base`): FSDP-style sharding of a dense or
//! quantized base (Zhao et al. 2023, "PyTorch FSDP"; ZeRO-3's parameter partitioning applied to
//! the frozen weights).
//!
//! Each rank keeps a contiguous run of every frozen matrix's rows, in the format it was loaded
//! in (f32, NF4/FP4, int8, GGUF blocks, bf16). The ops that read a weight walk it in tiles of
//! rows ([`ShardedWeight::for_each_tile`]): the rank that owns a tile dequantizes it and
//! broadcasts it, so a rank holds its shard plus one f32 tile ([`TILE_ELEMS`] values) of any
//! layer, never a whole gathered layer. An embedding lookup is one all-gather of the token
//! ids and one reduce-scatter of the rows ([`ShardedWeight::rows`]).
//!
//! Tiles travel in f32: a quantized base is sent dequantized (4 bytes per parameter), not in
//! its packed form. That keeps one kernel path for every format; sending packed blocks would
//! cut the traffic 4–8x and is the next step for machines linked by a network.
//!
//! Every rank must read the same weights in the same order: the trainer runs the same forward
//! and backward passes on every rank when the base is sharded (`Model::lockstep`).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::collective::BaseComm;
use crate::ops::frozen_linear::TILE_ELEMS;
use crate::quant::QuantMatrix;

/// This rank's rows of a sharded matrix.
#[derive(Debug)]
enum LocalRows {
    Dense(Vec<f32>),
    Quantized(Arc<dyn QuantMatrix>),
}

/// A frozen `[rows, cols]` matrix of which this rank holds rows `bounds[rank]..bounds[rank+1]`.
#[derive(Debug)]
pub struct ShardedWeight {
    rows: usize,
    cols: usize,
    /// `world + 1` row boundaries, `bounds[0] = 0`, `bounds[world] = rows`.
    bounds: Vec<usize>,
    local: LocalRows,
    /// Format of the whole matrix as loaded, e.g. `f32` or `nf4 (blocksize 64, double quant)`.
    format: String,
    comm: Arc<dyn BaseComm>,
}

/// Ids travel as f32 in the embedding lookup: exact below 2^24.
const MAX_SHARDED_ROWS: usize = 1 << 24;

/// `world + 1` boundaries splitting `rows` into runs as equal as possible whose starts are
/// multiples of `granularity`.
pub fn row_bounds(rows: usize, world: usize, granularity: usize) -> Vec<usize> {
    let g = granularity.max(1);
    let units = rows.div_ceil(g);
    (0..=world)
        .map(|k| (units * k / world.max(1) * g).min(rows))
        .collect()
}

impl ShardedWeight {
    /// Shards a dense `[rows, cols]` matrix (row-major `values`).
    pub fn from_dense(
        values: &[f32],
        rows: usize,
        cols: usize,
        comm: Arc<dyn BaseComm>,
    ) -> Result<Self> {
        let bounds = Self::bounds_for(rows, 1, comm.as_ref())?;
        let (lo, hi) = (bounds[comm.rank()], bounds[comm.rank() + 1]);
        let local = LocalRows::Dense(values[lo * cols..hi * cols].to_vec());
        Ok(Self {
            rows,
            cols,
            bounds,
            local,
            format: "f32".into(),
            comm,
        })
    }

    /// Shards a quantized matrix, keeping this rank's rows in the same format.
    pub fn from_quantized(q: &dyn QuantMatrix, comm: Arc<dyn BaseComm>) -> Result<Self> {
        let (rows, cols) = q.dims();
        let bounds = Self::bounds_for(rows, q.row_granularity(), comm.as_ref())?;
        let (lo, hi) = (bounds[comm.rank()], bounds[comm.rank() + 1]);
        let local = LocalRows::Quantized(q.slice_rows(lo, hi)?);
        Ok(Self {
            rows,
            cols,
            bounds,
            local,
            format: q.format(),
            comm,
        })
    }

    fn bounds_for(rows: usize, granularity: usize, comm: &dyn BaseComm) -> Result<Vec<usize>> {
        if rows >= MAX_SHARDED_ROWS {
            bail!("a matrix of {rows} rows is too tall to shard (at most {MAX_SHARDED_ROWS})")
        }
        Ok(row_bounds(rows, comm.world_size(), granularity))
    }

    /// `(rows, cols)` of the whole matrix.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes this rank holds.
    pub fn local_bytes(&self) -> usize {
        match &self.local {
            LocalRows::Dense(v) => 4 * v.len(),
            LocalRows::Quantized(q) => q.storage_bytes(),
        }
    }

    /// Rows this rank holds.
    pub fn local_rows(&self) -> usize {
        self.bounds[self.comm.rank() + 1] - self.bounds[self.comm.rank()]
    }

    /// Whether this rank's rows are kept quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self.local, LocalRows::Quantized(_))
    }

    /// Format of the whole matrix as it was loaded.
    pub fn format(&self) -> &str {
        &self.format
    }

    /// Writes this rank's rows `r0..r1` (global indices) into `out`, dequantized.
    fn read_local(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let lo = self.bounds[self.comm.rank()];
        let c = self.cols;
        match &self.local {
            LocalRows::Dense(v) => out.copy_from_slice(&v[(r0 - lo) * c..(r1 - lo) * c]),
            LocalRows::Quantized(q) => {
                let chunk_rows = (r1 - r0)
                    .div_ceil(rayon::current_num_threads().max(1))
                    .max(1);
                out.par_chunks_mut(chunk_rows * c)
                    .enumerate()
                    .for_each(|(i, part)| {
                        let a = r0 - lo + i * chunk_rows;
                        q.dequantize_rows(a, a + part.len() / c, part);
                    });
            }
        }
    }

    /// Calls `f(r0, r1, tile)` for consecutive row tiles of the whole matrix, each tile
    /// broadcast in f32 by the rank that owns it (a collective: every rank calls it).
    pub fn for_each_tile(&self, mut f: impl FnMut(usize, usize, &[f32])) -> Result<()> {
        let cols = self.cols.max(1);
        let tile_rows = (TILE_ELEMS / cols).max(1);
        let mut buf = vec![0f32; tile_rows.min(self.rows.max(1)) * self.cols];
        for owner in 0..self.bounds.len() - 1 {
            let (lo, hi) = (self.bounds[owner], self.bounds[owner + 1]);
            for r0 in (lo..hi).step_by(tile_rows) {
                let r1 = (r0 + tile_rows).min(hi);
                let tile = &mut buf[..(r1 - r0) * self.cols];
                if owner == self.comm.rank() {
                    self.read_local(r0, r1, tile);
                }
                self.comm
                    .broadcast_f32(owner, tile)
                    .context("gathering a sharded base weight")?;
                f(r0, r1, tile);
            }
        }
        Ok(())
    }

    /// The whole matrix in f32 (a collective).
    pub fn gather(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.for_each_tile(|r0, r1, tile| {
            out[r0 * self.cols..r1 * self.cols].copy_from_slice(tile)
        })?;
        Ok(out)
    }

    /// Rows `ids` as `[ids.len(), cols]`, row-major: an embedding lookup across the shards (a
    /// collective; every rank passes its own ids). The ids of all ranks are all-gathered, each
    /// rank fills the rows it owns (zeros elsewhere), and a reduce-scatter hands every rank
    /// its own rows, exactly (each row is one rank's value plus zeros).
    ///
    /// Errors, on every rank alike, when any rank's id is out of range.
    pub fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let (world, rank, c) = (self.comm.world_size(), self.comm.rank(), self.cols);
        let mut counts = vec![0f32; world];
        self.comm.all_gather_f32(&[ids.len() as f32], &mut counts)?;
        let most = counts.iter().fold(0f32, |m, &n| m.max(n)) as usize;
        let mut mine = vec![-1f32; most];
        mine.iter_mut().zip(ids).for_each(|(m, &id)| *m = id as f32);
        let mut all = vec![0f32; most * world];
        self.comm.all_gather_f32(&mine, &mut all)?;
        if let Some((i, &bad)) = all
            .iter()
            .enumerate()
            .find(|(_, &id)| id >= self.rows as f32)
        {
            bail!(
                "embedding: id {bad} (rank {}'s token {}) out of range for {} rows",
                i / most.max(1),
                i % most.max(1),
                self.rows
            )
        }
        let (lo, hi) = (self.bounds[rank], self.bounds[rank + 1]);
        let mut filled = vec![0f32; most * world * c];
        filled
            .par_chunks_mut(c.max(1))
            .zip(all.par_iter())
            .for_each(|(row, &id)| {
                let r = id as usize;
                if id >= 0.0 && (lo..hi).contains(&r) {
                    self.read_local(r, r + 1, row);
                }
            });
        let mut out = vec![0f32; most * c];
        self.comm.reduce_scatter_sum_f32(&filled, &mut out)?;
        out.truncate(ids.len() * c);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleProcess;
    use crate::quant::{Blockwise4, Code4};

    #[test]
    fn bounds_split_rows_evenly_on_block_boundaries() {
        assert_eq!(row_bounds(10, 2, 1), vec![0, 5, 10]);
        assert_eq!(row_bounds(10, 3, 1), vec![0, 3, 6, 10]);
        // Granularity 4 over 10 rows: 3 units (4, 4, 2 rows) over 2 ranks.
        assert_eq!(row_bounds(10, 2, 4), vec![0, 4, 10]);
        assert_eq!(row_bounds(3, 4, 1), vec![0, 0, 1, 2, 3]);
    }

    /// On one rank the shard is the whole matrix: tiles, gather and lookup give its values.
    #[test]
    fn a_world_of_one_reads_the_matrix_it_was_given() {
        let (rows, cols) = (TILE_ELEMS / 64 + 5, 64); // two tiles
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let q = Blockwise4::quantize(&vals, &[rows, cols], Code4::Nf4, 64, true).unwrap();
        let exact = q.dequantize();
        let comm: Arc<dyn BaseComm> = Arc::new(SingleProcess);
        let dense = ShardedWeight::from_dense(&vals, rows, cols, comm.clone()).unwrap();
        assert_eq!(dense.gather().unwrap(), vals);
        let sharded = ShardedWeight::from_quantized(&q, comm).unwrap();
        assert_eq!(sharded.gather().unwrap(), exact);
        let ids = [3u32, 0, (rows - 1) as u32];
        let got = sharded.rows(&ids).unwrap();
        for (k, &id) in ids.iter().enumerate() {
            assert_eq!(
                &got[k * cols..(k + 1) * cols],
                &exact[id as usize * cols..(id as usize + 1) * cols]
            );
        }
        let err = sharded.rows(&[rows as u32]).unwrap_err().to_string();
        assert!(err.contains("out of range"), "{err}");
    }

    /// A shard at block boundaries dequantizes to exactly the rows of the whole matrix, in
    /// every format (4-bit with double quantization included, whose slice keeps f32 absmax).
    #[test]
    fn row_slices_of_every_format_equal_the_rows_they_hold() {
        use crate::quant::{ggml::GgmlMatrix, Bf16Rows, Int8Rows};
        let (rows, cols) = (37, 96);
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let formats: Vec<Box<dyn QuantMatrix>> = vec![
            Box::new(Blockwise4::quantize(&vals, &[rows, cols], Code4::Nf4, 64, true).unwrap()),
            Box::new(Blockwise4::quantize(&vals, &[rows, cols], Code4::Fp4, 128, false).unwrap()),
            Box::new(Int8Rows::quantize(&vals, rows, cols).unwrap()),
            Box::new(Bf16Rows::from_f32(&vals, rows, cols)),
            Box::new(
                GgmlMatrix::new(candle_core::quantized::GgmlDType::F32, rows, cols, &bytes)
                    .unwrap(),
            ),
        ];
        for q in &formats {
            let whole = q.dequantize();
            let g = q.row_granularity();
            for world in [2, 3] {
                let b = row_bounds(rows, world, g);
                for k in 0..world {
                    let s = q.slice_rows(b[k], b[k + 1]).unwrap();
                    assert_eq!(
                        s.dequantize(),
                        &whole[b[k] * cols..b[k + 1] * cols],
                        "{} rows {}..{}",
                        q.format(),
                        b[k],
                        b[k + 1]
                    );
                }
            }
        }
        // 96 columns in blocks of 64: two rows hold whole blocks.
        assert_eq!(formats[0].row_granularity(), 2);
        assert!(formats[0].slice_rows(1, 3).is_err());
    }
}
