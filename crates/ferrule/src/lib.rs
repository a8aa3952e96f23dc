//! ferrule: parameter- and memory-efficient fine-tuning of pretrained transformers.

pub mod train;
pub mod util;
