//! Cross-entropy through a frozen output head without ever holding the `[n, vocab]` logits.
//!
//! `loss = mean_i (logsumexp_j h_i·W_j − h_i·W_{y_i})` is computed one tile of vocabulary rows
//! of `W` at a time (the tiles of the frozen-linear op, dequantized once per pass when `W` is
//! quantized): forward keeps a running max and sum per row (online log-sum-exp) and the target
//! logit; backward recomputes each tile's logits and accumulates
//! `dh = Σ_tiles ((softmax − onehot)·g/n) · W_tile`. Memory is `n × tile` instead of two
//! `n × vocab` buffers (SmolLM2, 2048 counted tokens: 400 MB each), for one extra head matmul.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::compute_dtype::ComputeDtype;
use super::frozen_linear::{for_each_tile, FrozenWeight};
use super::kernels::{self, multiversion};
use super::product::{self, Operand, Values};

/// Mean cross-entropy of `hidden: [n, h]` through the frozen head `weight: [vocab, h]` against
/// `labels` (all counted). Returns `(loss, n)`.
pub fn head_cross_entropy(
    hidden: &Tensor,
    weight: &FrozenWeight,
    labels: Vec<i64>,
) -> Result<(Tensor, usize)> {
    let n = labels.len();
    let (vocab, _) = weight.dims();
    if let Some(&bad) = labels.iter().find(|&&l| l < 0 || l as usize >= vocab) {
        candle_core::bail!("head cross-entropy: label {bad} outside the vocabulary of {vocab}")
    }
    let op = HeadCrossEntropy {
        weight: weight.clone(),
        labels,
        lse: Mutex::new(None),
    };
    Ok((
        hidden.contiguous()?.apply_op1_arc(Arc::new(Box::new(op)))?,
        n,
    ))
}

struct HeadCrossEntropy {
    weight: FrozenWeight,
    labels: Vec<i64>,
    /// Per-row log-sum-exp from the forward, reused by the backward.
    lse: Mutex<Option<Vec<f32>>>,
}

/// `block[n, cols] = x[n, k] · tile[cols, k]ᵀ`, `x` in the tile's dtype.
fn logits_block(
    x: &Operand,
    n: usize,
    k: usize,
    tile: Values,
    cols: usize,
    block: &mut [f32],
) -> Result<()> {
    // SAFETY: x is [n, k], tile [cols, k] (read transposed), block [n, cols], all row-major.
    unsafe {
        product::gemm(
            n,
            cols,
            k,
            block.as_mut_ptr(),
            cols,
            false,
            x.values().view(0, k, 1),
            tile.view(0, 1, k),
        )
    }
}

/// `dx[n, k] += block[n, cols] · tile[cols, k]`, `block` rounded to the tile's dtype.
fn add_block_grad(
    block: &[f32],
    n: usize,
    k: usize,
    tile: Values,
    cols: usize,
    dx: &mut [f32],
    dtype: ComputeDtype,
) -> Result<()> {
    let block = Operand::new(block, dtype);
    // SAFETY: block [n, cols], tile [cols, k], dx [n, k], row-major. Each tile's share is
    // added to dx, zeroed by the caller (see `frozen_linear::add_product`).
    unsafe {
        product::gemm(
            n,
            k,
            cols,
            dx.as_mut_ptr(),
            k,
            true,
            block.values().view(0, cols, 1),
            tile.view(0, k, 1),
        )
    }
}

multiversion! {
    /// Folds a block of logits (columns `c0..c0+cols`) into each row's running max `m`, sum
    /// `s` (of exp(x − m)) and target logit.
    fn online_lse(block: &[f32], cols: usize, c0: usize, labels: &[i64], m: &mut [f32], s: &mut [f32], target: &mut [f32]) {
        for (r, row) in block.chunks_exact(cols).enumerate() {
            let bm = kernels::max(row);
            let new_m = m[r].max(bm);
            let mut acc = 0f32;
            for &x in row {
                acc += kernels::exp(x - new_m);
            }
            s[r] = s[r] * kernels::exp(m[r] - new_m) + acc;
            m[r] = new_m;
            let l = labels[r] as usize;
            if (c0..c0 + cols).contains(&l) {
                target[r] = row[l - c0];
            }
        }
    }
}

multiversion! {
    /// Turns a block of logits into `(softmax − onehot)·coef` in place.
    fn softmax_grad(block: &mut [f32], cols: usize, c0: usize, labels: &[i64], lse: &[f32], coef: f32) {
        for (r, row) in block.chunks_exact_mut(cols).enumerate() {
            for x in row.iter_mut() {
                *x = kernels::exp(*x - lse[r]) * coef;
            }
            let l = labels[r] as usize;
            if (c0..c0 + cols).contains(&l) {
                row[l - c0] -= coef;
            }
        }
    }
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous_f32(storage, layout, self.name())?;
        let (n, k) = layout.shape().dims2()?;
        if n != self.labels.len() || k != self.weight.dims().1 {
            candle_core::bail!(
                "{}: hidden [{n}, {k}] does not fit {} labels and a head of width {}",
                self.name(),
                self.labels.len(),
                self.weight.dims().1
            )
        }
        let (mut m, mut s, mut target) = (vec![f32::NEG_INFINITY; n], vec![0f32; n], vec![0f32; n]);
        let mut block = Vec::new();
        let x = Operand::new(x, self.weight.compute_dtype());
        for_each_tile(&self.weight, |c0, c1, tile| {
            let cols = c1 - c0;
            block.resize(n * cols, 0.0);
            logits_block(&x, n, k, tile, cols, &mut block)?;
            online_lse(&block, cols, c0, &self.labels, &mut m, &mut s, &mut target);
            Ok(())
        })?;
        let lse: Vec<f32> = m.iter().zip(&s).map(|(m, s)| m + s.ln()).collect();
        let total: f64 = lse.iter().zip(&target).map(|(l, t)| (l - t) as f64).sum();
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((
            CpuStorage::F32(vec![(total / n.max(1) as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res
            .flatten_all()?
            .to_vec1::<f32>()?
            .first()
            .copied()
            .unwrap_or(0.0);
        let (n, k) = arg.dims2()?;
        let coef = g / n.max(1) as f32;
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).take();
        let lse = match lse {
            Some(l) => l,
            None => candle_core::bail!("{}: backward without a forward", self.name()),
        };
        let mut dx = vec![0f32; n * k];
        let dtype = self.weight.compute_dtype();
        kernels::with_f32(arg, self.name(), |x| {
            let x = Operand::new(x, dtype);
            let mut block = Vec::new();
            for_each_tile(&self.weight, |c0, c1, tile| {
                let cols = c1 - c0;
                block.resize(n * cols, 0.0);
                logits_block(&x, n, k, tile, cols, &mut block)?;
                softmax_grad(&mut block, cols, c0, &self.labels, &lse, coef);
                add_block_grad(&block, n, k, tile, cols, &mut dx, dtype)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, (n, k), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::loss::cross_entropy_reference;
    use crate::quant::{Blockwise4, Code4, QuantMatrix};
    use candle_core::{Device, Var};

    /// Loss and dh equal the composite reference (full logits, log-softmax) for a dense head,
    /// and for a quantized head spanning several tiles.
    #[test]
    fn matches_the_full_logits_reference() {
        let dev = Device::Cpu;
        let (n, k) = (5, 64);
        let vocab = super::super::frozen_linear::TILE_ELEMS / k + 300; // two tiles
        let w: Vec<f32> = (0..vocab * k)
            .map(|i| (((i * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0) * 0.1)
            .collect();
        let q = Arc::new(Blockwise4::quantize(&w, &[vocab, k], Code4::Nf4, 64, false).unwrap());
        let dense = Tensor::from_vec(q.dequantize(), (vocab, k), &dev).unwrap();
        let labels = vec![3i64, (vocab - 1) as i64, 16500, 0, 9];
        let h0: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.13).cos()).collect();
        let run = |weight: Option<FrozenWeight>| {
            let h = Var::from_vec(h0.clone(), (n, k), &dev).unwrap();
            let loss = match weight {
                Some(w) => {
                    head_cross_entropy(h.as_tensor(), &w, labels.clone())
                        .unwrap()
                        .0
                }
                None => {
                    let logits = h.as_tensor().matmul(&dense.t().unwrap()).unwrap();
                    cross_entropy_reference(&logits, &Tensor::new(labels.as_slice(), &dev).unwrap())
                        .unwrap()
                        .0
                }
            };
            let dh: Vec<f32> = loss
                .backward()
                .unwrap()
                .get(h.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (loss.to_scalar::<f32>().unwrap(), dh)
        };
        let (lr, dr) = run(None);
        for w in [
            FrozenWeight::Dense(dense.clone()),
            FrozenWeight::Quantized(q.clone(), ComputeDtype::F32),
        ] {
            let (l, d) = run(Some(w));
            assert!((l - lr).abs() < 1e-4 * lr.abs(), "loss {l} vs {lr}");
            let max = d
                .iter()
                .zip(&dr)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max < 1e-5, "dh differs by {max}");
        }
    }
}
