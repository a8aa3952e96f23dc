//! The compute dtype of the frozen base's products: f32, or bf16 with f32 accumulation.
//!
//! With bf16 the frozen matrices (linear weights, embedding tables, the LM head) are held in
//! bf16 and their products, forward and input gradient, run in bf16 with f32 accumulation
//! through oneDNN ([`super::onednn`]). Everything else stays in f32: trainable parameters, their
//! gradients and optimizer state, norms, softmax, the loss and gradient accumulation. That is
//! the split `torch.autocast("cpu", torch.bfloat16)` makes for `nn.Linear` with f32 master
//! weights (torch's autocast op lists: `linear` and `matmul` run in the lower precision, norms
//! and softmax in f32), and peft's `autocast_adapter_dtype=True` keeps the adapter in f32.
//!
//! `auto` chooses bf16 where it is faster: on CPUs with AMX-BF16 always, on CPUs with
//! AVX512-BF16 when a measured product says so (on a 2-core Zen 4 bf16 products run 2.1–2.4x
//! f32, BENCHMARKS.md "bf16 products"), and never on CPUs with neither (oneDNN would emulate
//! bf16 there, slower than f32). The measured choice is made once per machine and kept
//! ([`measured_decision`]).

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The dtype the frozen base's products run in (after `auto` is resolved).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// f32 weights and products (bit-identical to ferrule before bf16 existed).
    #[default]
    F32,
    /// bf16 weights and products, f32 accumulation (oneDNN).
    Bf16,
}

impl ComputeDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
        }
    }

    /// The candle dtype frozen matrices are held in.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputeDtype::F32 => candle_core::DType::F32,
            ComputeDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the user asked for: a dtype, or `auto` ([`ComputeDtypeChoice::resolve`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtypeChoice {
    /// f32 products (bit-identical to ferrule before --compute-dtype existed).
    F32,
    /// bf16 products with f32 accumulation; an error on a CPU without bf16 instructions.
    Bf16,
    /// bf16 where the CPU has AMX-BF16, or AVX512-BF16 and a measured product is faster.
    #[default]
    Auto,
}

impl FromStr for ComputeDtypeChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Self::F32,
            "bf16" | "bfloat16" => Self::Bf16,
            "auto" => Self::Auto,
            other => bail!("unknown compute dtype {other:?}; expected f32, bf16 or auto"),
        })
    }
}

/// The dtype chosen for a run and why, as the run's first lines and its summary state it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComputeDtypeDecision {
    pub dtype: ComputeDtype,
    /// E.g. `asked for`, `the CPU has AMX-BF16`, or the probe's two measurements.
    pub reason: String,
}

impl fmt::Display for ComputeDtypeDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.dtype, self.reason)
    }
}

impl ComputeDtypeChoice {
    /// The dtype asked for, without checking this machine (`ferrule plan` plans for others);
    /// `auto` is decided on this machine.
    pub fn planned(self) -> Result<ComputeDtypeDecision> {
        let asked = |dtype| ComputeDtypeDecision {
            dtype,
            reason: "asked for".into(),
        };
        Ok(match self {
            Self::F32 => asked(ComputeDtype::F32),
            Self::Bf16 => asked(ComputeDtype::Bf16),
            Self::Auto => auto(),
        })
    }

    /// The dtype to compute in on this machine.
    ///
    /// # Errors
    /// `bf16` on a CPU without AVX512-BF16 or AMX-BF16 (named), or without oneDNN (the
    /// library searched for and how to install it). bf16 is never dropped silently.
    pub fn resolve(self) -> Result<ComputeDtypeDecision> {
        let decided = |dtype, reason: &str| ComputeDtypeDecision {
            dtype,
            reason: reason.to_string(),
        };
        match self {
            Self::F32 => Ok(decided(ComputeDtype::F32, "asked for")),
            Self::Bf16 => {
                bf16_support().map_err(|why| {
                    anyhow::anyhow!(
                        "--compute-dtype bf16 (the config's compute_dtype): {why}; use f32, or auto to let ferrule choose"
                    )
                })?;
                Ok(decided(ComputeDtype::Bf16, "asked for"))
            }
            Self::Auto => Ok(auto()),
        }
    }
}

/// `auto`'s decision, made once per process.
fn auto() -> ComputeDtypeDecision {
    static AUTO: OnceLock<ComputeDtypeDecision> = OnceLock::new();
    AUTO.get_or_init(|| {
        let f32_because = |why: String| ComputeDtypeDecision {
            dtype: ComputeDtype::F32,
            reason: format!("auto: {why}"),
        };
        let flags = match bf16_support() {
            Ok(flags) => flags,
            Err(why) => return f32_because(why),
        };
        if flags.amx_bf16 {
            return ComputeDtypeDecision {
                dtype: ComputeDtype::Bf16,
                reason: "auto: the CPU has AMX-BF16".into(),
            };
        }
        measured_decision()
    })
    .clone()
}

/// `auto`'s choice between the two measured products, taken once per machine and kept in
/// `compute-dtype.json` beside the matmul probe's cache (`ops::matmul_probe`), so that every
/// later run on the machine computes in the dtype the first one chose: a measurement taken
/// under load must not change a resumed run's dtype, nor what eval computes after train.
fn measured_decision() -> ComputeDtypeDecision {
    let cache = super::matmul_probe::cache_dir().map(|d| d.join("compute-dtype.json"));
    let library = super::onednn::library().unwrap_or("no oneDNN");
    let threads = rayon::current_num_threads();
    let machine = super::matmul_probe::machine_key(library, threads);
    super::matmul_probe::decide_once(cache.as_deref(), &machine, "auto", || {
        let f32_because = |why: String| ComputeDtypeDecision {
            dtype: ComputeDtype::F32,
            reason: format!("auto: {why}"),
        };
        match measure() {
            Ok((bf16, f32)) if bf16 >= AUTO_MIN_GAIN * f32 => ComputeDtypeDecision {
                dtype: ComputeDtype::Bf16,
                reason: format!(
                    "auto: AVX512-BF16, bf16 products measured at {bf16:.0} GFLOP/s against f32's {f32:.0}"
                ),
            },
            Ok((bf16, f32)) => f32_because(format!(
                "bf16 products measured at {bf16:.0} GFLOP/s, not faster than f32's {f32:.0}"
            )),
            Err(e) => f32_because(format!("the bf16 probe failed ({e:#})")),
        }
    })
}

/// How much faster a measured bf16 product must be for `auto` to choose it: a margin, so that
/// two processes measuring near-equal speeds do not choose differently.
const AUTO_MIN_GAIN: f64 = 1.2;

/// The bf16 instructions the CPU has, as `/proc/cpuinfo` and the `cpuid` bits name them.
#[derive(Clone, Copy, Debug)]
struct Bf16Flags {
    amx_bf16: bool,
}

/// Whether this machine can compute bf16 products: the CPU has AVX512-BF16 or AMX-BF16, and
/// oneDNN opens. The error says what is missing.
fn bf16_support() -> std::result::Result<Bf16Flags, String> {
    let avx512_bf16 = has_avx512_bf16();
    let amx_bf16 = cpu_flag("amx_bf16");
    if !avx512_bf16 && !amx_bf16 {
        return Err(
            "this CPU has neither avx512_bf16 nor amx_bf16 (lscpu's flags); bf16 \
                    products would be emulated, slower than f32. Use --compute-dtype f32 or auto"
                .into(),
        );
    }
    super::onednn::library()
        .map_err(|why| format!("bf16 products need oneDNN, which is not available: {why}"))?;
    Ok(Bf16Flags { amx_bf16 })
}

fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether `/proc/cpuinfo` lists `flag` (Linux; AMX is not among the features `std` detects).
fn cpu_flag(flag: &str) -> bool {
    static FLAGS: OnceLock<String> = OnceLock::new();
    let flags = FLAGS.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("flags"))
                    .map(str::to_string)
            })
            .unwrap_or_default()
    });
    flags.split_whitespace().any(|f| f == flag)
}

/// GFLOP/s of one bf16 and one f32 product of a shape typical of the frozen base's (512 tokens
/// through a 1024 → 1024 projection), the best of three each after a warm-up.
fn measure() -> Result<(f64, f64)> {
    use super::onednn::{bf16_matmul, Bf16Matrix};
    let (m, n, k) = (512, 1024, 1024);
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i % 89) as f32 - 44.0) / 64.0)
        .collect();
    let (a16, b16) = (super::bf16::to_bf16(&a), super::bf16::to_bf16(&b));
    let mut dst = vec![0f32; m * n];
    let gflops = |mut run: Box<dyn FnMut() -> Result<()> + '_>| -> Result<f64> {
        run()?;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            run()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(2.0 * (m * n * k) as f64 / best / 1e9)
    };
    let bf16 = {
        let dst = &mut dst;
        gflops(Box::new(|| {
            let a = Bf16Matrix {
                data: &a16,
                rows: m,
                cols: k,
                transposed: false,
            };
            let b = Bf16Matrix {
                data: &b16,
                rows: k,
                cols: n,
                transposed: false,
            };
            bf16_matmul(a, b, dst, false)
        }))?
    };
    let f32 = {
        let dst = &mut dst;
        gflops(Box::new(|| {
            use super::kernels::{matmul_par, Mat};
            matmul_par(m, n, k, dst, false, Mat::n(&a), Mat::n(&b), 1.0);
            Ok(())
        }))?
    };
    Ok((bf16, f32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_name_the_valid_values() {
        assert_eq!(
            "BF16".parse::<ComputeDtypeChoice>().unwrap(),
            ComputeDtypeChoice::Bf16
        );
        assert_eq!(
            "auto".parse::<ComputeDtypeChoice>().unwrap(),
            ComputeDtypeChoice::Auto
        );
        let e = "fp16"
            .parse::<ComputeDtypeChoice>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("fp16") && e.contains("f32, bf16 or auto"), "{e}");
    }

    /// f32 is always available; bf16 resolves only where the CPU and oneDNN allow it, and
    /// otherwise names what is missing; auto never errors.
    #[test]
    fn resolving_matches_the_machine() {
        let f = ComputeDtypeChoice::F32.resolve().unwrap();
        assert_eq!(f.dtype, ComputeDtype::F32);
        match (bf16_support(), ComputeDtypeChoice::Bf16.resolve()) {
            (Ok(_), Ok(d)) => assert_eq!(d.dtype, ComputeDtype::Bf16),
            (Err(why), Err(e)) => assert!(e.to_string().contains(&why), "{e}"),
            (s, r) => panic!("support {s:?} but resolve {r:?}"),
        }
        let auto = ComputeDtypeChoice::Auto.resolve().unwrap();
        assert!(auto.reason.starts_with("auto: "), "{auto}");
        if bf16_support().is_err() {
            assert_eq!(auto.dtype, ComputeDtype::F32);
        }
    }
}
