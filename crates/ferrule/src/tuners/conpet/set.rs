//! A ConPET task set on disk: one folder per task (a PEFT LoRA folder with its classifier
//! head in `modules_to_save`, plus `replay.jsonl`), the selector's LoRA folder, and the
//! manifest `conpet.json` that says which tasks exist, in which order, and which label columns
//! each owns. The manifest is written last, atomically: a set holds the tasks it lists and
//! nothing half-made (docs/ARCHITECTURE.md, "ConPET task sets").

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::ConpetConfig;
use crate::data::{Example, LabelMap, LabelValue, Records};

/// The manifest's file name.
pub const MANIFEST: &str = "conpet.json";
/// Its `format` value.
pub const FORMAT: &str = "ferrule-conpet";
/// The task folder of the n-th task (1-based).
pub fn task_dir(n: usize) -> String {
    format!("task-{n}")
}
/// The selector folder trained when the set reached `n` tasks.
pub fn selector_dir(n: usize) -> String {
    format!("selector-{n}")
}
/// Each task folder's replay records (`{"text", "label"}` as the split gave them).
pub const REPLAY_FILE: &str = "replay.jsonl";

/// One task of a set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskEntry {
    /// Its folder, relative to the set (`task-1`).
    pub dir: String,
    /// The training file it came from (its file name, for people).
    pub data: String,
    /// Its labels in column order: integers or strings, as the split's records gave them.
    pub labels: Vec<Value>,
    /// Records it was trained on.
    pub records: usize,
}

/// `conpet.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// The base model the set was trained on, as given to `train --model`.
    pub base_model: String,
    pub config: ConpetConfig,
    /// In the order they were added; task `i` owns the label columns `columns()[i]`.
    pub tasks: Vec<TaskEntry>,
    /// The selector's folder (a LoRA whose head has one row per task); none with one task,
    /// which needs no routing.
    pub selector: Option<String>,
}

impl Manifest {
    /// A set with no task yet.
    pub fn new(base_model: &str, config: ConpetConfig) -> Self {
        Manifest {
            format: FORMAT.into(),
            version: 1,
            base_model: base_model.into(),
            config,
            tasks: vec![],
            selector: None,
        }
    }

    /// The set in `dir`: `None` when `dir` does not exist or is empty (a new set). A folder
    /// with other contents, a manifest of another format, or one whose task folders are
    /// missing is an error naming it.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST);
        if !path.is_file() {
            let empty = match std::fs::read_dir(dir) {
                Ok(mut entries) => entries.next().is_none(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
            };
            if empty {
                return Ok(None);
            }
            bail!(
                "--continual {}: not a ConPET task set (it has no {MANIFEST}); give a new or empty folder to start a set, or one that `ferrule train --method conpet --continual` wrote",
                dir.display()
            )
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a ConPET manifest", path.display()))?;
        if m.format != FORMAT || m.version != 1 {
            bail!(
                "{}: format {:?} version {}, expected {FORMAT:?} version 1",
                path.display(),
                m.format,
                m.version
            )
        }
        m.check_folders(dir)?;
        Ok(Some(m))
    }

    fn check_folders(&self, dir: &Path) -> Result<()> {
        let want_selector = self.tasks.len() >= 2;
        if self.selector.is_some() != want_selector {
            bail!(
                "{}: {} task(s) and {} selector; a set has a selector from its second task on",
                dir.join(MANIFEST).display(),
                self.tasks.len(),
                if self.selector.is_some() { "a" } else { "no" }
            )
        }
        let folders = self.tasks.iter().map(|t| &t.dir).chain(&self.selector);
        for f in folders {
            let p = dir.join(f);
            // peft_io's CONFIG_FILE; tuners/ sits below peft_io.rs.
            if !p.join("adapter_config.json").is_file() {
                bail!(
                    "{}: lists {f}, but {} holds no adapter",
                    dir.join(MANIFEST).display(),
                    p.display()
                )
            }
        }
        Ok(())
    }

    /// Writes `dir/conpet.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        let path = dir.join(MANIFEST);
        crate::util::atomic::write_atomic(&path, |f| std::io::Write::write_all(f, text.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Each task's label columns, in task order, contiguous from 0 (the reference's
    /// `generate_continual_token_map`: splits in order, each split's labels in order).
    pub fn columns(&self) -> Vec<Range<usize>> {
        let mut start = 0;
        self.tasks
            .iter()
            .map(|t| {
                let r = start..start + t.labels.len();
                start = r.end;
                r
            })
            .collect()
    }

    /// The set's column of `label`, if a task owns it.
    pub fn column_of(&self, label: &LabelValue) -> Option<usize> {
        let want = label_json(label);
        self.tasks
            .iter()
            .flat_map(|t| &t.labels)
            .position(|l| *l == want)
    }

    /// Refuses a new split whose labels an earlier task owns (the reference maps each label
    /// to one split, `continual_tag_to_split`), or of the other kind (integers against names).
    pub fn check_new_labels(&self, labels: &[LabelValue], data: &Path) -> Result<()> {
        for label in labels {
            if let Some(t) = self
                .tasks
                .iter()
                .position(|t| t.labels.contains(&label_json(label)))
            {
                bail!(
                    "--data {}: label {label} already belongs to task {} ({}) of the set; each task of a ConPET set owns its own labels",
                    data.display(),
                    t + 1,
                    self.tasks[t].data
                )
            }
        }
        let named = |v: &Value| v.is_string();
        if let (Some(old), Some(new)) = (
            self.tasks.first().and_then(|t| t.labels.first()),
            labels.first(),
        ) {
            if named(old) != named(&label_json(new)) {
                bail!(
                    "--data {}: its labels are {} but the set's are {}; use one kind for every task",
                    data.display(),
                    kind(&label_json(new)),
                    kind(old)
                )
            }
        }
        Ok(())
    }
}

fn kind(v: &Value) -> &'static str {
    if v.is_string() {
        "class names"
    } else {
        "class indices"
    }
}

/// A label as the manifest stores it.
pub fn label_json(label: &LabelValue) -> Value {
    match label {
        LabelValue::Index(i) => Value::from(*i),
        LabelValue::Name(s) => Value::from(s.as_str()),
    }
}

/// The distinct labels of a split's records, in column order: indices ascending, names in
/// byte order (as [`LabelMap`] numbers them). Records without a label, or mixed kinds, are
/// errors naming the file and line ([`LabelMap::from_records`]).
pub fn split_labels(records: &Records) -> Result<Vec<LabelValue>> {
    LabelMap::from_records(records)?;
    let mut idx = BTreeSet::new();
    let mut names = BTreeSet::new();
    for e in &records.examples {
        match e {
            Example::Classification {
                label: LabelValue::Index(i),
                ..
            } => {
                idx.insert(*i);
            }
            Example::Classification {
                label: LabelValue::Name(n),
                ..
            } => {
                names.insert(n.clone());
            }
            _ => bail!(
                "{}: every record of a ConPET split needs \"text\" and \"label\"",
                records.path.display()
            ),
        }
    }
    Ok(idx
        .into_iter()
        .map(LabelValue::Index)
        .chain(names.into_iter().map(LabelValue::Name))
        .collect())
}

/// `records` with each label replaced by the class index `map` gives it; a label it gives
/// none is an error naming the file, line and label, with `owners` saying what was expected.
pub fn remap(
    records: &Records,
    map: impl Fn(&LabelValue) -> Option<usize>,
    owners: &str,
) -> Result<Records> {
    let mut out = records.clone();
    for (i, e) in out.examples.iter_mut().enumerate() {
        let Example::Classification { label, .. } = e else {
            bail!(
                "{}:{}: a ConPET record needs \"text\" and \"label\"",
                records.path.display(),
                records.line(i)
            )
        };
        let Some(c) = map(label) else {
            bail!(
                "{}:{}: label {label} belongs to no task of {owners}",
                records.path.display(),
                records.line(i)
            )
        };
        *label = LabelValue::Index(c);
    }
    Ok(out)
}

/// Writes `(text, label)` pairs as JSON Lines (`{"text", "label"}`), atomically.
pub fn write_records(path: &Path, rows: &[(&str, Value)]) -> Result<()> {
    let mut text = String::new();
    for (t, l) in rows {
        text.push_str(&serde_json::json!({"text": t, "label": l}).to_string());
        text.push('\n');
    }
    crate::util::atomic::write_atomic(path, |f| std::io::Write::write_all(f, text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}
