//! Feature distillation from the model a method changes (PELA, Guo et al. 2023;
//! guoyang9/PELA `ALBEF/Pretrain.py`): before the student's pass, the same batch runs through
//! the original model (the method's layers switched to what they replace, without autograd),
//! and the loss gains `weight · mean_s MSE(student_s, teacher_s)` over every stage output the
//! model reports (the embeddings, each layer, the final norm: transformers' `hidden_states`,
//! which the reference compares).
//!
//! The reference's `F.mse_loss` averages over every position of its padded batch; here only
//! real tokens count, so that a padded and a padding-free batch of the same records give the
//! same term.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::evaluate::batch_loss;
use crate::data::Batch;
use crate::model::{Arch, Model};
use crate::tuners::Tuner;

/// A micro-batch's task loss, its counted targets, and the method's distillation term when it
/// has one ([`Tuner::distillation_weight`]): `weight · mean_s MSE(student_s, teacher_s)`, a
/// scalar differentiable in the trainable tensors.
pub fn loss_with_distillation(
    model: &Model,
    tuner: &dyn Tuner,
    batch: &Batch,
) -> Result<(Tensor, usize, Option<Tensor>)> {
    let Some(weight) = tuner.distillation_weight().filter(|&w| w > 0.0) else {
        let (loss, counted, _) = batch_loss(model, batch)?;
        return Ok((loss, counted, None));
    };
    let teacher = teacher_stages(model, tuner, batch)?;
    let ((loss, counted, _), student) = model.with_stage_outputs(|| batch_loss(model, batch))?;
    let mask = real_tokens(batch)?;
    let term = (stage_mse(&student, &teacher, mask.as_ref())? * weight)?;
    Ok((loss, counted, Some(term)))
}

/// The stage outputs of `batch` through the original model, detached.
fn teacher_stages(model: &Model, tuner: &dyn Tuner, batch: &Batch) -> Result<Vec<Tensor>> {
    let _no_grad = model.no_grad();
    tuner.set_teaching(true);
    let pass = model.with_stage_outputs(|| hidden_pass(model, batch));
    tuner.set_teaching(false);
    Ok(pass?.1.iter().map(Tensor::detach).collect())
}

/// `batch` through the model as far as its hidden states: the teacher needs no loss, and a
/// decoder's vocabulary projection is its largest matmul. (An encoder's head is small.)
fn hidden_pass(model: &Model, batch: &Batch) -> Result<()> {
    match (&model.arch, &batch.seq_lens) {
        (Arch::Decoder(lm), Some(lens)) => drop(lm.hidden_states_packed(&batch.input_ids, lens)?),
        (Arch::Decoder(lm), None) => {
            let mask = Some(&batch.attention_mask);
            drop(lm.hidden_states(&batch.input_ids, mask, None, None)?)
        }
        _ => drop(batch_loss(model, batch)?),
    }
    Ok(())
}

/// `f32 [b, t, 1]`: 1 at real tokens; `None` for a padding-free batch (every position is one).
fn real_tokens(batch: &Batch) -> Result<Option<Tensor>> {
    if batch.seq_lens.is_some() {
        return Ok(None);
    }
    Ok(Some(
        batch.attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?,
    ))
}

/// `mean_s MSE(student_s, teacher_s)`, each MSE the mean over the real tokens (`mask`,
/// `[b, t, 1]`) and the hidden features of `(student_s − teacher_s)²`.
pub fn stage_mse(student: &[Tensor], teacher: &[Tensor], mask: Option<&Tensor>) -> Result<Tensor> {
    if student.len() != teacher.len() || student.is_empty() {
        bail!(
            "distillation: the student reported {} stage outputs and the teacher {}",
            student.len(),
            teacher.len()
        )
    }
    let mut sum: Option<Tensor> = None;
    for (s, t) in student.iter().zip(teacher) {
        let sq = (s.to_dtype(DType::F32)? - t.to_dtype(DType::F32)?)?.sqr()?;
        let mse = match mask.filter(|m| m.dims()[..2] == sq.dims()[..2]) {
            Some(m) => {
                let count = m.sum_all()?.to_scalar::<f32>()? as f64 * sq.dim(2)? as f64;
                (sq.broadcast_mul(m)?.sum_all()? / count.max(1.0))?
            }
            None => sq.mean_all()?,
        };
        sum = Some(match sum {
            Some(acc) => (acc + mse)?,
            None => mse,
        });
    }
    let sum = sum.expect("at least one stage");
    Ok((sum / student.len() as f64)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Two stages of `[1, 2, 2]`; the second position is padding. Stage 0 differs by
    /// (1, 1) at the real token: MSE 1; stage 1 by (0, 2): MSE 2; mean 1.5. Without the
    /// mask the padding's difference (10, 10) in stage 0 would count.
    #[test]
    fn the_mean_over_stages_counts_real_tokens_only() {
        let dev = Device::Cpu;
        let t = |v: [f32; 4]| Tensor::from_vec(v.to_vec(), (1, 2, 2), &dev).unwrap();
        let student = [t([1., 1., 10., 10.]), t([0., 2., 0., 0.])];
        let teacher = [t([0., 0., 0., 0.]), t([0., 0., 0., 0.])];
        let mask = Tensor::new(&[[[1f32], [0.]]], &dev).unwrap();
        let m = stage_mse(&student, &teacher, Some(&mask)).unwrap();
        assert!((m.to_scalar::<f32>().unwrap() - 1.5).abs() < 1e-6);
        let unmasked = stage_mse(&student, &teacher, None).unwrap();
        // stage 0: (1 + 1 + 100 + 100) / 4 = 50.5; stage 1: 4 / 4 = 1.
        assert!((unmasked.to_scalar::<f32>().unwrap() - 25.75).abs() < 1e-5);
        assert!(stage_mse(&student, &teacher[..1], None).is_err());
    }
}
