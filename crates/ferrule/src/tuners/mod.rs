//! Parameter-efficient tuning methods. One folder per method, same shape each:
//! `config.rs` (serde, PEFT keys), `layer.rs` (the math), `mod.rs` (which modules it wraps).
//!
//! A tuner is a [`LinearHook`]: the model passes every linear layer through it while it is
//! built, and the tuner wraps the ones its config targets.

pub mod lora;
pub mod mode;
pub mod target;

use std::sync::Arc;

use anyhow::Result;
use candle_core::{Tensor, Var};

use crate::model::LinearHook;
pub use mode::Mode;

/// One module a tuner adapted.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdaptedModule {
    pub path: String,
    pub rank: usize,
    pub alpha: f64,
    pub scaling: f64,
    pub in_features: usize,
    pub out_features: usize,
}

/// What every method provides beyond wrapping layers.
pub trait Tuner: LinearHook {
    /// PEFT's `peft_type` (`LORA`, ...).
    fn peft_type(&self) -> &'static str;
    /// The train/eval switch its layers read.
    fn mode(&self) -> &Arc<Mode>;
    /// Called after the model is built: fails when nothing was targeted or a loaded
    /// adapter had tensors that found no module.
    fn finish(&self) -> Result<()>;
    /// Trainable tensors under their PEFT on-disk keys, sorted by key.
    fn trainable(&self) -> Vec<(String, Var)>;
    fn adapted(&self) -> Vec<AdaptedModule>;
    /// The method's part of `adapter_config.json`.
    fn config_json(&self) -> Result<serde_json::Value>;
    /// Weight deltas to add for a merge, keyed by the base tensor name (`path.weight`).
    fn deltas(&self) -> Result<Vec<(String, Tensor)>>;
    /// Base tensors replaced outright by trained copies (`modules_to_save`).
    fn replaced(&self) -> Vec<(String, Tensor)>;
}

/// The key PEFT uses on disk for a tensor of module `path` (adapter name stripped):
/// `base_model.model.<path>.<suffix>`.
pub fn peft_key(path: &str, suffix: &str) -> String {
    format!("base_model.model.{path}.{suffix}")
}
