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
    #[error("record {index}: {message}")]
    Record {
        /// 0-based index of the record in its file.
        index: usize,
        /// What is wrong.
        message: String,
    },

    /// A record is longer than `max_len` and truncation is off.
    #[error(
        "record {index}: {len} tokens, more than max_len {max_len} \
         (raise max_len or truncate long records)"
    )]
    TooLong {
        /// 0-based index of the record in its file.
        index: usize,
        /// Its length in tokens.
        len: usize,
        /// The limit.
        max_len: usize,
    },

    /// After masking (and truncation) no token of a record contributes to the loss.
    #[error(
        "record {index}: no token is trained (every label is -100{}); \
         check that the record has a non-empty completion within max_len",
        if *truncated { " after truncation" } else { "" }
    )]
    NoTrainableTokens {
        /// 0-based index of the record in its file.
        index: usize,
        /// Whether the record was truncated.
        truncated: bool,
    },

    /// Every record of a data set was skipped.
    #[error(
        "no record has a trained token ({skipped} record(s) skipped because every label was -100)"
    )]
    NoTrainableRecords {
        /// How many records were skipped.
        skipped: usize,
    },

    /// A class label could not be mapped to a class index.
    #[error("record {index}: {message}")]
    Label {
        /// 0-based index of the record.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

impl DataError {
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
