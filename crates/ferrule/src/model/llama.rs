//! Llama-shaped decoders: Llama 2/3, Mistral (sliding window), Qwen2 (q/k/v bias), SmolLM2
//! (tied embeddings). Parameter names are the Hugging Face ones, verbatim.

use std::sync::{Arc, RwLock};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::config::DecoderConfig;
use super::hooks::fusable_down;
use super::weights::Weights;
use super::{Embedding, EmbeddingInfo, Linear, LinearInfo, ModelHook, NormInfo, NormParams};
use crate::ops::attention::{attention, build_mask, MaskKind};
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
}

/// Keys and values of earlier positions, one entry per layer (`[b, s, h_kv·head_dim]`).
#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.dim(1).unwrap_or(0)).unwrap_or(0)
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
    layers: Vec<Arc<Layer>>,
    norm: Tensor,
    lm_head: Box<dyn Linear>,
    rope: Rope,
    device: Device,
    recompute: RwLock<Option<Arc<GradSink>>>,
}

fn linear(w: &Weights, hook: &dyn ModelHook, path: &str, out_f: usize, in_f: usize, bias: bool) -> Result<Box<dyn Linear>> {
    let weight = w.frozen(&format!("{path}.weight"), [out_f, in_f])?;
    let bias = if bias { Some(w.get(&format!("{path}.bias"), &[out_f])?) } else { None };
    hook.linear(&LinearInfo { path: path.to_string(), is_output_head: path == "lm_head" }, FrozenLinear::from_weight(weight, bias))
}

/// An RMSNorm's weight `[hidden]` (no bias), through the norm hook point.
fn rms_weight(w: &Weights, hook: &dyn ModelHook, path: &str, hidden: usize) -> Result<Tensor> {
    let weight = w.get(&format!("{path}.weight"), &[hidden])?;
    Ok(hook.norm(&NormInfo { path: path.to_string() }, NormParams { weight, bias: None })?.weight)
}

impl DecoderLm {
    pub fn new(config: DecoderConfig, w: &Weights, hook: &dyn ModelHook, device: &Device) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let (q_out, kv_out) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let table = w.frozen("model.embed_tokens.weight", [c.vocab_size, h])?;
        let embed_tokens = hook.embedding(&EmbeddingInfo { path: "model.embed_tokens".into(), padding_idx: c.pad_token_id }, table)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Arc::new(Layer {
                input_layernorm: rms_weight(w, hook, &format!("{p}.input_layernorm"), h)?,
                self_attn: Attention {
                    q_proj: linear(w, hook, &format!("{p}.self_attn.q_proj"), q_out, h, c.qkv_bias)?,
                    k_proj: linear(w, hook, &format!("{p}.self_attn.k_proj"), kv_out, h, c.qkv_bias)?,
                    v_proj: linear(w, hook, &format!("{p}.self_attn.v_proj"), kv_out, h, c.qkv_bias)?,
                    o_proj: linear(w, hook, &format!("{p}.self_attn.o_proj"), h, q_out, c.o_bias)?,
                },
                post_attention_layernorm: rms_weight(w, hook, &format!("{p}.post_attention_layernorm"), h)?,
                mlp: Mlp {
                    gate_proj: linear(w, hook, &format!("{p}.mlp.gate_proj"), c.intermediate_size, h, c.mlp_bias)?,
                    up_proj: linear(w, hook, &format!("{p}.mlp.up_proj"), c.intermediate_size, h, c.mlp_bias)?,
                    down_proj: linear(w, hook, &format!("{p}.mlp.down_proj"), h, c.intermediate_size, c.mlp_bias)?,
                },
            }));
        }
        let norm = rms_weight(w, hook, "model.norm", h)?;
        let head_weight =
            if c.tie_word_embeddings || !w.contains("lm_head.weight") { embed_tokens.base().clone() } else { w.frozen("lm_head.weight", [c.vocab_size, h])? };
        let lm_head = hook.linear(&LinearInfo { path: "lm_head".into(), is_output_head: true }, FrozenLinear::from_weight(head_weight, None))?;
        let rope = Rope::new(c.head_dim, c.max_position_embeddings, c.rope_theta, &c.rope_scaling, device)?;
        Ok(Self { config, embed_tokens, layers, norm, lm_head, rope, device: device.clone(), recompute: RwLock::new(None) })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: vec![None; self.layers.len()] }
    }

    /// Logits `[b, t, vocab]` for `input_ids: [b, t]`. `attention_mask: [b, s]` (1 = real token)
    /// covers cached plus new positions. With a cache, new positions continue after the cached ones.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, cache)?;
        Ok(self.lm_head.forward(&hidden)?)
    }

    /// Final-norm hidden states `[b, t, hidden]`.
    pub fn hidden_states(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = input_ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let kv_len = offset + t;
        if kv_len > c.max_position_embeddings {
            anyhow::bail!("sequence of {kv_len} tokens exceeds the model's context of {} positions (max_position_embeddings)", c.max_position_embeddings)
        }
        let mask = build_mask(MaskKind::Causal { sliding_window: c.sliding_window }, t, kv_len, attention_mask, &self.device)?;
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self.embed_tokens.forward(&ids)?.reshape((b, t, c.hidden_size))?;
        let sink = self.recompute.read().unwrap().clone().filter(|_| cache.is_none() && self.device.is_cpu());
        for (i, layer) in self.layers.iter().enumerate() {
            x = match &sink {
                Some(sink) => {
                    let (layer, cfg, rope, mask) = (layer.clone(), self.config.clone(), self.rope.clone(), mask.clone());
                    let block: Block =
                        Arc::new(move |h: &Tensor| layer_forward(&layer, &cfg, &rope, h, mask.as_ref(), 0, None).map_err(candle_core::Error::wrap));
                    checkpoint(&x, block, sink)?
                }
                None => {
                    let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
                    layer_forward(layer, c, &self.rope, &x, mask.as_ref(), offset, slot)?
                }
            };
        }
        Ok(rms_norm(&x, &self.norm, c.rms_norm_eps)?)
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
    pub fn causal_lm_loss(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, labels: &Tensor) -> Result<(Tensor, usize)> {
        let hidden = self.hidden_states(input_ids, attention_mask, None)?;
        let (b, t, h) = hidden.dims3()?;
        if t < 2 {
            anyhow::bail!("causal-LM loss needs sequences of at least 2 tokens")
        }
        let next: Vec<i64> = labels.to_dtype(DType::I64)?.narrow(1, 1, t - 1)?.contiguous()?.flatten_all()?.to_vec1()?;
        let (rows, targets): (Vec<u32>, Vec<i64>) =
            next.iter().enumerate().filter(|(_, &y)| y >= 0).map(|(i, &y)| ((i / (t - 1) * t + i % (t - 1)) as u32, y)).unzip();
        let n = rows.len();
        if n == 0 {
            return Ok((Tensor::zeros((), DType::F32, &self.device)?, 0));
        }
        let rows = Tensor::from_vec(rows, n, &self.device)?;
        let picked = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
        // A frozen head is fused with the loss: the [n, vocab] logits are never held.
        if let Some(head) = self.lm_head.as_frozen().filter(|f| f.bias().is_none() && crate::ops::kernels::fused_ok(&picked)) {
            return Ok(crate::ops::head_loss::head_cross_entropy(&picked, head.weight(), targets)?);
        }
        let logits = self.lm_head.forward(&picked)?;
        let targets = Tensor::from_vec(targets, n, &self.device)?;
        let (loss, count) = crate::ops::loss::cross_entropy(&logits, &targets)?;
        Ok((loss, count))
    }

    /// Logits of the last position only (generation).
    pub fn last_logits(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, cache)?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?;
        Ok(self.lm_head.forward(&last)?.squeeze(1)?)
    }
}

/// One decoder layer: pre-norm attention and SwiGLU MLP with residuals. `cache` holds this
/// layer's keys/values of earlier positions (generation).
fn layer_forward(
    layer: &Layer,
    c: &DecoderConfig,
    rope: &Rope,
    x: &Tensor,
    mask: Option<&Tensor>,
    offset: usize,
    cache: Option<&mut Option<(Tensor, Tensor)>>,
) -> Result<Tensor> {
    let scale = 1.0 / (c.head_dim as f64).sqrt();
    let residual = x;
    let hs = rms_norm(x, &layer.input_layernorm, c.rms_norm_eps)?;
    let a = &layer.self_attn;
    // Token-major [b, t, heads·head_dim] throughout: rope and attention split the heads.
    let q = rope.apply(&a.q_proj.forward(&hs)?, offset)?;
    let k = rope.apply(&a.k_proj.forward(&hs)?, offset)?;
    let v = a.v_proj.forward(&hs)?;
    let (k, v) = match cache {
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
    let x = (residual + a.o_proj.forward(&att)?)?;
    let hs = rms_norm(&x, &layer.post_attention_layernorm, c.rms_norm_eps)?;
    Ok((x + mlp_forward(&layer.mlp, &hs)?)?)
}

/// `down(silu(gate(x)) ⊙ up(x))`; one fused op when no method wraps any of the three (or one
/// only scales the down projection's input).
fn mlp_forward(m: &Mlp, x: &Tensor) -> candle_core::Result<Tensor> {
    if let (Some(gate), Some(up), Some((down, scale))) = (m.gate_proj.as_frozen(), m.up_proj.as_frozen(), fusable_down(m.down_proj.as_ref())) {
        return swiglu_mlp_scaled(x, gate, up, down, scale);
    }
    m.down_proj.forward(&swiglu(&m.gate_proj.forward(x)?, &m.up_proj.forward(x)?)?)
}
