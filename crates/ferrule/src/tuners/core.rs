//! What every tuner shares, as peft's `BaseTuner` / `BaseTunerLayer` hold it: the registry
//! entry, the typed config, the seed, the training clock its layers read, the trainable
//! tensors, `modules_to_save`, the targets, and the modules adapted so far.
//!
//! A method keeps one [`TunerCore`] and writes only what differs: its hook points, `finish`,
//! and how a merge changes the base. The [`Tuner`](super::Tuner) trait's default methods
//! (`method`, `mode`, `trainable`, `adapted`, `config_json`, `replaced`) read the core
//! through [`AnyTunerCore`].

use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Serialize;
use serde_json::Value;

use super::modules_to_save::{ModulesToSave, Wrapped};
use super::params::ParamStore;
use super::registry::{BuildContext, Method};
use super::target::{MatchReport, Targets};
use super::training_clock::TrainingClock;
use super::AdaptedModule;
use crate::model::{Linear, LinearInfo};
use crate::ops::FrozenLinear;

/// The state every tuner holds. `C` is the method's typed config (what `adapter_config.json`
/// writes; a `Mutex` around it when the model fills dimensions in while it is built), `L` what
/// the method keeps about each adapted module for its merge (`()` when nothing).
pub struct TunerCore<C, L = ()> {
    /// The registry entry (CLI name, `peft_type`).
    pub method: &'static Method,
    pub config: C,
    /// Seeds initialisation ([`TunerCore::init_seed`]).
    pub seed: u64,
    /// A `target_modules` entry that matches nothing is a warning, not an error.
    pub allow_unmatched: bool,
    /// The train/eval switch and step that the method's layers read (dropout).
    pub clock: Arc<TrainingClock>,
    /// The trainable tensors under their PEFT keys, fresh or from a saved adapter.
    pub params: ParamStore,
    /// Layers trained in full beside the method (`modules_to_save`).
    pub saved: ModulesToSave,
    /// `target_modules`, for methods that change chosen modules (none for prompt learning).
    pub targets: Option<Targets>,
    adapted: Mutex<Vec<Adapted<L>>>,
}

/// One adapted module: its report, and what the method keeps about it for a merge.
#[derive(Clone, Debug)]
pub struct Adapted<L> {
    pub module: AdaptedModule,
    pub layer: L,
}

/// What becomes of one linear layer, decided as every method decides it: a `modules_to_save`
/// layer is trained in full, whatever the targets say; otherwise the targets choose.
pub enum LinearRoute {
    /// Listed in `modules_to_save`: a trainable copy.
    TrainedInFull(Box<dyn Linear>),
    /// Chosen by `target_modules` (not excluded, in a selected layer): the method adapts it.
    Targeted(FrozenLinear),
    /// Neither: the frozen base.
    Untargeted(FrozenLinear),
}

impl LinearRoute {
    /// The layer for a method that adapts no linear layer: the trained copy or the base.
    pub fn unadapted(self) -> Box<dyn Linear> {
        match self {
            LinearRoute::TrainedInFull(full) => full,
            LinearRoute::Targeted(base) | LinearRoute::Untargeted(base) => Box::new(base),
        }
    }
}

impl<C, L> TunerCore<C, L> {
    /// A core for `method` with `config`, its `modules_to_save` (`saved`: PEFT puts another
    /// key prefix before prompt learning's), and what the builder was given.
    pub fn new(
        method: &'static Method,
        config: C,
        saved: ModulesToSave,
        ctx: BuildContext,
    ) -> Self {
        Self {
            method,
            config,
            seed: ctx.seed,
            allow_unmatched: ctx.allow_unmatched,
            clock: Arc::new(TrainingClock::new(ctx.seed)),
            params: ParamStore::new(ctx.device, ctx.weights),
            saved,
            targets: None,
            adapted: Mutex::new(Vec::new()),
        }
    }

    /// With `target_modules` (and the layer selection the targets carry).
    pub fn with_targets(mut self, targets: Targets) -> Self {
        self.targets = Some(targets);
        self
    }

    /// The method's name in messages and typed-config errors: `peft_type` in lower case
    /// (`lora`, `ln_tuning`).
    pub fn label(&self) -> String {
        self.method.peft_type.to_ascii_lowercase()
    }

    /// The seed of a fresh tensor under PEFT key `key`.
    pub fn init_seed(&self, key: &str) -> u64 {
        crate::init::seed_for(self.seed, key)
    }

    /// The start of every method's `linear()`: `modules_to_save` first, then the targets.
    pub fn route_linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<LinearRoute> {
        let base = match self.saved.wrap(info, base, &self.params)? {
            Wrapped::TrainedInFull(full) => return Ok(LinearRoute::TrainedInFull(full)),
            Wrapped::NotListed(base) => base,
        };
        Ok(match self.adapts(&info.path, info.is_output_head) {
            true => LinearRoute::Targeted(base),
            false => LinearRoute::Untargeted(base),
        })
    }

    /// Whether the targets adapt the module at `path` ([`Targets::adapts`]; `is_output_head`
    /// also for modules that are not linear layers, which `all-linear` never selects). Never
    /// without targets.
    pub fn adapts(&self, path: &str, is_output_head: bool) -> bool {
        self.targets
            .as_ref()
            .is_some_and(|t| t.adapts(path, is_output_head))
    }

    /// Records an adapted module, with what its merge needs.
    pub fn record(&self, module: AdaptedModule, layer: L) {
        self.adapted.lock().unwrap().push(Adapted { module, layer });
    }

    /// The modules adapted so far, in the order the model offered them.
    pub fn adapted(&self) -> MutexGuard<'_, Vec<Adapted<L>>> {
        self.adapted.lock().unwrap()
    }

    /// The checks every method's [`Tuner::finish`](super::Tuner::finish) makes, in order: each
    /// `target_modules` entry matched something (a saved adapter's entries are reported but
    /// not fatal: its tensors are checked one by one instead), something was adapted (else
    /// the error `"<label>: <nothing_adapted>"`), and every saved tensor found its module.
    /// Returns the targets' match report (none without targets).
    pub fn check_finished(&self, nothing_adapted: &str) -> Result<Vec<MatchReport>> {
        let label = self.label();
        let report = match &self.targets {
            Some(targets) => {
                let report = targets.report();
                report.check(&label, self.allow_unmatched || self.params.loading())?;
                vec![report]
            }
            None => vec![],
        };
        if self.adapted().is_empty() {
            bail!("{label}: {nothing_adapted}")
        }
        self.params.check_all_used()?;
        Ok(report)
    }
}

/// A [`TunerCore`] of any config and layer type: what the [`Tuner`](super::Tuner) trait's
/// default methods read.
pub trait AnyTunerCore {
    fn method(&self) -> &'static Method;
    fn clock(&self) -> &Arc<TrainingClock>;
    fn params(&self) -> &ParamStore;
    /// The adapted modules' reports.
    fn adapted_modules(&self) -> Vec<AdaptedModule>;
    /// The typed config as JSON (the method's part of `adapter_config.json`).
    fn config_json(&self) -> Result<Value>;
    /// Base tensors the `modules_to_save` copies replace in a merge.
    fn saved_replaced(&self) -> Vec<(String, Tensor)>;
    /// [`TunerCore::check_finished`].
    fn check_finished(&self, nothing_adapted: &str) -> Result<Vec<MatchReport>>;
}

impl<C: Serialize, L> AnyTunerCore for TunerCore<C, L> {
    fn method(&self) -> &'static Method {
        self.method
    }

    fn clock(&self) -> &Arc<TrainingClock> {
        &self.clock
    }

    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn adapted_modules(&self) -> Vec<AdaptedModule> {
        self.adapted().iter().map(|a| a.module.clone()).collect()
    }

    fn config_json(&self) -> Result<Value> {
        Ok(serde_json::to_value(&self.config)?)
    }

    fn saved_replaced(&self) -> Vec<(String, Tensor)> {
        self.saved.replaced(&self.params)
    }

    fn check_finished(&self, nothing_adapted: &str) -> Result<Vec<MatchReport>> {
        TunerCore::check_finished(self, nothing_adapted)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::tuners::target::ModuleSpec;

    fn core(saved: &[&str]) -> TunerCore<Value> {
        let names: Vec<String> = saved.iter().map(|s| s.to_string()).collect();
        let ctx = BuildContext {
            seed: 0,
            device: &Device::Cpu,
            weights: None,
            allow_unmatched: false,
            release_base: None,
        };
        let targets = Targets::new(
            "target_modules",
            &ModuleSpec::Names(vec!["q_proj".into(), "k_proj".into()]),
            None,
        )
        .unwrap();
        let saved = ModulesToSave::new(Some(&names));
        TunerCore::new(&crate::tuners::ia3::METHOD, Value::Null, saved, ctx).with_targets(targets)
    }

    fn route(core: &TunerCore<Value>, path: &str) -> &'static str {
        let info = LinearInfo {
            path: path.into(),
            is_output_head: false,
            tied_to: None,
        };
        let weight = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let base = FrozenLinear::new(weight, None).unwrap();
        match core.route_linear(&info, base).unwrap() {
            LinearRoute::TrainedInFull(_) => "trained in full",
            LinearRoute::Targeted(_) => "targeted",
            LinearRoute::Untargeted(_) => "untargeted",
        }
    }

    #[test]
    fn modules_to_save_come_before_the_targets() {
        let core = core(&["k_proj"]);
        assert_eq!(route(&core, "model.layers.0.self_attn.q_proj"), "targeted");
        assert_eq!(
            route(&core, "model.layers.0.self_attn.k_proj"),
            "trained in full"
        );
        assert_eq!(
            route(&core, "model.layers.0.self_attn.v_proj"),
            "untargeted"
        );
        assert_eq!(core.params.trainable().len(), 1, "the k_proj copy's weight");
    }

    #[test]
    fn finishing_with_nothing_adapted_names_the_method_and_the_reason() {
        let core = core(&[]);
        route(&core, "model.layers.0.self_attn.q_proj");
        route(&core, "model.layers.0.self_attn.k_proj");
        let e = core.check_finished("nothing here").unwrap_err().to_string();
        assert_eq!(e, "ia3: nothing here");
        core.record(
            AdaptedModule {
                path: "model.layers.0.self_attn.q_proj".into(),
                params: 2,
                detail: String::new(),
            },
            (),
        );
        let reports = core.check_finished("nothing here").unwrap();
        let expected = vec![("q_proj".to_string(), 1), ("k_proj".to_string(), 1)];
        assert_eq!(reports[0].entries, expected);
        assert_eq!(core.adapted_modules().len(), 1);
    }
}
