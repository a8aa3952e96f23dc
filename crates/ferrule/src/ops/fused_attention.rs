//! Attention as one CPU custom op, forward and backward, that never holds the `[b, h, t, s]`
//! scores or probabilities (the FlashAttention scheme: Dao et al. 2022, alg. 1 and 4; Dao
//! 2023, alg. 2, without the online softmax since a whole key row fits in cache here).
//!
//! Inputs and output are token-major, as the projections make them (`[b, t, heads·d]`): the
//! kernel reads each head's rows with a stride, so no transposed copies enter the graph.
//! The forward runs per (batch, query head), one tile of query rows at a time: the scores
//! `S = scale · Q Kᵀ + mask`, the softmax in place, then `O = P V`. It keeps the max and sum
//! of every softmax row (two floats a query). The backward runs per (batch, key/value head)
//! over the query heads of its group, recomputes each tile's `P` from those statistics, and
//! accumulates
//!
//! `dV += Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = scale · dS K`,
//! `dK += scale · dSᵀ Q`.
//!
//! Written by hand because candle has no fused attention on the CPU: with its composite the
//! graph keeps the scores and the probabilities of every layer until backward, and backward
//! allocates, zero-fills and accumulates a gradient of the same size for each.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::attention::MASKED;
use super::kernels::{self, matmul, multiversion, Mat};

/// Score elements per tile of query rows (64 KiB of f32: the tile stays in L2, and a causal
/// mask's tiles are short enough that [`key_range`] skips about 3/8 of the scores at 256 keys).
const TILE_SCORES: usize = 16 * 1024;

/// `softmax(scale · q kᵀ + mask) v` for contiguous f32 `q: [b, t, h·d]`,
/// `k, v: [b, s, h_kv·d]` (query head `i` reads key/value head `i / (h / h_kv)`);
/// `mask: [b|1, 1, t|1, s]`, captured. The output is `[b, t, h·d]`.
pub(super) struct FusedAttention {
    mask: Option<Tensor>,
    scale: f32,
    heads: usize,
    /// `[b, h, t, 2]`: the max and the sum of each forward softmax row, for the backward.
    stats: Mutex<Vec<f32>>,
}

impl FusedAttention {
    pub fn new(mask: Option<Tensor>, scale: f32, heads: usize) -> Self {
        Self { mask, scale, heads, stats: Mutex::new(Vec::new()) }
    }

    /// `(b, h, h_kv, t, s, d)` of `q: [b, t, h·d]` and `k: [b, s, h_kv·d]`.
    fn dims(&self, q: &Shape, k: &Shape) -> Result<Dims> {
        let (b, t, hd) = q.dims3()?;
        let (_, s, kd) = k.dims3()?;
        let h = self.heads;
        let d = hd / h.max(1);
        let h_kv = kd / d.max(1);
        if h == 0 || d == 0 || hd != h * d || kd != h_kv * d || h_kv == 0 || !h.is_multiple_of(h_kv) {
            candle_core::bail!("fused-attention: q has {hd} features for {h} heads, k has {kd}")
        }
        Ok(Dims { b, h, h_kv, t, s, d })
    }

    fn with_mask<R>(&self, f: impl FnOnce(MaskRows) -> Result<R>) -> Result<R> {
        match &self.mask {
            None => f(MaskRows { data: &[], per_batch: 0, per_query: 0 }),
            Some(m) => {
                let (mb, _, mt, s) = m.dims4()?;
                kernels::with_f32(m, "fused-attention", |data| {
                    f(MaskRows { data, per_batch: if mb > 1 { mt * s } else { 0 }, per_query: if mt > 1 { s } else { 0 } })
                })
            }
        }
    }
}

/// The additive mask as a lookup of one row of `s` per (batch, query).
#[derive(Clone, Copy)]
struct MaskRows<'a> {
    data: &'a [f32],
    /// Stride between batch elements (0: one mask for all).
    per_batch: usize,
    /// Stride between queries (0: one row for all queries).
    per_query: usize,
}

impl MaskRows<'_> {
    fn rows(&self, batch: usize, q0: usize, n: usize, s: usize) -> Option<(&[f32], usize)> {
        if self.data.is_empty() {
            return None;
        }
        let start = batch * self.per_batch + q0 * self.per_query;
        let len = if self.per_query == 0 { s } else { n * s };
        Some((&self.data[start..start + len], self.per_query))
    }
}

/// The keys a tile of query rows can see: the smallest `lo..hi` outside which every row's
/// mask is [`MASKED`] (a causal mask's upper triangle, left padding), so the tile's scores and
/// products skip those columns; their probabilities are exactly 0 either way. A fully masked
/// row attends uniformly to all keys, so it keeps the whole range.
fn key_range(mask: Option<(&[f32], usize)>, n: usize, s: usize) -> (usize, usize) {
    let Some((m, stride)) = mask else { return (0, s) };
    let (mut lo, mut hi) = (s, 0);
    for i in 0..n {
        let row = &m[i * stride..i * stride + s];
        let seen = |x: &f32| *x > MASKED;
        match (row.iter().position(seen), row.iter().rposition(seen)) {
            (Some(a), Some(b)) => (lo, hi) = (lo.min(a), hi.max(b + 1)),
            _ => return (0, s),
        }
        if stride == 0 {
            break;
        }
    }
    if lo >= hi {
        (0, s)
    } else {
        (lo, hi)
    }
}

/// [`key_range`] of every tile of `tq` query rows: the mask is the same for all heads, so it
/// is scanned once per call, not once per head.
struct TileKeyRanges {
    ranges: Vec<(usize, usize)>,
    tiles_per_batch: usize,
    tq: usize,
}

impl TileKeyRanges {
    fn new(mask: &MaskRows, b: usize, t: usize, s: usize, tq: usize) -> Self {
        let ranges = (0..b)
            .into_par_iter()
            .flat_map_iter(|batch| (0..t).step_by(tq).map(move |q0| key_range(mask.rows(batch, q0, tq.min(t - q0), s), tq.min(t - q0), s)))
            .collect();
        Self { ranges, tiles_per_batch: t.div_ceil(tq), tq }
    }

    /// The keys the tile starting at query row `q0` of `batch` can see.
    fn get(&self, batch: usize, q0: usize) -> (usize, usize) {
        self.ranges[batch * self.tiles_per_batch + q0 / self.tq]
    }
}

/// Query rows per tile for keys of length `s`.
fn tile_rows(s: usize, t: usize) -> usize {
    (TILE_SCORES / s.max(1)).clamp(1, t.max(1))
}

multiversion! {
    /// Rows of `p` (each `s` scores, already scaled) become `softmax(p + mask)`; each row's
    /// max and sum go to `stats` (two floats a row). `mask` is empty, or one row (`stride` 0),
    /// or one row per row of `p` (`stride` = `s`).
    fn softmax_rows(p: &mut [f32], mask: &[f32], stride: usize, s: usize, stats: &mut [f32]) {
        for (i, (row, st)) in p.chunks_exact_mut(s).zip(stats.chunks_exact_mut(2)).enumerate() {
            if !mask.is_empty() {
                let m = &mask[i * stride..i * stride + s];
                for (x, &m) in row.iter_mut().zip(m) {
                    *x += m;
                }
            }
            let mx = kernels::max(row);
            for x in row.iter_mut() {
                *x = kernels::exp(*x - mx);
            }
            let sum = kernels::sum(row);
            for x in row.iter_mut() {
                *x /= sum;
            }
            st[0] = mx;
            st[1] = sum;
        }
    }
}

multiversion! {
    /// Recomputes the probabilities of rows of `p` (scaled scores) from the forward's
    /// statistics, as [`softmax_rows`] computed them.
    fn probs_rows(p: &mut [f32], mask: &[f32], stride: usize, s: usize, stats: &[f32]) {
        for (i, (row, st)) in p.chunks_exact_mut(s).zip(stats.chunks_exact(2)).enumerate() {
            if !mask.is_empty() {
                let m = &mask[i * stride..i * stride + s];
                for (x, &m) in row.iter_mut().zip(m) {
                    *x += m;
                }
            }
            let (mx, sum) = (st[0], st[1]);
            for x in row.iter_mut() {
                *x = kernels::exp(*x - mx) / sum;
            }
        }
    }
}

multiversion! {
    /// `dp ← p ⊙ (dp − D_i)` per row of `s`, `D_i = dO_i·O_i`.
    fn score_grad_rows(dp: &mut [f32], p: &[f32], di: &[f32], s: usize) {
        for ((dp, p), &di) in dp.chunks_exact_mut(s).zip(p.chunks_exact(s)).zip(di) {
            for (dp, &p) in dp.iter_mut().zip(p) {
                *dp = p * (*dp - di);
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    h_kv: usize,
    t: usize,
    s: usize,
    d: usize,
}

impl Dims {
    /// Offset of head `head`'s first row in a `[b, len, heads·d]` tensor, for batch `batch`.
    fn head_start(&self, batch: usize, len: usize, heads: usize, head: usize) -> usize {
        batch * len * heads * self.d + head * self.d
    }
}

/// Copies rows of `d` from `src` (packed) into `dst` at `start`, `stride` apart.
fn scatter_rows(src: &[f32], d: usize, dst: &mut [f32], start: usize, stride: usize) {
    for (i, row) in src.chunks_exact(d).enumerate() {
        dst[start + i * stride..start + i * stride + d].copy_from_slice(row);
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let q = kernels::contiguous_f32(s1, l1, self.name())?;
        let k = kernels::contiguous_f32(s2, l2, self.name())?;
        let v = kernels::contiguous_f32(s3, l3, self.name())?;
        let dm = self.dims(l1.shape(), l2.shape())?;
        let Dims { b, h, h_kv, t, s, d } = dm;
        let (groups, tq, q_rs, kv_rs) = (h / h_kv, tile_rows(s, t), h * d, h_kv * d);
        // One unit of work per (batch, query head): its output rows (packed) and statistics.
        let units: Vec<(Vec<f32>, Vec<f32>)> = self.with_mask(|mask| {
            let ranges = TileKeyRanges::new(&mask, b, t, s, tq);
            Ok((0..b * h)
                .into_par_iter()
                .map(|unit| {
                    let (batch, head) = (unit / h, unit % h);
                    let qh = &q[dm.head_start(batch, t, h, head)..];
                    let kv0 = dm.head_start(batch, s, h_kv, head / groups);
                    let (kh, vh) = (Mat::n(&k[kv0..]).rows_apart(kv_rs), Mat::n(&v[kv0..]).rows_apart(kv_rs));
                    let mut o = vec![0f32; t * d];
                    let mut st = vec![0f32; t * 2];
                    let mut p = vec![0f32; tq * s];
                    for q0 in (0..t).step_by(tq) {
                        let n = tq.min(t - q0);
                        let rows = mask.rows(batch, q0, n, s);
                        let (lo, hi) = ranges.get(batch, q0);
                        let w = hi - lo;
                        let (m, stride) = rows.map_or((&[][..], 0), |(m, stride)| (&m[lo..], stride));
                        let (kt, vt) = (Mat { transposed: true, ..kh.skip_rows(lo, kv_rs) }, vh.skip_rows(lo, kv_rs));
                        let p = &mut p[..n * w];
                        matmul(n, w, d, p, false, Mat::n(&qh[q0 * q_rs..]).rows_apart(q_rs), kt, self.scale);
                        softmax_rows(p, m, stride, w, &mut st[q0 * 2..(q0 + n) * 2]);
                        matmul(n, d, w, &mut o[q0 * d..(q0 + n) * d], false, Mat::n(p), vt, 1.0);
                    }
                    (o, st)
                })
                .collect())
        })?;
        let mut out = vec![0f32; q.len()];
        let mut stats = Vec::with_capacity(b * h * t * 2);
        for (unit, (o, st)) in units.into_iter().enumerate() {
            scatter_rows(&o, d, &mut out, dm.head_start(unit / h, t, h, unit % h), q_rs);
            stats.extend_from_slice(&st);
        }
        *self.stats.lock().expect("fused-attention statistics") = stats;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = self.dims(q.shape(), k.shape())?;
        let Dims { b, h, h_kv, t, s, d } = dm;
        let (groups, tq, q_rs, kv_rs) = (h / h_kv, tile_rows(s, t), h * d, h_kv * d);
        let go = grad_res.contiguous()?;
        let stats = self.stats.lock().expect("fused-attention statistics");
        if stats.len() != b * h * t * 2 {
            candle_core::bail!("fused-attention: backward without a matching forward")
        }
        let name = self.name();
        // Gradients only for inputs something trainable lies below (the first layer's keys
        // from a frozen projection have none).
        let (need_q, need_k, need_v) = (q.track_op(), k.track_op(), v.track_op());
        let sized = |need: bool, n: usize| if need { n } else { 0 };
        // One unit per (batch, key/value head): the dQ rows of its query heads, its dK and dV.
        type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
        let units: Vec<Grads> = kernels::with_f32s([q, k, v, res, &go], name, |[q, k, v, o, go]| {
            self.with_mask(|mask| {
                let ranges = TileKeyRanges::new(&mask, b, t, s, tq);
                Ok((0..b * h_kv)
                    .into_par_iter()
                    .map(|unit| {
                        let (batch, kv_head) = (unit / h_kv, unit % h_kv);
                        let kv0 = dm.head_start(batch, s, h_kv, kv_head);
                        let (kh, vh) = (Mat::n(&k[kv0..]).rows_apart(kv_rs), Mat::n(&v[kv0..]).rows_apart(kv_rs));
                        let (mut dq, mut dk, mut dv) =
                            (vec![0f32; sized(need_q, groups * t * d)], vec![0f32; sized(need_k, s * d)], vec![0f32; sized(need_v, s * d)]);
                        let (mut p, mut dp, mut di) = (vec![0f32; tq * s], vec![0f32; tq * s], vec![0f32; tq]);
                        for g in 0..groups {
                            let head = kv_head * groups + g;
                            let q0h = dm.head_start(batch, t, h, head);
                            let st = &stats[(batch * h + head) * t * 2..(batch * h + head + 1) * t * 2];
                            for q0 in (0..t).step_by(tq) {
                                let n = tq.min(t - q0);
                                let rows = q0h + q0 * q_rs;
                                let (qt, got) = (Mat::n(&q[rows..]).rows_apart(q_rs), Mat::n(&go[rows..]).rows_apart(q_rs));
                                let mrows = mask.rows(batch, q0, n, s);
                                let (lo, hi) = ranges.get(batch, q0);
                                let w = hi - lo;
                                let (m, stride) = mrows.map_or((&[][..], 0), |(m, stride)| (&m[lo..], stride));
                                let (kt, vt) = (kh.skip_rows(lo, kv_rs), vh.skip_rows(lo, kv_rs));
                                let (p, dp, di) = (&mut p[..n * w], &mut dp[..n * w], &mut di[..n]);
                                matmul(n, w, d, p, false, qt, Mat { transposed: true, ..kt }, self.scale);
                                probs_rows(p, m, stride, w, &st[q0 * 2..(q0 + n) * 2]);
                                if need_v {
                                    matmul(w, d, n, &mut dv[lo * d..hi * d], true, Mat::t(p), got, 1.0);
                                }
                                matmul(n, w, d, dp, false, got, Mat { transposed: true, ..vt }, 1.0);
                                for (i, di) in di.iter_mut().enumerate() {
                                    let r = rows + i * q_rs;
                                    *di = kernels::dot(&go[r..r + d], &o[r..r + d]);
                                }
                                score_grad_rows(dp, p, di, w);
                                let dq_rows = (g * t + q0) * d..(g * t + q0 + n) * d;
                                if need_q {
                                    matmul(n, d, w, &mut dq[dq_rows], false, Mat::n(dp), kt, self.scale);
                                }
                                if need_k {
                                    matmul(w, d, n, &mut dk[lo * d..hi * d], true, Mat::t(dp), qt, self.scale);
                                }
                            }
                        }
                        (dq, dk, dv)
                    })
                    .collect())
            })
        })?;
        // Gradients not needed stay empty, and so do their scatters.
        let (mut dq, mut dk, mut dv) =
            (vec![0f32; sized(need_q, q.elem_count())], vec![0f32; sized(need_k, k.elem_count())], vec![0f32; sized(need_v, v.elem_count())]);
        for (unit, (dqu, dku, dvu)) in units.into_iter().enumerate() {
            let (batch, kv_head) = (unit / h_kv, unit % h_kv);
            for (g, dqh) in dqu.chunks_exact(t * d).enumerate() {
                scatter_rows(dqh, d, &mut dq, dm.head_start(batch, t, h, kv_head * groups + g), q_rs);
            }
            let kv0 = dm.head_start(batch, s, h_kv, kv_head);
            scatter_rows(&dku, d, &mut dk, kv0, kv_rs);
            scatter_rows(&dvu, d, &mut dv, kv0, kv_rs);
        }
        let dev = q.device();
        let grad = |need: bool, g: Vec<f32>, x: &Tensor| if need { Tensor::from_vec(g, x.shape(), dev).map(Some) } else { Ok(None) };
        Ok((grad(need_q, dq, q)?, grad(need_k, dk, k)?, grad(need_v, dv, v)?))
    }
}
