//! The bottleneck adapter on a linear layer, as LLM-Adapters' peft fork computes it
//! (AGI-Edgerunners/LLM-Adapters `peft/src/peft/tuners/bottleneck.py`, `Linear.forward`;
//! Houlsby et al. 2019 for the adapter, He et al. 2022 for the parallel placement):
//!
//! `h(z) = s · U act(D drop(z))`, `D: [bn, d_in]` (`adapter_down`), `U: [d_out, bn]`
//! (`adapter_up`), no biases, computed in f32, and on the frozen linear `L`:
//!
//! - `mh_adapter`: `y = L(z + h(z))` with `z = x` (`D: [bn, in]`, `U: [in, bn]`);
//! - `output_adapter`: `y = L(x) + h(L(x))` (`D: [bn, out]`, `U: [out, bn]`);
//! - `parallel_adapter`: `y = L(x) + h(x)` (`D: [bn, in]`, `U: [out, bn]`).
//!
//! `s` is a constant or a trained scalar `adapter_scaling: [1]`.
//!
//! On a residual branch (ferrule's `placement = "residual_branch"`) that reads `u` and outputs
//! `f`, the layer adds `g(u, f)` instead of `f`: series `g = f + h(f)` (Houlsby et al. 2019,
//! §2.1; Pfeiffer et al. 2021 on the MLP branch only), parallel `g = f + h(u)` (He et al. 2022,
//! §3), `D: [bn, hidden]`, `U: [hidden, bn]`.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor, Var};

use super::config::Activation;
use crate::model::{Linear, ResidualBranch};
use crate::ops::FrozenLinear;
use crate::tuners::training_clock::{dropout_mask, TrainingClock};

/// Where the adapter sits on the linear layer (bottleneck.py's `adapter_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterType {
    /// `y = L(x + h(x))`.
    Mh,
    /// `y = L(x) + h(L(x))`.
    Output,
    /// `y = L(x) + h(x)`.
    Parallel,
}

impl AdapterType {
    /// bottleneck.py's name for it.
    pub fn name(self) -> &'static str {
        match self {
            AdapterType::Mh => "mh_adapter",
            AdapterType::Output => "output_adapter",
            AdapterType::Parallel => "parallel_adapter",
        }
    }

    /// `(d_in, d_out)` of the adapter on a linear of `in_features` → `out_features`
    /// (bottleneck.py `_find_and_replace`: mh `(in, in)`, output `(out, out)`, parallel
    /// `(in, out)`).
    pub fn dims(self, in_features: usize, out_features: usize) -> (usize, usize) {
        match self {
            AdapterType::Mh => (in_features, in_features),
            AdapterType::Output => (out_features, out_features),
            AdapterType::Parallel => (in_features, out_features),
        }
    }
}

/// The adapter's output scale: a constant or the trained `adapter_scaling: [1]`.
#[derive(Clone)]
pub enum Scale {
    Constant(f64),
    Learned(Var),
}

/// The adapter `h` alone: `z: [.., d_in]` → `[.., d_out]`.
pub struct Bottleneck {
    /// Its module path: seeds its dropout masks.
    pub path: String,
    /// `D: [bn, d_in]`.
    pub down: Var,
    /// `U: [d_out, bn]`.
    pub up: Var,
    pub scale: Scale,
    pub activation: Activation,
    pub dropout: f64,
    pub clock: Arc<TrainingClock>,
}

impl Bottleneck {
    /// `h(z) = s · U act(D drop(z))`, `z` f32 (the frozen linear's output is f32 whatever its
    /// compute dtype, so the adapter always computes in f32, as bottleneck.py casts to). The
    /// layer's [`LayerGate`](crate::tuners::training_clock::LayerGate) (IST) multiplies `s`, as
    /// ist.py sets `adapter_scaling`, and when frozen detaches `D`, `U` and a learned `s`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let z = match self.clock.training() {
            true => match dropout_mask(z, self.dropout, self.clock.dropout_seed(&self.path))? {
                Some(mask) => z.mul(&mask)?,
                None => z.clone(),
            },
            false => z.clone(),
        };
        let gate = self.clock.gate(&self.path);
        let track = |v: &Var| self.clock.tracked(gate, v);
        let down = candle_nn::Linear::new(track(&self.down), None);
        let up = candle_nn::Linear::new(track(&self.up), None);
        let h = up.forward(&activate(&down.forward(&z)?, self.activation)?)?;
        match &self.scale {
            Scale::Constant(s) => h * (*s * gate.scale),
            Scale::Learned(s) => h.broadcast_mul(&(track(s) * gate.scale)?),
        }
    }
}

/// `act(x)` with a backward: candle's `tanh`, `relu`, `silu`, `gelu` (tanh form) and
/// ferrule's fused erf GELU (`ops::gelu`).
pub fn activate(x: &Tensor, activation: Activation) -> Result<Tensor> {
    match activation {
        Activation::Tanh => x.tanh(),
        Activation::Relu => x.relu(),
        Activation::Silu => x.silu(),
        Activation::Gelu => crate::ops::gelu::gelu(x),
        Activation::GeluTanh => x.gelu(),
    }
}

/// A frozen linear with a bottleneck adapter placed as `kind` says.
pub struct BottleneckLinear {
    pub base: FrozenLinear,
    /// The layer's own bias `b: [out]` when it trains (`bias = "all" | "adapter_only"`);
    /// `base` then has none. Part of `L`, so an output adapter sees it.
    pub bias: Option<Var>,
    pub adapter: Bottleneck,
    pub kind: AdapterType,
}

impl BottleneckLinear {
    /// `L(z)`: the frozen op, plus the trained bias.
    fn frozen(&self, z: &Tensor) -> Result<Tensor> {
        let y = Module::forward(&self.base, z)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b.as_tensor()),
            None => Ok(y),
        }
    }
}

impl Linear for BottleneckLinear {
    /// `x: [.., in]` → `[.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            AdapterType::Mh => self.frozen(&(x + self.adapter.forward(x)?)?),
            AdapterType::Output => {
                let y = self.frozen(x)?;
                &y + self.adapter.forward(&y)?
            }
            AdapterType::Parallel => self.frozen(x)? + self.adapter.forward(x)?,
        }
    }
}

/// A bottleneck adapter on a residual branch: series (`f + h(f)`) or parallel (`f + h(u)`).
pub struct BranchAdapter {
    pub adapter: Bottleneck,
    pub parallel: bool,
}

impl ResidualBranch for BranchAdapter {
    /// `input` u and `output` f: `[b, t, hidden]`.
    fn forward(&self, input: &Tensor, output: &Tensor) -> Result<Tensor> {
        let z = if self.parallel { input } else { output };
        output + self.adapter.forward(z)?
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    fn layer(kind: AdapterType, activation: Activation, scale: Scale) -> BottleneckLinear {
        let dev = Device::Cpu;
        // L: 2 → 1, W = [1, 2], b = 0.5. Adapter with bn = 1.
        let w = Tensor::new(&[[1f32, 2.]], &dev).unwrap();
        let base = FrozenLinear::new(w, Some(Tensor::new(&[0.5f32], &dev).unwrap())).unwrap();
        let (d_in, d_out) = kind.dims(2, 1);
        let down: Vec<f32> = [1., -1.][..d_in].to_vec();
        let up: Vec<f32> = [2., 3.][..d_out].to_vec();
        BottleneckLinear {
            base,
            bias: None,
            adapter: Bottleneck {
                path: "p".into(),
                down: Var::from_vec(down, (1, d_in), &dev).unwrap(),
                up: Var::from_vec(up, (d_out, 1), &dev).unwrap(),
                scale,
                activation,
                dropout: 0.0,
                clock: Arc::new(TrainingClock::new(0)),
            },
            kind,
        }
    }

    /// x = [3, 1]. mh: D x = 2, relu 2, U·2 = [4, 6], ·s (0.5) = [2, 3], x + h = [5, 4],
    /// L = 5 + 8 + 0.5 = 13.5. output: L(x) = 5.5, D = [1]: 5.5, relu, U = [2]: 11, ·0.5 = 5.5,
    /// y = 11. parallel: L(x) = 5.5, h(x) = 0.5·2·relu(2) = 2, y = 7.5.
    #[test]
    fn the_three_placements_by_hand() {
        let x = Tensor::new(&[[3f32, 1.]], &Device::Cpu).unwrap();
        for (kind, want) in [
            (AdapterType::Mh, 13.5),
            (AdapterType::Output, 11.0),
            (AdapterType::Parallel, 7.5),
        ] {
            let l = layer(kind, Activation::Relu, Scale::Constant(0.5));
            let y = l.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(y, vec![vec![want]], "{kind:?}");
        }
    }

    /// A trained bias is part of `L`: the output adapter sees it. Output, base bias split off
    /// (W = [1, 2]) and trained b = 0.5: L(x) = 5.5 as before, so y = 11; with b = 1.5, L(x) =
    /// 6.5, h = 0.5·2·relu(6.5) = 6.5, y = 13.
    #[test]
    fn a_trained_bias_sits_inside_the_output_adapter() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3f32, 1.]], &dev).unwrap();
        for (b, want) in [(0.5f32, 11.0f32), (1.5, 13.0)] {
            let mut l = layer(AdapterType::Output, Activation::Relu, Scale::Constant(0.5));
            l.base = FrozenLinear::from_weight(l.base.weight().clone(), None);
            l.bias = Some(Var::new(&[b], &dev).unwrap());
            let y = l.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(y, vec![vec![want]], "b = {b}");
        }
    }

    /// Parallel with tanh and a learned s = 1: y = 5.5 + 2·tanh(2); for L = y:
    /// ∂L/∂s = 2·tanh(2), ∂L/∂U = tanh(2), ∂L/∂D = 2·(1 − tanh²(2))·x.
    #[test]
    fn a_learned_scale_and_tanh_get_their_gradients() {
        let dev = Device::Cpu;
        let s = Var::new(&[1f32], &dev).unwrap();
        let l = layer(
            AdapterType::Parallel,
            Activation::Tanh,
            Scale::Learned(s.clone()),
        );
        let x = Tensor::new(&[[3f32, 1.]], &dev).unwrap();
        let y = l.forward(&x).unwrap();
        let t = 2f32.tanh();
        let got = y.to_vec2::<f32>().unwrap()[0][0];
        assert!((got - (5.5 + 2. * t)).abs() < 1e-6, "{got}");
        let g = y.sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| {
            g.get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert!((grad(&s)[0] - 2. * t).abs() < 1e-6);
        assert!((grad(&l.adapter.up)[0] - t).abs() < 1e-6);
        let dd = grad(&l.adapter.down);
        let slope = 2. * (1. - t * t);
        assert!((dd[0] - 3. * slope).abs() < 1e-6 && (dd[1] - slope).abs() < 1e-6);
    }
}
