//! ConPET (Song et al. 2023), the dynamic variant, for sequence classification: a set of
//! tasks, each one LoRA expert with its own classifier head over its own labels, and a
//! selector (its own LoRA and a projector with one row per task) that routes each record to
//! its top-k experts (reference: Raincleared-Song/ConPET, `models/bert_selector.py`,
//! `loss_similarity.py`, `kernel/training_selector.py`).
//!
//! `ferrule train --method conpet --continual DIR` adds the training split as a new task
//! (`crate::continual::add_task`); `ferrule eval --adapter DIR` routes and scores over every
//! task seen (`crate::continual::RoutedSet`). This folder holds what is the method's own: its
//! settings ([`config`]), the routing math ([`layer`]) and the set's layout on disk ([`set`]).
//! Every expert and the selector are plain PEFT LoRA folders, trained by the ordinary trainer
//! one phase at a time, so the registry entry builds one expert's LoRA ([`METHOD`]'s `build`,
//! for `inspect` and `plan`).

pub mod config;
pub mod layer;
pub mod set;

use anyhow::Result;
use serde_json::{Map, Value};

pub use config::ConpetConfig;
pub use set::Manifest;

use super::config::AdapterConfig;
use super::registry::{BuildContext, Method};
use super::Tuner;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "conpet",
    peft_type: "CONPET",
    summary: "ConPET: one LoRA expert and head per task plus a selector that routes records to experts (Song et al. 2023); train with --continual DIR",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: None,
    count_from_shapes: None,
    trains_whole_model: false,
    f32_weights: None,
};

fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    super::config::default_list(
        options,
        "target_modules",
        model_type,
        super::lora::default_targets,
    )
}

/// One expert's LoRA (what `inspect` shows and what each task trains).
fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg = typed(config)?;
    (super::lora::METHOD.build)(&cfg.lora(), ctx)
}

/// The typed, checked config of a `CONPET` adapter table.
pub fn typed(config: &AdapterConfig) -> Result<ConpetConfig> {
    let cfg: ConpetConfig = config.typed("conpet")?;
    cfg.validate()?;
    Ok(cfg)
}
