//! Command-line flags that set a method's PEFT keys (`--lora-r 16` sets `r`), declared where
//! the method is: each method lists its own in its [`Method::flags`](super::Method::flags),
//! and [`COMMON`] holds those of every method (targets, `modules_to_save`). The CLI offers
//! the union on `train`, `inspect` and `plan`; a flag sets its keys on the chosen method, and
//! one the chosen method lacks is an error naming the flag. The library has no CLI parser:
//! these are data the CLI turns into its arguments.

use anyhow::Result;
use serde_json::{Map, Value};

/// One flag and the keys it sets.
#[derive(Debug)]
pub struct OptionFlag {
    /// The flag without its dashes: `lora-r`.
    pub name: &'static str,
    /// What the value is: how the command line parses it, or a switch.
    pub value: FlagValue,
    /// The value's name in `--help` (`WIDTH`); `None` for the flag's name in capitals.
    pub value_name: Option<&'static str>,
    /// One paragraph for `--help`.
    pub help: &'static str,
    /// The keys set from the value as parsed ([`FlagValue`]; `true` for a switch).
    pub keys: fn(Value) -> Vec<(&'static str, Value)>,
}

/// What a flag's value is, and the JSON it becomes before [`OptionFlag::keys`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagValue {
    /// No value: present (`true`) or not.
    Switch,
    /// A non-negative integer (a JSON integer).
    Count,
    /// A number (a JSON float).
    Number,
    /// Any text (a JSON string).
    Text,
}

/// Comma-separated names, trimmed, empty ones dropped.
pub fn names(list: &str) -> Vec<String> {
    list.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// A text value's string (empty for any other value).
pub fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// The flags of every method: which modules it changes and which it trains in full.
pub static COMMON: &[OptionFlag] = &[
    OptionFlag {
        name: "target-modules",
        value: FlagValue::Text,
        value_name: None,
        help: "Comma-separated module names (matched as dotted suffixes), or \"all-linear\".",
        keys: |v| {
            let targets = match text(&v).trim() {
                "all-linear" => Value::from("all-linear"),
                list => Value::from(names(list)),
            };
            vec![("target_modules", targets)]
        },
    },
    OptionFlag {
        name: "target-regex",
        value: FlagValue::Text,
        value_name: None,
        help: "A regular expression that must match whole module paths (instead of --target-modules).",
        keys: |v| vec![("target_modules", v)],
    },
    OptionFlag {
        name: "exclude-modules",
        value: FlagValue::Text,
        value_name: None,
        help: "Comma-separated module names (dotted suffixes) never adapted, even when a target matches them.",
        keys: |v| vec![("exclude_modules", Value::from(names(text(&v))))],
    },
    OptionFlag {
        name: "modules-to-save",
        value: FlagValue::Text,
        value_name: None,
        help: "Comma-separated modules trained in full and saved with the adapter (e.g. a head).",
        keys: |v| vec![("modules_to_save", Value::from(names(text(&v))))],
    },
];

/// Every method's flags and [`COMMON`], each name once (methods may share a flag, e.g.
/// `--num-virtual-tokens`), in the order the registry lists them.
pub fn all() -> Vec<&'static OptionFlag> {
    let mut out: Vec<&'static OptionFlag> = Vec::new();
    let declared = super::registry::METHODS.iter().flat_map(|m| m.flags.iter());
    for flag in COMMON.iter().chain(declared) {
        if !out.iter().any(|f| f.name == flag.name) {
            out.push(flag);
        }
    }
    out
}

/// Applies the chosen method's [`Method::complete_flags`](super::Method::complete_flags): the
/// keys that follow from the flags given and the model path (prompt tuning's TEXT init reads
/// the model's own tokenizer).
pub fn complete(
    method: &super::Method,
    options: &mut Map<String, Value>,
    model: &str,
) -> Result<()> {
    match method.complete_flags {
        Some(complete) => complete(options, model),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_of_one_name_are_one_declaration() {
        let declared = super::super::registry::METHODS
            .iter()
            .flat_map(|m| m.flags.iter())
            .chain(COMMON.iter());
        for flag in declared {
            let first = all().into_iter().find(|f| f.name == flag.name).unwrap();
            assert_eq!(first.value, flag.value, "--{}", flag.name);
            assert_eq!(first.help, flag.help, "--{}", flag.name);
        }
    }

    #[test]
    fn every_flag_sets_keys_its_methods_have() {
        for method in super::super::registry::METHODS {
            for flag in method.flags {
                let value = match flag.value {
                    FlagValue::Switch => Value::Bool(true),
                    FlagValue::Count => Value::from(1usize),
                    FlagValue::Number => Value::from(1.0),
                    FlagValue::Text => Value::from("1"),
                };
                for (key, _) in (flag.keys)(value) {
                    assert!(method.keys.contains(&key), "--{} {key}", flag.name);
                }
            }
        }
    }
}
