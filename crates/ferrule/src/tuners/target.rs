//! Which modules a tuner adapts: PEFT's matching rules, so configs transfer unchanged.
//!
//! - a list: a module matches when its path equals an entry or ends with `.` + entry;
//! - a string: a regular expression that must match the whole path (`re.fullmatch`);
//! - `"all-linear"`: every linear layer except the model's output head.

use anyhow::{Context, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// `target_modules` / `exclude_modules` / `modules_to_save` as PEFT writes them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSpec {
    /// A regular expression (or the special value `all-linear`).
    Pattern(String),
    /// Module names matched exactly or as a dotted suffix.
    Names(Vec<String>),
}

impl ModuleSpec {
    pub fn is_all_linear(&self) -> bool {
        matches!(self, ModuleSpec::Pattern(p) if p == "all-linear")
    }
}

/// A compiled [`ModuleSpec`].
#[derive(Clone, Debug)]
pub enum Matcher {
    AllLinear,
    Regex(Regex),
    Names(Vec<String>),
}

impl Matcher {
    pub fn new(spec: &ModuleSpec) -> Result<Self> {
        Ok(match spec {
            ModuleSpec::Pattern(p) if p == "all-linear" => Matcher::AllLinear,
            ModuleSpec::Pattern(p) => Matcher::Regex(Regex::new(&format!("^(?:{p})$")).with_context(|| format!("invalid regular expression {p:?}"))?),
            ModuleSpec::Names(n) => Matcher::Names(n.clone()),
        })
    }

    /// Whether the module at `path` matches. `is_output_head` excludes heads from `all-linear`.
    pub fn matches(&self, path: &str, is_output_head: bool) -> bool {
        match self {
            Matcher::AllLinear => !is_output_head,
            Matcher::Regex(r) => r.is_match(path),
            Matcher::Names(names) => names.iter().any(|n| suffix_match(path, n)),
        }
    }
}

/// `path == name` or `path` ends with `.name`.
pub fn suffix_match(path: &str, name: &str) -> bool {
    path == name || (path.len() > name.len() && path.ends_with(name) && path.as_bytes()[path.len() - name.len() - 1] == b'.')
}

/// PEFT's `get_pattern_key`: the first key of a `rank_pattern` / `alpha_pattern` whose
/// regex matches the end of `path` after a dotted prefix (`(.*\.)?(key)$`).
pub fn pattern_value<'a, V>(patterns: &'a [(String, V)], path: &str) -> Option<&'a V> {
    patterns.iter().find_map(|(k, v)| {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).ok()?;
        re.is_match(path).then_some(v)
    })
}

/// The layer index in a path like `model.layers.3.mlp` (for `layers_to_transform`).
pub fn layer_index(path: &str, layers_pattern: Option<&[String]>) -> Option<usize> {
    let parts: Vec<&str> = path.split('.').collect();
    for w in parts.windows(2) {
        let container_ok = match layers_pattern {
            Some(pats) => pats.iter().any(|p| p == w[0]),
            None => true,
        };
        if container_ok {
            if let Ok(i) = w[1].parse::<usize>() {
                return Some(i);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_matches_exact_or_dotted_suffix() {
        let m = Matcher::new(&ModuleSpec::Names(vec!["q_proj".into(), "v".into()])).unwrap();
        assert!(m.matches("model.layers.0.self_attn.q_proj", false));
        assert!(m.matches("q_proj", false));
        assert!(!m.matches("model.layers.0.self_attn.qq_proj", false));
        assert!(!m.matches("model.layers.0.self_attn.v_proj", false));
    }

    #[test]
    fn regex_is_a_full_match() {
        let m = Matcher::new(&ModuleSpec::Pattern(r".*\.(q_proj|v_proj)".into())).unwrap();
        assert!(m.matches("model.layers.1.self_attn.q_proj", false));
        assert!(!m.matches("model.layers.1.self_attn.q_proj.extra", false));
        assert!(!m.matches("q_proj", false));
    }

    #[test]
    fn all_linear_skips_the_head() {
        let m = Matcher::new(&ModuleSpec::Pattern("all-linear".into())).unwrap();
        assert!(m.matches("model.layers.0.mlp.down_proj", false));
        assert!(!m.matches("lm_head", true));
    }

    #[test]
    fn pattern_keys_follow_peft() {
        let pats = vec![("k_proj".to_string(), 2usize), ("layers.1.self_attn.q_proj".to_string(), 3)];
        assert_eq!(pattern_value(&pats, "model.layers.0.self_attn.k_proj"), Some(&2));
        assert_eq!(pattern_value(&pats, "model.layers.1.self_attn.q_proj"), Some(&3));
        assert_eq!(pattern_value(&pats, "model.layers.0.self_attn.q_proj"), None);
    }

    #[test]
    fn layer_indices() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj", None), Some(12));
        assert_eq!(layer_index("bert.encoder.layer.3.attention.self.query", Some(&["layer".to_string()])), Some(3));
        assert_eq!(layer_index("lm_head", None), None);
    }
}
