//! The training loop: data order, micro-batches with gradient accumulation, AdamW with a
//! warmup schedule and clipping, periodic evaluation, atomic checkpoints and exact resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::batching::{global_left, Batching, DataCursor};
use super::checkpoint::{
    latest_checkpoint, load_checkpoint, load_optimizer_shard, prune_checkpoints, save_checkpoint,
    save_sharded_checkpoint, Checkpoint, TrainerState,
};
use super::config::TrainConfig;
use super::metrics::{MetricsLog, Throughput};
use super::optim::{AdamWConfig, GradAccumulator};
use super::schedule::lr_at;
use crate::data::{
    self, make_batch, Batch, EncodeOptions, Encoded, Encoder, LabelMap, Padding, Truncation,
};
use crate::dist::{
    BaseComm, Collective, FlatLayout, OptimizerState, SingleProcess, StepTotals, Traffic,
    ZeroOptimizer, ZeroStage,
};
use crate::model::{Inputs, Model, ModelSource, Task};
use crate::ops::loss::{causal_lm_loss, cross_entropy};
use crate::ops::recompute::GradSink;
use crate::peft_io::save_adapter;
use crate::tuners::{registry, total_params, BuildContext, MatchReport, Tuner};

/// One optimizer step, as reported to the progress display and `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Non-padding tokens in this step.
    pub tokens: usize,
    /// Non-padding tokens per second over recent steps.
    pub tokens_per_sec: f64,
    /// All positions (padding included) per second over recent steps (equal to
    /// `tokens_per_sec` with padding-free batches).
    pub positions_per_sec: f64,
    pub step_seconds: f64,
}

/// An evaluation pass.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub step: usize,
    pub eval_loss: f64,
    pub eval_perplexity: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_records: usize,
}

/// Where a run reports what it does (the CLI draws a progress bar; tests stay quiet).
pub trait Progress {
    fn start(&mut self, _total_steps: usize, _first_step: usize) {}
    fn step(&mut self, _report: &StepReport) {}
    fn eval(&mut self, _report: &EvalReport) {}
    fn message(&mut self, _text: &str) {}
    fn finish(&mut self) {}
}

/// Reports nothing.
pub struct Silent;
impl Progress for Silent {}

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

/// What a finished run produced.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub output_dir: PathBuf,
    pub steps: usize,
    pub completed: bool,
    /// Stopped early by [`RunOptions::interrupt`], after saving a checkpoint of step `steps`.
    pub interrupted: bool,
    pub trainable_params: usize,
    pub total_params: usize,
    /// Bytes of the frozen base's weights as held (quantized formats included).
    pub base_weight_bytes: usize,
    pub train_records: usize,
    pub skipped_records: usize,
    pub truncated_records: usize,
    pub final_loss: Option<f64>,
    pub eval: Option<EvalReport>,
    pub tokens_per_sec: Option<f64>,
    pub positions_per_sec: Option<f64>,
    pub median_step_seconds: Option<f64>,
    pub seconds: f64,
    /// How batches were laid out (`padding`, and why it differs from the config's when it does).
    pub padding: String,
    /// How micro-batches were formed (records, a token budget or packed bins), with the
    /// figures of the epoch the run started in.
    pub batching: String,
    /// Micro-batches in the epoch the run started in (with a token budget an epoch's count
    /// depends on its order).
    pub micro_batches_per_epoch: usize,
    /// Optimizer steps per epoch: global micro-batches (`world` micro-batches each) over
    /// `grad_accum`. The learning-rate schedule counts optimizer steps.
    pub steps_per_epoch: f64,
    /// What computed the large matrix products: the system BLAS opened, or the gemm crate
    /// (`ops::blas`); step times depend on it.
    pub matmul_backend: String,
    /// The probe's measurements for the shape classes this process computed, when it chose
    /// per shape (`ops::matmul_probe`; empty with an explicit `FERRULE_BLAS` or no BLAS).
    pub matmul_probe: Vec<crate::ops::matmul_probe::ProbeEntry>,
    /// Processes that trained (1 without a launcher).
    pub world_size: usize,
    pub zero_stage: u8,
    /// Peak resident memory (`VmHWM`) of each rank, in bytes (0 where unknown).
    pub peak_rss_bytes_per_rank: Vec<f64>,
    /// What this rank sent in the collectives of its busiest step (none in a single process).
    pub comm_per_step: Option<Traffic>,
}

/// A model with its tokenizer and encoded data, ready to train or evaluate.
pub struct Prepared {
    pub source: ModelSource,
    pub model: Model,
    pub tuner: Box<dyn Tuner>,
    /// What each `target_modules` entry matched.
    pub matches: Vec<MatchReport>,
    pub train: Vec<Encoded>,
    pub eval: Vec<Encoded>,
    pub label_map: Option<LabelMap>,
    pub pad_id: u32,
    /// Longest sequence, in tokens.
    pub max_len: usize,
    /// How batches are laid out: the config's choice, or padded to the longest record where
    /// the method cannot take padding-free batches (see `padding_note`).
    pub padding: Padding,
    /// Why `padding` differs from what the config asked, when it does.
    pub padding_note: Option<String>,
    /// How micro-batches are formed: a record count, a token budget, or packed bins.
    pub batching: Batching,
    pub skipped: usize,
    pub truncated: usize,
}

/// Encoding settings of a training config, for sequences of at most `max_len` tokens.
pub fn encode_options(cfg: &TrainConfig, max_len: usize) -> EncodeOptions {
    EncodeOptions {
        max_len,
        truncation: if cfg.truncate {
            Truncation::Right
        } else {
            Truncation::Error
        },
        completion_only: cfg.completion_only,
    }
}

/// Reads and encodes a JSONL file with the model's tokenizer and chat template.
pub fn encode_file(
    path: &Path,
    source: &ModelSource,
    opts: EncodeOptions,
    labels: Option<&LabelMap>,
    limit: Option<usize>,
) -> Result<data::EncodedSet> {
    let mut records = data::read_records(path)?;
    if let Some(n) = limit {
        records.truncate(n);
    }
    let tok = source.tokenizer()?;
    let eos = source.eos_token_ids().first().copied();
    let mut enc = Encoder::new(tok, source.chat_template.as_ref(), opts)?.with_eos_token_id(eos);
    if let Some(l) = labels {
        enc = enc.with_label_map(l);
    }
    let set = enc.encode_records(&records)?;
    set.warn_past_max_len(&records, enc.options().max_len);
    Ok(set)
}

/// Loads the model and data and builds the adapter (fresh, or from `adapter_weights`).
pub fn prepare(
    cfg: &TrainConfig,
    device: &Device,
    adapter_weights: Option<BTreeMap<String, Tensor>>,
) -> Result<Prepared> {
    prepare_sharded(cfg, device, adapter_weights, None)
}

/// [`prepare`] with the frozen base sharded over the ranks of `base` (`--shard-base`): every
/// rank calls it alike, since building the model then reads the weights collectively.
pub fn prepare_sharded(
    cfg: &TrainConfig,
    device: &Device,
    adapter_weights: Option<BTreeMap<String, Tensor>>,
    base: Option<Arc<dyn BaseComm>>,
) -> Result<Prepared> {
    cfg.validate()?;
    let mut source = ModelSource::load_with(&cfg.model, device, cfg.quantize.as_ref())?;
    if let Some(comm) = base {
        source.weights.shard(comm)?;
    }
    let label_map = if cfg.task == Task::SeqCls {
        let map = LabelMap::from_records(&data::read_records(&cfg.data)?)?;
        if let serde_json::Value::Object(o) = &mut source.config {
            o.insert("num_labels".into(), serde_json::json!(map.num_labels()));
            o.remove("id2label");
        }
        Some(map)
    } else {
        None
    };
    let context = source
        .config
        .get("max_position_embeddings")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize);
    let max_len = cfg.effective_max_len(context)?;
    let train = encode_file(
        &cfg.data,
        &source,
        encode_options(cfg, max_len),
        label_map.as_ref(),
        None,
    )?;
    let eval = match &cfg.eval_data {
        Some(p) => {
            encode_file(
                p,
                &source,
                encode_options(cfg, max_len),
                label_map.as_ref(),
                cfg.eval_limit,
            )?
            .items
        }
        None => vec![],
    };
    let adapter = cfg.adapter()?.resolved(source.model_type(), cfg.task)?;
    let weights = adapter_weights.map(|w| w.into_iter().collect());
    let tuner = registry::build(
        &adapter,
        BuildContext {
            seed: cfg.seed,
            device,
            weights,
            allow_unmatched: cfg.allow_unmatched,
        },
    )?;
    let model = Model::build(&source, cfg.task, tuner.as_ref(), device, cfg.seed)?;
    let matches = tuner.finish()?;
    let pad_id = source.pad_token_id()?;
    let (padding, padding_note) = match cfg.padding()? {
        Padding::Free if !model.supports_packed() => (
            Padding::Longest,
            Some(format!(
                "{} adds positions before every record, which padding-free batches cannot hold",
                adapter.peft_type
            )),
        ),
        p => (p, None),
    };
    let batching = Batching::of(cfg, max_len)?;
    if let Some((key, flag)) = cfg.token_batching().filter(|_| padding != Padding::Free) {
        bail!("train: {key} needs padding-free batches, which {} cannot take (it adds positions before every record); drop {flag} ({key})", adapter.peft_type)
    }
    Ok(Prepared {
        batching,
        pad_id,
        max_len,
        padding,
        padding_note,
        skipped: train.skipped.len(),
        truncated: train.truncated,
        train: train.items,
        eval,
        label_map,
        source,
        model,
        tuner,
        matches,
    })
}

fn batch_inputs(batch: &Batch) -> Inputs<'_> {
    Inputs {
        input_ids: &batch.input_ids,
        attention_mask: Some(&batch.attention_mask),
        token_type_ids: None,
    }
}

/// Where the first non-finite output of `batch` arose, as a clause for an error message
/// ([`Model::non_finite_origin`]).
fn non_finite_origin(model: &Model, batch: &Batch) -> String {
    if model.lockstep {
        // Tracing reruns the batch on this rank alone, which a sharded base cannot do.
        return " (the layer is not traced with --shard-base; rerun without it to find it)".into();
    }
    match &batch.seq_lens {
        Some(lens) => crate::util::finite::origin_clause(
            model.trace_non_finite_packed(&batch.input_ids, lens),
        ),
        None => model.non_finite_origin(&batch_inputs(batch)),
    }
}

/// Forward pass and loss of one batch (padded or padding-free): `(loss, counted targets,
/// correct predictions)`.
pub fn batch_loss(model: &Model, batch: &Batch) -> Result<(Tensor, usize, usize)> {
    if let (Task::CausalLm, crate::model::Arch::Decoder(lm)) = (model.task, &model.arch) {
        let labels = batch
            .labels
            .as_ref()
            .context("causal-LM batch without labels")?;
        let (loss, n) = match &batch.seq_lens {
            Some(lens) => lm.causal_lm_loss_packed(&batch.input_ids, lens, labels)?,
            None => lm.causal_lm_loss(&batch.input_ids, Some(&batch.attention_mask), labels)?,
        };
        return Ok((loss, n, 0));
    }
    let out = match &batch.seq_lens {
        Some(lens) => model.forward_packed(&batch.input_ids, lens)?,
        None => model.forward(&batch_inputs(batch))?,
    };
    match model.task {
        Task::CausalLm => {
            let labels = batch
                .labels
                .as_ref()
                .context("causal-LM batch without labels")?;
            let (loss, n) = causal_lm_loss(&out, labels)?;
            Ok((loss, n, 0))
        }
        Task::SeqCls => {
            let labels = batch
                .class_labels
                .as_ref()
                .context("classification batch without class labels")?;
            let (loss, n) = cross_entropy(&out, &labels.to_dtype(DType::I64)?)?;
            let pred = out.argmax(candle_core::D::Minus1)?.to_dtype(DType::U32)?;
            let correct = pred
                .eq(&labels.to_dtype(DType::U32)?)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()? as usize;
            Ok((loss, n, correct))
        }
        Task::FeatureExtraction => bail!("FEATURE_EXTRACTION has no loss"),
    }
}

/// Token-weighted eval loss (and accuracy for classification) over `items`, in batches laid
/// out as `padding` says (padding-free falls back to padded batches for a method that adds
/// positions; the result is the same either way, within float rounding).
/// Adapter layers must be in eval mode (no dropout).
pub fn evaluate(
    model: &Model,
    pad_id: u32,
    padding: Padding,
    items: &[Encoded],
    batch_size: usize,
    step: usize,
) -> Result<EvalReport> {
    evaluate_on(
        model,
        pad_id,
        padding,
        items,
        batch_size,
        step,
        &SingleProcess,
    )
}

/// [`evaluate`] spread over the ranks of `comm`: rank `r` takes records `r, r + N, ...` and the
/// sums are all-reduced, so every rank returns the report of the whole set.
pub fn evaluate_on(
    model: &Model,
    pad_id: u32,
    padding: Padding,
    items: &[Encoded],
    batch_size: usize,
    step: usize,
    comm: &dyn Collective,
) -> Result<EvalReport> {
    if items.is_empty() {
        bail!("evaluation set is empty")
    }
    let padding = if padding == Padding::Free && !model.supports_packed() {
        Padding::Longest
    } else {
        padding
    };
    let max_len = items.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let dev = model.device().clone();
    let _no_grad = model.no_grad();
    let mine: Vec<&Encoded> = items
        .iter()
        .skip(comm.rank())
        .step_by(comm.world_size())
        .collect();
    let mut sums = [0f64; 4]; // loss·n, n, correct, batches with a non-finite loss
    let mut first_bad = None;
    let bs = batch_size.max(1);
    if model.lockstep {
        // Every rank runs as many batches as rank 0 (which has the most records): the extra
        // one repeats a record and is not counted.
        let most = items.len().div_ceil(comm.world_size()).div_ceil(bs);
        for _ in mine.len().div_ceil(bs)..most {
            batch_loss(
                model,
                &make_batch(
                    &items[..1].iter().collect::<Vec<_>>(),
                    padding,
                    pad_id,
                    max_len,
                    &dev,
                )?,
            )?;
        }
    }
    for (j, chunk) in mine.chunks(bs).enumerate() {
        let batch = make_batch(chunk, padding, pad_id, max_len, &dev)?;
        let (loss, n, c) = batch_loss(model, &batch)?;
        let lv = loss.to_scalar::<f32>()? as f64;
        if !lv.is_finite() {
            sums[3] += 1.0;
            if first_bad.is_none() {
                first_bad = Some((j, lv, non_finite_origin(model, &batch)));
            }
            continue;
        }
        sums[0] += lv * n as f64;
        sums[1] += n as f64;
        sums[2] += c as f64;
    }
    // Every rank learns of a bad batch anywhere, so all stop together.
    comm.all_reduce_sum_f64(&mut sums)?;
    if sums[3] > 0.0 {
        let (world, rank, bs) = (comm.world_size(), comm.rank(), batch_size.max(1));
        let here = first_bad.map_or_else(
            || "on another rank".to_string(),
            |(j, lv, origin)| {
                // Rank r evaluates records r, r + world, ...: the batch's first record.
                let first = (j * bs) * world + rank + 1;
                format!("first: loss {lv} in the eval batch starting at eval record {first} (batch size {bs}){origin}")
            },
        );
        bail!("evaluation at step {step}: {} batch(es) gave a NaN or infinite loss ({here}); the model or adapter produces non-finite outputs", sums[3])
    }
    let eval_loss = sums[0] / sums[1].max(1.0);
    let classification = model.task == Task::SeqCls;
    Ok(EvalReport {
        step,
        eval_loss,
        eval_perplexity: (!classification).then(|| eval_loss.exp()),
        eval_accuracy: classification.then(|| sums[2] / items.len() as f64),
        eval_records: items.len(),
    })
}

impl Prepared {
    pub fn trainable_params(&self) -> usize {
        crate::tuners::trainable_params(self.tuner.as_ref())
    }
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

/// The newest checkpoint to resume from, if `run.resume` asks and one exists; errors when
/// checkpoints exist and resuming was not asked, or when they belong to another run.
fn find_resume(
    cfg: &TrainConfig,
    run: &RunOptions,
    comm: &dyn Collective,
    fingerprint: &str,
    progress: &mut dyn Progress,
    device: &Device,
) -> Result<Option<Checkpoint>> {
    let out = &cfg.output_dir;
    if !run.resume {
        if latest_checkpoint(out).is_some() {
            bail!("{} already holds checkpoints of a run; pass --resume to continue it, or choose another output folder", out.display())
        }
        return Ok(None);
    }
    let Some(dir) = latest_checkpoint(out) else {
        if let Some(broken) = incomplete_checkpoint(out) {
            bail!(
                "{}: an incomplete checkpoint (a file is missing: adapter, trainer state or an optimizer shard); \
                 restore it or remove it to start fresh",
                broken.display()
            )
        }
        progress.message("no checkpoint to resume from; starting fresh");
        return Ok(None);
    };
    let ck = load_checkpoint(&dir, device)?;
    if ck.state.config_hash != fingerprint {
        let now = cfg.resume_settings()?;
        let differ = ck
            .state
            .extra
            .get("settings")
            .map(|old| settings_that_differ(old, &now))
            .unwrap_or_default();
        let differ = if differ.is_empty() {
            String::new()
        } else {
            format!(" ({})", differ.join(", "))
        };
        bail!(
            "{}: this checkpoint was written by a run with different settings{differ}; resume with the same config, or use a new output folder",
            dir.display()
        )
    }
    let world = comm.world_size() as u64;
    if ck.state.sharded()
        && (ck.state.world_size != world || ck.state.zero_stage != run.zero_stage.get())
    {
        bail!(
            "{}: its optimizer state is sharded over {} ranks at ZeRO stage {}; resume it with `mpirun -np {} ... --zero-stage {}`, \
             or run `ferrule checkpoint consolidate {}` first to resume with {} rank(s) or another stage",
            dir.display(),
            ck.state.world_size,
            ck.state.zero_stage,
            ck.state.world_size,
            ck.state.zero_stage,
            dir.display(),
            world
        )
    }
    if ck.state.world_size != world {
        let (per_rank, unit) = if cfg.token_batching().is_some() {
            (cfg.grad_accum, "micro-batches")
        } else {
            (cfg.batch_size() * cfg.grad_accum, "records")
        };
        progress.message(&format!(
            "the checkpoint was written by {} rank(s), this run has {world}: the global batch changes from {} to {} {unit}",
            ck.state.world_size,
            per_rank as u64 * ck.state.world_size,
            per_rank as u64 * world
        ));
    }
    progress.message(&format!("resuming from {}", dir.display()));
    Ok(Some(ck))
}

/// The settings whose values differ between a checkpoint's run (`old`) and this one, as
/// `key: old -> new` (nested tables by their dotted path), at most 8.
fn settings_that_differ(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let null = serde_json::Value::Null;
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(
                        &p,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{path}: {a} -> {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out.truncate(8);
    out
}

/// A `checkpoint-<step>` folder (not a `.tmp` one) that is not a complete checkpoint.
fn incomplete_checkpoint(out: &Path) -> Option<PathBuf> {
    let complete: Vec<PathBuf> = crate::train::checkpoint::list_checkpoints(out)
        .ok()?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    std::fs::read_dir(out)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            p.is_dir()
                && name
                    .strip_prefix("checkpoint-")
                    .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                && !complete.contains(p)
        })
}

/// One rank's share of one optimizer step. The global batch is `grad_accum` global
/// micro-batches, each the next `world` micro-batches of the epoch ([`DataCursor::next`]): rank
/// r trains the r-th (none, when the epoch ends first). With batches of `batch_size` records the
/// `world` micro-batches are consecutive runs of the seeded order, so N ranks with
/// `--batch-size B` train what one process with `--batch-size B·N` trains. Returns this rank's weighted gradient sums (Σ nᵢ·gᵢ, nᵢ the
/// counted targets of micro-batch i) and counts.
fn accumulate_step(
    p: &Prepared,
    cfg: &TrainConfig,
    cursor: &mut DataCursor,
    step: usize,
    comm: &dyn Collective,
    params: &[(String, candle_core::Var)],
    sink: Option<&std::sync::Arc<GradSink>>,
) -> Result<(std::collections::HashMap<String, Tensor>, StepTotals)> {
    let world = comm.world_size();
    let dev = p.model.device().clone();
    let mut acc = GradAccumulator::new();
    let mut local = StepTotals::default();
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
        let (loss, counted, _) = batch_loss(&p.model, &batch)?;
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

/// Writes `checkpoint-<step>`: through rank 0 alone when every rank holds the whole state, by
/// every rank (each its optimizer shard) when it is partitioned.
fn save_step_checkpoint(
    comm: &dyn Collective,
    cfg: &TrainConfig,
    state: &TrainerState,
    adapter: &[(String, Tensor)],
    opt: &ZeroOptimizer,
) -> Result<()> {
    let out = &cfg.output_dir;
    match opt.state()? {
        OptimizerState::Shard(shard, layout) if comm.world_size() > 1 => {
            save_sharded_checkpoint(comm, out, state, adapter, &shard, &layout)?;
        }
        OptimizerState::Shard(shard, layout) => {
            // One rank owns the whole partition: store it as the whole state.
            let layout = FlatLayout::from_json(&layout)?;
            let full = crate::dist::consolidate_shards(&[shard.into_iter().collect()], &layout)?;
            save_checkpoint(
                out,
                &TrainerState {
                    zero_stage: 0,
                    ..state.clone()
                },
                adapter,
                &full,
                &[],
            )?;
        }
        OptimizerState::Full(full) => {
            let saved = if comm.rank() == 0 {
                save_checkpoint(out, state, adapter, &full, &[]).map(|_| ())
            } else {
                Ok(())
            };
            comm.all_ok(saved.is_ok(), "saving the checkpoint")?;
            saved?;
        }
    }
    if comm.rank() == 0 {
        prune_checkpoints(out, cfg.keep_checkpoints.max(1))?;
    }
    Ok(())
}

/// Whether any rank was asked to stop (one tiny all-reduce per step when there are ranks).
fn interrupt_requested(run: &RunOptions, comm: &dyn Collective) -> Result<bool> {
    let mine = run
        .interrupt
        .as_ref()
        .is_some_and(|f| f.load(Ordering::Relaxed));
    if comm.world_size() == 1 {
        return Ok(mine);
    }
    let mut any = [if mine { 1.0 } else { 0.0 }];
    comm.all_reduce_sum_f64(&mut any)?;
    Ok(any[0] > 0.0)
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

/// How batches are laid out, in words, with why when it is not what the config asked.
fn padding_description(p: &Prepared) -> String {
    let what = match p.padding {
        Padding::Free => "padding-free (records end to end, attention within each)".to_string(),
        Padding::Longest => "padded to each batch's longest record".to_string(),
        Padding::MaxLen => format!("padded to max_len ({} tokens)", p.max_len),
    };
    match &p.padding_note {
        Some(note) => format!("{what}: {note}"),
        None => what,
    }
}

/// What a run is about to train, for the progress display; `micro_batches` is
/// [`Batching::describe`]'s line.
fn describe(
    progress: &mut dyn Progress,
    p: &Prepared,
    cfg: &TrainConfig,
    micro_batches: &str,
    total_steps: usize,
    world: usize,
    stage: ZeroStage,
) {
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
pub fn train_on(
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn Progress,
    run: &RunOptions,
    comm: &dyn Collective,
) -> Result<TrainSummary> {
    let started = Instant::now();
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut silent = Silent;
    let progress: &mut dyn Progress = if rank == 0 { progress } else { &mut silent };
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
    let checkpoint = find_resume(cfg, run, comm, &fingerprint, progress, device)?;
    // Every rank has decided (and read the checkpoint) before rank 0 may write into the folder.
    comm.barrier()?;

    let base = match (cfg.shard_base, world) {
        (false, _) => None,
        (true, 1) => {
            // A warning, not a progress line: -q must not hide that the flag did nothing.
            tracing::warn!("--shard-base: a single process holds the whole base; nothing is sharded (run it under mpirun -np N)");
            None
        }
        (true, _) => Some(comm.base_comm()?),
    };
    let p = prepare_sharded(
        cfg,
        device,
        checkpoint.as_ref().map(|c| c.adapter.clone()),
        base.clone(),
    )?;
    let sent = || {
        base.as_ref()
            .map_or(comm.traffic(), |b| comm.traffic().plus(&b.traffic()))
    };
    let n = p.train.len();
    if n == 0 {
        bail!("{}: no trainable records", cfg.data.display())
    }
    // The folder appears once the model, data and method are known to work together.
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating the output folder {}", out.display()))?;
    let lengths: Vec<usize> = p.train.iter().map(|e| e.input_ids.len()).collect();
    let (mut step, mut cursor) = match &checkpoint {
        Some(ck) => (
            ck.state.step as usize,
            DataCursor::new(
                p.batching,
                cfg.seed,
                lengths.clone(),
                ck.state.epoch,
                ck.state.epoch_position as usize,
            )
            .with_context(|| format!("{}", ck.dir.display()))?,
        ),
        None => (
            0,
            DataCursor::new(p.batching, cfg.seed, lengths.clone(), 0, 0)?,
        ),
    };
    // What is left is counted from the cursor, so a run resumed with another number of ranks
    // still ends after its epochs (the steps done keep their count).
    // A run of epochs takes no micro-batch past them: its last step takes what is left.
    let total_steps = match cfg.max_steps {
        Some(n) => n,
        None => {
            let left = global_left(
                p.batching,
                cfg.seed,
                &lengths,
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
    let stop_at = run.stop_after.map_or(total_steps, |s| s.min(total_steps));
    // Ranks started with other settings, other data or another checkpoint would train apart
    // (and only rank 0's adapter would be saved): refuse before anything is written.
    comm.ensure_same(
        &[
            (
                "the training settings (config fingerprint)",
                u64::from_str_radix(&fingerprint, 16).unwrap_or(0),
            ),
            ("the encoded training records", records_digest(&p.train)),
            ("the number of steps", total_steps as u64),
            ("--stop-after", stop_at as u64),
            ("--zero-stage", run.zero_stage.get() as u64),
            (
                "the checkpoint resumed from",
                checkpoint.as_ref().map_or(u64::MAX, |c| c.state.step),
            ),
        ],
        "the run",
    )?;

    let params = p.tuner.trainable();
    let sink = if cfg.recompute {
        let sink = std::sync::Arc::new(GradSink::new(
            params.iter().map(|(_, v)| v.as_tensor().id()),
        ));
        if p.model.set_recompute(Some(sink.clone())) {
            Some(sink)
        } else {
            progress.message("recompute: not supported for this architecture; keeping activations");
            None
        }
    } else {
        None
    };
    let adam = AdamWConfig {
        lr: cfg.lr,
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = ZeroOptimizer::new(params.clone(), adam, run.zero_stage, comm)?;
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = None;
    match &checkpoint {
        Some(ck) => {
            if ck.state.sharded() {
                let (shard, layout) = load_optimizer_shard(&ck.dir, &ck.state, rank, device)?;
                ensure!(
                    &layout == opt.layout(),
                    "{}: the optimizer shard's parameters differ from this run's",
                    ck.dir.display()
                );
                opt.load_state(&shard, true)?;
            } else {
                opt.load_state(&ck.optimizer, false)?;
            }
            if rank == 0 {
                metrics = Some(MetricsLog::resume(&metrics_path, ck.state.step)?);
            }
        }
        None if rank == 0 => metrics = Some(MetricsLog::create(&metrics_path)?),
        None => {}
    }

    let micro_batches = p.batching.describe(cursor.batches(), &lengths);
    let micro_batches_per_epoch = cursor.batches().len();
    describe(
        progress,
        &p,
        cfg,
        &micro_batches,
        total_steps,
        world,
        run.zero_stage,
    );
    progress.start(total_steps, step);
    let mut throughput = Throughput::new(20);
    let mut positions = Throughput::new(20);
    let mut step_times = Vec::new();
    let (mut last_loss, mut last_eval, mut step_traffic) = (None, None, None);
    let mut interrupted = false;

    while step < stop_at {
        let t0 = Instant::now();
        let traffic0 = sent();
        opt.materialize(comm)?;
        let (sums, local) =
            accumulate_step(&p, cfg, &mut cursor, step, comm, &params, sink.as_ref())?;
        let lr = lr_at(cfg.schedule, cfg.lr, step, cfg.warmup_steps, total_steps);
        let result = opt
            .step(comm, sums, local, cfg.max_grad_norm, lr)
            .with_context(|| format!("optimizer step {}", step + 1))?;
        // The busiest step: at stage 3 a step after an eval or a save needs no gather.
        let t = sent().since(&traffic0);
        if step_traffic.is_none_or(|b: Traffic| t.total_bytes() > b.total_bytes()) {
            step_traffic = Some(t);
        }
        step += 1;
        let dt = t0.elapsed();
        let totals = result.totals;
        throughput.record_with_duration(totals.tokens as u64, dt);
        positions.record_with_duration(totals.positions as u64, dt);
        step_times.push(dt.as_secs_f64());
        let loss = totals.loss_sum / totals.trained;
        last_loss = Some(loss);
        let report = StepReport {
            step,
            total_steps,
            epoch: cursor.progress(),
            loss,
            lr,
            grad_norm: result.grad_norm,
            tokens: totals.tokens as usize,
            tokens_per_sec: throughput.window_tokens_per_sec().unwrap_or(0.0),
            positions_per_sec: positions.window_tokens_per_sec().unwrap_or(0.0),
            step_seconds: dt.as_secs_f64(),
        };
        if let Some(m) = &mut metrics {
            m.log(step as u64, &report)?;
        }
        progress.step(&report);

        let last = step == total_steps;
        if !p.eval.is_empty() && (last || cfg.eval_every.is_some_and(|e| step.is_multiple_of(e))) {
            opt.materialize(comm)?;
            p.tuner.mode().set_training(false);
            let r = evaluate_on(
                &p.model,
                p.pad_id,
                p.padding,
                &p.eval,
                cfg.eval_batch_size.unwrap_or(cfg.batch_size()),
                step,
                comm,
            )?;
            if let Some(m) = &mut metrics {
                m.log(step as u64, &r)?;
            }
            progress.eval(&r);
            last_eval = Some(r);
        }
        interrupted = !last && interrupt_requested(run, comm)?;
        let save_now = cfg.save_every.is_some_and(|s| step.is_multiple_of(s))
            || (step == stop_at && !last)
            || interrupted;
        if save_now {
            opt.materialize(comm)?;
            let state = TrainerState {
                step: step as u64,
                epoch: cursor.epoch(),
                epoch_position: cursor.position() as u64,
                seed: cfg.seed,
                config_hash: fingerprint.clone(),
                world_size: world as u64,
                zero_stage: run.zero_stage.get(),
                extra: serde_json::json!({ "settings": cfg.resume_settings()? }),
                ..Default::default()
            };
            let adapter: Vec<(String, Tensor)> = params
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            if let Some(m) = &metrics {
                m.sync()?;
            }
            save_step_checkpoint(comm, cfg, &state, &adapter, &opt)?;
        }
        if interrupted {
            progress.message(&format!(
                "interrupted: checkpoint of step {step} saved; rerun with --resume to continue"
            ));
            break;
        }
    }
    if let Some(m) = &metrics {
        m.sync()?;
        // The picture is a convenience: a failure to draw it is reported, not fatal.
        if let Err(e) = super::plot::write_loss_plot(out, None) {
            progress.message(&format!(
                "warning: {} not written: {e:#}",
                super::plot::PLOT_FILE
            ));
        }
    }
    let completed = step >= total_steps;
    if completed {
        opt.materialize(comm)?;
        let saved = if rank == 0 {
            let base = crate::merge::BaseRecord::of(&p.source.weights, cfg.quantize.as_ref());
            save_adapter(out, p.tuner.as_ref(), cfg.task, &cfg.model).and_then(|_| base.save(out))
        } else {
            Ok(())
        };
        comm.all_ok(saved.is_ok(), "saving the adapter")?;
        saved?;
    }
    progress.finish();
    let mut rss = vec![0f64; world];
    rss[rank] = peak_rss_bytes().unwrap_or(0.0);
    comm.all_reduce_sum_f64(&mut rss)?;
    let mut sorted = step_times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let trainable = p.trainable_params();
    let summary = TrainSummary {
        output_dir: out.clone(),
        steps: step,
        completed,
        interrupted,
        trainable_params: trainable,
        total_params: total_params(p.model.base_params, p.tuner.as_ref()),
        base_weight_bytes: crate::quant::WeightMemory::of(&p.source.weights).total_bytes(),
        train_records: n,
        skipped_records: p.skipped,
        truncated_records: p.truncated,
        final_loss: last_loss,
        eval: last_eval,
        tokens_per_sec: throughput.overall_tokens_per_sec(),
        positions_per_sec: positions.overall_tokens_per_sec(),
        median_step_seconds: sorted.get(sorted.len() / 2).copied(),
        seconds: started.elapsed().as_secs_f64(),
        padding: padding_description(&p),
        batching: micro_batches,
        micro_batches_per_epoch,
        steps_per_epoch: micro_batches_per_epoch.div_ceil(world) as f64 / cfg.grad_accum as f64,
        matmul_backend: crate::ops::blas::backend(),
        matmul_probe: crate::ops::blas::probe_report(),
        world_size: world,
        zero_stage: run.zero_stage.get(),
        peak_rss_bytes_per_rank: rss,
        comm_per_step: step_traffic.filter(|_| world > 1),
    };
    if completed && rank == 0 {
        crate::util::atomic::write_bytes_atomic(
            &out.join("train_summary.json"),
            (serde_json::to_string_pretty(&summary)? + "\n").as_bytes(),
        )?;
    }
    Ok(summary)
}
