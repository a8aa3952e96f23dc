//! Which library computes each class of large products, decided by measuring both once per
//! machine (issue 12 item 6).
//!
//! Neither library wins everywhere: on a Zen 5 machine whose environment pins OpenBLAS to its
//! Haswell kernels (`OPENBLAS_CORETYPE=Haswell`) the gemm crate's AVX-512 kernels were 1.4x
//! faster on MiniLM's step, while on Zen 3 OpenBLAS's kernels are about 1.2x the gemm crate's
//! (BENCHMARKS.md). So the first product of each [`ShapeClass`] is timed with both (on its own
//! operands, into a scratch buffer), and the faster one computes every product of that class.
//!
//! The two libraries round differently, so a machine must not change its mind between
//! processes: a resumed run has to compute what the interrupted one computed. Decisions are
//! therefore kept in a cache file (`matmul-probe.json` under `$FERRULE_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/ferrule`, else `~/.cache/ferrule`), keyed by the machine (CPU model, cores,
//! threads, library, `OPENBLAS_CORETYPE`). A decision is made under an exclusive lock of that
//! file after reading it again, so every process on the machine takes the first decision made
//! for a class. Without a cache folder, decisions last for the process.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A class of products that share a decision: the operands' layouts, `n`, `k`, and `m` rounded
/// up to a power of two (padding-free batches change `m` every step).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ShapeClass {
    pub m_bucket: usize,
    pub n: usize,
    pub k: usize,
    pub a_transposed: bool,
    pub b_transposed: bool,
}

impl ShapeClass {
    pub fn of(m: usize, n: usize, k: usize, a_transposed: bool, b_transposed: bool) -> Self {
        Self {
            m_bucket: m.next_power_of_two(),
            n,
            k,
            a_transposed,
            b_transposed,
        }
    }

    /// The cache file's key, e.g. `m<=4096 k=384 n=1536 AB^T`.
    fn key(&self) -> String {
        let t = |x: bool| if x { "^T" } else { "" };
        format!(
            "m<={} k={} n={} A{}B{}",
            self.m_bucket,
            self.k,
            self.n,
            t(self.a_transposed),
            t(self.b_transposed)
        )
    }
}

/// One decision, as the cache file and the run summary hold it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeEntry {
    /// The shape class (`m<=M k=K n=N A[^T]B[^T]`).
    pub shape: String,
    /// Throughput measured on the class's first product, GFLOP/s (2·m·n·k per product).
    pub blas_gflops: f64,
    pub gemm_gflops: f64,
    /// `"blas"` or `"gemm"`.
    pub chosen: String,
}

/// A cache file: decisions per machine key, then per key (a shape class).
#[derive(Serialize, Deserialize)]
struct CacheFile<T> {
    machines: BTreeMap<String, BTreeMap<String, T>>,
}

impl<T> Default for CacheFile<T> {
    fn default() -> Self {
        Self {
            machines: BTreeMap::new(),
        }
    }
}

/// The decision for `key` on `machine` recorded in the JSON file `cache`, or, the first time,
/// `decide()`'s, recorded for every later process. Made under an exclusive lock of the file
/// after reading it again, so every process on the machine takes the first decision made.
/// Without a cache file (or when it cannot be locked) the decision lasts for the caller.
pub(crate) fn decide_once<T: Clone + Serialize + serde::de::DeserializeOwned>(
    cache: Option<&Path>,
    machine: &str,
    key: &str,
    decide: impl FnOnce() -> T,
) -> T {
    let lock = cache.and_then(lock_cache);
    let mut file: CacheFile<T> = cache.map(read_cache).unwrap_or_default();
    if let Some(e) = file.machines.get(machine).and_then(|m| m.get(key)) {
        return e.clone();
    }
    let entry = decide();
    if let (Some(path), Some(_)) = (cache, &lock) {
        file.machines
            .entry(machine.to_string())
            .or_default()
            .insert(key.to_string(), entry.clone());
        let written = serde_json::to_vec_pretty(&file)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::util::atomic::write_bytes_atomic(path, &b));
        if let Err(e) = written {
            tracing::warn!(
                "{}: cannot record a measured decision ({e}); later processes may decide differently",
                path.display()
            );
        }
    }
    entry
}

/// Measured decisions for one machine, shared by every caller in the process.
pub(crate) struct Probe {
    cache: Option<PathBuf>,
    machine: String,
    decided: Mutex<HashMap<ShapeClass, ProbeEntry>>,
    /// Serialises measurements within the process (the file lock does so across processes).
    measuring: Mutex<()>,
}

impl Probe {
    /// A probe keeping its decisions in `cache` (a JSON file) under the key `machine`.
    pub fn new(cache: Option<PathBuf>, machine: String) -> Self {
        Self {
            cache,
            machine,
            decided: Mutex::new(HashMap::new()),
            measuring: Mutex::new(()),
        }
    }

    /// Whether products of `class` go to the BLAS: the decision already taken on this machine,
    /// or, the first time, the faster of `measure()`'s two timings (seconds for one product
    /// through the BLAS and through the gemm crate), recorded for every later process.
    pub fn use_blas(
        &self,
        class: ShapeClass,
        flops: f64,
        measure: impl FnOnce() -> (f64, f64),
    ) -> bool {
        if let Some(e) = self
            .decided
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&class)
        {
            return e.chosen == "blas";
        }
        let _one_at_a_time = self.measuring.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = self
            .decided
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&class)
        {
            return e.chosen == "blas";
        }
        let entry = self.decide(class, flops, measure);
        let blas = entry.chosen == "blas";
        self.decided
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(class, entry);
        blas
    }

    /// The decision for `class` from the cache file, or a new one measured and written there.
    fn decide(
        &self,
        class: ShapeClass,
        flops: f64,
        measure: impl FnOnce() -> (f64, f64),
    ) -> ProbeEntry {
        let key = class.key();
        decide_once(self.cache.as_deref(), &self.machine, &key, || {
            let (blas_s, gemm_s) = measure();
            let gflops = |s: f64| if s > 0.0 { flops / s / 1e9 } else { 0.0 };
            let chosen = if gemm_s < blas_s { "gemm" } else { "blas" };
            let entry = ProbeEntry {
                shape: key.clone(),
                blas_gflops: gflops(blas_s),
                gemm_gflops: gflops(gemm_s),
                chosen: chosen.into(),
            };
            tracing::debug!(
                "matmul probe {key}: BLAS {:.1} GFLOP/s, gemm crate {:.1} GFLOP/s -> {chosen}",
                entry.blas_gflops,
                entry.gemm_gflops
            );
            entry
        })
    }

    pub fn report(&self) -> Vec<ProbeEntry> {
        let mut v: Vec<ProbeEntry> = self
            .decided
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.shape.cmp(&b.shape));
        v
    }
}

/// The cache file's exclusive lock (a `.lock` file beside it), held until dropped; `None`, with
/// a warning, when the folder cannot be created or locked.
fn lock_cache(path: &Path) -> Option<File> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let locked = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| {
            File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path.with_extension("lock"))
        })
        .and_then(|f| f.lock().map(|_| f));
    match locked {
        Ok(f) => Some(f),
        Err(e) => {
            WARNED.call_once(|| {
                tracing::warn!(
                    "{}: cannot lock the cache of measured decisions ({e}); deciding for this process only",
                    path.display()
                )
            });
            None
        }
    }
}

/// The cache file's contents; empty when it is missing, and, with a warning, when unreadable.
fn read_cache<T: serde::de::DeserializeOwned>(path: &Path) -> CacheFile<T> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(
                "{}: not a cache of measured decisions ({e}); measuring again",
                path.display()
            );
            CacheFile::default()
        }),
        Err(_) => CacheFile::default(),
    }
}

/// Where decisions are kept: `$FERRULE_CACHE_DIR`, `$XDG_CACHE_HOME/ferrule` or
/// `~/.cache/ferrule`, file `matmul-probe.json`.
/// `$FERRULE_CACHE_DIR/matmul-probe.json` (see the module docs for the fallbacks).
pub(crate) fn default_cache_path() -> Option<PathBuf> {
    Some(cache_dir()?.join("matmul-probe.json"))
}

/// `$FERRULE_CACHE_DIR`, else `$XDG_CACHE_HOME/ferrule`, else `~/.cache/ferrule`.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = env("FERRULE_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("ferrule")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/ferrule")))?;
    Some(dir)
}

/// This machine, as far as the decision depends on it: CPU model, logical cores, threads used,
/// the BLAS library and `OPENBLAS_CORETYPE`.
pub(crate) fn machine_key(library: &str, threads: usize) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let coretype = std::env::var("OPENBLAS_CORETYPE").unwrap_or_default();
    format!("{cpu}; {cores} cores; {threads} threads; {library}; OPENBLAS_CORETYPE={coretype}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_faster_library_is_chosen_once_and_every_later_process_adopts_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/matmul-probe.json");
        let class = ShapeClass::of(3000, 1536, 384, false, true);
        let first = Probe::new(Some(path.clone()), "machine A".into());
        // BLAS 2 s, gemm crate 1 s for 4e9 flops: the gemm crate, at 2 and 4 GFLOP/s.
        assert!(!first.use_blas(class, 4e9, || (2.0, 1.0)));
        assert!(!first.use_blas(
            ShapeClass::of(2049, 1536, 384, false, true),
            4e9,
            || panic!("same class (m <= 4096): no second measurement")
        ));
        assert_eq!(
            first.report(),
            vec![ProbeEntry {
                shape: "m<=4096 k=384 n=1536 AB^T".into(),
                blas_gflops: 2.0,
                gemm_gflops: 4.0,
                chosen: "gemm".into()
            }]
        );
        // Another process on the same machine reads the decision instead of measuring.
        let later = Probe::new(Some(path.clone()), "machine A".into());
        assert!(!later.use_blas(class, 4e9, || panic!("decided already")));
        // Another machine measures for itself, and its decision does not replace machine A's.
        let other = Probe::new(Some(path.clone()), "machine B".into());
        assert!(other.use_blas(class, 4e9, || (1.0, 2.0)));
        let again = Probe::new(Some(path), "machine A".into());
        assert!(!again.use_blas(class, 4e9, || panic!("decided already")));
        // Other layouts and widths are other classes.
        assert!(
            again.use_blas(ShapeClass::of(3000, 1536, 384, false, false), 4e9, || (
                1.0, 1.5
            ))
        );
    }

    #[test]
    fn without_a_cache_file_decisions_last_for_the_process() {
        let p = Probe::new(None, "m".into());
        let class = ShapeClass::of(64, 64, 64, true, false);
        assert!(
            p.use_blas(class, 1.0, || (1.0, 1.0)),
            "a tie keeps the BLAS"
        );
        assert!(p.use_blas(class, 1.0, || panic!("decided already")));
    }

    #[test]
    fn an_unreadable_cache_is_measured_again_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("matmul-probe.json");
        std::fs::write(&path, "not json").unwrap();
        let p = Probe::new(Some(path.clone()), "m".into());
        assert!(!p.use_blas(ShapeClass::of(64, 64, 64, false, false), 1.0, || (2.0, 1.0)));
        let file: CacheFile<ProbeEntry> =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(file.machines["m"].len(), 1);
    }
}
