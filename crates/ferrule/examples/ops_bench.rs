//! Composite vs fused ops: forward+backward time and peak heap, at SmolLM2-135M shapes
//! (b=8, t=256, hidden 576, 9 query / 3 key-value heads of 64, vocab 49152).
//!
//! `cargo run --release --example ops_bench [reps]`
//!
//! Peak heap is counted by a wrapping global allocator (over the system allocator): the
//! largest live total during one forward+backward, gradient store included, above what was
//! live before (inputs excluded).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use ferrule::ops::attention::{attention, attention_reference, build_mask, MaskKind};
use ferrule::ops::loss::{causal_lm_loss, causal_lm_loss_reference, IGNORE_INDEX};
use ferrule::ops::norm::{layer_norm, layer_norm_reference, rms_norm, rms_norm_reference};
use ferrule::ops::rope::{Rope, RopeScaling};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            grow(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            grow(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
            grow(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Median wall time (ms) and peak extra heap (MB) of `f` over `reps` runs after a warm-up.
fn measure(reps: usize, f: &dyn Fn() -> Result<()>) -> Result<(f64, f64)> {
    f()?;
    let mut times = Vec::new();
    let mut peak = 0usize;
    for _ in 0..reps {
        let base = CURRENT.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        peak = peak.max(PEAK.load(Ordering::Relaxed) - base);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok((times[times.len() / 2], peak as f64 / (1 << 20) as f64))
}

fn randn(shape: &[usize], scale: f64) -> Result<Tensor> {
    Tensor::randn(0f32, scale as f32, shape, &Device::Cpu)
}

fn row(
    name: &str,
    reps: usize,
    composite: &dyn Fn() -> Result<()>,
    fused: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let (tc, mc) = measure(reps, composite)?;
    let (tf, mf) = measure(reps, fused)?;
    println!(
        "{name:<34} {tc:>10.2} {tf:>10.2} {:>8.2}x {mc:>11.1} {mf:>10.1} {:>7.2}x",
        tc / tf,
        mc / mf.max(1e-9)
    );
    Ok(())
}

fn main() -> Result<()> {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let (b, t, hidden, h, h_kv, d, vocab) = (
        8usize, 256usize, 576usize, 9usize, 3usize, 64usize, 49152usize,
    );
    let dev = Device::Cpu;
    println!(
        "threads: {}, reps: {reps} (median)",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<34} {:>10} {:>10} {:>9} {:>11} {:>10} {:>8}",
        "op (forward+backward)", "comp ms", "fused ms", "speedup", "comp MB", "fused MB", "mem"
    );

    // Norms over the residual stream [b, t, hidden].
    let x = Var::from_tensor(&randn(&[b, t, hidden], 1.0)?)?;
    let w = (randn(&[hidden], 0.1)? + 1.0)?;
    let bias = randn(&[hidden], 0.1)?;
    row(
        "rms_norm [8,256,576]",
        reps,
        &|| {
            rms_norm_reference(x.as_tensor(), &w, 1e-5)?
                .backward()
                .map(drop)
        },
        &|| rms_norm(x.as_tensor(), &w, 1e-5)?.backward().map(drop),
    )?;
    row(
        "layer_norm [8,256,576]",
        reps,
        &|| {
            layer_norm_reference(x.as_tensor(), &w, &bias, 1e-5)?
                .backward()
                .map(drop)
        },
        &|| {
            layer_norm(x.as_tensor(), &w, &bias, 1e-5)?
                .backward()
                .map(drop)
        },
    )?;

    // Rope on q [b, t, 9·64] and k [b, t, 3·64] (token-major, as the projections make them).
    let rope = Rope::new(d, 2048, 100000.0, &RopeScaling::Default, &dev)?;
    let q = Var::from_tensor(&randn(&[b, t, h * d], 1.0)?)?;
    let k = Var::from_tensor(&randn(&[b, t, h_kv * d], 1.0)?)?;
    let v = Var::from_tensor(&randn(&[b, t, h_kv * d], 1.0)?)?;
    row(
        "rope q+k",
        reps,
        &|| {
            (rope.apply_reference(q.as_tensor(), 0)?.sum_all()?
                + rope.apply_reference(k.as_tensor(), 0)?.sum_all()?)?
            .backward()
            .map(drop)
        },
        &|| {
            (rope.apply(q.as_tensor(), 0)?.sum_all()? + rope.apply(k.as_tensor(), 0)?.sum_all()?)?
                .backward()
                .map(drop)
        },
    )?;

    // Causal mask with left padding, [b, 1, t, t].
    let pad: Vec<u32> = (0..b)
        .flat_map(|i| (0..t).map(move |j| u32::from(j >= i * 16)))
        .collect();
    let padding = Tensor::from_vec(pad, (b, t), &dev)?;
    let mask = build_mask(
        MaskKind::Causal {
            sliding_window: None,
        },
        t,
        t,
        Some(&padding),
        &dev,
    )?
    .unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    row(
        "attention (incl. matmuls)",
        reps,
        &|| {
            attention_reference(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                h,
                Some(&mask),
                scale,
            )?
            .backward()
            .map(drop)
        },
        &|| {
            attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                h,
                Some(&mask),
                scale,
            )?
            .backward()
            .map(drop)
        },
    )?;

    // Causal-LM loss over logits [b, t, vocab] (402 MB).
    let logits = Var::from_tensor(&randn(&[b, t, vocab], 2.0)?)?;
    let labels: Vec<i64> = (0..b * t)
        .map(|i| {
            if i % 7 == 0 {
                IGNORE_INDEX
            } else {
                ((i * 7919) % vocab) as i64
            }
        })
        .collect();
    let labels = Tensor::from_vec(labels, (b, t), &dev)?;
    row(
        "causal_lm_loss [8,256,49152]",
        reps.min(3),
        &|| {
            causal_lm_loss_reference(logits.as_tensor(), &labels)?
                .0
                .backward()
                .map(drop)
        },
        &|| {
            causal_lm_loss(logits.as_tensor(), &labels)?
                .0
                .backward()
                .map(drop)
        },
    )?;
    Ok(())
}
