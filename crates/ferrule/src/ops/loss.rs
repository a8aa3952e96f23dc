//! Losses as transformers computes them.
//!
//! On the CPU with f32 logits the cross-entropy is one fused custom op over the logits
//! (log-softmax, gather and masked mean; labels captured). It keeps one f32 per row (the
//! log-sum-exp) and its backward writes `(softmax − onehot)·mask/count·g` straight into the
//! gradient buffer: no other `[n, vocab]` tensor is made (with vocab 49152 and 2048 tokens one
//! copy is 400 MB). The causal shift is done on the labels, so the logits are never sliced
//! or copied. Elsewhere the composite [`cross_entropy_reference`] runs.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

use super::kernels::{self, multiversion};

/// Label value that contributes no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy over positions whose label is not `IGNORE_INDEX`.
/// `logits: [n, classes]`, `labels: [n]` (i64). Returns `(loss, counted_positions)`;
/// the loss is 0 when nothing is counted.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    if kernels::fused_ok(logits) && logits.rank() == 2 {
        let labels = labels
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        return fused_cross_entropy(logits, labels);
    }
    cross_entropy_reference(logits, labels)
}

/// Composite cross-entropy from differentiable primitives (fallback and test reference).
pub fn cross_entropy_reference(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    if logits.dim(0)? == 0 {
        // No rows (a one-token sequence): candle cannot take the max of an empty axis.
        return Ok(((logits.to_dtype(DType::F32)?.sum_all()? * 0.0)?, 0));
    }
    let labels = labels.to_dtype(DType::I64)?;
    let keep = labels.ge(0i64)?;
    let count = keep.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
    let safe = keep
        .where_cond(&labels, &labels.zeros_like()?)?
        .to_dtype(DType::U32)?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let masked = (picked * keep.to_dtype(DType::F32)?)?;
    let loss = (masked.sum_all()?.neg()? / (count.max(1) as f64))?;
    Ok((loss, count))
}

/// Causal-LM loss: logits at position i predict label i+1 (transformers shifts labels).
/// `logits: [b, t, v]`, `labels: [b, t]`.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if kernels::fused_ok(logits) {
        // Shift the labels instead of the logits: row (i, j) is scored against label
        // (i, j+1); each sequence's last row is ignored.
        let labels = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        if labels.len() != b || labels.iter().any(|l| l.len() != t) {
            candle_core::bail!("causal_lm_loss: labels must be [{b}, {t}]")
        }
        let shifted: Vec<i64> = labels
            .iter()
            .flat_map(|row| {
                row.iter()
                    .skip(1)
                    .copied()
                    .chain(std::iter::once(IGNORE_INDEX))
            })
            .collect();
        return fused_cross_entropy(&logits.reshape((b * t, v))?, shifted);
    }
    causal_lm_loss_reference(logits, labels)
}

/// Composite causal-LM loss (fallback and test reference).
pub fn causal_lm_loss_reference(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        return cross_entropy_reference(
            &logits.narrow(1, 0, 0)?.reshape((0, v))?,
            &labels.narrow(1, 0, 0)?.reshape(0)?,
        );
    }
    let l = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let y = labels
        .narrow(1, 1, t - 1)?
        .contiguous()?
        .reshape(b * (t - 1))?;
    cross_entropy_reference(&l, &y)
}

/// Applies the fused op to `logits: [n, v]` (f32, CPU) with host labels `[n]`.
fn fused_cross_entropy(logits: &Tensor, labels: Vec<i64>) -> Result<(Tensor, usize)> {
    let (n, v) = logits.dims2()?;
    if labels.len() != n {
        candle_core::bail!(
            "cross_entropy: {} labels for {n} rows of logits",
            labels.len()
        )
    }
    if v == 0 {
        return cross_entropy_reference(logits, &Tensor::new(labels, logits.device())?);
    }
    // As the composite: every negative label is ignored; others must name a class.
    if let Some(bad) = labels.iter().find(|&&l| l >= v as i64) {
        candle_core::bail!("cross_entropy: label {bad} outside [0, {v})")
    }
    let count = labels.iter().filter(|&&l| l >= 0).count();
    let op = CrossEntropyOp {
        labels,
        count,
        lse: Mutex::new(None),
    };
    let loss = logits
        .contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(op)))?;
    Ok((loss, count))
}

/// `loss = Σ_{r: label ≥ 0} (lse_r − x[r, label_r]) / max(count, 1)` over `x: [n, v]`.
struct CrossEntropyOp {
    labels: Vec<i64>,
    count: usize,
    /// Per-row log-sum-exp from the forward pass, reused by the backward.
    lse: Mutex<Option<Vec<f32>>>,
}

multiversion! {
    /// Log-sum-exp of each row of `x` (rows of `v`) into `lse`; rows whose label is
    /// ignored are skipped (left at 0).
    fn lse_rows(x: &[f32], labels: &[i64], v: usize, lse: &mut [f32]) {
        for ((x, &l), out) in x.chunks_exact(v).zip(labels).zip(lse.iter_mut()) {
            if l < 0 {
                continue;
            }
            let m = kernels::max(x);
            let mut acc = [0f32; 16];
            let ch = x.chunks_exact(16);
            let rem = ch.remainder();
            for c in ch {
                for k in 0..16 {
                    acc[k] += kernels::exp(c[k] - m);
                }
            }
            let mut s = kernels::sum(&acc);
            for &e in rem {
                s += kernels::exp(e - m);
            }
            *out = m + s.ln();
        }
    }
}

multiversion! {
    /// `dx = (softmax − onehot)·coef` for rows with a label, 0 for ignored rows.
    fn ce_bwd_rows(x: &[f32], labels: &[i64], lse: &[f32], v: usize, coef: f32, dx: &mut [f32]) {
        for (((x, &l), &lse), dx) in x.chunks_exact(v).zip(labels).zip(lse).zip(dx.chunks_exact_mut(v)) {
            if l < 0 {
                dx.fill(0.0);
                continue;
            }
            for (dx, &x) in dx.iter_mut().zip(x) {
                *dx = kernels::exp(x - lse) * coef;
            }
            dx[l as usize] -= coef;
        }
    }
}

impl CrossEntropyOp {
    fn lse(&self, x: &[f32], v: usize) -> Vec<f32> {
        let n = self.labels.len();
        let mut lse = vec![0f32; n];
        kernels::par_rows(&mut lse, 1, v, |r0, out| {
            lse_rows(
                &x[r0 * v..(r0 + out.len()) * v],
                &self.labels[r0..r0 + out.len()],
                v,
                out,
            )
        });
        lse
    }
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous_f32(storage, layout, self.name())?;
        let (n, v) = layout.shape().dims2()?;
        if n != self.labels.len() {
            candle_core::bail!("{}: {} labels for {n} rows", self.name(), self.labels.len())
        }
        let lse = self.lse(x, v);
        let mut total = 0f64;
        for (r, &l) in self.labels.iter().enumerate() {
            if l >= 0 {
                total += (lse[r] - x[r * v + l as usize]) as f64;
            }
        }
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        let loss = (total / self.count.max(1) as f64) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let g = g.first().copied().unwrap_or(0.0);
        let (_, v) = arg.dims2()?;
        let coef = g / self.count.max(1) as f32;
        let mut dx = vec![0f32; arg.elem_count()];
        kernels::with_f32(arg, self.name(), |x| {
            let cached = self.lse.lock().unwrap_or_else(|e| e.into_inner()).take();
            let lse = match cached {
                Some(l) if l.len() == self.labels.len() => l,
                _ => self.lse(x, v),
            };
            kernels::par_rows(&mut dx, v, v, |r0, dx| {
                let rows = r0..r0 + dx.len() / v;
                ce_bwd_rows(
                    &x[r0 * v..rows.end * v],
                    &self.labels[rows.clone()],
                    &lse[rows],
                    v,
                    coef,
                    dx,
                )
            });
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
