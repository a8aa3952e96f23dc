//! Block-level recomputation (gradient checkpointing, Chen et al. 2016): a block's forward
//! runs without keeping its intermediate activations; its backward runs the block again with
//! a graph and backpropagates through it. candle keeps the whole forward graph alive until
//! backward ends (docs/ARCHITECTURE.md, decisions, fix 5), so this is how activation memory drops from
//! O(layers × block activations) to O(layers × block input + one block's activations).
//!
//! Gradients of trainable tensors inside the block are produced by the inner backward, which
//! candle's outer backward cannot see; they are collected in a [`GradSink`] that the trainer
//! merges into the outer gradient store.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, TensorId, Var};

/// A block's forward, recomputable at will (it must be deterministic: dropout masks are seeded
/// per step, see `tuners::training_clock`).
pub type Block = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Collects the gradients of chosen tensors (the trainable ones) from inner backward passes.
pub struct GradSink {
    wanted: HashSet<TensorId>,
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl GradSink {
    pub fn new(wanted: impl IntoIterator<Item = TensorId>) -> Self {
        Self {
            wanted: wanted.into_iter().collect(),
            grads: Mutex::new(HashMap::new()),
        }
    }

    fn collect(&self, store: &GradStore) -> Result<()> {
        let mut g = self.grads.lock().unwrap();
        for id in &self.wanted {
            if let Some(t) = store.get_id(*id) {
                let sum = match g.remove(id) {
                    Some(prev) => (prev + t)?,
                    None => t.clone(),
                };
                g.insert(*id, sum);
            }
        }
        Ok(())
    }

    /// Adds the collected gradients into `store` and empties the sink.
    pub fn drain_into(&self, store: &mut GradStore) -> Result<()> {
        for (id, t) in self.grads.lock().unwrap().drain() {
            let sum = match store.get_id(id) {
                Some(prev) => (prev + &t)?,
                None => t,
            };
            store.insert_id(id, sum);
        }
        Ok(())
    }
}

/// `block(x)`, with the block's activations recomputed during backward instead of kept.
/// CPU only; callers run the block directly on other devices.
pub fn checkpoint(x: &Tensor, block: Block, sink: &Arc<GradSink>) -> Result<Tensor> {
    let y = block(&x.detach())?.detach().contiguous()?;
    // The op only joins the graph when its input does; the first block's input (embeddings
    // of a frozen table) does not, yet the block's own trainable tensors need its backward.
    let x = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.as_tensor().clone()
    };
    x.apply_op1_arc(Arc::new(Box::new(Recompute {
        y: Mutex::new(Some(y)),
        block,
        sink: sink.clone(),
    })))
}

struct Recompute {
    /// The forward result, handed over once by `cpu_fwd`.
    y: Mutex<Option<Tensor>>,
    block: Block,
    sink: Arc<GradSink>,
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "recompute"
    }

    fn cpu_fwd(&self, _storage: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self
            .y
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("recompute: forward ran twice".into()))?;
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("recompute: CPU only")
        };
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("recompute: output not contiguous".into()))?;
        let data = match cpu {
            CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
            _ => candle_core::bail!("recompute: f32 only"),
        };
        Ok((data, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = (self.block)(x.as_tensor())?;
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        self.sink.collect(&grads)?;
        Ok(grads.get(x.as_tensor()).cloned())
    }
}
