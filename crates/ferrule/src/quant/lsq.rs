//! A group-wise asymmetric learned-step-size quantizer (LSQ, Esser et al. 2020, "Learned Step
//! Size Quantization", ICLR, eq. 1–3; its offset as LSQ+, Bhalgat et al. 2020, eq. 4–5), the
//! quantizer L4Q trains (Jeon et al., arXiv 2402.04902, §3: `Q(W₀ + (α/r)·B A)`).
//!
//! A matrix `W: [rows, cols]` is cut along its columns (a linear's input dimension) into
//! groups of `group_size`; group `k` of row `i` has its own step `s_ik > 0` and offset `b_ik`
//! (`s, b: [rows, cols / group_size]`). For a `bits`-bit code, `Qn = 0` and `Qp = 2^bits − 1`
//! (unsigned codes: the offset carries the sign), and
//!
//! `v = (w − b) / s`, `w̄ = round(clamp(v, Qn, Qp))`, `ŵ = w̄·s + b`.
//!
//! `round` is half away from zero (`f32::round`), which on the clamped, non-negative `v` is
//! ggml's `(int)(v + 0.5f)` in `quantize_row_q4_1_ref`. The gradients (∂ŵ/∂·, straight-through
//! for `round`; LSQ eq. 3 for `s`, LSQ+ eq. 5 for `b`), with `inside = Qn < v < Qp`:
//!
//! - `∂ŵ/∂w = 1` inside, `0` outside (the clamped weights get none);
//! - `∂ŵ/∂s = w̄ − v` inside, `Qn` where `v ≤ Qn`, `Qp` where `v ≥ Qp`;
//! - `∂ŵ/∂b = 0` inside, `1` outside.
//!
//! With LSQ's gradient scale (§2.2), the step's and the offset's gradients are multiplied by
//! `g = 1/√(N·Qp)`, `N` the weights sharing one step (the group size).

use rayon::prelude::*;

/// The quantizer's shape: bits per code and values per group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupQuantizer {
    /// Bits per code, 2..=8 (codes are stored in a byte).
    pub bits: u32,
    /// Consecutive values of a row (input features) that share a step and an offset.
    pub group_size: usize,
    /// LSQ's gradient scale `g = 1/√(group_size · Qp)` on the step's and offset's gradients.
    pub grad_scale: bool,
}

/// A step `s ≤ 0` or not finite: the quantizer is undefined there.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BadStep {
    pub row: usize,
    pub group: usize,
    pub value: f32,
}

impl GroupQuantizer {
    /// The lowest code, 0.
    pub fn qn(&self) -> f32 {
        0.0
    }

    /// The highest code, `2^bits − 1`.
    pub fn qp(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    /// Groups per row of `cols` values (`cols` a multiple of the group size).
    pub fn groups(&self, cols: usize) -> usize {
        cols / self.group_size
    }

    /// The factor on the step's and offset's gradients: `1/√(group_size·Qp)` or 1.
    pub fn gradient_factor(&self) -> f32 {
        match self.grad_scale {
            true => 1.0 / ((self.group_size as f32) * self.qp()).sqrt(),
            false => 1.0,
        }
    }

    /// Each group's step and offset from its minimum and maximum: `s = (max − min)/(Qp − Qn)`,
    /// `b = min − Qn·s` (= min), so that the group's range maps onto the codes exactly (min to
    /// `Qn`, max to `Qp`). For 4 bits and groups of 32 this is ggml's Q4_1 (`d = (max −
    /// min)/15`, `m = min`), so training starts from the Q4_1 model. A constant group (max =
    /// min) gets `s = 1`: any positive step codes it exactly (`w̄ = 0`, `ŵ = b`).
    pub fn init_from_min_max(&self, w: &[f32], cols: usize) -> (Vec<f32>, Vec<f32>) {
        let (s, b): (Vec<f32>, Vec<f32>) = w
            .chunks_exact(self.group_size)
            .map(|g| {
                let min = g.iter().copied().fold(f32::INFINITY, f32::min);
                let max = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let s = (max - min) / (self.qp() - self.qn());
                let s = if s > 0.0 { s } else { 1.0 };
                (s, min - self.qn() * s)
            })
            .unzip();
        debug_assert_eq!(s.len(), w.len() / cols * self.groups(cols));
        (s, b)
    }

    /// The first step that is not a positive finite number, if any.
    pub fn check_steps(&self, s: &[f32], cols: usize) -> Option<BadStep> {
        let groups = self.groups(cols);
        s.iter()
            .position(|v| !(v.is_finite() && *v > 0.0))
            .map(|i| BadStep {
                row: i / groups,
                group: i % groups,
                value: s[i],
            })
    }

    /// `v` and the code `w̄ = round(clamp(v, Qn, Qp))` of one value.
    fn code(&self, w: f32, s: f32, b: f32) -> (f32, f32) {
        let v = (w - b) / s;
        (v, v.clamp(self.qn(), self.qp()).round())
    }

    /// The codes `w̄` of `w: [rows, cols]` (row-major), as bytes.
    pub fn codes(&self, w: &[f32], s: &[f32], b: &[f32], cols: usize) -> Vec<u8> {
        let gs = self.group_size;
        let mut out = vec![0u8; w.len()];
        out.par_chunks_mut(cols)
            .zip(w.par_chunks(cols))
            .enumerate()
            .for_each(|(i, (q, row))| {
                let g0 = i * self.groups(cols);
                for (j, (q, &w)) in q.iter_mut().zip(row).enumerate() {
                    *q = self.code(w, s[g0 + j / gs], b[g0 + j / gs]).1 as u8;
                }
            });
        out
    }

    /// `ŵ = w̄·s + b` of `w: [rows, cols]`, in place.
    pub fn fake_quantize(&self, w: &mut [f32], s: &[f32], b: &[f32], cols: usize) {
        let gs = self.group_size;
        w.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
            let g0 = i * self.groups(cols);
            for (j, w) in row.iter_mut().enumerate() {
                let (s, b) = (s[g0 + j / gs], b[g0 + j / gs]);
                *w = self.code(*w, s, b).1 * s + b;
            }
        });
    }

    /// The backward pass for `w: [rows, cols]` and `g = ∂L/∂ŵ` (same shape): `g` becomes
    /// `∂L/∂w` (zero where `w` was clamped) and `ds`, `db` (`[rows, groups]`) are set to the
    /// step's and offset's gradients (formulas in the module doc).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        w: &[f32],
        s: &[f32],
        b: &[f32],
        g: &mut [f32],
        ds: &mut [f32],
        db: &mut [f32],
        cols: usize,
    ) {
        let (gs, groups, factor) = (self.group_size, self.groups(cols), self.gradient_factor());
        let (qn, qp) = (self.qn(), self.qp());
        g.par_chunks_mut(cols)
            .zip(ds.par_chunks_mut(groups).zip(db.par_chunks_mut(groups)))
            .zip(w.par_chunks(cols))
            .enumerate()
            .for_each(|(i, ((g, (ds, db)), w))| {
                for k in 0..groups {
                    let (s_k, b_k) = (s[i * groups + k], b[i * groups + k]);
                    let (mut sum_s, mut sum_b) = (0f32, 0f32);
                    for j in k * gs..(k + 1) * gs {
                        let (v, q) = self.code(w[j], s_k, b_k);
                        let dw = g[j];
                        if v <= qn || v >= qp {
                            sum_s += dw * if v <= qn { qn } else { qp };
                            sum_b += dw;
                            g[j] = 0.0;
                        } else {
                            sum_s += dw * (q - v);
                        }
                    }
                    ds[k] = sum_s * factor;
                    db[k] = sum_b * factor;
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    const TWO_BITS: GroupQuantizer = GroupQuantizer {
        bits: 2,
        group_size: 4,
        grad_scale: false,
    };

    /// By hand, 2 bits (`Qn = 0`, `Qp = 3`), one group of 4, `s = 0.5`, `b = −0.2`,
    /// `w = (−0.5, 0.1, 0.6, 1.6)`: `v = (w − b)/s = (−0.6, 0.6, 1.6, 3.6)`, clamped
    /// `(0, 0.6, 1.6, 3)`, codes `(0, 1, 2, 3)`, `ŵ = (−0.2, 0.3, 0.8, 1.3)`. The first value is
    /// below the range and the last above it. For `∂L/∂ŵ = (1, 2, 3, 4)`: `∂L/∂w = (0, 2, 3,
    /// 0)`; `∂L/∂s = 1·Qn + 2·(1 − 0.6) + 3·(2 − 1.6) + 4·Qp = 0 + 0.8 + 1.2 + 12 = 14`;
    /// `∂L/∂b = 1 + 4 = 5`. With LSQ's gradient scale `g = 1/√(4·3)`: `14/√12`, `5/√12`.
    #[test]
    fn forward_and_gradients_by_hand() {
        let w = [-0.5f32, 0.1, 0.6, 1.6];
        let (s, b) = ([0.5f32], [-0.2f32]);
        assert_eq!(TWO_BITS.codes(&w, &s, &b, 4), vec![0, 1, 2, 3]);
        let mut fq = w;
        TWO_BITS.fake_quantize(&mut fq, &s, &b, 4);
        close(&fq, &[-0.2, 0.3, 0.8, 1.3]);
        let mut g = [1f32, 2.0, 3.0, 4.0];
        let (mut ds, mut db) = ([0f32], [0f32]);
        TWO_BITS.backward(&w, &s, &b, &mut g, &mut ds, &mut db, 4);
        close(&g, &[0.0, 2.0, 3.0, 0.0]);
        close(&ds, &[14.0]);
        close(&db, &[5.0]);
        let scaled = GroupQuantizer {
            grad_scale: true,
            ..TWO_BITS
        };
        let mut g = [1f32, 2.0, 3.0, 4.0];
        scaled.backward(&w, &s, &b, &mut g, &mut ds, &mut db, 4);
        close(&ds, &[14.0 / 12f32.sqrt()]);
        close(&db, &[5.0 / 12f32.sqrt()]);
    }

    /// Min/max init: two groups of one row, 4 bits. `(0, 1.5, 3, −1.5)`: min −1.5, max 3, so
    /// `s = 4.5/15 = 0.3`, `b = −1.5`; the range's ends get codes 0 and 15 and are exact. A
    /// constant group gets `s = 1`, `b` its value, and codes 0.
    #[test]
    fn the_min_max_init_maps_each_group_onto_the_codes() {
        let q = GroupQuantizer {
            bits: 4,
            group_size: 4,
            grad_scale: false,
        };
        let w = [0f32, 1.5, 3.0, -1.5, 2.0, 2.0, 2.0, 2.0];
        let (s, b) = q.init_from_min_max(&w, 8);
        close(&s, &[0.3, 1.0]);
        close(&b, &[-1.5, 2.0]);
        assert_eq!(q.codes(&w, &s, &b, 8), vec![5, 10, 15, 0, 0, 0, 0, 0]);
        let mut fq = w;
        q.fake_quantize(&mut fq, &s, &b, 8);
        close(&fq, &w);
        assert_eq!(q.check_steps(&s, 8), None);
        assert_eq!(
            q.check_steps(&[0.3, -0.1], 8),
            Some(BadStep {
                row: 0,
                group: 1,
                value: -0.1
            })
        );
    }
}
