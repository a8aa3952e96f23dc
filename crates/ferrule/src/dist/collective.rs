//! The collective operations multi-process training needs, behind one trait.
//!
//! [`Collective`] is the only interface the trainer and the ZeRO optimizer talk to; the MPI
//! implementation ([`super::mpi::Mpi`], feature `mpi`) is the only code that calls MPI, and a
//! GPU engine (NCCL) can implement the same trait later. [`SingleProcess`] is the world of one
//! that a plain `ferrule train` (no launcher) runs in: every operation is the identity.
//!
//! Every implementation counts what it moves in a [`Traffic`], so benchmarks and the planner
//! (`ferrule plan`) speak of the same bytes.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};

/// Bytes this rank sends, per kind of collective, under the bandwidth-optimal (ring)
/// algorithms: for a payload of `S` bytes over `N` ranks, an all-reduce sends `2 (N-1)/N · S`,
/// a reduce-scatter or all-gather `(N-1)/N · S` (`S` the full, unscattered size) and a
/// broadcast `(N-1)/N · S`. This is nccl-tests' "bus bandwidth" accounting and the ZeRO
/// paper's (Rajbhandari et al. 2020, §7: data parallelism moves `2Ψ` per step); it counts the
/// payloads the collectives were given, not the bytes the transport put on a wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Traffic {
    pub all_reduce_bytes: f64,
    pub reduce_scatter_bytes: f64,
    pub all_gather_bytes: f64,
    pub broadcast_bytes: f64,
    /// Number of collective calls (barriers included).
    pub calls: u64,
}

impl Traffic {
    /// All bytes sent, every kind together.
    pub fn total_bytes(&self) -> f64 {
        self.all_reduce_bytes
            + self.reduce_scatter_bytes
            + self.all_gather_bytes
            + self.broadcast_bytes
    }

    /// Both counts together (the trainer's collectives and the sharded base's).
    pub fn plus(&self, other: &Traffic) -> Traffic {
        Traffic {
            all_reduce_bytes: self.all_reduce_bytes + other.all_reduce_bytes,
            reduce_scatter_bytes: self.reduce_scatter_bytes + other.reduce_scatter_bytes,
            all_gather_bytes: self.all_gather_bytes + other.all_gather_bytes,
            broadcast_bytes: self.broadcast_bytes + other.broadcast_bytes,
            calls: self.calls + other.calls,
        }
    }

    /// What was sent since `earlier` (a snapshot of the same counter).
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            all_reduce_bytes: self.all_reduce_bytes - earlier.all_reduce_bytes,
            reduce_scatter_bytes: self.reduce_scatter_bytes - earlier.reduce_scatter_bytes,
            all_gather_bytes: self.all_gather_bytes - earlier.all_gather_bytes,
            broadcast_bytes: self.broadcast_bytes - earlier.broadcast_bytes,
            calls: self.calls - earlier.calls,
        }
    }
}

/// The kinds of collective [`TrafficCounter`] tells apart.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Barrier,
}

impl Traffic {
    /// Adds one call of `op` with a payload of `bytes` (the full, unscattered size) over
    /// `world` ranks.
    fn add(&mut self, op: Op, bytes: usize, world: usize) {
        let share = if world > 1 {
            bytes as f64 * (world - 1) as f64 / world as f64
        } else {
            0.0
        };
        match op {
            Op::AllReduce => self.all_reduce_bytes += 2.0 * share,
            Op::ReduceScatter => self.reduce_scatter_bytes += share,
            Op::AllGather => self.all_gather_bytes += share,
            Op::Broadcast => self.broadcast_bytes += share,
            Op::Barrier => {}
        }
        self.calls += 1;
    }
}

/// A [`Traffic`] that implementations update as they run (behind a lock, so that a
/// [`BaseComm`], which tensor ops hold, can count too).
#[derive(Debug, Default)]
pub struct TrafficCounter(Mutex<Traffic>);

impl TrafficCounter {
    /// Records one call of `op` with a payload of `bytes` (the full, unscattered size) over
    /// `world` ranks.
    pub fn record(&self, op: Op, bytes: usize, world: usize) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(op, bytes, world);
    }

    pub fn get(&self) -> Traffic {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Collective communication among the ranks of one training job. All ranks must call the same
/// operations in the same order with buffers of the same lengths (MPI's rule); a rank that
/// fails instead makes the launcher stop the job (see [`Collective::abort`]).
///
/// Buffers are host `f32` / `f64` slices: the trainable state of a PEFT run is small, and a
/// GPU implementation would take device buffers through the same calls.
pub trait Collective {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of processes in the job.
    fn world_size(&self) -> usize;
    /// Number of processes of this job on this machine (for sharing its cores).
    fn local_size(&self) -> usize;
    /// Element-wise sum over ranks, in place, of `buf` (same length on every rank).
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Element-wise sum over ranks, in place, of `buf` (same length on every rank).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Sums `send` (length `N · recv.len()`) over ranks and leaves block `rank` of the sum in
    /// `recv`.
    fn reduce_scatter_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Concatenates every rank's `send` (same length everywhere), in rank order, into `recv`
    /// (length `N · send.len()`).
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Replaces `buf` on every rank by rank `root`'s `buf` (lengths may differ beforehand).
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// What this rank has sent so far.
    fn traffic(&self) -> Traffic;
    /// Stops every rank of the job with `code` (MPI_Abort); the single process just exits.
    fn abort(&self, code: i32) -> !;
    /// A communicator of its own for the frozen base's gathers (`--shard-base`): the tensor ops
    /// hold it, so it is `Send + Sync`, and its calls never interleave with the trainer's.
    fn base_comm(&self) -> Result<Arc<dyn BaseComm>>;

    /// Whether every rank passed `ok = true`; errors on a rank that is fine when another one
    /// failed, so all ranks leave a shared step (a checkpoint, say) together.
    fn all_ok(&self, ok: bool, what: &str) -> Result<()> {
        let mut failed = [if ok { 0.0 } else { 1.0 }];
        self.all_reduce_sum_f64(&mut failed)?;
        if ok && failed[0] > 0.0 {
            bail!("{} rank(s) failed {what}; see their error above", failed[0])
        }
        Ok(())
    }

    /// Errors on every rank unless every rank passed the same values as rank 0 (`(what it is,
    /// value)` pairs); the rank that differs names what.
    fn ensure_same(&self, values: &[(&str, u64)], what: &str) -> Result<()> {
        let mine: Vec<u8> = values.iter().flat_map(|(_, v)| v.to_le_bytes()).collect();
        let mut rank0 = mine.clone();
        self.broadcast_bytes(0, &mut rank0)?;
        let differ: Vec<&str> = values
            .iter()
            .zip(rank0.chunks_exact(8))
            .filter(|((_, v), r)| v.to_le_bytes() != **r)
            .map(|((name, _), _)| *name)
            .collect();
        self.all_ok(
            differ.is_empty(),
            &format!("to agree with rank 0 on {what}"),
        )?;
        if !differ.is_empty() {
            bail!(
                "rank {} differs from rank 0 in {}: every rank must be started with the same arguments, data and output folder",
                self.rank(),
                differ.join(", ")
            )
        }
        Ok(())
    }
}

/// The world of one process: what `ferrule train` runs in without a launcher.
#[derive(Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn local_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_lengths(send.len(), recv.len(), 1)?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_lengths(recv.len(), send.len(), 1)?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn broadcast_bytes(&self, _root: usize, _buf: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn base_comm(&self) -> Result<Arc<dyn BaseComm>> {
        Ok(Arc::new(SingleProcess))
    }
}

/// The collectives the sharded frozen base needs (`dist::sharded_base`), on a communicator
/// separate from [`Collective`]'s. The ops that read a sharded weight call them in their
/// forward and backward passes, which candle runs on the thread that called
/// `forward`/`backward`: the training loop's, the only thread that talks to MPI
/// (`MPI_THREAD_FUNNELED`). Every rank must make the same calls in the same order (MPI's rule):
/// the trainer runs the same passes on every rank when the base is sharded.
pub trait BaseComm: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank by rank `root`'s (same length everywhere).
    fn broadcast_f32(&self, root: usize, buf: &mut [f32]) -> Result<()>;
    /// Concatenates every rank's `send` (same length everywhere), in rank order, into `recv`.
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Sums `send` (length `N · recv.len()`) over ranks and leaves block `rank` in `recv`.
    fn reduce_scatter_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// What this rank has sent on this communicator so far.
    fn traffic(&self) -> Traffic;
}

impl BaseComm for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn broadcast_f32(&self, _root: usize, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        Collective::all_gather_f32(self, send, recv)
    }
    fn reduce_scatter_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        Collective::reduce_scatter_sum_f32(self, send, recv)
    }
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
}

/// Checks that a scattered/gathered buffer of `full` elements is `world` blocks of `block`.
pub(crate) fn check_lengths(full: usize, block: usize, world: usize) -> Result<()> {
    if full != block * world {
        bail!("collective buffer of {full} elements is not {world} blocks of {block}")
    }
    Ok(())
}

/// Environment variables the common MPI launchers set in the processes they start
/// (Open MPI's mpirun, PMI-based launchers such as MPICH's Hydra and Slurm's srun, PMIx).
const LAUNCHER_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "MPI_LOCALNRANKS",
];

/// The launcher variable this process was started with, if any (`NAME=VALUE`).
pub fn launcher_env() -> Option<String> {
    LAUNCHER_VARS
        .iter()
        .find_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
}

/// The job this process belongs to: MPI's world when an MPI launcher started it (feature
/// `mpi`), otherwise the world of one. MPI is initialized here, once per process.
///
/// Errors when a launcher started this process but the build has no MPI (each rank would
/// silently train alone and write the same output folder).
pub fn init() -> Result<Box<dyn Collective>> {
    let Some(var) = launcher_env() else {
        return Ok(Box::new(SingleProcess));
    };
    #[cfg(feature = "mpi")]
    {
        let _ = var;
        Ok(Box::new(super::mpi::Mpi::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    bail!(
        "this process was started by an MPI launcher ({var}), but this ferrule was built without the `mpi` feature; \
         build it with default features (cargo build --release -p ferrule-cli) to train on several processes"
    )
}
