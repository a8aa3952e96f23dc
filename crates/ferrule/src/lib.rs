//! ferrule: parameter- and memory-efficient fine-tuning of pretrained transformers.
//!
//! Layers: [`model`] (architectures, knowing nothing of methods) ← [`tuners`] (methods that
//! wrap a model's linear layers) ← [`train`] (the loop, optimizer, checkpoints), with
//! [`data`] (JSONL, chat templates, batching) and [`peft_io`] (artifacts other tools open).

pub mod adapted;
pub mod compare;
pub mod continual;
pub mod data;
pub mod dist;
pub mod export;
pub mod generate;
pub mod init;
pub mod merge;
pub mod model;
pub mod ops;
pub mod peft_io;
pub mod quant;
pub mod train;
pub mod tuners;
pub mod util;
