//! Parameter-efficient tuning methods. One folder per method, same shape each:
//! `config.rs` (serde, PEFT keys), `layer.rs` (the math), `mod.rs` (the [`Tuner`]: which
//! modules it changes, and its [`registry::Method`] entry). What every method shares lives
//! in [`core::TunerCore`], so a method writes only what differs.
//!
//! A tuner is a [`ModelHook`]: the model passes every hook point (linear layers, norms)
//! through it while it is built, and the tuner changes the ones its config targets. The rest
//! of ferrule reaches methods through [`registry`] and [`Tuner`] only.

pub mod bias;
pub mod bitfit;
pub mod bottleneck;
pub mod config;
pub mod conpet;
pub mod core;
pub mod dept;
pub mod difffit;
pub mod dylora;
pub mod flags;
pub mod full;
pub mod ia3;
pub mod ist;
pub mod l4q;
pub mod ln_tuning;
pub mod lora;
pub mod modules_to_save;
pub mod params;
pub mod pela;
pub mod prefix_tuning;
pub mod prompt_learning;
pub mod prompt_tuning;
pub mod pst;
pub mod randlora;
pub mod registry;
pub mod svd;
pub mod svfit;
pub mod target;
pub mod trainable_tokens;
pub mod training_clock;
pub mod weighted;

use std::sync::Arc;

use anyhow::Result;
use candle_core::{Tensor, Var};

pub use self::core::{AnyTunerCore, TunerCore};
pub use config::AdapterConfig;
pub use registry::{BuildContext, Method};
pub use target::MatchReport;
pub use training_clock::TrainingClock;

use crate::model::ModelHook;

/// One module a tuner changed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdaptedModule {
    /// Hugging Face module path.
    pub path: String,
    /// Trainable elements this module added.
    pub params: usize,
    /// The method's settings for it, e.g. `r=8 alpha=16 scaling=2` or `scales input`.
    pub detail: String,
}

/// How a merge changes one base tensor (`path.weight` or `path.bias`).
pub enum Update {
    /// `W' = W + Δ`, `Δ` of `W`'s shape (LoRA: `ΔW = s·B A`).
    Add(Delta),
    /// `W' = W ⊙ s`, `s` broadcast against `W` (IA3: `[out, 1]` rows or `[1, in]` columns).
    Scale(Tensor),
    /// `W' = (m / ‖W + Δ‖_row) ⊙ (W + Δ)` with `magnitude: [out]`: DoRA's merge (Liu et al.
    /// 2024, eq. 5; peft `DoraLinearVariant.merge_safe`), the norm taken over each output row.
    RowRescaled { delta: Delta, magnitude: Tensor },
    /// `W' = f(W)`: a weight that a mask computed from `W` itself prunes (PST:
    /// `M(S) ⊙ (W + βUV)` with the scores `S` built on `|W + βUV|`), made when the merge
    /// reaches it; the merge reports each one's zeros ([`crate::merge::MergeReport::pruned`]).
    Masked(Arc<dyn MaskedWeight>),
    /// `W' = Q(f(W))`: a weight the method quantized with a quantizer it learned (L4Q:
    /// `Q(W + (α/r)·B A)` with trained steps and offsets per group). A merge into a Hugging
    /// Face folder writes the dequantized values `w̄·s + b`; a GGUF export writes the learned
    /// codes, steps and offsets themselves ([`LearnedQuantization::quantized`]).
    Quantized(Arc<dyn LearnedQuantization>),
}

/// The merged weight of an [`Update::Quantized`], made from the base weight.
pub trait LearnedQuantization: Send + Sync {
    /// The base weight's shape, `[out, in]`.
    fn dims(&self) -> Vec<usize>;
    /// `w̄·s + b` for the base weight `w` (f32, `[out, in]`): what the layer computes with.
    fn apply(&self, w: &Tensor) -> candle_core::Result<Tensor>;
    /// The integer codes with their steps and offsets, for the base weight `w`.
    fn quantized(&self, w: &Tensor) -> anyhow::Result<GroupCodes>;
}

/// A matrix as integer codes with a step and an offset per group of `group_size` consecutive
/// values of a row: value `j` of row `i` is `codes[i·cols + j]·steps[g] + offsets[g]`, `g = i ·
/// (cols / group_size) + j / group_size`.
#[derive(Clone, Debug)]
pub struct GroupCodes {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group_size: usize,
    pub codes: Vec<u8>,
    pub steps: Vec<f32>,
    pub offsets: Vec<f32>,
    /// How many codes would differ if they were re-derived from the steps and offsets rounded
    /// to f16 (what a GGUF Q4_1 block stores) instead of taken as learned.
    pub changed_by_f16: usize,
}

/// The merged weight of an [`Update::Masked`], made from the base weight.
pub trait MaskedWeight: Send + Sync {
    /// The base weight's shape, `[out, in]`.
    fn dims(&self) -> Vec<usize>;
    /// `f(W)` for the base weight `w` (f32, `[out, in]`): the method's own forward-pass
    /// function, so that a merged model computes what the unmerged one does.
    fn apply(&self, w: &Tensor) -> candle_core::Result<Tensor>;
}

impl Update {
    /// The shape the update fixes: `Δ`'s for the additive forms, `s`'s (broadcast against `W`)
    /// for [`Update::Scale`].
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Update::Add(d) | Update::RowRescaled { delta: d, .. } => d.dims(),
            Update::Scale(s) => s.dims().to_vec(),
            Update::Masked(m) => m.dims(),
            Update::Quantized(q) => q.dims(),
        }
    }
}

/// An additive change `Δ` of a base tensor.
#[derive(Clone)]
pub enum Delta {
    /// `Δ` itself.
    Dense(Tensor),
    /// `Δ = s·B A` kept as its factors `b: [out, r]`, `a: [r, in]` until a merge reaches the
    /// tensor, so that a merge holds one dense `Δ` at a time (LoRA, Hu et al. 2021, eq. 3;
    /// peft `lora.Linear.get_delta_weight`). With `transposed`, `Δ = s·(B A)ᵀ`: LoRA on an
    /// embedding table, whose factors peft stores as `lora_embedding_A: [r, vocab]` and
    /// `lora_embedding_B: [dim, r]` (peft `lora.Embedding.get_delta_weight`).
    LowRank {
        b: Tensor,
        a: Tensor,
        scale: f64,
        transposed: bool,
    },
}

impl Delta {
    /// `Δ`'s shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Delta::Dense(d) => d.dims().to_vec(),
            Delta::LowRank {
                b, a, transposed, ..
            } => {
                let (out, inp) = (b.dims()[0], a.dims()[a.rank() - 1]);
                match transposed {
                    false => vec![out, inp],
                    true => vec![inp, out],
                }
            }
        }
    }

    /// `Δ` as a dense tensor (multiplied out for [`Delta::LowRank`]).
    pub fn dense(&self) -> candle_core::Result<Tensor> {
        match self {
            Delta::Dense(d) => Ok(d.clone()),
            Delta::LowRank {
                b,
                a,
                scale,
                transposed,
            } => {
                let ba = b.matmul(a)?;
                let ba = if *transposed { ba.t()? } else { ba };
                ba * *scale
            }
        }
    }
}

/// An adapter as a plain PEFT LoRA ([`Tuner::plain_lora`]): a `LORA` config and the tensors
/// under LoRA's keys.
pub struct PlainLora {
    pub config: AdapterConfig,
    pub tensors: Vec<(String, Tensor)>,
}

/// What a method that acts between optimizer steps ([`Tuner::before_step`]: IST's rollouts)
/// may ask of the trainer.
pub trait LossProbe {
    /// The mean loss of the step's first micro-batch (the one rank 0 trains first, the same on
    /// every rank) with the adapter as it is now: eval mode (no dropout), its gradient never
    /// taken. A batch with no trained token is an error.
    fn loss(&mut self) -> Result<f64>;
}

/// What every method provides beyond its hook points. A method implements [`Tuner::core`]
/// and [`Tuner::updates`]; the rest defaults to what its [`TunerCore`] holds ([`Tuner::finish`]
/// to the checks for a method on linear layers).
pub trait Tuner: ModelHook {
    /// The state every tuner holds ([`TunerCore`]).
    fn core(&self) -> &dyn AnyTunerCore;
    /// Its registry entry (PEFT's `peft_type`, the CLI name).
    fn method(&self) -> &'static Method {
        self.core().method()
    }
    /// The train/eval switch and step its layers read.
    fn mode(&self) -> &Arc<TrainingClock> {
        self.core().clock()
    }
    /// Called once the model is built. Fails when a `target_modules` entry matched nothing
    /// (unless `allow_unmatched`), when nothing was targeted, or when a loaded adapter had
    /// tensors that found no module. Returns what each entry matched. The default is the
    /// checks of a method on linear layers; others name what they adapt.
    fn finish(&self) -> Result<Vec<MatchReport>> {
        self.core()
            .check_finished("target_modules matched no linear layer of the model")
    }
    /// Trainable tensors under their PEFT on-disk keys, sorted by key.
    fn trainable(&self) -> Vec<(String, Var)> {
        self.core().params().trainable()
    }
    /// The modules it changed, in the order the model offered them.
    fn adapted(&self) -> Vec<AdaptedModule> {
        self.core().adapted_modules()
    }
    /// The method's part of `adapter_config.json`, as a final adapter is saved.
    fn config_json(&self) -> Result<serde_json::Value> {
        self.core().config_json()
    }
    /// The tensors of the final adapter under their PEFT keys: the trainable ones, unless the
    /// method converts them for saving (PiSSA/OLoRA: a rank-2r LoRA for the unchanged base).
    /// Checkpoints keep [`Tuner::trainable`] as is.
    fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .trainable()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect())
    }
    /// Frozen tensors the method derived from the base when it was built fresh (SVFit's
    /// singular vectors), under the keys it reads them back from: a checkpoint holds them
    /// beside [`Tuner::trainable`], so that a resumed run reads them rather than deriving them
    /// again (an SVD need not return the same vectors twice). Empty for most methods.
    fn frozen_state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// A term the trainer adds to each micro-batch's loss, differentiable in the trainable
    /// tensors (PELA's weight regulariser); `None` for most methods. Since gradients are
    /// averaged over micro-batches, it counts once per optimizer step. It is not in the loss
    /// that `metrics.jsonl` reports.
    fn regularizer(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// The weight of a feature-distillation term against the model the method changes, when it
    /// learns from it (PELA: `0.1 · mean over stages of MSE(student, teacher)`, see
    /// `train::distill`); `None` for most methods.
    fn distillation_weight(&self) -> Option<f64> {
        None
    }
    /// While on, the method's layers compute what the model they replace computed (the
    /// teacher of [`Tuner::distillation_weight`]); a no-op for methods without one.
    fn set_teaching(&self, _on: bool) {}
    /// How a merge changes base tensors, keyed by base tensor name (`path.weight`).
    fn updates(&self) -> Result<Vec<(String, Update)>>;
    /// Base tensors replaced outright by trained copies (`modules_to_save`, LN tuning, a
    /// table with trained token rows).
    fn replaced(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.core().saved_replaced())
    }
    /// Base elements that the trainable ones stand in for: base parameters trained in place
    /// rather than copies (LoRA's `bias = "all" | "lora_only"`), which PEFT counts once in the
    /// model total, or base weights a method replaces (PELA's factorised linears), which the
    /// adapted model no longer has.
    fn trained_in_place(&self) -> usize {
        0
    }
    /// Whether a finished run is the whole model, written as a Hugging Face folder (full
    /// fine-tuning), rather than an adapter ([`Method::trains_whole_model`]).
    fn trains_whole_model(&self) -> bool {
        self.method().trains_whole_model
    }
    /// Called by the trainer before each optimizer step `step` (0-based: the steps done), on
    /// every rank alike: a method that schedules its layers (IST) updates its state here,
    /// through `probe` when it needs the loss, and sets the step's layer gates
    /// ([`TrainingClock::set_gates`]). What it draws must be a function of the run's seed, the
    /// step and its [`Tuner::frozen_state`], so that a resumed run draws the same. Nothing for
    /// most methods.
    fn before_step(&self, _step: u64, _probe: &mut dyn LossProbe) -> Result<()> {
        Ok(())
    }
    /// The registry entry the final adapter is saved as (its `peft_type`, beside
    /// [`Tuner::config_json`]): the method's own, except for a schedule around another method
    /// (IST saves its base's plain LoRA, DoRA or bottleneck folder).
    fn saved_method(&self) -> &'static Method {
        self.method()
    }
    /// Keys of [`Tuner::trainable`] that take the learning rate `lora_embedding_lr` instead
    /// of `lr` when a run sets it (DePT's low-rank pair); empty for a method with one learning
    /// rate, where setting it is an error naming the method.
    fn lr_group_keys(&self) -> Vec<String> {
        Vec::new()
    }
    /// The largest rank of a method whose rank is chosen after training (DyLoRA's `r`: it runs
    /// at any `b` in `1..=r`); `None` for a method with one rank.
    fn max_rank(&self) -> Option<usize> {
        None
    }
    /// Runs at rank `rank` from now on (outside training): forward passes, [`Tuner::updates`]
    /// and [`Tuner::plain_lora`]. An error for a method without [`Tuner::max_rank`], or for a
    /// rank outside `1..=max_rank`, naming it.
    fn set_rank(&self, rank: usize) -> Result<()> {
        anyhow::bail!(
            "--rank {rank}: a {} adapter has one rank; --rank chooses the rank of a DyLoRA adapter",
            self.method().peft_type
        )
    }
    /// The adapter at its current rank as a plain PEFT LoRA: a `LORA` config and the tensors
    /// under LoRA's keys, which peft loads as any LoRA. `None` for a method with no such form
    /// (LoRA itself is saved as it is).
    fn plain_lora(&self) -> Result<Option<PlainLora>> {
        Ok(None)
    }
}

/// The key PEFT uses on disk for a tensor of module `path` (adapter name stripped):
/// `base_model.model.<path>.<suffix>`.
pub fn peft_key(path: &str, suffix: &str) -> String {
    format!("base_model.model.{path}.{suffix}")
}

/// Elements of all trainable tensors of `tuner`.
pub fn trainable_params(tuner: &dyn Tuner) -> usize {
    tuner.trainable().iter().map(|(_, v)| v.elem_count()).sum()
}

/// The model's parameter count with `tuner` attached, as peft's `get_nb_trainable_parameters`
/// reports it: the base (`base_params`) plus the adapter, base tensors trained in place once.
pub fn total_params(base_params: usize, tuner: &dyn Tuner) -> usize {
    base_params + trainable_params(tuner) - tuner.trained_in_place()
}
