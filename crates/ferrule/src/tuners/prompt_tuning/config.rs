//! `PromptTuningConfig`, with PEFT's key names and defaults (peft
//! `tuners/prompt_tuning/config.py`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::tuners::flags::{text, FlagValue, OptionFlag};
use crate::tuners::prompt_learning::{PromptLearningConfig, NUM_VIRTUAL_TOKENS_FLAG};

/// How the virtual token embeddings start (PEFT's `PromptTuningInit`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptTuningInit {
    /// Standard normal (torch's `nn.Embedding` default).
    #[default]
    #[serde(rename = "RANDOM")]
    Random,
    /// Rows of the word embeddings of tokens drawn uniformly from the vocabulary.
    #[serde(rename = "SAMPLE_VOCAB")]
    SampleVocab,
    /// Rows of the word embeddings of `prompt_tuning_init_text`'s tokens, repeated or cut to
    /// `num_virtual_tokens`.
    #[serde(rename = "TEXT")]
    Text,
}

/// One prompt-tuning adapter's configuration, as `adapter_config.json` stores it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PromptTuningConfig {
    #[serde(flatten)]
    pub common: PromptLearningConfig,
    #[serde(default)]
    pub prompt_tuning_init: PromptTuningInit,
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// A model folder whose `tokenizer.json` (or a GGUF file whose metadata) tokenizes
    /// `prompt_tuning_init_text`.
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    /// `AutoTokenizer.from_pretrained` options in peft; ferrule reads `tokenizer.json` as is.
    #[serde(default)]
    pub tokenizer_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Prompt tuning's `adapter_config.json` keys followed by `$extra` (DePT's config extends
/// this one), as one `&[&str]` literal.
macro_rules! prompt_tuning_keys {
    ($($extra:literal),* $(,)?) => {
        &[
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_attention_heads",
            "num_layers",
            "modules_to_save",
            "prompt_tuning_init",
            "prompt_tuning_init_text",
            "tokenizer_name_or_path",
            "tokenizer_kwargs",
            $($extra),*
        ]
    };
}
pub(crate) use prompt_tuning_keys;

/// Keys of a PROMPT_TUNING `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = prompt_tuning_keys!();

impl PromptTuningConfig {
    /// PEFT's `__post_init__` checks (TEXT needs a text and a tokenizer; `tokenizer_kwargs`
    /// only with TEXT), and ferrule's: it does not pass `tokenizer_kwargs` on.
    pub fn validate(&self) -> Result<()> {
        self.validate_as("prompt_tuning")
    }

    /// [`Self::validate`] with `method` naming the method in its errors (DePT's config holds
    /// this one).
    pub fn validate_as(&self, method: &str) -> Result<()> {
        self.common.validate(method)?;
        let text = self.prompt_tuning_init == PromptTuningInit::Text;
        if text
            && self
                .prompt_tuning_init_text
                .as_deref()
                .is_none_or(str::is_empty)
        {
            bail!("{method}: prompt_tuning_init = \"TEXT\" needs prompt_tuning_init_text")
        }
        if text
            && self
                .tokenizer_name_or_path
                .as_deref()
                .is_none_or(str::is_empty)
        {
            bail!("{method}: prompt_tuning_init = \"TEXT\" needs tokenizer_name_or_path (a model folder with tokenizer.json)")
        }
        if let Some(kw) = self.tokenizer_kwargs.as_ref().filter(|k| !k.is_empty()) {
            if !text {
                bail!("{method}: tokenizer_kwargs is only valid with prompt_tuning_init = \"TEXT\"")
            }
            bail!(
                "{method}: tokenizer_kwargs ({}) is not supported: ferrule tokenizes with tokenizer.json as saved",
                kw.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        }
        Ok(())
    }
}

/// `--prompt-tuning-init-text`, which DePT shares. It implies TEXT, so it comes before
/// `--prompt-tuning-init`, which overrides it when given.
pub const INIT_TEXT_FLAG: OptionFlag = OptionFlag {
    name: "prompt-tuning-init-text",
    value: FlagValue::Text,
    value_name: None,
    help: "Prompt tuning, DePT: the text whose token embeddings start the prompt (implies TEXT; tokenized with the model's own tokenizer unless tokenizer_name_or_path is set).",
    keys: |v| {
        vec![
            ("prompt_tuning_init_text", v),
            ("prompt_tuning_init", Value::from("TEXT")),
        ]
    },
};

/// `--prompt-tuning-init`, which DePT shares.
pub const INIT_FLAG: OptionFlag = OptionFlag {
    name: "prompt-tuning-init",
    value: FlagValue::Text,
    value_name: Some("RANDOM|SAMPLE_VOCAB|TEXT"),
    help: "Prompt tuning: RANDOM (default), SAMPLE_VOCAB or TEXT (DePT: RANDOM or TEXT).",
    keys: |v| {
        vec![(
            "prompt_tuning_init",
            Value::from(text(&v).to_ascii_uppercase()),
        )]
    },
};

/// Prompt tuning's command-line flags beside the common ones.
pub static FLAGS: &[OptionFlag] = &[NUM_VIRTUAL_TOKENS_FLAG, INIT_TEXT_FLAG, INIT_FLAG];

/// TEXT init reads a tokenizer (peft requires `tokenizer_name_or_path`): the model's own,
/// written into the adapter config, unless the config names one.
pub fn complete_flags(options: &mut Map<String, Value>, model: &str) -> anyhow::Result<()> {
    let text_init = options.get("prompt_tuning_init").and_then(Value::as_str) == Some("TEXT");
    if text_init
        && options
            .get("tokenizer_name_or_path")
            .is_none_or(Value::is_null)
    {
        tracing::info!("prompt_tuning_init_text is tokenized with the model's tokenizer (tokenizer_name_or_path = {model:?})");
        options.insert("tokenizer_name_or_path".into(), Value::from(model));
    }
    Ok(())
}
