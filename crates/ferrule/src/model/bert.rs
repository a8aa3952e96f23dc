//! BERT-family encoders (Devlin et al. 2019): embeddings, post-norm transformer layers,
//! mean pooling for sentence embeddings, and the `BertForSequenceClassification` head
//! (pooler → classifier). Parameter names are the Hugging Face ones, verbatim.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};

use super::config::BertConfig;
use super::hooks::{branch, fusable_down, with_input_delta};
use super::packed;
use super::weights::Weights;
use super::{
    BranchInfo, BranchKind, Embedding, EmbeddingInfo, InputInfo, Linear, LinearInfo, ModelHook,
    NormInfo, NormParams, ResidualBranch, VirtualTokens,
};
use crate::ops::attention::{attention, attention_varlen, build_mask, MaskKind};
use crate::ops::frozen_mlp::gelu_mlp_scaled;
use crate::ops::gelu::gelu;
use crate::ops::norm::{add_layer_norm, layer_norm};
use crate::ops::FrozenLinear;

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

struct Layer {
    query: Box<dyn Linear>,
    key: Box<dyn Linear>,
    value: Box<dyn Linear>,
    attn_out: Box<dyn Linear>,
    attn_norm: Norm,
    intermediate: Box<dyn Linear>,
    output: Box<dyn Linear>,
    output_norm: Norm,
    /// Changes to the attention and feed-forward branches, from the residual-branch hook point.
    attn_branch: Option<Box<dyn ResidualBranch>>,
    mlp_branch: Option<Box<dyn ResidualBranch>>,
}

/// What the encoder is used for; decides the module paths (`bert.` prefix under a head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BertTask {
    /// Bare `BertModel`: hidden states and mean-pooled sentence embeddings.
    Embedding,
    /// `BertForSequenceClassification`: pooler + `classifier` linear.
    SequenceClassification,
}

pub struct Bert {
    pub config: BertConfig,
    pub task: BertTask,
    /// `[vocab, hidden]`, through the embedding hook point.
    word_embeddings: Box<dyn Embedding>,
    /// Virtual tokens before the input (prompt tuning), from the input hook point.
    virtual_tokens: Option<Box<dyn VirtualTokens>>,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
    pooler: Option<Box<dyn Linear>>,
    classifier: Option<Box<dyn Linear>>,
    /// Parameters created here rather than read from the checkpoint (a new classifier).
    pub initialized_params: usize,
    device: Device,
    /// Off: every layer's output is detached ([`Bert::set_grad_enabled`]).
    grad_enabled: AtomicBool,
    /// Finds the first stage with a non-finite output, when asked ([`super::Model::trace_non_finite`]).
    pub(crate) trace: crate::util::finite::LayerTrace,
}

/// Outputs of one encoder pass.
pub struct BertOutput {
    pub last_hidden_state: Tensor,
    pub pooler_output: Option<Tensor>,
    pub logits: Option<Tensor>,
}

impl Bert {
    /// `init_seed` seeds the classifier when the checkpoint has none (HF: normal(0, initializer_range), zero bias).
    pub fn new(
        config: BertConfig,
        task: BertTask,
        w: &Weights,
        hook: &dyn ModelHook,
        device: &Device,
        init_seed: u64,
    ) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        // Module paths as the task's HF class names them; weights may or may not carry the prefix.
        let prefix = match task {
            BertTask::Embedding => "",
            BertTask::SequenceClassification => "bert.",
        };
        let names = |n: &str| vec![format!("bert.{n}"), n.to_string()];
        let get = |n: &str, shape: &[usize]| w.get_any(&names(n), shape);
        let norm = |n: &str| -> Result<Norm> {
            // Old checkpoints name LayerNorm parameters gamma/beta.
            let weight = w.get_any(
                &[names(&format!("{n}.weight")), names(&format!("{n}.gamma"))].concat(),
                &[h],
            )?;
            let bias = w.get_any(
                &[names(&format!("{n}.bias")), names(&format!("{n}.beta"))].concat(),
                &[h],
            )?;
            let p = hook.norm(
                &NormInfo {
                    path: format!("{prefix}{n}"),
                },
                NormParams {
                    weight,
                    bias: Some(bias),
                },
            )?;
            Ok(Norm {
                weight: p.weight,
                bias: p.bias.context("a LayerNorm hook dropped the bias")?,
            })
        };
        let lin = |n: &str, out_f: usize, in_f: usize| -> Result<Box<dyn Linear>> {
            let weight = w.frozen_any(&names(&format!("{n}.weight")), [out_f, in_f])?;
            let bias = get(&format!("{n}.bias"), &[out_f])?;
            hook.linear(
                &LinearInfo {
                    path: format!("{prefix}{n}"),
                    is_output_head: false,
                    tied_to: None,
                },
                FrozenLinear::from_weight(weight, Some(bias)),
            )
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                query: lin(&format!("{p}.attention.self.query"), h, h)?,
                key: lin(&format!("{p}.attention.self.key"), h, h)?,
                value: lin(&format!("{p}.attention.self.value"), h, h)?,
                attn_out: lin(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                intermediate: lin(&format!("{p}.intermediate.dense"), c.intermediate_size, h)?,
                output: lin(&format!("{p}.output.dense"), h, c.intermediate_size)?,
                output_norm: norm(&format!("{p}.output.LayerNorm"))?,
                attn_branch: hook.residual_branch(&BranchInfo {
                    path: format!("{prefix}{p}.attention"),
                    layer: i,
                    kind: BranchKind::Attention,
                    hidden_size: h,
                })?,
                mlp_branch: hook.residual_branch(&BranchInfo {
                    path: format!("{prefix}{p}.output"),
                    layer: i,
                    kind: BranchKind::Mlp,
                    hidden_size: h,
                })?,
            });
        }
        let has_pooler =
            w.contains("pooler.dense.weight") || w.contains("bert.pooler.dense.weight");
        let pooler = if has_pooler {
            Some(lin("pooler.dense", h, h)?)
        } else {
            None
        };
        let mut initialized_params = 0;
        let classifier = match task {
            BertTask::Embedding => None,
            BertTask::SequenceClassification => {
                if pooler.is_none() {
                    anyhow::bail!("{}: sequence classification needs the pooler (pooler.dense.*), which this checkpoint lacks", w.source().display())
                }
                let shape = [c.num_labels, h];
                let (weight, bias) = if w.contains("classifier.weight") {
                    (
                        w.get("classifier.weight", &shape)?,
                        w.get("classifier.bias", &[c.num_labels])?,
                    )
                } else {
                    initialized_params = c.num_labels * (h + 1);
                    (
                        crate::init::normal(&shape, c.initializer_range, init_seed, device)?,
                        Tensor::zeros(c.num_labels, DType::F32, device)?,
                    )
                };
                Some(hook.linear(
                    &LinearInfo {
                        path: "classifier".into(),
                        is_output_head: true,
                        tied_to: None,
                    },
                    FrozenLinear::new(weight, Some(bias))?,
                )?)
            }
        };
        let word_path = format!("{prefix}embeddings.word_embeddings");
        let word_embeddings = hook.embedding(
            &EmbeddingInfo {
                path: word_path.clone(),
                padding_idx: Some(c.pad_token_id),
                resized_from: [
                    "embeddings.word_embeddings.weight",
                    "bert.embeddings.word_embeddings.weight",
                ]
                .into_iter()
                .find_map(|n| w.grown_from(n)),
            },
            w.frozen_any(
                &names("embeddings.word_embeddings.weight"),
                [c.vocab_size, h],
            )?,
        )?;
        let virtual_tokens = hook.virtual_tokens(&InputInfo {
            path: word_path,
            hidden_size: h,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            word_embeddings: word_embeddings.as_ref(),
        })?;
        Ok(Self {
            word_embeddings,
            virtual_tokens,
            position_embeddings: get(
                "embeddings.position_embeddings.weight",
                &[c.max_position_embeddings, h],
            )?,
            token_type_embeddings: get(
                "embeddings.token_type_embeddings.weight",
                &[c.type_vocab_size, h],
            )?,
            embed_norm: norm("embeddings.LayerNorm")?,
            layers,
            pooler,
            classifier,
            initialized_params,
            task,
            config,
            device: device.clone(),
            grad_enabled: AtomicBool::new(true),
            trace: Default::default(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Off for inference: no pass keeps the autograd graph of earlier layers
    /// (`DecoderLm::set_grad_enabled`). On by default, for training.
    pub fn set_grad_enabled(&self, on: bool) {
        self.grad_enabled.store(on, Ordering::Relaxed)
    }

    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled.load(Ordering::Relaxed)
    }

    /// Positions a method puts before the input: prompt tuning's virtual tokens.
    pub fn added_positions(&self) -> usize {
        self.virtual_tokens.as_ref().map_or(0, |v| v.num_tokens())
    }

    /// Encodes `input_ids: [b, t]`. With virtual tokens (prompt tuning) they come first, as
    /// PEFT's `inputs_embeds` (token type 0, positions from 0, attention mask extended with
    /// ones), so the pooler reads the first virtual token; `last_hidden_state` holds the `t`
    /// positions of `input_ids` only.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> Result<BertOutput> {
        let c = &self.config;
        let (b, t) = input_ids.dims2()?;
        let h = c.hidden_size;
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let words = self.word_embeddings.forward(&ids)?.reshape((b, t, h))?;
        let columns: Vec<u32> = (0..t as u32).collect();
        let mut words = with_input_delta(self.virtual_tokens.as_deref(), words, &columns)?;
        let mut types = match token_type_ids {
            Some(tt) => Some(tt.to_dtype(DType::U32)?),
            None => None,
        };
        let mut mask = attention_mask.cloned();
        let n = self.virtual_tokens.as_ref().map_or(0, |v| v.num_tokens());
        if let Some(vt) = &self.virtual_tokens {
            let p = vt.embeddings()?;
            words = Tensor::cat(
                &[
                    &p.unsqueeze(0)?.broadcast_as((b, n, h))?.contiguous()?,
                    &words,
                ],
                1,
            )?;
            types = types
                .map(|tt| Tensor::cat(&[&Tensor::zeros((b, n), DType::U32, &self.device)?, &tt], 1))
                .transpose()?;
            mask = mask
                .map(|m| Tensor::cat(&[&Tensor::ones((b, n), m.dtype(), &self.device)?, &m], 1))
                .transpose()?;
        }
        let t = n + t;
        if t > c.max_position_embeddings {
            anyhow::bail!("sequence of {t} tokens exceeds the model's context of {} positions (max_position_embeddings)", c.max_position_embeddings)
        }
        let positions = self.position_embeddings.narrow(0, 0, t)?.unsqueeze(0)?;
        let types = match types {
            Some(tt) => self
                .token_type_embeddings
                .index_select(&tt.flatten_all()?, 0)?
                .reshape((b, t, h))?,
            None => self
                .token_type_embeddings
                .narrow(0, 0, 1)?
                .unsqueeze(0)?
                .broadcast_as((b, t, h))?
                .contiguous()?,
        };
        let x = words.broadcast_add(&positions)?.add(&types)?;
        let mask = build_mask(MaskKind::Bidirectional, t, t, mask.as_ref(), &self.device)?;
        let x = self.encode(x, &Attend::Padded(mask))?;
        let pooled_rows = x.narrow(1, 0, 1)?.squeeze(1)?;
        let (pooler_output, logits) = self.head(&pooled_rows)?;
        Ok(BertOutput {
            last_hidden_state: x.narrow(1, n, t - n)?,
            pooler_output,
            logits,
        })
    }

    /// Encodes a padding-free batch: `input_ids: [1, n]` holds sequences of `lens` tokens end
    /// to end, each with positions from 0 and token type 0, attending within itself only. With
    /// prompt tuning, each sequence has the virtual tokens before it, as its padded row has
    /// them. `last_hidden_state` is `[1, n, hidden]` (the sequences' own tokens); the pooler
    /// reads each sequence's first position (a virtual token with prompt tuning, as in peft),
    /// so `pooler_output` and `logits` have one row per sequence.
    pub fn forward_packed(&self, input_ids: &Tensor, lens: &[usize]) -> Result<BertOutput> {
        let c = &self.config;
        let (one, n) = input_ids.dims2()?;
        if one != 1 || lens.iter().sum::<usize>() != n || lens.contains(&0) {
            anyhow::bail!("a padding-free batch is one row of sequences end to end: got ids {:?} for lengths {lens:?}", input_ids.dims())
        }
        let v = self.added_positions();
        if let Some(&len) = lens.iter().find(|&&l| l + v > c.max_position_embeddings) {
            anyhow::bail!("sequence of {len} tokens (and {v} virtual tokens) exceeds the model's context of {} positions (max_position_embeddings)", c.max_position_embeddings)
        }
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut words = self
            .word_embeddings
            .forward(&ids)?
            .reshape((1, n, c.hidden_size))?;
        let within = packed::positions_within(lens);
        words = with_input_delta(self.virtual_tokens.as_deref(), words, &within)?;
        if let Some(vt) = &self.virtual_tokens {
            words = packed::before_each(&vt.embeddings()?.unsqueeze(0)?, &words, lens)?;
        }
        let stream = packed::with_added(lens, v);
        let positions: Vec<u32> = stream.iter().flat_map(|&l| 0..l as u32).collect();
        let positions = self
            .position_embeddings
            .index_select(
                &Tensor::from_vec(positions, words.dim(1)?, &self.device)?,
                0,
            )?
            .unsqueeze(0)?;
        let types = self.token_type_embeddings.narrow(0, 0, 1)?.unsqueeze(0)?;
        let x = words.add(&positions)?.broadcast_add(&types)?;
        let x = self.encode(x, &Attend::Packed(&stream))?;
        let firsts: Vec<u32> = stream
            .iter()
            .scan(0u32, |start, &l| {
                Some(std::mem::replace(start, *start + l as u32))
            })
            .collect();
        let pooled_rows = x
            .squeeze(0)?
            .index_select(&Tensor::from_vec(firsts, lens.len(), &self.device)?, 0)?;
        let (pooler_output, logits) = self.head(&pooled_rows)?;
        let last_hidden_state = if v == 0 {
            x
        } else {
            x.index_select(
                &Tensor::from_vec(packed::own_rows(lens, v), n, &self.device)?,
                1,
            )?
        };
        Ok(BertOutput {
            last_hidden_state,
            pooler_output,
            logits,
        })
    }

    /// The embedding LayerNorm and the layers over the summed embeddings `x`.
    fn encode(&self, x: Tensor, attend: &Attend) -> Result<Tensor> {
        let c = &self.config;
        let mut x = layer_norm(
            &x,
            &self.embed_norm.weight,
            &self.embed_norm.bias,
            c.layer_norm_eps,
        )?;
        self.trace
            .check(|| "the embeddings (embeddings.LayerNorm)".into(), &x)?;
        let heads = c.num_attention_heads;
        let scale = 1.0 / ((c.hidden_size / heads) as f64).sqrt();
        for (i, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = (
                layer.query.forward(&x)?,
                layer.key.forward(&x)?,
                layer.value.forward(&x)?,
            );
            let att = match attend {
                Attend::Padded(mask) => attention(&q, &k, &v, heads, mask.as_ref(), scale)?,
                Attend::Packed(lens) => {
                    attention_varlen(&q, &k, &v, heads, lens, 0, MaskKind::Bidirectional, scale)?
                }
            };
            let att = branch(
                layer.attn_branch.as_deref(),
                &x,
                layer.attn_out.forward(&att)?,
            )?;
            x = add_layer_norm(
                &att,
                &x,
                &layer.attn_norm.weight,
                &layer.attn_norm.bias,
                c.layer_norm_eps,
            )?;
            let out = match (
                layer.intermediate.as_frozen(),
                fusable_down(layer.output.as_ref()),
            ) {
                (Some(up), Some((down, scale))) => gelu_mlp_scaled(&x, up, down, scale)?,
                _ => layer
                    .output
                    .forward(&gelu(&layer.intermediate.forward(&x)?)?)?,
            };
            let out = branch(layer.mlp_branch.as_deref(), &x, out)?;
            x = add_layer_norm(
                &out,
                &x,
                &layer.output_norm.weight,
                &layer.output_norm.bias,
                c.layer_norm_eps,
            )?;
            self.trace
                .check(|| format!("layer {i} (encoder.layer.{i})"), &x)?;
            if !self.grad_enabled() {
                x = x.detach();
            }
        }
        Ok(x)
    }

    /// The pooler (`tanh(dense(first token))`) and classifier over the first token's states
    /// `[rows, hidden]`, where the checkpoint and task have them.
    fn head(&self, first_tokens: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let pooler_output = match &self.pooler {
            Some(p) => Some(p.forward(first_tokens)?.tanh()?),
            None => None,
        };
        let logits = match (&self.classifier, &pooler_output) {
            (Some(cls), Some(pooled)) => Some(cls.forward(pooled)?),
            _ => None,
        };
        Ok((pooler_output, logits))
    }
}

/// Which keys each query of an encoder pass sees.
enum Attend<'a> {
    /// Padded rows: the additive padding mask `[b, 1, 1, t]`, if any.
    Padded(Option<Tensor>),
    /// Sequences of these lengths end to end in one row.
    Packed(&'a [usize]),
}

/// The mean of each sequence's hidden states in a padding-free batch: `hidden: [1, n, h]`,
/// sequences of `lens` end to end; `[sequences, h]`.
pub fn mean_pool_packed(hidden: &Tensor, lens: &[usize]) -> Result<Tensor> {
    let x = hidden.squeeze(0)?;
    let mut start = 0;
    let mut rows = Vec::with_capacity(lens.len());
    for &l in lens {
        rows.push(x.narrow(0, start, l)?.mean_keepdim(0)?);
        start += l;
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// Attention-mask-weighted mean over positions (sentence-transformers mean pooling).
pub fn mean_pool(hidden: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
    match attention_mask {
        None => Ok(hidden.mean(1)?),
        Some(m) => {
            let m = m.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
            let summed = hidden.broadcast_mul(&m)?.sum(1)?;
            let counts = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
            Ok(summed.broadcast_div(&counts)?)
        }
    }
}
