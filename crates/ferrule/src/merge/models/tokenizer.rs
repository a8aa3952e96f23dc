//! `tokenizer_source`: the embedding and head rows of every input remapped to one vocabulary,
//! by token string, before they are merged (`mergekit/tokenizer/embed.py`).
//!
//! For the output vocabulary (the base's, or a named model's), each input's row of a token is
//! its own when it has the token; otherwise the default mergekit gives it: the row of the only
//! model that has it, else the base's, else the mean of the models that have it, else zeros.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

/// Token string → id, of one tokenizer.
pub type Vocab = HashMap<String, u32>;

/// Reads `tokenizer.json` in `dir` (added tokens included).
pub fn read_vocab(dir: &std::path::Path, model: &str) -> Result<Vocab> {
    let path = dir.join("tokenizer.json");
    let tok = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        .with_context(|| format!("tokenizer_source needs the tokenizer of model {model}"))?;
    Ok(tok.get_vocab(true))
}

/// How each input's vocabulary rows map onto the output vocabulary.
#[derive(Debug)]
pub struct Permutation {
    /// Output vocabulary size.
    pub size: usize,
    /// Per input, per output id: the input's row, if it has the token.
    pub rows: Vec<Vec<Option<u32>>>,
    /// Index of the base among the inputs.
    pub base: Option<usize>,
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
        Ok(Self { size, rows, base })
    }

    /// `tables[i]` (rows × `width`, input `i`'s) remapped to the output vocabulary.
    pub fn apply(&self, tables: &[Vec<f32>], width: usize) -> Vec<Vec<f32>> {
        let default_row = |id: usize| -> Vec<f32> {
            let have: Vec<usize> = (0..tables.len())
                .filter(|&i| self.rows[i][id].is_some())
                .collect();
            let row = |i: usize| {
                let r = self.rows[i][id].expect("present") as usize;
                &tables[i][r * width..(r + 1) * width]
            };
            match (have.len(), self.base) {
                (0, _) => vec![0.0; width],
                (1, _) => row(have[0]).to_vec(),
                (_, Some(b)) if have.contains(&b) => row(b).to_vec(),
                _ => {
                    let mut sum = vec![0f32; width];
                    for &i in &have {
                        sum.iter_mut().zip(row(i)).for_each(|(s, x)| *s += x);
                    }
                    sum.iter_mut().for_each(|s| *s /= have.len() as f32);
                    sum
                }
            }
        };
        let mut defaults: HashMap<usize, Vec<f32>> = HashMap::new();
        (0..tables.len())
            .map(|i| {
                let mut out = vec![0f32; self.size * width];
                for id in 0..self.size {
                    let dst = &mut out[id * width..(id + 1) * width];
                    match self.rows[i][id] {
                        Some(r) => {
                            let r = r as usize;
                            dst.copy_from_slice(&tables[i][r * width..(r + 1) * width])
                        }
                        None => dst
                            .copy_from_slice(defaults.entry(id).or_insert_with(|| default_row(id))),
                    }
                }
                out
            })
            .collect()
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
        let out = p.apply(&tables, 1);
        assert_eq!(out[0], vec![1., 2., 3.]);
        // "c" is missing from the other model: the base's row.
        assert_eq!(out[1], vec![10., 20., 3.]);
    }
}
