//! ZeRO data parallelism (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
//! Trillion Parameter Models", SC 2020) over a [`Collective`], for the trainable parameters.
//!
//! Every rank computes the weighted gradient sums of its share of the global batch; one
//! [`ZeroOptimizer::step`] turns them into the token-weighted mean over the whole global batch
//! and applies AdamW:
//!
//! | stage | gradients | AdamW state | parameters | sent per step (Ψ = trainable elements, ×4 bytes) |
//! |---|---|---|---|---|
//! | 0 | all-reduced | every rank, whole | every rank | all-reduce Ψ (`2Ψ`) |
//! | 1 | all-reduced | its partition | every rank, all-gathered after the update | all-reduce + all-gather (`3Ψ`) |
//! | 2 | reduce-scattered | its partition | every rank, all-gathered after the update | reduce-scatter + all-gather (`2Ψ`) |
//! | 3 | reduce-scattered | its partition | its partition; all-gathered before use | reduce-scatter + all-gather (`2Ψ`) |
//!
//! Stage 1 here all-reduces the full gradient, as the paper describes it (§5.1: "each process
//! ... updates its partition"), then gathers the parameters; DeepSpeed's stage 1 reduce-scatters
//! instead. At stage 3 the paper gathers each layer's parameters in the forward and again in
//! the backward pass (`3Ψ`); ferrule gathers the trainable parameters once per step, before the
//! forward pass, and keeps them through the backward pass: PEFT's trainable parameters are a
//! small share of the model, and the frozen base is sharded separately.
//!
//! Every stage computes the same update (the partitioned AdamW, [`ShardedAdamW`], applies
//! [`crate::train::AdamW`]'s update function to its slice of each parameter), so every stage trains the
//! same adapter up to float summation order (`tests/distributed.rs` checks it). bitsandbytes'
//! optimizers (`adamw_8bit`, `paged_adamw_8bit`, `paged_adamw_32bit`) partition their state
//! the same way ([`super::sharded_bnb`]: whole 8-bit blocks on each rank). GaLore does not: its
//! projector takes the SVD of each target's whole gradient matrix, which a partition cuts.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::collective::Collective;
use super::partition::FlatLayout;
use super::sharded_bnb::{alignment, consolidate_pieces, ShardedBnb};
use crate::ops::recompute::GradHook;
use crate::train::optim::{
    adamw_update, build_optimizer, clip_grad_norm, grad_norm, read_step, step_tensor, AdamWConfig,
    LayerwiseStepper, OptimName, Optimizer, OptimizerSpec,
};

/// A ZeRO stage, 0 to 3 (`--zero-stage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct ZeroStage(u8);

impl ZeroStage {
    pub fn new(stage: u8) -> Result<ZeroStage> {
        ensure!(stage <= 3, "--zero-stage is {stage}, expected 0, 1, 2 or 3");
        Ok(ZeroStage(stage))
    }
    pub fn get(self) -> u8 {
        self.0
    }
    /// Whether the AdamW state is partitioned (stages 1–3).
    pub fn partitions_optimizer(self) -> bool {
        self.0 >= 1
    }
}

impl TryFrom<u8> for ZeroStage {
    type Error = anyhow::Error;
    fn try_from(v: u8) -> Result<Self> {
        ZeroStage::new(v)
    }
}
impl From<ZeroStage> for u8 {
    fn from(s: ZeroStage) -> u8 {
        s.0
    }
}

/// The counts of one step that are summed over ranks with the gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTotals {
    /// Σ loss·n over micro-batches (n = counted targets of each).
    pub loss_sum: f64,
    /// Counted targets (tokens, or examples for classification): the loss's denominator.
    pub trained: f64,
    /// Non-padding tokens.
    pub tokens: f64,
    /// Positions, padding included.
    pub positions: f64,
}

/// What [`ZeroOptimizer::step`] computed, the same on every rank.
#[derive(Clone, Copy, Debug)]
pub struct StepResult {
    /// Summed over the whole global batch.
    pub totals: StepTotals,
    /// L2 norm of the mean gradient, before clipping.
    pub grad_norm: f64,
}

/// This rank's optimizer state, as a checkpoint holds it.
pub enum OptimizerState {
    /// The whole state ([`Optimizer::state`]'s keys), the same on every rank (stage 0).
    Full(Vec<(String, Tensor)>),
    /// This rank's partition ([`ShardedAdamW::state`]'s keys) and the flat layout as JSON.
    Shard(Vec<(String, Tensor)>, serde_json::Value),
}

/// AdamW over one rank's partition of the flat parameter vector: ZeRO's partitioned optimizer
/// state (`exp_avg`, `exp_avg_sq` and an `f32` master copy of the partition's parameters).
///
/// The update is [`crate::train::AdamW`]'s own (`train::optim::adamw_update`, element-wise) applied to the
/// partition's slice of each parameter, in `f32`; as in torch, a parameter without a gradient in a step is skipped and its own step count
/// (which drives its bias corrections) does not advance.
pub struct ShardedAdamW {
    cfg: AdamWConfig,
    range: Range<usize>,
    params: Vec<f32>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    /// Updates applied to each parameter (every segment, not just this partition's).
    steps: Vec<u64>,
    step: u64,
}

impl ShardedAdamW {
    /// The optimizer for partition `range` of `flat_params` (the padded flat vector).
    pub fn new(
        layout: &FlatLayout,
        range: Range<usize>,
        flat_params: &[f32],
        cfg: AdamWConfig,
    ) -> ShardedAdamW {
        let n = range.len();
        ShardedAdamW {
            cfg,
            params: flat_params[range.clone()].to_vec(),
            range,
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
            steps: vec![0; layout.segments.len()],
            step: 0,
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// The partition's parameters (master copy).
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// One update with the partition's mean gradient `grads` (clipped already); `present[s]`
    /// says whether segment `s` had a gradient on any rank.
    pub fn update(&mut self, layout: &FlatLayout, grads: &[f32], present: &[f64]) -> Result<()> {
        ensure!(
            grads.len() == self.range.len(),
            "partition gradient of {} elements, expected {}",
            grads.len(),
            self.range.len()
        );
        let lo = self.range.start;
        for (seg, r) in layout.overlaps(self.range.clone()) {
            if present[seg] == 0.0 {
                continue;
            }
            let local = r.start - lo..r.end - lo;
            let slice =
                |v: &[f32]| Tensor::from_slice(&v[local.clone()], local.len(), &Device::Cpu);
            let moments = (slice(&self.exp_avg)?, slice(&self.exp_avg_sq)?);
            let (p, m, v) = adamw_update(
                &self.cfg,
                self.steps[seg] + 1,
                &slice(&self.params)?,
                &slice(grads)?,
                Some((&moments.0, &moments.1)),
            )?;
            self.params[local.clone()].copy_from_slice(&p.to_vec1::<f32>()?);
            self.exp_avg[local.clone()].copy_from_slice(&m.to_vec1::<f32>()?);
            self.exp_avg_sq[local].copy_from_slice(&v.to_vec1::<f32>()?);
        }
        for (s, p) in self.steps.iter_mut().zip(present) {
            if *p > 0.0 {
                *s += 1;
            }
        }
        self.step += 1;
        Ok(())
    }

    /// This partition's state: `exp_avg` and `exp_avg_sq` (`f32` `[partition_len]`), each
    /// parameter's `<name>.step` and the global `step` (`i64` scalars, as [`crate::train::AdamW::state`]).
    pub fn state(&self, layout: &FlatLayout) -> Result<Vec<(String, Tensor)>> {
        let n = self.range.len();
        let mut out = vec![
            (
                "exp_avg".to_string(),
                Tensor::from_slice(&self.exp_avg, n, &Device::Cpu)?,
            ),
            (
                "exp_avg_sq".to_string(),
                Tensor::from_slice(&self.exp_avg_sq, n, &Device::Cpu)?,
            ),
        ];
        for (s, steps) in layout.segments.iter().zip(&self.steps) {
            out.push((format!("{}.step", s.name), step_tensor(*steps)?));
        }
        out.push(("step".to_string(), step_tensor(self.step)?));
        Ok(out)
    }

    /// Restores [`ShardedAdamW::state`]'s output, or cuts this partition out of a whole
    /// [`crate::train::AdamW::state`] (a world-size-1 checkpoint, e.g. one `ferrule checkpoint consolidate`
    /// wrote).
    pub fn load_state(
        &mut self,
        layout: &FlatLayout,
        state: &BTreeMap<String, Tensor>,
        sharded: bool,
    ) -> Result<()> {
        let (m, v) = if sharded {
            (
                read_f32(state, "exp_avg", self.range.len())?,
                read_f32(state, "exp_avg_sq", self.range.len())?,
            )
        } else {
            let mut m = vec![0f32; self.range.len()];
            let mut v = vec![0f32; self.range.len()];
            for (seg, r) in layout.overlaps(self.range.clone()) {
                let s = &layout.segments[seg];
                let whole_m = read_f32(state, &format!("{}.exp_avg", s.name), s.len)?;
                let whole_v = read_f32(state, &format!("{}.exp_avg_sq", s.name), s.len)?;
                for i in r {
                    m[i - self.range.start] = whole_m[i - s.offset];
                    v[i - self.range.start] = whole_v[i - s.offset];
                }
            }
            (m, v)
        };
        let mut steps = Vec::with_capacity(layout.segments.len());
        for s in &layout.segments {
            steps.push(read_step(state, &format!("{}.step", s.name))?);
        }
        self.step = read_step(state, "step")?;
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.steps = steps;
        Ok(())
    }
}

fn read_f32(state: &BTreeMap<String, Tensor>, key: &str, len: usize) -> Result<Vec<f32>> {
    let t = state
        .get(key)
        .with_context(|| format!("optimizer state is missing {key:?}"))?;
    ensure!(
        t.elem_count() == len,
        "optimizer state {key:?} has {} elements, expected {len}",
        t.elem_count()
    );
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// The optimizer over this rank's partition: AdamW's or bitsandbytes'.
enum Partitioned {
    AdamW(ShardedAdamW),
    /// Boxed: bitsandbytes' dynamic maps make it large.
    Bnb(Box<ShardedBnb>),
}

impl Partitioned {
    fn set_lr(&mut self, lr: f64) {
        match self {
            Partitioned::AdamW(o) => o.set_lr(lr),
            Partitioned::Bnb(o) => o.set_lr(lr),
        }
    }

    /// The partition's parameters.
    fn params(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        Ok(match self {
            Partitioned::AdamW(o) => o.params().into(),
            Partitioned::Bnb(o) => o.params()?.into(),
        })
    }

    fn update(&mut self, layout: &FlatLayout, grads: &[f32], present: &[f64]) -> Result<()> {
        match self {
            Partitioned::AdamW(o) => o.update(layout, grads, present),
            Partitioned::Bnb(o) => o.update(layout, grads, present),
        }
    }

    fn state(&self, layout: &FlatLayout) -> Result<Vec<(String, Tensor)>> {
        match self {
            Partitioned::AdamW(o) => o.state(layout),
            Partitioned::Bnb(o) => o.state(),
        }
    }

    fn load_state(
        &mut self,
        layout: &FlatLayout,
        state: &BTreeMap<String, Tensor>,
        sharded: bool,
    ) -> Result<()> {
        match self {
            Partitioned::AdamW(o) => o.load_state(layout, state, sharded),
            Partitioned::Bnb(o) => o.load_state(layout, state, sharded),
        }
    }
}

enum Inner {
    Replicated(Box<dyn Optimizer>),
    Sharded(Partitioned),
    /// A layer-wise optimizer (one process): most parameters step during the backward pass.
    Layerwise(Arc<LayerwiseStepper>),
}

/// An optimizer over data-parallel ranks at one ZeRO stage (see the module docs): at stage 0
/// any [`OptimName`], replicated on every rank; at stages 1–3 AdamW or bitsandbytes' AdamW
/// over this rank's partition.
pub struct ZeroOptimizer {
    stage: ZeroStage,
    vars: Vec<(String, Var)>,
    layout: FlatLayout,
    inner: Inner,
    /// Stage 3: the model's variables lag behind the partitions (gather before use).
    stale: bool,
}

impl ZeroOptimizer {
    /// AdamW over `vars` (the same list, in the same order, on every rank).
    pub fn new(
        vars: Vec<(String, Var)>,
        cfg: AdamWConfig,
        stage: ZeroStage,
        comm: &dyn Collective,
    ) -> Result<ZeroOptimizer> {
        Self::with_optimizer(vars, &OptimizerSpec::adamw(cfg), stage, comm)
    }

    /// The optimizer `spec` names over `vars` (the same list, in the same order, on every
    /// rank). Stages 1–3 partition the state of `adamw`, `adamw_8bit`, `paged_adamw_8bit` and
    /// `paged_adamw_32bit` over the ranks; GaLore there is an error saying why.
    pub fn with_optimizer(
        vars: Vec<(String, Var)>,
        spec: &OptimizerSpec,
        stage: ZeroStage,
        comm: &dyn Collective,
    ) -> Result<ZeroOptimizer> {
        if stage.partitions_optimizer() && spec.name.is_galore() {
            bail!(
                "--optim {} cannot run at --zero-stage {}: GaLore projects each target's whole gradient matrix (an SVD of it every update_proj_gap steps), and stages 1-3 cut the parameters into flat partitions across the ranks; use --zero-stage 0 (every rank keeps the whole GaLore state) or another --optim",
                spec.name,
                stage.get()
            )
        }
        if stage.partitions_optimizer() && !spec.lr_groups.is_empty() {
            bail!(
                "lora_embedding_lr (--lora-embedding-lr) cannot run at --zero-stage {}: the partitioned optimizers hold one learning rate for the flat parameter vector; use --zero-stage 0, or leave lora_embedding_lr unset (one rate, lr)",
                stage.get()
            )
        }
        if spec.name.is_layerwise() && comm.world_size() > 1 {
            bail!(
                "--optim {} runs in one process: each layer steps during the backward pass, before ranks could average its gradient; use --optim {} across ranks",
                spec.name,
                spec.name.whole_step()
            )
        }
        let cfg = spec.adamw;
        let align = match stage.partitions_optimizer() {
            true => alignment(spec.name),
            false => 1,
        };
        let layout = FlatLayout::of_vars(&vars, comm.world_size(), align);
        let inner = if spec.name.is_layerwise() {
            let opt = build_optimizer(vars.clone(), spec)?;
            Inner::Layerwise(Arc::new(LayerwiseStepper::new(opt, &vars)))
        } else if stage.partitions_optimizer() {
            let flat = layout.flatten_vars(&vars)?;
            let range = layout.partition(comm.rank());
            Inner::Sharded(match spec.name {
                OptimName::Adamw => {
                    Partitioned::AdamW(ShardedAdamW::new(&layout, range, &flat, cfg))
                }
                _ => Partitioned::Bnb(Box::new(ShardedBnb::new(&layout, range, &flat, spec)?)),
            })
        } else {
            Inner::Replicated(build_optimizer(vars.clone(), spec)?)
        };
        Ok(ZeroOptimizer {
            stage,
            vars,
            layout,
            inner,
            stale: false,
        })
    }

    pub fn stage(&self) -> ZeroStage {
        self.stage
    }

    /// For a layer-wise optimizer, the hook that steps each parameter as its recomputed
    /// layer's backward ends ([`crate::ops::recompute::GradSink::with_hook`]).
    pub fn layerwise_hook(&self) -> Option<GradHook> {
        match &self.inner {
            Inner::Layerwise(stepper) => Some(stepper.hook()),
            _ => None,
        }
    }

    /// Sets the learning rate before a step's backward pass, which a layer-wise optimizer
    /// steps in ([`ZeroOptimizer::step`] sets it for the others).
    pub fn set_lr(&mut self, lr: f64) {
        if let Inner::Layerwise(stepper) = &self.inner {
            stepper.set_lr(lr)
        }
    }

    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// Makes the model's trainable variables current (stage 3 all-gathers the partitions;
    /// other stages hold them already). Call on every rank before a forward pass, an
    /// evaluation or saving the adapter.
    pub fn materialize(&mut self, comm: &dyn Collective) -> Result<()> {
        if !self.stale {
            return Ok(());
        }
        let Inner::Sharded(opt) = &self.inner else {
            unreachable!("only partitioned parameters go stale")
        };
        let mut full = vec![0f32; self.layout.padded_len()];
        comm.all_gather_f32(&opt.params()?, &mut full)?;
        self.layout.write_vars(&full, &self.vars)?;
        self.stale = false;
        Ok(())
    }

    /// One optimizer step from this rank's gradient sums `sums` (Σ nᵢ·gᵢ over its
    /// micro-batches, by parameter name) and counts `local`: the gradient applied is the sum
    /// over all ranks divided by the global number of counted targets, clipped to
    /// `max_grad_norm` (torch's `clip_grad_norm_` semantics; `None` or 0: not clipped), at
    /// learning rate `lr`.
    ///
    /// Errors when the whole global batch counted no target.
    pub fn step(
        &mut self,
        comm: &dyn Collective,
        sums: HashMap<String, Tensor>,
        local: StepTotals,
        max_grad_norm: Option<f64>,
        lr: f64,
    ) -> Result<StepResult> {
        ensure!(!self.stale, "ZeroOptimizer::step before materialize");
        let world = comm.world_size();
        let single_replica = world == 1 && !self.stage.partitions_optimizer();
        // One small f64 all-reduce: the counts and which parameters had a gradient anywhere.
        let (flat, present) = if single_replica {
            let present = self
                .layout
                .segments
                .iter()
                .map(|s| if sums.contains_key(&s.name) { 1.0 } else { 0.0 })
                .collect();
            (Vec::new(), present)
        } else {
            self.layout.flatten(&sums)?
        };
        let mut counts = vec![local.loss_sum, local.trained, local.tokens, local.positions];
        counts.extend_from_slice(&present);
        comm.all_reduce_sum_f64(&mut counts)?;
        let totals = StepTotals {
            loss_sum: counts[0],
            trained: counts[1],
            tokens: counts[2],
            positions: counts[3],
        };
        let present = &counts[4..];
        if totals.trained <= 0.0 {
            bail!("the global batch holds no trained token (every label is masked in all its micro-batches)")
        }
        let max_norm = max_grad_norm.filter(|&m| m > 0.0 && m.is_finite());
        let grad_norm = match &mut self.inner {
            Inner::Replicated(opt) => {
                let mut sums = sums;
                if !single_replica {
                    let mut flat = flat;
                    comm.all_reduce_sum_f32(&mut flat)?;
                    sums = self.layout.unflatten(
                        &flat,
                        |i| present[i] > 0.0,
                        self.vars[0].1.device(),
                    )?;
                }
                let mut grads: HashMap<String, Tensor> = sums
                    .into_iter()
                    .map(|(k, t)| Ok((k, (t / totals.trained)?)))
                    .collect::<Result<_>>()?;
                let norm = match max_norm {
                    Some(max_norm) => clip_grad_norm(&mut grads, max_norm)?,
                    None => grad_norm(&grads)?,
                };
                ensure_finite_norm(norm)?;
                opt.set_lr(lr);
                opt.step_with(&grads)?;
                norm
            }
            Inner::Layerwise(stepper) => {
                // One process, one micro-batch: the layers stepped on this same division.
                let rest: HashMap<String, Tensor> = sums
                    .into_iter()
                    .map(|(k, t)| Ok((k, (t / totals.trained)?)))
                    .collect::<Result<_>>()?;
                stepper.finish(&rest)?
            }
            Inner::Sharded(opt) => {
                let range = self.layout.partition(comm.rank());
                let mut part = if self.stage.get() == 1 {
                    let mut flat = flat;
                    comm.all_reduce_sum_f32(&mut flat)?;
                    flat[range].to_vec()
                } else {
                    let mut part = vec![0f32; self.layout.partition_len];
                    comm.reduce_scatter_sum_f32(&flat, &mut part)?;
                    part
                };
                // The tensor path's `t / n` is candle's affine(1/n, 0) in f32.
                let inv = (1.0 / totals.trained) as f32;
                part.iter_mut().for_each(|g| *g = *g * inv + 0.0);
                let mut sq = [part.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>()];
                comm.all_reduce_sum_f64(&mut sq)?;
                let norm = sq[0].sqrt();
                ensure_finite_norm(norm)?; // the same sum on every rank: all stop together
                let coef = max_norm.map_or(1.0, |m| m / (norm + 1e-6));
                if coef < 1.0 {
                    let c = coef as f32;
                    part.iter_mut().for_each(|g| *g = *g * c + 0.0);
                }
                opt.set_lr(lr);
                opt.update(&self.layout, &part, present)?;
                if self.stage.get() == 3 {
                    self.stale = true;
                } else {
                    let mut full = vec![0f32; self.layout.padded_len()];
                    comm.all_gather_f32(&opt.params()?, &mut full)?;
                    self.layout.write_vars(&full, &self.vars)?;
                }
                norm
            }
        };
        Ok(StepResult { totals, grad_norm })
    }

    /// This rank's state for a checkpoint.
    pub fn state(&self) -> Result<OptimizerState> {
        Ok(match &self.inner {
            Inner::Replicated(opt) => OptimizerState::Full(opt.state()?),
            Inner::Layerwise(stepper) => OptimizerState::Full(stepper.state()?),
            Inner::Sharded(opt) => {
                OptimizerState::Shard(opt.state(&self.layout)?, self.layout.to_json())
            }
        })
    }

    /// Restores this rank's state: a shard written at the same stage and world size
    /// (`sharded`), or a whole world-size-1 state.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, sharded: bool) -> Result<()> {
        match &mut self.inner {
            Inner::Replicated(opt) => {
                ensure!(!sharded, "a partitioned optimizer state cannot be loaded at ZeRO stage 0; consolidate the checkpoint first");
                opt.load_state(state)
            }
            Inner::Layerwise(stepper) => {
                ensure!(!sharded, "a partitioned optimizer state cannot be loaded by a layer-wise optimizer; consolidate the checkpoint first");
                stepper.load_state(state)
            }
            Inner::Sharded(opt) => opt.load_state(&self.layout, state, sharded),
        }
    }
}

/// Joins the optimizer shards of every rank (in rank order, each with the layout it was
/// written with) into one world-size-1 state with [`crate::train::AdamW::state`]'s keys, or
/// [`crate::train::optim::BnbAdamW::state`]'s for bitsandbytes' shards ([`consolidate_pieces`]).
pub fn consolidate_shards(
    shards: &[BTreeMap<String, Tensor>],
    layout: &FlatLayout,
) -> Result<Vec<(String, Tensor)>> {
    ensure!(
        shards.len() == layout.world,
        "{} optimizer shards for a layout over {} ranks",
        shards.len(),
        layout.world
    );
    if !shards.iter().any(|s| s.contains_key("exp_avg")) {
        // Not ShardedAdamW's flat moments: bitsandbytes' state, per parameter piece.
        return consolidate_pieces(shards, layout);
    }
    let mut m = Vec::with_capacity(layout.padded_len());
    let mut v = Vec::with_capacity(layout.padded_len());
    for s in shards {
        m.extend(read_f32(s, "exp_avg", layout.partition_len)?);
        v.extend(read_f32(s, "exp_avg_sq", layout.partition_len)?);
    }
    let first = &shards[0];
    let mut out = Vec::new();
    for seg in &layout.segments {
        let key = format!("{}.step", seg.name);
        let step = read_step(first, &key)?;
        for s in &shards[1..] {
            ensure!(
                read_step(s, &key)? == step,
                "optimizer shards disagree on {key:?}"
            );
        }
        let r = seg.offset..seg.offset + seg.len;
        out.push((
            format!("{}.exp_avg", seg.name),
            Tensor::from_slice(&m[r.clone()], seg.shape.as_slice(), &Device::Cpu)?,
        ));
        out.push((
            format!("{}.exp_avg_sq", seg.name),
            Tensor::from_slice(&v[r], seg.shape.as_slice(), &Device::Cpu)?,
        ));
        out.push((key, step_tensor(step)?));
    }
    out.push(("step".to_string(), step_tensor(read_step(first, "step")?)?));
    Ok(out)
}

/// Refuses an update from a NaN or infinite gradient (it would make every trained value NaN).
/// torch's `clip_grad_norm_` leaves this to the caller (`error_if_nonfinite=False`).
fn ensure_finite_norm(norm: f64) -> Result<()> {
    ensure!(
        norm.is_finite(),
        "the gradient norm is {norm}: a gradient is NaN or infinite (the parameters were not updated); lower the learning rate or check the data"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleProcess;
    use crate::train::optim::AdamW;

    fn vars() -> Vec<(String, Var)> {
        let dev = Device::Cpu;
        vec![
            (
                "a".to_string(),
                Var::from_tensor(
                    &Tensor::new(&[[0.5f32, -1.0, 2.0], [0.25, 3.0, -0.75]], &dev).unwrap(),
                )
                .unwrap(),
            ),
            (
                "b".to_string(),
                Var::from_tensor(&Tensor::new(&[1.5f32, -0.5], &dev).unwrap()).unwrap(),
            ),
        ]
    }

    fn grads(step: usize) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let s = step as f32 + 1.0;
        let mut g = HashMap::from([(
            "a".to_string(),
            Tensor::new(&[[0.3f32 * s, -0.2, 0.1], [0.05, -0.4 * s, 0.9]], &dev).unwrap(),
        )]);
        if step != 1 {
            // "b" has no gradient at step 1: skipped, its step count does not advance.
            g.insert(
                "b".to_string(),
                Tensor::new(&[-0.7f32 * s, 0.2], &dev).unwrap(),
            );
        }
        g
    }

    fn values(v: &[(String, Var)]) -> Vec<f32> {
        v.iter()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }

    /// The partitioned optimizer (one rank owning everything) computes AdamW's update bit for
    /// bit: decay, skipped parameters, clipping and the token-weighted mean included.
    #[test]
    fn every_stage_equals_adamw_on_one_rank() {
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.05,
            ..Default::default()
        };
        let reference = vars();
        let mut adamw = AdamW::new(reference.clone(), cfg);
        let mut expected = Vec::new();
        for step in 0..4 {
            let mut g: HashMap<String, Tensor> = grads(step)
                .into_iter()
                .map(|(k, t)| (k, (t / 3.0).unwrap()))
                .collect();
            clip_grad_norm(&mut g, 0.5).unwrap();
            adamw.step_with(&g).unwrap();
            expected.push(values(&reference));
        }
        for stage in 0..=3 {
            let v = vars();
            let mut opt = ZeroOptimizer::new(
                v.clone(),
                cfg,
                ZeroStage::new(stage).unwrap(),
                &SingleProcess,
            )
            .unwrap();
            for (step, want) in expected.iter().enumerate() {
                opt.materialize(&SingleProcess).unwrap();
                let local = StepTotals {
                    loss_sum: 6.0,
                    trained: 3.0,
                    tokens: 4.0,
                    positions: 5.0,
                };
                let r = opt
                    .step(&SingleProcess, grads(step), local, Some(0.5), 0.1)
                    .unwrap();
                assert_eq!(r.totals, local);
                opt.materialize(&SingleProcess).unwrap();
                assert_eq!(&values(&v), want, "stage {stage}, step {step}");
            }
        }
    }

    /// No bound (`None`, or 0 as `--max-grad-norm 0` spells it) steps without clipping at every
    /// stage, and reports the norm.
    #[test]
    fn no_bound_or_zero_steps_unclipped_at_every_stage() {
        let cfg = AdamWConfig {
            lr: 0.1,
            ..Default::default()
        };
        let local = StepTotals {
            trained: 1.0,
            ..Default::default()
        };
        let want = grads(0);
        let norm = grad_norm(&want).unwrap();
        assert!(norm > 1.0, "the default bound of 1 must clip this gradient");
        let mut reference = AdamW::new(vars(), cfg);
        reference.step_with(&want).unwrap();
        let expected: Vec<f32> = reference
            .params()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        for (stage, bound) in (0..=3).flat_map(|s| [(s, None), (s, Some(0.0))]) {
            let v = vars();
            let mut opt = ZeroOptimizer::new(
                v.clone(),
                cfg,
                ZeroStage::new(stage).unwrap(),
                &SingleProcess,
            )
            .unwrap();
            let r = opt
                .step(&SingleProcess, grads(0), local, bound, 0.1)
                .unwrap();
            // The partitioned norm sums squares in f64, the tensor one in f32.
            assert!(
                (r.grad_norm - norm).abs() < 1e-6,
                "stage {stage}, {bound:?}"
            );
            opt.materialize(&SingleProcess).unwrap();
            assert_eq!(values(&v), expected, "stage {stage}, {bound:?}");
        }
    }

    /// A NaN or infinite gradient is an error at every stage, and nothing is updated.
    #[test]
    fn a_non_finite_gradient_stops_the_step_and_updates_nothing() {
        let cfg = AdamWConfig {
            lr: 0.1,
            ..Default::default()
        };
        for (stage, bad) in (0..=3).flat_map(|s| [(s, f32::NAN), (s, f32::INFINITY)]) {
            let v = vars();
            let before = values(&v);
            let mut opt = ZeroOptimizer::new(
                v.clone(),
                cfg,
                ZeroStage::new(stage).unwrap(),
                &SingleProcess,
            )
            .unwrap();
            let mut g = grads(0);
            g.insert(
                "b".to_string(),
                Tensor::new(&[bad, 0.2], &Device::Cpu).unwrap(),
            );
            let local = StepTotals {
                trained: 1.0,
                ..Default::default()
            };
            let err = opt
                .step(&SingleProcess, g, local, Some(1.0), 0.1)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("the gradient norm is") && err.contains("not updated"),
                "stage {stage}: {err}"
            );
            opt.materialize(&SingleProcess).unwrap();
            assert_eq!(values(&v), before, "stage {stage}: parameters moved");
        }
    }

    /// Every stage runs bitsandbytes' optimizers as they run outside ZeRO (stage 0 replicated,
    /// 1–3 over the one rank's partition, whose state consolidates to the same keys); GaLore
    /// is refused above stage 0, saying why.
    #[test]
    fn eight_bit_and_paged_optimizers_run_at_every_stage_and_galore_at_stage_0_only() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |name| OptimizerSpec {
            name,
            adamw: AdamWConfig {
                lr: 0.1,
                ..Default::default()
            },
            min_8bit_size: 4,
            offload_dir: dir.path(),
            optim_args: None,
            target_modules: None,
            lr_groups: &[],
        };
        let names = [
            OptimName::Adamw8bit,
            OptimName::PagedAdamw8bit,
            OptimName::PagedAdamw32bit,
        ];
        for (stage, name) in (0..=3).flat_map(|s| names.map(|n| (s, n))) {
            let v = vars();
            let stage = ZeroStage::new(stage).unwrap();
            let mut opt =
                ZeroOptimizer::with_optimizer(v.clone(), &spec(name), stage, &SingleProcess)
                    .unwrap();
            let reference = vars();
            let mut direct = build_optimizer(reference.clone(), &spec(name)).unwrap();
            let local = StepTotals {
                trained: 1.0,
                ..Default::default()
            };
            for step in 0..3 {
                opt.materialize(&SingleProcess).unwrap();
                opt.step(&SingleProcess, grads(step), local, None, 0.1)
                    .unwrap();
                direct.step_with(&grads(step)).unwrap();
            }
            opt.materialize(&SingleProcess).unwrap();
            assert_eq!(values(&v), values(&reference), "{name} at {stage:?}");
            let state: BTreeMap<String, Tensor> = match opt.state().unwrap() {
                OptimizerState::Full(state) => state.into_iter().collect(),
                OptimizerState::Shard(shard, layout) => consolidate_shards(
                    &[shard.into_iter().collect()],
                    &FlatLayout::from_json(&layout).unwrap(),
                )
                .unwrap()
                .into_iter()
                .collect(),
            };
            let want: BTreeMap<String, Tensor> = direct.state().unwrap().into_iter().collect();
            assert_eq!(
                state.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>()
            );
            // u8 codes, f32 moments and i64 steps are all exact in f64.
            let exact = |t: &Tensor| -> Vec<f64> {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            for (k, t) in &state {
                assert_eq!(exact(t), exact(&want[k]), "{name} at {stage:?}: {k}");
            }
            if name.is_8bit() {
                assert_eq!(state["a.state1"].dtype(), DType::U8);
            }
        }
        let err = ZeroOptimizer::with_optimizer(
            vars(),
            &spec(OptimName::GaloreAdamw),
            ZeroStage::new(2).unwrap(),
            &SingleProcess,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("--optim galore_adamw cannot run at --zero-stage 2")
                && err.contains("whole gradient matrix"),
            "{err}"
        );
    }

    #[test]
    fn sharded_state_round_trips_and_consolidates_to_adamw_keys() {
        let cfg = AdamWConfig {
            lr: 0.1,
            ..Default::default()
        };
        let v = vars();
        let mut opt =
            ZeroOptimizer::new(v.clone(), cfg, ZeroStage::new(2).unwrap(), &SingleProcess).unwrap();
        for step in 0..2 {
            opt.step(
                &SingleProcess,
                grads(step),
                StepTotals {
                    trained: 1.0,
                    ..Default::default()
                },
                None,
                0.1,
            )
            .unwrap();
        }
        let OptimizerState::Shard(shard, layout) = opt.state().unwrap() else {
            panic!("stage 2 is partitioned")
        };
        let shard: BTreeMap<String, Tensor> = shard.into_iter().collect();
        let layout = FlatLayout::from_json(&layout).unwrap();
        let full = consolidate_shards(std::slice::from_ref(&shard), &layout).unwrap();
        // The consolidated state is what AdamW itself saves for the same steps.
        let r = vars();
        let mut adamw = AdamW::new(r, cfg);
        for step in 0..2 {
            adamw.step_with(&grads(step)).unwrap();
        }
        let want = adamw.state().unwrap();
        assert_eq!(full.len(), want.len());
        for ((k1, t1), (k2, t2)) in full.iter().zip(&want) {
            assert_eq!(k1, k2);
            let a = t1
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let b = t2
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert_eq!(a, b, "{k1}");
        }
        // A whole state loads into a partitioned optimizer and continues identically.
        let full_map: BTreeMap<String, Tensor> = full.into_iter().collect();
        let mut resumed =
            ZeroOptimizer::new(vars(), cfg, ZeroStage::new(1).unwrap(), &SingleProcess).unwrap();
        resumed.load_state(&full_map, false).unwrap();
        assert!(
            ZeroOptimizer::new(vars(), cfg, ZeroStage::default(), &SingleProcess)
                .unwrap()
                .load_state(&shard, true)
                .is_err()
        );
        assert!(ZeroStage::new(4)
            .unwrap_err()
            .to_string()
            .contains("expected 0, 1, 2 or 3"));
    }
}
