//! Bottleneck adapters as LLM-Adapters' peft fork defines them (Hu et al. 2023,
//! "LLM-Adapters"; AGI-Edgerunners/LLM-Adapters `peft/src/peft/tuners/bottleneck.py`): on each
//! targeted linear layer a small two-layer network `h(z) = s·U act(D z)` before the layer
//! (`mh_adapter`), after it (`output_adapter`) or beside it (`parallel_adapter`); see [`layer`].
//!
//! Which placement a target gets: `parallel_adapter` for every target with
//! `use_parallel_adapter`, else the fork's map by module name (bottleneck.py
//! `TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING["llama"]`: `gate_proj`, `up_proj` →
//! `mh_adapter`, `down_proj` → `output_adapter`); another target without
//! `use_parallel_adapter` is an error naming it (the fork fails there with a `KeyError`).
//! Default targets are the fork's `mapping.py` lists for llama: AdapterH `gate_proj`,
//! `up_proj`, `down_proj`; AdapterP (`use_adapterp`) `down_proj`; parallel `q_proj`, `v_proj`,
//! `k_proj`. The fork keys both maps by model type and has llama's only among ferrule's
//! families; ferrule gives Mistral and Qwen2, whose modules have llama's names, the same.
//! BERT has no default and no type map: it takes `use_parallel_adapter` with its targets.
//!
//! Keys are the fork's (`get_peft_model_state_dict`, every state-dict key holding
//! `adapter_`): `base_model.model.<path>.adapter_down.weight` `[bn, d_in]`,
//! `.adapter_up.weight` `[d_out, bn]`, and `.adapter_scaling` `[1]` with `scaling =
//! "learned"`. The fork saves them in a pickle (`adapter_model.bin`), which ferrule refuses
//! as it refuses every pickle; converted to `adapter_model.safetensors` with the same keys,
//! ferrule reads them.
//!
//! ferrule's own placement `placement = "residual_branch"` puts the adapters on the residual
//! branches named by the targets instead (series, or parallel with `use_parallel_adapter`;
//! keys `base_model.model.<branch path>.adapter_*`): defaults Houlsby's both branches
//! (`self_attn`, `mlp`; BERT `attention`, `output`), with `use_adapterp` Pfeiffer's MLP branch
//! only. The fork has no such placement.
//!
//! `bias` is the fork's: `"all"` trains every bias of the model (linears and norms),
//! `"adapter_only"` the targeted linears' own, saved as `<path>.bias` beside the adapter's
//! keys ([`TrainedBiases::with_adapted_key`]).
//!
//! Differences from the fork: list targets match as exact names or dotted suffixes (peft's
//! rule; the fork's `key.endswith(entry)` also lets `proj` match `q_proj`). No merge: the
//! activation makes the change depend on the input, so it is no weight update.

pub mod config;
pub mod layer;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde_json::{Map, Value};

pub use config::BottleneckConfig;
use config::{Activation, InitWeights, Placement};
use layer::{AdapterType, Bottleneck, BottleneckLinear, BranchAdapter, Scale};

use super::bias::{BiasMode, BiasTrainedLinear, TrainedBiases};
use super::config::AdapterConfig;
use super::core::{AnyTunerCore, LinearRoute, TunerCore};
use super::modules_to_save::{ModulesToSave, Wrapped};
use super::registry::{BlockShapes, BuildContext, Method};
use super::target::{MatchReport, Targets};
use super::{peft_key, AdaptedModule, Tuner, Update};
use crate::model::{
    BranchInfo, BranchKind, Linear, LinearInfo, ModelHook, NormInfo, NormParams, ResidualBranch,
};
use crate::ops::FrozenLinear;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "bottleneck",
    peft_type: "BOTTLENECK",
    summary: "Bottleneck adapters: h = s·U act(D z) before, after or beside each targeted linear (LLM-Adapters' AdapterH, AdapterP, parallel)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: Some(count_from_shapes),
    trains_whole_model: false,
    f32_weights: None,
};

/// LLM-Adapters' `mapping.py` defaults for llama (`TRANSFORMERS_MODELS_TO_PARALLEL_`,
/// `_ADAPTERP_`, `_BOTTLENECK_TARGET_MODULES_MAPPING`), checked in that order as
/// `_prepare_bottleneck_config` does; also for Mistral and Qwen2.
pub fn default_targets(
    model_type: &str,
    parallel: bool,
    adapterp: bool,
) -> Option<&'static [&'static str]> {
    if !matches!(model_type, "llama" | "mistral" | "qwen2") {
        return None;
    }
    Some(match (parallel, adapterp) {
        (true, _) => &["q_proj", "v_proj", "k_proj"],
        (false, true) => &["down_proj"],
        (false, false) => &["gate_proj", "up_proj", "down_proj"],
    })
}

/// The residual branches adapted by default: Houlsby's both, or Pfeiffer's MLP branch alone
/// (`adapterp`), named as [`BranchInfo::path`] ends.
pub fn default_branches(model_type: &str, adapterp: bool) -> Option<&'static [&'static str]> {
    Some(match (model_type, adapterp) {
        ("llama" | "mistral" | "qwen2", false) => &["self_attn", "mlp"],
        ("llama" | "mistral" | "qwen2", true) => &["mlp"],
        ("bert", false) => &["attention", "output"],
        ("bert", true) => &["output"],
        _ => return None,
    })
}

fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    if options.get("target_modules").is_some_and(|v| !v.is_null()) {
        return Ok(());
    }
    let flag = |k: &str| options.get(k).and_then(Value::as_bool).unwrap_or(false);
    let (parallel, adapterp) = (flag("use_parallel_adapter"), flag("use_adapterp"));
    let on_branches = options.get("placement").and_then(Value::as_str) == Some("residual_branch");
    let defaults = match on_branches {
        true => default_branches(model_type, adapterp),
        false => default_targets(model_type, parallel, adapterp),
    };
    match defaults {
        Some(d) => {
            options.insert("target_modules".into(), Value::from(d.to_vec()));
            Ok(())
        }
        None => bail!("bottleneck: no default target_modules for model type {model_type:?} (LLM-Adapters has llama's); set target_modules, and use_parallel_adapter unless the targets are gate_proj, up_proj or down_proj"),
    }
}

/// The placement of the adapter on the module at `path`: parallel for every target with
/// `use_parallel_adapter`, else LLM-Adapters' map by module name.
pub fn adapter_type(path: &str, parallel: bool) -> Result<AdapterType> {
    if parallel {
        return Ok(AdapterType::Parallel);
    }
    let name = path.rsplit('.').next().unwrap_or(path);
    Ok(match name {
        "gate_proj" | "up_proj" => AdapterType::Mh,
        "down_proj" => AdapterType::Output,
        _ => bail!("bottleneck: {path} is targeted, but LLM-Adapters' adapter-type map (bottleneck.py, llama) places adapters on gate_proj, up_proj (mh_adapter) and down_proj (output_adapter) only; set use_parallel_adapter (--use-parallel-adapter) for a parallel adapter on {name}"),
    })
}

/// `ferrule plan` without weights: `bn (d_in + d_out)` per targeted linear of every block, plus
/// 1 with a learned scale.
fn count_from_shapes(options: &Map<String, Value>, blocks: &BlockShapes) -> Result<Option<usize>> {
    let cfg: BottleneckConfig =
        AdapterConfig::new(METHOD.peft_type, options.clone()).typed("bottleneck")?;
    cfg.validate()?;
    let targets: Vec<String> = match &cfg.target_modules {
        Some(super::target::ModuleSpec::Names(n)) if cfg.placement == Placement::Linear => {
            n.clone()
        }
        _ => return Ok(None),
    };
    // Every bias of the model (`"all"`) is not in a config's shapes alone.
    let bias_mode = cfg.bias_mode()?;
    if bias_mode == BiasMode::All {
        return Ok(None);
    }
    let learned = usize::from(cfg.constant_scaling().is_none());
    let mut per_block = 0;
    for target in &targets {
        let matched: Vec<_> = blocks
            .linears
            .iter()
            .filter(|l| l.name == target || l.name.ends_with(&format!(".{target}")))
            .collect();
        if matched.is_empty() {
            bail!("bottleneck: target_modules entry {target:?} names no linear layer of this {} model", blocks.family)
        }
        for l in matched {
            let kind = adapter_type(l.name, cfg.use_parallel_adapter)?;
            let (d_in, d_out) = kind.dims(l.in_features, l.out_features);
            let own_bias = usize::from(bias_mode == BiasMode::AdaptedOnly && l.bias);
            per_block += cfg.bottleneck_size * (d_in + d_out) + learned + own_bias * l.out_features;
        }
    }
    Ok(Some(blocks.layers * per_block))
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: BottleneckConfig = config.typed("bottleneck")?;
    Ok(Box::new(BottleneckTuner::new(cfg, ctx)?))
}

/// Builds bottleneck adapters on the modules a [`BottleneckConfig`] targets.
pub struct BottleneckTuner {
    core: TunerCore<BottleneckConfig>,
    activation: Activation,
    biases: TrainedBiases,
}

impl BottleneckTuner {
    pub fn new(config: BottleneckConfig, ctx: BuildContext) -> Result<Self> {
        let activation = config.validate()?;
        let biases = TrainedBiases::with_adapted_key(config.bias_mode()?, "bias");
        let target = config
            .target_modules
            .as_ref()
            .ok_or_else(|| anyhow!("bottleneck: target_modules is required"))?;
        let targets = Targets::new("target_modules", target, config.exclude_modules.as_ref())
            .context("bottleneck")?;
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx).with_targets(targets),
            activation,
            biases,
        })
    }

    /// `adapter_down: [bn, d_in]` and `adapter_up: [d_out, bn]` of the module at `path`, saved
    /// or fresh (bottleneck.py `reset_parameters`).
    fn projections(&self, path: &str, d_in: usize, d_out: usize) -> Result<(Var, Var)> {
        let bn = self.core.config.bottleneck_size;
        let params = &self.core.params;
        let dev = params.device().clone();
        let init = self.core.config.init_weights;
        let (down_key, up_key) = (
            peft_key(path, "adapter_down.weight"),
            peft_key(path, "adapter_up.weight"),
        );
        let down_seed = self.core.init_seed(&down_key);
        let down = params.take_or_init(&down_key, &[bn, d_in], || match init {
            InitWeights::Bert => crate::init::normal(&[bn, d_in], 0.02, down_seed, &dev),
            InitWeights::MamAdapter => {
                crate::init::kaiming_uniform(&[bn, d_in], 5f64.sqrt(), down_seed, &dev)
            }
        })?;
        let up_seed = self.core.init_seed(&up_key);
        let up = params.take_or_init(&up_key, &[d_out, bn], || match init {
            InitWeights::Bert => crate::init::normal(&[d_out, bn], 0.02, up_seed, &dev),
            InitWeights::MamAdapter => Ok(Tensor::zeros((d_out, bn), DType::F32, &dev)?),
        })?;
        Ok((down, up))
    }

    /// The constant scale, or the module's `adapter_scaling: [1]` (fresh: 1).
    fn scale(&self, path: &str) -> Result<Scale> {
        if let Some(s) = self.core.config.constant_scaling() {
            return Ok(Scale::Constant(s));
        }
        let dev = self.core.params.device().clone();
        let key = peft_key(path, "adapter_scaling");
        let s = self
            .core
            .params
            .take_or_init(&key, &[1], || Ok(Tensor::ones(1, DType::F32, &dev)?))?;
        Ok(Scale::Learned(s))
    }
}

impl ModelHook for BottleneckTuner {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let params = &self.core.params;
        let base = match self.core.config.placement {
            // The targets name branches: a linear is trained in full or not adapted here.
            Placement::ResidualBranch => match self.core.saved.wrap(info, base, params)? {
                Wrapped::TrainedInFull(full) => return Ok(full),
                Wrapped::NotListed(base) => LinearRoute::Untargeted(base),
            },
            Placement::Linear => self.core.route_linear(info, base)?,
        };
        let path = info.path.as_str();
        let base = match base {
            LinearRoute::Targeted(base) => base,
            LinearRoute::Untargeted(base) => {
                return Ok(match self.biases.linear(path, false, base, params)? {
                    (base, Some(bias)) => Box::new(BiasTrainedLinear { base, bias }),
                    (base, None) => Box::new(base),
                })
            }
            other => return Ok(other.unadapted()),
        };
        let (base, bias) = self.biases.linear(path, true, base, params)?;
        let cfg = &self.core.config;
        let kind = adapter_type(path, cfg.use_parallel_adapter)?;
        let (d_in, d_out) = kind.dims(base.in_features(), base.out_features());
        let (down, up) = self.projections(path, d_in, d_out)?;
        let scale = self.scale(path)?;
        let learned = usize::from(matches!(scale, Scale::Learned(_)));
        let module = AdaptedModule {
            path: path.to_string(),
            params: cfg.bottleneck_size * (d_in + d_out) + learned,
            detail: format!(
                "{} bn={} {}",
                kind.name(),
                cfg.bottleneck_size,
                cfg.non_linearity
            ),
        };
        self.core.record(module, ());
        let adapter = Bottleneck {
            path: path.to_string(),
            down,
            up,
            scale,
            activation: self.activation,
            dropout: cfg.adapter_dropout,
            clock: self.core.clock.clone(),
        };
        Ok(Box::new(BottleneckLinear {
            base,
            bias,
            adapter,
            kind,
        }))
    }

    /// Norm biases train under `bias = "all"`.
    fn norm(&self, info: &NormInfo, params: NormParams) -> Result<NormParams> {
        self.biases.norm(&info.path, params, &self.core.params)
    }

    fn residual_branch(&self, info: &BranchInfo) -> Result<Option<Box<dyn ResidualBranch>>> {
        let cfg = &self.core.config;
        // As a non-linear module, so that `all-linear` never selects a branch.
        if cfg.placement != Placement::ResidualBranch || !self.core.adapts(&info.path, true) {
            return Ok(None);
        }
        let (path, hidden) = (info.path.as_str(), info.hidden_size);
        let (down, up) = self.projections(path, hidden, hidden)?;
        let scale = self.scale(path)?;
        let learned = usize::from(matches!(scale, Scale::Learned(_)));
        let (parallel, branch) = (
            cfg.use_parallel_adapter,
            match info.kind {
                BranchKind::Attention => "attention",
                BranchKind::Mlp => "mlp",
            },
        );
        let module = AdaptedModule {
            path: path.to_string(),
            params: cfg.bottleneck_size * 2 * hidden + learned,
            detail: format!(
                "{} {branch} branch bn={} {}",
                if parallel { "parallel" } else { "series" },
                cfg.bottleneck_size,
                cfg.non_linearity
            ),
        };
        self.core.record(module, ());
        let adapter = Bottleneck {
            path: path.to_string(),
            down,
            up,
            scale,
            activation: self.activation,
            dropout: cfg.adapter_dropout,
            clock: self.core.clock.clone(),
        };
        Ok(Some(Box::new(BranchAdapter { adapter, parallel })))
    }
}

impl Tuner for BottleneckTuner {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        let what = match self.core.config.placement {
            Placement::Linear => "target_modules matched no linear layer of the model",
            Placement::ResidualBranch => "target_modules matched no residual branch of the model (their paths end in self_attn or mlp; BERT's in attention or output)",
        };
        let report = self.core.check_finished(what)?;
        if self.biases.mode() != BiasMode::None && self.biases.count(&self.core.params) == 0 {
            tracing::warn!(
                "bottleneck: bias = {:?}, but the {} have no bias: no bias trains",
                self.core.config.bias,
                match self.biases.mode() {
                    BiasMode::AdaptedOnly => "targeted linear layers",
                    _ => "model's layers",
                }
            );
        }
        Ok(report)
    }

    /// Trained biases are copies that replace the base's: the model's total counts them once.
    fn trained_in_place(&self) -> usize {
        self.biases.count(&self.core.params)
    }

    fn replaced(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.core.saved_replaced();
        out.extend(self.biases.replaced(&self.core.params));
        Ok(out)
    }

    /// None: `L(x + h(x))`, `L(x) + h(L(x))` and `L(x) + h(x)` are not `W' x` for any `W'`.
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        bail!("BOTTLENECK adapters apply a nonlinearity (non_linearity {:?}) to the input, so their change is no weight update and cannot be merged into the base (LLM-Adapters cannot merge them either); use the adapter with eval, generate or logits", self.core.config.non_linearity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuners::registry::BlockLinear;

    #[test]
    fn placements_follow_the_module_name_unless_parallel() {
        let p = "model.layers.0.mlp";
        assert_eq!(
            adapter_type(&format!("{p}.gate_proj"), false).unwrap(),
            AdapterType::Mh
        );
        assert_eq!(
            adapter_type(&format!("{p}.down_proj"), false).unwrap(),
            AdapterType::Output
        );
        let e = adapter_type("model.layers.0.self_attn.q_proj", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.layers.0.self_attn.q_proj is targeted")
                && e.contains("--use-parallel-adapter"),
            "{e}"
        );
        assert_eq!(
            adapter_type("model.layers.0.self_attn.q_proj", true).unwrap(),
            AdapterType::Parallel
        );
    }

    #[test]
    fn defaults_follow_the_switches_and_bert_has_none() {
        let mut o = Map::new();
        complete(&mut o, "llama").unwrap();
        assert_eq!(
            o["target_modules"],
            serde_json::json!(["gate_proj", "up_proj", "down_proj"])
        );
        let mut o = Map::new();
        o.insert("use_adapterp".into(), Value::Bool(true));
        complete(&mut o, "qwen2").unwrap();
        assert_eq!(o["target_modules"], serde_json::json!(["down_proj"]));
        o.insert("use_parallel_adapter".into(), Value::Bool(true));
        o.remove("target_modules");
        complete(&mut o, "mistral").unwrap();
        assert_eq!(
            o["target_modules"],
            serde_json::json!(["q_proj", "v_proj", "k_proj"])
        );
        let e = complete(&mut Map::new(), "bert").unwrap_err().to_string();
        assert!(
            e.contains("no default target_modules for model type \"bert\""),
            "{e}"
        );
    }

    /// h = 8, i = 16: AdapterH with bn = 4 on gate/up (mh: 4·(8 + 8)) and down (output: 4·(8 + 8)),
    /// learned scale: 3·(64 + 1) per block; parallel on q (8 → 8): 4·16.
    #[test]
    fn shapes_count_as_the_layers_do() {
        let lin = |name, in_features, out_features| BlockLinear {
            name,
            in_features,
            out_features,
            bias: false,
        };
        let linears = [
            lin("q_proj", 8, 8),
            lin("gate_proj", 8, 16),
            lin("up_proj", 8, 16),
            lin("down_proj", 16, 8),
        ];
        let blocks = BlockShapes {
            family: "decoder",
            layers: 2,
            linears: &linears,
            outside: &[],
            norm_params: 0,
        };
        let mut o = Map::new();
        o.insert("bottleneck_size".into(), 4.into());
        o.insert("scaling".into(), "learned".into());
        complete(&mut o, "llama").unwrap();
        assert_eq!(count_from_shapes(&o, &blocks).unwrap(), Some(2 * 3 * 65));
        let mut o = Map::new();
        o.insert("bottleneck_size".into(), 4.into());
        o.insert("use_parallel_adapter".into(), true.into());
        o.insert("target_modules".into(), serde_json::json!(["q_proj"]));
        assert_eq!(count_from_shapes(&o, &blocks).unwrap(), Some(2 * 64));
    }
}
