//! SVFit (Sun et al. 2024, "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models
//! Using Singular Values", arXiv 2409.05926): on each targeted linear layer only the top-r
//! singular values of the pretrained weight train; its singular vectors and the residual stay
//! frozen ([`layer`]). No reference code is published, so there is no peft type either: the
//! adapter folder is ferrule's own (`peft_type` `SVFIT`).
//!
//! Saved tensors, per adapted module `<path>` (all f32), under `base_model.model.<path>.`:
//! `svfit_s` `[r]` (trained), and the frozen basis the SVD gave when the adapter was created,
//! `svfit_U` `[out, r]`, `svfit_Vh` `[r, in]` (`V_rᵀ`), `svfit_sigma` `[r]` (the initial
//! singular values). Loading reads the basis and runs no SVD, so a reloaded adapter computes
//! exactly what the trained one did; checkpoints keep the basis too ([`Tuner::frozen_state`]).
//!
//! A fresh adapter's SVD runs on the dense weight, or on the dequantized one for a quantized
//! base (NF4, FP4, int8, GGUF) or the pages of a memory-mapped one (`--stream-base`): its `W_e`
//! is the dequantized weight minus `U_r Σ_r V_rᵀ`. A sharded base (`--shard-base`) is refused
//! for a fresh adapter (each rank holds part of the weight); an adapter that carries its basis
//! loads on any base.

pub mod config;
pub mod layer;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use serde_json::{Map, Value};

pub use config::SvfitConfig;
use layer::{Basis, SvfitLinear};

use super::config::{default_list, AdapterConfig};
use super::core::{AnyTunerCore, LinearRoute, TunerCore};
use super::modules_to_save::ModulesToSave;
use super::registry::{BlockShapes, BuildContext, Method};
use super::target::{ModuleSpec, Targets};
use super::{peft_key, AdaptedModule, Delta, Tuner, Update};
use crate::model::{Linear, LinearInfo, ModelHook};
use crate::ops::{FrozenLinear, FrozenWeight};

/// The registry entry.
pub static METHOD: Method = Method {
    name: "svfit",
    peft_type: "SVFIT",
    summary: "SVFit: the top-r singular values of each targeted weight train, its singular vectors and residual frozen (Sun et al. 2024; no reference code)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: Some(count_from_shapes),
    trains_whole_model: false,
    f32_weights: None,
};

/// Key suffixes of one adapted module's tensors.
const S: &str = "svfit_s";
const U: &str = "svfit_U";
const VH: &str = "svfit_Vh";
const SIGMA: &str = "svfit_sigma";

/// LoRA's default targets (peft's mapping): the paper names no defaults for these models.
fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    default_list(
        options,
        "target_modules",
        model_type,
        super::lora::default_targets,
    )
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: SvfitConfig = config.typed("svfit")?;
    Ok(Box::new(Svfit::new(cfg, ctx)?))
}

/// `ferrule plan` without weights: `r` per targeted linear of every block. A config with
/// `exclude_modules`, a layer selection, `modules_to_save` or a regex is not counted this way.
fn count_from_shapes(options: &Map<String, Value>, blocks: &BlockShapes) -> Result<Option<usize>> {
    let cfg: SvfitConfig = AdapterConfig::new(METHOD.peft_type, options.clone()).typed("svfit")?;
    cfg.validate()?;
    let targets = match ModuleSpec::shape_targets(cfg.target_modules.as_ref()) {
        Some(t) => t,
        None => return Ok(None),
    };
    let selective = cfg.exclude_modules.is_some()
        || cfg.layers_to_transform.is_some()
        || cfg.modules_to_save.is_some();
    if selective {
        return Ok(None);
    }
    let r = cfg.r;
    let count = blocks.sum_over_targets(&targets, |l| {
        check_rank(r, l.name, l.out_features, l.in_features)?;
        Ok(r)
    })?;
    Ok(Some(count))
}

/// `r ≤ min(out, in)`, else an error naming the layer.
fn check_rank(r: usize, path: &str, out_f: usize, in_f: usize) -> Result<()> {
    if r > out_f.min(in_f) {
        bail!("svfit: r={r} (--lora-r) exceeds min(out, in) = {} of {path} ([{out_f}, {in_f}]): a weight has at most that many singular values. Lower r, or leave {path} out of target_modules", out_f.min(in_f))
    }
    Ok(())
}

/// Trains the top singular values of the layers a [`SvfitConfig`] targets.
pub struct Svfit {
    core: TunerCore<SvfitConfig, Basis>,
}

impl Svfit {
    pub fn new(config: SvfitConfig, ctx: BuildContext) -> Result<Self> {
        config.validate()?;
        let targets = Targets::required(
            "svfit",
            config.target_modules.as_ref(),
            config.exclude_modules.as_ref(),
            config.layers_to_transform.as_ref(),
            config.layers_pattern.as_ref(),
        )?;
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx).with_targets(targets),
        })
    }

    /// The layer's basis: the saved one when loading an adapter or checkpoint, else the top-r
    /// SVD of its base weight (dequantized if quantized).
    fn basis(&self, path: &str, base: &FrozenLinear) -> Result<Basis> {
        let r = self.core.config.r;
        let (out_f, in_f) = (base.out_features(), base.in_features());
        let params = &self.core.params;
        if params.loading() {
            let saved = |suffix: &str, shape: &[usize]| -> Result<Tensor> {
                let key = peft_key(path, suffix);
                let t = params.take_frozen(&key).ok_or_else(|| anyhow!("svfit: the adapter has no {key:?}; an SVFit adapter carries the singular vectors it was trained with"))?;
                if t.dims() != shape {
                    bail!("svfit: adapter tensor {key:?} has shape {:?}, but {path} ([{out_f}, {in_f}]) with r={r} needs {shape:?}", t.dims())
                }
                Ok(t.to_dtype(candle_core::DType::F32)?
                    .to_device(params.device())?)
            };
            return Ok(Basis {
                u: saved(U, &[out_f, r])?,
                sigma: saved(SIGMA, &[r])?,
                vh: saved(VH, &[r, in_f])?,
            });
        }
        let w = match base.weight() {
            FrozenWeight::Sharded(..) => bail!("svfit: a new adapter takes the SVD of {path}'s whole weight, which --shard-base splits over the ranks; create it without --shard-base (or continue from one with --init-adapter)"),
            weight => weight.to_dense(params.device())?,
        };
        let top =
            super::svd::top_svd(&w, r).with_context(|| format!("svfit: the SVD of {path}"))?;
        Ok(Basis {
            u: top.u,
            sigma: top.sigma,
            vh: top.vh,
        })
    }

    /// Each adapted module's basis under its keys.
    fn bases(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for adapted in self.core.adapted().iter() {
            let (path, basis) = (&adapted.module.path, &adapted.layer);
            out.push((peft_key(path, U), basis.u.clone()));
            out.push((peft_key(path, SIGMA), basis.sigma.clone()));
            out.push((peft_key(path, VH), basis.vh.clone()));
        }
        out
    }
}

impl ModelHook for Svfit {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let base = match self.core.route_linear(info, base)? {
            LinearRoute::Targeted(base) => base,
            other => return Ok(other.unadapted()),
        };
        let path = info.path.as_str();
        let r = self.core.config.r;
        check_rank(r, path, base.out_features(), base.in_features())?;
        let basis = self.basis(path, &base)?;
        let sigma = basis.sigma.clone();
        let s = self
            .core
            .params
            .take_or_init(&peft_key(path, S), &[r], || Ok(sigma.copy()?))?;
        let module = AdaptedModule {
            path: path.to_string(),
            params: r,
            detail: format!("r={r}"),
        };
        self.core.record(module, basis.clone());
        Ok(Box::new(SvfitLinear { base, basis, s }))
    }
}

impl Tuner for Svfit {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    /// The trained singular values and each module's basis, sorted by key.
    fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .trainable()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        out.extend(self.bases());
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn frozen_state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.bases())
    }

    /// `W' = W + U_r diag(s − σ) V_rᵀ` (= `W_e + U_r diag(s) V_rᵀ`), kept as its factors.
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        let mut out = Vec::new();
        for adapted in self.core.adapted().iter() {
            let path = &adapted.module.path;
            let s = self
                .core
                .params
                .get(&peft_key(path, S))
                .ok_or_else(|| anyhow!("svfit: {path} has no {S}"))?;
            let delta = Delta::LowRank {
                b: adapted.layer.left_factor(s.as_tensor())?,
                a: adapted.layer.vh.clone(),
                scale: 1.0,
                transposed: false,
            };
            out.push((format!("{path}.weight"), Update::Add(delta)));
        }
        Ok(out)
    }
}
