//! PEFT's `modules_to_save`: layers trained in full and saved whole with the adapter (a
//! classification head, say), for every method that has the option.

use std::sync::Mutex;

use anyhow::Result;
use candle_core::{Module, Tensor, Var};

use super::params::ParamStore;
use super::target::suffix_match;
use crate::model::{Linear, LinearInfo};
use crate::ops::FrozenLinear;

/// The `modules_to_save` names of one adapter and the paths they took.
pub struct ModulesToSave {
    names: Vec<String>,
    /// What PEFT puts before a module path in its keys.
    key_prefix: &'static str,
    taken: Mutex<Vec<String>>,
}

impl ModulesToSave {
    /// For methods that wrap the model in a tuner model (LoRA, IA3, ...): keys
    /// `base_model.model.<path>.weight`.
    pub fn new(names: Option<&[String]>) -> Self {
        Self::with_key_prefix(names, "base_model.model.")
    }

    /// Keys `<key_prefix><path>.weight` (prompt learning: `base_model.`).
    pub fn with_key_prefix(names: Option<&[String]>, key_prefix: &'static str) -> Self {
        Self {
            names: names.map(<[String]>::to_vec).unwrap_or_default(),
            key_prefix,
            taken: Mutex::new(Vec::new()),
        }
    }

    fn key(&self, path: &str, suffix: &str) -> String {
        format!("{}{path}.{suffix}", self.key_prefix)
    }

    /// A trainable copy of `base` when its path is listed, with `weight` / `bias` under
    /// `<key prefix><path>.weight|bias`; else `base` back, untouched.
    pub fn wrap(
        &self,
        info: &LinearInfo,
        base: FrozenLinear,
        params: &ParamStore,
    ) -> Result<Wrapped> {
        let path = info.path.as_str();
        if !self.names.iter().any(|n| suffix_match(path, n)) {
            return Ok(Wrapped::NotListed(base));
        }
        let (rows, cols) = base.weight().dims();
        let dev = params.device().clone();
        let weight = params.take_or_init(&self.key(path, "weight"), &[rows, cols], || {
            Ok(base.weight().to_dense(&dev)?)
        })?;
        let bias = match base.bias() {
            Some(b) => {
                Some(params.take_or_init(&self.key(path, "bias"), b.dims(), || Ok(b.clone()))?)
            }
            None => None,
        };
        self.taken.lock().unwrap().push(path.to_string());
        Ok(Wrapped::TrainedInFull(Box::new(FullLinear {
            weight,
            bias,
        })))
    }

    /// The base tensors these copies replace in a merge: `(path.weight|bias, trained tensor)`.
    pub fn replaced(&self, params: &ParamStore) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in self.taken.lock().unwrap().iter() {
            for suffix in ["weight", "bias"] {
                if let Some(v) = params.get(&self.key(p, suffix)) {
                    out.push((format!("{p}.{suffix}"), v.as_tensor().clone()));
                }
            }
        }
        out
    }
}

/// What [`ModulesToSave::wrap`] made of a linear layer.
pub enum Wrapped {
    /// Listed in `modules_to_save`: a trainable copy, trained in full.
    TrainedInFull(Box<dyn Linear>),
    /// Not listed: the frozen base, untouched.
    NotListed(FrozenLinear),
}

/// A layer trained in full: `y = x Wᵀ + b` with trainable `W: [out, in]`, `b: [out]`.
pub struct FullLinear {
    weight: Var,
    bias: Option<Var>,
}

impl Linear for FullLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::Linear::new(
            self.weight.as_tensor().clone(),
            self.bias.as_ref().map(|b| b.as_tensor().clone()),
        )
        .forward(x)
    }
}
