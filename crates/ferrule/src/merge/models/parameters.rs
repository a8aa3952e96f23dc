//! Merge methods' parameters: which each method takes (its spec, with mergekit's defaults)
//! and how a setting resolves for one tensor (`mergekit/config.py: evaluate_setting`,
//! `mergekit/parameter_resolver.py`).
//!
//! A setting is looked up from the most specific place to the least: the input's own
//! `parameters` (a `models[]` entry or a slice source), the slice's, then the file's. Within
//! one place, `[{filter, value}]` entries are tried in order and the first whose `filter` is
//! `*`, absent, or a substring of the tensor's name wins. A list (gradient) is interpolated
//! linearly at `t = layer / (layers in the slice − 1)` (`t = 0` for embeddings, final norm and
//! head, as mergekit plans them).

use anyhow::{bail, Result};

use super::config::{Conditional, Parameters, Scalar, ScalarOrGradient, Setting};

/// Along which inputs a parameter is bound (`ParameterScope`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One value for the tensor.
    Shared,
    /// One value per input, the base included.
    Input,
    /// One value per input other than the base.
    NonBase,
}

/// A parameter's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Float,
    Bool,
}

/// A parameter a method takes, with its default (`None`: required, unless `optional`).
#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    pub name: &'static str,
    pub scope: Scope,
    pub kind: Kind,
    pub default: Option<f64>,
    /// No default and not required (passthrough's `scale`).
    pub optional: bool,
}

const fn p(name: &'static str, scope: Scope, kind: Kind, default: Option<f64>) -> ParamSpec {
    ParamSpec {
        name,
        scope,
        kind,
        default,
        optional: false,
    }
}

/// A resolved value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Float(f64),
    Bool(bool),
    Unset,
}

impl Value {
    pub fn float(self) -> f64 {
        match self {
            Value::Float(x) => x,
            Value::Bool(b) => b as u8 as f64,
            Value::Unset => f64::NAN,
        }
    }

    pub fn bool(self) -> bool {
        match self {
            Value::Bool(b) => b,
            Value::Float(x) => x != 0.0,
            Value::Unset => false,
        }
    }
}

/// The parameters of a generalized-task-arithmetic method (mergekit's registry).
pub fn task_arithmetic_params(
    default_normalize: bool,
    default_rescale: bool,
    gamma: bool,
    epsilon: bool,
) -> Vec<ParamSpec> {
    use Kind::*;
    use Scope::*;
    let b = |v: bool| Some(v as u8 as f64);
    let mut v = vec![
        p("int8_mask", Shared, Bool, b(false)),
        p("normalize", Shared, Bool, b(default_normalize)),
        p("rescale", Shared, Bool, b(default_rescale)),
        p("lambda", Shared, Float, Some(1.0)),
        p("weight", NonBase, Float, None),
        p("density", NonBase, Float, Some(1.0)),
    ];
    if gamma {
        v.push(p("gamma", NonBase, Float, Some(0.01)));
    }
    if epsilon {
        v.push(p("epsilon", NonBase, Float, Some(0.15)));
    }
    v
}

/// `linear`'s parameters.
pub fn linear_params() -> Vec<ParamSpec> {
    vec![
        p("weight", Scope::Input, Kind::Float, None),
        p("normalize", Scope::Shared, Kind::Bool, Some(1.0)),
    ]
}

/// `slerp`'s.
pub fn slerp_params() -> Vec<ParamSpec> {
    vec![p("t", Scope::Shared, Kind::Float, None)]
}

/// `model_stock`'s.
pub fn model_stock_params() -> Vec<ParamSpec> {
    vec![p("filter_wise", Scope::Shared, Kind::Bool, Some(0.0))]
}

/// `passthrough`'s.
pub fn passthrough_params() -> Vec<ParamSpec> {
    vec![ParamSpec {
        optional: true,
        ..p("scale", Scope::Input, Kind::Float, None)
    }]
}

/// Resolves `spec` for a tensor named `tensor` at gradient position `t`, from `sources`
/// (most specific first). `location` names the tensor and input for the error when a
/// required parameter is set nowhere.
pub fn resolve(
    spec: &ParamSpec,
    sources: &[Option<&Parameters>],
    tensor: &str,
    t: f64,
    location: &dyn Fn() -> String,
) -> Result<Value> {
    for params in sources.iter().flatten() {
        if let Some(setting) = params.get(spec.name) {
            if let Some(v) = evaluate(setting, tensor, t, spec)? {
                return Ok(v);
            }
        }
    }
    match spec.default {
        Some(d) => Ok(match spec.kind {
            Kind::Float => Value::Float(d),
            Kind::Bool => Value::Bool(d != 0.0),
        }),
        None if spec.optional => Ok(Value::Unset),
        None => bail!(
            "missing required parameter {} for {}",
            spec.name,
            location()
        ),
    }
}

fn scalar(s: &Scalar, spec: &ParamSpec) -> Result<Value> {
    Ok(match (spec.kind, s) {
        (Kind::Float, Scalar::Number(x)) => Value::Float(*x),
        (Kind::Float, Scalar::Text(t)) if t.trim().parse::<f64>().is_ok() => {
            Value::Float(t.trim().parse().expect("checked"))
        }
        (Kind::Bool, Scalar::Bool(b)) => Value::Bool(*b),
        // pydantic's lax bool: 0/1 and the usual words.
        (Kind::Bool, Scalar::Number(x)) if *x == 0.0 || *x == 1.0 => Value::Bool(*x == 1.0),
        (Kind::Bool, Scalar::Text(t)) => match t.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Value::Bool(true),
            "false" | "no" | "off" | "0" => Value::Bool(false),
            _ => bail!("parameter {}: {t:?} is not a boolean", spec.name),
        },
        (Kind::Float, other) => bail!("parameter {}: {other:?} is not a number", spec.name),
        (Kind::Bool, other) => bail!("parameter {}: {other:?} is not a boolean", spec.name),
    })
}

fn gradient(values: &[Scalar], t: f64, spec: &ParamSpec) -> Result<Option<Value>> {
    if values.is_empty() {
        return Ok(None);
    }
    let vals: Vec<Value> = values
        .iter()
        .map(|v| scalar(v, spec))
        .collect::<Result<_>>()?;
    if spec.kind == Kind::Bool {
        return Ok(Some(vals[(t * (vals.len() - 1) as f64) as usize]));
    }
    let scaled = t * (vals.len() - 1) as f64;
    let i0 = scaled as usize;
    let i1 = (i0 + 1).min(vals.len() - 1);
    let frac = scaled - i0 as f64;
    Ok(Some(Value::Float(
        (1.0 - frac) * vals[i0].float() + frac * vals[i1].float(),
    )))
}

fn evaluate(setting: &Setting, tensor: &str, t: f64, spec: &ParamSpec) -> Result<Option<Value>> {
    let conds: &[Conditional] = match setting {
        Setting::Scalar(s) => return scalar(s, spec).map(Some),
        Setting::Gradient(g) => return gradient(g, t, spec),
        Setting::Conditional(c) => std::slice::from_ref(c),
        Setting::Conditionals(c) => c,
    };
    for c in conds {
        let hit = match c.filter.as_deref() {
            None | Some("*") => true,
            Some(f) => !tensor.is_empty() && tensor.contains(f),
        };
        if hit {
            return match &c.value {
                ScalarOrGradient::Scalar(s) => scalar(s, spec).map(Some),
                ScalarOrGradient::Gradient(g) => gradient(g, t, spec),
            };
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::models::config::MergeConfig;

    fn params(yaml: &str) -> Parameters {
        let c = MergeConfig::parse(&format!(
            "merge_method: linear\nmodels: [{{model: a}}]\nparameters:\n{yaml}"
        ))
        .unwrap();
        c.parameters.unwrap()
    }

    #[test]
    fn gradients_interpolate_and_filters_pick_the_first_match() {
        let w = p("weight", Scope::Input, Kind::Float, None);
        let ps = params("  weight: [0.0, 1.0, 0.5]\n  t:\n    - filter: self_attn\n      value: [0, 1]\n    - value: 0.25\n");
        let none = || String::new();
        let at = |t| resolve(&w, &[Some(&ps)], "x", t, &none).unwrap().float();
        assert_eq!(at(0.0), 0.0);
        assert_eq!(at(0.25), 0.5);
        assert_eq!(at(0.75), 0.75);
        assert_eq!(at(1.0), 0.5);
        let t = p("t", Scope::Shared, Kind::Float, None);
        let get = |name, pos| resolve(&t, &[Some(&ps)], name, pos, &none).unwrap().float();
        assert_eq!(get("model.layers.1.self_attn.q_proj.weight", 0.5), 0.5);
        assert_eq!(get("model.layers.1.mlp.up_proj.weight", 0.5), 0.25);
    }

    #[test]
    fn missing_required_parameters_are_named() {
        let w = p("weight", Scope::NonBase, Kind::Float, None);
        let err = resolve(&w, &[None], "x", 0.0, &|| "model b, tensor x".into()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing required parameter weight for model b, tensor x"
        );
    }
}
