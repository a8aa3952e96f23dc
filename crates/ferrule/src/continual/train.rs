//! Adding a task to a ConPET set (`ferrule train --method conpet --continual DIR`).
//!
//! The reference's default schedule, `train_expert_selector: 2` ("selector-then-expert",
//! `kernel/training_selector.py`), trains the selector first, on the new split and the
//! replayed records of the earlier tasks, then the new expert. With `expert_topk: 1` and
//! `teacher_forcing: true` every record of the new split goes to the new expert and every
//! replayed record to its own frozen expert, so the new expert's loss is a cross-entropy over
//! its own label columns alone (the others sit at `null_expert_logit`, e^−100 ≈ 0): each
//! phase is an ordinary SEQ_CLS LoRA run, and ferrule runs it with the ordinary trainer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use serde_json::Value;

use crate::data::{read_records, Example, LabelValue, Records};
use crate::train::{train, Progress, RunOptions, TrainConfig, TrainSummary};
use crate::tuners::conpet::set::{self, Manifest, TaskEntry};
use crate::tuners::conpet::{layer, ConpetConfig};

/// What adding a task did.
#[derive(Debug, serde::Serialize)]
pub struct ContinualSummary {
    /// The set's folder.
    pub set_dir: PathBuf,
    /// The task this run adds (1-based).
    pub task: usize,
    /// Whether the task is in the set now; `false` when a phase stopped early (a checkpoint
    /// is saved; run again with `--resume`).
    pub completed: bool,
    /// The selector's run (from the second task on; `None` when done by an earlier call).
    pub selector: Option<TrainSummary>,
    /// The expert's run.
    pub expert: Option<TrainSummary>,
    /// The whole set on `eval_data`, when given.
    pub eval: Option<super::SetEval>,
}

/// The folder an unfinished task keeps its phase data in until the manifest lists it.
fn pending_dir(set_dir: &Path, n: usize) -> PathBuf {
    set_dir.join(format!("pending-{n}"))
}

/// Adds `cfg.data` as a new task to the set `cfg.continual` (created when new or empty):
/// trains the selector (from the second task on) and the task's expert, keeps up to
/// `replay_budget` of its records for later selectors, and then lists the task in
/// `conpet.json`. Earlier experts are read, never written. Errors name the folder, file or
/// label: a folder that is not a set, a label an earlier task owns, other settings or another
/// base model than the set's.
pub fn add_task(
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn Progress,
    run: &RunOptions,
) -> Result<ContinualSummary> {
    let task = NewTask::open(cfg, run.resume)?;
    let mut summary = ContinualSummary {
        set_dir: task.set_dir.clone(),
        task: task.n,
        completed: false,
        selector: None,
        expert: None,
        eval: None,
    };
    match task.selector_phase(device, progress, run)? {
        Phase::Stopped(s) => {
            summary.selector = Some(s);
            return Ok(summary);
        }
        Phase::Done(s) => summary.selector = s,
    }
    match task.expert_phase(device, progress, run)? {
        Phase::Stopped(s) => {
            summary.expert = Some(s);
            return Ok(summary);
        }
        Phase::Done(s) => summary.expert = s,
    }
    task.commit()?;
    summary.completed = true;
    if let Some(eval) = &cfg.eval_data {
        let routed = super::RoutedSet::load(&summary.set_dir, &cfg.model, device)?;
        let max_len = cfg.effective_max_len(routed.context())?;
        summary.eval =
            Some(routed.evaluate_file(eval, max_len, cfg.batch_size(), cfg.eval_limit)?);
    }
    Ok(summary)
}

/// The task being added: the set as it stands and the split that joins it.
struct NewTask<'a> {
    cfg: &'a TrainConfig,
    conpet: ConpetConfig,
    set_dir: PathBuf,
    /// Phase data until the manifest lists the task (`pending-<n>/`).
    pending: PathBuf,
    records: Records,
    /// The split's labels in column order.
    labels: Vec<LabelValue>,
    manifest: Manifest,
    /// This task's number (1-based).
    n: usize,
}

impl<'a> NewTask<'a> {
    /// Checks the run against the set (or starts one) before anything trains; an unfinished
    /// task is continued only with `resume` and from the same split.
    fn open(cfg: &'a TrainConfig, resume: bool) -> Result<Self> {
        cfg.validate()?;
        let set_dir = cfg
            .continual
            .clone()
            .context("add_task: no --continual folder")?;
        let conpet = crate::tuners::conpet::typed(&cfg.adapter()?)?;
        let records = read_records(&cfg.data)?;
        let labels = set::split_labels(&records)?;
        let manifest = match Manifest::read(&set_dir)? {
            Some(m) => check_same_set(m, cfg, &conpet)?,
            None => Manifest::new(&cfg.model, conpet.clone()),
        };
        manifest.check_new_labels(&labels, &cfg.data)?;
        check_eval_labels(cfg, &manifest, &labels)?;
        let n = manifest.tasks.len() + 1;
        let pending = pending_dir(&set_dir, n);
        claim_pending(&pending, cfg, n, resume)?;
        if n == 1 {
            // A new set is a set from here on, with no task yet: a stopped first task resumes
            // into it rather than into a folder that is not one.
            manifest.write(&set_dir)?;
        }
        Ok(NewTask {
            cfg,
            conpet,
            set_dir,
            pending,
            records,
            labels,
            manifest,
            n,
        })
    }

    /// The selector on the replayed records of every earlier task and this split (none for
    /// the first task, which needs no routing).
    fn selector_phase(
        &self,
        device: &Device,
        progress: &mut dyn Progress,
        run: &RunOptions,
    ) -> Result<Phase> {
        if self.n < 2 {
            return Ok(Phase::Done(None));
        }
        let data =
            write_selector_data(&self.set_dir, &self.manifest, &self.records, &self.pending)?;
        let init = grown_selector(
            &self.set_dir,
            &self.manifest,
            self.cfg,
            &self.pending,
            device,
        )?;
        let out = self.set_dir.join(set::selector_dir(self.n));
        let phase = phase_config(self.cfg, &self.conpet, data, out, init);
        run_phase(&phase, device, progress, run)
    }

    /// The new expert on this split, its labels numbered by its own columns.
    fn expert_phase(
        &self,
        device: &Device,
        progress: &mut dyn Progress,
        run: &RunOptions,
    ) -> Result<Phase> {
        let data = self.pending.join("expert.jsonl");
        let local = |l: &LabelValue| self.labels.iter().position(|x| x == l);
        write_remapped(&data, &self.records, local, "this split")?;
        let out = self.set_dir.join(set::task_dir(self.n));
        let phase = phase_config(self.cfg, &self.conpet, data, out, None);
        run_phase(&phase, device, progress, run)
    }

    /// The replay sample, then the manifest listing the task, then the phase data removed.
    fn commit(self) -> Result<()> {
        let out = self.set_dir.join(set::task_dir(self.n));
        write_replay(
            &out,
            &self.records,
            self.conpet.replay_budget,
            self.cfg.seed,
        )?;
        let count = self.records.examples.len();
        commit(&self.set_dir, self.manifest, self.cfg, &self.labels, count)?;
        std::fs::remove_dir_all(&self.pending)
            .with_context(|| format!("removing {}", self.pending.display()))
    }
}

/// `eval_data`, which scores the set once the task is in, may hold only labels of the tasks
/// seen by then: checked before anything trains, so a bad file does not fail a run that has
/// already added its task.
fn check_eval_labels(cfg: &TrainConfig, manifest: &Manifest, labels: &[LabelValue]) -> Result<()> {
    let Some(path) = &cfg.eval_data else {
        return Ok(());
    };
    let records = read_records(path)?;
    let known =
        |l: &LabelValue| (manifest.column_of(l).is_some() || labels.contains(l)).then_some(0);
    set::remap(
        &records,
        known,
        "the tasks seen after this run (--eval-data scores those only)",
    )?;
    Ok(())
}

/// Starts `pending-<n>/` with a note of the split it holds, or, for a task started earlier,
/// checks that this run resumes it with the same split (the phases' checkpoints would carry
/// on with other records otherwise).
fn claim_pending(pending: &Path, cfg: &TrainConfig, n: usize, resume: bool) -> Result<()> {
    let note = pending.join("split.json");
    let this = serde_json::json!({ "data": cfg.data, "task": n }).to_string();
    if note.is_file() {
        let earlier = std::fs::read_to_string(&note)
            .with_context(|| format!("reading {}", note.display()))?;
        if !resume {
            anyhow::bail!(
                "task {n} of this set was started and not finished ({}); run the same command with --resume to finish it",
                pending.display()
            )
        }
        if earlier != this {
            anyhow::bail!(
                "--data {}: the unfinished task {n} of this set was started from another split ({}: {earlier}); resume it with that --data",
                cfg.data.display(),
                note.display()
            )
        }
        return Ok(());
    }
    std::fs::create_dir_all(pending).with_context(|| format!("creating {}", pending.display()))?;
    crate::util::atomic::write_bytes_atomic(&note, this.as_bytes())
        .with_context(|| format!("writing {}", note.display()))
}

/// The manifest of an existing set, refused when this run's settings or base differ from the
/// ones its experts were trained with.
fn check_same_set(m: Manifest, cfg: &TrainConfig, conpet: &ConpetConfig) -> Result<Manifest> {
    let dir = cfg.continual.as_deref().unwrap_or(Path::new("."));
    if m.config != *conpet {
        anyhow::bail!(
            "--continual {}: the set was made with {}, this run asks for {}; give the set's settings (every task shares them)",
            dir.display(),
            serde_json::to_string(&m.config)?,
            serde_json::to_string(conpet)?
        )
    }
    if m.base_model != cfg.model {
        anyhow::bail!(
            "--continual {}: the set's experts were trained on --model {}, not {}",
            dir.display(),
            m.base_model,
            cfg.model
        )
    }
    Ok(m)
}

/// One phase's run: the ConPET run's settings with the LoRA of the set, its own data and
/// folder, and no evaluation (the set is evaluated as a whole afterwards).
fn phase_config(
    cfg: &TrainConfig,
    conpet: &ConpetConfig,
    data: PathBuf,
    out: PathBuf,
    init: Option<PathBuf>,
) -> TrainConfig {
    TrainConfig {
        adapter: Some(conpet.lora()),
        lora: None,
        continual: None,
        data,
        output_dir: out,
        eval_data: None,
        eval_every: None,
        init_adapter: init,
        ..cfg.clone()
    }
}

enum Phase {
    /// Finished now (`Some`) or by an earlier call (`None`).
    Done(Option<TrainSummary>),
    Stopped(TrainSummary),
}

/// Runs one phase, or skips it when its folder already holds the finished adapter (a resumed
/// task whose later phase stopped); `--resume` continues a phase from its checkpoint.
fn run_phase(
    phase: &TrainConfig,
    device: &Device,
    progress: &mut dyn Progress,
    run: &RunOptions,
) -> Result<Phase> {
    let out = &phase.output_dir;
    if run.resume && out.join("adapter_model.safetensors").is_file() {
        return Ok(Phase::Done(None));
    }
    crate::train::output::claim_output_dir(out, run.resume, false)?;
    let s = train(phase, device, progress, run)
        .with_context(|| format!("training {}", out.display()))?;
    Ok(if s.completed {
        Phase::Done(Some(s))
    } else {
        Phase::Stopped(s)
    })
}

/// `records` with labels replaced by `map`'s class index, written as JSON Lines.
fn write_remapped(
    path: &Path,
    records: &Records,
    map: impl Fn(&LabelValue) -> Option<usize>,
    owners: &str,
) -> Result<()> {
    let remapped = set::remap(records, map, owners)?;
    let rows: Vec<(&str, Value)> = remapped
        .examples
        .iter()
        .filter_map(|e| match e {
            Example::Classification {
                text,
                label: LabelValue::Index(i),
            } => Some((text.as_str(), Value::from(*i))),
            _ => None,
        })
        .collect();
    set::write_records(path, &rows)
}

/// The selector's data: every earlier task's replayed records labelled with that task's
/// index, then this split's records labelled `n − 1` (the reference's
/// `generate_expert_selector_logits` target: the split of the record's tag).
fn write_selector_data(
    set_dir: &Path,
    manifest: &Manifest,
    records: &Records,
    pending: &Path,
) -> Result<PathBuf> {
    let mut rows: Vec<(String, Value)> = Vec::new();
    for (t, task) in manifest.tasks.iter().enumerate() {
        let replay = set_dir.join(&task.dir).join(set::REPLAY_FILE);
        let kept = read_records(&replay).with_context(|| format!("task {} replay", t + 1))?;
        for e in kept.examples {
            if let Example::Classification { text, .. } = e {
                rows.push((text, Value::from(t)));
            }
        }
    }
    let n = manifest.tasks.len();
    for e in &records.examples {
        if let Example::Classification { text, .. } = e {
            rows.push((text.clone(), Value::from(n)));
        }
    }
    let path = pending.join("selector.jsonl");
    let view: Vec<(&str, Value)> = rows.iter().map(|(t, l)| (t.as_str(), l.clone())).collect();
    set::write_records(&path, &view)?;
    Ok(path)
}

/// From the third task on: the previous selector with its projector grown by one freshly
/// initialised row (normal(0, 0.02), zero bias, as transformers initialises a head), written
/// as an adapter folder the selector's phase starts from (`init_adapter`).
fn grown_selector(
    set_dir: &Path,
    manifest: &Manifest,
    cfg: &TrainConfig,
    pending: &Path,
    device: &Device,
) -> Result<Option<PathBuf>> {
    let Some(prev) = &manifest.selector else {
        return Ok(None);
    };
    let saved = crate::peft_io::load_adapter(&set_dir.join(prev), device)?;
    let n = manifest.tasks.len() + 1;
    let mut tensors: Vec<(String, candle_core::Tensor)> = Vec::new();
    for (key, t) in &saved.tensors {
        let grown = if key.ends_with("classifier.weight") || key.ends_with("classifier.bias") {
            let mut shape = t.dims().to_vec();
            shape[0] = n;
            let fresh = if shape.len() == 2 {
                crate::init::normal(&shape, 0.02, cfg.seed ^ n as u64, device)?
            } else {
                candle_core::Tensor::zeros(shape.as_slice(), t.dtype(), device)?
            };
            layer::grow_rows(t, &fresh)?
        } else {
            t.clone()
        };
        tensors.push((key.clone(), grown));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let dir = pending.join("selector-init");
    std::fs::create_dir_all(&dir)?;
    crate::peft_io::write_safetensors(
        &dir.join(crate::peft_io::WEIGHTS_FILE),
        &tensors,
        &[("format", "pt")],
    )?;
    let config = std::fs::read(set_dir.join(prev).join(crate::peft_io::CONFIG_FILE))?;
    crate::util::atomic::write_bytes_atomic(&dir.join(crate::peft_io::CONFIG_FILE), &config)?;
    Ok(Some(dir))
}

/// Keeps up to `budget` records of the split, drawn without replacement by the run's seed
/// and kept in file order, as the task's `replay.jsonl` (the reference keeps a fixed budget
/// per split, `batch_limit`; it picks them by k-means centres, ferrule at random).
fn write_replay(task_dir: &Path, records: &Records, budget: usize, seed: u64) -> Result<()> {
    let mut order: Vec<usize> = (0..records.examples.len()).collect();
    crate::train::Rng::seed_from_u64(seed).shuffle(&mut order);
    order.truncate(budget);
    order.sort_unstable();
    let rows: Vec<(&str, Value)> = order
        .iter()
        .filter_map(|&i| match &records.examples[i] {
            Example::Classification { text, label } => {
                Some((text.as_str(), set::label_json(label)))
            }
            _ => None,
        })
        .collect();
    set::write_records(&task_dir.join(set::REPLAY_FILE), &rows)
}

/// Lists the new task (and the new selector) in the manifest, written atomically, then drops
/// the selector it replaces.
fn commit(
    set_dir: &Path,
    mut manifest: Manifest,
    cfg: &TrainConfig,
    labels: &[LabelValue],
    records: usize,
) -> Result<()> {
    let n = manifest.tasks.len() + 1;
    manifest.tasks.push(TaskEntry {
        dir: set::task_dir(n),
        data: cfg
            .data
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
        labels: labels.iter().map(set::label_json).collect(),
        records,
    });
    let old = manifest.selector.take();
    if n >= 2 {
        manifest.selector = Some(set::selector_dir(n));
    }
    manifest.write(set_dir)?;
    if let Some(old) = old {
        std::fs::remove_dir_all(set_dir.join(&old))
            .with_context(|| format!("removing the replaced selector {old}"))?;
    }
    Ok(())
}
