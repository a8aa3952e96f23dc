//! The train/eval switch and step counters that a tuner's layers share: dropout draws its
//! masks only while training, seeded by the micro-step; DoRA caches its weight norm only in
//! eval; DyLoRA draws its rank once per optimizer step; PST's sparsity follows the optimizer
//! step through the run's length; IST sets a gate per decoder layer ([`LayerGate`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use candle_core::{Tensor, Var};

/// Whether the layers are training, and which micro-step it is: shared by every layer a tuner
/// creates (peft's `module.training`, plus the step that seeds dropout).
#[derive(Debug, Default)]
pub struct TrainingClock {
    training: AtomicBool,
    /// Micro-step counter: dropout masks are a pure function of (seed, step, layer), so a
    /// resumed run draws exactly the masks an uninterrupted run would.
    step: AtomicU64,
    /// Optimizer step counter: what is drawn once per step for every layer and rank (DyLoRA's
    /// rank) is a pure function of (seed, optimizer step), so a resumed run draws the same.
    optimizer_step: AtomicU64,
    /// Optimizer steps of the whole run, when a trainer runs the layers (0: none does), for
    /// schedules over the run (PST's sparsity, as the learning rate's).
    total_steps: AtomicU64,
    seed: u64,
    /// Per numbered layer (`model.layers.<i>.…`): the adapter's output scale and whether its
    /// tensors train this step. Empty: every layer at scale 1, trainable (every method but IST).
    gates: Mutex<Vec<LayerGate>>,
}

/// What a method that schedules layers (IST) sets for one numbered layer, and every adapter
/// layer in it reads: LoRA's `s·B A` (DoRA's `s` inside its norm too, as the DoRA fork's
/// `scaling`), a bottleneck's `s·U act(D z)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerGate {
    /// Multiplies the adapter's own scale `s` (IST's rollouts: 0.25, the reference's
    /// `response_suppression_factor`, ist.py `switch_active_adapter`).
    pub scale: f64,
    /// The layer's adapter tensors take no gradient in a training forward pass (torch's
    /// `requires_grad = False`, ist.py `switch_active_layers`): the optimizer then skips them.
    pub frozen: bool,
}

impl Default for LayerGate {
    fn default() -> Self {
        LayerGate {
            scale: 1.0,
            frozen: false,
        }
    }
}

impl TrainingClock {
    /// Eval mode at step 0; `seed` seeds every dropout mask.
    pub fn new(seed: u64) -> Self {
        Self {
            training: AtomicBool::new(false),
            step: AtomicU64::new(0),
            optimizer_step: AtomicU64::new(0),
            total_steps: AtomicU64::new(0),
            seed,
            gates: Mutex::new(Vec::new()),
        }
    }
    /// Sets every numbered layer's gate (`gates[i]` for layer `i`; a layer past the end, or a
    /// module in no numbered layer, keeps the default: scale 1, trainable).
    pub fn set_gates(&self, gates: Vec<LayerGate>) {
        *self.gates.lock().unwrap() = gates
    }
    /// The gate of the numbered layer that holds the module at `path` (the first number in
    /// the path, as `layers_to_transform` counts: `model.layers.3.mlp.up_proj` is layer 3).
    pub fn gate(&self, path: &str) -> LayerGate {
        let gates = self.gates.lock().unwrap();
        if gates.is_empty() {
            return LayerGate::default();
        }
        super::target::layer_index(path, None)
            .and_then(|i| gates.get(i).copied())
            .unwrap_or_default()
    }
    /// `var` as the forward pass of a module with gate `gate` uses it: detached (no gradient,
    /// so no update this step) when the layer is frozen and training, else tracked.
    pub fn tracked(&self, gate: LayerGate, var: &Var) -> Tensor {
        match gate.frozen && self.training() {
            true => var.as_tensor().detach(),
            false => var.as_tensor().clone(),
        }
    }
    /// Train (dropout on, DoRA's norm recomputed) or eval.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed)
    }
    /// Whether the layers are training.
    pub fn training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }
    /// The micro-step the next forward pass belongs to.
    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed)
    }
    /// The optimizer step the next forward passes belong to (all its micro-batches, on every rank).
    pub fn set_optimizer_step(&self, step: u64) {
        self.optimizer_step.store(step, Ordering::Relaxed)
    }
    /// The optimizer step the next forward passes belong to: while training the step being
    /// taken (0-based), in an evaluation between steps the number of steps done.
    pub fn optimizer_step(&self) -> u64 {
        self.optimizer_step.load(Ordering::Relaxed)
    }
    /// The run's length in optimizer steps (what the learning-rate schedule spans).
    pub fn set_total_steps(&self, steps: u64) {
        self.total_steps.store(steps, Ordering::Relaxed)
    }
    /// The run's length in optimizer steps; `None` outside a training run (an adapter loaded
    /// for evaluation, merge or generation).
    pub fn total_steps(&self) -> Option<u64> {
        Some(self.total_steps.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }
    /// Seed for what `what` draws once per optimizer step (the same in every layer that asks
    /// with the same name, on every rank and micro-batch of the step).
    pub fn optimizer_step_seed(&self, what: &str) -> u64 {
        crate::init::seed_for(
            self.seed
                ^ self
                    .optimizer_step
                    .load(Ordering::Relaxed)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15),
            what,
        )
    }
    /// Seed for the dropout mask of `layer` at the current step.
    pub fn dropout_seed(&self, layer: &str) -> u64 {
        crate::init::seed_for(
            self.seed
                ^ self
                    .step
                    .load(Ordering::Relaxed)
                    .wrapping_mul(0x2545_F491_4F6C_DD1D),
            layer,
        )
    }
}

/// The inverted-dropout mask (Srivastava et al. 2014) for `x`, seeded: each element kept with
/// probability 1 − p and scaled by 1/(1 − p), else 0. `None` when `p` is 0.
pub fn dropout_mask(
    x: &candle_core::Tensor,
    p: f64,
    seed: u64,
) -> candle_core::Result<Option<candle_core::Tensor>> {
    if p <= 0.0 {
        return Ok(None);
    }
    let mut rng = crate::train::rng::Rng::seed_from_u64(seed);
    let mask = crate::train::rng::dropout_mask(&mut rng, x.shape(), p, x.device())
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Ok(Some(mask.to_dtype(x.dtype())?))
}
