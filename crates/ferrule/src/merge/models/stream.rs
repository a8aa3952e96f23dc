//! Merging one tensor in blocks of rows, so that a merge holds a few blocks per input instead
//! of whole tensors (a 1B Llama's embedding is 403 MB in f32 per input).
//!
//! Most methods are elementwise or row-local and merge each block as [`methods::merge`] would
//! merge the whole tensor. The rest need whole-tensor scalars first, found in earlier passes
//! over the blocks, each accumulated in the order the whole-tensor code sums them so the
//! result is the same bit for bit:
//! - slerp: the two norms, then the cosine;
//! - Model Stock (not `filter_wise`): the deltas' squared norms and pairwise dots;
//! - magnitude sparsification (TIES, breadcrumbs): the magnitude ranks each delta keeps, found
//!   exactly by a two-pass radix select on the bit patterns of `|δ|` ([`RankWindow`]);
//! - L1 `rescale`: the delta's L1 norm before and after masking.
//!
//! Random masks (DARE, DELLA) draw from one generator per tensor and input in row order, as
//! the whole-tensor code does: carried from block to block, they give the same masks.

use std::ops::Range;

use anyhow::{anyhow, Result};
use rand::rngs::StdRng;
use rayon::prelude::*;

use super::methods::{self, Method, Sparsification, TaskArithmetic, TensorInputs, TensorParams};
use crate::merge::delta::{self, Rescale, Sparsify};

/// Reads rows of input `i` (in the tensor's input order) as f32.
pub type ReadRows<'a> = dyn Fn(usize, Range<usize>) -> Result<Vec<f32>> + Sync + 'a;

/// One output tensor merged in blocks of `block_rows` rows of its first axis.
pub struct Blocks<'a> {
    pub name: &'a str,
    /// At least two axes: rows are the first.
    pub shape: &'a [usize],
    pub inputs: usize,
    pub base: Option<usize>,
    pub seed: u64,
    pub block_rows: usize,
    pub read: &'a ReadRows<'a>,
}

impl Blocks<'_> {
    fn ranges(&self) -> impl Iterator<Item = Range<usize>> {
        let (rows, step) = (self.shape[0], self.block_rows.max(1));
        (0..rows)
            .step_by(step)
            .map(move |r| r..(r + step).min(rows))
    }

    fn read_all(&self, rows: &Range<usize>) -> Result<Vec<Vec<f32>>> {
        (0..self.inputs)
            .into_par_iter()
            .map(|i| (self.read)(i, rows.clone()))
            .collect()
    }

    fn block_shape(&self, rows: &Range<usize>) -> Vec<usize> {
        let mut s = self.shape.to_vec();
        s[0] = rows.len();
        s
    }

    /// The base's rows and every other input's delta from it, in input order.
    fn deltas(&self, rows: &Range<usize>) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let b = self.base.expect("checked when planned");
        let mut values = self.read_all(rows)?;
        let base = std::mem::take(&mut values[b]);
        values.remove(b);
        values.par_iter_mut().for_each(|d| {
            d.iter_mut().zip(&base).for_each(|(x, b)| *x -= b);
        });
        Ok((base, values))
    }

    fn error(&self, input: usize, e: anyhow::Error) -> anyhow::Error {
        anyhow!("{} (input {input}): {e}", self.name)
    }

    /// The non-base inputs' indices, in input order.
    fn others(&self) -> Vec<usize> {
        let b = self.base.expect("checked when planned");
        (0..self.inputs).filter(|i| *i != b).collect()
    }
}

/// Merges the tensor block by block, handing each merged block to `write` in row order.
pub fn merge(
    method: Method,
    blocks: &Blocks,
    params: &TensorParams,
    write: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    match method {
        Method::Slerp => slerp(blocks, params, write),
        Method::ModelStock if !params.shared("filter_wise").bool() => model_stock(blocks, write),
        Method::TaskArithmetic(g) if g.sparsification.is_some() => {
            sparsified(g, blocks, params, write)
        }
        _ => row_local(method, blocks, params, write),
    }
}

fn row_local(
    method: Method,
    blocks: &Blocks,
    params: &TensorParams,
    write: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    for rows in blocks.ranges() {
        let shape = blocks.block_shape(&rows);
        let inputs = TensorInputs {
            name: blocks.name,
            shape: &shape,
            values: blocks.read_all(&rows)?,
            base: blocks.base,
            seed: blocks.seed,
        };
        write(&methods::merge(method, inputs, params)?)?;
    }
    Ok(())
}

fn slerp(
    blocks: &Blocks,
    params: &TensorParams,
    write: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    let b = blocks.base.expect("checked when planned");
    let (mut na, mut nb) = (0.0f64, 0.0f64);
    for rows in blocks.ranges() {
        let v = blocks.read_all(&rows)?;
        na = v[b].iter().fold(na, |s, x| s + (*x as f64).powi(2));
        nb = v[1 - b].iter().fold(nb, |s, x| s + (*x as f64).powi(2));
    }
    let (na, nb) = methods::slerp_norms(na.sqrt(), nb.sqrt());
    let mut dot = 0.0f64;
    for rows in blocks.ranges() {
        let v = blocks.read_all(&rows)?;
        dot = v[b]
            .iter()
            .zip(&v[1 - b])
            .fold(dot, |s, (x, y)| s + methods::slerp_dot(*x, *y, na, nb));
    }
    let (ca, cb) = methods::slerp_factors(params.shared("t").float(), dot);
    for rows in blocks.ranges() {
        let v = blocks.read_all(&rows)?;
        let out: Vec<f32> = v[b]
            .iter()
            .zip(&v[1 - b])
            .map(|(x, y)| ca * x + cb * y)
            .collect();
        write(&out)?;
    }
    Ok(())
}

fn model_stock(blocks: &Blocks, write: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
    let n = blocks.inputs - 1;
    let mut sq = vec![0.0f64; n];
    let mut dots = vec![vec![0.0f64; n]; n];
    for rows in blocks.ranges() {
        let (_, d) = blocks.deltas(&rows)?;
        for i in 0..n {
            sq[i] = d[i].iter().fold(sq[i], |s, x| s + *x as f64 * *x as f64);
            for j in i + 1..n {
                let dot = d[i].iter().zip(&d[j]);
                dots[i][j] = dot.fold(dots[i][j], |s, (x, y)| s + *x as f64 * *y as f64);
            }
        }
    }
    let mut cos = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            cos.push(methods::stock_cos(dots[i][j], sq[i], sq[j]));
        }
    }
    let count = n as f64;
    let t = methods::stock_t(&cos, count);
    let b = blocks.base.expect("checked when planned");
    for rows in blocks.ranges() {
        let v = blocks.read_all(&rows)?;
        let others: Vec<&Vec<f32>> = (0..v.len()).filter(|i| *i != b).map(|i| &v[i]).collect();
        let out: Vec<f32> = (0..v[b].len())
            .map(|j| methods::stock_value(t, others.iter().map(|w| w[j]), count, v[b][j]))
            .collect();
        write(&out)?;
    }
    Ok(())
}

/// How one input's delta is masked, block by block.
#[derive(Clone)]
struct Mask {
    /// The input's index among the tensor's inputs (for the generator and errors).
    input: usize,
    density: f32,
    method: Sparsify,
    /// Density 1: the delta is kept whole.
    no_op: bool,
    window: Option<RankWindow>,
    rng: StdRng,
    /// The L1 `rescale` factor, once known.
    scale: Option<f32>,
}

impl Mask {
    fn new(
        s: Sparsification,
        blocks: &Blocks,
        params: &TensorParams,
        input: usize,
    ) -> Result<Self> {
        let density = params.input(input, "density").float() as f32;
        let no_op = delta::density_is_no_op(density).map_err(|e| blocks.error(input, e))?;
        Ok(Self {
            input,
            density,
            method: methods::sparsify_method(s, params, input),
            no_op,
            window: None,
            rng: delta::mask_rng(blocks.seed, blocks.name, input),
            scale: None,
        })
    }

    /// Masks the next block of the delta in place (and rescales it, once the scale is known).
    fn apply(&mut self, d: &mut [f32], rows: usize, name: &str) -> Result<()> {
        if self.no_op {
            return Ok(());
        }
        match &mut self.window {
            Some(w) => w.apply(d),
            None => delta::sparsify(
                d,
                rows,
                self.density,
                self.method,
                Rescale::None,
                &mut self.rng,
            )
            .map_err(|e| anyhow!("{name} (input {}): {e}", self.input))?,
        }
        if let Some(s) = self.scale {
            d.iter_mut().for_each(|x| *x *= s);
        }
        Ok(())
    }
}

/// Generalized task arithmetic with sparsified deltas: the masks' whole-tensor scalars first,
/// then the blocks merged by [`methods::mix`].
fn sparsified(
    g: TaskArithmetic,
    blocks: &Blocks,
    params: &TensorParams,
    write: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    let s = g.sparsification.expect("sparsified");
    let mut masks: Vec<Mask> = blocks
        .others()
        .into_iter()
        .map(|i| Mask::new(s, blocks, params, i))
        .collect::<Result<_>>()?;
    if matches!(
        s,
        Sparsification::Magnitude | Sparsification::MagnitudeOutliers
    ) {
        select_windows(blocks, &mut masks)?;
    }
    if params.shared("rescale").bool() {
        l1_scales(blocks, &mut masks)?;
    }
    for rows in blocks.ranges() {
        let (base, mut deltas) = blocks.deltas(&rows)?;
        masks
            .par_iter_mut()
            .zip(deltas.par_iter_mut())
            .try_for_each(|(m, d)| m.apply(d, rows.len(), blocks.name))?;
        let weighted = masks
            .iter()
            .zip(deltas)
            .map(|(m, mut d)| {
                let w = params.input(m.input, "weight").float() as f32;
                d.iter_mut().for_each(|x| *x *= w);
                (d, w)
            })
            .collect();
        write(&methods::mix(g, base, weighted, params))?;
    }
    Ok(())
}

/// mergekit's L1 `rescale`: each masked delta scaled back to its unmasked L1 norm (skipped, as
/// there, when either is below 1e-7). One pass with copies of the masks.
fn l1_scales(blocks: &Blocks, masks: &mut [Mask]) -> Result<()> {
    let mut trial: Vec<Mask> = masks.to_vec();
    let mut sums = vec![(0.0f64, 0.0f64); masks.len()];
    for rows in blocks.ranges() {
        let (_, mut deltas) = blocks.deltas(&rows)?;
        trial
            .par_iter_mut()
            .zip(deltas.par_iter_mut())
            .zip(sums.par_iter_mut())
            .try_for_each(|((m, d), (before, after))| {
                *before = d.iter().fold(*before, |s, x| s + x.abs() as f64);
                m.apply(d, rows.len(), blocks.name)?;
                *after = d.iter().fold(*after, |s, x| s + x.abs() as f64);
                Ok::<_, anyhow::Error>(())
            })?;
    }
    for (m, (before, after)) in masks.iter_mut().zip(sums) {
        if !m.no_op && before >= 1e-7 && after >= 1e-7 {
            m.scale = Some((before / after) as f32);
        }
    }
    Ok(())
}

/// The ranks each magnitude mask keeps, over the whole tensor: the high 16 bits of the rank
/// cuts' keys from one pass, the low 16 from a second.
fn select_windows(blocks: &Blocks, masks: &mut [Mask]) -> Result<()> {
    let n: usize = blocks.shape.iter().product();
    let mut selects: Vec<Option<(Select, Select)>> = masks
        .iter()
        .map(|m| {
            let (lo, hi) = delta::rank_window(n, m.density, m.method)?;
            (!m.no_op).then(|| (Select::new(lo, n), Select::new(hi, n)))
        })
        .collect();
    for pass in 0..2 {
        for rows in blocks.ranges() {
            let (_, deltas) = blocks.deltas(&rows)?;
            selects.par_iter_mut().zip(&deltas).for_each(|(s, d)| {
                if let Some((lo, hi)) = s {
                    lo.count(d, pass);
                    hi.count(d, pass);
                }
            });
        }
        for (lo, hi) in selects.iter_mut().flatten() {
            lo.settle(pass);
            hi.settle(pass);
        }
    }
    for (m, s) in masks.iter_mut().zip(selects) {
        m.window = s.map(|(lo, hi)| RankWindow::new(lo.cut(), hi.cut()));
    }
    Ok(())
}

/// A cut in the ascending order of `(|δ|, position)`: the entries ranked below it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    /// Rank 0: none.
    Start,
    /// Rank `n`: all.
    End,
    /// Every entry of a smaller key, and the first `ties` (by position) of this key.
    At { key: u32, ties: u64 },
}

/// The radix select of one cut at rank `rank`.
#[derive(Clone, Debug)]
struct Select {
    rank: u64,
    hist: Vec<u64>,
    /// After the first pass: the high 16 bits and the count of smaller high halves.
    high: Option<(u32, u64)>,
    cut: Option<Cut>,
}

impl Select {
    fn new(rank: usize, n: usize) -> Self {
        let trivial = rank == 0 || rank >= n;
        Self {
            rank: rank as u64,
            hist: if trivial {
                Vec::new()
            } else {
                vec![0; 1 << 16]
            },
            high: None,
            cut: if rank == 0 {
                Some(Cut::Start)
            } else if rank >= n {
                Some(Cut::End)
            } else {
                None
            },
        }
    }

    fn count(&mut self, d: &[f32], pass: usize) {
        if self.cut.is_some() {
            return;
        }
        for &x in d {
            let key = delta::magnitude_key(x);
            match (pass, self.high) {
                (0, _) => self.hist[(key >> 16) as usize] += 1,
                (_, Some((h, _))) if key >> 16 == h => self.hist[(key & 0xffff) as usize] += 1,
                _ => {}
            }
        }
    }

    /// The bucket holding `rank` and the count below it.
    fn pick(hist: &[u64], rank: u64) -> (u32, u64) {
        let mut below = 0;
        for (b, &c) in hist.iter().enumerate() {
            if below + c > rank {
                return (b as u32, below);
            }
            below += c;
        }
        unreachable!("rank {rank} beyond the histogram's {below} entries")
    }

    fn settle(&mut self, pass: usize) {
        if self.cut.is_some() {
            return;
        }
        if pass == 0 {
            self.high = Some(Self::pick(&self.hist, self.rank));
            self.hist.iter_mut().for_each(|c| *c = 0);
        } else {
            let (h, below_h) = self.high.expect("first pass done");
            let (l, below_l) = Self::pick(&self.hist, self.rank - below_h);
            let key = h << 16 | l;
            self.cut = Some(Cut::At {
                key,
                ties: self.rank - below_h - below_l,
            });
            self.hist = Vec::new();
        }
    }

    fn cut(&self) -> Cut {
        self.cut.expect("two passes done")
    }
}

/// Keeps the entries ranked in `lo..hi` by `(|δ|, position)`, as
/// `delta::keep_magnitude_ranks` does on a whole tensor, over blocks given in order.
#[derive(Clone, Debug)]
pub(super) struct RankWindow {
    lo: Cut,
    hi: Cut,
    /// Entries seen so far with each cut's key.
    seen: [u64; 2],
}

impl RankWindow {
    fn new(lo: Cut, hi: Cut) -> Self {
        Self {
            lo,
            hi,
            seen: [0; 2],
        }
    }

    fn below(cut: Cut, key: u32, seen: &mut u64) -> bool {
        match cut {
            Cut::Start => false,
            Cut::End => true,
            Cut::At { key: k, ties } => {
                if key == k {
                    *seen += 1;
                    *seen <= ties
                } else {
                    key < k
                }
            }
        }
    }

    /// Zeroes the next block's entries outside the window.
    pub(super) fn apply(&mut self, d: &mut [f32]) {
        if self.lo == Cut::Start && self.hi == Cut::End {
            return;
        }
        for x in d.iter_mut() {
            let key = delta::magnitude_key(*x);
            let below_lo = Self::below(self.lo, key, &mut self.seen[0]);
            let below_hi = Self::below(self.hi, key, &mut self.seen[1]);
            if below_lo || !below_hi {
                *x = 0.0;
            }
        }
    }
}
