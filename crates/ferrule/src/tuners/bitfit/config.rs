//! BitFit's settings: which of the model's existing bias terms train (`bias_terms`), with the
//! reference's names (benzakenelad/BitFit `glue_evaluator.py`, `BIAS_TERMS_DICT`).
//!
//! BitFit is not a PEFT method: its `peft_type` (`"BITFIT"`) is ferrule's own, and peft
//! refuses such an adapter by name (docs/PARITY.md, "BitFit").

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tuners::flags::{names, text, FlagValue, OptionFlag};

/// One `bias_terms` entry: a kind of bias in every layer. The paper's notation (Ben Zaken et
/// al. 2022, §2, eqs. 1–5) in brackets; the Hugging Face module each is the bias of, BERT |
/// Llama-shaped decoder (Qwen2 has only the first three).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BiasTerm {
    /// `b_q`: `attention.self.query` | `self_attn.q_proj`.
    Query,
    /// `b_k`: `attention.self.key` | `self_attn.k_proj`.
    Key,
    /// `b_v`: `attention.self.value` | `self_attn.v_proj`.
    Value,
    /// `b_m1`: `attention.output.dense` | `self_attn.o_proj`.
    AttentionOutput,
    /// `b_m2`: `intermediate.dense` | `mlp.gate_proj`, `mlp.up_proj`.
    Intermediate,
    /// `b_m3`: the feed-forward `output.dense` | `mlp.down_proj`.
    Output,
    /// `b_LN1`: `attention.output.LayerNorm`.
    AttentionLayerNorm,
    /// `b_LN2`: the feed-forward `output.LayerNorm`.
    OutputLayerNorm,
    /// Every bias the model has: the above, the embeddings' LayerNorm, the pooler, heads.
    All,
}

/// Every term with its `bias_terms` name, in the order errors list them.
pub const TERMS: &[(&str, BiasTerm)] = &[
    ("query", BiasTerm::Query),
    ("key", BiasTerm::Key),
    ("value", BiasTerm::Value),
    ("attention_output", BiasTerm::AttentionOutput),
    ("intermediate", BiasTerm::Intermediate),
    ("output", BiasTerm::Output),
    ("attention_layernorm", BiasTerm::AttentionLayerNorm),
    ("output_layernorm", BiasTerm::OutputLayerNorm),
    ("all", BiasTerm::All),
];

impl BiasTerm {
    /// The term named `name` (a `bias_terms` entry); an unknown name is an error naming it and
    /// the valid ones.
    pub fn parse(name: &str) -> Result<Self> {
        match TERMS.iter().find(|(n, _)| *n == name) {
            Some((_, t)) => Ok(*t),
            None => bail!(
                "bitfit: unknown bias term {name:?} in bias_terms (--bias-terms); the terms are: {}",
                TERMS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// Its `bias_terms` name.
    pub fn name(self) -> &'static str {
        TERMS
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("?", |(n, _)| n)
    }
}

fn all_terms() -> Vec<String> {
    vec!["all".into()]
}

/// A BitFit adapter's configuration, as its `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BitFitConfig {
    /// Which biases train ([`TERMS`]); default `["all"]`, every bias (the paper's BitFit).
    #[serde(default = "all_terms")]
    pub bias_terms: Vec<String>,
    /// Layers trained in full beside the biases (a classification head; the reference trains
    /// `classifier` in full).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// Keys of a BITFIT `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &["bias_terms", "modules_to_save"];

impl BitFitConfig {
    /// The terms `bias_terms` names, each once, sorted; an empty list or an unknown name is an
    /// error naming the valid terms.
    pub fn terms(&self) -> Result<Vec<BiasTerm>> {
        if self.bias_terms.is_empty() {
            bail!(
                "bitfit: bias_terms (--bias-terms) is empty; name at least one of: {}",
                TERMS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )
        }
        let mut terms = self
            .bias_terms
            .iter()
            .map(|n| BiasTerm::parse(n.trim()))
            .collect::<Result<Vec<_>>>()?;
        terms.sort();
        terms.dedup();
        Ok(terms)
    }
}

/// `--bias-terms query,value`.
pub static FLAGS: &[OptionFlag] = &[OptionFlag {
    name: "bias-terms",
    value: FlagValue::Text,
    value_name: Some("TERMS"),
    help: "BitFit: comma-separated bias terms to train: query, key, value, attention_output, intermediate, output, attention_layernorm, output_layernorm, or all (default). The pooler's bias trains with any of them, as in the reference.",
    keys: |v| vec![("bias_terms", Value::from(names(text(&v))))],
}];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_parse_and_bad_ones_name_the_valid_ones() {
        let cfg = |t: &[&str]| BitFitConfig {
            bias_terms: t.iter().map(|s| s.to_string()).collect(),
            modules_to_save: None,
        };
        assert_eq!(
            cfg(&["value", "query", "value"]).terms().unwrap(),
            vec![BiasTerm::Query, BiasTerm::Value]
        );
        let e = cfg(&["query", "bias"]).terms().unwrap_err().to_string();
        assert!(
            e.contains("unknown bias term \"bias\"")
                && e.contains("query, key, value, attention_output"),
            "{e}"
        );
        let e = cfg(&[]).terms().unwrap_err().to_string();
        assert!(e.contains("bias_terms (--bias-terms) is empty"), "{e}");
        assert_eq!(BiasTerm::OutputLayerNorm.name(), "output_layernorm");
    }
}
