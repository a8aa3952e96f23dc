//! bitsandbytes' optimizers (`adamw_8bit`, `paged_adamw_8bit`, `paged_adamw_32bit`) over one
//! ZeRO partition ([`super::zero`], stages 1–3): each rank keeps the state of its partition only.
//!
//! The 8-bit state is quantized in blocks of [`BLOCKSIZE`] elements counted from each
//! parameter's first element, with one absmax per block. The partition is cut from a flat
//! layout aligned to that block size ([`FlatLayout::aligned`]), so every piece of a parameter
//! a rank holds starts at a block boundary of the parameter and ends at one or at the
//! parameter's end: the rank quantizes exactly the blocks one process would, and whether a
//! parameter keeps 8-bit or 32-bit state is decided on its whole size (`min_8bit_size`). The
//! update of each block depends on that block alone, so N ranks compute one process's
//! update bit for bit (`tests/distributed.rs`). A paged optimizer's rank keeps its partition's
//! state in a file of its own in `--offload-dir`.
//!
//! A checkpoint shard holds [`BnbAdamW::state`]'s keys for the rank's pieces (`<name>.state1`
//! `[piece]`, `<name>.absmax1` `[piece blocks]`, ...); [`consolidate_pieces`] joins them into
//! one process's state, and [`ShardedBnb::load_state`] cuts a whole state into the pieces.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor, Var};

use super::partition::FlatLayout;
use crate::train::optim::bnb::{BnbAdamW, StateBits, BLOCKSIZE};
use crate::train::optim::{read_step, OptimName, OptimizerSpec};

/// The element alignment a partitioned `optim` needs of the flat layout: [`BLOCKSIZE`] for
/// the 8-bit optimizers (whole blocks on each rank), 1 for the others.
pub fn alignment(optim: OptimName) -> usize {
    if optim.is_8bit() {
        BLOCKSIZE
    } else {
        1
    }
}

/// One rank's piece of a parameter: its segment, its range of the flat vector, and the
/// piece's f32 master copy (1-D), which the optimizer updates.
struct Piece {
    segment: usize,
    range: Range<usize>,
    var: Var,
}

/// bitsandbytes' optimizer over partition `range` of the flat parameter vector (module docs).
pub struct ShardedBnb {
    range: Range<usize>,
    pieces: Vec<Piece>,
    opt: BnbAdamW,
}

impl ShardedBnb {
    /// The optimizer `spec` names for partition `range` of `flat_params` (the padded flat
    /// vector of `layout`, aligned as [`alignment`] says).
    pub fn new(
        layout: &FlatLayout,
        range: Range<usize>,
        flat_params: &[f32],
        spec: &OptimizerSpec,
    ) -> Result<ShardedBnb> {
        let (bits, offload_dir) = match spec.name {
            OptimName::Adamw8bit => (eight(spec), None),
            OptimName::PagedAdamw8bit => (eight(spec), Some(spec.offload_dir)),
            OptimName::PagedAdamw32bit => (StateBits::ThirtyTwo, Some(spec.offload_dir)),
            other => bail!("--optim {other} is not one of bitsandbytes' AdamW optimizers"),
        };
        ensure!(
            layout.align.is_multiple_of(alignment(spec.name)),
            "--optim {}: the flat layout is aligned to {} elements, the 8-bit blocks need {}",
            spec.name,
            layout.align,
            alignment(spec.name)
        );
        let mut pieces = Vec::new();
        let mut named = Vec::new();
        for (segment, r) in layout.overlaps(range.clone()) {
            let var = Var::from_slice(&flat_params[r.clone()], r.len(), &Device::Cpu)?;
            let s = &layout.segments[segment];
            named.push((s.name.clone(), var.clone(), s.len));
            pieces.push(Piece {
                segment,
                range: r,
                var,
            });
        }
        let opt = BnbAdamW::of_pieces(named, spec.adamw, bits, offload_dir)?;
        Ok(ShardedBnb { range, pieces, opt })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.opt.set_lr(lr);
    }

    /// The partition's parameters (zeros in the layout's gaps and padding).
    pub fn params(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.range.len()];
        let lo = self.range.start;
        for p in &self.pieces {
            let values = p.var.as_tensor().to_vec1::<f32>()?;
            out[p.range.start - lo..p.range.end - lo].copy_from_slice(&values);
        }
        Ok(out)
    }

    /// One update with the partition's mean gradient `grads` (clipped already); `present[s]`
    /// says whether segment `s` had a gradient on any rank (the others are skipped, and their
    /// step counts stay, as in one process).
    pub fn update(&mut self, layout: &FlatLayout, grads: &[f32], present: &[f64]) -> Result<()> {
        ensure!(
            grads.len() == self.range.len(),
            "partition gradient of {} elements, expected {}",
            grads.len(),
            self.range.len()
        );
        let lo = self.range.start;
        let mut by_name = HashMap::new();
        for p in self.pieces.iter().filter(|p| present[p.segment] > 0.0) {
            let g = &grads[p.range.start - lo..p.range.end - lo];
            let name = layout.segments[p.segment].name.clone();
            by_name.insert(name, Tensor::from_slice(g, g.len(), &Device::Cpu)?);
        }
        self.opt.step_with(&by_name)
    }

    /// This partition's state ([`BnbAdamW::state`]'s keys for its pieces).
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.opt.state()
    }

    /// Restores [`ShardedBnb::state`]'s output (`sharded`), or cuts this partition's pieces
    /// out of one process's state (a world-size-1 checkpoint).
    pub fn load_state(
        &mut self,
        layout: &FlatLayout,
        state: &BTreeMap<String, Tensor>,
        sharded: bool,
    ) -> Result<()> {
        if sharded {
            return self.opt.load_state(state);
        }
        let mut cut = BTreeMap::new();
        cut.insert("step".to_string(), state_entry(state, "step")?.clone());
        for p in &self.pieces {
            let s = &layout.segments[p.segment];
            let within = p.range.start - s.offset..p.range.end - s.offset;
            for (suffix, blocks) in suffixes(state, &s.name) {
                let whole = state_entry(state, &format!("{}.{suffix}", s.name))?.flatten_all()?;
                let part = if blocks {
                    let first = within.start / BLOCKSIZE;
                    whole.narrow(0, first, within.end.div_ceil(BLOCKSIZE) - first)?
                } else {
                    whole.narrow(0, within.start, within.len())?
                };
                cut.insert(format!("{}.{suffix}", s.name), part);
            }
            let step = format!("{}.step", s.name);
            cut.insert(step.clone(), state_entry(state, &step)?.clone());
        }
        self.opt.load_state(&cut)
    }
}

fn eight(spec: &OptimizerSpec) -> StateBits {
    StateBits::Eight {
        min_8bit_size: spec.min_8bit_size,
    }
}

fn state_entry<'a>(state: &'a BTreeMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    state
        .get(key)
        .with_context(|| format!("optimizer state is missing {key:?}"))
}

/// The state entries of parameter `name` in `state`, each with whether it holds one value per
/// block (absmax) rather than one per element: bitsandbytes' 8-bit ones when `state` has
/// `<name>.state1`, else the f32 moments.
fn suffixes(state: &BTreeMap<String, Tensor>, name: &str) -> Vec<(&'static str, bool)> {
    if state.contains_key(&format!("{name}.state1")) {
        vec![
            ("state1", false),
            ("state2", false),
            ("absmax1", true),
            ("absmax2", true),
        ]
    } else {
        vec![("exp_avg", false), ("exp_avg_sq", false)]
    }
}

/// One process's state ([`BnbAdamW::state`]'s keys, each parameter's entries in its shape)
/// from every rank's [`ShardedBnb::state`] (in rank order, cut by `layout`): each parameter's
/// pieces end to end. The step counts must agree across the ranks holding a piece.
pub fn consolidate_pieces(
    shards: &[BTreeMap<String, Tensor>],
    layout: &FlatLayout,
) -> Result<Vec<(String, Tensor)>> {
    let mut owners: Vec<Vec<usize>> = vec![Vec::new(); layout.segments.len()];
    for rank in 0..layout.world {
        for (segment, _) in layout.overlaps(layout.partition(rank)) {
            owners[segment].push(rank);
        }
    }
    let mut out = Vec::new();
    for (s, ranks) in layout.segments.iter().zip(&owners) {
        let Some(&first) = ranks.first() else {
            bail!("{:?} has no elements in the flat layout", s.name)
        };
        let first = &shards[first];
        for (suffix, blocks) in suffixes(first, &s.name) {
            let key = format!("{}.{suffix}", s.name);
            let parts = ranks
                .iter()
                .map(|&r| state_entry(&shards[r], &key).cloned())
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("rank shards of {:?}", s.name))?;
            let joined = Tensor::cat(&parts, 0)?;
            let joined = if blocks {
                joined
            } else {
                joined.reshape(s.shape.as_slice())?
            };
            out.push((key, joined));
        }
        let key = format!("{}.step", s.name);
        let step = read_step(first, &key)?;
        for &r in &ranks[1..] {
            ensure!(
                read_step(&shards[r], &key)? == step,
                "optimizer shards disagree on {key:?}"
            );
        }
        out.push((key.clone(), state_entry(first, &key)?.clone()));
    }
    out.push(("step".to_string(), state_entry(&shards[0], "step")?.clone()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::train::optim::AdamWConfig;

    /// Parameters of 700 (8-bit at min_8bit_size 600: three blocks, the last partial), 6
    /// (32-bit) and 900 elements.
    fn vars() -> Vec<(String, Var)> {
        let dev = Device::Cpu;
        let values = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * k % 101) as f32 - 50.0) / 30.0)
                .collect()
        };
        let var = |v: Vec<f32>, shape: &[usize]| {
            Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
        };
        vec![
            ("big".to_string(), var(values(700, 37), &[7, 100])),
            ("small".to_string(), var(values(6, 11), &[6])),
            ("wide".to_string(), var(values(900, 23), &[3, 300])),
        ]
    }

    /// Step `step`'s gradients; "small" has none at step 1 (its own step count lags).
    fn grads(vars: &[(String, Var)], step: usize) -> HashMap<String, Tensor> {
        let s = step as f32 + 1.0;
        vars.iter()
            .filter(|(n, _)| !(n == "small" && step == 1))
            .map(|(n, v)| {
                let g: Vec<f32> = (0..v.elem_count())
                    .map(|i| (((i * 13 + step * 7) % 29) as f32 - 14.0) * 0.01 * s)
                    .collect();
                (
                    n.clone(),
                    Tensor::from_vec(g, v.dims(), &Device::Cpu).unwrap(),
                )
            })
            .collect()
    }

    fn spec(name: OptimName, dir: &Path) -> OptimizerSpec<'_> {
        OptimizerSpec {
            name,
            adamw: AdamWConfig {
                lr: 0.01,
                weight_decay: 0.1,
                ..Default::default()
            },
            min_8bit_size: 600,
            offload_dir: dir,
            optim_args: None,
            target_modules: None,
            lr_groups: &[],
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let t = t.flatten_all().unwrap();
        match t.dtype() {
            candle_core::DType::U8 => t
                .to_vec1::<u8>()
                .unwrap()
                .into_iter()
                .map(u32::from)
                .collect(),
            candle_core::DType::I64 => t
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            _ => t
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect(),
        }
    }

    fn same_state(a: Vec<(String, Tensor)>, b: Vec<(String, Tensor)>) {
        let a: BTreeMap<String, Tensor> = a.into_iter().collect();
        let b: BTreeMap<String, Tensor> = b.into_iter().collect();
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, t) in &a {
            assert_eq!((t.dims(), t.dtype()), (b[k].dims(), b[k].dtype()), "{k}");
            assert_eq!(bits(t), bits(&b[k]), "{k}");
        }
    }

    /// Three ranks, each updating its block-aligned pieces, compute one process's parameters
    /// and state bit for bit; the pieces' states join into one process's state, and a whole
    /// state cut into pieces restores each rank's.
    #[test]
    fn three_partitions_update_what_one_process_updates() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            OptimName::Adamw8bit,
            OptimName::PagedAdamw8bit,
            OptimName::PagedAdamw32bit,
        ] {
            let spec = spec(name, dir.path());
            let one_vars = vars();
            let mut one = crate::train::optim::build_optimizer(one_vars.clone(), &spec).unwrap();
            let layout = FlatLayout::of_vars(&one_vars, 3, alignment(name));
            let flat = layout.flatten_vars(&one_vars).unwrap();
            let mut ranks: Vec<ShardedBnb> = (0..3)
                .map(|r| ShardedBnb::new(&layout, layout.partition(r), &flat, &spec).unwrap())
                .collect();
            for step in 0..3 {
                let g = grads(&one_vars, step);
                one.step_with(&g).unwrap();
                let (flat_g, present) = layout.flatten(&g).unwrap();
                for (r, opt) in ranks.iter_mut().enumerate() {
                    opt.update(&layout, &flat_g[layout.partition(r)], &present)
                        .unwrap();
                }
            }
            let joined: Vec<f32> = ranks.iter().flat_map(|o| o.params().unwrap()).collect();
            let want = layout.flatten_vars(&one_vars).unwrap();
            assert_eq!(
                joined.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{name}"
            );
            let shards: Vec<BTreeMap<String, Tensor>> = ranks
                .iter()
                .map(|o| o.state().unwrap().into_iter().collect())
                .collect();
            let whole = consolidate_pieces(&shards, &layout).unwrap();
            same_state(whole.clone(), one.state().unwrap());
            let whole: BTreeMap<String, Tensor> = whole.into_iter().collect();
            for (r, shard) in shards.iter().enumerate() {
                let mut fresh =
                    ShardedBnb::new(&layout, layout.partition(r), &flat, &spec).unwrap();
                fresh.load_state(&layout, &whole, false).unwrap();
                same_state(fresh.state().unwrap(), shard.clone().into_iter().collect());
            }
        }
    }
}
