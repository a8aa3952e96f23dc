//! The training loop: data order, micro-batches with gradient accumulation, AdamW with a
//! warmup schedule and clipping, periodic evaluation, atomic checkpoints and exact resume.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};

use super::batching::{global_left, DataCursor};
use super::budget::TimeBudget;
use super::checkpoint::Checkpoint;
use super::config::TrainConfig;
use super::metrics::{MetricsLog, Throughput};
use super::optim::{AdamWConfig, GradAccumulator, LrGroup, OptimizerSpec};
use super::report::{EvalReport, Progress, Silent, StepReport, TrainSummary};
use super::resume;
use super::schedule::lr_at;
use crate::data::{make_batch, Encoded, Padding};
use crate::dist::{
    BaseComm, Collective, SingleProcess, StepTotals, Traffic, ZeroOptimizer, ZeroStage,
};
use crate::ops::recompute::{GradHook, GradSink};
use crate::ops::ComputeDtypeDecision;
use crate::tuners::{total_params, Tuner};

use super::distill::loss_with_distillation;
use super::evaluate::{batch_loss, evaluate_on, non_finite_origin};
use super::prepare::{prepare_run, Prepared};

/// How this invocation runs (not part of the run's identity).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from the newest checkpoint in the output folder.
    pub resume: bool,
    /// Stop (as if interrupted) after this many optimizer steps in total.
    pub stop_after: Option<usize>,
    /// How the trainable state is spread over ranks (`--zero-stage`; no effect on one rank's
    /// result: every stage trains the same adapter).
    pub zero_stage: ZeroStage,
    /// Set (by a signal handler, say) to stop after the current step with a checkpoint; the
    /// run then ends with `interrupted` and `--resume` continues it. Ranks agree on it every
    /// step, so all stop at the same one.
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// Runs (or resumes) training as `cfg` describes, in this process alone.
pub fn train(
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn Progress,
    run: &RunOptions,
) -> Result<TrainSummary> {
    train_on(cfg, device, progress, run, &SingleProcess)
}

/// One rank's share of one optimizer step. The global batch is `grad_accum` global
/// micro-batches, each the next `world` micro-batches of the epoch ([`DataCursor::next`]): rank
/// r trains the r-th (none, when the epoch ends first). With batches of `batch_size` records the
/// `world` micro-batches are consecutive runs of the seeded order, so N ranks with
/// `--batch-size B` train what one process with `--batch-size B·N` trains. Returns this rank's
/// weighted gradient sums (Σ nᵢ·gᵢ, nᵢ the counted targets of micro-batch i) and counts.
fn accumulate_step(
    p: &Prepared,
    cfg: &TrainConfig,
    cursor: &mut DataCursor,
    step: usize,
    comm: &dyn Collective,
    params: &[(String, Var)],
    sink: Option<&Arc<GradSink>>,
) -> Result<(HashMap<String, Tensor>, StepTotals)> {
    let world = comm.world_size();
    let dev = p.model.device().clone();
    let mut acc = GradAccumulator::new();
    let mut local = StepTotals::default();
    // What a method draws once per step (DyLoRA's rank) is the same for every micro-batch and rank.
    p.tuner.mode().set_optimizer_step(step as u64);
    for micro in 0..cfg.grad_accum {
        let Some(group) = cursor.take(world) else {
            break; // the run's epochs are done: the last step takes what was left
        };
        let Some(records) = group.get(comm.rank()) else {
            if p.model.lockstep {
                lockstep_pass(p, &group[0], sink, &dev)?;
            }
            continue; // this rank's micro-batch lies past the epoch's end
        };
        let items: Vec<&Encoded> = records.iter().map(|&i| &p.train[i]).collect();
        let batch = make_batch(&items, p.padding, p.pad_id, p.max_len, &dev)?;
        p.tuner.mode().set_training(true);
        // Each rank's chunk draws its own dropout masks.
        p.tuner
            .mode()
            .set_step(((step * cfg.grad_accum + micro) * world + comm.rank()) as u64);
        local.tokens += batch.num_tokens as f64;
        local.positions += batch.input_ids.elem_count() as f64;
        let (loss, counted, distillation) =
            loss_with_distillation(&p.model, p.tuner.as_ref(), &batch)?;
        if counted == 0 {
            if p.model.lockstep {
                discard_backward(&loss, sink)?;
            }
            continue; // nothing trained in this micro-batch (its weight would be 0)
        }
        let lv = loss.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            let origin = non_finite_origin(&p.model, &batch);
            bail!(
                "loss became {lv} at step {}{origin}; lower the learning rate or check the data",
                step + 1
            )
        }
        // A method's own terms (PELA's regulariser and distillation) join the loss that is
        // differentiated, not the one reported.
        let mut loss = loss;
        for term in [p.tuner.regularizer()?, distillation].into_iter().flatten() {
            loss = (loss + term)?;
        }
        let mut grads = loss.backward()?;
        if let Some(sink) = sink {
            sink.drain_into(&mut grads)?;
        }
        acc.add(&grads, params, counted as f64)?;
        local.loss_sum += lv * counted as f64;
        local.trained += counted as f64;
    }
    Ok((acc.take_sum(), local))
}

/// The forward and backward passes of `records` with the result thrown away: a rank with no
/// micro-batch of its own still reads the sharded base's weights with the others.
fn lockstep_pass(
    p: &Prepared,
    records: &[usize],
    sink: Option<&Arc<GradSink>>,
    dev: &Device,
) -> Result<()> {
    let items: Vec<&Encoded> = records.iter().map(|&i| &p.train[i]).collect();
    let (loss, _, _) = batch_loss(
        &p.model,
        &make_batch(&items, p.padding, p.pad_id, p.max_len, dev)?,
    )?;
    discard_backward(&loss, sink)
}

/// Runs the backward pass of `loss` (collectives included) and drops its gradients.
fn discard_backward(loss: &Tensor, sink: Option<&Arc<GradSink>>) -> Result<()> {
    let mut grads = loss.backward()?;
    if let Some(sink) = sink {
        sink.drain_into(&mut grads)?;
    }
    Ok(())
}

/// Whether any rank was asked to stop (one tiny all-reduce per step when there are ranks).
/// Whether to stop after this step, as every rank agrees: (a signal asked any rank to,
/// `max_seconds` is spent on any rank).
fn stop_requested(
    run: &RunOptions,
    time: &TimeBudget,
    comm: &dyn Collective,
) -> Result<(bool, bool)> {
    let interrupted = run
        .interrupt
        .as_ref()
        .is_some_and(|f| f.load(Ordering::Relaxed));
    let flags = [interrupted, time.spent()];
    if comm.world_size() == 1 {
        return Ok((flags[0], flags[1]));
    }
    let mut any = flags.map(|f| if f { 1.0 } else { 0.0 });
    comm.all_reduce_sum_f64(&mut any)?;
    Ok((any[0] > 0.0, any[1] > 0.0))
}

/// FNV-1a digest of the records' token ids and labels (the same on ranks that read the same data).
fn records_digest(items: &[Encoded]) -> u64 {
    let mut bytes = Vec::new();
    let mut eat = |x: u64| bytes.extend_from_slice(&x.to_le_bytes());
    for e in items {
        eat(e.input_ids.len() as u64);
        e.input_ids.iter().for_each(|&t| eat(t as u64));
        e.labels.iter().for_each(|&l| eat(l as u64));
        eat(e.class_label.map_or(u64::MAX, |c| c as u64));
    }
    crate::util::fnv1a(&bytes)
}

/// Peak resident memory of this process (`VmHWM`), in bytes; `None` where `/proc` has none.
fn peak_rss_bytes() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// How batches are laid out, in words.
fn padding_description(p: &Prepared) -> String {
    match p.padding {
        Padding::Free => "padding-free (records end to end, attention within each)".to_string(),
        Padding::Longest => "padded to each batch's longest record".to_string(),
        Padding::MaxLen => format!("padded to max_len ({} tokens)", p.max_len),
    }
}

/// What a run is about to train, for the progress display.
fn describe(
    progress: &mut dyn Progress,
    p: &Prepared,
    cfg: &TrainConfig,
    plan: &Plan,
    world: usize,
    stage: ZeroStage,
) {
    let (micro_batches, total_steps) = (&plan.micro_batches, plan.total_steps);
    let memory = crate::quant::WeightMemory::of(&p.source.weights);
    if !memory.formats.is_empty() {
        let formats: Vec<String> = memory
            .formats
            .iter()
            .map(|(f, m)| format!("{} x {f}", m.tensors))
            .collect();
        progress.message(&format!(
            "base weights {:.1} MB ({:.2}x of f32): {}",
            memory.total_bytes() as f64 / 1e6,
            memory.total_bytes() as f64 / memory.f32_bytes().max(1) as f64,
            formats.join(", ")
        ));
    }
    for m in &p.matches {
        progress.message(&format!(
            "{} {} matched:\n{}",
            p.tuner.method().name,
            m.option,
            m.table()
        ));
    }
    progress.message(&format!("batches: {}", padding_description(p)));
    progress.message(&format!("micro-batches: {micro_batches}"));
    let trainable = p.trainable_params();
    let total = total_params(p.model.base_params, p.tuner.as_ref());
    let ranks = if world > 1 {
        format!(" x {world} ranks (ZeRO stage {})", stage.get())
    } else {
        String::new()
    };
    progress.message(&format!(
        "{} records ({} skipped, {} truncated), {total_steps} optimizer step{} of {} micro-batch{}{ranks}, the {} learning-rate schedule \
         ({} warmup) counting those steps; trainable params {trainable} of {total} ({:.4}%)",
        p.train.len(),
        p.skipped,
        p.truncated,
        if total_steps == 1 { "" } else { "s" },
        cfg.grad_accum,
        if cfg.grad_accum == 1 { "" } else { "es" },
        cfg.schedule,
        cfg.warmup_steps,
        100.0 * trainable as f64 / total as f64
    ));
}

/// Runs (or resumes) training as `cfg` describes on every rank of `comm` (data parallel, ZeRO
/// stage `run.zero_stage`); with [`SingleProcess`] this is [`train`]. Every rank calls it with
/// the same arguments. Rank 0 alone reports progress, writes `metrics.jsonl`, the adapter and
/// the summary; the summary's throughput is summed over ranks.
///
/// The run goes through four phases: [`Run::start`] (resume, prepare, plan, optimizer), then
/// [`Run::step`] and [`Run::after_step`] (evaluate, save, interrupt) until the plan's last
/// step, then [`Run::finish`] (the adapter and the summary).
pub fn train_on(
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn Progress,
    run: &RunOptions,
    comm: &dyn Collective,
) -> Result<TrainSummary> {
    let mut silent = Silent;
    let progress: &mut dyn Progress = if comm.rank() == 0 {
        progress
    } else {
        &mut silent
    };
    let resumed = run
        .resume
        .then(|| resume::checkpoint_compute_dtype(&cfg.output_dir))
        .flatten();
    let (cfg, compute) = cfg.with_compute_dtype_resolved(resumed)?;
    let mut reporter = super::tensorboard::Reporter::for_run(progress, &cfg, comm.rank());
    let mut run = Run::start(&cfg, compute, device, &mut reporter, run, comm)?;
    run.time.start();
    while run.step < run.plan.stop_at {
        let report = run.step()?;
        if run.after_step(&report)? == Next::Stop {
            break;
        }
    }
    run.finish()
}

/// What computed the large products: the BLAS (or gemm crate) choice, and oneDNN for the
/// frozen base's products in bf16.
fn matmul_backend(dtype: crate::ops::ComputeDtype) -> String {
    let f32_backend = crate::ops::blas::backend();
    match dtype {
        crate::ops::ComputeDtype::F32 => f32_backend,
        crate::ops::ComputeDtype::Bf16 => format!(
            "{} for the frozen base's bf16 products; {f32_backend} for the rest",
            crate::ops::onednn::library().unwrap_or("oneDNN")
        ),
    }
}

/// How many steps a run takes, and how its micro-batches were formed.
struct Plan {
    /// Steps of the whole run: the learning-rate schedule spans them.
    total_steps: usize,
    /// Where this invocation stops (`--stop-after`, else `total_steps`).
    stop_at: usize,
    /// [`Batching::describe`]'s line for the epoch the run starts in.
    micro_batches: String,
    micro_batches_per_epoch: usize,
}

/// What the steps so far measured, for the summary.
struct Tally {
    throughput: Throughput,
    positions: Throughput,
    step_seconds: Vec<f64>,
    last_loss: Option<f64>,
    last_eval: Option<EvalReport>,
    /// What this rank sent in its busiest step.
    busiest_traffic: Option<Traffic>,
    interrupted: bool,
    /// Stopped by `max_seconds` before the plan's last step (the result is saved).
    time_limit_reached: bool,
    stall: StallWatch,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            throughput: Throughput::new(20),
            positions: Throughput::new(20),
            step_seconds: Vec::new(),
            last_loss: None,
            last_eval: None,
            busiest_traffic: None,
            interrupted: false,
            time_limit_reached: false,
            stall: StallWatch::default(),
        }
    }
}

/// Steps in a row with a gradient norm of exactly 0, or a loss that does not move, before a run
/// says that it has stopped learning.
const STALL_STEPS: usize = 5;

/// Watches for a run that no longer learns. A learning rate far too high (`--lr 1e30`) can
/// drive a model to constant outputs, where no gradient flows and the loss stays put: the run
/// goes on to its end, so it must say so.
#[derive(Default)]
struct StallWatch {
    /// Steps in a row that looked stalled, and the first of them.
    stalled: usize,
    first: usize,
    last_loss: Option<f64>,
    said: bool,
}

impl StallWatch {
    /// The warning to give after `report` (once per invocation), for a run at learning rate `lr`.
    fn observe(&mut self, report: &StepReport, lr: f64) -> Option<String> {
        let unmoved = self.last_loss == Some(report.loss);
        self.last_loss = Some(report.loss);
        if report.grad_norm != 0.0 && !unmoved {
            self.stalled = 0;
            return None;
        }
        if self.stalled == 0 {
            self.first = if unmoved {
                report.step - 1
            } else {
                report.step
            };
        }
        self.stalled += 1;
        if self.stalled < STALL_STEPS || self.said {
            return None;
        }
        self.said = true;
        let what = if report.grad_norm == 0.0 {
            "the gradient norm is 0"
        } else {
            "the loss has not moved"
        };
        Some(format!(
            "steps {}-{}: {what} (loss {:.4}): the adapter has stopped learning. The likely cause is \
             the learning rate: --lr {lr:e} can drive the model to constant outputs, where no \
             gradient flows; lower --lr (the default is 2e-4)",
            self.first, report.step, report.loss
        ))
    }
}

/// Whether the loop goes on after a step.
#[derive(PartialEq)]
enum Next {
    Continue,
    Stop,
}

/// A run between its phases: the prepared model, the optimizer, the data cursor and the tally.
struct Run<'a> {
    cfg: &'a TrainConfig,
    options: &'a RunOptions,
    comm: &'a dyn Collective,
    progress: &'a mut dyn Progress,
    started: Instant,
    /// The frozen base's compute dtype and why it was chosen.
    compute: ComputeDtypeDecision,
    fingerprint: String,
    /// Digest of the encoded training records, which checkpoints keep.
    records_digest: u64,
    p: Prepared,
    base: Option<Arc<dyn BaseComm>>,
    params: Vec<(String, Var)>,
    sink: Option<Arc<GradSink>>,
    opt: ZeroOptimizer,
    /// Rank 0's `metrics.jsonl`.
    metrics: Option<MetricsLog>,
    cursor: DataCursor,
    plan: Plan,
    /// Optimizer steps done.
    step: usize,
    tally: Tally,
    /// `max_seconds`, with the seconds of earlier invocations.
    time: TimeBudget,
}

impl<'a> Run<'a> {
    /// The first phase: finds the checkpoint to resume from, prepares the model and data,
    /// plans the steps, checks that every rank agrees, and builds (or restores) the optimizer.
    fn start(
        cfg: &'a TrainConfig,
        compute: ComputeDtypeDecision,
        device: &Device,
        progress: &'a mut dyn Progress,
        options: &'a RunOptions,
        comm: &'a dyn Collective,
    ) -> Result<Run<'a>> {
        let started = Instant::now();
        let out = &cfg.output_dir;
        if out.exists() && !out.is_dir() {
            bail!(
                "output {}: is a file, not a folder (the run's folder is created when missing)",
                out.display()
            )
        }
        // Settings that cannot work fail before anything is created.
        cfg.validate()?;
        let fingerprint = cfg.resume_fingerprint()?;
        let checkpoint = resume::find(cfg, options, comm, &fingerprint, progress, device)?;
        // Every rank has decided (and read the checkpoint) before rank 0 may write into the
        // folder.
        comm.barrier()?;

        let base = base_comm(cfg, comm)?;
        let p = prepare_run(cfg, checkpoint.as_ref(), device, base.clone())?;
        if p.train.is_empty() {
            bail!("{}: no trainable records", cfg.data.display())
        }
        let records_digest = records_digest(&p.train);
        if let Some(ck) = &checkpoint {
            resume::check_data(cfg, ck, records_digest)?;
        }
        let groups = lr_groups(cfg, p.tuner.as_ref())?;
        // The folder appears once the model, data and method are known to work together.
        std::fs::create_dir_all(out)
            .with_context(|| format!("creating the output folder {}", out.display()))?;
        let lengths: Vec<usize> = p.train.iter().map(|e| e.input_ids.len()).collect();
        let (step, mut cursor) =
            resume::start_point(checkpoint.as_ref(), p.batching, cfg.seed, &lengths)?;
        let plan = plan(
            cfg,
            options,
            &p,
            &lengths,
            &mut cursor,
            step,
            comm.world_size(),
        )?;
        if let Some(ck) = &checkpoint {
            resume::check_length(cfg, ck, plan.total_steps, progress)?;
        }
        // Schedules a method follows over the run (PST's sparsity) span the same steps.
        p.tuner.mode().set_total_steps(plan.total_steps as u64);
        let identity = resume::Identity {
            fingerprint: &fingerprint,
            records_digest,
            total_steps: plan.total_steps,
            train_seconds: 0.0,
        };
        ranks_agree(comm, &identity, &plan, options, checkpoint.as_ref())?;

        let params = p.tuner.trainable();
        let spec = OptimizerSpec {
            lr_groups: &groups,
            ..optimizer_spec(cfg)
        };
        let mut opt =
            ZeroOptimizer::with_optimizer(params.clone(), &spec, options.zero_stage, comm)?;
        let sink = recompute_sink(cfg, &p, &params, opt.layerwise_hook(), progress)?;
        for warning in cfg.unread_optim_settings() {
            progress.warning(&warning);
        }
        let metrics_path = out.join("metrics.jsonl");
        let rank0 = comm.rank() == 0;
        let metrics = match &checkpoint {
            Some(ck) => {
                resume::restore_optimizer(ck, &mut opt, comm.rank(), device)?;
                rank0
                    .then(|| MetricsLog::resume(&metrics_path, ck.state.step))
                    .transpose()?
            }
            None => rank0
                .then(|| MetricsLog::create(&metrics_path))
                .transpose()?,
        };

        progress.message(&format!("compute dtype: {compute}"));
        describe(
            progress,
            &p,
            cfg,
            &plan,
            comm.world_size(),
            options.zero_stage,
        );
        progress.start(plan.total_steps, step);
        Ok(Run {
            cfg,
            options,
            comm,
            progress,
            started,
            compute,
            fingerprint,
            records_digest,
            p,
            base,
            params,
            sink,
            opt,
            metrics,
            cursor,
            plan,
            step,
            tally: Tally::new(),
            time: TimeBudget::new(cfg.max_seconds, resume::train_seconds(checkpoint.as_ref())),
        })
    }

    /// What this rank has sent so far, the sharded base's collectives included.
    fn sent(&self) -> Traffic {
        let sent = self.comm.traffic();
        self.base.as_ref().map_or(sent, |b| sent.plus(&b.traffic()))
    }

    /// The second phase, once per optimizer step: the global batch's forward and backward
    /// passes, the optimizer update, and the step's report (logged to `metrics.jsonl` and the
    /// progress display).
    fn step(&mut self) -> Result<StepReport> {
        let (cfg, comm) = (self.cfg, self.comm);
        let t0 = Instant::now();
        let traffic0 = self.sent();
        self.opt.materialize(comm)?;
        let total_steps = self.plan.total_steps;
        let lr = lr_at(
            cfg.schedule,
            cfg.lr,
            self.step,
            cfg.warmup_steps,
            total_steps,
        );
        self.opt.set_lr(lr);
        // A method that schedules its layers (IST) acts before the step, on its first
        // micro-batch when it needs a loss.
        let mut probe = super::evaluate::FirstBatchProbe::new(&self.p, &self.cursor);
        self.p
            .tuner
            .before_step(self.step as u64, &mut probe)
            .with_context(|| format!("before optimizer step {}", self.step + 1))?;
        let (sums, local) = accumulate_step(
            &self.p,
            cfg,
            &mut self.cursor,
            self.step,
            comm,
            &self.params,
            self.sink.as_ref(),
        )?;
        let result = self
            .opt
            .step(comm, sums, local, cfg.max_grad_norm, lr)
            .with_context(|| format!("optimizer step {}", self.step + 1))?;
        // The busiest step: at stage 3 a step after an eval or a save needs no gather.
        let t = self.sent().since(&traffic0);
        let tally = &mut self.tally;
        if tally
            .busiest_traffic
            .is_none_or(|b: Traffic| t.total_bytes() > b.total_bytes())
        {
            tally.busiest_traffic = Some(t);
        }
        self.step += 1;
        let dt = t0.elapsed();
        let totals = result.totals;
        tally
            .throughput
            .record_with_duration(totals.tokens as u64, dt);
        tally
            .positions
            .record_with_duration(totals.positions as u64, dt);
        tally.step_seconds.push(dt.as_secs_f64());
        let loss = totals.loss_sum / totals.trained;
        tally.last_loss = Some(loss);
        let report = StepReport {
            step: self.step,
            total_steps,
            epoch: self.cursor.progress(),
            loss,
            lr,
            grad_norm: result.grad_norm,
            tokens: totals.tokens as usize,
            tokens_per_sec: tally.throughput.window_tokens_per_sec().unwrap_or(0.0),
            positions_per_sec: tally.positions.window_tokens_per_sec().unwrap_or(0.0),
            step_seconds: dt.as_secs_f64(),
        };
        if let Some(m) = &mut self.metrics {
            m.log(self.step as u64, &report)?;
        }
        self.progress.step(&report);
        Ok(report)
    }

    /// The third phase, after each step: says when the run has stopped learning, evaluates
    /// when due, saves a checkpoint when due (or when this invocation stops early), and stops
    /// when any rank was interrupted.
    fn after_step(&mut self, report: &StepReport) -> Result<Next> {
        let (cfg, step) = (self.cfg, self.step);
        if let Some(warning) = self.tally.stall.observe(report, cfg.lr) {
            self.progress.warning(&warning);
        }
        let planned_last = step == self.plan.total_steps;
        let (interrupted, time_up) = match planned_last {
            true => (false, false),
            false => stop_requested(self.options, &self.time, self.comm)?,
        };
        // The time limit ends the run as its last step would: evaluated, the result saved.
        let last = planned_last || time_up;
        let interrupted = interrupted && !time_up;
        (self.tally.interrupted, self.tally.time_limit_reached) = (interrupted, time_up);
        let eval_due = last || cfg.eval_every.is_some_and(|e| step.is_multiple_of(e));
        if !self.p.eval.is_empty() && eval_due {
            self.evaluate()?;
        }
        let save_due = cfg.save_every.is_some_and(|s| step.is_multiple_of(s))
            || (step == self.plan.stop_at && !last)
            || interrupted;
        if save_due {
            self.save_checkpoint()?;
        }
        if interrupted {
            self.progress.message(&format!(
                "interrupted: checkpoint of step {step} saved; rerun with --resume to continue"
            ));
            return Ok(Next::Stop);
        }
        if time_up {
            self.progress.message(&format!(
                "max_seconds reached after step {step} of {} ({:.1} s of training)",
                self.plan.total_steps,
                self.time.seconds()
            ));
            return Ok(Next::Stop);
        }
        Ok(Next::Continue)
    }

    /// Evaluates on the eval records (spread over the ranks) and reports the result.
    fn evaluate(&mut self) -> Result<()> {
        self.progress.eval_start(self.p.eval.len());
        self.opt.materialize(self.comm)?;
        let clock = self.p.tuner.mode();
        clock.set_training(false);
        // An evaluation after step k sees the adapter as step k left it: a schedule over the
        // run (PST's sparsity) at k steps done, as the reference evaluates.
        clock.set_optimizer_step(self.step as u64);
        let report = evaluate_on(
            &self.p.model,
            self.p.pad_id,
            self.p.padding,
            &self.p.eval,
            self.cfg.eval_batch_size.unwrap_or(self.cfg.batch_size()),
            self.step,
            self.comm,
        )?;
        if let Some(m) = &mut self.metrics {
            m.log(self.step as u64, &report)?;
        }
        self.progress.eval(&report);
        self.tally.last_eval = Some(report);
        Ok(())
    }

    /// Writes `checkpoint-<step>` (every rank takes part; see [`resume::save`]).
    fn save_checkpoint(&mut self) -> Result<()> {
        self.opt.materialize(self.comm)?;
        let identity = resume::Identity {
            fingerprint: &self.fingerprint,
            records_digest: self.records_digest,
            total_steps: self.plan.total_steps,
            train_seconds: self.time.seconds(),
        };
        let state = resume::trainer_state(
            self.cfg,
            self.options,
            self.comm.world_size(),
            &identity,
            self.step,
            &self.cursor,
        )?;
        let mut adapter: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        // What the method derived from the base (SVFit's singular vectors): a resume reads it
        // rather than deriving it again.
        adapter.extend(self.p.tuner.frozen_state()?);
        if let Some(m) = &self.metrics {
            m.sync()?;
        }
        resume::save(self.comm, self.cfg, &state, &adapter, &self.opt)
    }

    /// The last phase: the loss plot, the adapter (when the run completed) and the summary,
    /// written to `train_summary.json` by rank 0 when the run completed.
    fn finish(mut self) -> Result<TrainSummary> {
        let (cfg, comm) = (self.cfg, self.comm);
        let out = &cfg.output_dir;
        if let Some(m) = &self.metrics {
            m.sync()?;
            // The picture is a convenience: a failure to draw it is reported, not fatal.
            if let Err(e) = super::plot::write_loss_plot(out, None) {
                self.progress.message(&format!(
                    "warning: {} not written: {e:#}",
                    super::plot::PLOT_FILE
                ));
            }
        }
        let completed = self.step >= self.plan.total_steps || self.tally.time_limit_reached;
        if completed {
            self.opt.materialize(comm)?;
            let saved = if comm.rank() == 0 {
                super::output::save_result(out, self.p.tuner.as_ref(), &self.p.source, cfg)
            } else {
                Ok(())
            };
            comm.all_ok(saved.is_ok(), "saving the adapter")?;
            saved?;
        }
        self.progress.finish();
        let summary = self.summary(completed)?;
        if completed && comm.rank() == 0 {
            crate::util::atomic::write_bytes_atomic(
                &out.join("train_summary.json"),
                (serde_json::to_string_pretty(&summary)? + "\n").as_bytes(),
            )?;
        }
        Ok(summary)
    }

    /// The run's summary; every rank takes part (the ranks' peak memory is all-reduced).
    fn summary(&self, completed: bool) -> Result<TrainSummary> {
        let (comm, p, tally) = (self.comm, &self.p, &self.tally);
        let world = comm.world_size();
        let mut rss = vec![0f64; world];
        rss[comm.rank()] = peak_rss_bytes().unwrap_or(0.0);
        comm.all_reduce_sum_f64(&mut rss)?;
        let mut sorted = tally.step_seconds.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let per_epoch = self.plan.micro_batches_per_epoch;
        Ok(TrainSummary {
            output_dir: self.cfg.output_dir.clone(),
            steps: self.step,
            completed,
            interrupted: tally.interrupted,
            time_limit_reached: tally.time_limit_reached,
            trainable_params: p.trainable_params(),
            total_params: total_params(p.model.base_params, p.tuner.as_ref()),
            whole_model: p.tuner.trains_whole_model(),
            base_weight_bytes: crate::quant::WeightMemory::of(&p.source.weights).total_bytes(),
            train_records: p.train.len(),
            skipped_records: p.skipped,
            truncated_records: p.truncated,
            final_loss: tally.last_loss,
            eval: tally.last_eval.clone(),
            tokens_per_sec: tally.throughput.overall_tokens_per_sec(),
            positions_per_sec: tally.positions.overall_tokens_per_sec(),
            median_step_seconds: sorted.get(sorted.len() / 2).copied(),
            seconds: self.started.elapsed().as_secs_f64(),
            padding: padding_description(p),
            batching: self.plan.micro_batches.clone(),
            micro_batches_per_epoch: per_epoch,
            steps_per_epoch: per_epoch.div_ceil(world) as f64 / self.cfg.grad_accum as f64,
            matmul_backend: matmul_backend(self.compute.dtype),
            compute_dtype: self.compute.clone(),
            matmul_probe: crate::ops::blas::probe_report(),
            world_size: world,
            zero_stage: self.options.zero_stage.get(),
            peak_rss_bytes_per_rank: rss,
            comm_per_step: tally.busiest_traffic.filter(|_| world > 1),
            streamed_base: crate::model::residency::report(&p.source.weights),
        })
    }
}

/// Refuses ranks started with other settings, other data or another checkpoint, which would
/// train apart (and only rank 0's adapter would be saved), before anything is written.
fn ranks_agree(
    comm: &dyn Collective,
    identity: &resume::Identity,
    plan: &Plan,
    options: &RunOptions,
    checkpoint: Option<&Checkpoint>,
) -> Result<()> {
    comm.ensure_same(
        &[
            (
                "the training settings (config fingerprint)",
                u64::from_str_radix(identity.fingerprint, 16).unwrap_or(0),
            ),
            ("the encoded training records", identity.records_digest),
            ("the number of steps", plan.total_steps as u64),
            ("--stop-after", plan.stop_at as u64),
            ("--zero-stage", options.zero_stage.get() as u64),
            (
                "the checkpoint resumed from",
                checkpoint.map_or(u64::MAX, |c| c.state.step),
            ),
        ],
        "the run",
    )
}

/// The communicator that shards the frozen base (`--shard-base` with several ranks).
fn base_comm(cfg: &TrainConfig, comm: &dyn Collective) -> Result<Option<Arc<dyn BaseComm>>> {
    Ok(match (cfg.shard_base, comm.world_size()) {
        (false, _) => None,
        (true, 1) => {
            // A warning, not a progress line: -q must not hide that the flag did nothing.
            tracing::warn!("--shard-base: a single process holds the whole base; nothing is sharded (run it under mpirun -np N)");
            None
        }
        (true, _) => Some(comm.base_comm()?),
    })
}

/// The steps of the run and of this invocation. What is left is counted from the cursor, so a
/// run resumed with another number of ranks still ends after its epochs (the steps done keep
/// their count); a run of epochs takes no micro-batch past them: its last step takes what is
/// left (the cursor is limited to it).
fn plan(
    cfg: &TrainConfig,
    options: &RunOptions,
    p: &Prepared,
    lengths: &[usize],
    cursor: &mut DataCursor,
    step: usize,
    world: usize,
) -> Result<Plan> {
    let total_steps = match (cfg.max_steps, cfg.max_tokens) {
        (Some(n), _) => n,
        (None, Some(tokens)) => super::budget::steps_for_tokens(
            p.batching,
            cfg.seed,
            lengths,
            world,
            cfg.grad_accum,
            tokens,
        )?,
        (None, None) => {
            let left = global_left(
                p.batching,
                cfg.seed,
                lengths,
                cfg.epochs,
                world,
                cursor.epoch(),
                cursor.index(),
            );
            let left = if step == 0 { left.max(1) } else { left };
            cursor.limit(left);
            step + left.div_ceil(cfg.grad_accum)
        }
    };
    Ok(Plan {
        total_steps,
        stop_at: options
            .stop_after
            .map_or(total_steps, |s| s.min(total_steps)),
        micro_batches: p.batching.describe(cursor.batches(), lengths),
        micro_batches_per_epoch: cursor.batches().len(),
    })
}

/// The run's optimizer: `optim` with AdamW's settings, the paged state file in `offload_dir`
/// (default: the output folder).
fn optimizer_spec(cfg: &TrainConfig) -> OptimizerSpec<'_> {
    OptimizerSpec {
        name: cfg.optim,
        adamw: adamw(cfg),
        min_8bit_size: cfg.min_8bit_size,
        offload_dir: cfg.offload_dir.as_deref().unwrap_or(&cfg.output_dir),
        optim_args: cfg.optim_args.as_deref(),
        target_modules: cfg.optim_target_modules.as_ref(),
        lr_groups: &[],
    }
}

/// The tensors that train at `lora_embedding_lr` (the method's [`Tuner::lr_group_keys`]), or
/// none when it is unset; set for a method with one learning rate, an error naming it.
fn lr_groups(cfg: &TrainConfig, tuner: &dyn Tuner) -> Result<Vec<LrGroup>> {
    let Some(lr) = cfg.lora_embedding_lr else {
        return Ok(Vec::new());
    };
    let keys = tuner.lr_group_keys();
    if keys.is_empty() {
        bail!(
            "lora_embedding_lr (--lora-embedding-lr) is the learning rate of DePT's low-rank pair; --method {} has one learning rate (lr)",
            tuner.method().name
        )
    }
    if !(lr.is_finite() && lr >= 0.0) {
        bail!("lora_embedding_lr (--lora-embedding-lr) is {lr}: expected a finite number of at least 0")
    }
    Ok(vec![LrGroup { keys, lr }])
}

/// AdamW's settings from the run's.
fn adamw(cfg: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        lr: cfg.lr,
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    }
}

/// With `recompute`, where the recomputed layers leave the gradients of `params`: kept for the
/// step, or handed to `layerwise` (a layer-wise optimizer's hook) as each layer's backward
/// ends. `None` without `recompute`, or where the architecture cannot recompute (said on
/// `progress`; an error for a layer-wise optimizer, which needs it).
fn recompute_sink(
    cfg: &TrainConfig,
    p: &Prepared,
    params: &[(String, Var)],
    layerwise: Option<GradHook>,
    progress: &mut dyn Progress,
) -> Result<Option<Arc<GradSink>>> {
    if !cfg.recompute {
        return Ok(None);
    }
    let ids = params.iter().map(|(_, v)| v.as_tensor().id());
    let is_layerwise = layerwise.is_some();
    let sink = Arc::new(match layerwise {
        Some(hook) => GradSink::with_hook(ids, hook),
        None => GradSink::new(ids),
    });
    if p.model.set_recompute(Some(sink.clone())) {
        if is_layerwise && cfg.max_grad_norm.is_some_and(|m| m > 0.0) {
            progress.warning(&format!("optim {}: gradients are not clipped (max_grad_norm is ignored): each layer steps before the global norm is known, as in transformers; set max_grad_norm = 0 to say so", cfg.optim));
        }
        return Ok(Some(sink));
    }
    if is_layerwise {
        bail!(
            "optim {}: this architecture cannot recompute its layers, which the layer-wise step needs; use --optim {}",
            cfg.optim,
            cfg.optim.whole_step()
        )
    }
    progress.message("recompute: not supported for this architecture; keeping activations");
    Ok(None)
}
