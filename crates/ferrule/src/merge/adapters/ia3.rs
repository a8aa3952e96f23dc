//! IA3 adapters combined as peft's IA3 `add_weighted_adapter` does (`peft/tuners/ia3/model.py`):
//! on every module, `l = Σ wᵢ lᵢ` over the adapters that have a vector there; the config is the
//! first adapter's with the union of `target_modules` and of `feedforward_modules`.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;

use super::{flat, same_key, split_key, union_of, WeightedAdapter};

const L: &str = "ia3_l";

pub(super) fn combine(inputs: &[WeightedAdapter]) -> Result<(Value, BTreeMap<String, Tensor>)> {
    for key in ["layers_to_transform", "layers_pattern", "exclude_modules"] {
        same_key(inputs, key)?;
    }
    // (shape, sum, first adapter) per key.
    let mut sums: BTreeMap<String, (Vec<usize>, Vec<f32>, usize)> = BTreeMap::new();
    for (i, a) in inputs.iter().enumerate() {
        if let Some(Value::Array(m)) = a.adapter.config.get("modules_to_save") {
            if !m.is_empty() {
                bail!("adapter {}: trains modules in full (modules_to_save); their copies have no weighted combination", a.name)
            }
        }
        let mut keys: Vec<&String> = a.adapter.tensors.keys().collect();
        keys.sort();
        for key in keys {
            if split_key(key, &[L]).is_none() {
                bail!(
                    "adapter {}: tensor {key:?} is not an IA3 vector (ia3_l)",
                    a.name
                )
            }
            let (shape, v) = flat(&a.adapter.tensors[key])?;
            let w = a.weight as f32;
            match sums.get_mut(key) {
                None => {
                    let scaled = v.iter().map(|x| x * w).collect();
                    sums.insert(key.clone(), (shape, scaled, i));
                }
                Some((s, sum, first)) => {
                    if *s != shape {
                        bail!(
                            "adapters {} and {} do not fit one base, or scale different sides of it: {key} is {s:?} in the first and {shape:?} in the second (check feedforward_modules)",
                            inputs[*first].name,
                            a.name
                        )
                    }
                    sum.iter_mut().zip(&v).for_each(|(o, x)| *o += x * w);
                }
            }
        }
    }
    let mut tensors = BTreeMap::new();
    for (key, (shape, sum, _)) in sums {
        tensors.insert(key, Tensor::from_vec(sum, shape, &Device::Cpu)?);
    }
    let mut config = inputs[0].adapter.config.clone();
    let targets = union_of(inputs, "target_modules")?;
    let feedforward = union_of(inputs, "feedforward_modules")?;
    let o = config
        .as_object_mut()
        .context("adapter_config.json is not an object")?;
    o.insert("target_modules".into(), targets);
    o.insert("feedforward_modules".into(), feedforward);
    Ok((config, tensors))
}
