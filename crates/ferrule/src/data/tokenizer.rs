//! Loading a model's tokenizer and the special tokens of its `tokenizer_config.json`.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;
use tokenizers::Tokenizer;

use super::error::{DataError, Result};
use super::jsonl::describe;

/// Loads `<model_dir>/tokenizer.json`.
///
/// Truncation and padding configured in the file are switched off: ferrule truncates and pads
/// itself (see [`EncodeOptions`](super::EncodeOptions) and [`collate`](super::collate)), and a
/// tokenizer that silently cut or padded every encoding would corrupt the label masks.
pub fn load_tokenizer(model_dir: &Path) -> Result<Tokenizer> {
    let path = model_dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(DataError::MissingTokenizer {
            dir: model_dir.to_path_buf(),
        });
    }
    let bad = |message: String| DataError::Tokenizer {
        context: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    check_bpe_merges(&text).map_err(bad)?;
    let mut tokenizer = Tokenizer::from_str(&text).map_err(|e| bad(e.to_string()))?;
    tokenizer
        .with_truncation(None)
        .map_err(|e| DataError::Tokenizer {
            context: path.display().to_string(),
            message: e.to_string(),
        })?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// tokenizers 0.23 panics (a slice index in `BpeBuilder::build`) on a BPE merge whose result is
/// longer than every token of the vocabulary, before its own "not in the vocabulary" error;
/// found by fuzzing the GGUF reader, which has the same check. Refuse such a merge first.
fn check_bpe_merges(text: &str) -> std::result::Result<(), String> {
    let Ok(json) = serde_json::from_str::<Value>(text) else {
        return Ok(());
    }; // tokenizers reports it
    let model = &json["model"];
    let (Some(vocab), Some(merges)) = (model["vocab"].as_object(), model["merges"].as_array())
    else {
        return Ok(());
    };
    if model["type"].as_str().is_some_and(|t| t != "BPE") {
        return Ok(());
    }
    let longest = vocab.keys().map(String::len).max().unwrap_or(0);
    for (i, m) in merges.iter().enumerate() {
        let pair = match m {
            Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string())),
            Value::Array(p) if p.len() == 2 => p[0]
                .as_str()
                .zip(p[1].as_str())
                .map(|(a, b)| (a.to_string(), b.to_string())),
            _ => None,
        };
        if let Some((a, b)) = pair {
            if a.len() + b.len() > longest {
                return Err(format!(
                    "BPE merge {i} ({a:?} + {b:?}) makes a token longer than any in the vocabulary"
                ));
            }
        }
    }
    Ok(())
}

/// The parts of a model's `tokenizer_config.json` that ferrule uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    /// The file it was read from (`None` when built in code).
    pub path: Option<PathBuf>,
    /// `bos_token`, as a string.
    pub bos_token: Option<String>,
    /// `eos_token`, as a string.
    pub eos_token: Option<String>,
    /// `pad_token`, as a string.
    pub pad_token: Option<String>,
    /// `unk_token`, as a string.
    pub unk_token: Option<String>,
    /// `chat_template`; when the file holds a list of named templates, the one named
    /// `default`.
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Reads `<model_dir>/tokenizer_config.json`; `Ok(None)` when the file does not exist.
    pub fn from_model_dir(model_dir: &Path) -> Result<Option<Self>> {
        let path = model_dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        Self::from_file(&path).map(Some)
    }

    /// Reads a `tokenizer_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, &e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| DataError::Config {
            path: path.to_path_buf(),
            message: format!("invalid JSON: {e}"),
        })?;
        let mut config = Self::from_json(&value).map_err(|message| DataError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Extracts the fields from the parsed JSON of a `tokenizer_config.json`. The error is a
    /// message without the file name.
    pub fn from_json(value: &Value) -> std::result::Result<Self, String> {
        let Value::Object(obj) = value else {
            return Err(format!("expected a JSON object, found {}", describe(value)));
        };
        let token = |key: &str| -> std::result::Result<Option<String>, String> {
            match obj.get(key) {
                None => Ok(None),
                Some(v) => special_token_string(v).map_err(|found| {
                    format!(
                        "expected \"{key}\" to be a string, null or an AddedToken object \
                         {{\"content\": ...}}, found {found}"
                    )
                }),
            }
        };
        Ok(TokenizerConfig {
            path: None,
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            pad_token: token("pad_token")?,
            unk_token: token("unk_token")?,
            chat_template: match obj.get("chat_template") {
                None | Some(Value::Null) => None,
                Some(v) => Some(chat_template_string(v)?),
            },
        })
    }
}

/// A special token written as a string, as null, or as an `AddedToken` object
/// (`{"__type": "AddedToken", "content": "<s>", ...}`). The error describes what was found.
fn special_token_string(value: &Value) -> std::result::Result<Option<String>, String> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(obj) => match obj.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(describe(value)),
        },
        other => Err(describe(other)),
    }
}

/// `chat_template` as a string, or the `default` entry of a list of `{name, template}`
/// objects (Hugging Face's format for models with several templates).
pub(crate) fn chat_template_string(value: &Value) -> std::result::Result<String, String> {
    const EXPECTED: &str = "expected \"chat_template\" to be a string or a list of \
                            {\"name\", \"template\"} objects";
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(items) => {
            let mut names = Vec::new();
            for item in items {
                let (Some(Value::String(name)), Some(Value::String(template))) =
                    (item.get("name"), item.get("template"))
                else {
                    return Err(format!(
                        "{EXPECTED}, found an element that is {}",
                        describe(item)
                    ));
                };
                if name == "default" {
                    return Ok(template.clone());
                }
                names.push(format!("{name:?}"));
            }
            Err(format!(
                "expected a chat template named \"default\" among {}, found none",
                if names.is_empty() {
                    "the list".to_string()
                } else {
                    names.join(", ")
                }
            ))
        }
        other => Err(format!("{EXPECTED}, found {}", describe(other))),
    }
}

/// The id of a token string, if the tokenizer knows it (added tokens included).
fn id_of(tokenizer: &Tokenizer, token: Option<&str>) -> Option<u32> {
    token.and_then(|t| tokenizer.token_to_id(t))
}

/// The id used to pad batches: the config's `pad_token`, else its `eos_token`, else `0`.
///
/// Padded positions are masked out of attention and loss, so any valid id works; the pad token
/// is preferred so that padding looks like what the model saw during pretraining.
pub fn pad_token_id(tokenizer: &Tokenizer, tokenizer_config: Option<&TokenizerConfig>) -> u32 {
    let config = tokenizer_config;
    id_of(tokenizer, config.and_then(|c| c.pad_token.as_deref()))
        .or_else(|| id_of(tokenizer, config.and_then(|c| c.eos_token.as_deref())))
        .unwrap_or(0)
}

/// The id of the config's `eos_token`, if it has one the tokenizer knows.
pub fn eos_token_id(
    tokenizer: &Tokenizer,
    tokenizer_config: Option<&TokenizerConfig>,
) -> Option<u32> {
    id_of(
        tokenizer,
        tokenizer_config.and_then(|c| c.eos_token.as_deref()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every odd value of every key ferrule reads is an error naming the key, except the ones
    /// transformers accepts (a string, null, an AddedToken object; a list of named templates).
    #[test]
    fn odd_values_are_errors_naming_the_key() {
        let odd = [
            json!(-1),
            json!(0),
            json!(1099511627776u64),
            json!(true),
            json!([]),
            json!({}),
            json!(["nope"]),
            json!(-0.5),
            json!({"content": 3}),
        ];
        for key in [
            "bos_token",
            "eos_token",
            "pad_token",
            "unk_token",
            "chat_template",
        ] {
            for v in &odd {
                let e = TokenizerConfig::from_json(&json!({ key: v }))
                    .expect_err(&format!("{key} = {v} must be refused"));
                assert!(
                    e.contains(&format!("\"{key}\""))
                        || (key == "chat_template" && e.contains("chat template")),
                    "{key} = {v}: {e}"
                );
            }
            let fine = TokenizerConfig::from_json(&json!({ key: null })).unwrap();
            assert_eq!(fine, TokenizerConfig::default(), "{key} = null is unset");
        }
        let c = TokenizerConfig::from_json(&json!({
            "eos_token": {"__type": "AddedToken", "content": "</s>"},
            "pad_token": "<pad>",
            "chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}],
        }))
        .unwrap();
        assert_eq!(
            (
                c.eos_token.as_deref(),
                c.pad_token.as_deref(),
                c.chat_template.as_deref()
            ),
            (Some("</s>"), Some("<pad>"), Some("d"))
        );
        let e = TokenizerConfig::from_json(
            &json!({"chat_template": [{"name": "tool_use", "template": "t"}]}),
        )
        .unwrap_err();
        assert!(
            e.contains("named \"default\"") && e.contains("\"tool_use\""),
            "{e}"
        );
        assert!(TokenizerConfig::from_json(&json!([]))
            .unwrap_err()
            .contains("expected a JSON object"));
    }
}
