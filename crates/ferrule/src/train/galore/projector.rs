//! The GaLore gradient projector (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by
//! Gradient Low-Rank Projection", Algorithm 2), equal to galore-torch 1.0's `GaLoreProjector`
//! (`galore_torch/galore_projector.py`).
//!
//! For a gradient `G [m, n]` and the thin SVD `G = U S Vh`, the projector keeps the top `r`
//! singular vectors of one side (or both, for `full`) and maps `G` to a low-rank gradient that
//! the optimizer's moments live in:
//!
//! | `proj_type`   | side kept                     | `project(G)`      | `project_back(N)` |
//! |---------------|-------------------------------|-------------------|-------------------|
//! | `right`       | `P = Vh[:r]` `[r, n]`          | `G Pᵀ` `[m, r]`    | `N P`             |
//! | `left`        | `Q = U[:, :r]` `[m, r]`        | `Qᵀ G` `[r, n]`    | `Q N`             |
//! | `std`         | `right` if `m ≥ n`, else `left` |                   |                   |
//! | `reverse_std` | `left` if `m ≥ n`, else `right` |                   |                   |
//! | `full`        | both `Q` and `P`               | `Qᵀ G Pᵀ` `[r, r]` | `Q N P`           |
//!
//! `project_back` multiplies by `scale`. The SVD is recomputed when the projector has none yet
//! or when the parameter's step count (before this step's increment) is a multiple of
//! `update_proj_gap`.
//!
//! Differences from galore-torch, each deliberate:
//! - Singular vectors are defined up to sign, and galore-torch keeps Adam's moments across a
//!   refresh, so the sign LAPACK happens to return changes the trajectory. ferrule fixes it:
//!   each singular pair `(u_i, v_i)` is flipped so that the entry of `u_i` of largest magnitude
//!   (the first, on ties) is positive ([`canonical_signs`]). The fixture script applies the same
//!   rule to `torch.linalg.svd`, so trajectories can be compared across refreshes.
//! - The SVD runs in `f64` (galore-torch: `f32`) and the projection in the state dtype (`f32` for
//!   half-precision parameters; galore-torch casts the basis back to the gradient's dtype).
//! - `project_back` picks the side from the basis it holds; galore-torch's `reverse_std` picks it
//!   from the low-rank gradient's shape and fails when `r` equals the smaller dimension `m < n`.
//! - A rank larger than the smaller dimension is an error ([`check_rank`]); galore-torch keeps
//!   `min(m, n)` vectors without saying so.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use faer::Mat;
use serde::{Deserialize, Serialize};

/// Which singular vectors GaLore projects onto (galore-torch's `proj_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjType {
    /// The smaller side: right vectors for tall or square `G`, left vectors for wide `G`.
    #[default]
    Std,
    /// The larger side: left vectors for tall or square `G`, right vectors for wide `G`.
    ReverseStd,
    /// Always the right singular vectors.
    Right,
    /// Always the left singular vectors.
    Left,
    /// Both sides: an `r × r` low-rank gradient.
    Full,
}

impl std::str::FromStr for ProjType {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "std" => Self::Std,
            "reverse_std" => Self::ReverseStd,
            "right" => Self::Right,
            "left" => Self::Left,
            "full" => Self::Full,
            other => bail!(
                "unknown GaLore proj_type {other:?} (expected std, reverse_std, right, left or full)"
            ),
        })
    }
}

/// Which bases a projector holds for a gradient of a given shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `Q = U[:, :r]`, `[m, r]`.
    Left,
    /// `P = Vh[:r]`, `[r, n]`.
    Right,
    /// Both `Q` and `P`.
    Both,
}

impl ProjType {
    /// The side(s) projected onto for a `[m, n]` gradient.
    pub fn side(self, (m, n): (usize, usize)) -> Side {
        match self {
            Self::Std if m >= n => Side::Right,
            Self::Std => Side::Left,
            Self::ReverseStd if m >= n => Side::Left,
            Self::ReverseStd => Side::Right,
            Self::Right => Side::Right,
            Self::Left => Side::Left,
            Self::Full => Side::Both,
        }
    }

    /// The shape of the low-rank gradient (and of Adam's moments) for a `[m, n]` gradient.
    pub fn low_rank_shape(self, (m, n): (usize, usize), rank: usize) -> (usize, usize) {
        match self.side((m, n)) {
            Side::Right => (m, rank),
            Side::Left => (rank, n),
            Side::Both => (rank, rank),
        }
    }
}

/// Checks that `rank` is at least 1 and at most the smaller dimension of `name`'s `[m, n]`
/// weight (the named error for a rank larger than the layer).
pub fn check_rank(name: &str, (m, n): (usize, usize), rank: usize) -> Result<()> {
    ensure!(rank >= 1, "GaLore rank must be at least 1");
    ensure!(
        rank <= m.min(n),
        "GaLore rank {rank} is larger than parameter {name:?} allows: its shape is [{m}, {n}], \
         so the rank can be at most {}",
        m.min(n)
    );
    Ok(())
}

/// The bases of a [`GaLoreProjector`], in the state dtype.
#[derive(Debug, Clone)]
pub struct Bases {
    /// `Q = U[:, :r]`, `[m, r]`, when the side is left or both.
    pub left: Option<Tensor>,
    /// `P = Vh[:r]`, `[r, n]`, when the side is right or both.
    pub right: Option<Tensor>,
}

/// galore-torch's `GaLoreProjector` for one `[m, n]` parameter.
#[derive(Debug, Clone)]
pub struct GaLoreProjector {
    rank: usize,
    update_proj_gap: u64,
    scale: f64,
    side: Side,
    bases: Option<Bases>,
}

impl GaLoreProjector {
    /// A projector for gradients of `shape`, without a basis yet (the first
    /// [`GaLoreProjector::project`] computes it). `rank` must be in `1..=min(shape)` (callers
    /// with a parameter name check it with [`check_rank`] first) and `update_proj_gap` at
    /// least 1.
    pub fn new(
        shape: (usize, usize),
        rank: usize,
        update_proj_gap: u64,
        scale: f64,
        proj_type: ProjType,
    ) -> Result<Self> {
        ensure!(
            (1..=shape.0.min(shape.1)).contains(&rank),
            "GaLore rank {rank} does not fit a [{}, {}] gradient (1 to {})",
            shape.0,
            shape.1,
            shape.0.min(shape.1)
        );
        ensure!(
            update_proj_gap >= 1,
            "GaLore update_proj_gap must be at least 1"
        );
        Ok(Self {
            rank,
            update_proj_gap,
            scale,
            side: proj_type.side(shape),
            bases: None,
        })
    }

    /// The side(s) this projector keeps.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The current bases (`None` before the first projection).
    pub fn bases(&self) -> Option<&Bases> {
        self.bases.as_ref()
    }

    /// Replaces the bases (restoring a checkpoint); their shapes must fit the side and rank.
    pub fn set_bases(&mut self, bases: Option<Bases>) {
        self.bases = bases;
    }

    /// Projects `grad` (`[m, n]`, state dtype) to low rank, first recomputing the SVD if there
    /// is no basis yet or `step` (the parameter's update count before this update) is a
    /// multiple of `update_proj_gap`.
    pub fn project(&mut self, grad: &Tensor, step: u64) -> Result<Tensor> {
        if self.bases.is_none() || step.is_multiple_of(self.update_proj_gap) {
            self.bases = Some(top_singular_bases(grad, self.rank, self.side)?);
        }
        let b = self.bases.as_ref().expect("bases were just set");
        Ok(match self.side {
            Side::Right => grad.matmul(&right(b)?.t()?)?,
            Side::Left => left(b)?.t()?.matmul(grad)?,
            Side::Both => left(b)?.t()?.matmul(grad)?.matmul(&right(b)?.t()?)?,
        })
    }

    /// Maps a low-rank update back to the parameter's shape and multiplies it by `scale`.
    pub fn project_back(&self, low_rank: &Tensor) -> Result<Tensor> {
        let b = self
            .bases
            .as_ref()
            .context("GaLore project_back called before project")?;
        let full = match self.side {
            Side::Right => low_rank.matmul(right(b)?)?,
            Side::Left => left(b)?.matmul(low_rank)?,
            Side::Both => left(b)?.matmul(low_rank)?.matmul(right(b)?)?,
        };
        Ok((full * self.scale)?)
    }
}

impl GaLoreProjector {
    /// The checkpoint entries of the bases for a `[m, n]` parameter: the suffixes
    /// `proj_left` (`[m, r]`) and/or `proj_right` (`[r, n]`), as the side has them.
    pub fn basis_entries(&self, (m, n): (usize, usize)) -> Vec<(&'static str, [usize; 2])> {
        let r = self.rank;
        let mut out = Vec::with_capacity(2);
        if matches!(self.side, Side::Left | Side::Both) {
            out.push(("proj_left", [m, r]));
        }
        if matches!(self.side, Side::Right | Side::Both) {
            out.push(("proj_right", [r, n]));
        }
        out
    }

    /// The bases as [`GaLoreProjector::basis_entries`] names them, zeros in `dtype` before
    /// the first projection.
    pub fn basis_tensors(
        &self,
        dims: (usize, usize),
        dtype: DType,
        dev: &Device,
    ) -> Result<Vec<(&'static str, Tensor)>> {
        self.basis_entries(dims)
            .into_iter()
            .map(|(suffix, shape)| {
                let held = self.bases.as_ref().and_then(|b| match suffix {
                    "proj_left" => b.left.clone(),
                    _ => b.right.clone(),
                });
                Ok((
                    suffix,
                    held.map_or_else(|| Tensor::zeros(&shape, dtype, dev), Ok)?,
                ))
            })
            .collect()
    }

    /// Bases from checkpoint entries: `read(suffix, shape)` returns the entry of each of
    /// [`GaLoreProjector::basis_entries`], checked by the caller.
    pub fn read_bases(
        &self,
        dims: (usize, usize),
        mut read: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Bases> {
        let mut bases = Bases {
            left: None,
            right: None,
        };
        for (suffix, shape) in self.basis_entries(dims) {
            let t = read(suffix, &shape)?;
            match suffix {
                "proj_left" => bases.left = Some(t),
                _ => bases.right = Some(t),
            }
        }
        Ok(bases)
    }
}

fn left(b: &Bases) -> Result<&Tensor> {
    b.left
        .as_ref()
        .context("GaLore projector has no left basis")
}

fn right(b: &Bases) -> Result<&Tensor> {
    b.right
        .as_ref()
        .context("GaLore projector has no right basis")
}

/// The top-`rank` singular vectors of `grad` on `side`, with [`canonical_signs`], in `grad`'s
/// dtype and on its device.
pub fn top_singular_bases(grad: &Tensor, rank: usize, side: Side) -> Result<Bases> {
    let (m, n) = grad.dims2()?;
    // Only the f64 matrix and the SVD's factors are held: the f32 gradient is read in place
    // when it can be (f32 widens to f64 exactly, as `to_dtype` does), and only the `rank`
    // singular pairs kept are copied out of the factors (a pair's sign fix reads only its own
    // column), which are dropped before the bases are made.
    let (mut u, mut v) = {
        let mat = f64_matrix(grad, m, n)?;
        let svd = mat.thin_svd().map_err(|e| {
            anyhow::anyhow!("GaLore: the SVD of a [{m}, {n}] gradient failed: {e:?}")
        })?;
        let (su, sv) = (svd.U(), svd.V());
        (
            Mat::<f64>::from_fn(m, rank, |i, j| su[(i, j)]),
            Mat::<f64>::from_fn(n, rank, |i, j| sv[(i, j)]),
        )
    };
    canonical_signs(&mut u, &mut v);
    let to_tensor = |rows: usize, cols: usize, f: &dyn Fn(usize, usize) -> f64| -> Result<Tensor> {
        let vals: Vec<f64> = (0..rows)
            .flat_map(|i| (0..cols).map(move |j| (i, j)))
            .map(|(i, j)| f(i, j))
            .collect();
        Ok(Tensor::from_vec(vals, (rows, cols), &Device::Cpu)?
            .to_dtype(grad.dtype())?
            .to_device(grad.device())?)
    };
    let want_left = matches!(side, Side::Left | Side::Both);
    let want_right = matches!(side, Side::Right | Side::Both);
    Ok(Bases {
        left: want_left
            .then(|| to_tensor(m, rank, &|i, j| u[(i, j)]))
            .transpose()?,
        right: want_right
            .then(|| to_tensor(rank, n, &|i, j| v[(j, i)]))
            .transpose()?,
    })
}

/// `grad` (`[m, n]`) as an f64 matrix: read in place when it is a contiguous f32 CPU tensor,
/// else converted through a host copy.
fn f64_matrix(grad: &Tensor, m: usize, n: usize) -> Result<Mat<f64>> {
    if crate::ops::kernels::fused_ok(grad) && grad.is_contiguous() {
        return Ok(crate::ops::kernels::with_f32(grad, "GaLore SVD", |g| {
            Ok(Mat::<f64>::from_fn(m, n, |i, j| g[i * n + j] as f64))
        })?);
    }
    let data = grad
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(Mat::<f64>::from_fn(m, n, |i, j| data[i * n + j]))
}

/// Flips each singular pair `(u_i, v_i)` (columns of `u` and `v`) so that the entry of `u_i`
/// with the largest magnitude (the first such entry, as `torch.argmax` picks) is positive. The
/// product `u_i s_i v_iᵀ` is unchanged, so this is still an SVD, now independent of the sign
/// convention of the SVD routine.
pub fn canonical_signs(u: &mut Mat<f64>, v: &mut Mat<f64>) {
    for col in 0..u.ncols() {
        let mut best = 0;
        for row in 1..u.nrows() {
            if u[(row, col)].abs() > u[(best, col)].abs() {
                best = row;
            }
        }
        if u[(best, col)] < 0.0 {
            for row in 0..u.nrows() {
                u[(row, col)] = -u[(row, col)];
            }
            for row in 0..v.nrows() {
                v[(row, col)] = -v[(row, col)];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vec2(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
    }

    #[test]
    fn sides_follow_galore_torch() {
        assert_eq!(ProjType::Std.side((8, 4)), Side::Right);
        assert_eq!(ProjType::Std.side((4, 4)), Side::Right);
        assert_eq!(ProjType::Std.side((4, 8)), Side::Left);
        assert_eq!(ProjType::ReverseStd.side((8, 4)), Side::Left);
        assert_eq!(ProjType::ReverseStd.side((4, 8)), Side::Right);
        assert_eq!(ProjType::Full.low_rank_shape((8, 4), 2), (2, 2));
        assert_eq!(ProjType::Std.low_rank_shape((8, 4), 2), (8, 2));
        assert_eq!(ProjType::Std.low_rank_shape((4, 8), 2), (2, 8));
        assert_eq!(
            "reverse_std".parse::<ProjType>().unwrap(),
            ProjType::ReverseStd
        );
        let err = "diag".parse::<ProjType>().unwrap_err().to_string();
        assert!(err.contains("diag") && err.contains("reverse_std"), "{err}");
    }

    #[test]
    fn rank_larger_than_layer_is_a_named_error() {
        check_rank("w", (4, 6), 4).unwrap();
        let err = check_rank("model.q_proj.weight", (4, 6), 5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.q_proj.weight") && err.contains("at most 4"),
            "{err}"
        );
        assert!(check_rank("w", (4, 6), 0).is_err());
        let err = GaLoreProjector::new((4, 6), 5, 1, 1.0, ProjType::Std).unwrap_err();
        assert!(err.to_string().contains("[4, 6]"), "{err}");
        assert!(GaLoreProjector::new((4, 6), 4, 0, 1.0, ProjType::Std).is_err());
    }

    /// A diagonal-dominant gradient whose SVD is known by hand: `G = diag(3, -2, 1)` padded to
    /// `[4, 3]` has `u_i = ±e_i`, `v_i = ±e_i` with signs chosen so `u_i`'s largest entry is
    /// positive: `u = (e0, e1, e2)`, `v = (e0, -e1, e2)`.
    #[test]
    fn basis_and_round_trip_on_a_known_svd() {
        let g = Tensor::new(
            &[
                [3f32, 0.0, 0.0],
                [0.0, -2.0, 0.0],
                [0.0, 0.0, 1.0],
                [0.0, 0.0, 0.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let mut p = GaLoreProjector::new((4, 3), 2, 10, 0.5, ProjType::Std).unwrap();
        let low = p.project(&g, 0).unwrap();
        // Right side: P = [[1, 0, 0], [0, -1, 0]], G Pᵀ = [[3, 0], [0, 2], [0, 0], [0, 0]].
        assert_eq!(
            vec2(p.bases().unwrap().right.as_ref().unwrap()),
            vec![vec![1.0, 0.0, 0.0], vec![0.0, -1.0, 0.0]]
        );
        assert_eq!(
            vec2(&low),
            vec![
                vec![3.0, 0.0],
                vec![0.0, 2.0],
                vec![0.0, 0.0],
                vec![0.0, 0.0]
            ]
        );
        // Back: 0.5 · G Pᵀ P drops the third singular direction.
        assert_eq!(
            vec2(&p.project_back(&low).unwrap()),
            vec![
                vec![1.5, 0.0, 0.0],
                vec![0.0, -1.0, 0.0],
                vec![0.0, 0.0, 0.0],
                vec![0.0, 0.0, 0.0]
            ]
        );
        let mut full = GaLoreProjector::new((4, 3), 2, 10, 1.0, ProjType::Full).unwrap();
        assert_eq!(
            vec2(&full.project(&g, 0).unwrap()),
            vec![vec![3.0, 0.0], vec![0.0, 2.0]]
        );
    }

    /// The basis is kept between refreshes and recomputed at multiples of the gap.
    #[test]
    fn refreshes_every_gap_steps() {
        let dev = Device::Cpu;
        let g0 = Tensor::new(&[[1f32, 0.0], [0.0, 0.5], [0.0, 0.0]], &dev).unwrap();
        let g1 = Tensor::new(&[[0.5f32, 0.0], [0.0, 1.0], [0.0, 0.0]], &dev).unwrap();
        let mut p = GaLoreProjector::new((3, 2), 1, 2, 1.0, ProjType::Right).unwrap();
        let basis = |p: &GaLoreProjector| vec2(p.bases().unwrap().right.as_ref().unwrap());
        p.project(&g0, 0).unwrap();
        assert_eq!(basis(&p), vec![vec![1.0, 0.0]]);
        p.project(&g1, 1).unwrap();
        assert_eq!(basis(&p), vec![vec![1.0, 0.0]], "step 1 keeps the basis");
        p.project(&g1, 2).unwrap();
        assert_eq!(basis(&p), vec![vec![0.0, 1.0]], "step 2 refreshes it");
    }
}
