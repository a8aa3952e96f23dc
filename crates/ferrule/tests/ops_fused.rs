//! The fused CPU ops (norms, rope, attention, cross-entropy) against the composite
//! versions they replace: forward values and input gradients, and no gradient stored for
//! the captured constants.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use ferrule::ops::attention::{
    attention, attention_reference, attention_varlen, build_mask, MaskKind, MASKED,
};
use ferrule::ops::dora::{dora_linear, dora_linear_reference, row_sq_norms, weight_norm};
use ferrule::ops::frozen_mlp::{gelu_mlp, gelu_mlp_scaled, swiglu_mlp, swiglu_mlp_scaled};
use ferrule::ops::gelu::gelu;
use ferrule::ops::loss::{
    causal_lm_loss, causal_lm_loss_reference, cross_entropy, cross_entropy_reference, IGNORE_INDEX,
};
use ferrule::ops::low_rank::{low_rank_linear, low_rank_linear_reference};
use ferrule::ops::norm::{
    add_layer_norm, layer_norm, layer_norm_reference, rms_norm, rms_norm_reference,
};
use ferrule::ops::rope::{Rope, RopeScaling};
use ferrule::ops::scaled_linear::{scaled_linear, scaled_linear_reference};
use ferrule::ops::swiglu::{swiglu, swiglu_reference};
use ferrule::ops::{FrozenLinear, FrozenWeight};
use ferrule::quant::{Blockwise4, Code4};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

const RTOL: f32 = 1e-5;

fn randn(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn var(shape: &[usize], seed: u64, scale: f32) -> Var {
    Var::from_tensor(&randn(shape, seed, scale)).unwrap()
}

/// Element-wise `|a − b| ≤ RTOL·(|b| + max|b|/10)`: relative, with a floor for entries that
/// are tiny next to the rest of the tensor (sums of cancelling terms).
fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x.is_finite() && y.is_finite(), "{what}[{i}]: {x} vs {y}");
        let tol = RTOL * (y.abs() + scale / 10.0);
        assert!(
            (x - y).abs() <= tol,
            "{what}[{i}]: fused {x} vs composite {y} (tol {tol})"
        );
    }
}

/// `Σ y·r`, `r` a random (trainable, so it is expected in the store) projection: gives the
/// op a non-uniform output gradient.
fn project(y: &Tensor, r: &Var) -> Tensor {
    (y * r.as_tensor()).unwrap().sum_all().unwrap()
}

/// The GradStore holds exactly the variables, nothing for constants.
fn assert_only_vars(grads: &GradStore, vars: &[&Var], what: &str) {
    let n = grads.get_ids().count();
    assert_eq!(
        n,
        vars.len(),
        "{what}: gradient store has {n} entries, expected only the {} variables",
        vars.len()
    );
    for v in vars {
        assert!(
            grads.get(v.as_tensor()).is_some(),
            "{what}: variable without gradient"
        );
    }
}

/// Runs `f` fused and composite on the variables, compares outputs and all variable gradients,
/// and checks the fused store holds only the variables. Returns the composite store's size.
fn check(
    what: &str,
    vars: &[&Var],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> usize {
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let yf = fused(&inputs).unwrap();
    let yr = reference(&inputs).unwrap();
    assert_close(&yf, &yr, &format!("{what} forward"));
    let r = var(yf.dims(), 99, 1.0);
    let gf = project(&yf, &r).backward().unwrap();
    let gr = project(&yr, &r).backward().unwrap();
    let mut all: Vec<&Var> = vars.to_vec();
    all.push(&r);
    assert_only_vars(&gf, &all, what);
    for (i, v) in vars.iter().enumerate() {
        let a = gf.get(v.as_tensor()).unwrap();
        let b = gr.get(v.as_tensor()).unwrap();
        assert_close(a, b, &format!("{what} grad of input {i}"));
    }
    gr.get_ids().count()
}

#[test]
fn rms_norm_matches_composite() {
    for (k, shape) in [
        vec![2, 7, 13],
        vec![3, 576],
        vec![1, 5, 64],
        vec![4, 1, 3],
        vec![2, 150, 576],
    ]
    .into_iter()
    .enumerate()
    {
        let d = *shape.last().unwrap();
        let w = (randn(&[d], 10 + k as u64, 0.3) + 1.0).unwrap();
        let x = var(&shape, k as u64, 2.0);
        let composite_entries = check(
            &format!("rms_norm {shape:?}"),
            &[&x],
            |i| rms_norm(&i[0], &w, 1e-6),
            |i| rms_norm_reference(&i[0], &w, 1e-6),
        );
        // The composite stores a gradient for the weight; the fused op does not.
        assert!(
            composite_entries > 2,
            "composite store should hold a weight gradient"
        );
    }
}

#[test]
fn rms_norm_non_contiguous_input() {
    let w = randn(&[6], 3, 1.0);
    let x = var(&[6, 5], 4, 1.0);
    check(
        "rms_norm transposed",
        &[&x],
        |i| rms_norm(&i[0].t()?, &w, 1e-5),
        |i| rms_norm_reference(&i[0].t()?, &w, 1e-5),
    );
}

#[test]
fn layer_norm_matches_composite() {
    for (k, shape) in [vec![2, 7, 13], vec![4, 384], vec![3, 1, 5]]
        .into_iter()
        .enumerate()
    {
        let d = *shape.last().unwrap();
        let w = (randn(&[d], 20 + k as u64, 0.3) + 1.0).unwrap();
        let b = randn(&[d], 30 + k as u64, 0.5);
        // An offset mean, as residual streams have.
        let x = Var::from_tensor(&(randn(&shape, k as u64, 2.0) + 3.0).unwrap()).unwrap();
        let composite_entries = check(
            &format!("layer_norm {shape:?}"),
            &[&x],
            |i| layer_norm(&i[0], &w, &b, 1e-12),
            |i| layer_norm_reference(&i[0], &w, &b, 1e-12),
        );
        assert!(composite_entries > 2);
    }
}

#[test]
fn residual_layer_norm_matches_composite() {
    // 4 × 384 rows as BERT's; 3 × 1 × 5 a single row per batch.
    for (k, shape) in [vec![2, 7, 13], vec![4, 384], vec![3, 1, 5]]
        .into_iter()
        .enumerate()
    {
        let d = *shape.last().unwrap();
        let w = (randn(&[d], 40 + k as u64, 0.3) + 1.0).unwrap();
        let b = randn(&[d], 50 + k as u64, 0.5);
        let x = Var::from_tensor(&(randn(&shape, 60 + k as u64, 2.0) + 3.0).unwrap()).unwrap();
        let sub = var(&shape, 70 + k as u64, 1.0);
        check(
            &format!("add_layer_norm {shape:?}"),
            &[&sub, &x],
            |i| add_layer_norm(&i[0], &i[1], &w, &b, 1e-12),
            |i| layer_norm_reference(&(&i[0] + &i[1])?, &w, &b, 1e-12),
        );
    }
    // An untracked input gets no gradient entry.
    let (w, b) = (
        Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
    );
    let x = var(&[3, 8], 80, 1.0);
    let constant = randn(&[3, 8], 81, 1.0);
    let r = var(&[3, 8], 82, 1.0);
    let grads = project(
        &add_layer_norm(x.as_tensor(), &constant, &w, &b, 1e-12).unwrap(),
        &r,
    )
    .backward()
    .unwrap();
    assert_only_vars(&grads, &[&x, &r], "add_layer_norm with a constant input");
}

#[test]
fn trained_norm_weights_and_biases_get_the_composite_gradients() {
    // LN tuning / bias="all": the weight and bias are variables; the fused normalisation plus an
    // affine part must give the composite's gradients for x, w and b.
    for (k, shape) in [vec![2, 7, 13], vec![4, 384]].into_iter().enumerate() {
        let d = *shape.last().unwrap();
        let w = Var::from_tensor(&(randn(&[d], 90 + k as u64, 0.3) + 1.0).unwrap()).unwrap();
        let b = var(&[d], 95 + k as u64, 0.5);
        let x = Var::from_tensor(&(randn(&shape, 100 + k as u64, 2.0) + 3.0).unwrap()).unwrap();
        let sub = var(&shape, 105 + k as u64, 1.0);
        check(
            &format!("rms_norm, trained weight {shape:?}"),
            &[&x, &w],
            |i| rms_norm(&i[0], &i[1], 1e-6),
            |i| rms_norm_reference(&i[0], &i[1], 1e-6),
        );
        check(
            &format!("layer_norm, trained weight and bias {shape:?}"),
            &[&x, &w, &b],
            |i| layer_norm(&i[0], &i[1], &i[2], 1e-12),
            |i| layer_norm_reference(&i[0], &i[1], &i[2], 1e-12),
        );
        check(
            &format!("add_layer_norm, trained weight and bias {shape:?}"),
            &[&sub, &x, &w, &b],
            |i| add_layer_norm(&i[0], &i[1], &i[2], &i[3], 1e-12),
            |i| layer_norm_reference(&(&i[0] + &i[1])?, &i[2], &i[3], 1e-12),
        );
    }
}

#[test]
fn rope_matches_composite() {
    for (k, (b, h, t, d, offset)) in [
        (2, 3, 7, 10, 0),
        (2, 3, 7, 10, 5),
        (1, 9, 5, 64, 0),
        (2, 2, 1, 6, 30),
        (2, 4, 100, 64, 17),
    ]
    .into_iter()
    .enumerate()
    {
        let rope = Rope::new(d, 128, 10000.0, &RopeScaling::Default, &Device::Cpu).unwrap();
        let x = var(&[b, t, h * d], 40 + k as u64, 1.0);
        let entries = check(
            &format!("rope {:?}", (b, h, t, d, offset)),
            &[&x],
            |i| rope.apply(&i[0], offset),
            |i| rope.apply_reference(&i[0], offset),
        );
        assert!(
            entries > 2,
            "composite store should hold gradients for the tables"
        );
    }
    // Still refuses positions beyond the table.
    let rope = Rope::new(8, 4, 10000.0, &RopeScaling::Default, &Device::Cpu).unwrap();
    assert!(rope.apply(&randn(&[1, 3, 8], 1, 1.0), 2).is_err());
}

fn left_padding(b: usize, s: usize, pads: &[usize]) -> Tensor {
    let mut p = vec![1u32; b * s];
    for (i, &n) in pads.iter().enumerate() {
        for j in 0..n {
            p[i * s + j] = 0;
        }
    }
    Tensor::from_vec(p, (b, s), &Device::Cpu).unwrap()
}

#[test]
fn attention_matches_composite() {
    let dev = Device::Cpu;
    // (b, h, h_kv, t, s, d, mask kind, padded positions per row)
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        Option<MaskKind>,
        Vec<usize>,
    );
    let cases: Vec<Case> = vec![
        // causal + left padding: the first query of row 1 sees only padding (fully masked row)
        (
            2,
            6,
            2,
            7,
            7,
            10,
            Some(MaskKind::Causal {
                sliding_window: None,
            }),
            vec![0, 2],
        ),
        // SmolLM-like heads, causal without padding ([1, 1, t, s] mask)
        (
            1,
            9,
            3,
            13,
            13,
            64,
            Some(MaskKind::Causal {
                sliding_window: None,
            }),
            vec![],
        ),
        // sliding window, multi-head without grouping
        (
            2,
            4,
            4,
            9,
            9,
            8,
            Some(MaskKind::Causal {
                sliding_window: Some(3),
            }),
            vec![1, 0],
        ),
        // bidirectional with padding: mask [b, 1, 1, s]
        (
            3,
            4,
            4,
            5,
            5,
            12,
            Some(MaskKind::Bidirectional),
            vec![0, 3, 5],
        ),
        // queries after a cache: t < s
        (
            2,
            6,
            3,
            3,
            11,
            16,
            Some(MaskKind::Causal {
                sliding_window: None,
            }),
            vec![4, 0],
        ),
        // large enough to be split over threads: rows map to mask rows from their global index
        (
            2,
            6,
            2,
            64,
            64,
            16,
            Some(MaskKind::Causal {
                sliding_window: None,
            }),
            vec![5, 40],
        ),
        // no mask
        (2, 4, 2, 6, 6, 7, None, vec![]),
    ];
    for (k, (b, h, h_kv, t, s, d, kind, pads)) in cases.into_iter().enumerate() {
        let padding = if pads.is_empty() {
            None
        } else {
            Some(left_padding(b, s, &pads))
        };
        let mask = match kind {
            Some(kind) => build_mask(kind, t, s, padding.as_ref(), &dev).unwrap(),
            None => None,
        };
        let q = var(&[b, t, h * d], 100 + k as u64, 1.5);
        let kk = var(&[b, s, h_kv * d], 200 + k as u64, 1.5);
        let v = var(&[b, s, h_kv * d], 300 + k as u64, 1.0);
        let scale = 1.0 / (d as f64).sqrt();
        let what = format!("attention case {k}");
        check(
            &what,
            &[&q, &kk, &v],
            |i| attention(&i[0], &i[1], &i[2], h, mask.as_ref(), scale),
            |i| attention_reference(&i[0], &i[1], &i[2], h, mask.as_ref(), scale),
        );
    }
}

#[test]
fn attention_fully_masked_query_averages_values() {
    // Left padding under a causal mask: the first query of batch row 1 may see only key 0,
    // which is padding, so its scores are all masked. It then attends uniformly (a finite
    // mean of the values, never NaN), as the composite does.
    let dev = Device::Cpu;
    let (b, h, h_kv, t, d) = (2, 4, 2, 5, 8);
    let padding = left_padding(b, t, &[0, 2]);
    let mask = build_mask(
        MaskKind::Causal {
            sliding_window: None,
        },
        t,
        t,
        Some(&padding),
        &dev,
    )
    .unwrap()
    .unwrap();
    assert!(mask
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .contains(&MASKED));
    let q = var(&[b, t, h * d], 1, 2.0);
    let k = var(&[b, t, h_kv * d], 2, 2.0);
    let v = var(&[b, t, h_kv * d], 3, 1.0);
    let scale = 0.37;
    check(
        "attention, fully masked row",
        &[&q, &k, &v],
        |i| attention(&i[0], &i[1], &i[2], h, Some(&mask), scale),
        |i| attention_reference(&i[0], &i[1], &i[2], h, Some(&mask), scale),
    );
    let y = attention(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        h,
        Some(&mask),
        scale,
    )
    .unwrap();
    for head in 0..h {
        let got = y
            .get(1)
            .unwrap()
            .get(0)
            .unwrap()
            .narrow(0, head * d, d)
            .unwrap();
        let mean = v
            .as_tensor()
            .get(1)
            .unwrap()
            .narrow(1, head / (h / h_kv) * d, d)
            .unwrap()
            .mean(0)
            .unwrap();
        assert_close(&got, &mean, &format!("head {head}, fully masked query"));
    }
}

#[test]
fn attention_long_keys_use_several_query_tiles() {
    // 300 keys: the fused op cuts the 300 queries into tiles of 54 rows (the last one partial);
    // the sliding window lets each tile skip the keys before its window (key_range).
    let dev = Device::Cpu;
    let (b, h, h_kv, t, d) = (1, 2, 1, 300, 8);
    let padding = left_padding(b, t, &[7]);
    let mask = build_mask(
        MaskKind::Causal {
            sliding_window: Some(40),
        },
        t,
        t,
        Some(&padding),
        &dev,
    )
    .unwrap();
    let q = var(&[b, t, h * d], 11, 1.5);
    let k = var(&[b, t, h_kv * d], 12, 1.5);
    let v = var(&[b, t, h_kv * d], 13, 1.0);
    check(
        "attention, 300 positions",
        &[&q, &k, &v],
        |i| attention(&i[0], &i[1], &i[2], h, mask.as_ref(), 0.35),
        |i| attention_reference(&i[0], &i[1], &i[2], h, mask.as_ref(), 0.35),
    );
}

/// Composite attention of each sequence alone (its own `[len, before + len]` mask over the
/// `before` keys that precede it and its own), concatenated.
#[allow(clippy::too_many_arguments)]
fn attention_each_alone(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    h: usize,
    lens: &[usize],
    before: usize,
    kind: MaskKind,
    scale: f64,
) -> Result<Tensor> {
    let mut outs = vec![];
    let (mut q0, mut k0) = (0, 0);
    for &len in lens {
        let s = before + len;
        let mask = build_mask(kind, len, s, None, &Device::Cpu)?;
        outs.push(attention_reference(
            &q.narrow(1, q0, len)?,
            &k.narrow(1, k0, s)?,
            &v.narrow(1, k0, s)?,
            h,
            mask.as_ref(),
            scale,
        )?);
        (q0, k0) = (q0 + len, k0 + s);
    }
    Tensor::cat(&outs, 1)
}

#[test]
fn attention_varlen_matches_each_sequence_alone() {
    // (h, h_kv, d, lengths, keys before each sequence, mask kind): sequences end to end in one
    // row, against the composite of each sequence on its own (with the keys before it, as a
    // prefix-tuning prefix); values and the gradients of q, k and v. A query that saw another
    // sequence's keys would change its output and fail this.
    let causal = MaskKind::Causal {
        sliding_window: None,
    };
    let window = MaskKind::Causal {
        sliding_window: Some(3),
    };
    let cases: Vec<(usize, usize, usize, Vec<usize>, usize, MaskKind)> = vec![
        (6, 2, 10, vec![7, 3, 1, 12], 0, causal),
        (9, 3, 64, vec![13, 13, 5], 0, causal),
        (4, 4, 8, vec![9, 2, 6], 0, window),
        (4, 4, 12, vec![5, 8, 1, 3], 0, MaskKind::Bidirectional),
        // a 300-token sequence spans several query tiles, next to short ones
        (2, 1, 8, vec![4, 300, 17], 0, causal),
        (1, 1, 8, vec![1], 0, causal),
        // keys before each sequence: causal, a window shorter than them, bidirectional
        (6, 2, 10, vec![7, 3, 1, 12], 3, causal),
        (4, 4, 8, vec![9, 2, 6], 4, window),
        (4, 2, 12, vec![5, 8, 1], 2, MaskKind::Bidirectional),
    ];
    for (c, (h, h_kv, d, lens, before, kind)) in cases.into_iter().enumerate() {
        let n: usize = lens.iter().sum();
        let kv = n + before * lens.len();
        let q = var(&[1, n, h * d], 400 + c as u64, 1.5);
        let k = var(&[1, kv, h_kv * d], 500 + c as u64, 1.5);
        let v = var(&[1, kv, h_kv * d], 600 + c as u64, 1.0);
        let scale = 1.0 / (d as f64).sqrt();
        check(
            &format!("varlen attention case {c} {lens:?}, {before} keys before"),
            &[&q, &k, &v],
            |i| attention_varlen(&i[0], &i[1], &i[2], h, &lens, before, kind, scale),
            |i| attention_each_alone(&i[0], &i[1], &i[2], h, &lens, before, kind, scale),
        );
    }
}

#[test]
fn attention_varlen_refuses_lengths_that_do_not_cover_the_row() {
    let q = randn(&[1, 6, 8], 1, 1.0);
    for lens in [vec![2, 3], vec![6, 0], vec![3, 4]] {
        let err = attention_varlen(&q, &q, &q, 2, &lens, 0, MaskKind::Bidirectional, 0.5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not hold sequences"), "{lens:?}: {err}");
    }
}

#[test]
fn rope_at_positions_equals_rope_per_sequence() {
    // Positions restarting at each sequence of a padding-free row: the same rotation as
    // applying rope to each sequence from offset 0; gradients against the composite.
    let rope = Rope::new(8, 64, 10000.0, &RopeScaling::Default, &Device::Cpu).unwrap();
    let lens = [5usize, 1, 9];
    let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
    let x = var(&[1, 15, 3 * 8], 77, 1.0);
    let per_seq = |x: &Tensor| -> Result<Tensor> {
        let mut start = 0;
        let mut outs = vec![];
        for &l in &lens {
            outs.push(rope.apply_reference(&x.narrow(1, start, l)?, 0)?);
            start += l;
        }
        Tensor::cat(&outs, 1)
    };
    check(
        "rope at positions",
        &[&x],
        |i| rope.apply_at(&i[0], &positions),
        |i| per_seq(&i[0]),
    );
    let err = rope
        .apply_at(x.as_tensor(), &[64; 15])
        .unwrap_err()
        .to_string();
    assert!(err.contains("position 64 exceeds"), "{err}");
}

#[test]
fn swiglu_matches_composite() {
    // Gate values out to ±12 reach both saturated ends of the sigmoid; 70,001 elements are
    // split over threads with a partial last chunk.
    for (k, shape) in [vec![2, 5, 7], vec![7, 10_001]].into_iter().enumerate() {
        let g = var(&shape, 60 + k as u64, 4.0);
        let u = var(&shape, 70 + k as u64, 1.0);
        check(
            &format!("swiglu {shape:?}"),
            &[&g, &u],
            |i| swiglu(&i[0], &i[1]),
            |i| swiglu_reference(&i[0], &i[1]),
        );
    }
}

#[test]
fn low_rank_linear_matches_composite() {
    // (leading dims, in, out, r, bias, quantized base)
    let cases = [
        (vec![2, 7], 24, 40, 4, true, false),
        (vec![9], 64, 16, 8, false, true),
        (vec![3, 5], 576, 192, 8, false, false),
    ];
    for (k, (lead, i, o, r, bias, quantized)) in cases.into_iter().enumerate() {
        let w = randn(&[o, i], 80 + k as u64, 0.2);
        let b = bias.then(|| randn(&[o], 90 + k as u64, 0.5));
        let base = if quantized {
            let vals = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = Blockwise4::quantize(&vals, &[o, i], Code4::Nf4, 64, true).unwrap();
            FrozenLinear::from_weight(
                FrozenWeight::Quantized(Arc::new(q), ferrule::ops::ComputeDtype::F32),
                b,
            )
        } else {
            FrozenLinear::new(w, b).unwrap()
        };
        let mut shape = lead.clone();
        shape.push(i);
        let x = var(&shape, 100 + k as u64, 1.0);
        let a = var(&[r, i], 110 + k as u64, 0.3);
        let bm = var(&[o, r], 120 + k as u64, 0.3);
        let scale = 2.0;
        check(
            &format!("low-rank linear case {k}"),
            &[&x, &a, &bm],
            |t| low_rank_linear(&t[0], None, &base, &t[1], &t[2], scale),
            |t| low_rank_linear_reference(&t[0], None, &base, &t[1], &t[2], scale),
        );
        // LoRA dropout: p = 0.3, the mask kept as a constant (scaled 1/0.7 or 0).
        let mask = ferrule::tuners::training_clock::dropout_mask(x.as_tensor(), 0.3, 7 + k as u64)
            .unwrap()
            .unwrap();
        let kept = mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            kept.contains(&0.0) && kept.iter().any(|&v| v > 1.0),
            "mask drops some and scales the rest"
        );
        check(
            &format!("low-rank linear case {k} with dropout"),
            &[&x, &a, &bm],
            |t| low_rank_linear(&t[0], Some(&mask), &base, &t[1], &t[2], scale),
            |t| low_rank_linear_reference(&t[0], Some(&mask), &base, &t[1], &t[2], scale),
        );
    }
}

#[test]
fn dora_linear_matches_composite() {
    // (leading dims, in, out, r, bias, quantized base)
    let cases = [
        (vec![2, 7], 24, 40, 4, true, false),
        (vec![9], 64, 16, 8, false, true),
        (vec![3, 5], 96, 72, 8, true, true),
    ];
    for (k, (lead, i, o, r, bias, quantized)) in cases.into_iter().enumerate() {
        let full = frozen(o, i, 200 + k as u64, bias, quantized);
        let bias_t = full.bias().cloned();
        let base = FrozenLinear::from_weight(full.weight().clone(), None);
        let mut shape = lead.clone();
        shape.push(i);
        let x = var(&shape, 210 + k as u64, 1.0);
        let a = var(&[r, i], 220 + k as u64, 0.3);
        let b = var(&[o, r], 230 + k as u64, 0.3);
        let scale = 2.0;
        // The norm against a dense computation of ‖W₀ + s·B A‖_row.
        let w0_sq = row_sq_norms(base.weight(), &Device::Cpu).unwrap();
        let norm = weight_norm(&base, &w0_sq, a.as_tensor(), b.as_tensor(), scale).unwrap();
        let dense = base.weight().to_dense(&Device::Cpu).unwrap();
        let want = (dense + (b.as_tensor().matmul(a.as_tensor()).unwrap() * scale).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap();
        assert_close(&norm, &want, &format!("dora weight norm case {k}"));
        let m = Var::from_tensor(
            &norm
                .mul(&(randn(&[o], 240 + k as u64, 0.2) + 1.0).unwrap())
                .unwrap(),
        )
        .unwrap();
        let vars = [&x, &a, &b, &m];
        check(
            &format!("dora linear case {k}"),
            &vars,
            |t| {
                dora_linear(
                    &t[0],
                    None,
                    &base,
                    bias_t.as_ref(),
                    &norm,
                    &t[1],
                    &t[2],
                    &t[3],
                    scale,
                )
            },
            |t| {
                dora_linear_reference(
                    &t[0],
                    None,
                    &base,
                    bias_t.as_ref(),
                    &norm,
                    &t[1],
                    &t[2],
                    &t[3],
                    scale,
                )
            },
        );
        let mask = ferrule::tuners::training_clock::dropout_mask(x.as_tensor(), 0.3, 9 + k as u64)
            .unwrap()
            .unwrap();
        check(
            &format!("dora linear case {k} with dropout"),
            &vars,
            |t| {
                dora_linear(
                    &t[0],
                    Some(&mask),
                    &base,
                    bias_t.as_ref(),
                    &norm,
                    &t[1],
                    &t[2],
                    &t[3],
                    scale,
                )
            },
            |t| {
                dora_linear_reference(
                    &t[0],
                    Some(&mask),
                    &base,
                    bias_t.as_ref(),
                    &norm,
                    &t[1],
                    &t[2],
                    &t[3],
                    scale,
                )
            },
        );
    }
}

#[test]
fn scaled_linear_matches_composite() {
    // (leading dims, in, out, bias, quantized), both sides of the scale.
    let cases = [
        (vec![2, 7], 24, 40, true, false),
        (vec![9], 64, 16, false, true),
        (vec![3, 5], 96, 72, true, true),
    ];
    for (k, (lead, i, o, bias, quantized)) in cases.into_iter().enumerate() {
        let base = frozen(o, i, 400 + k as u64, bias, quantized);
        let mut shape = lead.clone();
        shape.push(i);
        let x = var(&shape, 410 + k as u64, 1.0);
        for (input_side, n) in [(false, o), (true, i)] {
            let l = var(&[n, 1], 420 + k as u64, 1.0);
            check(
                &format!("scaled linear case {k}, input side {input_side}"),
                &[&x, &l],
                |t| scaled_linear(&t[0], &base, &t[1], input_side),
                |t| scaled_linear_reference(&t[0], &base, &t[1], input_side),
            );
        }
    }
}

/// A frozen `[o, i]` linear with random weights, NF4-quantized (blocksize 64) when asked.
fn frozen(o: usize, i: usize, seed: u64, bias: bool, quantized: bool) -> FrozenLinear {
    let w = randn(&[o, i], seed, 0.2);
    let b = bias.then(|| randn(&[o], seed + 1, 0.5));
    if quantized {
        let vals = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = Blockwise4::quantize(&vals, &[o, i], Code4::Nf4, 64, true).unwrap();
        FrozenLinear::from_weight(
            FrozenWeight::Quantized(Arc::new(q), ferrule::ops::ComputeDtype::F32),
            b,
        )
    } else {
        FrozenLinear::new(w, b).unwrap()
    }
}

#[test]
fn frozen_mlp_matches_composite() {
    use candle_core::Module;
    // (leading dims, hidden, intermediate, bias, quantized); 7·3000 intermediate values
    // span several parallel chunks with a partial last one.
    let cases = [
        (vec![2, 5], 24, 40, true, false),
        (vec![9], 64, 128, false, true),
        (vec![7], 32, 3000, false, false),
    ];
    for (k, (lead, h, inter, bias, quantized)) in cases.into_iter().enumerate() {
        let s = 200 + 10 * k as u64;
        let (gate, up, down) = (
            frozen(inter, h, s, bias, quantized),
            frozen(inter, h, s + 2, bias, quantized),
            frozen(h, inter, s + 4, bias, quantized),
        );
        let mut shape = lead.clone();
        shape.push(h);
        let x = var(&shape, s + 6, 1.0);
        check(
            &format!("swiglu MLP case {k}"),
            &[&x],
            |t| swiglu_mlp(&t[0], &gate, &up, &down),
            |t| {
                down.forward(&swiglu_reference(
                    &gate.forward(&t[0])?,
                    &up.forward(&t[0])?,
                )?)
            },
        );
        check(
            &format!("gelu MLP case {k}"),
            &[&x],
            |t| gelu_mlp(&t[0], &up, &down),
            |t| down.forward(&gelu(&up.forward(&t[0])?)?),
        );
        // IA3 on the down projection: its input scaled by a trainable l: [1, intermediate].
        let l = var(&[1, inter], s + 8, 1.0);
        check(
            &format!("swiglu MLP case {k}, down input scaled"),
            &[&x, &l],
            |t| swiglu_mlp_scaled(&t[0], &gate, &up, &down, Some(&t[1])),
            |t| {
                down.forward(
                    &swiglu_reference(&gate.forward(&t[0])?, &up.forward(&t[0])?)?
                        .broadcast_mul(&t[1])?,
                )
            },
        );
        check(
            &format!("gelu MLP case {k}, down input scaled"),
            &[&x, &l],
            |t| gelu_mlp_scaled(&t[0], &up, &down, Some(&t[1])),
            |t| down.forward(&gelu(&up.forward(&t[0])?)?.broadcast_mul(&t[1])?),
        );
    }
}

/// The op hands its kept pre-activations to the first backward; a second backward over the
/// same graph recomputes them and gives the same gradient.
#[test]
fn frozen_mlp_second_backward_recomputes() {
    let (gate, up, down) = (
        frozen(48, 16, 300, true, false),
        frozen(48, 16, 302, true, false),
        frozen(16, 48, 304, true, false),
    );
    let x = var(&[3, 16], 306, 1.0);
    let r = var(&[3, 16], 307, 1.0);
    for y in [
        swiglu_mlp(x.as_tensor(), &gate, &up, &down).unwrap(),
        gelu_mlp(x.as_tensor(), &up, &down).unwrap(),
    ] {
        let loss = project(&y, &r);
        let first = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let second = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        assert_close(&second, &first, "second backward");
    }
}

fn labels(n: usize, v: usize, seed: u64, ignore_every: usize) -> Vec<i64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            if ignore_every > 0 && i % ignore_every == 1 {
                IGNORE_INDEX
            } else {
                rng.gen_range(0..v as i64)
            }
        })
        .collect()
}

#[test]
fn cross_entropy_matches_composite() {
    for (k, (n, v, ignore_every)) in [(37, 1001, 3), (5, 7, 0), (16, 49, 2)]
        .into_iter()
        .enumerate()
    {
        let y = Tensor::new(labels(n, v, k as u64, ignore_every), &Device::Cpu).unwrap();
        let x = var(&[n, v], 500 + k as u64, 4.0);
        let (lf, cf) = cross_entropy(x.as_tensor(), &y).unwrap();
        let (lr, cr) = cross_entropy_reference(x.as_tensor(), &y).unwrap();
        assert_eq!(cf, cr);
        assert_close(&lf, &lr, "cross_entropy loss");
        let gf = lf.backward().unwrap();
        let gr = lr.backward().unwrap();
        assert_only_vars(&gf, &[&x], "cross_entropy");
        assert_close(
            gf.get(x.as_tensor()).unwrap(),
            gr.get(x.as_tensor()).unwrap(),
            "cross_entropy grad",
        );
        // Scaled upstream gradient (loss · 2.5) flows through.
        let gf = (&lf * 2.5).unwrap().backward().unwrap();
        let gr = (&lr * 2.5).unwrap().backward().unwrap();
        assert_close(
            gf.get(x.as_tensor()).unwrap(),
            gr.get(x.as_tensor()).unwrap(),
            "cross_entropy scaled grad",
        );
    }
}

#[test]
fn causal_lm_loss_matches_composite() {
    for (k, (b, t, v)) in [(3, 9, 517), (2, 2, 33), (1, 12, 1024)]
        .into_iter()
        .enumerate()
    {
        let y = Tensor::from_vec(labels(b * t, v, 60 + k as u64, 4), (b, t), &Device::Cpu).unwrap();
        let x = var(&[b, t, v], 600 + k as u64, 3.0);
        let (lf, cf) = causal_lm_loss(x.as_tensor(), &y).unwrap();
        let (lr, cr) = causal_lm_loss_reference(x.as_tensor(), &y).unwrap();
        assert_eq!(cf, cr);
        assert_close(&lf, &lr, "causal_lm_loss");
        let gf = lf.backward().unwrap();
        let gr = lr.backward().unwrap();
        assert_only_vars(&gf, &[&x], "causal_lm_loss");
        assert_close(
            gf.get(x.as_tensor()).unwrap(),
            gr.get(x.as_tensor()).unwrap(),
            "causal_lm_loss grad",
        );
    }
}

#[test]
fn loss_with_nothing_counted_is_zero() {
    let x = var(&[2, 4, 11], 1, 1.0);
    let y = Tensor::full(IGNORE_INDEX, (2, 4), &Device::Cpu).unwrap();
    let (l, c) = causal_lm_loss(x.as_tensor(), &y).unwrap();
    assert_eq!(c, 0);
    assert_eq!(l.to_scalar::<f32>().unwrap(), 0.0);
    let g = l.backward().unwrap();
    let g = g
        .get(x.as_tensor())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(g, 0.0);
    // A single position: nothing to predict.
    let (l, c) = causal_lm_loss(
        &randn(&[2, 1, 11], 2, 1.0),
        &Tensor::zeros((2, 1), DType::I64, &Device::Cpu).unwrap(),
    )
    .unwrap();
    assert_eq!((l.to_scalar::<f32>().unwrap(), c), (0.0, 0));
    // Out-of-range labels are an error, as in torch.
    assert!(cross_entropy(
        &randn(&[2, 5], 3, 1.0),
        &Tensor::new(&[1i64, 5], &Device::Cpu).unwrap()
    )
    .is_err());
}

#[test]
fn other_dtypes_take_the_composite_path() {
    let x = randn(&[3, 8], 1, 1.0).to_dtype(DType::F64).unwrap();
    let w = (randn(&[8], 2, 0.3) + 1.0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let eps = 1e-6;
    let a = rms_norm(&x, &w, eps).unwrap();
    assert_eq!(a.dtype(), DType::F64);
    // Against RMSNorm written out in f64 loops, `w · x / sqrt(mean(x²) + eps)` (not against
    // `rms_norm_reference`, which is what this path runs).
    let (xs, ws) = (x.to_vec2::<f64>().unwrap(), w.to_vec1::<f64>().unwrap());
    let by_hand: Vec<Vec<f64>> = xs
        .iter()
        .map(|row| {
            let inv =
                1.0 / (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + eps).sqrt();
            row.iter().zip(&ws).map(|(v, w)| v * inv * w).collect()
        })
        .collect();
    let got = a.to_vec2::<f64>().unwrap();
    for (i, (g, h)) in got
        .iter()
        .flatten()
        .zip(by_hand.iter().flatten())
        .enumerate()
    {
        // The composite computes in f32: a few f32 ulps.
        assert!(
            (g - h).abs() <= 1e-6 * h.abs().max(1e-3),
            "f64 rms_norm[{i}]: {g} vs by hand {h}"
        );
    }
}
