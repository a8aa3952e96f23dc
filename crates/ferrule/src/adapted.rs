//! A base model with saved adapters attached: what `eval`, `generate`, `logits`, `merge` and
//! `inspect` work on. Several adapters may be loaded; the model runs one of them, or a weighted
//! sum of several ([`crate::tuners::weighted`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde_json::Value;

use crate::model::{family_of, Family, Frozen, LoadOptions, Model, ModelHook, ModelSource, Task};
use crate::peft_io::{find_adapters, load_adapter, SavedAdapter};
use crate::tuners::weighted::{Member, WeightedSum};
use crate::tuners::{
    registry, total_params, trainable_params, AdaptedModule, AdapterConfig, BuildContext,
    MatchReport, Tuner,
};

/// What an adapter trains on a model, as `ferrule inspect` reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainingPlan {
    /// The CLI name (`lora`).
    pub method: &'static str,
    pub peft_type: &'static str,
    /// The method's part of `adapter_config.json`, completed for the model.
    pub config: Value,
    /// What each target option matched.
    pub matches: Vec<MatchReport>,
    /// How many modules it adapts.
    pub modules: usize,
    pub trainable_parameters: usize,
    /// The model's parameters with the adapter, as peft counts them.
    pub total_parameters: usize,
    pub percent_trainable: f64,
    pub adapted: Vec<AdaptedModule>,
}

impl TrainingPlan {
    /// What `adapter` would train on the model at `model` (loaded as `options` say) for
    /// `task` (the model family's default when `None`): the adapter attached fresh.
    pub fn of(
        model: &str,
        adapter: &AdapterConfig,
        task: Option<Task>,
        options: LoadOptions,
        allow_unmatched: bool,
    ) -> Result<Self> {
        let (_source, tuned) = attach_fresh(model, adapter, task, options, allow_unmatched)?;
        let tuner = tuned.tuner.as_ref();
        let trainable = trainable_params(tuner);
        let total = total_params(tuned.model.base_params, tuner);
        Ok(Self {
            method: tuner.method().name,
            peft_type: tuner.method().peft_type,
            config: tuner.config_json()?,
            matches: tuned.matches,
            modules: tuner.adapted().len(),
            trainable_parameters: trainable,
            total_parameters: total,
            percent_trainable: 100.0 * trainable as f64 / total as f64,
            adapted: tuner.adapted(),
        })
    }
}

/// A loaded adapter in brief, as `ferrule inspect` reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub peft_type: &'static str,
    /// How many modules it adapts.
    pub modules: usize,
    /// Its trainable parameters.
    pub parameters: usize,
    /// Of the model's parameters with it, as peft counts them.
    pub percent_of_total: f64,
    pub example_module: Option<AdaptedModule>,
}

impl AdapterSummary {
    /// `tuner`, loaded under `name` on a base of `base_params` parameters.
    pub fn of(name: &str, tuner: &dyn Tuner, base_params: usize) -> Self {
        let trainable = trainable_params(tuner);
        Self {
            name: name.to_string(),
            peft_type: tuner.method().peft_type,
            modules: tuner.adapted().len(),
            parameters: trainable,
            percent_of_total: 100.0 * trainable as f64 / total_params(base_params, tuner) as f64,
            example_module: tuner.adapted().first().cloned(),
        }
    }
}

/// A model built with one tuner attached: what [`attach`] returns.
pub struct TunedModel {
    pub model: Model,
    pub tuner: Box<dyn Tuner>,
    /// What each target option matched ([`Tuner::finish`]).
    pub matches: Vec<MatchReport>,
    /// The adapter config the tuner was built from, completed for this model.
    pub adapter: AdapterConfig,
}

/// Loads the model at `model` on the CPU (as `options` say) and [`attach`]es a
/// fresh `adapter` for `task` (the model family's default when `None`), seed 0: what
/// `inspect` and `plan` count. As in training, a method that trains base tensors as its own
/// copies releases them from the returned source's weights ([`BuildContext::release_base`]).
pub fn attach_fresh(
    model: &str,
    adapter: &AdapterConfig,
    task: Option<Task>,
    options: LoadOptions,
    allow_unmatched: bool,
) -> Result<(ModelSource, TunedModel)> {
    let device = Device::Cpu;
    let source = ModelSource::load_with(model, &device, options)?;
    let task = task.unwrap_or(default_task(&source)?);
    let ctx = BuildContext {
        seed: 0,
        device: &device,
        weights: None,
        allow_unmatched,
        release_base: Some(source.weights.release_handle()),
    };
    let tuned = attach(&source, task, adapter, ctx)?;
    Ok((source, tuned))
}

/// Attaches `adapter` to the model of `source` for `task`, as peft's `get_peft_model` does:
/// the config completed for the model type ([`AdapterConfig::resolved`]), its tuner built
/// ([`registry::build`], fresh or holding `ctx.weights`), the model built through the tuner
/// ([`Model::build`], seeded by `ctx.seed`), and the targets checked ([`Tuner::finish`]).
pub fn attach(
    source: &ModelSource,
    task: Task,
    adapter: &AdapterConfig,
    ctx: BuildContext,
) -> Result<TunedModel> {
    let adapter = adapter.resolved(source.model_type(), task)?;
    let (device, seed) = (ctx.device, ctx.seed);
    let tuner = registry::build(&adapter, ctx)?;
    let model = Model::build(source, task, tuner.as_ref(), device, seed)?;
    // Which model a method found nothing to adapt in (BitFit on a model without biases).
    let matches = tuner.finish().with_context(|| {
        format!(
            "{} ({} model)",
            source.location.display(),
            source.model_type()
        )
    })?;
    Ok(TunedModel {
        model,
        tuner,
        matches,
        adapter,
    })
}

/// An adapter folder to load, optionally under a name of the caller's choosing
/// (`--adapter NAME=DIR`). A folder in PEFT's several-adapter layout yields several adapters
/// ([`find_adapters`]); a name can only be given to a folder that holds one.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSource {
    pub name: Option<String>,
    pub dir: PathBuf,
}

impl AdapterSource {
    /// `DIR` or `NAME=DIR`. A path that exists as written is taken whole, even with a `=` in it.
    pub fn parse(s: &str) -> Self {
        if !Path::new(s).exists() {
            if let Some((name, dir)) = s.split_once('=') {
                if !name.is_empty() && !name.contains('/') {
                    return Self {
                        name: Some(name.to_string()),
                        dir: PathBuf::from(dir),
                    };
                }
            }
        }
        Self {
            name: None,
            dir: PathBuf::from(s),
        }
    }
}

/// Which loaded adapters the model runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// The only adapter loaded (none if none is). Several loaded adapters are an error that
    /// lists them: ferrule does not guess which one was meant.
    Only,
    /// One adapter by name (peft's `set_adapter`).
    Active(String),
    /// `f₀ + Σ wᵢ (fᵢ − f₀)` over the named adapters ([`crate::tuners::weighted`]).
    Weighted(Vec<(String, f64)>),
}

impl Selection {
    /// `NAME=W[,NAME=W...]` (`--adapter-weights`): each weight a finite number.
    pub fn parse_weights(s: &str) -> Result<Self> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, w)) = part.split_once('=') else {
                bail!("--adapter-weights: {part:?} is not NAME=WEIGHT (e.g. default=0.7,other=0.3)")
            };
            let w: f64 = w.trim().parse().with_context(|| {
                format!("--adapter-weights: weight {w:?} of {name:?} is not a number")
            })?;
            if !w.is_finite() {
                bail!("--adapter-weights: weight of {name:?} is {w}, not a finite number")
            }
            out.push((name.trim().to_string(), w));
        }
        if out.is_empty() {
            bail!("--adapter-weights: no NAME=WEIGHT given")
        }
        Ok(Self::Weighted(out))
    }
}

/// An adapter found in the folders given.
#[derive(Clone, Debug)]
pub struct LoadedAdapter {
    pub name: String,
    pub dir: PathBuf,
}

pub struct AdaptedModel {
    pub source: ModelSource,
    pub model: Model,
    /// Every adapter found in the folders given, in order (names unique); only the selected
    /// ones are read and built.
    pub adapters: Vec<LoadedAdapter>,
    /// The tuner of the one adapter the model runs.
    pub tuner: Option<Box<dyn Tuner>>,
    /// The weighted sum the model runs instead, if one was asked for.
    pub weighted: Option<WeightedSum>,
    /// What the model runs: `"none"`, the adapter's name, or `a×0.7 + b×-0.4`.
    pub active: String,
}

/// The task a model is run for when nobody says: the adapter's `task_type`, else causal
/// LM for decoders and feature extraction for encoders.
pub fn default_task(source: &ModelSource) -> Result<Task> {
    Ok(match family_of(&source.config)? {
        Family::Decoder => Task::CausalLm,
        Family::Bert => Task::FeatureExtraction,
    })
}

impl AdaptedModel {
    pub fn load(
        model: &str,
        adapter: Option<&Path>,
        task: Option<Task>,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with(model, adapter, task, device, LoadOptions::default())
    }

    /// [`AdaptedModel::load`] with load `options`: the base's linear layers quantized while
    /// loading (the same `--quantize` an adapter was trained with), and the compute dtype.
    pub fn load_with(
        model: &str,
        adapter: Option<&Path>,
        task: Option<Task>,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self> {
        let sources: Vec<AdapterSource> = adapter
            .map(|d| AdapterSource {
                name: None,
                dir: d.to_path_buf(),
            })
            .into_iter()
            .collect();
        // One folder named by path means its own adapter, even when subfolders hold more
        // (PEFT's layout, or PiSSA's `initial/` beside the converted adapter).
        let selection = match adapter {
            Some(d)
                if d.join(crate::peft_io::CONFIG_FILE).is_file() && find_adapters(d)?.len() > 1 =>
            {
                Selection::Active("default".into())
            }
            _ => Selection::Only,
        };
        Self::load_adapters(model, &sources, &selection, task, device, options)
    }

    /// The base `model` with the adapters found in `adapters`, running the one(s) `selection`
    /// names. Errors name the adapter and folder: a name given twice, a selected name not
    /// loaded, adapters of different tasks, or a weighted sum over something that cannot be
    /// summed ([`crate::tuners::weighted`]).
    pub fn load_adapters(
        model: &str,
        adapters: &[AdapterSource],
        selection: &Selection,
        task: Option<Task>,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self> {
        let found = expand(adapters)?;
        let chosen = choose(&found, selection)?;
        let mut saved = Vec::new();
        for (name, weight) in &chosen {
            let dir = &found
                .iter()
                .find(|a| &a.name == name)
                .expect("chosen from found")
                .dir;
            saved.push((
                name.clone(),
                *weight,
                load_adapter(dir, device).with_context(|| format!("adapter {name}"))?,
            ));
        }
        // An adapter holding a resized token embedding was trained on a base resized to the
        // tokenizer (added tokens): resize this one alike, as peft's user resizes before loading.
        let resize_token_embeddings = options.resize_token_embeddings
            || saved.iter().any(|(_, _, s)| s.holds_resized_tables());
        let options = LoadOptions {
            resize_token_embeddings,
            ..options
        };
        let mut source = ModelSource::load_with(model, device, options)?;
        let task = match task {
            Some(t) => t,
            None => agreed_task(&saved)?.map_or_else(|| default_task(&source), Ok)?,
        };
        // A classification head saved with the adapter decides the number of labels.
        if let [(_, _, s)] = saved.as_slice() {
            if let Some(w) = s.tensors.get("base_model.model.classifier.weight") {
                source.config["num_labels"] = serde_json::json!(w.dim(0)?);
                if let Some(o) = source.config.as_object_mut() {
                    o.remove("id2label");
                }
            }
        }
        let attached = match selection {
            Selection::Weighted(_) => Attached::Weighted(weighted_sum(saved, device)?),
            _ => match saved.pop() {
                Some((name, _, s)) => Attached::One(
                    name,
                    s.into_tuner(0, device).with_context(|| {
                        format!("loading adapter {}", found_dir(&found, &chosen[0].0))
                    })?,
                ),
                None => Attached::None,
            },
        };
        let model = Model::build(&source, task, attached.hook(), device, 0)?;
        attached.finish(&source)?;
        // For inference: passes keep no autograd graph (`Model::set_grad_enabled(true)` undoes it).
        model.set_grad_enabled(false);
        let (tuner, weighted, active) = match attached {
            Attached::None => (None, None, "none".to_string()),
            Attached::One(name, t) => (Some(t), None, name),
            Attached::Weighted(w) => {
                let d = w.describe();
                (None, Some(w), d)
            }
        };
        Ok(Self {
            source,
            model,
            adapters: found,
            tuner,
            weighted,
            active,
        })
    }

    /// Runs the loaded adapter at rank `rank` ([`Tuner::set_rank`]: a DyLoRA adapter, `1..=r`).
    /// No adapter, a weighted sum, or an adapter of another method is an error that says so.
    pub fn set_rank(&self, rank: usize) -> Result<()> {
        self.ranked_tuner(&format!("--rank {rank}"))?
            .set_rank(rank)
            .with_context(|| format!("adapter {}", self.active))
    }

    /// The ranks the loaded DyLoRA adapter runs at, `1..=r`; `flag` names the asking option in
    /// the errors of [`AdaptedModel::set_rank`].
    pub fn ranks(&self, flag: &str) -> Result<std::ops::RangeInclusive<usize>> {
        let tuner = self.ranked_tuner(flag)?;
        match tuner.max_rank() {
            Some(r) => Ok(1..=r),
            None => bail!(
                "{flag}: adapter {} is {}, which has one rank; only DyLoRA adapters run at several",
                self.active,
                tuner.method().peft_type
            ),
        }
    }

    /// The one adapter loaded, for an option that chooses its rank.
    fn ranked_tuner(&self, flag: &str) -> Result<&dyn Tuner> {
        if self.weighted.is_some() {
            bail!(
                "{flag}: applies to one DyLoRA adapter, not to a weighted sum ({})",
                self.active
            )
        }
        self.tuner
            .as_deref()
            .with_context(|| format!("{flag}: no adapter was loaded (give --adapter DIR)"))
    }

    pub fn trainable_params(&self) -> usize {
        self.tuner
            .as_deref()
            .map_or(0, crate::tuners::trainable_params)
            + self.weighted.as_ref().map_or(0, WeightedSum::params)
    }
}

/// What [`AdaptedModel::load_adapters`] builds the model with.
enum Attached {
    None,
    One(String, Box<dyn Tuner>),
    Weighted(WeightedSum),
}

impl Attached {
    fn hook(&self) -> &dyn ModelHook {
        match self {
            Self::None => &Frozen,
            Self::One(_, t) => t.as_ref(),
            Self::Weighted(w) => w,
        }
    }

    fn finish(&self, source: &ModelSource) -> Result<()> {
        let model = source.location.display();
        match self {
            Self::None => Ok(()),
            Self::One(name, t) => t
                .finish()
                .map(drop)
                .with_context(|| format!("adapter {name} does not fit {model}")),
            Self::Weighted(w) => w
                .finish()
                .with_context(|| format!("the weighted adapters do not fit {model}")),
        }
    }
}

/// The adapters of every source, names unique ([`find_adapters`] on each folder; a name given
/// as `NAME=DIR` applies to a folder of one adapter).
pub fn expand(adapters: &[AdapterSource]) -> Result<Vec<LoadedAdapter>> {
    let mut found: Vec<LoadedAdapter> = Vec::new();
    for a in adapters {
        let mut here = find_adapters(&a.dir)?;
        if let Some(name) = &a.name {
            if here.len() != 1 {
                let names: Vec<_> = here.iter().map(|(n, _)| n.as_str()).collect();
                bail!(
                    "--adapter {name}={}: the folder holds {} adapters ({}); a name can only be given to a folder with one",
                    a.dir.display(),
                    here.len(),
                    names.join(", ")
                )
            }
            here[0].0 = name.clone();
        }
        for (name, dir) in here {
            if let Some(other) = found.iter().find(|f| f.name == name) {
                bail!("two adapters are named {name:?} ({} and {}); name them with --adapter NAME=DIR", other.dir.display(), dir.display())
            }
            found.push(LoadedAdapter { name, dir });
        }
    }
    Ok(found)
}

/// `(name, weight)` of the adapters `selection` picks from `found` (weight 1 for one adapter).
fn choose(found: &[LoadedAdapter], selection: &Selection) -> Result<Vec<(String, f64)>> {
    let names = || {
        found
            .iter()
            .map(|a| format!("{} ({})", a.name, a.dir.display()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let known = |n: &str| -> Result<()> {
        if found.iter().any(|a| a.name == n) {
            return Ok(());
        }
        if found.is_empty() {
            bail!("adapter {n:?} was selected but no --adapter was given")
        }
        bail!("no adapter named {n:?}; loaded: {}", names())
    };
    Ok(match selection {
        Selection::Only => match found {
            [] => Vec::new(),
            [one] => vec![(one.name.clone(), 1.0)],
            _ => bail!(
                "{} adapters loaded: {}. Choose one with --active-adapter NAME, or combine them with --adapter-weights NAME=W,NAME=W",
                found.len(),
                names()
            ),
        },
        Selection::Active(n) => {
            known(n)?;
            vec![(n.clone(), 1.0)]
        }
        Selection::Weighted(list) => {
            for (i, (n, _)) in list.iter().enumerate() {
                known(n)?;
                if list[..i].iter().any(|(o, _)| o == n) {
                    bail!("--adapter-weights names {n:?} twice")
                }
            }
            list.clone()
        }
    })
}

fn found_dir(found: &[LoadedAdapter], name: &str) -> String {
    found
        .iter()
        .find(|a| a.name == name)
        .map_or_else(|| name.to_string(), |a| a.dir.display().to_string())
}

/// The `task_type` the selected adapters share; adapters of different tasks are an error.
fn agreed_task(saved: &[(String, f64, SavedAdapter)]) -> Result<Option<Task>> {
    let mut task: Option<(Task, &str)> = None;
    for (name, _, s) in saved {
        if let Some(t) = s.task() {
            match task {
                Some((t0, n0)) if t0 != t => bail!(
                    "adapters {n0} ({}) and {name} ({}) are for different tasks",
                    t0.peft_name(),
                    t.peft_name()
                ),
                None => task = Some((t, name)),
                _ => {}
            }
        }
    }
    Ok(task.map(|(t, _)| t))
}

/// The weighted sum of `saved`, refusing members whose changes are not sums of deltas on the
/// base: modules trained in full (`modules_to_save`, as peft's `add_weighted_adapter` refuses
/// them) and replaced embedding tables (`<path>.base_layer.weight`).
fn weighted_sum(saved: Vec<(String, f64, SavedAdapter)>, device: &Device) -> Result<WeightedSum> {
    let mut members = Vec::new();
    for (name, weight, s) in saved {
        let file = s.dir.join(crate::peft_io::CONFIG_FILE);
        if let Some(Value::Array(m)) = s.config.get("modules_to_save") {
            if !m.is_empty() {
                bail!(
                    "adapter {name} ({}): trains {} in full (modules_to_save); a module trained in full has no change to weight against the base. Run it alone with --active-adapter {name}",
                    file.display(),
                    serde_json::to_string(m)?
                )
            }
        }
        if let Some(k) = s.tensors.keys().find(|k| k.ends_with(".base_layer.weight")) {
            bail!(
                "adapter {name} ({}): replaces the base tensor {k}; a weighted sum needs the base's own. Run it alone with --active-adapter {name}",
                s.dir.display()
            )
        }
        let dir = s.dir.clone();
        let tuner = s
            .into_tuner(0, device)
            .with_context(|| format!("loading adapter {name} ({})", dir.display()))?;
        members.push(Member {
            name,
            weight,
            tuner,
        });
    }
    WeightedSum::new(members)
}
