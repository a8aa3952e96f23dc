//! [`Collective`] over MPI (Open MPI or any MPI-3 library) through the `mpi` crate (rsmpi):
//! the only code in ferrule that calls MPI.

use std::sync::Arc;
use std::thread::ThreadId;

use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use super::collective::{check_lengths, BaseComm, Collective, Op, Traffic, TrafficCounter};

/// MPI's world communicator. MPI's default error handler (`MPI_ERRORS_ARE_FATAL`) stays in
/// place: a failed MPI call ends the job, as a rank that dies does.
pub struct Mpi {
    // Finalizes MPI when dropped; must outlive `world`.
    _universe: Universe,
    world: SimpleCommunicator,
    local_size: usize,
    traffic: TrafficCounter,
}

impl Mpi {
    /// Initializes MPI. Only the thread that calls this makes MPI calls (`MPI_THREAD_FUNNELED`);
    /// the tensor kernels' worker threads never do.
    pub fn init() -> Result<Mpi> {
        let Some((universe, _level)) = mpi::initialize_with_threading(Threading::Funneled) else {
            bail!("MPI was already initialized in this process")
        };
        let world = universe.world();
        let local_size = world.split_shared(world.rank()).size() as usize;
        Ok(Mpi {
            _universe: universe,
            world,
            local_size,
            traffic: TrafficCounter::default(),
        })
    }

    fn n(&self) -> usize {
        self.world.size() as usize
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.n()
    }
    fn local_size(&self) -> usize {
        self.local_size
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        self.traffic.record(Op::AllReduce, 4 * buf.len(), self.n());
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        self.traffic.record(Op::AllReduce, 8 * buf.len(), self.n());
        Ok(())
    }
    fn reduce_scatter_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_lengths(send.len(), recv.len(), self.n())?;
        self.world
            .reduce_scatter_block_into(send, recv, SystemOperation::sum());
        self.traffic
            .record(Op::ReduceScatter, 4 * send.len(), self.n());
        Ok(())
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_lengths(recv.len(), send.len(), self.n())?;
        self.world.all_gather_into(send, recv);
        self.traffic.record(Op::AllGather, 4 * recv.len(), self.n());
        Ok(())
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        let root_proc = self.world.process_at_rank(root as i32);
        let mut len = [buf.len() as u64];
        root_proc.broadcast_into(&mut len[..]);
        buf.resize(len[0] as usize, 0);
        root_proc.broadcast_into(&mut buf[..]);
        self.traffic.record(Op::Broadcast, buf.len() + 8, self.n());
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        self.traffic.record(Op::Barrier, 0, self.n());
        Ok(())
    }
    fn traffic(&self) -> Traffic {
        self.traffic.get()
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn base_comm(&self) -> Result<Arc<dyn BaseComm>> {
        // A duplicate of the world: the base's gathers have a context of their own.
        Ok(Arc::new(MpiBase {
            comm: self.world.duplicate(),
            thread: std::thread::current().id(),
            traffic: TrafficCounter::default(),
        }))
    }
}

/// [`BaseComm`] over a duplicate of MPI's world communicator.
struct MpiBase {
    comm: SimpleCommunicator,
    /// The thread that initialized MPI, the only one allowed to call it.
    thread: ThreadId,
    traffic: TrafficCounter,
}

// SAFETY: an MPI communicator is a handle that MPI lets any thread use; MPI_THREAD_FUNNELED
// only requires that the calls come from the thread that initialized MPI, which `funneled`
// checks before every call (the ops that hold this run on the training loop's thread).
unsafe impl Send for MpiBase {}
unsafe impl Sync for MpiBase {}

impl std::fmt::Debug for MpiBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MpiBase(rank {} of {})",
            self.comm.rank(),
            self.comm.size()
        )
    }
}

impl MpiBase {
    fn funneled(&self) -> Result<()> {
        if std::thread::current().id() != self.thread {
            bail!("internal error: a sharded base weight was read off the training loop's thread (MPI is initialized MPI_THREAD_FUNNELED)")
        }
        Ok(())
    }
    fn n(&self) -> usize {
        self.comm.size() as usize
    }
}

impl BaseComm for MpiBase {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.n()
    }
    fn broadcast_f32(&self, root: usize, buf: &mut [f32]) -> Result<()> {
        self.funneled()?;
        self.comm.process_at_rank(root as i32).broadcast_into(buf);
        self.traffic.record(Op::Broadcast, 4 * buf.len(), self.n());
        Ok(())
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.funneled()?;
        check_lengths(recv.len(), send.len(), self.n())?;
        self.comm.all_gather_into(send, recv);
        self.traffic.record(Op::AllGather, 4 * recv.len(), self.n());
        Ok(())
    }
    fn reduce_scatter_sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.funneled()?;
        check_lengths(send.len(), recv.len(), self.n())?;
        self.comm
            .reduce_scatter_block_into(send, recv, SystemOperation::sum());
        self.traffic
            .record(Op::ReduceScatter, 4 * send.len(), self.n());
        Ok(())
    }
    fn traffic(&self) -> Traffic {
        self.traffic.get()
    }
}
