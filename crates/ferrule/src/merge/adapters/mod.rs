//! Several adapters combined into one, as peft's `add_weighted_adapter` does it
//! (`peft/tuners/lora/model.py` and `peft/tuners/ia3/model.py`, peft 0.21.2).
//!
//! LoRA: every combination type of peft ([`Combination`]), with its options, its checks and its
//! output (rank, alpha, target modules, tensor names). IA3: the one combination peft has, the
//! weighted sum of the scaling vectors `l = Σ wᵢ lᵢ` over the adapters that have a vector on
//! the module (an adapter without one adds nothing there, as if its `lᵢ` were 0). That differs
//! from `--adapter-weights` at inference ([`crate::tuners::weighted`]), which weights each
//! vector's change from 1; the two agree when the weights sum to 1 and the adapters target the
//! same modules.
//!
//! The result is a PEFT adapter folder ([`CombinedAdapter::save`]) or a tuner to merge into the
//! base ([`CombinedAdapter::into_saved`]). DARE's masks are drawn from ferrule's seeded
//! generator ([`crate::merge::delta::mask_rng`]), not torch's: the same seed gives the same
//! adapter, but not peft's.

pub mod combine;
mod ia3;
mod lora;
pub mod task_arithmetic;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::Value;

use crate::merge::delta::SignElection;
use crate::peft_io::{SavedAdapter, CONFIG_FILE, WEIGHTS_FILE};

/// peft's `combination_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    Linear,
    Cat,
    Svd,
    Ties,
    TiesSvd,
    DareLinear,
    DareTies,
    DareLinearSvd,
    DareTiesSvd,
    MagnitudePrune,
    MagnitudePruneSvd,
}

impl Combination {
    /// Every type under peft's name.
    pub const ALL: [(&'static str, Combination); 11] = [
        ("linear", Self::Linear),
        ("cat", Self::Cat),
        ("svd", Self::Svd),
        ("ties", Self::Ties),
        ("ties_svd", Self::TiesSvd),
        ("dare_linear", Self::DareLinear),
        ("dare_ties", Self::DareTies),
        ("dare_linear_svd", Self::DareLinearSvd),
        ("dare_ties_svd", Self::DareTiesSvd),
        ("magnitude_prune", Self::MagnitudePrune),
        ("magnitude_prune_svd", Self::MagnitudePruneSvd),
    ];

    /// The type of peft name `s`; an unknown name is an error listing the valid ones.
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, c)| *c)
            .with_context(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown combination type {s:?}; valid: {}",
                    names.join(", ")
                )
            })
    }

    /// peft's name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, c)| *c == self).unwrap().0
    }

    /// The `*_svd` types and `svd`: the combined update is re-factored by a truncated SVD.
    pub fn is_svd(self) -> bool {
        self.name().ends_with("svd")
    }

    /// The arithmetic on the tensors (`None` for `cat`, which concatenates).
    pub fn arithmetic(self) -> Option<combine::Arithmetic> {
        use combine::Arithmetic as A;
        Some(match self {
            Self::Cat => return None,
            Self::Linear | Self::Svd => A::Linear,
            Self::Ties | Self::TiesSvd => A::Ties,
            Self::DareLinear | Self::DareLinearSvd => A::DareLinear,
            Self::DareTies | Self::DareTiesSvd => A::DareTies,
            Self::MagnitudePrune | Self::MagnitudePruneSvd => A::MagnitudePrune,
        })
    }

    /// Whether the type prunes, so needs a `density`.
    pub fn needs_density(self) -> bool {
        !matches!(self, Self::Linear | Self::Cat | Self::Svd)
    }

    /// The DARE types (random pruning, rescaled).
    pub fn is_dare(self) -> bool {
        self.name().starts_with("dare")
    }
}

/// How to combine, with peft's defaults where it has them.
#[derive(Clone, Debug)]
pub struct CombineOptions {
    pub combination: Combination,
    /// Fraction of entries kept, in `(0, 1]`: required by the pruning types.
    pub density: Option<f32>,
    /// peft's `majority_sign_method` (`total` or `frequency`).
    pub majority_sign: SignElection,
    /// Rank of the `*svd` output; default the largest input rank.
    pub svd_rank: Option<usize>,
    /// Quantile (in `[0, 1]`) at which the SVD factors are clamped.
    pub svd_clamp: Option<f64>,
    /// Seed of DARE's masks.
    pub seed: u64,
    /// DAREx-q (arXiv 2410.09344): DARE's kept entries divided by `q` instead of by the
    /// density. `q` in `(0, 1]`.
    pub rescale_q: Option<f32>,
    /// DAREx-q's analytic rule ([`darex`]) instead of one `q`: with each input's mean layer
    /// inputs ([`crate::merge::darex::mean_inputs`], by module path), a `q` per input and module. Used by
    /// the `dare_*_svd` types, which prune `ΔW` as the rule assumes; a module without recorded
    /// inputs (an embedding) keeps `1/density`.
    pub analytic_q: Option<crate::merge::darex::Analytic>,
}

impl Default for CombineOptions {
    fn default() -> Self {
        Self {
            combination: Combination::Linear,
            density: None,
            majority_sign: SignElection::Total,
            svd_rank: None,
            svd_clamp: None,
            seed: 0,
            rescale_q: None,
            analytic_q: None,
        }
    }
}

/// One adapter to combine, with its weight (any finite number; negative subtracts).
pub struct WeightedAdapter {
    pub name: String,
    pub weight: f64,
    pub adapter: SavedAdapter,
}

/// The combined adapter: its `adapter_config.json` and tensors under peft's keys.
pub struct CombinedAdapter {
    pub config: Value,
    pub tensors: BTreeMap<String, Tensor>,
    /// The type applied (peft uses `linear` whatever was asked when there is one adapter).
    pub combination: Combination,
}

/// Combines `inputs` as peft's `add_weighted_adapter(adapters, weights, combination_type=...)`.
///
/// Errors, each naming the adapter, module or option: no input, a weight that is not finite,
/// adapters of different methods or tasks, a method without combinations, a missing or
/// out-of-range density, and the checks of the method ([`lora`], [`ia3`]).
pub fn combine(inputs: &[WeightedAdapter], options: &CombineOptions) -> Result<CombinedAdapter> {
    let Some(first) = inputs.first() else {
        bail!("no adapter to combine")
    };
    for (i, a) in inputs.iter().enumerate() {
        if !a.weight.is_finite() {
            bail!(
                "adapter {}: weight {} is not a finite number",
                a.name,
                a.weight
            )
        }
        if inputs[..i].iter().any(|o| o.name == a.name) {
            bail!("adapter {} is listed twice", a.name)
        }
        if a.adapter.peft_type() != first.adapter.peft_type() {
            bail!(
                "adapters {} ({}) and {} ({}) are of different methods; only adapters of one method combine",
                first.name,
                first.adapter.peft_type(),
                a.name,
                a.adapter.peft_type()
            )
        }
        if a.adapter.task() != first.adapter.task() {
            bail!(
                "adapters {} and {} are for different tasks ({:?} and {:?})",
                first.name,
                a.name,
                first.adapter.config.get("task_type"),
                a.adapter.config.get("task_type")
            )
        }
    }
    check_options(options)?;
    // One adapter: peft applies `linear` whatever the type.
    let combination = if inputs.len() == 1 {
        Combination::Linear
    } else {
        options.combination
    };
    let options = CombineOptions {
        combination,
        ..options.clone()
    };
    let (config, tensors) = match first.adapter.peft_type() {
        "LORA" => lora::combine(inputs, &options)?,
        "IA3" => {
            if combination != Combination::Linear {
                bail!(
                    "IA3 adapters combine by a weighted sum only (combination linear); got {}",
                    combination.name()
                )
            }
            ia3::combine(inputs)?
        }
        other => bail!(
            "adapter {}: {other} adapters have no weighted combination (LORA and IA3 do); merge them one by one",
            first.name
        ),
    };
    Ok(CombinedAdapter {
        config,
        tensors,
        combination,
    })
}

fn check_options(o: &CombineOptions) -> Result<()> {
    if let Some(d) = o.density {
        if d.is_nan() || d <= 0.0 || d > 1.0 {
            bail!("density must be in (0, 1], got {d}")
        }
    }
    if o.combination.needs_density() && o.density.is_none() {
        bail!(
            "combination {} prunes and needs a density in (0, 1]",
            o.combination.name()
        )
    }
    if let Some(q) = o.rescale_q {
        if !o.combination.is_dare() {
            bail!(
                "rescale q (DAREx-q) applies to the dare_* combinations, not {}",
                o.combination.name()
            )
        }
        if q.is_nan() || q <= 0.0 || q > 1.0 {
            bail!("rescale q must be in (0, 1], got {q}")
        }
    }
    if o.analytic_q.is_some() {
        if !(o.combination.is_dare() && o.combination.is_svd()) {
            bail!(
                "the analytic q (DAREx) applies to dare_linear_svd and dare_ties_svd, which prune ΔW as it assumes, not {}",
                o.combination.name()
            )
        }
        if o.rescale_q.is_some() {
            bail!("give one q (rescale q) or the analytic rule, not both")
        }
    }
    if o.svd_rank == Some(0) {
        bail!("svd rank must be at least 1")
    }
    if let Some(c) = o.svd_clamp {
        if !(0.0..=1.0).contains(&c) {
            bail!("svd clamp must be a quantile in [0, 1], got {c}")
        }
    }
    Ok(())
}

impl CombinedAdapter {
    /// Writes the adapter as a PEFT folder at `dir`, which must not exist: both files go to
    /// `DIR.tmp` first, synced, and the folder is renamed into place, so a failure leaves nothing.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::util::atomic::write_folder_atomic(dir, |tmp| {
            let tensors: Vec<(String, Tensor)> = self
                .tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.clone()))
                .collect();
            crate::peft_io::write_safetensors(
                &tmp.join(WEIGHTS_FILE),
                &tensors,
                &[("format", "pt")],
            )?;
            let json = serde_json::to_string_pretty(&self.config)? + "\n";
            crate::util::atomic::write_bytes_atomic(&tmp.join(CONFIG_FILE), json.as_bytes())?;
            Ok(crate::util::atomic::sync_dir(tmp)?)
        })
    }

    /// The adapter as if read from `dir` (which need not exist): what
    /// [`SavedAdapter::into_tuner`] builds a tuner from, to merge into the base.
    pub fn into_saved(self, dir: PathBuf) -> SavedAdapter {
        SavedAdapter {
            dir,
            config: self.config,
            tensors: self.tensors.into_iter().collect::<HashMap<_, _>>(),
        }
    }
}

/// Merges `combined` into the base `source` and writes the model folder `out`
/// ([`crate::merge::merge_to_dir_with`]): the combined adapter is attached as a saved one would
/// be, and must fit the base.
pub fn merge_into_base(
    source: &crate::model::ModelSource,
    combined: CombinedAdapter,
    out: &Path,
    options: crate::merge::MergeOptions,
) -> Result<crate::merge::MergeReport> {
    let device = candle_core::Device::Cpu;
    let saved = combined.into_saved(PathBuf::from("(combined adapter)"));
    let task = match saved.task() {
        Some(t) => t,
        None => crate::adapted::default_task(source)?,
    };
    let tuner = saved.into_tuner(0, &device)?;
    let built = crate::model::Model::build(source, task, tuner.as_ref(), &device, 0)?;
    tuner.finish().with_context(|| {
        format!(
            "the combined adapter does not fit {}",
            source.location.display()
        )
    })?;
    drop(built);
    crate::merge::merge_to_dir_with(source, tuner.as_ref(), task, out, options)
}

/// The module path of a peft key `base_model.model.<path>.<suffix>` whose suffix is one of
/// `suffixes`, with that suffix.
fn split_key<'a>(key: &'a str, suffixes: &[&'static str]) -> Option<(&'a str, &'static str)> {
    let rest = key.strip_prefix("base_model.model.")?;
    suffixes
        .iter()
        .find_map(|s| rest.strip_suffix(s).map(|p| (p, *s)))
        .map(|(p, s)| (p.strip_suffix('.').unwrap_or(p), s))
}

/// `(shape, values)` of a tensor, in f32.
fn flat(t: &Tensor) -> Result<(Vec<usize>, Vec<f32>)> {
    Ok((
        t.dims().to_vec(),
        t.to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?,
    ))
}

/// peft's union of target modules (`_check_add_weighted_adapter`): lists are united (written
/// sorted; peft writes its set in hash order), strings joined as `(a)|(b)`, a mix refused.
/// A key no adapter sets stays unset (peft fails on it with a TypeError).
fn union_of(inputs: &[WeightedAdapter], key: &str) -> Result<Value> {
    let values: Vec<(&str, &Value)> = inputs
        .iter()
        .map(|a| {
            (
                a.name.as_str(),
                a.adapter.config.get(key).unwrap_or(&Value::Null),
            )
        })
        .collect();
    if values.iter().all(|(_, v)| v.is_null()) {
        return Ok(Value::Null);
    }
    if values.iter().all(|(_, v)| v.is_string()) {
        let joined: Vec<String> = values
            .iter()
            .map(|(_, v)| format!("({})", v.as_str().unwrap()))
            .collect();
        return Ok(Value::from(joined.join("|")));
    }
    if values.iter().all(|(_, v)| v.is_array()) {
        let mut all: Vec<String> = values
            .iter()
            .flat_map(|(_, v)| v.as_array().unwrap().iter())
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        all.sort();
        all.dedup();
        return Ok(Value::from(all));
    }
    let kinds: Vec<String> = values
        .iter()
        .map(|(n, v)| {
            let kind = match v {
                Value::String(_) => "a regex string",
                Value::Array(_) => "a list",
                _ => "unset",
            };
            format!("{n}: {kind}")
        })
        .collect();
    bail!(
        "all adapters must give {key} the same way (a list for all, or a regex string for all), as peft requires; got {}",
        kinds.join(", ")
    )
}

/// Refuses adapters that differ in a key that peft's combined config takes from the first
/// adapter alone: the others' settings would be dropped without a word.
fn same_key(inputs: &[WeightedAdapter], key: &str) -> Result<()> {
    let first = inputs[0].adapter.config.get(key).unwrap_or(&Value::Null);
    for a in &inputs[1..] {
        let v = a.adapter.config.get(key).unwrap_or(&Value::Null);
        if v != first {
            bail!(
                "adapters {} and {} differ in {key} ({first} and {v}); the combined adapter can keep only one",
                inputs[0].name,
                a.name
            )
        }
    }
    Ok(())
}
