//! Turning [`Example`]s into token ids and loss labels.
//!
//! Labels follow the Hugging Face convention: `labels[i]` is `input_ids[i]` when token `i`
//! counts towards the loss and [`IGNORE_INDEX`] (-100) when it does not; the shift by one
//! position (position `i` predicts token `i + 1`) is the loss function's job. Hence the first
//! label is never a target, whatever its value.
//!
//! # Which tokens are trained
//!
//! * [`Example::Text`]: every token, including the special tokens the tokenizer adds itself
//!   (`encode(text, add_special_tokens = true)`).
//! * [`Example::Alpaca`]: with a chat template, the record becomes a user message
//!   (`instruction`, plus `"\n\n" + input` when `input` is not empty) and an assistant reply
//!   (`output`), encoded as a chat. Without one, the Stanford Alpaca prompt is followed by
//!   `output` and the end-of-sequence token; the output and that token are trained.
//! * [`Example::Chat`]: rendered with the chat template. Only the text of assistant messages
//!   (role `"assistant"`) and the end-of-turn marker the template closes them with (e.g.
//!   `<|im_end|>`, `<|eot_id|>`) are trained; whitespace the template puts after that marker is
//!   not.
//! * [`Example::Classification`]: the text's tokens with special tokens; no label is trained
//!   and [`Encoded::class_label`] holds the class index.
//!
//! With [`EncodeOptions::completion_only`] off, every token of text, Alpaca and chat records is
//! trained.
//!
//! # Locating assistant text
//!
//! For the assistant message `i` of a conversation, the template renders `messages[..i]` with
//! the generation prompt and `messages[..=i]` without it. The first must be a prefix of the
//! second and the second a prefix of the whole conversation; the bytes in between (trailing
//! whitespace dropped) are the reply and its end-of-turn marker. A token is trained when its
//! byte offsets overlap such a span. Templates that render earlier turns differently once
//! later turns exist (e.g. ones that strip past reasoning) are rejected with an error naming
//! the record and message.
//!
//! # Special tokens of templated text
//!
//! Chat templates usually write the beginning-of-sequence token themselves
//! (`{{ bos_token }}`), while tokenizers may add it too. Templated text is therefore encoded
//! with the tokenizer's special tokens, and the ones it adds at the start (or end) are dropped
//! when the rendered text already starts (or ends) with the same tokens, so a BOS never appears
//! twice yet is not lost when the template omits it. Such added tokens are not trained, except
//! that a token added at the end is trained when the token before it is.
//!
//! # Length
//!
//! Records longer than [`EncodeOptions::max_len`] are cut at the end ([`Truncation::Right`]) or
//! rejected ([`Truncation::Error`]). A text, Alpaca or chat record left without any trained
//! target (all labels -100 after position 0) fails [`Encoder::encode`]: with
//! [`DataError::PastMaxLen`] when its prompt fills `max_len` so the cut took its whole
//! completion, with [`DataError::NoTrainableTokens`] when it has no completion to train at all.
//! [`Encoder::encode_all`] skips such records and reports their indices in
//! [`EncodedSet::skipped`] (and those cut before their answer, with their prompt lengths, in
//! [`EncodedSet::past_max_len`]), and fails only if no record is left.
//!
//! TRL's `SFTTrainer` cuts at `max_length` too and keeps such a record in the batch with every
//! label ignored (its older `DataCollatorForCompletionOnlyLM` warned "This instance will be
//! ignored in loss calculation ... consider increasing the `max_seq_length`"); ferrule drops it
//! instead, since it adds nothing to the loss, and counts it so the user can raise the limit.

use std::ops::Range;

use rayon::prelude::*;
use tokenizers::Tokenizer;

use super::chat::ChatTemplate;
use super::error::{DataError, PastMaxLen, Result};
use super::jsonl::{Example, Message, Records};
use super::labels::LabelMap;

/// Label of a position that does not count towards the loss.
pub const IGNORE_INDEX: i64 = -100;

/// One encoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Per-token loss labels: the token id, or [`IGNORE_INDEX`] where there is no loss.
    pub labels: Vec<i64>,
    /// The class index of a classification record.
    pub class_label: Option<usize>,
}

impl Encoded {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there is no token.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of positions that are loss targets (labels other than -100, after position 0).
    pub fn num_targets(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// What to do with records longer than [`EncodeOptions::max_len`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Fail with [`DataError::TooLong`].
    #[default]
    Error,
    /// Keep the first `max_len` tokens.
    Right,
}

/// Options of an [`Encoder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Maximum number of tokens of a record (at least 1).
    pub max_len: usize,
    /// What to do with longer records.
    pub truncation: Truncation,
    /// Train only on completions (Alpaca outputs, assistant messages); otherwise on every
    /// token.
    pub completion_only: bool,
}

impl Default for EncodeOptions {
    /// `max_len` 2048, [`Truncation::Error`], `completion_only`.
    fn default() -> Self {
        EncodeOptions {
            max_len: 2048,
            truncation: Truncation::Error,
            completion_only: true,
        }
    }
}

/// The result of [`Encoder::encode_all`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedSet {
    /// The encoded records, in file order.
    pub items: Vec<Encoded>,
    /// For each item, the index of its record in the input.
    pub record_indices: Vec<usize>,
    /// Indices of records skipped because no token was left to train.
    pub skipped: Vec<usize>,
    /// Of the skipped records, those whose prompt filled `max_len` so that truncation cut their
    /// whole completion: `(index, prompt tokens)`.
    pub past_max_len: Vec<(usize, usize)>,
    /// How many of the kept records were truncated.
    pub truncated: usize,
}

/// The Stanford Alpaca prompt for records with an input.
const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an \
input that provides further context. Write a response that appropriately completes the request.\n\n";
/// The Stanford Alpaca prompt for records without an input.
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n";

/// The Stanford Alpaca prompt of a record, ending with `"### Response:\n"`.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!("{ALPACA_NO_INPUT}### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        format!("{ALPACA_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    }
}

/// Which parts of a text are trained.
enum Train<'s> {
    /// Every token.
    All,
    /// Tokens overlapping these byte ranges.
    Spans(&'s [Range<usize>]),
}

/// Encodes [`Example`]s with a tokenizer and, for chat records, a chat template.
#[derive(Clone)]
pub struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    label_map: Option<&'a LabelMap>,
    eos_token_id: Option<u32>,
    options: EncodeOptions,
}

impl std::fmt::Debug for Encoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("template", &self.template.map(ChatTemplate::origin))
            .field("label_map", &self.label_map)
            .field("eos_token_id", &self.eos_token_id)
            .field("options", &self.options)
            .finish()
    }
}

impl<'a> Encoder<'a> {
    /// An encoder. The end-of-sequence id (appended to Alpaca records when there is no
    /// template) is the template's `eos_token`, if any; set it with
    /// [`with_eos_token_id`](Self::with_eos_token_id) otherwise.
    ///
    /// Fails if `max_len` is 0, or if the tokenizer truncates or pads by itself (load it with
    /// [`load_tokenizer`](super::load_tokenizer), which turns both off).
    pub fn new(
        tokenizer: &'a Tokenizer,
        template: Option<&'a ChatTemplate>,
        options: EncodeOptions,
    ) -> Result<Self> {
        if options.max_len == 0 {
            return Err(DataError::Options("max_len must be at least 1".to_string()));
        }
        if tokenizer.get_truncation().is_some() || tokenizer.get_padding().is_some() {
            return Err(DataError::Options(
                "the tokenizer truncates or pads by itself, which would corrupt label masks; \
                 load it with ferrule::data::load_tokenizer or call \
                 with_truncation(None) and with_padding(None)"
                    .to_string(),
            ));
        }
        let eos_token_id = template
            .and_then(|t| t.eos_token())
            .and_then(|t| tokenizer.token_to_id(t));
        Ok(Encoder {
            tokenizer,
            template,
            label_map: None,
            eos_token_id,
            options,
        })
    }

    /// Sets the map from classification labels to class indices (needed for classification
    /// records: a sequence-classification task).
    pub fn with_label_map(mut self, label_map: &'a LabelMap) -> Self {
        self.label_map = Some(label_map);
        self
    }

    /// Sets the end-of-sequence id appended to Alpaca records without a chat template.
    pub fn with_eos_token_id(mut self, eos_token_id: Option<u32>) -> Self {
        self.eos_token_id = eos_token_id;
        self
    }

    /// The options.
    pub fn options(&self) -> &EncodeOptions {
        &self.options
    }

    /// Encodes one record; `index` (its position in the file, 0-based) is used in errors.
    pub fn encode(&self, index: usize, example: &Example) -> Result<Encoded> {
        self.encode_with_length(index, example)
            .map(|(encoded, _)| encoded)
    }

    /// [`encode_all`](Self::encode_all) over the records of a file, with errors naming the
    /// file and line of the record they are about.
    pub fn encode_records(&self, records: &Records) -> Result<EncodedSet> {
        self.encode_all(&records.examples)
            .map_err(|e| e.located(records))
    }

    /// Encodes all records in parallel, skipping those left without a trained token (see the
    /// [module documentation](self)). Any other error is returned for the first failing record.
    pub fn encode_all(&self, examples: &[Example]) -> Result<EncodedSet> {
        let results: Vec<Result<(Encoded, usize)>> = examples
            .par_iter()
            .enumerate()
            .map(|(index, example)| self.encode_with_length(index, example))
            .collect();
        let mut set = EncodedSet::default();
        for (index, result) in results.into_iter().enumerate() {
            match result {
                Ok((encoded, full_len)) => {
                    if full_len > encoded.len() {
                        set.truncated += 1;
                    }
                    set.items.push(encoded);
                    set.record_indices.push(index);
                }
                Err(DataError::NoTrainableTokens { .. }) => set.skipped.push(index),
                Err(DataError::PastMaxLen { prompt_len, .. }) => {
                    set.skipped.push(index);
                    set.past_max_len.push((index, prompt_len));
                }
                Err(e) => return Err(e),
            }
        }
        if set.items.is_empty() && !set.skipped.is_empty() {
            return Err(DataError::NoTrainableRecords {
                skipped: set.skipped.len(),
                past_max_len: set.past_max_len_summary(self.options.max_len),
            });
        }
        Ok(set)
    }

    /// Encodes a record and returns it with its length before truncation.
    fn encode_with_length(&self, index: usize, example: &Example) -> Result<(Encoded, usize)> {
        let completion_only = self.options.completion_only;
        let (ids, labels, class_label) = match example {
            Example::Text { text } => {
                let (ids, labels) = self.tokenize(index, text, Train::All, false)?;
                (ids, labels, None)
            }
            Example::Alpaca {
                instruction,
                input,
                output,
            } => match self.template {
                Some(_) => {
                    let mut user = instruction.clone();
                    if !input.is_empty() {
                        user.push_str("\n\n");
                        user.push_str(input);
                    }
                    let messages = [
                        Message::new("user", user),
                        Message::new("assistant", output.as_str()),
                    ];
                    let (ids, labels) = self.encode_chat(index, &messages)?;
                    (ids, labels, None)
                }
                None => {
                    let eos = self.eos_token_id.ok_or_else(|| {
                        record_error(
                            index,
                            "an Alpaca record without a chat template ends with the \
                             end-of-sequence token, but none is known (the model's \
                             tokenizer_config.json has no eos_token)",
                        )
                    })?;
                    let prompt = alpaca_prompt(instruction, input);
                    let text = format!("{prompt}{output}");
                    let output_span = prompt.len()..text.len();
                    let train = if completion_only {
                        Train::Spans(std::slice::from_ref(&output_span))
                    } else {
                        Train::All
                    };
                    let (mut ids, mut labels) = self.tokenize(index, &text, train, false)?;
                    if ids.last() != Some(&eos) {
                        ids.push(eos);
                        labels.push(i64::from(eos));
                    }
                    (ids, labels, None)
                }
            },
            Example::Chat { messages } => {
                let (ids, labels) = self.encode_chat(index, messages)?;
                (ids, labels, None)
            }
            Example::Classification { text, label } => {
                let map = self.label_map.ok_or_else(|| {
                    record_error(
                        index,
                        "a classification record (\"text\" and \"label\") trains a \
                         sequence-classification head: pass --task seq-cls (or drop \"label\" \
                         to train on the text as language modelling)",
                    )
                })?;
                let class = map.class_index(index, label)?;
                let encoding = self
                    .tokenizer
                    .encode(text.as_str(), true)
                    .map_err(|e| tokenizer_error(index, &e))?;
                let ids = encoding.get_ids().to_vec();
                let labels = vec![IGNORE_INDEX; ids.len()];
                (ids, labels, Some(class))
            }
        };
        self.finish(index, ids, labels, class_label)
    }

    /// Applies the length limit and checks that something is left to learn.
    fn finish(
        &self,
        index: usize,
        mut input_ids: Vec<u32>,
        mut labels: Vec<i64>,
        class_label: Option<usize>,
    ) -> Result<(Encoded, usize)> {
        let full_len = input_ids.len();
        // Tokens before the first trained one, counted before the cut.
        let prompt_len = labels
            .iter()
            .skip(1)
            .position(|&l| l != IGNORE_INDEX)
            .map(|p| p + 1);
        if full_len == 0 {
            return Err(record_error(index, "encodes to no token at all"));
        }
        let max_len = self.options.max_len;
        if full_len > max_len {
            match self.options.truncation {
                Truncation::Error => {
                    return Err(DataError::TooLong {
                        index,
                        line: None,
                        len: full_len,
                        max_len,
                    })
                }
                Truncation::Right => {
                    input_ids.truncate(max_len);
                    labels.truncate(max_len);
                }
            }
        }
        let encoded = Encoded {
            input_ids,
            labels,
            class_label,
        };
        if class_label.is_none() && encoded.num_targets() == 0 {
            return Err(match prompt_len {
                Some(prompt_len) => DataError::PastMaxLen {
                    index,
                    line: None,
                    prompt_len,
                    max_len,
                },
                None => DataError::NoTrainableTokens {
                    index,
                    line: None,
                    truncated: full_len > max_len,
                },
            });
        }
        Ok((encoded, full_len))
    }

    /// Renders a conversation and masks everything but the assistant replies (when
    /// `completion_only`).
    fn encode_chat(&self, index: usize, messages: &[Message]) -> Result<(Vec<u32>, Vec<i64>)> {
        let template = self.template.ok_or_else(|| {
            record_error(
                index,
                "chat records need a chat template, and the model has none (no \
                 chat_template.jinja and no \"chat_template\" in tokenizer_config.json)",
            )
        })?;
        let render = |msgs: &[Message], generation_prompt: bool| {
            template
                .render(msgs, generation_prompt)
                .map_err(|e| record_error(index, e.to_string()))
        };
        let full = render(messages, false)?;
        if !self.options.completion_only {
            return self.tokenize(index, &full, Train::All, true);
        }

        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let prompt = render(&messages[..i], true)?;
            let upto = if i + 1 == messages.len() {
                full.clone()
            } else {
                render(&messages[..=i], false)?
            };
            if !upto.starts_with(&prompt) || !full.starts_with(&upto) {
                return Err(record_error(
                    index,
                    format!(
                        "cannot locate assistant message {i} in the rendered conversation: the chat \
                         template does not render the conversation up to it as a prefix of the \
                         whole (its text before and after the reply differ); use \
                         completion_only = false (--train-on-prompt) for this template"
                    ),
                ));
            }
            let end = prompt.len() + upto[prompt.len()..].trim_end().len();
            if end > prompt.len() {
                spans.push(prompt.len()..end);
            }
        }
        self.tokenize(index, &full, Train::Spans(&spans), true)
    }

    /// Tokenizes `text` with the tokenizer's special tokens and labels the tokens trained by
    /// `train`. For `templated` text, special tokens the tokenizer adds are dropped when the
    /// text already has them.
    fn tokenize(
        &self,
        index: usize,
        text: &str,
        train: Train<'_>,
        templated: bool,
    ) -> Result<(Vec<u32>, Vec<i64>)> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| tokenizer_error(index, &e))?;
        let ids = encoding.get_ids();
        let offsets = encoding.get_offsets();
        let added = encoding.get_special_tokens_mask();
        let n = ids.len();

        // Tokens the post-processor added before and after the text.
        let lead = added.iter().take_while(|&&m| m == 1).count();
        let trail = added[lead..].iter().rev().take_while(|&&m| m == 1).count();
        let body = lead..n - trail;
        let mut keep = 0..n;
        if templated {
            if lead > 0 && ids[body.clone()].starts_with(&ids[..lead]) {
                keep.start = lead;
            }
            if trail > 0 && ids[body.clone()].ends_with(&ids[n - trail..]) {
                keep.end = n - trail;
            }
        }

        let mut out_ids = Vec::with_capacity(keep.len());
        let mut labels = Vec::with_capacity(keep.len());
        let mut previous_trained = false;
        for j in keep {
            let trained = match train {
                Train::All => true,
                Train::Spans(_) if j < lead => false,
                Train::Spans(_) if j >= body.end => previous_trained,
                Train::Spans(spans) => overlaps(spans, offsets[j]),
            };
            out_ids.push(ids[j]);
            labels.push(if trained {
                i64::from(ids[j])
            } else {
                IGNORE_INDEX
            });
            previous_trained = trained;
        }
        Ok((out_ids, labels))
    }
}

/// Whether a token with byte offsets `(start, end)` overlaps one of `spans`; a zero-width
/// token counts as overlapping when its position lies inside a span.
fn overlaps(spans: &[Range<usize>], (start, end): (usize, usize)) -> bool {
    spans.iter().any(|span| {
        if start < end {
            start < span.end && end > span.start
        } else {
            span.contains(&start)
        }
    })
}

fn tokenizer_error(index: usize, err: &tokenizers::Error) -> DataError {
    record_error(index, format!("tokenizer error: {err}"))
}

fn record_error(index: usize, message: impl Into<String>) -> DataError {
    DataError::Record {
        index,
        line: None,
        message: message.into(),
    }
}

impl EncodedSet {
    /// The records skipped because their prompt filled `max_len`, summed up.
    pub fn past_max_len_summary(&self, max_len: usize) -> Option<PastMaxLen> {
        let prompts = self.past_max_len.iter().map(|&(_, p)| p);
        Some(PastMaxLen {
            count: self.past_max_len.len(),
            prompt_tokens: (prompts.clone().min()?, prompts.max()?),
            max_len,
        })
    }

    /// Warns (through `tracing`) about the records of `records` skipped because their prompt
    /// fills `max_len`, naming the file, their lines and the flag that keeps them.
    pub fn warn_past_max_len(&self, records: &Records, max_len: usize) {
        let Some(summary) = self.past_max_len_summary(max_len) else {
            return;
        };
        let lines: Vec<String> = self
            .past_max_len
            .iter()
            .take(10)
            .map(|&(i, _)| records.line(i).to_string())
            .collect();
        let more = if self.past_max_len.len() > 10 {
            ", ..."
        } else {
            ""
        };
        tracing::warn!(
            "{}: skipped {summary} (line{} {}{more})",
            records.path.display(),
            if lines.len() == 1 { "" } else { "s" },
            lines.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_rules() {
        let spans = [5..10, 20..22];
        assert!(overlaps(&spans, (4, 6)));
        assert!(overlaps(&spans, (9, 12)));
        assert!(!overlaps(&spans, (10, 12)));
        assert!(!overlaps(&spans, (0, 5)));
        assert!(overlaps(&spans, (21, 21)));
        assert!(!overlaps(&spans, (22, 22)));
    }

    #[test]
    fn alpaca_prompts() {
        assert!(
            alpaca_prompt("Do it.", "").ends_with("### Instruction:\nDo it.\n\n### Response:\n")
        );
        assert!(alpaca_prompt("Do it.", "now").contains("paired with an input"));
        assert!(alpaca_prompt("Do it.", "now").ends_with("### Input:\nnow\n\n### Response:\n"));
    }
}
