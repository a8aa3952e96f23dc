//! The prompts file of `ferrule generate --prompts`: JSON Lines, one prompt a line.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::data::Message;

/// One line of a prompts file.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// `{"prompt": "...", "system": "..."}` (system optional) or `{"messages": [{"role",
    /// "content"}, ...]}`: rendered with the model's chat template.
    Chat(Vec<Message>),
    /// `{"text": "..."}`: tokenized as it is.
    Text(String),
}

/// Reads `path`: one JSON object a line, blank lines skipped. Errors name the file and line:
/// invalid JSON, a line with none or several of `prompt`, `messages` and `text`, a value of
/// the wrong type, an empty prompt, or a file without prompts.
pub fn read_prompts(path: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--prompts {}: cannot read", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        out.push(parse(&value).with_context(at)?);
    }
    if out.is_empty() {
        bail!("--prompts {}: no prompts (one JSON object a line: {{\"prompt\": ...}}, {{\"messages\": [...]}} or {{\"text\": ...}})", path.display())
    }
    Ok(out)
}

fn parse(value: &Value) -> Result<Prompt> {
    let obj = value.as_object().context("expected a JSON object")?;
    let given: Vec<&str> = ["prompt", "messages", "text"]
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
    let string = |key: &str| -> Result<String> {
        let s = obj[key]
            .as_str()
            .with_context(|| format!("\"{key}\" must be a string"))?;
        if s.is_empty() {
            bail!("\"{key}\" is empty")
        }
        Ok(s.to_string())
    };
    let prompt = match given.as_slice() {
        ["prompt"] => {
            let mut msgs = Vec::new();
            if obj.contains_key("system") {
                msgs.push(Message::new("system", string("system")?));
            }
            msgs.push(Message::new("user", string("prompt")?));
            Prompt::Chat(msgs)
        }
        ["messages"] => {
            let msgs: Vec<Message> = serde_json::from_value(obj["messages"].clone())
                .context("\"messages\" must be a list of {\"role\": ..., \"content\": ...}")?;
            if msgs.is_empty() {
                bail!("\"messages\" is empty")
            }
            Prompt::Chat(msgs)
        }
        ["text"] => Prompt::Text(string("text")?),
        [] => bail!("no \"prompt\", \"messages\" or \"text\" key"),
        keys => bail!("several of {keys:?}: give one"),
    };
    if obj.contains_key("system") && !matches!(given.as_slice(), ["prompt"]) {
        bail!("\"system\" goes with \"prompt\" (with \"messages\", make it the first message)")
    }
    Ok(prompt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(lines: &str) -> Result<Vec<Prompt>> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.jsonl");
        std::fs::write(&p, lines).unwrap();
        read_prompts(&p)
    }

    #[test]
    fn each_form_reads_and_errors_name_the_line() {
        let got = read(
            "{\"prompt\": \"hi\", \"system\": \"be brief\"}\n\n{\"text\": \"raw\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n",
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                Prompt::Chat(vec![
                    Message::new("system", "be brief"),
                    Message::new("user", "hi")
                ]),
                Prompt::Text("raw".into()),
                Prompt::Chat(vec![Message::new("user", "q")]),
            ]
        );
        for (bad, want) in [
            (
                "{\"prompt\": \"a\"}\n{\"promt\": \"b\"}",
                ":2: no \"prompt\"",
            ),
            ("{\"prompt\": \"a\", \"text\": \"b\"}", ":1: several of"),
            ("{\"prompt\": \"\"}", ":1: \"prompt\" is empty"),
            ("{\"prompt\": 3}", ":1: \"prompt\" must be a string"),
            ("not json", ":1: not valid JSON"),
            (
                "{\"text\": \"a\", \"system\": \"s\"}",
                ":1: \"system\" goes with",
            ),
            ("\n\n", "no prompts"),
        ] {
            let err = format!("{:#}", read(bad).unwrap_err());
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }
}
