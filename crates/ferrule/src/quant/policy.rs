//! What to quantize, and how: `--quantize nf4 [--double-quant] [--quant-blocksize N]`.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::{blockwise4, check_finite, Blockwise4, Code4, Int8Rows, QuantMatrix};

/// A quantization method for frozen linear weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantMethod {
    Nf4,
    Fp4,
    Int8,
}

impl std::str::FromStr for QuantMethod {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(Self::Nf4),
            "fp4" => Ok(Self::Fp4),
            "int8" => Ok(Self::Int8),
            _ => bail!("unknown quantization {s:?}: expected nf4, fp4 or int8"),
        }
    }
}

/// How the linear layers of a base model are quantized when it is loaded.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantSpec {
    pub method: QuantMethod,
    /// 4-bit blocksize (bitsandbytes' default 64).
    #[serde(default = "default_blocksize")]
    pub blocksize: usize,
    /// Quantize the 4-bit absmax statistics too (QLoRA's double quantization).
    #[serde(default)]
    pub double_quant: bool,
}

/// The values int8 quantizes: bitsandbytes' `Int8Params` quantizes the f16 copy of the
/// weight.
pub(crate) fn int8_input(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect()
}

fn default_blocksize() -> usize {
    64
}

/// Module names that stay unquantized, as transformers' bitsandbytes integration skips the
/// output head (`llm_int8_skip_modules` defaults to it).
pub const SKIPPED_HEADS: [&str; 3] = ["lm_head", "classifier", "score"];

impl QuantSpec {
    pub fn new(method: QuantMethod, blocksize: usize, double_quant: bool) -> Result<Self> {
        let s = Self {
            method,
            blocksize,
            double_quant,
        };
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<()> {
        match self.method {
            QuantMethod::Nf4 | QuantMethod::Fp4 => blockwise4::check_blocksize(self.blocksize),
            QuantMethod::Int8 if self.double_quant => {
                bail!("double quantization applies to nf4/fp4, not int8")
            }
            QuantMethod::Int8 => Ok(()),
        }
    }

    /// Whether the checkpoint tensor `name` of `shape` is a linear weight this spec quantizes:
    /// 2-D `*.weight` tensors other than embeddings and the output head.
    pub fn wants(&self, name: &str, shape: &[usize]) -> bool {
        let Some(module) = name.strip_suffix(".weight") else {
            return false;
        };
        let leaf = module.rsplit('.').next().unwrap_or(module);
        shape.len() == 2
            && !module.contains("embed")
            && !SKIPPED_HEADS.contains(&leaf)
            && !SKIPPED_HEADS.contains(&module)
    }

    /// Whether `name` is a frozen table this spec stores in bf16 rather than f32: a decoder's
    /// token embedding and output head, which bitsandbytes leaves unquantized and QLoRA keeps in
    /// its 16-bit compute dtype.
    pub fn keeps_bf16(name: &str, shape: &[usize]) -> bool {
        shape.len() == 2 && (name.ends_with("embed_tokens.weight") || name == "lm_head.weight")
    }

    /// Quantizes one `[rows, cols]` weight.
    pub fn quantize(
        &self,
        name: &str,
        values: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Arc<dyn QuantMatrix>> {
        check_finite(name, values)?;
        Ok(match self.method {
            QuantMethod::Nf4 => Arc::new(Blockwise4::quantize(
                values,
                &[rows, cols],
                Code4::Nf4,
                self.blocksize,
                self.double_quant,
            )?),
            QuantMethod::Fp4 => Arc::new(Blockwise4::quantize(
                values,
                &[rows, cols],
                Code4::Fp4,
                self.blocksize,
                self.double_quant,
            )?),
            QuantMethod::Int8 => Arc::new(Int8Rows::quantize(&int8_input(values), rows, cols)?),
        })
    }

    /// The command-line flags that ask for this spec: `--quantize nf4 --double-quant`.
    pub fn flags(&self) -> String {
        let method = match self.method {
            QuantMethod::Nf4 => "nf4",
            QuantMethod::Fp4 => "fp4",
            QuantMethod::Int8 => "int8",
        };
        let mut out = format!("--quantize {method}");
        if self.double_quant {
            out += " --double-quant";
        }
        if self.method != QuantMethod::Int8 && self.blocksize != default_blocksize() {
            out += &format!(" --quant-blocksize {}", self.blocksize);
        }
        out
    }

    /// The name of the format this spec makes, as [`super::QuantMatrix::format`] reports it
    /// for the weights it quantized: `nf4 (blocksize 64, double quant)`, `int8 (row absmax)`.
    pub fn format(&self) -> String {
        match self.method {
            QuantMethod::Int8 => "int8 (row absmax)".into(),
            m => format!(
                "{} (blocksize {}{})",
                if m == QuantMethod::Nf4 { "nf4" } else { "fp4" },
                self.blocksize,
                if self.double_quant {
                    ", double quant"
                } else {
                    ""
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_linear_weights_are_wanted() {
        let s = QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap();
        assert!(s.wants("model.layers.0.self_attn.q_proj.weight", &[8, 8]));
        assert!(s.wants("encoder.layer.0.attention.self.query.weight", &[8, 8]));
        assert!(!s.wants("model.layers.0.self_attn.q_proj.bias", &[8]));
        assert!(!s.wants("model.norm.weight", &[8]));
        assert!(!s.wants("model.embed_tokens.weight", &[8, 8]));
        assert!(!s.wants("lm_head.weight", &[8, 8]));
        assert!(!s.wants("classifier.weight", &[2, 8]));
        assert!(QuantSpec::new(QuantMethod::Nf4, 100, false).is_err());
        assert!(QuantSpec::new(QuantMethod::Int8, 64, true).is_err());
    }
}
