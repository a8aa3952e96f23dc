//! Refusing NaN and infinite results: a command that met one stops with an error naming what
//! and where, and writes nothing (a NaN logit, loss or merged weight is never a result).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// The first NaN or infinite element of `t` (any float dtype, any device): its index in each
/// dimension and its value, or `None` when every element is finite.
pub fn first_non_finite(t: &Tensor) -> Result<Option<(Vec<usize>, f32)>> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let Some(flat) = values.iter().position(|v| !v.is_finite()) else {
        return Ok(None);
    };
    let mut index = vec![0; t.rank()];
    let mut rest = flat;
    for (i, &d) in t.dims().iter().enumerate().rev() {
        index[i] = rest % d.max(1);
        rest /= d.max(1);
    }
    Ok(Some((index, values[flat])))
}

/// Errors when `t` holds a NaN or infinite value: "`what` holds NaN at [0, 3, 17]: `hint`".
/// `what` names the tensor and where it was met (a step, a batch, a weight's name).
pub fn ensure_finite(t: &Tensor, what: impl FnOnce() -> String, hint: &str) -> Result<()> {
    if let Some((index, value)) = first_non_finite(t)? {
        bail!("{} holds {value} at {index:?}: {hint}", what())
    }
    Ok(())
}

/// The stage outputs of a forward pass (token embeddings, then each layer's output), which
/// models report by calling [`LayerTrace::check`] after each stage. Off, that costs one atomic
/// load; [`LayerTrace::run`] checks them for a non-finite value, to diagnose a non-finite
/// result; [`LayerTrace::capture`] keeps them, as transformers' `output_hidden_states` does
/// (for a distillation loss on every layer's features).
#[derive(Debug, Default)]
pub struct LayerTrace {
    on: std::sync::atomic::AtomicBool,
    first: std::sync::Mutex<Option<String>>,
    captured: std::sync::Mutex<Option<Vec<Tensor>>>,
}

impl LayerTrace {
    /// Reports the output `x` of `stage()` (e.g. `"layer 3 (model.layers.3)"`): while tracing,
    /// remembers the stage if it is the first whose output holds a NaN or infinite value;
    /// while capturing, keeps `x`.
    pub fn check(&self, stage: impl FnOnce() -> String, x: &Tensor) -> Result<()> {
        if !self.on.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(kept) = self
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            kept.push(x.clone());
            return Ok(());
        }
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() && first_non_finite(x)?.is_some() {
            *first = Some(stage());
        }
        Ok(())
    }

    /// Runs `pass` (a forward pass that calls [`Self::check`]) with tracing on and returns the
    /// first stage whose output was not finite, if any.
    pub fn run<T>(&self, pass: impl FnOnce() -> Result<T>) -> Result<Option<String>> {
        *self.first.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.on.store(true, std::sync::atomic::Ordering::Relaxed);
        let result = pass();
        self.on.store(false, std::sync::atomic::Ordering::Relaxed);
        result?;
        Ok(self.first.lock().unwrap_or_else(|e| e.into_inner()).take())
    }

    /// Runs `pass` and returns its result with every stage output it reported, in order.
    pub fn capture<T>(&self, pass: impl FnOnce() -> Result<T>) -> Result<(T, Vec<Tensor>)> {
        *self.captured.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
        self.on.store(true, std::sync::atomic::Ordering::Relaxed);
        let result = pass();
        self.on.store(false, std::sync::atomic::Ordering::Relaxed);
        let kept = self
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        Ok((result?, kept.unwrap_or_default()))
    }
}

/// The result of [`LayerTrace::run`] as a clause for an error message ("; the first stage
/// with a non-finite output: layer 3 (model.layers.3)"); empty when the rerun failed.
pub fn origin_clause(traced: Result<Option<String>>) -> String {
    match traced {
        Ok(Some(stage)) => format!("; the first stage with a non-finite output: {stage}"),
        Ok(None) => {
            "; every layer's output was finite, so the output head or the loss made it".into()
        }
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_the_first_non_finite_element_by_its_index() {
        let t = Tensor::new(
            &[[[1f32, 2.0, 3.0], [4.0, f32::NEG_INFINITY, f32::NAN]]],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            first_non_finite(&t).unwrap(),
            Some((vec![0, 1, 1], f32::NEG_INFINITY))
        );
        let fine = Tensor::new(&[0f32, -1e38, 1e38], &Device::Cpu).unwrap();
        assert_eq!(first_non_finite(&fine).unwrap(), None);
        let nan = Tensor::new(&[f32::NAN], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let err = ensure_finite(&nan, || "the logits".into(), "check the model")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "the logits holds NaN at [0]: check the model");
    }
}
