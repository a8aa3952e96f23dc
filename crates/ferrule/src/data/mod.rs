//! Training data: reading records, chat templates, tokenization with loss masks, batching.
//!
//! The usual pipeline is:
//!
//! ```no_run
//! use std::path::Path;
//! use ferrule::data::{
//!     collate, load_tokenizer, pad_token_id, read_jsonl, ChatTemplate, EncodeOptions, Encoder,
//!     PaddingSide, TokenizerConfig,
//! };
//!
//! # fn main() -> anyhow::Result<()> {
//! let model = Path::new("models/SmolLM2-135M-Instruct");
//! let tokenizer = load_tokenizer(model)?;
//! let config = TokenizerConfig::from_model_dir(model)?;
//! let template = ChatTemplate::from_model_dir(model)?;
//! let examples = read_jsonl(Path::new("train.jsonl"))?;
//! let encoder = Encoder::new(&tokenizer, template.as_ref(), EncodeOptions::default())?;
//! let set = encoder.encode_all(&examples)?;
//! let items: Vec<_> = set.items.iter().take(8).collect();
//! let batch = collate(&items, pad_token_id(&tokenizer, config.as_ref()), PaddingSide::Right,
//!                     &candle_core::Device::Cpu)?;
//! # Ok(()) }
//! ```
//!
//! * [`read_jsonl`] parses a JSON Lines file into [`Example`]s (text, Alpaca, chat or
//!   classification records), with errors naming the file and line.
//! * [`ChatTemplate`] renders conversations with a model's Jinja chat template, as
//!   `transformers` does.
//! * [`Encoder`] turns examples into token ids and labels (`-100` where there is no loss), with
//!   loss only on completions when asked; see [`encode`] for the exact rules.
//! * [`LabelMap`] maps classification labels to class indices.
//! * [`collate`] pads encoded records into a [`Batch`] of tensors, [`pack`] lays them end to
//!   end without padding, [`best_fit_decreasing`] packs them into token budgets.

mod batch;
mod chat;
pub mod encode;
mod error;
mod jsonl;
mod labels;
mod packing;
pub mod preview;
mod tokenizer;

pub use batch::{collate, make_batch, pack, Batch, Padding, PaddingSide};
pub use chat::ChatTemplate;
pub use encode::{
    alpaca_prompt, EncodeOptions, Encoded, EncodedSet, Encoder, Truncation, IGNORE_INDEX,
};
pub use error::{DataError, PastMaxLen, RecordLine, Result};
pub use jsonl::{
    parse_jsonl, parse_records, read_jsonl, read_records, Example, LabelValue, Message, Records,
    Shape,
};
pub use labels::LabelMap;
pub use packing::best_fit_decreasing;
pub use tokenizer::{eos_token_id, load_tokenizer, pad_token_id, TokenizerConfig};
