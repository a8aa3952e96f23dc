//! Scale-out: data-parallel training over several processes (docs/ARCHITECTURE.md,
//! "Scale-out").
//!
//! * [`collective`]: the [`Collective`] trait (all-reduce, reduce-scatter, all-gather,
//!   broadcast, barrier) and the world of one process; [`init`] picks the job's.
//! * `mpi` (feature `mpi`): the trait over MPI through the `mpi` crate, the only code that
//!   calls MPI.
//! * [`partition`]: the trainable parameters as one flat vector in `N` equal partitions.
//! * [`zero`]: ZeRO stages 0–3 for the trainable state; [`sharded_bnb`]: bitsandbytes'
//!   optimizers over one partition.
//! * [`sharded_base`]: the frozen base's rows spread over the ranks (`--shard-base`).
//! * [`plan`]: per-rank memory and traffic estimates (`ferrule plan`).

pub mod collective;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod partition;
pub mod plan;
pub mod sharded_base;
pub mod sharded_bnb;
pub mod zero;

pub use collective::{init, launcher_env, BaseComm, Collective, SingleProcess, Traffic};
pub use partition::FlatLayout;
pub use sharded_base::ShardedWeight;
pub use zero::{
    consolidate_shards, OptimizerState, StepResult, StepTotals, ZeroOptimizer, ZeroStage,
};
