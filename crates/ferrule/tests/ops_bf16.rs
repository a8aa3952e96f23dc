//! The bf16 product through oneDNN (`ops::onednn`) against an f64 reference on the same bf16
//! values, for every operand layout and with and without accumulation.
//!
//! Tolerance from the rounding model: the inputs are exactly representable (they are bf16), so
//! the only error is oneDNN's f32 accumulation, at most k·u·Σ|a_il·b_lj| with u = 2^-24 for
//! a sum of k products in any order (Higham, "Accuracy and Stability of Numerical
//! Algorithms", eq. 3.5, first order). The check allows 2k·u·Σ|a·b|: a layout or transpose
//! mistake is off by O(Σ|a·b|), many orders above it.

mod common;

use ferrule::ops::onednn::{bf16_matmul, library, Bf16Matrix};
use half::bf16;
use rand::{Rng, SeedableRng};

/// The library, or None (skip) where it is not installed and not required.
fn have_library() -> bool {
    match library() {
        Ok(name) => {
            eprintln!("oneDNN: {name}");
            true
        }
        Err(why) if common::assets_required() => {
            panic!("oneDNN is required here (scripts/install-deps.sh installs it): {why}")
        }
        Err(why) => {
            eprintln!("skipping: {why}");
            false
        }
    }
}

fn random_bf16(len: usize, rng: &mut impl Rng) -> Vec<bf16> {
    (0..len)
        .map(|_| bf16::from_f32(rng.gen_range(-2.0f32..2.0)))
        .collect()
}

/// Stores `rows × cols` row-major values, or their transpose.
fn layout(values: &[bf16], rows: usize, cols: usize, transposed: bool) -> Vec<bf16> {
    if !transposed {
        return values.to_vec();
    }
    let mut t = vec![bf16::ZERO; values.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = values[i * cols + j];
        }
    }
    t
}

#[test]
fn bf16_products_equal_f64_within_the_f32_accumulation_bound() {
    if !have_library() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (m, k, n) in [(37, 53, 29), (128, 256, 64), (1, 300, 17)] {
        let a = random_bf16(m * k, &mut rng);
        let b = random_bf16(k * n, &mut rng);
        let start: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        for (ta, tb, accumulate) in [
            (false, false, false),
            (false, true, false),
            (true, false, false),
            (true, true, true),
            (false, true, true),
        ] {
            let (a_store, b_store) = (layout(&a, m, k, ta), layout(&b, k, n, tb));
            let mut dst = start.clone();
            bf16_matmul(
                Bf16Matrix {
                    data: &a_store,
                    rows: m,
                    cols: k,
                    transposed: ta,
                },
                Bf16Matrix {
                    data: &b_store,
                    rows: k,
                    cols: n,
                    transposed: tb,
                },
                &mut dst,
                accumulate,
            )
            .unwrap();
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut magnitude) = (0f64, 0f64);
                    for l in 0..k {
                        let p = a[i * k + l].to_f64() * b[l * n + j].to_f64();
                        exact += p;
                        magnitude += p.abs();
                    }
                    if accumulate {
                        exact += start[i * n + j] as f64;
                        magnitude += (start[i * n + j] as f64).abs();
                    }
                    let bound = 2.0 * (k + 1) as f64 * 2f64.powi(-24) * magnitude + 1e-30;
                    let got = dst[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= bound,
                        "{m}x{k}.{k}x{n} (A^T {ta}, B^T {tb}, accumulate {accumulate}) at \
                         ({i},{j}): {got} vs {exact}, bound {bound:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn mismatched_sizes_are_errors_not_reads_past_the_buffer() {
    let a = vec![bf16::ONE; 6];
    let b = vec![bf16::ONE; 6];
    let mut dst = vec![0f32; 4];
    let err = bf16_matmul(
        Bf16Matrix {
            data: &a,
            rows: 2,
            cols: 3,
            transposed: false,
        },
        Bf16Matrix {
            data: &b,
            rows: 2,
            cols: 3,
            transposed: false,
        },
        &mut dst,
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("A is 2x3 but B is 2x3"), "{err}");
    let err = bf16_matmul(
        Bf16Matrix {
            data: &a[..5],
            rows: 2,
            cols: 3,
            transposed: false,
        },
        Bf16Matrix {
            data: &b,
            rows: 3,
            cols: 2,
            transposed: false,
        },
        &mut dst,
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("buffers of 5, 6 and 4"), "{err}");
}

#[test]
fn an_empty_inner_dimension_gives_zeros_or_keeps_dst() {
    if !have_library() {
        return;
    }
    let mut dst = vec![3f32; 6];
    let none: [bf16; 0] = [];
    let a = Bf16Matrix {
        data: &none,
        rows: 2,
        cols: 0,
        transposed: false,
    };
    let b = Bf16Matrix {
        data: &none,
        rows: 0,
        cols: 3,
        transposed: false,
    };
    bf16_matmul(a, b, &mut dst, true).unwrap();
    assert_eq!(dst, vec![3f32; 6]);
    bf16_matmul(a, b, &mut dst, false).unwrap();
    assert_eq!(dst, vec![0f32; 6]);
}
