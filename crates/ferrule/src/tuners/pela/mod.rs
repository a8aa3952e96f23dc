//! PELA (Guo et al. 2023, "PELA: Learning Parameter-Efficient Models with Low-Rank
//! Approximation", CVPR 2024; guoyang9/PELA): each targeted linear is replaced by two low-rank
//! linears initialised from its SVD ([`layer`]), which train with the task loss plus the
//! paper's weight regulariser ([`Tuner::regularizer`]). The result is a smaller model, not an
//! adapter on a frozen one: `merge` writes it back as a dense Hugging Face folder
//! (`W' = R L`, the trained bias).
//!
//! Saved tensors use the reference's keys, those of its `nn.Sequential(Linear, Linear)`:
//! `<path>.0.weight` (`L: [k, in]`), `<path>.1.weight` (`R: [out, k]`), `<path>.1.bias`, f32,
//! without peft's `base_model.model.` prefix. `peft_type` `PELA` is ferrule's.
//!
//! The reference's feature distillation (`Pretrain.py`: `+ 0.1 · mean MSE(feat_s, feat_t)`
//! over the model's hidden states) runs the original model as the teacher: the layers
//! compute their replaced linear while [`Tuner::set_teaching`] is on (`train::distill`).
//!
//! Not implemented: training every other parameter of the model as the reference does (here
//! only the factorised linears and their biases, plus `modules_to_save`).

pub mod config;
pub mod layer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Tensor, Var};
use serde_json::{Map, Value};

pub use config::PelaConfig;
use layer::{inf_norm_term, PelaLinear};

use super::core::{AnyTunerCore, LinearRoute, TunerCore};
use super::modules_to_save::ModulesToSave;
use super::registry::{BlockShapes, BuildContext, Method};
use super::target::{ModuleSpec, Targets};
use super::{AdaptedModule, Tuner, Update};
use crate::model::{Linear, LinearInfo, ModelHook};
use crate::ops::{FrozenLinear, FrozenWeight};

/// The registry entry.
pub static METHOD: Method = Method {
    name: "pela",
    peft_type: "PELA",
    summary: "PELA: each targeted linear factorised into two trained low-rank linears from its SVD, with the paper's weight regulariser and feature distillation (Guo et al. 2023)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: Some(count_from_shapes),
    trains_whole_model: false,
    f32_weights: None,
};

/// `all-linear` unless set: the reference factorises every linear but its heads.
fn complete(options: &mut Map<String, Value>, _model_type: &str) -> Result<()> {
    if options.get("target_modules").is_none_or(Value::is_null) {
        options.insert("target_modules".into(), Value::from("all-linear"));
    }
    Ok(())
}

/// `ferrule plan` without weights: `k (in + out)` plus the bias per targeted linear of every
/// block. A config with `exclude_modules`, `modules_to_save` or a regex is not counted this way.
fn count_from_shapes(options: &Map<String, Value>, blocks: &BlockShapes) -> Result<Option<usize>> {
    let cfg: PelaConfig =
        crate::tuners::AdapterConfig::new(METHOD.peft_type, options.clone()).typed("pela")?;
    cfg.validate()?;
    let targets = match ModuleSpec::shape_targets(cfg.target_modules.as_ref()) {
        Some(t) => t,
        None => return Ok(None),
    };
    if cfg.exclude_modules.is_some() || cfg.modules_to_save.is_some() {
        return Ok(None);
    }
    let count = blocks.sum_over_targets(&targets, |l| {
        let k = cfg.checked_rank(l.name, l.out_features, l.in_features)?;
        Ok(k * (l.in_features + l.out_features) + if l.bias { l.out_features } else { 0 })
    })?;
    Ok(Some(count))
}

fn build(config: &crate::tuners::AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: PelaConfig = config.typed("pela")?;
    Ok(Box::new(Pela::new(cfg, ctx)?))
}

/// The reference's key of one factor: `<path>.0.weight`, `<path>.1.weight`, `<path>.1.bias`.
fn key(path: &str, suffix: &str) -> String {
    format!("{path}.{suffix}")
}

/// What the regulariser and the merge need of one factorised layer.
#[derive(Clone, Debug)]
struct PelaLayer {
    /// The original weight `W` (kept as loaded; dequantized when the regulariser reads it).
    original: FrozenWeight,
    has_bias: bool,
}

/// Factorises the linears a [`PelaConfig`] targets.
pub struct Pela {
    core: TunerCore<PelaConfig, PelaLayer>,
    /// Whether the layers compute the linears they replace (the distillation's teacher).
    teaching: Arc<AtomicBool>,
}

impl Pela {
    pub fn new(config: PelaConfig, ctx: BuildContext) -> Result<Self> {
        config.validate()?;
        let target = config
            .target_modules
            .clone()
            .unwrap_or(ModuleSpec::Pattern("all-linear".into()));
        let targets = Targets::new("target_modules", &target, config.exclude_modules.as_ref())
            .context("pela")?;
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx).with_targets(targets),
            teaching: Arc::default(),
        })
    }

    /// `(L, R)` of the layer at `path`: saved, or from the top-k SVD of its base weight.
    fn factors(&self, path: &str, base: &FrozenLinear, k: usize) -> Result<(Var, Var)> {
        let (out_f, in_f) = (base.out_features(), base.in_features());
        let params = &self.core.params;
        let (first_key, second_key) = (key(path, "0.weight"), key(path, "1.weight"));
        if params.loading() {
            let first = params.take_or_init(&first_key, &[k, in_f], || {
                bail!("pela: {first_key} not in the adapter")
            })?;
            let second = params.take_or_init(&second_key, &[out_f, k], || {
                bail!("pela: {second_key} not in the adapter")
            })?;
            return Ok((first, second));
        }
        let w = match base.weight() {
            FrozenWeight::Sharded(..) => bail!("pela: the SVD of {path} needs its whole weight, which --shard-base splits over the ranks; start without --shard-base"),
            weight => weight.to_dense(params.device())?,
        };
        let top = super::svd::top_svd(&w, k).with_context(|| format!("pela: the SVD of {path}"))?;
        let root = top.sigma.sqrt()?;
        let first = top.vh.broadcast_mul(&root.unsqueeze(1)?)?;
        let second = top.u.broadcast_mul(&root.unsqueeze(0)?)?;
        let first = params.take_or_init(&first_key, &[k, in_f], || Ok(first))?;
        let second = params.take_or_init(&second_key, &[out_f, k], || Ok(second))?;
        Ok((first, second))
    }

    fn var(&self, path: &str, suffix: &str) -> Result<Var> {
        self.core
            .params
            .get(&key(path, suffix))
            .ok_or_else(|| anyhow!("pela: {path} has no {suffix}"))
    }
}

impl ModelHook for Pela {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let base = match self.core.route_linear(info, base)? {
            LinearRoute::Targeted(base) => base,
            other => return Ok(other.unadapted()),
        };
        let path = info.path.as_str();
        let (out_f, in_f) = (base.out_features(), base.in_features());
        let k = self.core.config.checked_rank(path, out_f, in_f)?;
        let (first, second) = self.factors(path, &base, k)?;
        let bias = match base.bias() {
            Some(b) => {
                let b = b.clone();
                let init = || Ok(b.to_dtype(candle_core::DType::F32)?.copy()?);
                Some(
                    self.core
                        .params
                        .take_or_init(&key(path, "1.bias"), b.dims(), init)?,
                )
            }
            None => None,
        };
        let module = AdaptedModule {
            path: path.to_string(),
            params: k * (in_f + out_f) + bias.as_ref().map_or(0, |b| b.elem_count()),
            detail: format!("k={k}"),
        };
        let layer = PelaLayer {
            original: base.weight().clone(),
            has_bias: bias.is_some(),
        };
        self.core.record(module, layer);
        Ok(Box::new(PelaLinear {
            original: base,
            teaching: self.teaching.clone(),
            first,
            second,
            bias,
        }))
    }
}

impl Tuner for Pela {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    /// The factors replace the weight outright: no additive update.
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        Ok(Vec::new())
    }

    /// `W' = R L` and the trained bias replace each factorised layer's tensors.
    fn replaced(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.core.saved_replaced();
        for adapted in self.core.adapted().iter() {
            let path = &adapted.module.path;
            let (first, second) = (self.var(path, "0.weight")?, self.var(path, "1.weight")?);
            let w = second.as_tensor().matmul(first.as_tensor())?;
            out.push((format!("{path}.weight"), w));
            if adapted.layer.has_bias {
                let b = self.var(path, "1.bias")?;
                out.push((format!("{path}.bias"), b.as_tensor().clone()));
            }
        }
        Ok(out)
    }

    /// The replaced weights and biases: the factorised model's total is the base's less them
    /// plus the factors.
    fn trained_in_place(&self) -> usize {
        let adapted = self.core.adapted();
        let replaced = |l: &PelaLayer| {
            let (out_f, in_f) = l.original.dims();
            out_f * in_f + if l.has_bias { out_f } else { 0 }
        };
        adapted.iter().map(|a| replaced(&a.layer)).sum()
    }

    /// `distill_weight`, unless 0.
    fn distillation_weight(&self) -> Option<f64> {
        Some(self.core.config.distill_weight).filter(|&w| w > 0.0)
    }

    fn set_teaching(&self, on: bool) {
        self.teaching.store(on, Ordering::Relaxed)
    }

    /// `norm_weight · mean_l (max|R_l L_l − W_l| − norm_eps)²` (`inf_norm`), or none when
    /// `norm_weight` is 0.
    fn regularizer(&self) -> Result<Option<Tensor>> {
        let cfg = &self.core.config;
        let adapted = self.core.adapted();
        if cfg.norm_weight == 0.0 || adapted.is_empty() {
            return Ok(None);
        }
        let dev = self.core.params.device();
        let mut sum: Option<Tensor> = None;
        for a in adapted.iter() {
            let path = &a.module.path;
            let (first, second) = (self.var(path, "0.weight")?, self.var(path, "1.weight")?);
            let w = a.layer.original.to_dense(dev)?;
            let term = inf_norm_term(first.as_tensor(), second.as_tensor(), &w, cfg.norm_eps)?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        let mean = (sum.expect("at least one layer") / adapted.len() as f64)?;
        Ok(Some((mean * cfg.norm_weight)?))
    }
}
