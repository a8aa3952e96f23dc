//! bf16 compute (`--compute-dtype bf16`): the frozen base's ops with bf16 weights against f64
//! references, and a model loaded in bf16 against the same model in f32.
//!
//! The rounding model (Higham, "Accuracy and Stability of Numerical Algorithms", eq. 3.5):
//! in bf16 an op rounds its activation and weight to bf16 (relative error at most
//! u₁₆ = 2⁻⁹ each) and accumulates their products in f32 (at most k·u₃₂·Σ|a·b|, u₃₂ = 2⁻²⁴).
//! So against the f64 product of the *rounded* operands the error is at most k·u₃₂·Σ|a·b|
//! (the checks allow twice that plus the f32 rounding of the result), and against the f64
//! product of the unrounded f32 operands at most (2u₁₆ + u₁₆²)·Σ|a·b| more. Layout, tile or
//! offset mistakes are off by O(Σ|a·b|), far above both.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, Var};
use ferrule::ops::head_loss::head_cross_entropy;
use ferrule::ops::{ComputeDtype, FrozenLinear, FrozenWeight};
use ferrule::quant::{Blockwise4, Code4, QuantMatrix};
use half::bf16;
use rand::{Rng, SeedableRng};

const U32: f64 = 1.0 / (1u64 << 24) as f64;
const U16: f64 = 1.0 / 512.0;

/// oneDNN, or None (skip) where it is not installed and not required.
fn have_onednn() -> bool {
    match ferrule::ops::onednn::library() {
        Ok(_) => true,
        Err(why) if common::assets_required() => {
            panic!("oneDNN is required here (scripts/install-deps.sh installs it): {why}")
        }
        Err(why) => {
            eprintln!("skipping: {why}");
            false
        }
    }
}

fn random(len: usize, rng: &mut impl Rng) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn round(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| bf16::from_f32(v).to_f64()).collect()
}

/// `(Σ_l a[i,l]·b[j,l], Σ_l |a[i,l]·b[j,l]|)` for row-major `a: [m, k]`, `b: [n, k]`.
fn products(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut abs) = (0.0, 0.0);
            for l in 0..k {
                let p = a[i * k + l] * b[j * k + l];
                s += p;
                abs += p.abs();
            }
            out.push((s, abs));
        }
    }
    out
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = x[i * cols + j];
        }
    }
    t
}

/// Asserts `got` within the accumulation bound of `reference` (on rounded operands), and
/// within the rounding bound of `unrounded` (on the f32 operands).
fn check(what: &str, got: &[f32], reference: &[(f64, f64)], unrounded: &[(f64, f64)], k: usize) {
    assert_eq!(got.len(), reference.len(), "{what}: length");
    for (i, ((g, (r, abs)), (u, uabs))) in got.iter().zip(reference).zip(unrounded).enumerate() {
        let g = *g as f64;
        let bound = 2.0 * k as f64 * U32 * abs + U32 * r.abs() + 1e-30;
        assert!(
            (g - r).abs() <= bound,
            "{what}[{i}]: {g} vs {r} (bound {bound:e})"
        );
        let loose = (2.0 * U16 + U16 * U16) * uabs + bound;
        assert!(
            (g - u).abs() <= loose,
            "{what}[{i}]: {g} vs f32 {u} (bound {loose:e})"
        );
    }
}

/// Forward `y = x Wᵀ + b` and `dX = dY W` of a frozen linear layer whose weight is `weight`
/// (`[n, k]`, values `w` in f32 before any rounding).
fn check_linear(weight: FrozenWeight, w: &[f32], m: usize, n: usize, k: usize, rng: &mut impl Rng) {
    let dev = Device::Cpu;
    let x0 = random(m * k, rng);
    let bias: Vec<f32> = random(n, rng);
    let dy = random(m * n, rng);
    let layer =
        FrozenLinear::from_weight(weight, Some(Tensor::new(bias.as_slice(), &dev).unwrap()));
    let x = Var::from_vec(x0.clone(), (m, k), &dev).unwrap();
    let y = layer.forward(x.as_tensor()).unwrap();
    let loss = (&y * Tensor::from_vec(dy.clone(), (m, n), &dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let dx: Vec<f32> = loss
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let with_bias = |p: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
        p.into_iter()
            .enumerate()
            .map(|(i, (s, a))| (s + bias[i % n] as f64, a))
            .collect()
    };
    let fwd = with_bias(products(&round(&x0), &round(w), m, n, k));
    let fwd32 = with_bias(products(&f64s(&x0), &f64s(w), m, n, k));
    check("y", &y, &fwd, &fwd32, k);
    let wt = transpose(w, n, k);
    let bwd = products(&round(&dy), &round(&wt), m, k, n);
    let bwd32 = products(&f64s(&dy), &f64s(&wt), m, k, n);
    check("dx", &dx, &bwd, &bwd32, n);
}

#[test]
fn a_dense_bf16_linear_layer_follows_the_rounding_model() {
    if !have_onednn() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (m, n, k) = (9, 67, 130);
    let w = random(n * k, &mut rng);
    let weight = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let weight = FrozenWeight::Dense(weight);
    assert_eq!(weight.compute_dtype(), ComputeDtype::Bf16);
    assert_eq!(weight.storage_bytes(), 2 * n * k, "held in bf16");
    check_linear(weight, &w, m, n, k, &mut rng);
}

/// An NF4 weight spanning two tiles dequantizes each tile straight to bf16: the same products
/// as its dequantized values rounded to bf16.
#[test]
fn a_quantized_weight_computes_in_bf16_tile_by_tile() {
    if !have_onednn() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let k = 64;
    let n = ferrule::ops::frozen_linear::TILE_ELEMS / k + 37;
    let values = random(n * k, &mut rng);
    let q = Blockwise4::quantize(&values, &[n, k], Code4::Nf4, 64, true).unwrap();
    let dequantized = q.dequantize();
    let weight = FrozenWeight::Quantized(Arc::new(q), ComputeDtype::Bf16);
    check_linear(weight, &dequantized, 3, n, k, &mut rng);
}

/// The chunked cross-entropy through a bf16 head: loss and dh against f64 on the rounded
/// hidden states and head.
#[test]
fn the_head_cross_entropy_in_bf16_follows_the_rounding_model() {
    if !have_onednn() {
        return;
    }
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let (n, k, vocab) = (6, 96, 1000);
    let w = random(vocab * k, &mut rng);
    let h0 = random(n * k, &mut rng);
    let labels: Vec<i64> = (0..n).map(|i| (i * 163 % vocab) as i64).collect();
    let weight = FrozenWeight::Dense(
        Tensor::from_vec(w.clone(), (vocab, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    );
    let h = Var::from_vec(h0.clone(), (n, k), &dev).unwrap();
    let (loss, _) = head_cross_entropy(h.as_tensor(), &weight, labels.clone()).unwrap();
    let dh: Vec<f32> = loss
        .backward()
        .unwrap()
        .get(h.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let loss = loss.to_scalar::<f32>().unwrap() as f64;
    // f64 reference on the rounded operands.
    let logits = products(&round(&h0), &round(&w), n, vocab, k);
    let mut want_loss = 0.0;
    let mut want_dh = vec![0f64; n * k];
    // Per dh entry: the softmax gradient is rounded to bf16 before its product (as in any
    // bf16 matmul), so each term may differ by one bf16 rounding, u₁₆·|g·w|, twice over for
    // the f32 logits it comes from.
    let mut dh_bound = vec![1e-6f64; n * k];
    let mut largest_abs_row = 0f64;
    for i in 0..n {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let max = row.iter().fold(f64::MIN, |m, (s, _)| m.max(*s));
        let z: f64 = row.iter().map(|(s, _)| (s - max).exp()).sum();
        want_loss += (max + z.ln() - row[labels[i] as usize].0) / n as f64;
        largest_abs_row = row.iter().map(|(_, a)| *a).fold(largest_abs_row, f64::max);
        for (j, (s, _)) in row.iter().enumerate() {
            let g = ((s - max).exp() / z - (j == labels[i] as usize) as u8 as f64) / n as f64;
            for l in 0..k {
                let w = bf16::from_f32(w[j * k + l]).to_f64();
                want_dh[i * k + l] += g * w;
                dh_bound[i * k + l] += 2.0 * U16 * (g * w).abs();
            }
        }
    }
    // Each logit is off by at most 2k·u₃₂·Σ|h·w|, and so is the loss (log-sum-exp and the
    // target logit move by at most that each), plus f32 rounding of the loss arithmetic.
    let bound = 4.0 * k as f64 * U32 * largest_abs_row + 1e-5;
    assert!(
        (loss - want_loss).abs() <= bound,
        "loss {loss} vs {want_loss} (bound {bound:e})"
    );
    for (i, ((g, w), b)) in dh.iter().zip(&want_dh).zip(&dh_bound).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= *b,
            "dh[{i}]: {g} vs {w} (bound {b:e})"
        );
    }
}

/// Logits of each decoder fixture loaded in bf16 against transformers' f32 logits, and the
/// frozen matrices held in half the bytes. Each product rounds its operands to bf16 (2⁻⁸
/// relative together); through the fixtures' two layers and head the logits moved by 0.8% of
/// their largest magnitude when this test was written (0.03 of 3.7 for llama, 0.14 of 18.8
/// for smollm); the check allows 5%, and requires some difference (rounded weights).
#[test]
fn fixture_models_loaded_in_bf16_track_transformers_f32_logits() {
    use ferrule::model::{Frozen, Inputs, LoadOptions, Model, ModelSource, Task};
    use ferrule::quant::WeightMemory;
    if !have_onednn() {
        return;
    }
    let dev = Device::Cpu;
    for name in ["llama", "mistral", "qwen2", "smollm"] {
        let dir = common::fixtures().join("models").join(name);
        let load = |compute_dtype| {
            let options = LoadOptions {
                compute_dtype,
                ..Default::default()
            };
            ModelSource::load_with(dir.to_str().unwrap(), &dev, options).unwrap()
        };
        let (f32_src, bf16_src) = (load(ComputeDtype::F32), load(ComputeDtype::Bf16));
        let (f32_bytes, bf16_bytes) = (
            WeightMemory::of(&f32_src.weights).total_bytes(),
            WeightMemory::of(&bf16_src.weights).total_bytes(),
        );
        assert!(
            (bf16_bytes as f64) < 0.52 * f32_bytes as f64,
            "{name}: {bf16_bytes} bytes in bf16 against {f32_bytes} in f32"
        );
        let model = Model::build(&bf16_src, Task::CausalLm, &Frozen, &dev, 0).unwrap();
        let inputs = common::load("inputs/decoder.safetensors");
        let (ids, mask) = (&inputs["input_ids"], &inputs["attention_mask"]);
        let logits = model
            .forward(&Inputs {
                input_ids: ids,
                attention_mask: Some(mask),
                token_type_ids: None,
            })
            .unwrap();
        let expected = &common::load(&format!("expected/{name}_logits.safetensors"))["logits"];
        let diff = common::max_diff_masked(&logits, expected, Some(mask));
        let scale = expected
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("{name}: max |Δlogits| {diff} of scale {scale}");
        assert!(
            diff > 0.0,
            "{name}: bf16 logits equal f32's: the weights were not rounded"
        );
        assert!(
            diff < 0.05 * scale,
            "{name}: max |Δlogits| {diff} of scale {scale}"
        );
    }
}
