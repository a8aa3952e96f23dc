//! README claims that no other test covered, each checked against a reference or a value
//! worked out here: sharded checkpoints, linear / legacy `rope_scaling`, `layers_to_transform`
//! and `layers_pattern`, `init_lora_weights` false / "gaussian", refused pickles, and LoRA
//! training through an FP4 base.

mod common;

use ferrule::model::LoadOptions;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;
use ferrule::model::{Frozen, Inputs, Model, ModelSource, Task};
use ferrule::quant::{QuantMethod, QuantSpec};
use ferrule::train::{train, RunOptions, Silent, TrainConfig};
use ferrule::tuners::{registry, AdapterConfig, BuildContext, Tuner};
use ferrule::util::atomic::RawTensor;
use serde_json::json;

fn llama_dir() -> std::path::PathBuf {
    fixtures().join("models/llama")
}

/// A copy of the `llama` fixture folder without its weights (config, tokenizer files).
fn copy_without_weights(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(llama_dir()).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "model.safetensors" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn raw_tensors(file: &Path) -> BTreeMap<String, RawTensor> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                RawTensor::new(v.dtype(), v.shape().to_vec(), v.data().to_vec()),
            )
        })
        .collect()
}

fn decoder_logits(src: &ModelSource, hook: &dyn ferrule::model::ModelHook) -> Tensor {
    let model = Model::build(src, Task::CausalLm, hook, &Device::Cpu, 0).unwrap();
    let inputs = load("inputs/decoder.safetensors");
    model
        .forward(&Inputs {
            input_ids: &inputs["input_ids"],
            attention_mask: Some(&inputs["attention_mask"]),
            token_type_ids: None,
        })
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn load_dir(dir: &Path) -> anyhow::Result<ModelSource> {
    ModelSource::load(dir.to_str().unwrap(), &Device::Cpu)
}

// ------------------------------------------------------------------------------------------
// Loading: sharded `model.safetensors.index.json`
// ------------------------------------------------------------------------------------------

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

/// Writes the llama fixture split into two shards (layer 1, the final norm and the head in the
/// second) and an index in transformers' layout; returns the index's weight map.
fn write_sharded(
    dir: &Path,
    drop_from_shard2: Option<&str>,
) -> serde_json::Map<String, serde_json::Value> {
    copy_without_weights(dir);
    let all = raw_tensors(&llama_dir().join("model.safetensors"));
    let (mut one, mut two) = (BTreeMap::new(), BTreeMap::new());
    let mut map = serde_json::Map::new();
    let mut total = 0usize;
    for (name, t) in all {
        total += t.data.len();
        let second = name.contains("layers.1.")
            || name.starts_with("lm_head")
            || name == "model.norm.weight";
        map.insert(name.clone(), json!(if second { SHARD2 } else { SHARD1 }));
        if second {
            two.insert(name, t);
        } else {
            one.insert(name, t);
        }
    }
    assert!(one.len() > 3 && two.len() > 3, "both shards hold tensors");
    if let Some(name) = drop_from_shard2 {
        assert!(two.remove(name).is_some(), "{name} is in shard 2");
    }
    ferrule::util::atomic::save_raw_safetensors_atomic(&dir.join(SHARD1), &one, None).unwrap();
    ferrule::util::atomic::save_raw_safetensors_atomic(&dir.join(SHARD2), &two, None).unwrap();
    write_index(dir, &map, total);
    map
}

fn write_index(dir: &Path, map: &serde_json::Map<String, serde_json::Value>, total: usize) {
    let index = json!({"metadata": {"total_size": total}, "weight_map": map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_sharded_folder_loads_the_same_tensors_and_logits_as_the_single_file() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("sharded");
    write_sharded(&dir, None);
    assert!(!dir.join("model.safetensors").exists());
    let single = load_dir(&llama_dir()).unwrap();
    let sharded = load_dir(&dir).unwrap();
    // Every tensor, bit for bit.
    let names = |s: &ModelSource| {
        s.weights
            .tensors()
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(names(&single), names(&sharded));
    assert_eq!(
        names(&single).len(),
        21,
        "embedding, 2 x 9 layer tensors, final norm, head"
    );
    for (name, a) in &single.weights.tensors() {
        let (a, b) = (values(a), values(&sharded.weights.tensors()[name]));
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs"
        );
    }
    // And the logits, exactly.
    let (la, lb) = (
        values(&decoder_logits(&single, &Frozen)),
        values(&decoder_logits(&sharded, &Frozen)),
    );
    assert_eq!(la.len(), 2 * 12 * 320);
    assert!(
        la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()),
        "sharded logits differ: {}",
        max_abs_diff(&la, &lb)
    );
}

#[test]
fn a_shard_index_naming_a_missing_file_or_tensor_is_an_error_naming_the_file() {
    let t = tempfile::tempdir().unwrap();
    // The index names a third shard that is not there.
    let dir = t.path().join("missing-shard");
    let mut map = write_sharded(&dir, None);
    map.insert(
        "lm_head.weight".into(),
        json!("model-00003-of-00003.safetensors"),
    );
    write_index(&dir, &map, 0);
    let err = format!(
        "{:#}",
        load_dir(&dir).err().expect("a missing shard must fail")
    );
    assert!(
        err.contains(
            &dir.join("model-00003-of-00003.safetensors")
                .display()
                .to_string()
        ),
        "{err}"
    );

    // The index places lm_head.weight in shard 2, which lacks it.
    let dir = t.path().join("missing-tensor");
    write_sharded(&dir, Some("lm_head.weight"));
    let err = format!(
        "{:#}",
        load_dir(&dir)
            .err()
            .expect("a tensor missing from its shard must fail")
    );
    assert!(
        err.contains(&dir.join(SHARD2).display().to_string()) && err.contains("\"lm_head.weight\""),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------
// RoPE: linear scaling and the legacy `rope_scaling` spellings
// ------------------------------------------------------------------------------------------

/// The llama fixture under another RoPE setting in config.json (the weights are shared).
fn llama_with_rope(
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> ModelSource {
    copy_without_weights(dir);
    std::fs::copy(
        llama_dir().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let obj = cfg.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    edit(obj);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    load_dir(dir).unwrap()
}

type ConfigEdit = Box<dyn FnOnce(&mut serde_json::Map<String, serde_json::Value>)>;

/// `expected/llama_linear_rope_logits.safetensors` is transformers 5.24's output for the llama
/// fixture with `{"rope_type": "linear", "factor": 3}` (tests/fixtures/make_rope_fixtures.py,
/// which also checks that transformers reads both legacy spellings identically). Linear scaling
/// divides positions by the factor: `inv_freq / factor`.
#[test]
fn linear_rope_scaling_in_every_spelling_matches_transformers() {
    let exp = load("expected/llama_linear_rope_logits.safetensors");
    let mask = &load("inputs/decoder.safetensors")["attention_mask"];
    let t = tempfile::tempdir().unwrap();
    let spellings: Vec<(&str, ConfigEdit)> = vec![
        (
            "rope_parameters (transformers 5)",
            Box::new(|c| {
                drop(c.insert(
                    "rope_parameters".into(),
                    json!({"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}),
                ))
            }),
        ),
        (
            "legacy rope_scaling with \"type\"",
            Box::new(|c| {
                c.insert("rope_theta".into(), json!(10000.0));
                c.insert(
                    "rope_scaling".into(),
                    json!({"type": "linear", "factor": 3.0}),
                );
            }),
        ),
        (
            "legacy rope_scaling with \"rope_type\"",
            Box::new(|c| {
                c.insert("rope_theta".into(), json!(10000.0));
                c.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "linear", "factor": 3}),
                );
            }),
        ),
        (
            // transformers' standardize_rope_params: `rope_type` wins over the legacy `type`.
            "both keys, rope_type first",
            Box::new(|c| {
                drop(c.insert(
                    "rope_scaling".into(),
                    json!({"type": "default", "rope_type": "linear", "factor": 3.0}),
                ))
            }),
        ),
    ];
    let mut first: Option<Vec<f32>> = None;
    for (i, (what, edit)) in spellings.into_iter().enumerate() {
        let src = llama_with_rope(&t.path().join(i.to_string()), edit);
        let logits = decoder_logits(&src, &Frozen);
        let diff = max_diff_masked(&logits, &exp["logits"], Some(mask));
        assert!(
            diff < 1e-4,
            "{what}: max |Δlogits| against transformers = {diff}"
        );
        let v = values(&logits);
        match &first {
            None => first = Some(v),
            Some(f) => assert!(
                f.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what} gives other logits than rope_parameters"
            ),
        }
    }
    // The scaling is in effect: unscaled RoPE is far from the reference.
    let plain = llama_with_rope(&t.path().join("default"), |c| {
        drop(c.insert("rope_scaling".into(), json!({"type": "default"})))
    });
    let off = max_diff_masked(&decoder_logits(&plain, &Frozen), &exp["logits"], Some(mask));
    assert!(off > 0.1, "default RoPE is within {off} of the linear-scaled reference: the fixture cannot tell them apart");

    // inv_freq: transformers' tensor, and θ^(−2i/d) / factor computed here in f64.
    let inv = ferrule::ops::rope::inv_freq(
        16,
        10000.0,
        &ferrule::ops::rope::RopeScaling::Linear { factor: 3.0 },
    );
    let reference = values(&exp["inv_freq"]);
    assert_eq!(inv.len(), 8);
    for (i, (&ours, &theirs)) in inv.iter().zip(&reference).enumerate() {
        let by_hand = 1.0 / 10000f64.powf(2.0 * i as f64 / 16.0) / 3.0;
        assert!(
            (ours - by_hand).abs() <= 1e-15 * by_hand,
            "inv_freq[{i}] = {ours}, by hand {by_hand}"
        );
        assert!(
            ((ours as f32) - theirs).abs() <= f32::EPSILON * theirs,
            "inv_freq[{i}] = {ours}, transformers {theirs}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// LoRA: layers_to_transform / layers_pattern, init_lora_weights false and "gaussian"
// ------------------------------------------------------------------------------------------

fn fresh_lora(
    options: serde_json::Value,
    seed: u64,
) -> anyhow::Result<(Box<dyn Tuner>, ModelSource, Tensor)> {
    let dev = Device::Cpu;
    let mut o = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8});
    o.as_object_mut()
        .unwrap()
        .extend(options.as_object().unwrap().clone());
    let src = load_dir(&llama_dir())?;
    let cfg = AdapterConfig::from_json(o)?.resolved("llama", Task::CausalLm)?;
    let tuner = registry::build(
        &cfg,
        BuildContext {
            seed,
            device: &dev,
            weights: None,
            allow_unmatched: false,
            release_base: None,
        },
    )?;
    let model = Model::build(&src, Task::CausalLm, tuner.as_ref(), &dev, seed)?;
    tuner.finish()?;
    let inputs = load("inputs/decoder.safetensors");
    let logits = model.forward(&Inputs {
        input_ids: &inputs["input_ids"],
        attention_mask: Some(&inputs["attention_mask"]),
        token_type_ids: None,
    })?;
    Ok((tuner, src, logits))
}

fn adapted_paths(tuner: &dyn Tuner) -> Vec<String> {
    let mut p: Vec<String> = tuner
        .trainable()
        .iter()
        .filter_map(|(k, _)| k.strip_suffix(".lora_A.weight"))
        .map(|k| k.trim_start_matches("base_model.model.").to_string())
        .collect();
    p.sort();
    p
}

/// Counts from peft 0.21.2 (`get_peft_model(LlamaForCausalLM fixture, LoraConfig(...))`,
/// `get_nb_trainable_parameters()`), and by hand: q_proj adds r·(64 + 64) = 512 and v_proj
/// r·(64 + 32) = 384 per layer at r = 4; the base has 115,008 parameters.
#[test]
fn layers_to_transform_adapts_only_the_named_layers_with_peft_counts() {
    let qv = json!(["q_proj", "v_proj"]);
    let layer = |i: usize| {
        vec![
            format!("model.layers.{i}.self_attn.q_proj"),
            format!("model.layers.{i}.self_attn.v_proj"),
        ]
    };
    let both: Vec<String> = layer(0).into_iter().chain(layer(1)).collect();
    let cases = [
        (
            "[1]",
            json!({"target_modules": qv, "layers_to_transform": [1]}),
            layer(1),
            896,
        ),
        (
            "0 (an integer)",
            json!({"target_modules": qv, "layers_to_transform": 0}),
            layer(0),
            896,
        ),
        (
            "[0, 1] in \"layers\"",
            json!({"target_modules": qv, "layers_to_transform": [0, 1], "layers_pattern": "layers"}),
            both.clone(),
            1792,
        ),
        (
            "[1] in [\"blocks\", \"layers\"]",
            json!({"target_modules": qv, "layers_to_transform": [1], "layers_pattern": ["blocks", "layers"]}),
            layer(1),
            896,
        ),
        // peft: an empty list selects no layer index, so every layer is adapted.
        (
            "[] (peft: every layer)",
            json!({"target_modules": qv, "layers_to_transform": []}),
            both.clone(),
            1792,
        ),
        (
            "[1] with layers_pattern [] (peft: any container)",
            json!({"target_modules": qv, "layers_to_transform": [1], "layers_pattern": []}),
            layer(1),
            896,
        ),
    ];
    for (what, options, paths, trainable) in cases {
        let (tuner, _, _) = fresh_lora(options, 0).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(adapted_paths(tuner.as_ref()), paths, "{what}");
        assert_eq!(
            ferrule::tuners::trainable_params(tuner.as_ref()),
            trainable,
            "{what}: trainable"
        );
        let base = ferrule::model::Model::build(
            &load_dir(&llama_dir()).unwrap(),
            Task::CausalLm,
            &Frozen,
            &Device::Cpu,
            0,
        )
        .unwrap()
        .base_params;
        assert_eq!(
            base, 115_008,
            "the fixture's parameters (peft's all_param minus the adapter)"
        );
        assert_eq!(
            ferrule::tuners::total_params(base, tuner.as_ref()),
            base + trainable,
            "{what}: total"
        );
    }
    // A container name the model does not have matches nothing: an error, as in peft.
    let err = format!(
        "{:#}",
        fresh_lora(
            json!({"target_modules": qv, "layers_to_transform": [1], "layers_pattern": "blocks"}),
            0
        )
        .err()
        .unwrap()
    );
    assert!(
        err.contains("matched no linear")
            && err.contains("layers_to_transform is [1], layers_pattern \"blocks\""),
        "{err}"
    );
    // peft refuses layers_to_transform with a regex target_modules (its saved config would
    // not load there).
    let err = format!(
        "{:#}",
        fresh_lora(
            json!({"target_modules": ".*\\.q_proj", "layers_to_transform": [1]}),
            0
        )
        .err()
        .unwrap()
    );
    assert!(
        err.contains("layers_to_transform") && err.contains("regex"),
        "{err}"
    );
    // "all-linear" is saved as a list of names, which peft loads with layers_to_transform.
    let (tuner, _, _) = fresh_lora(
        json!({"target_modules": "all-linear", "layers_to_transform": 0}),
        0,
    )
    .unwrap();
    assert_eq!(adapted_paths(tuner.as_ref()).len(), 7);
    assert!(adapted_paths(tuner.as_ref())
        .iter()
        .all(|p| p.starts_with("model.layers.0.")));
    // No layer 2 in a 2-layer model.
    assert!(fresh_lora(json!({"target_modules": qv, "layers_to_transform": [2]}), 0).is_err());
}

/// `(mean, std, fraction with |x| > 2·std_ref)` of the values.
fn moments(v: &[f32], std_ref: f64) -> (f64, f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let tail = v
        .iter()
        .filter(|&&x| (x as f64).abs() > 2.0 * std_ref)
        .count() as f64
        / n;
    (mean, var.sqrt(), tail)
}

fn factor_values(tuner: &dyn Tuner, suffix: &str) -> Vec<(String, Vec<f32>, Vec<usize>)> {
    tuner
        .trainable()
        .iter()
        .filter(|(k, _)| k.ends_with(suffix))
        .map(|(k, v)| {
            (
                k.clone(),
                values(v.as_tensor()),
                v.as_tensor().dims().to_vec(),
            )
        })
        .collect()
}

/// peft's `reset_lora_parameters`: with "gaussian", `normal_(lora_A, std=1/r)` and B zero.
#[test]
fn gaussian_init_draws_a_from_normal_with_std_one_over_r_and_zero_b() {
    let r = 8usize;
    let (tuner, src, logits) = fresh_lora(json!({"r": r, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": "gaussian"}), 7).unwrap();
    let a: Vec<f32> = factor_values(tuner.as_ref(), ".lora_A.weight")
        .into_iter()
        .flat_map(|(_, v, _)| v)
        .collect();
    let n = a.len() as f64;
    assert_eq!(
        n as usize,
        2 * r * (6 * 64 + 128),
        "A of 14 modules, in = 64 (128 for down_proj)"
    );
    let sigma = 1.0 / r as f64;
    let (mean, std, tail) = moments(&a, sigma);
    // Standard errors under N(0, σ²): mean σ/√n, sample std ≈ σ/√(2n); 5 of them each (the
    // draw is seeded, so this is a fixed check, with a false-failure rate under 1e-6 over seeds).
    assert!(mean.abs() < 5.0 * sigma / n.sqrt(), "mean {mean}");
    assert!(
        (std - sigma).abs() < 5.0 * sigma / (2.0 * n).sqrt(),
        "std {std}, expected {sigma} (n = {n})"
    );
    // Normal, not uniform of the same std: P(|x| > 2σ) = 0.0455 (a uniform has none there).
    let p = 0.0455;
    assert!(
        (tail - p).abs() < 5.0 * (p * (1.0 - p) / n).sqrt(),
        "tail fraction {tail}"
    );
    for (k, b, _) in factor_values(tuner.as_ref(), ".lora_B.weight") {
        assert!(b.iter().all(|&x| x == 0.0), "{k} is not zero");
    }
    // B = 0: the adapter leaves the logits as they are.
    let base = decoder_logits(&src, &Frozen);
    assert!(max_diff(&logits, &base) < 1e-6);
}

/// peft's `init_lora_weights=False` skips `reset_lora_parameters`, so both factors keep
/// `nn.Linear`'s init, `kaiming_uniform_(a=√5)`: U(−1/√fan_in, 1/√fan_in), fan_in = in for
/// A `[r, in]` and r for B `[out, r]`. The adapter then changes the logits at step 0.
#[test]
fn init_false_makes_b_random_like_a_and_changes_the_logits() {
    let r = 8usize;
    let opts = |init: serde_json::Value| json!({"r": r, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": init});
    let (tuner, src, logits) = fresh_lora(opts(json!(false)), 7).unwrap();
    let base = decoder_logits(&src, &Frozen);
    let changed = max_diff(&logits, &base);
    assert!(
        changed > 1e-2,
        "init_lora_weights=false left the logits within {changed} of the base"
    );
    let (_, _, default_logits) = fresh_lora(opts(json!(true)), 7).unwrap();
    assert!(
        max_diff(&default_logits, &base) < 1e-6,
        "the default init (B = 0) must be a no-op"
    );

    for (suffix, fan_in_of) in [(".lora_A.weight", 1usize), (".lora_B.weight", 1usize)] {
        let mut pooled = Vec::new();
        for (k, v, dims) in factor_values(tuner.as_ref(), suffix) {
            let bound = 1.0 / (dims[fan_in_of] as f64).sqrt();
            assert!(
                v.iter().all(|&x| (x as f64).abs() <= bound * (1.0 + 1e-6)),
                "{k}: a value outside ±{bound}"
            );
            assert!(v.iter().any(|&x| x != 0.0), "{k} is zero");
            pooled.extend(v.iter().map(|&x| x as f64 / bound)); // U(−1, 1) when right
        }
        // U(−1, 1): std 1/√3; the sample std's standard error is 1/√(15 n).
        let n = pooled.len() as f64;
        let f: Vec<f32> = pooled.iter().map(|&x| x as f32).collect();
        let (mean, std, _) = moments(&f, 1.0);
        assert!(mean.abs() < 5.0 / (3.0 * n).sqrt(), "{suffix}: mean {mean}");
        assert!(
            (std - 1.0 / 3f64.sqrt()).abs() < 5.0 / (15.0 * n).sqrt(),
            "{suffix}: std/bound {std}, expected {}",
            1.0 / 3f64.sqrt()
        );
    }
}

// ------------------------------------------------------------------------------------------
// Refused pickles
// ------------------------------------------------------------------------------------------

#[test]
fn pytorch_model_bin_and_adapter_model_bin_are_refused_unread() {
    let t = tempfile::tempdir().unwrap();
    // A pickle's first bytes (protocol 2); ferrule must refuse before reading it.
    let pickle = b"\x80\x02}q\x00(X\x05\x00\x00\x00torchq\x01.";
    for (what, file) in [
        ("single", "pytorch_model.bin"),
        ("sharded", "pytorch_model.bin.index.json"),
    ] {
        let dir = t.path().join(what);
        copy_without_weights(&dir);
        std::fs::write(dir.join(file), pickle).unwrap();
        let err = format!(
            "{:#}",
            load_dir(&dir)
                .err()
                .expect("a pickle-only folder must be refused")
        );
        assert!(
            err.contains(&dir.display().to_string()) && err.contains(file),
            "{what}: {err}"
        );
        assert!(
            err.contains("pickle") && err.contains("Convert it to safetensors"),
            "{what}: {err}"
        );
    }
    // Beside model.safetensors, a pickle is ignored: the folder loads its safetensors.
    let dir = t.path().join("both");
    copy_without_weights(&dir);
    std::fs::copy(
        llama_dir().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), pickle).unwrap();
    assert_eq!(load_dir(&dir).unwrap().weights.tensors().len(), 21);

    // A PEFT adapter saved as a pickle.
    let adir = t.path().join("adapter");
    std::fs::create_dir(&adir).unwrap();
    std::fs::copy(
        fixtures().join("adapters/llama_lora/adapter_config.json"),
        adir.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(adir.join("adapter_model.bin"), pickle).unwrap();
    let err = format!(
        "{:#}",
        ferrule::peft_io::load_adapter(&adir, &Device::Cpu)
            .err()
            .expect("adapter_model.bin must be refused")
    );
    assert!(
        err.contains(&adir.display().to_string())
            && err.contains("adapter_model.bin")
            && err.contains("pickle"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------
// QLoRA with FP4
// ------------------------------------------------------------------------------------------

/// bitsandbytes' FP4 values by code (`dDequantizeFP4Tree` in csrc/kernels.cu: sign bit 3,
/// then 0, 0.0625, 8, 12, 4, 6, 2, 3 divided by 12).
const BNB_FP4_F64: [f64; 16] = [
    0.0,
    5.208333333e-03,
    0.66666667,
    1.0,
    0.33333333,
    0.5,
    0.16666667,
    0.25,
    -0.0,
    -5.208333333e-03,
    -0.66666667,
    -1.0,
    -0.33333333,
    -0.5,
    -0.16666667,
    -0.25,
];

#[test]
fn the_fp4_base_holds_bitsandbytes_fp4_values_times_the_block_absmax() {
    let spec = QuantSpec::new(QuantMethod::Fp4, 64, false).unwrap();
    let dense = load_dir(&llama_dir()).unwrap();
    let q = ModelSource::load_with(
        llama_dir().to_str().unwrap(),
        &Device::Cpu,
        LoadOptions::quantized(Some(&spec)),
    )
    .unwrap();
    let fp4: Vec<_> = q
        .weights
        .quantized()
        .iter()
        .filter(|(_, m)| m.format().starts_with("fp4"))
        .collect();
    assert_eq!(
        fp4.len(),
        14,
        "every linear layer but the head: {:?}",
        q.weights.quantized().keys().collect::<Vec<_>>()
    );
    let codes: Vec<f32> = BNB_FP4_F64.iter().map(|&c| c as f32).collect();
    let mut sorted = codes.clone();
    sorted.sort_by(f32::total_cmp);
    let half_gap = sorted.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0; // (1 − 2/3) / 2
    let mut worst_rel = 0f32;
    for (name, m) in fp4 {
        let w = values(&dense.weights.tensors()[name]);
        let d = m.dequantize();
        assert_eq!(w.len(), d.len());
        // bitsandbytes blocks the flattened tensor; each block's absmax is max |w|.
        for (b, (wb, db)) in w.chunks(64).zip(d.chunks(64)).enumerate() {
            let absmax = wb.iter().fold(0f32, |a, &x| a.max(x.abs()));
            for (&x, &y) in wb.iter().zip(db) {
                // y is a codebook value times absmax, and the nearest one to x / absmax.
                let code = codes
                    .iter()
                    .map(|&c| c * absmax)
                    .min_by(|a, b| (a - y).abs().total_cmp(&(b - y).abs()))
                    .unwrap();
                assert!(
                    (code - y).abs() <= 1e-6 * absmax,
                    "{name} block {b}: {y} is not a FP4 code times {absmax}"
                );
                let best = codes
                    .iter()
                    .map(|&c| (c * absmax - x).abs())
                    .fold(f32::INFINITY, f32::min);
                assert!(
                    (y - x).abs() <= best + 1e-6 * absmax,
                    "{name} block {b}: {x} went to {y}, not its nearest FP4 value"
                );
                assert!(
                    (y - x).abs() <= half_gap * absmax * (1.0 + 1e-6),
                    "{name}: error over half the widest FP4 gap"
                );
                worst_rel = worst_rel.max((y - x).abs() / absmax);
            }
            assert!(
                db.iter().any(|&y| y.abs() == absmax),
                "{name} block {b}: the absmax element is not exact"
            );
        }
    }
    // 4-bit: the error is real (Gaussian-ish weights leave values near a gap's midpoint).
    assert!(
        worst_rel > 0.1,
        "largest relative error {worst_rel}: not 4-bit"
    );
}

fn fp4_train_config(model: &Path, out: &Path, quantize: Option<QuantSpec>) -> TrainConfig {
    TrainConfig {
        model: model.display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.to_path_buf(),
        adapter: Some(AdapterConfig::from_json(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"})).unwrap()),
        max_len: Some(64),
        // The whole file (24 records) every step, so the losses are of the same batch.
        batch_size: Some(24),
        max_steps: Some(6),
        lr: 3e-2,
        seed: 11,
        quantize,
        // Compared bit for bit with the dequantized f32 base, and by bytes with the f32 one.
        compute_dtype: ferrule::ops::ComputeDtypeChoice::F32,
        ..Default::default()
    }
}

/// `--quantize fp4`: the loss of one fixed batch falls over 6 steps, and the run equals training on the f32 model
/// whose linear weights are the FP4 ones dequantized (so the FP4 base is what trained).
#[test]
fn lora_trains_through_an_fp4_base() {
    let spec = QuantSpec::new(QuantMethod::Fp4, 64, false).unwrap();
    let t = tempfile::tempdir().unwrap();
    let q = ModelSource::load_with(
        llama_dir().to_str().unwrap(),
        &Device::Cpu,
        LoadOptions::quantized(Some(&spec)),
    )
    .unwrap();
    let mut raw = BTreeMap::new();
    for (name, tensor) in &q.weights.tensors() {
        raw.insert(
            name.clone(),
            ferrule::util::atomic::raw_tensor(name, tensor).unwrap(),
        );
    }
    for (name, m) in q.weights.quantized() {
        let (r, c) = m.dims();
        raw.insert(name.clone(), RawTensor::f32s(vec![r, c], &m.dequantize()));
    }
    let dequantized = t.path().join("dequantized");
    let mut cfg = q.config.clone();
    cfg.as_object_mut().unwrap().remove("quantization_config");
    ferrule::export::write_model_folder(&q, &dequantized, &cfg, &raw).unwrap();

    let (qa, da, fa) = (t.path().join("q"), t.path().join("d"), t.path().join("f32"));
    let sq = train(
        &fp4_train_config(&llama_dir(), &qa, Some(spec)),
        &Device::Cpu,
        &mut Silent,
        &RunOptions::default(),
    )
    .unwrap();
    train(
        &fp4_train_config(&dequantized, &da, None),
        &Device::Cpu,
        &mut Silent,
        &RunOptions::default(),
    )
    .unwrap();
    let sf = train(
        &fp4_train_config(&llama_dir(), &fa, None),
        &Device::Cpu,
        &mut Silent,
        &RunOptions::default(),
    )
    .unwrap();
    assert!(sq.completed && sq.steps == 6);
    // 4-bit linear weights plus bf16 embedding and head: under a third of the f32 bytes.
    assert!(
        3 * sq.base_weight_bytes < sf.base_weight_bytes,
        "base held in {} bytes against {} in f32",
        sq.base_weight_bytes,
        sf.base_weight_bytes
    );
    let losses = |d: &Path| -> Vec<f64> {
        ferrule::train::metrics::read_metrics(&d.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .filter_map(|m| m.get("loss").and_then(|v| v.as_f64()))
            .collect()
    };
    let (lq, ld, lf) = (losses(&qa), losses(&da), losses(&fa));
    assert_eq!(lq.len(), 6);
    assert!(lq[5] < 0.8 * lq[0], "loss did not fall: {lq:?}");
    for (a, b) in lq.iter().zip(&ld) {
        assert!(
            (a - b).abs() < 1e-5,
            "FP4 run {lq:?} vs its dequantized weights {ld:?}"
        );
    }
    // And the FP4 base is not the f32 one: the first losses differ.
    assert!(
        (lq[0] - lf[0]).abs() > 1e-4,
        "FP4 loss {} equals the f32 model's {}",
        lq[0],
        lf[0]
    );
    let adapter = |d: &Path| -> HashMap<String, Tensor> {
        ferrule::model::weights::load_safetensors_file(
            &d.join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
    };
    let (aq, ad) = (adapter(&qa), adapter(&da));
    assert_eq!(aq.len(), 28);
    for (k, v) in &aq {
        assert!(max_diff(v, &ad[k]) < 1e-5, "{k}");
    }
}
