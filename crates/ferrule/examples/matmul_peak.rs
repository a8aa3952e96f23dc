//! The machine's f32 matmul throughput on the products of a training step, for the "fraction
//! of peak" figures in BENCHMARKS.md: candle's matmul (the gemm crate) beside ferrule's frozen
//! linear (`x Wᵀ`, through `ops::blas`: the system BLAS when one is found).
//!
//! The bf16 column is oneDNN's bf16 matmul (`ops::onednn`) on the same product with both
//! operands already in bf16 and f32 accumulation, the candidate for `--compute-dtype bf16`
//! (issue 24); its last row, a 2048³ product, is the machine's bf16 peak as far as oneDNN
//! reaches it (AMX tiles where the CPU has them, `avx512_bf16` on Zen 4).
//!
//! `cargo run --release --example matmul_peak`; `FERRULE_BLAS=off` (gemm crate) or a library
//! name (`libblis.so.4`, `libopenblas.so.0`) picks the frozen linear's backend.

use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use ferrule::ops::onednn::{self, Bf16Matrix};
use ferrule::ops::FrozenLinear;
use half::bf16;

/// Median GFLOP/s of `f` computing an `m × k · k × n` product.
fn gflops(m: usize, k: usize, n: usize, mut f: impl FnMut()) -> f64 {
    let reps = if n > 10000 { 3 } else { 9 };
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    2.0 * (m * k * n) as f64 / times[reps / 2] / 1e9
}

fn main() {
    let dev = Device::Cpu;
    println!(
        "threads: {}, frozen linear's backend: {}",
        candle_core::utils::get_num_threads(),
        ferrule::ops::blas::backend()
    );
    let dnnl = onednn::library();
    println!("bf16: {}", dnnl.unwrap_or_else(|why| why));
    println!("| m × k → n | candle matmul | frozen linear (f32) | oneDNN bf16 |");
    // MiniLM (4096 rows: 32 × 128) and SmolLM2 (2048 rows: 8 × 256) forward shapes; the
    // backward's dX products have the same sizes with k and n swapped. (The vocabulary head
    // is left out: training computes it in tiles, ops/head_loss.rs.)
    for (m, k, n) in [
        (1024, 1024, 1024),
        (4096, 384, 384),
        (4096, 384, 1536),
        (4096, 1536, 384),
        (2048, 576, 576),
        (2048, 576, 1536),
        (2048, 1536, 576),
        // The 1.07B Llama's (hidden 2048, intermediate 5632) at 4 × 256 tokens.
        (1024, 2048, 2048),
        (1024, 2048, 5632),
        (1024, 5632, 2048),
        (2048, 2048, 2048),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        let candle = gflops(m, k, n, || drop(x.matmul(&wt).unwrap()));
        let lin = FrozenLinear::new(w.clone(), None).unwrap();
        let ours = gflops(m, k, n, || drop(lin.forward(&x).unwrap()));
        let bf16 = if dnnl.is_ok() {
            let round = |t: &Tensor| -> Vec<bf16> {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.into_iter().map(bf16::from_f32).collect()
            };
            let (xb, wb) = (round(&x), round(&w));
            let mut out = vec![0f32; m * n];
            let rate = gflops(m, k, n, || {
                let a = Bf16Matrix {
                    data: &xb,
                    rows: m,
                    cols: k,
                    transposed: false,
                };
                // W is n x k: used as its transpose, k x n.
                let b = Bf16Matrix {
                    data: &wb,
                    rows: k,
                    cols: n,
                    transposed: true,
                };
                onednn::bf16_matmul(a, b, &mut out, false).unwrap()
            });
            format!("{rate:.1} GFLOP/s")
        } else {
            "-".to_string()
        };
        println!("| {m} × {k} → {n} | {candle:.1} GFLOP/s | {ours:.1} GFLOP/s | {bf16} |");
    }
    for (shape, implementation) in onednn::implementations() {
        println!("oneDNN {shape}: {implementation}");
    }
}
