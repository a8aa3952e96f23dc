//! What a run reports: each optimizer step, each evaluation and the finished run's summary,
//! and the [`Progress`] sink that receives them as they happen.

use std::path::PathBuf;

use serde::Serialize;

use crate::dist::Traffic;

/// One optimizer step, as reported to the progress display and `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Non-padding tokens in this step.
    pub tokens: usize,
    /// Non-padding tokens per second over recent steps.
    pub tokens_per_sec: f64,
    /// All positions (padding included) per second over recent steps (equal to
    /// `tokens_per_sec` with padding-free batches).
    pub positions_per_sec: f64,
    pub step_seconds: f64,
}

/// An evaluation pass.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub step: usize,
    pub eval_loss: f64,
    pub eval_perplexity: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_records: usize,
}

/// Where a run reports what it does (the CLI draws a progress bar; tests stay quiet).
pub trait Progress {
    fn start(&mut self, _total_steps: usize, _first_step: usize) {}
    fn step(&mut self, _report: &StepReport) {}
    /// An evaluation of `records` records begins (it may take a while).
    fn eval_start(&mut self, _records: usize) {}
    fn eval(&mut self, _report: &EvalReport) {}
    fn message(&mut self, _text: &str) {}
    /// Something the user should act on (a run that stopped learning, a checkpoint skipped):
    /// logged as a warning by default, so that a quiet display still shows it.
    fn warning(&mut self, text: &str) {
        tracing::warn!("{text}");
    }
    fn finish(&mut self) {}
}

/// Reports nothing, warnings included (the ranks other than 0 report through it).
pub struct Silent;
impl Progress for Silent {
    fn warning(&mut self, _text: &str) {}
}

/// What a finished run produced.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub output_dir: PathBuf,
    pub steps: usize,
    pub completed: bool,
    /// Stopped early by [`crate::train::RunOptions::interrupt`], after saving a checkpoint of step `steps`.
    pub interrupted: bool,
    /// Ended by `max_seconds` before the planned last step; the result was saved.
    pub time_limit_reached: bool,
    pub trainable_params: usize,
    pub total_params: usize,
    /// The run trained the whole model (full fine-tuning): the output folder holds a Hugging
    /// Face model (`config.json`, `model.safetensors`), not an adapter.
    pub whole_model: bool,
    /// Bytes of the frozen base's weights as held (quantized formats included). With full
    /// fine-tuning, of the tensors left frozen: a trained tensor is one of the run's
    /// parameters, and its base is dropped once the copy exists.
    pub base_weight_bytes: usize,
    pub train_records: usize,
    pub skipped_records: usize,
    pub truncated_records: usize,
    pub final_loss: Option<f64>,
    pub eval: Option<EvalReport>,
    pub tokens_per_sec: Option<f64>,
    pub positions_per_sec: Option<f64>,
    pub median_step_seconds: Option<f64>,
    pub seconds: f64,
    /// How batches were laid out (`padding`, and why it differs from the config's when it does).
    pub padding: String,
    /// How micro-batches were formed (records, a token budget or packed bins), with the
    /// figures of the epoch the run started in.
    pub batching: String,
    /// Micro-batches in the epoch the run started in (with a token budget an epoch's count
    /// depends on its order).
    pub micro_batches_per_epoch: usize,
    /// Optimizer steps per epoch: global micro-batches (`world` micro-batches each) over
    /// `grad_accum`. The learning-rate schedule counts optimizer steps.
    pub steps_per_epoch: f64,
    /// What computed the large matrix products: the system BLAS opened, or the gemm crate
    /// (`ops::blas`), and in bf16 oneDNN for the frozen base's; step times depend on it.
    pub matmul_backend: String,
    /// The frozen base's compute dtype (`f32` or `bf16`) and why it was chosen.
    pub compute_dtype: crate::ops::ComputeDtypeDecision,
    /// The probe's measurements for the shape classes this process computed, when it chose
    /// per shape (`ops::matmul_probe`; empty with an explicit `FERRULE_BLAS` or no BLAS).
    pub matmul_probe: Vec<crate::ops::matmul_probe::ProbeEntry>,
    /// Processes that trained (1 without a launcher).
    pub world_size: usize,
    pub zero_stage: u8,
    /// Peak resident memory (`VmHWM`) of each rank, in bytes (0 where unknown).
    pub peak_rss_bytes_per_rank: Vec<f64>,
    /// What this rank sent in the collectives of its busiest step (none in a single process).
    pub comm_per_step: Option<Traffic>,
    /// With the base streamed (`--stream-base`, `--max-resident-gb`): what stayed resident.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streamed_base: Option<StreamedBase>,
}

/// The frozen base of a streamed run: the planned split, and what the streamer held.
#[derive(Clone, Debug, Serialize)]
pub struct StreamedBase {
    /// Held, kept resident (`--max-resident-gb`) and the streaming window, in bytes.
    pub residency: crate::model::residency::Residency,
    /// The high-water mark of the checkpoint's mapped bytes the streamer held resident: the
    /// kept matrices once used, and the others while in use or read ahead
    /// ([`crate::model::stream::Streamer::peak_resident_bytes`]).
    pub peak_mapped_resident_bytes: usize,
}
