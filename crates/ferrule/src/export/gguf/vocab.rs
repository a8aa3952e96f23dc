//! `tokenizer.ggml.*` metadata for a byte-level BPE tokenizer, as convert_hf_to_gguf.py's
//! `_set_vocab_gpt2` (`get_vocab_base`) and gguf-py's `SpecialVocab` write it: model `gpt2`, the
//! pre-tokenizer name, one token per id up to the config's `vocab_size` (`[PAD<i>]`, type
//! UNUSED, for ids the tokenizer lacks), token types (NORMAL, CONTROL for special added tokens
//! and ones that look special, USER_DEFINED for other added tokens), merges as `"a b"`, the
//! special token ids, `add_bos_token` / `add_eos_token`, and the chat template.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::writer::MetaValue;
use crate::model::ModelSource;

/// gguf-py's `TokenType`.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The tokenizer metadata, and the `tokenizer.ggml.pre` value with whether it was recognised.
pub struct VocabMeta {
    pub entries: Vec<(String, MetaValue)>,
    pub pre: String,
    pub pre_recognised: bool,
}

/// Builds the `tokenizer.*` keys from `source`'s tokenizer and tokenizer config.
pub fn vocab_metadata(source: &ModelSource, vocab_size: usize) -> Result<VocabMeta> {
    let tok = source.tokenizer()?;
    let origin = source.location.display().to_string();
    let json: Value = serde_json::from_str(
        &tok.to_string(false)
            .map_err(|e| anyhow::anyhow!("{origin}: serializing its tokenizer: {e}"))?,
    )
    .with_context(|| format!("{origin}: reading its tokenizer back"))?;
    let model = &json["model"];
    let byte_level = matches!(model["type"].as_str(), Some("BPE"))
        && !model["byte_fallback"].as_bool().unwrap_or(false)
        && mentions_byte_level(&json["pre_tokenizer"]);
    if !byte_level {
        bail!(
            "{origin}: GGUF export writes byte-level BPE tokenizers (llama.cpp's \"gpt2\" model, as Llama 3, Qwen2 and SmolLM2 use); this tokenizer is {} without a ByteLevel pre-tokenizer (a SentencePiece-style vocabulary), which is not supported yet",
            model["type"].as_str().unwrap_or("of an unknown type")
        )
    }
    let (pre, pre_recognised) = pre_tokenizer_name(&json["pre_tokenizer"]);

    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut place = |id: u64, text: String, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).with_context(|| {
            format!("{origin}: token {text:?} has id {id}, not below the config's vocab_size {vocab_size}")
        })?;
        *slot = Some((text, ty));
        Ok(())
    };
    if let Some(vocab) = model["vocab"].as_object() {
        for (text, id) in vocab {
            place(id.as_u64().unwrap_or(u64::MAX), text.clone(), NORMAL)?;
        }
    }
    let added = json["added_tokens"].as_array().cloned().unwrap_or_default();
    for a in &added {
        let text = a["content"].as_str().unwrap_or_default().to_string();
        let special = a["special"].as_bool().unwrap_or(false) || looks_special(&text);
        let ty = if special { CONTROL } else { USER_DEFINED };
        place(a["id"].as_u64().unwrap_or(u64::MAX), text, ty)?;
    }
    let (texts, types): (Vec<String>, Vec<i32>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED)))
        .unzip();

    let merges: Vec<String> = match &model["merges"] {
        Value::Array(items) => items
            .iter()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                // A pair; gguf-py spells a space inside a part as U+0120, as byte-level BPE does.
                Value::Array(p) if p.len() == 2 => Ok(p
                    .iter()
                    .map(|s| s.as_str().unwrap_or_default().replace(' ', "\u{120}"))
                    .collect::<Vec<_>>()
                    .join(" ")),
                other => bail!("{origin}: tokenizer merge {other} is neither \"a b\" nor [a, b]"),
            })
            .collect::<Result<_>>()?,
        _ => Vec::new(),
    };

    let mut entries = vec![
        s("tokenizer.ggml.model", "gpt2"),
        s("tokenizer.ggml.pre", &pre),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::StrArray(texts.clone()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            MetaValue::I32Array(types),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            MetaValue::StrArray(merges),
        ),
    ];
    for (key, id) in special_token_ids(source, &added, vocab_size) {
        entries.push((key, MetaValue::U32(id)));
    }
    for (key, on) in add_special_flags(source, &json) {
        entries.push((key, MetaValue::Bool(on)));
    }
    if let Some(t) = &source.chat_template {
        entries.push(s("tokenizer.chat_template", t.source()));
    }
    Ok(VocabMeta {
        entries,
        pre,
        pre_recognised,
    })
}

fn s(key: &str, value: &str) -> (String, MetaValue) {
    (key.to_string(), MetaValue::Str(value.to_string()))
}

fn mentions_byte_level(pre: &Value) -> bool {
    match pre["type"].as_str() {
        Some("ByteLevel") => true,
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .is_some_and(|v| v.iter().any(mentions_byte_level)),
        _ => false,
    }
}

/// `does_token_look_special` of convert_hf_to_gguf.py: added tokens some models forget to mark.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// llama.cpp's name for the pre-tokenizer split. convert_hf_to_gguf.py recognises a tokenizer
/// by hashing its output on a test text; ferrule recognises the pre-tokenizer's structure
/// instead: GPT-2's split (`gpt-2`), SmolLM's digits + GPT-2 (`smollm`), and the regex splits
/// ferrule's GGUF reader knows (Llama 3's `llama-bpe`, Qwen2's `qwen2`, ...). Anything else is
/// written as `default` and reported as unrecognised.
fn pre_tokenizer_name(pre: &Value) -> (String, bool) {
    let kind = |v: &Value| v["type"].as_str().unwrap_or_default().to_string();
    let parts: Vec<Value> = match kind(pre).as_str() {
        "Sequence" => pre["pretokenizers"].as_array().cloned().unwrap_or_default(),
        _ => vec![pre.clone()],
    };
    let gpt2_byte_level =
        |v: &Value| kind(v) == "ByteLevel" && v["use_regex"].as_bool() != Some(false);
    let name = match parts.as_slice() {
        [b] if gpt2_byte_level(b) => Some("gpt-2".to_string()),
        [d, b]
            if kind(d) == "Digits"
                && d["individual_digits"].as_bool() == Some(true)
                && gpt2_byte_level(b) =>
        {
            Some("smollm".to_string())
        }
        [split, b] if kind(split) == "Split" && kind(b) == "ByteLevel" => split["pattern"]["Regex"]
            .as_str()
            .and_then(|re| {
                ["llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"]
                    .into_iter()
                    .find(|n| crate::model::gguf::pre_tokenizer_split(n) == Some(re))
            })
            .map(str::to_string),
        _ => None,
    };
    match name {
        Some(n) => (n, true),
        None => ("default".to_string(), false),
    }
}

/// `tokenizer.ggml.{bos,eos,unknown,padding}_token_id`, as `SpecialVocab` finds them: the
/// tokenizer config's token strings looked up among the added tokens, else `config.json`'s ids.
fn special_token_ids(source: &ModelSource, added: &[Value], vocab: usize) -> Vec<(String, u32)> {
    let tc = source.tokenizer_config.as_ref();
    let by_content = |text: Option<&String>| -> Option<u32> {
        let text = text?;
        added
            .iter()
            .find(|a| a["content"].as_str() == Some(text.as_str()))
            .and_then(|a| a["id"].as_u64())
            .map(|id| id as u32)
    };
    let from_config = |key: &str| source.config[key].as_u64().map(|id| id as u32);
    let mut out = Vec::new();
    for (typ, gguf_key, text) in [
        ("bos", "bos_token_id", tc.and_then(|t| t.bos_token.as_ref())),
        ("eos", "eos_token_id", tc.and_then(|t| t.eos_token.as_ref())),
        (
            "unk",
            "unknown_token_id",
            tc.and_then(|t| t.unk_token.as_ref()),
        ),
        (
            "pad",
            "padding_token_id",
            tc.and_then(|t| t.pad_token.as_ref()),
        ),
    ] {
        let id = by_content(text).or_else(|| from_config(&format!("{typ}_token_id")));
        if let Some(id) = id.filter(|&id| (id as usize) < vocab) {
            out.push((format!("tokenizer.ggml.{gguf_key}"), id));
        }
    }
    out
}

/// `tokenizer.ggml.add_bos_token` / `add_eos_token`: from `tokenizer_config.json` where it says,
/// else from the tokenizer's template post-processor (a leading or trailing special token).
fn add_special_flags(source: &ModelSource, tok: &Value) -> Vec<(String, bool)> {
    let raw: Option<Value> = source
        .dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("tokenizer_config.json")).ok())
        .and_then(|t| serde_json::from_str(&t).ok());
    let tc = source.tokenizer_config.as_ref();
    let template_single = tok["post_processor"]["single"].as_array().cloned();
    let special_at = |i: Option<&Value>| -> Option<String> {
        i.and_then(|v| v["SpecialToken"]["id"].as_str().map(str::to_string))
    };
    let mut out = Vec::new();
    for (typ, wanted) in [
        ("bos", tc.and_then(|t| t.bos_token.clone())),
        ("eos", tc.and_then(|t| t.eos_token.clone())),
    ] {
        let key = format!("add_{typ}_token");
        let flag = raw.as_ref().and_then(|r| r[&key].as_bool()).or_else(|| {
            let single = template_single.as_ref()?;
            let edge = if typ == "bos" {
                special_at(single.first())
            } else {
                special_at(single.last())
            };
            Some(edge.is_some() && edge == wanted)
        });
        if let Some(on) = flag {
            out.push((format!("tokenizer.ggml.{key}"), on));
        }
    }
    out
}
