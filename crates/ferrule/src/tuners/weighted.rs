//! Several adapters on one base, run as a weighted sum of their changes.
//!
//! At every hook point each member builds its own version of the module from the same frozen
//! base, and the combined module computes
//!
//! `f(x) = f₀(x) + Σᵢ wᵢ · (fᵢ(x) − f₀(x))`
//!
//! where `f₀` is the base module and `fᵢ` member `i`'s. This is task arithmetic (Ilharco et al.
//! 2023, "Editing models with task arithmetic", eq. 1: `θ = θ₀ + Σ λᵢ τᵢ`) taken in each module's
//! output. For LoRA it equals the merged weight `W₀ + Σ wᵢ sᵢ Bᵢ Aᵢ`, which is what peft's
//! `add_weighted_adapter(..., combination_type="cat")` builds, and with every weight 1 it is
//! peft's several active adapters (`set_adapter([a, b])`, each adding its delta to the base
//! output; DoRA included). It is the one definition that also covers methods peft cannot
//! combine with each other (LoRA with IA3, say).
//!
//! Where ferrule differs from peft: IA3's `add_weighted_adapter` (peft `tuners/ia3/model.py`)
//! sums the scaling vectors, `l = Σ wᵢ lᵢ`, which scales the base by `Σ wᵢ` as well, and skips
//! an adapter that has no vector on a module (as if its `lᵢ` were 0, not 1). Here a vector's
//! change from 1 is weighted, `l = 1 + Σ wᵢ (lᵢ − 1)`, and an adapter that leaves a module alone
//! contributes nothing there. The two agree when the weights sum to 1 and the adapters target the
//! same modules (tested against peft); only the second keeps `w = 0` meaning "without this
//! adapter".
//!
//! Not combinable, and refused by [`WeightedSum`]'s hooks: methods that add positions (prompt
//! and prefix tuning). Modules trained in full (`modules_to_save`) and replaced embedding
//! tables are refused by the loader (`crate::adapted`); peft's `add_weighted_adapter` refuses
//! the first only when two adapters train the same module in full, ferrule for any member.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::Tuner;
use crate::model::{
    AttentionInfo, BranchInfo, Embedding, EmbeddingInfo, InputInfo, KvPrefix, Linear, LinearInfo,
    ModelHook, NormInfo, NormParams, ResidualBranch, VirtualTokens,
};
use crate::ops::{FrozenLinear, FrozenWeight};

/// One adapter of a weighted sum.
pub struct Member {
    /// The adapter's name (`--adapter NAME=DIR`, a PEFT subfolder, or its folder's name).
    pub name: String,
    /// `wᵢ`, any finite value (negative subtracts the adapter's change).
    pub weight: f64,
    pub tuner: Box<dyn Tuner>,
}

/// The [`ModelHook`] of a weighted sum of adapters (module docs). Inference only: the members'
/// layers stay in eval mode.
pub struct WeightedSum {
    pub members: Vec<Member>,
}

impl WeightedSum {
    /// Fails when a weight is not finite or a name repeats.
    pub fn new(members: Vec<Member>) -> Result<Self> {
        for (i, m) in members.iter().enumerate() {
            if !m.weight.is_finite() {
                bail!(
                    "adapter {}: weight {} is not a finite number",
                    m.name,
                    m.weight
                )
            }
            if members[..i].iter().any(|o| o.name == m.name) {
                bail!("adapter {} is listed twice in the weighted sum", m.name)
            }
            m.tuner.mode().set_training(false);
        }
        Ok(Self { members })
    }

    /// Each member's [`Tuner::finish`]: every one of its tensors found its module.
    pub fn finish(&self) -> Result<()> {
        for m in &self.members {
            m.tuner
                .finish()
                .map_err(|e| e.context(format!("adapter {}", m.name)))?;
        }
        Ok(())
    }

    /// Trainable elements over all members.
    pub fn params(&self) -> usize {
        self.members
            .iter()
            .map(|m| super::trainable_params(m.tuner.as_ref()))
            .sum()
    }

    /// `default×0.7 + other×-0.4`.
    pub fn describe(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}×{}", m.name, m.weight))
            .collect::<Vec<_>>()
            .join(" + ")
    }

    /// The first member that adds positions, for the error.
    fn refuse_positions(
        &self,
        what: &str,
        adds: impl Fn(&dyn Tuner) -> Result<bool>,
    ) -> Result<()> {
        for m in &self.members {
            if adds(m.tuner.as_ref())? {
                bail!(
                    "adapter {} ({}) adds {what} before the input; positions cannot be summed with other adapters. Run it alone with --active-adapter {}",
                    m.name,
                    m.tuner.method().peft_type,
                    m.name
                )
            }
        }
        Ok(())
    }
}

impl ModelHook for WeightedSum {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        let mut parts = Vec::new();
        for m in &self.members {
            let layer = m.tuner.linear(info, base.clone())?;
            if layer.as_frozen().is_none() {
                parts.push((m.weight, layer));
            }
        }
        if parts.is_empty() {
            return Ok(Box::new(base));
        }
        Ok(Box::new(WeightedLinear { base, parts }))
    }

    fn norm(&self, info: &NormInfo, params: NormParams) -> Result<NormParams> {
        let mut weight = params.weight.clone();
        let mut bias = params.bias.clone();
        for member in &self.members {
            let tuned = member.tuner.norm(info, params.clone())?;
            if tuned.weight.id() != params.weight.id() {
                weight = (weight + ((tuned.weight.detach() - &params.weight)? * member.weight)?)?;
            }
            if let (Some(b0), Some(b), Some(acc)) = (&params.bias, &tuned.bias, &bias) {
                if b.id() != b0.id() {
                    bias = Some((acc + ((b.detach() - b0)? * member.weight)?)?);
                }
            }
        }
        Ok(NormParams { weight, bias })
    }

    fn embedding(&self, info: &EmbeddingInfo, base: FrozenWeight) -> Result<Box<dyn Embedding>> {
        let mut parts = Vec::new();
        for m in &self.members {
            let layer = m.tuner.embedding(info, base.clone())?;
            parts.push((m.weight, layer));
        }
        Ok(Box::new(WeightedEmbedding { base, parts }))
    }

    fn residual_branch(&self, info: &BranchInfo) -> Result<Option<Box<dyn ResidualBranch>>> {
        let mut parts = Vec::new();
        for m in &self.members {
            if let Some(b) = m.tuner.residual_branch(info)? {
                parts.push((m.weight, b));
            }
        }
        Ok((!parts.is_empty())
            .then(|| Box::new(WeightedBranch { parts }) as Box<dyn ResidualBranch>))
    }

    fn virtual_tokens(&self, info: &InputInfo) -> Result<Option<Box<dyn VirtualTokens>>> {
        self.refuse_positions("virtual tokens", |t| Ok(t.virtual_tokens(info)?.is_some()))?;
        Ok(None)
    }

    fn kv_prefix(&self, info: &AttentionInfo) -> Result<Option<Box<dyn KvPrefix>>> {
        self.refuse_positions("a key/value prefix", |t| Ok(t.kv_prefix(info)?.is_some()))?;
        Ok(None)
    }
}

/// `y₀ + Σ wᵢ (yᵢ − y₀)` for the members' outputs `yᵢ`, each detached (see [`WeightedLinear`]).
fn add_changes(
    y0: &Tensor,
    outputs: impl Iterator<Item = (f64, candle_core::Result<Tensor>)>,
) -> candle_core::Result<Tensor> {
    let mut y = y0.clone();
    for (w, yi) in outputs {
        y = (y + ((yi?.detach() - y0)? * w)?)?;
    }
    Ok(y)
}

/// `y = y₀ + Σ wᵢ (fᵢ(x) − y₀)` with `y₀ = x W₀ᵀ + b₀`, for the members that changed the layer.
/// Each `fᵢ(x)` is detached: no gradient flows through a weighted sum, and a tracked result
/// would keep every member's activations alive until the whole forward pass ends.
/// Each `fᵢ` computes the base product again: a weighted sum costs one base matmul per member
/// on the layers it adapts (inference only).
struct WeightedLinear {
    base: FrozenLinear,
    parts: Vec<(f64, Box<dyn Linear>)>,
}

impl Linear for WeightedLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y0 = candle_core::Module::forward(&self.base, x)?;
        add_changes(&y0, self.parts.iter().map(|(w, f)| (*w, f.forward(x))))
    }
}

/// The residual-branch form: `f + Σ wᵢ (gᵢ(u, f) − f)`.
struct WeightedBranch {
    parts: Vec<(f64, Box<dyn ResidualBranch>)>,
}

impl ResidualBranch for WeightedBranch {
    fn forward(&self, input: &Tensor, output: &Tensor) -> candle_core::Result<Tensor> {
        add_changes(
            output,
            self.parts
                .iter()
                .map(|(w, g)| (*w, g.forward(input, output))),
        )
    }
}

/// The embedding form of [`WeightedLinear`]: rows `E₀[ids] + Σ wᵢ (Eᵢ(ids) − E₀[ids])`.
struct WeightedEmbedding {
    base: FrozenWeight,
    parts: Vec<(f64, Box<dyn Embedding>)>,
}

impl Embedding for WeightedEmbedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        add_changes(
            &self.base.rows(ids)?,
            self.parts.iter().map(|(w, e)| (*w, e.forward(ids))),
        )
    }

    fn base(&self) -> &FrozenWeight {
        &self.base
    }
}
