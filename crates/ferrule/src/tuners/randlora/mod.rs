//! RandLoRA (PEFT `RANDLORA`; Albert et al. 2025): full-rank updates from frozen random bases
//! shared by all layers, each layer training only the scales `λ` and `γ` of the bases.

pub mod config;
pub mod layer;

use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

pub use config::RandLoraConfig;
use layer::{Bases, RandLoraLinear};

use super::config::{default_list, AdapterConfig};
use super::core::{AnyTunerCore, LinearRoute, TunerCore};
use super::modules_to_save::ModulesToSave;
use super::registry::{BuildContext, Method};
use super::target::{MatchReport, Targets};
use super::{peft_key, AdaptedModule, Delta, Tuner, Update};
use crate::model::{Linear, LinearInfo, ModelHook};
use crate::ops::FrozenLinear;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "randlora",
    peft_type: "RANDLORA",
    summary: "RandLoRA: full-rank updates from shared frozen random bases, trained scales per layer (Albert et al. 2025)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: None,
    trains_whole_model: false,
    f32_weights: None,
};

/// PEFT's keys of the shared bases (`save_projection = true`); peft also saves a copy under
/// every adapted module (`<path>.randlora_A`), which ferrule writes and reads the same way.
const BASE_A: &str = "base_model.randlora_A";
const BASE_B: &str = "base_model.randlora_B";

/// PEFT's `TRANSFORMERS_MODELS_TO_RANDLORA_TARGET_MODULES_MAPPING` is LoRA's.
fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    default_list(
        options,
        "target_modules",
        model_type,
        super::lora::default_targets,
    )
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: RandLoraConfig = config.typed("randlora")?;
    cfg.validate()?;
    Ok(Box::new(RandLora::new(cfg, ctx)?))
}

/// Trains the layers a [`RandLoraConfig`] targets.
pub struct RandLora {
    core: TunerCore<RandLoraConfig, LayerShape>,
    /// The random bases every layer shares, set in `finish` ([`RandLoraLinear::bases`]).
    bases: Arc<OnceLock<Bases>>,
}

/// The `(out, in)` of an adapted layer: what sizes the shared bases and a merge's `ΔW`.
#[derive(Clone, Copy, Debug)]
struct LayerShape {
    out_features: usize,
    in_features: usize,
}

impl RandLora {
    pub fn new(config: RandLoraConfig, ctx: BuildContext) -> Result<Self> {
        let targets = Targets::required(
            "randlora",
            config.target_modules.as_ref(),
            None,
            config.layers_to_transform.as_ref(),
            config.layers_pattern.as_ref(),
        )?;
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx).with_targets(targets),
            bases: Arc::new(OnceLock::new()),
        })
    }

    /// The bases of a saved adapter, or fresh ones over the largest targeted `(out, in)`.
    fn bases(&self, largest: LayerShape) -> Result<Bases> {
        let params = &self.core.params;
        if params.loading() {
            let a = params.take_frozen(BASE_A).ok_or_else(|| {
                anyhow!(
                    "randlora: the adapter has no {BASE_A:?} (saved with save_projection = false?)"
                )
            })?;
            let b = params
                .take_frozen(BASE_B)
                .ok_or_else(|| anyhow!("randlora: the adapter has no {BASE_B:?}"))?;
            return Ok(Bases {
                a: a.to_dtype(DType::F32)?,
                b: b.to_dtype(DType::F32)?,
            });
        }
        let (max, min) = (largest.max(), largest.min());
        let config = &self.core.config;
        let r = config.r;
        let num_bases = min.div_ceil(r);
        let sparsity = if config.very_sparse {
            Some((min as f64).sqrt())
        } else {
            config.sparse.then_some(3.0)
        };
        let key = config.projection_prng_key;
        let dev = params.device();
        Ok(Bases {
            a: random_base(&[r, 1, min], sparsity, key, "randlora_A", dev)?,
            b: random_base(&[max, num_bases, r], sparsity, key, "randlora_B", dev)?,
        })
    }

    /// The trained scales `(λ: [r, n_b], γ: [n_b, min])` of the layer at `path`, and `n_b`.
    fn layer(&self, path: &str, shape: LayerShape) -> Result<(Var, Var, usize)> {
        let r = self.core.config.r;
        let (min, max) = (shape.min(), shape.max());
        let num_bases = min.div_ceil(r);
        let (key_lambda, key_gamma) = (
            peft_key(path, "randlora_lambda"),
            peft_key(path, "randlora_gamma"),
        );
        let params = &self.core.params;
        let dev = params.device().clone();
        let seed = self.core.init_seed(&key_lambda);
        let init = self.core.config.init_weights;
        let lambda = params.take_or_init(&key_lambda, &[r, num_bases], || match init {
            true => Ok(Tensor::zeros((r, num_bases), DType::F32, &dev)?),
            false => crate::init::normal(&[r, num_bases], 1.0, seed, &dev),
        })?;
        // peft: ones / max(out, in) at creation, then 1 / max(γ's shape) when init_weights.
        let gamma0 = if init {
            1.0 / num_bases.max(min) as f64
        } else {
            1.0 / max as f64
        };
        let gamma = params.take_or_init(&key_gamma, &[num_bases, min], || {
            Ok((Tensor::ones((num_bases, min), DType::F32, &dev)? * gamma0)?)
        })?;
        // The per-module copies of the shared bases: the global ones are used.
        params.take_frozen(&peft_key(path, "randlora_A"));
        params.take_frozen(&peft_key(path, "randlora_B"));
        Ok((lambda, gamma, num_bases))
    }

    fn scaling(&self) -> f64 {
        self.core.config.randlora_alpha / self.core.config.r as f64
    }

    /// Each adapted layer's `ΔW = s · B_eff A_eff` (a merge's update).
    fn deltas(&self) -> Result<Vec<(String, Tensor)>> {
        let adapted: Vec<(String, LayerShape)> = self
            .core
            .adapted()
            .iter()
            .map(|a| (a.module.path.clone(), a.layer))
            .collect();
        let mut out = Vec::new();
        for (path, shape) in adapted {
            let get = |suffix: &str| {
                self.core
                    .params
                    .get(&peft_key(&path, suffix))
                    .ok_or_else(|| anyhow!("randlora: {path} has no {suffix}"))
            };
            // Only the base's shape enters ΔW.
            let zeros = (shape.out_features, shape.in_features);
            let base = FrozenLinear::new(
                Tensor::zeros(zeros, DType::F32, self.core.params.device())?,
                None,
            )?;
            let layer = RandLoraLinear {
                path: path.clone(),
                base,
                lambda: get("randlora_lambda")?,
                gamma: get("randlora_gamma")?,
                bases: self.bases.clone(),
                scaling: self.scaling(),
                dropout: 0.0,
                clock: self.core.clock.clone(),
            };
            out.push((format!("{path}.weight"), layer.delta_weight()?));
        }
        Ok(out)
    }
}

/// A random base normalised to unit (unbiased) standard deviation, as peft divides its bases
/// by their `std()`: uniform draws (peft's Kaiming-uniform bound cancels in the division) or,
/// with `sparsity s`, −1 / 0 / 1 with probabilities 1/(2s), 1 − 1/s, 1/(2s). Seeded by
/// `projection_prng_key`, not bit-identical to torch's generator; the values are rounded to
/// bf16, the dtype peft makes its bases in, so peft reloads them exactly whatever its dtype.
fn random_base(
    shape: &[usize],
    sparsity: Option<f64>,
    key: u64,
    name: &str,
    dev: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = rand::rngs::StdRng::seed_from_u64(crate::init::seed_for(key, name));
    let v: Vec<f32> = (0..n)
        .map(|_| match sparsity {
            None => rng.gen_range(-1.0f32..1.0),
            Some(s) => {
                let u: f64 = rng.gen();
                if u < 1.0 / (2.0 * s) {
                    -1.0
                } else if u > 1.0 - 1.0 / (2.0 * s) {
                    1.0
                } else {
                    0.0
                }
            }
        })
        .collect();
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64;
    let std = if var > 0.0 { var.sqrt() } else { 1.0 };
    let t = Tensor::from_vec(
        v.iter()
            .map(|&x| (x as f64 / std) as f32)
            .collect::<Vec<_>>(),
        shape,
        dev,
    )?;
    Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)
}

impl ModelHook for RandLora {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let base = match self.core.route_linear(info, base)? {
            LinearRoute::Targeted(base) => base,
            other => return Ok(other.unadapted()),
        };
        let path = info.path.as_str();
        let shape = LayerShape {
            out_features: base.out_features(),
            in_features: base.in_features(),
        };
        let (lambda, gamma, num_bases) = self.layer(path, shape)?;
        let module = AdaptedModule {
            path: path.to_string(),
            params: lambda.elem_count() + gamma.elem_count(),
            detail: format!(
                "r={} bases={num_bases} scaling={}",
                self.core.config.r,
                self.scaling()
            ),
        };
        self.core.record(module, shape);
        Ok(Box::new(RandLoraLinear {
            path: path.to_string(),
            base,
            lambda,
            gamma,
            bases: self.bases.clone(),
            scaling: self.scaling(),
            dropout: self.core.config.randlora_dropout,
            clock: self.core.clock.clone(),
        }))
    }
}

impl LayerShape {
    fn min(self) -> usize {
        self.out_features.min(self.in_features)
    }

    fn max(self) -> usize {
        self.out_features.max(self.in_features)
    }
}

impl Tuner for RandLora {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    /// Sets the shared bases (sized by the largest targeted layer, as peft's `_find_dim`) and
    /// checks they cover every layer.
    fn finish(&self) -> Result<Vec<MatchReport>> {
        let shapes: Vec<(String, LayerShape)> = self
            .core
            .adapted()
            .iter()
            .map(|a| (a.module.path.clone(), a.layer))
            .collect();
        let largest = shapes.iter().map(|(_, s)| *s).reduce(|a, b| LayerShape {
            out_features: a.out_features.max(b.out_features),
            in_features: a.in_features.max(b.in_features),
        });
        if let (Some(largest), None) = (largest, self.bases.get()) {
            let bases = self.bases(largest)?;
            self.check_bases(&bases, &shapes)?;
            let _ = self.bases.set(bases);
        }
        self.core
            .check_finished("target_modules matched no linear layer of the model")
    }

    /// The trained scales, and the bases as peft saves them (`save_projection`): once under
    /// `base_model.` and once under every adapted module.
    fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let bases = self.bases.get().ok_or_else(|| {
            anyhow!("randlora: the random bases are not set (Tuner::finish was not called)")
        })?;
        let mut out: Vec<(String, Tensor)> = self
            .trainable()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        out.push((BASE_A.into(), bases.a.clone()));
        out.push((BASE_B.into(), bases.b.clone()));
        for adapted in self.core.adapted().iter() {
            let path = &adapted.module.path;
            out.push((peft_key(path, "randlora_A"), bases.a.clone()));
            out.push((peft_key(path, "randlora_B"), bases.b.clone()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// `W' = W + ΔW` (peft `Linear.merge`).
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        Ok(self
            .deltas()?
            .into_iter()
            .map(|(k, d)| (k, Update::Add(Delta::Dense(d))))
            .collect())
    }
}

impl RandLora {
    /// The bases have the config's rank and cover every adapted layer (a saved adapter's may
    /// not).
    fn check_bases(&self, bases: &Bases, shapes: &[(String, LayerShape)]) -> Result<()> {
        let (r, num_bases, min, max) = (
            bases.a.dim(0)?,
            bases.b.dim(1)?,
            bases.a.dim(2)?,
            bases.b.dim(0)?,
        );
        if r != self.core.config.r || bases.b.dim(2)? != r {
            bail!(
                "randlora: the bases have rank {r}, the config r = {}",
                self.core.config.r
            )
        }
        for (path, shape) in shapes {
            if max < shape.max() || min < shape.min() || num_bases < shape.min().div_ceil(r) {
                bail!(
                    "randlora: the random bases ({BASE_A} {:?}, {BASE_B} {:?}) are too small for {path} ({} × {})",
                    bases.a.dims(),
                    bases.b.dims(),
                    shape.out_features,
                    shape.in_features
                )
            }
        }
        Ok(())
    }
}
