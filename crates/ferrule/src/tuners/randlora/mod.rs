//! RandLoRA (PEFT `RANDLORA`; Albert et al. 2025): full-rank updates from frozen random bases
//! shared by all layers, each layer training only the scales `λ` and `γ` of the bases.

pub mod config;
pub mod layer;

use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

pub use config::RandLoraConfig;
use layer::{Bases, RandLoraLinear};

use super::config::{default_list, AdapterConfig};
use super::mode::Mode;
use super::modules_to_save::ModulesToSave;
use super::params::ParamStore;
use super::registry::{BuildContext, Method};
use super::target::{in_layers, MatchReport, Targets};
use super::{check_finished, peft_key, AdaptedModule, Tuner, Update};
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
    config: RandLoraConfig,
    targets: Targets,
    allow_unmatched: bool,
    seed: u64,
    mode: Arc<Mode>,
    params: ParamStore,
    saved: ModulesToSave,
    bases: Arc<OnceLock<Bases>>,
    /// Adapted layers: module report and `(out, in)`.
    adapted: Mutex<Vec<(AdaptedModule, (usize, usize))>>,
}

impl RandLora {
    pub fn new(config: RandLoraConfig, ctx: BuildContext) -> Result<Self> {
        let target = config
            .target_modules
            .as_ref()
            .ok_or_else(|| anyhow!("randlora: target_modules is required"))?;
        let targets = Targets::new("target_modules", target, None).context("randlora")?;
        Ok(Self {
            saved: ModulesToSave::new(config.modules_to_save.as_deref()),
            targets,
            allow_unmatched: ctx.allow_unmatched,
            seed: ctx.seed,
            mode: Arc::new(Mode::new(ctx.seed)),
            params: ParamStore::new(ctx.device, ctx.weights),
            bases: Arc::new(OnceLock::new()),
            adapted: Mutex::new(Vec::new()),
            config,
        })
    }

    /// The bases of a saved adapter, or fresh ones over the largest targeted `(out, in)`.
    fn bases(&self, largest: (usize, usize)) -> Result<Bases> {
        if self.params.loading() {
            let a = self.params.take_frozen(BASE_A).ok_or_else(|| {
                anyhow!(
                    "randlora: the adapter has no {BASE_A:?} (saved with save_projection = false?)"
                )
            })?;
            let b = self
                .params
                .take_frozen(BASE_B)
                .ok_or_else(|| anyhow!("randlora: the adapter has no {BASE_B:?}"))?;
            return Ok(Bases {
                a: a.to_dtype(DType::F32)?,
                b: b.to_dtype(DType::F32)?,
            });
        }
        let (max, min) = (largest.0.max(largest.1), largest.0.min(largest.1));
        let r = self.config.r;
        let nb = min.div_ceil(r);
        let sparsity = if self.config.very_sparse {
            Some((min as f64).sqrt())
        } else {
            self.config.sparse.then_some(3.0)
        };
        let key = self.config.projection_prng_key;
        let dev = self.params.device();
        Ok(Bases {
            a: random_base(&[r, 1, min], sparsity, key, "randlora_A", dev)?,
            b: random_base(&[max, nb, r], sparsity, key, "randlora_B", dev)?,
        })
    }

    fn layer(&self, path: &str, base: &FrozenLinear) -> Result<(Var, Var, usize)> {
        let (in_f, out_f) = (base.in_features(), base.out_features());
        let r = self.config.r;
        let (min, max) = (in_f.min(out_f), in_f.max(out_f));
        let nb = min.div_ceil(r);
        let (key_l, key_g) = (
            peft_key(path, "randlora_lambda"),
            peft_key(path, "randlora_gamma"),
        );
        let dev = self.params.device().clone();
        let seed = crate::init::seed_for(self.seed, &key_l);
        let init = self.config.init_weights;
        let lambda = self.params.take_or_init(&key_l, &[r, nb], || match init {
            true => Ok(Tensor::zeros((r, nb), DType::F32, &dev)?),
            false => crate::init::normal(&[r, nb], 1.0, seed, &dev),
        })?;
        // peft: ones / max(out, in) at creation, then 1 / max(γ's shape) when init_weights.
        let g0 = if init {
            1.0 / nb.max(min) as f64
        } else {
            1.0 / max as f64
        };
        let gamma = self.params.take_or_init(&key_g, &[nb, min], || {
            Ok((Tensor::ones((nb, min), DType::F32, &dev)? * g0)?)
        })?;
        // The per-module copies of the shared bases: the global ones are used.
        self.params.take_frozen(&peft_key(path, "randlora_A"));
        self.params.take_frozen(&peft_key(path, "randlora_B"));
        Ok((lambda, gamma, nb))
    }

    fn scaling(&self) -> f64 {
        self.config.randlora_alpha / self.config.r as f64
    }

    /// Each adapted layer's `ΔW = s · B_eff A_eff` (a merge's update).
    fn deltas(&self) -> Result<Vec<(String, Tensor)>> {
        let adapted: Vec<(String, (usize, usize))> = self
            .adapted
            .lock()
            .unwrap()
            .iter()
            .map(|(m, s)| (m.path.clone(), *s))
            .collect();
        let mut out = Vec::new();
        for (path, (out_f, in_f)) in adapted {
            let get = |s: &str| {
                self.params
                    .get(&peft_key(&path, s))
                    .ok_or_else(|| anyhow!("randlora: {path} has no {s}"))
            };
            // Only the base's shape enters ΔW.
            let base = FrozenLinear::new(
                Tensor::zeros((out_f, in_f), DType::F32, self.params.device())?,
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
                mode: self.mode.clone(),
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
        let base = match self.saved.wrap(info, base, &self.params)? {
            Ok(full) => return Ok(full),
            Err(base) => base,
        };
        let path = info.path.as_str();
        if !self.targets.select(path, info.is_output_head)
            || !in_layers(
                path,
                self.config.layers_to_transform.as_ref(),
                self.config.layers_pattern.as_ref(),
            )
        {
            return Ok(Box::new(base));
        }
        let (lambda, gamma, nb) = self.layer(path, &base)?;
        let params = lambda.elem_count() + gamma.elem_count();
        let detail = format!("r={} bases={nb} scaling={}", self.config.r, self.scaling());
        self.adapted.lock().unwrap().push((
            AdaptedModule {
                path: path.to_string(),
                params,
                detail,
            },
            (base.out_features(), base.in_features()),
        ));
        Ok(Box::new(RandLoraLinear {
            path: path.to_string(),
            base,
            lambda,
            gamma,
            bases: self.bases.clone(),
            scaling: self.scaling(),
            dropout: self.config.randlora_dropout,
            mode: self.mode.clone(),
        }))
    }
}

impl Tuner for RandLora {
    fn method(&self) -> &'static Method {
        &METHOD
    }

    fn mode(&self) -> &Arc<Mode> {
        &self.mode
    }

    /// Sets the shared bases (sized by the largest targeted layer, as peft's `_find_dim`) and
    /// checks they cover every layer.
    fn finish(&self) -> Result<Vec<MatchReport>> {
        let shapes: Vec<(String, (usize, usize))> = self
            .adapted
            .lock()
            .unwrap()
            .iter()
            .map(|(m, s)| (m.path.clone(), *s))
            .collect();
        if let Some(largest) = shapes
            .iter()
            .map(|(_, s)| *s)
            .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)))
        {
            if self.bases.get().is_none() {
                let bases = self.bases(largest)?;
                let (r, nb, min, max) = (
                    bases.a.dim(0)?,
                    bases.b.dim(1)?,
                    bases.a.dim(2)?,
                    bases.b.dim(0)?,
                );
                if r != self.config.r || bases.b.dim(2)? != r {
                    bail!(
                        "randlora: the bases have rank {r}, the config r = {}",
                        self.config.r
                    )
                }
                for (path, (o, i)) in &shapes {
                    if max < *o.max(i) || min < *o.min(i) || nb < (*o.min(i)).div_ceil(r) {
                        bail!("randlora: the random bases ({BASE_A} {:?}, {BASE_B} {:?}) are too small for {path} ({o} × {i})", bases.a.dims(), bases.b.dims())
                    }
                }
                let _ = self.bases.set(bases);
            }
        }
        Ok(vec![check_finished(
            "randlora",
            &self.targets,
            &self.params,
            self.allow_unmatched,
            !shapes.is_empty(),
            "linear layer",
        )?])
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    fn adapted(&self) -> Vec<AdaptedModule> {
        self.adapted
            .lock()
            .unwrap()
            .iter()
            .map(|(m, _)| m.clone())
            .collect()
    }

    fn config_json(&self) -> Result<Value> {
        Ok(serde_json::to_value(&self.config)?)
    }

    /// The trained scales, and the bases as peft saves them (`save_projection`): once under
    /// `base_model.` and once under every adapted module.
    fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let bases = self.bases.get().ok_or_else(|| {
            anyhow!("randlora: the random bases are not set (Tuner::finish was not called)")
        })?;
        let mut out: Vec<(String, Tensor)> = self
            .params
            .trainable()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        out.push((BASE_A.into(), bases.a.clone()));
        out.push((BASE_B.into(), bases.b.clone()));
        for (m, _) in self.adapted.lock().unwrap().iter() {
            out.push((peft_key(&m.path, "randlora_A"), bases.a.clone()));
            out.push((peft_key(&m.path, "randlora_B"), bases.b.clone()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// `W' = W + ΔW` (peft `Linear.merge`).
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        Ok(self
            .deltas()?
            .into_iter()
            .map(|(k, d)| (k, Update::Add(d)))
            .collect())
    }

    fn replaced(&self) -> Vec<(String, Tensor)> {
        self.saved.replaced(&self.params)
    }
}
