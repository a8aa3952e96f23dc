//! ferrule's `adamw_8bit` against bitsandbytes 0.50.2's AdamW8bit on the CPU
//! (tests/fixtures/optim/make_bnb_optim.py): three steps on a parameter with 8-bit block-wise
//! state and one below `min_8bit_size`.

mod common;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use ferrule::train::optim::{AdamWConfig, BnbAdamW, StateBits};

fn fixture() -> BTreeMap<String, Tensor> {
    let path = common::fixtures().join("optim/bnb_adamw8bit.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

/// Largest |a - b| / max(|b|, floor).
fn max_rel(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f32::max)
}

#[test]
fn adamw_8bit_matches_bitsandbytes_within_one_quantization_step() {
    let fx = fixture();
    let names = ["big", "small"];
    let vars: Vec<(String, Var)> = names
        .iter()
        .map(|n| {
            let v = Var::from_tensor(&fx[&format!("{n}.p0")]).unwrap();
            (n.to_string(), v)
        })
        .collect();
    let cfg = AdamWConfig {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let bits = StateBits::Eight {
        min_8bit_size: 4096,
    };
    let mut opt = BnbAdamW::new(vars.clone(), cfg, bits, None).unwrap();
    for step in 1..=3 {
        let grads: HashMap<String, Tensor> = names
            .iter()
            .map(|n| (n.to_string(), fx[&format!("{n}.g{step}")].clone()))
            .collect();
        opt.step_with(&grads).unwrap();
        check_states(&opt, &fx, step);
        for (n, v) in &vars {
            let got = f32s(v.as_tensor());
            let want = f32s(&fx[&format!("{n}.p{step}")]);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!("{n} step {step}: max |dp| = {worst:e}");
            assert!(worst <= 1e-6, "{n} after step {step}: max |dp| = {worst}");
        }
    }
}

/// The states after `step` against bitsandbytes': 8-bit codes within one, absmax and 32-bit
/// moments within rounding.
fn check_states(opt: &BnbAdamW, fx: &BTreeMap<String, Tensor>, step: usize) {
    let state: BTreeMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
    for k in ["state1", "state2"] {
        let ours = &state[&format!("big.{k}")];
        assert_eq!(ours.dtype(), DType::U8);
        let got = u8s(ours);
        let want = u8s(&fx[&format!("big.{k}_{step}")]);
        let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
        let worst = differ
            .iter()
            .map(|&i| (got[i] as i32 - want[i] as i32).abs())
            .max()
            .unwrap_or(0);
        eprintln!(
            "big.{k} after step {step}: {} of {} codes differ, by at most {worst}; first {:?}",
            differ.len(),
            got.len(),
            differ
                .iter()
                .take(5)
                .map(|&i| (i, got[i], want[i]))
                .collect::<Vec<_>>()
        );
        assert!(
            worst <= 1,
            "big.{k} after step {step}: a code differs by {worst}"
        );
    }
    for k in ["absmax1", "absmax2"] {
        let r = max_rel(
            &f32s(&state[&format!("big.{k}")]),
            &f32s(&fx[&format!("big.{k}_{step}")]),
            1e-30,
        );
        assert!(
            r <= 1e-5,
            "big.{k} after step {step}: relative difference {r}"
        );
    }
    // 32-bit moments below min_8bit_size, under bitsandbytes' names state1 / state2.
    for (ours, theirs) in [("exp_avg", "state1"), ("exp_avg_sq", "state2")] {
        let r = max_rel(
            &f32s(&state[&format!("small.{ours}")]),
            &f32s(&fx[&format!("small.{theirs}_{step}")]),
            1e-12,
        );
        assert!(
            r <= 1e-5,
            "small.{ours} after step {step}: relative difference {r}"
        );
    }
}
