//! `BottleneckConfig`, with the key names and defaults of LLM-Adapters' peft fork
//! (`peft_type` `BOTTLENECK`; AGI-Edgerunners/LLM-Adapters `peft/src/peft/tuners/bottleneck.py`,
//! `BottleneckConfig`): `bottleneck_size` 256, `non_linearity` "tanh", `adapter_dropout` 0,
//! `use_parallel_adapter` and `use_adapterp` false, `scaling` 1.0, `bias` "none",
//! `init_weights` "bert".

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tuners::bias::BiasMode;
use crate::tuners::flags::{text, FlagValue, OptionFlag};
use crate::tuners::target::ModuleSpec;

fn bottleneck_size() -> usize {
    256
}

fn tanh() -> String {
    "tanh".into()
}

fn none() -> String {
    "none".into()
}

/// The adapter output's scale `s`: a constant, or `"learned"`: one trainable scalar per
/// adapted layer, `adapter_scaling`, starting at 1 (bottleneck.py `Linear.__init__`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scaling {
    /// Written as a JSON float (`1.0`) even when integral: LLM-Adapters tests
    /// `isinstance(scaling, float)`, so an integer `1` there leaves the scale unset and its
    /// forward pass fails. ferrule reads an integer as the number it is.
    Constant(f64),
    Learned(Learned),
}

/// The string `"learned"`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Learned {
    #[serde(rename = "learned")]
    Learned,
}

/// How fresh `adapter_down` / `adapter_up` start (bottleneck.py `Linear.reset_parameters`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitWeights {
    /// Both from N(0, 0.02²) (BERT's `init_bert_weights`): the adapter is not the identity at
    /// step 0.
    #[serde(rename = "bert")]
    Bert,
    /// `adapter_down` Kaiming-uniform with a = √5 (bound 1/√in), `adapter_up` zero (He et al.
    /// 2022, "mix-and-match" adapters): the adapter starts as the identity.
    #[serde(rename = "mam_adapter")]
    MamAdapter,
}

/// Where the adapters go: on targeted linear layers (LLM-Adapters), or on the residual
/// branches of each transformer layer (Houlsby et al. 2019, Pfeiffer et al. 2021, He et al.
/// 2022), a placement of ferrule's whose targets are branch paths (`self_attn`, `mlp`; BERT's
/// `attention`, `output`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    #[default]
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "residual_branch")]
    ResidualBranch,
}

impl Placement {
    fn is_linear(&self) -> bool {
        *self == Placement::Linear
    }
}

/// The activation between the two projections: names of transformers' `ACT2FN` that ferrule
/// implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Tanh,
    Relu,
    /// `silu` and its `ACT2FN` alias `swish`.
    Silu,
    /// `gelu`: the exact erf form (transformers' `GELUActivation`).
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
}

/// The `non_linearity` values ferrule implements.
pub const ACTIVATIONS: &[&str] = &[
    "tanh",
    "relu",
    "silu",
    "swish",
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
];

impl Activation {
    /// `non_linearity`'s value; another one is an error naming the key and the values known.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "tanh" => Activation::Tanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => bail!(
                "bottleneck: non_linearity (--non-linearity) {other:?} is not implemented; expected one of {}",
                ACTIVATIONS.join(", ")
            ),
        })
    }
}

/// One bottleneck adapter's configuration, as `adapter_config.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BottleneckConfig {
    /// The bottleneck width `bn`: `adapter_down: [bn, d_in]`, `adapter_up: [d_out, bn]`.
    #[serde(default = "bottleneck_size")]
    pub bottleneck_size: usize,
    #[serde(default = "tanh")]
    pub non_linearity: String,
    /// Dropout on the adapter's input while training.
    #[serde(default)]
    pub adapter_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    /// ferrule's (LLM-Adapters has no such key): targets never adapted. Written only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<ModuleSpec>,
    /// Every target gets a parallel adapter `y = L(x) + h(x)`, instead of the type the module
    /// name gives.
    #[serde(default)]
    pub use_parallel_adapter: bool,
    /// Chooses AdapterP's default targets (`down_proj`) only; the layer never reads it
    /// (as in bottleneck.py).
    #[serde(default)]
    pub use_adapterp: bool,
    #[serde(default = "Scaling::one")]
    pub scaling: Scaling,
    /// Base biases trained beside the adapter: `"none"`, `"all"` (every bias of the model) or
    /// `"adapter_only"` (the targeted linears'), as bottleneck.py's
    /// `mark_only_adapter_as_trainable`.
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default = "InitWeights::bert")]
    pub init_weights: InitWeights,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// ferrule's (LLM-Adapters has no such key): written only when not `linear`.
    #[serde(default, skip_serializing_if = "Placement::is_linear")]
    pub placement: Placement,
}

impl Scaling {
    fn one() -> Self {
        Scaling::Constant(1.0)
    }
}

impl InitWeights {
    fn bert() -> Self {
        InitWeights::Bert
    }
}

/// Keys of a BOTTLENECK `adapter_config.json` that ferrule understands.
pub const KNOWN_KEYS: &[&str] = &[
    "bottleneck_size",
    "non_linearity",
    "adapter_dropout",
    "target_modules",
    "exclude_modules",
    "use_parallel_adapter",
    "use_adapterp",
    "scaling",
    "bias",
    "init_weights",
    "modules_to_save",
    "placement",
];

impl BottleneckConfig {
    /// What LLM-Adapters would fail on later or ferrule does not implement: a zero bottleneck,
    /// an unknown activation, a dropout outside [0, 1), a non-finite scale, an unknown `bias`,
    /// `"adapter_only"` where no linear is targeted (`placement = "residual_branch"`).
    pub fn validate(&self) -> Result<Activation> {
        if self.bottleneck_size == 0 {
            bail!("bottleneck: bottleneck_size (--bottleneck-size) is 0: expected at least 1 (the width of adapter_down's output)")
        }
        if !(0.0..1.0).contains(&self.adapter_dropout) {
            bail!(
                "bottleneck: adapter_dropout (--adapter-dropout) is {}: expected a probability in [0, 1)",
                self.adapter_dropout
            )
        }
        if let Scaling::Constant(s) = self.scaling {
            if !(s as f32).is_finite() {
                bail!("bottleneck: scaling (--adapter-scaling) is {s}: expected a finite number or \"learned\"")
            }
        }
        self.bias_mode()?;
        Activation::parse(&self.non_linearity)
    }

    /// The `bias` mode ([`BiasMode::parse_as`]).
    pub fn bias_mode(&self) -> Result<BiasMode> {
        let mode = BiasMode::parse_as("bottleneck", "adapter", &self.bias)?;
        if mode == BiasMode::AdaptedOnly && self.placement == Placement::ResidualBranch {
            bail!("bottleneck: bias = \"adapter_only\" trains the biases of the targeted linear layers, and placement = \"residual_branch\" targets branches, not linears; use \"all\" or \"none\"")
        }
        Ok(mode)
    }

    /// The constant scale, or `None` for a learned one.
    pub fn constant_scaling(&self) -> Option<f64> {
        match self.scaling {
            Scaling::Constant(s) => Some(s),
            Scaling::Learned(_) => None,
        }
    }
}

/// `--adapter-scaling`: a number, or `learned`.
fn scaling_value(v: Value) -> Value {
    let t = text(&v).trim();
    match t.parse::<f64>() {
        Ok(x) => Value::from(x),
        Err(_) => Value::from(t),
    }
}

/// The bottleneck adapter's flags beside the common ones.
pub static FLAGS: &[OptionFlag] = &[
    OptionFlag {
        name: "bottleneck-size",
        value: FlagValue::Count,
        value_name: None,
        help: "Bottleneck adapter: the bottleneck width (default 256).",
        keys: |v| vec![("bottleneck_size", v)],
    },
    OptionFlag {
        name: "non-linearity",
        value: FlagValue::Text,
        value_name: Some("tanh|relu|silu|gelu|gelu_new"),
        help: "Bottleneck adapter: the activation between its two projections (default tanh).",
        keys: |v| vec![("non_linearity", v)],
    },
    OptionFlag {
        name: "adapter-dropout",
        value: FlagValue::Number,
        value_name: None,
        help: "Bottleneck adapter: dropout probability on its input during training (default 0).",
        keys: |v| vec![("adapter_dropout", v)],
    },
    OptionFlag {
        name: "use-parallel-adapter",
        value: FlagValue::Switch,
        value_name: None,
        help: "Bottleneck adapter: a parallel adapter y = L(x) + h(x) on every target (default targets q, k, v).",
        keys: |v| vec![("use_parallel_adapter", v)],
    },
    OptionFlag {
        name: "use-adapterp",
        value: FlagValue::Switch,
        value_name: None,
        help: "Bottleneck adapter: AdapterP's default target (down_proj only).",
        keys: |v| vec![("use_adapterp", v)],
    },
    OptionFlag {
        name: "adapter-scaling",
        value: FlagValue::Text,
        value_name: Some("S|learned"),
        help: "Bottleneck adapter: the scale of its output, a number (default 1) or learned (one trained scalar per layer).",
        keys: |v| vec![("scaling", scaling_value(v))],
    },
    crate::tuners::bias::BIAS_FLAG,
    OptionFlag {
        name: "adapter-placement",
        value: FlagValue::Text,
        value_name: Some("linear|residual_branch"),
        help: "Bottleneck adapter: on the targeted linears (default, LLM-Adapters) or on the residual branches named by the targets (self_attn, mlp; BERT: attention, output): series (Houlsby, Pfeiffer) or, with --use-parallel-adapter, parallel.",
        keys: |v| vec![("placement", v)],
    },
    OptionFlag {
        name: "adapter-init",
        value: FlagValue::Text,
        value_name: Some("bert|mam_adapter"),
        help: "Bottleneck adapter: initialisation, bert (both projections N(0, 0.02)) or mam_adapter (Kaiming down, zero up).",
        keys: |v| vec![("init_weights", v)],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<BottleneckConfig> {
        Ok(serde_json::from_value(v)?)
    }

    #[test]
    fn defaults_are_llm_adapters_and_scaling_reads_both_forms() {
        let c = parse(serde_json::json!({})).unwrap();
        assert_eq!(c.bottleneck_size, 256);
        assert_eq!(c.validate().unwrap(), Activation::Tanh);
        assert_eq!(c.init_weights, InitWeights::Bert);
        assert_eq!(c.constant_scaling(), Some(1.0));
        // An integer scale is the number it is, and is written back as a float, which
        // LLM-Adapters' `isinstance(scaling, float)` accepts.
        let c = parse(serde_json::json!({"scaling": 2})).unwrap();
        assert_eq!(c.constant_scaling(), Some(2.0));
        let written = serde_json::to_string(&serde_json::to_value(&c).unwrap()).unwrap();
        assert!(written.contains("\"scaling\":2.0"), "{written}");
        let c = parse(serde_json::json!({"scaling": "learned", "init_weights": "mam_adapter"}));
        let c = c.unwrap();
        assert_eq!(c.constant_scaling(), None);
        assert_eq!(c.init_weights, InitWeights::MamAdapter);
        assert!(parse(serde_json::json!({"scaling": "learnt"})).is_err());
        assert!(parse(serde_json::json!({"init_weights": "xavier"})).is_err());
        assert_eq!(
            scaling_value(Value::from("0.5")),
            Value::from(0.5),
            "--adapter-scaling 0.5"
        );
        assert_eq!(
            scaling_value(Value::from("learned")),
            Value::from("learned")
        );
    }

    #[test]
    fn bad_values_are_named() {
        let err = |v: Value| parse(v).unwrap().validate().unwrap_err().to_string();
        let e = err(serde_json::json!({"bottleneck_size": 0}));
        assert!(
            e.contains("bottleneck_size (--bottleneck-size) is 0"),
            "{e}"
        );
        let e = err(serde_json::json!({"non_linearity": "mish"}));
        assert!(
            e.contains("non_linearity (--non-linearity) \"mish\" is not implemented")
                && e.contains("tanh, relu, silu"),
            "{e}"
        );
        let e = err(serde_json::json!({"adapter_dropout": 1.0}));
        assert!(
            e.contains("adapter_dropout (--adapter-dropout) is 1"),
            "{e}"
        );
        let e = err(serde_json::json!({"bias": "adapter_only", "placement": "residual_branch"}));
        assert!(
            e.contains("placement = \"residual_branch\" targets branches"),
            "{e}"
        );
        let e = err(serde_json::json!({"bias": "lora_only"}));
        assert!(
            e.contains(
                "bottleneck: bias must be \"none\", \"all\" or \"adapter_only\", got \"lora_only\""
            ),
            "{e}"
        );
        for name in ACTIVATIONS {
            Activation::parse(name).unwrap();
        }
    }
}
