//! ferrule: parameter- and memory-efficient fine-tuning of pretrained transformers.

pub mod model;
