//! Prompt tuning (PEFT `PROMPT_TUNING`; Lester et al. 2021): trained virtual token embeddings
//! before the input, everything else frozen (the classifier of a SEQ_CLS model trained in full).

pub mod config;
pub mod layer;

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

pub use config::{PromptTuningConfig, PromptTuningInit};
use layer::{fit_to, PromptEmbedding};

use super::config::AdapterConfig;
use super::mode::Mode;
use super::modules_to_save::ModulesToSave;
use super::params::ParamStore;
use super::prompt_learning::{self, ModelDims};
use super::registry::{BuildContext, Method};
use super::target::MatchReport;
use super::{AdaptedModule, Tuner, Update};
use crate::init::{normal, seed_for};
use crate::model::{InputInfo, Linear, LinearInfo, ModelHook, VirtualTokens};
use crate::ops::FrozenLinear;

/// The registry entry.
pub static METHOD: Method = Method {
    name: "prompt-tuning",
    peft_type: "PROMPT_TUNING",
    summary:
        "prompt tuning: trained virtual token embeddings before the input (Lester et al. 2021)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
};

/// PEFT's key for the prompt (`get_peft_model_state_dict`, prompt learning).
pub const PROMPT_KEY: &str = "prompt_embeddings";

/// Prompt tuning has no targets to complete: the dimensions come from the model at build time.
fn complete(_options: &mut Map<String, Value>, _model_type: &str) -> Result<()> {
    Ok(())
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: PromptTuningConfig = config.typed("prompt_tuning")?;
    cfg.validate()?;
    Ok(Box::new(PromptTuning::new(cfg, ctx)))
}

/// Trains virtual tokens for a [`PromptTuningConfig`].
pub struct PromptTuning {
    config: Mutex<PromptTuningConfig>,
    seed: u64,
    mode: Arc<Mode>,
    params: ParamStore,
    saved: ModulesToSave,
    adapted: Mutex<Vec<AdaptedModule>>,
}

impl PromptTuning {
    pub fn new(config: PromptTuningConfig, ctx: BuildContext) -> Self {
        Self {
            saved: prompt_learning::modules_to_save(&config.common),
            config: Mutex::new(config),
            seed: ctx.seed,
            mode: Arc::new(Mode::new(ctx.seed)),
            params: ParamStore::new(ctx.device, ctx.weights),
            adapted: Mutex::new(Vec::new()),
        }
    }

    /// The initial prompt `[n, hidden]` for a fresh adapter (PEFT's `PromptEmbedding.__init__`).
    fn initial_prompt(
        &self,
        cfg: &PromptTuningConfig,
        info: &InputInfo,
        n: usize,
    ) -> Result<Tensor> {
        let device = self.params.device();
        let vocab = info.word_embeddings.base().dims().0;
        let ids: Vec<u32> = match cfg.prompt_tuning_init {
            PromptTuningInit::Random => {
                return normal(
                    &[n, info.hidden_size],
                    1.0,
                    seed_for(self.seed, PROMPT_KEY),
                    device,
                )
            }
            PromptTuningInit::SampleVocab => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed_for(self.seed, PROMPT_KEY));
                (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
            }
            PromptTuningInit::Text => fit_to(&text_ids(cfg)?, n),
        };
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            bail!("prompt_tuning: prompt_tuning_init_text has token id {bad}, outside this model's vocabulary of {vocab}: tokenizer_name_or_path names another model's tokenizer")
        }
        if ids.len() != n {
            bail!("prompt_tuning: prompt_tuning_init_text tokenizes to no tokens")
        }
        let rows = info
            .word_embeddings
            .forward(&Tensor::new(ids.as_slice(), device)?)?;
        Ok(rows.to_dtype(DType::F32)?)
    }
}

/// `prompt_tuning_init_text` tokenized as peft does (`tokenizer(text)["input_ids"]`, special
/// tokens added) with the `tokenizer.json` of `tokenizer_name_or_path`.
fn text_ids(cfg: &PromptTuningConfig) -> Result<Vec<u32>> {
    let (Some(text), Some(dir)) = (&cfg.prompt_tuning_init_text, &cfg.tokenizer_name_or_path)
    else {
        bail!("prompt_tuning: TEXT init needs prompt_tuning_init_text and tokenizer_name_or_path")
    };
    let path = Path::new(dir);
    let context = || format!("prompt_tuning: tokenizer_name_or_path {dir:?}");
    // A GGUF file carries its tokenizer in the metadata; a folder has tokenizer.json.
    let tokenizer = if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        crate::model::gguf::GgufFile::open(path)
            .and_then(|g| g.tokenizer())
            .with_context(context)?
            .tokenizer
    } else {
        crate::data::load_tokenizer(path).with_context(context)?
    };
    let enc = tokenizer
        .encode(text.as_str(), true)
        .map_err(|e| anyhow::anyhow!("prompt_tuning: tokenizing prompt_tuning_init_text: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

impl ModelHook for PromptTuning {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        prompt_learning::linear(&self.saved, info, base, &self.params)
    }

    fn virtual_tokens(&self, info: &InputInfo) -> Result<Option<Box<dyn VirtualTokens>>> {
        let mut cfg = self.config.lock().unwrap();
        let dims = ModelDims {
            token_dim: info.hidden_size,
            num_attention_heads: info.num_heads,
            num_layers: info.num_layers,
        };
        cfg.common
            .fill_dims("prompt_tuning", dims, &["token_dim"])?;
        let n = cfg.common.virtual_tokens("prompt_tuning")?;
        let table: Var = self
            .params
            .take_or_init(PROMPT_KEY, &[n, info.hidden_size], || {
                self.initial_prompt(&cfg, info, n)
            })?;
        let detail = format!("{n} virtual tokens before the input");
        self.adapted.lock().unwrap().push(AdaptedModule {
            path: info.path.clone(),
            params: n * info.hidden_size,
            detail,
        });
        Ok(Some(Box::new(PromptEmbedding { table })))
    }
}

impl Tuner for PromptTuning {
    fn method(&self) -> &'static Method {
        &METHOD
    }

    fn mode(&self) -> &Arc<Mode> {
        &self.mode
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        if self.params.get(PROMPT_KEY).is_none() {
            bail!("prompt_tuning: this model has no input embeddings to put virtual tokens before")
        }
        self.params.check_all_used()?;
        Ok(vec![])
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    fn adapted(&self) -> Vec<AdaptedModule> {
        self.adapted.lock().unwrap().clone()
    }

    fn config_json(&self) -> Result<Value> {
        Ok(serde_json::to_value(&*self.config.lock().unwrap())?)
    }

    fn updates(&self) -> Result<Vec<(String, Update)>> {
        Err(prompt_learning::no_merge(METHOD.peft_type))
    }

    fn replaced(&self) -> Vec<(String, Tensor)> {
        self.saved.replaced(&self.params)
    }
}
