//! The training loop: data order, micro-batches with gradient accumulation, AdamW with a
//! warmup schedule and clipping, periodic evaluation, atomic checkpoints and exact resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::checkpoint::{latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint, TrainerState};
use super::config::TrainConfig;
use super::metrics::{MetricsLog, Throughput};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator};
use super::rng::Rng;
use super::schedule::lr_at;
use crate::data::{self, collate, Batch, EncodeOptions, Encoded, Encoder, LabelMap, PaddingSide, Truncation};
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
    /// All positions (padding included) per second over recent steps.
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
}

/// What a finished run produced.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub output_dir: PathBuf,
    pub steps: usize,
    pub completed: bool,
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
    /// What computed the large matrix products: the system BLAS opened, or the gemm crate
    /// (`ops::blas`); step times depend on it.
    pub matmul_backend: String,
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
    pub skipped: usize,
    pub truncated: usize,
}

/// Encoding settings of a training config, for sequences of at most `max_len` tokens.
pub fn encode_options(cfg: &TrainConfig, max_len: usize) -> EncodeOptions {
    EncodeOptions { max_len, truncation: if cfg.truncate { Truncation::Right } else { Truncation::Error }, completion_only: cfg.completion_only }
}

/// Reads and encodes a JSONL file with the model's tokenizer and chat template.
pub fn encode_file(path: &Path, source: &ModelSource, opts: EncodeOptions, labels: Option<&LabelMap>, limit: Option<usize>) -> Result<data::EncodedSet> {
    let mut examples = data::read_jsonl(path)?;
    if let Some(n) = limit {
        examples.truncate(n);
    }
    let tok = source.tokenizer()?;
    let eos = source.eos_token_ids().first().copied();
    let mut enc = Encoder::new(tok, source.chat_template.as_ref(), opts)?.with_eos_token_id(eos);
    if let Some(l) = labels {
        enc = enc.with_label_map(l);
    }
    enc.encode_all(&examples).with_context(|| format!("encoding {}", path.display()))
}

/// Loads the model and data and builds the adapter (fresh, or from `adapter_weights`).
pub fn prepare(cfg: &TrainConfig, device: &Device, adapter_weights: Option<BTreeMap<String, Tensor>>) -> Result<Prepared> {
    cfg.validate()?;
    let mut source = ModelSource::load_with(&cfg.model, device, cfg.quantize.as_ref())?;
    let label_map = if cfg.task == Task::SeqCls {
        let examples = data::read_jsonl(&cfg.data)?;
        let map = LabelMap::from_examples(&examples)?;
        if let serde_json::Value::Object(o) = &mut source.config {
            o.insert("num_labels".into(), serde_json::json!(map.num_labels()));
            o.remove("id2label");
        }
        Some(map)
    } else {
        None
    };
    let context = source.config.get("max_position_embeddings").and_then(|v| v.as_u64()).map(|v| v as usize);
    let max_len = cfg.effective_max_len(context)?;
    let train = encode_file(&cfg.data, &source, encode_options(cfg, max_len), label_map.as_ref(), None)?;
    let eval = match &cfg.eval_data {
        Some(p) => encode_file(p, &source, encode_options(cfg, max_len), label_map.as_ref(), cfg.eval_limit)?.items,
        None => vec![],
    };
    let adapter = cfg.adapter()?.resolved(source.model_type(), cfg.task)?;
    let weights = adapter_weights.map(|w| w.into_iter().collect());
    let tuner = registry::build(&adapter, BuildContext { seed: cfg.seed, device, weights, allow_unmatched: cfg.allow_unmatched })?;
    let model = Model::build(&source, cfg.task, tuner.as_ref(), device, cfg.seed)?;
    let matches = tuner.finish()?;
    let pad_id = source.pad_token_id()?;
    Ok(Prepared {
        pad_id,
        max_len,
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

/// Pads a collated batch on the right up to `len` positions.
fn pad_to(batch: Batch, len: usize, pad_id: u32) -> Result<Batch> {
    let (b, t) = batch.input_ids.dims2()?;
    if t >= len {
        return Ok(batch);
    }
    let dev = batch.input_ids.device().clone();
    let extra = len - t;
    let cat = |x: &Tensor, fill: Tensor| -> Result<Tensor> { Ok(Tensor::cat(&[x, &fill], 1)?) };
    Ok(Batch {
        input_ids: cat(&batch.input_ids, Tensor::full(pad_id, (b, extra), &dev)?)?,
        attention_mask: cat(&batch.attention_mask, Tensor::zeros((b, extra), DType::U32, &dev)?)?,
        labels: match &batch.labels {
            Some(l) => Some(cat(l, Tensor::full(-100i64, (b, extra), &dev)?)?),
            None => None,
        },
        class_labels: batch.class_labels,
        num_tokens: batch.num_tokens,
    })
}

/// Forward pass and loss of one batch: `(loss, counted targets, correct predictions)`.
fn batch_loss(model: &Model, batch: &Batch) -> Result<(Tensor, usize, usize)> {
    if let (Task::CausalLm, crate::model::Arch::Decoder(lm)) = (model.task, &model.arch) {
        let labels = batch.labels.as_ref().context("causal-LM batch without labels")?;
        let (loss, n) = lm.causal_lm_loss(&batch.input_ids, Some(&batch.attention_mask), labels)?;
        return Ok((loss, n, 0));
    }
    let out = model.forward(&Inputs { input_ids: &batch.input_ids, attention_mask: Some(&batch.attention_mask), token_type_ids: None })?;
    match model.task {
        Task::CausalLm => {
            let labels = batch.labels.as_ref().context("causal-LM batch without labels")?;
            let (loss, n) = causal_lm_loss(&out, labels)?;
            Ok((loss, n, 0))
        }
        Task::SeqCls => {
            let labels = batch.class_labels.as_ref().context("classification batch without class labels")?;
            let (loss, n) = cross_entropy(&out, &labels.to_dtype(DType::I64)?)?;
            let pred = out.argmax(candle_core::D::Minus1)?.to_dtype(DType::U32)?;
            let correct = pred.eq(&labels.to_dtype(DType::U32)?)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
            Ok((loss, n, correct))
        }
        Task::FeatureExtraction => bail!("FEATURE_EXTRACTION has no loss"),
    }
}

/// Token-weighted eval loss (and accuracy for classification) over `items`.
/// Adapter layers must be in eval mode (no dropout).
pub fn evaluate(model: &Model, pad_id: u32, items: &[Encoded], batch_size: usize, step: usize) -> Result<EvalReport> {
    if items.is_empty() {
        bail!("evaluation set is empty")
    }
    let dev = model.device().clone();
    let _no_grad = model.no_grad();
    let (mut loss_sum, mut count, mut correct) = (0f64, 0usize, 0usize);
    for chunk in items.chunks(batch_size.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, PaddingSide::Right, &dev)?;
        let (loss, n, c) = batch_loss(model, &batch)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
        correct += c;
    }
    let eval_loss = loss_sum / count.max(1) as f64;
    let classification = model.task == Task::SeqCls;
    Ok(EvalReport {
        step,
        eval_loss,
        eval_perplexity: (!classification).then(|| eval_loss.exp()),
        eval_accuracy: classification.then(|| correct as f64 / items.len() as f64),
        eval_records: items.len(),
    })
}

impl Prepared {
    pub fn trainable_params(&self) -> usize {
        crate::tuners::trainable_params(self.tuner.as_ref())
    }
}

/// The order of records in `epoch`: a seeded shuffle, a pure function of (seed, epoch).
fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::seed_from_u64(seed).fork(1_000 + epoch).shuffle(&mut order);
    order
}

/// Runs (or resumes) training as `cfg` describes.
pub fn train(cfg: &TrainConfig, device: &Device, progress: &mut dyn Progress, run: &RunOptions) -> Result<TrainSummary> {
    let started = Instant::now();
    let out = &cfg.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let fingerprint = cfg.resume_fingerprint()?;

    // Resume state, if asked and present.
    let checkpoint = if run.resume {
        match latest_checkpoint(out) {
            Some(dir) => {
                let ck = load_checkpoint(&dir, device)?;
                if ck.state.config_hash != fingerprint {
                    bail!(
                        "{}: this checkpoint was written by a run with different settings; resume with the same config, or use a new output folder",
                        dir.display()
                    )
                }
                progress.message(&format!("resuming from {}", dir.display()));
                Some(ck)
            }
            None => {
                progress.message("no checkpoint to resume from; starting fresh");
                None
            }
        }
    } else {
        if latest_checkpoint(out).is_some() {
            bail!("{} already holds checkpoints of a run; pass --resume to continue it, or choose another output folder", out.display())
        }
        None
    };

    let p = prepare(cfg, device, checkpoint.as_ref().map(|c| c.adapter.clone()))?;
    let n = p.train.len();
    if n == 0 {
        bail!("{}: no trainable records", cfg.data.display())
    }
    let per_step = cfg.batch_size * cfg.grad_accum;
    let total_steps = cfg.max_steps.unwrap_or_else(|| ((cfg.epochs * n as f64) / per_step as f64).ceil().max(1.0) as usize);

    let params = p.tuner.trainable();
    let sink = if cfg.recompute {
        let sink = std::sync::Arc::new(GradSink::new(params.iter().map(|(_, v)| v.as_tensor().id())));
        if p.model.set_recompute(Some(sink.clone())) {
            Some(sink)
        } else {
            progress.message("recompute: not supported for this architecture; keeping activations");
            None
        }
    } else {
        None
    };
    let mut opt =
        AdamW::new(params.clone(), AdamWConfig { lr: cfg.lr, beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_eps, weight_decay: cfg.weight_decay });
    let (mut step, mut epoch, mut pos) = (0usize, 0u64, 0usize);
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = match &checkpoint {
        Some(ck) => {
            opt.load_state(&ck.optimizer)?;
            step = ck.state.step as usize;
            epoch = ck.state.epoch;
            pos = ck.state.epoch_position as usize;
            MetricsLog::resume(&metrics_path, ck.state.step)?
        }
        None => MetricsLog::create(&metrics_path)?,
    };

    let trainable = p.trainable_params();
    let memory = crate::quant::WeightMemory::of(&p.source.weights);
    if !memory.formats.is_empty() {
        let formats: Vec<String> = memory.formats.iter().map(|(f, m)| format!("{} x {f}", m.tensors)).collect();
        progress.message(&format!(
            "base weights {:.1} MB ({:.2}x of f32): {}",
            memory.total_bytes() as f64 / 1e6,
            memory.total_bytes() as f64 / memory.f32_bytes().max(1) as f64,
            formats.join(", ")
        ));
    }
    for m in &p.matches {
        progress.message(&format!("{} {} matched:\n{}", p.tuner.method().name, m.option, m.table()));
    }
    progress.message(&format!(
        "{} records ({} skipped, {} truncated), {} steps of {} x {} records; trainable params {} of {} ({:.4}%)",
        n,
        p.skipped,
        p.truncated,
        total_steps,
        cfg.batch_size,
        cfg.grad_accum,
        trainable,
        total_params(p.model.base_params, p.tuner.as_ref()),
        100.0 * trainable as f64 / total_params(p.model.base_params, p.tuner.as_ref()) as f64
    ));
    progress.start(total_steps, step);

    let mut order = epoch_order(cfg.seed, epoch, n);
    let mut throughput = Throughput::new(20);
    let mut positions = Throughput::new(20);
    let mut step_times = Vec::new();
    let mut last_loss = None;
    let mut last_eval = None;
    let dev = device.clone();
    let stop_at = run.stop_after.map_or(total_steps, |s| s.min(total_steps));

    while step < stop_at {
        let t0 = Instant::now();
        let mut acc = GradAccumulator::new();
        // Token-weighted accumulation: micro-batch i (mean loss over its n_i trained tokens, or
        // n_i examples for classification) weighs n_i / Σn, so the step's loss and gradient are
        // the mean over every trained token of the step, as one batch of the same records would
        // give (transformers' `num_items_in_batch` fix, 2024).
        let (mut loss_sum, mut trained, mut tokens, mut slots) = (0f64, 0usize, 0usize, 0usize);
        for micro in 0..cfg.grad_accum {
            if pos >= n {
                epoch += 1;
                pos = 0;
                order = epoch_order(cfg.seed, epoch, n);
            }
            let end = (pos + cfg.batch_size).min(n);
            let items: Vec<&Encoded> = order[pos..end].iter().map(|&i| &p.train[i]).collect();
            pos = end;
            let mut batch = collate(&items, p.pad_id, PaddingSide::Right, &dev)?;
            if cfg.pad_to_max_len {
                batch = pad_to(batch, p.max_len, p.pad_id)?;
            }
            p.tuner.mode().set_training(true);
            p.tuner.mode().set_step((step * cfg.grad_accum + micro) as u64);
            tokens += batch.num_tokens;
            slots += batch.input_ids.elem_count();
            let (loss, counted, _) = batch_loss(&p.model, &batch)?;
            if counted == 0 {
                continue; // nothing trained in this micro-batch (its weight would be 0)
            }
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                bail!("loss became {lv} at step {}; lower the learning rate or check the data", step + 1)
            }
            let mut grads = loss.backward()?;
            if let Some(sink) = &sink {
                sink.drain_into(&mut grads)?;
            }
            acc.add(&grads, &params, counted as f64)?;
            loss_sum += lv * counted as f64;
            trained += counted;
        }
        if trained == 0 {
            bail!("step {}: its {} micro-batch(es) hold no trained token (every label is masked)", step + 1, cfg.grad_accum)
        }
        let mut grads = acc.take_mean()?;
        let grad_norm = match cfg.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max)?,
            None => clip_grad_norm(&mut grads, f64::INFINITY)?,
        };
        let lr = lr_at(cfg.schedule, cfg.lr, step, cfg.warmup_steps, total_steps);
        opt.set_lr(lr);
        opt.step_with(&grads)?;
        step += 1;
        let dt = t0.elapsed();
        throughput.record_with_duration(tokens as u64, dt);
        positions.record_with_duration(slots as u64, dt);
        step_times.push(dt.as_secs_f64());
        let loss = loss_sum / trained as f64;
        last_loss = Some(loss);
        let report = StepReport {
            step,
            total_steps,
            epoch: epoch as f64 + pos as f64 / n as f64,
            loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_sec: throughput.window_tokens_per_sec().unwrap_or(0.0),
            positions_per_sec: positions.window_tokens_per_sec().unwrap_or(0.0),
            step_seconds: dt.as_secs_f64(),
        };
        metrics.log(step as u64, &report)?;
        progress.step(&report);

        let last = step == total_steps;
        if !p.eval.is_empty() && (last || cfg.eval_every.is_some_and(|e| step % e == 0)) {
            p.tuner.mode().set_training(false);
            let r = evaluate(&p.model, p.pad_id, &p.eval, cfg.eval_batch_size.unwrap_or(cfg.batch_size), step)?;
            metrics.log(step as u64, &r)?;
            progress.eval(&r);
            last_eval = Some(r);
        }
        let save_now = cfg.save_every.is_some_and(|s| step % s == 0) || (step == stop_at && !last);
        if save_now {
            let state =
                TrainerState { step: step as u64, epoch, epoch_position: pos as u64, seed: cfg.seed, config_hash: fingerprint.clone(), ..Default::default() };
            let adapter: Vec<(String, Tensor)> = params.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
            metrics.sync()?;
            save_checkpoint(out, &state, &adapter, &opt.state()?, &[])?;
            prune_checkpoints(out, cfg.keep_checkpoints.max(1))?;
        }
    }
    metrics.sync()?;
    let completed = step >= total_steps;
    if completed {
        save_adapter(out, p.tuner.as_ref(), cfg.task, &cfg.model)?;
    }
    progress.finish();
    let mut sorted = step_times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let summary = TrainSummary {
        output_dir: out.clone(),
        steps: step,
        completed,
        trainable_params: trainable,
        total_params: total_params(p.model.base_params, p.tuner.as_ref()),
        base_weight_bytes: memory.total_bytes(),
        train_records: n,
        skipped_records: p.skipped,
        truncated_records: p.truncated,
        final_loss: last_loss,
        eval: last_eval,
        tokens_per_sec: throughput.overall_tokens_per_sec(),
        positions_per_sec: positions.overall_tokens_per_sec(),
        median_step_seconds: sorted.get(sorted.len() / 2).copied(),
        seconds: started.elapsed().as_secs_f64(),
        matmul_backend: crate::ops::blas::backend(),
    };
    if completed {
        crate::util::atomic::write_bytes_atomic(&out.join("train_summary.json"), (serde_json::to_string_pretty(&summary)? + "\n").as_bytes())?;
    }
    Ok(summary)
}
