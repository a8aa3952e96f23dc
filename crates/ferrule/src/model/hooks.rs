//! Hook points: the places where a model lets a tuning method change it.
//!
//! A model calls its [`ModelHook`] once per hook point while it is built, with the module's
//! Hugging Face path. Every method of the trait has a default that leaves the module as the
//! checkpoint has it, so a hook implements only the points its method uses, and a model built
//! with [`Frozen`] is the plain pretrained model.
//!
//! The fused CPU paths stay in use wherever a hook leaves a module unchanged: a linear layer
//! that comes back as the same [`FrozenLinear`] keeps the frozen-MLP and head-loss fusions
//! (they ask [`Linear::as_frozen`]), and a norm whose weight comes back untracked keeps the
//! fused norm kernels (`ops::norm`). A method pays for the modules it touches only.
//!
//! | point | called for | used by |
//! |---|---|---|
//! | [`ModelHook::linear`] | every linear layer, the output head included | LoRA, IA3 (and `modules_to_save`, a tied head's token rows) |
//! | [`ModelHook::norm`] | every RMSNorm / LayerNorm weight and bias | LN tuning, LoRA `bias="all"` |
//! | [`ModelHook::embedding`] | the token embedding (`embed_tokens`, `word_embeddings`) | LoRA on embeddings, trainable token rows |
//! | [`ModelHook::virtual_tokens`] | the input embeddings, once per model: tokens put before them, an additive change by position | prompt tuning, DePT |
//! | [`ModelHook::kv_prefix`] | the attention keys and values of every layer, once per model | prefix tuning |
//! | [`ModelHook::residual_branch`] | the attention and MLP branches of every layer, before the residual add | bottleneck adapters with `placement = "residual_branch"` |
//!
//! The last two add positions before the user's tokens. A model that has them prepends them on
//! a fresh pass (no KV cache, or an empty one), extends the attention mask it is given (which
//! covers the user's positions only) with ones, and returns outputs for the user's positions;
//! in a padding-free batch it puts them before every sequence of the row (`model::packed`).

use anyhow::Result;
use candle_core::{Module, Tensor};

use crate::ops::frozen_linear::FrozenWeight;
use crate::ops::FrozenLinear;

/// A linear layer as a model calls it: `y = f(x)` for `x: [.., in_features]`.
pub trait Linear: Send + Sync {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;

    /// The layer itself when it is a plain frozen linear (no method wraps it), so that a loss
    /// or the MLP can fuse it (`ops::head_loss`, `ops::frozen_mlp`).
    fn as_frozen(&self) -> Option<&FrozenLinear> {
        None
    }

    /// The layer when it is a frozen linear applied to its input scaled by a vector
    /// `s: [in]` (`y = W(s ⊙ x) + b`; IA3 on a feed-forward module), so that an MLP can fuse
    /// it as its down projection (`ops::frozen_mlp`).
    fn as_input_scaled(&self) -> Option<(&FrozenLinear, &Tensor)> {
        None
    }
}

/// A down projection an MLP can fuse: a frozen linear, with the input scale it applies if any.
pub fn fusable_down(layer: &dyn Linear) -> Option<(&FrozenLinear, Option<&Tensor>)> {
    layer
        .as_frozen()
        .map(|f| (f, None))
        .or_else(|| layer.as_input_scaled().map(|(f, s)| (f, Some(s))))
}

impl Linear for FrozenLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Module::forward(self, x)
    }

    fn as_frozen(&self) -> Option<&FrozenLinear> {
        Some(self)
    }
}

/// What a hook is told about the linear it may wrap.
#[derive(Clone, Debug)]
pub struct LinearInfo {
    /// Hugging Face module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// The model's output layer (`lm_head`, `classifier`): PEFT's `all-linear` skips it.
    pub is_output_head: bool,
    /// The token embedding whose table this layer shares (a head with
    /// `tie_word_embeddings`), e.g. `model.embed_tokens`; the layer is then handed the table
    /// the embedding point returned as its [`Embedding::base`].
    pub tied_to: Option<String>,
}

/// A token-embedding table as a model calls it: `ids: [n]` (u32) → rows `[n, hidden]`.
pub trait Embedding: Send + Sync {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor>;

    /// The frozen table the layer looks its rows up in: what a tied output head shares
    /// (`tie_word_embeddings`), after any replacement a method made (PEFT's saved
    /// `embed_tokens.base_layer.weight`).
    fn base(&self) -> &FrozenWeight;
}

impl Embedding for FrozenWeight {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.rows(ids)
    }

    fn base(&self) -> &FrozenWeight {
        self
    }
}

/// What a hook is told about an embedding layer.
#[derive(Clone, Debug)]
pub struct EmbeddingInfo {
    /// Hugging Face module path, e.g. `model.embed_tokens` or `bert.embeddings.word_embeddings`.
    pub path: String,
    /// `padding_idx` (the config's `pad_token_id`): a trained table gives its row no gradient,
    /// as `torch.nn.functional.embedding` does.
    pub padding_idx: Option<u32>,
    /// The rows the checkpoint's table had, when it was grown to a larger tokenizer
    /// (`ModelSource::resize_token_embeddings`); peft then saves the table with the adapter.
    pub resized_from: Option<usize>,
}

/// What a hook is told about a norm layer.
#[derive(Clone, Debug)]
pub struct NormInfo {
    /// Hugging Face module path, e.g. `model.layers.0.input_layernorm` or
    /// `encoder.layer.0.output.LayerNorm`.
    pub path: String,
}

/// A norm layer's parameters: `weight: [hidden]` and, for LayerNorm, `bias: [hidden]`. A hook
/// that trains them returns tensors of `Var`s (tracked); the model then runs the composite,
/// differentiable norm instead of the fused frozen one.
#[derive(Clone, Debug)]
pub struct NormParams {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// What a hook is told about the model's input embeddings.
pub struct InputInfo<'a> {
    /// Path of the token embedding, e.g. `model.embed_tokens`.
    pub path: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// The token embedding after the embedding hook point (prompt tuning's TEXT init looks
    /// rows up in it).
    pub word_embeddings: &'a dyn Embedding,
}

/// Virtual token embeddings `[n, hidden]` put before every sequence's own (prompt tuning,
/// Lester et al. 2021). Evaluated once per forward pass, so they may be computed (a
/// reparameterisation) as well as stored.
pub trait VirtualTokens: Send + Sync {
    /// `[n, hidden]`, f32.
    fn embeddings(&self) -> candle_core::Result<Tensor>;
    /// `n`.
    fn num_tokens(&self) -> usize;
    /// An additive change `[m, hidden]` (f32) to the caller's token embeddings before the
    /// virtual tokens go in front of them: row `i` for the token at position `positions[i]`
    /// (`m` entries) of its own sequence, counted from 0 without the virtual tokens (DePT's
    /// `E + s·A B`, Shi & Lipani 2024, eq. 2). `None` (the default) changes nothing. Asked on
    /// a fresh pass only, so tokens that come later through a KV cache get none.
    fn input_delta(&self, _positions: &[u32]) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

/// `x: [b, m, hidden]` with the input delta of `tokens` added ([`VirtualTokens::input_delta`]),
/// the same rows for every row of the batch; `positions` (`m` entries) number `x`'s tokens in
/// their sequences: `0..t` for a padded batch (by column, as DePT's reference adds its rows to
/// a batch padded to `max_length`), each sequence from 0 in a padding-free one.
pub fn with_input_delta(
    tokens: Option<&dyn VirtualTokens>,
    x: Tensor,
    positions: &[u32],
) -> candle_core::Result<Tensor> {
    match tokens
        .map(|t| t.input_delta(positions))
        .transpose()?
        .flatten()
    {
        Some(delta) => x.broadcast_add(&delta.unsqueeze(0)?),
        None => Ok(x),
    }
}

/// What a hook is told about the attention layers.
#[derive(Clone, Debug)]
pub struct AttentionInfo {
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (< `num_heads` with grouped-query attention).
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
}

/// Keys and values put before every layer's own (prefix tuning, Li & Liang 2021). They act as
/// cached positions: they are not rotated, and the user's tokens take rope positions `n..`
/// (given `position_ids` are shifted by `n`, as peft does).
pub trait KvPrefix: Send + Sync {
    /// One `(key, value)` per layer, each `[n, kv_heads · head_dim]` (token-major, heads in
    /// order), f32. Evaluated once per forward pass.
    fn key_values(&self) -> candle_core::Result<Vec<(Tensor, Tensor)>>;
    /// `n`.
    fn num_tokens(&self) -> usize;
}

/// Which residual branch of a transformer layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchKind {
    /// Self-attention through its output projection (`o_proj`, `attention.output.dense`).
    Attention,
    /// The feed-forward block through its down projection (`down_proj`, `output.dense`).
    Mlp,
}

/// What a hook is told about a residual branch.
#[derive(Clone, Debug)]
pub struct BranchInfo {
    /// Hugging Face path of the branch's module: `model.layers.0.self_attn` / `model.layers.0.mlp`,
    /// or `encoder.layer.0.attention` / `encoder.layer.0.output` (with `bert.` under a head).
    pub path: String,
    /// Layer index.
    pub layer: usize,
    pub kind: BranchKind,
    pub hidden_size: usize,
}

/// A change to a residual branch: the layer computes `x + g(u, f(u))` instead of `x + f(u)`,
/// where `x` is the residual stream, `u` what the branch reads (`x` after the pre-norm in a
/// decoder; `x` itself in a post-norm encoder) and `f(u)` the branch output, all `[b, t, hidden]`.
/// A series adapter (Houlsby et al. 2019) is `g = f + A(f)`; a parallel one (He et al. 2022)
/// `g = f + A(u)`. In a post-norm encoder the LayerNorm of the residual sum follows, as in
/// Houlsby's placement.
pub trait ResidualBranch: Send + Sync {
    /// `g(u, f(u))`, `[b, t, hidden]`.
    fn forward(&self, input: &Tensor, output: &Tensor) -> candle_core::Result<Tensor>;
}

/// A branch's output `f` for input `u`, through the residual-branch hook's change if any.
pub fn branch(
    change: Option<&dyn ResidualBranch>,
    u: &Tensor,
    f: Tensor,
) -> candle_core::Result<Tensor> {
    match change {
        Some(g) => g.forward(u, &f),
        None => Ok(f),
    }
}

/// Decides what each hook point of a model becomes. Defaults leave the module unchanged.
pub trait ModelHook {
    /// A linear layer `y = x Wᵀ + b` with its frozen base.
    fn linear(&self, _info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        Ok(Box::new(base))
    }

    /// A norm layer's weight and bias, as the checkpoint has them.
    fn norm(&self, _info: &NormInfo, params: NormParams) -> Result<NormParams> {
        Ok(params)
    }

    /// A token embedding `[vocab, hidden]` with its frozen table.
    fn embedding(&self, _info: &EmbeddingInfo, base: FrozenWeight) -> Result<Box<dyn Embedding>> {
        Ok(Box::new(base))
    }

    /// Virtual tokens before the input embeddings; `None` leaves the input as it is.
    fn virtual_tokens(&self, _info: &InputInfo) -> Result<Option<Box<dyn VirtualTokens>>> {
        Ok(None)
    }

    /// A key/value prefix for every attention layer; `None` adds none.
    fn kv_prefix(&self, _info: &AttentionInfo) -> Result<Option<Box<dyn KvPrefix>>> {
        Ok(None)
    }

    /// A change to one residual branch; `None` leaves it (and its fused kernels) as it is.
    fn residual_branch(&self, _info: &BranchInfo) -> Result<Option<Box<dyn ResidualBranch>>> {
        Ok(None)
    }
}

/// Leaves every module frozen (plain inference).
pub struct Frozen;

impl ModelHook for Frozen {}
