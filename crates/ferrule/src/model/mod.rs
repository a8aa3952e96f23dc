//! Architectures: config parsing, weight loading, forward passes.
//!
//! Models know nothing about tuning methods. Every module a method may change (linear layers,
//! norm weights) goes through a [`ModelHook`] with its Hugging Face module path
//! (`model.layers.3.self_attn.q_proj`) while the model is built; a tuner is a hook that
//! changes the modules it targets (see [`hooks`]).

pub mod bert;
pub mod config;
pub mod gguf;
pub mod hooks;
pub mod llama;
pub(crate) mod packed;
pub mod residency;
pub mod source;
pub mod stream;
pub mod weights;

use anyhow::Result;
use candle_core::{Device, Tensor};

pub use config::{family_of, BertConfig, DecoderConfig, Family};
pub use hooks::{
    AttentionInfo, BranchInfo, BranchKind, Embedding, EmbeddingInfo, Frozen, InputInfo, KvPrefix,
    Linear, LinearInfo, ModelHook, NormInfo, NormParams, ResidualBranch, VirtualTokens,
};
pub use source::{LoadOptions, ModelSource};
pub use weights::{BaseRelease, Weights};

/// What the model is trained or run for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Task {
    /// Next-token prediction (`*ForCausalLM`), PEFT `CAUSAL_LM`.
    CausalLm,
    /// Sequence classification (`*ForSequenceClassification`), PEFT `SEQ_CLS`.
    SeqCls,
    /// Hidden states / sentence embeddings, PEFT `FEATURE_EXTRACTION`.
    FeatureExtraction,
}

impl Task {
    pub fn peft_name(self) -> &'static str {
        match self {
            Task::CausalLm => "CAUSAL_LM",
            Task::SeqCls => "SEQ_CLS",
            Task::FeatureExtraction => "FEATURE_EXTRACTION",
        }
    }
}

/// The architecture of a built model.
pub enum Arch {
    Decoder(llama::DecoderLm),
    Bert(bert::Bert),
}

/// A built model of any supported family.
pub struct Model {
    pub arch: Arch,
    pub task: Task,
    /// Parameters of the base model (as `model.num_parameters()` counts them: tied tensors once).
    pub base_params: usize,
    /// Whether reading the frozen weights is a collective (`--shard-base`): every rank must then
    /// run the same forward and backward passes, in the same order.
    pub lockstep: bool,
}

/// Token inputs: `[b, t]` ids, optional 1/0 attention mask and token types (BERT).
pub struct Inputs<'a> {
    pub input_ids: &'a Tensor,
    pub attention_mask: Option<&'a Tensor>,
    pub token_type_ids: Option<&'a Tensor>,
}

impl Model {
    /// Builds the model of `source` for `task`, passing every hook point through `hook`.
    pub fn build(
        source: &ModelSource,
        task: Task,
        hook: &dyn ModelHook,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let arch = match family_of(&source.config)? {
            Family::Decoder => {
                if task != Task::CausalLm {
                    anyhow::bail!(
                        "{}: only causal-LM training is supported for decoder models; use a BERT-family encoder for {}",
                        source.location.display(),
                        task.peft_name()
                    )
                }
                let cfg = DecoderConfig::from_json(&source.config)?;
                Arch::Decoder(llama::DecoderLm::new(cfg, &source.weights, hook, device)?)
            }
            Family::Bert => {
                let cfg = BertConfig::from_json(&source.config)?;
                let bt = match task {
                    Task::SeqCls => bert::BertTask::SequenceClassification,
                    Task::FeatureExtraction => bert::BertTask::Embedding,
                    Task::CausalLm => anyhow::bail!(
                        "{} is an encoder (bert); it cannot be trained as a causal LM",
                        source.location.display()
                    ),
                };
                Arch::Bert(bert::Bert::new(
                    cfg,
                    bt,
                    &source.weights,
                    hook,
                    device,
                    seed,
                )?)
            }
        };
        let initialized = match &arch {
            Arch::Bert(b) => b.initialized_params,
            Arch::Decoder(_) => 0,
        };
        let unused = source.weights.unused();
        if !unused.is_empty() {
            tracing::warn!(
                "{}: {} checkpoint tensor(s) not used by the model, e.g. {:?}",
                source.location.display(),
                unused.len(),
                unused[0]
            );
        }
        let lockstep = !source.weights.sharded().is_empty();
        Ok(Model {
            arch,
            task,
            base_params: source.weights.used_elements() + initialized,
            lockstep,
        })
    }

    /// Turns block recomputation (gradient checkpointing) on for architectures that support
    /// it (decoders); returns whether it is on.
    pub fn set_recompute(
        &self,
        sink: Option<std::sync::Arc<crate::ops::recompute::GradSink>>,
    ) -> bool {
        match &self.arch {
            Arch::Decoder(m) => {
                let on = sink.is_some();
                m.set_recompute(sink);
                on
            }
            Arch::Bert(_) => false,
        }
    }

    /// Autograd on (training, the default) or off (inference: no pass keeps the graph of the
    /// layers it has run; see `DecoderLm::set_grad_enabled`).
    pub fn set_grad_enabled(&self, on: bool) {
        match &self.arch {
            Arch::Decoder(m) => m.set_grad_enabled(on),
            Arch::Bert(m) => m.set_grad_enabled(on),
        }
    }

    /// Autograd off until the guard is dropped, then as it was.
    pub fn no_grad(&self) -> NoGrad<'_> {
        let was = match &self.arch {
            Arch::Decoder(m) => m.grad_enabled(),
            Arch::Bert(m) => m.grad_enabled(),
        };
        self.set_grad_enabled(false);
        NoGrad { model: self, was }
    }

    pub fn device(&self) -> &Device {
        match &self.arch {
            Arch::Decoder(m) => m.device(),
            Arch::Bert(m) => m.device(),
        }
    }

    /// Reruns `inputs` without autograd, checking each stage's output, and names the first
    /// stage (embeddings, a layer, the final norm) whose output holds a NaN or infinite value;
    /// `None` when all are finite (then the head, pooling or loss made it). For the error of a
    /// command that met a non-finite result: a pass costs one forward. `position_ids` as
    /// [`Self::forward_at`] takes them.
    pub fn trace_non_finite(
        &self,
        inputs: &Inputs,
        position_ids: Option<&Tensor>,
    ) -> Result<Option<String>> {
        let _no_grad = self.no_grad();
        self.trace().run(|| self.forward_at(inputs, position_ids))
    }

    /// [`Self::trace_non_finite`] for a padding-free batch ([`Self::forward_packed`]).
    pub fn trace_non_finite_packed(
        &self,
        input_ids: &Tensor,
        lens: &[usize],
    ) -> Result<Option<String>> {
        let _no_grad = self.no_grad();
        self.trace().run(|| self.forward_packed(input_ids, lens))
    }

    /// Runs `pass` (a forward pass of this model, e.g. its loss) and returns its result with
    /// the hidden states of transformers' `output_hidden_states`: the embeddings, then each
    /// layer's output (in a decoder the last one after the final norm), each `[b, t, hidden]`
    /// (`[1, n, hidden]` padding-free) and in the pass's graph. For a distillation loss over
    /// every layer's features (PELA).
    pub fn with_stage_outputs<T>(
        &self,
        pass: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Vec<Tensor>)> {
        let (out, mut stages) = self.trace().capture(pass)?;
        // A decoder reports its last layer's output and then the final norm's; transformers'
        // hidden_states hold the latter in place of the former.
        if matches!(self.arch, Arch::Decoder(_)) && stages.len() >= 2 {
            stages.remove(stages.len() - 2);
        }
        Ok((out, stages))
    }

    fn trace(&self) -> &crate::util::finite::LayerTrace {
        match &self.arch {
            Arch::Decoder(m) => &m.trace,
            Arch::Bert(m) => &m.trace,
        }
    }

    /// [`Self::forward`] of a padding-free batch: `input_ids: [1, n]` holds sequences of
    /// `lens` tokens end to end (positions restart at each, no attention across them).
    /// Causal-LM logits `[1, n, v]`, classification logits `[sequences, c]`, or each
    /// sequence's mean-pooled embedding `[sequences, h]`; each row equals the padded batch's.
    pub fn forward_packed(&self, input_ids: &Tensor, lens: &[usize]) -> Result<Tensor> {
        match &self.arch {
            Arch::Decoder(m) => m.forward_packed(input_ids, lens),
            Arch::Bert(m) => {
                let out = m.forward_packed(input_ids, lens)?;
                match out.logits {
                    Some(l) => Ok(l),
                    None => bert::mean_pool_packed(&out.last_hidden_state, lens),
                }
            }
        }
    }

    /// [`Self::trace_non_finite`] as a clause for an error message: "; the first non-finite
    /// output is layer 3's (model.layers.3)", or that every layer's output was finite; empty
    /// when the rerun itself fails.
    pub fn non_finite_origin(&self, inputs: &Inputs, position_ids: Option<&Tensor>) -> String {
        crate::util::finite::origin_clause(self.trace_non_finite(inputs, position_ids))
    }

    /// The task's output: causal-LM logits `[b,t,v]`, classification logits `[b,c]`, or
    /// mean-pooled embeddings `[b,h]`.
    pub fn forward(&self, inputs: &Inputs) -> Result<Tensor> {
        self.forward_at(inputs, None)
    }

    /// [`Self::forward`] with the tokens' rope positions, `position_ids: [b, t]` as
    /// transformers takes them (decoders; see `DecoderLm::hidden_states` for what prompt and
    /// prefix tuning do with them). BERT-family encoders refuse them.
    pub fn forward_at(&self, inputs: &Inputs, position_ids: Option<&Tensor>) -> Result<Tensor> {
        match &self.arch {
            Arch::Decoder(m) => {
                m.forward(inputs.input_ids, inputs.attention_mask, position_ids, None)
            }
            Arch::Bert(_) if position_ids.is_some() => {
                anyhow::bail!("position_ids: BERT-family encoders number their positions from 0 and take no position_ids")
            }
            Arch::Bert(m) => {
                let out = m.forward(
                    inputs.input_ids,
                    inputs.attention_mask,
                    inputs.token_type_ids,
                )?;
                match out.logits {
                    Some(l) => Ok(l),
                    None => bert::mean_pool(&out.last_hidden_state, inputs.attention_mask),
                }
            }
        }
    }
}

/// [`Model::no_grad`]'s guard.
pub struct NoGrad<'a> {
    model: &'a Model,
    was: bool,
}

impl Drop for NoGrad<'_> {
    fn drop(&mut self) {
        self.model.set_grad_enabled(self.was)
    }
}
