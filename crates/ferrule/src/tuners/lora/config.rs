//! `LoraConfig`, with PEFT's key names and defaults (peft `tuners/lora/config.py`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use regex::Regex;

use crate::tuners::flags::{FlagValue, OptionFlag};
use crate::tuners::target::{compile_pattern_key, pattern_index, suffix_match, ModuleSpec};
use crate::tuners::trainable_tokens::TokenIndices;

/// A module's rank and alpha ([`LoraConfig::rank_and_alpha`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankAlpha {
    pub r: usize,
    pub alpha: f64,
    /// The `rank_pattern` key (its index in [`Patterns::rank`]) that set `r`, if one did.
    pub rank_key: Option<usize>,
    /// The `alpha_pattern` key (its index in [`Patterns::alpha`]) that set `alpha`, if one did.
    pub alpha_key: Option<usize>,
}

/// `init_lora_weights`: `true` (Kaiming-uniform A, zero B), `false` (both random, for
/// tests), or a named scheme.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "true, false or a scheme name (\"gaussian\", \"pissa\", \"pissa_niter_N\", \"olora\")"
)]
pub enum InitLoraWeights {
    Flag(bool),
    Named(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Flag(true)
    }
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}

/// One LoRA adapter's configuration, as `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(
        default = "default_alpha",
        serialize_with = "crate::tuners::config::serialize_number"
    )]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    #[serde(default)]
    pub rank_pattern: Map<String, Value>,
    #[serde(default)]
    pub alpha_pattern: Map<String, Value>,
    #[serde(default)]
    pub lora_bias: bool,
    /// Rows of the token embedding that train beside LoRA (peft's `TrainableTokensWrapper`).
    /// Left out of the saved config when unset (peft reads a missing key as None), so an adapter
    /// without it keeps its bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_token_indices: Option<TokenIndices>,
}

pub use crate::tuners::target::{LayersPattern, LayersToTransform};

/// Keys of a LoRA `adapter_config.json` that ferrule understands; others are kept and warned about.
pub const KNOWN_KEYS: &[&str] = &[
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "fan_in_fan_out",
    "bias",
    "use_rslora",
    "use_dora",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "lora_bias",
    "trainable_token_indices",
];

/// Compiled `rank_pattern` / `alpha_pattern` keys, in the config's order.
pub struct Patterns {
    pub rank: Vec<(String, Regex)>,
    pub alpha: Vec<(String, Regex)>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Map::new())).expect("defaults deserialize")
    }
}

impl LoraConfig {
    /// Rejects settings whose training or loading is not implemented, instead of silently
    /// ignoring them (a user would get a different model than asked for).
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("lora: r must be at least 1")
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!(
                "lora: lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            )
        }
        crate::tuners::config::check_alpha("lora: lora_alpha", self.lora_alpha)?;
        if self.lora_bias && self.use_dora {
            bail!("lora: lora_bias=true is not supported with DoRA (use_dora=true), as in peft; set one of them to false")
        }
        if self.lora_bias && !matches!(self.init_lora_weights, InitLoraWeights::Flag(_)) {
            bail!("lora: lora_bias=true needs init_lora_weights true or false (peft's rule), got {:?}", self.init_lora_weights)
        }
        // peft's LoraConfig.__post_init__ raises for these, so an adapter saved with them would
        // not load there ("all-linear" is saved as the list of names it matched).
        if let Some(ModuleSpec::Pattern(p)) = &self.target_modules {
            if p != "all-linear"
                && (self.layers_to_transform.is_some() || self.layers_pattern.is_some())
            {
                bail!("lora: layers_to_transform / layers_pattern cannot be used when target_modules is a regex ({p:?}), as in peft; list the module names instead")
            }
        }
        let pattern_given = match &self.layers_pattern {
            Some(LayersPattern::One(p)) => !p.is_empty(),
            Some(LayersPattern::Many(v)) => !v.is_empty(),
            None => false,
        };
        if pattern_given && self.layers_to_transform.is_none() {
            bail!("lora: layers_pattern is set but layers_to_transform is not; peft refuses this config (it would select no layer), so give layers_to_transform too")
        }
        if self.fan_in_fan_out {
            bail!("lora: fan_in_fan_out (GPT-2 Conv1D layers) is not supported: no supported architecture uses Conv1D")
        }
        crate::tuners::bias::BiasMode::parse("lora", &self.bias)?;
        match &self.init_lora_weights {
            InitLoraWeights::Flag(_) => {}
            InitLoraWeights::Named(n) if n == "gaussian" => {}
            InitLoraWeights::Named(n)
                if super::residual_init::ResidualInit::parse(n)?.is_some() =>
            {
                if self.use_dora {
                    bail!("lora: init_lora_weights={n:?} with use_dora is not supported: the DoRA magnitude would have to follow the residual base")
                }
            }
            InitLoraWeights::Named(n) => {
                bail!("lora: init_lora_weights={n:?} is not supported (true, false, \"gaussian\", \"pissa\", \"pissa_niter_<N>\" and \"olora\" are)")
            }
        }
        for (k, v) in self.rank_pattern.iter() {
            if v.as_u64().filter(|r| *r > 0).is_none() {
                bail!("lora: rank_pattern[{k:?}] must be a positive integer, got {v}")
            }
        }
        for (k, v) in self.alpha_pattern.iter() {
            match v.as_f64() {
                Some(a) => {
                    crate::tuners::config::check_alpha(&format!("lora: alpha_pattern[{k:?}]"), a)?
                }
                None => bail!("lora: alpha_pattern[{k:?}] must be a number, got {v}"),
            }
        }
        self.patterns()?;
        self.check_token_indices()
    }

    /// `trainable_token_indices`: well formed, and not on an embedding that `modules_to_save`
    /// trains in full (peft raises the same).
    fn check_token_indices(&self) -> Result<()> {
        let Some(indices) = &self.trainable_token_indices else {
            return Ok(());
        };
        indices.validate("lora: trainable_token_indices")?;
        let names: Vec<&str> = match indices {
            TokenIndices::Embedding(_) => vec!["embed_tokens", "word_embeddings"],
            TokenIndices::ByModule(m) => m.keys().map(String::as_str).collect(),
        };
        let mut full = self.modules_to_save.iter().flatten();
        if let Some(m) = full.find(|m| {
            names
                .iter()
                .any(|n| suffix_match(n, m) || suffix_match(m, n))
        }) {
            bail!("lora: {m:?} is both in modules_to_save (trained in full) and in trainable_token_indices (some rows trained); keep one of them, as peft requires")
        }
        Ok(())
    }

    /// `rank_pattern` and `alpha_pattern` compiled; an invalid regex is an error naming its key.
    pub fn patterns(&self) -> Result<Patterns> {
        let compile = |option: &str, m: &Map<String, Value>| -> Result<Vec<(String, Regex)>> {
            m.keys()
                .map(|k| {
                    Ok((
                        k.clone(),
                        compile_pattern_key(&format!("lora: {option}"), k)?,
                    ))
                })
                .collect()
        };
        Ok(Patterns {
            rank: compile("rank_pattern", &self.rank_pattern)?,
            alpha: compile("alpha_pattern", &self.alpha_pattern)?,
        })
    }

    /// Rank and alpha of the module at `path`, after `rank_pattern` / `alpha_pattern`, with
    /// the indices of the pattern keys that decided them.
    pub fn rank_and_alpha(&self, patterns: &Patterns, path: &str) -> RankAlpha {
        let keys = |list: &[(String, Regex)]| {
            let regexes: Vec<Regex> = list.iter().map(|(_, re)| re.clone()).collect();
            pattern_index(&regexes, path)
        };
        let (rank_key, alpha_key) = (keys(&patterns.rank), keys(&patterns.alpha));
        let r = rank_key
            .and_then(|i| self.rank_pattern[&patterns.rank[i].0].as_u64())
            .map_or(self.r, |r| r as usize);
        let alpha = alpha_key
            .and_then(|i| self.alpha_pattern[&patterns.alpha[i].0].as_f64())
            .unwrap_or(self.lora_alpha);
        RankAlpha {
            r,
            alpha,
            rank_key,
            alpha_key,
        }
    }

    /// LoRA's scale: α/r (Hu et al. 2021, §4.1), or α/√r with rsLoRA (Kalajdzievski 2023).
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// `--lora-r`: also RandLoRA's rank, which has the same key.
pub const RANK_FLAG: OptionFlag = OptionFlag {
    name: "lora-r",
    value: FlagValue::Count,
    value_name: None,
    help: "LoRA rank r.",
    keys: |v| vec![("r", v)],
};

/// `--lora-alpha`: also DyLoRA's α, which has the same key.
pub const ALPHA_FLAG: OptionFlag = OptionFlag {
    name: "lora-alpha",
    value: FlagValue::Number,
    value_name: None,
    help: "LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with --use-rslora; alpha/b at DyLoRA's rank b); default 16 for ferrule train's LoRA, else the method's default.",
    keys: |v| vec![("lora_alpha", v)],
};

/// `--lora-dropout`: also DyLoRA's, which has the same key.
pub const DROPOUT_FLAG: OptionFlag = OptionFlag {
    name: "lora-dropout",
    value: FlagValue::Number,
    value_name: None,
    help: "Dropout probability on the adapter input during training (default 0).",
    keys: |v| vec![("lora_dropout", v)],
};

/// LoRA's command-line flags beside the common ones.
pub static FLAGS: &[OptionFlag] = &[
    RANK_FLAG,
    ALPHA_FLAG,
    DROPOUT_FLAG,
    OptionFlag {
        name: "use-rslora",
        value: FlagValue::Switch,
        value_name: None,
        help: "rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r.",
        keys: |v| vec![("use_rslora", v)],
    },
    OptionFlag {
        name: "use-dora",
        value: FlagValue::Switch,
        value_name: None,
        help: "DoRA: a trained magnitude per output row over the normalised LoRA-updated weight.",
        keys: |v| vec![("use_dora", v)],
    },
    crate::tuners::bias::BIAS_FLAG,
    OptionFlag {
        name: "lora-bias",
        value: FlagValue::Switch,
        value_name: None,
        help: "A trainable bias on lora_B (scaled with the update).",
        keys: |v| vec![("lora_bias", v)],
    },
    OptionFlag {
        name: "init-lora-weights",
        value: FlagValue::Text,
        value_name: None,
        help: "true (Kaiming A, zero B), false, gaussian, pissa, pissa_niter_<N> or olora (the last three move part of the base into the adapter; the saved adapter is converted to plain LoRA of rank 2r).",
        keys: |v| {
            let init = match v.as_str() {
                Some("true") => Value::Bool(true),
                Some("false") => Value::Bool(false),
                _ => v,
            };
            vec![("init_lora_weights", init)]
        },
    },
    crate::tuners::trainable_tokens::config::FLAG,
];

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value};

    use super::LoraConfig;
    use crate::tuners::AdapterConfig;

    fn parse(key: &str, value: &Value) -> anyhow::Result<LoraConfig> {
        let mut options = Map::new();
        options.insert("target_modules".into(), json!(["q_proj"]));
        options.insert(key.into(), value.clone());
        let c: LoraConfig = AdapterConfig::new("LORA", options).typed("lora")?;
        c.validate()?;
        Ok(c)
    }

    /// Every odd value of every key is refused with the key named, except the values that
    /// mean something to peft (listed with what they mean).
    #[test]
    fn odd_values_of_every_key_are_refused_naming_the_key() {
        let odd = [
            json!(null),
            json!(-1),
            json!(0),
            json!(1099511627776u64),
            json!("x"),
            json!([]),
            json!({}),
            json!(true),
            json!(-0.5),
            json!(1e308),
            json!(["nope"]),
        ];
        // (key, value): accepted, because peft gives the value a meaning.
        let accepted: &[(&str, Value)] = &[
            ("r", json!(1099511627776u64)), // a rank; refused when built if its factors cannot be allocated (util::ensure_allocatable)
            ("lora_alpha", json!(-1)),      // any α whose scale is a finite f32, negative included
            ("lora_alpha", json!(1099511627776u64)),
            ("lora_alpha", json!(0)),
            ("lora_alpha", json!(-0.5)),
            ("lora_dropout", json!(0)),
            ("target_modules", json!(null)), // the model type's default targets
            ("target_modules", json!("x")),  // a regex (it must then match a module)
            ("target_modules", json!([])),
            ("target_modules", json!(["nope"])), // names (they must then match a module)
            ("exclude_modules", json!(null)),
            ("exclude_modules", json!("x")),
            ("exclude_modules", json!([])),
            ("exclude_modules", json!(["nope"])),
            ("use_rslora", json!(true)),
            ("use_dora", json!(true)),
            ("lora_bias", json!(true)),
            ("init_lora_weights", json!(true)),
            ("modules_to_save", json!(null)),
            ("modules_to_save", json!([])),
            ("modules_to_save", json!(["nope"])),
            ("layers_to_transform", json!(null)),
            ("layers_to_transform", json!(0)),
            ("layers_to_transform", json!(1099511627776u64)), // no such layer: nothing matches, an error when built
            ("layers_to_transform", json!([])),
            ("layers_pattern", json!(null)),
            // "x" and ["nope"] without layers_to_transform are refused, as in peft.
            ("layers_pattern", json!([])),
            ("rank_pattern", json!({})),
            ("alpha_pattern", json!({})),
        ];
        let keys = [
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "exclude_modules",
            "bias",
            "use_rslora",
            "use_dora",
            "lora_bias",
            "init_lora_weights",
            "modules_to_save",
            "layers_to_transform",
            "layers_pattern",
            "rank_pattern",
            "alpha_pattern",
            "fan_in_fan_out",
        ];
        let mut wrong = Vec::new();
        for key in keys {
            for v in &odd {
                let ok = accepted.iter().any(|(k, a)| *k == key && a == v);
                match parse(key, v) {
                    Ok(_) if ok => {}
                    Ok(_) => wrong.push(format!("{key} = {v}: accepted")),
                    Err(e) if ok => wrong.push(format!("{key} = {v}: refused ({e:#})")),
                    Err(e) if !format!("{e:#}").contains(key) => wrong.push(format!(
                        "{key} = {v}: the error does not name the key: {e:#}"
                    )),
                    Err(_) => {}
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
