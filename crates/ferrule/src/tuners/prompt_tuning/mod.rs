//! Prompt tuning (PEFT `PROMPT_TUNING`; Lester et al. 2021): trained virtual token embeddings
//! before the input, everything else frozen (the classifier of a SEQ_CLS model trained in full).

pub mod config;
pub mod layer;

use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

pub use config::{PromptTuningConfig, PromptTuningInit};
use layer::{fit_to, PromptEmbedding};

use super::config::AdapterConfig;
use super::core::{AnyTunerCore, TunerCore};
use super::params::ParamStore;
use super::prompt_learning::{self, ModelDims};
use super::registry::{BuildContext, Method};
use super::target::MatchReport;
use super::{AdaptedModule, Tuner, Update};
use crate::init::normal;
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
    flags: config::FLAGS,
    complete_flags: Some(config::complete_flags),
    count_from_shapes: None,
    trains_whole_model: false,
    f32_weights: None,
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
    /// The config sits in a `Mutex`: the model's dimensions are filled in while it is built.
    core: TunerCore<Mutex<PromptTuningConfig>>,
}

impl PromptTuning {
    pub fn new(config: PromptTuningConfig, ctx: BuildContext) -> Self {
        let saved = prompt_learning::modules_to_save(&config.common);
        Self {
            core: TunerCore::new(&METHOD, Mutex::new(config), saved, ctx),
        }
    }
}

/// The prompt `P: [num_virtual_tokens, hidden]` (`prompt_embeddings`) of a prompt-tuning
/// config: the saved one, or a fresh one as peft's `PromptEmbedding.__init__` makes it (seeded
/// by `seed`). Fills the model's dimensions into `config` first; `method` names the method in
/// errors (DePT builds its prompt here too).
pub(crate) fn prompt_table(
    params: &ParamStore,
    seed: u64,
    config: &mut PromptTuningConfig,
    info: &InputInfo,
    method: &str,
) -> Result<PromptEmbedding> {
    let dims = ModelDims {
        token_dim: info.hidden_size,
        num_attention_heads: info.num_heads,
        num_layers: info.num_layers,
    };
    config.common.fill_dims(method, dims, &["token_dim"])?;
    let num_tokens = config.common.virtual_tokens(method)?;
    let table = params.take_or_init(PROMPT_KEY, &[num_tokens, info.hidden_size], || {
        initial_prompt(config, info, num_tokens, seed, params.device())
    })?;
    Ok(PromptEmbedding { table })
}

/// The initial prompt `[num_tokens, hidden]` for a fresh adapter (PEFT's `PromptEmbedding.__init__`).
fn initial_prompt(
    config: &PromptTuningConfig,
    info: &InputInfo,
    num_tokens: usize,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let vocab = info.word_embeddings.base().dims().0;
    let ids: Vec<u32> = match config.prompt_tuning_init {
        PromptTuningInit::Random => {
            return normal(&[num_tokens, info.hidden_size], 1.0, seed, device)
        }
        PromptTuningInit::SampleVocab => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..num_tokens)
                .map(|_| rng.gen_range(0..vocab as u32))
                .collect()
        }
        PromptTuningInit::Text => fit_to(&text_ids(config)?, num_tokens),
    };
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("prompt_tuning: prompt_tuning_init_text has token id {bad}, outside this model's vocabulary of {vocab}: tokenizer_name_or_path names another model's tokenizer")
    }
    if ids.len() != num_tokens {
        bail!("prompt_tuning: prompt_tuning_init_text tokenizes to no tokens")
    }
    let rows = info
        .word_embeddings
        .forward(&Tensor::new(ids.as_slice(), device)?)?;
    Ok(rows.to_dtype(DType::F32)?)
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
        Ok(self.core.route_linear(info, base)?.unadapted())
    }

    fn virtual_tokens(&self, info: &InputInfo) -> Result<Option<Box<dyn VirtualTokens>>> {
        let mut config = self.core.config.lock().unwrap();
        let seed = self.core.init_seed(PROMPT_KEY);
        let prompt = prompt_table(&self.core.params, seed, &mut config, info, "prompt_tuning")?;
        let num_tokens = prompt.num_tokens();
        let module = AdaptedModule {
            path: info.path.clone(),
            params: num_tokens * info.hidden_size,
            detail: format!("{num_tokens} virtual tokens before the input"),
        };
        self.core.record(module, ());
        Ok(Some(Box::new(prompt)))
    }
}

impl Tuner for PromptTuning {
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
}
