//! Several adapters on one base (tests/fixtures/multi_adapter, made by
//! make_multi_adapter_fixtures.py with peft 0.21): PEFT's several-adapter folder layout, the
//! active adapter, weighted sums against peft's `add_weighted_adapter` and several active
//! adapters, generation through a weighted sum, and the selections that must fail.

mod common;

use ferrule::model::LoadOptions;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::*;
use ferrule::adapted::{AdaptedModel, AdapterSource, Selection};
use ferrule::generate::{generate, SamplingOptions};
use ferrule::model::{Arch, Inputs};

fn llama() -> String {
    fixtures().join("models/llama").display().to_string()
}

fn multi(rel: &str) -> PathBuf {
    fixtures().join("multi_adapter").join(rel)
}

fn src(dir: &Path) -> AdapterSource {
    AdapterSource {
        name: None,
        dir: dir.to_path_buf(),
    }
}

fn weights(list: &[(&str, f64)]) -> Selection {
    Selection::Weighted(list.iter().map(|(n, w)| (n.to_string(), *w)).collect())
}

fn try_load(adapters: &[AdapterSource], sel: &Selection) -> anyhow::Result<AdaptedModel> {
    AdaptedModel::load_adapters(
        &llama(),
        adapters,
        sel,
        None,
        &Device::Cpu,
        LoadOptions::default(),
    )
}

fn logits(m: &AdaptedModel) -> Tensor {
    let t = load("inputs/decoder.safetensors");
    m.model
        .forward(&Inputs {
            input_ids: &t["input_ids"],
            attention_mask: t.get("attention_mask"),
            token_type_ids: None,
        })
        .unwrap()
}

/// Max difference from peft's `key` logits over the real (unpadded) positions.
fn diff_from_peft(m: &AdaptedModel, key: &str) -> f32 {
    let reference = load("multi_adapter/logits.safetensors");
    let mask = load("inputs/decoder.safetensors")["attention_mask"].clone();
    max_diff_masked(&logits(m), &reference[key], Some(&mask))
}

fn err(adapters: &[AdapterSource], sel: &Selection) -> String {
    format!(
        "{:#}",
        try_load(adapters, sel).err().expect("must not load")
    )
}

#[test]
fn peft_layout_offers_each_adapter_by_name() {
    let layout = [src(&multi("peft_layout"))];
    for name in ["default", "other"] {
        let m = try_load(&layout, &Selection::Active(name.into())).unwrap();
        assert_eq!(
            m.adapters
                .iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>(),
            ["default", "other"]
        );
        assert_eq!(m.active, name);
        let d = diff_from_peft(&m, name);
        assert!(d <= 1e-4, "{name}: {d}");
    }
    // The two differ, so each selection really picked its own adapter.
    let reference = load("multi_adapter/logits.safetensors");
    assert!(max_diff_masked(&reference["default"], &reference["other"], None) > 1e-2);
}

#[test]
fn weighted_lora_sum_equals_peft_cat_and_several_active_adapters() {
    let layout = [src(&multi("peft_layout"))];
    let m = try_load(&layout, &weights(&[("default", 0.7), ("other", -0.4)])).unwrap();
    assert_eq!(m.active, "default×0.7 + other×-0.4");
    let d = diff_from_peft(&m, "cat_0.7_-0.4");
    assert!(d <= 1e-4, "add_weighted_adapter cat: {d}");
    let m = try_load(&layout, &weights(&[("default", 1.0), ("other", 1.0)])).unwrap();
    let d = diff_from_peft(&m, "both_active");
    assert!(d <= 1e-4, "set_adapter([default, other]): {d}");
    // Trainable counts add up over members (r=4 on q, v and r=2 on v, o, down of 2 layers).
    let one = |n: &str| {
        try_load(&layout, &Selection::Active(n.into()))
            .unwrap()
            .trainable_params()
    };
    assert_eq!(m.trainable_params(), one("default") + one("other"));
}

#[test]
fn weighted_ia3_sum_equals_peft_when_weights_sum_to_one() {
    let m = try_load(
        &[src(&multi("ia3_a")), src(&multi("ia3_b"))],
        &weights(&[("ia3_a", 0.25), ("ia3_b", 0.75)]),
    )
    .unwrap();
    let d = diff_from_peft(&m, "ia3_0.25_0.75");
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn a_zero_weight_removes_the_adapter_across_methods() {
    // LoRA with IA3 (peft cannot combine these): weight 0 on one leaves the other alone, and
    // all-zero weights give the base model.
    let both = [
        AdapterSource::parse(&format!("lora={}", multi("peft_layout/other").display())),
        src(&multi("ia3_a")),
    ];
    let lora_only = try_load(&both, &weights(&[("lora", 1.0), ("ia3_a", 0.0)])).unwrap();
    assert!(diff_from_peft(&lora_only, "other") <= 1e-4);
    let none = try_load(&both, &weights(&[("lora", 0.0), ("ia3_a", 0.0)])).unwrap();
    let base = try_load(&[], &Selection::Only).unwrap();
    assert!(max_diff_masked(&logits(&none), &logits(&base), None) <= 1e-5);
    let mixed = try_load(&both, &weights(&[("lora", 0.5), ("ia3_a", 0.5)])).unwrap();
    assert!(max_diff_masked(&logits(&mixed), &logits(&lora_only), None) > 1e-3);
    assert!(max_diff_masked(&logits(&mixed), &logits(&base), None) > 1e-3);
}

#[test]
fn generation_through_a_weighted_sum_follows_its_logits() {
    let m = try_load(
        &[src(&multi("peft_layout"))],
        &weights(&[("default", 0.7), ("other", -0.4)]),
    )
    .unwrap();
    let Arch::Decoder(lm) = &m.model.arch else {
        panic!("decoder expected")
    };
    let prompt = [5u32, 17, 42, 9];
    let opts = SamplingOptions {
        max_new_tokens: 5,
        ..Default::default()
    };
    let cached = generate(lm, &prompt, &opts, |_| {}).unwrap();
    // The same greedy tokens from full forward passes, no cache.
    let mut ids = prompt.to_vec();
    for _ in 0..opts.max_new_tokens {
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let l = m
            .model
            .forward(&Inputs {
                input_ids: &x,
                attention_mask: None,
                token_type_ids: None,
            })
            .unwrap();
        let last = l.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
        ids.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    assert_eq!(cached, ids[prompt.len()..]);
}

#[test]
fn several_adapters_without_a_choice_fail_and_list_them() {
    let e = err(&[src(&multi("peft_layout"))], &Selection::Only);
    assert!(
        e.contains("2 adapters loaded: default")
            && e.contains("other (")
            && e.contains("--active-adapter"),
        "{e}"
    );
    let e = err(&[src(&multi("ia3_a"))], &Selection::Active("ia3_x".into()));
    assert!(
        e.contains("no adapter named \"ia3_x\"") && e.contains("ia3_a ("),
        "{e}"
    );
    let e = err(&[], &Selection::Active("a".into()));
    assert!(e.contains("no --adapter was given"), "{e}");
    let e = err(
        &[src(&multi("ia3_a")), src(&multi("ia3_a"))],
        &Selection::Only,
    );
    assert!(
        e.contains("two adapters are named \"ia3_a\"") && e.contains("NAME=DIR"),
        "{e}"
    );
    let e = err(
        &[AdapterSource::parse(&format!(
            "x={}",
            multi("peft_layout").display()
        ))],
        &Selection::Only,
    );
    assert!(e.contains("holds 2 adapters (default, other)"), "{e}");
    let e = err(
        &[src(&multi("ia3_a"))],
        &weights(&[("ia3_a", 1.0), ("ia3_a", 0.5)]),
    );
    assert!(e.contains("names \"ia3_a\" twice"), "{e}");
    let e = err(&[src(&fixtures().join("multi_adapter"))], &Selection::Only);
    // The fixture folder itself: three adapter subfolders, no root adapter.
    assert!(
        e.contains("3 adapters loaded: ia3_a (") && e.contains("peft_layout ("),
        "{e}"
    );
}

#[test]
fn weighted_sums_refuse_what_cannot_be_summed() {
    let methods = |n: &str| src(&fixtures().join("methods").join(n));
    let e = err(
        &[methods("llama_prompt_tuning"), src(&multi("ia3_a"))],
        &weights(&[("llama_prompt_tuning", 1.0), ("ia3_a", 0.5)]),
    );
    assert!(
        e.contains("llama_prompt_tuning (PROMPT_TUNING) adds virtual tokens")
            && e.contains("--active-adapter llama_prompt_tuning"),
        "{e}"
    );
    let e = err(
        &[methods("llama_prefix_tuning")],
        &weights(&[("llama_prefix_tuning", 1.0)]),
    );
    assert!(e.contains("adds a key/value prefix"), "{e}");
    let e = err(
        &[methods("llama_lora_embed")],
        &weights(&[("llama_lora_embed", 1.0)]),
    );
    assert!(
        e.contains("replaces the base tensor") && e.contains("embed_tokens.base_layer.weight"),
        "{e}"
    );
    let e = err(
        &[methods("llama_ia3"), methods("llama_prompt_tuning")],
        &weights(&[("llama_ia3", f64::NAN)]),
    );
    assert!(e.contains("not a finite number"), "{e}");
    assert!(Selection::parse_weights("a=0.5,b")
        .unwrap_err()
        .to_string()
        .contains("\"b\" is not NAME=WEIGHT"));
    assert!(Selection::parse_weights("a=x")
        .unwrap_err()
        .to_string()
        .contains("is not a number"));
    assert!(Selection::parse_weights("a=inf")
        .unwrap_err()
        .to_string()
        .contains("not a finite number"));
    assert_eq!(
        Selection::parse_weights(" a=0.5, b=-1 ").unwrap(),
        weights(&[("a", 0.5), ("b", -1.0)])
    );
}

#[test]
fn modules_trained_in_full_and_different_tasks_are_refused() {
    let bert = fixtures().join("models/bert").display().to_string();
    let seqcls = src(&fixtures().join("methods/bert_ia3_seqcls"));
    let r = AdaptedModel::load_adapters(
        &bert,
        std::slice::from_ref(&seqcls),
        &weights(&[("bert_ia3_seqcls", 1.0)]),
        None,
        &Device::Cpu,
        LoadOptions::default(),
    );
    let e = format!("{:#}", r.err().unwrap());
    assert!(
        e.contains("modules_to_save")
            && e.contains("classifier")
            && e.contains("--active-adapter bert_ia3_seqcls"),
        "{e}"
    );
    let other = src(&fixtures().join("methods/bert_ln_tuning_seqcls"));
    let feature = tempfile::tempdir().unwrap();
    let from = fixtures().join("methods/bert_ln_tuning_seqcls");
    std::fs::copy(
        from.join("adapter_model.safetensors"),
        feature.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("adapter_config.json")).unwrap())
            .unwrap();
    cfg["task_type"] = "FEATURE_EXTRACTION".into();
    std::fs::write(feature.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    let named = AdapterSource {
        name: Some("feat".into()),
        dir: feature.path().to_path_buf(),
    };
    let r = AdaptedModel::load_adapters(
        &bert,
        &[other, named],
        &weights(&[("bert_ln_tuning_seqcls", 0.5), ("feat", 0.5)]),
        None,
        &Device::Cpu,
        LoadOptions::default(),
    );
    let e = format!("{:#}", r.err().unwrap());
    assert!(
        e.contains("different tasks") && e.contains("SEQ_CLS") && e.contains("FEATURE_EXTRACTION"),
        "{e}"
    );
}

#[test]
fn a_run_folder_is_one_adapter_and_its_checkpoints_are_not_offered() {
    let tmp = tempfile::tempdir().unwrap();
    let from = multi("ia3_a");
    for dir in [
        tmp.path().to_path_buf(),
        tmp.path().join("checkpoint-3"),
        tmp.path().join("checkpoint-4.tmp"),
    ] {
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(from.join(f), dir.join(f)).unwrap();
        }
    }
    let found = ferrule::peft_io::find_adapters(tmp.path()).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].1, tmp.path());
    // A checkpoint is still loadable by its own path.
    assert_eq!(
        ferrule::peft_io::find_adapters(&tmp.path().join("checkpoint-3")).unwrap()[0].0,
        "checkpoint-3"
    );
    let e = ferrule::peft_io::find_adapters(&tmp.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such adapter folder"), "{e}");
}

#[test]
fn a_path_with_an_equals_sign_is_taken_whole_when_it_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let odd = tmp.path().join("lr=1e-4");
    std::fs::create_dir(&odd).unwrap();
    assert_eq!(AdapterSource::parse(odd.to_str().unwrap()), src(&odd));
    assert_eq!(
        AdapterSource::parse("mine=runs/a"),
        AdapterSource {
            name: Some("mine".into()),
            dir: "runs/a".into()
        }
    );
    assert_eq!(
        AdapterSource::parse("runs/x=y"),
        AdapterSource {
            name: None,
            dir: "runs/x=y".into()
        }
    );
}

#[test]
fn one_folder_named_by_path_means_its_own_adapter() {
    // merge, and every caller of AdaptedModel::load with a path: a root adapter with other
    // adapters in subfolders (PEFT's layout, PiSSA's initial/) is the root's.
    let tmp = tempfile::tempdir().unwrap();
    let sub = tmp.path().join("extra");
    std::fs::create_dir(&sub).unwrap();
    for (from, to) in [
        (multi("ia3_a"), tmp.path().to_path_buf()),
        (multi("ia3_b"), sub),
    ] {
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
    }
    let m = AdaptedModel::load(&llama(), Some(tmp.path()), None, &Device::Cpu).unwrap();
    assert_eq!(m.active, "default");
    let alone = try_load(&[src(&multi("ia3_a"))], &Selection::Only).unwrap();
    assert_eq!(max_diff_masked(&logits(&m), &logits(&alone), None), 0.0);
}
