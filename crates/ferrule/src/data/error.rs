//! The error type shared by everything in [`crate::data`].

use std::path::PathBuf;

/// Everything that can go wrong while reading, templating, encoding or batching training data.
///
/// Every message names where the problem is (a file and line, a model directory, or the index
/// of a record) and what was expected, so it can be shown to a user as is. Errors coming from
/// libraries (I/O, JSON, templates, tokenizers) are folded into the message rather than exposed
/// as a `source`, so chained printers such as `anyhow`'s `{:#}` do not repeat them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file could not be read.
    #[error("{}: cannot read: {message}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's message.
        message: String,
    },

    /// A JSONL file holds no records (it is empty or has only blank lines).
    #[error("{}: no records (the file is empty or has only blank lines)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },

    /// A line of a text file is not valid UTF-8.
    #[error("{}:{line}: not valid UTF-8 (invalid byte at column {column})", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// 1-based byte column of the first invalid byte.
        column: usize,
    },

    /// A line of a JSONL file is not valid JSON.
    #[error("{}:{line}: invalid JSON at column {column}: {message}", path.display())]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// 1-based column reported by the JSON parser.
        column: usize,
        /// The parser's message.
        message: String,
    },

    /// A value in a file does not have the expected shape or type.
    #[error("{}:{line}: expected {expected}, found {found}", path.display())]
    Unexpected {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was expected, e.g. `"text" to be a string`.
        expected: String,
        /// What was found instead, e.g. `the number 5`.
        found: String,
    },

    /// The records of one JSONL file do not all have the same shape.
    #[error(
        "{}:{line}: this record has the {found} shape but the one on line {first_line} has the \
         {expected} shape; all records of a file must have the same shape",
        path.display()
    )]
    MixedShapes {
        /// The file.
        path: PathBuf,
        /// 1-based line number of the odd record.
        line: usize,
        /// Shape of the odd record.
        found: &'static str,
        /// Shape of the first record.
        expected: &'static str,
        /// 1-based line number of the first record.
        first_line: usize,
    },

    /// A model configuration file (e.g. `tokenizer_config.json`) is malformed.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A model directory has no `tokenizer.json`.
    #[error(
        "{}: no tokenizer.json (ferrule needs the Hugging Face \"fast\" tokenizer file; \
         save one with `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)",
        dir.display()
    )]
    MissingTokenizer {
        /// The model directory.
        dir: PathBuf,
    },

    /// The tokenizer failed to load, encode or decode.
    #[error("{context}: tokenizer error: {message}")]
    Tokenizer {
        /// Where: a file, or a record.
        context: String,
        /// The tokenizer's message.
        message: String,
    },

    /// A chat template does not compile, or failed while rendering.
    #[error("chat template from {origin}: {message}")]
    Template {
        /// Where the template came from (a file, or `<string>`).
        origin: String,
        /// The template engine's message, with the template line where known.
        message: String,
    },

    /// Encoding options are inconsistent.
    #[error("invalid encoding options: {0}")]
    Options(String),

    /// A record could not be encoded; `message` says why.
    #[error("{}: {message}", place(*index, line))]
    Record {
        /// 0-based index of the record in its file.
        index: usize,
        /// Its file and line, when known ([`DataError::located`]).
        line: Option<RecordLine>,
        /// What is wrong.
        message: String,
    },

    /// A record is longer than `max_len` and truncation is off.
    #[error(
        "{}: {len} tokens, more than max_len {max_len} (--max-len); raise it, or let long \
         records be cut at it (truncate = true: drop --no-truncate)",
        place(*index, line)
    )]
    TooLong {
        /// 0-based index of the record in its file.
        index: usize,
        /// Its file and line, when known.
        line: Option<RecordLine>,
        /// Its length in tokens.
        len: usize,
        /// The limit.
        max_len: usize,
    },

    /// After masking (and truncation) no token of a record contributes to the loss, and
    /// `max_len` is not the reason ([`DataError::PastMaxLen`] is).
    #[error(
        "{}: no token is trained (every label is -100{}); \
         check that the record has a non-empty completion",
        place(*index, line),
        if *truncated { " after truncation" } else { "" }
    )]
    NoTrainableTokens {
        /// 0-based index of the record in its file.
        index: usize,
        /// Its file and line, when known.
        line: Option<RecordLine>,
        /// Whether the record was truncated.
        truncated: bool,
    },

    /// The prompt of a record fills `max_len`: its trained tokens (the answer) all lie beyond
    /// the cut, so nothing of it is left to train.
    #[error(
        "{}: its prompt takes {prompt_len} tokens, so cutting the record at max_len {max_len} \
         (--max-len) leaves nothing of its answer to train; raise --max-len above {prompt_len}",
        place(*index, line)
    )]
    PastMaxLen {
        /// 0-based index of the record in its file.
        index: usize,
        /// Its file and line, when known.
        line: Option<RecordLine>,
        /// Tokens before the first trained one.
        prompt_len: usize,
        /// The limit.
        max_len: usize,
    },

    /// Every record of a data set was skipped.
    #[error("no record has a trained token: {}", skipped_summary(*skipped, past_max_len))]
    NoTrainableRecords {
        /// How many records were skipped.
        skipped: usize,
        /// Of those, the ones whose prompt filled `max_len` ([`DataError::PastMaxLen`]).
        past_max_len: Option<PastMaxLen>,
    },

    /// A class label could not be mapped to a class index.
    #[error("{}: {message}", place(*index, line))]
    Label {
        /// 0-based index of the record.
        index: usize,
        /// Its file and line, when known.
        line: Option<RecordLine>,
        /// What is wrong.
        message: String,
    },
}

/// Where a record is: its file and 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordLine {
    /// The file.
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
}

/// The records skipped because their prompt filled `max_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastMaxLen {
    /// How many.
    pub count: usize,
    /// The shortest and longest of their prompts, in tokens.
    pub prompt_tokens: (usize, usize),
    /// The limit.
    pub max_len: usize,
}

impl std::fmt::Display for PastMaxLen {
    /// `3 records whose prompts (40–57 tokens) fill max_len 32 (--max-len), so nothing of
    /// their answers is left to train; raise --max-len above 57 to train on them`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (lo, hi) = self.prompt_tokens;
        let range = if lo == hi {
            format!("{lo} tokens")
        } else {
            format!("{lo}–{hi} tokens")
        };
        let (records, prompts, fill, their, them) = if self.count == 1 {
            ("record", "prompt", "fills", "its answer", "it")
        } else {
            ("records", "prompts", "fill", "their answers", "them")
        };
        write!(
            f,
            "{} {records} whose {prompts} ({range}) {fill} max_len {} (--max-len), so nothing \
             of {their} is left to train; raise --max-len above {hi} to train on {them}",
            self.count, self.max_len
        )
    }
}

fn place(index: usize, line: &Option<RecordLine>) -> String {
    match line {
        Some(l) => format!("{}:{}", l.path.display(), l.line),
        None => format!("record {index}"),
    }
}

fn skipped_summary(skipped: usize, past_max_len: &Option<PastMaxLen>) -> String {
    let other = skipped - past_max_len.as_ref().map_or(0, |p| p.count);
    let mut parts = Vec::new();
    if let Some(p) = past_max_len {
        parts.push(p.to_string());
    }
    if other > 0 {
        parts.push(format!(
            "{other} record{} with no completion to train (every label -100)",
            if other == 1 { "" } else { "s" }
        ));
    }
    parts.join("; ")
}

impl DataError {
    /// This error, if it is about one record of `records`, placed at that record's line of the
    /// file (`train.jsonl:3: ...` rather than `record 1: ...`).
    pub fn located(mut self, records: &super::Records) -> Self {
        if let DataError::Record { index, line, .. }
        | DataError::TooLong { index, line, .. }
        | DataError::NoTrainableTokens { index, line, .. }
        | DataError::PastMaxLen { index, line, .. }
        | DataError::Label { index, line, .. } = &mut self
        {
            *line = Some(RecordLine {
                path: records.path.clone(),
                line: records.line(*index),
            });
        }
        self
    }

    pub(crate) fn io(path: impl Into<PathBuf>, err: &std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            message: err.to_string(),
        }
    }

    /// minijinja's message already ends with `(in <template name>:<line>)`.
    pub(crate) fn template(origin: &str, err: &minijinja::Error) -> Self {
        DataError::Template {
            origin: origin.to_string(),
            message: err.to_string(),
        }
    }
}

/// `Result` with [`DataError`].
pub type Result<T, E = DataError> = std::result::Result<T, E>;
