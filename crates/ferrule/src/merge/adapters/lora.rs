//! LoRA adapters combined: peft's `add_weighted_adapter`, `_check_add_weighted_adapter`,
//! `_generalized_task_arithmetic_weighted_adapter` and
//! `_svd_generalized_task_arithmetic_weighted_adapter` (`peft/tuners/lora/model.py`).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;

use super::combine::{self, Pruning};
use super::{flat, same_key, split_key, union_of, Combination, CombineOptions, WeightedAdapter};
use crate::merge::delta::mask_rng;
use crate::tuners::lora::config::LoraConfig;

const A: &str = "lora_A.weight";
const B: &str = "lora_B.weight";
const EMB_A: &str = "lora_embedding_A";
const EMB_B: &str = "lora_embedding_B";
/// A base table peft saves beside the factors (`save_embedding_layers`): the same in every
/// adapter of one base, passed through.
const BASE: &str = "base_layer.weight";

/// One adapter's factors on one module: `B: [rows, r]`, `A: [r, cols]` (row-major), whatever
/// the layer (an embedding's `lora_embedding_B·lora_embedding_A` is `[dim, vocab]`, as peft's
/// `_svd_...` transposes it to).
struct Factors {
    /// Index of the adapter in the inputs.
    input: usize,
    b: Vec<f32>,
    a: Vec<f32>,
    r: usize,
    rows: usize,
    cols: usize,
    /// `alpha / r` (or `/ √r`) of this module in this adapter.
    scaling: f64,
}

/// A module and the factors each adapter has on it.
struct Module {
    embedding: bool,
    factors: Vec<Factors>,
}

pub(super) fn combine(
    inputs: &[WeightedAdapter],
    options: &CombineOptions,
) -> Result<(Value, BTreeMap<String, Tensor>)> {
    let configs = check_configs(inputs)?;
    let ranks: Vec<usize> = configs
        .iter()
        .map(|c| {
            c.rank_pattern
                .values()
                .filter_map(Value::as_u64)
                .fold(c.r, |m, r| m.max(r as usize))
        })
        .collect();
    let combination = options.combination;
    let new_rank = match combination {
        Combination::Cat => ranks.iter().sum(),
        c if c.is_svd() => options
            .svd_rank
            .unwrap_or_else(|| *ranks.iter().max().unwrap()),
        _ => {
            if ranks.iter().any(|r| *r != ranks[0]) {
                let list: Vec<String> = inputs
                    .iter()
                    .zip(&ranks)
                    .map(|(a, r)| format!("{} r={r}", a.name))
                    .collect();
                bail!(
                    "combination {} needs adapters of one rank, as peft requires ({}); use cat or an svd type for different ranks",
                    combination.name(),
                    list.join(", ")
                )
            }
            ranks[0]
        }
    };
    let (modules, passed) = collect_modules(inputs, &configs)?;
    let mut tensors = BTreeMap::new();
    for (path, module) in &modules {
        let Combined { b, a, r } = combine_module(path, module, inputs, options, new_rank)?;
        let (rows, cols) = (module.factors[0].rows, module.factors[0].cols);
        let (ka, kb) = if module.embedding {
            (EMB_A, EMB_B)
        } else {
            (A, B)
        };
        let key = |s: &str| format!("base_model.model.{path}.{s}");
        tensors.insert(key(kb), Tensor::from_vec(b, (rows, r), &Device::Cpu)?);
        tensors.insert(key(ka), Tensor::from_vec(a, (r, cols), &Device::Cpu)?);
    }
    tensors.extend(passed);
    let mut config = inputs[0].adapter.config.clone();
    let target_modules = union_of(inputs, "target_modules")?;
    let o = config
        .as_object_mut()
        .context("adapter_config.json is not an object")?;
    o.insert("r".into(), Value::from(new_rank));
    o.insert("lora_alpha".into(), Value::from(new_rank));
    o.insert("target_modules".into(), target_modules);
    o.insert("alpha_pattern".into(), Value::Object(Default::default()));
    o.insert("rank_pattern".into(), Value::Object(Default::default()));
    if configs[0].use_rslora {
        // peft keeps the first adapter's use_rslora: the new adapter is scaled by r/√r = √r.
        tracing::warn!(
            "adapter {} uses rsLoRA: the combined adapter keeps use_rslora=true with lora_alpha=r={new_rank}, so peft and ferrule scale it by √{new_rank}, as peft's add_weighted_adapter does",
            inputs[0].name
        );
    }
    Ok((config, tensors))
}

/// Each adapter's config, refusing what peft's combination would drop or cannot combine.
fn check_configs(inputs: &[WeightedAdapter]) -> Result<Vec<LoraConfig>> {
    let mut configs = Vec::new();
    for a in inputs {
        let file = a.adapter.dir.join(crate::peft_io::CONFIG_FILE);
        let cfg: LoraConfig = serde_json::from_value(a.adapter.config.clone())
            .with_context(|| format!("adapter {} ({})", a.name, file.display()))?;
        cfg.validate()
            .with_context(|| format!("adapter {} ({})", a.name, file.display()))?;
        let refuse = |what: &str| -> Result<()> {
            bail!(
                "adapter {} ({}): {what}; peft's add_weighted_adapter does not combine it (the combined adapter would drop it)",
                a.name,
                file.display()
            )
        };
        if cfg.use_dora {
            refuse("uses DoRA (use_dora), whose magnitude vector has no weighted combination")?
        }
        if cfg.lora_bias {
            refuse("trains a bias on lora_B (lora_bias)")?
        }
        if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            refuse("trains modules in full (modules_to_save)")?
        }
        if cfg.trainable_token_indices.is_some() {
            refuse("trains token rows (trainable_token_indices)")?
        }
        if a.adapter
            .config
            .get("target_parameters")
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|l| !l.is_empty()))
        {
            refuse("targets parameters (target_parameters)")?
        }
        configs.push(cfg);
    }
    for key in ["layers_to_transform", "layers_pattern", "exclude_modules"] {
        same_key(inputs, key)?;
    }
    Ok(configs)
}

type Passed = BTreeMap<String, Tensor>;

/// Every module any adapter adapts, with each adapter's factors, and the base tables passed
/// through. Errors name the adapter and module: a tensor that is not a LoRA factor, a factor
/// without its pair, ranks that disagree with the config, shapes that differ between adapters.
fn collect_modules(
    inputs: &[WeightedAdapter],
    configs: &[LoraConfig],
) -> Result<(BTreeMap<String, Module>, Passed)> {
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    let mut passed: Passed = BTreeMap::new();
    for (input, (a, cfg)) in inputs.iter().zip(configs).enumerate() {
        let patterns = cfg.patterns()?;
        let mut keys: Vec<&String> = a.adapter.tensors.keys().collect();
        keys.sort();
        for key in keys {
            let Some((path, suffix)) = split_key(key, &[A, B, EMB_A, EMB_B, BASE]) else {
                bail!(
                    "adapter {}: tensor {key:?} is not a LoRA factor (lora_A/lora_B/lora_embedding_A/lora_embedding_B)",
                    a.name
                )
            };
            let t = &a.adapter.tensors[key];
            if suffix == BASE {
                pass_through(&mut passed, key, t, &a.name)?;
                continue;
            }
            if suffix == B || suffix == EMB_B {
                continue;
            }
            let embedding = suffix == EMB_A;
            let pair = key.replace(suffix, if embedding { EMB_B } else { B });
            let tb = a.adapter.tensors.get(&pair).with_context(|| {
                format!("adapter {}: {key:?} has no {pair:?} beside it", a.name)
            })?;
            let ((sa, va), (sb, vb)) = (flat(t)?, flat(tb)?);
            let ra = cfg.rank_and_alpha(&patterns, path);
            if sa.len() != 2 || sb.len() != 2 || sa[0] != ra.r || sb[1] != ra.r {
                bail!(
                    "adapter {}: {path}: factors of shapes {sa:?} and {sb:?} do not have the rank {} its config gives",
                    a.name,
                    ra.r
                )
            }
            let f = Factors {
                input,
                b: vb,
                a: va,
                r: ra.r,
                rows: sb[0],
                cols: sa[1],
                scaling: cfg.scaling(ra.r, ra.alpha),
            };
            let m = modules.entry(path.to_string()).or_insert(Module {
                embedding,
                factors: Vec::new(),
            });
            if let Some(o) = m.factors.first() {
                if (o.rows, o.cols) != (f.rows, f.cols) || m.embedding != embedding {
                    bail!(
                        "adapters {} and {} do not fit one base: {path} is {}×{} in the first and {}×{} in the second",
                        inputs[o.input].name,
                        a.name,
                        o.rows,
                        o.cols,
                        f.rows,
                        f.cols
                    )
                }
            }
            m.factors.push(f);
        }
    }
    Ok((modules, passed))
}

fn pass_through(passed: &mut Passed, key: &str, t: &Tensor, adapter: &str) -> Result<()> {
    match passed.get(key) {
        None => {
            passed.insert(key.to_string(), t.clone());
        }
        Some(o) => {
            let same = o.dims() == t.dims() && flat(o)?.1 == flat(t)?.1;
            if !same {
                bail!("adapter {adapter}: its {key:?} (a base table peft saved with it) differs from another adapter's; they were trained on different bases")
            }
        }
    }
    Ok(())
}

/// A module's combined factors: `B: [rows, r]`, `A: [r, cols]`, row-major.
struct Combined {
    b: Vec<f32>,
    a: Vec<f32>,
    r: usize,
}

/// The combined factors of one module.
fn combine_module(
    path: &str,
    m: &Module,
    inputs: &[WeightedAdapter],
    o: &CombineOptions,
    new_rank: usize,
) -> Result<Combined> {
    let (rows, cols) = (m.factors[0].rows, m.factors[0].cols);
    let weight = |f: &Factors| inputs[f.input].weight;
    let density = o.density.unwrap_or(1.0);
    let mut pruning = Pruning {
        density,
        majority_sign: o.majority_sign,
        dare_rescale: 1.0 / o.rescale_q.unwrap_or(density),
        per_input_rescale: None,
    };
    let (ka, kb) = if m.embedding { (EMB_A, EMB_B) } else { (A, B) };
    let rng = |suffix: &str, fs: &[Factors]| {
        let name = format!("{path}.{suffix}");
        let ids: Vec<usize> = fs.iter().map(|f| f.input).collect();
        move |i: usize| mask_rng(o.seed, &name, ids[i])
    };
    match o.combination.arithmetic() {
        None => {
            // cat: [A₁·w₁s₁; A₂·w₂s₂; …] and [B₁ B₂ …], zero-padded to the sum of the ranks.
            let mut a = vec![0.0f32; new_rank * cols];
            let mut b = vec![0.0f32; rows * new_rank];
            let mut at = 0;
            for f in &m.factors {
                let s = (weight(f) * f.scaling) as f32;
                for k in 0..f.r {
                    for j in 0..cols {
                        a[(at + k) * cols + j] = f.a[k * cols + j] * s;
                    }
                    for i in 0..rows {
                        b[i * new_rank + at + k] = f.b[i * f.r + k];
                    }
                }
                at += f.r;
            }
            Ok(Combined { b, a, r: new_rank })
        }
        Some(arith) if o.combination.is_svd() => {
            let deltas: Vec<Vec<f32>> = m
                .factors
                .iter()
                .map(|f| combine::product(&f.b, &f.a, rows, f.r, cols, f.scaling))
                .collect();
            let weights: Vec<f64> = m.factors.iter().map(weight).collect();
            if let (Some(analytic), true) = (&o.analytic_q, density < 1.0) {
                let mut rescales = Vec::new();
                for (f, delta) in m.factors.iter().zip(&deltas) {
                    rescales.push(match analytic.means[f.input].get(path) {
                        Some(x) => {
                            let p = 1.0 - density as f64;
                            let q = crate::merge::darex::layer_q(
                                delta,
                                rows,
                                cols,
                                x,
                                p,
                                analytic.rule,
                            )
                            .with_context(|| format!("{path}, adapter {}", inputs[f.input].name))?;
                            (1.0 / q) as f32
                        }
                        None => 1.0 / density,
                    });
                }
                pruning.per_input_rescale = Some(rescales);
            }
            let delta =
                combine::combine(arith, &deltas, &weights, &pruning, rng("delta", &m.factors))?;
            let (mut b, mut a) = combine::truncated_svd(&delta, rows, cols, new_rank)
                .with_context(|| format!("{path}: the svd rank (svd_rank or the largest input rank) exceeds the layer's smaller side"))?;
            if let Some(q) = o.svd_clamp {
                combine::clamp_factors(&mut b, &mut a, q)?;
            }
            Ok(Combined { b, a, r: new_rank })
        }
        Some(arith) => {
            let r = m.factors[0].r;
            if let Some(f) = m.factors.iter().find(|f| f.r != r || f.r != new_rank) {
                bail!(
                    "{path}: adapter {} has rank {} here but the combination needs rank {new_rank} on every module (rank_pattern differs); use cat or an svd type",
                    inputs[f.input].name,
                    f.r
                )
            }
            // √|w·s| on both factors, the sign on A only (peft's negative-weight rule).
            let ws: Vec<f64> = m.factors.iter().map(|f| weight(f) * f.scaling).collect();
            let wa: Vec<f64> = ws
                .iter()
                .map(|w| w.abs().sqrt() * if *w >= 0.0 { 1.0 } else { -1.0 })
                .collect();
            let wb: Vec<f64> = ws.iter().map(|w| w.abs().sqrt()).collect();
            let a_in: Vec<Vec<f32>> = m.factors.iter().map(|f| f.a.clone()).collect();
            let b_in: Vec<Vec<f32>> = m.factors.iter().map(|f| f.b.clone()).collect();
            let a = combine::combine(arith, &a_in, &wa, &pruning, rng(ka, &m.factors))?;
            let b = combine::combine(arith, &b_in, &wb, &pruning, rng(kb, &m.factors))?;
            Ok(Combined { b, a, r })
        }
    }
}
