//! Tensor operations with forward *and* backward that the training path needs and candle
//! does not provide with a gradient (docs/ARCHITECTURE.md, "Decisions").
//!
//! On the CPU in f32, norms, rope, attention, the SwiGLU gate, a frozen MLP and the cross-entropy are
//! fused custom ops (`kernels`) that capture their constants and return only the input
//! gradient; the composite `*_reference` versions run on other devices/dtypes.

pub mod attention;
pub mod bf16;
pub mod blas;
pub mod compute_dtype;
pub mod dora;
pub mod frozen_linear;
pub mod frozen_mlp;
mod fused_attention;
pub mod gelu;
pub mod head_loss;
pub(crate) mod kernels;
pub mod loss;
pub mod low_rank;
pub mod lsq_linear;
pub mod matmul_probe;
pub mod norm;
pub mod onednn;
pub(crate) mod product;
pub mod recompute;
pub mod rope;
pub mod scaled_linear;
pub mod swiglu;

pub use compute_dtype::{ComputeDtype, ComputeDtypeChoice, ComputeDtypeDecision};
pub use frozen_linear::{FrozenLinear, FrozenWeight};
