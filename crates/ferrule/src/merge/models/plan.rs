//! The merge plan: every output tensor, with the input tensors it is made from and its
//! resolved parameters, built and checked before anything is written (`mergekit/plan.py`).
//!
//! `models:` is one slice spanning every layer of every model (the base appended when it is
//! not listed, as mergekit does). A slice's layer `i` reads layer `layer_range[0] + i` of each
//! source and becomes the next output layer. Tensors outside the layers are read from the
//! first slice's sources (the embeddings) or the last's (final norm, head).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Result};
use regex::Regex;

use super::config::{MergeConfig, OutDtype, Parameters};
use super::inputs::InputModel;
use super::methods::{Method, TensorParams};
use super::parameters::{self, Kind, Scope, Value};
use super::tokenizer::{is_vocabulary_table, resolve_rules, Permutation, Vocab};

/// One output tensor's recipe.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: OutDtype,
    /// `(model, tensor)` per input, in input order.
    pub inputs: Vec<(String, String)>,
    pub base: Option<usize>,
    pub params: TensorParams,
    /// For an embedding or head under `tokenizer_source`: how each input's rows map onto the
    /// output vocabulary.
    pub remap: Option<Arc<Permutation>>,
}

/// The whole plan.
pub struct Plan {
    pub method: Method,
    pub tensors: Vec<PlannedTensor>,
    /// Output decoder layers.
    pub layers: usize,
    /// The model whose config and tokenizer the output takes.
    pub reference: String,
    /// The output vocabulary's size, under `tokenizer_source`.
    pub vocab_size: Option<usize>,
    /// Under `tokenizer_source: union`, the tokenizer the output gets.
    pub tokenizer: Option<tokenizers::Tokenizer>,
}

struct Source<'a> {
    model: &'a str,
    start: usize,
    params: Option<&'a Parameters>,
}

struct Slice<'a> {
    sources: Vec<Source<'a>>,
    layers: usize,
    base: Option<&'a str>,
    params: Option<&'a Parameters>,
}

fn layer_regex() -> Regex {
    Regex::new(r"^(.*\blayers)\.(\d+)\.(.+)$").expect("valid regex")
}

/// Builds and checks the plan.
pub fn build(config: &MergeConfig, models: &BTreeMap<String, InputModel>) -> Result<Plan> {
    let method = Method::from_name(&config.merge_method)?;
    check_parameter_names(config, method)?;
    let slices = slices(config, models)?;
    let re = layer_regex();
    let reference = config
        .base_model
        .clone()
        .unwrap_or_else(|| slices[0].sources[0].model.to_string());
    let block = config.tokenizer.as_ref();
    let added: Vec<String> = block
        .map(|t| t.tokens.iter().map(|(tok, _)| tok.clone()).collect())
        .unwrap_or_default();
    let output = super::tokenizer::output_vocabulary(
        config.vocabulary_source(),
        &added,
        config.base_model.as_deref(),
        &super::referenced(config),
        models,
    )?;
    let (target, tokenizer) = match output {
        Some(o) => (Some(o.vocab), o.tokenizer),
        None => (None, None),
    };
    let pad_to = block.and_then(|t| t.pad_to_multiple_of).unwrap_or(1);
    let mut planner = Planner {
        config,
        models,
        method,
        specs: method.params(),
        out: Vec::new(),
        vocab_size: target.as_ref().map(|v| v.len().div_ceil(pad_to) * pad_to),
        target,
        vocabs: BTreeMap::new(),
    };
    // Embeddings and anything else outside the layers before them, head and norm after.
    let outside = |slice: &Slice, pre: bool| -> Vec<String> {
        models[slice.sources[0].model]
            .names()
            .into_iter()
            .filter(|n| !re.is_match(n) && n.contains("embed") == pre)
            .collect()
    };
    for name in outside(&slices[0], true) {
        planner.tensor(&slices[0], &name, &name, |_| name.clone(), 0.0)?;
    }
    let mut out_layer = 0;
    for (si, slice) in slices.iter().enumerate() {
        for i in 0..slice.layers {
            let t = if slice.layers > 1 {
                i as f64 / (slice.layers - 1) as f64
            } else {
                1.0
            };
            let first = &slice.sources[0];
            let names: Vec<(String, String)> = models[first.model]
                .names()
                .into_iter()
                .filter_map(|n| {
                    let c = re.captures(&n)?;
                    (c[2].parse::<usize>().ok()? == first.start + i)
                        .then(|| (c[1].to_string(), c[3].to_string()))
                })
                .collect();
            if names.is_empty() {
                bail!(
                    "slices[{si}]: model {} has no layer {}",
                    first.model,
                    first.start + i
                )
            }
            for (prefix, suffix) in names {
                let out = format!("{prefix}.{out_layer}.{suffix}");
                let input = |s: &Source| format!("{prefix}.{}.{suffix}", s.start + i);
                planner.tensor(slice, &out, &suffix, input, t)?;
            }
            out_layer += 1;
        }
    }
    let last = slices.last().expect("one slice");
    for name in outside(last, false) {
        planner.tensor(last, &name, &name, |_| name.clone(), 0.0)?;
    }
    Ok(Plan {
        method,
        vocab_size: planner.vocab_size,
        tensors: planner.out,
        layers: out_layer,
        reference,
        tokenizer,
    })
}

fn slices<'a>(
    config: &'a MergeConfig,
    models: &BTreeMap<String, InputModel>,
) -> Result<Vec<Slice<'a>>> {
    if let Some(list) = &config.models {
        let mut sources: Vec<Source> = list
            .iter()
            .map(|m| Source {
                model: &m.model,
                start: 0,
                params: m.parameters.as_ref(),
            })
            .collect();
        if let Some(b) = &config.base_model {
            if !list.iter().any(|m| &m.model == b) {
                sources.push(Source {
                    model: b,
                    start: 0,
                    params: None,
                });
            }
        }
        let layers = sources
            .iter()
            .map(|s| models[s.model].num_layers().unwrap_or(0))
            .collect::<Vec<_>>();
        if layers.iter().any(|l| *l != layers[0]) {
            let detail: Vec<String> = sources
                .iter()
                .zip(&layers)
                .map(|(s, l)| format!("{} has {l}", s.model))
                .collect();
            bail!(
                "the models have different numbers of layers ({}): use slices to choose which layers to merge",
                detail.join(", ")
            )
        }
        return Ok(vec![Slice {
            sources,
            layers: layers[0],
            base: config.base_model.as_deref(),
            params: None,
        }]);
    }
    let list = config.slices.as_ref().expect("checked: models or slices");
    let mut out = Vec::new();
    for (i, s) in list.iter().enumerate() {
        for (j, src) in s.sources.iter().enumerate() {
            let have = models[&src.model].num_layers();
            if have.is_some_and(|n| src.layer_range.1 > n) {
                bail!(
                    "slices[{i}].sources[{j}]: layer_range {:?} runs past the {} layers of {}",
                    src.layer_range,
                    have.unwrap_or(0),
                    src.model
                )
            }
        }
        out.push(Slice {
            sources: s
                .sources
                .iter()
                .map(|src| Source {
                    model: &src.model,
                    start: src.layer_range.0,
                    params: src.parameters.as_ref(),
                })
                .collect(),
            layers: s.sources[0].layer_range.1 - s.sources[0].layer_range.0,
            base: s.base_model.as_deref().or(config.base_model.as_deref()),
            params: s.parameters.as_ref(),
        });
    }
    Ok(out)
}

/// Refuses a parameter the method does not take (mergekit ignores it silently).
fn check_parameter_names(config: &MergeConfig, method: Method) -> Result<()> {
    let known: Vec<&str> = method.params().iter().map(|p| p.name).collect();
    let mut places: Vec<(String, &Parameters)> = Vec::new();
    if let Some(p) = &config.parameters {
        places.push(("parameters".into(), p));
    }
    for (i, m) in config.models.iter().flatten().enumerate() {
        if let Some(p) = &m.parameters {
            places.push((format!("models[{i}].parameters"), p));
        }
    }
    for (i, s) in config.slices.iter().flatten().enumerate() {
        if let Some(p) = &s.parameters {
            places.push((format!("slices[{i}].parameters"), p));
        }
        for (j, src) in s.sources.iter().enumerate() {
            if let Some(p) = &src.parameters {
                places.push((format!("slices[{i}].sources[{j}].parameters"), p));
            }
        }
    }
    for (place, params) in places {
        if let Some(k) = params.keys().find(|k| !known.contains(&k.as_str())) {
            bail!(
                "{place}.{k}: merge method {} takes no parameter {k:?}; it takes {}",
                config.merge_method,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        }
    }
    Ok(())
}

struct Planner<'a> {
    config: &'a MergeConfig,
    models: &'a BTreeMap<String, InputModel>,
    method: Method,
    specs: Vec<parameters::ParamSpec>,
    out: Vec<PlannedTensor>,
    /// The output vocabulary under `tokenizer_source`.
    target: Option<Vocab>,
    vocab_size: Option<usize>,
    vocabs: BTreeMap<String, Vocab>,
}

impl Planner<'_> {
    /// Plans output tensor `out` of `slice` from each source's `input(source)`.
    fn tensor(
        &mut self,
        slice: &Slice,
        out: &str,
        _suffix: &str,
        input: impl Fn(&Source) -> String,
        t: f64,
    ) -> Result<()> {
        let inputs: Vec<(String, String)> = slice
            .sources
            .iter()
            .map(|s| (s.model.to_string(), input(s)))
            .collect();
        let base = slice
            .base
            .and_then(|b| slice.sources.iter().position(|s| s.model == b));
        if self.method.needs_base() && base.is_none() {
            match slice.base {
                None => bail!("merge method {} needs base_model", self.config.merge_method),
                Some(b) => {
                    bail!("base_model {b} is not among the sources of the slice that makes {out}")
                }
            }
        }
        self.method
            .check_inputs(&self.config.merge_method, inputs.len(), out)?;
        let remap = match self.target.take() {
            Some(target) if is_vocabulary_table(out) => {
                let p = self.permutation(&target, &inputs, base);
                self.target = Some(target);
                Some(p?)
            }
            other => {
                self.target = other;
                None
            }
        };
        let mut shape = self.check_shapes(&inputs, out, remap.is_some())?;
        if let Some(p) = &remap {
            shape[0] = p.size;
        }
        let (ref_model, ref_name) = &inputs[base.unwrap_or(0)];
        let dtype = self
            .config
            .output_dtype()
            .or_else(|| self.models[ref_model].dtype(ref_name))
            .unwrap_or(OutDtype::F32);
        let mut params = TensorParams::default();
        let shared_sources = [slice.params, self.config.parameters.as_ref()];
        for spec in self.specs.iter().filter(|s| s.scope == Scope::Shared) {
            let v = parameters::resolve(spec, &shared_sources, out, t, &|| out.to_string())?;
            params.shared.insert(spec.name, v);
        }
        for (i, (s, (model, name))) in slice.sources.iter().zip(&inputs).enumerate() {
            let sources = [s.params, slice.params, self.config.parameters.as_ref()];
            let mut mine = BTreeMap::new();
            for spec in &self.specs {
                let applies = match spec.scope {
                    Scope::Shared => false,
                    Scope::Input => true,
                    Scope::NonBase => Some(i) != base,
                };
                if !applies {
                    continue;
                }
                let location = || format!("model {model}, tensor {name}");
                let v = parameters::resolve(spec, &sources, name, t, &location)?;
                check_value(spec.name, spec.kind, v, &location)?;
                mine.insert(spec.name, v);
            }
            params.per_input.push(mine);
        }
        self.out.push(PlannedTensor {
            name: out.to_string(),
            shape,
            dtype,
            inputs,
            base,
            params,
            remap,
        });
        Ok(())
    }

    fn permutation(
        &mut self,
        target: &Vocab,
        inputs: &[(String, String)],
        base: Option<usize>,
    ) -> Result<Arc<Permutation>> {
        let mut each = Vec::new();
        for (model, name) in inputs {
            if !self.vocabs.contains_key(model) {
                let v = self.models[model].vocab()?;
                self.vocabs.insert(model.clone(), v);
            }
            let rows = self.models[model].shape(name).map_or(0, |s| s[0]);
            each.push((self.vocabs[model].clone(), rows));
        }
        let p = Permutation::new(target, &each, base)?;
        let Some(block) = &self.config.tokenizer else {
            return Ok(Arc::new(p));
        };
        let named: Vec<(&str, &Vocab, usize)> = inputs
            .iter()
            .zip(&each)
            .map(|((m, _), (v, rows))| (m.as_str(), v, *rows))
            .collect();
        let table = &inputs[0].1;
        let rules = resolve_rules(&block.tokens, target, &named, table)?;
        let pad_to = block.pad_to_multiple_of.unwrap_or(1);
        Ok(Arc::new(p.with_block(rules, pad_to)))
    }

    /// Every input has the tensor, as a float, of one shape: the error names the tensor and
    /// both shapes (a vocabulary or architecture mismatch mergekit may merge silently).
    fn check_shapes(
        &self,
        inputs: &[(String, String)],
        out: &str,
        remapped: bool,
    ) -> Result<Vec<usize>> {
        let mut first: Option<(&str, Vec<usize>)> = None;
        for (model, name) in inputs {
            let m = &self.models[model];
            let shape = match m.shape(name) {
                Some(s) => s,
                None => bail!(
                    "model {model} has no tensor {name:?} (needed for output tensor {out}); the models' architectures differ"
                ),
            };
            if !m.is_float(name) {
                bail!("model {model}: tensor {name:?} is not a float tensor; it cannot be merged")
            }
            match &first {
                None => first = Some((model, shape)),
                // Remapped tables may differ in rows, not in width.
                Some((m0, s0)) if (*s0 != shape && !remapped) || s0[1..] != shape[1..] => {
                    let hint = if name.contains("embed") || name.contains("lm_head") {
                        " (the vocabularies differ: `tokenizer_source: base` or `union` remaps the rows by token)"
                    } else {
                        " (the architectures differ)"
                    };
                    bail!("tensor {name}: shape {s0:?} in {m0} but {shape:?} in {model}{hint}")
                }
                Some(_) => {}
            }
        }
        Ok(first.expect("at least one input").1)
    }
}

fn check_value(name: &str, kind: Kind, v: Value, location: &dyn Fn() -> String) -> Result<()> {
    if kind != Kind::Float {
        return Ok(());
    }
    let x = v.float();
    let bad = match name {
        "density" => !(x > 0.0 && x <= 1.0),
        "gamma" | "epsilon" => !(0.0..1.0).contains(&x),
        _ => !x.is_finite() && v != Value::Unset,
    };
    if bad {
        let range = match name {
            "density" => "(0, 1]",
            "gamma" | "epsilon" => "[0, 1)",
            _ => "a finite number",
        };
        bail!("{name} = {x} for {}: must be in {range}", location())
    }
    Ok(())
}
