//! Which parameters GaLore projects: HF Trainer's `optim_target_modules` (transformers 5.24,
//! `trainer_optimizer.py::_setup_low_rank_optimizer` and `trainer_utils.py::
//! check_target_module_exists`). A module is a target when it is an `nn.Linear` and its name
//!
//! - fully matches the regex, when one string is given (`re.fullmatch`);
//! - equals an entry, contains an entry as a substring, or fully matches an entry as a regex,
//!   when a list is given;
//! - is any linear module, for `"all-linear"` (or `"all_linear"`).
//!
//! Its `<module>.weight` is then projected; every other parameter gets the plain (galore-torch)
//! AdamW step. ferrule's optimizer sees parameters, not modules: a parameter is a linear weight
//! when it is 2-D, its name ends in `.weight`, and its module is not an embedding (the only
//! 2-D weights of ferrule's models that are not `nn.Linear`: `embed_tokens`,
//! `word_embeddings`, `position_embeddings`, `token_type_embeddings`).

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// HF's `optim_target_modules`: one regex, a list of names / substrings / regexes, or
/// `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// One string: a regex that must match the whole module name (`"all-linear"` is special).
    One(String),
    /// A list: each entry matches exactly, as a substring, or as a full-match regex.
    List(Vec<String>),
}

impl Default for TargetModules {
    /// The modules of Llama-family attention and MLP blocks, like galore-torch's
    /// `torchrun_main.py` (module paths containing `attn` or `mlp`).
    fn default() -> Self {
        Self::List(vec!["attn".into(), "mlp".into()])
    }
}

/// Compiled [`TargetModules`].
#[derive(Debug, Clone)]
pub struct TargetMatcher {
    all_linear: bool,
    one: Option<Regex>,
    list: Vec<(String, Option<Regex>)>,
}

impl TargetMatcher {
    /// Compiles the regexes; an invalid one is an error naming it. List entries that are not
    /// valid regexes still match exactly or as substrings, as in Python (where `re.fullmatch`
    /// is only reached when neither does).
    pub fn new(targets: &TargetModules) -> Result<Self> {
        let full = |p: &str| Regex::new(&format!("^(?:{p})$"));
        Ok(match targets {
            TargetModules::One(s) if s.replace('_', "-") == "all-linear" => Self {
                all_linear: true,
                one: None,
                list: Vec::new(),
            },
            TargetModules::One(s) => Self {
                all_linear: false,
                one: Some(full(s).with_context(|| format!("invalid GaLore target regex {s:?}"))?),
                list: Vec::new(),
            },
            TargetModules::List(items) => Self {
                all_linear: false,
                one: None,
                list: items.iter().map(|s| (s.clone(), full(s).ok())).collect(),
            },
        })
    }

    /// Whether the module named `module` (a linear module) is a target.
    pub fn matches_module(&self, module: &str) -> bool {
        if self.all_linear {
            return true;
        }
        if let Some(re) = &self.one {
            return re.is_match(module);
        }
        self.list.iter().any(|(s, re)| {
            module == s
                || module.contains(s.as_str())
                || re.as_ref().is_some_and(|r| r.is_match(module))
        })
    }
}

/// The module of a linear weight `<module>.weight` of shape `dims`, or `None` when the
/// parameter is not one (see the module doc).
pub fn linear_module<'a>(name: &'a str, dims: &[usize]) -> Option<&'a str> {
    if dims.len() != 2 {
        return None;
    }
    let module = name.strip_suffix(".weight")?;
    let last = module.rsplit('.').next().unwrap_or(module);
    if last.contains("embed") {
        return None;
    }
    Some(module)
}

/// The names, among `params` (name and dims), that GaLore projects; an error when none is,
/// as HF raises.
pub fn select_targets<'a>(
    params: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    targets: &TargetModules,
) -> Result<Vec<String>> {
    let matcher = TargetMatcher::new(targets)?;
    let chosen: Vec<String> = params
        .into_iter()
        .filter(|(name, dims)| linear_module(name, dims).is_some_and(|m| matcher.matches_module(m)))
        .map(|(name, _)| name.to_string())
        .collect();
    if chosen.is_empty() {
        let given = match targets {
            TargetModules::One(p) => format!("{p:?} (one regex over whole module paths)"),
            TargetModules::List(l) => format!("{l:?} (names, substrings or regexes)"),
        };
        bail!("no GaLore target modules found for optim_target_modules {given}; only 2-D linear weights can be targets");
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: [(&str, &[usize]); 6] = [
        ("model.embed_tokens.weight", &[10, 4]),
        ("model.layers.0.self_attn.q_proj.weight", &[4, 4]),
        ("model.layers.0.mlp.down_proj.weight", &[4, 8]),
        ("model.layers.0.input_layernorm.weight", &[4]),
        ("model.norm.weight", &[4]),
        ("lm_head.weight", &[10, 4]),
    ];

    fn pick(t: TargetModules) -> Result<Vec<String>> {
        select_targets(PARAMS.iter().copied(), &t)
    }

    #[test]
    fn hf_semantics() {
        // One string: full match only.
        assert_eq!(
            pick(TargetModules::One(r".*self_attn\..*".into())).unwrap(),
            vec!["model.layers.0.self_attn.q_proj.weight"]
        );
        assert!(pick(TargetModules::One("self_attn".into())).is_err());
        // A list: substrings match.
        assert_eq!(
            pick(TargetModules::default()).unwrap(),
            vec![
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.mlp.down_proj.weight"
            ]
        );
        // all-linear: every linear, lm_head included, embeddings and norms not.
        assert_eq!(
            pick(TargetModules::One("all_linear".into())).unwrap(),
            vec![
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.mlp.down_proj.weight",
                "lm_head.weight"
            ]
        );
        // A list entry that is a regex.
        assert_eq!(
            pick(TargetModules::List(vec![r"lm_h\w+".into()])).unwrap(),
            vec!["lm_head.weight"]
        );
        // An embedding named explicitly is not a linear module.
        let err = pick(TargetModules::List(vec!["embed_tokens".into()])).unwrap_err();
        assert!(err.to_string().contains("no GaLore target"), "{err}");
        let err = pick(TargetModules::One("(".into())).unwrap_err();
        assert!(
            format!("{err:#}").contains("invalid GaLore target regex"),
            "{err:#}"
        );
    }

    #[test]
    fn deserializes_string_or_list() {
        let one: TargetModules = serde_json::from_str(r#""all-linear""#).unwrap();
        assert_eq!(one, TargetModules::One("all-linear".into()));
        let list: TargetModules = serde_json::from_str(r#"["q_proj", "v_proj"]"#).unwrap();
        assert_eq!(
            list,
            TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
        );
    }
}
