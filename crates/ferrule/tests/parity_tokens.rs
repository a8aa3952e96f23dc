//! Trainable token rows (LoRA's `trainable_token_indices`, and peft's standalone
//! `TRAINABLE_TOKENS` method) against adapters Python peft saved
//! (tests/fixtures/tokens, made by make_token_fixtures.py): tokens added to the tokenizer,
//! the embeddings resized as ferrule resizes them, and only the listed rows trained. Loading
//! reproduces peft's logits, gradients, parameter counts and saved keys; a merged folder
//! reproduces the adapter; bad indices fail naming the index and the table's size.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use ferrule::model::{Arch, Inputs, Model, ModelSource, Task};
use ferrule::ops::recompute::GradSink;
use ferrule::peft_io::{load_adapter, save_adapter};
use ferrule::tuners::{AdapterConfig, BuildContext, Tuner};

struct Case {
    name: &'static str,
    model: &'static str,
    /// The tokenizer's size after the tokens were added (None: no tokens added).
    rows: Option<usize>,
}

const CASES: &[Case] = &[
    Case {
        name: "smollm_lora_tokens_resized",
        model: "smollm",
        rows: Some(324),
    },
    Case {
        name: "llama_lora_tokens_resized_untied",
        model: "llama",
        rows: Some(322),
    },
    Case {
        name: "smollm_lora_tokens",
        model: "smollm",
        rows: None,
    },
    Case {
        name: "smollm_trainable_tokens_resized",
        model: "smollm",
        rows: Some(323),
    },
    Case {
        name: "smollm_trainable_tokens",
        model: "smollm",
        rows: None,
    },
];

/// A copy of the fixture model `model` whose tokenizer.json holds tokens with ids 320..rows
/// (the fixtures' embeddings have 320 rows).
fn model_with_added_tokens(model: &str, rows: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("models").join(model)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for id in 320..rows {
        tok["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": id, "content": format!("<|new_{id}|>"), "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true
            }));
    }
    std::fs::write(&path, tok.to_string()).unwrap();
    dir
}

/// The case's base: the fixture model, with added tokens and resized embeddings where the case
/// has them. The folder lives as long as the returned guard.
fn source(case: &Case) -> (ModelSource, Option<tempfile::TempDir>) {
    let dev = Device::Cpu;
    match case.rows {
        Some(rows) => {
            let dir = model_with_added_tokens(case.model, rows);
            let src =
                ModelSource::load_with(dir.path().to_str().unwrap(), &dev, resized()).unwrap();
            (src, Some(dir))
        }
        None => {
            let path = fixtures().join("models").join(case.model);
            (
                ModelSource::load(path.to_str().unwrap(), &dev).unwrap(),
                None,
            )
        }
    }
}

fn case_dir(case: &Case) -> std::path::PathBuf {
    fixtures().join("tokens").join(case.name)
}

struct Built {
    model: Model,
    tuner: Box<dyn Tuner>,
    src: ModelSource,
    _dir: Option<tempfile::TempDir>,
}

/// The case's model with peft's saved adapter attached.
fn build(case: &Case) -> Built {
    let dev = Device::Cpu;
    let (src, dir) = source(case);
    let saved = load_adapter(&case_dir(case), &dev).unwrap();
    let tuner = saved.into_tuner(0, &dev).unwrap();
    let model = Model::build(&src, Task::CausalLm, tuner.as_ref(), &dev, 0).unwrap();
    tuner.finish().unwrap();
    Built {
        model,
        tuner,
        src,
        _dir: dir,
    }
}

fn inputs(case: &Case) -> HashMap<String, Tensor> {
    load(&format!("tokens/{}/inputs.safetensors", case.name))
}

fn forward(model: &Model, inp: &HashMap<String, Tensor>) -> Tensor {
    model
        .forward(&Inputs {
            input_ids: &inp["input_ids"],
            attention_mask: Some(&inp["attention_mask"]),
            token_type_ids: None,
        })
        .unwrap()
}

fn keys_json(case: &Case) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("keys.json")).unwrap())
        .unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

#[test]
fn resizing_adds_mean_rows_as_the_fixture_base_has() {
    for case in CASES.iter().filter(|c| c.rows.is_some()) {
        let (src, _dir) = source(case);
        let rows = case.rows.unwrap();
        assert_eq!(src.config["vocab_size"], rows, "{}", case.name);
        let added = load(&format!("tokens/{}/added_rows.safetensors", case.name));
        for (name, want) in &added {
            let table = &src.weights.tensors()[name];
            assert_eq!(table.dims(), [rows, 64], "{}: {name}", case.name);
            let got = table.narrow(0, 320, rows - 320).unwrap();
            let d = max_diff(&got, want);
            assert!(d < 1e-6, "{}: {name}: added rows differ by {d}", case.name);
        }
    }
}

#[test]
fn peft_adapters_reproduce_peft_logits_gradients_and_counts() {
    for case in CASES {
        let b = build(case);
        let inp = inputs(case);
        let want = &load(&format!("tokens/{}/logits.safetensors", case.name))["logits"];
        let got = forward(&b.model, &inp);
        let d = max_diff_masked(&got, want, Some(&inp["attention_mask"]));
        assert!(d < 1e-4, "{}: max |Δlogits| = {d}", case.name);

        for recompute in [false, true] {
            check_gradients(case, recompute);
        }

        let counts = keys_json(case);
        let n = ferrule::tuners::trainable_params(b.tuner.as_ref());
        assert_eq!(
            n as u64,
            counts["trainable_count"].as_u64().unwrap(),
            "{}",
            case.name
        );
        let total = ferrule::tuners::total_params(b.model.base_params, b.tuner.as_ref());
        assert_eq!(
            total as u64,
            counts["total_count"].as_u64().unwrap(),
            "{}",
            case.name
        );
    }
}

/// The loss and every trainable tensor's gradient equal peft's, with or without recomputation
/// of the decoder layers.
fn check_gradients(case: &Case, recompute: bool) {
    let b = build(case);
    let inp = inputs(case);
    let exp = load(&format!("tokens/{}/grads.safetensors", case.name));
    let trainable = b.tuner.trainable();
    let sink = recompute.then(|| {
        std::sync::Arc::new(GradSink::new(
            trainable.iter().map(|(_, v)| v.as_tensor().id()),
        ))
    });
    assert_eq!(b.model.set_recompute(sink.clone()), recompute);
    let Arch::Decoder(lm) = &b.model.arch else {
        panic!("a decoder")
    };
    let (loss, _) = lm
        .causal_lm_loss(
            &inp["input_ids"],
            Some(&inp["attention_mask"]),
            None,
            &inp["labels"],
        )
        .unwrap();
    let want_loss = scalar(&exp["loss"]);
    assert!(
        (scalar(&loss) - want_loss).abs() < 1e-4,
        "{}: loss {} vs {want_loss}",
        case.name,
        scalar(&loss)
    );
    let mut grads = loss.backward().unwrap();
    if let Some(s) = &sink {
        s.drain_into(&mut grads).unwrap();
    }
    assert_eq!(
        trainable.len() + 1,
        exp.len(),
        "{}: same tensors",
        case.name
    );
    for (key, var) in &trainable {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{key}: no gradient"));
        let d = max_diff(g, &exp[key]);
        assert!(
            d < 1e-5,
            "{} (recompute {recompute}): {key}: max |Δgrad| = {d}",
            case.name
        );
    }
}

/// The delta's gradient from the loss: the padding token's row gets none from the lookup but
/// one from the tied head, the other listed rows both.
#[test]
fn a_listed_padding_token_trains_through_the_tied_head_only() {
    let case = &CASES[0];
    let exp = load(&format!("tokens/{}/grads.safetensors", case.name));
    let key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
    let rows: Vec<Vec<f32>> = exp[key].to_vec2().unwrap();
    assert!(
        rows.iter().all(|r| r.iter().any(|v| *v != 0.0)),
        "every listed row has a gradient"
    );
}

/// A fresh adapter from the same config saves what peft saved: the same keys and shapes
/// (the whole tables after a resize), and the trained rows start as the table's rows.
#[test]
fn a_fresh_adapter_saves_the_keys_peft_saves() {
    let dev = Device::Cpu;
    for case in CASES {
        let (src, _dir) = source(case);
        let saved = load_adapter(&case_dir(case), &dev).unwrap();
        let config = saved.adapter_config().unwrap();
        let tuned = ferrule::adapted::attach(&src, Task::CausalLm, &config, ctx(&dev)).unwrap();
        let ours: HashMap<String, Vec<usize>> = tuned
            .tuner
            .saved_tensors()
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.dims().to_vec()))
            .collect();
        let theirs: HashMap<String, Vec<usize>> =
            serde_json::from_value(keys_json(case)["saved"].clone()).unwrap();
        assert_eq!(ours, theirs, "{}", case.name);
        // peft fills the standalone method's target_modules in with the embedding's path.
        let config = tuned.tuner.config_json().unwrap();
        let targets = &saved.config["target_modules"];
        if saved.peft_type() == "TRAINABLE_TOKENS" {
            assert_eq!(&config["target_modules"], targets, "{}", case.name);
        }

        let (_, delta) = tuned
            .tuner
            .trainable()
            .into_iter()
            .find(|(k, _)| k.contains("embed_tokens") && k.ends_with("trainable_tokens_delta"))
            .unwrap();
        let ids = match (
            &saved.config["trainable_token_indices"],
            &saved.config["token_indices"],
        ) {
            (serde_json::Value::Array(ids), _) | (_, serde_json::Value::Array(ids)) => ids.clone(),
            (other, _) => other["embed_tokens"].as_array().unwrap().clone(),
        };
        let ids: Vec<u32> = ids.iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let table = &src.weights.tensors()["model.embed_tokens.weight"];
        let rows = table
            .index_select(&Tensor::new(ids.as_slice(), &dev).unwrap(), 0)
            .unwrap();
        assert_eq!(max_diff(delta.as_tensor(), &rows), 0.0, "{}", case.name);
    }
}

fn ctx(dev: &Device) -> BuildContext<'_> {
    BuildContext::fresh(dev)
}

#[test]
fn save_then_load_keeps_the_bytes_peft_wrote() {
    for case in CASES {
        let b = build(case);
        let tmp = tempfile::tempdir().unwrap();
        save_adapter(tmp.path(), b.tuner.as_ref(), Task::CausalLm, "base").unwrap();
        let read = |p: &Path| std::fs::read(p.join("adapter_model.safetensors")).unwrap();
        let (peft, ours) = (read(&case_dir(case)), read(tmp.path()));
        let (a, o) = (
            safetensors::SafeTensors::deserialize(&peft).unwrap(),
            safetensors::SafeTensors::deserialize(&ours).unwrap(),
        );
        let mut ka: Vec<&str> = a.names();
        let mut ko: Vec<&str> = o.names();
        ka.sort();
        ko.sort();
        assert_eq!(ka, ko, "{}", case.name);
        for k in ka {
            assert_eq!(
                a.tensor(k).unwrap().data(),
                o.tensor(k).unwrap().data(),
                "{}: {k}",
                case.name
            );
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let theirs = load_adapter(&case_dir(case), &Device::Cpu).unwrap().config;
        for key in [
            "peft_type",
            "trainable_token_indices",
            "token_indices",
            "init_weights",
        ] {
            assert_eq!(cfg.get(key), theirs.get(key), "{}: {key}", case.name);
        }
    }
}

#[test]
fn merged_folders_reproduce_the_adapter() {
    let dev = Device::Cpu;
    for case in CASES {
        let b = build(case);
        let inp = inputs(case);
        let want = forward(&b.model, &inp);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        ferrule::merge::merge_to_dir(&b.src, b.tuner.as_ref(), Task::CausalLm, &out).unwrap();
        let merged_src = ModelSource::load(out.to_str().unwrap(), &dev).unwrap();
        let merged = Model::build(
            &merged_src,
            Task::CausalLm,
            &ferrule::model::Frozen,
            &dev,
            0,
        )
        .unwrap();
        let d = max_diff_masked(&forward(&merged, &inp), &want, Some(&inp["attention_mask"]));
        assert!(d < 1e-4, "{}: merged vs adapter max diff {d}", case.name);
    }
}

fn lora_with(tokens: serde_json::Value, extra: &[(&str, serde_json::Value)]) -> AdapterConfig {
    let mut options = serde_json::Map::new();
    options.insert("target_modules".into(), serde_json::json!(["q_proj"]));
    options.insert("trainable_token_indices".into(), tokens);
    for (k, v) in extra {
        options.insert(k.to_string(), v.clone());
    }
    AdapterConfig::new("LORA", options)
}

fn attach_error(src: &ModelSource, config: AdapterConfig) -> String {
    let dev = Device::Cpu;
    match ferrule::adapted::attach(src, Task::CausalLm, &config, ctx(&dev)) {
        Ok(_) => panic!("attached"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_indices_are_refused_by_name() {
    let llama = fixtures().join("models/llama");
    let src = ModelSource::load(llama.to_str().unwrap(), &Device::Cpu).unwrap();
    let e = attach_error(&src, lora_with(serde_json::json!([3, 320]), &[]));
    assert!(
        e.contains("token id 320") && e.contains("320 rows of model.embed_tokens"),
        "{e}"
    );
    assert!(e.contains("--resize-token-embeddings"), "{e}");
    let e = attach_error(&src, lora_with(serde_json::json!([3, 7, 3]), &[]));
    assert!(
        e.contains("trainable_token_indices") && e.contains("token id 3 twice"),
        "{e}"
    );
    let e = attach_error(&src, lora_with(serde_json::json!([]), &[]));
    assert!(e.contains("lists no token id"), "{e}");
    let e = attach_error(&src, lora_with(serde_json::json!({"embedding": [3]}), &[]));
    assert!(
        e.contains("[\"embedding\"] matched no token embedding"),
        "{e}"
    );
    let e = attach_error(&src, lora_with(serde_json::json!({"k_proj": [3]}), &[]));
    assert!(
        e.contains("k_proj is no token embedding or output head"),
        "{e}"
    );
    let both = [("modules_to_save", serde_json::json!(["embed_tokens"]))];
    let e = attach_error(&src, lora_with(serde_json::json!([3]), &both));
    assert!(
        e.contains("modules_to_save") && e.contains("trainable_token_indices"),
        "{e}"
    );
    let targeted = [(
        "target_modules",
        serde_json::json!(["q_proj", "embed_tokens"]),
    )];
    let e = attach_error(&src, lora_with(serde_json::json!([3]), &targeted));
    assert!(e.contains("model.embed_tokens is in target_modules"), "{e}");

    // The standalone method: its ids and targets are checked alike.
    let standalone = |options: serde_json::Value| {
        AdapterConfig::new("TRAINABLE_TOKENS", options.as_object().unwrap().clone())
    };
    let e = attach_error(
        &src,
        standalone(serde_json::json!({"token_indices": [400]})),
    );
    assert!(e.contains("token id 400 is past the 320 rows"), "{e}");
    let e = attach_error(&src, standalone(serde_json::json!({"token_indices": []})));
    assert!(e.contains("token_indices lists no token id"), "{e}");
    let e = attach_error(
        &src,
        standalone(serde_json::json!({"token_indices": [3], "target_modules": ["k_proj"]})),
    );
    assert!(
        e.contains("k_proj is no token embedding or output head"),
        "{e}"
    );
    let e = attach_error(
        &src,
        standalone(serde_json::json!({"token_indices": [3], "target_modules": ["nope"]})),
    );
    assert!(
        e.contains("target_modules matched no token embedding"),
        "{e}"
    );

    // Past the resized table: the size named is the resized one, without the resize hint.
    let (resized, _dir) = source(&CASES[1]);
    let e = attach_error(&resized, lora_with(serde_json::json!([322]), &[]));
    assert!(e.contains("token id 322 is past the 322 rows"), "{e}");
    assert!(!e.contains("--resize-token-embeddings"), "{e}");
}

/// An adapter trained on a resized embedding does not load on a base of another size.
#[test]
fn a_resized_adapter_on_a_base_of_another_size_names_both() {
    let dev = Device::Cpu;
    let dir = model_with_added_tokens("smollm", 322);
    let src = ModelSource::load_with(dir.path().to_str().unwrap(), &dev, resized()).unwrap();
    let saved = load_adapter(&case_dir(&CASES[0]), &dev).unwrap();
    let tuner = saved.into_tuner(0, &dev).unwrap();
    let e = match Model::build(&src, Task::CausalLm, tuner.as_ref(), &dev, 0) {
        Ok(_) => panic!("built"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("[324, 64]") && e.contains("[322, 64]"), "{e}");
}

/// Loading that grows the token embeddings to the tokenizer.
fn resized() -> ferrule::model::LoadOptions<'static> {
    ferrule::model::LoadOptions {
        resize_token_embeddings: true,
        ..Default::default()
    }
}
