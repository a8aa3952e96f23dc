//! A model's `generation_config.json`: the decoding defaults its authors chose, typed and
//! range-checked, as transformers' `GenerationConfig` reads them
//! (`transformers/generation/configuration_utils.py`, 5.24).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use super::SamplingOptions;
use crate::util::json_keys::Keys;

/// Keys that change greedy or sampled output in transformers and that ferrule does not
/// implement, with the value that leaves the output unchanged (`_get_default_generation_params`
/// or `None`). A file that sets one gets a warning naming it.
fn unsupported_keys() -> Vec<(&'static str, Value)> {
    use serde_json::json;
    vec![
        ("num_beams", json!(1)),
        ("num_beam_groups", json!(1)),
        ("penalty_alpha", Value::Null),
        ("min_length", json!(0)),
        ("min_new_tokens", Value::Null),
        ("no_repeat_ngram_size", json!(0)),
        ("encoder_no_repeat_ngram_size", json!(0)),
        ("encoder_repetition_penalty", json!(1.0)),
        ("typical_p", json!(1.0)),
        ("min_p", Value::Null),
        ("top_h", Value::Null),
        ("epsilon_cutoff", json!(0.0)),
        ("eta_cutoff", json!(0.0)),
        ("bad_words_ids", Value::Null),
        ("suppress_tokens", Value::Null),
        ("begin_suppress_tokens", Value::Null),
        ("forced_bos_token_id", Value::Null),
        ("forced_eos_token_id", Value::Null),
        ("sequence_bias", Value::Null),
        ("guidance_scale", Value::Null),
        ("exponential_decay_length_penalty", Value::Null),
        ("renormalize_logits", json!(false)),
        ("num_return_sequences", json!(1)),
    ]
}

/// The decoding keys of a `generation_config.json` that ferrule applies; `None` where the file
/// leaves a key out (or sets it to `null`), which then takes transformers' default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    /// The file it was read from.
    pub path: PathBuf,
    pub max_new_tokens: Option<usize>,
    /// Prompt plus new tokens at most; used only when `max_new_tokens` is unset anywhere.
    pub max_length: Option<usize>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// `eos_token_id`, an integer or a list; each below the vocabulary size.
    pub eos_token_ids: Vec<u32>,
    /// Keys set to values ferrule does not implement (`"num_beams = 4"`), for a warning.
    pub unsupported: Vec<String>,
}

impl GenerationConfig {
    /// Reads `<model_dir>/generation_config.json`; `Ok(None)` when there is none.
    pub fn from_model_dir(model_dir: &Path, vocab_size: usize) -> Result<Option<Self>> {
        let path = model_dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        let mut config =
            Self::from_json(&value, vocab_size).with_context(|| path.display().to_string())?;
        config.path = path;
        Ok(Some(config))
    }

    /// Parses the JSON of a `generation_config.json`; errors name the key, the value found and
    /// what was expected (the file name is the caller's context).
    pub fn from_json(value: &Value, vocab_size: usize) -> Result<Self> {
        if !value.is_object() {
            anyhow::bail!(
                "expected a JSON object, found {}",
                crate::util::shown_value(value)
            )
        }
        let k = Keys::new(value);
        let non_null = |key: &str| value.get(key).is_some_and(|v| !v.is_null());
        let positive = |key: &str| {
            if non_null(key) {
                k.positive(key)
            } else {
                Ok(None)
            }
        };
        let top_p = positive("top_p")?;
        if let Some(p) = top_p.filter(|&p| p > 1.0) {
            return Err(k.wrong("top_p", "a number in (0, 1]")).context(format!("top_p {p}"));
        }
        let eos_token_ids = match k.raw("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(ids)) => {
                let mut out = Vec::with_capacity(ids.len());
                for (i, id) in ids.iter().enumerate() {
                    let item = serde_json::json!({ "eos_token_id": id });
                    let id = Keys::new(&item)
                        .token_id("eos_token_id", vocab_size)
                        .with_context(|| format!("element {i} of \"eos_token_id\""))?;
                    out.extend(id);
                }
                out
            }
            Some(_) => k
                .token_id("eos_token_id", vocab_size)?
                .into_iter()
                .collect(),
        };
        let unsupported = unsupported_keys()
            .into_iter()
            .filter_map(|(key, neutral)| match k.raw(key) {
                Some(v) if !v.is_null() && !same_number_or_value(v, &neutral) => {
                    Some(format!("{key} = {}", crate::util::shown_value(v)))
                }
                _ => None,
            })
            .collect();
        let config = Self {
            path: PathBuf::new(),
            max_new_tokens: if non_null("max_new_tokens") {
                k.count("max_new_tokens")?
            } else {
                None
            },
            max_length: if non_null("max_length") {
                k.count("max_length")?
            } else {
                None
            },
            do_sample: if non_null("do_sample") {
                k.bool("do_sample")?
            } else {
                None
            },
            temperature: positive("temperature")?,
            top_k: if non_null("top_k") {
                k.usize("top_k")?
            } else {
                None
            },
            top_p,
            repetition_penalty: positive("repetition_penalty")?,
            eos_token_ids,
            unsupported,
        };
        k.note_unread("generation_config.json");
        Ok(config)
    }

    /// The sampling options this file asks for: its values over transformers' defaults
    /// ([`SamplingOptions::default`]). Without `max_new_tokens`, a `max_length` caps prompt plus
    /// output as in transformers; a prompt already that long is an error naming the key.
    pub fn sampling_options(&self, prompt_len: usize) -> Result<SamplingOptions> {
        let d = SamplingOptions::default();
        let max_new_tokens = match (self.max_new_tokens, self.max_length) {
            (Some(n), _) => n,
            (None, Some(total)) if total <= prompt_len => {
                anyhow::bail!("{}: \"max_length\" is {total}, and the prompt already has {prompt_len} tokens; pass --max-new-tokens", self.path.display())
            }
            (None, Some(total)) => total - prompt_len,
            (None, None) => d.max_new_tokens,
        };
        Ok(SamplingOptions {
            max_new_tokens,
            do_sample: self.do_sample.unwrap_or(d.do_sample),
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            ..d
        })
    }
}

/// `1` and `1.0` are the same setting.
fn same_number_or_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_keys_and_fills_transformers_defaults() {
        let g = GenerationConfig::from_json(&json!({"do_sample": true, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 5], "max_new_tokens": 12}), 10)
            .unwrap();
        let o = g.sampling_options(3).unwrap();
        assert_eq!(
            (
                o.do_sample,
                o.temperature,
                o.top_p,
                o.top_k,
                o.max_new_tokens,
                o.repetition_penalty
            ),
            (true, 0.6, 0.9, 50, 12, 1.0)
        );
        assert_eq!(g.eos_token_ids, vec![2, 5]);
        // max_length caps prompt + output when max_new_tokens is unset.
        let g = GenerationConfig::from_json(&json!({"max_length": 20}), 10).unwrap();
        assert_eq!(g.sampling_options(7).unwrap().max_new_tokens, 13);
        assert!(g
            .sampling_options(20)
            .unwrap_err()
            .to_string()
            .contains("\"max_length\" is 20"));
        // Nulls are transformers' defaults.
        assert_eq!(
            GenerationConfig::from_json(&json!({"top_k": null, "temperature": null}), 10)
                .unwrap()
                .sampling_options(1)
                .unwrap(),
            SamplingOptions::default()
        );
    }

    #[test]
    fn odd_values_are_errors_naming_the_key() {
        let odd = [
            json!("x"),
            json!(-1),
            json!([]),
            json!({}),
            json!(true),
            json!(-0.5),
        ];
        for key in [
            "max_new_tokens",
            "max_length",
            "do_sample",
            "temperature",
            "top_k",
            "top_p",
            "repetition_penalty",
            "eos_token_id",
        ] {
            for v in &odd {
                // A few odd values are valid for some keys: -1 as an eos id means none; `true`
                // is a valid do_sample; a list is a valid eos_token_id (an empty one, none).
                let valid = (key == "do_sample" && v == &json!(true))
                    || (key == "eos_token_id" && (v == &json!(-1) || v == &json!([])));
                let r = GenerationConfig::from_json(&json!({ key: v }), 10);
                match (valid, r) {
                    (true, Ok(_)) => {}
                    (false, Err(e)) => {
                        assert!(format!("{e:#}").contains(key), "{key} = {v}: {e:#}")
                    }
                    (valid, r) => panic!("{key} = {v}: valid {valid}, got {r:?}"),
                }
            }
        }
        for (key, v) in [
            ("top_p", json!(1.5)),
            ("temperature", json!(0)),
            ("max_new_tokens", json!(0)),
            ("eos_token_id", json!(10)),
            ("eos_token_id", json!([1, 99])),
        ] {
            let e = format!(
                "{:#}",
                GenerationConfig::from_json(&json!({ key: v }), 10).unwrap_err()
            );
            assert!(e.contains(key), "{key} = {v}: {e}");
        }
    }

    #[test]
    fn settings_ferrule_does_not_implement_are_listed() {
        let g = GenerationConfig::from_json(&json!({"num_beams": 4, "no_repeat_ngram_size": 0, "typical_p": 1, "min_p": null, "suppress_tokens": [3]}), 10)
            .unwrap();
        assert_eq!(
            g.unsupported,
            vec![
                "num_beams = 4".to_string(),
                "suppress_tokens = [3]".to_string()
            ]
        );
    }
}
