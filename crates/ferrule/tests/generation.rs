//! Decoding against transformers (tests/fixtures/generation, made by
//! make_generation_fixtures.py): the scores its logits-processor pipeline leaves for each
//! `GenerationConfig` case, greedy generation with a repetition penalty, and a model folder's
//! `generation_config.json` read as transformers reads it.

mod common;

use candle_core::{DType, Device};
use common::*;
use ferrule::adapted::{AdaptedModel, Selection};
use ferrule::generate::{generate_with_reason, processed_scores, SamplingOptions, StopReason};
use ferrule::model::Arch;
use ferrule::model::LoadOptions;
use serde_json::Value;

fn cases() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("generation/cases.json")).unwrap(),
    )
    .unwrap()
}

fn options(case: &Value) -> SamplingOptions {
    let d = SamplingOptions::default();
    SamplingOptions {
        do_sample: case["do_sample"].as_bool().unwrap(),
        temperature: case["temperature"].as_f64().unwrap_or(d.temperature),
        top_k: case["top_k"].as_u64().map_or(d.top_k, |k| k as usize),
        top_p: case["top_p"].as_f64().unwrap_or(d.top_p),
        repetition_penalty: case["repetition_penalty"]
            .as_f64()
            .unwrap_or(d.repetition_penalty),
        ..d
    }
}

#[test]
fn processed_scores_equal_transformers_pipeline() {
    let t = load("generation/processors.safetensors");
    let logits: Vec<f32> = t["logits"].to_vec1().unwrap();
    let history: Vec<u32> = t["history"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    for case in cases()["processors"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let want: Vec<f32> = t[name].to_vec1().unwrap();
        let got = processed_scores(&logits, &history, &options(case));
        let removed = |s: &[f32]| {
            s.iter()
                .map(|v| *v == f32::NEG_INFINITY)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            removed(&got),
            removed(&want),
            "{name}: the removed tokens differ"
        );
        let kept = want.iter().filter(|v| v.is_finite()).count();
        assert!(
            kept < want.len() || !case["do_sample"].as_bool().unwrap() || name == "temperature",
            "{name}: the case removes nothing"
        );
        for (i, (g, w)) in got
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (_, w))| w.is_finite())
        {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{name}: score {i}: {g} vs transformers {w}"
            );
        }
    }
}

#[test]
fn greedy_generation_with_repetition_penalty_equals_transformers() {
    let m = AdaptedModel::load_adapters(
        &fixtures().join("models/llama").display().to_string(),
        &[],
        &Selection::Only,
        None,
        &Device::Cpu,
        LoadOptions::default(),
    )
    .unwrap();
    let Arch::Decoder(lm) = &m.model.arch else {
        panic!("decoder expected")
    };
    let greedy = cases()["greedy"].as_array().unwrap().clone();
    assert_ne!(
        greedy[0]["tokens"], greedy[1]["tokens"],
        "the penalty must change the fixture's output"
    );
    for g in greedy {
        let prompt: Vec<u32> = serde_json::from_value(g["prompt"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(g["tokens"].clone()).unwrap();
        let opts = SamplingOptions {
            max_new_tokens: want.len(),
            repetition_penalty: g["repetition_penalty"].as_f64().unwrap(),
            ..Default::default()
        };
        let out = generate_with_reason(lm, &prompt, &opts, |_| {}).unwrap();
        assert_eq!(
            out.tokens, want,
            "repetition_penalty {}",
            opts.repetition_penalty
        );
        assert_eq!(out.stop, StopReason::MaxNewTokens);
    }
}

#[test]
fn generation_stops_at_a_stop_token_and_when_the_context_is_full() {
    let m = AdaptedModel::load_adapters(
        &fixtures().join("models/llama").display().to_string(),
        &[],
        &Selection::Only,
        None,
        &Device::Cpu,
        LoadOptions::default(),
    )
    .unwrap();
    let Arch::Decoder(lm) = &m.model.arch else {
        panic!("decoder expected")
    };
    let first = cases()["greedy"][0].clone();
    let prompt: Vec<u32> = serde_json::from_value(first["prompt"].clone()).unwrap();
    let want: Vec<u32> = serde_json::from_value(first["tokens"].clone()).unwrap();
    let opts = SamplingOptions {
        max_new_tokens: 16,
        stop_tokens: vec![want[3]],
        ..Default::default()
    };
    let out = generate_with_reason(lm, &prompt, &opts, |_| {}).unwrap();
    assert_eq!(
        (out.tokens.as_slice(), out.stop),
        (&want[..4], StopReason::StopToken)
    );
    // max_position_embeddings is 128: after a 120-token prompt, tokens 1..8 are fed at
    // positions 120..127, and the logits at 127 give a 9th, which needs no position.
    let long: Vec<u32> = (0..120).map(|i| 3 + i % 300).collect();
    let out = generate_with_reason(
        lm,
        &long,
        &SamplingOptions {
            max_new_tokens: 50,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    assert_eq!((out.tokens.len(), out.stop), (9, StopReason::ContextFull));
}

#[test]
fn model_folder_generation_config_is_typed_and_its_eos_ids_stop_generation() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/llama");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let gc = dir.path().join("generation_config.json");
    std::fs::write(&gc, r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 7], "max_new_tokens": 9}"#).unwrap();
    let source =
        ferrule::model::ModelSource::load(&dir.path().display().to_string(), &Device::Cpu).unwrap();
    let g = source
        .generation_config
        .as_ref()
        .expect("generation_config.json is read");
    let o = g.sampling_options(4).unwrap();
    assert_eq!(
        (
            o.do_sample,
            o.temperature,
            o.top_p,
            o.top_k,
            o.max_new_tokens
        ),
        (true, 0.6, 0.9, 50, 9)
    );
    assert!(
        source.eos_token_ids().contains(&7),
        "{:?}",
        source.eos_token_ids()
    );
    for (bad, key) in [
        (r#"{"temperature": "hot"}"#, "temperature"),
        (r#"{"top_p": 2}"#, "top_p"),
        (r#"{"eos_token_id": 320}"#, "eos_token_id"),
    ] {
        std::fs::write(&gc, bad).unwrap();
        let Err(e) =
            ferrule::model::ModelSource::load(&dir.path().display().to_string(), &Device::Cpu)
        else {
            panic!("{bad} was accepted")
        };
        let e = format!("{e:#}");
        assert!(
            e.contains("generation_config.json") && e.contains(key),
            "{bad}: {e}"
        );
    }
}
