//! IST, importance-aware sparse tuning (Yao et al. 2024; antgroup/importance-aware-sparse-
//! tuning-IST-paper `ist.py`, `ISTCallback`): a schedule over the decoder layers of another
//! method (LoRA by default, DoRA or bottleneck adapters), which it builds and wraps unchanged.
//!
//! - Each layer l has a score `s_l`, 0 at first ([`scores`]).
//! - Before optimizer step k, for every k > 0 that `ist_update_interval` (10) divides,
//!   `ist_rollouts` (3) rollouts each suppress a distinct set of `int(L·0.5)` layers drawn
//!   ∝ σ(s): their adapter outputs are scaled by `ist_suppression_factor` (0.25) and the loss of
//!   one training batch is taken in eval mode without a gradient. With
//!   `R_k = e^{−loss_k} − mean`, every layer in rollout k gets `s_l += 10·R_k·σ(s_l)(1 − σ(s_l))`
//!   (ist.py 88-137).
//! - Each step, `int(L·0.25)` layers drawn ∝ σ(−s) train; the rest are frozen for that step
//!   (ist.py 165-182). A frozen layer's tensors get no gradient, so the optimizer skips them:
//!   no moment update, no weight decay, its own step count unchanged, as torch's AdamW skips a
//!   parameter whose `grad` is `None`.
//!
//! Both reach the base method's layers through the [`TrainingClock`]'s layer gates
//! ([`LayerGate`]): LoRA's and the bottleneck's layers multiply their scale by the gate's and
//! detach their tensors when it is frozen. The trainer calls [`Tuner::before_step`] with a
//! [`LossProbe`] on the step's first micro-batch. The scores are training state: checkpoints
//! hold them ([`Tuner::frozen_state`], key [`SCORES_KEY`]), and every draw is a function of the
//! run's seed, the step and the scores, so a resumed run draws what an uninterrupted one does.
//! The finished run saves the base method's adapter as that method saves it (a plain PEFT LoRA
//! or DoRA folder, or the bottleneck folder): IST changes how it trains, not what it is.
//!
//! Differences from the reference: the rollouts' batch is the step's own first micro-batch
//! (the reference draws a batch of 16 from a second shuffled loader); the draws use ferrule's
//! seeded generator (the same distribution as torch's `multinomial`, other numbers); a setting
//! under which the reference draws no layer, or loops forever looking for distinct rollouts
//! (too few layers), is an error naming it; layers count every numbered layer of the model,
//! as the reference's `len(model.model.layers)` does, also where `layers_to_transform` leaves
//! a layer without an adapter.

pub mod config;
pub mod scores;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde_json::{Map, Value};

pub use config::{IstBase, IstConfig};

use super::config::AdapterConfig;
use super::core::AnyTunerCore;
use super::registry::{self, BlockShapes, BuildContext, Method};
use super::training_clock::{LayerGate, TrainingClock};
use super::{AdaptedModule, LossProbe, MatchReport, PlainLora, Tuner, Update};
use crate::model::{
    AttentionInfo, BranchInfo, Embedding, EmbeddingInfo, InputInfo, KvPrefix, Linear, LinearInfo,
    ModelHook, NormInfo, NormParams, ResidualBranch, VirtualTokens,
};
use crate::ops::{FrozenLinear, FrozenWeight};
use crate::train::rng::Rng;

/// The key of the layer scores `[L]` (f32) in a checkpoint's adapter file (the reference's
/// `importance_score`).
pub const SCORES_KEY: &str = "ist.importance_score";

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// IST's keys, then LoRA's and the bottleneck's (each once): the union of what a config with
/// any `ist_base` may hold. `N` is the count without repeats ([`union_len`]).
const fn union<const N: usize>(parts: [&[&'static str]; 3]) -> [&'static str; N] {
    let mut out = [""; N];
    let (mut n, mut p) = (0, 0);
    while p < parts.len() {
        let mut j = 0;
        while j < parts[p].len() {
            let key = parts[p][j];
            let mut seen = false;
            let mut k = 0;
            while k < n {
                seen = seen || same(out[k], key);
                k += 1;
            }
            if !seen {
                out[n] = key;
                n += 1;
            }
            j += 1;
        }
        p += 1;
    }
    out
}

/// How many keys [`union`] keeps.
const fn union_len(parts: [&[&'static str]; 3]) -> usize {
    let (mut n, mut p) = (0, 0);
    while p < parts.len() {
        let mut j = 0;
        while j < parts[p].len() {
            let mut seen = false;
            let mut q = 0;
            while q <= p {
                let end = if q == p { j } else { parts[q].len() };
                let mut k = 0;
                while k < end {
                    seen = seen || same(parts[q][k], parts[p][j]);
                    k += 1;
                }
                q += 1;
            }
            if !seen {
                n += 1;
            }
            j += 1;
        }
        p += 1;
    }
    n
}

const KEY_PARTS: [&[&str]; 3] = [
    config::IST_KEYS,
    super::lora::config::KNOWN_KEYS,
    super::bottleneck::config::KNOWN_KEYS,
];

/// Every key an IST config may hold: IST's own and those of each base method.
pub static KEYS: [&str; union_len(KEY_PARTS)] = union(KEY_PARTS);

/// The registry entry.
pub static METHOD: Method = Method {
    name: "ist",
    peft_type: "IST",
    summary: "IST: trains an importance-drawn quarter of the layers each step, scored by rollouts that suppress half of them (Yao et al. 2024), around LoRA, DoRA or bottleneck adapters; saves the base method's adapter",
    keys: &KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: Some(complete_flags),
    count_from_shapes: Some(count_from_shapes),
    trains_whole_model: false,
    f32_weights: None,
};

/// The base method `options` choose (`ist_base`, default LoRA), its registry entry.
fn base_method(options: &Map<String, Value>) -> Result<(IstBase, &'static Method)> {
    let base: IstBase = match options.get("ist_base") {
        None | Some(Value::Null) => IstBase::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            anyhow::anyhow!(
                "ist: ist_base (--ist-base) is {v}: expected \"lora\", \"dora\" or \"bottleneck\""
            )
        })?,
    };
    let method = match base {
        IstBase::Lora | IstBase::Dora => &super::lora::METHOD,
        IstBase::Bottleneck => &super::bottleneck::METHOD,
    };
    Ok((base, method))
}

/// The base method's config: every key but IST's, with `use_dora` for `ist_base = "dora"`. A
/// key the base method lacks is an error naming it and the base, as is `use_dora` against
/// `ist_base`.
pub fn base_config(options: &Map<String, Value>) -> Result<AdapterConfig> {
    let (base, method) = base_method(options)?;
    let mut own: Map<String, Value> = options
        .iter()
        .filter(|(k, _)| !config::IST_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if base != IstBase::Bottleneck {
        let dora = base == IstBase::Dora;
        match own.get("use_dora").and_then(Value::as_bool) {
            Some(set) if set != dora => bail!(
                "ist: use_dora is {set} but ist_base is {:?}; choose DoRA with ist_base = \"dora\" (--ist-base dora) alone",
                base.name()
            ),
            _ => {}
        }
        own.insert("use_dora".into(), Value::Bool(dora));
    }
    let cfg = AdapterConfig::new(method.peft_type, own);
    cfg.check_keys(&format!("ist (ist_base = {:?})", base.name()), true)?;
    Ok(cfg)
}

/// `--method lora`'s defaults for a LoRA or DoRA base (r 8, α 16: what `ferrule train` trains
/// when told no method, so that IST compares with it), then the base method's own defaults.
fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    let (base, method) = base_method(options)?;
    if base != IstBase::Bottleneck {
        for (k, v) in registry::default_adapter().options {
            options.entry(k).or_insert(v);
        }
    }
    (method.complete)(options, model_type)
}

/// The base method's keys that follow from the flags (LoRA's trainable token rows).
fn complete_flags(options: &mut Map<String, Value>, model: &str) -> Result<()> {
    match base_method(options)?.1.complete_flags {
        Some(complete) => complete(options, model),
        None => Ok(()),
    }
}

/// The base method's count: IST trains a subset of the same tensors each step.
fn count_from_shapes(options: &Map<String, Value>, blocks: &BlockShapes) -> Result<Option<usize>> {
    let base = base_config(options)?;
    match base.method()?.count_from_shapes {
        Some(count) => count(&base.options, blocks),
        None => Ok(None),
    }
}

fn build(config: &AdapterConfig, mut ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let ist: IstConfig = config.typed("ist")?;
    ist.validate()?;
    let base = base_config(&config.options)?;
    let saved = ctx.weights.as_mut().and_then(|w| w.remove(SCORES_KEY));
    let seed = ctx.seed;
    let device = ctx.device.clone();
    let inner = registry::build(&base, ctx).context("ist")?;
    Ok(Box::new(Ist {
        config: ist,
        inner,
        seed,
        device,
        layers: AtomicUsize::new(0),
        scores: Mutex::new(Vec::new()),
        saved: Mutex::new(saved),
    }))
}

/// The IST schedule around a built base tuner.
pub struct Ist {
    config: IstConfig,
    inner: Box<dyn Tuner>,
    seed: u64,
    device: Device,
    /// Numbered layers seen (the highest index of a linear layer's path, plus 1).
    layers: AtomicUsize,
    /// `s_l` per layer; sized by [`Tuner::finish`].
    scores: Mutex<Vec<f32>>,
    /// A checkpoint's scores, until `finish` checks them against the layers.
    saved: Mutex<Option<Tensor>>,
}

impl Ist {
    /// The layer scores as they are now.
    pub fn scores(&self) -> Vec<f32> {
        self.scores.lock().unwrap().clone()
    }

    fn clock(&self) -> &Arc<TrainingClock> {
        self.inner.mode()
    }

    /// The layer count, checked against what the schedule needs (at least one layer trained
    /// and one suppressed, and as many distinct suppressed sets as rollouts).
    fn checked_layers(&self) -> Result<usize> {
        let l = self.layers.load(Ordering::Relaxed);
        let c = &self.config;
        if l < 2 {
            bail!("ist: the model has {l} numbered layer{}; IST chooses which layers train, so it needs at least 2", if l == 1 { "" } else { "s" })
        }
        let (train, suppress) = (c.trainable_layers(l), c.suppressed_layers(l));
        for (n, key, flag, v) in [
            (
                train,
                "ist_trainable_fraction",
                "--ist-trainable-fraction",
                c.ist_trainable_fraction,
            ),
            (
                suppress,
                "ist_suppressed_fraction",
                "--ist-suppressed-fraction",
                c.ist_suppressed_fraction,
            ),
        ] {
            if n == 0 {
                bail!("ist: {key} ({flag}) {v} of this model's {l} layers is int({l}·{v}) = 0 layers, as the reference counts; raise it to at least {}", 1.0 / l as f64)
            }
        }
        let sets = scores::binomial(l, suppress);
        if sets < c.ist_rollouts {
            bail!("ist: {} rollouts (--ist-rollouts) each suppress a distinct set of {suppress} of this model's {l} layers, and there are only {sets} such sets (the reference would draw forever); lower --ist-rollouts or change --ist-suppressed-fraction", c.ist_rollouts)
        }
        Ok(l)
    }

    /// The rollouts before a score update: each suppresses its set, takes `probe`'s loss in
    /// eval mode; then the scores move (ist.py 88-137).
    fn update_scores(&self, l: usize, rng: &mut Rng, probe: &mut dyn LossProbe) -> Result<()> {
        let c = &self.config;
        let mut s = self.scores();
        let sets = scores::rollout_sets(&s, c.suppressed_layers(l), c.ist_rollouts, rng)?;
        let clock = self.clock();
        let training = clock.training();
        clock.set_training(false);
        let mut losses = Vec::with_capacity(sets.len());
        let mut failed = None;
        for set in &sets {
            clock.set_gates(suppressed(l, set, c.ist_suppression_factor));
            match probe.loss() {
                Ok(loss) if loss.is_finite() => losses.push(loss),
                Ok(loss) => {
                    failed = Some(anyhow::anyhow!(
                        "ist: a rollout's loss is {loss} (layers {set:?} suppressed)"
                    ));
                    break;
                }
                Err(e) => {
                    failed = Some(e.context("ist: a rollout's loss"));
                    break;
                }
            }
        }
        clock.set_gates(Vec::new());
        clock.set_training(training);
        if let Some(e) = failed {
            return Err(e);
        }
        scores::update(&mut s, &sets, &losses, c.ist_score_lr);
        *self.scores.lock().unwrap() = s;
        Ok(())
    }
}

/// Gates for a rollout: the layers of `set` at `factor`, the others at 1, none frozen.
fn suppressed(layers: usize, set: &[usize], factor: f64) -> Vec<LayerGate> {
    (0..layers)
        .map(|i| LayerGate {
            scale: if set.contains(&i) { factor } else { 1.0 },
            frozen: false,
        })
        .collect()
}

/// The layers a step trains: drawn ∝ σ(−s) (ist.py `switch_active_layers`), from the stream of
/// (`seed`, `step`) after that step's rollouts. Public for the tests, which check a run's
/// frozen layers against it.
pub fn trainable_layers(config: &IstConfig, scores: &[f32], rng: &mut Rng) -> Vec<usize> {
    let n = config.trainable_layers(scores.len());
    scores::draw(&scores::training_weights(scores), n, rng)
}

/// The generator of step `step`'s draws (rollouts first, then the trainable layers).
pub fn step_rng(seed: u64, step: u64) -> Rng {
    Rng::seed_from_u64(crate::init::seed_for(seed, &format!("ist.step.{step}")))
}

impl ModelHook for Ist {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        if let Some(i) = super::target::layer_index(&info.path, None) {
            self.layers.fetch_max(i + 1, Ordering::Relaxed);
        }
        self.inner.linear(info, base)
    }
    fn norm(&self, info: &NormInfo, params: NormParams) -> Result<NormParams> {
        self.inner.norm(info, params)
    }
    fn embedding(&self, info: &EmbeddingInfo, base: FrozenWeight) -> Result<Box<dyn Embedding>> {
        self.inner.embedding(info, base)
    }
    fn virtual_tokens(&self, info: &InputInfo) -> Result<Option<Box<dyn VirtualTokens>>> {
        self.inner.virtual_tokens(info)
    }
    fn kv_prefix(&self, info: &AttentionInfo) -> Result<Option<Box<dyn KvPrefix>>> {
        self.inner.kv_prefix(info)
    }
    fn residual_branch(&self, info: &BranchInfo) -> Result<Option<Box<dyn ResidualBranch>>> {
        self.inner.residual_branch(info)
    }
}

impl Tuner for Ist {
    fn core(&self) -> &dyn AnyTunerCore {
        self.inner.core()
    }
    fn method(&self) -> &'static Method {
        &METHOD
    }
    fn saved_method(&self) -> &'static Method {
        self.inner.saved_method()
    }
    /// The base method's checks, then the layer count's ([`Ist::checked_layers`]); the scores
    /// start at 0, or at a checkpoint's.
    fn finish(&self) -> Result<Vec<MatchReport>> {
        let report = self.inner.finish()?;
        let l = self.checked_layers()?;
        let scores = match self.saved.lock().unwrap().take() {
            None => vec![0f32; l],
            Some(t) => {
                if t.dims() != [l] {
                    bail!("ist: the checkpoint's {SCORES_KEY} has shape {:?}; this model has {l} layers", t.dims())
                }
                t.to_dtype(candle_core::DType::F32)?.to_vec1()?
            }
        };
        *self.scores.lock().unwrap() = scores;
        Ok(report)
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        self.inner.trainable()
    }
    fn adapted(&self) -> Vec<AdaptedModule> {
        self.inner.adapted()
    }
    fn config_json(&self) -> Result<Value> {
        self.inner.config_json()
    }
    fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.inner.saved_tensors()
    }
    /// The base method's, and the layer scores.
    fn frozen_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.inner.frozen_state()?;
        let s = Tensor::new(self.scores().as_slice(), &self.device)?;
        out.push((SCORES_KEY.to_string(), s));
        Ok(out)
    }
    fn regularizer(&self) -> Result<Option<Tensor>> {
        self.inner.regularizer()
    }
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        self.inner.updates()
    }
    fn replaced(&self) -> Result<Vec<(String, Tensor)>> {
        self.inner.replaced()
    }
    fn trained_in_place(&self) -> usize {
        self.inner.trained_in_place()
    }
    fn lr_group_keys(&self) -> Vec<String> {
        self.inner.lr_group_keys()
    }
    fn plain_lora(&self) -> Result<Option<PlainLora>> {
        self.inner.plain_lora()
    }
    /// Rollouts and a score update when due, then this step's trainable layers.
    fn before_step(&self, step: u64, probe: &mut dyn LossProbe) -> Result<()> {
        let l = self.scores.lock().unwrap().len();
        if l == 0 {
            bail!("ist: before_step before finish (no layer scores)")
        }
        let mut rng = step_rng(self.seed, step);
        if step > 0 && step.is_multiple_of(self.config.ist_update_interval as u64) {
            self.update_scores(l, &mut rng, probe)?;
        }
        let train = trainable_layers(&self.config, &self.scores(), &mut rng);
        let gates = (0..l)
            .map(|i| LayerGate {
                scale: 1.0,
                frozen: !train.contains(&i),
            })
            .collect();
        self.clock().set_gates(gates);
        Ok(())
    }
}
