//! PST, parameter-efficient sparsity training (Li et al. 2022, IJCAI; reference
//! alibaba/AliceMind `S4/PST/pst/{sparse.py,utils.py}`): each targeted linear's weight gets a
//! low-rank update and is pruned by a mask from a data-free score `|W̃|` plus trainable
//! low-rank and row/column scores ([`layer`]); the sparsity rises over the run on the
//! reference's cubic schedule ([`layer::scheduled_sparsity`]), driven by the optimizer step so
//! that a resumed run is the same.
//!
//! Saved under ferrule's `peft_type` `PST` with the reference's parameter names as key
//! suffixes: `base_model.model.<path>.weight_U` `[out, r_w]`, `.weight_V` `[r_w, in]`,
//! `.mask_scores_A` `[out, r_m]`, `.mask_scores_B` `[r_m, in]`, `.mask_scores_R` `[out]`,
//! `.mask_scores_C` `[in]`. Merge is `save_sparse_model`: `M ⊙ W̃` under the original key,
//! the extra tensors dropped, a dense Hugging Face folder with zeros
//! ([`crate::tuners::Update::Masked`]).
//!
//! Differences from the reference: it converts every `nn.Linear` of the encoder; here the
//! targets choose (default: every linear of every block, as the reference's BERT run). Its
//! first step runs at sparsity 0 whatever `initial_sparsity` is (the layer's initial
//! `cur_sparsity`), here at the schedule's value at step 0. A bitsandbytes or GGUF-quantized
//! base is refused: `W̃` and the merge need the dense `W`. A base held in bf16
//! (`--compute-dtype bf16`, or `auto` where it picks bf16) gives `W̃` from bf16-rounded `W`
//! while the merge reads the checkpoint's values; that is warned about once.

pub mod config;
pub mod layer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor, Var};
use serde_json::{Map, Value};

pub use config::PstConfig;
use layer::{Factors, PstLinear, PstMerge, Scales, SparsitySchedule};

use super::config::AdapterConfig;
use super::core::{AnyTunerCore, LinearRoute, TunerCore};
use super::modules_to_save::ModulesToSave;
use super::registry::{BlockShapes, BuildContext, Method};
use super::target::Targets;
use super::{peft_key, AdaptedModule, Tuner, Update};
use crate::init;
use crate::model::stream::Held;
use crate::model::{Linear, LinearInfo, ModelHook};
use crate::ops::{ComputeDtype, FrozenLinear, FrozenWeight};

/// The registry entry.
pub static METHOD: Method = Method {
    name: "pst",
    peft_type: "PST",
    summary: "PST: a low-rank weight update, pruned to a target sparsity by a mask from |W + βUV| plus trained low-rank and row/column scores; merges into a sparse model (Li et al. 2022)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: Some(count_from_shapes),
    trains_whole_model: false,
    f32_weights: None,
};

/// The trained tensors' key suffixes, in [`PstLinear::factors_of`]'s order.
const SUFFIXES: [&str; 6] = [
    "weight_U",
    "weight_V",
    "mask_scores_A",
    "mask_scores_B",
    "mask_scores_R",
    "mask_scores_C",
];

/// Every linear of every block, as the reference converts every `nn.Linear` of BERT's
/// encoder: the same list as DiffFit's defaults.
fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    super::config::default_list(
        options,
        "target_modules",
        model_type,
        super::difffit::default_targets,
    )
}

/// `(r_w + r_m)(in + out) + out + in` per targeted linear of every block.
fn count_from_shapes(options: &Map<String, Value>, blocks: &BlockShapes) -> Result<Option<usize>> {
    let rank = |key: &str| options.get(key).and_then(Value::as_u64).unwrap_or(8) as usize;
    let targets: Vec<String> = match options.get("target_modules") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(v)) => v
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => bail!("no target_modules for this model type; pass --target-modules"),
    };
    let per = rank("weight_rank") + rank("mask_rank") + 1;
    Ok(Some(super::lora::params_of_blocks(blocks, &targets, per)?))
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: PstConfig = config.typed("pst")?;
    cfg.validate()?;
    Ok(Box::new(Pst::new(cfg, ctx)?))
}

/// Builds PST layers on the modules a [`PstConfig`] targets.
pub struct Pst {
    core: TunerCore<PstConfig, Vec<usize>>,
    /// The sparsity every layer runs at ([`SparsitySchedule`]).
    schedule: Arc<SparsitySchedule>,
    /// Whether the bf16 base was warned about (once per adapter).
    warned_bf16: AtomicBool,
}

impl Pst {
    pub fn new(config: PstConfig, ctx: BuildContext) -> Result<Self> {
        let targets = Targets::required(
            "pst",
            config.target_modules.as_ref(),
            config.exclude_modules.as_ref(),
            config.layers_to_transform.as_ref(),
            config.layers_pattern.as_ref(),
        )?;
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        let schedule = Arc::new(SparsitySchedule {
            config: config.clone(),
        });
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx).with_targets(targets),
            schedule,
            warned_bf16: AtomicBool::new(false),
        })
    }

    fn scales(&self) -> Scales {
        let c = &self.core.config;
        Scales {
            beta: c.weight_beta,
            alpha1: c.mask_alpha1,
            alpha2: c.mask_alpha2,
        }
    }

    /// The six tensors of the layer at `path`, saved or fresh with the reference's inits
    /// (sparse.py `SparseLinear.__init__`): `U`, `A` ~ N(0, 1) seeded by key, `V`, `B`, `R`,
    /// `C` zero.
    fn factors(&self, path: &str, in_f: usize, out_f: usize) -> Result<[Var; 6]> {
        let c = &self.core.config;
        let (rw, rm) = (c.weight_rank, c.mask_rank);
        let shapes: [Vec<usize>; 6] = [
            vec![out_f, rw],
            vec![rw, in_f],
            vec![out_f, rm],
            vec![rm, in_f],
            vec![out_f],
            vec![in_f],
        ];
        let params = &self.core.params;
        let dev = params.device().clone();
        let mut vars = Vec::with_capacity(6);
        for (i, (suffix, shape)) in SUFFIXES.iter().zip(&shapes).enumerate() {
            let key = peft_key(path, suffix);
            let seed = self.core.init_seed(&key);
            vars.push(params.take_or_init(&key, shape, || match i {
                0 | 2 => init::normal(shape, 1.0, seed, &dev),
                _ => Ok(Tensor::zeros(shape.as_slice(), DType::F32, &dev)?),
            })?);
        }
        Ok(vars.try_into().expect("six tensors"))
    }

    /// The layer at `path`'s tensors as they are now.
    fn saved_factors(&self, path: &str) -> Result<Factors> {
        let get = |suffix: &str| {
            self.core
                .params
                .get(&peft_key(path, suffix))
                .ok_or_else(|| anyhow!("pst: {path} has no {suffix}"))
        };
        let vars: Vec<Var> = SUFFIXES.iter().map(|s| get(s)).collect::<Result<_>>()?;
        Ok(PstLinear::factors_of([
            &vars[0], &vars[1], &vars[2], &vars[3], &vars[4], &vars[5],
        ]))
    }
}

/// Errors unless `base`'s weight is dense (in memory, or mapped from a dense checkpoint):
/// PST adds to `W` and prunes it, and the merge writes it pruned.
fn check_dense(path: &str, base: &FrozenLinear) -> Result<()> {
    let why = match base.weight() {
        FrozenWeight::Dense(_) => return Ok(()),
        FrozenWeight::Streamed(s, _) if matches!(s.held(), Held::Dense { .. }) => return Ok(()),
        FrozenWeight::Quantized(q, _) => format!("is held quantized ({})", q.format()),
        FrozenWeight::Streamed(s, _) => match s.held() {
            Held::Quantized(q) => format!("is a quantized matrix ({})", q.format()),
            Held::Dense { .. } => unreachable!("matched above"),
        },
        FrozenWeight::Sharded(..) => "is sharded across ranks (--shard-base)".to_string(),
    };
    bail!("pst: {path}.weight {why}; PST trains W + βUV and prunes it, so it needs the dense weight: load an f32, f16 or bf16 checkpoint, without --quantize or --shard-base")
}

impl ModelHook for Pst {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let base = match self.core.route_linear(info, base)? {
            LinearRoute::Targeted(base) => base,
            other => return Ok(other.unadapted()),
        };
        let path = info.path.as_str();
        check_dense(path, &base)?;
        let bf16 = base.weight().compute_dtype() == ComputeDtype::Bf16;
        if bf16 && !self.warned_bf16.swap(true, Ordering::Relaxed) {
            tracing::warn!("pst: the base weights are held in bf16 (--compute-dtype), so W + βUV and its mask are computed from bf16-rounded W, while `ferrule merge` uses the checkpoint's own values: a score at the pruning threshold may fall the other way there. Pass --compute-dtype f32 to train and evaluate on the checkpoint's values (PST's product runs in f32 either way)");
        }
        let (out_f, in_f) = (base.out_features(), base.in_features());
        let vars = self.factors(path, in_f, out_f)?;
        let c = &self.core.config;
        let module = AdaptedModule {
            path: path.to_string(),
            params: (c.weight_rank + c.mask_rank + 1) * (in_f + out_f),
            detail: format!(
                "weight_rank={} mask_rank={} sparsity {} -> {}",
                c.weight_rank, c.mask_rank, c.initial_sparsity, c.sparsity
            ),
        };
        self.core.record(module, vec![out_f, in_f]);
        let [u, v, a, b, r, cc] = &vars;
        Ok(Box::new(PstLinear {
            base,
            factors: PstLinear::factors_of([u, v, a, b, r, cc]),
            scales: self.scales(),
            schedule: self.schedule.clone(),
            clock: self.core.clock.clone(),
        }))
    }
}

impl Tuner for Pst {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    /// `W' = M ⊙ (W + βUV)` per adapted layer at the sparsity the layers run at now (the
    /// target, for a loaded adapter): `save_sparse_model`'s `convert()`.
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        let sparsity = self.schedule.current(&self.core.clock);
        let mut out = Vec::new();
        for adapted in self.core.adapted().iter() {
            let path = &adapted.module.path;
            let merge = PstMerge {
                dims: adapted.layer.clone(),
                factors: self.saved_factors(path)?,
                scales: self.scales(),
                sparsity,
            };
            out.push((format!("{path}.weight"), Update::Masked(Arc::new(merge))));
        }
        Ok(out)
    }
}
