//! [`GaLoreAdamW`]: galore-torch 1.0's `GaLoreAdamW` over named [`Var`]s.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::adamw::{adam_direction, apply_update, fused_step};
use super::natural::NaturalGradient;
use super::projector::{Bases, GaLoreProjector};
use super::GaLoreConfig;
use crate::train::optim::{checked_grad, read_step, state_dtype, step_tensor};

/// The projection state of a target parameter.
struct Projection {
    projector: GaLoreProjector,
    natural: Option<NaturalGradient>,
}

/// Per-parameter optimizer state.
struct ParamState {
    name: String,
    var: Var,
    /// `Some` for a GaLore target.
    projection: Option<Projection>,
    /// First moment, in the low-rank shape for targets; `None` before the first gradient.
    exp_avg: Option<Tensor>,
    /// Second moment.
    exp_avg_sq: Option<Tensor>,
    /// Updates applied to this parameter; drives bias correction and SVD refreshes.
    step: u64,
}

impl ParamState {
    fn dims2(&self) -> (usize, usize) {
        let d = self.var.dims();
        (d[0], d[1])
    }

    /// The shape of the moments: the low-rank shape for targets.
    fn moment_shape(&self, cfg: &GaLoreConfig) -> Vec<usize> {
        match self.projection {
            Some(_) => {
                let (a, b) = cfg.proj_type.low_rank_shape(self.dims2(), cfg.rank);
                vec![a, b]
            }
            None => self.var.dims().to_vec(),
        }
    }
}

/// GaLore AdamW (Zhao et al. 2024, Algorithm 2) as galore-torch 1.0's `GaLoreAdamW`: target
/// weights' gradients are projected to rank `r` ([`GaLoreProjector`]), optionally
/// preconditioned by Natural GaLore ([`NaturalGradient`]), Adam runs on the low-rank gradient,
/// and its normalized step is projected back and scaled by `scale`; all other parameters get
/// the same Adam step without projection. The Adam formula is galore-torch's, see
/// [`super::adamw`]. Parameters without a gradient at a step are skipped (their step count does
/// not advance), as in torch.
pub struct GaLoreAdamW {
    params: Vec<ParamState>,
    cfg: GaLoreConfig,
    /// Number of `step` / `step_with` calls.
    step: u64,
}

impl GaLoreAdamW {
    /// Creates the optimizer: validates `cfg`, picks the targets among `params` by
    /// `cfg.target_modules` (an error when none matches) and checks `cfg.rank` against each.
    pub fn new(params: Vec<(String, Var)>, cfg: GaLoreConfig) -> Result<Self> {
        cfg.validate()?;
        let projectors = cfg.projectors(params.iter().map(|(n, v)| (n.as_str(), v.dims())))?;
        let mut seen = HashSet::new();
        let mut states = Vec::with_capacity(params.len());
        for ((name, var), projector) in params.into_iter().zip(projectors) {
            ensure!(
                seen.insert(name.clone()),
                "duplicate parameter name {name:?}"
            );
            let projection = projector.map(|projector| Projection {
                projector,
                natural: cfg.natural.map(NaturalGradient::new),
            });
            states.push(ParamState {
                name,
                var,
                projection,
                exp_avg: None,
                exp_avg_sq: None,
                step: 0,
            });
        }
        Ok(Self {
            params: states,
            cfg,
            step: 0,
        })
    }

    /// Sets the learning rate used by subsequent steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.adam.lr = lr;
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.cfg.adam.lr
    }

    /// The current settings.
    pub fn config(&self) -> &GaLoreConfig {
        &self.cfg
    }

    /// Number of optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The optimized parameters, in construction order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// The names of the projected parameters, in construction order.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.params
            .iter()
            .filter(|p| p.projection.is_some())
            .map(|p| p.name.as_str())
    }

    /// Applies one update with the gradients of `loss.backward()`; parameters absent from
    /// `grads` are skipped.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        for p in &mut self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                update(p, g, &self.cfg)?;
            }
        }
        Ok(())
    }

    /// Applies one update with gradients by parameter name; absent parameters are skipped,
    /// unknown names are an error.
    pub fn step_with(&mut self, grads: &HashMap<String, Tensor>) -> Result<()> {
        for name in grads.keys() {
            ensure!(
                self.params.iter().any(|p| &p.name == name),
                "gradient given for unknown parameter {name:?}"
            );
        }
        self.step += 1;
        for p in &mut self.params {
            if let Some(g) = grads.get(&p.name) {
                update(p, g, &self.cfg)?;
            }
        }
        Ok(())
    }

    /// Applies one update to the single parameter `name` (the layer-wise form: the caller
    /// steps each parameter as soon as its gradient is final, then drops the gradient). The
    /// global step count advances with [`GaLoreAdamW::finish_layerwise_step`].
    pub fn step_param(&mut self, name: &str, grad: &Tensor) -> Result<()> {
        let p = self
            .params
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("gradient given for unknown parameter {name:?}"))?;
        update(p, grad, &self.cfg)
    }

    /// Ends a step made of [`GaLoreAdamW::step_param`] calls.
    pub fn finish_layerwise_step(&mut self) {
        self.step += 1;
    }

    /// The optimizer state as named tensors, for checkpointing. For every parameter:
    /// `"<name>.exp_avg"`, `"<name>.exp_avg_sq"` (low-rank shapes for targets; zeros before the
    /// first gradient) and `"<name>.step"` (`i64`); for targets also the bases
    /// `"<name>.proj_left"` (`[m, r]`) and/or `"<name>.proj_right"` (`[r, n]`), as the
    /// projection side has them, and with Natural GaLore `"<name>.natural_history"`
    /// (`[s, k]`, oldest first; its first `min(step, s)` rows are the history, the rest zeros);
    /// plus `"step"`, the global count.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for p in &self.params {
            let sdtype = state_dtype(p.var.dtype());
            let dev = p.var.device();
            let zeros = |shape: &[usize]| Tensor::zeros(shape, sdtype, dev);
            let shape = p.moment_shape(&self.cfg);
            let (m, v) = match (&p.exp_avg, &p.exp_avg_sq) {
                (Some(m), Some(v)) => (m.clone(), v.clone()),
                _ => (zeros(&shape)?, zeros(&shape)?),
            };
            out.push((format!("{}.exp_avg", p.name), m));
            out.push((format!("{}.exp_avg_sq", p.name), v));
            out.push((format!("{}.step", p.name), step_tensor(p.step)?));
            let Some(proj) = &p.projection else { continue };
            for (suffix, t) in proj.projector.basis_tensors(p.dims2(), sdtype, dev)? {
                out.push((format!("{}.{suffix}", p.name), t));
            }
            if let (Some(nat), Some(ncfg)) = (&proj.natural, &self.cfg.natural) {
                let k: usize = shape.iter().product();
                let mut rows: Vec<Tensor> = nat.history().cloned().collect();
                while rows.len() < ncfg.history {
                    rows.push(zeros(&[k])?);
                }
                out.push((
                    format!("{}.natural_history", p.name),
                    Tensor::stack(&rows, 0)?,
                ));
            }
        }
        out.push(("step".to_string(), step_tensor(self.step)?));
        Ok(out)
    }

    /// Restores state produced by [`GaLoreAdamW::state`] (after a safetensors round trip, the
    /// continuation is bit-identical). Every entry must be present with the shape this
    /// optimizer's settings give, and no other entry; on error `self` is unchanged.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut expected = HashSet::from(["step".to_string()]);
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            restored.push(read_param_state(p, &self.cfg, state, &mut expected)?);
        }
        for key in state.keys() {
            ensure!(
                expected.contains(key),
                "unexpected GaLore optimizer state entry {key:?}"
            );
        }
        let global = read_step(state, "step")?;
        for (p, r) in self.params.iter_mut().zip(restored) {
            p.step = r.step;
            // A parameter that never had a gradient stays lazily uninitialized.
            let fresh = r.step == 0;
            p.exp_avg = (!fresh).then_some(r.exp_avg);
            p.exp_avg_sq = (!fresh).then_some(r.exp_avg_sq);
            if let Some(proj) = &mut p.projection {
                proj.projector.set_bases((!fresh).then_some(r.bases));
                if let Some(nat) = &mut proj.natural {
                    nat.set_history(r.history)?;
                }
            }
        }
        self.step = global;
        Ok(())
    }
}

/// One parameter's entries of a saved state, checked.
struct Restored {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
    bases: Bases,
    history: Vec<Tensor>,
}

fn read_param_state(
    p: &ParamState,
    cfg: &GaLoreConfig,
    state: &BTreeMap<String, Tensor>,
    expected: &mut HashSet<String>,
) -> Result<Restored> {
    let mut tensor = |suffix: &str, shape: &[usize]| read_tensor(p, state, expected, suffix, shape);
    let shape = p.moment_shape(cfg);
    let exp_avg = tensor("exp_avg", &shape)?;
    let exp_avg_sq = tensor("exp_avg_sq", &shape)?;
    let step = read_step(state, &format!("{}.step", p.name))?;
    let mut bases = Bases {
        left: None,
        right: None,
    };
    let mut history = Vec::new();
    if let Some(proj) = &p.projection {
        bases = proj.projector.read_bases(p.dims2(), &mut tensor)?;
        if let Some(ncfg) = &cfg.natural {
            let k: usize = shape.iter().product();
            let all = tensor("natural_history", &[ncfg.history, k])?;
            let kept = (step as usize).min(ncfg.history);
            history = (0..kept)
                .map(|i| all.get(i))
                .collect::<candle_core::Result<_>>()?;
        }
    }
    expected.insert(format!("{}.step", p.name));
    Ok(Restored {
        exp_avg,
        exp_avg_sq,
        step,
        bases,
        history,
    })
}

/// The entry `<name>.<suffix>` of a saved state, which must have `shape`, in the state dtype
/// on the parameter's device; its key is added to `expected`.
fn read_tensor(
    p: &ParamState,
    state: &BTreeMap<String, Tensor>,
    expected: &mut HashSet<String>,
    suffix: &str,
    shape: &[usize],
) -> Result<Tensor> {
    let key = format!("{}.{suffix}", p.name);
    let t = state
        .get(&key)
        .with_context(|| format!("optimizer state is missing {key:?}"))?;
    ensure!(
        t.dims() == shape,
        "optimizer state {key:?} has shape {:?}, but these GaLore settings give {shape:?} \
         for parameter {:?} (a state from another run?)",
        t.dims(),
        p.name
    );
    expected.insert(key);
    Ok(t.to_dtype(state_dtype(p.var.dtype()))?
        .to_device(p.var.device())?)
}

/// One update of a single parameter: project (targets), precondition (Natural GaLore), Adam,
/// project back, step and decay.
fn update(p: &mut ParamState, grad: &Tensor, cfg: &GaLoreConfig) -> Result<()> {
    let g = checked_grad(&p.name, &p.var, grad)?;
    let (pdtype, sdtype) = (p.var.dtype(), g.dtype());
    let g = match &mut p.projection {
        Some(proj) => {
            let low = proj.projector.project(&g, p.step)?;
            match &mut proj.natural {
                Some(nat) => nat.precondition(&low)?,
                None => low,
            }
        }
        None => g,
    };
    if p.projection.is_none() && p.var.dtype() == sdtype {
        // The parameter's own shape (the vocabulary table when it is not a target): updated
        // in place, bit-identical, without the tensor path's temporaries.
        let t = p.step + 1;
        if fused_step(&cfg.adam, t, &p.var, &g, &mut p.exp_avg, &mut p.exp_avg_sq)? {
            p.step = t;
            return Ok(());
        }
    }
    let moments = p.exp_avg.as_ref().zip(p.exp_avg_sq.as_ref());
    let (direction, m, v) = adam_direction(&cfg.adam, &g, moments)?;
    let direction = match &p.projection {
        Some(proj) => proj.projector.project_back(&direction)?,
        None => direction,
    };
    let param = p.var.as_detached_tensor().to_dtype(sdtype)?;
    let param = apply_update(&cfg.adam, p.step + 1, &param, &direction)?;
    p.var.set(&param.to_dtype(pdtype)?)?;
    p.step += 1;
    p.exp_avg = Some(m);
    p.exp_avg_sq = Some(v);
    Ok(())
}
