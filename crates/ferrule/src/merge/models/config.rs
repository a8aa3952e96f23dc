//! mergekit's merge YAML (`mergekit/config.py`, mergekit 0.1.5), read strictly: a key
//! mergekit's pydantic models do not define is an error naming the key and the file
//! (pydantic ignores unknown keys, so a misspelt `densty` silently merges at the default).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

/// One scalar a parameter may take (`ScalarParameter` in mergekit).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Number(f64),
    Text(String),
}

/// A value or a gradient: a list interpolated across the layers of a slice.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ScalarOrGradient {
    Scalar(Scalar),
    Gradient(Vec<Scalar>),
}

/// `{filter, value}`: the value for tensors whose name contains `filter` (`*` or none: all).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditional {
    pub value: ScalarOrGradient,
    #[serde(default)]
    pub filter: Option<String>,
}

/// A parameter's setting (`ParameterSetting`): a scalar, a gradient, or filtered entries.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Setting {
    Scalar(Scalar),
    Gradient(Vec<Scalar>),
    Conditional(Conditional),
    Conditionals(Vec<Conditional>),
}

/// Parameters by name.
pub type Parameters = BTreeMap<String, Setting>;

/// `models[]` (`InputModelDefinition`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputModel {
    pub model: String,
    #[serde(default)]
    pub parameters: Option<Parameters>,
}

/// `slices[].sources[]` (`InputSliceDefinition`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSlice {
    pub model: String,
    pub layer_range: (usize, usize),
    #[serde(default)]
    pub parameters: Option<Parameters>,
}

/// `slices[]` (`OutputSliceDefinition`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSlice {
    pub sources: Vec<InputSlice>,
    #[serde(default)]
    pub base_model: Option<String>,
    #[serde(default)]
    pub residual_weight: Option<f64>,
    #[serde(default)]
    pub parameters: Option<Parameters>,
}

/// The whole file (`MergeConfiguration`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    pub merge_method: String,
    #[serde(default)]
    pub base_model: Option<String>,
    #[serde(default)]
    pub models: Option<Vec<InputModel>>,
    #[serde(default)]
    pub slices: Option<Vec<OutputSlice>>,
    /// Multi-module models (vision towers); not supported.
    #[serde(default)]
    pub modules: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub out_dtype: Option<String>,
    #[serde(default)]
    pub tokenizer_source: Option<String>,
    /// mergekit's `tokenizer:` block: the source, tokens to add or whose rows to set, padding.
    #[serde(default)]
    pub tokenizer: Option<TokenizerConfig>,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub parameters: Option<Parameters>,
}

/// mergekit's `tokenizer:` block (`mergekit/tokenizer/config.py: TokenizerConfig`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// `base`, `union` (mergekit's default) or a model.
    #[serde(default = "union_source")]
    pub source: String,
    /// Tokens added to the output vocabulary where it lacks them, and how their embedding and
    /// head rows are made, in the file's order (which sets the ids of added tokens).
    #[serde(default, deserialize_with = "ordered_tokens")]
    pub tokens: Vec<(String, TokenEmbedding)>,
    /// The vocabulary rows padded to a multiple of this, each padding row the mean of the rest.
    #[serde(default)]
    pub pad_to_multiple_of: Option<usize>,
}

fn union_source() -> String {
    "union".to_string()
}

/// `tokens.<token>` (`TokenEmbeddingConfig`): where the token's rows come from, and whether
/// they replace the rows of models that have the token (`force`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEmbedding {
    #[serde(default)]
    pub source: Option<EmbeddingSource>,
    #[serde(default)]
    pub force: bool,
}

/// A token's row source: a model (its row of that token), or `{kind: ...}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingSource {
    Model(String),
    Kind(EmbeddingKind),
}

/// `{kind: model_token, model, token_id | token}` (another token's row of a model) or
/// `{kind: zero}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EmbeddingKind {
    ModelToken {
        model: String,
        #[serde(default)]
        token_id: Option<u32>,
        #[serde(default)]
        token: Option<String>,
    },
    Zero,
}

/// A YAML map read into a list, keeping the file's order.
fn ordered_tokens<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<(String, TokenEmbedding)>, D::Error> {
    struct Ordered;
    impl<'de> serde::de::Visitor<'de> for Ordered {
        type Value = Vec<(String, TokenEmbedding)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of token to {source, force}")
        }
        fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = map.next_entry()? {
                out.push(entry);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Ordered)
}

impl TokenizerConfig {
    fn check(&self) -> Result<()> {
        if self.pad_to_multiple_of == Some(0) {
            bail!("tokenizer.pad_to_multiple_of: must be at least 1")
        }
        for (tok, e) in &self.tokens {
            if let Some(EmbeddingSource::Kind(EmbeddingKind::ModelToken {
                token_id, token, ..
            })) = &e.source
            {
                if token_id.is_some() == token.is_some() {
                    bail!("tokenizer.tokens.{tok:?}: a model_token source takes one of token_id or token")
                }
            }
        }
        Ok(())
    }
}

/// The floating types a merge reads into and writes (`dtype`, `out_dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    Bf16,
    F16,
}

impl OutDtype {
    /// mergekit's names (`mergekit/common.py: dtype_from_name`).
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim_start_matches("torch.") {
            "float32" | "float" | "fp32" => Some(Self::F32),
            "bfloat16" | "bf16" => Some(Self::Bf16),
            "float16" | "half" | "fp16" => Some(Self::F16),
            _ => None,
        }
    }

    /// The name `config.json` records.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }

    /// The safetensors dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::Bf16 => safetensors::Dtype::BF16,
            Self::F16 => safetensors::Dtype::F16,
        }
    }
}

impl MergeConfig {
    /// Where the output vocabulary comes from: `tokenizer_source`, else the `tokenizer:`
    /// block's `source`.
    pub fn vocabulary_source(&self) -> Option<&str> {
        self.tokenizer_source
            .as_deref()
            .or(self.tokenizer.as_ref().map(|t| t.source.as_str()))
    }

    /// Reads and checks `path`: unknown keys, the exclusive `models`/`slices`, dtypes.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading merge config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("merge config {}", path.display()))
    }

    /// Parses YAML text (see [`MergeConfig::read`]).
    pub fn parse(text: &str) -> Result<Self> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." {
                anyhow!("{inner}")
            } else {
                anyhow!("at {path}: {inner}")
            }
        })?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        if self.modules.is_some() {
            bail!("`modules` (multi-module architectures) is not supported by ferrule; use `models` or `slices`")
        }
        if let Some(t) = &self.tokenizer {
            if self.tokenizer_source.is_some() {
                bail!("`tokenizer_source` and the `tokenizer` block are both given; give one (mergekit refuses both too)")
            }
            t.check()?;
        }
        match (&self.models, &self.slices) {
            (Some(m), None) if !m.is_empty() => {}
            (None, Some(s)) if !s.is_empty() => {}
            _ => bail!("exactly one of `models` or `slices` must be given (and not empty)"),
        }
        for (key, value) in [("dtype", &self.dtype), ("out_dtype", &self.out_dtype)] {
            if let Some(v) = value {
                if OutDtype::parse(v).is_none() {
                    bail!("{key}: {v:?} is not one of float32, bfloat16, float16")
                }
            }
        }
        if let Some(slices) = &self.slices {
            for (i, s) in slices.iter().enumerate() {
                if s.sources.is_empty() {
                    bail!("slices[{i}]: no sources")
                }
                if s.residual_weight.is_some() {
                    bail!("slices[{i}].residual_weight is not supported by ferrule")
                }
                for (j, src) in s.sources.iter().enumerate() {
                    let (a, b) = src.layer_range;
                    if a >= b {
                        bail!("slices[{i}].sources[{j}].layer_range: [{a}, {b}] is empty")
                    }
                }
                let len = |src: &InputSlice| src.layer_range.1 - src.layer_range.0;
                if s.sources.iter().any(|src| len(src) != len(&s.sources[0])) {
                    bail!("slices[{i}]: all sources of a slice must span the same number of layers")
                }
            }
        }
        Ok(())
    }

    /// The dtype the output is written in: `out_dtype`, else `dtype`, else `None` (the
    /// inputs' own).
    pub fn output_dtype(&self) -> Option<OutDtype> {
        self.out_dtype
            .as_deref()
            .or(self.dtype.as_deref())
            .and_then(OutDtype::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mergekits_shapes_of_settings() {
        let c = MergeConfig::parse(
            "merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n      weight: [0.1, 0.5]\n      density: 0.5\n  - model: c\n    parameters:\n      weight:\n        - filter: mlp\n          value: 2\n        - value: 1\nparameters:\n  normalize: false\ndtype: bfloat16\n",
        )
        .unwrap();
        let m = c.models.as_ref().unwrap();
        assert!(matches!(
            m[0].parameters.as_ref().unwrap()["weight"],
            Setting::Gradient(_)
        ));
        assert!(matches!(
            m[1].parameters.as_ref().unwrap()["weight"],
            Setting::Conditionals(_)
        ));
        assert_eq!(c.output_dtype(), Some(OutDtype::Bf16));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err =
            MergeConfig::parse("merge_method: ties\nmodels:\n  - model: a\n    paramters: {}\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("models[0]") && err.contains("paramters"),
            "{err}"
        );
        let err = MergeConfig::parse("merge_method: ties\nmodel: a\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `model`"), "{err}");
        let err = MergeConfig::parse("merge_method: ties\nmodels: [{model: a}]\ndtype: float8\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("dtype") && err.contains("float8"), "{err}");
    }
}
