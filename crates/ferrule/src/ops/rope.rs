//! Rotary position embeddings (Su et al. 2021, RoFormer eq. 34), in the "rotate half"
//! layout that Hugging Face checkpoints use: `x·cos + rotate_half(x)·sin`.
//! candle's fused `rope` has no backward (DESIGN.md, fix 4); this one is differentiable.

use candle_core::{Device, Result, Tensor, D};

/// How `inv_freq` is derived (HF `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 wavelength-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// Precomputed cos/sin tables, `[max_pos, head_dim]`.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// `inv_freq[i] = θ^(−2i/d)`, then the scaling rule (as transformers' `ROPE_INIT_FUNCTIONS`).
pub fn inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)).collect();
    match scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
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
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    pub fn new(head_dim: usize, max_pos: usize, theta: f64, scaling: &RopeScaling, device: &Device) -> Result<Self> {
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

    /// Applies the rotation to `x: [b, heads, t, head_dim]` for positions `offset..offset+t`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        if offset + t > self.max_positions() {
            candle_core::bail!("sequence of {} positions exceeds the model's {} positions", offset + t, self.max_positions())
        }
        let cos = self.cos.narrow(0, offset, t)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, offset, t)?.to_dtype(x.dtype())?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)?.add(&rotated.broadcast_mul(&sin)?)
    }
}

