//! The trainable parameters laid end to end in one flat `f32` vector, cut into `N` equal
//! partitions: the unit of ZeRO's partitioning (Rajbhandari et al. 2020, §5: each rank owns
//! `1/N` of the optimizer state, gradients and, at stage 3, parameters).
//!
//! The order is the tuner's `trainable()` order, identical on every rank. The vector is padded
//! with zeros to `N · partition_len` so that every partition has the same length (MPI's
//! block collectives need it); the padding never reaches a parameter. An aligned layout
//! ([`FlatLayout::aligned`]) also starts every parameter and every partition at a multiple of
//! its alignment (zeros between), so that a partition cuts each parameter at a multiple of
//! it: bitsandbytes' 8-bit blocks stay whole.

use std::collections::HashMap;
use std::ops::Range;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor, Var};

/// One parameter's place in the flat vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub name: String,
    pub shape: Vec<usize>,
    /// First element, in the flat vector.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
}

/// The flat layout of a list of named parameters over `world` ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatLayout {
    pub segments: Vec<Segment>,
    /// Ψ: trainable elements in all.
    pub total: usize,
    /// Elements per partition, `ceil(total / world)` rounded up to `align`.
    pub partition_len: usize,
    pub world: usize,
    /// Every segment's offset and the partition length are multiples of it (1: none).
    pub align: usize,
}

impl FlatLayout {
    /// The layout of `shapes` (name, shape) in order, over `world` ranks.
    pub fn new<'a>(
        shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>,
        world: usize,
    ) -> FlatLayout {
        Self::aligned(shapes, world, 1)
    }

    /// [`FlatLayout::new`] with every segment starting at a multiple of `align` elements and
    /// partitions of a multiple of `align`: a partition boundary inside a segment falls at a
    /// multiple of `align` from the segment's start. `total` then counts the gaps too.
    pub fn aligned<'a>(
        shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>,
        world: usize,
        align: usize,
    ) -> FlatLayout {
        let align = align.max(1);
        let mut segments = Vec::new();
        let mut offset = 0usize;
        for (name, shape) in shapes {
            offset = offset.div_ceil(align) * align;
            let len = shape.iter().product();
            segments.push(Segment {
                name: name.to_string(),
                shape: shape.to_vec(),
                offset,
                len,
            });
            offset += len;
        }
        let world = world.max(1);
        FlatLayout {
            segments,
            total: offset,
            partition_len: offset.div_ceil(world).div_ceil(align) * align,
            world,
            align,
        }
    }

    /// The layout of the trainable variables, aligned to `align` elements.
    pub fn of_vars(vars: &[(String, Var)], world: usize, align: usize) -> FlatLayout {
        FlatLayout::aligned(
            vars.iter().map(|(n, v)| (n.as_str(), v.dims())),
            world,
            align,
        )
    }

    /// Length of the padded vector, `world · partition_len`.
    pub fn padded_len(&self) -> usize {
        self.world * self.partition_len
    }

    /// The elements rank `rank` owns (in the padded vector).
    pub fn partition(&self, rank: usize) -> Range<usize> {
        rank * self.partition_len..(rank + 1) * self.partition_len
    }

    /// For each segment overlapping `range`: (segment index, range in the flat vector).
    pub fn overlaps(
        &self,
        range: Range<usize>,
    ) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        self.segments.iter().enumerate().filter_map(move |(i, s)| {
            let lo = s.offset.max(range.start);
            let hi = (s.offset + s.len).min(range.end);
            (lo < hi).then_some((i, lo..hi))
        })
    }

    /// `tensors` by name, flattened into a padded vector (absent names stay zero), and which
    /// segments were present (1.0) or absent (0.0).
    pub fn flatten(&self, tensors: &HashMap<String, Tensor>) -> Result<(Vec<f32>, Vec<f64>)> {
        let mut flat = vec![0f32; self.padded_len()];
        let mut present = vec![0f64; self.segments.len()];
        for (i, s) in self.segments.iter().enumerate() {
            if let Some(t) = tensors.get(&s.name) {
                ensure!(
                    t.dims() == s.shape.as_slice(),
                    "{:?} has shape {:?}, the layout expects {:?}",
                    s.name,
                    t.dims(),
                    s.shape
                );
                let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                flat[s.offset..s.offset + s.len].copy_from_slice(&v);
                present[i] = 1.0;
            }
        }
        ensure!(
            tensors
                .keys()
                .all(|k| self.segments.iter().any(|s| &s.name == k)),
            "a tensor is not in the flat layout"
        );
        Ok((flat, present))
    }

    /// The variables' current values, flattened (padded).
    pub fn flatten_vars(&self, vars: &[(String, Var)]) -> Result<Vec<f32>> {
        let map: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        Ok(self.flatten(&map)?.0)
    }

    /// The segments named by `keep` (by index), cut out of `flat` as tensors of their shapes.
    pub fn unflatten(
        &self,
        flat: &[f32],
        keep: impl Fn(usize) -> bool,
        device: &candle_core::Device,
    ) -> Result<HashMap<String, Tensor>> {
        ensure!(
            flat.len() >= self.total,
            "flat vector of {} elements, the layout has {}",
            flat.len(),
            self.total
        );
        let mut out = HashMap::new();
        for (_, s) in self.segments.iter().enumerate().filter(|(i, _)| keep(*i)) {
            let t = Tensor::from_slice(
                &flat[s.offset..s.offset + s.len],
                s.shape.as_slice(),
                device,
            )?;
            out.insert(s.name.clone(), t);
        }
        Ok(out)
    }

    /// Sets every variable (in layout order) from `flat`, in the variable's own dtype.
    pub fn write_vars(&self, flat: &[f32], vars: &[(String, Var)]) -> Result<()> {
        for (s, (name, var)) in self.segments.iter().zip(vars) {
            ensure!(
                &s.name == name,
                "variable {name:?} is not in the layout's order"
            );
            let t = Tensor::from_slice(
                &flat[s.offset..s.offset + s.len],
                s.shape.as_slice(),
                var.device(),
            )?
            .to_dtype(var.dtype())?;
            var.set(&t).with_context(|| format!("setting {name:?}"))?;
        }
        Ok(())
    }

    /// The layout as JSON (`[[name, [shape...]], ...]`, the world size and, when not 1, the
    /// alignment), stored with each optimizer shard so that `ferrule checkpoint consolidate`
    /// can cut it apart.
    pub fn to_json(&self) -> serde_json::Value {
        let segs: Vec<serde_json::Value> = self
            .segments
            .iter()
            .map(|s| serde_json::json!([s.name, s.shape]))
            .collect();
        let mut v = serde_json::json!({ "world": self.world, "segments": segs });
        if self.align > 1 {
            v["align"] = self.align.into();
        }
        v
    }

    /// Reads [`FlatLayout::to_json`]'s output.
    pub fn from_json(v: &serde_json::Value) -> Result<FlatLayout> {
        let world = v
            .get("world")
            .and_then(|w| w.as_u64())
            .context("layout without \"world\"")? as usize;
        let segs = v
            .get("segments")
            .and_then(|s| s.as_array())
            .context("layout without \"segments\"")?;
        let mut shapes = Vec::new();
        for s in segs {
            let name = s
                .get(0)
                .and_then(|n| n.as_str())
                .context("layout segment without a name")?;
            let shape: Vec<usize> = serde_json::from_value(s.get(1).cloned().unwrap_or_default())
                .context("layout segment without a shape")?;
            shapes.push((name.to_string(), shape));
        }
        // Absent in layouts written before alignment existed (and when it is 1).
        let align =
            match v.get("align") {
                None => 1,
                Some(a) => a.as_u64().filter(|&a| a >= 1).with_context(|| {
                    format!("layout \"align\" = {a}: expected a positive integer")
                })? as usize,
            };
        Ok(FlatLayout::aligned(
            shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
            world,
            align,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn partitions_cover_the_vector_and_overlaps_cut_segments() {
        let l = FlatLayout::new([("a", &[2usize, 3][..]), ("b", &[5][..])], 3);
        assert_eq!((l.total, l.partition_len, l.padded_len()), (11, 4, 12));
        assert_eq!(l.partition(2), 8..12);
        let cut: Vec<_> = l.overlaps(l.partition(1)).collect();
        assert_eq!(cut, vec![(0, 4..6), (1, 6..8)]);
        let last: Vec<_> = l.overlaps(l.partition(2)).collect();
        assert_eq!(last, vec![(1, 8..11)]);
    }

    #[test]
    fn flatten_unflatten_round_trip_and_json() {
        let dev = Device::Cpu;
        let l = FlatLayout::new([("a", &[2usize, 2][..]), ("b", &[3][..])], 2);
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let map = HashMap::from([("a".to_string(), a.clone())]);
        let (flat, present) = l.flatten(&map).unwrap();
        assert_eq!(flat, vec![1., 2., 3., 4., 0., 0., 0., 0.]);
        assert_eq!(present, vec![1.0, 0.0]);
        let back = l.unflatten(&flat, |i| present[i] > 0.0, &dev).unwrap();
        assert_eq!(
            back["a"].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert!(!back.contains_key("b"));
        assert_eq!(FlatLayout::from_json(&l.to_json()).unwrap(), l);
        let wrong = HashMap::from([("b".to_string(), a)]);
        assert!(l.flatten(&wrong).unwrap_err().to_string().contains("shape"));
    }

    #[test]
    fn an_aligned_layout_cuts_segments_at_multiples_of_the_alignment() {
        let l = FlatLayout::aligned([("a", &[5usize][..]), ("b", &[2, 7][..])], 3, 4);
        assert_eq!((l.segments[1].offset, l.total), (8, 22));
        assert_eq!((l.partition_len, l.padded_len()), (8, 24));
        for rank in 0..3 {
            for (seg, r) in l.overlaps(l.partition(rank)) {
                assert_eq!((r.start - l.segments[seg].offset) % 4, 0);
            }
        }
        assert_eq!(FlatLayout::from_json(&l.to_json()).unwrap(), l);
    }
}
