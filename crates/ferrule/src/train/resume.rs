//! Resuming a run: what a checkpoint keeps of it, which checkpoint a `--resume` continues
//! from, whether it belongs to this run, and where the data order and the optimizer pick up.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};

use super::batching::{Batching, DataCursor};
use super::checkpoint::{
    latest_checkpoint, list_checkpoints, load_checkpoint, load_optimizer_shard, prune_checkpoints,
    save_checkpoint, save_sharded_checkpoint, Checkpoint, TrainerState,
};
use super::config::TrainConfig;
use super::report::Progress;
use super::trainer::RunOptions;
use crate::dist::{Collective, FlatLayout, OptimizerState, ZeroOptimizer};

/// The newest checkpoint to resume from, if `run.resume` asks and one exists; errors when
/// checkpoints exist and resuming was not asked, or when they belong to another run.
pub(super) fn find(
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
    let complete: Vec<PathBuf> = list_checkpoints(out)
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

/// What a checkpoint of this run at `step` records besides tensors: the data position, the
/// run's identity (`fingerprint`) and its settings, so that a refused resume names what differs.
pub(super) fn trainer_state(
    cfg: &TrainConfig,
    run: &RunOptions,
    world: usize,
    fingerprint: &str,
    step: usize,
    cursor: &DataCursor,
) -> Result<TrainerState> {
    Ok(TrainerState {
        step: step as u64,
        epoch: cursor.epoch(),
        epoch_position: cursor.position() as u64,
        seed: cfg.seed,
        config_hash: fingerprint.to_string(),
        world_size: world as u64,
        zero_stage: run.zero_stage.get(),
        extra: serde_json::json!({ "settings": cfg.resume_settings()? }),
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
