//! Which modules a tuner adapts: PEFT's matching rules, so configs transfer unchanged.
//!
//! - a list: a module matches when its path equals an entry or ends with `.` + entry;
//! - a string: a regular expression that must match the whole path (`re.fullmatch`);
//! - `"all-linear"`: every linear layer except the model's output head.

use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// `target_modules` / `exclude_modules` / `modules_to_save` as PEFT writes them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a list of module names, a regular expression string, or \"all-linear\""
)]
pub enum ModuleSpec {
    /// A regular expression (or the special value `all-linear`).
    Pattern(String),
    /// Module names matched exactly or as a dotted suffix.
    Names(Vec<String>),
}

impl ModuleSpec {
    /// The targets as [`BlockShapes::sum_over_targets`](super::registry::BlockShapes::sum_over_targets)
    /// takes them (names, or `all-linear`), for `ferrule plan` without weights; `None` for a
    /// regular expression, which only the model's module paths can resolve.
    pub fn shape_targets(spec: Option<&ModuleSpec>) -> Option<Vec<String>> {
        match spec? {
            ModuleSpec::Names(n) => Some(n.clone()),
            ModuleSpec::Pattern(p) if p == "all-linear" => Some(vec![p.clone()]),
            ModuleSpec::Pattern(_) => None,
        }
    }

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
            ModuleSpec::Pattern(p) => Matcher::Regex(
                Regex::new(&format!("^(?:{p})$"))
                    .with_context(|| format!("invalid regular expression {p:?}"))?,
            ),
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
    path == name
        || (path.len() > name.len()
            && path.ends_with(name)
            && path.as_bytes()[path.len() - name.len() - 1] == b'.')
}

/// A `rank_pattern` / `alpha_pattern` key compiled as PEFT's `get_pattern_key` reads it: a
/// regex that must match the end of a module path after a dotted prefix (`(.*\.)?(key)$`).
/// An invalid key is an error naming it (PEFT would raise only when it first meets it).
pub fn compile_pattern_key(option: &str, key: &str) -> Result<Regex> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
        .with_context(|| format!("{option}: key {key:?} is not a valid regular expression"))
}

/// PEFT's `get_pattern_key`: the index of the first compiled pattern that matches `path`.
pub fn pattern_index(patterns: &[Regex], path: &str) -> Option<usize> {
    patterns.iter().position(|re| re.is_match(path))
}

/// PEFT's `layers_to_transform`: one layer index or several.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(
    untagged,
    expecting = "a layer index or a list of layer indices (non-negative integers)"
)]
pub enum LayersToTransform {
    One(usize),
    Many(Vec<usize>),
}

/// PEFT's `layers_pattern`: the name(s) of the container holding the numbered layers.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    One(String),
    Many(Vec<String>),
}

/// Whether `path` lies in a layer `layers_to_transform` selects (every path when it is unset
/// or an empty list; none outside a numbered layer when it is set), as PEFT's
/// `check_target_module_exists`. An empty `layers_pattern` (`[]` or `""`) means any container,
/// as in PEFT.
pub fn in_layers(
    path: &str,
    layers_to_transform: Option<&LayersToTransform>,
    layers_pattern: Option<&LayersPattern>,
) -> bool {
    let ltt = match layers_to_transform {
        None => return true,
        Some(LayersToTransform::Many(v)) if v.is_empty() => return true,
        Some(l) => l,
    };
    let pats: Option<Vec<String>> = layers_pattern
        .map(|p| match p {
            LayersPattern::One(s) => vec![s.clone()],
            LayersPattern::Many(v) => v.clone(),
        })
        .filter(|p| !p.is_empty() && p.iter().any(|s| !s.is_empty()));
    let Some(idx) = layer_index(path, pats.as_deref()) else {
        return false;
    };
    match ltt {
        LayersToTransform::One(i) => *i == idx,
        LayersToTransform::Many(v) => v.contains(&idx),
    }
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

/// A method's `target_modules` (and `exclude_modules`) with a record of what they matched:
/// per entry, how many modules; and every module path the model offered at this hook point,
/// for the error that lists them. PEFT is silent when an entry matches nothing; ferrule is not.
pub struct Targets {
    option: &'static str,
    target: Matcher,
    entries: Vec<String>,
    exclude: Option<Matcher>,
    /// `layers_to_transform` / `layers_pattern`: the numbered layers adapted (all when unset).
    layers_to_transform: Option<LayersToTransform>,
    layers_pattern: Option<LayersPattern>,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    counts: Vec<usize>,
    paths: Vec<String>,
}

impl Targets {
    /// `option` names the config key in messages (`target_modules`).
    pub fn new(
        option: &'static str,
        target: &ModuleSpec,
        exclude: Option<&ModuleSpec>,
    ) -> Result<Self> {
        let entries = match target {
            ModuleSpec::Names(n) => n.clone(),
            ModuleSpec::Pattern(p) => vec![p.clone()],
        };
        if entries.is_empty() {
            bail!("{option} is an empty list; name at least one module")
        }
        let target = Matcher::new(target).context(option)?;
        let exclude = exclude
            .map(Matcher::new)
            .transpose()
            .context("exclude_modules")?;
        let seen = Mutex::new(Seen {
            counts: vec![0; entries.len()],
            paths: Vec::new(),
        });
        Ok(Self {
            option,
            target,
            entries,
            exclude,
            layers_to_transform: None,
            layers_pattern: None,
            seen,
        })
    }

    /// Adapts only the layers `layers_to_transform` selects ([`in_layers`]); see [`Targets::adapts`].
    /// The targets of a method with PEFT's LoRA keys: `target_modules` (required; `method`
    /// names the method in the errors) less `exclude_modules`, in the layers that
    /// `layers_to_transform` / `layers_pattern` select.
    pub fn required(
        method: &str,
        target: Option<&ModuleSpec>,
        exclude: Option<&ModuleSpec>,
        layers_to_transform: Option<&LayersToTransform>,
        layers_pattern: Option<&LayersPattern>,
    ) -> Result<Self> {
        let Some(target) = target else {
            bail!("{method}: target_modules is required (a list of module names, a regex, or \"all-linear\")")
        };
        Ok(Self::new("target_modules", target, exclude)
            .context(method.to_string())?
            .in_layers(layers_to_transform, layers_pattern))
    }

    pub fn in_layers(
        mut self,
        layers_to_transform: Option<&LayersToTransform>,
        layers_pattern: Option<&LayersPattern>,
    ) -> Self {
        self.layers_to_transform = layers_to_transform.cloned();
        self.layers_pattern = layers_pattern.cloned();
        self
    }

    /// Whether the module at `path` is adapted: [`Targets::select`]ed (which records the
    /// offer and the entries it matched, whatever its layer) and in a selected layer.
    pub fn adapts(&self, path: &str, is_output_head: bool) -> bool {
        self.select(path, is_output_head)
            && in_layers(
                path,
                self.layers_to_transform.as_ref(),
                self.layers_pattern.as_ref(),
            )
    }

    /// Whether the module at `path` is targeted and not excluded; records the offer.
    pub fn select(&self, path: &str, is_output_head: bool) -> bool {
        let mut seen = self.seen.lock().unwrap();
        seen.paths.push(path.to_string());
        let hit: Vec<usize> = match &self.target {
            Matcher::Names(names) => names
                .iter()
                .enumerate()
                .filter(|(_, n)| suffix_match(path, n))
                .map(|(i, _)| i)
                .collect(),
            m => m
                .matches(path, is_output_head)
                .then_some(0)
                .into_iter()
                .collect(),
        };
        for &i in &hit {
            seen.counts[i] += 1;
        }
        !hit.is_empty()
            && !self
                .exclude
                .as_ref()
                .is_some_and(|m| m.matches(path, is_output_head))
    }

    /// [`Targets::select`] for a module that is not a linear layer (an embedding, a norm):
    /// `all-linear` never selects it.
    pub fn select_non_linear(&self, path: &str) -> bool {
        self.select(path, true)
    }

    /// What each entry matched, once the model is built.
    pub fn report(&self) -> MatchReport {
        let seen = self.seen.lock().unwrap();
        MatchReport {
            option: self.option,
            entries: self
                .entries
                .iter()
                .cloned()
                .zip(seen.counts.iter().copied())
                .collect(),
            module_names: module_name_shapes(&seen.paths),
        }
    }
}

/// Module paths with layer indices folded (`model.layers.*.self_attn.q_proj`), each with its
/// count, in first-seen order.
pub(crate) fn module_name_shapes(paths: &[String]) -> Vec<(String, usize)> {
    let mut order: Vec<String> = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for p in paths {
        let shape: Vec<&str> = p
            .split('.')
            .map(|part| {
                if part.parse::<usize>().is_ok() {
                    "*"
                } else {
                    part
                }
            })
            .collect();
        let shape = shape.join(".");
        let c = counts.entry(shape.clone()).or_insert(0);
        if *c == 0 {
            order.push(shape);
        }
        *c += 1;
    }
    order.into_iter().map(|s| (s.clone(), counts[&s])).collect()
}

/// How many modules each `target_modules` entry matched.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MatchReport {
    /// The config key (`target_modules`).
    pub option: &'static str,
    /// Each entry (a name, or the one regex) with the number of modules it matched.
    pub entries: Vec<(String, usize)>,
    /// The model's module paths at this hook point, layer indices folded to `*`, with counts.
    pub module_names: Vec<(String, usize)>,
}

impl MatchReport {
    /// The entries that matched no module.
    pub fn unmatched(&self) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(_, n)| *n == 0)
            .map(|(e, _)| e.as_str())
            .collect()
    }

    /// An error naming every entry that matched nothing, with the model's module names; with
    /// `allow_unmatched` a warning instead, unless nothing matched at all.
    pub fn check(&self, method: &str, allow_unmatched: bool) -> Result<()> {
        let unmatched = self.unmatched();
        if unmatched.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = self
            .module_names
            .iter()
            .map(|(n, c)| format!("{n} ({c})"))
            .collect();
        let msg = format!(
            "{method}: {} entr{} {:?} matched no module of the model; its modules here are: {}",
            self.option,
            if unmatched.len() == 1 { "y" } else { "ies" },
            unmatched,
            names.join(", ")
        );
        if allow_unmatched && unmatched.len() < self.entries.len() {
            tracing::warn!("{msg} (continuing: --allow-unmatched)");
            return Ok(());
        }
        if allow_unmatched {
            bail!("{msg}; nothing at all was targeted, so there is nothing to train")
        }
        bail!("{msg}. Fix the name, or pass --allow-unmatched to continue without it")
    }

    /// One line per entry: `  q_proj   30 modules`.
    pub fn table(&self) -> String {
        let w = self.entries.iter().map(|(e, _)| e.len()).max().unwrap_or(0);
        self.entries
            .iter()
            .map(|(e, n)| format!("  {e:<w$}  {n} module{}", if *n == 1 { "" } else { "s" }))
            .collect::<Vec<_>>()
            .join("\n")
    }
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
        let pats: Vec<Regex> = ["k_proj", "layers.1.self_attn.q_proj"]
            .iter()
            .map(|k| compile_pattern_key("rank_pattern", k).unwrap())
            .collect();
        assert_eq!(
            pattern_index(&pats, "model.layers.0.self_attn.k_proj"),
            Some(0)
        );
        assert_eq!(
            pattern_index(&pats, "model.layers.1.self_attn.q_proj"),
            Some(1)
        );
        assert_eq!(
            pattern_index(&pats, "model.layers.0.self_attn.q_proj"),
            None
        );
        let err = compile_pattern_key("rank_pattern", "q_proj(").unwrap_err();
        assert!(
            format!("{err:#}")
                .contains("rank_pattern: key \"q_proj(\" is not a valid regular expression"),
            "{err:#}"
        );
    }

    #[test]
    fn targets_count_each_entry_and_name_the_unmatched() {
        let t = Targets::new(
            "target_modules",
            &ModuleSpec::Names(vec!["q_proj".into(), "v_projx".into()]),
            None,
        )
        .unwrap();
        for l in 0..2 {
            for m in ["q_proj", "v_proj"] {
                t.select(&format!("model.layers.{l}.self_attn.{m}"), false);
            }
        }
        assert!(!t.select("lm_head", true));
        let r = t.report();
        assert_eq!(
            r.entries,
            vec![("q_proj".to_string(), 2), ("v_projx".to_string(), 0)]
        );
        assert_eq!(
            r.module_names[0],
            ("model.layers.*.self_attn.q_proj".to_string(), 2)
        );
        let err = format!("{:#}", r.check("lora", false).unwrap_err());
        assert!(
            err.contains("\"v_projx\"")
                && err.contains("model.layers.*.self_attn.v_proj (2)")
                && err.contains("--allow-unmatched"),
            "{err}"
        );
        r.check("lora", true).unwrap();
        let none = Targets::new(
            "target_modules",
            &ModuleSpec::Names(vec!["nope".into()]),
            None,
        )
        .unwrap();
        none.select("lm_head", true);
        assert!(
            none.report().check("lora", true).is_err(),
            "nothing targeted stays an error"
        );
    }

    #[test]
    fn exclusion_still_counts_the_name() {
        let t = Targets::new(
            "target_modules",
            &ModuleSpec::Names(vec!["q_proj".into()]),
            Some(&ModuleSpec::Names(vec![
                "model.layers.0.self_attn.q_proj".into()
            ])),
        )
        .unwrap();
        assert!(!t.select("model.layers.0.self_attn.q_proj", false));
        assert!(t.select("model.layers.1.self_attn.q_proj", false));
        assert_eq!(t.report().entries[0].1, 2);
    }

    #[test]
    fn layer_indices() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj", None), Some(12));
        assert_eq!(
            layer_index(
                "bert.encoder.layer.3.attention.self.query",
                Some(&["layer".to_string()])
            ),
            Some(3)
        );
        assert_eq!(layer_index("lm_head", None), None);
    }
}
