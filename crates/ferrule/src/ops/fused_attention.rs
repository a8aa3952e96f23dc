//! Attention as one CPU custom op, forward and backward, that never holds the `[b, h, t, s]`
//! scores or probabilities (the FlashAttention scheme: Dao et al. 2022, alg. 1 and 4; Dao
//! 2023, alg. 2, without the online softmax since a whole key row fits in cache here).
//!
//! Inputs and output are token-major, as the projections make them (`[b, t, heads·d]`): the
//! kernel reads each head's rows with a stride, so no transposed copies enter the graph. A
//! sequence is a range of query rows and a range of key rows: the `b` rows of a padded batch,
//! or sequences of different lengths laid end to end (padding-free batches, the varlen form
//! of FlashAttention's `cu_seqlens`), where no query reaches another sequence's keys.
//! The forward runs per (sequence, query head), one tile of query rows at a time: the scores
//! `S = scale · Q Kᵀ + mask`, the softmax in place, then `O = P V`. It keeps the max and sum
//! of every softmax row (two floats a query). The backward runs per (sequence, key/value head)
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

/// One sequence of a [`FusedAttention`] call: its query rows `q0..q0+t` of the `[rows, h·d]`
/// queries, its key/value rows `k0..k0+s`, and where its additive mask starts in the op's
/// mask data (`per_query` = `s` for a row per query, 0 for one row shared by all queries).
#[derive(Clone, Copy, Debug)]
pub(super) struct Seq {
    pub q0: usize,
    pub t: usize,
    pub k0: usize,
    pub s: usize,
    pub mask: Option<(usize, usize)>,
}

/// `softmax(scale · q kᵀ + mask) v` within each of a list of sequences ([`Seq`]), for
/// contiguous f32 `q: [.., rows, h·d]`, `k, v: [.., kv_rows, h_kv·d]` (query head `i` reads
/// key/value head `i / (h / h_kv)`); the additive mask (f32, any shape) is captured. The output
/// has `q`'s shape. A padded batch is `b` sequences of `t` queries over `s` keys
/// ([`FusedAttention::batched`]); a padding-free one is sequences of different lengths laid
/// end to end in one row ([`FusedAttention::varlen`]): no query sees another sequence's keys.
pub(super) struct FusedAttention {
    mask: Option<Tensor>,
    seqs: Vec<Seq>,
    scale: f32,
    heads: usize,
    /// Per (sequence, head), in that order: the max and the sum of each forward softmax row
    /// (`2·t` floats), for the backward.
    stats: Mutex<Vec<f32>>,
}

impl FusedAttention {
    /// A padded batch: `b` sequences of `t` queries over `s` keys, `mask: [b|1, 1, t|1, s]`.
    pub fn batched(
        mask: Option<Tensor>,
        b: usize,
        t: usize,
        s: usize,
        scale: f32,
        heads: usize,
    ) -> Result<Self> {
        let strides = match &mask {
            None => None,
            Some(m) => {
                let (mb, _, mt, ms) = m.dims4()?;
                if ms != s {
                    candle_core::bail!("fused-attention: mask has {ms} keys, expected {s}")
                }
                Some((if mb > 1 { mt * s } else { 0 }, if mt > 1 { s } else { 0 }))
            }
        };
        let seqs = (0..b)
            .map(|i| Seq {
                q0: i * t,
                t,
                k0: i * s,
                s,
                mask: strides.map(|(per_batch, per_query)| (i * per_batch, per_query)),
            })
            .collect();
        Ok(Self::new(mask, seqs, scale, heads))
    }

    /// Sequences laid end to end: `seqs` must cover disjoint key rows (their queries are
    /// disjoint too); `mask` is a flat f32 tensor the sequences' mask offsets point into.
    pub fn varlen(mask: Option<Tensor>, seqs: Vec<Seq>, scale: f32, heads: usize) -> Result<Self> {
        for w in seqs.windows(2) {
            if w[1].q0 < w[0].q0 + w[0].t || w[1].k0 < w[0].k0 + w[0].s {
                candle_core::bail!(
                    "fused-attention: sequences overlap ({:?}, {:?})",
                    w[0],
                    w[1]
                )
            }
        }
        Ok(Self::new(mask, seqs, scale, heads))
    }

    fn new(mask: Option<Tensor>, seqs: Vec<Seq>, scale: f32, heads: usize) -> Self {
        Self {
            mask,
            seqs,
            scale,
            heads,
            stats: Mutex::new(Vec::new()),
        }
    }

    /// `(h, h_kv, d)` of `q: [.., rows, h·d]` and `k: [.., kv_rows, h_kv·d]`, checked against
    /// the sequences' rows.
    fn dims(&self, q: &Shape, k: &Shape) -> Result<Dims> {
        let (q_rows, hd) = rows_features(q)?;
        let (k_rows, kd) = rows_features(k)?;
        let h = self.heads;
        let d = hd / h.max(1);
        let h_kv = kd / d.max(1);
        if h == 0 || d == 0 || hd != h * d || kd != h_kv * d || h_kv == 0 || !h.is_multiple_of(h_kv)
        {
            candle_core::bail!("fused-attention: q has {hd} features for {h} heads, k has {kd}")
        }
        if self
            .seqs
            .iter()
            .any(|s| s.q0 + s.t > q_rows || s.k0 + s.s > k_rows)
        {
            candle_core::bail!("fused-attention: the sequences need more rows than q ({q_rows}) or k ({k_rows}) have")
        }
        Ok(Dims { h, h_kv, d })
    }

    fn with_mask<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        match &self.mask {
            None => f(&[]),
            Some(m) => kernels::with_f32(m, "fused-attention", f),
        }
    }

    /// Offset of the statistics of (sequence `i`, head `head`).
    fn stats_start(&self, i: usize, head: usize) -> usize {
        let seq = &self.seqs[i];
        (seq.q0 * self.heads + head * seq.t) * 2
    }
}

/// `(rows, features)` of a `[.., rows, features]` shape (leading axes folded into rows).
fn rows_features(shape: &Shape) -> Result<(usize, usize)> {
    let dims = shape.dims();
    match dims.split_last() {
        Some((&f, rest)) if !rest.is_empty() => Ok((rest.iter().product(), f)),
        _ => candle_core::bail!("fused-attention: expected [.., rows, features], got {dims:?}"),
    }
}

/// The mask rows of queries `q_off..q_off+n` of `seq`, and their stride (0: one row for all).
fn mask_rows<'a>(data: &'a [f32], seq: &Seq, q_off: usize, n: usize) -> Option<(&'a [f32], usize)> {
    let (start, per_query) = seq.mask?;
    let start = start + q_off * per_query;
    let len = if per_query == 0 { seq.s } else { n * seq.s };
    Some((&data[start..start + len], per_query))
}

/// The keys a tile of query rows can see: the smallest `lo..hi` outside which every row's
/// mask is [`MASKED`] (a causal mask's upper triangle, left padding), so the tile's scores and
/// products skip those columns; their probabilities are exactly 0 either way. A fully masked
/// row attends uniformly to all keys, so it keeps the whole range.
fn key_range(mask: Option<(&[f32], usize)>, n: usize, s: usize) -> (usize, usize) {
    let Some((m, stride)) = mask else {
        return (0, s);
    };
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

/// [`key_range`] of every tile of every sequence: the mask is the same for all heads, so it
/// is scanned once per call, not once per head. Sequence `i` has tiles of `tq[i]` query rows.
struct TileKeyRanges {
    ranges: Vec<Vec<(usize, usize)>>,
    tq: Vec<usize>,
}

impl TileKeyRanges {
    fn new(mask: &[f32], seqs: &[Seq]) -> Self {
        let tq: Vec<usize> = seqs.iter().map(|q| tile_rows(q.s, q.t)).collect();
        let ranges = seqs
            .par_iter()
            .zip(&tq)
            .map(|(q, &tq)| {
                (0..q.t)
                    .step_by(tq)
                    .map(|q0| {
                        key_range(
                            mask_rows(mask, q, q0, tq.min(q.t - q0)),
                            tq.min(q.t - q0),
                            q.s,
                        )
                    })
                    .collect()
            })
            .collect();
        Self { ranges, tq }
    }

    /// The keys the tile starting at query row `q0` of sequence `i` can see.
    fn get(&self, i: usize, q0: usize) -> (usize, usize) {
        self.ranges[i][q0 / self.tq[i]]
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
    h: usize,
    h_kv: usize,
    d: usize,
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

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = kernels::contiguous_f32(s1, l1, self.name())?;
        let k = kernels::contiguous_f32(s2, l2, self.name())?;
        let v = kernels::contiguous_f32(s3, l3, self.name())?;
        let Dims { h, h_kv, d } = self.dims(l1.shape(), l2.shape())?;
        let (groups, q_rs, kv_rs) = (h / h_kv, h * d, h_kv * d);
        // One unit of work per (sequence, query head): its output rows (packed) and statistics.
        let units: Vec<(Vec<f32>, Vec<f32>)> = self.with_mask(|mask| {
            let ranges = TileKeyRanges::new(mask, &self.seqs);
            Ok((0..self.seqs.len() * h)
                .into_par_iter()
                .map(|unit| {
                    let (i, head) = (unit / h, unit % h);
                    let seq = &self.seqs[i];
                    let (t, s, tq) = (seq.t, seq.s, ranges.tq[i]);
                    let qh = &q[seq.q0 * q_rs + head * d..];
                    let kv0 = seq.k0 * kv_rs + (head / groups) * d;
                    let (kh, vh) = (
                        Mat::n(&k[kv0..]).rows_apart(kv_rs),
                        Mat::n(&v[kv0..]).rows_apart(kv_rs),
                    );
                    let mut o = vec![0f32; t * d];
                    let mut st = vec![0f32; t * 2];
                    let mut p = vec![0f32; tq * s];
                    for q0 in (0..t).step_by(tq) {
                        let n = tq.min(t - q0);
                        let (lo, hi) = ranges.get(i, q0);
                        let w = hi - lo;
                        let (m, stride) = mask_rows(mask, seq, q0, n)
                            .map_or((&[][..], 0), |(m, stride)| (&m[lo..], stride));
                        let (kt, vt) = (
                            Mat {
                                transposed: true,
                                ..kh.skip_rows(lo, kv_rs)
                            },
                            vh.skip_rows(lo, kv_rs),
                        );
                        let p = &mut p[..n * w];
                        matmul(
                            n,
                            w,
                            d,
                            p,
                            false,
                            Mat::n(&qh[q0 * q_rs..]).rows_apart(q_rs),
                            kt,
                            self.scale,
                        );
                        softmax_rows(p, m, stride, w, &mut st[q0 * 2..(q0 + n) * 2]);
                        matmul(
                            n,
                            d,
                            w,
                            &mut o[q0 * d..(q0 + n) * d],
                            false,
                            Mat::n(p),
                            vt,
                            1.0,
                        );
                    }
                    (o, st)
                })
                .collect())
        })?;
        let mut out = vec![0f32; q.len()];
        let mut stats = Vec::with_capacity(units.iter().map(|u| u.1.len()).sum());
        for (unit, (o, st)) in units.into_iter().enumerate() {
            let (seq, head) = (&self.seqs[unit / h], unit % h);
            scatter_rows(&o, d, &mut out, seq.q0 * q_rs + head * d, q_rs);
            stats.extend_from_slice(&st);
        }
        *self.stats.lock().expect("fused-attention statistics") = stats;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims { h, h_kv, d } = self.dims(q.shape(), k.shape())?;
        let (groups, q_rs, kv_rs) = (h / h_kv, h * d, h_kv * d);
        let go = grad_res.contiguous()?;
        let stats = self.stats.lock().expect("fused-attention statistics");
        if stats.len() != self.seqs.iter().map(|s| s.t * h * 2).sum::<usize>() {
            candle_core::bail!("fused-attention: backward without a matching forward")
        }
        let name = self.name();
        // Gradients only for inputs something trainable lies below (the first layer's keys
        // from a frozen projection have none).
        let (need_q, need_k, need_v) = (q.track_op(), k.track_op(), v.track_op());
        let sized = |need: bool, n: usize| if need { n } else { 0 };
        // One unit per (sequence, key/value head): the dQ rows of its query heads, its dK and dV.
        type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
        let units: Vec<Grads> =
            kernels::with_f32s([q, k, v, res, &go], name, |[q, k, v, o, go]| {
                self.with_mask(|mask| {
                    let ranges = TileKeyRanges::new(mask, &self.seqs);
                    Ok((0..self.seqs.len() * h_kv)
                        .into_par_iter()
                        .map(|unit| {
                            let (i, kv_head) = (unit / h_kv, unit % h_kv);
                            let seq = &self.seqs[i];
                            let (t, s, tq) = (seq.t, seq.s, ranges.tq[i]);
                            let kv0 = seq.k0 * kv_rs + kv_head * d;
                            let (kh, vh) = (
                                Mat::n(&k[kv0..]).rows_apart(kv_rs),
                                Mat::n(&v[kv0..]).rows_apart(kv_rs),
                            );
                            let (mut dq, mut dk, mut dv) = (
                                vec![0f32; sized(need_q, groups * t * d)],
                                vec![0f32; sized(need_k, s * d)],
                                vec![0f32; sized(need_v, s * d)],
                            );
                            let (mut p, mut dp, mut di) =
                                (vec![0f32; tq * s], vec![0f32; tq * s], vec![0f32; tq]);
                            for g in 0..groups {
                                let head = kv_head * groups + g;
                                let q0h = seq.q0 * q_rs + head * d;
                                let st0 = self.stats_start(i, head);
                                let st = &stats[st0..st0 + t * 2];
                                for q0 in (0..t).step_by(tq) {
                                    let n = tq.min(t - q0);
                                    let rows = q0h + q0 * q_rs;
                                    let (qt, got) = (
                                        Mat::n(&q[rows..]).rows_apart(q_rs),
                                        Mat::n(&go[rows..]).rows_apart(q_rs),
                                    );
                                    let (lo, hi) = ranges.get(i, q0);
                                    let w = hi - lo;
                                    let (m, stride) = mask_rows(mask, seq, q0, n)
                                        .map_or((&[][..], 0), |(m, stride)| (&m[lo..], stride));
                                    let (kt, vt) =
                                        (kh.skip_rows(lo, kv_rs), vh.skip_rows(lo, kv_rs));
                                    let (p, dp, di) =
                                        (&mut p[..n * w], &mut dp[..n * w], &mut di[..n]);
                                    matmul(
                                        n,
                                        w,
                                        d,
                                        p,
                                        false,
                                        qt,
                                        Mat {
                                            transposed: true,
                                            ..kt
                                        },
                                        self.scale,
                                    );
                                    probs_rows(p, m, stride, w, &st[q0 * 2..(q0 + n) * 2]);
                                    if need_v {
                                        matmul(
                                            w,
                                            d,
                                            n,
                                            &mut dv[lo * d..hi * d],
                                            true,
                                            Mat::t(p),
                                            got,
                                            1.0,
                                        );
                                    }
                                    matmul(
                                        n,
                                        w,
                                        d,
                                        dp,
                                        false,
                                        got,
                                        Mat {
                                            transposed: true,
                                            ..vt
                                        },
                                        1.0,
                                    );
                                    for (i, di) in di.iter_mut().enumerate() {
                                        let r = rows + i * q_rs;
                                        *di = kernels::dot(&go[r..r + d], &o[r..r + d]);
                                    }
                                    score_grad_rows(dp, p, di, w);
                                    let dq_rows = (g * t + q0) * d..(g * t + q0 + n) * d;
                                    if need_q {
                                        matmul(
                                            n,
                                            d,
                                            w,
                                            &mut dq[dq_rows],
                                            false,
                                            Mat::n(dp),
                                            kt,
                                            self.scale,
                                        );
                                    }
                                    if need_k {
                                        matmul(
                                            w,
                                            d,
                                            n,
                                            &mut dk[lo * d..hi * d],
                                            true,
                                            Mat::t(dp),
                                            qt,
                                            self.scale,
                                        );
                                    }
                                }
                            }
                            (dq, dk, dv)
                        })
                        .collect())
                })
            })?;
        // Gradients not needed stay empty, and so do their scatters. Rows no sequence covers
        // (none in the models' calls) get a zero gradient.
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; sized(need_q, q.elem_count())],
            vec![0f32; sized(need_k, k.elem_count())],
            vec![0f32; sized(need_v, v.elem_count())],
        );
        for (unit, (dqu, dku, dvu)) in units.into_iter().enumerate() {
            let (seq, kv_head) = (&self.seqs[unit / h_kv], unit % h_kv);
            if seq.t == 0 {
                continue;
            }
            for (g, dqh) in dqu.chunks_exact(seq.t * d).enumerate() {
                scatter_rows(
                    dqh,
                    d,
                    &mut dq,
                    seq.q0 * q_rs + (kv_head * groups + g) * d,
                    q_rs,
                );
            }
            let kv0 = seq.k0 * kv_rs + kv_head * d;
            scatter_rows(&dku, d, &mut dk, kv0, kv_rs);
            scatter_rows(&dvu, d, &mut dv, kv0, kv_rs);
        }
        let dev = q.device();
        let grad = |need: bool, g: Vec<f32>, x: &Tensor| {
            if need {
                Tensor::from_vec(g, x.shape(), dev).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok((
            grad(need_q, dq, q)?,
            grad(need_k, dk, k)?,
            grad(need_v, dv, v)?,
        ))
    }
}
