//! LoRA (Hu et al. 2021) exactly as PEFT defines it: targets (linear layers and token
//! embeddings), rank/alpha patterns, rsLoRA, init schemes, `bias`, `lora_bias`,
//! `modules_to_save`, and the on-disk keys.

pub mod config;
pub mod layer;
pub mod residual_init;

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde_json::{Map, Value};

pub use config::{InitLoraWeights, LoraConfig};
use layer::{LoraEmbedding, LoraLinear};
use residual_init::{residual_init, ResidualInit};

use super::bias::{BiasMode, BiasTrainedLinear, TrainedBiases};
use super::config::{default_list, json_number, AdapterConfig};
use super::mode::Mode;
use super::modules_to_save::ModulesToSave;
use super::params::ParamStore;
use super::registry::{BuildContext, Method};
use super::target::{in_layers, MatchReport, Targets};
use super::{check_finished, peft_key, AdaptedModule, Tuner, Update};
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

fn build(config: &AdapterConfig, ctx: BuildContext) -> Result<Box<dyn Tuner>> {
    let cfg: LoraConfig = config.typed("lora")?;
    Ok(Box::new(Lora::new(cfg, ctx)?))
}

/// Builds LoRA layers for the modules a [`LoraConfig`] targets.
pub struct Lora {
    config: LoraConfig,
    patterns: config::Patterns,
    targets: Targets,
    allow_unmatched: bool,
    seed: u64,
    mode: Arc<Mode>,
    params: ParamStore,
    saved: ModulesToSave,
    biases: TrainedBiases,
    state: Mutex<State>,
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
    /// Adapted modules with their kind and scaling `s`.
    adapted: Vec<(AdaptedModule, Kind, f64)>,
    /// Base tensors replaced by ones the adapter holds (PEFT's `<path>.base_layer.weight`)
    /// or by PiSSA/OLoRA residuals.
    base_replaced: Vec<(String, Tensor)>,
    /// PiSSA/OLoRA: each module's initial `(A₀, B₀)`, for the rank-2r conversion on save.
    initial: Vec<(String, Tensor, Tensor)>,
    /// Which `rank_pattern` / `alpha_pattern` keys decided some module.
    rank_keys_used: Vec<bool>,
    alpha_keys_used: Vec<bool>,
}

impl Lora {
    /// An adapter initialised per `init_lora_weights` from `ctx.seed`, or holding
    /// `ctx.weights` (PEFT keys).
    pub fn new(config: LoraConfig, ctx: BuildContext) -> Result<Self> {
        config.validate()?;
        let target =
            config.target_modules.as_ref().ok_or_else(|| anyhow!("lora: target_modules is required (a list of module names, a regex, or \"all-linear\")"))?;
        let targets = Targets::new("target_modules", target, config.exclude_modules.as_ref())
            .context("lora")?;
        let patterns = config.patterns()?;
        let biases = TrainedBiases::new(BiasMode::parse("lora", &config.bias)?);
        let state = State {
            rank_keys_used: vec![false; patterns.rank.len()],
            alpha_keys_used: vec![false; patterns.alpha.len()],
            ..Default::default()
        };
        Ok(Self {
            saved: ModulesToSave::new(config.modules_to_save.as_deref()),
            biases,
            patterns,
            targets,
            allow_unmatched: ctx.allow_unmatched,
            seed: ctx.seed,
            mode: Arc::new(Mode::new(ctx.seed)),
            params: ParamStore::new(ctx.device, ctx.weights),
            state: Mutex::new(state),
            config,
        })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    fn in_layers(&self, path: &str) -> bool {
        in_layers(
            path,
            self.config.layers_to_transform.as_ref(),
            self.config.layers_pattern.as_ref(),
        )
    }

    /// `A: [r, in]` and `B: [out, r]`, saved or initialised per `init_lora_weights`.
    fn factors(&self, path: &str, r: usize, in_f: usize, out_f: usize) -> Result<(Var, Var)> {
        let key_a = peft_key(path, "lora_A.weight");
        let key_b = peft_key(path, "lora_B.weight");
        if let Some((a0, b0)) = self
            .state
            .lock()
            .unwrap()
            .initial
            .iter()
            .find(|(p, _, _)| p == path)
            .map(|(_, a, b)| (a.clone(), b.clone()))
        {
            return Ok((
                self.params.take_or_init(&key_a, &[r, in_f], || Ok(a0))?,
                self.params.take_or_init(&key_b, &[out_f, r], || Ok(b0))?,
            ));
        }
        let dev = self.params.device().clone();
        let (seed_a, seed_b) = (
            init::seed_for(self.seed, &key_a),
            init::seed_for(self.seed, &key_b),
        );
        let a = self.params.take_or_init(&key_a, &[r, in_f], || {
            match &self.config.init_lora_weights {
                // PEFT "gaussian": normal(0, 1/r) for A.
                InitLoraWeights::Named(n) if n == "gaussian" => {
                    init::normal(&[r, in_f], 1.0 / r as f64, seed_a, &dev)
                }
                // PEFT default: kaiming_uniform_(a=sqrt(5)).
                _ => init::kaiming_uniform(&[r, in_f], 5f64.sqrt(), seed_a, &dev),
            }
        })?;
        let b = self.params.take_or_init(&key_b, &[out_f, r], || {
            match &self.config.init_lora_weights {
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
    fn check_pattern_keys(&self, st: &State) -> Result<()> {
        let unused: Vec<String> = (self
            .patterns
            .rank
            .iter()
            .zip(&st.rank_keys_used)
            .map(|((k, _), u)| ("rank_pattern", k, *u)))
        .chain(
            self.patterns
                .alpha
                .iter()
                .zip(&st.alpha_keys_used)
                .map(|((k, _), u)| ("alpha_pattern", k, *u)),
        )
        .filter(|(_, _, used)| !used)
        .map(|(opt, k, _)| format!("{opt}[{k:?}]"))
        .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let msg = format!("lora: {} matched no targeted module", unused.join(", "));
        if self.allow_unmatched {
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
        let Some(t) = self.params.take_frozen(&key) else {
            return Ok(base);
        };
        let (rows, cols) = base.dims();
        if t.dims() != [rows, cols] {
            bail!("lora: adapter tensor {key:?} has shape {:?}, but the model's layer is [{rows}, {cols}] (another vocabulary or model?)", t.dims())
        }
        let t = t.to_dtype(DType::F32)?.to_device(self.params.device())?;
        self.state
            .lock()
            .unwrap()
            .base_replaced
            .push((format!("{path}.weight"), t.clone()));
        Ok(FrozenWeight::Dense(t))
    }

    /// Rank, alpha and scaling of the module at `path`, marking the pattern keys that decided them.
    fn rank_alpha_scaling(&self, path: &str) -> (usize, f64, f64) {
        let (r, alpha, ri, ai) = self.config.rank_and_alpha(&self.patterns, path);
        let mut st = self.state.lock().unwrap();
        if let Some(i) = ri {
            st.rank_keys_used[i] = true;
        }
        if let Some(i) = ai {
            st.alpha_keys_used[i] = true;
        }
        (r, alpha, self.config.scaling(r, alpha))
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
        if !self.config.lora_bias {
            return Ok(None);
        }
        if !base_has_bias {
            // peft's warning for the same case (tuners/lora/layer.py, update_layer).
            tracing::warn!("lora: lora_bias=True on {path}, which has no bias: merging this adapter won't be possible");
        }
        let key = peft_key(path, "lora_B.bias");
        let (dev, seed) = (
            self.params.device().clone(),
            init::seed_for(self.seed, &key),
        );
        let v =
            self.params
                .take_or_init(&key, &[out_f], || match &self.config.init_lora_weights {
                    InitLoraWeights::Flag(false) => {
                        init::uniform(&[out_f], 1.0 / (r as f64).sqrt(), seed, &dev)
                    }
                    _ => Ok(Tensor::zeros(out_f, DType::F32, &dev)?),
                })?;
        Ok(Some(v))
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
        let w0_sq = dora::row_sq_norms(base.weight(), self.params.device())?;
        let m = self.params.take_or_init(
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
        Ok((m, w0_sq))
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
        let InitLoraWeights::Named(name) = &self.config.init_lora_weights else {
            return Ok(base);
        };
        let Some(scheme) = ResidualInit::parse(name)? else {
            return Ok(base);
        };
        let w = match base.weight() {
            FrozenWeight::Dense(w) => w,
            // peft refuses PiSSA on a quantized base too (pissa_init); OLoRA there would need requantizing the residual.
            FrozenWeight::Quantized(_) => bail!(
                "lora: init_lora_weights={name:?} on {path} needs a dense base weight, but this one is quantized; initialise on the f32/f16/bf16 model (and quantize the residual afterwards)"
            ),
            FrozenWeight::Sharded(_) => bail!(
                "lora: init_lora_weights={name:?} on {path} replaces the base by its residual, which --shard-base cannot hold sharded; drop --shard-base or use another init_lora_weights"
            ),
        };
        let seed = init::seed_for(self.seed, &peft_key(path, "lora_A.weight"));
        let res = residual_init(scheme, &w.to_dtype(DType::F32)?, r, scaling, seed)
            .with_context(|| format!("lora: {name} initialisation of {path}"))?;
        let mut st = self.state.lock().unwrap();
        st.initial.push((path.to_string(), res.a, res.b));
        st.base_replaced
            .push((format!("{path}.weight"), res.residual.clone()));
        Ok(FrozenLinear::new(res.residual, base.bias().cloned())?)
    }
}

impl Lora {
    /// `adapter_config.json` of the rank-2r conversion (peft `PeftModel.save_pretrained` with
    /// `path_initial_model_for_weight_conversion`): `r` and `rank_pattern` doubled, `lora_alpha`
    /// and `alpha_pattern` doubled (times √2 with rsLoRA, keeping α/√r), `init_lora_weights = true`.
    fn converted_config(&self, obj: &mut Map<String, Value>) -> Result<()> {
        let c = &self.config;
        if c.use_rslora && (!c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty()) {
            bail!("lora: cannot save a PiSSA/OLoRA adapter with use_rslora and rank_pattern/alpha_pattern as plain LoRA (peft refuses the same conversion)")
        }
        let alpha_factor = if c.use_rslora { 2f64.sqrt() } else { 2.0 };
        let doubled = |m: &Map<String, Value>, f: f64| -> Map<String, Value> {
            m.iter()
                .map(|(k, v)| (k.clone(), json_number(v.as_f64().unwrap_or(0.0) * f)))
                .collect()
        };
        obj.insert("r".into(), serde_json::json!(2 * c.r));
        obj.insert(
            "lora_alpha".into(),
            json_number(c.lora_alpha * alpha_factor),
        );
        let ranks: Map<String, Value> = c
            .rank_pattern
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(2 * v.as_u64().unwrap_or(0))))
            .collect();
        obj.insert("rank_pattern".into(), Value::Object(ranks));
        obj.insert(
            "alpha_pattern".into(),
            Value::Object(doubled(&c.alpha_pattern, 2.0)),
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
                self.params.take_frozen(&peft_key(&info.path, inner));
            }
        }
        let base = match self.saved.wrap(info, base, &self.params)? {
            Ok(full) => return Ok(full),
            Err(base) => base,
        };
        let path = info.path.as_str();
        let targeted = self.targets.select(path, info.is_output_head) && self.in_layers(path);
        let base_has_bias = base.bias().is_some();
        let base = if targeted {
            FrozenLinear::from_weight(
                self.saved_base(path, base.weight().clone())?,
                base.bias().cloned(),
            )
        } else {
            base
        };
        let (base, base_bias) = self.biases.linear(path, targeted, base, &self.params)?;
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
        let dora = if self.config.use_dora {
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
        self.state.lock().unwrap().adapted.push((
            AdaptedModule {
                path: path.to_string(),
                params,
                detail,
            },
            kind,
            scaling,
        ));
        let mut layer = LoraLinear::new(
            path.to_string(),
            base,
            a,
            b,
            scaling,
            self.config.lora_dropout,
            self.mode.clone(),
        )
        .with_biases(lora_b_bias, base_bias);
        if let Some((magnitude, w0_sq)) = dora {
            layer = layer.with_dora(magnitude, w0_sq);
        }
        Ok(Box::new(layer))
    }

    fn norm(&self, info: &NormInfo, params: NormParams) -> Result<NormParams> {
        self.biases.norm(&info.path, params, &self.params)
    }

    /// `lora_embedding_A: [r, vocab]`, `lora_embedding_B: [hidden, r]` (peft `lora.Embedding`):
    /// A zero and B standard normal by default, both standard normal with `init_lora_weights = false`.
    fn embedding(&self, info: &EmbeddingInfo, base: FrozenWeight) -> Result<Box<dyn Embedding>> {
        let path = info.path.as_str();
        if !self.targets.select_non_linear(path) || !self.in_layers(path) {
            return Ok(Box::new(self.saved_base(path, base)?));
        }
        if self.config.lora_bias {
            bail!("lora: lora_bias=True is not supported for embedding layers ({path}), as in peft")
        }
        if self.config.use_dora {
            bail!("lora: use_dora on an embedding layer ({path}) is not supported yet; target linear layers only, or set use_dora=false")
        }
        let base = self.saved_base(path, base)?;
        let (r, alpha, scaling) = self.rank_alpha_scaling(path);
        let (vocab, hidden) = base.dims();
        let (key_a, key_b) = (
            peft_key(path, "lora_embedding_A"),
            peft_key(path, "lora_embedding_B"),
        );
        let dev = self.params.device().clone();
        let random = self.config.init_lora_weights == InitLoraWeights::Flag(false);
        let a = self.params.take_or_init(&key_a, &[r, vocab], || {
            if random {
                init::normal(&[r, vocab], 1.0, init::seed_for(self.seed, &key_a), &dev)
            } else {
                Ok(Tensor::zeros((r, vocab), DType::F32, &dev)?)
            }
        })?;
        let b = self.params.take_or_init(&key_b, &[hidden, r], || {
            init::normal(&[hidden, r], 1.0, init::seed_for(self.seed, &key_b), &dev)
        })?;
        let detail = format!("embedding r={r} alpha={alpha} scaling={scaling}");
        self.state.lock().unwrap().adapted.push((
            AdaptedModule {
                path: path.to_string(),
                params: r * (vocab + hidden),
                detail,
            },
            Kind::Embedding,
            scaling,
        ));
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
    fn method(&self) -> &'static Method {
        &METHOD
    }

    fn mode(&self) -> &Arc<Mode> {
        &self.mode
    }

    fn finish(&self) -> Result<Vec<MatchReport>> {
        let st = self.state.lock().unwrap();
        let report =
            check_finished("lora", &self.targets, &self.params, self.allow_unmatched, !st.adapted.is_empty(), "linear or embedding layer").map_err(|e| {
                match (&self.config.layers_to_transform, st.adapted.is_empty()) {
                    // As peft's error does: the layer selection may be what left nothing.
                    (Some(l), true) => {
                        let shown = |v: serde_json::Result<Value>| v.map(|v| v.to_string()).unwrap_or_default();
                        let pattern = shown(serde_json::to_value(&self.config.layers_pattern));
                        anyhow!(
                            "{e} (layers_to_transform is {}, layers_pattern {pattern}: no targeted module lies in those layers)",
                            shown(serde_json::to_value(l))
                        )
                    }
                    _ => e,
                }
            })?;
        self.check_pattern_keys(&st)?;
        Ok(vec![report])
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.params.trainable()
    }

    fn adapted(&self) -> Vec<AdaptedModule> {
        self.state
            .lock()
            .unwrap()
            .adapted
            .iter()
            .map(|(m, _, _)| m.clone())
            .collect()
    }

    fn config_json(&self) -> Result<Value> {
        let mut v = serde_json::to_value(&self.config)?;
        let obj = v
            .as_object_mut()
            .ok_or_else(|| anyhow!("config is not an object"))?;
        // PEFT writes the explicit list of full module paths when "all-linear" was asked for.
        if self
            .config
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
        Ok(v)
    }

    /// PiSSA/OLoRA save as plain LoRA of rank 2r: `[A | A₀]` stacked on rows, `[B | −B₀]` on
    /// columns, so `s'·B'A' = s·(B A − B₀A₀)` applies to the unchanged base (peft
    /// `LoraModel.subtract_mutated_init`). Other tensors (`modules_to_save`, biases) are kept;
    /// peft's conversion drops them.
    fn saved_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let st = self.state.lock().unwrap();
        let mut out = Vec::new();
        for (key, v) in self.params.trainable() {
            let t = v.as_tensor().clone();
            let initial = st.initial.iter().find(|(p, _, _)| {
                key == peft_key(p, "lora_A.weight") || key == peft_key(p, "lora_B.weight")
            });
            out.push(match initial {
                Some((_, a0, _)) if key.ends_with("lora_A.weight") => {
                    (key, Tensor::cat(&[&t, a0], 0)?)
                }
                Some((_, _, b0)) => (key, Tensor::cat(&[&t, &b0.neg()?], 1)?),
                None => (key, t),
            });
        }
        Ok(out)
    }

    /// `ΔW = s · B A` per adapted linear (`s·(B A)ᵀ` per embedding), and `Δb = s·b_B` with
    /// `lora_bias` (peft `lora.Linear.merge`); merge: `W' = W + ΔW`.
    fn updates(&self) -> Result<Vec<(String, Update)>> {
        let st = self.state.lock().unwrap();
        let mut out = Vec::new();
        for (m, kind, scaling) in &st.adapted {
            let get = |suffix: &str| {
                self.params
                    .get(&peft_key(&m.path, suffix))
                    .ok_or_else(|| anyhow!("lora: {} has no {suffix}", m.path))
            };
            let weight = format!("{}.weight", m.path);
            match kind {
                Kind::Embedding => {
                    let (a, b) = (get("lora_embedding_A")?, get("lora_embedding_B")?);
                    out.push((
                        weight,
                        Update::Add((b.as_tensor().matmul(a.as_tensor())?.t()? * *scaling)?),
                    ));
                }
                Kind::Linear { lora_bias, dora } => {
                    let (a, b) = (get("lora_A.weight")?, get("lora_B.weight")?);
                    let delta = (b.as_tensor().matmul(a.as_tensor())? * *scaling)?;
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
                    if *lora_bias {
                        out.push((
                            format!("{}.bias", m.path),
                            Update::Add((get("lora_B.bias")?.as_tensor() * *scaling)?),
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    fn trained_in_place(&self) -> usize {
        self.biases.count(&self.params)
    }

    fn replaced(&self) -> Vec<(String, Tensor)> {
        let mut out = self.saved.replaced(&self.params);
        out.extend(self.biases.replaced(&self.params));
        out.extend(self.state.lock().unwrap().base_replaced.iter().cloned());
        out
    }
}
