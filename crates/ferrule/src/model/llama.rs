//! Llama-shaped decoders: Llama 2/3, Mistral (sliding window), Qwen2 (q/k/v bias), SmolLM2
//! (tied embeddings). Parameter names are the Hugging Face ones, verbatim.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::config::DecoderConfig;
use super::hooks::{branch, fusable_down, with_input_delta};
use super::packed;
use super::weights::Weights;
use super::{
    AttentionInfo, BranchInfo, BranchKind, Embedding, EmbeddingInfo, InputInfo, KvPrefix, Linear,
    LinearInfo, ModelHook, NormInfo, NormParams, ResidualBranch, VirtualTokens,
};
use crate::ops::attention::{attention, attention_varlen, build_mask, MaskKind};
use crate::ops::frozen_mlp::swiglu_mlp_scaled;
use crate::ops::norm::rms_norm;
use crate::ops::recompute::{checkpoint, Block, GradSink};
use crate::ops::rope::Rope;
use crate::ops::swiglu::swiglu;
use crate::ops::FrozenLinear;

struct Attention {
    q_proj: Box<dyn Linear>,
    k_proj: Box<dyn Linear>,
    v_proj: Box<dyn Linear>,
    o_proj: Box<dyn Linear>,
}

struct Mlp {
    gate_proj: Box<dyn Linear>,
    up_proj: Box<dyn Linear>,
    down_proj: Box<dyn Linear>,
}

struct Layer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
    /// Changes to the attention and MLP branches, from the residual-branch hook point.
    attn_branch: Option<Box<dyn ResidualBranch>>,
    mlp_branch: Option<Box<dyn ResidualBranch>>,
}

/// Keys and values of earlier positions, one entry per layer (`[b, s, h_kv·head_dim]`).
#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(1).unwrap_or(0))
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A causal language model (`*ForCausalLM`).
pub struct DecoderLm {
    pub config: DecoderConfig,
    /// `[vocab, hidden]`, dense or quantized (a GGUF token embedding stays in its blocks),
    /// through the embedding hook point.
    embed_tokens: Box<dyn Embedding>,
    /// Virtual tokens before the input (prompt tuning), from the input hook point.
    virtual_tokens: Option<Box<dyn VirtualTokens>>,
    /// Keys/values before every layer's (prefix tuning), from the key/value-prefix hook point.
    kv_prefix: Option<Box<dyn KvPrefix>>,
    layers: Vec<Arc<Layer>>,
    norm: Tensor,
    lm_head: Box<dyn Linear>,
    rope: Rope,
    device: Device,
    recompute: RwLock<Option<Arc<GradSink>>>,
    /// Off: every layer's output is detached, so no pass keeps the graph of the layers before
    /// ([`DecoderLm::set_grad_enabled`]).
    grad_enabled: AtomicBool,
    /// Finds the first stage with a non-finite output, when asked ([`super::Model::trace_non_finite`]).
    pub(crate) trace: crate::util::finite::LayerTrace,
}

fn linear(
    w: &Weights,
    hook: &dyn ModelHook,
    path: &str,
    out_f: usize,
    in_f: usize,
    bias: bool,
) -> Result<Box<dyn Linear>> {
    let weight = w.frozen(&format!("{path}.weight"), [out_f, in_f])?;
    let bias = if bias {
        Some(w.get(&format!("{path}.bias"), &[out_f])?)
    } else {
        None
    };
    hook.linear(
        &LinearInfo {
            path: path.to_string(),
            is_output_head: path == "lm_head",
            tied_to: None,
        },
        FrozenLinear::from_weight(weight, bias),
    )
}

/// An RMSNorm's weight `[hidden]` (no bias), through the norm hook point.
fn rms_weight(w: &Weights, hook: &dyn ModelHook, path: &str, hidden: usize) -> Result<Tensor> {
    let weight = w.get(&format!("{path}.weight"), &[hidden])?;
    Ok(hook
        .norm(
            &NormInfo {
                path: path.to_string(),
            },
            NormParams { weight, bias: None },
        )?
        .weight)
}

impl DecoderLm {
    pub fn new(
        config: DecoderConfig,
        w: &Weights,
        hook: &dyn ModelHook,
        device: &Device,
    ) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let (q_out, kv_out) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let table = w.frozen("model.embed_tokens.weight", [c.vocab_size, h])?;
        let embed_tokens = hook.embedding(
            &EmbeddingInfo {
                path: "model.embed_tokens".into(),
                padding_idx: c.pad_token_id,
                resized_from: w.grown_from("model.embed_tokens.weight"),
            },
            table,
        )?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Arc::new(Layer {
                input_layernorm: rms_weight(w, hook, &format!("{p}.input_layernorm"), h)?,
                self_attn: Attention {
                    q_proj: linear(
                        w,
                        hook,
                        &format!("{p}.self_attn.q_proj"),
                        q_out,
                        h,
                        c.qkv_bias,
                    )?,
                    k_proj: linear(
                        w,
                        hook,
                        &format!("{p}.self_attn.k_proj"),
                        kv_out,
                        h,
                        c.qkv_bias,
                    )?,
                    v_proj: linear(
                        w,
                        hook,
                        &format!("{p}.self_attn.v_proj"),
                        kv_out,
                        h,
                        c.qkv_bias,
                    )?,
                    o_proj: linear(
                        w,
                        hook,
                        &format!("{p}.self_attn.o_proj"),
                        h,
                        q_out,
                        c.o_bias,
                    )?,
                },
                post_attention_layernorm: rms_weight(
                    w,
                    hook,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                )?,
                mlp: Mlp {
                    gate_proj: linear(
                        w,
                        hook,
                        &format!("{p}.mlp.gate_proj"),
                        c.intermediate_size,
                        h,
                        c.mlp_bias,
                    )?,
                    up_proj: linear(
                        w,
                        hook,
                        &format!("{p}.mlp.up_proj"),
                        c.intermediate_size,
                        h,
                        c.mlp_bias,
                    )?,
                    down_proj: linear(
                        w,
                        hook,
                        &format!("{p}.mlp.down_proj"),
                        h,
                        c.intermediate_size,
                        c.mlp_bias,
                    )?,
                },
                attn_branch: hook.residual_branch(&BranchInfo {
                    path: format!("{p}.self_attn"),
                    layer: i,
                    kind: BranchKind::Attention,
                    hidden_size: h,
                })?,
                mlp_branch: hook.residual_branch(&BranchInfo {
                    path: format!("{p}.mlp"),
                    layer: i,
                    kind: BranchKind::Mlp,
                    hidden_size: h,
                })?,
            }));
        }
        let norm = rms_weight(w, hook, "model.norm", h)?;
        let tied = c.tie_word_embeddings || !w.contains("lm_head.weight");
        let head_weight = if tied {
            embed_tokens.base().clone()
        } else {
            w.frozen("lm_head.weight", [c.vocab_size, h])?
        };
        let lm_head = hook.linear(
            &LinearInfo {
                path: "lm_head".into(),
                is_output_head: true,
                tied_to: tied.then(|| "model.embed_tokens".to_string()),
            },
            FrozenLinear::from_weight(head_weight, None),
        )?;
        let rope = Rope::new(
            c.head_dim,
            c.max_position_embeddings,
            c.rope_theta,
            &c.rope_scaling,
            device,
        )?;
        let virtual_tokens = hook.virtual_tokens(&InputInfo {
            path: "model.embed_tokens".into(),
            hidden_size: h,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            word_embeddings: embed_tokens.as_ref(),
        })?;
        let kv_prefix = hook.kv_prefix(&AttentionInfo {
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            hidden_size: h,
        })?;
        Ok(Self {
            config,
            embed_tokens,
            virtual_tokens,
            kv_prefix,
            layers,
            norm,
            lm_head,
            rope,
            device: device.clone(),
            recompute: RwLock::new(None),
            grad_enabled: AtomicBool::new(true),
            trace: Default::default(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
        }
    }

    /// Logits `[b, t, vocab]` for `input_ids: [b, t]`. `attention_mask: [b, s]` (1 = real token)
    /// covers cached plus new positions of the caller's tokens (not the positions a method
    /// adds, see [`Self::added_positions`]). `position_ids: [b, t]` are the tokens' rope
    /// positions as transformers takes them ([`Self::hidden_states`]); without them the new
    /// positions continue after the cached ones, every row alike.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache)?;
        let (virtual_len, t) = (hidden.dim(1)? - input_ids.dim(1)?, input_ids.dim(1)?);
        Ok(self.lm_head.forward(&hidden.narrow(1, virtual_len, t)?)?)
    }

    /// Positions a method puts before the caller's tokens on a fresh pass: virtual tokens
    /// (prompt tuning) plus a key/value prefix (prefix tuning). A KV cache holds them after
    /// the first pass.
    pub fn added_positions(&self) -> usize {
        self.virtual_len() + self.kv_prefix.as_ref().map_or(0, |p| p.num_tokens())
    }

    fn virtual_len(&self) -> usize {
        self.virtual_tokens.as_ref().map_or(0, |v| v.num_tokens())
    }

    /// Final-norm hidden states `[b, v + t, hidden]`: `v` virtual tokens (prompt tuning, on a
    /// fresh pass only) before the `t` of `input_ids`. `position_ids: [b, t]` (integers) number
    /// the caller's tokens for rope, row by row, as in transformers (what `generate` derives
    /// from a left-padded mask: `cumsum(mask) − 1`); peft 0.21 adds the prefix length to them
    /// for prefix tuning and ignores them, with a warning, for prompt tuning
    /// (`PeftModel._adjust_prompt_learning_kwargs`), and so does this. Without them the tokens
    /// take the positions after the cache, the prefix or the virtual tokens, every row alike.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = input_ids.dims2()?;
        let fresh = cache.as_ref().is_none_or(|c| c.is_empty());
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self
            .embed_tokens
            .forward(&ids)?
            .reshape((b, t, c.hidden_size))?;
        self.trace
            .check(|| "the token embeddings (model.embed_tokens)".into(), &x)?;
        // DePT: its change by column on a fresh pass (the reference adds it before the first
        // cached step only); then prompt tuning's virtual tokens, which a cache holds after.
        if fresh {
            let columns: Vec<u32> = (0..t as u32).collect();
            x = with_input_delta(self.virtual_tokens.as_deref(), x, &columns)?;
        }
        if let Some(vt) = self.virtual_tokens.as_ref().filter(|_| fresh) {
            let p = vt.embeddings()?;
            x = Tensor::cat(
                &[
                    &p.unsqueeze(0)?
                        .broadcast_as((b, p.dim(0)?, c.hidden_size))?
                        .contiguous()?,
                    &x,
                ],
                1,
            )?;
        }
        // Prefix tuning: every layer starts from the prefix as if it were cached.
        let prefix = match self.kv_prefix.as_ref().filter(|_| fresh) {
            Some(p) => Some(batched_prefix(p.as_ref(), b, self.layers.len())?),
            None => None,
        };
        let q_len = x.dim(1)?;
        let offset = match (&cache, &prefix) {
            (Some(c), _) if !c.is_empty() => c.len(),
            (_, Some(p)) => p[0].0.dim(1)?,
            _ => 0,
        };
        let kv_len = offset + q_len;
        if kv_len > c.max_position_embeddings {
            anyhow::bail!("sequence of {kv_len} tokens exceeds the model's context of {} positions (max_position_embeddings)", c.max_position_embeddings)
        }
        let mask = build_mask(
            MaskKind::Causal {
                sliding_window: c.sliding_window,
            },
            q_len,
            kv_len,
            self.extended_mask(attention_mask, b)?.as_ref(),
            &self.device,
        )?;
        let positions = self.rope_positions(position_ids, b, t)?;
        let layout = AttnLayout::Padded {
            mask,
            offset,
            positions,
        };
        self.run_layers(x, &layout, prefix, cache)
    }

    /// The caller's mask (its own positions) with ones before it for the positions a method
    /// adds: in this pass (fresh) or in the cache, as peft concatenates them.
    fn extended_mask(&self, attention_mask: Option<&Tensor>, b: usize) -> Result<Option<Tensor>> {
        let added = self.added_positions();
        Ok(match attention_mask {
            Some(m) if added > 0 => Some(Tensor::cat(
                &[&Tensor::ones((b, added), m.dtype(), &self.device)?, m],
                1,
            )?),
            _ => attention_mask.cloned(),
        })
    }

    /// The rope position of every caller token, row-major, from `position_ids: [b, t]`
    /// ([`Self::hidden_states`]): shifted by the prefix length for prefix tuning; `None` when
    /// there are none or prompt tuning drops them.
    fn rope_positions(
        &self,
        position_ids: Option<&Tensor>,
        b: usize,
        t: usize,
    ) -> Result<Option<Arc<Vec<u32>>>> {
        let Some(p) = position_ids else {
            return Ok(None);
        };
        if self.virtual_tokens.is_some() {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| tracing::warn!("position_ids are ignored with prompt tuning's virtual tokens, as peft ignores them: the tokens take the positions after the virtual tokens"));
            return Ok(None);
        }
        if p.dims() != [b, t] {
            anyhow::bail!(
                "position_ids have shape {:?}, the input_ids [{b}, {t}]",
                p.dims()
            )
        }
        let shift = self.kv_prefix.as_ref().map_or(0, |k| k.num_tokens()) as i64;
        let values: Vec<i64> = p.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
        let max = self.config.max_position_embeddings as i64;
        match values.iter().find(|&&v| v < 0 || v + shift >= max) {
            Some(v) => anyhow::bail!("position_ids hold {v}, outside 0..{} (max_position_embeddings, less the {shift} prefix positions)", max - shift),
            None => Ok(Some(Arc::new(
                values.iter().map(|&v| (v + shift) as u32).collect(),
            ))),
        }
    }

    /// Final-norm hidden states `[1, n, hidden]` of a padding-free batch: `input_ids: [1, n]`
    /// holds sequences of `lens` tokens end to end. Each sequence's positions start at 0 and
    /// its tokens attend within it only, so every token's state equals the one a padded batch
    /// gives it; with prompt or prefix tuning, every sequence has the virtual tokens or the
    /// key/value prefix before it, as its padded row has ([`Self::packed_stream`]).
    pub fn hidden_states_packed(&self, input_ids: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let stream = self.packed_stream(input_ids, lens)?;
        let v = self.virtual_len();
        if v == 0 {
            return Ok(stream);
        }
        let own = packed::own_rows(lens, v);
        let own = Tensor::from_vec(own, input_ids.dim(1)?, &self.device)?;
        Ok(stream.index_select(&own, 1)?)
    }

    /// The final-norm hidden states of a padding-free batch as the layers see it: `v` virtual
    /// tokens (prompt tuning) before each sequence of `lens`, `[1, Σ (v + lᵢ), hidden]`, each
    /// sequence at positions `p..p + v + lᵢ` after a key/value prefix of `p` (prefix tuning),
    /// which every layer puts before each sequence's keys and values.
    fn packed_stream(&self, input_ids: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let c = &self.config;
        let (one, n) = input_ids.dims2()?;
        if one != 1 || lens.iter().sum::<usize>() != n || lens.contains(&0) {
            anyhow::bail!("a padding-free batch is one row of sequences end to end: got ids {:?} for lengths {lens:?}", input_ids.dims())
        }
        let added = self.added_positions();
        if let Some(&len) = lens
            .iter()
            .find(|&&l| l + added > c.max_position_embeddings)
        {
            anyhow::bail!("sequence of {len} tokens (and {added} a method adds) exceeds the model's context of {} positions (max_position_embeddings)", c.max_position_embeddings)
        }
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self
            .embed_tokens
            .forward(&ids)?
            .reshape((1, n, c.hidden_size))?;
        self.trace
            .check(|| "the token embeddings (model.embed_tokens)".into(), &x)?;
        let v = self.virtual_len();
        let within = packed::positions_within(lens);
        x = with_input_delta(self.virtual_tokens.as_deref(), x, &within)?;
        if let Some(vt) = &self.virtual_tokens {
            x = packed::before_each(&vt.embeddings()?.unsqueeze(0)?, &x, lens)?;
        }
        let prefix = match &self.kv_prefix {
            Some(p) => Some(batched_prefix(p.as_ref(), 1, self.layers.len())?),
            None => None,
        };
        let p = added - v;
        let lens = packed::with_added(lens, v);
        let positions = lens.iter().flat_map(|&l| p as u32..(p + l) as u32);
        let layout = AttnLayout::Packed {
            positions: Arc::new(positions.collect()),
            lens: Arc::new(lens),
        };
        self.run_layers(x, &layout, prefix, None)
    }

    /// The layers and the final norm over `x`, with each layer's key/value `prefix` (prefix
    /// tuning) and the KV `cache` (generation).
    fn run_layers(
        &self,
        mut x: Tensor,
        layout: &AttnLayout,
        prefix: Option<Vec<(Tensor, Tensor)>>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let sink = self
            .recompute
            .read()
            .unwrap()
            .clone()
            .filter(|_| cache.is_none() && self.device.is_cpu() && self.grad_enabled());
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_prefix = prefix.as_ref().map(|p| p[i].clone());
            x = match &sink {
                Some(sink) => {
                    let (layer, cfg, rope, layout) = (
                        layer.clone(),
                        self.config.clone(),
                        self.rope.clone(),
                        layout.clone(),
                    );
                    let block: Block = Arc::new(move |h: &Tensor| {
                        let mut past = layer_prefix.clone();
                        layer_forward(&layer, &cfg, &rope, h, &layout, Some(&mut past))
                            .map_err(candle_core::Error::wrap)
                    });
                    checkpoint(&x, block, sink)?
                }
                None => match cache.as_deref_mut() {
                    Some(c) => {
                        let slot = &mut c.layers[i];
                        if slot.is_none() {
                            *slot = layer_prefix;
                        }
                        layer_forward(layer, &self.config, &self.rope, &x, layout, Some(slot))?
                    }
                    None => {
                        let mut past = layer_prefix;
                        layer_forward(layer, &self.config, &self.rope, &x, layout, Some(&mut past))?
                    }
                },
            };
            self.trace
                .check(|| format!("layer {i} (model.layers.{i})"), &x)?;
            if !self.grad_enabled.load(Ordering::Relaxed) {
                x = x.detach();
                if let Some(Some((k, v))) = cache.as_deref_mut().map(|c| &mut c.layers[i]) {
                    (*k, *v) = (k.detach(), v.detach());
                }
            }
        }
        let x = rms_norm(&x, &self.norm, c.rms_norm_eps)?;
        self.trace
            .check(|| "the final norm (model.norm)".into(), &x)?;
        Ok(x)
    }

    /// Off for inference (eval, logits, generate): a forward pass then keeps no autograd graph,
    /// so each layer's activations are freed once the next layer has them (a trained adapter's
    /// tensors are tracked variables, and without this a pass would hold every layer's
    /// intermediates until its output is dropped). On by default, for training.
    pub fn set_grad_enabled(&self, on: bool) {
        self.grad_enabled.store(on, Ordering::Relaxed)
    }

    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled.load(Ordering::Relaxed)
    }

    /// Recompute each layer's activations during backward instead of keeping them
    /// (gradient checkpointing); trainable gradients from inside the layers go to `sink`.
    pub fn set_recompute(&self, sink: Option<Arc<GradSink>>) {
        *self.recompute.write().unwrap() = sink;
    }

    /// Causal-LM loss computing the output projection only where a label is counted:
    /// position i is projected only when label i+1 is not `IGNORE_INDEX`. With loss on
    /// completions only and padded batches, most positions need no logits, and the
    /// vocabulary projection is the largest matmul of a small model. Returns the same loss
    /// (mean over counted positions) as [`crate::ops::loss::causal_lm_loss`] on full logits.
    /// `position_ids` as [`Self::hidden_states`] takes them.
    pub fn causal_lm_loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<(Tensor, usize)> {
        let hidden = self.hidden_states(input_ids, attention_mask, position_ids, None)?;
        self.loss_of_hidden(&hidden, labels)
    }

    /// [`Self::causal_lm_loss`] of a padding-free batch (`input_ids`, `labels`: `[1, n]`,
    /// sequences of `lens` end to end, see [`Self::hidden_states_packed`]). No sequence's last
    /// token is trained to predict the next sequence's first: a sequence's first label counts
    /// only when virtual tokens precede it (prompt tuning, whose last virtual token predicts it
    /// in a padded batch too), so the loss equals the padded batch's ([`packed::stream_labels`]).
    pub fn causal_lm_loss_packed(
        &self,
        input_ids: &Tensor,
        lens: &[usize],
        labels: &Tensor,
    ) -> Result<(Tensor, usize)> {
        let labels = packed::stream_labels(labels, lens, self.virtual_len())?;
        self.loss_of_hidden(&self.packed_stream(input_ids, lens)?, &labels)
    }

    /// Logits `[1, n, vocab]` of a padding-free batch ([`Self::hidden_states_packed`]).
    pub fn forward_packed(&self, input_ids: &Tensor, lens: &[usize]) -> Result<Tensor> {
        Ok(self
            .lm_head
            .forward(&self.hidden_states_packed(input_ids, lens)?)?)
    }

    fn loss_of_hidden(&self, hidden: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
        let (b, t, h) = hidden.dims3()?;
        if t < 2 {
            anyhow::bail!("causal-LM loss needs sequences of at least 2 tokens")
        }
        // Virtual tokens predict nothing of their own, but the last one predicts the first
        // real token (PEFT prefixes the labels with -100, peft_model.py).
        let mut labels = labels.to_dtype(DType::I64)?;
        if t > labels.dim(1)? {
            let ignored = Tensor::full(
                crate::ops::loss::IGNORE_INDEX,
                (b, t - labels.dim(1)?),
                &self.device,
            )?;
            labels = Tensor::cat(&[&ignored, &labels], 1)?;
        }
        let next: Vec<i64> = labels
            .narrow(1, 1, t - 1)?
            .contiguous()?
            .flatten_all()?
            .to_vec1()?;
        let (rows, targets): (Vec<u32>, Vec<i64>) = next
            .iter()
            .enumerate()
            .filter(|(_, &y)| y >= 0)
            .map(|(i, &y)| ((i / (t - 1) * t + i % (t - 1)) as u32, y))
            .unzip();
        let n = rows.len();
        if n == 0 {
            return Ok((Tensor::zeros((), DType::F32, &self.device)?, 0));
        }
        let rows = Tensor::from_vec(rows, n, &self.device)?;
        let picked = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
        // A frozen head is fused with the loss: the [n, vocab] logits are never held.
        if let Some(head) = self
            .lm_head
            .as_frozen()
            .filter(|f| f.bias().is_none() && crate::ops::kernels::fused_ok(&picked))
        {
            return Ok(crate::ops::head_loss::head_cross_entropy(
                &picked,
                head.weight(),
                targets,
            )?);
        }
        let logits = self.lm_head.forward(&picked)?;
        let targets = Tensor::from_vec(targets, n, &self.device)?;
        let (loss, count) = crate::ops::loss::cross_entropy(&logits, &targets)?;
        Ok((loss, count))
    }

    /// Logits of the last position only (generation).
    pub fn last_logits(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache)?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?;
        Ok(self.lm_head.forward(&last)?.squeeze(1)?)
    }
}

/// The prefix's keys and values per layer, broadcast to the batch: `[b, n, kv_heads·head_dim]`.
fn batched_prefix(prefix: &dyn KvPrefix, b: usize, layers: usize) -> Result<Vec<(Tensor, Tensor)>> {
    let kv = prefix.key_values()?;
    if kv.len() != layers {
        anyhow::bail!(
            "the key/value prefix has {} layers, the model {layers}",
            kv.len()
        )
    }
    let batch = |t: &Tensor| -> candle_core::Result<Tensor> {
        let (n, d) = t.dims2()?;
        t.unsqueeze(0)?.broadcast_as((b, n, d))?.contiguous()
    };
    kv.iter().map(|(k, v)| Ok((batch(k)?, batch(v)?))).collect()
}

/// Where a layer's queries sit and which keys they see.
#[derive(Clone)]
enum AttnLayout {
    /// The rows of a padded batch: the additive mask `[b|1, 1, t, s]`; queries from rope
    /// position `offset` on (after a cache or a prefix), or at `positions` (`b·t`, row-major:
    /// the caller's `position_ids`, shifted past a prefix).
    Padded {
        mask: Option<Tensor>,
        offset: usize,
        positions: Option<Arc<Vec<u32>>>,
    },
    /// Sequences of `lens` tokens end to end in one row, each token at `positions[i]`; a
    /// layer's prefix (prefix tuning) goes before each sequence's keys and values.
    Packed {
        positions: Arc<Vec<u32>>,
        lens: Arc<Vec<usize>>,
    },
}

/// One decoder layer: pre-norm attention and SwiGLU MLP with residuals. `past` holds this
/// layer's keys/values of earlier positions (a KV cache, or a prefix-tuning prefix), extended
/// with the new ones in a padded batch; in a padding-free one, the prefix before each sequence.
fn layer_forward(
    layer: &Layer,
    c: &DecoderConfig,
    rope: &Rope,
    x: &Tensor,
    layout: &AttnLayout,
    past: Option<&mut Option<(Tensor, Tensor)>>,
) -> Result<Tensor> {
    let scale = 1.0 / (c.head_dim as f64).sqrt();
    let residual = x;
    let hs = rms_norm(x, &layer.input_layernorm, c.rms_norm_eps)?;
    let a = &layer.self_attn;
    // Token-major [b, t, heads·head_dim] throughout: rope and attention split the heads.
    let (q, k, v) = (
        a.q_proj.forward(&hs)?,
        a.k_proj.forward(&hs)?,
        a.v_proj.forward(&hs)?,
    );
    let (mask, offset, positions) = match layout {
        AttnLayout::Padded {
            mask,
            offset,
            positions,
        } => (mask.as_ref(), *offset, positions.as_deref()),
        AttnLayout::Packed { positions, lens } => {
            let (q, k) = (rope.apply_at(&q, positions)?, rope.apply_at(&k, positions)?);
            let prefix = past.and_then(|slot| slot.as_ref());
            let att = packed_attention(c, &q, &k, &v, lens, prefix, scale)?;
            return finish_layer(layer, c, residual, &hs, &att);
        }
    };
    let (q, k) = match positions {
        Some(p) => (rope_rows(rope, &q, p)?, rope_rows(rope, &k, p)?),
        None => (rope.apply(&q, offset)?, rope.apply(&k, offset)?),
    };
    let (k, v) = match past {
        Some(slot) => {
            let (k, v) = match slot.as_ref() {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?),
                None => (k, v),
            };
            *slot = Some((k.clone(), v.clone()));
            (k, v)
        }
        None => (k, v),
    };
    let att = attention(&q, &k, &v, c.num_attention_heads, mask, scale)?;
    finish_layer(layer, c, residual, &hs, &att)
}

/// Rope on `x: [b, t, heads·head_dim]` with token `(r, i)` at `positions[r·t + i]`.
fn rope_rows(rope: &Rope, x: &Tensor, positions: &[u32]) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    let flat = rope.apply_at(&x.reshape((1, b * t, hd))?, positions)?;
    Ok(flat.reshape((b, t, hd))?)
}

/// Causal attention within each sequence of a padding-free batch (`q, k, v: [1, n, ·]`), the
/// layer's key/value `prefix` (`[1, p, kv_heads·head_dim]` each) before every sequence's keys.
fn packed_attention(
    c: &DecoderConfig,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    prefix: Option<&(Tensor, Tensor)>,
    scale: f64,
) -> Result<Tensor> {
    let kind = MaskKind::Causal {
        sliding_window: c.sliding_window,
    };
    let heads = c.num_attention_heads;
    Ok(match prefix {
        Some((pk, pv)) => {
            let (k, v) = (
                packed::before_each(pk, k, lens)?,
                packed::before_each(pv, v, lens)?,
            );
            attention_varlen(q, &k, &v, heads, lens, pk.dim(1)?, kind, scale)?
        }
        None => attention_varlen(q, k, v, heads, lens, 0, kind, scale)?,
    })
}

/// The rest of a layer after attention: output projection and residual, then the MLP branch.
fn finish_layer(
    layer: &Layer,
    c: &DecoderConfig,
    residual: &Tensor,
    hs: &Tensor,
    att: &Tensor,
) -> Result<Tensor> {
    let x = (residual
        + branch(
            layer.attn_branch.as_deref(),
            hs,
            layer.self_attn.o_proj.forward(att)?,
        )?)?;
    let hs = rms_norm(&x, &layer.post_attention_layernorm, c.rms_norm_eps)?;
    Ok((&x
        + branch(
            layer.mlp_branch.as_deref(),
            &hs,
            mlp_forward(&layer.mlp, &hs)?,
        )?)?)
}

/// `down(silu(gate(x)) ⊙ up(x))`; one fused op when no method wraps any of the three (or one
/// only scales the down projection's input).
fn mlp_forward(m: &Mlp, x: &Tensor) -> candle_core::Result<Tensor> {
    if let (Some(gate), Some(up), Some((down, scale))) = (
        m.gate_proj.as_frozen(),
        m.up_proj.as_frozen(),
        fusable_down(m.down_proj.as_ref()),
    ) {
        return swiglu_mlp_scaled(x, gate, up, down, scale);
    }
    m.down_proj
        .forward(&swiglu(&m.gate_proj.forward(x)?, &m.up_proj.forward(x)?)?)
}
