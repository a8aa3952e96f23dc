//! Reading training records from JSON Lines files.
//!
//! Each non-blank line of a file is one JSON object. Its shape is detected from its keys:
//!
//! | keys                                   | shape                        |
//! |----------------------------------------|------------------------------|
//! | `"messages": [{"role", "content"}, …]` | [`Example::Chat`]            |
//! | `"instruction"`, `"output"` (`"input"` optional) | [`Example::Alpaca`] |
//! | `"text"`, `"label"`                    | [`Example::Classification`]  |
//! | `"text"`                               | [`Example::Text`]            |
//!
//! The first matching row wins, so `{"messages": …, "text": …}` is a chat record. Other keys
//! (an `"id"`, a `"source"`, …) are ignored, as are keys of chat messages other than `role`
//! and `content`. All records of one file must have the same shape, and classification
//! labels must be all integers or all strings.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{DataError, Result};

/// One message of a conversation, as chat templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, … (passed to the chat template as is).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A classification label as written in the data file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LabelValue {
    /// A class index (`"label": 2`).
    Index(usize),
    /// A class name (`"label": "positive"`), mapped to an index by a
    /// [`LabelMap`](super::LabelMap).
    Name(String),
}

impl std::fmt::Display for LabelValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabelValue::Index(i) => write!(f, "{i}"),
            LabelValue::Name(s) => write!(f, "{s:?}"),
        }
    }
}

/// One training record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// Plain text; every token is trained (causal language modelling).
    Text {
        /// The text.
        text: String,
    },
    /// An instruction-following pair in the Stanford Alpaca format.
    Alpaca {
        /// The task.
        instruction: String,
        /// Optional context for the task (empty when absent).
        input: String,
        /// The expected answer; the only part trained with `completion_only`.
        output: String,
    },
    /// A conversation, rendered with the model's chat template.
    Chat {
        /// The turns, in order.
        messages: Vec<Message>,
    },
    /// A text with a class label (sequence classification).
    Classification {
        /// The text.
        text: String,
        /// Its class.
        label: LabelValue,
    },
}

/// The shape of an [`Example`], used to check that a file is homogeneous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// [`Example::Text`].
    Text,
    /// [`Example::Alpaca`].
    Alpaca,
    /// [`Example::Chat`].
    Chat,
    /// [`Example::Classification`].
    Classification,
}

impl Shape {
    /// A lower-case name for messages: `text`, `alpaca`, `chat` or `classification`.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Text => "text",
            Shape::Alpaca => "alpaca",
            Shape::Chat => "chat",
            Shape::Classification => "classification",
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Example {
    /// This record's shape.
    pub fn shape(&self) -> Shape {
        match self {
            Example::Text { .. } => Shape::Text,
            Example::Alpaca { .. } => Shape::Alpaca,
            Example::Chat { .. } => Shape::Chat,
            Example::Classification { .. } => Shape::Classification,
        }
    }
}

/// What a record must look like, for "expected …" messages.
const EXPECTED_RECORD: &str = "a JSON object with \"text\" (and optionally \"label\"), \
     \"instruction\" and \"output\", or \"messages\"";

/// Reads a JSONL file into examples.
///
/// Blank lines are skipped; a UTF-8 byte-order mark and `\r\n` line ends are accepted.
/// Errors name the file and the 1-based line: invalid UTF-8, invalid JSON (with the column),
/// a record of unknown shape or with a field of the wrong type, records of different shapes,
/// labels of different kinds, and a file without any record.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    Ok(read_records(path)?.examples)
}

/// Parses JSONL content; `path` is only used in error messages.
pub fn parse_jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<Example>> {
    Ok(parse_records(path, bytes)?.examples)
}

/// The records of one JSONL file with the line each came from, so that an error about a record
/// (a chat template that fails on it, a label, its length) names `file:line` as JSON errors do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Records {
    /// The file.
    pub path: PathBuf,
    /// The records, in file order.
    pub examples: Vec<Example>,
    /// The 1-based line of each record (blank lines hold none).
    pub lines: Vec<usize>,
    /// The keys of the first record, for messages about a key the data lacks.
    pub first_keys: Vec<String>,
}

impl Records {
    /// Keeps the first `n` records.
    pub fn truncate(&mut self, n: usize) {
        self.examples.truncate(n);
        self.lines.truncate(n);
    }

    /// The 1-based line of record `index`.
    pub fn line(&self, index: usize) -> usize {
        self.lines.get(index).copied().unwrap_or(index + 1)
    }
}

/// [`read_jsonl`], keeping where each record is.
pub fn read_records(path: &Path) -> Result<Records> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, &e))?;
    parse_records(path, &bytes)
}

/// [`parse_jsonl`], keeping where each record is.
pub fn parse_records(path: &Path, bytes: &[u8]) -> Result<Records> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut examples = Vec::new();
    let mut lines = Vec::new();
    let mut first_keys = Vec::new();
    // (shape, line) of the first record, and (is_index, line) of the first label.
    let mut first_shape: Option<(Shape, usize)> = None;
    let mut first_label: Option<(bool, usize)> = None;

    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|e| DataError::NotUtf8 {
            path: path.to_path_buf(),
            line,
            column: e.valid_up_to() + 1,
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text).map_err(|e| {
            // serde's message ends with " at line 1 column N"; we report the position ourselves.
            let full = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            DataError::InvalidJson {
                path: path.to_path_buf(),
                line,
                column: e.column(),
                message: full.strip_suffix(&suffix).unwrap_or(&full).to_string(),
            }
        })?;
        let ctx = Ctx { path, line };
        if let (Value::Object(o), true) = (&value, examples.is_empty()) {
            first_keys = o.keys().cloned().collect();
        }
        let example = ctx.example(value)?;

        match first_shape {
            None => first_shape = Some((example.shape(), line)),
            Some((shape, first_line)) if shape != example.shape() => {
                return Err(DataError::MixedShapes {
                    path: path.to_path_buf(),
                    line,
                    found: example.shape().name(),
                    expected: shape.name(),
                    first_line,
                });
            }
            Some(_) => {}
        }
        if let Example::Classification { label, .. } = &example {
            let is_index = matches!(label, LabelValue::Index(_));
            match first_label {
                None => first_label = Some((is_index, line)),
                Some((first_is_index, first_line)) if first_is_index != is_index => {
                    let kind = |index: bool| if index { "an integer" } else { "a string" };
                    return Err(ctx.unexpected(
                        format!(
                            "\"label\" to be {} like the label on line {first_line}",
                            kind(first_is_index)
                        ),
                        describe(&label_json(label)),
                    ));
                }
                Some(_) => {}
            }
        }
        examples.push(example);
        lines.push(line);
    }

    if examples.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(Records {
        path: path.to_path_buf(),
        examples,
        lines,
        first_keys,
    })
}

fn label_json(label: &LabelValue) -> Value {
    match label {
        LabelValue::Index(i) => Value::from(*i),
        LabelValue::Name(s) => Value::from(s.as_str()),
    }
}

/// Where a record is, for error messages.
struct Ctx<'a> {
    path: &'a Path,
    line: usize,
}

impl Ctx<'_> {
    fn unexpected(&self, expected: impl Into<String>, found: impl Into<String>) -> DataError {
        DataError::Unexpected {
            path: PathBuf::from(self.path),
            line: self.line,
            expected: expected.into(),
            found: found.into(),
        }
    }

    fn example(&self, value: Value) -> Result<Example> {
        let Value::Object(obj) = value else {
            return Err(self.unexpected(EXPECTED_RECORD, describe(&value)));
        };
        if let Some(messages) = obj.get("messages") {
            return self.chat(messages);
        }
        if obj.contains_key("instruction") || obj.contains_key("output") {
            let instruction = self.string_field(&obj, "instruction")?;
            let output = self.string_field(&obj, "output")?;
            let input = match obj.get("input") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(self.unexpected("\"input\" to be a string", describe(other)))
                }
            };
            return Ok(Example::Alpaca {
                instruction,
                input,
                output,
            });
        }
        if obj.contains_key("text") {
            let text = self.string_field(&obj, "text")?;
            return match obj.get("label") {
                None => Ok(Example::Text { text }),
                Some(label) => Ok(Example::Classification {
                    text,
                    label: self.label(label)?,
                }),
            };
        }
        Err(self.unexpected(EXPECTED_RECORD, describe(&Value::Object(obj))))
    }

    fn string_field(&self, obj: &Map<String, Value>, key: &str) -> Result<String> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => {
                Err(self.unexpected(format!("\"{key}\" to be a string"), describe(other)))
            }
            None => Err(self.unexpected(
                format!("key \"{key}\" (a string) next to {}", keys_list(obj)),
                format!("no \"{key}\""),
            )),
        }
    }

    fn label(&self, value: &Value) -> Result<LabelValue> {
        match value {
            Value::Number(n) => {
                if let Some(i) = n.as_u64().and_then(|i| usize::try_from(i).ok()) {
                    return Ok(LabelValue::Index(i));
                }
            }
            Value::String(s) => return Ok(LabelValue::Name(s.clone())),
            _ => {}
        }
        Err(self.unexpected(
            "\"label\" to be a non-negative integer or a string",
            describe(value),
        ))
    }

    fn chat(&self, messages: &Value) -> Result<Example> {
        let Value::Array(items) = messages else {
            return Err(self.unexpected(
                "\"messages\" to be an array of {\"role\", \"content\"} objects",
                describe(messages),
            ));
        };
        if items.is_empty() {
            return Err(self.unexpected("at least one message in \"messages\"", "an empty array"));
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let Value::Object(obj) = item else {
                return Err(self.unexpected(
                    format!("messages[{i}] to be a {{\"role\", \"content\"}} object"),
                    describe(item),
                ));
            };
            let field = |key: &str| match obj.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(self.unexpected(
                    format!("messages[{i}].{key} to be a string"),
                    describe(other),
                )),
                None => Err(self.unexpected(
                    format!("messages[{i}] to have \"role\" and \"content\""),
                    format!("an object with {}", keys_list(obj)),
                )),
            };
            let role = field("role")?;
            let content = field("content")?;
            out.push(Message { role, content });
        }
        Ok(Example::Chat { messages: out })
    }
}

/// `keys "a", "b"` or `no keys`.
fn keys_list(obj: &Map<String, Value>) -> String {
    if obj.is_empty() {
        return "no keys".to_string();
    }
    let keys: Vec<String> = obj.keys().map(|k| format!("{k:?}")).collect();
    format!(
        "key{} {}",
        if keys.len() == 1 { "" } else { "s" },
        keys.join(", ")
    )
}

/// A short description of a JSON value for "found …" messages.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => {
            const MAX: usize = 40;
            if s.chars().count() > MAX {
                let head: String = s.chars().take(MAX).collect();
                format!("the string {:?}…", head)
            } else {
                format!("the string {s:?}")
            }
        }
        Value::Array(a) => format!(
            "an array of {} element{}",
            a.len(),
            if a.len() == 1 { "" } else { "s" }
        ),
        Value::Object(o) => format!("an object with {}", keys_list(o)),
    }
}
