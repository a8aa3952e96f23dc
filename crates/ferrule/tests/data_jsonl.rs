//! Reading JSONL training files: shapes, and every error with its `file:line` message.

use std::path::{Path, PathBuf};

use ferrule::data::{read_jsonl, DataError, Example, LabelMap, LabelValue, Message};

/// Writes `content` to `name` in a fresh temporary directory.
fn write(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    path
}

/// The error message for a file with `content`, with the temporary path replaced by `data.jsonl`.
fn error_of(content: &str) -> String {
    error_of_bytes(content.as_bytes())
}

fn error_of_bytes(content: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "data.jsonl", content);
    let err = read_jsonl(&path).expect_err("expected an error");
    err.to_string()
        .replace(&path.display().to_string(), "data.jsonl")
}

fn read(content: &str) -> Vec<Example> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "data.jsonl", content.as_bytes());
    read_jsonl(&path).unwrap()
}

#[test]
fn detects_every_shape() {
    assert_eq!(
        read("{\"text\": \"hello\", \"id\": 7}\n\n{\"text\": \"world\"}"),
        vec![
            Example::Text {
                text: "hello".into()
            },
            Example::Text {
                text: "world".into()
            }
        ]
    );
    assert_eq!(
        read(
            "{\"instruction\": \"Add.\", \"input\": \"1 2\", \"output\": \"3\"}\n\
             {\"instruction\": \"Greet.\", \"output\": \"Hi\"}\n\
             {\"instruction\": \"Greet.\", \"input\": null, \"output\": \"Hi\"}\n"
        ),
        vec![
            Example::Alpaca {
                instruction: "Add.".into(),
                input: "1 2".into(),
                output: "3".into()
            },
            Example::Alpaca {
                instruction: "Greet.".into(),
                input: String::new(),
                output: "Hi".into()
            },
            Example::Alpaca {
                instruction: "Greet.".into(),
                input: String::new(),
                output: "Hi".into()
            },
        ]
    );
    assert_eq!(
        read(
            r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "name": "bot"}]}"#
        ),
        vec![Example::Chat {
            messages: vec![
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello")
            ]
        }]
    );
    assert_eq!(
        read("{\"text\": \"good\", \"label\": 1}\r\n{\"text\": \"bad\", \"label\": 0}\r\n"),
        vec![
            Example::Classification {
                text: "good".into(),
                label: LabelValue::Index(1)
            },
            Example::Classification {
                text: "bad".into(),
                label: LabelValue::Index(0)
            },
        ]
    );
}

#[test]
fn accepts_a_byte_order_mark_and_whitespace_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "bom.jsonl",
        b"\xEF\xBB\xBF{\"text\": \"a\"}\n   \n\t\n{\"text\": \"b\"}",
    );
    assert_eq!(read_jsonl(&path).unwrap().len(), 2);
}

#[test]
fn invalid_json_names_line_and_column() {
    assert_eq!(
        error_of("{\"text\": \"ok\"}\n\n{\"text\": oops}\n"),
        "data.jsonl:3: invalid JSON at column 10: expected value"
    );
    assert_eq!(
        error_of("{\"text\": \"ok\"} trailing\n"),
        "data.jsonl:1: invalid JSON at column 16: trailing characters"
    );
}

#[test]
fn non_utf8_names_line_and_column() {
    assert_eq!(
        error_of_bytes(b"{\"text\": \"ok\"}\n{\"text\": \"caf\xE9\"}\n"),
        "data.jsonl:2: not valid UTF-8 (invalid byte at column 14)"
    );
}

#[test]
fn empty_files_have_no_records() {
    assert_eq!(
        error_of(""),
        "data.jsonl: no records (the file is empty or has only blank lines)"
    );
    assert_eq!(
        error_of("\n  \n\n"),
        "data.jsonl: no records (the file is empty or has only blank lines)"
    );
}

#[test]
fn missing_file_is_named() {
    let err = read_jsonl(Path::new("/nonexistent/dir/train.jsonl")).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
    assert!(
        err.to_string()
            .starts_with("/nonexistent/dir/train.jsonl: cannot read: "),
        "{err}"
    );
}

#[test]
fn unknown_shapes_say_what_is_expected() {
    assert_eq!(
        error_of("{\"text\": \"ok\"}\n{\"prompt\": \"a\", \"completion\": \"b\"}"),
        "data.jsonl:2: expected a JSON object with \"text\" (and optionally \"label\"), \"instruction\" \
         and \"output\", or \"messages\", found an object with keys \"prompt\", \"completion\""
    );
    assert_eq!(
        error_of("[1, 2]"),
        "data.jsonl:1: expected a JSON object with \"text\" (and optionally \"label\"), \"instruction\" \
         and \"output\", or \"messages\", found an array of 2 elements"
    );
    assert_eq!(
        error_of("\"just a string\""),
        "data.jsonl:1: expected a JSON object with \"text\" (and optionally \"label\"), \"instruction\" \
         and \"output\", or \"messages\", found the string \"just a string\""
    );
}

#[test]
fn wrong_types_name_the_field() {
    assert_eq!(
        error_of("{\"text\": 5}"),
        "data.jsonl:1: expected \"text\" to be a string, found the number 5"
    );
    assert_eq!(
        error_of("{\"instruction\": \"x\", \"output\": [\"y\"]}"),
        "data.jsonl:1: expected \"output\" to be a string, found an array of 1 element"
    );
    assert_eq!(
        error_of("{\"instruction\": \"x\", \"input\": 3, \"output\": \"y\"}"),
        "data.jsonl:1: expected \"input\" to be a string, found the number 3"
    );
    assert_eq!(error_of("{\"instruction\": \"x\"}"), "data.jsonl:1: expected key \"output\" (a string) next to key \"instruction\", found no \"output\"");
    assert_eq!(error_of("{\"text\": \"x\", \"label\": -1}"), "data.jsonl:1: expected \"label\" to be a non-negative integer or a string, found the number -1");
    assert_eq!(
        error_of("{\"text\": \"x\", \"label\": 1.5}"),
        "data.jsonl:1: expected \"label\" to be a non-negative integer or a string, found the number 1.5"
    );
    assert_eq!(
        error_of("{\"messages\": \"hi\"}"),
        "data.jsonl:1: expected \"messages\" to be an array of {\"role\", \"content\"} objects, found the string \"hi\""
    );
    assert_eq!(
        error_of("{\"messages\": []}"),
        "data.jsonl:1: expected at least one message in \"messages\", found an empty array"
    );
    assert_eq!(
        error_of(
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}"#
        ),
        "data.jsonl:1: expected messages[1].content to be a string, found null"
    );
    assert_eq!(
        error_of(r#"{"messages": [{"role": "user"}]}"#),
        "data.jsonl:1: expected messages[0] to have \"role\" and \"content\", found an object with key \"role\""
    );
    assert_eq!(
        error_of(r#"{"messages": [["user", "hi"]]}"#),
        "data.jsonl:1: expected messages[0] to be a {\"role\", \"content\"} object, found an array of 2 elements"
    );
}

#[test]
fn mixed_shapes_name_both_lines() {
    assert_eq!(
        error_of(
            "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n{\"instruction\": \"c\", \"output\": \"d\"}\n"
        ),
        "data.jsonl:4: this record has the alpaca shape but the one on line 1 has the text shape; \
         all records of a file must have the same shape"
    );
    assert_eq!(
        error_of("{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\"}"),
        "data.jsonl:2: this record has the text shape but the one on line 1 has the \
         classification shape; all records of a file must have the same shape"
    );
}

#[test]
fn mixed_label_kinds_are_rejected() {
    assert_eq!(
        error_of("{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": \"pos\"}"),
        "data.jsonl:2: expected \"label\" to be an integer like the label on line 1, found the string \"pos\""
    );
}

#[test]
fn label_maps() {
    let names = read(
        "{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"label\": \"neg\"}\n\
         {\"text\": \"c\", \"label\": \"neutral\"}\n{\"text\": \"d\", \"label\": \"pos\"}",
    );
    let map = LabelMap::from_examples(&names).unwrap();
    assert_eq!(map.num_labels(), 3);
    assert_eq!(map.names().unwrap(), ["neg", "neutral", "pos"]);
    assert_eq!(
        map.class_index(0, &LabelValue::Name("pos".into())).unwrap(),
        2
    );
    assert_eq!(
        map.class_index(9, &LabelValue::Name("other".into()))
            .unwrap_err()
            .to_string(),
        "record 9: unknown label \"other\"; expected one of \"neg\", \"neutral\", \"pos\""
    );
    assert_eq!(map.class_index(1, &LabelValue::Index(1)).unwrap(), 1);

    let indices = read("{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 3}");
    let map = LabelMap::from_examples(&indices).unwrap();
    assert_eq!(map.num_labels(), 4);
    assert_eq!(map.names(), None);
    assert_eq!(
        map.class_index(5, &LabelValue::Index(4))
            .unwrap_err()
            .to_string(),
        "record 5: label 4 is out of range: the model has 4 classes (0..3)"
    );
    assert_eq!(
        map.class_index(2, &LabelValue::Name("x".into()))
            .unwrap_err()
            .to_string(),
        "record 2: label \"x\" is a name, but the classes are unnamed; use class indices 0..3"
    );

    let id2label = [(0, "NEGATIVE".to_string()), (1, "POSITIVE".to_string())]
        .into_iter()
        .collect();
    let map = LabelMap::from_id2label(&id2label).unwrap();
    assert_eq!(
        map.class_index(0, &LabelValue::Name("POSITIVE".into()))
            .unwrap(),
        1
    );
    let gap = [(0, "a".to_string()), (2, "b".to_string())]
        .into_iter()
        .collect();
    assert!(LabelMap::from_id2label(&gap).is_err());
    assert!(LabelMap::from_names(vec!["a".into(), "a".into()]).is_err());

    assert!(LabelMap::from_examples(&[Example::Text { text: "x".into() }]).is_err());
    let mixed = [
        Example::Classification {
            text: "a".into(),
            label: LabelValue::Index(0),
        },
        Example::Classification {
            text: "b".into(),
            label: LabelValue::Name("x".into()),
        },
    ];
    assert_eq!(
        LabelMap::from_examples(&mixed).unwrap_err().to_string(),
        "record 1: label \"x\" is a string but record 0 has an integer label; use either class indices or class names"
    );
}
