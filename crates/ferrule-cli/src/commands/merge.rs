//! `ferrule merge`

use ferrule::model::LoadOptions;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use ferrule::adapted::{expand, AdaptedModel, AdapterSource, LoadedAdapter, Selection};
use ferrule::merge::adapters::{
    combine, merge_into_base, Combination, CombineOptions, CombinedAdapter, WeightedAdapter,
};
use ferrule::merge::delta::SignElection;
use ferrule::merge::{merge_to_dir_with, BaseRecord, MergeOptions};
use ferrule::model::ModelSource;
use ferrule::peft_io::load_adapter;
use ferrule::quant::QuantSpec;

#[derive(clap::Args)]
pub struct Args {
    /// Base model folder, .gguf file, or hub id (the one the adapter was trained on).
    #[arg(long, required_unless_present = "config")]
    model: Option<String>,
    /// A PEFT adapter folder to merge into the base, as DIR or NAME=DIR; repeatable: several
    /// adapters are combined first (--combination). A folder in PEFT's several-adapter layout
    /// offers each of its adapters.
    #[arg(long, value_name = "[NAME=]DIR", required_unless_present = "config")]
    adapter: Vec<String>,
    /// Merge whole models as a mergekit YAML says (merge_method, models or slices, parameters;
    /// docs/MERGING.md), instead of adapters into their base.
    #[arg(long, value_name = "YAML", conflicts_with_all = ["model", "adapter", "dequantize", "output_adapter"])]
    config: Option<PathBuf>,
    /// Of several adapters found: merge this one alone.
    #[arg(long, value_name = "NAME", conflicts_with = "combination")]
    active_adapter: Option<String>,
    /// How to combine several adapters, as peft's add_weighted_adapter: linear, cat, svd, ties,
    /// ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune,
    /// magnitude_prune_svd (default: linear when several --adapter are given); or
    /// dare_linear_dense: DARE on each adapter's dense update ΔW (the DARE and DAREx papers'
    /// delta parameters, not peft's factors), summed with the weights into the base.
    #[arg(long, value_name = "TYPE")]
    combination: Option<String>,
    /// One weight per adapter, in the order found (default 1 each); negative subtracts.
    #[arg(long, value_name = "W1,W2,...", allow_hyphen_values = true)]
    weights: Option<String>,
    /// Fraction of entries kept, in (0, 1], by the pruning combinations (ties, dare_*,
    /// magnitude_prune*).
    #[arg(long)]
    density: Option<f32>,
    /// Sign election of the ties types: total (sign of the sum) or frequency (sign held by more).
    #[arg(long, value_name = "total|frequency")]
    majority_sign_method: Option<String>,
    /// Rank of an svd combination (default: the largest input rank).
    #[arg(long, value_name = "R")]
    svd_rank: Option<usize>,
    /// Clamp the svd factors at this quantile of their entries, in [0, 1].
    #[arg(long, value_name = "Q")]
    svd_clamp: Option<f64>,
    /// Seed of the random masks (dare_*, and della* with --config): the same seed gives the
    /// same result in ferrule; torch's generator, which peft and mergekit use, is not reproduced.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// DAREx-q (arXiv 2410.09344): divide the entries dare_* keeps by q instead of by the
    /// density; q in (0, 1].
    #[arg(long, value_name = "Q")]
    rescale_q: Option<f32>,
    /// DAREx-q's per-layer analytic q (dare_linear_svd, dare_ties_svd) from each adapter's
    /// mean layer inputs on this batch: a safetensors file with input_ids [batch, tokens]
    /// (unpadded) and optionally attention_mask.
    #[arg(long, value_name = "INPUTS", conflicts_with = "rescale_q")]
    analytic_q: Option<PathBuf>,
    /// DAREx-q for dare_linear_dense: the q whose merged model's logits on this batch are
    /// closest to the undropped merge's (a safetensors file with input_ids [batch, tokens] and
    /// optionally attention_mask).
    #[arg(long, value_name = "INPUTS", conflicts_with_all = ["rescale_q", "analytic_q"])]
    choose_q: Option<PathBuf>,
    /// New folder for the merged model; for an L4Q adapter, a .gguf file takes its learned
    /// codes, steps and offsets as Q4_1 blocks (a folder gets their values in f32).
    #[arg(long, short, required_unless_present = "output_adapter")]
    output: Option<PathBuf>,
    /// Write the combined adapter as a new PEFT adapter folder instead of a merged model.
    #[arg(long, value_name = "DIR", conflicts_with = "output")]
    output_adapter: Option<PathBuf>,
    /// Quantize the base first (as the adapter was trained); the merged weights are then
    /// requantized in the same format and written in the bitsandbytes layout.
    #[command(flatten)]
    quant: super::QuantArgs,
    /// With a quantized base: write it dequantized, in f32, plus the update (no requantizing),
    /// which is exactly the model an adapter trained on that quantized base computes.
    #[arg(long)]
    dequantize: bool,
    /// Merge a DyLoRA adapter at rank B (1..r; default r): W += (alpha/B)·B[:, :B]·A[:B].
    #[arg(long, value_name = "B", conflicts_with = "config")]
    rank: Option<usize>,
}

impl Args {
    /// `--model` (clap requires it unless `--config` is given, which never reaches here).
    fn model(&self) -> &str {
        self.model.as_deref().unwrap_or_default()
    }

    /// Whether a combination flag was given.
    fn combines(&self) -> bool {
        self.combination.is_some()
            || self.weights.is_some()
            || self.density.is_some()
            || self.majority_sign_method.is_some()
            || self.svd_rank.is_some()
            || self.svd_clamp.is_some()
            || self.rescale_q.is_some()
            || self.analytic_q.is_some()
            || self.choose_q.is_some()
            || self.output_adapter.is_some()
    }
}

pub fn run(a: Args) -> Result<()> {
    if let Some(config) = &a.config {
        return run_config(config, &a);
    }
    let spec = a.quant.spec()?;
    let base = Base::new(&a, spec.as_ref());
    let sources: Vec<AdapterSource> = a.adapter.iter().map(|s| AdapterSource::parse(s)).collect();
    let found = expand(&sources)?;
    let chosen = choose(&a, &found)?;
    if chosen.len() == 1 && !a.combines() {
        return merge_one(&a, &sources, &chosen[0].name, base);
    }
    if let Some(rank) = a.rank {
        bail!("--rank {rank} applies to merging one DyLoRA adapter into its base, not to a combination of {} adapters", chosen.len())
    }
    if a.combination.as_deref() == Some(DENSE_DARE) {
        return merge_dense_dare(&a, &sources, &chosen, base);
    }
    if a.choose_q.is_some() {
        bail!("--choose-q applies to --combination {DENSE_DARE} only")
    }
    let linear = a.combination.as_deref().is_none_or(|c| c == "linear");
    if a.output_adapter.is_none() && linear && outside_peft_combinations(&chosen)? {
        return merge_task_arithmetic(&a, &sources, &chosen, base);
    }
    let combined = combine_chosen(&a, &chosen)?;
    if let Some(dir) = &a.output_adapter {
        combined.save(dir)?;
        eprintln!("combined adapter written to {}", dir.display());
        return Ok(());
    }
    let out = a
        .output
        .as_ref()
        .context("give --output or --output-adapter")?;
    let source = ModelSource::load_with(a.model(), &super::device(), base.load_options(a.model()))?;
    let target = base.record(a.model(), &source.weights)?;
    check_dequantize(&a, &target)?;
    for ad in &chosen {
        warn_base_mismatch(&a, &ad.dir, &target)?;
    }
    let report = merge_into_base(&source, combined, out, base.merge_options())?;
    println!("{}", serde_json::to_string(&report)?);
    eprintln!("merged model written to {}", out.display());
    Ok(())
}

/// The adapters to merge: all found, or `--active-adapter`'s. A folder that holds several
/// adapters, merged without a choice, is an error listing them (as `generate`'s).
fn choose(a: &Args, found: &[LoadedAdapter]) -> Result<Vec<LoadedAdapter>> {
    let list = || {
        found
            .iter()
            .map(|f| format!("{} ({})", f.name, f.dir.display()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(name) = &a.active_adapter {
        let one = found.iter().find(|f| &f.name == name).with_context(|| {
            format!(
                "--active-adapter: no adapter named {name:?}; found: {}",
                list()
            )
        })?;
        return Ok(vec![one.clone()]);
    }
    if found.len() > a.adapter.len() && !a.combines() {
        bail!(
            "{} adapters found: {}. Merge one with --active-adapter NAME, or combine them with --combination TYPE [--weights W1,W2,...]",
            found.len(),
            list()
        )
    }
    Ok(found.to_vec())
}

/// One adapter into its base, as it always was.
fn merge_one(a: &Args, sources: &[AdapterSource], name: &str, base: Base) -> Result<()> {
    let out = a
        .output
        .as_ref()
        .context("give --output (a merged model) or --output-adapter")?;
    let m = AdaptedModel::load_adapters(
        a.model(),
        sources,
        &Selection::Active(name.to_string()),
        None,
        &super::device(),
        base.load_options(a.model()),
    )?;
    let target = base.record(a.model(), &m.source.weights)?;
    check_dequantize(a, &target)?;
    let dir = &m
        .adapters
        .iter()
        .find(|f| f.name == name)
        .context("the chosen adapter")?
        .dir;
    warn_base_mismatch(a, dir, &target)?;
    if let Some(rank) = a.rank {
        m.set_rank(rank)?;
    }
    let tuner = m.tuner.as_deref().context("no adapter")?;
    if out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return merge_learned_to_gguf(&m.source, tuner, out);
    }
    let report = merge_to_dir_with(&m.source, tuner, m.model.task, out, base.merge_options())?;
    println!("{}", serde_json::to_string(&report)?);
    for (name, p) in &report.pruned {
        eprintln!(
            "{name}: {} of {} entries zero ({:.2}% sparse)",
            p.zeros,
            p.elements,
            100.0 * p.sparsity
        );
    }
    eprintln!("merged model written to {}", out.display());
    Ok(())
}

/// An adapter whose quantization was learned (L4Q) merged into a GGUF file: its codes, steps
/// and offsets as Q4_1 blocks, the rest of the model quantized to Q4_1 by ggml's rule, as
/// `ferrule export gguf --adapter` writes it. Any other adapter is told to use that command.
fn merge_learned_to_gguf(
    source: &ModelSource,
    tuner: &dyn ferrule::tuners::Tuner,
    out: &std::path::Path,
) -> Result<()> {
    use ferrule::export::gguf::{
        export_model_gguf, learns_quantization, GgufExportOptions, OutType,
    };
    if !learns_quantization(Some(tuner))? {
        bail!("{}: merge writes a .gguf file only for an adapter that learned its quantization (--method l4q); for a {} adapter use `ferrule export gguf --adapter DIR --outtype TYPE`", out.display(), tuner.method().peft_type)
    }
    let options = GgufExportOptions {
        outtype: OutType::Q4_1,
        overwrite: false,
    };
    let report = export_model_gguf(source, Some(tuner), out, options)?;
    println!("{}", serde_json::to_string(&report)?);
    if let Some(l) = &report.learned {
        eprintln!(
            "{} matrices written from their learned codes ({} codes); the f16 steps and offsets change a value by at most {:.3e}; re-deriving the codes from them would change {}",
            l.tensors, l.codes, l.max_abs_f16, l.codes_changed_by_f16
        );
    }
    eprintln!("merged model written to {} (GGUF Q4_1)", out.display());
    Ok(())
}

/// How a merge reads its base. With `--quantize` the dense base is memory-mapped and each
/// tensor quantized as the merged model is written ([`MergeOptions::quantize`]: about one
/// tensor in memory at a time, the same bytes as loading it quantized first). `--choose-q`
/// runs the model in its search, so it loads the base quantized, as it trained.
#[derive(Clone, Copy)]
struct Base<'a> {
    spec: Option<&'a QuantSpec>,
    quantize_when_written: bool,
    dequantize: bool,
}

impl<'a> Base<'a> {
    fn new(a: &Args, spec: Option<&'a QuantSpec>) -> Self {
        Self {
            spec,
            quantize_when_written: spec.is_some()
                && a.choose_q.is_none()
                && std::path::Path::new(a.model()).is_dir(),
            dequantize: a.dequantize,
        }
    }

    fn load_options(&self, model: &str) -> LoadOptions<'a> {
        let spec = if self.quantize_when_written {
            None
        } else {
            self.spec
        };
        LoadOptions::read_once(spec, model)
    }

    fn merge_options(&self) -> MergeOptions {
        MergeOptions {
            dequantize: self.dequantize,
            quantize: self.spec.copied().filter(|_| self.quantize_when_written),
        }
    }

    /// The base as the adapters see it. Loaded dense for a quantizing write, a base that is
    /// already quantized is the loader's error (`--quantize` on a bitsandbytes folder).
    fn record(&self, model: &str, weights: &ferrule::model::Weights) -> Result<BaseRecord> {
        match self.spec.filter(|_| self.quantize_when_written) {
            None => Ok(BaseRecord::of(weights, self.spec)),
            Some(spec) => {
                let held = BaseRecord::of(weights, None);
                if held.is_quantized() {
                    bail!(
                        "{model}: the checkpoint is already quantized ({}); drop --quantize",
                        held.formats.join(", ")
                    )
                }
                Ok(BaseRecord::planned(weights, spec))
            }
        }
    }
}

fn check_dequantize(a: &Args, target: &BaseRecord) -> Result<()> {
    if a.dequantize && !target.is_quantized() {
        bail!(
            "--dequantize: the base {} is not quantized; add the --quantize flags the adapter was trained with",
            a.model()
        )
    }
    Ok(())
}

fn warn_base_mismatch(a: &Args, dir: &std::path::Path, target: &BaseRecord) -> Result<()> {
    if let Some(trained) = BaseRecord::read(dir)? {
        if let Some(w) = trained.mismatch_warning(dir, target, a.model(), true) {
            tracing::warn!("{w}");
        }
    }
    Ok(())
}

/// The chosen adapters combined as the flags say (every check before anything is written).
fn combine_chosen(a: &Args, chosen: &[LoadedAdapter]) -> Result<CombinedAdapter> {
    let weights = parse_weights(a.weights.as_deref(), chosen)?;
    let options = CombineOptions {
        combination: match &a.combination {
            Some(c) => Combination::parse(c).context("--combination")?,
            None => Combination::Linear,
        },
        density: a.density,
        majority_sign: match a.majority_sign_method.as_deref() {
            None | Some("total") => SignElection::Total,
            Some("frequency") => SignElection::Frequency,
            Some(other) => bail!("--majority-sign-method: {other:?} is not total or frequency"),
        },
        svd_rank: a.svd_rank,
        svd_clamp: a.svd_clamp,
        seed: a.seed,
        rescale_q: a.rescale_q,
        analytic_q: match &a.analytic_q {
            Some(file) => Some(ferrule::merge::darex::Analytic {
                rule: Default::default(),
                means: mean_inputs(a, chosen, file)?,
            }),
            None => None,
        },
    };
    let mut inputs = Vec::new();
    for (ad, weight) in chosen.iter().zip(weights) {
        inputs.push(WeightedAdapter {
            name: ad.name.clone(),
            weight,
            adapter: load_adapter(&ad.dir, &Device::Cpu)
                .with_context(|| format!("adapter {}", ad.name))?,
        });
    }
    let combined = combine(&inputs, &options)?;
    let terms: Vec<String> = inputs
        .iter()
        .map(|i| format!("{}×{}", i.weight, i.name))
        .collect();
    eprintln!(
        "combined {} ({})",
        terms.join(" + "),
        combined.combination.name()
    );
    Ok(combined)
}

/// `--weights W1,W2,...`: one finite number per adapter (default 1 each).
fn parse_weights(s: Option<&str>, chosen: &[LoadedAdapter]) -> Result<Vec<f64>> {
    let Some(s) = s else {
        return Ok(vec![1.0; chosen.len()]);
    };
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let w: f64 = part
            .parse()
            .with_context(|| format!("--weights: {part:?} is not a number"))?;
        if !w.is_finite() {
            bail!("--weights: {part} is not a finite number")
        }
        out.push(w);
    }
    if out.len() != chosen.len() {
        let names: Vec<&str> = chosen.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "--weights gives {} weight(s) for {} adapter(s) ({}); give one per adapter, in that order",
            out.len(),
            chosen.len(),
            names.join(", ")
        )
    }
    Ok(out)
}

/// Whether the adapters are beyond peft's combinations (methods other than LoRA and IA3, DoRA,
/// or a mix of methods): merged into the base by task arithmetic on the merged weights.
fn outside_peft_combinations(chosen: &[LoadedAdapter]) -> Result<bool> {
    let mut kinds = std::collections::BTreeSet::new();
    for ad in chosen {
        let file = ad.dir.join(ferrule::peft_io::CONFIG_FILE);
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", file.display()))?;
        let kind = cfg.get("peft_type").and_then(|v| v.as_str()).unwrap_or("");
        let dora = cfg.get("use_dora").and_then(|v| v.as_bool()) == Some(true);
        kinds.insert(if dora {
            "DORA".to_string()
        } else {
            kind.to_string()
        });
    }
    Ok(kinds.len() > 1 || kinds.iter().any(|k| k != "LORA" && k != "IA3"))
}

/// `W₀ + Σ wᵢ (Wᵢ − W₀)` into the base ([`ferrule::merge::adapters::task_arithmetic`]).
fn merge_task_arithmetic(
    a: &Args,
    sources: &[AdapterSource],
    chosen: &[LoadedAdapter],
    base: Base,
) -> Result<()> {
    let out = a.output.as_ref().context("give --output")?;
    if a.density.is_some() || a.svd_rank.is_some() || a.svd_clamp.is_some() || a.rescale_q.is_some()
    {
        bail!("--density, --svd-rank, --svd-clamp and --rescale-q apply to peft's LoRA combinations; these adapters (other methods, DoRA or a mix) combine by linear task arithmetic only")
    }
    let m = load_weighted(a, sources, chosen, base)?;
    let sum = m.weighted.as_ref().context("the weighted adapters")?;
    let members: Vec<(String, f64, &dyn ferrule::tuners::Tuner)> = sum
        .members
        .iter()
        .map(|mb| (mb.name.clone(), mb.weight, mb.tuner.as_ref()))
        .collect();
    eprintln!(
        "combined {} (linear: task arithmetic on the merged weights)",
        m.active
    );
    let report = ferrule::merge::adapters::task_arithmetic::task_arithmetic_to_dir(
        &m.source,
        &members,
        m.model.task,
        out,
        base.merge_options(),
    )?;
    println!("{}", serde_json::to_string(&report)?);
    eprintln!("merged model written to {}", out.display());
    Ok(())
}

/// The base with the chosen adapters loaded as a weighted sum (`--weights`), checked against
/// the base each was trained on.
fn load_weighted(
    a: &Args,
    sources: &[AdapterSource],
    chosen: &[LoadedAdapter],
    base: Base,
) -> Result<AdaptedModel> {
    let weights = parse_weights(a.weights.as_deref(), chosen)?;
    let selection = Selection::Weighted(
        chosen
            .iter()
            .zip(&weights)
            .map(|(c, w)| (c.name.clone(), *w))
            .collect(),
    );
    let m = AdaptedModel::load_adapters(
        a.model(),
        sources,
        &selection,
        None,
        &super::device(),
        base.load_options(a.model()),
    )?;
    let target = base.record(a.model(), &m.source.weights)?;
    check_dequantize(a, &target)?;
    for ad in chosen {
        warn_base_mismatch(a, &ad.dir, &target)?;
    }
    Ok(m)
}

/// ferrule's own combination: DARE / DAREx-q on dense deltas (`merge::darex`).
const DENSE_DARE: &str = "dare_linear_dense";

/// `--combination dare_linear_dense`: each adapter's ΔW dropped at `--density`, rescaled by
/// 1/density, `--rescale-q`'s 1/q, or the q `--choose-q` finds, summed into the base.
fn merge_dense_dare(
    a: &Args,
    sources: &[AdapterSource],
    chosen: &[LoadedAdapter],
    base: Base,
) -> Result<()> {
    use ferrule::merge::darex::{merge_dense_dare, DenseDare, QRule};
    let out = a
        .output
        .as_ref()
        .with_context(|| format!("--combination {DENSE_DARE} merges into the base: give --output (a dense ΔW has no low-rank adapter form)"))?;
    let density = a.density.with_context(|| {
        format!("--combination {DENSE_DARE} needs --density (the keep rate 1 − p)")
    })?;
    if a.majority_sign_method.is_some()
        || a.svd_rank.is_some()
        || a.svd_clamp.is_some()
        || a.analytic_q.is_some()
    {
        bail!("--majority-sign-method, --svd-rank, --svd-clamp and --analytic-q do not apply to --combination {DENSE_DARE}")
    }
    let q = match (&a.choose_q, a.rescale_q) {
        (Some(file), _) => {
            let t = ferrule::model::weights::load_safetensors_file(file, &Device::Cpu)?;
            QRule::OutputChange {
                input_ids: t
                    .get("input_ids")
                    .with_context(|| {
                        format!("--choose-q {}: no \"input_ids\" tensor", file.display())
                    })?
                    .clone(),
                attention_mask: t.get("attention_mask").cloned(),
            }
        }
        (None, Some(q)) => QRule::Fixed(q),
        (None, None) => QRule::Dare,
    };
    let m = load_weighted(a, sources, chosen, base)?;
    let sum = m.weighted.as_ref().context("the weighted adapters")?;
    let members: Vec<(&str, &dyn ferrule::tuners::Tuner, f32)> = sum
        .members
        .iter()
        .map(|mb| (mb.name.as_str(), mb.tuner.as_ref(), mb.weight as f32))
        .collect();
    let dare = DenseDare {
        density,
        seed: a.seed,
        q,
    };
    let report = merge_dense_dare(
        &m.source,
        m.model.task,
        &members,
        &dare,
        out,
        base.merge_options(),
    )?;
    eprintln!(
        "DARE on dense deltas: kept {density}, rescaled by 1/{} ({})",
        report.q,
        match &report.search {
            Some(c) => format!(
                "q chosen on the batch: logit change {:.4e}, {:.4e} at DARE's q",
                c.change, c.dare_change
            ),
            None if a.rescale_q.is_some() => "--rescale-q".into(),
            None => "DARE's 1/density".into(),
        }
    );
    println!("{}", serde_json::to_string(&report)?);
    eprintln!("merged model written to {}", out.display());
    Ok(())
}

/// Each adapter's mean layer inputs on the batch in `file` (`--analytic-q`), in the model
/// fine-tuned with it.
fn mean_inputs(
    a: &Args,
    chosen: &[LoadedAdapter],
    file: &std::path::Path,
) -> Result<Vec<ferrule::merge::darex::MeanInputs>> {
    let spec = a.quant.spec()?;
    let source = ModelSource::load_with(
        a.model(),
        &Device::Cpu,
        LoadOptions::read_once(spec.as_ref(), a.model()),
    )?;
    let t = ferrule::model::weights::load_safetensors_file(file, &Device::Cpu)?;
    let ids = t
        .get("input_ids")
        .with_context(|| format!("--analytic-q {}: no \"input_ids\" tensor", file.display()))?;
    let inputs = ferrule::model::Inputs {
        input_ids: ids,
        attention_mask: t.get("attention_mask"),
        token_type_ids: t.get("token_type_ids"),
    };
    let mut out = Vec::new();
    for ad in chosen {
        let saved =
            load_adapter(&ad.dir, &Device::Cpu).with_context(|| format!("adapter {}", ad.name))?;
        let task = match saved.task() {
            Some(t) => t,
            None => ferrule::adapted::default_task(&source)?,
        };
        let tuner = saved.into_tuner(0, &Device::Cpu)?;
        out.push(
            ferrule::merge::darex::mean_inputs(&source, task, tuner.as_ref(), &inputs)
                .with_context(|| format!("--analytic-q: adapter {}", ad.name))?,
        );
    }
    Ok(out)
}

/// `--config`: whole models merged as a mergekit YAML says.
fn run_config(config: &std::path::Path, a: &Args) -> Result<()> {
    let out = a.output.as_ref().context("--config needs --output DIR")?;
    let options = ferrule::merge::models::ModelMergeOptions {
        seed: a.seed,
        ..Default::default()
    };
    let spec = a.quant.spec()?;
    let report = ferrule::merge::models::merge_quantized(config, out, &options, spec)?;
    println!("{}", serde_json::to_string(&report)?);
    eprintln!("merged model written to {}", out.display());
    Ok(())
}
