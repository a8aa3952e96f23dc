//! bitsandbytes' AdamW family on the CPU: `AdamW8bit` (both moments block-wise quantized to
//! 8 bits) and the paged `PagedAdamW8bit` / `PagedAdamW32bit`, whose state lives in a
//! memory-mapped file ([`super::arena`]).
//!
//! The 8-bit update is bitsandbytes 0.50.2's CPU kernel (`backends/cpu/ops.py`,
//! `_optimizer_update_8bit_blockwise_cpu`, "adam"), in its operation order: dequantize both
//! moments (`code[q] · absmax[block]`), then in f32
//!
//! ```text
//! m <- m·β1 + (1-β1)·g
//! v <- v·β2 + ((1-β2)·g)·g
//! c1 = 1 - β1^t,  c2 = sqrt(1 - β2^t)
//! p <- p·(1 - lr·λ)                      (λ > 0)
//! p <- p + ((-lr/c1)·m) / (sqrt(v)/c2 + eps)
//! ```
//!
//! and quantize `m` against the signed dynamic map and `v` against the unsigned one, blocks of
//! [`BLOCKSIZE`] with one absmax each, with the CPU kernel's own (approximate near 0) search
//! (`quant::dynamic::quantize_block_like_cpu`). A parameter with fewer than
//! `min_8bit_size` elements keeps f32 moments and takes bitsandbytes' 32-bit CPU update
//! (`_optimizer_update_32bit_cpu`): the same formula, computed as
//! `p <- p + (-lr·c2/c1)·(m / (sqrt(v) + eps·c2))`.
//!
//! `paged_adamw_32bit` computes [`super::AdamW`]'s (torch's) update on f32 moments read from
//! the file, so it equals `adamw` bit for bit; bitsandbytes' own 32-bit kernel computes the
//! same formula in the order above (results within rounding).
//!
//! **GaLore 8-bit** ([`BnbAdamW::galore`]) is galore-torch 1.0's `GaLoreAdamW8bit`
//! (`galore_torch/adamw8bit.py`, HF Trainer's `optim="galore_adamw_8bit"`): a target weight's
//! gradient is projected to rank r ([`GaLoreProjector`]), the update above runs on a zero
//! "parameter" of the low-rank shape without decay (its moments, 8-bit when the low-rank
//! shape has at least `min_8bit_size` elements, live in that shape), and the result is
//! projected back, scaled and added: `W <- W + scale · back(Δ)`; then the decay
//! `W <- W + (-lr·λ)·W`, after the update as galore-torch applies it. Other parameters take
//! the plain 8-bit update.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::arena::{f32s, f32s_mut, Arena, ALIGN};
use super::{adamw_update, read_step, step_tensor, AdamWConfig};
use crate::quant::dynamic;
use crate::train::galore::{GaLoreConfig, GaLoreProjector};

/// bitsandbytes' block size for 8-bit optimizer state (fixed in its CPU kernel).
pub const BLOCKSIZE: usize = 256;

/// How the moments are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateBits {
    /// 8-bit block-wise codes for parameters of at least `min_8bit_size` elements, f32 below.
    Eight { min_8bit_size: usize },
    /// f32 moments for every parameter (torch's arithmetic).
    ThirtyTwo,
}

/// One parameter and its range of the arena.
struct Slot {
    name: String,
    var: Var,
    /// The moments' shape: the parameter's, or the low-rank one of a GaLore target.
    dims: Vec<usize>,
    /// Elements of the moments.
    len: usize,
    /// A GaLore target's projector ([`BnbAdamW::galore`]).
    projector: Option<GaLoreProjector>,
    /// 8-bit codes (else f32 moments).
    quantized: bool,
    range: Range<usize>,
    /// Updates applied to this parameter (bitsandbytes' `state["step"]`).
    step: u64,
}

impl Slot {
    fn blocks(&self) -> usize {
        self.len.div_ceil(BLOCKSIZE)
    }
}

/// Bytes of a parameter's state: `absmax1, absmax2` (f32 × blocks) then the codes `q1, q2`
/// (u8 × len) when quantized, else `m, v` (f32 × len); padded to [`ALIGN`].
fn slot_bytes(len: usize, quantized: bool) -> usize {
    let raw = if quantized {
        8 * len.div_ceil(BLOCKSIZE) + 2 * len
    } else {
        8 * len
    };
    raw.div_ceil(ALIGN) * ALIGN
}

/// The parts of a quantized slot's bytes.
struct Quantized<'a> {
    absmax1: &'a mut [f32],
    absmax2: &'a mut [f32],
    q1: &'a mut [u8],
    q2: &'a mut [u8],
}

fn split_quantized(bytes: &mut [u8], len: usize) -> Quantized<'_> {
    let nb = len.div_ceil(BLOCKSIZE);
    let (absmax, codes) = bytes.split_at_mut(8 * nb);
    let (a1, a2) = f32s_mut(absmax).split_at_mut(nb);
    let (q1, rest) = codes.split_at_mut(len);
    Quantized {
        absmax1: a1,
        absmax2: a2,
        q1,
        q2: &mut rest[..len],
    }
}

fn split_moments(bytes: &mut [u8], len: usize) -> (&mut [f32], &mut [f32]) {
    let (m, v) = f32s_mut(&mut bytes[..8 * len]).split_at_mut(len);
    (m, v)
}

/// bitsandbytes' `AdamW8bit`, `PagedAdamW8bit` and `PagedAdamW32bit`, and galore-torch's
/// `GaLoreAdamW8bit` ([`BnbAdamW::galore`]) (see the module docs),
/// with [`super::AdamW`]'s interface. Moments are kept in f32 (or 8-bit codes) whatever the
/// parameter's dtype; parameters are updated in f32 and rounded back to their dtype.
pub struct BnbAdamW {
    cfg: AdamWConfig,
    bits: StateBits,
    slots: Vec<Slot>,
    arena: Arena,
    step: u64,
    signed: Map,
    unsigned: Map,
}

/// A dynamic map and the CPU kernel's decision thresholds for it.
struct Map {
    code: [f32; 256],
    thresholds: [f32; 255],
}

impl Map {
    fn of(map: dynamic::DynamicMap) -> Map {
        Map {
            code: match map {
                dynamic::DynamicMap::Signed => dynamic::signed_map(),
                dynamic::DynamicMap::Unsigned => dynamic::unsigned_map(),
            },
            thresholds: dynamic::cpu_thresholds(map),
        }
    }
}

impl BnbAdamW {
    /// The optimizer of `params` (unique names). With `offload_dir`, the state lives in a new
    /// file there (removed when the optimizer is dropped), else in memory; either starts
    /// zeroed, as bitsandbytes' state does.
    pub fn new(
        params: Vec<(String, Var)>,
        cfg: AdamWConfig,
        bits: StateBits,
        offload_dir: Option<&Path>,
    ) -> Result<BnbAdamW> {
        Self::build(params, cfg, bits, offload_dir, None, None)
    }

    /// The optimizer of pieces of parameters (one ZeRO partition, `dist::zero`): each piece
    /// `(name, var, whole)` is a 1-D run of parameter `name`'s elements that starts at a
    /// multiple of [`BLOCKSIZE`] in it, and `whole` is the parameter's element count, which
    /// decides 8-bit or 32-bit state as for the whole parameter. The piece's blocks are then
    /// the parameter's own, so its update equals one process's on those elements.
    pub fn of_pieces(
        pieces: Vec<(String, Var, usize)>,
        cfg: AdamWConfig,
        bits: StateBits,
        offload_dir: Option<&Path>,
    ) -> Result<BnbAdamW> {
        let whole = pieces.iter().map(|(_, _, w)| *w).collect();
        let params = pieces.into_iter().map(|(n, v, _)| (n, v)).collect();
        Self::build(params, cfg, bits, offload_dir, None, Some(whole))
    }

    /// galore-torch's `GaLoreAdamW8bit` (module docs): the targets of `galore` (its rank, gap,
    /// scale, projection type and `target_modules`; an error when none matches or the rank
    /// exceeds a target) get projected 8-bit updates, the others `adamw_8bit`'s. Adam's
    /// settings are `galore.adam`'s (bitsandbytes always corrects the bias); Natural GaLore
    /// has no 8-bit form here (an error).
    pub fn galore(
        params: Vec<(String, Var)>,
        galore: &GaLoreConfig,
        min_8bit_size: usize,
        offload_dir: Option<&Path>,
    ) -> Result<BnbAdamW> {
        galore.validate()?;
        ensure!(
            galore.natural.is_none(),
            "Natural GaLore has no 8-bit optimizer; use natural_galore_adamw"
        );
        let a = &galore.adam;
        ensure!(
            a.correct_bias,
            "galore_adamw_8bit always corrects Adam's bias (bitsandbytes' update)"
        );
        let cfg = AdamWConfig {
            lr: a.lr,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            weight_decay: a.weight_decay,
        };
        let bits = StateBits::Eight { min_8bit_size };
        Self::build(params, cfg, bits, offload_dir, Some(galore), None)
    }

    /// The slots of `params` in an arena; `whole`, when given, holds the element count each
    /// parameter's 8-bit choice is made on (else its moments' own).
    fn build(
        params: Vec<(String, Var)>,
        cfg: AdamWConfig,
        bits: StateBits,
        offload_dir: Option<&Path>,
        galore: Option<&GaLoreConfig>,
        whole: Option<Vec<usize>>,
    ) -> Result<BnbAdamW> {
        super::check_unique_names(&params)?;
        let mut projectors = match galore {
            Some(g) => g.projectors(params.iter().map(|(n, v)| (n.as_str(), v.dims())))?,
            None => vec![None; params.len()],
        };
        let mut slots = Vec::with_capacity(params.len());
        let mut offset = 0;
        for (k, (name, var)) in params.into_iter().enumerate() {
            let projector = projectors[k].take();
            let dims = match (&projector, galore) {
                (Some(_), Some(g)) => {
                    let (a, b) = g.proj_type.low_rank_shape(var.dims2()?, g.rank);
                    vec![a, b]
                }
                _ => var.dims().to_vec(),
            };
            let len = dims.iter().product();
            let decides = whole.as_ref().map_or(len, |w| w[k]);
            let quantized = match bits {
                StateBits::Eight { min_8bit_size } => decides >= min_8bit_size,
                StateBits::ThirtyTwo => false,
            };
            let bytes = slot_bytes(len, quantized);
            slots.push(Slot {
                name,
                var,
                dims,
                len,
                projector,
                quantized,
                range: offset..offset + bytes,
                step: 0,
            });
            offset += bytes;
        }
        let arena = match offload_dir {
            Some(dir) => Arena::mapped(dir, offset)?,
            None => Arena::heap(offset),
        };
        Ok(BnbAdamW {
            cfg,
            bits,
            slots,
            arena,
            step: 0,
            signed: Map::of(dynamic::DynamicMap::Signed),
            unsigned: Map::of(dynamic::DynamicMap::Unsigned),
        })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The folder of a paged optimizer's (unnamed) state file, and the file's length.
    pub fn state_file(&self) -> Option<(&Path, u64)> {
        Some((self.arena.dir()?, self.arena.file_len()?))
    }

    /// Bytes of optimizer state (8-bit codes and absmax, or f32 moments).
    pub fn state_bytes(&self) -> usize {
        self.slots.iter().map(|s| s.range.len()).sum()
    }

    /// One update with gradients by name (as [`super::AdamW::step_with`]): parameters absent
    /// from `grads` are skipped, unknown names are an error. Each parameter's state is read,
    /// updated and written back before the next one's is touched.
    pub fn step_with(&mut self, grads: &HashMap<String, Tensor>) -> Result<()> {
        for name in grads.keys() {
            ensure!(
                self.slots.iter().any(|s| &s.name == name),
                "gradient given for unknown parameter {name:?}"
            );
        }
        self.step += 1;
        for i in 0..self.slots.len() {
            let Some(g) = grads.get(&self.slots[i].name) else {
                continue;
            };
            self.update(i, g)
                .with_context(|| format!("optimizer step of {:?}", self.slots[i].name))?;
            self.arena.release(self.slots[i].range.clone());
        }
        Ok(())
    }

    /// One parameter's update as soon as its gradient is final (the layer-wise form, as
    /// [`crate::train::GaLoreAdamW::step_param`]); the step ends with
    /// [`BnbAdamW::finish_layerwise_step`].
    pub fn step_param(&mut self, name: &str, grad: &Tensor) -> Result<()> {
        let i = self
            .slots
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("gradient given for unknown parameter {name:?}"))?;
        self.update(i, grad)
            .with_context(|| format!("optimizer step of {name:?}"))?;
        self.arena.release(self.slots[i].range.clone());
        Ok(())
    }

    /// Ends a step made of [`BnbAdamW::step_param`] calls.
    pub fn finish_layerwise_step(&mut self) {
        self.step += 1;
    }

    fn update(&mut self, i: usize, grad: &Tensor) -> Result<()> {
        let slot = &self.slots[i];
        let pdtype = slot.var.dtype();
        ensure!(
            pdtype.is_float(),
            "parameter has non-float dtype {pdtype:?}"
        );
        ensure!(
            grad.shape() == slot.var.shape(),
            "gradient has shape {:?}, parameter has shape {:?}",
            grad.dims(),
            slot.var.dims()
        );
        let t = slot.step + 1;
        let var = slot.var.clone();
        if slot.projector.is_some() {
            self.update_projected(i, &var, grad, t)?;
        } else if !slot.quantized && self.bits == StateBits::ThirtyTwo {
            self.update_torch(&var, grad, t, slot.range.clone())?;
        } else {
            let g = flat_f32(grad)?;
            let mut p = flat_f32(var.as_tensor())?;
            let cfg = self.cfg;
            self.update_bnb(i, &cfg, t, &mut p, &g);
            set_f32(&var, p)?;
        }
        self.slots[i].step = t;
        Ok(())
    }

    /// bitsandbytes' update of `p` by `g` with slot `i`'s moments (8-bit or 32-bit).
    fn update_bnb(&mut self, i: usize, cfg: &AdamWConfig, t: u64, p: &mut [f32], g: &[f32]) {
        let slot = &self.slots[i];
        let (quantized, len) = (slot.quantized, slot.len);
        let bytes = self.arena.bytes_mut(slot.range.clone());
        if quantized {
            let q = split_quantized(bytes, len);
            update_8bit(cfg, t, p, g, q, &self.signed, &self.unsigned);
        } else {
            let (m, v) = split_moments(bytes, len);
            update_32bit_bnb(cfg, t, p, g, m, v);
        }
    }

    /// `GaLoreAdamW8bit`'s update of a target (module docs): project, the 8-bit update of a
    /// zero low-rank parameter without decay, project back and add, then decay.
    fn update_projected(&mut self, i: usize, var: &Var, grad: &Tensor, t: u64) -> Result<()> {
        let cpu = Device::Cpu;
        let step = self.slots[i].step;
        let projector = self.slots[i].projector.as_mut().expect("a GaLore target");
        let low = projector.project(&grad.detach().to_dtype(DType::F32)?.to_device(&cpu)?, step)?;
        let g = flat_f32(&low)?;
        let mut delta = vec![0f32; g.len()];
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..self.cfg
        };
        self.update_bnb(i, &cfg, t, &mut delta, &g);
        let delta = Tensor::from_vec(delta, low.shape(), &cpu)?;
        let projector = self.slots[i].projector.as_ref().expect("a GaLore target");
        let back = projector.project_back(&delta)?;
        let mut w = (var
            .as_detached_tensor()
            .to_dtype(DType::F32)?
            .to_device(&cpu)?
            + back)?;
        if self.cfg.weight_decay > 0.0 {
            // galore-torch: p.data.add_(p.data, alpha=-lr * weight_decay), after the update.
            w = (&w + w.affine(-self.cfg.lr * self.cfg.weight_decay, 0.0)?)?;
        }
        var.set(&w.to_dtype(var.dtype())?.to_device(var.device())?)?;
        Ok(())
    }

    /// [`super::AdamW`]'s update (torch's arithmetic, `adamw_update`) on f32 moments kept in
    /// the arena.
    fn update_torch(
        &mut self,
        var: &Var,
        grad: &Tensor,
        t: u64,
        range: Range<usize>,
    ) -> Result<()> {
        let len = var.elem_count();
        let dev = var.device();
        let pdtype = var.dtype();
        let bytes = self.arena.bytes_mut(range);
        let (m, v) = split_moments(bytes, len);
        let shape = var.shape();
        let mt = Tensor::from_slice(m, shape, &Device::Cpu)?.to_device(dev)?;
        let vt = Tensor::from_slice(v, shape, &Device::Cpu)?.to_device(dev)?;
        let g = grad.detach().to_dtype(DType::F32)?.to_device(dev)?;
        let param = var.as_detached_tensor().to_dtype(DType::F32)?;
        let (param, m2, v2) = adamw_update(&self.cfg, t, &param, &g, Some((&mt, &vt)))?;
        m.copy_from_slice(&flat_f32(&m2)?);
        v.copy_from_slice(&flat_f32(&v2)?);
        var.set(&param.to_dtype(pdtype)?)?;
        Ok(())
    }

    /// The state as named tensors: per parameter `<name>.step` (`i64`) and either
    /// `<name>.state1`, `<name>.state2` (`u8` codes, the parameter's shape: bitsandbytes'
    /// names) with `<name>.absmax1`, `<name>.absmax2` (`f32` per block), or `<name>.exp_avg`,
    /// `<name>.exp_avg_sq` (`f32`, [`super::AdamW::state`]'s keys), in the low-rank shape for
    /// a GaLore target, which also saves its bases (`<name>.proj_left` / `<name>.proj_right`,
    /// [`GaLoreProjector::basis_entries`]); and the global `step`.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(5 * self.slots.len() + 1);
        let cpu = Device::Cpu;
        for s in &self.slots {
            let bytes = self.arena.bytes(s.range.clone());
            let shape = s.dims.as_slice();
            if s.quantized {
                let nb = s.blocks();
                let absmax = f32s(&bytes[..8 * nb]);
                let codes = &bytes[8 * nb..8 * nb + 2 * s.len];
                out.push((
                    format!("{}.state1", s.name),
                    Tensor::from_slice(&codes[..s.len], shape, &cpu)?,
                ));
                out.push((
                    format!("{}.absmax1", s.name),
                    Tensor::from_slice(&absmax[..nb], nb, &cpu)?,
                ));
                out.push((
                    format!("{}.state2", s.name),
                    Tensor::from_slice(&codes[s.len..], shape, &cpu)?,
                ));
                out.push((
                    format!("{}.absmax2", s.name),
                    Tensor::from_slice(&absmax[nb..], nb, &cpu)?,
                ));
            } else {
                let mv = f32s(&bytes[..8 * s.len]);
                out.push((
                    format!("{}.exp_avg", s.name),
                    Tensor::from_slice(&mv[..s.len], shape, &cpu)?,
                ));
                out.push((
                    format!("{}.exp_avg_sq", s.name),
                    Tensor::from_slice(&mv[s.len..], shape, &cpu)?,
                ));
            }
            out.push((format!("{}.step", s.name), step_tensor(s.step)?));
            if let Some(p) = &s.projector {
                for (suffix, t) in p.basis_tensors(s.var.dims2()?, DType::F32, &cpu)? {
                    out.push((format!("{}.{suffix}", s.name), t));
                }
            }
            self.arena.release(s.range.clone());
        }
        out.push(("step".to_string(), step_tensor(self.step)?));
        Ok(out)
    }

    /// Restores [`BnbAdamW::state`]'s output (after a safetensors round trip). Every entry must
    /// be present with its dtype and shape (an `adamw` state, or one with another
    /// `min_8bit_size`, names the entry that differs); nothing else may be. On error the
    /// optimizer is unchanged.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut expected = HashSet::from(["step".to_string()]);
        let mut restored = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let mut get = |suffix: &str, dtype: DType, dims: &[usize]| -> Result<Tensor> {
                let key = format!("{}.{suffix}", s.name);
                let t = state.get(&key).with_context(|| {
                    let kind = if s.quantized { "8-bit" } else { "32-bit" };
                    format!("optimizer state is missing {key:?} (this run keeps {kind} state for {:?}: a state of another optimizer or min_8bit_size?)", s.name)
                })?;
                ensure!(
                    t.dtype() == dtype && t.dims() == dims,
                    "optimizer state {key:?} is {:?} {:?}, expected {dtype:?} {dims:?}{}",
                    t.dtype(),
                    t.dims(),
                    if s.projector.is_some() {
                        " (a GaLore target: the saved run had another rank or proj_type in optim_args?)"
                    } else {
                        ""
                    }
                );
                expected.insert(key);
                Ok(t.clone())
            };
            let dims = s.dims.as_slice();
            let bases = match &s.projector {
                Some(p) => Some(p.read_bases(s.var.dims2()?, |suffix, shape| {
                    get(suffix, DType::F32, shape)
                })?),
                None => None,
            };
            let parts = if s.quantized {
                let nb = [s.blocks()];
                vec![
                    get("absmax1", DType::F32, &nb)?,
                    get("absmax2", DType::F32, &nb)?,
                    get("state1", DType::U8, dims)?,
                    get("state2", DType::U8, dims)?,
                ]
            } else {
                vec![
                    get("exp_avg", DType::F32, dims)?,
                    get("exp_avg_sq", DType::F32, dims)?,
                ]
            };
            let key = format!("{}.step", s.name);
            let step = read_step(state, &key)?;
            expected.insert(key);
            restored.push((parts, step, bases));
        }
        for key in state.keys() {
            ensure!(
                expected.contains(key),
                "unexpected optimizer state entry {key:?}"
            );
        }
        let global = read_step(state, "step")?;
        for (s, (parts, step, bases)) in self.slots.iter_mut().zip(restored) {
            let bytes = self.arena.bytes_mut(s.range.clone());
            let mut at = 0;
            for t in parts {
                let t = t.flatten_all()?;
                let raw: Vec<u8> = match t.dtype() {
                    DType::U8 => t.to_vec1::<u8>()?,
                    _ => bytemuck::cast_slice(&t.to_vec1::<f32>()?).to_vec(),
                };
                bytes[at..at + raw.len()].copy_from_slice(&raw);
                at += raw.len();
            }
            s.step = step;
            if let Some(p) = &mut s.projector {
                // A target that never stepped has no basis yet (zeros were saved).
                p.set_bases(bases.filter(|_| step > 0));
            }
            self.arena.release(s.range.clone());
        }
        self.step = global;
        Ok(())
    }
}

/// Sets `var` to the f32 values `p` (its shape), rounded to its dtype.
fn set_f32(var: &Var, p: Vec<f32>) -> Result<()> {
    let p = Tensor::from_vec(p, var.shape(), &Device::Cpu)?
        .to_dtype(var.dtype())?
        .to_device(var.device())?;
    Ok(var.set(&p)?)
}

fn flat_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// The scalars of one step, cast to f32 where torch casts a Python float for an f32 tensor.
struct Coefs {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `1 - lr·λ`, or `None` without decay.
    decay: Option<f32>,
}

impl Coefs {
    fn of(cfg: &AdamWConfig) -> Coefs {
        Coefs {
            beta1: cfg.beta1 as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            decay: (cfg.weight_decay > 0.0).then_some((1.0 - cfg.lr * cfg.weight_decay) as f32),
        }
    }

    /// `m.mul_(β1).add_(g, alpha=1-β1)` and `v.mul_(β2).addcmul_(g, g, value=1-β2)`.
    #[inline]
    fn moments(&self, m: f32, v: f32, g: f32) -> (f32, f32) {
        (
            m * self.beta1 + self.one_minus_beta1 * g,
            v * self.beta2 + self.one_minus_beta2 * g * g,
        )
    }
}

/// Bias corrections `(c1, c2) = (1 - β1^t, sqrt(1 - β2^t))` in f64, as Python computes them.
fn corrections(cfg: &AdamWConfig, t: u64) -> (f64, f64) {
    let t = t as f64;
    (1.0 - cfg.beta1.powf(t), (1.0 - cfg.beta2.powf(t)).sqrt())
}

/// bitsandbytes' 8-bit block-wise AdamW step on one parameter (module docs).
fn update_8bit(
    cfg: &AdamWConfig,
    t: u64,
    p: &mut [f32],
    g: &[f32],
    q: Quantized,
    signed: &Map,
    unsigned: &Map,
) {
    let k = Coefs::of(cfg);
    let (c1, c2) = corrections(cfg, t);
    let (c2, eps, step) = (c2 as f32, cfg.eps as f32, (-cfg.lr / c1) as f32);
    let mut m = [0f32; BLOCKSIZE];
    let mut v = [0f32; BLOCKSIZE];
    let blocks = p.chunks_mut(BLOCKSIZE).zip(g.chunks(BLOCKSIZE));
    let codes = q.q1.chunks_mut(BLOCKSIZE).zip(q.q2.chunks_mut(BLOCKSIZE));
    let absmax = q.absmax1.iter_mut().zip(q.absmax2.iter_mut());
    for (((pb, gb), (q1, q2)), (a1, a2)) in blocks.zip(codes).zip(absmax) {
        let n = pb.len();
        for j in 0..n {
            let m0 = dynamic::dequantize_one(&signed.code, q1[j], *a1);
            let v0 = dynamic::dequantize_one(&unsigned.code, q2[j], *a2);
            (m[j], v[j]) = k.moments(m0, v0, gb[j]);
            let denom = v[j].sqrt() / c2 + eps;
            let mut x = pb[j];
            if let Some(d) = k.decay {
                x *= d;
            }
            pb[j] = x + step * m[j] / denom;
        }
        *a1 = dynamic::quantize_block_like_cpu(&m[..n], &signed.thresholds, q1);
        *a2 = dynamic::quantize_block_like_cpu(&v[..n], &unsigned.thresholds, q2);
    }
}

/// bitsandbytes' 32-bit CPU AdamW step (its 8-bit optimizers' small parameters).
fn update_32bit_bnb(
    cfg: &AdamWConfig,
    t: u64,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let k = Coefs::of(cfg);
    let (c1, c2) = corrections(cfg, t);
    let step = (-cfg.lr * c2 / c1) as f32;
    let eps = (cfg.eps * c2) as f32;
    for j in 0..p.len() {
        (m[j], v[j]) = k.moments(m[j], v[j], g[j]);
        let update = m[j] / (v[j].sqrt() + eps);
        let mut x = p[j];
        if let Some(d) = k.decay {
            x *= d;
        }
        p[j] = x + step * update;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::AdamW;

    const EIGHT: StateBits = StateBits::Eight { min_8bit_size: 600 };

    fn cfg() -> AdamWConfig {
        AdamWConfig {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        }
    }

    /// A parameter of 700 elements (8-bit at min_8bit_size 600: three blocks, the last
    /// partial) and one of 6 (32-bit).
    fn vars() -> Vec<(String, Var)> {
        let dev = Device::Cpu;
        let big: Vec<f32> = (0..700)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0)
            .collect();
        vec![
            (
                "big".to_string(),
                Var::from_tensor(&Tensor::from_vec(big, (7, 100), &dev).unwrap()).unwrap(),
            ),
            (
                "small".to_string(),
                Var::new(&[0.5f32, -1.2, 3.0, 0.0, 1e-3, -0.7], &dev).unwrap(),
            ),
        ]
    }

    fn grads(step: usize) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let s = step as f32 + 1.0;
        let big: Vec<f32> = (0..700)
            .map(|i| (((i * 13 + step * 7) % 29) as f32 - 14.0) * 0.01 * s)
            .collect();
        let mut g = HashMap::from([(
            "big".to_string(),
            Tensor::from_vec(big, (7, 100), &dev).unwrap(),
        )]);
        if step != 1 {
            // "small" is skipped at step 1: its own step count lags.
            g.insert(
                "small".to_string(),
                Tensor::new(&[0.1f32 * s, -0.2, 0.3, 1.0, 0.0, -0.05], &dev).unwrap(),
            );
        }
        g
    }

    fn values(v: &[(String, Var)]) -> Vec<u32> {
        v.iter()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .map(f32::to_bits)
            .collect()
    }

    fn state_bits(state: &[(String, Tensor)]) -> Vec<(String, Vec<u8>)> {
        state
            .iter()
            .map(|(k, t)| {
                let t = t.flatten_all().unwrap();
                let bytes = match t.dtype() {
                    DType::U8 => t.to_vec1::<u8>().unwrap(),
                    DType::F32 => bytemuck::cast_slice(&t.to_vec1::<f32>().unwrap()).to_vec(),
                    _ => t
                        .to_vec1::<i64>()
                        .unwrap()
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                };
                (k.clone(), bytes)
            })
            .collect()
    }

    #[test]
    fn paged_8bit_state_equals_in_memory_bit_for_bit_in_an_unnamed_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (vars(), vars());
        let mut mem = BnbAdamW::new(a.clone(), cfg(), EIGHT, None).unwrap();
        let mut paged = BnbAdamW::new(b.clone(), cfg(), EIGHT, Some(dir.path())).unwrap();
        let (folder, len) = paged.state_file().unwrap();
        assert_eq!((folder, len as usize), (dir.path(), paged.state_bytes()));
        // The file has no name: nothing a killed run could leave behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        for step in 0..4 {
            mem.step_with(&grads(step)).unwrap();
            paged.step_with(&grads(step)).unwrap();
            assert_eq!(values(&a), values(&b), "step {step}");
        }
        assert_eq!(
            state_bits(&mem.state().unwrap()),
            state_bits(&paged.state().unwrap())
        );
        // 8-bit: 2 bytes per element and 8 per block of 256 (rounded to 8); f32: 8 per element.
        assert_eq!(mem.state_bytes(), 8 * 3 + 2 * 700 + 8 * 6);
        drop(paged);
    }

    #[test]
    fn paged_32bit_equals_adamw_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (vars(), vars());
        let mut adamw = AdamW::new(a.clone(), cfg());
        let mut paged =
            BnbAdamW::new(b.clone(), cfg(), StateBits::ThirtyTwo, Some(dir.path())).unwrap();
        for step in 0..4 {
            adamw.step_with(&grads(step)).unwrap();
            paged.step_with(&grads(step)).unwrap();
            assert_eq!(values(&a), values(&b), "step {step}");
        }
        // The same keys and values as AdamW's state: the checkpoints are interchangeable.
        assert_eq!(
            state_bits(&adamw.state().unwrap()),
            state_bits(&paged.state().unwrap())
        );
    }

    #[test]
    fn eight_bit_state_round_trips_through_safetensors_and_continues_identically() {
        let whole = vars();
        let mut o1 = BnbAdamW::new(whole.clone(), cfg(), EIGHT, None).unwrap();
        for step in 0..4 {
            o1.step_with(&grads(step)).unwrap();
        }
        let first = vars();
        let mut o2 = BnbAdamW::new(first.clone(), cfg(), EIGHT, None).unwrap();
        for step in 0..2 {
            o2.step_with(&grads(step)).unwrap();
        }
        let bytes = crate::util::atomic::serialize_safetensors(&o2.state().unwrap(), None).unwrap();
        let (state, _) =
            crate::util::atomic::deserialize_safetensors(&bytes, &Device::Cpu).unwrap();
        assert_eq!(state["big.state1"].dtype(), DType::U8);
        assert_eq!(state["big.absmax1"].dims(), &[3]);
        assert_eq!(state["small.step"].to_scalar::<i64>().unwrap(), 1);
        let dir = tempfile::tempdir().unwrap();
        let mut o3 = BnbAdamW::new(first.clone(), cfg(), EIGHT, Some(dir.path())).unwrap();
        o3.load_state(&state).unwrap();
        assert_eq!(o3.step_count(), 2);
        for step in 2..4 {
            o3.step_with(&grads(step)).unwrap();
        }
        assert_eq!(values(&whole), values(&first));
    }

    #[test]
    fn a_state_of_another_optimizer_is_refused_by_name() {
        let mut opt = BnbAdamW::new(vars(), cfg(), EIGHT, None).unwrap();
        let adamw: BTreeMap<String, Tensor> = AdamW::new(vars(), cfg())
            .state()
            .unwrap()
            .into_iter()
            .collect();
        let err = opt.load_state(&adamw).unwrap_err().to_string();
        assert!(
            err.contains("missing \"big.absmax1\"") && err.contains("8-bit"),
            "{err}"
        );
        // Another min_8bit_size: 32-bit state where this run keeps codes.
        let other = BnbAdamW::new(
            vars(),
            cfg(),
            StateBits::Eight {
                min_8bit_size: 4096,
            },
            None,
        )
        .unwrap();
        let state: BTreeMap<String, Tensor> = other.state().unwrap().into_iter().collect();
        assert!(opt.load_state(&state).is_err());
        // Codes of the wrong dtype.
        let mut good: BTreeMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
        good.insert(
            "big.state1".into(),
            Tensor::zeros((7, 100), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = opt.load_state(&good).unwrap_err().to_string();
        assert!(err.contains("\"big.state1\" is F32"), "{err}");
    }

    #[test]
    fn an_offload_folder_that_cannot_be_made_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let err = BnbAdamW::new(vars(), cfg(), EIGHT, Some(&file.join("sub")))
            .err()
            .unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("offload folder")
                && msg.contains("--offload-dir")
                && msg.contains("a-file"),
            "{msg}"
        );
    }
}
