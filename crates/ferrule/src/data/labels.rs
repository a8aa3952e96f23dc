//! Mapping classification labels to class indices.

use std::collections::{BTreeMap, BTreeSet};

use super::error::{DataError, RecordLine, Result};
use super::jsonl::{Example, LabelValue, Records};

/// Maps the labels of classification records to class indices `0..num_labels()`.
///
/// * Integer labels ([`LabelValue::Index`]) are class indices already.
/// * String labels ([`LabelValue::Name`]) are mapped through a list of class names: the sorted
///   unique names of the training file ([`LabelMap::from_examples`]), or a model's `id2label`
///   ([`LabelMap::from_id2label`]). Build the map once from the training file and use it for
///   the validation file too, so both agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// Class names by index, when labels are names (or a model gave names).
    names: Option<Vec<String>>,
    num_labels: usize,
}

impl LabelMap {
    /// Builds the map from the classification records of a training set.
    ///
    /// Integer labels give `max + 1` classes; string labels give one class per distinct name,
    /// numbered in sorted (byte-wise) order. Records of other shapes are ignored. Errors if there
    /// is no classification record or if integer and string labels are mixed.
    pub fn from_examples(examples: &[Example]) -> Result<Self> {
        let mut max_index: Option<usize> = None;
        let mut names = BTreeSet::new();
        let mut first: Option<(usize, bool)> = None;
        for (index, example) in examples.iter().enumerate() {
            let Example::Classification { label, .. } = example else {
                continue;
            };
            let is_index = matches!(label, LabelValue::Index(_));
            match first {
                None => first = Some((index, is_index)),
                Some((first_index, first_is_index)) if first_is_index != is_index => {
                    return Err(DataError::Label {
                        index,
                        line: None,
                        message: format!(
                            "label {label} is {} but record {first_index} has {} label; \
                             use either class indices or class names",
                            if is_index { "an integer" } else { "a string" },
                            if first_is_index {
                                "an integer"
                            } else {
                                "a string"
                            },
                        ),
                    });
                }
                Some(_) => {}
            }
            match label {
                LabelValue::Index(i) => max_index = Some(max_index.map_or(*i, |m| m.max(*i))),
                LabelValue::Name(s) => {
                    names.insert(s.clone());
                }
            }
        }
        match (first, max_index) {
            (None, _) => Err(DataError::Options(
                "cannot build a label map: the data has no classification record \
                 ({\"text\", \"label\"})"
                    .to_string(),
            )),
            (Some(_), Some(max)) => Ok(LabelMap {
                names: None,
                num_labels: max + 1,
            }),
            (Some(_), None) => {
                let names: Vec<String> = names.into_iter().collect();
                Ok(LabelMap {
                    num_labels: names.len(),
                    names: Some(names),
                })
            }
        }
    }

    /// [`LabelMap::from_examples`] over the records of a file, with errors naming the file, the
    /// line and the key: a file without any `"label"` names the keys its first record has, and
    /// the one that looks meant as the label (`"labels"`, `"Label"`, `"class"`, ...).
    pub fn from_records(records: &Records) -> Result<Self> {
        let any = records
            .examples
            .iter()
            .any(|e| matches!(e, Example::Classification { .. }));
        if any {
            return Self::from_examples(&records.examples).map_err(|e| e.located(records));
        }
        let keys: Vec<String> = records
            .first_keys
            .iter()
            .map(|k| format!("{k:?}"))
            .collect();
        let has = if keys.is_empty() {
            "no keys".to_string()
        } else {
            format!("keys {}", keys.join(", "))
        };
        let hint = match records.first_keys.iter().find(|k| looks_like_label(k)) {
            Some(k) => format!("; rename {k:?} to \"label\""),
            None => String::new(),
        };
        Err(DataError::Label {
            index: 0,
            line: Some(RecordLine {
                path: records.path.clone(),
                line: records.line(0),
            }),
            message: format!(
                "a sequence-classification task (--task seq-cls) needs a class under the key \
                 \"label\" (a class index or name) beside \"text\" in every record, but this \
                 record has {has}{hint}"
            ),
        })
    }

    /// A map with `num_labels` unnamed classes; only integer labels can be mapped.
    pub fn with_num_labels(num_labels: usize) -> Self {
        LabelMap {
            names: None,
            num_labels,
        }
    }

    /// A map from class names in index order (name `i` is class `i`). Errors on duplicates.
    pub fn from_names(names: Vec<String>) -> Result<Self> {
        let mut seen = BTreeSet::new();
        for name in &names {
            if !seen.insert(name.as_str()) {
                return Err(DataError::Options(format!(
                    "class name {name:?} appears twice"
                )));
            }
        }
        Ok(LabelMap {
            num_labels: names.len(),
            names: Some(names),
        })
    }

    /// A map from a model's `id2label` (as in `config.json`); the ids must be exactly
    /// `0..n`.
    pub fn from_id2label(id2label: &BTreeMap<usize, String>) -> Result<Self> {
        for (expected, id) in id2label.keys().enumerate() {
            if *id != expected {
                return Err(DataError::Options(format!(
                    "id2label must number classes 0..{}, but id {expected} is missing",
                    id2label.len()
                )));
            }
        }
        Self::from_names(id2label.values().cloned().collect())
    }

    /// Number of classes.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Class names in index order, if the classes are named.
    pub fn names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    /// The class index of a label. `index` (the record's) is only used in the error.
    pub fn class_index(&self, index: usize, label: &LabelValue) -> Result<usize> {
        match label {
            LabelValue::Index(i) if *i < self.num_labels => Ok(*i),
            LabelValue::Index(i) => Err(DataError::Label {
                index,
                line: None,
                message: format!(
                    "label {i} is out of range: the model has {} classes (0..{})",
                    self.num_labels,
                    self.num_labels.saturating_sub(1)
                ),
            }),
            LabelValue::Name(name) => match &self.names {
                Some(names) => names.iter().position(|n| n == name).ok_or_else(|| {
                    let known: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
                    DataError::Label {
                        index,
                        line: None,
                        message: format!(
                            "unknown label {name:?}; expected one of {}",
                            known.join(", ")
                        ),
                    }
                }),
                None => Err(DataError::Label {
                    index,
                    line: None,
                    message: format!(
                        "label {name:?} is a name, but the classes are unnamed; \
                         use class indices 0..{}",
                        self.num_labels.saturating_sub(1)
                    ),
                }),
            },
        }
    }
}

/// Keys that datasets use for a class label under another name.
fn looks_like_label(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k != "label"
        && (k.contains("label")
            || ["class", "classes", "target", "category", "sentiment", "y"].contains(&k.as_str()))
}
