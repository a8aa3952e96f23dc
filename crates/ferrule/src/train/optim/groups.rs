//! Parameter groups with learning rates of their own (torch's `param_groups`), for methods
//! whose tensors train at different rates (DePT's low-rank pair at `lora_embedding_lr`, its
//! prompt at `lr`: the reference's `train.py:595-611`). Each group is an optimizer of the run's
//! kind over its own tensors; the schedule's factor applies to every group, as
//! `get_linear_schedule_with_warmup` multiplies each group's base rate by the same λ(step).
//!
//! The state keeps the single optimizer's layout (`<name>.<entry>` per tensor, one `step`),
//! so a checkpoint reads the same either way.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, ensure, Result};
use candle_core::{Tensor, Var};

use super::choice::{build_optimizer, Optimizer, OptimizerSpec};

/// Tensors (by name) that take learning rate `lr` instead of the run's.
#[derive(Clone, Debug, PartialEq)]
pub struct LrGroup {
    pub keys: Vec<String>,
    pub lr: f64,
}

/// One optimizer per group; `set_lr(λ·lr)` gives group `i` the rate `λ·lrᵢ`.
pub struct Grouped {
    /// `(lrᵢ / lr, the group's optimizer, its tensor names)`; the run's own group first.
    groups: Vec<(f64, Box<dyn Optimizer>, HashSet<String>)>,
}

impl Grouped {
    /// The optimizer `spec` names, one per group of `spec.lr_groups` and one for the other
    /// `vars`. A group key that names no tensor, a tensor in two groups, or a run rate of 0
    /// (the factor each group's rate follows is taken from it) is an error.
    pub fn new(vars: Vec<(String, Var)>, spec: &OptimizerSpec) -> Result<Grouped> {
        let base = spec.adamw.lr;
        ensure!(
            base > 0.0,
            "lr is {base}: a second learning rate (lora_embedding_lr) follows lr's schedule, so lr must be above 0"
        );
        let mut rest = vars;
        let mut groups = Vec::new();
        let mut claimed = HashSet::new();
        for g in spec.lr_groups {
            let keys: HashSet<String> = g.keys.iter().cloned().collect();
            for k in &keys {
                if !claimed.insert(k.clone()) {
                    bail!("parameter {k:?} is in two learning-rate groups")
                }
                if !rest.iter().any(|(n, _)| n == k) {
                    bail!("learning-rate group: no trainable tensor {k:?}")
                }
            }
            let (mine, others): (Vec<_>, Vec<_>) =
                rest.into_iter().partition(|(n, _)| keys.contains(n));
            rest = others;
            groups.push((g.lr, mine, keys));
        }
        let own: HashSet<String> = rest.iter().map(|(n, _)| n.clone()).collect();
        groups.insert(0, (base, rest, own));
        let groups = groups
            .into_iter()
            .filter(|(_, vars, _)| !vars.is_empty())
            .map(|(lr, vars, keys)| {
                let mut one = spec.clone();
                one.adamw.lr = lr;
                one.lr_groups = &[];
                Ok((lr / base, build_optimizer(vars, &one)?, keys))
            })
            .collect::<Result<_>>()?;
        Ok(Grouped { groups })
    }

    /// The group holding tensor `name`.
    fn group_of(&mut self, name: &str) -> Result<&mut Box<dyn Optimizer>> {
        match self
            .groups
            .iter_mut()
            .find(|(_, _, keys)| keys.contains(name))
        {
            Some((_, opt, _)) => Ok(opt),
            None => bail!("gradient given for unknown parameter {name:?}"),
        }
    }

    /// The tensor an optimizer-state entry belongs to: the longest tensor name `n` with the
    /// entry named `n.<suffix>`; `None` for entries of no tensor (`step`).
    fn owner(&self, entry: &str) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None;
        for (i, (_, _, keys)) in self.groups.iter().enumerate() {
            for k in keys {
                let owns = entry.len() > k.len()
                    && entry.starts_with(k.as_str())
                    && entry.as_bytes()[k.len()] == b'.';
                if owns && best.is_none_or(|(_, len)| k.len() > len) {
                    best = Some((i, k.len()));
                }
            }
        }
        best.map(|(i, _)| i)
    }
}

impl Optimizer for Grouped {
    fn set_lr(&mut self, lr: f64) {
        for (ratio, opt, _) in &mut self.groups {
            opt.set_lr(lr * *ratio);
        }
    }
    fn step_count(&self) -> u64 {
        self.groups[0].1.step_count()
    }
    fn step_with(&mut self, grads: &HashMap<String, Tensor>) -> Result<()> {
        for name in grads.keys() {
            self.group_of(name)?;
        }
        for (_, opt, keys) in &mut self.groups {
            let mine: HashMap<String, Tensor> = grads
                .iter()
                .filter(|(n, _)| keys.contains(*n))
                .map(|(n, g)| (n.clone(), g.clone()))
                .collect();
            opt.step_with(&mine)?;
        }
        Ok(())
    }
    /// Every group's entries; those of no tensor (`step`) once, from the first group (all
    /// groups step together, so they agree).
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        let mut seen = HashSet::new();
        for (_, opt, _) in &self.groups {
            for (k, t) in opt.state()? {
                if seen.insert(k.clone()) {
                    out.push((k, t));
                }
            }
        }
        Ok(out)
    }
    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut parts: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new(); self.groups.len()];
        for (k, t) in state {
            match self.owner(k) {
                Some(i) => {
                    parts[i].insert(k.clone(), t.clone());
                }
                None => parts.iter_mut().for_each(|p| {
                    p.insert(k.clone(), t.clone());
                }),
            }
        }
        // Each group checks its own entries (missing, unknown, misshapen) before any changes.
        for ((_, opt, _), part) in self.groups.iter_mut().zip(&parts) {
            opt.load_state(part)?;
        }
        Ok(())
    }
    fn step_param(&mut self, name: &str, grad: &Tensor) -> Result<()> {
        self.group_of(name)?.step_param(name, grad)
    }
    fn finish_layerwise_step(&mut self) {
        for (_, opt, _) in &mut self.groups {
            opt.finish_layerwise_step();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::{AdamW, AdamWConfig};
    use candle_core::Device;

    fn var(values: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap()
    }

    /// Two groups step as two AdamWs at their own rates (the second at 0.5 · λ·lr after
    /// `set_lr(λ·lr)` with lr 0.1 and lora_embedding_lr 0.05), and a state round trip through
    /// the grouped optimizer keeps the single optimizer's keys.
    #[test]
    fn each_group_steps_at_its_own_rate_and_the_state_keeps_one_layout() {
        let cfg = AdamWConfig {
            lr: 0.1,
            ..Default::default()
        };
        let groups = [LrGroup {
            keys: vec!["pair".into()],
            lr: 0.05,
        }];
        let mut spec = OptimizerSpec::adamw(cfg);
        spec.lr_groups = &groups;
        let (p, q) = (var(&[1.0, -2.0]), var(&[0.5, 3.0]));
        let mut grouped = Grouped::new(
            vec![("prompt".into(), p.clone()), ("pair".into(), q.clone())],
            &spec,
        )
        .unwrap();
        let (p2, q2) = (var(&[1.0, -2.0]), var(&[0.5, 3.0]));
        let mut one = AdamW::new(vec![("prompt".into(), p2.clone())], cfg);
        let mut two = AdamW::new(
            vec![("pair".into(), q2.clone())],
            AdamWConfig { lr: 0.05, ..cfg },
        );
        let g: HashMap<String, Tensor> = [
            (
                "prompt".to_string(),
                Tensor::new(&[0.3f32, -0.1], &Device::Cpu).unwrap(),
            ),
            (
                "pair".to_string(),
                Tensor::new(&[-0.2f32, 0.4], &Device::Cpu).unwrap(),
            ),
        ]
        .into();
        for lambda in [1.0, 0.5] {
            grouped.set_lr(0.1 * lambda);
            grouped.step_with(&g).unwrap();
            one.set_lr(0.1 * lambda);
            two.set_lr(0.05 * lambda);
            one.step_with(&[("prompt".to_string(), g["prompt"].clone())].into())
                .unwrap();
            two.step_with(&[("pair".to_string(), g["pair"].clone())].into())
                .unwrap();
        }
        let v = |x: &Var| x.as_tensor().to_vec1::<f32>().unwrap();
        let close = |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-7);
        assert!(close(v(&p), v(&p2)), "{:?} {:?}", v(&p), v(&p2));
        assert!(close(v(&q), v(&q2)), "{:?} {:?}", v(&q), v(&q2));
        assert_ne!(v(&q), [0.5, 3.0]);
        let state = grouped.state().unwrap();
        let mut keys: Vec<&str> = state.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "pair.exp_avg",
                "pair.exp_avg_sq",
                "pair.step",
                "prompt.exp_avg",
                "prompt.exp_avg_sq",
                "prompt.step",
                "step"
            ]
        );
        let map: BTreeMap<String, Tensor> = state.into_iter().collect();
        grouped.load_state(&map).unwrap();
        assert_eq!(grouped.step_count(), 2);
        let err = Grouped::new(vec![("prompt".into(), p)], &spec)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no trainable tensor \"pair\""), "{err}");
    }
}
