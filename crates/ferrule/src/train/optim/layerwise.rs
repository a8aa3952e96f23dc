//! The layer-wise optimizer step (transformers' `*_layerwise` optimizers, which register one
//! optimizer per parameter behind a `post_accumulate_grad` hook, after LLaMA-Factory): each
//! parameter of a recomputed layer steps as soon as that layer's backward has produced its
//! gradient, and the gradient is dropped at once. No full-model gradient is ever held, which
//! is how GaLore fits a 7B model's full fine-tuning into 24 GB (Zhao et al. 2024, §4.3).
//!
//! The gradients arrive through [`crate::ops::recompute::GradSink::with_hook`]; those of
//! parameters outside the recomputed layers (embedding, final norm, head) come out of the
//! outer backward and step in [`LayerwiseStepper::finish`]. Each parameter steps once per step
//! on its own gradient, so the result equals the whole-model step without clipping.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, TensorId, Var};

use super::Optimizer;
use crate::ops::recompute::GradHook;

/// An [`Optimizer`] with a layer-wise form, driven from the backward pass.
pub struct LayerwiseStepper {
    opt: Mutex<Box<dyn Optimizer>>,
    names: HashMap<TensorId, String>,
    tally: Mutex<StepTally>,
}

/// What the current step has done so far.
#[derive(Default)]
struct StepTally {
    stepped: HashSet<TensorId>,
    /// Σ‖g‖² over the gradients stepped, for the reported gradient norm.
    sq_norm: f64,
}

impl LayerwiseStepper {
    /// `opt` over `vars` (the same list it was built with).
    pub fn new(opt: Box<dyn Optimizer>, vars: &[(String, Var)]) -> LayerwiseStepper {
        LayerwiseStepper {
            opt: Mutex::new(opt),
            names: vars
                .iter()
                .map(|(n, v)| (v.as_tensor().id(), n.clone()))
                .collect(),
            tally: Mutex::new(StepTally::default()),
        }
    }

    /// The hook a recomputing [`crate::ops::recompute::GradSink`] calls with each final
    /// gradient: the parameter steps at the optimizer's current learning rate.
    pub fn hook(self: &Arc<Self>) -> GradHook {
        let me = self.clone();
        Box::new(move |id, grad| {
            me.on_grad(id, grad)
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
        })
    }

    fn on_grad(&self, id: TensorId, grad: &Tensor) -> Result<()> {
        let Some(name) = self.names.get(&id) else {
            bail!(
                "layer-wise step: a gradient arrived for a tensor that is not a trained parameter"
            )
        };
        let sq = grad
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let mut tally = lock(&self.tally);
        if !tally.stepped.insert(id) {
            bail!("layer-wise step: parameter {name:?} is used by more than one recomputed layer, so its gradient is not final when a layer ends; use an optimizer without _layerwise")
        }
        if !sq.is_finite() {
            bail!("the gradient of {name:?} is NaN or infinite (the layers after it were already updated); lower the learning rate or check the data")
        }
        tally.sq_norm += sq;
        lock(&self.opt).step_param(name, grad)
    }

    /// Sets the learning rate of the coming step (before its backward pass).
    pub fn set_lr(&self, lr: f64) {
        lock(&self.opt).set_lr(lr)
    }

    /// Ends the step: steps the parameters whose gradients came out of the outer backward
    /// (`rest`, by name), and returns the L2 norm of every gradient of the step.
    pub fn finish(&self, rest: &HashMap<String, Tensor>) -> Result<f64> {
        let mut opt = lock(&self.opt);
        let sq_rest = super::grad_norm(rest)?.powi(2);
        if !sq_rest.is_finite() {
            bail!("the gradient norm outside the recomputed layers is NaN or infinite (those layers were already updated); lower the learning rate or check the data")
        }
        for (name, grad) in rest {
            opt.step_param(name, grad)?;
        }
        opt.finish_layerwise_step();
        let tally = std::mem::take(&mut *lock(&self.tally));
        Ok((tally.sq_norm + sq_rest).sqrt())
    }

    /// The optimizer's state, for a checkpoint.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        lock(&self.opt).state()
    }

    /// Restores [`LayerwiseStepper::state`]'s output.
    pub fn load_state(&self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        lock(&self.opt).load_state(state)
    }
}

/// The lock, also after a panic elsewhere (the state is plain data, and the run then fails).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
