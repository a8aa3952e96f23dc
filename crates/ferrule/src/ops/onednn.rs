//! bf16 matrix products with f32 accumulation through oneDNN, opened at run time.
//!
//! Issue 24 asks for the frozen base's products in bf16 where the CPU computes them faster.
//! No f32 kernel can: on a 2-core AMD EPYC (Zen 4, `avx512_bf16`, no AMX) oneDNN's bf16
//! matmul (`brg:avx512_core_bf16`) runs about twice its f32 one on the project's shapes, and
//! on Intel CPUs with AMX-BF16 oneDNN's AMX kernels run 3–10x (BENCHMARKS.md, "bf16
//! products"). Of the libraries the issue names, only oneDNN uses `avx512_bf16` on AMD: MKL
//! 2026.2's `cblas_gemm_bf16bf16f32` widens to f32 there (measured at the f32 speed), and
//! Debian's OpenBLAS 0.3.21 is built without `cblas_sbgemm`. So oneDNN it is, and no
//! hand-written kernel.
//!
//! The library is opened, not linked, as `ops::blas` opens the BLAS: the binary starts without
//! it. `FERRULE_DNNL` names the library to open instead of the default search (a file name or
//! path), or `off`. The C API used is oneDNN 2.x's (`dnnl_matmul_desc_init` and
//! `dnnl_primitive_desc_create`), which Debian and Ubuntu ship as `libdnnl2`
//! (`scripts/install-deps.sh`); oneDNN 3 replaced those calls and is not opened.
//!
//! Each product is `dst = [dst +] A·B` with `A: m×k` and `B: k×n` in bf16 at any row and
//! column strides and `dst` an f32 row-major matrix; oneDNN accumulates in f32 (its bf16
//! matmul's accumulation type). Primitives are created once per shape and layout and kept.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, ensure, Context, Result};
use half::bf16;

/// Sonames tried in order when `FERRULE_DNNL` is unset: Debian/Ubuntu's `libdnnl2`, then an
/// unversioned development link.
const SEARCH: &[&str] = &["libdnnl.so.2", "libdnnl.so"];

/// `DNNL_MAX_NDIMS`: the length of `dnnl_dims_t`.
const MAX_NDIMS: usize = 12;
/// Bytes reserved for oneDNN 2.x's caller-allocated descriptors. In 2.6.3
/// `sizeof(dnnl_memory_desc_t)` is 696 and `sizeof(dnnl_matmul_desc_t)` 2800; the library
/// only writes through the pointer, so a larger buffer is safe for every 2.x release.
const DESC_WORDS: usize = 1024; // 8 KiB of u64

// Enum values from oneDNN 2.x's dnnl_types.h.
const DNNL_SUCCESS: c_int = 0;
const DNNL_CPU: c_int = 1;
const DNNL_BF16: c_int = 2;
const DNNL_F32: c_int = 3;
const DNNL_STREAM_IN_ORDER: c_uint = 1;
const DNNL_QUERY_IMPL_INFO_STR: c_int = 8;
const DNNL_ARG_SRC: c_int = 1;
const DNNL_ARG_DST: c_int = 17;
const DNNL_ARG_WEIGHTS: c_int = 33;

type Handle = *mut c_void;
type Status = c_int;

#[repr(C)]
struct ExecArg {
    arg: c_int,
    memory: Handle,
}

#[repr(C)]
struct Version {
    major: c_int,
    minor: c_int,
    patch: c_int,
    hash: *const c_char,
    cpu_runtime: c_uint,
    gpu_runtime: c_uint,
}

/// A caller-allocated oneDNN 2.x descriptor, 8-byte aligned.
type Desc = Box<[u64; DESC_WORDS]>;

fn new_desc() -> Desc {
    Box::new([0u64; DESC_WORDS])
}

/// The C functions used, with the signatures of oneDNN 2.6's dnnl.h.
struct Api {
    version: unsafe extern "C" fn() -> *const Version,
    engine_create: unsafe extern "C" fn(*mut Handle, c_int, usize) -> Status,
    stream_create: unsafe extern "C" fn(*mut Handle, Handle, c_uint) -> Status,
    stream_wait: unsafe extern "C" fn(Handle) -> Status,
    md_init_by_strides:
        unsafe extern "C" fn(*mut c_void, c_int, *const i64, c_int, *const i64) -> Status,
    matmul_desc_init: unsafe extern "C" fn(
        *mut c_void,
        *const c_void,
        *const c_void,
        *const c_void,
        *const c_void,
    ) -> Status,
    attr_create: unsafe extern "C" fn(*mut Handle) -> Status,
    attr_destroy: unsafe extern "C" fn(Handle) -> Status,
    attr_set_post_ops: unsafe extern "C" fn(Handle, Handle) -> Status,
    post_ops_create: unsafe extern "C" fn(*mut Handle) -> Status,
    post_ops_destroy: unsafe extern "C" fn(Handle) -> Status,
    post_ops_append_sum: unsafe extern "C" fn(Handle, f32) -> Status,
    pd_create: unsafe extern "C" fn(*mut Handle, *const c_void, Handle, Handle, Handle) -> Status,
    pd_query: unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> Status,
    primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> Status,
    primitive_execute: unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> Status,
    memory_create: unsafe extern "C" fn(*mut Handle, *const c_void, Handle, *mut c_void) -> Status,
    memory_destroy: unsafe extern "C" fn(Handle) -> Status,
    /// libgomp's, reached through the library's dependencies when it runs on OpenMP.
    omp_set_num_threads: Option<unsafe extern "C" fn(c_int)>,
}

/// One product's primitive and its operands' descriptors, made once per shape and layout.
struct Prepared {
    primitive: Handle,
    /// oneDNN's implementation name (`brg:avx512_core_bf16`, `brg:avx512_core_amx`, ...).
    implementation: String,
    a: Desc,
    b: Desc,
    dst: Desc,
}

/// Which product a [`Prepared`] computes: sizes, the operands' strides and accumulation.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    a: (isize, isize),
    b: (isize, isize),
    dst_rs: usize,
    accumulate: bool,
}

struct Dnnl {
    _lib: libloading::Library,
    api: Api,
    engine: Handle,
    stream: Handle,
    name: String,
    prepared: Mutex<HashMap<Key, Prepared>>,
}

// SAFETY: oneDNN's engine, stream and primitives may be used from any thread; executions on
// the one in-order stream are serialised by the `prepared` lock.
unsafe impl Send for Dnnl {}
unsafe impl Sync for Dnnl {}

fn check(status: Status, call: &str) -> Result<()> {
    ensure!(
        status == DNNL_SUCCESS,
        "oneDNN: {call} failed (dnnl_status_t {status})"
    );
    Ok(())
}

/// # Safety
/// `lib` is oneDNN 2.x; each symbol is resolved with the signature dnnl.h declares.
unsafe fn resolve(lib: &libloading::Library) -> Result<Api> {
    macro_rules! sym {
        ($name:literal) => {
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .with_context(|| format!("oneDNN: the library has no {}", $name))?
        };
    }
    Ok(Api {
        version: sym!("dnnl_version"),
        engine_create: sym!("dnnl_engine_create"),
        stream_create: sym!("dnnl_stream_create"),
        stream_wait: sym!("dnnl_stream_wait"),
        md_init_by_strides: sym!("dnnl_memory_desc_init_by_strides"),
        matmul_desc_init: sym!("dnnl_matmul_desc_init"),
        attr_create: sym!("dnnl_primitive_attr_create"),
        attr_destroy: sym!("dnnl_primitive_attr_destroy"),
        attr_set_post_ops: sym!("dnnl_primitive_attr_set_post_ops"),
        post_ops_create: sym!("dnnl_post_ops_create"),
        post_ops_destroy: sym!("dnnl_post_ops_destroy"),
        post_ops_append_sum: sym!("dnnl_post_ops_append_sum"),
        pd_create: sym!("dnnl_primitive_desc_create"),
        pd_query: sym!("dnnl_primitive_desc_query"),
        primitive_create: sym!("dnnl_primitive_create"),
        primitive_execute: sym!("dnnl_primitive_execute"),
        memory_create: sym!("dnnl_memory_create"),
        memory_destroy: sym!("dnnl_memory_destroy"),
        omp_set_num_threads: unsafe { lib.get(b"omp_set_num_threads\0") }
            .ok()
            .map(|f| *f),
    })
}

/// Makes the OpenMP runtime oneDNN runs on sleep, not spin, between products, unless the user
/// set `OMP_WAIT_POLICY`. libgomp reads the variable once, when it is loaded with the library.
///
/// Why: between two products the rest of a training step runs on rayon's threads, on the
/// same cores. With libgomp's default (spin, then sleep), its idle threads took 44% of a
/// MiniLM bf16 step's CPU time in `perf` on a 2-core Zen 4, and the step ran slower than in
/// f32. Waking a sleeping thread costs microseconds against products of milliseconds.
fn passive_openmp() {
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        // Called before any OpenMP runtime is loaded, from the first thread that needs oneDNN;
        // nothing else in the process reads this variable concurrently.
        std::env::set_var("OMP_WAIT_POLICY", "PASSIVE");
    }
}

fn open(name: &str) -> Result<Dnnl> {
    passive_openmp();
    // SAFETY: opening oneDNN runs its initialisers (CPU detection); the symbols are resolved
    // with dnnl.h's signatures, and the version is checked before anything else is called.
    unsafe {
        let lib = libloading::Library::new(name).with_context(|| format!("cannot open {name}"))?;
        let api = resolve(&lib)?;
        let v = &*(api.version)();
        if v.major != 2 {
            bail!(
                "{name} is oneDNN {}.{}.{}; ferrule calls oneDNN 2.x's C API",
                v.major,
                v.minor,
                v.patch
            );
        }
        let mut engine = std::ptr::null_mut();
        check(
            (api.engine_create)(&mut engine, DNNL_CPU, 0),
            "dnnl_engine_create",
        )?;
        let mut stream = std::ptr::null_mut();
        check(
            (api.stream_create)(&mut stream, engine, DNNL_STREAM_IN_ORDER),
            "dnnl_stream_create",
        )?;
        Ok(Dnnl {
            name: format!("{name} (oneDNN {}.{}.{})", v.major, v.minor, v.patch),
            _lib: lib,
            api,
            engine,
            stream,
            prepared: Mutex::new(HashMap::new()),
        })
    }
}

static DNNL: OnceLock<std::result::Result<Dnnl, String>> = OnceLock::new();

fn dnnl() -> std::result::Result<&'static Dnnl, &'static str> {
    DNNL.get_or_init(|| match std::env::var("FERRULE_DNNL") {
        Ok(v) if v == "off" || v.is_empty() => Err("FERRULE_DNNL=off".to_string()),
        Ok(v) => open(&v).map_err(|e| format!("FERRULE_DNNL={v}: {e:#}")),
        Err(_) => {
            let mut errors = Vec::new();
            for name in SEARCH {
                match open(name) {
                    Ok(d) => return Ok(d),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            Err(format!(
                "no oneDNN 2.x library ({}; install libdnnl2, see scripts/install-deps.sh)",
                errors.join("; ")
            ))
        }
    })
    .as_ref()
    .map_err(String::as_str)
}

/// The opened library (`libdnnl.so.2 (oneDNN 2.6.3)`), or why there is none.
pub fn library() -> std::result::Result<&'static str, &'static str> {
    dnnl().map(|d| d.name.as_str())
}

/// A bf16 matrix operand: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bf16Strided {
    pub ptr: *const bf16,
    pub rs: isize,
    pub cs: isize,
}

impl Dnnl {
    /// # Safety
    /// `desc` is a [`Desc`]; strides are in elements.
    unsafe fn init_md(
        &self,
        desc: &mut Desc,
        dims: [usize; 2],
        strides: [isize; 2],
        dtype: c_int,
    ) -> Result<()> {
        let mut d = [0i64; MAX_NDIMS];
        let mut s = [0i64; MAX_NDIMS];
        for i in 0..2 {
            d[i] = dims[i] as i64;
            s[i] = strides[i] as i64;
        }
        let md = desc.as_mut_ptr().cast();
        check(
            unsafe { (self.api.md_init_by_strides)(md, 2, d.as_ptr(), dtype, s.as_ptr()) },
            "dnnl_memory_desc_init_by_strides",
        )
    }

    /// The primitive computing `key`'s product, with its implementation's name.
    fn prepare(&self, key: Key) -> Result<Prepared> {
        let (mut a, mut b, mut dst) = (new_desc(), new_desc(), new_desc());
        let mut matmul = new_desc();
        let api = &self.api;
        // SAFETY: every descriptor is a `Desc`; attributes and post-ops are destroyed after the
        // primitive descriptor that copied them is made, and that after the primitive.
        unsafe {
            self.init_md(&mut a, [key.m, key.k], [key.a.0, key.a.1], DNNL_BF16)?;
            self.init_md(&mut b, [key.k, key.n], [key.b.0, key.b.1], DNNL_BF16)?;
            self.init_md(&mut dst, [key.m, key.n], [key.dst_rs as isize, 1], DNNL_F32)?;
            check(
                (api.matmul_desc_init)(
                    matmul.as_mut_ptr().cast(),
                    a.as_ptr().cast(),
                    b.as_ptr().cast(),
                    std::ptr::null(),
                    dst.as_ptr().cast(),
                ),
                "dnnl_matmul_desc_init",
            )?;
            let mut attr = std::ptr::null_mut();
            check((api.attr_create)(&mut attr), "dnnl_primitive_attr_create")?;
            let mut post_ops = std::ptr::null_mut();
            if key.accumulate {
                check((api.post_ops_create)(&mut post_ops), "dnnl_post_ops_create")?;
                check(
                    (api.post_ops_append_sum)(post_ops, 1.0),
                    "dnnl_post_ops_append_sum",
                )?;
                check(
                    (api.attr_set_post_ops)(attr, post_ops),
                    "dnnl_primitive_attr_set_post_ops",
                )?;
            }
            let mut pd = std::ptr::null_mut();
            let made = (api.pd_create)(
                &mut pd,
                matmul.as_ptr().cast(),
                attr,
                self.engine,
                std::ptr::null_mut(),
            );
            (api.attr_destroy)(attr);
            if !post_ops.is_null() {
                (api.post_ops_destroy)(post_ops);
            }
            check(made, "dnnl_primitive_desc_create (bf16 matmul)")?;
            let mut info: *const c_char = std::ptr::null();
            (api.pd_query)(
                pd,
                DNNL_QUERY_IMPL_INFO_STR,
                0,
                (&mut info as *mut *const c_char).cast(),
            );
            let implementation = if info.is_null() {
                "unknown".to_string()
            } else {
                CStr::from_ptr(info).to_string_lossy().into_owned()
            };
            let mut primitive = std::ptr::null_mut();
            check(
                (api.primitive_create)(&mut primitive, pd),
                "dnnl_primitive_create",
            )?;
            Ok(Prepared {
                primitive,
                implementation,
                a,
                b,
                dst,
            })
        }
    }

    /// # Safety
    /// As [`bf16_gemm`].
    unsafe fn execute(
        &self,
        p: &Prepared,
        a: *const bf16,
        b: *const bf16,
        dst: *mut f32,
    ) -> Result<()> {
        let api = &self.api;
        let mut mems = [std::ptr::null_mut(); 3];
        let handles: [(*const c_void, &Desc); 3] = [
            (a.cast(), &p.a),
            (b.cast(), &p.b),
            (dst.cast_const().cast(), &p.dst),
        ];
        let mut result = Ok(());
        for (mem, (ptr, desc)) in mems.iter_mut().zip(handles) {
            // SAFETY: the descriptor describes the caller's buffer at `ptr`.
            let status = unsafe {
                (api.memory_create)(mem, desc.as_ptr().cast(), self.engine, ptr.cast_mut())
            };
            result = result.and(check(status, "dnnl_memory_create"));
        }
        if result.is_ok() {
            let args = [
                ExecArg {
                    arg: DNNL_ARG_SRC,
                    memory: mems[0],
                },
                ExecArg {
                    arg: DNNL_ARG_WEIGHTS,
                    memory: mems[1],
                },
                ExecArg {
                    arg: DNNL_ARG_DST,
                    memory: mems[2],
                },
            ];
            // SAFETY: the primitive was made for these descriptors.
            result = unsafe {
                check(
                    (api.primitive_execute)(p.primitive, self.stream, 3, args.as_ptr()),
                    "dnnl_primitive_execute",
                )
                .and_then(|_| check((api.stream_wait)(self.stream), "dnnl_stream_wait"))
            };
        }
        for mem in mems.into_iter().filter(|m| !m.is_null()) {
            // SAFETY: made above; the buffers stay the caller's.
            unsafe { (api.memory_destroy)(mem) };
        }
        result
    }
}

/// `dst = [dst +] A·B` for bf16 `A: m×k`, `B: k×n` and a row-major f32 `dst` whose rows are
/// `dst_rs` apart, accumulated in f32 by oneDNN on `threads` threads.
///
/// # Safety
/// Every element the strides address lies in its allocation; `dst` does not overlap the
/// operands. Without `accumulate`, `dst` is only written.
///
/// # Errors
/// No oneDNN library, or oneDNN refused the product (it has bf16 matmul on every x86-64 CPU,
/// emulated where the CPU lacks bf16 instructions).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bf16_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Bf16Strided,
    b: Bf16Strided,
    threads: usize,
) -> Result<()> {
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i of the caller's m x n output.
                unsafe { std::ptr::write_bytes(dst.add(i * dst_rs), 0, n) };
            }
        }
        return Ok(());
    }
    let lib = dnnl().map_err(|e| anyhow::anyhow!("{e}"))?;
    let key = Key {
        m,
        n,
        k,
        a: (a.rs, a.cs),
        b: (b.rs, b.cs),
        dst_rs,
        accumulate,
    };
    let mut prepared = lib.prepared.lock().unwrap_or_else(|p| p.into_inner());
    let p = match prepared.entry(key) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => {
            let p = lib.prepare(key)?;
            tracing::debug!("oneDNN bf16 matmul {m}x{k} . {k}x{n}: {}", p.implementation);
            e.insert(p)
        }
    };
    if let Some(set) = lib.api.omp_set_num_threads {
        // SAFETY: sets the thread count of this thread's next OpenMP regions.
        unsafe { set(threads.max(1) as c_int) };
    }
    unsafe { lib.execute(p, a.ptr, b.ptr, dst) }
}

/// oneDNN's implementation for each product shape computed so far (`m×k·k×n` and the
/// implementation's name), sorted; empty without the library.
pub fn implementations() -> Vec<(String, String)> {
    let Ok(lib) = dnnl() else {
        return Vec::new();
    };
    let prepared = lib.prepared.lock().unwrap_or_else(|p| p.into_inner());
    let mut list: Vec<_> = prepared
        .iter()
        .map(|(key, p)| {
            let shape = format!("{}x{}.{}x{}", key.m, key.k, key.k, key.n);
            (shape, p.implementation.clone())
        })
        .collect();
    list.sort();
    list.dedup();
    list
}

/// A bf16 matrix stored contiguously: row-major, or its transpose stored row-major.
#[derive(Clone, Copy, Debug)]
pub struct Bf16Matrix<'a> {
    /// `rows × cols` values, or `cols × rows` when `transposed`.
    pub data: &'a [bf16],
    pub rows: usize,
    pub cols: usize,
    /// The data holds the transpose (e.g. a weight `W: n×k` used as `Wᵀ: k×n`).
    pub transposed: bool,
}

impl Bf16Matrix<'_> {
    fn strided(&self) -> Bf16Strided {
        let (rs, cs) = if self.transposed {
            (1, self.rows as isize)
        } else {
            (self.cols as isize, 1)
        };
        Bf16Strided {
            ptr: self.data.as_ptr(),
            rs,
            cs,
        }
    }
}

/// `dst = [dst +] A·B` with `dst` row-major `m × n` in f32: the safe form of the bf16
/// product, for benchmarks and tests. Threads: `candle_core::utils::get_num_threads()`.
///
/// # Errors
/// Mismatched sizes, no oneDNN library, or oneDNN refused the product.
pub fn bf16_matmul(a: Bf16Matrix, b: Bf16Matrix, dst: &mut [f32], accumulate: bool) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    ensure!(
        b.rows == k,
        "bf16 matmul: A is {m}x{k} but B is {}x{n}",
        b.rows
    );
    ensure!(
        a.data.len() == m * k && b.data.len() == k * n && dst.len() == m * n,
        "bf16 matmul: buffers of {}, {} and {} values for {m}x{k} . {k}x{n}",
        a.data.len(),
        b.data.len(),
        dst.len()
    );
    if m == 0 || n == 0 {
        return Ok(());
    }
    let threads = candle_core::utils::get_num_threads();
    // SAFETY: the lengths were checked against the sizes the strides address.
    unsafe {
        bf16_gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            n,
            accumulate,
            a.strided(),
            b.strided(),
            threads,
        )
    }?;
    Ok(())
}
