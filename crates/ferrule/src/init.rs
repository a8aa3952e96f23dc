//! Seeded parameter initialisers. candle's CPU random generators cannot be seeded, and
//! training must be reproducible for a given seed, so these draw from a seeded generator.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Normal(0, std) tensor.
pub fn normal(shape: &[usize], std: f64, seed: u64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let dist = Normal::new(0f32, std as f32)?;
    let mut r = rng(seed);
    let v: Vec<f32> = (0..n).map(|_| dist.sample(&mut r)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Uniform(−bound, bound) tensor.
pub fn uniform(shape: &[usize], bound: f64, seed: u64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut r = rng(seed);
    let b = bound as f32;
    let v: Vec<f32> = (0..n).map(|_| r.gen_range(-b..=b)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// torch's `kaiming_uniform_(w, a)` for a `[fan_out, fan_in]` weight:
/// bound = gain · sqrt(3 / fan_in), gain = sqrt(2 / (1 + a²)).
pub fn kaiming_uniform(shape: &[usize], a: f64, seed: u64, device: &Device) -> Result<Tensor> {
    let fan_in = *shape.last().unwrap_or(&1) as f64;
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    uniform(shape, gain * (3.0 / fan_in).sqrt(), seed, device)
}

/// A stable 64-bit seed for a named parameter, so initialisation does not depend on the
/// order in which modules are visited (FNV-1a of the name, mixed with the run seed).
pub fn seed_for(run_seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ run_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
