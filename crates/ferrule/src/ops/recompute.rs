//! Block-level recomputation (gradient checkpointing, Chen et al. 2016): a block's forward
//! runs without keeping its intermediate activations; its backward runs the block again with
//! a graph and backpropagates through it. candle keeps the whole forward graph alive until
//! backward ends (docs/ARCHITECTURE.md, decisions, fix 5), so this is how activation memory drops from
//! O(layers × block activations) to O(layers × block input + one block's activations).
//!
//! Gradients of trainable tensors inside the block are produced by the inner backward, which
//! candle's outer backward cannot see; they are collected in a [`GradSink`] that the trainer
//! merges into the outer gradient store, or hands to a hook as each block's backward ends
//! ([`GradSink::with_hook`]: layer-wise optimizer steps, the gradient dropped at once).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, TensorId, Var};

/// A block's forward, recomputable at will (it must be deterministic: dropout masks are seeded
/// per step, see `tuners::training_clock`).
pub type Block = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Receives a wanted tensor's gradient from a block's backward, when it is final.
pub type GradHook = Box<dyn Fn(TensorId, &Tensor) -> Result<()> + Send + Sync>;

/// Collects the gradients of chosen tensors (the trainable ones) from inner backward passes.
pub struct GradSink {
    wanted: HashSet<TensorId>,
    grads: Mutex<HashMap<TensorId, Tensor>>,
    hook: Option<GradHook>,
}

impl GradSink {
    pub fn new(wanted: impl IntoIterator<Item = TensorId>) -> Self {
        Self {
            wanted: wanted.into_iter().collect(),
            grads: Mutex::new(HashMap::new()),
            hook: None,
        }
    }

    /// A sink that passes each wanted gradient to `hook` as soon as its block's backward ends,
    /// and keeps none: the layer-wise optimizer step (HF's `*_layerwise` optimizers). Each
    /// wanted tensor must belong to one block only (its gradient is then final when that
    /// block's backward ends), and the hook must not change what earlier blocks compute.
    pub fn with_hook(wanted: impl IntoIterator<Item = TensorId>, hook: GradHook) -> Self {
        Self {
            hook: Some(hook),
            ..Self::new(wanted)
        }
    }

    fn collect(&self, store: &GradStore) -> Result<()> {
        if let Some(hook) = &self.hook {
            for id in &self.wanted {
                if let Some(t) = store.get_id(*id) {
                    hook(*id, t)?;
                }
            }
            return Ok(());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two blocks `x -> x * w1 -> (.) * w2`; the hook sees w2's gradient before w1's (each
    /// block's backward hands its gradient over as it ends), equal to the plain sink's, and the
    /// hooked sink keeps nothing.
    #[test]
    fn hook_receives_each_blocks_gradients_in_backward_order() {
        let dev = Device::Cpu;
        let (w1, w2) = (
            Var::new(&[2f32, 3.0], &dev).unwrap(),
            Var::new(&[5f32, 7.0], &dev).unwrap(),
        );
        let x = Tensor::new(&[1f32, -1.0], &dev).unwrap();
        let block = |w: &Var| -> Block {
            let w = w.as_tensor().clone();
            Arc::new(move |x: &Tensor| x.mul(&w))
        };
        let run = |sink: &Arc<GradSink>| {
            let h = checkpoint(&x, block(&w1), sink).unwrap();
            let y = checkpoint(&h, block(&w2), sink).unwrap();
            let mut store = y.sum_all().unwrap().backward().unwrap();
            sink.drain_into(&mut store).unwrap();
            store
        };
        let ids = [w1.as_tensor().id(), w2.as_tensor().id()];
        let plain = run(&Arc::new(GradSink::new(ids)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let hooked = Arc::new(GradSink::with_hook(
            ids,
            Box::new(move |id, g| {
                log.lock().unwrap().push((id, g.to_vec1::<f32>()?));
                Ok(())
            }),
        ));
        let store = run(&hooked);
        let seen = seen.lock().unwrap();
        // d(sum(x w1 w2))/dw2 = x w1 = (2, -3); /dw1 = x w2 = (5, -7).
        assert_eq!(
            *seen,
            vec![(ids[1], vec![2.0, -3.0]), (ids[0], vec![5.0, -7.0])]
        );
        assert_eq!(
            plain.get_id(ids[1]).unwrap().to_vec1::<f32>().unwrap(),
            vec![2.0, -3.0]
        );
        assert!(store.get_id(ids[0]).is_none() && store.get_id(ids[1]).is_none());
    }
}
