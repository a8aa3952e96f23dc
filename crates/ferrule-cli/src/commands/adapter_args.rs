//! The adapter flags `train` and `inspect` share: the method, its common options, and any
//! PEFT key through `--peft-option`.

use anyhow::{bail, Context, Result};
use ferrule::train::TrainConfig;
use ferrule::tuners::{registry, AdapterConfig};
use serde_json::Value;

#[derive(clap::Args, Default)]
pub struct AdapterArgs {
    /// Adaptation method: lora (default), ia3, ln-tuning, prompt-tuning, prefix-tuning or randlora (or its PEFT
    /// type, e.g. LN_TUNING).
    #[arg(long)]
    pub method: Option<String>,
    /// Any option of the method by its PEFT key, VALUE as JSON or a plain string
    /// (e.g. --peft-option init_ia3_weights=false); repeatable.
    #[arg(long, value_name = "KEY=VALUE")]
    pub peft_option: Vec<String>,
    /// A --target-modules entry (or rank/alpha pattern key) that matches no module is a warning, not an error.
    #[arg(long)]
    pub allow_unmatched: bool,
    /// LoRA rank r.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with --use-rslora); default 16 for ferrule train's LoRA, else PEFT's default of the method.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout probability on the adapter input during training (default 0).
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated module names (matched as dotted suffixes), or "all-linear".
    #[arg(long)]
    pub target_modules: Option<String>,
    /// A regular expression that must match whole module paths (instead of --target-modules).
    #[arg(long)]
    pub target_regex: Option<String>,
    /// Comma-separated module names (dotted suffixes) never adapted, even when a target matches them.
    #[arg(long)]
    pub exclude_modules: Option<String>,
    /// IA3: comma-separated targets whose input (not output) is scaled.
    #[arg(long)]
    pub feedforward_modules: Option<String>,
    /// Comma-separated modules trained in full and saved with the adapter (e.g. a head).
    #[arg(long)]
    pub modules_to_save: Option<String>,
    /// rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r.
    #[arg(long)]
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row over the normalised LoRA-updated weight.
    #[arg(long)]
    pub use_dora: bool,
    /// Base biases trained beside the adapter: none (default), all, or lora_only (the targeted layers').
    #[arg(long, value_name = "none|all|lora_only")]
    pub bias: Option<String>,
    /// A trainable bias on lora_B (scaled with the update).
    #[arg(long)]
    pub lora_bias: bool,
    /// true (Kaiming A, zero B), false, gaussian, pissa, pissa_niter_<N> or olora (the last three move part of
    /// the base into the adapter; the saved adapter is converted to plain LoRA of rank 2r).
    #[arg(long)]
    pub init_lora_weights: Option<String>,
    /// Prompt / prefix tuning: virtual tokens (prefix positions) to train.
    #[arg(long)]
    pub num_virtual_tokens: Option<usize>,
    /// Prompt tuning: RANDOM (default), SAMPLE_VOCAB or TEXT.
    #[arg(long, value_name = "RANDOM|SAMPLE_VOCAB|TEXT")]
    pub prompt_tuning_init: Option<String>,
    /// Prompt tuning: the text whose token embeddings start the prompt (implies TEXT; tokenized with
    /// the model's own tokenizer unless tokenizer_name_or_path is set).
    #[arg(long)]
    pub prompt_tuning_init_text: Option<String>,
    /// Prefix tuning: train the prefix through an MLP of this hidden width (prefix_projection).
    #[arg(long, value_name = "WIDTH")]
    pub prefix_projection: Option<usize>,
}

fn names(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

fn list_or_all_linear(s: &str) -> Value {
    if s.trim() == "all-linear" {
        Value::from("all-linear")
    } else {
        Value::from(names(s))
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

/// The adapter part of the flags applied over the config file's.
impl AdapterArgs {
    /// Whether any adapter flag was given.
    pub fn given(&self) -> bool {
        self.method.is_some()
            || !self.peft_option.is_empty()
            || self.lora_r.is_some()
            || self.lora_alpha.is_some()
            || self.lora_dropout.is_some()
            || self.target_modules.is_some()
            || self.target_regex.is_some()
            || self.exclude_modules.is_some()
            || self.feedforward_modules.is_some()
            || self.modules_to_save.is_some()
            || self.use_rslora
            || self.use_dora
            || self.bias.is_some()
            || self.lora_bias
            || self.init_lora_weights.is_some()
            || self.num_virtual_tokens.is_some()
            || self.prompt_tuning_init.is_some()
            || self.prompt_tuning_init_text.is_some()
            || self.prefix_projection.is_some()
    }

    /// The adapter of `c` (a config file's, or the default) with these flags applied.
    pub fn apply(&self, c: &TrainConfig) -> Result<AdapterConfig> {
        let a = self;
        let mut ad = chosen_method(c, a.method.as_deref())?;
        let mut flags: Vec<(&str, &str, Value)> = Vec::new();
        let mut push = |flag: &'static str, key: &'static str, v: Option<Value>| {
            if let Some(v) = v {
                flags.push((flag, key, v));
            }
        };
        push("--lora-r", "r", a.lora_r.map(Value::from));
        push("--lora-alpha", "lora_alpha", a.lora_alpha.map(Value::from));
        push(
            "--lora-dropout",
            "lora_dropout",
            a.lora_dropout.map(Value::from),
        );
        push(
            "--target-modules",
            "target_modules",
            a.target_modules.as_deref().map(list_or_all_linear),
        );
        push(
            "--target-regex",
            "target_modules",
            a.target_regex.clone().map(Value::from),
        );
        push(
            "--exclude-modules",
            "exclude_modules",
            a.exclude_modules.as_deref().map(|e| Value::from(names(e))),
        );
        push(
            "--feedforward-modules",
            "feedforward_modules",
            a.feedforward_modules
                .as_deref()
                .map(|e| Value::from(names(e))),
        );
        push(
            "--modules-to-save",
            "modules_to_save",
            a.modules_to_save.as_deref().map(|m| Value::from(names(m))),
        );
        push(
            "--use-rslora",
            "use_rslora",
            a.use_rslora.then_some(Value::Bool(true)),
        );
        push(
            "--use-dora",
            "use_dora",
            a.use_dora.then_some(Value::Bool(true)),
        );
        push("--bias", "bias", a.bias.clone().map(Value::from));
        push(
            "--lora-bias",
            "lora_bias",
            a.lora_bias.then_some(Value::Bool(true)),
        );
        push(
            "--init-lora-weights",
            "init_lora_weights",
            a.init_lora_weights.as_deref().map(|i| match i {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                other => Value::from(other),
            }),
        );
        push(
            "--num-virtual-tokens",
            "num_virtual_tokens",
            a.num_virtual_tokens.map(Value::from),
        );
        push(
            "--prompt-tuning-init",
            "prompt_tuning_init",
            a.prompt_tuning_init
                .as_deref()
                .map(|i| Value::from(i.to_ascii_uppercase())),
        );
        push(
            "--prompt-tuning-init-text",
            "prompt_tuning_init_text",
            a.prompt_tuning_init_text.clone().map(Value::from),
        );
        if a.prompt_tuning_init_text.is_some() && a.prompt_tuning_init.is_none() {
            push(
                "--prompt-tuning-init-text",
                "prompt_tuning_init",
                Some(Value::from("TEXT")),
            );
        }
        push(
            "--prefix-projection",
            "prefix_projection",
            a.prefix_projection.map(|_| Value::Bool(true)),
        );
        push(
            "--prefix-projection",
            "encoder_hidden_size",
            a.prefix_projection.map(Value::from),
        );
        for (flag, key, v) in flags {
            set_option(&mut ad, flag, key, v)?;
        }
        // TEXT init reads a tokenizer (peft requires tokenizer_name_or_path): the model's own,
        // written into the adapter config, unless the config names one.
        let text_init =
            ad.options.get("prompt_tuning_init").and_then(Value::as_str) == Some("TEXT");
        if text_init
            && ad
                .options
                .get("tokenizer_name_or_path")
                .is_none_or(Value::is_null)
        {
            tracing::info!("prompt_tuning_init_text is tokenized with the model's tokenizer (tokenizer_name_or_path = {:?})", c.model);
            ad.options.insert(
                "tokenizer_name_or_path".into(),
                Value::from(c.model.clone()),
            );
        }
        for o in &a.peft_option {
            let (k, v) = parse_option(o)?;
            set_option(&mut ad, "--peft-option", &k, v)?;
        }
        Ok(ad)
    }
}
