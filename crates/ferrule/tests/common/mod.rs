//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod method;
pub mod rss;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// Whether a missing asset fails the test instead of skipping it: under CI (`CI` set to
/// anything but `false` / `0`, as CI services do) and in `scripts/test.sh`, which fetches the
/// assets first and sets `FERRULE_REQUIRE_ASSETS=1`.
pub fn assets_required() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    set("CI") || set("FERRULE_REQUIRE_ASSETS")
}

/// A fetched real-model asset under `$FERRULE_ASSETS` (default `<repo>/assets`), or None: the
/// test then says it was skipped. Where assets are required ([`assets_required`]) a missing
/// one panics, so a test cannot pass without what it checks.
pub fn asset(rel: &str) -> Option<PathBuf> {
    let p = std::env::var("FERRULE_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("assets"))
        .join(rel);
    if p.exists() {
        Some(p)
    } else if assets_required() {
        panic!(
            "asset {} missing (run scripts/fetch-assets.sh or set FERRULE_ASSETS)",
            p.display()
        )
    } else {
        eprintln!(
            "skipping: asset {} missing (run scripts/fetch-assets.sh)",
            p.display()
        );
        None
    }
}

/// Max |a − b| over two equally long slices; infinite when any value of either is NaN or
/// infinite, so a non-finite output fails every `diff < tol` check (`f32::max` and candle's
/// `max` skip NaN).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f32::INFINITY;
        }
        worst = worst.max((x - y).abs());
    }
    worst
}

/// [`max_abs_diff`] of two tensors of the same shape (any float dtype).
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_diff_masked(a, b, None)
}

pub fn load(rel: &str) -> HashMap<String, Tensor> {
    ferrule::model::weights::load_safetensors_file(&fixtures().join(rel), &Device::Cpu).unwrap()
}

/// Max |a − b| over positions where `mask` (`[b, t]`, 1 = real) is set; a and b are
/// `[b, t, ...]`. Infinite when a compared value is NaN or infinite ([`max_abs_diff`]).
pub fn max_diff_masked(a: &Tensor, b: &Tensor, mask: Option<&Tensor>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a_values, b_values) = (flat(a), flat(b));
    let Some(mask) = mask else {
        return max_abs_diff(&a_values, &b_values);
    };
    let keep = flat(mask);
    let per_position = a_values.len() / keep.len().max(1);
    let (a_kept, b_kept): (Vec<f32>, Vec<f32>) = a_values
        .chunks(per_position)
        .zip(b_values.chunks(per_position))
        .zip(&keep)
        .filter(|(_, &m)| m != 0.0)
        .flat_map(|((x, y), _)| x.iter().copied().zip(y.iter().copied()))
        .unzip();
    max_abs_diff(&a_kept, &b_kept)
}

/// A tensor's values as f64, flattened.
pub fn values_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// max |got − want| / max |want|: a whole-tensor relative error, so that entries near zero
/// (a moment's small components) do not need an absolute tolerance of their own.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape");
    let (g, w) = (values_f64(got), values_f64(want));
    let scale = w.iter().fold(0f64, |a, x| a.max(x.abs()));
    let diff = g.iter().zip(&w).fold(0f64, |a, (x, y)| {
        if (x - y).is_nan() {
            f64::INFINITY
        } else {
            a.max((x - y).abs())
        }
    });
    diff / scale
}

/// Trains `config(dir)` once through, and once in another folder stopped after `stop_after`
/// steps and resumed; asserts that both runs complete and write the same adapter bytes.
/// Returns the uninterrupted run's folder.
pub fn assert_resume_is_byte_identical(
    config: impl Fn(&std::path::Path) -> ferrule::train::TrainConfig,
    stop_after: usize,
) -> tempfile::TempDir {
    use ferrule::train::{train, RunOptions, Silent};
    let (whole, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dev = Device::Cpu;
    let run = |dir: &std::path::Path, options: RunOptions| {
        train(&config(dir), &dev, &mut Silent, &options).unwrap()
    };
    let s = run(whole.path(), RunOptions::default());
    assert!(s.completed && s.final_loss.is_some_and(f64::is_finite));
    let stop = RunOptions {
        stop_after: Some(stop_after),
        ..Default::default()
    };
    assert!(!run(split.path(), stop).completed, "the run did not stop");
    let resume = RunOptions {
        resume: true,
        ..Default::default()
    };
    assert!(run(split.path(), resume).completed);
    let bytes = |d: &std::path::Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        bytes(whole.path()),
        bytes(split.path()),
        "resumed run diverged"
    );
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_anywhere_fails_the_comparison() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.0, 2.5]), 0.5);
        assert_eq!(max_abs_diff(&[1.0, f32::NAN], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(max_abs_diff(&[f32::NAN, 1.0], &[1.0, 1.0]), f32::INFINITY);
        let a = Tensor::new(&[[[1f32, 2.0], [f32::NAN, 0.0]]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[[1f32, 2.25], [5.0, 0.0]]], &Device::Cpu).unwrap();
        assert_eq!(max_diff(&a, &b), f32::INFINITY);
        let only_first = Tensor::new(&[[1f32, 0.0]], &Device::Cpu).unwrap();
        assert_eq!(
            max_diff_masked(&a, &b, Some(&only_first)),
            0.25,
            "a masked-out NaN is not compared"
        );
        let both = Tensor::new(&[[1f32, 1.0]], &Device::Cpu).unwrap();
        assert_eq!(max_diff_masked(&a, &b, Some(&both)), f32::INFINITY);
    }
}
