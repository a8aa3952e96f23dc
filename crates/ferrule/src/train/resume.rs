//! Resuming a run: what a checkpoint keeps of it, which checkpoint a `--resume` continues
//! from, whether it belongs to this run, and where the data order and the optimizer pick up.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};

use super::batching::{Batching, DataCursor};
use super::budget::TRAIN_SECONDS_KEY;
use super::checkpoint::{
    checkpoint_folders, config_hash, incomplete_reason, latest_checkpoint, load_checkpoint,
    load_optimizer_shard, prune_checkpoints, save_checkpoint, save_sharded_checkpoint, Checkpoint,
    TrainerState, CHECKPOINT_PREFIX,
};
use super::config::{TrainConfig, RESUMABLE_SETTINGS};
use super::report::Progress;
use super::trainer::RunOptions;
use crate::dist::{Collective, FlatLayout, OptimizerState, ZeroOptimizer};
use crate::ops::ComputeDtype;

/// The newest checkpoint to resume from, if `run.resume` asks and one exists; errors when
/// checkpoints exist and resuming was not asked, or when they belong to another run. Newer
/// checkpoint folders that cannot be used are named, with why, on `progress`.
pub(super) fn find(
    cfg: &TrainConfig,
    run: &RunOptions,
    comm: &dyn Collective,
    fingerprint: &str,
    progress: &mut dyn Progress,
    device: &Device,
) -> Result<Option<Checkpoint>> {
    let out = &cfg.output_dir;
    let latest = latest_checkpoint(out);
    if !run.resume {
        if latest.is_some() {
            bail!("{} already holds checkpoints of a run; pass --resume to continue it, or choose another output folder", out.display())
        }
        return Ok(None);
    }
    let newest_step = latest.as_deref().and_then(checkpoint_step);
    let unusable = unusable_checkpoints(out, newest_step);
    let Some(dir) = latest else {
        if let Some((broken, why)) = unusable.last() {
            bail!(
                "{}: an incomplete checkpoint ({why}); restore it or remove it to start fresh",
                broken.display()
            )
        }
        progress.message("no checkpoint to resume from; starting fresh");
        return Ok(None);
    };
    for (skipped, why) in &unusable {
        progress.warning(&format!(
            "skipping {}: {why}; resuming from the older {}",
            skipped.display(),
            dir.display()
        ));
    }
    let ck = load_checkpoint(&dir, device)?;
    check_settings(cfg, &ck, fingerprint)?;
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
    check_global_batch(cfg, &ck, world, progress)?;
    progress.message(&format!("resuming from {}", dir.display()));
    Ok(Some(ck))
}

/// The compute dtype the run in `output_dir` computed in, from its newest checkpoint's
/// settings (f32 where they name none: runs from before the setting), or None without one.
/// A resume with `compute_dtype = auto` takes it, so that auto never refuses its own run.
pub(super) fn checkpoint_compute_dtype(output_dir: &Path) -> Option<ComputeDtype> {
    let dir = latest_checkpoint(output_dir)?;
    let state = super::checkpoint::read_trainer_state(&dir).ok()?;
    let saved = state.extra.get("settings")?.get("compute_dtype");
    Some(match saved.and_then(|v| v.as_str()) {
        Some("bf16") => ComputeDtype::Bf16,
        _ => ComputeDtype::F32,
    })
}

/// The step of a `checkpoint-<step>` folder.
fn checkpoint_step(dir: &Path) -> Option<u64> {
    let name = dir.file_name()?.to_str()?;
    name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()
}

/// The checkpoint folders newer than step `newest` (all of them when there is no complete one)
/// that are not complete checkpoints, with why.
fn unusable_checkpoints(out: &Path, newest: Option<u64>) -> Vec<(PathBuf, String)> {
    checkpoint_folders(out)
        .unwrap_or_default()
        .into_iter()
        .filter(|(step, _)| newest.is_none_or(|n| *step > n))
        .filter_map(|(_, dir)| incomplete_reason(&dir).map(|why| (dir, why)))
        .collect()
}

/// Refuses a checkpoint of a run with other settings, naming those that differ. The settings a
/// resume may change ([`RESUMABLE_SETTINGS`]) are checked by [`check_global_batch`] and
/// `check_length`.
fn check_settings(cfg: &TrainConfig, ck: &Checkpoint, fingerprint: &str) -> Result<()> {
    let now = cfg.resume_settings()?;
    // A checkpoint's hash may cover every setting, the resumable ones too: the same settings
    // are the same run.
    if ck.state.config_hash == fingerprint || ck.state.config_hash == config_hash(&now)? {
        return Ok(());
    }
    let differ: Vec<String> = ck
        .state
        .extra
        .get("settings")
        .map(|old| settings_that_differ(old, &now))
        .unwrap_or_default()
        .into_iter()
        .filter(|d| {
            !RESUMABLE_SETTINGS
                .iter()
                .any(|k| d.starts_with(&format!("{k}:")))
        })
        .map(|d| match d.strip_prefix("compute_dtype: ") {
            // f32 is left out of the settings (older checkpoints have no key): name it.
            Some(change) => format!(
                "compute_dtype: {} (--compute-dtype; auto resumes in the run's dtype)",
                change.replace("null", "\"f32\"")
            ),
            None => d,
        })
        .collect();
    let differ = if differ.is_empty() {
        String::new()
    } else {
        format!(" ({})", differ.join(", "))
    };
    bail!(
        "{}: this checkpoint was written by a run with different settings{differ}; resume with the same config, or use a new output folder",
        ck.dir.display()
    )
}

/// A resume may split the global batch otherwise (`batch_size` × `grad_accum` × ranks, e.g. on
/// one rank after `ferrule checkpoint consolidate` of a two-rank run): the same records then
/// make each step. Another global batch on as many ranks as the checkpoint's is another run,
/// refused; on another number of ranks it is said (the run's data order carries on).
fn check_global_batch(
    cfg: &TrainConfig,
    ck: &Checkpoint,
    world: u64,
    progress: &mut dyn Progress,
) -> Result<()> {
    let old = ck.state.extra.get("settings");
    let old_value = |key: &str, now: usize| {
        old.and_then(|s| s.get(key))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(now as u64)
    };
    let (batch, accum) = (cfg.batch_size() as u64, cfg.grad_accum as u64);
    let old_batch = old_value("batch_size", cfg.batch_size());
    let old_accum = old_value("grad_accum", cfg.grad_accum);
    let old_world = ck.state.world_size;
    // With token budgets a micro-batch is a bin of `batch_tokens` (the same in both runs):
    // the global batch counts micro-batches, and `batch_size` is the eval batch only.
    let tokens = cfg.token_batching().is_some();
    let (unit, split) = if tokens {
        ("micro-batches", "accumulation x ranks")
    } else {
        ("records", "batch x accumulation x ranks")
    };
    let global = |b: u64, a: u64, w: u64| -> (u64, String) {
        if tokens {
            (a * w, format!("{a} x {w}"))
        } else {
            (b * a * w, format!("{b} x {a} x {w}"))
        }
    };
    let (old_total, old_split) = global(old_batch, old_accum, old_world);
    let (new_total, new_split) = global(batch, accum, world);
    if old_split == new_split {
        return Ok(());
    }
    if old_total == new_total {
        progress.message(&format!(
            "the global batch stays {new_total} {unit} ({split}: {old_split} in the checkpoint, {new_split} now)"
        ));
    } else if old_world == world {
        let mut differ = Vec::new();
        if !tokens && old_batch != batch {
            differ.push(format!("batch_size: {old_batch} -> {batch}"));
        }
        if old_accum != accum {
            differ.push(format!("grad_accum: {old_accum} -> {accum}"));
        }
        bail!(
            "{}: this checkpoint's run trains global batches of {old_total} {unit} ({split}: {old_split}), this one {new_total} ({new_split}; {}); \
             resume with a global batch of {old_total}, or use a new output folder",
            ck.dir.display(),
            differ.join(", ")
        )
    } else {
        progress.message(&format!(
            "the checkpoint was written by {old_world} rank(s), this run has {world}: the global batch changes from {old_total} to {new_total} {unit}"
        ));
    }
    Ok(())
}

/// Refuses training records that differ from those the checkpoint's run trained on (an edited
/// data file, or one that encodes otherwise): the data order would no longer continue the
/// run's. Checkpoints that keep no digest are not checked.
pub(super) fn check_data(cfg: &TrainConfig, ck: &Checkpoint, records_digest: u64) -> Result<()> {
    let Some(kept) = ck
        .state
        .extra
        .get("data")
        .and_then(|d| d.get("records_digest"))
        .and_then(serde_json::Value::as_str)
    else {
        return Ok(());
    };
    let now = format!("{records_digest:016x}");
    if kept != now {
        bail!(
            "{}: the training data changed since {} was written (digest of its encoded records {kept} then, {now} now); \
             resume with the data the run started with, or start a new run in another output folder",
            cfg.data.display(),
            ck.dir.display()
        )
    }
    Ok(())
}

/// A resume may change the run's length (`--max-steps`, `--epochs`): the learning-rate schedule
/// is then planned over the new `total_steps`, and the change is said. Fewer steps than the
/// checkpoint has done is an error.
/// Training seconds of the invocations before a checkpoint (0 without one, or for a
/// checkpoint written before runs counted them).
pub(super) fn train_seconds(ck: Option<&Checkpoint>) -> f64 {
    ck.and_then(|ck| ck.state.extra.get(TRAIN_SECONDS_KEY))
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0)
}

pub(super) fn check_length(
    cfg: &TrainConfig,
    ck: &Checkpoint,
    total_steps: usize,
    progress: &mut dyn Progress,
) -> Result<()> {
    let done = ck.state.step as usize;
    let flag = match (cfg.max_steps, cfg.max_tokens) {
        (Some(n), _) => format!("--max-steps {n}"),
        (None, Some(t)) => format!("--max-tokens {t}"),
        (None, None) => format!("--epochs {}", cfg.epochs),
    };
    if total_steps < done {
        bail!(
            "{}: the run has done {done} steps, more than the {total_steps} of {flag}; resume with more steps, or use a new output folder",
            ck.dir.display()
        )
    }
    let before = ck
        .state
        .extra
        .get("total_steps")
        .and_then(serde_json::Value::as_u64);
    if let Some(before) = before.filter(|&b| b != total_steps as u64) {
        progress.message(&format!(
            "the run's length changes from {before} to {total_steps} steps ({flag}): the learning-rate schedule is planned over {total_steps} steps, continuing at step {done}"
        ));
    }
    Ok(())
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

/// The data cursor and step count a run starts from: the checkpoint's, or the start of the
/// first epoch.
pub(super) fn start_point(
    checkpoint: Option<&Checkpoint>,
    batching: Batching,
    seed: u64,
    lengths: &[usize],
) -> Result<(usize, DataCursor)> {
    Ok(match checkpoint {
        Some(ck) => (
            ck.state.step as usize,
            DataCursor::new(
                batching,
                seed,
                lengths.to_vec(),
                ck.state.epoch,
                ck.state.epoch_position as usize,
            )
            .with_context(|| format!("{}", ck.dir.display()))?,
        ),
        None => (0, DataCursor::new(batching, seed, lengths.to_vec(), 0, 0)?),
    })
}

/// Loads the checkpoint's optimizer state into `opt`: this rank's shard of a sharded
/// checkpoint, else the whole state.
pub(super) fn restore_optimizer(
    ck: &Checkpoint,
    opt: &mut ZeroOptimizer,
    rank: usize,
    device: &Device,
) -> Result<()> {
    if ck.state.sharded() {
        let (shard, layout) = load_optimizer_shard(&ck.dir, &ck.state, rank, device)?;
        ensure!(
            &layout == opt.layout(),
            "{}: the optimizer shard's parameters differ from this run's",
            ck.dir.display()
        );
        opt.load_state(&shard, true)
    } else {
        opt.load_state(&ck.optimizer, false)
    }
}

/// What this run is, as a checkpoint keeps it for [`find`], [`check_data`] and
/// [`check_length`].
pub(super) struct Identity<'a> {
    /// [`TrainConfig::resume_fingerprint`].
    pub fingerprint: &'a str,
    /// The digest of the encoded training records.
    pub records_digest: u64,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Training seconds so far, earlier invocations included (`max_seconds`).
    pub train_seconds: f64,
}

/// What a checkpoint of this run at `step` records besides tensors: the data position, the
/// run's identity and its settings (so that a refused resume names what differs).
pub(super) fn trainer_state(
    cfg: &TrainConfig,
    run: &RunOptions,
    world: usize,
    identity: &Identity,
    step: usize,
    cursor: &DataCursor,
) -> Result<TrainerState> {
    Ok(TrainerState {
        step: step as u64,
        epoch: cursor.epoch(),
        epoch_position: cursor.position() as u64,
        seed: cfg.seed,
        config_hash: identity.fingerprint.to_string(),
        world_size: world as u64,
        zero_stage: run.zero_stage.get(),
        extra: serde_json::json!({
            "settings": cfg.resume_settings()?,
            "data": {
                "file": cfg.data,
                "records_digest": format!("{:016x}", identity.records_digest),
            },
            "total_steps": identity.total_steps,
            TRAIN_SECONDS_KEY: identity.train_seconds,
        }),
        ..Default::default()
    })
}

/// Writes `checkpoint-<step>`: through rank 0 alone when every rank holds the whole state, by
/// every rank (each its optimizer shard) when it is partitioned.
pub(super) fn save(
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
