//! Train/eval switch and the step counter that tuner layers share (dropout needs both).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Shared by every layer a tuner creates.
#[derive(Debug, Default)]
pub struct Mode {
    training: AtomicBool,
    /// Micro-step counter: dropout masks are a pure function of (seed, step, layer), so a
    /// resumed run draws exactly the masks an uninterrupted run would.
    step: AtomicU64,
    seed: u64,
}

impl Mode {
    pub fn new(seed: u64) -> Self {
        Self { training: AtomicBool::new(false), step: AtomicU64::new(0), seed }
    }
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed)
    }
    pub fn training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }
    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed)
    }
    /// Seed for the dropout mask of `layer` at the current step.
    pub fn dropout_seed(&self, layer: &str) -> u64 {
        crate::init::seed_for(self.seed ^ self.step.load(Ordering::Relaxed).wrapping_mul(0x2545_F491_4F6C_DD1D), layer)
    }
}

/// Inverted dropout with a seeded mask: keeps each element with probability 1 − p and
/// scales kept ones by 1/(1 − p).
pub fn dropout(x: &candle_core::Tensor, p: f64, seed: u64) -> candle_core::Result<candle_core::Tensor> {
    use rand::{Rng, SeedableRng};
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.gen::<f64>() < p { 0.0 } else { scale }).collect();
    let mask = candle_core::Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}
