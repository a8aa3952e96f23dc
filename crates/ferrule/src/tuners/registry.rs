//! The methods ferrule knows, keyed by PEFT's `peft_type`. Everything outside `tuners/`
//! (adapter files, the trainer, merge, inspect, the CLI) reaches a method through here and
//! names none.
//!
//! Adding a method: a folder `tuners/<method>/` with `config.rs` (its PEFT keys, serde),
//! `layer.rs` (the math), `mod.rs` (the [`Tuner`] on a [`super::TunerCore`], its `METHOD`
//! and its command-line flags), and one line in [`METHODS`]. `docs/ARCHITECTURE.md` walks
//! through an example.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde_json::{Map, Value};

use super::config::AdapterConfig;
use super::flags::OptionFlag;
use super::Tuner;

/// What a method's builder is given.
pub struct BuildContext<'a> {
    /// Seeds initialisation (and dropout masks through [`super::TrainingClock`]).
    pub seed: u64,
    pub device: &'a Device,
    /// Tensors of a saved adapter or checkpoint under PEFT keys; `None` for a fresh adapter.
    pub weights: Option<HashMap<String, Tensor>>,
    /// A `target_modules` entry (or pattern key) that matches nothing is a warning, not an error.
    pub allow_unmatched: bool,
    /// Where a method that trains base tensors as copies of its own (full fine-tuning) drops
    /// each base tensor once its copy exists ([`crate::model::BaseRelease`]); `None` keeps the
    /// base whole (a caller that builds several models from the same weights).
    pub release_base: Option<crate::model::BaseRelease>,
}

impl<'a> BuildContext<'a> {
    /// A fresh adapter on `device`: seed 0, no saved tensors, every target entry must match,
    /// the base kept whole.
    pub fn fresh(device: &'a Device) -> Self {
        Self {
            seed: 0,
            device,
            weights: None,
            allow_unmatched: false,
            release_base: None,
        }
    }
}

/// One adaptation method.
#[derive(Debug)]
pub struct Method {
    /// The CLI's name (`ferrule train --method lora`).
    pub name: &'static str,
    /// PEFT's `peft_type` (`adapter_config.json`).
    pub peft_type: &'static str,
    /// One line for `--help` and `inspect`.
    pub summary: &'static str,
    /// Its `adapter_config.json` keys that ferrule implements.
    pub keys: &'static [&'static str],
    /// Fills PEFT's defaults that depend on the model type (default targets).
    pub complete: fn(&mut Map<String, Value>, &str) -> Result<()>,
    /// Builds the tuner from a completed config.
    pub build: fn(&AdapterConfig, BuildContext) -> Result<Box<dyn Tuner>>,
    /// Its command-line flags beside [`super::flags::COMMON`] (`--lora-r`); a flag may be
    /// listed by several methods that share its keys.
    pub flags: &'static [OptionFlag],
    /// Keys that follow from the flags given and the model path (`options`, model), once the
    /// flags are set; `None` when nothing does.
    pub complete_flags: Option<CompleteFlags>,
    /// Its trainable parameters counted from the model's layer shapes alone, for `ferrule plan`
    /// on a `config.json` without weights: `Ok(None)` for a config it cannot count that way.
    /// `None` when only building the method on the weights counts it.
    pub count_from_shapes: Option<CountFromShapes>,
    /// A finished run is the whole model, written as a Hugging Face folder (full
    /// fine-tuning), rather than an adapter.
    pub trains_whole_model: bool,
    /// Why the method needs the dense base weights in f32, if it does: `--compute-dtype auto`
    /// then picks f32 on every machine (an explicit bf16 stays an error the method names).
    pub f32_weights: Option<&'static str>,
}

/// [`Method::complete_flags`]: sets keys in the options from the flags given and the model path.
pub type CompleteFlags = fn(&mut Map<String, Value>, &str) -> Result<()>;

/// [`Method::count_from_shapes`]: trainable parameters from the options and the layer shapes.
pub type CountFromShapes = fn(&Map<String, Value>, &BlockShapes) -> Result<Option<usize>>;

/// A model known by the shapes of its linear layers alone, as `ferrule plan` reads them from a
/// `config.json`: the linears of one block, repeated in every block.
#[derive(Clone, Copy, Debug)]
pub struct BlockShapes<'a> {
    /// The model family, for messages (`decoder`, `bert`).
    pub family: &'a str,
    /// Blocks.
    pub layers: usize,
    pub linears: &'a [BlockLinear],
    /// Linears outside the blocks that targets can select, counted once (BERT's
    /// `pooler.dense`, which `all-linear` takes; the output head is never a target).
    pub outside: &'a [BlockLinear],
    /// Parameters of every norm layer (weights and biases of each block's norms and of the
    /// final or embedding norm).
    pub norm_params: usize,
}

impl BlockShapes<'_> {
    /// `Σ per_linear(l)` over the linears of every block that `targets` select (PEFT suffixes,
    /// or `all-linear`). A target that names no linear is an error listing the block's linears.
    pub fn sum_over_targets(
        &self,
        targets: &[String],
        per_linear: impl Fn(&BlockLinear) -> Result<usize>,
    ) -> Result<usize> {
        let names = |linear: &BlockLinear, target: &str| {
            linear.name == target || linear.name.ends_with(&format!(".{target}"))
        };
        let all = targets.iter().any(|t| t == "all-linear");
        let every = || self.linears.iter().chain(self.outside);
        for target in targets.iter().filter(|t| *t != "all-linear") {
            anyhow::ensure!(
                every().any(|l| names(l, target)),
                "--target-modules {target:?} names no linear layer of this {} model; its linears are {}",
                self.family,
                every().map(|l| l.name).collect::<Vec<_>>().join(", ")
            );
        }
        let selected = |l: &&BlockLinear| all || targets.iter().any(|t| names(l, t));
        let mut per_block = 0;
        for l in self.linears.iter().filter(selected) {
            per_block += per_linear(l)?;
        }
        let mut once = 0;
        for l in self.outside.iter().filter(selected) {
            once += per_linear(l)?;
        }
        Ok(self.layers * per_block + once)
    }
}

/// A linear layer of every transformer block: its module name (PEFT's suffix), input and
/// output features.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BlockLinear {
    pub name: &'static str,
    pub in_features: usize,
    pub out_features: usize,
    /// Whether the layer has a bias (`out_features` more parameters).
    pub bias: bool,
}

/// Every registered method.
pub static METHODS: &[&Method] = &[
    &super::lora::METHOD,
    &super::dylora::METHOD,
    &super::ia3::METHOD,
    &super::bitfit::METHOD,
    &super::difffit::METHOD,
    &super::bottleneck::METHOD,
    &super::pst::METHOD,
    &super::ln_tuning::METHOD,
    &super::prompt_tuning::METHOD,
    &super::dept::METHOD,
    &super::prefix_tuning::METHOD,
    &super::randlora::METHOD,
    &super::svfit::METHOD,
    &super::pela::METHOD,
    &super::conpet::METHOD,
    &super::ist::METHOD,
    &super::l4q::METHOD,
    &super::trainable_tokens::METHOD,
    &super::full::METHOD,
];

/// A named setting of a method that the field calls a method of its own (DoRA is LoRA with
/// `use_dora`): `ferrule compare --methods dora` trains it beside plain LoRA.
#[derive(Debug)]
pub struct Variant {
    pub name: &'static str,
    pub method: &'static Method,
    /// The PEFT key it sets, and the value as JSON.
    pub key: &'static str,
    pub value: &'static str,
}

/// The variants [`variant`] knows.
pub static VARIANTS: &[Variant] = &[
    Variant {
        name: "dora",
        method: &super::lora::METHOD,
        key: "use_dora",
        value: "true",
    },
    Variant {
        name: "rslora",
        method: &super::lora::METHOD,
        key: "use_rslora",
        value: "true",
    },
    Variant {
        name: "pissa",
        method: &super::lora::METHOD,
        key: "init_lora_weights",
        value: "\"pissa\"",
    },
];

/// The adapter config a method name (`lora`, `ia3`, a PEFT type) or a [`Variant`]'s name
/// (`dora`) stands for: the method's defaults ([`default_adapter`] for LoRA) with the variant's
/// key set. An unknown name is an error listing both kinds of names.
pub fn adapter_named(name: &str) -> Result<AdapterConfig> {
    if let Some(v) = VARIANTS.iter().find(|v| v.name == name.trim()) {
        let mut a = adapter_of(v.method);
        let value = serde_json::from_str(v.value).expect("a variant's value is JSON");
        a.options.insert(v.key.to_string(), value);
        return Ok(a);
    }
    let m = by_name(name).map_err(|_| {
        let variants: Vec<&str> = VARIANTS.iter().map(|v| v.name).collect();
        anyhow::anyhow!(
            "unknown method {name:?}; ferrule implements {}, and the variants {}",
            list(),
            variants.join(", ")
        )
    })?;
    Ok(adapter_of(m))
}

/// A fresh adapter of `m` with its train defaults.
fn adapter_of(m: &'static Method) -> AdapterConfig {
    match m.peft_type == super::lora::METHOD.peft_type {
        true => default_adapter(),
        false => AdapterConfig::new(m.peft_type, Map::new()),
    }
}

/// The method with PEFT type `peft_type`; an unsupported type is an error that names it.
pub fn by_peft_type(peft_type: &str) -> Result<&'static Method> {
    match METHODS.iter().find(|m| m.peft_type == peft_type) {
        Some(m) => Ok(m),
        None => bail!(
            "peft_type {peft_type:?} is not supported; ferrule implements {}",
            list()
        ),
    }
}

/// What `ferrule train` trains when told no method: LoRA with r = 8 and lora_alpha = 16
/// (PEFT's default alpha is 8; ferrule's train default has been 16 = 2r since its first release).
pub fn default_adapter() -> AdapterConfig {
    let mut o = Map::new();
    o.insert("r".into(), 8.into());
    o.insert("lora_alpha".into(), 16.into());
    AdapterConfig::new(super::lora::METHOD.peft_type, o)
}

/// The method a CLI name (`lora`, `ia3`, `ln-tuning`) or a PEFT type (`LN_TUNING`) names.
pub fn by_name(name: &str) -> Result<&'static Method> {
    let norm = name.trim().to_ascii_lowercase().replace('_', "-");
    match METHODS
        .iter()
        .find(|m| m.name == norm || m.peft_type.eq_ignore_ascii_case(name.trim()))
    {
        Some(m) => Ok(m),
        None => bail!("unknown method {name:?}; ferrule implements {}", list()),
    }
}

fn list() -> String {
    METHODS
        .iter()
        .map(|m| format!("{} ({})", m.name, m.peft_type))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds the tuner `config` describes; the config must be completed ([`AdapterConfig::resolved`]).
pub fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    (config.method()?.build)(config, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_types_resolve_and_unknown_ones_are_named() {
        assert_eq!(by_name("ln_tuning").unwrap().peft_type, "LN_TUNING");
        assert_eq!(by_name("IA3").unwrap().name, "ia3");
        let e = by_peft_type("ADALORA").unwrap_err().to_string();
        assert!(
            e.contains("\"ADALORA\"") && e.contains("lora (LORA)"),
            "{e}"
        );
        assert!(by_name("dora-ish")
            .unwrap_err()
            .to_string()
            .contains("unknown method \"dora-ish\""));
    }

    #[test]
    fn every_method_has_a_distinct_name_and_type() {
        for (i, a) in METHODS.iter().enumerate() {
            for b in &METHODS[i + 1..] {
                assert!(a.name != b.name && a.peft_type != b.peft_type);
            }
            // peft's TrainableTokensConfig alone has no modules_to_save: it trains rows only;
            // full fine-tuning trains every module already.
            let no_modules_to_save = matches!(a.peft_type, "TRAINABLE_TOKENS" | "FULL");
            assert!(
                no_modules_to_save || a.keys.contains(&"modules_to_save"),
                "{}",
                a.name
            );
        }
    }
}
