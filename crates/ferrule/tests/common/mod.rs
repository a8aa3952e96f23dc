//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// Fetched real-model assets, or None (the test then says it was skipped).
pub fn asset(rel: &str) -> Option<PathBuf> {
    let p = std::env::var("FERRULE_ASSETS").map(PathBuf::from).unwrap_or_else(|_| repo_root().join("assets")).join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: asset {} missing (run scripts/fetch-assets.sh)", p.display());
        None
    }
}

pub fn load(rel: &str) -> HashMap<String, Tensor> {
    ferrule::model::weights::load_safetensors_file(&fixtures().join(rel), &Device::Cpu).unwrap()
}

/// Max |a − b| over positions where `mask` (`[b, t]`, 1 = real) is set; a and b are `[b, t, ...]`.
pub fn max_diff_masked(a: &Tensor, b: &Tensor, mask: Option<&Tensor>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
    let d = match mask {
        None => d,
        Some(m) => {
            let mut m = m.to_dtype(DType::F32).unwrap();
            while m.rank() < d.rank() {
                m = m.unsqueeze(m.rank()).unwrap();
            }
            d.broadcast_mul(&m).unwrap()
        }
    };
    d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
