//! peft's `trainable_token_indices` (a `LoraConfig` key; peft `tuners/lora/config.py`): which
//! rows of which tables train.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::tuners::flags::{text, FlagValue, OptionFlag};

/// `trainable_token_indices`: a list of token ids (rows of the model's input embedding), or
/// module name → ids (`{"embed_tokens": [..], "lm_head": [..]}`), the names matched as dotted
/// suffixes of module paths, as `modules_to_save` names are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a list of token ids, or an object of module name -> list of token ids"
)]
pub enum TokenIndices {
    Embedding(Vec<u32>),
    ByModule(BTreeMap<String, Vec<u32>>),
}

impl TokenIndices {
    /// Refuses what would train nothing or be ambiguous, naming `key` (`lora:
    /// trainable_token_indices`): no id, no module, or an id listed twice (peft would make two
    /// trainable rows for it, and which one wins in the table is undefined).
    pub fn validate(&self, key: &str) -> Result<()> {
        let lists: Vec<(Option<&String>, &Vec<u32>)> = match self {
            TokenIndices::Embedding(ids) => vec![(None, ids)],
            TokenIndices::ByModule(m) if m.is_empty() => {
                bail!("{key} names no module; give a list of token ids or {{\"embed_tokens\": [ids]}}")
            }
            TokenIndices::ByModule(m) => m.iter().map(|(k, v)| (Some(k), v)).collect(),
        };
        for (module, ids) in lists {
            let at = module.map_or(String::new(), |m| format!("[{m:?}]"));
            if ids.is_empty() {
                bail!("{key}{at} lists no token id")
            }
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = ids.iter().find(|id| !seen.insert(**id)) {
                bail!("{key}{at} lists token id {dup} twice; list each id once")
            }
        }
        Ok(())
    }
}

/// A list of ids given on the command line as a JSON list of integers; anything else (token
/// names) goes through as text, for [`resolve_token_names`] (or the config's check) to read.
fn ids_or_text(v: Value) -> Value {
    let ids: Option<Vec<u64>> = text(&v)
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect();
    ids.map_or(v, Value::from)
}

/// `--trainable-token-indices 49152,49153`: the list form.
pub const FLAG: OptionFlag = OptionFlag {
    name: "trainable-token-indices",
    value: FlagValue::Text,
    value_name: Some("IDS"),
    help: "Comma-separated token ids (or tokens, e.g. \"<|call|>,<|result|>\", looked up in the model's tokenizer.json) whose rows of the input embedding train (and of a head tied to it), the rest of the table frozen (peft's trainable_token_indices). For tokens added to the tokenizer, with --resize-token-embeddings.",
    keys: |v| vec![("trainable_token_indices", ids_or_text(v))],
};

/// The ids of the tokens a flag named (`key` holds text: `<|call|>,7`), by the tokenizer.json of
/// the model folder `model`; a name the tokenizer does not hold is an error naming it.
pub fn resolve_token_names(
    options: &mut Map<String, Value>,
    model: &str,
    key: &str,
    flag: &str,
) -> Result<()> {
    let Some(Value::String(list)) = options.get(key) else {
        return Ok(());
    };
    let dir = std::path::Path::new(model);
    if !dir.join("tokenizer.json").is_file() {
        bail!("--{flag} {list:?} names tokens, which are looked up in a model folder's tokenizer.json, and {model} has none; give their ids")
    }
    let tokenizer = crate::data::load_tokenizer(dir)?;
    let ids = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<u32>() {
            Ok(id) => Ok(id),
            Err(_) => tokenizer.token_to_id(s).ok_or_else(|| {
                anyhow!(
                    "--{flag}: {s:?} is no token id and no token of {}",
                    dir.join("tokenizer.json").display()
                )
            }),
        })
        .collect::<Result<Vec<u32>>>()?;
    options.insert(key.to_string(), Value::from(ids));
    Ok(())
}

/// LoRA's [`Method::complete_flags`](crate::tuners::Method::complete_flags): token names in
/// `--trainable-token-indices` become ids.
pub fn complete_lora_flags(options: &mut Map<String, Value>, model: &str) -> Result<()> {
    resolve_token_names(options, model, "trainable_token_indices", FLAG.name)
}

/// The standalone method's: token names in `--token-indices` become ids.
pub fn complete_flags(options: &mut Map<String, Value>, model: &str) -> Result<()> {
    resolve_token_names(options, model, "token_indices", TOKEN_INDICES_FLAG.name)
}

fn yes() -> bool {
    true
}

/// peft's standalone `TrainableTokensConfig` (`peft_type` `TRAINABLE_TOKENS`): the rows
/// `token_indices` of every module `target_modules` selects (by default the model's token
/// embedding) train, and nothing else.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainableTokensConfig {
    #[serde(default)]
    pub token_indices: Vec<u32>,
    /// Module names (dotted suffixes) or a regex over whole paths; `None`: the token
    /// embedding, whose path the saved config then names, as peft fills it in.
    #[serde(default)]
    pub target_modules: Option<crate::tuners::target::ModuleSpec>,
    /// `true`: the rows start as copies of the table's (a no-op adapter); `false`: standard
    /// normal.
    #[serde(default = "yes")]
    pub init_weights: bool,
}

/// Keys of a `TRAINABLE_TOKENS` `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &["token_indices", "target_modules", "init_weights"];

impl TrainableTokensConfig {
    /// At least one id, each once.
    pub fn validate(&self) -> Result<()> {
        TokenIndices::Embedding(self.token_indices.clone())
            .validate("trainable_tokens: token_indices")
    }
}

/// `--token-indices 49152,49153`: the standalone method's `token_indices`.
pub const TOKEN_INDICES_FLAG: OptionFlag = OptionFlag {
    name: "token-indices",
    value: FlagValue::Text,
    value_name: Some("IDS"),
    help: "Trainable tokens (--method trainable-tokens): comma-separated ids (or tokens of the model's tokenizer.json) of the token embedding's rows that train, nothing else (peft's token_indices).",
    keys: |v| vec![("token_indices", ids_or_text(v))],
};
