//! Everything that can go wrong reading a GGUF file.

#[allow(unused_imports)]
use super::*;

/// Everything that can go wrong reading a GGUF file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read file: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (starts with {magic:?}, a GGUF file starts with \"GGUF\")")]
    NotGguf { path: PathBuf, magic: String },
    #[error("{path}: truncated or corrupt GGUF file: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: unsupported GGUF architecture {arch:?} (general.architecture); supported: llama, mistral, qwen2")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: tensor {tensor:?} has GGUF type {ggml_type} (type id {type_id}), which candle cannot dequantize")]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        ggml_type: String,
        type_id: u32,
    },
    #[error("{path}: missing required metadata key {key:?}")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key {key:?}: {detail}")]
    BadMetadata {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error("{path}: unknown tensor name {name:?} (no Hugging Face equivalent for {arch:?})")]
    UnknownTensor {
        path: PathBuf,
        name: String,
        arch: String,
    },
    #[error("{path}: missing tensor {name:?}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {tensor:?}: {detail}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        detail: String,
    },
    #[error("{path}: unsupported tokenizer model {model:?} (tokenizer.ggml.model); supported: gpt2 (byte-level BPE)")]
    UnsupportedTokenizer { path: PathBuf, model: String },
    #[error("{path}: cannot build tokenizer: {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    #[error("{path}: tensor {tensor:?}: {source}")]
    Candle {
        path: PathBuf,
        tensor: String,
        #[source]
        source: Box<candle_core::Error>,
    },
}
