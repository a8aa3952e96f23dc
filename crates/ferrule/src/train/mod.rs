//! Building blocks of the training loop: optimizer, learning-rate schedule,
//! checkpoints, metrics and deterministic randomness.
//!
//! * [`optim`]: AdamW (decoupled weight decay), gradient accumulation and
//!   clipping, matching PyTorch numerics; bitsandbytes' 8-bit and paged AdamW
//!   (`optim = "adamw_8bit"`, ...).
//! * [`galore`]: GaLore and Natural GaLore (low-rank projected Adam for full fine-tuning),
//!   matching galore-torch.
//! * [`schedule`]: warmup + constant / linear / cosine schedules, matching
//!   Hugging Face transformers.
//! * [`checkpoint`]: atomically written, resumable `checkpoint-<step>/`
//!   directories.
//! * [`metrics`]: `metrics.jsonl` logging consistent across resumes, and
//!   throughput measurement.
//! * [`batching`]: micro-batches by records, by token budget or packed, the
//!   seeded data order and the optimizer steps an epoch count makes; [`budget`]: a run's
//!   length as tokens (`max_tokens`) or seconds (`max_seconds`).
//! * [`rng`]: a seedable generator whose state is saved in checkpoints.
//! * [`trainer`]: the run in its phases (start, step, after the step, finish); `resume` holds
//!   what a checkpoint keeps of a run and how `--resume` continues it, [`report`] what a run
//!   reports.

pub mod batching;
pub mod budget;
pub mod checkpoint;
pub mod config;
pub mod distill;
pub mod evaluate;
pub mod galore;
pub mod metrics;
pub mod optim;
pub mod output;
pub mod plot;
pub mod prepare;
pub mod report;
mod resume;
pub mod rng;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

pub use batching::{Batching, DataCursor};
pub use checkpoint::{
    consolidate_checkpoint, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint,
    Checkpoint, TrainerState,
};
pub use config::{ReportTo, TrainConfig};
pub use evaluate::{batch_loss, evaluate, evaluate_on};
pub use metrics::{MetricsLog, Throughput};
pub use optim::{
    build_optimizer, clip_grad_norm, AdamW, AdamWConfig, BnbAdamW, GradAccumulator, OptimName,
    Optimizer, OptimizerSpec,
};
pub use plot::{write_loss_plot, PLOT_FILE};
pub use prepare::{encode_file, encode_options, prepare, prepare_sharded, Prepared};
pub use report::{EvalReport, Progress, Silent, StepReport, StreamedBase, TrainSummary};
pub use rng::{dropout_mask, Rng};
pub use schedule::{lr_at, LrSchedule};
pub use trainer::{train, train_on, RunOptions};
