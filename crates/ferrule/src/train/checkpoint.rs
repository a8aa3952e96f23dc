//! Resumable training checkpoints.
//!
//! A checkpoint is a directory `<output_dir>/checkpoint-<step>/` holding
//!
//! * [`ADAPTER_FILE`]: the trainable (adapter) tensors, safetensors with
//!   `{"format": "pt"}` metadata like PEFT's `adapter_model.safetensors`;
//! * [`OPTIMIZER_FILE`]: the optimizer state (e.g. [`super::optim::AdamW::state`]), or, for a
//!   run whose AdamW state was partitioned over ranks (ZeRO stage ≥ 1, `crate::dist::zero`),
//!   one [`shard_file_name`] per rank, each written by its rank, with the flat layout in its
//!   safetensors metadata; [`consolidate_checkpoint`] joins them into one [`OPTIMIZER_FILE`];
//! * [`TRAINER_STATE_FILE`]: a JSON [`TrainerState`] (step, epoch, position in
//!   the epoch's data order, RNG states, config hash, metrics, caller data);
//! * any extra files the caller passes (e.g. `adapter_config.json`).
//!
//! The directory is written as a whole: everything goes into
//! `checkpoint-<step>.tmp/`, each file is `fsync`ed, then the temporary
//! directory is `fsync`ed, renamed to its final name, and `output_dir` is
//! `fsync`ed. A crash therefore leaves either no `checkpoint-<step>` or a
//! complete one; leftover `*.tmp` directories are ignored by
//! [`latest_checkpoint`] and deleted by [`prune_checkpoints`].

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::dist::{Collective, FlatLayout};
use crate::util::atomic::{deserialize_safetensors, serialize_safetensors, sync_dir};

/// Adapter tensors inside a checkpoint directory.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// Optimizer state inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state inside a checkpoint directory.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// Prefix of checkpoint directory names.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// Version of the [`TrainerState`] layout written by this code.
pub const TRAINER_STATE_VERSION: u32 = 1;

const TMP_SUFFIX: &str = ".tmp";

/// Everything besides tensors needed to resume a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Layout version ([`TRAINER_STATE_VERSION`]).
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Number of items of the current epoch's data order already consumed;
    /// resuming skips this many items of the (re-derived) order.
    pub epoch_position: u64,
    /// The run's base seed.
    pub seed: u64,
    /// Named RNG states as `u64` words (e.g. `"data"` →
    /// [`super::rng::Rng::state`]).
    #[serde(default)]
    pub rng_states: BTreeMap<String, Vec<u64>>,
    /// Hash of the training configuration, to refuse resuming with a
    /// different one (see [`config_hash`]).
    #[serde(default)]
    pub config_hash: String,
    /// Metrics logged so far (one JSON object per entry).
    #[serde(default)]
    pub metrics: Vec<serde_json::Value>,
    /// Arbitrary caller data.
    #[serde(default)]
    pub extra: serde_json::Value,
    /// Processes that trained the run (1 for checkpoints written before multi-process runs).
    #[serde(default = "one")]
    pub world_size: u64,
    /// ZeRO stage of the run; at stage ≥ 1 with several ranks the optimizer state is sharded.
    #[serde(default)]
    pub zero_stage: u8,
}

fn one() -> u64 {
    1
}

impl TrainerState {
    /// Whether the optimizer state is one file per rank.
    pub fn sharded(&self) -> bool {
        self.world_size > 1 && self.zero_stage >= 1
    }
}

impl Default for TrainerState {
    fn default() -> Self {
        Self {
            format_version: TRAINER_STATE_VERSION,
            step: 0,
            epoch: 0,
            epoch_position: 0,
            seed: 0,
            rng_states: BTreeMap::new(),
            config_hash: String::new(),
            metrics: Vec::new(),
            extra: serde_json::Value::Null,
            world_size: 1,
            zero_stage: 0,
        }
    }
}

/// A checkpoint read back by [`load_checkpoint`].
#[derive(Debug)]
pub struct Checkpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// The trainer state.
    pub state: TrainerState,
    /// Adapter tensors by name.
    pub adapter: BTreeMap<String, Tensor>,
    /// Optimizer state tensors by name (empty for a sharded checkpoint).
    pub optimizer: BTreeMap<String, Tensor>,
}

/// Stable hex digest (64-bit FNV-1a) of a serializable configuration.
///
/// The value is converted to JSON with object keys sorted recursively, so
/// the digest does not depend on `HashMap` iteration order. It detects
/// accidental configuration changes; it is not a cryptographic hash.
pub fn config_hash<T: Serialize + ?Sized>(config: &T) -> Result<String> {
    fn canonical(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Object(map) => {
                let sorted: BTreeMap<String, Value> =
                    map.into_iter().map(|(k, v)| (k, canonical(v))).collect();
                Value::Object(sorted.into_iter().collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
            other => other,
        }
    }
    let value = canonical(serde_json::to_value(config).context("serializing config for hashing")?);
    let bytes = serde_json::to_vec(&value)?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(format!("{h:016x}"))
}

/// Path of the checkpoint directory for `step`.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{CHECKPOINT_PREFIX}{step}"))
}

/// Parses `checkpoint-<digits>` (exactly) into the step.
fn parse_checkpoint_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(CHECKPOINT_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn check_extra_name(name: &str) -> Result<()> {
    let reserved = [ADAPTER_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE];
    ensure!(
        !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains(['/', '\\'])
            && !reserved.contains(&name),
        "invalid extra checkpoint file name {name:?}"
    );
    Ok(())
}

/// Writes `checkpoint-<state.step>/` under `output_dir` atomically (see the
/// module docs) and returns its path.
///
/// `adapter` and `optimizer` are saved as safetensors (dtype preserved);
/// `extra_files` are `(file name, contents)` pairs written alongside (plain
/// names, no path separators). An existing checkpoint for the same step is
/// replaced.
pub fn save_checkpoint(
    output_dir: &Path,
    state: &TrainerState,
    adapter: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    extra_files: &[(&str, &[u8])],
) -> Result<PathBuf> {
    for (name, _) in extra_files {
        check_extra_name(name)?;
    }
    // Serialize first so that a bad tensor fails before touching the disk.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let adapter_bytes =
        serialize_safetensors(adapter, Some(meta)).context("serializing adapter")?;
    let optimizer_bytes =
        serialize_safetensors(optimizer, None).context("serializing optimizer state")?;
    let state_bytes = serde_json::to_vec_pretty(state).context("serializing trainer state")?;

    let tmp_dir = begin_tmp(output_dir, state.step)?;
    let write_all = || -> Result<PathBuf> {
        write_synced(&tmp_dir.join(ADAPTER_FILE), &adapter_bytes)?;
        write_synced(&tmp_dir.join(OPTIMIZER_FILE), &optimizer_bytes)?;
        for (name, bytes) in extra_files {
            write_synced(&tmp_dir.join(name), bytes)?;
        }
        write_synced(&tmp_dir.join(TRAINER_STATE_FILE), &state_bytes)?;
        commit_tmp(output_dir, &tmp_dir, state.step)
    };
    write_all()
        .inspect_err(|_| {
            // Best effort: the error being returned matters more than cleanup.
            let _ = std::fs::remove_dir_all(&tmp_dir);
        })
        .with_context(|| {
            format!(
                "saving checkpoint {}",
                checkpoint_dir(output_dir, state.step).display()
            )
        })
}

/// Creates an empty `checkpoint-<step>.tmp/` under `output_dir` (replacing a stale one).
fn begin_tmp(output_dir: &Path, step: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("creating output directory {}", output_dir.display()))?;
    let tmp_dir = output_dir.join(format!("{CHECKPOINT_PREFIX}{step}{TMP_SUFFIX}"));
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir)
            .with_context(|| format!("removing stale {}", tmp_dir.display()))?;
    }
    std::fs::create_dir(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
    Ok(tmp_dir)
}

/// Syncs the filled `tmp_dir` and renames it to `checkpoint-<step>` (replacing an older one
/// of the same step), then syncs `output_dir`.
fn commit_tmp(output_dir: &Path, tmp_dir: &Path, step: u64) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output_dir, step);
    let commit = || -> Result<()> {
        sync_dir(tmp_dir).with_context(|| format!("syncing {}", tmp_dir.display()))?;
        if final_dir.exists() {
            // Renaming onto a non-empty directory fails, so move the old one
            // aside (as a `.tmp`, ignored by readers) and delete it after.
            let old = output_dir.join(format!("{CHECKPOINT_PREFIX}{step}.replaced{TMP_SUFFIX}"));
            if old.exists() {
                std::fs::remove_dir_all(&old)?;
            }
            std::fs::rename(&final_dir, &old)
                .with_context(|| format!("moving aside {}", final_dir.display()))?;
            std::fs::rename(tmp_dir, &final_dir)
                .with_context(|| format!("renaming into {}", final_dir.display()))?;
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("removing replaced {}", old.display()))?;
        } else {
            std::fs::rename(tmp_dir, &final_dir)
                .with_context(|| format!("renaming into {}", final_dir.display()))?;
        }
        sync_dir(output_dir).with_context(|| format!("syncing {}", output_dir.display()))
    };
    commit()?;
    Ok(final_dir)
}

/// The optimizer shard of `rank` in a checkpoint of `world` ranks.
pub fn shard_file_name(rank: usize, world: usize) -> String {
    format!("optimizer-rank{rank:05}-of-{world:05}.safetensors")
}

/// Metadata key of a shard file that holds the flat layout (`FlatLayout::to_json`).
const LAYOUT_KEY: &str = "ferrule.flat_layout";

/// Writes `checkpoint-<state.step>/` of a multi-rank run whose optimizer state is partitioned,
/// atomically, with every rank calling it: rank 0 creates the temporary folder, each rank
/// writes its own optimizer shard into it (`fsync`ed), rank 0 writes the adapter and trainer
/// state and renames the folder. The output folder must be one that every rank sees (a local
/// disk for ranks on one machine, a shared file system across machines). A rank that fails
/// makes every rank return an error, and no `checkpoint-<step>` appears.
pub fn save_sharded_checkpoint(
    comm: &dyn Collective,
    output_dir: &Path,
    state: &TrainerState,
    adapter: &[(String, Tensor)],
    shard: &[(String, Tensor)],
    layout: &serde_json::Value,
) -> Result<PathBuf> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let tmp_dir = output_dir.join(format!("{CHECKPOINT_PREFIX}{}{TMP_SUFFIX}", state.step));
    let begun = if rank == 0 {
        begin_tmp(output_dir, state.step).map(|_| ())
    } else {
        Ok(())
    };
    comm.all_ok(begun.is_ok(), "creating the checkpoint folder")?;
    begun?;
    let written = (|| -> Result<()> {
        let meta = HashMap::from([(LAYOUT_KEY.to_string(), layout.to_string())]);
        let bytes =
            serialize_safetensors(shard, Some(meta)).context("serializing the optimizer shard")?;
        write_synced(&tmp_dir.join(shard_file_name(rank, world)), &bytes)
    })();
    comm.all_ok(written.is_ok(), "writing their optimizer shard")?;
    written?;
    let committed = if rank == 0 {
        (|| -> Result<PathBuf> {
            let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
            write_synced(
                &tmp_dir.join(ADAPTER_FILE),
                &serialize_safetensors(adapter, Some(meta))?,
            )?;
            write_synced(
                &tmp_dir.join(TRAINER_STATE_FILE),
                &serde_json::to_vec_pretty(state)?,
            )?;
            commit_tmp(output_dir, &tmp_dir, state.step)
        })()
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&tmp_dir);
        })
    } else {
        Ok(checkpoint_dir(output_dir, state.step))
    };
    comm.all_ok(committed.is_ok(), "committing the checkpoint")?;
    committed
}

/// Reads rank `rank`'s optimizer shard of a sharded checkpoint, with the flat layout it was
/// written with.
pub fn load_optimizer_shard(
    dir: &Path,
    state: &TrainerState,
    rank: usize,
    device: &Device,
) -> Result<(BTreeMap<String, Tensor>, FlatLayout)> {
    let path = dir.join(shard_file_name(rank, state.world_size as usize));
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let (tensors, meta) = deserialize_safetensors(&bytes, device)
        .with_context(|| format!("invalid or corrupt safetensors file {}", path.display()))?;
    let layout = meta
        .get(LAYOUT_KEY)
        .with_context(|| format!("{}: no {LAYOUT_KEY:?} metadata", path.display()))?;
    let layout = FlatLayout::from_json(&serde_json::from_str(layout)?)
        .with_context(|| format!("{}: bad {LAYOUT_KEY:?}", path.display()))?;
    Ok((tensors, layout))
}

/// Turns a sharded checkpoint (one optimizer file per rank) into a world-size-1 one in place:
/// one [`OPTIMIZER_FILE`] with [`super::optim::AdamW::state`]'s keys, which resumes on any
/// number of ranks at any ZeRO stage. The folder is rewritten atomically (a copy is filled and
/// renamed over it). A checkpoint that is not sharded is an error saying so.
pub fn consolidate_checkpoint(dir: &Path) -> Result<PathBuf> {
    ensure!(
        dir.join(TRAINER_STATE_FILE).is_file(),
        "{} is not a checkpoint folder (expected OUTPUT/checkpoint-STEP holding {TRAINER_STATE_FILE})",
        dir.display()
    );
    let mut state = read_trainer_state(dir)?;
    ensure!(
        state.sharded(),
        "{} is not sharded (world size {}, ZeRO stage {}): it resumes on any number of ranks as it is",
        dir.display(),
        state.world_size,
        state.zero_stage
    );
    let mut shards = Vec::new();
    let mut layout = None;
    for rank in 0..state.world_size as usize {
        let (t, l) = load_optimizer_shard(dir, &state, rank, &Device::Cpu)?;
        if let Some(first) = &layout {
            ensure!(
                first == &l,
                "{}: rank {rank}'s shard has another flat layout than rank 0's",
                dir.display()
            );
        }
        layout = Some(l);
        shards.push(t);
    }
    let full = crate::dist::consolidate_shards(&shards, &layout.expect("world size >= 2"))?;
    let adapter_path = dir.join(ADAPTER_FILE);
    let adapter_bytes = std::fs::read(&adapter_path)
        .with_context(|| format!("reading {}", adapter_path.display()))?;
    let (adapter, _) = deserialize_safetensors(&adapter_bytes, &Device::Cpu)
        .with_context(|| format!("invalid or corrupt {}", adapter_path.display()))?;
    let adapter: Vec<(String, Tensor)> = adapter.into_iter().collect();
    // `checkpoint-3` given relative to the output folder has the parent "".
    let output_dir = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let step = state.step;
    ensure!(
        dir.file_name() == checkpoint_dir(output_dir, step).file_name(),
        "{} is not named checkpoint-{step}",
        dir.display()
    );
    // Stage 0 alone makes the state whole (`sharded()` is false); the world size stays, so a
    // resume with another one reports how the global batch changes.
    state.zero_stage = 0;
    let mut extra = Vec::new();
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if ![ADAPTER_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE].contains(&name.as_str())
            && !name.starts_with("optimizer-rank")
            && e.path().is_file()
        {
            names.push(name);
        }
    }
    for name in &names {
        extra.push((name.as_str(), std::fs::read(dir.join(name))?));
    }
    let extra: Vec<(&str, &[u8])> = extra.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    save_checkpoint(output_dir, &state, &adapter, &full, &extra)
}

pub(super) fn read_trainer_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(TRAINER_STATE_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let state: TrainerState =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    ensure!(
        state.format_version <= TRAINER_STATE_VERSION,
        "{} has format version {}, newer than supported {}",
        path.display(),
        state.format_version,
        TRAINER_STATE_VERSION
    );
    Ok(state)
}

/// Why `dir` is not a complete checkpoint (a trainer state that cannot be read, or a missing
/// file), or `None` when it is one.
pub fn incomplete_reason(dir: &Path) -> Option<String> {
    let state = match read_trainer_state(dir) {
        Ok(state) => state,
        Err(e) => return Some(format!("{e:#}")),
    };
    let world = state.world_size as usize;
    let mut needed = vec![ADAPTER_FILE.to_string()];
    if state.sharded() {
        needed.extend((0..world).map(|r| shard_file_name(r, world)));
    } else {
        needed.push(OPTIMIZER_FILE.to_string());
    }
    needed
        .iter()
        .map(|name| dir.join(name))
        .find(|path| !path.is_file())
        .map(|path| format!("{} is missing", path.display()))
}

/// Every `checkpoint-<step>` folder under `output_dir` (complete or not; `*.tmp` ones are not
/// checkpoints), sorted by ascending step. A missing `output_dir` yields an empty list.
pub fn checkpoint_folders(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("listing {}", output_dir.display()));
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", output_dir.display()))?;
        let Some(step) = entry.file_name().to_str().and_then(parse_checkpoint_name) else {
            continue;
        };
        let path = entry.path();
        if path.is_dir() {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Complete checkpoints under `output_dir`, sorted by ascending step.
/// A missing `output_dir` yields an empty list.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut folders = checkpoint_folders(output_dir)?;
    folders.retain(|(_, path)| incomplete_reason(path).is_none());
    Ok(folders)
}

/// The complete checkpoint with the highest step under `output_dir`, if any.
/// `*.tmp` directories and directories missing a file (or with an unreadable
/// trainer state) are ignored; I/O errors are treated as "no checkpoint".
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    list_checkpoints(output_dir).ok()?.pop().map(|(_, p)| p)
}

/// Reads a checkpoint directory, loading tensors onto `device`.
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let state = read_trainer_state(dir)?;
    if let Some(step) = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_checkpoint_name)
    {
        ensure!(
            step == state.step,
            "{} records step {}, but the directory is named for step {step}",
            dir.join(TRAINER_STATE_FILE).display(),
            state.step
        );
    }
    let load = |name: &str| -> Result<BTreeMap<String, Tensor>> {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (tensors, _) = deserialize_safetensors(&bytes, device)
            .with_context(|| format!("invalid or corrupt safetensors file {}", path.display()))?;
        Ok(tensors)
    };
    // A sharded checkpoint's optimizer state is read per rank (`load_optimizer_shard`).
    let optimizer = if state.sharded() {
        BTreeMap::new()
    } else {
        load(OPTIMIZER_FILE)?
    };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        adapter: load(ADAPTER_FILE)?,
        optimizer,
        state,
    })
}

/// Deletes all but the `keep_last` most recent complete checkpoints under
/// `output_dir` (by step), plus leftover `checkpoint-*.tmp` directories from
/// interrupted saves. `keep_last` is clamped to at least 1: the newest
/// checkpoint is never deleted. Returns the deleted checkpoint directories.
///
/// Each victim is first renamed to a `*.tmp` name, so a crash mid-delete
/// never leaves a half-deleted directory that looks like a checkpoint.
pub fn prune_checkpoints(output_dir: &Path, keep_last: usize) -> Result<Vec<PathBuf>> {
    if let Ok(entries) = std::fs::read_dir(output_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(CHECKPOINT_PREFIX)
                && name.ends_with(TMP_SUFFIX)
                && entry.path().is_dir()
            {
                std::fs::remove_dir_all(entry.path())
                    .with_context(|| format!("removing stale {}", entry.path().display()))?;
            }
        }
    }
    let checkpoints = list_checkpoints(output_dir)?;
    let keep = keep_last.max(1);
    let n_delete = checkpoints.len().saturating_sub(keep);
    let mut deleted = Vec::with_capacity(n_delete);
    for (step, path) in checkpoints.into_iter().take(n_delete) {
        let doomed = output_dir.join(format!("{CHECKPOINT_PREFIX}{step}.deleting{TMP_SUFFIX}"));
        std::fs::rename(&path, &doomed).with_context(|| format!("removing {}", path.display()))?;
        std::fs::remove_dir_all(&doomed)
            .with_context(|| format!("removing {}", doomed.display()))?;
        deleted.push(path);
    }
    if !deleted.is_empty() {
        sync_dir(output_dir).with_context(|| format!("syncing {}", output_dir.display()))?;
    }
    Ok(deleted)
}

/// Checks that a checkpoint was produced with the same configuration.
pub fn ensure_same_config(state: &TrainerState, expected_hash: &str) -> Result<()> {
    if state.config_hash != expected_hash {
        bail!(
            "checkpoint was written with configuration hash {} but the current configuration hashes to {expected_hash}; refusing to resume with a different configuration",
            state.config_hash
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn state(step: u64) -> TrainerState {
        TrainerState {
            step,
            epoch: 1,
            epoch_position: 17,
            seed: 42,
            rng_states: BTreeMap::from([("data".to_string(), vec![u64::MAX, 1, 2, 3])]),
            config_hash: "abc".into(),
            metrics: vec![serde_json::json!({"step": step, "loss": 1.25})],
            extra: serde_json::json!({"note": "hi"}),
            ..Default::default()
        }
    }

    type Named = Vec<(String, Tensor)>;

    fn tensors(dev: &Device) -> (Named, Named) {
        let adapter = vec![
            (
                "l0.lora_A.weight".to_string(),
                Tensor::arange(0f32, 6., dev)
                    .unwrap()
                    .reshape((2, 3))
                    .unwrap(),
            ),
            (
                "l0.lora_B.weight".to_string(),
                Tensor::ones((3, 2), DType::BF16, dev).unwrap(),
            ),
        ];
        let opt = vec![("step".to_string(), Tensor::new(5i64, dev).unwrap())];
        (adapter, opt)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn save_load_round_trip() {
        let dev = Device::Cpu;
        let out = tempfile::tempdir().unwrap();
        let (adapter, opt) = tensors(&dev);
        let cfg = br#"{"r": 8}"#;
        let dir = save_checkpoint(
            out.path(),
            &state(5),
            &adapter,
            &opt,
            &[("adapter_config.json", cfg)],
        )
        .unwrap();
        assert_eq!(dir, out.path().join("checkpoint-5"));
        assert_eq!(names(out.path()), vec!["checkpoint-5"]);
        assert_eq!(
            names(&dir),
            vec![
                "adapter_config.json",
                ADAPTER_FILE,
                OPTIMIZER_FILE,
                TRAINER_STATE_FILE
            ]
        );
        let ck = load_checkpoint(&dir, &dev).unwrap();
        assert_eq!(ck.state, state(5));
        assert_eq!(ck.adapter.len(), 2);
        assert_eq!(ck.adapter["l0.lora_B.weight"].dtype(), DType::BF16);
        assert_eq!(
            ck.adapter["l0.lora_A.weight"].to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        assert_eq!(ck.optimizer["step"].to_scalar::<i64>().unwrap(), 5);
        assert_eq!(std::fs::read(dir.join("adapter_config.json")).unwrap(), cfg);
        // u64 words survive JSON exactly.
        assert_eq!(ck.state.rng_states["data"][0], u64::MAX);
    }

    #[test]
    fn latest_ignores_tmp_and_incomplete() {
        let dev = Device::Cpu;
        let out = tempfile::tempdir().unwrap();
        assert_eq!(latest_checkpoint(out.path()), None);
        assert_eq!(latest_checkpoint(&out.path().join("nope")), None);
        let (adapter, opt) = tensors(&dev);
        for step in [2, 10, 9] {
            save_checkpoint(out.path(), &state(step), &adapter, &opt, &[]).unwrap();
        }
        // A leftover temp dir with a higher step, an incomplete dir, a
        // corrupt trainer state and unrelated names are all ignored.
        let tmp = out.path().join("checkpoint-50.tmp");
        std::fs::create_dir(&tmp).unwrap();
        let incomplete = out.path().join("checkpoint-40");
        std::fs::create_dir(&incomplete).unwrap();
        std::fs::write(incomplete.join(TRAINER_STATE_FILE), b"{}").unwrap();
        let corrupt = save_checkpoint(out.path(), &state(30), &adapter, &opt, &[]).unwrap();
        std::fs::write(corrupt.join(TRAINER_STATE_FILE), b"{\"step\": 3").unwrap();
        std::fs::create_dir(out.path().join("checkpoint-x1")).unwrap();
        std::fs::create_dir(out.path().join("checkpoint-")).unwrap();
        assert_eq!(
            latest_checkpoint(out.path()),
            Some(out.path().join("checkpoint-10"))
        );
        let steps: Vec<u64> = list_checkpoints(out.path())
            .unwrap()
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(steps, vec![2, 9, 10]);
    }

    #[test]
    fn resave_same_step_replaces() {
        let dev = Device::Cpu;
        let out = tempfile::tempdir().unwrap();
        let (adapter, opt) = tensors(&dev);
        save_checkpoint(out.path(), &state(3), &adapter, &opt, &[("a.txt", b"old")]).unwrap();
        let mut s = state(3);
        s.epoch_position = 99;
        let dir = save_checkpoint(out.path(), &s, &adapter, &opt, &[]).unwrap();
        assert_eq!(names(out.path()), vec!["checkpoint-3"]);
        assert!(!dir.join("a.txt").exists());
        assert_eq!(
            load_checkpoint(&dir, &dev).unwrap().state.epoch_position,
            99
        );
    }

    #[test]
    fn failed_save_leaves_no_trace() {
        let dev = Device::Cpu;
        let out = tempfile::tempdir().unwrap();
        let (adapter, opt) = tensors(&dev);
        save_checkpoint(out.path(), &state(1), &adapter, &opt, &[]).unwrap();
        // Unsupported dtype fails during serialization.
        let bad = vec![(
            "x".to_string(),
            Tensor::zeros(2, DType::F32, &dev)
                .unwrap()
                .to_dtype(DType::F8E4M3)
                .unwrap(),
        )];
        assert!(save_checkpoint(out.path(), &state(2), &bad, &opt, &[]).is_err());
        // Invalid extra file name.
        assert!(save_checkpoint(out.path(), &state(2), &adapter, &opt, &[("../x", b"")]).is_err());
        assert!(save_checkpoint(
            out.path(),
            &state(2),
            &adapter,
            &opt,
            &[(TRAINER_STATE_FILE, b"")]
        )
        .is_err());
        assert_eq!(names(out.path()), vec!["checkpoint-1"]);
    }

    #[test]
    fn load_detects_step_mismatch_and_corruption() {
        let dev = Device::Cpu;
        let out = tempfile::tempdir().unwrap();
        let (adapter, opt) = tensors(&dev);
        let dir = save_checkpoint(out.path(), &state(4), &adapter, &opt, &[]).unwrap();
        let renamed = out.path().join("checkpoint-5");
        std::fs::rename(&dir, &renamed).unwrap();
        assert!(load_checkpoint(&renamed, &dev).is_err());
        std::fs::rename(&renamed, &dir).unwrap();
        let bytes = std::fs::read(dir.join(OPTIMIZER_FILE)).unwrap();
        std::fs::write(dir.join(OPTIMIZER_FILE), &bytes[..bytes.len() / 2]).unwrap();
        let err = load_checkpoint(&dir, &dev).unwrap_err();
        assert!(format!("{err:#}").contains(OPTIMIZER_FILE), "{err:#}");
    }

    #[test]
    fn prune_keeps_newest() {
        let dev = Device::Cpu;
        let out = tempfile::tempdir().unwrap();
        let (adapter, opt) = tensors(&dev);
        for step in [1, 2, 3, 10, 20] {
            save_checkpoint(out.path(), &state(step), &adapter, &opt, &[]).unwrap();
        }
        std::fs::create_dir(out.path().join("checkpoint-30.tmp")).unwrap();
        std::fs::write(out.path().join("metrics.jsonl"), b"").unwrap();
        let deleted = prune_checkpoints(out.path(), 2).unwrap();
        assert_eq!(
            deleted,
            vec![
                out.path().join("checkpoint-1"),
                out.path().join("checkpoint-2"),
                out.path().join("checkpoint-3")
            ]
        );
        assert_eq!(
            names(out.path()),
            vec!["checkpoint-10", "checkpoint-20", "metrics.jsonl"]
        );
        prune_checkpoints(out.path(), 0).unwrap();
        assert_eq!(names(out.path()), vec!["checkpoint-20", "metrics.jsonl"]);
        assert!(prune_checkpoints(&out.path().join("missing"), 1)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn config_hash_is_order_independent() {
        let a: HashMap<&str, i32> = HashMap::from([("x", 1), ("y", 2), ("z", 3)]);
        let b = serde_json::json!({"z": 3, "y": 2, "x": 1});
        assert_eq!(config_hash(&a).unwrap(), config_hash(&b).unwrap());
        assert_ne!(
            config_hash(&a).unwrap(),
            config_hash(&serde_json::json!({"x": 1})).unwrap()
        );
        assert_eq!(config_hash(&a).unwrap().len(), 16);
        let s = TrainerState {
            config_hash: config_hash(&a).unwrap(),
            ..Default::default()
        };
        ensure_same_config(&s, &config_hash(&b).unwrap()).unwrap();
        assert!(ensure_same_config(&s, "0000").is_err());
    }
}
