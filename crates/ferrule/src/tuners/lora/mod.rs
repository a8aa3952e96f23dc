//! LoRA (Hu et al. 2021) exactly as PEFT defines it: targets (linear layers and token
//! embeddings), rank/alpha patterns, rsLoRA, init schemes, `bias`, `lora_bias`,
//! `modules_to_save`, and the on-disk keys.

pub mod config;
pub mod layer;
pub mod residual_init;

use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde_json::{Map, Value};

pub use config::{InitLoraWeights, LoraConfig, RankAlpha};
use layer::{LoraEmbedding, LoraLinear};
use residual_init::{residual_init, ResidualInit};

use super::bias::{BiasMode, BiasTrainedLinear, TrainedBiases};
use super::config::{default_list, json_number, AdapterConfig};
use super::core::{AnyTunerCore, LinearRoute, TunerCore};
use super::modules_to_save::ModulesToSave;
use super::registry::{BlockShapes, BuildContext, Method};
use super::target::{MatchReport, Targets};
use super::trainable_tokens::{TokenLinear, TrainableTokens};
use super::{peft_key, AdaptedModule, Delta, Tuner, Update};
use crate::init;
use crate::model::{Embedding, EmbeddingInfo, Linear, LinearInfo, ModelHook, NormInfo, NormParams};
use crate::ops::{dora, FrozenLinear, FrozenWeight};

/// The registry entry.
pub static METHOD: Method = Method {
    name: "lora",
    peft_type: "LORA",
    summary: "LoRA: h = W₀x + (α/r)·B A x on the targeted linear layers (Hu et al. 2021)",
    keys: config::KNOWN_KEYS,
    complete,
    build,
    flags: config::FLAGS,
    complete_flags: Some(super::trainable_tokens::config::complete_lora_flags),
    count_from_shapes: Some(count_from_shapes),
    trains_whole_model: false,
    f32_weights: None,
};

/// PEFT's default LoRA targets per model type (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
pub fn default_targets(model_type: &str) -> Option<&'static [&'static str]> {
    match model_type {
        "llama" | "mistral" | "qwen2" => Some(&["q_proj", "v_proj"]),
        "bert" => Some(&["query", "value"]),
        _ => None,
    }
}

fn complete(options: &mut Map<String, Value>, model_type: &str) -> Result<()> {
    default_list(options, "target_modules", model_type, default_targets)
}

/// `ferrule plan` without weights: `r (in + out)` per targeted linear of every block
/// ([`params_of_blocks`]; other options ignored); DoRA is not counted this way.
fn count_from_shapes(options: &Map<String, Value>, blocks: &BlockShapes) -> Result<Option<usize>> {
    if options.get("use_dora") == Some(&Value::Bool(true)) {
        return Ok(None);
    }
    let r = options.get("r").and_then(Value::as_u64).unwrap_or(8) as usize;
    let targets: Vec<String> = match options.get("target_modules") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(v)) => v
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => bail!("no target_modules for this model type; pass --target-modules"),
    };
    Ok(Some(params_of_blocks(blocks, &targets, r)?))
}

/// LoRA's trainable parameters, `r (in + out)` per targeted linear of every block
/// (Hu et al. 2021, §4.1). `targets` are PEFT suffixes, or `all-linear`.
pub fn params_of_blocks(blocks: &BlockShapes, targets: &[String], r: usize) -> Result<usize> {
    blocks.sum_over_targets(targets, |l| Ok(r * (l.in_features + l.out_features)))
}

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: LoraConfig = config.typed("lora")?;
    Ok(Box::new(Lora::new(cfg, ctx)?))
}

/// Builds LoRA layers for the modules a [`LoraConfig`] targets.
pub struct Lora {
    core: TunerCore<LoraConfig, LoraLayer>,
    patterns: config::Patterns,
    biases: TrainedBiases,
    /// `trainable_token_indices`: embedding rows trained beside LoRA.
    tokens: TrainableTokens,
    state: Mutex<State>,
}

/// What a merge needs of one adapted module.
#[derive(Clone, Copy, Debug)]
struct LoraLayer {
    kind: Kind,
    /// `s = α/r` (or `α/√r` with rsLoRA).
    scaling: f64,
}

/// PiSSA/OLoRA: a module's initial factors, kept for the rank-2r conversion on save.
struct InitialFactors {
    path: String,
    /// `A₀: [r, in]`.
    a: Tensor,
    /// `B₀: [out, r]`.
    b: Tensor,
}

/// What a LoRA layer wraps, for its merge update.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// `ΔW = s·B A`, plus `Δb = s·b_B` with `lora_bias`; DoRA rescales the sum's rows.
    Linear { lora_bias: bool, dora: bool },
    /// `ΔW = s·(B A)ᵀ` on the `[vocab, hidden]` table.
    Embedding,
}

#[derive(Default)]
struct State {
    /// Base tensors replaced by ones the adapter holds (PEFT's `<path>.base_layer.weight`)
    /// or by PiSSA/OLoRA residuals.
    base_replaced: Vec<(String, Tensor)>,
    /// PiSSA/OLoRA: each module's initial factors, for the rank-2r conversion on save.
    initial: Vec<InitialFactors>,
    /// Which `rank_pattern` / `alpha_pattern` keys decided some module.
    rank_keys_used: Vec<bool>,
    alpha_keys_used: Vec<bool>,
}

impl Lora {
    /// An adapter initialised per `init_lora_weights` from `ctx.seed`, or holding
    /// `ctx.weights` (PEFT keys).
    pub fn new(config: LoraConfig, ctx: BuildContext) -> Result<Self> {
        config.validate()?;
        let targets = Targets::required(
            "lora",
            config.target_modules.as_ref(),
            config.exclude_modules.as_ref(),
            config.layers_to_transform.as_ref(),
            config.layers_pattern.as_ref(),
        )?;
        let patterns = config.patterns()?;
        let biases = TrainedBiases::new(BiasMode::parse("lora", &config.bias)?);
        let state = State {
            rank_keys_used: vec![false; patterns.rank.len()],
            alpha_keys_used: vec![false; patterns.alpha.len()],
            ..Default::default()
        };
        let saved = ModulesToSave::new(config.modules_to_save.as_deref());
        let tokens = TrainableTokens::new(
            config.trainable_token_indices.as_ref(),
            "lora: trainable_token_indices",
        )?;
        Ok(Self {
            core: TunerCore::new(&METHOD, config, saved, ctx).with_targets(targets),
            biases,
            tokens,
            patterns,
            state: Mutex::new(state),
        })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.core.config
    }

    /// `A: [r, in]` and `B: [out, r]`, saved or initialised per `init_lora_weights`.
    fn factors(&self, path: &str, r: usize, in_f: usize, out_f: usize) -> Result<(Var, Var)> {
        let key_a = peft_key(path, "lora_A.weight");
        let key_b = peft_key(path, "lora_B.weight");
        let params = &self.core.params;
        if let Some((a0, b0)) = self
            .state
            .lock()
            .unwrap()
            .initial
            .iter()
            .find(|initial| initial.path == path)
            .map(|initial| (initial.a.clone(), initial.b.clone()))
        {
            return Ok((
                params.take_or_init(&key_a, &[r, in_f], || Ok(a0))?,
                params.take_or_init(&key_b, &[out_f, r], || Ok(b0))?,
            ));
        }
        let dev = params.device().clone();
        let (seed_a, seed_b) = (self.core.init_seed(&key_a), self.core.init_seed(&key_b));
        let a = params.take_or_init(&key_a, &[r, in_f], || {
            match &self.config().init_lora_weights {
                // PEFT "gaussian": normal(0, 1/r) for A.
                InitLoraWeights::Named(n) if n == "gaussian" => {
                    init::normal(&[r, in_f], 1.0 / r as f64, seed_a, &dev)
                }
                // PEFT default: kaiming_uniform_(a=sqrt(5)).
                _ => init::kaiming_uniform(&[r, in_f], 5f64.sqrt(), seed_a, &dev),
            }
        })?;
        let b = params.take_or_init(&key_b, &[out_f, r], || {
            match &self.config().init_lora_weights {
                // init_lora_weights=false: B random too, so the adapter is not a no-op (tests).
                InitLoraWeights::Flag(false) => {
                    init::kaiming_uniform(&[out_f, r], 5f64.sqrt(), seed_b, &dev)
                }
                _ => Ok(Tensor::zeros((out_f, r), DType::F32, &dev)?),
            }
        })?;
        Ok((a, b))
    }

    /// `rank_pattern` / `alpha_pattern` keys that decided no targeted module: errors (or
    /// warnings with `allow_unmatched`), since such a key silently trains another rank.
    fn check_pattern_keys(&self, state: &State) -> Result<()> {
        let unused: Vec<String> = (self
            .patterns
            .rank
            .iter()
            .zip(&state.rank_keys_used)
            .map(|((k, _), u)| ("rank_pattern", k, *u)))
        .chain(
            self.patterns
                .alpha
                .iter()
                .zip(&state.alpha_keys_used)
                .map(|((k, _), u)| ("alpha_pattern", k, *u)),
        )
        .filter(|(_, _, used)| !used)
        .map(|(opt, k, _)| format!("{opt}[{k:?}]"))
        .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let msg = format!("lora: {} matched no targeted module", unused.join(", "));
        if self.core.allow_unmatched {
            tracing::warn!("{msg} (continuing: --allow-unmatched)");
            return Ok(());
        }
        bail!("{msg}. A pattern key is a regex matched against the end of a targeted module's path (e.g. \"k_proj\" or \"layers.0.self_attn.q_proj\"); fix it, or pass --allow-unmatched")
    }
}

impl Lora {
    /// The base table or weight the adapter itself holds (`<path>.base_layer.weight`: PEFT
    /// saves a targeted embedding's base layer by default), recorded for merges; else `base`.
    fn saved_base(&self, path: &str, base: FrozenWeight) -> Result<FrozenWeight> {
        let key = peft_key(path, "base_layer.weight");
        let Some(saved) = self.core.params.take_frozen(&key) else {
            return Ok(base);
        };
        let (rows, cols) = base.dims();
        if saved.dims() != [rows, cols] {
            bail!("lora: adapter tensor {key:?} has shape {:?}, but the model's layer is [{rows}, {cols}] (another vocabulary or model?)", saved.dims())
        }
        let saved = saved
            .to_dtype(DType::F32)?
            .to_device(self.core.params.device())?;
        self.state
            .lock()
            .unwrap()
            .base_replaced
            .push((format!("{path}.weight"), saved.clone()));
        Ok(FrozenWeight::dense_in(saved, base.compute_dtype())?)
    }

    /// Rank, alpha and scaling of the module at `path`, marking the pattern keys that decided them.
    fn rank_alpha_scaling(&self, path: &str) -> (usize, f64, f64) {
        let config = self.config();
        let RankAlpha {
            r,
            alpha,
            rank_key,
            alpha_key,
        } = config.rank_and_alpha(&self.patterns, path);
        let mut state = self.state.lock().unwrap();
        if let Some(i) = rank_key {
            state.rank_keys_used[i] = true;
        }
        if let Some(i) = alpha_key {
            state.alpha_keys_used[i] = true;
        }
        (r, alpha, config.scaling(r, alpha))
    }

    /// `lora_B`'s bias `[out]` (`lora_bias = true`): zero, or PyTorch's `nn.Linear` bias init
    /// U(-1/√r, 1/√r) with `init_lora_weights = false`.
    fn lora_b_bias(
        &self,
        path: &str,
        r: usize,
        out_f: usize,
        base_has_bias: bool,
    ) -> Result<Option<Var>> {
        if !self.config().lora_bias {
            return Ok(None);
        }
        if !base_has_bias {
            // peft's warning for the same case (tuners/lora/layer.py, update_layer).
            tracing::warn!("lora: lora_bias=True on {path}, which has no bias: merging this adapter won't be possible");
        }
        let key = peft_key(path, "lora_B.bias");
        let (dev, seed) = (self.core.params.device().clone(), self.core.init_seed(&key));
        let bias = self.core.params.take_or_init(&key, &[out_f], || {
            match &self.config().init_lora_weights {
                InitLoraWeights::Flag(false) => {
                    init::uniform(&[out_f], 1.0 / (r as f64).sqrt(), seed, &dev)
                }
                _ => Ok(Tensor::zeros(out_f, DType::F32, &dev)?),
            }
        })?;
        Ok(Some(bias))
    }
}

impl Lora {
    /// DoRA's magnitude `m: [out]` (key `<path>.lora_magnitude_vector`, no `.weight`), initialised
    /// to `‖W₀ + s·B A‖_row` as peft's `DoraLinearLayer.update_layer` does, and `‖W₀_i‖²`.
    fn magnitude(
        &self,
        path: &str,
        base: &FrozenLinear,
        a: &Var,
        b: &Var,
        scaling: f64,
    ) -> Result<(Var, Tensor)> {
        let bare = FrozenLinear::from_weight(base.weight().clone(), None);
        let w0_sq = dora::row_sq_norms(base.weight(), self.core.params.device())?;
        let magnitude = self.core.params.take_or_init(
            &peft_key(path, "lora_magnitude_vector"),
            &[base.out_features()],
            || {
                Ok(dora::weight_norm(
                    &bare,
                    &w0_sq,
                    a.as_tensor(),
                    b.as_tensor(),
                    scaling,
                )?)
            },
        )?;
        Ok((magnitude, w0_sq))
    }
}

impl Lora {
    /// PiSSA/OLoRA: the base replaced by its residual `W − s·B₀A₀`, with `(A₀, B₀)` kept as the
    /// initial factors. Computed from the base whether the factors are fresh or loaded (a
    /// checkpoint holds trained A, B of a residual base, as peft's own loading assumes).
    fn residual_base(
        &self,
        path: &str,
        base: FrozenLinear,
        r: usize,
        scaling: f64,
    ) -> Result<FrozenLinear> {
        let InitLoraWeights::Named(name) = &self.config().init_lora_weights else {
            return Ok(base);
        };
        let Some(scheme) = ResidualInit::parse(name)? else {
            return Ok(base);
        };
        let w = match base.weight() {
            FrozenWeight::Dense(w) => w,
            // peft refuses PiSSA on a quantized base too (pissa_init); OLoRA there would need requantizing the residual.
            FrozenWeight::Quantized(..) => bail!(
                "lora: init_lora_weights={name:?} on {path} needs a dense base weight, but this one is quantized; initialise on the f32/f16/bf16 model (and quantize the residual afterwards)"
            ),
            FrozenWeight::Sharded(..) => bail!(
                "lora: init_lora_weights={name:?} on {path} replaces the base by its residual, which --shard-base cannot hold sharded; drop --shard-base or use another init_lora_weights"
            ),
            FrozenWeight::Streamed(..) => bail!(
                "lora: init_lora_weights={name:?} on {path} replaces the base by its residual, which is no longer the checkpoint that --stream-base reads from disk; drop --stream-base or use another init_lora_weights"
            ),
        };
        let seed = self.core.init_seed(&peft_key(path, "lora_A.weight"));
        let residual = residual_init(scheme, &w.to_dtype(DType::F32)?, r, scaling, seed)
            .with_context(|| format!("lora: {name} initialisation of {path}"))?;
        let mut state = self.state.lock().unwrap();
        state.initial.push(InitialFactors {
            path: path.to_string(),
            a: residual.a,
            b: residual.b,
        });
        state
            .base_replaced
            .push((format!("{path}.weight"), residual.residual.clone()));
        // The residual replaces the base in the base's compute dtype.
        let weight = FrozenWeight::dense_in(residual.residual, base.weight().compute_dtype())?;
        Ok(FrozenLinear::from_weight(weight, base.bias().cloned()))
    }
}

impl Lora {
    /// `adapter_config.json` of the rank-2r conversion (peft `PeftModel.save_pretrained` with
    /// `path_initial_model_for_weight_conversion`): `r` and `rank_pattern` doubled, `lora_alpha`
    /// and `alpha_pattern` doubled (times √2 with rsLoRA, keeping α/√r), `init_lora_weights = true`.
    fn converted_config(&self, obj: &mut Map<String, Value>) -> Result<()> {
        let config = self.config();
        if config.use_rslora
            && (!config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty())
        {
            bail!("lora: cannot save a PiSSA/OLoRA adapter with use_rslora and rank_pattern/alpha_pattern as plain LoRA (peft refuses the same conversion)")
        }
        let alpha_factor = if config.use_rslora { 2f64.sqrt() } else { 2.0 };
        let doubled = |m: &Map<String, Value>, f: f64| -> Map<String, Value> {
            m.iter()
                .map(|(k, v)| (k.clone(), json_number(v.as_f64().unwrap_or(0.0) * f)))
                .collect()
        };
        obj.insert("r".into(), serde_json::json!(2 * config.r));
        obj.insert(
            "lora_alpha".into(),
            json_number(config.lora_alpha * alpha_factor),
        );
        let ranks: Map<String, Value> = config
            .rank_pattern
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(2 * v.as_u64().unwrap_or(0))))
            .collect();
        obj.insert("rank_pattern".into(), Value::Object(ranks));
        obj.insert(
            "alpha_pattern".into(),
            Value::Object(doubled(&config.alpha_pattern, 2.0)),
        );
        obj.insert("init_lora_weights".into(), Value::Bool(true));
        Ok(())
    }
}

impl ModelHook for Lora {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        if self.biases.mode() == BiasMode::All {
            // peft's bias="all" also saves the biases inside a modules_to_save wrapper
            // (`original_module.bias`, `modules_to_save.bias`): copies of the base bias and of
            // the saved `<path>.bias`, which is what peft loads and uses.
            for inner in ["original_module.bias", "modules_to_save.bias"] {
                self.core.params.take_frozen(&peft_key(&info.path, inner));
            }
        }
        let (base, targeted) = match self.core.route_linear(info, base)? {
            LinearRoute::TrainedInFull(full) => return Ok(full),
            LinearRoute::Targeted(base) => (base, true),
            LinearRoute::Untargeted(base) => (base, false),
        };
        let path = info.path.as_str();
        if targeted && self.tokens.takes_linear(info) {
            bail!("lora: {path} is in target_modules and also gets trainable token rows (trainable_token_indices, or a head tied to that embedding); peft would train only one of them. Leave it out of one")
        }
        let base = match self.tokens.linear(info, base, &self.core.params)? {
            TokenLinear::Rows(layer) => return Ok(layer),
            TokenLinear::NotListed(base) => base,
        };
        let base_has_bias = base.bias().is_some();
        let base = if targeted {
            FrozenLinear::from_weight(
                self.saved_base(path, base.weight().clone())?,
                base.bias().cloned(),
            )
        } else {
            base
        };
        let (base, base_bias) = self
            .biases
            .linear(path, targeted, base, &self.core.params)?;
        if !targeted {
            return Ok(match base_bias {
                Some(bias) => Box::new(BiasTrainedLinear { base, bias }),
                None => Box::new(base),
            });
        }
        let (r, alpha, scaling) = self.rank_alpha_scaling(path);
        let base = self.residual_base(path, base, r, scaling)?;
        let (out_f, in_f) = (base.out_features(), base.in_features());
        let (a, b) = self.factors(path, r, in_f, out_f)?;
        let lora_b_bias = self.lora_b_bias(path, r, out_f, base_has_bias)?;
        let dora = if self.config().use_dora {
            Some(self.magnitude(path, &base, &a, &b, scaling)?)
        } else {
            None
        };
        let params = r * (in_f + out_f)
            + [lora_b_bias.is_some(), dora.is_some()]
                .iter()
                .filter(|x| **x)
                .count()
                * out_f;
        let detail = format!(
            "r={r} alpha={alpha} scaling={scaling}{}{}",
            if lora_b_bias.is_some() {
                " lora_bias"
            } else {
                ""
            },
            if dora.is_some() { " dora" } else { "" }
        );
        let kind = Kind::Linear {
            lora_bias: lora_b_bias.is_some(),
            dora: dora.is_some(),
        };
        let module = AdaptedModule {
            path: path.to_string(),
            params,
            detail,
        };
        self.core.record(module, LoraLayer { kind, scaling });
        let mut layer = LoraLinear::new(
            path.to_string(),
            base,
            a,
            b,
            scaling,
            self.config().lora_dropout,
            self.core.clock.clone(),
        )
        .with_biases(lora_b_bias, base_bias);
        if let Some((magnitude, w0_sq)) = dora {
            layer = layer.with_dora(magnitude, w0_sq);
        }
        Ok(Box::new(layer))
    }

    fn norm(&self, info: &NormInfo, params: NormParams) -> Result<NormParams> {
        self.biases.norm(&info.path, params, &self.core.params)
    }

    /// `lora_embedding_A: [r, vocab]`, `lora_embedding_B: [hidden, r]` (peft `lora.Embedding`):
    /// A zero and B standard normal by default, both standard normal with `init_lora_weights = false`.
    fn embedding(&self, info: &EmbeddingInfo, base: FrozenWeight) -> Result<Box<dyn Embedding>> {
        let path = info.path.as_str();
        if self.tokens.takes_embedding(path) {
            if self.core.adapts(path, true) {
                bail!("lora: {path} is in target_modules and in trainable_token_indices; peft would train only the token rows. Leave it out of one")
            }
            return self.tokens.embedding(info, base, &self.core.params);
        }
        if !self.core.adapts(path, true) {
            return Ok(Box::new(self.saved_base(path, base)?));
        }
        let config = self.config();
        if config.lora_bias {
            bail!("lora: lora_bias=True is not supported for embedding layers ({path}), as in peft")
        }
        if config.use_dora {
            bail!("lora: use_dora on an embedding layer ({path}) is not supported yet; target linear layers only, or set use_dora=false")
        }
        let base = self.saved_base(path, base)?;
        let (r, alpha, scaling) = self.rank_alpha_scaling(path);
        let (vocab, hidden) = base.dims();
        let (key_a, key_b) = (
            peft_key(path, "lora_embedding_A"),
            peft_key(path, "lora_embedding_B"),
        );
        let params = &self.core.params;
        let dev = params.device().clone();
        let random = config.init_lora_weights == InitLoraWeights::Flag(false);
        let a = params.take_or_init(&key_a, &[r, vocab], || {
            if random {
                init::normal(&[r, vocab], 1.0, self.core.init_seed(&key_a), &dev)
            } else {
                Ok(Tensor::zeros((r, vocab), DType::F32, &dev)?)
            }
        })?;
        let b = params.take_or_init(&key_b, &[hidden, r], || {
            init::normal(&[hidden, r], 1.0, self.core.init_seed(&key_b), &dev)
        })?;
        let module = AdaptedModule {
            path: path.to_string(),
            params: r * (vocab + hidden),
            detail: format!("embedding r={r} alpha={alpha} scaling={scaling}"),
        };
        let layer = LoraLayer {
            kind: Kind::Embedding,
            scaling,
        };
        self.core.record(module, layer);
        Ok(Box::new(LoraEmbedding::new(
            base,
            info.padding_idx,
            a,
            b,
            scaling,
        )))
    }
}

impl Tuner for Lora {
    fn core(&self) -> &dyn AnyTunerCore {
        &self.core
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        self.tokens.check_finished()?;
        let nothing_adapted = self.core.adapted().is_empty();
        let report = self
            .core
            .check_finished("target_modules matched no linear or embedding layer of the model")
            .map_err(|e| match (&self.config().layers_to_transform, nothing_adapted) {
                // As peft's error does: the layer selection may be what left nothing.
                (Some(layers), true) => {
                    let shown =
                        |v: serde_json::Result<Value>| v.map(|v| v.to_string()).unwrap_or_default();
                    let pattern = shown(serde_json::to_value(&self.config().layers_pattern));
                    anyhow!(
                        "{e} (layers_to_transform is {}, layers_pattern {pattern}: no targeted module lies in those layers)",
                        shown(serde_json::to_value(layers))
                    )
                }
                _ => e,
            })?;
        self.check_pattern_keys(&self.state.lock().unwrap())?;
        Ok(report)
    }

    fn config_json(&self) -> Result<Value> {
        let mut json = serde_json::to_value(self.config())?;
        let obj = json
            .as_object_mut()
            .ok_or_else(|| anyhow!("config is not an object"))?;
        // PEFT writes the explicit list of full module paths when "all-linear" was asked for.
        if self
            .config()
            .target_modules
            .as_ref()
            .is_some_and(|t| t.is_all_linear())
        {
            let mut names: Vec<String> = self.adapted().iter().map(|m| m.path.clone()).collect();
            names.sort();
            names.dedup();
            obj.insert("target_modules".into(), serde_json::json!(names));
        }
        if !self.state.lock().unwrap().initial.is_empty() {
            self.converted_config(obj)?;
        }
        Ok(json)
    }

    /// PiSSA/OLoRA save as plain LoRA of rank 2r: `[A | A₀]` stacked on rows, `[B | −B₀]` on
    /// columns, so `s'·B'A' = s·(B A − B₀A₀)` applies to the unchanged base (peft
    /// `LoraModel.subtract_mutated_init`). Other tensors (`modules_to_save`, biases) are kept;
    /// peft's conversion drops them.
    fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let state = self.state.lock().unwrap();
        let mut out = Vec::new();
        for (key, var) in self.trainable() {
            let trained = var.as_tensor().clone();
            let initial = state.initial.iter().find(|initial| {
                key == peft_key(&initial.path, "lora_A.weight")
                    || key == peft_key(&initial.path, "lora_B.weight")
            });
            out.push(match initial {
                Some(initial) if key.ends_with("lora_A.weight") => {
                    (key, Tensor::cat(&[&trained, &initial.a], 0)?)
                }
                Some(initial) => (key, Tensor::cat(&[&trained, &initial.b.neg()?], 1)?),
                None => (key, trained),
            });
        }
        out.extend(self.tokens.saved_tables()?);
        Ok(out)
    }

    /// `ΔW = s · B A` per adapted linear (`s·(B A)ᵀ` per embedding), and `Δb = s·b_B` with
    /// `lora_bias` (peft `lora.Linear.merge`); merge: `W' = W + ΔW`.
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        let mut out = Vec::new();
        for adapted in self.core.adapted().iter() {
            let path = &adapted.module.path;
            let scaling = adapted.layer.scaling;
            let get = |suffix: &str| {
                self.core
                    .params
                    .get(&peft_key(path, suffix))
                    .ok_or_else(|| anyhow!("lora: {path} has no {suffix}"))
            };
            let weight = format!("{path}.weight");
            match adapted.layer.kind {
                Kind::Embedding => {
                    let (a, b) = (get("lora_embedding_A")?, get("lora_embedding_B")?);
                    out.push((
                        weight,
                        Update::Add(Delta::LowRank {
                            b: b.as_tensor().clone(),
                            a: a.as_tensor().clone(),
                            scale: scaling,
                            transposed: true,
                        }),
                    ));
                }
                Kind::Linear { lora_bias, dora } => {
                    let (a, b) = (get("lora_A.weight")?, get("lora_B.weight")?);
                    let delta = Delta::LowRank {
                        b: b.as_tensor().clone(),
                        a: a.as_tensor().clone(),
                        scale: scaling,
                        transposed: false,
                    };
                    out.push(match dora {
                        true => (
                            weight,
                            Update::RowRescaled {
                                delta,
                                magnitude: get("lora_magnitude_vector")?.as_tensor().clone(),
                            },
                        ),
                        false => (weight, Update::Add(delta)),
                    });
                    if lora_bias {
                        out.push((
                            format!("{path}.bias"),
                            Update::Add(Delta::Dense((get("lora_B.bias")?.as_tensor() * scaling)?)),
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    fn trained_in_place(&self) -> usize {
        self.biases.count(&self.core.params)
    }

    fn replaced(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.core.saved_replaced();
        out.extend(self.biases.replaced(&self.core.params));
        out.extend(self.state.lock().unwrap().base_replaced.iter().cloned());
        out.extend(self.tokens.replaced()?);
        Ok(out)
    }

    fn adapted(&self) -> Vec<AdaptedModule> {
        let mut out = self.core.adapted_modules();
        out.extend(self.tokens.adapted());
        out
    }
}
