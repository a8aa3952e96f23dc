//! DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models
//! using Dynamic Search-Free Low-Rank Adaptation"; reference huawei-noah/Efficient-NLP
//! `DyLoRA/loralib`): LoRA factors of rank `r` trained so that every leading slice of rank
//! `b ≤ r` is a usable adapter, by running each optimizer step at a random `b` ([`layer`]).
//!
//! Saved as LoRA's tensors (`base_model.model.<path>.lora_A.weight` `[r, in]`,
//! `lora_B.weight` `[out, r]`) under ferrule's own `peft_type` `DYLORA` (the reference writes
//! loralib state dicts, not a peft folder). At a chosen rank `b` ([`Tuner::set_rank`]) it
//! evaluates, merges (`W += (α/b) B[:, :b] A[:b]`) and converts to a plain PEFT LoRA with
//! `r = b`, `lora_alpha = α` and the truncated tensors ([`Tuner::plain_lora`]), which is the
//! same update since peft scales by `lora_alpha / r`.

pub mod config;
pub mod layer;

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor, Var};
use serde_json::{Map, Value};

pub use config::DyloraConfig;
use layer::{truncated, DyloraLinear, RankChoice};

use super::config::AdapterConfig;
use super::core::{AnyTunerCore, LinearRoute, TunerCore};
use super::lora::LoraConfig;
use super::modules_to_save::ModulesToSave;
use super::registry::{BlockShapes, BuildContext, Method};
use super::target::{ModuleSpec, Targets};
use super::{peft_key, AdaptedModule, Delta, PlainLora, Tuner, Update};
use crate::init;
use crate::model::{Linear, LinearInfo, ModelHook};
use crate::ops::FrozenLinear;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "dylora",
    peft_type: "DYLORA",
    summary: "DyLoRA: LoRA trained at a random rank b ≤ r each step, so every rank runs alone (Valipour et al. 2023)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: Some(count_from_shapes),
    trains_whole_model: false,
    f32_weights: None,
};

/// LoRA's default targets (the reference adapts RoBERTa's query and value, as peft's LoRA
/// default does for BERT).
fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    super::config::default_list(
        options,
        "target_modules",
        model_type,
        super::lora::default_targets,
    )
}

/// `r (in + out)` per targeted linear of every block, as LoRA's count.
fn count_from_shapes(options: &Map<String, Value>, blocks: &BlockShapes) -> Result<Option<usize>> {
    let r = options.get("r").and_then(Value::as_u64).unwrap_or(8) as usize;
    let targets: Vec<String> = match options.get("target_modules") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(v)) => v
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => bail!("no target_modules for this model type; pass --target-modules"),
    };
    Ok(Some(super::lora::params_of_blocks(blocks, &targets, r)?))
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: DyloraConfig = config.typed("dylora")?;
    cfg.validate()?;
    Ok(Box::new(Dylora::new(cfg, ctx)?))
}

/// Builds DyLoRA layers on the modules a [`DyloraConfig`] targets.
pub struct Dylora {
    core: TunerCore<DyloraConfig>,
    /// The rank all layers run at ([`RankChoice`]).
    rank: Arc<RankChoice>,
}

impl Dylora {
    pub fn new(config: DyloraConfig, ctx: BuildContext) -> Result<Self> {
        let targets = Targets::required(
            "dylora",
            config.target_modules.as_ref(),
            config.exclude_modules.as_ref(),
            config.layers_to_transform.as_ref(),
            config.layers_pattern.as_ref(),
        )?;
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        let rank = Arc::new(RankChoice::new(config.r));
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx).with_targets(targets),
            rank,
        })
    }

    /// `A: [r, in]` Kaiming-uniform (a = √5) and `B: [out, r]` zero (layers.py:143-148, as
    /// LoRA's default), or the saved ones.
    fn factors(&self, path: &str, in_f: usize, out_f: usize) -> Result<(Var, Var)> {
        let r = self.core.config.r;
        let (key_a, key_b) = (
            peft_key(path, "lora_A.weight"),
            peft_key(path, "lora_B.weight"),
        );
        let params = &self.core.params;
        let dev = params.device().clone();
        let seed_a = self.core.init_seed(&key_a);
        let a = params.take_or_init(&key_a, &[r, in_f], || {
            init::kaiming_uniform(&[r, in_f], 5f64.sqrt(), seed_a, &dev)
        })?;
        let b = params.take_or_init(&key_b, &[out_f, r], || {
            Ok(Tensor::zeros((out_f, r), DType::F32, &dev)?)
        })?;
        Ok((a, b))
    }

    /// `(A[:b], B[:, :b])` of the adapted module at `path` at the chosen rank `b`.
    fn truncated_factors(&self, path: &str) -> Result<(Tensor, Tensor)> {
        let get = |suffix: &str| {
            self.core
                .params
                .get(&peft_key(path, suffix))
                .ok_or_else(|| anyhow!("dylora: {path} has no {suffix}"))
        };
        let (a, b) = (get("lora_A.weight")?, get("lora_B.weight")?);
        Ok(truncated(
            a.as_tensor(),
            b.as_tensor(),
            self.rank.chosen(),
            false,
        )?)
    }

    /// The LoRA config of the plain-LoRA form at rank `b`: `r = b`, `lora_alpha = α`, the same
    /// targets (`all-linear` written out as the modules it matched, as peft's LoRA saves it).
    fn lora_config(&self, rank: usize) -> LoraConfig {
        let c = &self.core.config;
        let target_modules = match &c.target_modules {
            Some(t) if t.is_all_linear() => {
                let mut names: Vec<String> =
                    self.adapted().iter().map(|m| m.path.clone()).collect();
                names.sort();
                names.dedup();
                Some(ModuleSpec::Names(names))
            }
            t => t.clone(),
        };
        LoraConfig {
            r: rank,
            lora_alpha: c.lora_alpha,
            lora_dropout: c.lora_dropout,
            target_modules,
            exclude_modules: c.exclude_modules.clone(),
            modules_to_save: c.modules_to_save.clone(),
            layers_to_transform: c.layers_to_transform.clone(),
            layers_pattern: c.layers_pattern.clone(),
            ..LoraConfig::default()
        }
    }
}

impl ModelHook for Dylora {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let base = match self.core.route_linear(info, base)? {
            LinearRoute::Targeted(base) => base,
            other => return Ok(other.unadapted()),
        };
        let path = info.path.clone();
        let (out_f, in_f) = (base.out_features(), base.in_features());
        let (a, b) = self.factors(&path, in_f, out_f)?;
        let c = &self.core.config;
        let module = AdaptedModule {
            path: path.clone(),
            params: c.r * (in_f + out_f),
            detail: format!(
                "r={} alpha={} ranks 1..{} ({})",
                c.r,
                c.lora_alpha,
                c.r,
                if c.frozen { "frozen" } else { "unfrozen" }
            ),
        };
        self.core.record(module, ());
        Ok(Box::new(DyloraLinear {
            path,
            base,
            a,
            b,
            alpha: c.lora_alpha,
            frozen: c.frozen,
            dropout: c.lora_dropout,
            clock: self.core.clock.clone(),
            rank: self.rank.clone(),
        }))
    }
}

impl Tuner for Dylora {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    /// `ΔW = (α/b) · B[:, :b] A[:b]` at the chosen rank `b`: the reference's `eval()` merge
    /// (layers.py:163-172) at `set_rank(b − 1)`.
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        let rank = self.rank.chosen();
        let scale = self.core.config.lora_alpha / rank as f64;
        let mut out = Vec::new();
        for adapted in self.core.adapted().iter() {
            let path = &adapted.module.path;
            let (a, b) = self.truncated_factors(path)?;
            let delta = Delta::LowRank {
                b,
                a,
                scale,
                transposed: false,
            };
            out.push((format!("{path}.weight"), Update::Add(delta)));
        }
        Ok(out)
    }

    fn max_rank(&self) -> Option<usize> {
        Some(self.rank.max)
    }

    fn set_rank(&self, rank: usize) -> Result<()> {
        let r = self.rank.max;
        if rank == 0 || rank > r {
            bail!("--rank {rank}: this DyLoRA adapter was trained with r = {r}, so its ranks are 1..={r}")
        }
        self.rank.choose(rank);
        Ok(())
    }

    /// PEFT's LoRA with `r = b`, `lora_alpha = α` (so peft's `α/r` is DyLoRA's `α/b`) and each
    /// module's `A[:b]`, `B[:, :b]` (contiguous copies); `modules_to_save` as saved.
    fn plain_lora(&self) -> Result<Option<PlainLora>> {
        let rank = self.rank.chosen();
        let Value::Object(options) = serde_json::to_value(self.lora_config(rank))? else {
            bail!("dylora: the LoRA config did not serialize to an object")
        };
        let config = AdapterConfig::new(super::lora::METHOD.peft_type, options);
        let mut tensors = Vec::new();
        let adapted: Vec<String> = self.adapted().into_iter().map(|m| m.path).collect();
        let is_factor = |key: &str| {
            adapted
                .iter()
                .any(|p| key == peft_key(p, "lora_A.weight") || key == peft_key(p, "lora_B.weight"))
        };
        for (key, var) in self.trainable() {
            if !is_factor(&key) {
                tensors.push((key, var.as_tensor().clone()));
            }
        }
        for path in &adapted {
            let (a, b) = self.truncated_factors(path)?;
            tensors.push((peft_key(path, "lora_A.weight"), a.contiguous()?));
            tensors.push((peft_key(path, "lora_B.weight"), b.contiguous()?));
        }
        tensors.sort_by(|x, y| x.0.cmp(&y.0));
        Ok(Some(PlainLora { config, tensors }))
    }
}
