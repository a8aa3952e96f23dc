//! Hugging Face chat templates, rendered with minijinja.
//!
//! A chat template is a Jinja program that turns a list of messages into the text a chat model
//! was trained on. [`ChatTemplate`] evaluates it the way `transformers`'
//! `apply_chat_template` does:
//!
//! * the environment uses `trim_blocks` and `lstrip_blocks`, drops a single trailing newline
//!   of the template, and never auto-escapes;
//! * Python string and dict methods (`.strip()`, `.startswith()`, `.items()`, …) work through
//!   `minijinja_contrib::pycompat`;
//! * the globals `raise_exception(message)` (fails the render with that message) and
//!   `strftime_now(format)` (the current time; UTC here, where Python would use local time)
//!   are defined, and `tojson` formats like Python's `json.dumps` (`", "`/`": "` separators,
//!   no HTML escaping, optional `indent`);
//! * the context holds `messages`, `add_generation_prompt`, `tools = none`,
//!   `documents = none`, and `bos_token`/`eos_token` when the model defines them;
//! * `{% generation %}…{% endgeneration %}` blocks (used by some templates to mark assistant
//!   text for `return_assistant_tokens_mask`) render their body unchanged.

use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};
use serde_json::Value as Json;

use super::error::{DataError, Result};
use super::jsonl::Message;
use super::tokenizer::{chat_template_string, TokenizerConfig};

/// Name under which the template is registered in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template with the special tokens it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles a template from its Jinja source. `bos_token` and `eos_token` are exposed to the
    /// template as variables of the same names (left undefined when `None`).
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self> {
        Self::build(source.into(), "<string>".to_string(), bos_token, eos_token)
    }

    /// Loads the chat template of a Hugging Face model directory, or `Ok(None)` if it has none.
    ///
    /// The template is taken from `chat_template.jinja` if that file exists, else from the
    /// `chat_template` entry of `tokenizer_config.json` (a string, or a list of
    /// `{"name", "template"}` objects of which the one named `default` is used), else from
    /// `chat_template.json`. `bos_token` and `eos_token` come from `tokenizer_config.json`
    /// (strings or `AddedToken` objects).
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let config = TokenizerConfig::from_model_dir(dir)?.unwrap_or_default();
        let bos = config.bos_token.as_deref();
        let eos = config.eos_token.as_deref();

        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| DataError::io(&jinja, &e))?;
            return Self::build(source, jinja.display().to_string(), bos, eos).map(Some);
        }
        if let (Some(source), Some(path)) = (&config.chat_template, &config.path) {
            return Self::build(source.clone(), path.display().to_string(), bos, eos).map(Some);
        }
        let json_path = dir.join("chat_template.json");
        if json_path.is_file() {
            let text =
                std::fs::read_to_string(&json_path).map_err(|e| DataError::io(&json_path, &e))?;
            let config_error = |message: String| DataError::Config {
                path: json_path.clone(),
                message,
            };
            let value: Json = serde_json::from_str(&text)
                .map_err(|e| config_error(format!("invalid JSON: {e}")))?;
            let source = match value.get("chat_template") {
                Some(v) => chat_template_string(v).map_err(config_error)?,
                None => {
                    return Err(config_error(
                        "expected a \"chat_template\" entry, found none".into(),
                    ))
                }
            };
            return Self::build(source, json_path.display().to_string(), bos, eos).map(Some);
        }
        Ok(None)
    }

    fn build(
        source: String,
        origin: String,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, neutralize_generation_tags(&source))
            .map_err(|e| DataError::template(&origin, &e))?;
        Ok(ChatTemplate {
            env,
            source,
            origin,
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        })
    }

    /// The Jinja source, as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from: a file path, or `<string>`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The `bos_token` variable, if defined.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The `eos_token` variable, if defined.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders a conversation. With `add_generation_prompt` the text ends with the header of a
    /// new assistant turn, ready for generation.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        if let Some(bos) = &self.bos_token {
            ctx.push(("bos_token", Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            ctx.push(("eos_token", Value::from(eos.as_str())));
        }
        let ctx: Value = ctx.into_iter().collect();
        self.env
            .get_template(TEMPLATE_NAME)
            .and_then(|t| t.render(ctx))
            .map_err(|e| DataError::template(&self.origin, &e))
    }
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (a `transformers` extension minijinja
/// does not know) into `{% if true %}` / `{% endif %}`, keeping whitespace-control dashes so the
/// output is unchanged.
fn neutralize_generation_tags(source: &str) -> String {
    if !source.contains("generation") {
        return source.to_string();
    }
    static TAG: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = TAG.get_or_init(|| {
        regex::Regex::new(r"\{%(-?)(\s*)(end)?generation(\s*)(-?)%\}").expect("valid regex")
    });
    re.replace_all(source, |c: &regex::Captures<'_>| {
        let tag = if c.get(3).is_some() {
            "endif"
        } else {
            "if true"
        };
        format!("{{%{}{}{}{}{}%}}", &c[1], &c[2], tag, &c[4], &c[5])
    })
    .into_owned()
}

/// `raise_exception(message)`: fails the render with the template's own message.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time formatted with a `strftime` pattern.
fn strftime_now(format: String) -> std::result::Result<String, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("system clock: {e}")))?;
    strftime::format(&format, now.as_secs() as i64)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {e}")))
}

/// `value | tojson(indent=None)`, formatted like Python's
/// `json.dumps(value, ensure_ascii=False, indent=indent)`, which is what `transformers` uses.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let indent = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&indent),
            );
            serde::Serialize::serialize(&json, &mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            serde::Serialize::serialize(&json, &mut ser)
        }
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    Ok(Value::from_safe_string(text))
}

/// Python's default `json.dumps` separators: `", "` between items, `": "` after keys.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// A small UTC `strftime` for `strftime_now`: templates use it to print today's date.
mod strftime {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const WEEKDAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];

    /// The proleptic Gregorian (year, month 1–12, day 1–31) of a day count since 1970-01-01
    /// (Howard Hinnant's `civil_from_days`).
    fn civil_from_days(days: i64) -> (i64, u32, u32) {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        (year, month, day)
    }

    fn is_leap(year: i64) -> bool {
        (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
    }

    /// Formats `unix_secs` (UTC) with the directives `%a %A %b %B %h %d %e %m %y %Y %H %I %M
    /// %S %p %j %F %T %D %R %Z %z %n %t %%`. Any other directive is an error.
    pub(super) fn format(fmt: &str, unix_secs: i64) -> Result<String, String> {
        let days = unix_secs.div_euclid(86_400);
        let secs = unix_secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
        let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
        const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = CUMULATIVE[month as usize - 1] + day + u32::from(month > 2 && is_leap(year));
        let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
        let month_name = MONTHS[month as usize - 1];

        let mut out = String::with_capacity(fmt.len() + 16);
        let mut chars = fmt.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let Some(d) = chars.next() else {
                return Err("format ends with a lone '%'".to_string());
            };
            match d {
                'a' => out.push_str(&WEEKDAYS[weekday][..3]),
                'A' => out.push_str(WEEKDAYS[weekday]),
                'b' | 'h' => out.push_str(&month_name[..3]),
                'B' => out.push_str(month_name),
                'd' => out.push_str(&format!("{day:02}")),
                'e' => out.push_str(&format!("{day:2}")),
                'm' => out.push_str(&format!("{month:02}")),
                'y' => out.push_str(&format!("{:02}", year.rem_euclid(100))),
                'Y' => out.push_str(&year.to_string()),
                'H' => out.push_str(&format!("{hour:02}")),
                'I' => out.push_str(&format!("{hour12:02}")),
                'M' => out.push_str(&format!("{minute:02}")),
                'S' => out.push_str(&format!("{second:02}")),
                'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
                'j' => out.push_str(&format!("{yday:03}")),
                'F' => out.push_str(&format!("{year}-{month:02}-{day:02}")),
                'T' => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
                'R' => out.push_str(&format!("{hour:02}:{minute:02}")),
                'D' => out.push_str(&format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100))),
                'Z' => out.push_str("UTC"),
                'z' => out.push_str("+0000"),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                '%' => out.push('%'),
                other => return Err(format!("unsupported directive %{other}")),
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn known_instants() {
            // 2023-11-14 22:13:20 UTC, a Tuesday, day 318 of a non-leap year.
            let t = 1_700_000_000;
            assert_eq!(format("%d %b %Y", t).unwrap(), "14 Nov 2023");
            assert_eq!(
                format("%A, %B %e, %y %H:%M:%S %p %j", t).unwrap(),
                "Tuesday, November 14, 23 22:13:20 PM 318"
            );
            assert_eq!(
                format("%F %T %I%% %a", t).unwrap(),
                "2023-11-14 22:13:20 10% Tue"
            );
            // 2024-02-29 00:00:00 UTC (leap day), a Thursday; and the epoch.
            assert_eq!(
                format("%F %a %j %I %p", 1_709_164_800).unwrap(),
                "2024-02-29 Thu 060 12 AM"
            );
            assert_eq!(format("%F %A", 0).unwrap(), "1970-01-01 Thursday");
            assert_eq!(format("%F", -86_400).unwrap(), "1969-12-31");
            assert!(format("%Q", t).is_err());
            assert!(format("50%", t).is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> Message {
        Message::new("user", s)
    }

    #[test]
    fn generation_tags_are_transparent() {
        let t = ChatTemplate::new("{% for m in messages %}{%- generation -%} [{{ m.content }}] {%- endgeneration -%}{% endfor %}", None, None).unwrap();
        assert_eq!(t.render(&[user("a"), user("b")], false).unwrap(), "[a][b]");
    }

    #[test]
    fn tojson_is_python_like() {
        let t = ChatTemplate::new(
            "{{ {'a': [1, 'x<y'], 'b': none} | tojson }}|{{ messages[0] | tojson(indent=2) }}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render(&[user("hé")], false).unwrap(),
            "{\"a\": [1, \"x<y\"], \"b\": null}|{\n  \"role\": \"user\",\n  \"content\": \"hé\"\n}"
        );
    }

    #[test]
    fn undefined_special_tokens_render_empty() {
        let t = ChatTemplate::new("[{{ bos_token }}]{{ eos_token }}", None, Some("</s>")).unwrap();
        assert_eq!(t.render(&[user("a")], false).unwrap(), "[]</s>");
    }

    #[test]
    fn strftime_now_renders_a_date() {
        let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", None, None).unwrap();
        let out = t.render(&[user("a")], false).unwrap();
        assert_eq!(out.len(), 10, "{out}");
        assert!(out.starts_with("20"), "{out}");
    }
}
