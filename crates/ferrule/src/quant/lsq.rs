//! A group-wise asymmetric learned-step-size quantizer (LSQ, Esser et al. 2020, "Learned Step
//! Size Quantization", ICLR, eq. 1–3; its offset as LSQ+, Bhalgat et al. 2020, eq. 4–5), the
//! quantizer L4Q trains (Jeon et al., arXiv 2402.04902: `Q(W₀ + α·B A)`, Algorithm 1 of v1).
//!
//! A matrix `W: [rows, cols]` is cut along its columns (a linear's input dimension) into
//! groups of `group_size`; group `k` of row `i` has its own step `s_ik > 0` and offset `b_ik`
//! (`s, b: [rows, cols / group_size]`). For a `bits`-bit code the range is L4Q's signed one,
//! `Qn = −2^(bits−1)`, `Qp = 2^(bits−1) − 1` (v1, Algorithm 1: "Qn = −2^(n−1), Qp = 2^(n−1) −
//! 1"), or, with [`GroupQuantizer::signed`] off, the unsigned `Qn = 0`, `Qp = 2^bits − 1`
//! (ferrule's convention before it could read the paper; GGUF Q4_1's). Then
//!
//! `v = (w − b) / s`, `w̄ = ⌊clamp(v, Qn, Qp) + ½⌋`, `ŵ = w̄·s + b`.
//!
//! Both ranges give the same grid (`b` of the signed range is `m − Qn·s` for the unsigned
//! offset `m`); they differ in what the trained offset pins when the step moves, hence in the
//! step's gradient on clamped values below. Rounding is half up, so the code is the same in
//! both ranges and equals ggml's `(int)(v + 0.5f)` on the unsigned `v` (`quantize_row_q4_1_ref`).
//! Codes are stored as bytes `w̄ − Qn` (`0..=2^bits − 1`, Q4_1's `q`). The gradients (∂ŵ/∂·,
//! straight-through for the rounding; LSQ eq. 3 for `s`, LSQ+ eq. 5 for `b`), with `inside =
//! Qn < v < Qp`:
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
    /// L4Q's signed code range `−2^(bits−1)..=2^(bits−1) − 1` (v1, Algorithm 1); off, the
    /// unsigned `0..=2^bits − 1`.
    pub signed: bool,
}

/// A step `s ≤ 0` or not finite: the quantizer is undefined there.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BadStep {
    pub row: usize,
    pub group: usize,
    pub value: f32,
}

impl GroupQuantizer {
    /// The lowest code: `−2^(bits−1)` signed, 0 unsigned.
    pub fn qn(&self) -> f32 {
        match self.signed {
            true => -((1u32 << (self.bits - 1)) as f32),
            false => 0.0,
        }
    }

    /// The highest code: `2^(bits−1) − 1` signed, `2^bits − 1` unsigned.
    pub fn qp(&self) -> f32 {
        self.qn() + ((1u32 << self.bits) - 1) as f32
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
    /// `b = min − Qn·s` (min + 8s for signed 4 bits), so that the group's range maps onto the
    /// codes exactly (min to `Qn`, max to `Qp`). For 4 bits and groups of 32 this is ggml's
    /// Q4_1 grid (`d = (max − min)/15`, `m = min`), so training starts from the Q4_1 model.
    /// ferrule's choice: the paper (v1, Algorithm 1) says only "Initialize s_w, b_w". A
    /// constant group (max = min) gets `s = 1`: any positive step codes it exactly (`w̄ = Qn`,
    /// `ŵ = min`).
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

    /// `v` and the code `w̄ = ⌊clamp(v, Qn, Qp) + ½⌋` of one value.
    fn code(&self, w: f32, s: f32, b: f32) -> (f32, f32) {
        let v = (w - b) / s;
        (v, (v.clamp(self.qn(), self.qp()) + 0.5).floor())
    }

    /// The offsets of the unsigned codes the bytes of [`Self::codes`] are: `m = b + Qn·s`, the
    /// value of byte 0 (GGUF Q4_1's `m`); `b` itself when unsigned.
    pub fn byte_offsets(&self, s: &[f32], b: &[f32]) -> Vec<f32> {
        s.iter().zip(b).map(|(s, b)| b + self.qn() * s).collect()
    }

    /// The codes of `w: [rows, cols]` (row-major) as bytes `w̄ − Qn` (`0..=2^bits − 1`), so
    /// that value = byte·s + [`Self::byte_offsets`].
    pub fn codes(&self, w: &[f32], s: &[f32], b: &[f32], cols: usize) -> Vec<u8> {
        let gs = self.group_size;
        let mut out = vec![0u8; w.len()];
        out.par_chunks_mut(cols)
            .zip(w.par_chunks(cols))
            .enumerate()
            .for_each(|(i, (q, row))| {
                let g0 = i * self.groups(cols);
                for (j, (q, &w)) in q.iter_mut().zip(row).enumerate() {
                    *q = (self.code(w, s[g0 + j / gs], b[g0 + j / gs]).1 - self.qn()) as u8;
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
        signed: true,
    };

    /// By hand, 2 signed bits (`Qn = −2`, `Qp = 1`), one group of 4, `s = 0.5`, `b = 0.8`,
    /// `w = (−0.5, 0.1, 0.6, 1.6)`: `v = (w − b)/s = (−2.6, −1.4, −0.4, 1.6)`, clamped `(−2,
    /// −1.4, −0.4, 1)`, codes `(−2, −1, 0, 1)` (bytes `(0, 1, 2, 3)`), `ŵ = (−0.2, 0.3, 0.8,
    /// 1.3)`. The first value is below the range and the last above it. For `∂L/∂ŵ = (1, 2,
    /// 3, 4)`: `∂L/∂w = (0, 2, 3, 0)`; `∂L/∂s = 1·Qn + 2·(−1 + 1.4) + 3·(0 + 0.4) + 4·Qp = −2 +
    /// 0.8 + 1.2 + 4 = 4`; `∂L/∂b = 1 + 4 = 5`. With LSQ's gradient scale `g = 1/√(4·Qp) =
    /// ½`: 2 and 2.5. The same grid unsigned (`Qn = 0`, `Qp = 3`, `b = −0.2`, the byte offset
    /// of the signed one: `0.8 − 2·0.5`) gives the same codes and `∂L/∂b`, but `∂L/∂s = 1·0 +
    /// 0.8 + 1.2 + 4·3 = 14`: what the offset pins when the step moves differs.
    #[test]
    fn forward_and_gradients_by_hand() {
        let w = [-0.5f32, 0.1, 0.6, 1.6];
        let unsigned = GroupQuantizer {
            signed: false,
            ..TWO_BITS
        };
        for (q, b, want_ds, g) in [
            (TWO_BITS, 0.8f32, 4f32, 0.5f32),
            (unsigned, -0.2, 14.0, 1.0 / 12f32.sqrt()),
        ] {
            let (s, b) = ([0.5f32], [b]);
            assert_eq!(q.codes(&w, &s, &b, 4), vec![0, 1, 2, 3]);
            close(&q.byte_offsets(&s, &b), &[-0.2]);
            let mut fq = w;
            q.fake_quantize(&mut fq, &s, &b, 4);
            close(&fq, &[-0.2, 0.3, 0.8, 1.3]);
            let mut g_w = [1f32, 2.0, 3.0, 4.0];
            let (mut ds, mut db) = ([0f32], [0f32]);
            q.backward(&w, &s, &b, &mut g_w, &mut ds, &mut db, 4);
            close(&g_w, &[0.0, 2.0, 3.0, 0.0]);
            close(&ds, &[want_ds]);
            close(&db, &[5.0]);
            let scaled = GroupQuantizer {
                grad_scale: true,
                ..q
            };
            let mut g_w = [1f32, 2.0, 3.0, 4.0];
            scaled.backward(&w, &s, &b, &mut g_w, &mut ds, &mut db, 4);
            close(&ds, &[want_ds * g]);
            close(&db, &[5.0 * g]);
        }
    }

    /// Rounding is half up in both ranges: `v = −1.5` (signed) is code −1, byte 1, as `v = 0.5`
    /// is byte 1 unsigned (ggml's `(int)(v + 0.5f)`); `f32::round` would give −2 signed.
    #[test]
    fn ties_round_up_in_both_ranges() {
        let (s, w) = ([1f32], [0.5f32, 1.5, 2.5, 3.0]);
        assert_eq!(TWO_BITS.codes(&w, &s, &[2.0], 4), vec![1, 2, 3, 3]);
        let unsigned = GroupQuantizer {
            signed: false,
            ..TWO_BITS
        };
        assert_eq!(unsigned.codes(&w, &s, &[0.0], 4), vec![1, 2, 3, 3]);
    }

    /// Min/max init: two groups of one row, 4 signed bits (`Qn = −8`). `(0, 1.5, 3, −1.5)`: min
    /// −1.5, max 3, so `s = 4.5/15 = 0.3`, `b = −1.5 + 8·0.3 = 0.9` (byte offset −1.5, Q4_1's
    /// `m`); the range's ends get bytes 0 and 15 and are exact. A constant group gets `s = 1`,
    /// `b` its value + 8, and byte 0.
    #[test]
    fn the_min_max_init_maps_each_group_onto_the_codes() {
        let q = GroupQuantizer {
            bits: 4,
            group_size: 4,
            grad_scale: false,
            signed: true,
        };
        assert_eq!((q.qn(), q.qp()), (-8.0, 7.0));
        let w = [0f32, 1.5, 3.0, -1.5, 2.0, 2.0, 2.0, 2.0];
        let (s, b) = q.init_from_min_max(&w, 8);
        close(&s, &[0.3, 1.0]);
        close(&b, &[0.9, 10.0]);
        close(&q.byte_offsets(&s, &b), &[-1.5, 2.0]);
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
