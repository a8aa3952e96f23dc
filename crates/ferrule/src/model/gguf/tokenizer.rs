//! The `tokenizers` BPE tokenizer described by `tokenizer.ggml.*` metadata.

#[allow(unused_imports)]
use super::*;

/// The tokenizer half of a GGUF file.
#[derive(Clone, Debug)]
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// `tokenizer.ggml.pre` values whose merges were learned on a split other than GPT-2's, with that
/// split (transformers' `GGUF_PRE_TOKENIZER_SPLITS`). Anything else, `smollm` and `gpt-2`
/// included, gets the GPT-2 split built into the ByteLevel pre-tokenizer, as in transformers.
pub(crate) fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// GPT-2's byte -> printable char table (the alphabet byte-level BPE vocabularies are spelled in).
pub(super) fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap();
            n += 1;
            c
        };
    }
    table
}

pub(super) fn string_array<'a>(
    path: &Path,
    md: &'a Meta,
    key: &str,
) -> Result<Vec<&'a str>, GgufError> {
    match md.get(key) {
        Some(gguf_file::Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                gguf_file::Value::String(s) => Ok(s.as_str()),
                other => Err(bad(
                    path,
                    key,
                    format!("expected strings, got {:?}", other.value_type()),
                )),
            })
            .collect(),
        Some(v) => Err(bad(
            path,
            key,
            format!("expected an array, got {:?}", v.value_type()),
        )),
        None => Err(missing(path, key)),
    }
}

pub(super) fn build_tokenizer(path: &Path, md: &Meta) -> Result<GgufTokenizer, GgufError> {
    let model = meta_str(path, md, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(GgufError::UnsupportedTokenizer {
            path: path.to_path_buf(),
            model: model.to_string(),
        });
    }
    let tokens = string_array(path, md, "tokenizer.ggml.tokens")?;
    let merges = string_array(path, md, "tokenizer.ggml.merges")?;
    let token_types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
        Some(gguf_file::Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                gguf_file::Value::I32(x) => Ok(i64::from(*x)),
                gguf_file::Value::U32(x) => Ok(i64::from(*x)),
                other => Err(bad(
                    path,
                    "tokenizer.ggml.token_type",
                    format!("expected integers, got {:?}", other.value_type()),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(bad(
                path,
                "tokenizer.ggml.token_type",
                format!("expected an array, got {:?}", v.value_type()),
            ))
        }
        None => Vec::new(),
    };
    let tok_err = |detail: String| GgufError::Tokenizer {
        path: path.to_path_buf(),
        detail,
    };

    // The vocabulary, every token spelled in the byte-level alphabet. llama.cpp writes tokens in
    // that alphabet already; a token using any other character (an added token written as plain
    // UTF-8) is respelled byte by byte, as transformers does.
    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Vocab::default();
    for (id, t) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(t) {
            t.to_string()
        } else {
            t.bytes().map(|b| spelling[b as usize]).collect()
        };
        vocab.insert(spelled, id as u32);
    }
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    tok_err(format!(
                        "merge {m:?} is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<_, _>>()?;
    // tokenizers 0.23 panics (slice index) on a merge whose result is longer than every token
    // of the vocabulary, before its own "not in the vocabulary" check: check it here.
    if let Some((i, (a, b))) = merges
        .iter()
        .enumerate()
        .find(|(_, (a, b))| !vocab.contains_key(&format!("{a}{b}")))
    {
        return Err(tok_err(format!(
            "merge {i} ({a:?} + {b:?}) makes {:?}, which is not in tokenizer.ggml.tokens",
            format!("{a}{b}")
        )));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .build()
        .map_err(|e| tok_err(format!("BPE: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let pre_tokenizer: PreTokenizerWrapper = match pre_tokenizer_split(pre) {
        Some(regex) => {
            let split = Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err(format!("pre-tokenizer regex for {pre:?}: {e}")))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        // GPT-2's split, inside ByteLevel.
        None => ByteLevel::new(false, true, true).into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));

    // Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
    // tokens, so that they are matched whole. A control token outside the byte alphabet is a
    // llama.cpp mislabel and is skipped, as transformers does.
    let mut control = Vec::new();
    let mut user = Vec::new();
    for (t, ty) in tokens.iter().zip(token_types.iter()) {
        match ty {
            3 if in_alphabet(t) => {
                control.push(AddedToken::from(t.to_string(), true).normalized(false))
            }
            4 if vocab.contains_key(*t) => {
                user.push(AddedToken::from(t.to_string(), false).normalized(false))
            }
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(control)
        .map_err(|e| tok_err(format!("special tokens: {e}")))?;
    tokenizer
        .add_tokens(user)
        .map_err(|e| tok_err(format!("added tokens: {e}")))?;

    let token_of = |key: &str| -> Result<Option<(String, u32)>, GgufError> {
        match opt_usize(path, md, key)? {
            None => Ok(None),
            Some(id) => match tokens.get(id) {
                Some(t) => Ok(Some((t.to_string(), id as u32))),
                None => Err(bad(
                    path,
                    key,
                    format!(
                        "token id {id} is outside the vocabulary of {}",
                        tokens.len()
                    ),
                )),
            },
        }
    };
    let bos = token_of("tokenizer.ggml.bos_token_id")?;
    let eos = token_of("tokenizer.ggml.eos_token_id")?;
    // BOS / EOS are added only when the file asks (SmolLM2 says `add_bos_token = false`).
    let flag = |key: &str| matches!(md.get(key), Some(gguf_file::Value::Bool(true)));
    let add_bos = bos.clone().filter(|_| flag("tokenizer.ggml.add_bos_token"));
    let add_eos = eos.clone().filter(|_| flag("tokenizer.ggml.add_eos_token"));
    if add_bos.is_some() || add_eos.is_some() {
        let around = |seq: &str| {
            let mut parts = Vec::new();
            if let Some((t, _)) = &add_bos {
                parts.push(format!("{t}:{}", &seq[seq.len() - 1..]));
            }
            parts.push(seq.to_string());
            if let Some((t, _)) = &add_eos {
                parts.push(format!("{t}:{}", &seq[seq.len() - 1..]));
            }
            parts.join(" ")
        };
        let single = around("$A:0");
        let pair = format!("{single} {}", around("$B:1"));
        let special: Vec<(String, u32)> = add_bos.iter().chain(add_eos.iter()).cloned().collect();
        let post = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single(single)
            .map_err(|e| tok_err(format!("post-processor: {e}")))?
            .try_pair(pair)
            .map_err(|e| tok_err(format!("post-processor: {e}")))?
            .special_tokens(special)
            .build()
            .map_err(|e| tok_err(format!("post-processor: {e}")))?;
        tokenizer.with_post_processor(Some(post));
    }

    let chat_template = md
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    Ok(GgufTokenizer {
        tokenizer,
        chat_template,
        bos_token: bos.map(|b| b.0),
        eos_token: eos.map(|e| e.0),
    })
}
