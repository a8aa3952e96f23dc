//! PEFT's `bias` option (`"none"`, `"all"`, `"<method>_only"`): which biases of the base model
//! train beside the adapter, for every method that has the option (LoRA; bottleneck adapters
//! with LLM-Adapters' `"adapter_only"` and its key layout).
//!
//! The semantics are peft 0.21's (`BaseTuner._mark_only_adapters_as_trainable` and
//! `_get_learnable_bias_state_dict` in `tuners/tuners_utils.py`):
//! - `"all"`: every parameter named `bias` trains, in targeted and untargeted linear layers
//!   and in LayerNorms alike. Saved under its state-dict key: `<path>.base_layer.bias` for a
//!   targeted layer (its base layer holds the bias), `<path>.bias` elsewhere.
//! - `"lora_only"`: the biases of the targeted layers only, saved as `<path>.base_layer.bias`.
//!
//! LLM-Adapters' fork (`bottleneck.py` `mark_only_adapter_as_trainable`, `save_and_load.py`)
//! has the same three modes, but its adapter layer is the targeted `nn.Linear` itself, so a
//! targeted layer's bias is saved as `<path>.bias` ([`TrainedBiases::with_adapted_key`]).
//!
//! A trained bias is added after the layer's fused op (`y = f(x) + b`), so the frozen op
//! runs without its bias; a layer with no bias has nothing to train.

use std::sync::Mutex;

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

use super::flags::{FlagValue, OptionFlag};
use super::params::ParamStore;
use super::peft_key;
use crate::model::{Linear, NormParams};
use crate::ops::FrozenLinear;

/// `--bias`, for every method with the option.
pub const BIAS_FLAG: OptionFlag = OptionFlag {
    name: "bias",
    value: FlagValue::Text,
    value_name: Some("none|all|lora_only|adapter_only"),
    help: "Base biases trained beside the adapter: none (default), all, or only the targeted layers' (lora_only for LoRA, adapter_only for bottleneck adapters).",
    keys: |v| vec![("bias", v)],
};

/// Which base biases train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasMode {
    None,
    All,
    /// The method's own layers only (`"lora_only"`).
    AdaptedOnly,
}

impl BiasMode {
    /// Parses the `bias` value of a `method` (`"lora"`) config: `none`, `all`, `<method>_only`.
    pub fn parse(method: &str, value: &str) -> Result<Self> {
        Self::parse_as(method, method, value)
    }

    /// [`BiasMode::parse`] for a method whose own-layers word differs from its name
    /// (bottleneck adapters: `"adapter_only"`); `method` names it in the error.
    pub fn parse_as(method: &str, word: &str, value: &str) -> Result<Self> {
        match value {
            "none" => Ok(BiasMode::None),
            "all" => Ok(BiasMode::All),
            v if v == format!("{word}_only") => Ok(BiasMode::AdaptedOnly),
            v => bail!("{method}: bias must be \"none\", \"all\" or \"{word}_only\", got {v:?}"),
        }
    }
}

/// The base biases an adapter trains, and the paths they belong to.
pub struct TrainedBiases {
    mode: BiasMode,
    /// The key suffix of an adapted layer's bias: peft's `base_layer.bias`.
    adapted_key: &'static str,
    /// `(base tensor name, on-disk key)` of every trained bias.
    taken: Mutex<Vec<(String, String)>>,
}

impl TrainedBiases {
    pub fn new(mode: BiasMode) -> Self {
        Self::with_adapted_key(mode, "base_layer.bias")
    }

    /// Biases whose adapted layers save theirs under `<path>.<adapted_key>`.
    pub fn with_adapted_key(mode: BiasMode, adapted_key: &'static str) -> Self {
        Self {
            mode,
            adapted_key,
            taken: Mutex::new(Vec::new()),
        }
    }

    pub fn mode(&self) -> BiasMode {
        self.mode
    }

    /// Splits a trained bias off `base`: `(base without its bias, the bias as a Var)` when the
    /// mode trains this layer's bias (`adapted`: the method wraps this layer), else `base` as is.
    pub fn linear(
        &self,
        path: &str,
        adapted: bool,
        base: FrozenLinear,
        params: &ParamStore,
    ) -> Result<(FrozenLinear, Option<Var>)> {
        let trains = match self.mode {
            BiasMode::None => false,
            BiasMode::All => true,
            BiasMode::AdaptedOnly => adapted,
        };
        let Some(b) = base.bias().filter(|_| trains).cloned() else {
            return Ok((base, None));
        };
        let key = peft_key(path, if adapted { self.adapted_key } else { "bias" });
        let var = params.take_or_init(&key, b.dims(), || Ok(b.copy()?))?;
        self.taken
            .lock()
            .unwrap()
            .push((format!("{path}.bias"), key));
        Ok((
            FrozenLinear::from_weight(base.weight().clone(), None),
            Some(var),
        ))
    }

    /// A norm's bias made trainable under `bias = "all"` (key `<path>.bias`).
    pub fn norm(&self, path: &str, params: NormParams, store: &ParamStore) -> Result<NormParams> {
        let Some(b) = params.bias.as_ref().filter(|_| self.mode == BiasMode::All) else {
            return Ok(params);
        };
        let key = peft_key(path, "bias");
        let var = store.take_or_init(&key, b.dims(), || Ok(b.copy()?))?;
        self.taken
            .lock()
            .unwrap()
            .push((format!("{path}.bias"), key));
        Ok(NormParams {
            weight: params.weight,
            bias: Some(var.as_tensor().clone()),
        })
    }

    /// Trained elements.
    pub fn count(&self, store: &ParamStore) -> usize {
        self.taken
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, k)| store.get(k))
            .map(|v| v.elem_count())
            .sum()
    }

    /// The base tensors these biases replace in a merge: `(path.bias, trained tensor)`.
    pub fn replaced(&self, store: &ParamStore) -> Vec<(String, Tensor)> {
        self.taken
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(name, k)| store.get(k).map(|v| (name.clone(), v.as_tensor().clone())))
            .collect()
    }
}

/// A frozen linear layer whose bias trains (`bias = "all"` on an untargeted layer):
/// `y = x W₀ᵀ + b`, `b: [out]` trainable.
pub struct BiasTrainedLinear {
    pub base: FrozenLinear,
    pub bias: Var,
}

impl Linear for BiasTrainedLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_core::Module::forward(&self.base, x)?.broadcast_add(self.bias.as_tensor())
    }
}
