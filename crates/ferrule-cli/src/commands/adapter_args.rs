//! The adapter flags `train`, `inspect` and `plan` share: the method, any PEFT key through
//! `--peft-option`, and the flags each method declares in its own folder
//! (`ferrule::tuners::flags`): this file names no method and no method's flag.

use anyhow::{bail, Context, Result};
use clap::{Arg, ArgAction, ArgMatches, Command, FromArgMatches};
use ferrule::train::TrainConfig;
use ferrule::tuners::flags::{self, FlagValue, OptionFlag};
use ferrule::tuners::{registry, AdapterConfig};
use serde_json::Value;

/// The parsed adapter flags.
#[derive(Default)]
pub struct AdapterArgs {
    /// `--method`: a CLI name (`ln-tuning`) or PEFT type (`LN_TUNING`).
    pub method: Option<String>,
    /// `--peft-option KEY=VALUE`, repeatable.
    pub peft_option: Vec<String>,
    /// `--allow-unmatched`.
    pub allow_unmatched: bool,
    /// The method flags given, each with its value as [`FlagValue`] makes it JSON, in the
    /// order [`flags::all`] lists them.
    given: Vec<(&'static OptionFlag, Value)>,
}

/// The `--method` help: every registered method, so a new one is listed without a change here.
fn method_help() -> String {
    let names: Vec<&str> = registry::METHODS.iter().map(|m| m.name).collect();
    let (last, rest) = names.split_last().expect("the registry lists methods");
    format!(
        "Adaptation method: {} (default), {} or {last} (or its PEFT type, e.g. LN_TUNING)",
        rest[0],
        rest[1..].join(", ")
    )
}

/// The clap argument of a method flag, as clap's derive would make it from a field of that
/// type: an optional value, or a switch; the help's trailing period dropped. Its id is the
/// flag's name.
fn flag_arg(flag: &'static OptionFlag) -> Arg {
    let help = flag.help.strip_suffix('.').unwrap_or(flag.help);
    let arg = Arg::new(flag.name).long(flag.name).help(help);
    // Clap's derive names a value after its field (`LORA_R`); clap takes only static names.
    let value_name: &'static str = flag.value_name.unwrap_or_else(|| {
        Box::leak(
            flag.name
                .replace('-', "_")
                .to_ascii_uppercase()
                .into_boxed_str(),
        )
    });
    match flag.value {
        FlagValue::Switch => arg.action(ArgAction::SetTrue),
        FlagValue::Count => arg
            .value_name(value_name)
            .value_parser(clap::value_parser!(usize)),
        FlagValue::Number => arg
            .value_name(value_name)
            .value_parser(clap::value_parser!(f64)),
        FlagValue::Text => arg
            .value_name(value_name)
            .value_parser(clap::value_parser!(String)),
    }
}

/// The value of `flag` if it was given, as JSON.
fn flag_value(flag: &OptionFlag, matches: &ArgMatches) -> Option<Value> {
    let id = flag.name;
    match flag.value {
        FlagValue::Switch => matches.get_flag(id).then_some(Value::Bool(true)),
        FlagValue::Count => matches.get_one::<usize>(id).map(|v| Value::from(*v)),
        FlagValue::Number => matches.get_one::<f64>(id).map(|v| Value::from(*v)),
        FlagValue::Text => matches
            .get_one::<String>(id)
            .map(|v| Value::from(v.as_str())),
    }
}

impl clap::Args for AdapterArgs {
    fn augment_args(cmd: Command) -> Command {
        let cmd = cmd
            .arg(
                Arg::new("method")
                    .long("method")
                    .value_name("METHOD")
                    .help(method_help()),
            )
            .arg(
                Arg::new("peft_option")
                    .long("peft-option")
                    .value_name("KEY=VALUE")
                    .action(ArgAction::Append)
                    .help("Any option of the method by its PEFT key, VALUE as JSON or a plain string (e.g. --peft-option init_ia3_weights=false); repeatable"),
            )
            .arg(
                Arg::new("allow_unmatched")
                    .long("allow-unmatched")
                    .action(ArgAction::SetTrue)
                    .help("A --target-modules entry (or rank/alpha pattern key) that matches no module is a warning, not an error"),
            );
        flags::all()
            .into_iter()
            .fold(cmd, |cmd, flag| cmd.arg(flag_arg(flag)))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for AdapterArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let given = flags::all()
            .into_iter()
            .filter_map(|flag| flag_value(flag, matches).map(|v| (flag, v)))
            .collect();
        Ok(Self {
            method: matches.get_one::<String>("method").cloned(),
            peft_option: matches
                .get_many::<String>("peft_option")
                .map(|v| v.cloned().collect())
                .unwrap_or_default(),
            allow_unmatched: matches.get_flag("allow_unmatched"),
            given,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// The method to train: the config file's, replaced by `--method` when that names another one
/// (an `[adapter]` table of one method with `--method` of another is an error).
fn chosen_method(c: &TrainConfig, method: Option<&str>) -> Result<AdapterConfig> {
    let from_file = c.adapter()?;
    let Some(name) = method else {
        return Ok(from_file);
    };
    let m = registry::by_name(name)?;
    if m.peft_type == from_file.peft_type {
        return Ok(from_file);
    }
    if c.adapter.is_some() || c.lora.is_some() {
        bail!("--method {name} conflicts with the config file's adapter (peft_type {:?}); use one of them", from_file.peft_type)
    }
    Ok(AdapterConfig::new(m.peft_type, serde_json::Map::new()))
}

/// Sets one of the method's PEFT keys from a flag; a key the method lacks is an error naming the flag.
fn set_option(adapter: &mut AdapterConfig, flag: &str, key: &str, value: Value) -> Result<()> {
    let method = adapter.method()?;
    if !method.keys.contains(&key) {
        bail!(
            "{flag} sets {key:?}, which the {} method does not have (its options: {})",
            method.name,
            method.keys.join(", ")
        )
    }
    adapter.options.insert(key.to_string(), value);
    Ok(())
}

/// `KEY=VALUE` with VALUE parsed as JSON, else taken as a string.
fn parse_option(s: &str) -> Result<(String, Value)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("--peft-option {s:?}: expected KEY=VALUE"))?;
    // Not JSON (e.g. `init_lora_weights=gaussian`): the plain string. A wrong type is still caught
    // when the method deserializes its config, with an error naming the method.
    let v = serde_json::from_str(v).unwrap_or_else(|_| Value::from(v));
    Ok((k.trim().to_string(), v))
}

impl AdapterArgs {
    /// Whether any adapter flag was given (`--allow-unmatched` alone is none).
    pub fn given(&self) -> bool {
        self.method.is_some() || !self.peft_option.is_empty() || !self.given.is_empty()
    }

    /// The adapter of `c` (a config file's, or the default) with these flags applied: each
    /// method flag's keys, the chosen method's keys that follow from them
    /// (`Method::complete_flags`), then every `--peft-option`.
    pub fn apply(&self, c: &TrainConfig) -> Result<AdapterConfig> {
        let mut adapter = chosen_method(c, self.method.as_deref())?;
        for (flag, value) in &self.given {
            let name = format!("--{}", flag.name);
            for (key, v) in (flag.keys)(value.clone()) {
                set_option(&mut adapter, &name, key, v)?;
            }
        }
        flags::complete(adapter.method()?, &mut adapter.options, &c.model)?;
        for o in &self.peft_option {
            let (k, v) = parse_option(o)?;
            set_option(&mut adapter, "--peft-option", &k, v)?;
        }
        Ok(adapter)
    }
}
