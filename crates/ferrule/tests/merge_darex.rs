//! DARE / DAREx-q on the dense deltas of two LoRA adapters (peft 0.21.2 fixtures on the tiny
//! Llama): the kept fraction, the merged folder against the model the search evaluates, the
//! output-change search, and the errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use ferrule::adapted::AdaptedModel;
use ferrule::merge::darex::{
    choose_q_by_output_change, dropped_deltas, rescaled_updates, ScaledDeltas,
};
use ferrule::merge::{merge_updates_to_dir, MergeOptions};
use ferrule::model::{Model, ModelSource, Task};
use ferrule::tuners::Update;

fn model_dir() -> String {
    fixtures().join("models/llama").display().to_string()
}

fn adapted(rel: &str) -> AdaptedModel {
    AdaptedModel::load(
        &model_dir(),
        Some(&fixtures().join(rel)),
        None,
        &Device::Cpu,
    )
    .unwrap()
}

/// Two records of ids packed into one row.
fn batch() -> (Tensor, Vec<usize>) {
    let ids: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 100).collect();
    (
        Tensor::from_vec(ids, (1, 20), &Device::Cpu).unwrap(),
        vec![12, 8],
    )
}

#[test]
fn dare_keeps_its_rate_and_the_merged_folder_is_the_model_the_search_scores() {
    let a = adapted("adapters/llama_lora");
    let b = adapted("multi_adapter/peft_layout/other");
    let (ta, tb) = (a.tuner.as_deref().unwrap(), b.tuner.as_deref().unwrap());
    let pairs = [("a", ta, 0.6f32), ("b", tb, 0.4f32)];

    // keep = 1 is the plain weighted sum of the updates.
    let full = dropped_deltas(&pairs, 1.0, 0).unwrap();
    let (name, delta_a) = match ta.updates().unwrap().remove(0) {
        (n, Update::Add(d)) => (n, d.dense().unwrap()),
        _ => panic!("LoRA merges by adding"),
    };
    let delta_b = tb
        .updates()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, u)| match u {
            Update::Add(d) => d.dense().unwrap(),
            _ => panic!("LoRA merges by adding"),
        });
    let expected = match delta_b {
        Some(d) => ((&delta_a * 0.6).unwrap() + (d * 0.4).unwrap()).unwrap(),
        None => (&delta_a * 0.6).unwrap(),
    };
    assert!(max_diff(&full[&name], &expected) < 1e-6);

    // keep = 0.3: about 30% of the entries survive, unscaled.
    let dropped = dropped_deltas(&pairs, 0.3, 7).unwrap();
    let values: Vec<f32> = dropped
        .values()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    let nonzero_full: usize = full
        .values()
        .map(|t| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .filter(|x| **x != 0.0)
                .count()
        })
        .sum();
    let kept = values.iter().filter(|x| **x != 0.0).count() as f64 / nonzero_full as f64;
    assert!((kept - 0.3).abs() < 0.02, "kept {kept} of {nonzero_full}");
    // The same seed draws the same masks.
    let again = dropped_deltas(&pairs, 0.3, 7).unwrap();
    assert!(dropped.iter().all(|(k, t)| max_diff(t, &again[k]) == 0.0));

    // The folder merged with 1/q equals the model the search runs at scale 1/q.
    let source = ModelSource::load(&model_dir(), &Device::Cpu).unwrap();
    let q = 0.45f32;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let updates = rescaled_updates(dropped.clone(), q).unwrap();
    merge_updates_to_dir(
        &source,
        vec![],
        updates,
        Task::CausalLm,
        &out,
        MergeOptions::default(),
    )
    .unwrap();
    let (ids, lens) = batch();
    let merged = ModelSource::load(&out.display().to_string(), &Device::Cpu).unwrap();
    let frozen = Model::build(
        &merged,
        Task::CausalLm,
        &ferrule::model::Frozen,
        &Device::Cpu,
        0,
    )
    .unwrap();
    let from_folder = frozen.forward_packed(&ids, &lens).unwrap();
    let hook = ScaledDeltas::new(&dropped);
    hook.set_scale(1.0 / q);
    let hooked = Model::build(&source, Task::CausalLm, &hook, &Device::Cpu, 0).unwrap();
    let from_hook = hooked.forward_packed(&ids, &lens).unwrap();
    let d = max_diff(
        &from_folder.to_dtype(DType::F32).unwrap(),
        &from_hook.to_dtype(DType::F32).unwrap(),
    );
    assert!(d < 1e-4, "merged folder vs hooked model: {d}");
}

#[test]
fn the_search_never_does_worse_than_dare_and_finds_q_1_without_dropping() {
    let a = adapted("adapters/llama_lora");
    let b = adapted("multi_adapter/peft_layout/other");
    let pairs = [
        ("a", a.tuner.as_deref().unwrap(), 1.0f32),
        ("b", b.tuner.as_deref().unwrap(), 1.0),
    ];
    let source = ModelSource::load(&model_dir(), &Device::Cpu).unwrap();
    let (ids, lens) = batch();
    let full = dropped_deltas(&pairs, 1.0, 0).unwrap();

    // Nothing dropped: q = 1 reproduces the reference exactly.
    let c =
        choose_q_by_output_change(&source, Task::CausalLm, &full, &full, 1.0, &ids, &lens).unwrap();
    assert_eq!(c.q, 1.0);
    assert!(c.change < 1e-12, "{c:?}");

    let dropped = dropped_deltas(&pairs, 0.1, 3).unwrap();
    let c = choose_q_by_output_change(&source, Task::CausalLm, &full, &dropped, 0.1, &ids, &lens)
        .unwrap();
    eprintln!(
        "q search at keep 0.1: q {} change {:.3e}, DARE {:.3e}",
        c.q, c.change, c.dare_change
    );
    assert!((0.1..=1.0).contains(&c.q), "{c:?}");
    assert_eq!(c.tried[0], (0.1, c.dare_change));
    assert!(c.change <= c.dare_change, "{c:?}");
    assert!(c.tried.len() >= 10);
}

#[test]
fn dare_refuses_what_it_cannot_drop() {
    let ia3 = adapted("multi_adapter/ia3_a");
    let t = ia3.tuner.as_deref().unwrap();
    let err = dropped_deltas(&[("ia3_a", t, 1.0)], 0.5, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ia3_a") && err.contains("additive"), "{err}");
    let a = adapted("adapters/llama_lora");
    let t = a.tuner.as_deref().unwrap();
    let err = dropped_deltas(&[("a", t, 1.0)], 0.0, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("(0, 1]"), "{err}");
    let err = match rescaled_updates(Default::default(), 1.5) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("q = 1.5 accepted"),
    };
    assert!(err.contains("q must be in (0, 1]"), "{err}");
}
