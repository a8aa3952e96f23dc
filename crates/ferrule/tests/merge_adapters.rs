//! Adapter combinations against peft's `add_weighted_adapter` (tests/fixtures/merge_adapters,
//! made by make_peft_combinations.py with peft 0.21.2): every deterministic case equal to peft's
//! within 1e-5 (the svd types compared as products B·A, their factors' signs being arbitrary,
//! relative to the product's largest entry),
//! DARE checked statistically below density 1, and the inputs peft refuses or would drop.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::*;
use ferrule::merge::adapters::combine::clamp_factors;
use ferrule::merge::adapters::{
    combine, Combination, CombineOptions, CombinedAdapter, WeightedAdapter,
};
use ferrule::merge::delta::SignElection;
use ferrule::peft_io::{load_adapter, SavedAdapter};
use serde_json::Value;

fn dir(rel: &str) -> PathBuf {
    fixtures().join("merge_adapters").join(rel)
}

fn saved(rel: &str) -> SavedAdapter {
    load_adapter(&dir(rel), &Device::Cpu).unwrap()
}

fn inputs(names: &[&str], weights: &[f64]) -> Vec<WeightedAdapter> {
    names
        .iter()
        .zip(weights)
        .map(|(n, w)| WeightedAdapter {
            name: n.to_string(),
            weight: *w,
            adapter: saved(&format!("in/{n}")),
        })
        .collect()
}

fn options_of(case: &Value) -> CombineOptions {
    CombineOptions {
        combination: Combination::parse(case["combination_type"].as_str().unwrap_or("linear"))
            .unwrap(),
        density: case["density"].as_f64().map(|d| d as f32),
        majority_sign: match case["majority_sign_method"].as_str() {
            Some("frequency") => SignElection::Frequency,
            _ => SignElection::Total,
        },
        svd_rank: case["svd_rank"].as_u64().map(|r| r as usize),
        svd_clamp: case["svd_clamp"].as_f64(),
        seed: 0,
        rescale_q: None,
        analytic_q: None,
    }
}

fn cases() -> BTreeMap<String, Value> {
    let text = std::fs::read_to_string(dir("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn run_case(case: &Value) -> anyhow::Result<CombinedAdapter> {
    let names: Vec<&str> = case["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let weights: Vec<f64> = case["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    combine(&inputs(&names, &weights), &options_of(case))
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Config keys as peft writes them, with a target list sorted (peft writes its set in hash order).
fn normalized(mut c: Value) -> Value {
    for key in ["target_modules", "feedforward_modules"] {
        if let Some(Value::Array(v)) = c.get_mut(key) {
            v.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
        }
    }
    c
}

/// `B·A` of every module, by module path.
fn products(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (k, b) in tensors {
        let a_key = if k.ends_with("lora_B.weight") {
            k.replace("lora_B.weight", "lora_A.weight")
        } else if k.ends_with("lora_embedding_B") {
            k.replace("lora_embedding_B", "lora_embedding_A")
        } else {
            continue;
        };
        out.insert(k.clone(), b.matmul(&tensors[&a_key]).unwrap());
    }
    out
}

fn as_btree(s: SavedAdapter) -> BTreeMap<String, Tensor> {
    s.tensors.into_iter().collect()
}

#[test]
fn every_deterministic_combination_equals_peft() {
    let mut checked = 0;
    for (name, case) in cases() {
        let ours = run_case(&case).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let peft = saved(&format!("out/{name}"));
        assert_eq!(
            normalized(ours.config.clone()),
            normalized(peft.config.clone()),
            "{name}: adapter_config.json"
        );
        let theirs = as_btree(peft);
        let keys = |m: &BTreeMap<String, Tensor>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&ours.tensors), keys(&theirs), "{name}: tensor names");
        let svd = ours.combination.is_svd();
        if name.ends_with("clamp") {
            // The clamp depends on the SVD's signs: tested alone below.
            continue;
        }
        let (a, b) = if svd {
            (products(&ours.tensors), products(&theirs))
        } else {
            (ours.tensors.clone(), theirs)
        };
        for (k, t) in &a {
            assert_eq!(t.dims(), b[k].dims(), "{name}: {k}");
            let d = max_abs_diff(&values(t), &values(&b[k]));
            // B·A of the svd types: relative to its largest entry. peft's SVD runs in f32: on
            // the embedding of magnitude_prune_svd (entries up to 9) it is 1.9e-5 from the
            // f64 SVD of the same matrix (checked with torch in float64), which ferrule's is.
            let scale = if svd {
                values(&b[k]).iter().fold(1.0f32, |m, x| m.max(x.abs()))
            } else {
                1.0
            };
            assert!(d < 1e-5 * scale, "{name}: {k} differs from peft's by {d}");
            // Not trivially equal: every compared tensor holds a change.
            assert!(
                values(t).iter().any(|x| x.abs() > 1e-3),
                "{name}: {k} is ~0"
            );
        }
        checked += 1;
    }
    // 15 LoRA cases (the clamp one apart) and the IA3 one.
    assert_eq!(checked, 15);
}

#[test]
fn single_adapter_falls_back_to_linear_and_types_apply() {
    let c = cases();
    let single = run_case(&c["single_ties_is_linear"]).unwrap();
    assert_eq!(single.combination, Combination::Linear);
    let ties = run_case(&c["ties"]).unwrap();
    let linear = run_case(&c["linear"]).unwrap();
    assert_eq!(ties.combination, Combination::Ties);
    let k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let zeros = values(&ties.tensors[k])
        .iter()
        .filter(|x| **x == 0.0)
        .count();
    assert!(zeros > 0, "ties at density 0.5 pruned nothing");
    assert!(max_abs_diff(&values(&ties.tensors[k]), &values(&linear.tensors[k])) > 1e-3);
}

#[test]
fn svd_clamp_matches_peft_on_the_same_factors() {
    // peft's svd_r4 and svd_r4_clamp come from the same torch SVD, so the same signs.
    let free = as_btree(saved("out/svd_r4"));
    let clamped = as_btree(saved("out/svd_r4_clamp"));
    let mut changed = false;
    for (k, b) in &free {
        let Some(a_key) = k
            .strip_suffix("lora_B.weight")
            .map(|p| format!("{p}lora_A.weight"))
            .or_else(|| {
                k.strip_suffix("lora_embedding_B")
                    .map(|p| format!("{p}lora_embedding_A"))
            })
        else {
            continue;
        };
        let (mut vb, mut va) = (values(b), values(&free[&a_key]));
        clamp_factors(&mut vb, &mut va, 0.9).unwrap();
        changed |= vb != values(b);
        assert!(max_abs_diff(&vb, &values(&clamped[k])) < 1e-6, "{k}");
        assert!(
            max_abs_diff(&va, &values(&clamped[&a_key])) < 1e-6,
            "{a_key}"
        );
    }
    assert!(changed, "the clamp changed nothing");
}

#[test]
fn dare_below_density_one_keeps_the_fraction_and_rescales_and_is_seeded() {
    // Weight 0 on b: the result is a's factors, masked and divided by the density.
    let run = |seed: u64, q: Option<f32>| {
        let o = CombineOptions {
            combination: Combination::DareLinear,
            density: Some(0.3),
            seed,
            rescale_q: q,
            ..Default::default()
        };
        combine(&inputs(&["a", "b"], &[1.0, 0.0]), &o).unwrap()
    };
    let a = as_btree(saved("in/a"));
    let out = run(5, None);
    let scaling = 8.0f64 / 2.0; // a: alpha 8, r 2
    let (mut kept, mut total) = (0usize, 0usize);
    for (k, t) in &out.tensors {
        let (ours, orig) = (values(t), values(&a[k]));
        for (x, y) in ours.iter().zip(&orig) {
            total += 1;
            if *x != 0.0 {
                kept += 1;
                let want = *y as f64 * scaling.sqrt() / 0.3;
                assert!((*x as f64 - want).abs() < 1e-5 * want.abs().max(1.0), "{k}");
            }
        }
    }
    // Binomial: total ≈ 900, sd ≈ 0.015.
    let frac = kept as f64 / total as f64;
    assert!((frac - 0.3).abs() < 0.06, "kept {frac} of {total}");
    let same = run(5, None);
    let other = run(6, None);
    let k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    assert_eq!(values(&out.tensors[k]), values(&same.tensors[k]));
    assert_ne!(values(&out.tensors[k]), values(&other.tensors[k]));
    // DAREx-q: the same mask, rescaled by 1/q.
    let q = run(5, Some(0.6));
    for (x, y) in values(&q.tensors[k]).iter().zip(values(&out.tensors[k])) {
        assert!((x * 0.6 - y * 0.3).abs() < 1e-5);
    }
}

#[test]
fn ia3_is_peft_weighted_sum_of_vectors() {
    let out = run_case(&cases()["ia3_linear"]).unwrap();
    let (a, b) = (as_btree(saved("in/ia3_a")), as_btree(saved("in/ia3_b")));
    // k_proj is in ia3_a only: peft takes ia3_b's as 0 there, so l = 0.25·l_a (not 1-based).
    let k = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l";
    let want: Vec<f32> = values(&a[k]).iter().map(|x| 0.25 * x).collect();
    assert!(max_abs_diff(&values(&out.tensors[k]), &want) < 1e-7);
    let v = "base_model.model.model.layers.1.self_attn.v_proj.ia3_l";
    let want: Vec<f32> = values(&a[v])
        .iter()
        .zip(values(&b[v]))
        .map(|(x, y)| 0.25 * x + 0.75 * y)
        .collect();
    assert!(max_abs_diff(&values(&out.tensors[v]), &want) < 1e-6);
}

fn err_of(names: &[&str], weights: &[f64], o: CombineOptions) -> String {
    match combine(&inputs(names, weights), &o) {
        Ok(_) => panic!("{names:?} {o:?} should fail"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn inputs_peft_refuses_are_named_errors() {
    let with = |c: Combination| CombineOptions {
        combination: c,
        density: Some(0.5),
        ..Default::default()
    };
    let e = err_of(&["a", "c"], &[1.0, 1.0], with(Combination::Ties));
    assert!(
        e.contains("one rank") && e.contains("a r=2") && e.contains("c r=3"),
        "{e}"
    );
    let e = err_of(&["a", "ia3_a"], &[1.0, 1.0], with(Combination::Linear));
    assert!(e.contains("different methods"), "{e}");
    let mut big = with(Combination::Svd);
    big.svd_rank = Some(40);
    let e = err_of(&["a", "c"], &[1.0, 1.0], big);
    assert!(e.contains("does not fit a 32×64 update"), "{e}");
    for d in [0.0, 1.5, f32::NAN] {
        let mut o = with(Combination::Ties);
        o.density = Some(d);
        assert!(err_of(&["a", "b"], &[1.0, 1.0], o).contains("(0, 1]"));
    }
    let mut o = with(Combination::Ties);
    o.density = None;
    assert!(err_of(&["a", "b"], &[1.0, 1.0], o).contains("needs a density"));
    let e = err_of(&["ia3_a", "ia3_b"], &[1.0, 1.0], with(Combination::Ties));
    assert!(
        e.contains("IA3 adapters combine by a weighted sum only"),
        "{e}"
    );
    let e = Combination::parse("tie").unwrap_err().to_string();
    assert!(
        e.contains("ties_svd") && e.contains("magnitude_prune"),
        "{e}"
    );
}

#[test]
fn adapters_of_different_base_shapes_are_refused() {
    let mut list = inputs(&["a", "b"], &[1.0, 1.0]);
    let k = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    let narrow = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    list[1].adapter.tensors.insert(k.to_string(), narrow);
    let e = match combine(&list, &CombineOptions::default()) {
        Ok(_) => panic!("shapes differ"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("do not fit one base") && e.contains("64×64") && e.contains("64×32"),
        "{e}"
    );
}

#[test]
fn dora_and_modules_to_save_are_refused_not_dropped() {
    let mut list = inputs(&["a", "b"], &[1.0, 1.0]);
    list[1].adapter.config["use_dora"] = Value::Bool(true);
    let e = format!(
        "{:#}",
        combine(&list, &CombineOptions::default()).err().unwrap()
    );
    assert!(e.contains("adapter b") && e.contains("DoRA"), "{e}");
    let mut list = inputs(&["a", "b"], &[1.0, 1.0]);
    list[0].adapter.config["modules_to_save"] = serde_json::json!(["lm_head"]);
    let e = format!(
        "{:#}",
        combine(&list, &CombineOptions::default()).err().unwrap()
    );
    assert!(e.contains("modules_to_save"), "{e}");
}

#[test]
fn a_saved_combination_reloads_and_a_failed_save_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let out = run_case(&cases()["cat"]).unwrap();
    let target = t.path().join("mix");
    out.save(&target).unwrap();
    let back = load_adapter(&target, &Device::Cpu).unwrap();
    assert_eq!(back.config, out.config);
    assert_eq!(back.tensors.len(), out.tensors.len());
    // The saved adapter builds a ferrule tuner.
    back.into_tuner(0, &Device::Cpu).unwrap();
    // An existing folder is refused and left as it was.
    let e = out.save(&target).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    assert!(!t.path().join("mix.tmp").exists());
}

#[test]
fn ia3_without_feedforward_modules_keeps_them_unset_and_mixed_kinds_are_refused() {
    let mut list = inputs(&["ia3_a", "ia3_b"], &[0.5, 0.5]);
    for a in &mut list {
        a.adapter.config["feedforward_modules"] = Value::Null;
    }
    let out = combine(&list, &CombineOptions::default()).unwrap();
    assert_eq!(out.config["feedforward_modules"], Value::Null);
    list[1].adapter.config["target_modules"] = Value::from(".*v_proj");
    let e = format!(
        "{:#}",
        combine(&list, &CombineOptions::default()).err().unwrap()
    );
    assert!(
        e.contains("ia3_a: a list") && e.contains("ia3_b: a regex string"),
        "{e}"
    );
}

#[test]
fn darex_analytic_q_rescales_each_layer_by_its_own_q() {
    use ferrule::merge::darex::{layer_q, mean_inputs, Analytic, AnalyticQ};
    use ferrule::model::{Inputs, LoadOptions, ModelSource, Task};
    let dev = Device::Cpu;
    let source = ModelSource::load_with(
        &fixtures().join("models/llama").display().to_string(),
        &dev,
        LoadOptions::default(),
    )
    .unwrap();
    let batch = load("inputs/decoder.safetensors");
    let inputs = Inputs {
        input_ids: &batch["input_ids"],
        attention_mask: Some(&batch["attention_mask"]),
        token_type_ids: None,
    };
    let means: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| {
            let tuner = saved(&format!("in/{n}")).into_tuner(0, &dev).unwrap();
            mean_inputs(&source, Task::CausalLm, tuner.as_ref(), &inputs).unwrap()
        })
        .collect();
    let run = |analytic: Option<Analytic>| {
        let o = CombineOptions {
            combination: Combination::DareLinearSvd,
            density: Some(0.5),
            seed: 5,
            analytic_q: analytic,
            ..Default::default()
        };
        combine(&inputs_of(&["a", "b"], &[1.0, 0.0]), &o).unwrap()
    };
    let with_q = products(
        &run(Some(Analytic {
            rule: AnalyticQ::default(),
            means: means.clone(),
        }))
        .tensors,
    );
    let plain = products(&run(None).tensors);
    // Weight 0 on b: the pruned ΔW is a's mask times ΔW_a / q instead of / density, and the
    // SVD of a scaled matrix is the scaled SVD.
    let a = as_btree(saved("in/a"));
    for layer in ["0", "1"] {
        let path = format!("model.layers.{layer}.self_attn.q_proj");
        let key = |s: &str| format!("base_model.model.{path}.{s}");
        let delta = (a[&key("lora_B.weight")]
            .matmul(&a[&key("lora_A.weight")])
            .unwrap()
            * 4.0)
            .unwrap();
        let q = layer_q(
            &values(&delta),
            64,
            64,
            &means[0][&path],
            0.5,
            AnalyticQ::default(),
        )
        .unwrap();
        assert!(q > 0.5 && q < 0.999, "{path}: q {q}");
        let k = key("lora_B.weight");
        let (x, y) = (values(&with_q[&k]), values(&plain[&k]));
        let want: Vec<f32> = y.iter().map(|v| v * (0.5 / q) as f32).collect();
        let scale = y.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let ratio: Vec<f32> = x.iter().zip(&y).take(5).map(|(a, b)| a / b).collect();
        assert!(
            max_abs_diff(&x, &want) < 1e-5 * scale,
            "{path}: q {q}, ratios {ratio:?}"
        );
    }
}

fn inputs_of(names: &[&str], weights: &[f64]) -> Vec<WeightedAdapter> {
    inputs(names, weights)
}
