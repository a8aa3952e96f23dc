//! The large f32 products of the fused ops, through a system BLAS when one is installed.
//!
//! On this project's 2-core AVX2 (Zen 3) machines, whose FMA peak is 168 GFLOP/s, the gemm
//! crate reaches 90–108 GFLOP/s on the products of a transformer step and OpenBLAS, whose
//! kernels are tuned per microarchitecture, 113–129 (`cargo run --release --example
//! matmul_peak`, BENCHMARKS.md). Those products are about 80% of a training step, so the
//! library that computes them sets the step time.
//!
//! The library is opened at run time, not linked: a machine without one runs the same code on
//! the gemm crate, and the binary needs no BLAS to start. Both libraries export the standard
//! `cblas_sgemm`. `FERRULE_BLAS` names the library to open instead of the default search
//! (a file name or path), or `off` for the gemm crate.
//!
//! When the library was found by the default search, each class of products goes to whichever
//! of the two measured faster on this machine (`ops::matmul_probe`; `FERRULE_MATMUL_PROBE=off`
//! sends every large product to the library).

use std::ffi::{c_int, c_long};
use std::sync::{Once, OnceLock};

use rayon::prelude::*;

use super::matmul_probe::{self, Probe, ProbeEntry, ShapeClass};

/// Libraries tried in order when `FERRULE_BLAS` is unset: the sonames of Debian/Ubuntu's
/// `libopenblas0-*` (what `scripts/install-deps.sh` installs) and `libblis4-*` packages. BLIS
/// comes second: it ran some shapes much slower (BENCHMARKS.md, "Matmul throughput").
const SEARCH: &[&str] = &[
    "libopenblas.so.0",
    "libblis.so.4",
    "libopenblas.so",
    "libblis.so",
];

/// Products with a dimension below this stay on the gemm crate: a BLAS call packs both
/// operands, which costs about what it saves on LoRA's rank-8 products (measured: within the
/// noise either way at 8), so the skinny products keep the path they were tuned on.
const MIN_DIM: usize = 32;

const CBLAS_ROW_MAJOR: c_int = 101;
const CBLAS_NO_TRANS: c_int = 111;
const CBLAS_TRANS: c_int = 112;

type CblasSgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

/// How each library is told its thread count (both read it on every call).
enum SetThreads {
    /// BLIS: `void bli_thread_set_num_threads(dim_t)`, `dim_t` 64-bit.
    Blis(unsafe extern "C" fn(c_long)),
    /// OpenBLAS: `void openblas_set_num_threads(int)`.
    OpenBlas(unsafe extern "C" fn(c_int)),
}

struct Blas {
    /// Keeps the library mapped for as long as the function pointers are used (the process).
    _lib: libloading::Library,
    sgemm: CblasSgemm,
    set_threads: Option<SetThreads>,
    single: Once,
    name: String,
}

impl Blas {
    /// Tells the library to compute each call on the calling thread only.
    fn single_threaded(&self) {
        self.single.call_once(|| match self.set_threads {
            // SAFETY: the setters take a thread count and only store it.
            Some(SetThreads::Blis(f)) => unsafe { f(1) },
            Some(SetThreads::OpenBlas(f)) => unsafe { f(1) },
            None => {}
        });
    }
}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
static PROBE: OnceLock<Option<Probe>> = OnceLock::new();

/// The measured choice between the library and the gemm crate: when the library was found by
/// the default search (an explicit `FERRULE_BLAS` is obeyed as it is) and
/// `FERRULE_MATMUL_PROBE` is not `off`.
fn probe() -> Option<&'static Probe> {
    PROBE
        .get_or_init(|| {
            let lib = blas()?;
            let explicit = std::env::var_os("FERRULE_BLAS").is_some();
            let off = std::env::var("FERRULE_MATMUL_PROBE").is_ok_and(|v| v == "off" || v == "0");
            let threads = candle_core::utils::get_num_threads().max(1);
            (!explicit && !off).then(|| {
                Probe::new(
                    matmul_probe::default_cache_path(),
                    matmul_probe::machine_key(&lib.name, threads),
                )
            })
        })
        .as_ref()
}

/// The measured decisions this process has used (empty without a probe).
pub fn probe_report() -> Vec<ProbeEntry> {
    probe().map(Probe::report).unwrap_or_default()
}

fn open(name: &str) -> Option<Blas> {
    // SAFETY: opening a BLAS runs its initialisers, which only set up its own thread pool and
    // CPU detection; the symbols are then resolved with the C signatures they are declared with
    // in cblas.h, blis.h and openblas's cblas.h.
    unsafe {
        let lib = libloading::Library::new(name).ok()?;
        let sgemm = *lib.get::<CblasSgemm>(b"cblas_sgemm\0").ok()?;
        let set_threads = if let Ok(f) =
            lib.get::<unsafe extern "C" fn(c_long)>(b"bli_thread_set_num_threads\0")
        {
            Some(SetThreads::Blis(*f))
        } else {
            lib.get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0")
                .ok()
                .map(|f| SetThreads::OpenBlas(*f))
        };
        Some(Blas {
            _lib: lib,
            sgemm,
            set_threads,
            single: Once::new(),
            name: name.to_string(),
        })
    }
}

fn blas() -> Option<&'static Blas> {
    BLAS.get_or_init(|| match std::env::var("FERRULE_BLAS") {
        Ok(v) if v == "off" || v.is_empty() => None,
        Ok(v) => {
            let lib = open(&v);
            if lib.is_none() {
                tracing::warn!("FERRULE_BLAS={v}: cannot open it or it has no cblas_sgemm; using the gemm crate");
            }
            lib
        }
        Err(_) => {
            let lib = SEARCH.iter().find_map(|n| open(n));
            if lib.is_none() {
                tracing::warn!(
                    "no system BLAS found ({}); large matrix products run on the gemm crate, about 1.2x slower (install libopenblas0-pthread, or see scripts/install-deps.sh)",
                    SEARCH.join(", ")
                );
            }
            lib
        }
    })
    .as_ref()
}

/// What computes the large products: the BLAS library's file name, `gemm crate`, or, when
/// the probe chose per shape, how many shape classes went to each so far.
pub fn backend() -> String {
    let Some(lib) = blas() else {
        return "gemm crate".to_string();
    };
    match probe().map(Probe::report) {
        Some(r) if !r.is_empty() => {
            let to_blas = r.iter().filter(|e| e.chosen == "blas").count();
            format!(
                "measured per shape: {} for {to_blas} shape classes, gemm crate for {}",
                lib.name,
                r.len() - to_blas
            )
        }
        _ => lib.name.clone(),
    }
}

/// A matrix operand as the gemm crate takes it: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub ptr: *const f32,
    pub cs: isize,
    pub rs: isize,
}

// SAFETY: an operand is only read, by the blocks of one product while its caller waits.
unsafe impl Send for Strided {}
unsafe impl Sync for Strided {}

impl Strided {
    /// The operand from element `(i, j)` on.
    fn at(self, i: usize, j: usize) -> Self {
        // SAFETY (of the offset): callers pass indices inside the operand.
        Self {
            ptr: self
                .ptr
                .wrapping_offset(i as isize * self.rs + j as isize * self.cs),
            ..self
        }
    }
}

/// The CBLAS row-major form of a `rows × cols` operand: (transpose flag, leading dimension),
/// or None when neither stride is 1 (or the other is too small to be a leading dimension).
fn cblas_form(op: Strided, rows: usize, cols: usize) -> Option<(c_int, c_int)> {
    let ld = |s: isize, min: usize| {
        (s >= min.max(1) as isize && s <= c_int::MAX as isize).then_some(s as c_int)
    };
    if op.cs == 1 {
        Some((CBLAS_NO_TRANS, ld(op.rs, cols)?))
    } else if op.rs == 1 {
        Some((CBLAS_TRANS, ld(op.cs, rows)?))
    } else {
        None
    }
}

/// The output pointer, shared by blocks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: each block writes only its own rows/columns of the output.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// Runs `f(r0, r1, c0, c1)` over disjoint blocks of an `m × n` output on rayon's pool, one
/// block per thread: rows, or columns when there are fewer rows than columns. (Two blocks per
/// thread, to even out a thread the host slows down, measured slower: each block packs the
/// other operand again.)
fn for_each_block(
    m: usize,
    n: usize,
    threads: usize,
    f: impl Fn(usize, usize, usize, usize) + Sync,
) {
    let (long, by_rows) = if m >= n || m >= MIN_DIM * threads {
        (m, true)
    } else {
        (n, false)
    };
    let blocks = threads.min(long.div_ceil(MIN_DIM)).max(1);
    let step = long.div_ceil(blocks);
    (0..long.div_ceil(step)).into_par_iter().for_each(|i| {
        let (lo, hi) = (i * step, ((i + 1) * step).min(long));
        if by_rows {
            f(lo, hi, 0, n)
        } else {
            f(0, m, lo, hi)
        }
    });
}

/// `dst = [dst +] scale · A·B` for `A: m×k`, `B: k×n` and a row-major `dst` whose rows are
/// `dst_rs` apart, spread over rayon's pool (`candle_core::utils::get_num_threads` threads).
/// Call it outside rayon tasks: it is one large product, not a block of one.
///
/// With a BLAS, each rayon thread calls the library single-threaded on its blocks of rows: its
/// own threads would compete with rayon's for the same cores (measured: 4.4% of a SmolLM2 step
/// spent in BLIS's barrier waits when it ran two threads of its own). Which of the library and
/// the gemm crate computes the product is the probe's decision for its shape class
/// (`ops::matmul_probe`), measured on the class's first product.
///
/// # Safety
/// Every element the strides address must lie in its allocation; `dst` must not overlap the
/// operands. Without `accumulate`, `dst` is only written (it may be uninitialised).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_par(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Strided,
    b: Strided,
    scale: f32,
) {
    let fits = |x: usize| x <= c_int::MAX as usize;
    let lib = blas().filter(|_| {
        m.min(n).min(k) >= MIN_DIM && fits(m) && fits(n) && fits(k) && fits(dst_rs) && dst_rs >= n
    });
    if let Some(lib) = lib {
        if let (Some(fa), Some(fb)) = (cblas_form(a, m, k), cblas_form(b, k, n)) {
            let class = ShapeClass::of(m, n, k, fa.0 == CBLAS_TRANS, fb.0 == CBLAS_TRANS);
            let flops = 2.0 * m as f64 * n as f64 * k as f64;
            // SAFETY (of the measurement): the caller's operands, into a scratch output of m x n.
            let use_blas = probe().is_none_or(|p| {
                p.use_blas(class, flops, || unsafe {
                    time_both(lib, m, n, k, a, b, fa, fb)
                })
            });
            if use_blas {
                unsafe { blas_product(lib, m, n, k, dst, dst_rs, accumulate, a, b, fa, fb, scale) };
                return;
            }
        }
    }
    unsafe { gemm_product(m, n, k, dst, dst_rs, accumulate, a, b, scale) }
}

/// The product through the BLAS, one single-threaded call per rayon thread on its block.
///
/// # Safety
/// As [`gemm_par`]; `fa`/`fb` are the operands' CBLAS forms.
#[allow(clippy::too_many_arguments)]
unsafe fn blas_product(
    lib: &Blas,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Strided,
    b: Strided,
    (ta, lda): (c_int, c_int),
    (tb, ldb): (c_int, c_int),
    scale: f32,
) {
    lib.single_threaded();
    let beta = if accumulate { 1.0 } else { 0.0 };
    let out = Dst(dst);
    for_each_block(
        m,
        n,
        candle_core::utils::get_num_threads().max(1),
        |r0, r1, c0, c1| {
            let (a, b, out) = (a.at(r0, 0), b.at(0, c0), out);
            // SAFETY: rows r0..r1 and columns c0..c1 of the caller's product; blocks are disjoint in
            // the output.
            unsafe {
                (lib.sgemm)(
                    CBLAS_ROW_MAJOR,
                    ta,
                    tb,
                    (r1 - r0) as c_int,
                    (c1 - c0) as c_int,
                    k as c_int,
                    scale,
                    a.ptr,
                    lda,
                    b.ptr,
                    ldb,
                    beta,
                    out.0.add(r0 * dst_rs + c0),
                    dst_rs as c_int,
                )
            }
        },
    );
}

/// The product through the gemm crate on rayon's pool.
///
/// # Safety
/// As [`gemm_par`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_product(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Strided,
    b: Strided,
    scale: f32,
) {
    let threads = candle_core::utils::get_num_threads().max(1);
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1f32,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Seconds for one `m x n x k` product through the BLAS and through the gemm crate, each the
/// faster of two runs, alternated (`B G B G`), into a scratch output.
///
/// # Safety
/// The operands as [`gemm_par`] requires them.
#[allow(clippy::too_many_arguments)]
unsafe fn time_both(
    lib: &Blas,
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    fa: (c_int, c_int),
    fb: (c_int, c_int),
) -> (f64, f64) {
    let mut scratch = vec![0f32; m * n];
    let (mut blas_s, mut gemm_s) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..2 {
        let t = std::time::Instant::now();
        unsafe {
            blas_product(
                lib,
                m,
                n,
                k,
                scratch.as_mut_ptr(),
                n,
                false,
                a,
                b,
                fa,
                fb,
                1.0,
            )
        };
        blas_s = blas_s.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        unsafe { gemm_product(m, n, k, scratch.as_mut_ptr(), n, false, a, b, 1.0) };
        gemm_s = gemm_s.min(t.elapsed().as_secs_f64());
    }
    (blas_s, gemm_s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::kernels::{matmul, Mat};

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) as f32 / 65536.0
                    - 0.5
            })
            .collect()
    }

    /// `gemm_par` against the gemm crate on one thread (`kernels::matmul`), for every operand
    /// layout the fused ops use, both split directions, a strided output, accumulation and
    /// products too small for the BLAS.
    #[test]
    fn gemm_par_matches_the_gemm_crate() {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build_global();
        for &(m, n, k) in &[
            (97, 70, 45),
            (40, 300, 33),
            (300, 40, 64),
            (8, 200, 50),
            (64, 64, 7),
        ] {
            for (ta, tb, accumulate, pad) in [
                (false, false, false, 0),
                (false, true, false, 3),
                (true, false, true, 0),
                (true, true, true, 5),
            ] {
                let a = data(m * k, 1);
                let b = data(k * n, 2);
                let (am, bm) = (
                    if ta { Mat::t(&a) } else { Mat::n(&a) },
                    if tb { Mat::t(&b) } else { Mat::n(&b) },
                );
                let a_s = if ta {
                    Strided {
                        ptr: a.as_ptr(),
                        cs: m as isize,
                        rs: 1,
                    }
                } else {
                    Strided {
                        ptr: a.as_ptr(),
                        cs: 1,
                        rs: k as isize,
                    }
                };
                let b_s = if tb {
                    Strided {
                        ptr: b.as_ptr(),
                        cs: k as isize,
                        rs: 1,
                    }
                } else {
                    Strided {
                        ptr: b.as_ptr(),
                        cs: 1,
                        rs: n as isize,
                    }
                };
                let start = data(m * n, 3);
                let mut want = start.clone();
                matmul(m, n, k, &mut want, accumulate, am, bm, 0.5);
                // The output with `pad` extra columns per row, which the product must not touch.
                let rs = n + pad;
                let mut got = vec![f32::NAN; m * rs];
                for i in 0..m {
                    got[i * rs..i * rs + n].copy_from_slice(&start[i * n..(i + 1) * n]);
                }
                let mut through_blas = got.clone();
                unsafe { gemm_par(m, n, k, got.as_mut_ptr(), rs, accumulate, a_s, b_s, 0.5) };
                // The library itself, whatever the probe chose for this shape.
                let forms = (cblas_form(a_s, m, k), cblas_form(b_s, k, n));
                if let (Some(lib), (Some(fa), Some(fb))) = (blas(), forms) {
                    unsafe {
                        blas_product(
                            lib,
                            m,
                            n,
                            k,
                            through_blas.as_mut_ptr(),
                            rs,
                            accumulate,
                            a_s,
                            b_s,
                            fa,
                            fb,
                            0.5,
                        )
                    };
                    for (i, (x, y)) in through_blas.iter().zip(&got).enumerate() {
                        assert!(
                            x.is_nan() && y.is_nan() || (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                            "{m}x{n}x{k} BLAS at {i}: {x} vs {y}"
                        );
                    }
                }
                for i in 0..m {
                    for j in 0..rs {
                        let g = got[i * rs + j];
                        if j >= n {
                            assert!(g.is_nan(), "padding column written at ({i}, {j})");
                            continue;
                        }
                        let w = want[i * n + j];
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{m}x{n}x{k} ta={ta} tb={tb} acc={accumulate}: ({i}, {j}) {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// A machine with OpenBLAS or BLIS installed (as `scripts/install-deps.sh` does) must use
    /// it, or the tests above only ever check the fallback.
    #[test]
    fn an_installed_blas_is_found() {
        if std::env::var_os("FERRULE_BLAS").is_some() {
            return;
        }
        let installed = [
            "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
            "/usr/lib/x86_64-linux-gnu/libblis.so.4",
            "/usr/lib64/libopenblas.so.0",
        ]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
        if installed {
            assert_ne!(backend(), "gemm crate");
        }
    }
}
