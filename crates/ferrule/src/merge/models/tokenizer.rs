//! `tokenizer_source`: the embedding and head rows of every input remapped to one vocabulary,
//! by token string, before they are merged (`mergekit/tokenizer/embed.py`), and the output
//! vocabulary itself: the base's, a named model's, or the union of all the models'
//! (`mergekit/tokenizer/build.py`).
//!
//! For the output vocabulary, each input's row of a token is its own when it has the token;
//! otherwise the default mergekit gives it: the row of the only model that has it, else the
//! base's, else the mean of the models that have it, else zeros.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::{AddedToken, Tokenizer};

use super::config::{EmbeddingKind, EmbeddingSource, TokenEmbedding};
use super::inputs::InputModel;

/// Token string → id, of one tokenizer.
pub type Vocab = HashMap<String, u32>;

/// Reads `tokenizer.json` in `dir`; the error names the file and the model.
pub fn read_tokenizer(dir: &Path, model: &str) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    Tokenizer::from_file(&path)
        .map_err(|e| anyhow!("{}: {e}", path.display()))
        .with_context(|| format!("tokenizer_source needs the tokenizer of model {model}"))
}

/// The output vocabulary `tokenizer_source` asks for.
pub struct OutputVocabulary {
    pub vocab: Vocab,
    /// The tokenizer the output gets when it is not a model's as is (the union, or tokens
    /// added by the `tokenizer:` block); else the source model's files are copied.
    pub tokenizer: Option<Tokenizer>,
}

/// The output vocabulary of `source` (`base`, `union` or a model's name), if set, with `add`
/// (the `tokenizer:` block's tokens) appended as plain added tokens where it lacks them, as
/// mergekit's `build_tokenizer` does. `referenced` lists the models in the YAML's order, the
/// base first.
pub fn output_vocabulary(
    source: Option<&str>,
    add: &[String],
    base_model: Option<&str>,
    referenced: &[String],
    models: &BTreeMap<String, InputModel>,
) -> Result<Option<OutputVocabulary>> {
    let model = |name: &str| {
        models
            .get(name)
            .with_context(|| format!("tokenizer_source: {name} is not one of the merged models"))
    };
    let (mut tok, mut changed) = match source {
        None => return Ok(None),
        Some("union") => {
            // mergekit takes the base, else the first model (of a Python set).
            let base = base_model
                .or(referenced.first().map(String::as_str))
                .context("tokenizer_source: union without models")?;
            let mut each = vec![strip_unused(ModelTokenizer::of(model(base)?)?)?];
            for name in referenced.iter().filter(|n| *n != base) {
                each.push(ModelTokenizer::of(model(name)?)?);
            }
            (union(&each)?, true)
        }
        Some("base") => {
            let base = base_model.context("tokenizer_source: base needs base_model")?;
            (model(base)?.tokenizer()?, false)
        }
        Some(name) => (model(name)?.tokenizer()?, false),
    };
    for t in add {
        if tok.token_to_id(t).is_none() {
            tok.add_tokens([AddedToken::from(t.clone(), false)])
                .map_err(|e| anyhow!("tokenizer.tokens: adding {t:?}: {e}"))?;
            changed = true;
        }
    }
    Ok(Some(OutputVocabulary {
        vocab: tok.get_vocab(true),
        tokenizer: changed.then_some(tok),
    }))
}

/// One model's tokenizer as the union reads it.
pub struct ModelTokenizer {
    /// As the YAML names the model.
    pub model: String,
    pub tokenizer: Tokenizer,
    /// The rows its embedding has (`vocab_size` in its config): tokens past it are unused.
    pub vocab_size: Option<usize>,
}

impl ModelTokenizer {
    /// The tokenizer and `vocab_size` of `m`.
    pub fn of(m: &InputModel) -> Result<Self> {
        Ok(Self {
            model: m.spec.clone(),
            tokenizer: m.tokenizer()?,
            vocab_size: m.vocab_size(),
        })
    }
}

/// `tok` without the tokens whose id is `vocab_size` or more, which the model has no rows for
/// (mergekit's `get_stripped_tokenizer`, applied to the base). As in mergekit, only a BPE
/// tokenizer can be stripped.
pub fn strip_unused(mt: ModelTokenizer) -> Result<ModelTokenizer> {
    let Some(size) = mt.vocab_size else {
        return Ok(mt);
    };
    let unused: HashSet<String> = mt
        .tokenizer
        .get_vocab(true)
        .into_iter()
        .filter(|(_, id)| *id as usize >= size)
        .map(|(t, _)| t)
        .collect();
    if unused.is_empty() {
        return Ok(mt);
    }
    let text = mt.tokenizer.to_string(false).map_err(|e| anyhow!("{e}"))?;
    let mut json: serde_json::Value = serde_json::from_str(&text)?;
    let kind = json["model"]["type"].as_str().unwrap_or("?").to_string();
    if kind != "BPE" {
        bail!(
            "model {}: its tokenizer has {} tokens past vocab_size {size}, and only a BPE tokenizer can be stripped of them for tokenizer_source: union (it is {kind})",
            mt.model,
            unused.len()
        )
    }
    if let Some(added) = json["added_tokens"].as_array_mut() {
        added.retain(|t| t["id"].as_u64().is_some_and(|id| (id as usize) < size));
    }
    if let Some(vocab) = json["model"]["vocab"].as_object_mut() {
        vocab.retain(|t, _| !unused.contains(t));
    }
    if let Some(merges) = json["model"]["merges"].as_array_mut() {
        merges.retain(|m| match m {
            serde_json::Value::String(s) => s.split(' ').all(|t| !unused.contains(t)),
            serde_json::Value::Array(a) => a
                .iter()
                .all(|t| t.as_str().is_none_or(|t| !unused.contains(t))),
            _ => true,
        });
    }
    let tokenizer = json
        .to_string()
        .parse::<Tokenizer>()
        .map_err(|e| anyhow!("model {}: stripping its tokenizer: {e}", mt.model))?;
    Ok(ModelTokenizer { tokenizer, ..mt })
}

/// The union of the models' vocabularies (mergekit's `build_union_tokenizer`): the base's
/// tokenizer (`models[0]`, already [`strip_unused`]), then every other token of any model
/// that the base lacks, as a plain added token, then every model's added tokens, each with
/// the settings of the first model that has it. Tokens past a model's `vocab_size` are
/// skipped.
///
/// Where ferrule differs: mergekit walks the models in Python `set` order and each vocabulary
/// in Rust `HashMap` order, so when several new tokens come from several models their ids
/// change from run to run. ferrule walks the models in the YAML's order (base first) and each
/// vocabulary by id, and so gives the one of mergekit's orders that follows the YAML.
pub fn union(models: &[ModelTokenizer]) -> Result<Tokenizer> {
    let base = models
        .first()
        .context("tokenizer_source: union without models")?;
    let mut new_tokens: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut added: Vec<AddedToken> = Vec::new();
    for m in models {
        let size = m
            .vocab_size
            .unwrap_or_else(|| m.tokenizer.get_vocab_size(false));
        let mut vocab: Vec<(String, u32)> = m.tokenizer.get_vocab(true).into_iter().collect();
        vocab.sort_by_key(|(_, id)| *id);
        for (tok, id) in vocab {
            if (id as usize) < size && seen.insert(tok.clone()) {
                new_tokens.push(tok);
            }
        }
        let mut decoder: Vec<(u32, AddedToken)> =
            m.tokenizer.get_added_tokens_decoder().into_iter().collect();
        decoder.sort_by_key(|(id, _)| *id);
        for (id, info) in decoder {
            if (id as usize) >= size {
                continue;
            }
            match added.iter().find(|a| a.content == info.content) {
                Some(first) if *first != info => tracing::warn!(
                    "token {:?} is added with different settings by model {}; the first model's are kept",
                    info.content,
                    m.model
                ),
                Some(_) => {}
                None => added.push(info),
            }
        }
    }
    let mut out = base.tokenizer.clone();
    let base_vocab = base.tokenizer.get_vocab(true);
    let is_added: HashSet<&str> = added.iter().map(|a| a.content.as_str()).collect();
    for tok in &new_tokens {
        if !is_added.contains(tok.as_str()) && !base_vocab.contains_key(tok) {
            out.add_tokens([AddedToken::from(tok.clone(), false)])
                .map_err(|e| anyhow!("adding token {tok:?} to the union: {e}"))?;
        }
    }
    for info in added {
        let content = info.content.clone();
        out.add_tokens([info])
            .map_err(|e| anyhow!("adding token {content:?} to the union: {e}"))?;
    }
    Ok(out)
}

/// Writes `tok` as `dir/tokenizer.json` over the copied one, and adds its new added tokens to
/// `added_tokens_decoder` in `dir/tokenizer_config.json` where that file lists them (as
/// transformers 4 saves it; transformers 5 keeps them in `tokenizer.json` only).
pub fn write_tokenizer(tok: &Tokenizer, dir: &Path) -> Result<()> {
    let path = dir.join("tokenizer.json");
    tok.save(&path, true)
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    let cfg_path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&cfg_path) else {
        return Ok(());
    };
    let mut cfg: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
    let Some(listed) = cfg
        .get_mut("added_tokens_decoder")
        .and_then(|v| v.as_object_mut())
    else {
        return Ok(());
    };
    let mut decoder: Vec<(u32, AddedToken)> = tok.get_added_tokens_decoder().into_iter().collect();
    decoder.sort_by_key(|(id, _)| *id);
    for (id, t) in decoder {
        listed.entry(id.to_string()).or_insert_with(|| {
            serde_json::json!({
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            })
        });
    }
    crate::util::atomic::write_bytes_atomic(
        &cfg_path,
        (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes(),
    )
    .with_context(|| format!("writing {}", cfg_path.display()))
}

/// Where a token's default row comes from, as the `tokenizer:` block's `tokens` set it.
#[derive(Clone, Debug, PartialEq)]
pub enum RowSource {
    /// No source given: an error if a row is needed (mergekit raises `NotImplementedError`).
    Unset,
    Zero,
    /// Input `input`'s own row of the token (a model's name as the source).
    Token {
        input: usize,
    },
    /// Row `row` of input `input`'s table (`kind: model_token`).
    Row {
        input: usize,
        row: u32,
    },
}

/// A `tokens` entry resolved against one table's inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRule {
    pub token: String,
    pub source: RowSource,
    /// The default row replaces the rows of models that have the token too.
    pub force: bool,
}

/// Resolves the `tokenizer:` block's `tokens` for a table whose inputs are `(model, its
/// vocabulary, its rows)`: the model a source names must be one of them.
pub fn resolve_rules(
    tokens: &[(String, TokenEmbedding)],
    target: &Vocab,
    inputs: &[(&str, &Vocab, usize)],
    table: &str,
) -> Result<HashMap<usize, TokenRule>> {
    let input_of = |tok: &str, model: &str| {
        inputs
            .iter()
            .position(|(m, _, _)| *m == model)
            .with_context(|| {
                format!("tokenizer.tokens.{tok:?}: model {model} is not an input of {table}")
            })
    };
    let mut rules = HashMap::new();
    for (tok, cfg) in tokens {
        let id = *target
            .get(tok)
            .with_context(|| format!("tokenizer.tokens.{tok:?}: not in the output vocabulary"))?;
        let source = match &cfg.source {
            None => RowSource::Unset,
            Some(EmbeddingSource::Kind(EmbeddingKind::Zero)) => RowSource::Zero,
            Some(EmbeddingSource::Model(m)) => RowSource::Token {
                input: input_of(tok, m)?,
            },
            Some(EmbeddingSource::Kind(EmbeddingKind::ModelToken {
                model,
                token_id,
                token,
            })) => {
                let input = input_of(tok, model)?;
                let (_, vocab, rows) = inputs[input];
                let row = match (token_id, token) {
                    (Some(id), _) => *id,
                    (None, Some(t)) => *vocab.get(t).with_context(|| {
                        format!("tokenizer.tokens.{tok:?}: model {model} has no token {t:?}")
                    })?,
                    (None, None) => bail!("tokenizer.tokens.{tok:?}: token_id or token needed"),
                };
                if row as usize >= rows {
                    bail!("tokenizer.tokens.{tok:?}: token id {row} is past the {rows} rows of {table} in model {model}")
                }
                RowSource::Row { input, row }
            }
        };
        let rule = TokenRule {
            token: tok.clone(),
            source,
            force: cfg.force,
        };
        rules.insert(id as usize, rule);
    }
    Ok(rules)
}

/// How each input's vocabulary rows map onto the output vocabulary.
#[derive(Debug)]
pub struct Permutation {
    /// Output rows: the vocabulary, padded (`pad_to_multiple_of`).
    pub size: usize,
    /// Output vocabulary size (the rows past it are padding).
    pub vocab: usize,
    /// Per input, per output id: the input's row, if it has the token.
    pub rows: Vec<Vec<Option<u32>>>,
    /// Index of the base among the inputs.
    pub base: Option<usize>,
    /// The `tokenizer:` block's `tokens`, by output id.
    pub rules: HashMap<usize, TokenRule>,
}

impl Permutation {
    /// Maps `inputs` (each vocabulary with the number of rows its tables have) onto `target`.
    pub fn new(target: &Vocab, inputs: &[(Vocab, usize)], base: Option<usize>) -> Result<Self> {
        let size = target.len();
        let mut by_id: Vec<Option<&str>> = vec![None; size];
        for (tok, &id) in target {
            match by_id.get_mut(id as usize) {
                Some(slot) => *slot = Some(tok),
                None => bail!("tokenizer ids are not contiguous: {tok:?} has id {id} of {size}"),
            }
        }
        let rows = inputs
            .iter()
            .map(|(vocab, n_rows)| {
                by_id
                    .iter()
                    .map(|tok| {
                        tok.and_then(|t| vocab.get(t).copied())
                            .filter(|id| (*id as usize) < *n_rows)
                    })
                    .collect()
            })
            .collect();
        Ok(Self {
            size,
            vocab: size,
            rows,
            base,
            rules: HashMap::new(),
        })
    }

    /// With the `tokenizer:` block's `tokens` and its `pad_to_multiple_of`.
    pub fn with_block(mut self, rules: HashMap<usize, TokenRule>, pad_to: usize) -> Self {
        self.rules = rules;
        self.size = self.vocab.div_ceil(pad_to.max(1)) * pad_to.max(1);
        self
    }

    /// The row every input lacking token `id` gets, as mergekit's `assign_embedding_sources`
    /// chooses it: the row of the only model that has it, else the base's, else the mean of
    /// those that have it, else zeros; or what the token's rule says.
    fn default_row(&self, tables: &[Vec<f32>], width: usize, id: usize) -> Result<Vec<f32>> {
        let row = |i: usize, r: usize| &tables[i][r * width..(r + 1) * width];
        let own = |i: usize| self.rows[i][id].map(|r| row(i, r as usize));
        if let Some(rule) = self.rules.get(&id) {
            return match rule.source {
                RowSource::Unset => bail!(
                    "tokenizer.tokens.{:?}: a model lacks the token (or force is set) and no source is given",
                    rule.token
                ),
                RowSource::Zero => Ok(vec![0.0; width]),
                RowSource::Token { input } => own(input).map(<[f32]>::to_vec).with_context(|| {
                    format!("tokenizer.tokens.{:?}: its source model lacks the token", rule.token)
                }),
                RowSource::Row { input, row: r } => Ok(row(input, r as usize).to_vec()),
            };
        }
        let have: Vec<usize> = (0..tables.len()).filter(|&i| own(i).is_some()).collect();
        Ok(match (have.len(), self.base) {
            (0, _) => vec![0.0; width],
            (1, _) => own(have[0]).expect("present").to_vec(),
            (_, Some(b)) if have.contains(&b) => own(b).expect("present").to_vec(),
            _ => {
                let mut sum = vec![0f32; width];
                for &i in &have {
                    let r = own(i).expect("present");
                    sum.iter_mut().zip(r).for_each(|(s, x)| *s += x);
                }
                sum.iter_mut().for_each(|s| *s /= have.len() as f32);
                sum
            }
        })
    }

    /// `tables[i]` (rows × `width`, input `i`'s) remapped to the output vocabulary, padding
    /// rows each the mean of that input's vocabulary rows (mergekit's `PermutedVocabulary`).
    pub fn apply(&self, tables: &[Vec<f32>], width: usize) -> Result<Vec<Vec<f32>>> {
        let mut defaults: HashMap<usize, Vec<f32>> = HashMap::new();
        for id in 0..self.vocab {
            let force = self.rules.get(&id).is_some_and(|r| r.force);
            if force || self.rows.iter().any(|r| r[id].is_none()) {
                defaults.insert(id, self.default_row(tables, width, id)?);
            }
        }
        let remapped = (0..tables.len())
            .map(|i| {
                let mut out = vec![0f32; self.size * width];
                for id in 0..self.vocab {
                    let force = self.rules.get(&id).is_some_and(|r| r.force);
                    let dst = &mut out[id * width..(id + 1) * width];
                    match (self.rows[i][id], defaults.get(&id)) {
                        (Some(r), _) if !force => {
                            let r = r as usize;
                            dst.copy_from_slice(&tables[i][r * width..(r + 1) * width])
                        }
                        (_, Some(d)) => dst.copy_from_slice(d),
                        _ => {}
                    }
                }
                if self.size > self.vocab {
                    // As suggested in mergekit: padding rows are the mean embedding.
                    let mut mean = vec![0f64; width];
                    for r in out[..self.vocab * width].chunks_exact(width) {
                        mean.iter_mut().zip(r).for_each(|(m, x)| *m += *x as f64);
                    }
                    let n = self.vocab as f64;
                    for r in out[self.vocab * width..].chunks_exact_mut(width) {
                        r.iter_mut()
                            .zip(&mean)
                            .for_each(|(x, m)| *x = (m / n) as f32);
                    }
                }
                out
            })
            .collect();
        Ok(remapped)
    }
}

/// Whether a tensor's first axis is the vocabulary (mergekit's `vocabulary_axis: 0`).
pub fn is_vocabulary_table(name: &str) -> bool {
    name.ends_with("embed_tokens.weight") || name == "lm_head.weight"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str]) -> Vocab {
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect()
    }

    #[test]
    fn rows_follow_the_token_and_missing_ones_take_mergekits_default() {
        let target = vocab(&["a", "b", "c"]);
        let base = vocab(&["a", "b", "c"]);
        // Reordered, and without "c".
        let other = vocab(&["b", "a"]);
        let p = Permutation::new(&target, &[(base, 3), (other, 2)], Some(0)).unwrap();
        let tables = vec![vec![1., 2., 3.], vec![20., 10.]];
        let out = p.apply(&tables, 1).unwrap();
        assert_eq!(out[0], vec![1., 2., 3.]);
        // "c" is missing from the other model: the base's row.
        assert_eq!(out[1], vec![10., 20., 3.]);
    }

    #[test]
    fn rules_force_zero_and_pad_as_the_tokenizer_block_says() {
        let target = vocab(&["a", "b", "c"]);
        let p = Permutation::new(
            &target,
            &[(vocab(&["a", "b", "c"]), 3), (vocab(&["a", "b"]), 2)],
            Some(0),
        )
        .unwrap();
        let rule = |token: &str, source, force| TokenRule {
            token: token.into(),
            source,
            force,
        };
        let rules = HashMap::from([
            // "a" forced to input 1's row 1 (its "b") for both inputs.
            (0, rule("a", RowSource::Row { input: 1, row: 1 }, true)),
            // "c", which input 1 lacks: zeros for it, its own row for input 0.
            (2, rule("c", RowSource::Zero, false)),
        ]);
        let p = p.with_block(rules, 4);
        assert_eq!(p.size, 4);
        let tables = vec![vec![1., 2., 3.], vec![10., 20.]];
        let out = p.apply(&tables, 1).unwrap();
        // The padding row is the mean of each input's remapped rows.
        assert_eq!(out[0], vec![20., 2., 3., 25. / 3.]);
        assert_eq!(out[1], vec![20., 20., 0., 40. / 3.]);
        // A needed row without a source is an error naming the token.
        let p = Permutation::new(&target, &[(vocab(&["a", "b"]), 2)], None)
            .unwrap()
            .with_block(HashMap::from([(2, rule("c", RowSource::Unset, false))]), 1);
        let e = p.apply(&[vec![1., 2.]], 1).unwrap_err().to_string();
        assert!(e.contains("\"c\"") && e.contains("no source"), "{e}");
    }

    /// A word-level tokenizer over `words`, then `added` as added tokens (content, special).
    fn word_level(words: &[&str], added: &[(&str, bool)]) -> Tokenizer {
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": words[0]}
        });
        let mut tok: Tokenizer = json.to_string().parse().unwrap();
        for (content, special) in added {
            tok.add_tokens([AddedToken::from(*content, *special)])
                .unwrap();
        }
        tok
    }

    #[test]
    fn union_adds_other_words_then_added_tokens_skipping_unused_ones() {
        let m = |model: &str, tokenizer, vocab_size| ModelTokenizer {
            model: model.into(),
            tokenizer,
            vocab_size,
        };
        let base = m("base", word_level(&["<unk>", "a", "b"], &[]), Some(3));
        // "z" lies past vocab_size 4 (its row is not in the model): skipped.
        let one = m(
            "one",
            word_level(&["<unk>", "b", "c"], &[("<t>", true), ("z", false)]),
            Some(4),
        );
        let two = m("two", word_level(&["<unk>", "d"], &[("<t>", true)]), None);
        let out = union(&[base, one, two]).unwrap();
        let ids: Vec<Option<u32>> = ["a", "c", "d", "<t>", "z"]
            .iter()
            .map(|t| out.token_to_id(t))
            .collect();
        assert_eq!(ids, [Some(1), Some(3), Some(4), Some(5), None]);
        let decoder = out.get_added_tokens_decoder();
        assert!(decoder[&5].special && !decoder[&3].special && decoder[&3].normalized);
    }

    #[test]
    fn only_a_bpe_tokenizer_is_stripped() {
        let mt = ModelTokenizer {
            model: "m".into(),
            tokenizer: word_level(&["<unk>", "a", "b"], &[]),
            vocab_size: Some(2),
        };
        let e = strip_unused(mt).err().expect("an error").to_string();
        assert!(e.contains("model m") && e.contains("only a BPE"), "{e}");
    }
}
