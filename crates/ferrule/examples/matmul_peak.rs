//! The machine's f32 matmul throughput on the products of a training step, for the "fraction
//! of peak" figures in BENCHMARKS.md: candle's matmul (the gemm crate) beside ferrule's frozen
//! linear (`x Wᵀ`, through `ops::blas`: the system BLAS when one is found).
//!
//! `cargo run --release --example matmul_peak`; `FERRULE_BLAS=off` (gemm crate) or a library
//! name (`libblis.so.4`, `libopenblas.so.0`) picks the frozen linear's backend.

use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use ferrule::ops::FrozenLinear;

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
    println!("| m × k → n | candle matmul | frozen linear |");
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
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        let candle = gflops(m, k, n, || drop(x.matmul(&wt).unwrap()));
        let lin = FrozenLinear::new(w, None).unwrap();
        let ours = gflops(m, k, n, || drop(lin.forward(&x).unwrap()));
        println!("| {m} × {k} → {n} | {candle:.1} GFLOP/s | {ours:.1} GFLOP/s |");
    }
}
