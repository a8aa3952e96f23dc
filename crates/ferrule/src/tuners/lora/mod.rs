//! LoRA (Hu et al. 2021) exactly as PEFT defines it: targets, rank/alpha patterns, rsLoRA,
//! init schemes, `modules_to_save`, and the on-disk keys.

pub mod config;
pub mod layer;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor, Var};

pub use config::{InitLoraWeights, LoraConfig};
use layer::{FullLinear, LoraLinear};

use super::mode::Mode;
use super::target::{layer_index, suffix_match, Matcher};
use super::{peft_key, AdaptedModule, Tuner};
use crate::init;
use crate::model::{Linear, LinearHook, LinearInfo};
use crate::ops::FrozenLinear;

/// Builds LoRA layers for the modules a [`LoraConfig`] targets.
pub struct Lora {
    config: LoraConfig,
    target: Matcher,
    exclude: Option<Matcher>,
    seed: u64,
    device: Device,
    mode: Arc<Mode>,
    /// Weights from a saved adapter (PEFT keys); consumed as layers are built.
    preloaded: Mutex<HashMap<String, Tensor>>,
    /// True when built from a saved adapter: every targeted module must then find its weights.
    loading: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    params: BTreeMap<String, Var>,
    adapted: Vec<AdaptedModule>,
    saved_modules: Vec<String>,
}

impl Lora {
    /// A fresh adapter, initialised per `init_lora_weights` from `seed`.
    pub fn new(config: LoraConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let target = match &config.target_modules {
            Some(t) => Matcher::new(t)?,
            None => bail!("lora: target_modules is required (a list of module names, a regex, or \"all-linear\")"),
        };
        let exclude = config.exclude_modules.as_ref().map(Matcher::new).transpose()?;
        Ok(Self {
            config,
            target,
            exclude,
            seed,
            device: device.clone(),
            mode: Arc::new(Mode::new(seed)),
            preloaded: Mutex::new(HashMap::new()),
            loading: false,
            state: Mutex::new(State::default()),
        })
    }

    /// An adapter whose weights come from `tensors` (PEFT on-disk keys).
    pub fn with_weights(config: LoraConfig, tensors: HashMap<String, Tensor>, seed: u64, device: &Device) -> Result<Self> {
        let mut l = Self::new(config, seed, device)?;
        *l.preloaded.lock().unwrap() = tensors;
        l.loading = true;
        Ok(l)
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    fn in_layers(&self, path: &str) -> bool {
        let Some(ltt) = &self.config.layers_to_transform else { return true };
        let pats: Option<Vec<String>> = self.config.layers_pattern.as_ref().map(|p| match p {
            config::LayersPattern::One(s) => vec![s.clone()],
            config::LayersPattern::Many(v) => v.clone(),
        });
        let Some(idx) = layer_index(path, pats.as_deref()) else { return false };
        match ltt {
            config::LayersToTransform::One(i) => *i == idx,
            config::LayersToTransform::Many(v) => v.contains(&idx),
        }
    }

    fn take_or_init(&self, key: &str, shape: &[usize], init: impl FnOnce() -> Result<Tensor>) -> Result<Var> {
        let pre = self.preloaded.lock().unwrap().remove(key);
        let t = match pre {
            Some(t) => {
                if t.dims() != shape {
                    bail!("adapter tensor {key:?} has shape {:?}, but the model's layer needs {:?}", t.dims(), shape)
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
            None if self.loading => bail!("the adapter has no tensor {key:?} for a module its config targets"),
            None => init()?,
        };
        Ok(Var::from_tensor(&t)?)
    }
}

impl LinearHook for Lora {
    fn wrap(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let path = info.path.as_str();
        if let Some(names) = &self.config.modules_to_save {
            if names.iter().any(|n| suffix_match(path, n)) {
                let (rows, cols) = base.weight().dims();
                let w = self.take_or_init(&peft_key(path, "weight"), &[rows, cols], || Ok(base.weight().to_dense(&self.device)?))?;
                let b = match base.bias() {
                    Some(b) => Some(self.take_or_init(&peft_key(path, "bias"), b.dims(), || Ok(b.clone()))?),
                    None => None,
                };
                let mut st = self.state.lock().unwrap();
                st.params.insert(peft_key(path, "weight"), w.clone());
                if let Some(b) = &b {
                    st.params.insert(peft_key(path, "bias"), b.clone());
                }
                st.saved_modules.push(path.to_string());
                return Ok(Box::new(FullLinear::new(w, b)));
            }
        }
        let excluded = self.exclude.as_ref().is_some_and(|m| m.matches(path, info.is_output_head));
        if excluded || !self.target.matches(path, info.is_output_head) || !self.in_layers(path) {
            return Ok(Box::new(base));
        }
        let (r, alpha) = self.config.rank_and_alpha(path);
        let scaling = self.config.scaling(r, alpha);
        let (out_f, in_f) = (base.out_features(), base.in_features());
        let key_a = peft_key(path, "lora_A.weight");
        let key_b = peft_key(path, "lora_B.weight");
        let dev = &self.device;
        let (seed_a, seed_b) = (init::seed_for(self.seed, &key_a), init::seed_for(self.seed, &key_b));
        let a = self.take_or_init(&key_a, &[r, in_f], || match &self.config.init_lora_weights {
            // PEFT "gaussian": normal(0, 1/r) for A.
            InitLoraWeights::Named(n) if n == "gaussian" => init::normal(&[r, in_f], 1.0 / r as f64, seed_a, dev),
            // PEFT default: kaiming_uniform_(a=sqrt(5)).
            _ => init::kaiming_uniform(&[r, in_f], 5f64.sqrt(), seed_a, dev),
        })?;
        let b = self.take_or_init(&key_b, &[out_f, r], || match &self.config.init_lora_weights {
            // init_lora_weights=false: B random too, so the adapter is not a no-op (tests).
            InitLoraWeights::Flag(false) => init::kaiming_uniform(&[out_f, r], 5f64.sqrt(), seed_b, dev),
            _ => Ok(Tensor::zeros((out_f, r), DType::F32, dev)?),
        })?;
        let mut st = self.state.lock().unwrap();
        st.params.insert(key_a, a.clone());
        st.params.insert(key_b, b.clone());
        st.adapted.push(AdaptedModule { path: path.to_string(), rank: r, alpha, scaling, in_features: in_f, out_features: out_f });
        Ok(Box::new(LoraLinear::new(path.to_string(), base, a, b, scaling, self.config.lora_dropout, self.mode.clone())))
    }
}

impl Tuner for Lora {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn mode(&self) -> &Arc<Mode> {
        &self.mode
    }

    fn finish(&self) -> Result<()> {
        let st = self.state.lock().unwrap();
        if st.adapted.is_empty() {
            bail!("lora: target_modules {} matched no linear layer of the model", serde_json::to_string(&self.config.target_modules).unwrap_or_default())
        }
        if let Some(names) = &self.config.modules_to_save {
            for n in names {
                // PEFT lists both "classifier" and "score" for SEQ_CLS; one of them is absent.
                if !st.saved_modules.iter().any(|p| suffix_match(p, n)) {
                    tracing::debug!("lora: modules_to_save entry {n:?} matched no linear layer of the model");
                }
            }
        }
        let left = self.preloaded.lock().unwrap();
        if !left.is_empty() {
            let mut keys: Vec<&String> = left.keys().collect();
            keys.sort();
            bail!("the adapter has {} tensor(s) for modules this model does not have or the config does not target, e.g. {:?}", keys.len(), keys[0])
        }
        Ok(())
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.state.lock().unwrap().params.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn adapted(&self) -> Vec<AdaptedModule> {
        self.state.lock().unwrap().adapted.clone()
    }

    fn config_json(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(&self.config)?;
        let obj = v.as_object_mut().ok_or_else(|| anyhow!("config is not an object"))?;
        // PEFT writes the explicit list of full module paths when "all-linear" was asked for.
        if self.config.target_modules.as_ref().is_some_and(|t| t.is_all_linear()) {
            let mut names: Vec<String> = self.adapted().iter().map(|m| m.path.clone()).collect();
            names.sort();
            names.dedup();
            obj.insert("target_modules".into(), serde_json::json!(names));
        }
        Ok(v)
    }

    /// `ΔW = s · B A` per adapted module (merge: `W' = W + ΔW`).
    fn deltas(&self) -> Result<Vec<(String, Tensor)>> {
        let st = self.state.lock().unwrap();
        let mut out = Vec::new();
        for m in &st.adapted {
            let a = st.params[&peft_key(&m.path, "lora_A.weight")].as_tensor();
            let b = st.params[&peft_key(&m.path, "lora_B.weight")].as_tensor();
            out.push((format!("{}.weight", m.path), (b.matmul(a)? * m.scaling)?));
        }
        Ok(out)
    }

    fn replaced(&self) -> Vec<(String, Tensor)> {
        let st = self.state.lock().unwrap();
        let mut out = Vec::new();
        for p in &st.saved_modules {
            for suffix in ["weight", "bias"] {
                if let Some(v) = st.params.get(&peft_key(p, suffix)) {
                    out.push((format!("{p}.{suffix}"), v.as_tensor().clone()));
                }
            }
        }
        out
    }
}
