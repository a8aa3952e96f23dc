//! Measures the machine's f32 matmul throughput through candle (gemm crate), for the
//! "fraction of peak" figures in BENCHMARKS.md. Run: `cargo run --release --example matmul_peak`.

use std::time::Instant;

use candle_core::{Device, Tensor};

fn gflops(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, (k, n), &dev).unwrap();
    let _ = a.matmul(&b).unwrap();
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let _ = a.matmul(&b).unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    2.0 * (m * k * n) as f64 / times[reps / 2] / 1e9
}

fn main() {
    println!("threads: {}", candle_core::utils::get_num_threads());
    for (m, k, n) in [(1024, 1024, 1024), (2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576), (2048, 576, 49152)] {
        println!("{m}x{k} @ {k}x{n}: {:.1} GFLOP/s (median)", gflops(m, k, n, if n > 10000 { 3 } else { 9 }));
    }
}
