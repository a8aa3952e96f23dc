//! ConPET's routing math: which experts a record goes to, and how their outputs fill the
//! set's label columns (Raincleared-Song/ConPET `loss_similarity.py`,
//! `select_topk_experts` and `generate_continual_logits`), and the selector's projector grown
//! by a row per task (`models/bert_selector.py`, `load_selector_state_dict`).

use std::ops::Range;

use anyhow::{bail, ensure, Result};
use candle_core::{Tensor, D};

/// The experts each record goes to: the `k` tasks with the highest selector logits, highest
/// first (ties keep task order, as Python's stable `sorted(..., reverse=True)` does); with
/// `k` at least the number of tasks every record goes to every task in order, as the
/// reference does before it consults the selector.
///
/// `selector_logits`: `[b, tasks]`, the selector head's raw outputs. A NaN logit is an error.
pub fn select_topk(selector_logits: &Tensor, k: usize) -> Result<Vec<Vec<usize>>> {
    let rows = selector_logits
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            if k >= row.len() {
                return Ok((0..row.len()).collect());
            }
            if row.iter().any(|x| x.is_nan()) {
                bail!("conpet: the selector gave a NaN logit for record {i}")
            }
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            order.truncate(k);
            Ok(order)
        })
        .collect()
}

/// The records each task serves, in record order (the reference's `split_groups`): `routes`
/// as [`select_topk`] returns them, `tasks` the number of tasks.
pub fn records_by_task(routes: &[Vec<usize>], tasks: usize) -> Vec<Vec<usize>> {
    let mut groups = vec![Vec::new(); tasks];
    for (record, chosen) in routes.iter().enumerate() {
        for &t in chosen {
            groups[t].push(record);
        }
    }
    groups
}

/// One expert's outputs for the records routed to it.
pub struct ExpertOutput {
    /// Which task's expert (its label columns are `columns[task]`).
    pub task: usize,
    /// The batch rows it ran on.
    pub rows: Vec<usize>,
    /// `[rows.len(), columns[task].len()]`: its classifier's logits.
    pub logits: Tensor,
}

/// The set's log-probabilities over every label column, `[batch, columns.last().end]`: each
/// expert's logits fill its own columns of the rows routed to it, every other entry stays at
/// `null_logit` (−100 by default), and the row is log-softmaxed (`generate_continual_logits`,
/// `mode != 'train'`). `columns` are the tasks' label ranges in order, contiguous from 0.
pub fn continual_logits(
    batch: usize,
    columns: &[Range<usize>],
    outputs: &[ExpertOutput],
    null_logit: f32,
) -> Result<Tensor> {
    let total = columns.last().map_or(0, |c| c.end);
    ensure!(total > 0, "conpet: the set has no label columns");
    let mut filled = vec![null_logit; batch * total];
    for out in outputs {
        let cols = columns
            .get(out.task)
            .ok_or_else(|| anyhow::anyhow!("conpet: no task {} in the set", out.task))?;
        let logits = out
            .logits
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        ensure!(
            logits.len() == out.rows.len(),
            "conpet: expert {} gave {} rows for {} records",
            out.task,
            logits.len(),
            out.rows.len()
        );
        for (row, values) in out.rows.iter().zip(&logits) {
            ensure!(
                values.len() == cols.len() && *row < batch,
                "conpet: expert {} gave {} logits for its {} label columns",
                out.task,
                values.len(),
                cols.len()
            );
            filled[row * total + cols.start..row * total + cols.end].copy_from_slice(values);
        }
    }
    let logits = Tensor::from_vec(filled, (batch, total), out_device(outputs))?;
    Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
}

fn out_device(outputs: &[ExpertOutput]) -> &candle_core::Device {
    outputs
        .first()
        .map_or(&candle_core::Device::Cpu, |o| o.logits.device())
}

/// The selector's projector for one more task: the trained rows `old` (`[k₀, h]`, or a bias
/// `[k₀]`) on top, the rest of `fresh` (`[k₁, …]`, a freshly initialised projector with
/// k₁ ≥ k₀) below, as `load_selector_state_dict` copies `new_weight[:basic_dim] = old_weight`.
pub fn grow_rows(old: &Tensor, fresh: &Tensor) -> Result<Tensor> {
    let (k0, k1) = (old.dim(0)?, fresh.dim(0)?);
    ensure!(
        k1 >= k0 && old.dims()[1..] == fresh.dims()[1..],
        "conpet: the selector's projector {:?} cannot grow to {:?}",
        old.dims(),
        fresh.dims()
    );
    if k1 == k0 {
        return Ok(old.clone());
    }
    Ok(Tensor::cat(&[old, &fresh.narrow(0, k0, k1 - k0)?], 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn topk_by_hand() {
        let s = Tensor::new(&[[0.1f32, 2.0, -1.0], [3.0, 3.0, 0.0]], &Device::Cpu).unwrap();
        assert_eq!(select_topk(&s, 1).unwrap(), vec![vec![1], vec![0]]);
        assert_eq!(select_topk(&s, 2).unwrap(), vec![vec![1, 0], vec![0, 1]]);
        assert_eq!(select_topk(&s, 3).unwrap(), vec![vec![0, 1, 2]; 2]);
        assert_eq!(
            records_by_task(&[vec![1], vec![0], vec![1]], 3),
            vec![vec![1], vec![0, 2], vec![]]
        );
    }

    #[test]
    fn unfilled_columns_stay_at_the_null_logit() {
        let cols = [0..2, 2..3];
        let out = ExpertOutput {
            task: 1,
            rows: vec![0],
            logits: Tensor::new(&[[5f32]], &Device::Cpu).unwrap(),
        };
        let lp = continual_logits(1, &cols, &[out], -100.0).unwrap();
        let v = lp.to_vec2::<f32>().unwrap();
        // log_softmax([-100, -100, 5]) by hand: 5 - log(e^5 + 2e^-100) ≈ 0.
        assert!(
            v[0][2].abs() < 1e-6 && (v[0][0] + 105.0).abs() < 1e-4,
            "{v:?}"
        );
    }

    #[test]
    fn grown_rows_keep_the_old_ones() {
        let old = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        let fresh = Tensor::new(&[[9f32, 9.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let g = grow_rows(&old, &fresh).unwrap();
        assert_eq!(
            g.to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
        assert!(grow_rows(&fresh, &old).is_err());
    }
}
