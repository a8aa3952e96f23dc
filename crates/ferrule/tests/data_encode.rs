//! Chat templates, encoding with loss masks, truncation, batching and tokenizer loading.
//!
//! The tokenizers are tiny byte-level BPEs built here (256 byte tokens, a few merges, the
//! special tokens of ChatML and Llama 3), so every text round-trips through decode exactly.

use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device};
use ferrule::data::{
    collate, load_tokenizer, pad_token_id, ChatTemplate, DataError, EncodeOptions, Encoded,
    Encoder, Example, LabelMap, LabelValue, Message, PaddingSide, TokenizerConfig, Truncation,
    IGNORE_INDEX,
};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

/// SmolLM2-135M-Instruct's chat template, verbatim (the strings hold real newlines).
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Meta-Llama-3-8B-Instruct's chat template, verbatim.
const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const SMOL_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

const SPECIAL_TOKENS: [&str; 9] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[CLS]",
    "[SEP]",
];

/// GPT-2's byte-to-character table.
fn byte_chars() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in bytes.into_iter().zip(chars) {
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// The JSON of a byte-level BPE tokenizer; `post_processor` adds tokens around each sequence
/// (`Some((prefix, suffix))`) or nothing.
fn tokenizer_json(post_processor: Option<(&[&str], &[&str])>) -> Value {
    let table = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (b, c) in table.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let merges = [
        ("H", "e"),
        ("l", "l"),
        ("He", "ll"),
        ("Hell", "o"),
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("Ċ", "Ċ"),
    ];
    for (a, b) in merges {
        let id = vocab.len();
        vocab.insert(format!("{a}{b}"), json!(id));
    }
    let first_special = vocab.len();
    let special_id = |t: &str| first_special + SPECIAL_TOKENS.iter().position(|s| *s == t).unwrap();
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .map(|t| {
            json!({"id": special_id(t), "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let post = post_processor.map(|(prefix, suffix)| {
        let piece = |t: &&str| json!({"SpecialToken": {"id": t, "type_id": 0}});
        let mut single: Vec<Value> = prefix.iter().map(piece).collect();
        single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        single.extend(suffix.iter().map(piece));
        let mut pair = single.clone();
        pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
        let specials: serde_json::Map<String, Value> =
            prefix.iter().chain(suffix.iter()).map(|t| (t.to_string(), json!({"id": t, "ids": [special_id(t)], "tokens": [t]}))).collect();
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    });
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
        }
    })
}

fn tokenizer(post_processor: Option<(&[&str], &[&str])>) -> Tokenizer {
    Tokenizer::from_str(&tokenizer_json(post_processor).to_string()).unwrap()
}

/// No special tokens added (like SmolLM2's).
fn chatml_tokenizer() -> Tokenizer {
    tokenizer(None)
}

/// Adds `<|begin_of_text|>` in front of every sequence (like Llama 3's).
fn bos_tokenizer() -> Tokenizer {
    tokenizer(Some((&["<|begin_of_text|>"], &[])))
}

/// Wraps every sequence in `[CLS] … [SEP]` (like BERT's).
fn cls_tokenizer() -> Tokenizer {
    tokenizer(Some((&["[CLS]"], &["[SEP]"])))
}

fn smollm2() -> ChatTemplate {
    ChatTemplate::new(SMOLLM2_TEMPLATE, Some("<|im_start|>"), Some("<|im_end|>")).unwrap()
}

fn llama3() -> ChatTemplate {
    ChatTemplate::new(
        LLAMA3_TEMPLATE,
        Some("<|begin_of_text|>"),
        Some("<|eot_id|>"),
    )
    .unwrap()
}

fn msg(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

fn chat(messages: &[(&str, &str)]) -> Example {
    Example::Chat {
        messages: messages.iter().map(|(r, c)| msg(r, c)).collect(),
    }
}

fn options(max_len: usize, truncation: Truncation, completion_only: bool) -> EncodeOptions {
    EncodeOptions {
        max_len,
        truncation,
        completion_only,
    }
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
    tok.decode(ids, false).unwrap()
}

/// The maximal runs of trained tokens, decoded.
fn trained_runs(tok: &Tokenizer, e: &Encoded) -> Vec<String> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    for (&id, &label) in e.input_ids.iter().zip(&e.labels) {
        if label == IGNORE_INDEX {
            if !current.is_empty() {
                runs.push(decode(tok, &std::mem::take(&mut current)));
            }
        } else {
            assert_eq!(label, i64::from(id), "a trained label must be the token id");
            current.push(id);
        }
    }
    if !current.is_empty() {
        runs.push(decode(tok, &current));
    }
    runs
}

// ---------------------------------------------------------------------------------------------
// Chat templates

#[test]
fn smollm2_template_renders_chatml() {
    let t = smollm2();
    let conversation = [
        msg("user", "Hi there"),
        msg("assistant", "Hello! How can I help?"),
    ];
    assert_eq!(
        t.render(&conversation, false).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi there<|im_end|>\n\
         <|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    );
    assert_eq!(
        t.render(&conversation[..1], true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    let with_system = [
        msg("system", "Be brief."),
        msg("user", "Hi"),
        msg("assistant", "Hey."),
    ];
    assert_eq!(
        t.render(&with_system, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHey.<|im_end|>\n"
    );
    // The same template with Jinja escapes instead of raw newlines renders identically.
    let escaped = ChatTemplate::new(SMOLLM2_TEMPLATE.replace('\n', "\\n"), None, None).unwrap();
    assert_eq!(
        escaped.render(&with_system, true).unwrap(),
        t.render(&with_system, true).unwrap()
    );
}

#[test]
fn llama3_template_renders() {
    let t = llama3();
    assert_eq!(
        t.render(
            &[
                msg("system", "  Be brief. "),
                msg("user", "Hi"),
                msg("assistant", "Hello!")
            ],
            false
        )
        .unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    );
    assert_eq!(
        t.render(&[msg("user", "Hi")], true).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn templates_follow_hf_whitespace_and_python_methods() {
    // trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before it,
    // and the template's final newline is dropped.
    let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content.strip().upper() }}]\n    {% endif %}\n{% endfor %}\n";
    let t = ChatTemplate::new(source, None, None).unwrap();
    assert_eq!(
        t.render(
            &[msg("user", " a "), msg("assistant", "b"), msg("user", "c")],
            false
        )
        .unwrap(),
        "[A]\n[C]\n"
    );
    let items = ChatTemplate::new(
        "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}",
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        items.render(&[msg("user", "x")], false).unwrap(),
        "role=user;content=x;"
    );
}

#[test]
fn raise_exception_fails_the_render() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}\
         {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
         {% endif %}{{ m['content'] }}{% endfor %}",
        None,
        None,
    )
    .unwrap();
    let err = t
        .render(&[msg("assistant", "x")], false)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "chat template from <string>: invalid operation: Conversation roles must alternate"
        ),
        "{err}"
    );
    assert!(err.contains("(in chat_template:1)"), "{err}");

    let tok = chatml_tokenizer();
    let encoder = Encoder::new(&tok, Some(&t), EncodeOptions::default()).unwrap();
    let err = encoder
        .encode(4, &chat(&[("assistant", "x")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "record 4: chat template from <string>: invalid operation: Conversation roles"
        ),
        "{err}"
    );
}

#[test]
fn bad_template_syntax_names_the_origin() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", None, None).unwrap_err();
    assert!(matches!(err, DataError::Template { .. }));
    let msg = err.to_string();
    assert!(
        msg.starts_with("chat template from <string>: syntax error"),
        "{msg}"
    );
}

#[test]
fn template_from_model_dir() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ChatTemplate::from_model_dir(dir.path()).unwrap().is_none());

    let config = json!({
        "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": false},
        "eos_token": "<|im_end|>",
        "pad_token": null,
        "chat_template": SMOLLM2_TEMPLATE,
    });
    let config_path = dir.path().join("tokenizer_config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.bos_token(), Some("<|im_start|>"));
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert_eq!(t.origin(), config_path.display().to_string());
    assert_eq!(
        t.render(&[msg("user", "Hi")], true).unwrap(),
        format!("{SMOL_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    );

    // A list of named templates: the default one is used.
    let config = json!({
        "eos_token": "<|im_end|>",
        "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ eos_token }}"}],
    });
    std::fs::write(&config_path, config.to_string()).unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.render(&[msg("user", "Hi")], false).unwrap(), "<|im_end|>");

    // chat_template.jinja takes precedence.
    let jinja = dir.path().join("chat_template.jinja");
    std::fs::write(&jinja, "{{ bos_token }}{{ messages[0].content }}\n").unwrap();
    let t = ChatTemplate::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.render(&[msg("user", "Hi")], false).unwrap(), "Hi");
    assert_eq!(t.origin(), jinja.display().to_string());
    std::fs::remove_file(&jinja).unwrap();

    // Malformed entries are reported with the file.
    std::fs::write(&config_path, json!({"chat_template": 3}).to_string()).unwrap();
    assert_eq!(
        ChatTemplate::from_model_dir(dir.path()).unwrap_err().to_string(),
        format!("{}: expected \"chat_template\" to be a string or a list of {{\"name\", \"template\"}} objects, found the number 3", config_path.display())
    );
    std::fs::write(
        &config_path,
        json!({"chat_template": [{"name": "rag", "template": "x"}]}).to_string(),
    )
    .unwrap();
    assert_eq!(
        ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string(),
        format!(
            "{}: expected a chat template named \"default\" among \"rag\", found none",
            config_path.display()
        )
    );
    std::fs::write(&config_path, json!({"eos_token": 2}).to_string()).unwrap();
    assert_eq!(
        ChatTemplate::from_model_dir(dir.path()).unwrap_err().to_string(),
        format!("{}: expected \"eos_token\" to be a string, null or an AddedToken object {{\"content\": ...}}, found the number 2", config_path.display())
    );
    std::fs::write(&config_path, "{ not json").unwrap();
    let err = ChatTemplate::from_model_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}: invalid JSON: ", config_path.display())),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Encoding

#[test]
fn chat_loss_only_on_assistant_text_and_end_token() {
    let tok = chatml_tokenizer();
    let t = smollm2();
    let encoder = Encoder::new(&tok, Some(&t), EncodeOptions::default()).unwrap();
    let example = chat(&[
        ("user", "Hello there"),
        ("assistant", "Hello! the answer is 42."),
        ("user", "And then?"),
        ("assistant", "Then   the end.\n"),
    ]);
    let e = encoder.encode(0, &example).unwrap();
    let Example::Chat { messages } = &example else {
        unreachable!()
    };
    assert_eq!(
        decode(&tok, &e.input_ids),
        t.render(messages, false).unwrap()
    );
    assert_eq!(e.class_label, None);
    assert_eq!(e.labels.len(), e.input_ids.len());
    assert_eq!(
        trained_runs(&tok, &e),
        [
            "Hello! the answer is 42.<|im_end|>",
            "Then   the end.\n<|im_end|>"
        ]
    );

    // Without completion_only every token is trained.
    let encoder = Encoder::new(&tok, Some(&t), options(4096, Truncation::Error, false)).unwrap();
    let all = encoder.encode(0, &example).unwrap();
    assert_eq!(all.input_ids, e.input_ids);
    assert!(all
        .input_ids
        .iter()
        .zip(&all.labels)
        .all(|(&id, &l)| l == i64::from(id)));
}

#[test]
fn llama3_bos_is_not_duplicated() {
    let tok = bos_tokenizer();
    let bos = tok.token_to_id("<|begin_of_text|>").unwrap();
    let t = llama3();
    let encoder = Encoder::new(&tok, Some(&t), EncodeOptions::default()).unwrap();
    let e = encoder
        .encode(0, &chat(&[("user", "Hi"), ("assistant", " Hello!  ")]))
        .unwrap();
    assert_eq!(e.input_ids[0], bos);
    assert_eq!(
        e.input_ids.iter().filter(|&&id| id == bos).count(),
        1,
        "BOS appears once"
    );
    assert_eq!(
        decode(&tok, &e.input_ids),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    );
    assert_eq!(trained_runs(&tok, &e), ["Hello!<|eot_id|>"]);
}

#[test]
fn bos_is_added_when_the_template_omits_it() {
    let tok = bos_tokenizer();
    let bos = tok.token_to_id("<|begin_of_text|>").unwrap();
    let t = smollm2();
    let encoder = Encoder::new(&tok, Some(&t), EncodeOptions::default()).unwrap();
    let e = encoder
        .encode(0, &chat(&[("user", "Hi"), ("assistant", "Yo")]))
        .unwrap();
    assert_eq!(e.input_ids[0], bos);
    assert_eq!(e.labels[0], IGNORE_INDEX);
    assert_eq!(e.input_ids.iter().filter(|&&id| id == bos).count(), 1);
    assert_eq!(trained_runs(&tok, &e), ["Yo<|im_end|>"]);
}

#[test]
fn alpaca_with_and_without_template() {
    let tok = chatml_tokenizer();
    let example = Example::Alpaca {
        instruction: "Add the numbers.".into(),
        input: "2 3".into(),
        output: "5".into(),
    };

    let t = smollm2();
    let encoder = Encoder::new(&tok, Some(&t), EncodeOptions::default()).unwrap();
    let e = encoder.encode(0, &example).unwrap();
    assert_eq!(decode(&tok, &e.input_ids), format!("{SMOL_SYSTEM}<|im_start|>user\nAdd the numbers.\n\n2 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"));
    assert_eq!(trained_runs(&tok, &e), ["5<|im_end|>"]);

    // No template: the Stanford prompt, then the output and the end-of-sequence token.
    let encoder = Encoder::new(&tok, None, EncodeOptions::default()).unwrap();
    let err = encoder.encode(3, &example).unwrap_err().to_string();
    assert!(err.starts_with("record 3: an Alpaca record without a chat template ends with the end-of-sequence token"), "{err}");
    let eos = tok.token_to_id("<|endoftext|>").unwrap();
    let encoder = encoder.with_eos_token_id(Some(eos));
    let e = encoder.encode(0, &example).unwrap();
    assert_eq!(
        decode(&tok, &e.input_ids),
        "Below is an instruction that describes a task, paired with an input that provides further context. \
         Write a response that appropriately completes the request.\n\n\
         ### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n5<|endoftext|>"
    );
    assert_eq!(trained_runs(&tok, &e), ["5<|endoftext|>"]);
    let no_input = Example::Alpaca {
        instruction: "Say hi.".into(),
        input: String::new(),
        output: "Hello".into(),
    };
    let e = encoder.encode(0, &no_input).unwrap();
    assert!(decode(&tok, &e.input_ids)
        .starts_with("Below is an instruction that describes a task. Write"));
    assert_eq!(trained_runs(&tok, &e), ["Hello<|endoftext|>"]);
}

#[test]
fn text_trains_every_token_with_the_tokenizers_specials() {
    let tok = bos_tokenizer();
    let encoder = Encoder::new(&tok, None, EncodeOptions::default()).unwrap();
    let e = encoder
        .encode(
            0,
            &Example::Text {
                text: "Hello the world".into(),
            },
        )
        .unwrap();
    assert_eq!(
        decode(&tok, &e.input_ids),
        "<|begin_of_text|>Hello the world"
    );
    assert_eq!(
        e.input_ids[0],
        tok.token_to_id("<|begin_of_text|>").unwrap()
    );
    assert!(e
        .input_ids
        .iter()
        .zip(&e.labels)
        .all(|(&id, &l)| l == i64::from(id)));
}

#[test]
fn classification_sets_the_class_and_no_labels() {
    let tok = cls_tokenizer();
    let examples = vec![
        Example::Classification {
            text: "great".into(),
            label: LabelValue::Name("pos".into()),
        },
        Example::Classification {
            text: "awful".into(),
            label: LabelValue::Name("neg".into()),
        },
    ];
    let map = LabelMap::from_examples(&examples).unwrap();
    let encoder = Encoder::new(&tok, None, EncodeOptions::default()).unwrap();
    let err = encoder.encode(0, &examples[0]).unwrap_err().to_string();
    assert_eq!(
        err,
        "record 0: a classification record (\"text\" and \"label\") trains a \
         sequence-classification head: pass --task seq-cls (or drop \"label\" to train on the \
         text as language modelling)"
    );
    let encoder = encoder.with_label_map(&map);
    let set = encoder.encode_all(&examples).unwrap();
    assert_eq!(set.items[0].class_label, Some(1));
    assert_eq!(set.items[1].class_label, Some(0));
    assert_eq!(decode(&tok, &set.items[0].input_ids), "[CLS]great[SEP]");
    assert!(set
        .items
        .iter()
        .all(|e| e.labels.iter().all(|&l| l == IGNORE_INDEX)));
    let unknown = Example::Classification {
        text: "meh".into(),
        label: LabelValue::Name("neutral".into()),
    };
    assert_eq!(
        encoder.encode(7, &unknown).unwrap_err().to_string(),
        "record 7: unknown label \"neutral\"; expected one of \"neg\", \"pos\""
    );
}

#[test]
fn truncation() {
    let tok = chatml_tokenizer();
    let text = Example::Text {
        text: "abcdefghij".into(),
    }; // 10 byte tokens
    let encoder = Encoder::new(&tok, None, options(4, Truncation::Error, true)).unwrap();
    let err = encoder.encode(2, &text).unwrap_err();
    assert!(matches!(
        err,
        DataError::TooLong {
            index: 2,
            line: None,
            len: 10,
            max_len: 4
        }
    ));
    assert_eq!(
        err.to_string(),
        "record 2: 10 tokens, more than max_len 4 (--max-len); raise it, or let long records be \
         cut at it (truncate = true: drop --no-truncate)"
    );

    let encoder = Encoder::new(&tok, None, options(4, Truncation::Right, true)).unwrap();
    let e = encoder.encode(2, &text).unwrap();
    assert_eq!(decode(&tok, &e.input_ids), "abcd");
    assert_eq!(e.labels.len(), 4);

    // A chat whose reply lies beyond max_len has nothing left to train.
    let t = smollm2();
    let long_prompt = "x".repeat(200);
    let cut = chat(&[("user", &long_prompt), ("assistant", "ok")]);
    let fits = chat(&[("user", "hi"), ("assistant", "ok")]);
    let encoder = Encoder::new(&tok, Some(&t), options(40, Truncation::Right, true)).unwrap();
    let err = encoder.encode(1, &cut).unwrap_err();
    let DataError::PastMaxLen {
        index: 1,
        line: None,
        prompt_len,
        max_len: 40,
    } = err
    else {
        panic!("{err:?}")
    };
    // The 200 bytes of the prompt, one token each, and the template's tokens around them.
    assert!(prompt_len > 200, "{prompt_len}");
    assert_eq!(
        err.to_string(),
        format!(
            "record 1: its prompt takes {prompt_len} tokens, so cutting the record at max_len 40 \
             (--max-len) leaves nothing of its answer to train; raise --max-len above {prompt_len}"
        )
    );
    let encoder = Encoder::new(&tok, Some(&t), options(128, Truncation::Right, true)).unwrap();
    let set = encoder
        .encode_all(&[fits.clone(), cut.clone(), fits.clone()])
        .unwrap();
    assert_eq!(set.skipped, [1]);
    assert_eq!(set.past_max_len, [(1, prompt_len)]);
    assert_eq!(set.record_indices, [0, 2]);
    assert_eq!(set.items.len(), 2);
    assert_eq!(set.truncated, 0);
    let err = encoder.encode_all(std::slice::from_ref(&cut)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "no record has a trained token: 1 record whose prompt ({prompt_len} tokens) fills \
             max_len 128 (--max-len), so nothing of its answer is left to train; raise \
             --max-len above {prompt_len} to train on it"
        )
    );

    // A reply that is only partly cut is kept, truncated.
    let partly = chat(&[("user", "hi"), ("assistant", &"y".repeat(60))]);
    let set = encoder.encode_all(&[partly]).unwrap();
    assert_eq!(set.truncated, 1);
    assert_eq!(set.items[0].len(), 128);
    assert!(set.items[0].num_targets() > 0);

    // An empty reply without completion tokens is not trainable either.
    let empty = Example::Text {
        text: String::new(),
    };
    let encoder = Encoder::new(&tok, None, EncodeOptions::default()).unwrap();
    assert_eq!(
        encoder.encode(0, &empty).unwrap_err().to_string(),
        "record 0: encodes to no token at all"
    );

    assert!(Encoder::new(&tok, None, options(0, Truncation::Right, true)).is_err());
}

#[test]
fn chat_errors() {
    let tok = chatml_tokenizer();
    let encoder = Encoder::new(&tok, None, EncodeOptions::default()).unwrap();
    assert_eq!(
        encoder.encode(5, &chat(&[("user", "a"), ("assistant", "b")])).unwrap_err().to_string(),
        "record 5: chat records need a chat template, and the model has none (no chat_template.jinja \
         and no \"chat_template\" in tokenizer_config.json)"
    );

    // A template that renders the last message differently cannot be split into turns.
    let t = ChatTemplate::new("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}", None, None).unwrap();
    let encoder = Encoder::new(&tok, Some(&t), EncodeOptions::default()).unwrap();
    let err = encoder.encode(
        6,
        &chat(&[
            ("user", "a"),
            ("assistant", "b"),
            ("user", "c"),
            ("assistant", "d"),
        ]),
    );
    assert!(err
        .unwrap_err()
        .to_string()
        .starts_with("record 6: cannot locate assistant message 1 in the rendered conversation"));
    let encoder = Encoder::new(&tok, Some(&t), options(512, Truncation::Error, false)).unwrap();
    assert!(encoder
        .encode(
            6,
            &chat(&[
                ("user", "a"),
                ("assistant", "b"),
                ("user", "c"),
                ("assistant", "d")
            ])
        )
        .is_ok());

    // A tokenizer that truncates by itself is refused.
    let mut truncating = chatml_tokenizer();
    truncating
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: 8,
            ..Default::default()
        }))
        .unwrap();
    let err = Encoder::new(&truncating, None, EncodeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("invalid encoding options: the tokenizer truncates or pads by itself"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Batching

fn encoded(ids: &[u32], labels: &[i64], class_label: Option<usize>) -> Encoded {
    Encoded {
        input_ids: ids.to_vec(),
        labels: labels.to_vec(),
        class_label,
    }
}

#[test]
fn collate_pads_both_sides() {
    let a = encoded(&[5, 6, 7], &[-100, 6, 7], None);
    let b = encoded(&[8], &[8], None);
    let dev = Device::Cpu;

    let right = collate(&[&a, &b], 0, PaddingSide::Right, &dev).unwrap();
    assert_eq!(right.input_ids.dims(), [2, 3]);
    assert_eq!(right.input_ids.dtype(), DType::U32);
    assert_eq!(
        right.input_ids.to_vec2::<u32>().unwrap(),
        [[5, 6, 7], [8, 0, 0]]
    );
    assert_eq!(right.attention_mask.dtype(), DType::U32);
    assert_eq!(
        right.attention_mask.to_vec2::<u32>().unwrap(),
        [[1, 1, 1], [1, 0, 0]]
    );
    let labels = right.labels.as_ref().unwrap();
    assert_eq!(labels.dtype(), DType::I64);
    assert_eq!(
        labels.to_vec2::<i64>().unwrap(),
        [[-100, 6, 7], [8, -100, -100]]
    );
    assert!(right.class_labels.is_none());
    assert_eq!(right.num_tokens, 4);

    let left = collate(&[&a, &b], 9, PaddingSide::Left, &dev).unwrap();
    assert_eq!(
        left.input_ids.to_vec2::<u32>().unwrap(),
        [[5, 6, 7], [9, 9, 8]]
    );
    assert_eq!(
        left.attention_mask.to_vec2::<u32>().unwrap(),
        [[1, 1, 1], [0, 0, 1]]
    );
    assert_eq!(
        left.labels.unwrap().to_vec2::<i64>().unwrap(),
        [[-100, 6, 7], [-100, -100, 8]]
    );
    assert_eq!(left.num_tokens, 4);
}

#[test]
fn collate_classification_and_errors() {
    let a = encoded(&[1, 2], &[-100, -100], Some(3));
    let b = encoded(&[1, 2, 3, 4], &[-100; 4], Some(0));
    let batch = collate(&[&a, &b], 0, PaddingSide::Right, &Device::Cpu).unwrap();
    assert_eq!(batch.input_ids.dims(), [2, 4]);
    assert!(batch.labels.is_none());
    let classes = batch.class_labels.unwrap();
    assert_eq!(classes.dtype(), DType::U32);
    assert_eq!(classes.to_vec1::<u32>().unwrap(), [3, 0]);
    assert_eq!(batch.num_tokens, 6);

    let lm = encoded(&[1], &[1], None);
    assert!(collate(&[&a, &lm], 0, PaddingSide::Right, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("mixes classification and language-modelling records"));
    assert!(collate(&[], 0, PaddingSide::Right, &Device::Cpu).is_err());
}

#[test]
fn encode_then_collate() {
    let tok = chatml_tokenizer();
    let t = smollm2();
    let encoder = Encoder::new(&tok, Some(&t), EncodeOptions::default()).unwrap();
    let set = encoder
        .encode_all(&[
            chat(&[("user", "a"), ("assistant", "b")]),
            chat(&[("user", "longer question"), ("assistant", "c")]),
        ])
        .unwrap();
    let items: Vec<&Encoded> = set.items.iter().collect();
    let batch = collate(&items, 0, PaddingSide::Right, &Device::Cpu).unwrap();
    let longest = set.items.iter().map(Encoded::len).max().unwrap();
    assert_eq!(batch.input_ids.dims(), [2, longest]);
    assert_eq!(
        batch.num_tokens,
        set.items.iter().map(Encoded::len).sum::<usize>()
    );
}

// ---------------------------------------------------------------------------------------------
// Tokenizer files

#[test]
fn load_tokenizer_and_special_ids() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_tokenizer(dir.path()).unwrap_err();
    assert!(matches!(err, DataError::MissingTokenizer { .. }));
    assert!(err
        .to_string()
        .starts_with(&format!("{}: no tokenizer.json", dir.path().display())));

    // Truncation and padding stored in the file are switched off.
    let mut json = tokenizer_json(None);
    json["truncation"] =
        json!({"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0});
    json["padding"] = json!({"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
                             "pad_id": 0, "pad_type_id": 0, "pad_token": "!"});
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    let tok = load_tokenizer(dir.path()).unwrap();
    assert_eq!(tok.encode("abcdefgh", false).unwrap().len(), 8);
    assert!(Encoder::new(&tok, None, EncodeOptions::default()).is_ok());

    std::fs::write(dir.path().join("tokenizer.json"), "{]").unwrap();
    let err = load_tokenizer(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "{}: tokenizer error: ",
            dir.path().join("tokenizer.json").display()
        )),
        "{err}"
    );

    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    let config = |v: Value| TokenizerConfig::from_json(&v).unwrap();
    assert_eq!(
        pad_token_id(
            &tok,
            Some(&config(
                json!({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
            ))
        ),
        eot
    );
    assert_eq!(
        pad_token_id(
            &tok,
            Some(&config(
                json!({"pad_token": null, "eos_token": "<|im_end|>"})
            ))
        ),
        im_end
    );
    assert_eq!(
        pad_token_id(
            &tok,
            Some(&config(
                json!({"pad_token": "<unknown>", "eos_token": {"content": "<|im_end|>"}})
            ))
        ),
        im_end
    );
    assert_eq!(pad_token_id(&tok, Some(&config(json!({})))), 0);
    assert_eq!(pad_token_id(&tok, None), 0);
    assert_eq!(
        TokenizerConfig::from_model_dir(Path::new("/nonexistent")).unwrap(),
        None
    );
}

/// The tiny committed model fixture with a byte-level BPE tokenizer and a ChatML template.
#[test]
fn fixture_model_chat_masks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama");
    let tok = load_tokenizer(&dir).unwrap();
    let config = TokenizerConfig::from_model_dir(&dir).unwrap();
    let template = ChatTemplate::from_model_dir(&dir)
        .unwrap()
        .expect("the fixture has a chat template");
    let encoder = Encoder::new(&tok, Some(&template), EncodeOptions::default()).unwrap();
    let example = chat(&[
        ("system", "You are terse."),
        ("user", "What is the capital of France?"),
        ("assistant", "Paris, of course."),
        ("user", "And of Italy?"),
        ("assistant", "Rome."),
    ]);
    let e = encoder.encode(0, &example).unwrap();
    let Example::Chat { messages } = &example else {
        unreachable!()
    };
    assert_eq!(
        decode(&tok, &e.input_ids),
        template.render(messages, false).unwrap()
    );
    let eos = template.eos_token().unwrap();
    assert_eq!(
        trained_runs(&tok, &e),
        [format!("Paris, of course.{eos}"), format!("Rome.{eos}")]
    );
    let pad = pad_token_id(&tok, config.as_ref());
    assert_eq!(
        Some(pad),
        config
            .as_ref()
            .and_then(|c| c.pad_token.as_deref())
            .and_then(|p| tok.token_to_id(p))
    );
}

/// A BPE merge longer than every token made the tokenizers crate panic (found by fuzzing the
/// GGUF reader, which shares the check): it is an error naming the file and the merge.
#[test]
fn a_bpe_merge_longer_than_every_token_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llama/tokenizer.json");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    let longest = t["model"]["vocab"]
        .as_object()
        .unwrap()
        .keys()
        .max_by_key(|k| k.len())
        .unwrap()
        .clone();
    t["model"]["merges"] = serde_json::json!([[longest, longest]]);
    std::fs::write(dir.path().join("tokenizer.json"), t.to_string()).unwrap();
    let err = load_tokenizer(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json")
            && err.contains("BPE merge 0")
            && err.contains("longer than any in the vocabulary"),
        "{err}"
    );
}
