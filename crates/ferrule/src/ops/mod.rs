//! Tensor operations with forward *and* backward that the training path needs and candle
//! does not provide with a gradient (DESIGN.md, "fixes that are mandatory").

pub mod attention;
pub mod frozen_linear;
pub mod loss;
pub mod norm;
pub mod rope;

pub use frozen_linear::FrozenLinear;
