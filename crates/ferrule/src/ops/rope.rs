//! Rotary position embeddings (Su et al. 2021, RoFormer eq. 34), in the "rotate half"
//! layout that Hugging Face checkpoints use: `x·cos + rotate_half(x)·sin`.
//! candle's fused `rope` has no backward (docs/ARCHITECTURE.md, decisions, fix 4); this one is differentiable.
//! On the CPU in f32 it is one fused custom op with the cos/sin rows captured (no gradient
//! is computed or stored for the tables); elsewhere the composite [`Rope::apply_reference`].

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, D};

use super::kernels::{self, multiversion};

/// How `inv_freq` is derived (HF `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1 wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Precomputed cos/sin tables, `[max_pos, head_dim]`.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// `inv_freq[i] = θ^(−2i/d)`, then the scaling rule (as transformers' `ROPE_INIT_FUNCTIONS`).
pub fn inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    match scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let low_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_wavelen = original_max_position_embeddings / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    pub fn new(
        head_dim: usize,
        max_pos: usize,
        theta: f64,
        scaling: &RopeScaling,
        device: &Device,
    ) -> Result<Self> {
        let inv = inv_freq(head_dim, theta, scaling);
        let half = head_dim / 2;
        let mut cos = vec![0f32; max_pos * head_dim];
        let mut sin = vec![0f32; max_pos * head_dim];
        for p in 0..max_pos {
            for (i, f) in inv.iter().enumerate() {
                // transformers computes the angle in f32: position (f32) × inv_freq (f32).
                let angle = (p as f32) * (*f as f32);
                let (s, c) = angle.sin_cos();
                cos[p * head_dim + i] = c;
                cos[p * head_dim + i + half] = c;
                sin[p * head_dim + i] = s;
                sin[p * head_dim + i + half] = s;
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_pos, head_dim), device)?,
            sin: Tensor::from_vec(sin, (max_pos, head_dim), device)?,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Applies the rotation to every head of `x: [b, t, heads·head_dim]` (token-major, as the
    /// projections make it) for positions `offset..offset+t`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, t, hd) = x.dims3()?;
        let d = self.cos.dim(1)?;
        if offset + t > self.max_positions() {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's {} positions",
                offset + t,
                self.max_positions()
            )
        }
        if d == 0 || d % 2 != 0 || hd % d != 0 {
            candle_core::bail!("rope: {hd} features do not split into heads of {d}")
        }
        if kernels::fused_ok(x) && self.cos.dtype() == DType::F32 && self.cos.device().is_cpu() {
            let op = RopeOp {
                cos: self.cos.clone(),
                sin: self.sin.clone(),
                offset,
                t,
                heads: hd / d,
            };
            return x
                .contiguous()?
                .apply_op1_arc(std::sync::Arc::new(Box::new(op)));
        }
        self.apply_reference(x, offset)
    }

    /// Applies the rotation to every head of `x: [1, n, heads·head_dim]` with token `i` at
    /// position `positions[i]` (a padding-free batch, whose positions restart at each
    /// sequence). Same result, token by token, as [`Self::apply`] at those positions.
    pub fn apply_at(&self, x: &Tensor, positions: &[u32]) -> Result<Tensor> {
        let (b, t, hd) = x.dims3()?;
        let d = self.cos.dim(1)?;
        if b != 1 || positions.len() != t {
            candle_core::bail!(
                "rope: {} positions for x of shape {:?} (expected one row of {t})",
                positions.len(),
                x.dims()
            )
        }
        if let Some(&p) = positions
            .iter()
            .max()
            .filter(|&&p| p as usize >= self.max_positions())
        {
            candle_core::bail!(
                "position {p} exceeds the model's {} positions",
                self.max_positions()
            )
        }
        if d == 0 || d % 2 != 0 || hd % d != 0 {
            candle_core::bail!("rope: {hd} features do not split into heads of {d}")
        }
        let idx = Tensor::from_slice(positions, t, self.cos.device())?;
        let (cos, sin) = (
            self.cos.index_select(&idx, 0)?,
            self.sin.index_select(&idx, 0)?,
        );
        if kernels::fused_ok(x) && self.cos.dtype() == DType::F32 && self.cos.device().is_cpu() {
            let op = RopeOp {
                cos,
                sin,
                offset: 0,
                t,
                heads: hd / d,
            };
            return x
                .contiguous()?
                .apply_op1_arc(std::sync::Arc::new(Box::new(op)));
        }
        rotate(x, &cos, &sin)
    }

    /// Composite rotation from differentiable primitives (fallback and test reference).
    pub fn apply_reference(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dim(1)?;
        if offset + t > self.max_positions() {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's {} positions",
                offset + t,
                self.max_positions()
            )
        }
        rotate(
            x,
            &self.cos.narrow(0, offset, t)?,
            &self.sin.narrow(0, offset, t)?,
        )
    }
}

/// `x·cos + rotate_half(x)·sin` from differentiable primitives for `x: [b, t, heads·d]` and
/// table rows `cos, sin: [t, d]` (one per token).
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    let d = cos.dim(1)?;
    let x = x.reshape((b, t, hd / d, d))?;
    // [t, 1, d]: one row per position, broadcast over heads.
    let cos = cos.to_dtype(x.dtype())?.unsqueeze(1)?;
    let sin = sin.to_dtype(x.dtype())?.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)?
        .add(&rotated.broadcast_mul(&sin)?)?
        .reshape((b, t, hd))
}

/// Fused rotate-half rope over rows of `d` of `x: [b, t, heads·d]`; row `r` sits at position
/// `offset + (r / heads) mod t`. The tables `[max_pos, d]` are captured whole.
struct RopeOp {
    cos: Tensor,
    sin: Tensor,
    offset: usize,
    t: usize,
    heads: usize,
}

multiversion! {
    /// `y = x·cos + rot(x)·sin`, `rot(x) = cat(−x₂, x₁)`, for rows from row `r0` on (row `r`
    /// at sequence index `(r / heads) mod t`); `cos`, `sin` hold positions `offset..offset+t`.
    fn rope_fwd_rows(x: &[f32], cos: &[f32], sin: &[f32], t: usize, heads: usize, r0: usize, y: &mut [f32]) {
        let d = cos.len() / t;
        let h = d / 2;
        for (i, (x, y)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
            let p = ((r0 + i) / heads) % t;
            let (c, s) = (&cos[p * d..p * d + d], &sin[p * d..p * d + d]);
            let (x1, x2) = x.split_at(h);
            let (y1, y2) = y.split_at_mut(h);
            let (c1, c2) = c.split_at(h);
            let (s1, s2) = s.split_at(h);
            for ((((y, &a), &b), &c), &s) in y1.iter_mut().zip(x1).zip(x2).zip(c1).zip(s1) {
                *y = a * c + (-b) * s;
            }
            for ((((y, &a), &b), &c), &s) in y2.iter_mut().zip(x2).zip(x1).zip(c2).zip(s2) {
                *y = a * c + b * s;
            }
        }
    }
}

multiversion! {
    /// `dx = g·cos + rotᵀ(g·sin)`, `rotᵀ(u) = cat(u₂, −u₁)`.
    fn rope_bwd_rows(g: &[f32], cos: &[f32], sin: &[f32], t: usize, heads: usize, r0: usize, dx: &mut [f32]) {
        let d = cos.len() / t;
        let h = d / 2;
        for (i, (g, dx)) in g.chunks_exact(d).zip(dx.chunks_exact_mut(d)).enumerate() {
            let p = ((r0 + i) / heads) % t;
            let (c, s) = (&cos[p * d..p * d + d], &sin[p * d..p * d + d]);
            let (g1, g2) = g.split_at(h);
            let (d1, d2) = dx.split_at_mut(h);
            let (c1, c2) = c.split_at(h);
            let (s1, s2) = s.split_at(h);
            for ((((dx, &a), &b), &c), &s) in d1.iter_mut().zip(g1).zip(g2).zip(c1).zip(s2) {
                *dx = a * c + b * s;
            }
            for ((((dx, &a), &b), &c), &s) in d2.iter_mut().zip(g2).zip(g1).zip(c2).zip(s1) {
                *dx = a * c - b * s;
            }
        }
    }
}

/// A rope kernel over rows: `(src, cos, sin, …sizes, dst)`.
type RowKernel = fn(&[f32], &[f32], &[f32], usize, usize, usize, &mut [f32]);

impl RopeOp {
    /// Runs `kernel` over the rows of `src` into a new buffer, with the table rows in use.
    fn run(&self, src: &[f32], kernel: RowKernel) -> Result<Vec<f32>> {
        let mut out = vec![0f32; src.len()];
        kernels::with_f32s([&self.cos, &self.sin], "fused-rope", |[cos, sin]| {
            let d = self.cos.dim(1)?;
            let rows = self.offset * d..(self.offset + self.t) * d;
            let (cos, sin) = (&cos[rows.clone()], &sin[rows]);
            kernels::par_rows(&mut out, d, d, |r0, out| {
                kernel(
                    &src[r0 * d..r0 * d + out.len()],
                    cos,
                    sin,
                    self.t,
                    self.heads,
                    r0,
                    out,
                )
            });
            Ok(())
        })?;
        Ok(out)
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = kernels::contiguous_f32(storage, layout, self.name())?;
        let y = self.run(x, rope_fwd_rows)?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        let dx = kernels::with_f32(&g, self.name(), |g| self.run(g, rope_bwd_rows))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
