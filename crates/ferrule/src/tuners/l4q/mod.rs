//! L4Q (Jeon, Kim and Kim, "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large
//! Language Models", arXiv 2402.04902): LoRA trained inside a learned-step-size quantizer, so
//! that the result is a quantized model (integer codes, a step and an offset per group), not
//! a base plus an adapter ([`layer`]). No reference code is published: the equations are
//! checked by hand (`quant::lsq`, `ops::lsq_linear`), and the folder is ferrule's own
//! (`peft_type` `L4Q`).
//!
//! Saved tensors, per adapted module `<path>` (all f32), under `base_model.model.<path>.`:
//! `lora_A.weight` `[r, in]`, `lora_B.weight` `[out, r]` (LoRA's names and init: A
//! kaiming-uniform with a = √5, B zero; the paper's v1 draws A from `N(0, σ²)` with `σ`
//! unstated), `l4q_step` and `l4q_offset` `[out, in / group_size]` (the offset `b` of the
//! config's code range, `codes`). A fresh adapter's steps and offsets come from each group's
//! minimum and maximum of `W₀` (`GroupQuantizer::init_from_min_max`: `s = (max − min)/(2^bits
//! − 1)`, `b = min − Qn·s`), so at step 0 the model is `W₀` on ggml's Q4_1 grid (4 bits,
//! groups of 32), and B = 0 makes `W' = W₀`. With a LoRA warm-up (`warmup_steps`, v1's
//! `T_wp`) the layers are plain LoRA until then, and [`Tuner::before_step`] sets the steps and
//! offsets the same way from `W₀ + (α/r)·B A` as trained (v1, Algorithm 1: "if t = T_wp + 1
//! then Initialize s_w, b_w"). The paper's init formula could not be read, so min/max was
//! chosen: the asymmetric quantizer's exact range and Q4_1's own, which the export writes.
//! docs/PARITY.md ("L4Q") lists each of the paper's facts, with the version it comes from.
//!
//! The base must be dense and held in f32: the quantizer codes `W₀ + ΔW`, and the export
//! recomputes the codes from the checkpoint's `W₀`, so a base held quantized (NF4, FP4, int8,
//! GGUF), in bf16 (`--compute-dtype bf16`) or sharded is refused by name (a memory-mapped
//! dense checkpoint, as `merge` and `export gguf` read it, is read into f32 per layer): quantizing a 4-bit base again would be a second rounding the result
//! does not record.
//!
//! Merge ([`crate::tuners::Update::Quantized`]): a Hugging Face folder gets `Ŵ = w̄·s + b` in
//! f32 (what the model computes); `ferrule export gguf` and `ferrule merge --output X.gguf`
//! write the codes, steps and offsets as GGUF Q4_1 blocks (4 bits, groups of 32 only).

pub mod config;
pub mod layer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor, Var};
use serde_json::{Map, Value};

pub use config::L4qConfig;
use layer::{factors_of, L4qLinear, L4qMerge};

use super::config::{default_list, AdapterConfig};
use super::core::{AnyTunerCore, LinearRoute, TunerCore};
use super::modules_to_save::ModulesToSave;
use super::registry::{BlockShapes, BuildContext, Method};
use super::target::{ModuleSpec, Targets};
use super::{peft_key, AdaptedModule, LossProbe, Tuner, Update};
use crate::init;
use crate::model::stream::Held;
use crate::model::{Linear, LinearInfo, ModelHook};
use crate::ops::lsq_linear::{updated_weight, LsqLinearSpec};
use crate::ops::{ComputeDtype, FrozenLinear, FrozenWeight};
use crate::quant::lsq::GroupQuantizer;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "l4q",
    peft_type: "L4Q",
    summary: "L4Q: LoRA inside a learned-step-size group quantizer; the result is a quantized model, written as GGUF Q4_1 (Jeon et al. 2024; no reference code)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: Some(count_from_shapes),
    trains_whole_model: false,
    f32_weights: Some("L4Q quantizes W0 + (alpha/r)·B A from the f32 W0"),
};

/// Key suffixes of one adapted module's tensors, in [`factors_of`]'s order.
const SUFFIXES: [&str; 4] = ["lora_A.weight", "lora_B.weight", "l4q_step", "l4q_offset"];

/// LoRA's default targets (peft's mapping): the paper names none for these models.
/// LoRA's default targets, and `codes` spelled out, so that every config a run builds from
/// (fresh or resumed) and every folder it saves names its code range.
fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    options
        .entry("codes")
        .or_insert_with(|| serde_json::json!("signed"));
    default_list(
        options,
        "target_modules",
        model_type,
        super::lora::default_targets,
    )
}

/// A saved folder without `codes` was written before the key existed, when every code was
/// unsigned: it is read so, with a warning, rather than misread as signed.
fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let mut config = config.clone();
    if ctx.weights.is_some() && !config.options.contains_key("codes") {
        tracing::warn!("l4q: the adapter names no \"codes\" range: it was saved before ferrule's L4Q followed the paper's signed codes, so it is read as \"unsigned\", as it was trained");
        config
            .options
            .insert("codes".into(), serde_json::json!("unsigned"));
    }
    let cfg: L4qConfig = config.typed("l4q")?;
    Ok(Box::new(L4q::new(cfg, ctx)?))
}

/// Trainable elements of one `[out, in]` layer: `r(in + out)` for A and B, and a step and an
/// offset per group. An error naming the layer when the group size does not divide `in`.
fn layer_params(c: &L4qConfig, path: &str, out_f: usize, in_f: usize) -> Result<usize> {
    if !in_f.is_multiple_of(c.group_size) {
        bail!("l4q: group_size={} (--l4q-group-size) does not divide the {in_f} input features of {path} ([{out_f}, {in_f}]); choose a group size that divides every targeted layer's in_features, or leave {path} out of target_modules", c.group_size)
    }
    Ok(c.r * (in_f + out_f) + 2 * out_f * (in_f / c.group_size))
}

/// `ferrule plan` without weights. A config with `exclude_modules`, a layer selection,
/// `modules_to_save` or a regex is not counted this way.
fn count_from_shapes(options: &Map<String, Value>, blocks: &BlockShapes) -> Result<Option<usize>> {
    let cfg: L4qConfig = AdapterConfig::new(METHOD.peft_type, options.clone()).typed("l4q")?;
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
    let count = blocks.sum_over_targets(&targets, |l| {
        layer_params(&cfg, l.name, l.out_features, l.in_features)
    })?;
    Ok(Some(count))
}

/// Errors unless `base`'s weight is dense and held in f32 (module doc: why).
fn check_dense_f32(path: &str, base: &FrozenLinear) -> Result<()> {
    let why = match base.weight() {
        FrozenWeight::Dense(t) if t.dtype() == DType::F32 => return Ok(()),
        // A memory-mapped dense checkpoint (`--stream-base`, and how `merge` and `export gguf`
        // read the base): read whole into f32 for the layer, its values exact.
        FrozenWeight::Streamed(s, ComputeDtype::F32) if matches!(s.held(), Held::Dense { .. }) => {
            return Ok(())
        }
        FrozenWeight::Dense(t) => format!("is held in {:?} (--compute-dtype)", t.dtype()),
        FrozenWeight::Quantized(q, _) => format!("is held quantized ({})", q.format()),
        FrozenWeight::Streamed(_, ComputeDtype::Bf16) => "is held in bf16 (--compute-dtype)".into(),
        FrozenWeight::Streamed(..) => "is a quantized matrix read from disk".into(),
        FrozenWeight::Sharded(..) => "is sharded across ranks (--shard-base)".into(),
    };
    bail!("l4q: {path}.weight {why}; L4Q quantizes W0 + (alpha/r)·B A itself and writes the codes from the checkpoint's f32 W0, so it needs the dense weight in f32: load an f32, f16 or bf16 checkpoint (not NF4 or GGUF) with --compute-dtype f32, without --quantize or --shard-base")
}

/// The layers an [`L4qConfig`] targets, each trained inside its quantizer.
pub struct L4q {
    core: TunerCore<L4qConfig, LsqLinearSpec>,
    /// Off during the LoRA warm-up; shared with every layer ([`L4qLinear`]).
    quantizing: Arc<AtomicBool>,
}

impl L4q {
    pub fn new(config: L4qConfig, ctx: BuildContext) -> Result<Self> {
        config.validate()?;
        let targets = Targets::required(
            "l4q",
            config.target_modules.as_ref(),
            config.exclude_modules.as_ref(),
            config.layers_to_transform.as_ref(),
            config.layers_pattern.as_ref(),
        )?;
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        // A saved adapter is the quantized model; a resumed run sets the phase in before_step.
        let quantizing = config.warmup_steps == 0 || ctx.weights.is_some();
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx).with_targets(targets),
            quantizing: Arc::new(AtomicBool::new(quantizing)),
        })
    }

    /// The four trained tensors of the adapted module `path`, in [`SUFFIXES`]' order.
    fn layer_vars(&self, path: &str) -> Result<[Var; 4]> {
        let vars: Vec<Var> = SUFFIXES
            .iter()
            .map(|s| {
                self.core
                    .params
                    .get(&peft_key(path, s))
                    .ok_or_else(|| anyhow!("l4q: {path} has no {s}"))
            })
            .collect::<Result<_>>()?;
        Ok(vars.try_into().expect("four suffixes"))
    }

    /// The end of the warm-up (v1, Algorithm 1: "if t = T_wp + 1 then Initialize s_w, b_w"):
    /// each layer's steps and offsets from the min/max of its `W₀ + (α/r)·B A` as trained so
    /// far.
    fn init_steps_from_update(&self) -> Result<()> {
        let q = self.quantizer();
        for adapted in self.core.adapted().iter() {
            let vars = self.layer_vars(&adapted.module.path)?;
            let w = updated_weight(&adapted.layer, &factors_of(&vars))?;
            let (s, o) = q.init_from_min_max(&w, adapted.layer.dims()?.1);
            let dev = vars[2].device().clone();
            vars[2].set(&Tensor::from_vec(s, vars[2].dims(), &dev)?)?;
            vars[3].set(&Tensor::from_vec(o, vars[3].dims(), &dev)?)?;
        }
        Ok(())
    }

    fn quantizer(&self) -> GroupQuantizer {
        let c = &self.core.config;
        GroupQuantizer {
            bits: c.bits,
            group_size: c.group_size,
            grad_scale: c.lsq_grad_scale,
            signed: c.codes == config::CodeRange::Signed,
        }
    }

    /// The layer's `A, B, steps, offsets`: saved ones when loading, else LoRA's init and the
    /// min/max steps and offsets of `w`.
    fn vars(&self, path: &str, w: &Tensor) -> Result<[Var; 4]> {
        let (out_f, in_f) = w.dims2()?;
        let (r, q) = (self.core.config.r, self.quantizer());
        let params = &self.core.params;
        let dev = params.device().clone();
        let key = |i: usize| peft_key(path, SUFFIXES[i]);
        let seed = self.core.init_seed(&key(0));
        // PEFT's LoRA init: A kaiming_uniform_(a=sqrt(5)), B zero.
        let a = params.take_or_init(&key(0), &[r, in_f], || {
            init::kaiming_uniform(&[r, in_f], 5f64.sqrt(), seed, &dev)
        })?;
        let b = params.take_or_init(&key(1), &[out_f, r], || {
            Ok(Tensor::zeros((out_f, r), DType::F32, &dev)?)
        })?;
        let groups = (out_f, q.groups(in_f));
        let init = || -> Result<(Tensor, Tensor)> {
            let (s, o) = q.init_from_min_max(&w.flatten_all()?.to_vec1()?, in_f);
            Ok((
                Tensor::from_vec(s, groups, &dev)?,
                Tensor::from_vec(o, groups, &dev)?,
            ))
        };
        let shape = [groups.0, groups.1];
        let mut fresh = None;
        let mut first = || -> Result<(Tensor, Tensor)> {
            if fresh.is_none() {
                fresh = Some(init()?);
            }
            Ok(fresh.clone().expect("set above"))
        };
        let s = params.take_or_init(&key(2), &shape, || Ok(first()?.0))?;
        let o = params.take_or_init(&key(3), &shape, || Ok(first()?.1))?;
        Ok([a, b, s, o])
    }
}

impl ModelHook for L4q {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let base = match self.core.route_linear(info, base)? {
            LinearRoute::Targeted(base) => base,
            other => return Ok(other.unadapted()),
        };
        let path = info.path.as_str();
        check_dense_f32(path, &base)?;
        let c = &self.core.config;
        let (out_f, in_f) = (base.out_features(), base.in_features());
        let params = layer_params(c, path, out_f, in_f)?;
        let weight = base.weight().to_dense(self.core.params.device())?;
        let vars = self.vars(path, &weight)?;
        let base_layer = base.clone();
        let spec = LsqLinearSpec {
            weight,
            bias: base.bias().cloned(),
            scale: c.lora_alpha / c.r as f64,
            quantizer: self.quantizer(),
            name: path.to_string(),
        };
        let module = AdaptedModule {
            path: path.to_string(),
            params,
            detail: format!(
                "r={} alpha={} bits={} group_size={}",
                c.r, c.lora_alpha, c.bits, c.group_size
            ),
        };
        self.core.record(module, spec.clone());
        Ok(Box::new(L4qLinear {
            spec,
            vars,
            base: base_layer,
            quantizing: self.quantizing.clone(),
        }))
    }
}

impl Tuner for L4q {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    /// The warm-up's phase for step `step` (0-based): LoRA alone before `warmup_steps`, the
    /// steps and offsets set from the trained update at `warmup_steps` (also when a run
    /// resumes there: the checkpoint's were never trained), quantized after.
    fn before_step(&self, step: u64, _probe: &mut dyn LossProbe) -> Result<()> {
        let warmup = self.core.config.warmup_steps;
        if warmup == 0 {
            return Ok(());
        }
        if step == warmup {
            self.init_steps_from_update()?;
        }
        self.quantizing.store(step >= warmup, Ordering::Relaxed);
        Ok(())
    }

    /// `W' = Q(W + (α/r)·B A)` per adapted layer, as learned codes
    /// ([`Update::Quantized`]).
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        let mut out = Vec::new();
        for adapted in self.core.adapted().iter() {
            let path = &adapted.module.path;
            let vars = self.layer_vars(path)?;
            let merge = L4qMerge {
                spec: adapted.layer.clone(),
                factors: factors_of(&vars),
            };
            out.push((format!("{path}.weight"), Update::Quantized(Arc::new(merge))));
        }
        Ok(out)
    }
}
