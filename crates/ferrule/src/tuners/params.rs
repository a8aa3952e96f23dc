//! The trainable tensors of one adapter under their PEFT keys, created fresh or taken from a
//! saved adapter (every method stores its tensors the same way).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};

/// Trainable tensors keyed by their on-disk PEFT key (`base_model.model.<path>.<suffix>`).
pub struct ParamStore {
    device: Device,
    /// Tensors of a saved adapter not yet claimed by a module.
    preloaded: Mutex<HashMap<String, Tensor>>,
    /// Built from a saved adapter: every tensor a module needs must be there.
    loading: bool,
    params: Mutex<BTreeMap<String, Var>>,
}

impl ParamStore {
    /// A store for a fresh adapter (`saved` = None) or for a saved one's tensors.
    pub fn new(device: &Device, saved: Option<HashMap<String, Tensor>>) -> Self {
        let loading = saved.is_some();
        Self {
            device: device.clone(),
            preloaded: Mutex::new(saved.unwrap_or_default()),
            loading,
            params: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the tensors come from a saved adapter.
    pub fn loading(&self) -> bool {
        self.loading
    }

    /// The trainable tensor `key` of shape `shape`: the saved one (f32, checked against
    /// `shape`), else `init()` for a fresh adapter. Errors: a saved tensor of another shape,
    /// or none when loading.
    pub fn take_or_init(
        &self,
        key: &str,
        shape: &[usize],
        init: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Var> {
        let pre = self.preloaded.lock().unwrap().remove(key);
        let t = match pre {
            Some(t) => {
                if t.dims() != shape {
                    bail!(
                        "adapter tensor {key:?} has shape {:?}, but the model's layer needs {:?}",
                        t.dims(),
                        shape
                    )
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
            None if self.loading => {
                bail!("the adapter has no tensor {key:?} for a module its config targets")
            }
            None => {
                crate::util::ensure_allocatable(
                    &format!("the new trainable tensor {key:?} {shape:?} (f32)"),
                    shape,
                    4,
                )?;
                init()?
            }
        };
        let v = Var::from_tensor(&t)?;
        self.params
            .lock()
            .unwrap()
            .insert(key.to_string(), v.clone());
        Ok(v)
    }

    /// Whether the saved adapter (or checkpoint) holds `key`, not yet claimed.
    pub fn has_saved(&self, key: &str) -> bool {
        self.preloaded.lock().unwrap().contains_key(key)
    }

    /// A saved tensor that replaces part of the base rather than being trained (e.g. PEFT's
    /// saved embedding base layer); `None` when the adapter has none.
    pub fn take_frozen(&self, key: &str) -> Option<Tensor> {
        self.preloaded.lock().unwrap().remove(key)
    }

    /// The tensor stored under `key`.
    pub fn get(&self, key: &str) -> Option<Var> {
        self.params.lock().unwrap().get(key).cloned()
    }

    /// All trainable tensors, sorted by key.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.params
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Fails when saved tensors found no module (another model, or a config that targets less).
    pub fn check_all_used(&self) -> Result<()> {
        let left = self.preloaded.lock().unwrap();
        if !left.is_empty() {
            let mut keys: Vec<&String> = left.keys().collect();
            keys.sort();
            bail!("the adapter has {} tensor(s) for modules this model does not have or the config does not target, e.g. {:?}", keys.len(), keys[0])
        }
        Ok(())
    }
}
