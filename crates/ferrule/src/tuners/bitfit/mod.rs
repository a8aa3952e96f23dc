//! BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
//! Transformer-based Masked Language-models"): only the model's existing bias terms train, all
//! of them or the subsets `bias_terms` names ([`config::TERMS`]), as the reference
//! (benzakenelad/BitFit `glue_evaluator.py`) selects them; the pooler's bias trains with any
//! subset, and a classification head trains in full (`modules_to_save`, added for SEQ_CLS).
//!
//! Differences from the reference, which matches its names as substrings of parameter names:
//! its `output` (`output.dense.bias`) also selects `attention.output.dense.bias`; here `output`
//! is the feed-forward output only and `attention_output` the other, so the reference's
//! `output` is `output,attention_output`. The terms also name a decoder's modules (`q_proj`,
//! ..., `down_proj`).
//!
//! A model without biases (Llama, Mistral) has nothing to train: [`Tuner::finish`] fails and
//! says so. Saved: `adapter_config.json` with `peft_type` `"BITFIT"` and
//! `adapter_model.safetensors` with each trained bias under `base_model.model.<path>.bias`
//! (peft's key for a trained base bias); a merge writes the base with those biases replaced.

pub mod config;
pub mod layer;

use std::sync::Mutex;

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde_json::{Map, Value};

pub use config::{BiasTerm, BitFitConfig};

use super::bias::BiasTrainedLinear;
use super::core::{AnyTunerCore, LinearRoute, TunerCore};
use super::modules_to_save::ModulesToSave;
use super::registry::{BuildContext, Method};
use super::target::{module_name_shapes, MatchReport};
use super::{peft_key, AdaptedModule, AdapterConfig, Tuner, Update};
use crate::model::{Linear, LinearInfo, ModelHook, NormInfo, NormParams};
use crate::ops::FrozenLinear;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "bitfit",
    peft_type: "BITFIT",
    summary: "BitFit: only the model's existing bias terms train, all or --bias-terms subsets (Ben Zaken et al. 2022); not a peft type",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: None,
    trains_whole_model: false,
    f32_weights: None,
};

fn complete(_options: &mut Map<String, Value>, _model_type: &str) -> Result<()> {
    Ok(())
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: BitFitConfig = config.typed("bitfit")?;
    Ok(Box::new(BitFit::new(cfg, ctx)?))
}

/// Trains the biases a [`BitFitConfig`] selects.
pub struct BitFit {
    core: TunerCore<BitFitConfig>,
    terms: Vec<BiasTerm>,
    /// Every module offered with a bias (trained or not) and its term, for the match report.
    biased: Mutex<Vec<(String, Option<BiasTerm>)>>,
}

impl BitFit {
    pub fn new(config: BitFitConfig, ctx: BuildContext) -> Result<Self> {
        let terms = config.terms()?;
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx),
            terms,
            biased: Mutex::new(Vec::new()),
        })
    }

    /// Whether the bias of the module at `path`, of term `term`, trains: `all`, its term, or
    /// the pooler (with any term, as the reference).
    fn selects(&self, path: &str, term: Option<BiasTerm>) -> bool {
        self.terms.contains(&BiasTerm::All)
            || term.is_some_and(|t| self.terms.contains(&t))
            || layer::is_pooler(path)
    }

    /// The trainable copy of the bias of `path` (`[n]`), recorded as adapted; `None` when its
    /// term is not selected.
    fn take(&self, path: &str, term: Option<BiasTerm>, bias: &Tensor) -> Result<Option<Var>> {
        self.biased.lock().unwrap().push((path.to_string(), term));
        if !self.selects(path, term) {
            return Ok(None);
        }
        let var = self
            .core
            .params
            .take_or_init(&peft_key(path, "bias"), bias.dims(), || Ok(bias.copy()?))?;
        let detail = match term {
            Some(t) => format!("bias ({})", t.name()),
            None => "bias".to_string(),
        };
        let module = AdaptedModule {
            path: path.to_string(),
            params: bias.elem_count(),
            detail,
        };
        self.core.record(module, ());
        Ok(Some(var))
    }

    /// How many biases each configured term selected, and the model's biased modules.
    fn report(&self) -> MatchReport {
        let biased = self.biased.lock().unwrap();
        let entries = self
            .terms
            .iter()
            .map(|&t| {
                let n = biased
                    .iter()
                    .filter(|(_, term)| t == BiasTerm::All || *term == Some(t))
                    .count();
                (t.name().to_string(), n)
            })
            .collect();
        let paths: Vec<String> = biased.iter().map(|(p, _)| p.clone()).collect();
        MatchReport {
            option: "bias_terms",
            entries,
            module_names: module_name_shapes(&paths),
        }
    }
}

impl ModelHook for BitFit {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let base = match self.core.route_linear(info, base)? {
            LinearRoute::TrainedInFull(full) => return Ok(full),
            LinearRoute::Targeted(b) | LinearRoute::Untargeted(b) => b,
        };
        let Some(bias) = base.bias().cloned() else {
            return Ok(Box::new(base));
        };
        let path = info.path.as_str();
        match self.take(path, layer::linear_term(path), &bias)? {
            Some(bias) => Ok(Box::new(BiasTrainedLinear {
                base: FrozenLinear::from_weight(base.weight().clone(), None),
                bias,
            })),
            None => Ok(Box::new(base)),
        }
    }

    fn norm(&self, info: &NormInfo, frozen: NormParams) -> Result<NormParams> {
        let Some(bias) = &frozen.bias else {
            return Ok(frozen);
        };
        let path = info.path.as_str();
        Ok(match self.take(path, layer::norm_term(path), bias)? {
            Some(var) => NormParams {
                weight: frozen.weight,
                bias: Some(var.as_tensor().clone()),
            },
            None => frozen,
        })
    }
}

impl Tuner for BitFit {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    /// Fails when the model has no bias at all (nothing to train: BitFit adds none), when a
    /// term selected no bias (naming the model's biased modules), or when a saved adapter has
    /// biases this model lacks.
    fn finish(&self) -> Result<Vec<MatchReport>> {
        if self.biased.lock().unwrap().is_empty() {
            bail!(
                "bitfit: the model has no bias terms: none of its linear layers or norms has a \
                 bias (Llama and Mistral checkpoints have none; Qwen2 has q/k/v biases only), \
                 and BitFit trains only existing biases. Use --method difffit, which adds \
                 biases, or another method that adds parameters"
            )
        }
        let report = self.report();
        report.check(
            "bitfit",
            self.core.allow_unmatched || self.core.params.loading(),
        )?;
        self.core
            .check_finished("bias_terms selected no bias of the model")?;
        Ok(vec![report])
    }

    /// Nothing is added to a base tensor: the trained biases replace the base's ([`Self::replaced`]).
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        Ok(vec![])
    }

    /// Each trained bias replaces `path.bias`; `modules_to_save` copies their layers.
    fn replaced(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.core.saved_replaced();
        for adapted in self.core.adapted().iter() {
            let path = &adapted.module.path;
            if let Some(v) = self.core.params.get(&peft_key(path, "bias")) {
                out.push((format!("{path}.bias"), v.as_tensor().clone()));
            }
        }
        Ok(out)
    }

    /// The trained biases, and the `modules_to_save` copies, stand for the base's own tensors
    /// (a merge replaces them): the model's total counts them once, as the reference, which
    /// trains one model, does.
    fn trained_in_place(&self) -> usize {
        super::trainable_params(self)
    }
}
