//! DePT, decomposed prompt tuning (Shi & Lipani 2024; reference ZhengxiangShi/DePT, peft_type
//! `PROMPT_TUNING_LORA`): a shorter prompt of `m` virtual tokens, built as prompt tuning builds
//! its own, and a low-rank update `(α/√r)·A B` of the input embeddings by position, trained
//! with a learning rate of its own (`lora_embedding_lr`). Everything else is frozen (a SEQ_CLS
//! model's classifier trains in full).
//!
//! Positions: row `p` of the update is added to the token at position `p` of its sequence:
//! the column in a padded batch (the reference pads every input to exactly `max_length` and
//! adds the whole product), the position within each sequence in a padding-free or packed
//! batch. An input longer than `max_length` is an error naming it; tokens that come later
//! through a KV cache (generation) get no update, as the reference adds it before the first
//! cached step only. The reference's sequence-classification wrapper skips the update (its
//! `PeftModelForSequenceClassification.forward` has no DePT branch); ferrule applies it there
//! too, so the method is the paper's on every task.

pub mod config;
pub mod layer;

use std::sync::Mutex;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use serde_json::{Map, Value};

pub use config::DeptConfig;
use layer::DeptInputs;

use super::config::AdapterConfig;
use super::core::{AnyTunerCore, TunerCore};
use super::prompt_learning;
use super::prompt_tuning::{prompt_table, PROMPT_KEY};
use super::registry::{BlockShapes, BuildContext, Method};
use super::target::MatchReport;
use super::{AdaptedModule, Tuner, Update};
use crate::init::kaiming_uniform;
use crate::model::{InputInfo, Linear, LinearInfo, ModelHook, VirtualTokens};
use crate::ops::FrozenLinear;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "dept",
    peft_type: "PROMPT_TUNING_LORA",
    summary: "DePT: a shorter prompt plus a low-rank update of the input embeddings by position, two learning rates (Shi & Lipani 2024)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: Some(super::prompt_tuning::config::complete_flags),
    count_from_shapes: Some(count_from_shapes),
    trains_whole_model: false,
    f32_weights: None,
};

/// The reference's saved key of `A: [max_length, r]` (`get_peft_model_state_dict` keeps the
/// module's `prompt_encoder.<adapter>.lora_embedding_A` without the adapter name,
/// `peft/utils/save_and_load.py:69-70`; its loader reads the same key, `:130-133`).
pub const A_KEY: &str = "prompt_encoder.lora_embedding_A";
/// The saved key of `B: [r, token_dim]`.
pub const B_KEY: &str = "prompt_encoder.lora_embedding_B";

/// DePT has no targets to complete: its dimensions come from the model at build time.
fn complete(_options: &mut Map<String, Value>, _model_type: &str) -> Result<()> {
    Ok(())
}

/// `ferrule plan` from a `config.json` alone: `m·d + max_length·r + r·d`, `d` the hidden size
/// (the input width of a block's first linear, the query projection); `None` with
/// `modules_to_save`, which this does not count.
fn count_from_shapes(options: &Map<String, Value>, blocks: &BlockShapes) -> Result<Option<usize>> {
    let cfg: DeptConfig = serde_json::from_value(Value::Object(options.clone()))?;
    cfg.validate()?;
    let (Some(first), None) = (blocks.linears.first(), &cfg.prompt.common.modules_to_save) else {
        return Ok(None);
    };
    let (m, d) = (cfg.prompt.common.virtual_tokens("dept")?, first.in_features);
    Ok(Some(m * d + cfg.max_length * cfg.r + cfg.r * d))
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: DeptConfig = config.typed("dept")?;
    cfg.validate()?;
    let saved = prompt_learning::modules_to_save(&cfg.prompt.common);
    Ok(Box::new(Dept {
        core: TunerCore::new(&METHOD, Mutex::new(cfg), saved, ctx),
    }))
}

/// Trains DePT's prompt and low-rank pair for a [`DeptConfig`].
pub struct Dept {
    /// In a `Mutex`: the model's dimensions are filled in while it is built.
    core: TunerCore<Mutex<DeptConfig>>,
}

impl Dept {
    /// `A` and `B`: the saved ones, or fresh (`A` kaiming-uniform with a = √5 and `B` zeros,
    /// or both zeros without `init_lora_weights`; `prompt_tuning_lora.py:132-139`). A saved
    /// adapter without them is an error naming the missing keys.
    fn low_rank_pair(&self, config: &DeptConfig, hidden: usize) -> Result<(Var, Var)> {
        let params = &self.core.params;
        let missing: Vec<&str> = [A_KEY, B_KEY]
            .into_iter()
            .filter(|k| !params.has_saved(k))
            .collect();
        if params.loading() && !missing.is_empty() {
            bail!("dept: the adapter has no {} (a PROMPT_TUNING_LORA adapter holds prompt_embeddings, {A_KEY} and {B_KEY}; one saved with save_lora_embeddings = false lacks the pair, which the reference cannot load either)", missing.join(" or "))
        }
        let (rows, r, dev) = (config.max_length, config.r, params.device());
        let a = params.take_or_init(A_KEY, &[rows, r], || match config.init_lora_weights {
            true => Ok(kaiming_uniform(
                &[rows, r],
                5f64.sqrt(),
                self.core.init_seed(A_KEY),
                dev,
            )?),
            false => Ok(Tensor::zeros((rows, r), DType::F32, dev)?),
        })?;
        let b = params.take_or_init(B_KEY, &[r, hidden], || {
            Ok(Tensor::zeros((r, hidden), DType::F32, dev)?)
        })?;
        Ok((a, b))
    }
}

impl ModelHook for Dept {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        Ok(self.core.route_linear(info, base)?.unadapted())
    }

    fn virtual_tokens(&self, info: &InputInfo) -> Result<Option<Box<dyn VirtualTokens>>> {
        let mut config = self.core.config.lock().unwrap();
        let seed = self.core.init_seed(PROMPT_KEY);
        let prompt = prompt_table(&self.core.params, seed, &mut config.prompt, info, "dept")?;
        config.hidden_size.get_or_insert(info.hidden_size);
        let (a, b) = self.low_rank_pair(&config, info.hidden_size)?;
        let (m, rows, r, d) = (
            prompt.num_tokens(),
            config.max_length,
            config.r,
            info.hidden_size,
        );
        let module = AdaptedModule {
            path: info.path.clone(),
            params: m * d + rows * r + r * d,
            detail: format!(
                "{m} virtual tokens before the input; a rank-{r} update of the first {rows} positions' embeddings, scaled by lora_alpha/sqrt(r) = {:.4}",
                config.scaling()
            ),
        };
        self.core.record(module, ());
        Ok(Some(Box::new(DeptInputs {
            prompt,
            a,
            b,
            scale: config.scaling(),
        })))
    }
}

impl Tuner for Dept {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        self.core
            .check_finished("this model has no input embeddings to put virtual tokens before")
    }

    fn updates(&self) -> Result<Vec<(String, Update)>> {
        Err(prompt_learning::no_merge(METHOD.peft_type))
    }

    /// The low-rank pair, which takes `lora_embedding_lr` (the reference's `train.py`
    /// param groups, lines 595-611).
    fn lr_group_keys(&self) -> Vec<String> {
        vec![A_KEY.to_string(), B_KEY.to_string()]
    }
}
