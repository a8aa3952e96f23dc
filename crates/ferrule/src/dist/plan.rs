//! `ferrule plan`: per-rank memory and per-step communication of a data-parallel run,
//! estimated from the model's `config.json` (no weights needed), the method's trainable
//! parameters, the batch shape, the world size and the ZeRO stage. Estimates, not
//! measurements: BENCHMARKS.md ("Scale-out") compares them with measured runs.
//!
//! Model states follow the ZeRO paper (Rajbhandari et al. 2020, §3.1 and §5): with
//! mixed-precision Adam a data-parallel rank holds `16Ψ` bytes for `Ψ` trainable parameters
//! (`2Ψ` fp16 parameters, `2Ψ` fp16 gradients, `K = 12` bytes of fp32 copy, momentum and
//! variance), `4Ψ + 12Ψ/N` at stage 1, `2Ψ + 14Ψ/N` at stage 2 and `16Ψ/N` at stage 3; it sends
//! `2Ψ` elements per step at stages 0–2 and `3Ψ` at stage 3 (§7). ferrule trains adapters in
//! f32, so its own figures ([`TrainableState`]) use 4-byte parameters and gradients; both are
//! printed.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::zero::ZeroStage;
use crate::adapted::attach_fresh;
use crate::model::config::{family_of, BertConfig, DecoderConfig, Family};
use crate::model::LoadOptions;
use crate::model::Task;
use crate::train::galore::projector::Side;
pub use crate::tuners::registry::{BlockLinear, BlockShapes};
use crate::tuners::{trainable_params, AdapterConfig};

/// The shapes that size a run, read from `config.json`.
#[derive(Clone, Debug, Serialize)]
pub struct ModelShape {
    pub family: &'static str,
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// The linear layers of one block.
    pub block_linears: Vec<BlockLinear>,
    /// Linears outside the blocks that a method can target (BERT's `pooler.dense`, which
    /// transformers' BertModel has by default; its weights are in `other_params`).
    pub outside_linears: Vec<BlockLinear>,
    /// Parameters outside the blocks' linear weights (embeddings, norms, biases, head).
    pub other_params: usize,
    /// Parameters of the embedding table and the untied head (bf16 when the base is quantized).
    pub embedding_params: usize,
    /// Parameters of every norm layer (part of `other_params`).
    pub norm_params: usize,
}

impl ModelShape {
    /// The shape of a llama-family decoder or BERT encoder `config.json`.
    pub fn from_config(config: &Value) -> anyhow::Result<ModelShape> {
        Ok(match family_of(config)? {
            Family::Decoder => {
                let decoder = DecoderConfig::from_json(config)?;
                let (h, q, kv, i) = (
                    decoder.hidden_size,
                    decoder.num_attention_heads * decoder.head_dim,
                    decoder.num_key_value_heads * decoder.head_dim,
                    decoder.intermediate_size,
                );
                let lin = |name, in_features, out_features, bias| BlockLinear {
                    name,
                    in_features,
                    out_features,
                    bias,
                };
                let (qkv, o, mlp) = (decoder.qkv_bias, decoder.o_bias, decoder.mlp_bias);
                let block_linears = vec![
                    lin("q_proj", h, q, qkv),
                    lin("k_proj", h, kv, qkv),
                    lin("v_proj", h, kv, qkv),
                    lin("o_proj", q, h, o),
                    lin("gate_proj", h, i, mlp),
                    lin("up_proj", h, i, mlp),
                    lin("down_proj", i, h, mlp),
                ];
                let biases = if decoder.qkv_bias { q + 2 * kv } else { 0 }
                    + if decoder.o_bias { h } else { 0 }
                    + if decoder.mlp_bias { 2 * i + h } else { 0 };
                let embedding_params =
                    decoder.vocab_size * h * if decoder.tie_word_embeddings { 1 } else { 2 };
                ModelShape {
                    family: "decoder",
                    layers: decoder.num_hidden_layers,
                    hidden: h,
                    intermediate: i,
                    vocab: decoder.vocab_size,
                    block_linears,
                    outside_linears: Vec::new(),
                    other_params: embedding_params
                        + decoder.num_hidden_layers * (2 * h + biases)
                        + h,
                    embedding_params,
                    // Two RMSNorm weights a block, and the final norm's.
                    norm_params: (2 * decoder.num_hidden_layers + 1) * h,
                }
            }
            Family::Bert => {
                let bert = BertConfig::from_json(config)?;
                let (h, i) = (bert.hidden_size, bert.intermediate_size);
                let lin = |name, in_features, out_features| BlockLinear {
                    name,
                    in_features,
                    out_features,
                    bias: true,
                };
                let block_linears = vec![
                    lin("query", h, h),
                    lin("key", h, h),
                    lin("value", h, h),
                    lin("attention.output.dense", h, h),
                    lin("intermediate.dense", h, i),
                    lin("output.dense", i, h),
                ];
                let embedding_params =
                    (bert.vocab_size + bert.max_position_embeddings + bert.type_vocab_size) * h;
                ModelShape {
                    family: "bert",
                    layers: bert.num_hidden_layers,
                    hidden: h,
                    intermediate: i,
                    vocab: bert.vocab_size,
                    block_linears,
                    outside_linears: vec![lin("pooler.dense", h, h)],
                    // Biases of the six linears, two LayerNorms per block, embedding LayerNorm, pooler.
                    other_params: embedding_params
                        + bert.num_hidden_layers * (5 * h + i + 4 * h)
                        + 2 * h
                        + h * h
                        + h,
                    embedding_params,
                    // Two LayerNorms (weight and bias) a block, and the embeddings' LayerNorm.
                    norm_params: (2 * bert.num_hidden_layers + 1) * 2 * h,
                }
            }
        })
    }

    /// Weights of the blocks' linear layers (what `--quantize` quantizes).
    pub fn linear_params(&self) -> usize {
        self.layers
            * self
                .block_linears
                .iter()
                .map(|l| l.in_features * l.out_features)
                .sum::<usize>()
    }

    /// All parameters of the base model (the classifier head of a SEQ_CLS run excluded).
    pub fn total_params(&self) -> usize {
        self.linear_params() + self.other_params
    }

    /// The shapes of the blocks' linear layers (what a method counts itself from).
    pub fn blocks(&self) -> BlockShapes<'_> {
        BlockShapes {
            family: self.family,
            layers: self.layers,
            linears: &self.block_linears,
            outside: &self.outside_linears,
            norm_params: self.norm_params,
        }
    }

    /// LoRA's trainable parameters, `r (in + out)` per targeted linear of every block
    /// (Hu et al. 2021, §4.1). `targets` are PEFT suffixes, or `all-linear`.
    pub fn lora_params(&self, targets: &[String], r: usize) -> anyhow::Result<usize> {
        crate::tuners::lora::params_of_blocks(&self.blocks(), targets, r)
    }
}

/// The model side of a plan: its shape, the bytes its frozen weights take, and the adapter's
/// trainable parameters.
#[derive(Clone, Debug)]
pub struct PlannedModel {
    pub shape: ModelShape,
    /// Bytes of the frozen base as held in memory (measured when the weights are there); with
    /// `stream_base`, what stays resident plus the streaming window, and with a `max_resident`
    /// budget the matrices it keeps ([`crate::model::residency`]). With the weights there, it
    /// includes what the method derives from them and holds frozen (SVFit's U_r, σ, V_r).
    pub base_bytes: f64,
    /// Ψ, trainable parameters.
    pub trainable: usize,
    /// The trainable tensors' names and shapes, as the method built them on the weights
    /// (empty when planned from `config.json` alone).
    pub trainable_shapes: Vec<(String, Vec<usize>)>,
}

impl PlannedModel {
    /// The model at `model` (a folder, its `config.json` alone, or a `.gguf` file) with
    /// `adapter` for `task` (by model family when `None`), loaded as `options` say (linear
    /// layers quantized, dense matrices in the compute dtype). With the weights there the
    /// adapter is built on them and counted exactly; from a `config.json` alone the weights'
    /// bytes are estimated and the method counts itself from the layer shapes
    /// (`Method::count_from_shapes`), if it can.
    pub fn load(
        model: &str,
        adapter: &AdapterConfig,
        task: Option<Task>,
        options: LoadOptions,
        allow_unmatched: bool,
    ) -> Result<Self> {
        let quantize = options.quantize;
        if !Path::new(model).exists() {
            bail!("{model}: no such file or folder (give a model folder, its config.json, or a .gguf file)")
        }
        let (config, has_weights) = read_config(model)?;
        if has_weights {
            return Self::counted(model, adapter, task, options, allow_unmatched);
        }
        let shape =
            ModelShape::from_config(&config).with_context(|| format!("{model}: config.json"))?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let task = task.unwrap_or(if shape.family == "bert" {
            Task::FeatureExtraction
        } else {
            Task::CausalLm
        });
        let adapter = adapter.resolved(model_type, task)?;
        let method = adapter.method()?;
        let counted = match method.count_from_shapes {
            Some(count) => count(&adapter.options, &shape.blocks())?,
            None => None,
        };
        let Some(trainable) = counted else {
            let counting: Vec<&str> = crate::tuners::registry::METHODS
                .iter()
                .filter(|m| m.count_from_shapes.is_some())
                .map(|m| m.name)
                .collect();
            bail!(
                "{model}: without the model's weights only these methods count their parameters, and not with every option (DoRA needs the weights): {}; give a model folder with its weights to plan --method {}",
                counting.join(", "),
                adapter.peft_type
            )
        };
        // Dense matrices are held in the compute dtype; beside a quantized base the embedding
        // and head in bf16 (as `Weights::load_dir` holds them).
        let dense = options.compute_dtype.dtype().size_in_bytes() as f64;
        let linear = match quantize {
            Some(_) => {
                shape.linear_params() as f64 * linear_bytes_per_param(quantize, shape.hidden)
            }
            None => shape.linear_params() as f64 * dense,
        };
        let embedding =
            shape.embedding_params as f64 * if quantize.is_some() { 2.0 } else { dense };
        let other = (shape.other_params - shape.embedding_params) as f64 * 4.0;
        let in_memory = linear + embedding + other;
        // The largest matrix in use and the next prefetched: the head (or the embedding)
        // against the largest linear, as the file would hold them in the compute dtype.
        let table = (shape.vocab * shape.hidden) as f64 * dense;
        let largest_linear = shape
            .block_linears
            .iter()
            .map(|l| (l.in_features * l.out_features) as f64)
            .fold(0.0, f64::max)
            * match quantize {
                Some(_) => linear_bytes_per_param(quantize, shape.hidden),
                None => dense,
            };
        let streamed = other + 2.0 * table.max(largest_linear);
        let base_bytes = match (options.stream_base, options.max_resident) {
            (false, _) => in_memory,
            (true, None) => streamed,
            // Kept matrices fill the budget up to the whole base (`model::residency`).
            (true, Some(budget)) => {
                if (budget as f64) < streamed {
                    bail!("--max-resident-gb {:.3}: the frozen base needs at least {:.3} GB when streamed (estimated from {model}'s config.json); give at least that, or --stream-base for the least", budget as f64 / 1e9, streamed / 1e9)
                }
                (budget as f64).min(in_memory.max(streamed))
            }
        };
        Ok(Self {
            shape,
            base_bytes,
            trainable,
            trainable_shapes: Vec::new(),
        })
    }

    /// The adapter built on the model's weights ([`attach`]) and counted.
    fn counted(
        model: &str,
        adapter: &AdapterConfig,
        task: Option<Task>,
        options: LoadOptions,
        allow_unmatched: bool,
    ) -> Result<Self> {
        let (source, tuned) = attach_fresh(model, adapter, task, options, allow_unmatched)?;
        let w = &source.weights;
        let trainable_shapes = tuned
            .tuner
            .trainable()
            .into_iter()
            .map(|(name, v)| (name, v.dims().to_vec()))
            .collect();
        // What the method derives from the base and holds frozen (SVFit's singular vectors).
        let derived: usize = (tuned.tuner.frozen_state()?.iter())
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        Ok(Self {
            shape: ModelShape::from_config(&source.config)?,
            base_bytes: (crate::model::residency::of(w).total() + derived) as f64,
            trainable: trainable_params(tuned.tuner.as_ref()),
            trainable_shapes,
        })
    }
}

/// The model's config.json, and whether its weights are there to count exactly.
fn read_config(model: &str) -> Result<(Value, bool)> {
    let path = Path::new(model);
    if path.extension().is_some_and(|e| e == "gguf") {
        return Ok((Value::Null, true));
    }
    let (dir, file) = if path.is_dir() {
        (path.to_path_buf(), path.join("config.json"))
    } else {
        (
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            path.to_path_buf(),
        )
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let config =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))?;
    let has_weights = path.is_dir()
        && std::fs::read_dir(&dir)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"));
    Ok((config, has_weights))
}

/// What a run trains and on what shape of batch.
#[derive(Clone, Debug)]
pub struct PlanRequest {
    pub shape: ModelShape,
    /// Bytes of the frozen base as held in memory.
    pub base_bytes: f64,
    /// Ψ, trainable parameters.
    pub trainable: usize,
    pub world: usize,
    pub stage: ZeroStage,
    pub shard_base: bool,
    /// Records per micro-batch on each rank, and tokens per record.
    pub micro_batch: usize,
    pub seq_len: usize,
    pub recompute: bool,
    /// The optimizer (`--optim`): its state's bytes per parameter.
    pub optim: crate::train::OptimName,
    /// The trainable tensors' names and shapes ([`PlannedModel::trainable_shapes`]): with
    /// them GaLore's state and layer-wise gradients are counted per tensor.
    pub trainable_shapes: Vec<(String, Vec<usize>)>,
    /// GaLore's settings (`--optim-args`), for a GaLore optimizer.
    pub galore: Option<crate::train::galore::GaLoreConfig>,
}

/// Resident bytes of `optim`'s state for `psi` parameters at stage 0: AdamW's two f32 moments
/// (8 bytes a parameter); 8-bit, bitsandbytes' layout (two 1-byte codes and two f32 absmax per
/// block of 256: 2.03 bytes, counting every parameter as 8-bit, as those of at least
/// `min_8bit_size` elements are); paged, none resident beyond the parameter a step is on (the
/// state is a file in `--offload-dir`, [`optimizer_file_bytes`]); GaLore, AdamW's as an upper
/// bound (its projected targets hold rank-r moments, which the shapes alone do not give here,
/// plus the projection bases); GaLore 8-bit, 8-bit's per element (an estimate, not a bound:
/// the f32 bases, and low-rank moments under `min_8bit_size` kept in f32, are not counted).
pub fn optimizer_resident_bytes(optim: crate::train::OptimName, psi: f64) -> f64 {
    use crate::train::OptimName;
    match optim {
        OptimName::Adamw
        | OptimName::GaloreAdamw
        | OptimName::NaturalGaloreAdamw
        | OptimName::GaloreAdamwLayerwise => 8.0 * psi,
        OptimName::Adamw8bit | OptimName::GaloreAdamw8bit | OptimName::GaloreAdamw8bitLayerwise => {
            eight_bit_state_bytes(psi)
        }
        OptimName::PagedAdamw8bit | OptimName::PagedAdamw32bit => 0.0,
    }
}

/// Bytes of a paged optimizer's state file (0 for the others).
pub fn optimizer_file_bytes(optim: crate::train::OptimName, psi: f64) -> f64 {
    use crate::train::OptimName;
    match optim {
        OptimName::PagedAdamw8bit => eight_bit_state_bytes(psi),
        OptimName::PagedAdamw32bit => 8.0 * psi,
        OptimName::Adamw
        | OptimName::Adamw8bit
        | OptimName::GaloreAdamw
        | OptimName::NaturalGaloreAdamw
        | OptimName::GaloreAdamwLayerwise
        | OptimName::GaloreAdamw8bit
        | OptimName::GaloreAdamw8bitLayerwise => 0.0,
    }
}

fn eight_bit_state_bytes(psi: f64) -> f64 {
    let block = crate::train::optim::bnb::BLOCKSIZE as f64;
    2.0 * psi + 8.0 * psi / block
}

/// Resident bytes of GaLore's state over the trainable tensors `shapes`, at stage 0: each
/// target's moments in its low-rank shape (f32, or 8-bit's bytes for the 8-bit optimizers),
/// its f32 bases and Natural GaLore's history of `s` low-rank gradients; Adam's (or 8-bit's)
/// moments for the other tensors. Then the transient of a basis refresh: the SVD of the
/// largest target's gradient, which holds it in f64 with its thin `U` and `V`.
pub fn galore_state_bytes(
    optim: crate::train::OptimName,
    cfg: &crate::train::galore::GaLoreConfig,
    shapes: &[(String, Vec<usize>)],
) -> Result<f64> {
    let targets = crate::train::galore::select_targets(
        shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
        &cfg.target_modules,
    )?;
    let moments = |elements: usize| match optim.is_8bit() {
        true => eight_bit_state_bytes(elements as f64),
        false => 8.0 * elements as f64,
    };
    let history = cfg.natural.as_ref().map_or(0, |n| n.history);
    let (mut bytes, mut refresh) = (0.0, 0.0f64);
    for (name, shape) in shapes {
        let elements: usize = shape.iter().product();
        if !targets.contains(name) || shape.len() != 2 {
            bytes += moments(elements);
            continue;
        }
        let (m, n) = (shape[0], shape[1]);
        let (a, b) = cfg.proj_type.low_rank_shape((m, n), cfg.rank);
        let bases = match cfg.proj_type.side((m, n)) {
            Side::Left => m * cfg.rank,
            Side::Right => cfg.rank * n,
            Side::Both => (m + n) * cfg.rank,
        };
        bytes += moments(a * b) + 4.0 * (bases + history * a * b) as f64;
        let k = m.min(n);
        refresh = refresh.max(8.0 * (m * n + m * k + k * n) as f64);
    }
    Ok(bytes + refresh)
}

/// f32 copies of the tensors outside the blocks that a layer-wise step holds at its peak beyond
/// their gradient and Adam moments (counted elsewhere): measured, not derived. A 2-step
/// layer-wise GaLore run of SmolLM2-135M (full fine-tuning, 8 × 256, rank 128) peaked 1.07 GB
/// above this plan without it, 9.44 times its 113 MB outside the blocks (the vocabulary table).
/// Likely: the tied head's and the lookup's gradients of the table before they are summed, and
/// AdamW's temporaries when the table steps after the backward pass. Checked on the random
/// 1.07B Llama (BENCHMARKS.md, "GaLore layer-wise").
pub const LAYERWISE_OUTSIDE_COPIES: f64 = 9.44;

/// Gradient bytes a layer-wise optimizer holds at once: every tensor outside the blocks
/// (stepped after the backward pass), with [`LAYERWISE_OUTSIDE_COPIES`] more copies of them,
/// and the largest block's (each block's tensors step, and their gradients go, as its
/// recomputed backward ends). A block is the tensors named `….layers.<i>.…` (or BERT's
/// `….layer.<i>.…`).
pub fn layerwise_gradient_bytes(shapes: &[(String, Vec<usize>)]) -> f64 {
    let mut blocks: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut outside = 0;
    for (name, shape) in shapes {
        let elements: usize = shape.iter().product();
        match block_of(name) {
            Some(block) => *blocks.entry(block).or_default() += elements,
            None => outside += elements,
        }
    }
    let largest = blocks.values().copied().max().unwrap_or(0) as f64;
    4.0 * ((1.0 + LAYERWISE_OUTSIDE_COPIES) * outside as f64 + largest)
}

/// `model.layers.3` of `model.layers.3.mlp.up_proj.weight`: the name up to its layer index.
fn block_of(name: &str) -> Option<&str> {
    for marker in [".layers.", ".layer."] {
        if let Some(at) = name.find(marker) {
            let rest = &name[at + marker.len()..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 {
                return Some(&name[..at + marker.len() + digits]);
            }
        }
    }
    None
}

/// Bytes one rank holds for the trainable state, ferrule's way (f32 throughout).
#[derive(Clone, Debug, Serialize)]
pub struct TrainableState {
    /// The model's working copy of the trainable parameters (4Ψ; all-gathered each step at
    /// stage 3, since ferrule gathers once per step).
    pub parameters: f64,
    /// Accumulated gradients (4Ψ), and with several ranks the flat vector they are sent in
    /// (another 4Ψ); a layer-wise optimizer's, [`layerwise_gradient_bytes`].
    pub gradients: f64,
    /// AdamW's moments (8Ψ; 8-bit: about 2Ψ; paged: 0 resident, the state is a file;
    /// GaLore with the trainable shapes: [`galore_state_bytes`]), or at stages 1–3 this rank's
    /// partition of moments and f32 master parameters (12Ψ/N; bitsandbytes': the master
    /// parameters and its state, `(4Ψ + state)/N`).
    pub optimizer: f64,
}

/// The estimate for one rank.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub world_size: usize,
    pub zero_stage: u8,
    pub shard_base: bool,
    pub trainable_params: usize,
    pub base_params: usize,
    /// Frozen weights on one rank (with `--shard-base`, 1/N of them plus one broadcast tile and
    /// the embedding lookup's buffers).
    pub weights_bytes: f64,
    pub trainable_state: TrainableState,
    /// The ZeRO paper's model-state bytes for the same Ψ (mixed-precision Adam, K = 12).
    pub paper_model_state_bytes: f64,
    /// Saved activations of one micro-batch (see [`activation_bytes`]).
    pub activation_bytes: f64,
    /// Process overhead besides the above (runtime, tokenizer, encoded data, allocator).
    pub runtime_bytes: f64,
    /// Sum of weights, trainable state, activations and runtime.
    pub total_bytes: f64,
    /// Bytes one rank sends per optimizer step, ring accounting (`crate::dist::Traffic`).
    pub comm_bytes_per_step: f64,
    /// The paper's figure: 2Ψ (stages 0–2) or 3Ψ (stage 3) elements of 4 bytes, times (N-1)/N.
    pub paper_comm_bytes_per_step: f64,
    pub notes: Vec<String>,
}

/// Fixed process overhead of a training run (runtime, tokenizer, encoded data, allocator),
/// measured: the 1- and 2-rank runs of bench/run_scaleout.sh less their weights and
/// activations were 105 MB (MiniLM) and 139 MB (SmolLM2-135M) (BENCHMARKS.md, "Scale-out").
pub const RUNTIME_BYTES: f64 = 120e6;

/// Floats a block keeps per token for its backward pass. Counted from what ferrule's fused ops
/// save (the fused attention keeps no score matrix, so there is no `T²` term; the decoder's
/// head loss keeps no logits): a decoder block keeps its input, the normed input, q, k, v, the
/// attention output, the MLP's input and normed input (8·hidden) and gate, up and their product
/// (3·intermediate); a BERT block its input, q, k, v, the attention output, its dense output and
/// LayerNorm, the FFN output and LayerNorm (9·hidden) and the FFN's two intermediates
/// (2·intermediate). Each count is then scaled by the ratio measured on one model of the family
/// (per-token slope of peak RSS between the 1- and 2-rank runs of bench/run_scaleout.sh):
/// 1.107 for SmolLM2-135M (10,205 floats per token and block against 9,216 counted), 0.879 for
/// MiniLM (5,740 against 6,528).
pub fn block_floats_per_token(shape: &ModelShape) -> f64 {
    let (h, i) = (shape.hidden as f64, shape.intermediate as f64);
    if shape.family == "decoder" {
        1.107 * (8.0 * h + 3.0 * i)
    } else {
        0.879 * (9.0 * h + 2.0 * i)
    }
}

/// f32 values per token and unit of hidden size that a decoder's peak RSS gains when the
/// backward pass begins at the loss, with recomputation: measured with `/proc` traces
/// (RssAnon every 20–200 ms) of QLoRA runs at 4 × 64 tokens, `--recompute`, on random Llamas
/// with a 49,152-token vocabulary: +72 MB at hidden 4096 (6.9B, 17.3 rows of `hidden` f32 per
/// token) and +21–31 MB at 2048 (1.07B, 10–15 rows); on the 1.07B, half of it before the
/// head's fused loss backward (`ops::head_loss`) runs and half while it does. What is
/// allocated there is `[tokens, hidden]`-shaped (the loss's gradient rows, the row selection's
/// and the final norm's backward; the head itself is walked in tiles), so it is counted per
/// unit of hidden size; the allocator keeps it for the rest of the run (mimalloc does not
/// return freed memory, `main.rs`). Both models have the same vocabulary. Without
/// recomputation the per-block factor of [`block_floats_per_token`], fitted on whole runs,
/// already holds it. BENCHMARKS.md ("The largest model on this machine") has the runs.
pub const LOSS_BACKWARD_ROWS: f64 = 16.0;

/// Saved activations of one micro-batch of `micro_batch × seq_len` tokens, in bytes (f32). With
/// recomputation only each block's input is kept, plus one block's activations while it is
/// recomputed, plus for a decoder the loss backward's rows ([`LOSS_BACKWARD_ROWS`]).
pub fn activation_bytes(
    shape: &ModelShape,
    micro_batch: usize,
    seq_len: usize,
    recompute: bool,
) -> f64 {
    let tokens = (micro_batch * seq_len) as f64;
    let block = block_floats_per_token(shape);
    let h = shape.hidden as f64;
    let kept = match (recompute, shape.family == "decoder") {
        (true, true) => h * shape.layers as f64 + block + LOSS_BACKWARD_ROWS * h,
        (true, false) => h * shape.layers as f64 + block,
        (false, _) => block * shape.layers as f64,
    };
    4.0 * tokens * kept
}

/// Estimates one rank's memory and traffic for `req`.
pub fn plan(req: &PlanRequest) -> Plan {
    let psi = req.trainable as f64;
    let n = req.world.max(1) as f64;
    let ring = (n - 1.0) / n;
    let stage = req.stage.get();
    let shapes = &req.trainable_shapes;
    let mut notes = vec!["estimates from the model's shapes and formulas; measured runs are in BENCHMARKS.md (Scale-out)".to_string()];
    let trainable_state = TrainableState {
        parameters: 4.0 * psi,
        gradients: match (
            req.world > 1,
            req.optim.is_layerwise() && !shapes.is_empty(),
        ) {
            (true, _) => 8.0 * psi,
            (false, true) => layerwise_gradient_bytes(shapes),
            (false, false) => 4.0 * psi,
        },
        optimizer: match (stage, &req.galore) {
            (1.., _) if req.optim == crate::train::OptimName::Adamw => 12.0 * psi / n,
            // bitsandbytes' partition: the f32 master copy and the state (paged: in a file).
            (1.., _) => (4.0 * psi + optimizer_resident_bytes(req.optim, psi)) / n,
            (0, Some(cfg)) if req.optim.is_galore() && !shapes.is_empty() => {
                match galore_state_bytes(req.optim, cfg, shapes) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        notes.push(format!(
                            "--optim {}: {e:#}; its state is counted as AdamW's",
                            req.optim
                        ));
                        optimizer_resident_bytes(req.optim, psi)
                    }
                }
            }
            (0, _) => optimizer_resident_bytes(req.optim, psi),
        },
    };
    let paper_model_state_bytes = match stage {
        0 => 16.0 * psi,
        1 => 4.0 * psi + 12.0 * psi / n,
        2 => 2.0 * psi + 14.0 * psi / n,
        _ => 16.0 * psi / n,
    };
    let sharded = req.shard_base && req.world > 1;
    let tokens = (req.micro_batch * req.seq_len) as f64;
    // A shard of every matrix, one broadcast f32 tile, and the embedding lookup's buffers (every
    // rank's ids' rows, then this rank's).
    let weights_bytes = if sharded {
        req.base_bytes / n
            + 4.0 * crate::ops::frozen_linear::TILE_ELEMS as f64
            + 4.0 * (n + 1.0) * tokens * req.shape.hidden as f64
    } else {
        req.base_bytes
    };
    let activation = activation_bytes(&req.shape, req.micro_batch, req.seq_len, req.recompute);
    // Gradients: all-reduce (stages 0, 1) or reduce-scatter (2, 3) of 4Ψ bytes; parameters:
    // all-gather of 4Ψ bytes at stages 1-3.
    let grads = if stage <= 1 {
        2.0 * ring * 4.0 * psi
    } else {
        ring * 4.0 * psi
    };
    let params = if stage >= 1 { ring * 4.0 * psi } else { 0.0 };
    let paper_comm = if stage == 3 { 3.0 } else { 2.0 } * 4.0 * psi * ring;
    let base_comm = if sharded {
        sharded_base_bytes(&req.shape, n, tokens, req.recompute)
    } else {
        0.0
    };
    let state = trainable_state.parameters + trainable_state.gradients + trainable_state.optimizer;
    let file = optimizer_file_bytes(req.optim, psi) / if stage >= 1 { n } else { 1.0 };
    if stage >= 1 && req.optim.is_galore() {
        notes.push(format!("--optim {} runs at --zero-stage 0 only: train refuses it at stage {stage} (counted here as a partition of its Adam state)", req.optim));
    } else if req.optim.is_galore() && !shapes.is_empty() && req.galore.is_some() {
        notes.push(format!("--optim {}: the state counted per tensor from the targets' low-rank shapes (--optim-args), with one basis refresh's SVD", req.optim));
    } else if file > 0.0 {
        notes.push(format!("--optim {}: the optimizer state ({:.3} GB) is a file in --offload-dir, resident one parameter at a time", req.optim, file / 1e9));
    }
    if sharded {
        notes.push("--shard-base: every frozen matrix is broadcast in f32 tiles in the forward and the backward pass (and the recomputation), once per micro-batch: the traffic is per micro-batch of each rank, times --grad-accum".into());
    }
    Plan {
        world_size: req.world,
        zero_stage: stage,
        shard_base: req.shard_base,
        trainable_params: req.trainable,
        base_params: req.shape.total_params(),
        weights_bytes,
        paper_model_state_bytes,
        activation_bytes: activation,
        runtime_bytes: RUNTIME_BYTES,
        total_bytes: weights_bytes + state + activation + RUNTIME_BYTES,
        comm_bytes_per_step: grads + params + base_comm,
        paper_comm_bytes_per_step: paper_comm,
        trainable_state,
        notes,
    }
}

/// Bytes one rank sends per micro-batch for a sharded base of `n` ranks (`dist::sharded_base`),
/// ring accounting: each frozen linear weight and a decoder's output head are broadcast in f32
/// in the forward and the backward pass (the blocks' weights a third time with recomputation),
/// and the embedding lookup all-gathers the ids and reduce-scatters `n · tokens` rows. Within
/// 0.3% of the measured bytes (BENCHMARKS.md, "Scale-out": the backward skips the first
/// block's q, k, v, whose input needs no gradient).
pub fn sharded_base_bytes(shape: &ModelShape, n: f64, tokens: f64, recompute: bool) -> f64 {
    let ring = (n - 1.0) / n;
    let head = if shape.family == "decoder" {
        (shape.vocab * shape.hidden) as f64
    } else {
        0.0
    };
    let reads = (if recompute { 3.0 } else { 2.0 }) * shape.linear_params() as f64 + 2.0 * head;
    ring * 4.0 * (reads + n * tokens * shape.hidden as f64 + n * (tokens + 1.0))
}

/// Bytes per parameter of the blocks' linear weights for a `--quantize` method (bitsandbytes'
/// layouts: 4-bit codes plus one f32 absmax per block of `blocksize`, or with double
/// quantization one byte per block plus one f32 per 256 blocks; int8: one byte plus one f32
/// per row), or f32 without quantization.
pub fn linear_bytes_per_param(
    quantize: Option<&crate::quant::QuantSpec>,
    in_features: usize,
) -> f64 {
    use crate::quant::QuantMethod;
    match quantize {
        None => 4.0,
        Some(q) => match q.method {
            QuantMethod::Nf4 | QuantMethod::Fp4 => {
                let absmax = if q.double_quant {
                    (8.0 + 32.0 / 256.0) / q.blocksize as f64
                } else {
                    32.0 / q.blocksize as f64
                };
                (4.0 + absmax) / 8.0
            }
            QuantMethod::Int8 => 1.0 + 4.0 / in_features as f64,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_70b() -> Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": false
        })
    }

    /// Llama-3-70B's config: 70.55 B parameters (its model card says 70.6 B); LoRA r 16 on
    /// q,k,v,o trains r (in + out) per module, 65,536,000 in all (counted by hand below).
    #[test]
    fn shapes_of_a_70b_config() {
        let s = ModelShape::from_config(&llama_70b()).unwrap();
        assert_eq!(s.total_params(), 70_553_706_496);
        let targets: Vec<String> = ["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // per layer: q 16(8192+8192) + k 16(8192+1024) + v the same + o 16(8192+8192) = 819,200
        assert_eq!(s.lora_params(&targets, 16).unwrap(), 80 * 819_200);
        assert!(s
            .lora_params(&["query".to_string()], 8)
            .unwrap_err()
            .to_string()
            .contains("q_proj"));
    }

    /// The ZeRO paper's model-state formulas (§5, Figure 1 with K = 12) and its 7.5B example:
    /// Ψ = 7.5 B on 64 ranks gives 120 GB, 31.4 GB, 16.6 GB and 1.88 GB for stages 0–3.
    #[test]
    fn paper_formulas_at_its_own_example() {
        let s = ModelShape::from_config(&llama_70b()).unwrap();
        let gb: Vec<f64> = (0..=3)
            .map(|stage| {
                let req = PlanRequest {
                    shape: s.clone(),
                    base_bytes: 0.0,
                    trainable: 7_500_000_000,
                    world: 64,
                    stage: ZeroStage::new(stage).unwrap(),
                    shard_base: false,
                    micro_batch: 1,
                    seq_len: 1,
                    recompute: false,
                    optim: Default::default(),
                    trainable_shapes: Vec::new(),
                    galore: None,
                };
                (plan(&req).paper_model_state_bytes / 1e9 * 100.0).round() / 100.0
            })
            .collect();
        assert_eq!(gb, vec![120.0, 31.41, 16.64, 1.88]);
    }

    /// 8-bit state is a quarter of AdamW's (plus the absmax), paged state is not resident.
    /// Hand-counted: rank 2, `std` projects an [8, 4] target on the right (moments [8, 2],
    /// basis [2, 4]) and a [4, 8] one on the left (moments [2, 8], basis [4, 2]); the
    /// embedding keeps Adam's 8 bytes an element; the refresh's SVD of either target holds
    /// 8 · (32 + 32 + 16) bytes. A layer-wise step holds the embedding's gradient (and the
    /// measured copies beside it) and one block's.
    #[test]
    fn galore_state_and_layerwise_gradients_are_counted_per_tensor() {
        let shapes: Vec<(String, Vec<usize>)> = [
            ("model.embed_tokens.weight", vec![10, 4]),
            ("model.layers.0.self_attn.q_proj.weight", vec![8, 4]),
            ("model.layers.0.mlp.down_proj.weight", vec![4, 8]),
            ("model.layers.1.mlp.down_proj.weight", vec![4, 8]),
        ]
        .map(|(n, s)| (n.to_string(), s))
        .to_vec();
        let cfg = crate::train::galore::GaLoreConfig {
            rank: 2,
            ..Default::default()
        };
        let optim = crate::train::OptimName::GaloreAdamw;
        let bytes = galore_state_bytes(optim, &cfg, &shapes).unwrap();
        assert_eq!(bytes, 320.0 + 3.0 * (8.0 * 16.0 + 4.0 * 8.0) + 640.0);
        let outside = (1.0 + LAYERWISE_OUTSIDE_COPIES) * 40.0;
        assert_eq!(layerwise_gradient_bytes(&shapes), 4.0 * (outside + 64.0));
    }

    #[test]
    fn optimizer_state_bytes_per_optimizer() {
        use crate::train::OptimName;
        let psi = 1e6;
        assert_eq!(optimizer_resident_bytes(OptimName::Adamw, psi), 8e6);
        assert_eq!(
            optimizer_resident_bytes(OptimName::Adamw8bit, psi),
            2.03125e6
        );
        assert_eq!(
            optimizer_resident_bytes(OptimName::PagedAdamw8bit, psi),
            0.0
        );
        assert_eq!(optimizer_file_bytes(OptimName::PagedAdamw32bit, psi), 8e6);
        assert_eq!(optimizer_file_bytes(OptimName::Adamw8bit, psi), 0.0);
    }

    #[test]
    fn nf4_bits_per_parameter_match_bitsandbytes() {
        let q = |double_quant| crate::quant::QuantSpec {
            method: crate::quant::QuantMethod::Nf4,
            blocksize: 64,
            double_quant,
        };
        assert_eq!(linear_bytes_per_param(Some(&q(false)), 4096) * 8.0, 4.5);
        // QLoRA §2: double quantization brings 0.5 bits/param of constants to 0.127.
        assert!((linear_bytes_per_param(Some(&q(true)), 4096) * 8.0 - 4.127).abs() < 1e-3);
    }
}
