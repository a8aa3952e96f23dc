//! GaLore against galore-torch 1.0 (tests/fixtures/galore/make_galore_fixtures.py): for each
//! proj_type, five steps of `GaLoreAdamW` on a tall and a wide target weight and a non-target
//! bias, crossing two basis refreshes (update_proj_gap 2). After every step the parameters,
//! both moments and the projector's basis must equal galore-torch's. Also: resuming from a
//! saved state continues bit-identically (Natural GaLore included), and layer-wise steps equal
//! the whole-model step.

mod common;

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor, Var};
use ferrule::train::galore::{
    GaLoreAdamW, GaLoreConfig, LegacyAdamWConfig, NaturalConfig, ProjType, TargetModules,
};

const PARAMS: [&str; 3] = ["tall.weight", "wide.weight", "bias"];

fn config_from(fix: &HashMap<String, Tensor>, proj_type: ProjType) -> (GaLoreConfig, usize) {
    let c = common::values_f64(&fix["config"]);
    let cfg = GaLoreConfig {
        adam: LegacyAdamWConfig {
            lr: c[3],
            beta1: c[5],
            beta2: c[6],
            eps: c[7],
            weight_decay: c[4],
            correct_bias: true,
        },
        rank: c[0] as usize,
        update_proj_gap: c[1] as u64,
        scale: c[2],
        proj_type,
        target_modules: TargetModules::List(vec!["tall".into(), "wide".into()]),
        natural: None,
    };
    (cfg, c[8] as usize)
}

fn vars_from(fix: &HashMap<String, Tensor>) -> Vec<(String, Var)> {
    PARAMS
        .iter()
        .map(|n| {
            let v = Var::from_tensor(&fix[&format!("{n}.init")].copy().unwrap()).unwrap();
            (n.to_string(), v)
        })
        .collect()
}

fn grads_at(fix: &HashMap<String, Tensor>, k: usize) -> HashMap<String, Tensor> {
    PARAMS
        .iter()
        .map(|n| (n.to_string(), fix[&format!("{n}.grad.{k}")].clone()))
        .collect()
}

/// The tolerance for the one-sided projections: both sides run in f32, ferrule's SVD in f64
/// (LAPACK's in f32), which moves the bases by ~1e-6 relative, and Adam's `m / (sqrt(v) + eps)`
/// passes that on. Measured worst case: 4.5e-6 (printed by the test).
const TOL: f64 = 1e-5;
/// For `full` (and Natural GaLore, which the reference runs on the same two-sided projection):
/// there the low-rank gradient `Qᵀ G Pᵀ` is `diag(s_1..s_r)` in exact arithmetic, so its
/// off-diagonal entries are rounding noise (~1e-7 of the largest), different in each
/// implementation, and Adam's first step maps a noise entry `x` to `0.1·x / (0.03·|x| + eps)`
/// with `eps = 1e-6`: a direction of order 0.1 that the noise alone decides. Measured worst
/// case: 1.1e-5 (galore-torch) and 1.6e-5 (Natural GaLore's reference).
const TOL_FULL: f64 = 5e-5;

fn tol_for(p: ProjType) -> f64 {
    if p == ProjType::Full {
        TOL_FULL
    } else {
        TOL
    }
}

#[test]
fn galore_adamw_matches_galore_torch_for_every_proj_type() {
    for (name, proj_type) in [
        ("std", ProjType::Std),
        ("reverse_std", ProjType::ReverseStd),
        ("right", ProjType::Right),
        ("left", ProjType::Left),
        ("full", ProjType::Full),
    ] {
        let mut worst = 0f64;
        let fix = common::load(&format!("galore/galore_{name}.safetensors"));
        let (cfg, steps) = config_from(&fix, proj_type);
        let vars = vars_from(&fix);
        let mut opt = GaLoreAdamW::new(vars.clone(), cfg).unwrap();
        assert_eq!(
            opt.targets().collect::<Vec<_>>(),
            vec!["tall.weight", "wide.weight"]
        );
        for k in 1..=steps {
            opt.step_with(&grads_at(&fix, k)).unwrap();
            let state: BTreeMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
            let mut checked = 0;
            for (p, var) in &vars {
                let mut check = |what: &str, got: &Tensor| {
                    let want = &fix[&format!("{p}.{what}.{k}")];
                    let e = common::rel_err(got, want);
                    assert!(
                        e <= tol_for(proj_type),
                        "{name} step {k}: {p} {what} differs by {e:e} (relative)"
                    );
                    worst = worst.max(e);
                    checked += 1;
                };
                check("param", var.as_tensor());
                check("exp_avg", &state[&format!("{p}.exp_avg")]);
                check("exp_avg_sq", &state[&format!("{p}.exp_avg_sq")]);
                for basis in ["proj_left", "proj_right"] {
                    let key = format!("{p}.{basis}.{k}");
                    match state.get(&format!("{p}.{basis}")) {
                        Some(got) => check(basis, got),
                        None => assert!(!fix.contains_key(&key), "{name}: ferrule lacks {key}"),
                    }
                }
            }
            let bases = if proj_type == ProjType::Full { 4 } else { 2 };
            assert_eq!(checked, 3 * 3 + bases, "{name} step {k}");
        }
        eprintln!("{name}: worst relative difference from galore-torch {worst:e}");
    }
}

fn natural_cfg() -> GaLoreConfig {
    GaLoreConfig {
        adam: LegacyAdamWConfig {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        },
        rank: 3,
        update_proj_gap: 2,
        scale: 0.25,
        proj_type: ProjType::Std,
        target_modules: TargetModules::List(vec!["tall".into(), "wide".into()]),
        natural: Some(NaturalConfig {
            history: 2,
            damping: 1e-3,
        }),
    }
}

/// Saving after a step and resuming (through safetensors bytes) gives the same parameters,
/// bit for bit, as running all five steps without interruption: the bases, moments and the
/// Natural GaLore history (full at s = 2) are all restored.
#[test]
fn resume_is_bit_identical_with_natural_galore() {
    let fix = common::load("galore/galore_std.safetensors");
    let run = |split: Option<usize>| -> Vec<Vec<f64>> {
        let vars = vars_from(&fix);
        let mut opt = GaLoreAdamW::new(vars.clone(), natural_cfg()).unwrap();
        for k in 1..=5 {
            if split == Some(k) {
                let bytes =
                    ferrule::util::atomic::serialize_safetensors(&opt.state().unwrap(), None)
                        .unwrap();
                let (loaded, _) =
                    ferrule::util::atomic::deserialize_safetensors(&bytes, &Device::Cpu).unwrap();
                let resumed_vars: Vec<(String, Var)> = vars
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.clone(),
                            Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
                        )
                    })
                    .collect();
                opt = GaLoreAdamW::new(resumed_vars, natural_cfg()).unwrap();
                opt.load_state(&loaded).unwrap();
            }
            opt.step_with(&grads_at(&fix, k)).unwrap();
        }
        opt.params()
            .map(|(_, v)| common::values_f64(v.as_tensor()))
            .collect()
    };
    let straight = run(None);
    // Resumed before steps 2 and 4 the restored bases are used (no refresh: the step counts
    // 1 and 3 are odd); before step 3 the basis is recomputed but the moments and history
    // carry over.
    for split in [2, 3, 4] {
        assert_eq!(straight, run(Some(split)), "resumed before step {split}");
    }
    // Natural GaLore changes the trajectory (the test would pass trivially otherwise).
    let vars = vars_from(&fix);
    let mut plain = GaLoreAdamW::new(
        vars.clone(),
        GaLoreConfig {
            natural: None,
            ..natural_cfg()
        },
    )
    .unwrap();
    for k in 1..=5 {
        plain.step_with(&grads_at(&fix, k)).unwrap();
    }
    assert_ne!(common::values_f64(vars[0].1.as_tensor()), straight[0]);
}

/// Stepping each parameter on its own (the layer-wise form) equals the whole step.
#[test]
fn layerwise_steps_equal_the_whole_step() {
    let fix = common::load("galore/galore_right.safetensors");
    let (cfg, steps) = config_from(&fix, ProjType::Right);
    let (a, b) = (vars_from(&fix), vars_from(&fix));
    let mut whole = GaLoreAdamW::new(a.clone(), cfg.clone()).unwrap();
    let mut layerwise = GaLoreAdamW::new(b.clone(), cfg).unwrap();
    for k in 1..=steps {
        let grads = grads_at(&fix, k);
        whole.step_with(&grads).unwrap();
        // Reverse order, as backward produces gradients.
        for p in PARAMS.iter().rev() {
            layerwise.step_param(p, &grads[*p]).unwrap();
        }
        layerwise.finish_layerwise_step();
    }
    for ((_, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(
            common::values_f64(x.as_tensor()),
            common::values_f64(y.as_tensor())
        );
    }
    let (sa, sb) = (whole.state().unwrap(), layerwise.state().unwrap());
    for ((ka, ta), (kb, tb)) in sa.iter().zip(&sb) {
        assert_eq!(ka, kb);
        assert_eq!(common::values_f64(ta), common::values_f64(tb), "{ka}");
    }
}

/// Bad settings and states are errors that name what is wrong.
#[test]
fn bad_inputs_are_named_errors() {
    let fix = common::load("galore/galore_std.safetensors");
    let (cfg, _) = config_from(&fix, ProjType::Std);
    let err = GaLoreAdamW::new(
        vars_from(&fix),
        GaLoreConfig {
            rank: 6,
            ..cfg.clone()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("wide.weight") && err.contains("at most 5"),
        "{err}"
    );
    let err = GaLoreAdamW::new(
        vars_from(&fix),
        GaLoreConfig {
            target_modules: TargetModules::One("q_proj".into()),
            ..cfg.clone()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("no GaLore target"), "{err}");

    // A state saved with rank 3 does not load into a rank-2 optimizer.
    let mut opt = GaLoreAdamW::new(vars_from(&fix), cfg.clone()).unwrap();
    opt.step_with(&grads_at(&fix, 1)).unwrap();
    let state: BTreeMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
    let mut other = GaLoreAdamW::new(vars_from(&fix), GaLoreConfig { rank: 2, ..cfg }).unwrap();
    let err = other.load_state(&state).unwrap_err().to_string();
    assert!(
        err.contains("tall.weight") && err.contains("another run"),
        "{err}"
    );
}

/// Natural GaLore against its reference code (tests/fixtures/galore/
/// make_natural_galore_fixtures.py): the reference's Tucker projection of a matrix is
/// ferrule's `full` projection, and with one basis (no refresh in 5 steps) the parameters and
/// Adam's second moment do not depend on the bases' signs, so they are compared after every
/// step. The reference solves the Woodbury system in f32, ferrule in f64.
#[test]
fn natural_galore_matches_the_reference() {
    let fix = common::load("galore/natural_galore.safetensors");
    let c = common::values_f64(&fix["config"]);
    let cfg = GaLoreConfig {
        adam: LegacyAdamWConfig {
            lr: c[3],
            weight_decay: c[4],
            ..Default::default()
        },
        rank: c[0] as usize,
        update_proj_gap: c[1] as u64,
        scale: c[2],
        proj_type: ProjType::Full,
        target_modules: TargetModules::List(vec!["tall".into(), "wide".into()]),
        natural: Some(NaturalConfig {
            history: c[5] as usize,
            damping: c[6],
        }),
    };
    assert_eq!(
        cfg.natural,
        Some(NaturalConfig::default()),
        "the reference's defaults"
    );
    let vars = vars_from(&fix);
    let mut opt = GaLoreAdamW::new(vars.clone(), cfg.clone()).unwrap();
    let mut plain = GaLoreAdamW::new(
        vars_from(&fix),
        GaLoreConfig {
            natural: None,
            ..cfg
        },
    )
    .unwrap();
    let mut worst = 0f64;
    for k in 1..=c[7] as usize {
        opt.step_with(&grads_at(&fix, k)).unwrap();
        plain.step_with(&grads_at(&fix, k)).unwrap();
        let state: BTreeMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
        for (p, var) in &vars {
            for (what, got) in [
                ("param", var.as_tensor()),
                ("exp_avg_sq", &state[&format!("{p}.exp_avg_sq")]),
            ] {
                let e = common::rel_err(got, &fix[&format!("{p}.{what}.{k}")]);
                assert!(
                    e <= TOL_FULL,
                    "step {k}: {p} {what} differs by {e:e} (relative)"
                );
                worst = worst.max(e);
            }
        }
    }
    eprintln!("worst relative difference from Natural GaLore's reference: {worst:e}");
    // Plain GaLore on the same gradients ends elsewhere: the fixture checks the transform.
    let plain_tall = plain.params().next().unwrap().1.as_tensor().clone();
    let e = common::rel_err(&plain_tall, &fix["tall.weight.param.5"]);
    assert!(e > 100.0 * TOL, "plain GaLore is only {e:e} away");
}

/// Layer-wise through recomputation: two recomputed blocks `h = x W1ᵀ`, `y = tanh(h) W2ᵀ`, with
/// `GradSink::with_hook` stepping each weight inside its block's backward, give the same
/// parameters, bit for bit, as collecting all gradients and stepping after backward.
#[test]
fn layerwise_through_recompute_equals_the_whole_step() {
    use ferrule::ops::recompute::{checkpoint, Block, GradSink};
    use std::sync::{Arc, Mutex};

    let dev = Device::Cpu;
    let init = |seed: u64, shape: (usize, usize)| {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
    };
    let x = Tensor::from_vec(
        (0..12).map(|i| (i as f32 - 5.5) / 4.0).collect(),
        (2, 6),
        &dev,
    )
    .unwrap();
    let cfg = GaLoreConfig {
        rank: 2,
        update_proj_gap: 2,
        target_modules: TargetModules::One("all-linear".into()),
        natural: Some(NaturalConfig::default()),
        ..Default::default()
    };
    let blocks = |w1: &Var, w2: &Var| -> (Block, Block) {
        let (w1, w2) = (w1.as_tensor().clone(), w2.as_tensor().clone());
        (
            Arc::new(move |h: &Tensor| h.matmul(&w1.t()?)),
            Arc::new(move |h: &Tensor| h.tanh()?.matmul(&w2.t()?)),
        )
    };
    let run = |layerwise: bool| -> Vec<Vec<f64>> {
        let (w1, w2) = (init(1, (5, 6)), init(2, (4, 5)));
        let vars = vec![
            ("l1.weight".to_string(), w1.clone()),
            ("l2.weight".to_string(), w2.clone()),
        ];
        let names: HashMap<_, _> = vars
            .iter()
            .map(|(n, v)| (v.as_tensor().id(), n.clone()))
            .collect();
        let ids: Vec<_> = names.keys().copied().collect();
        let opt = Arc::new(Mutex::new(
            GaLoreAdamW::new(vars.clone(), cfg.clone()).unwrap(),
        ));
        let hooked = opt.clone();
        let sink = Arc::new(if layerwise {
            GradSink::with_hook(
                ids,
                Box::new(move |id, g| {
                    hooked
                        .lock()
                        .unwrap()
                        .step_param(&names[&id], g)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))
                }),
            )
        } else {
            GradSink::new(ids)
        });
        for _ in 0..3 {
            let (b1, b2) = blocks(&w1, &w2);
            let h = checkpoint(&x, b1, &sink).unwrap();
            let y = checkpoint(&h, b2, &sink).unwrap();
            let mut store = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            sink.drain_into(&mut store).unwrap();
            let mut opt = opt.lock().unwrap();
            if layerwise {
                opt.finish_layerwise_step();
            } else {
                opt.step(&store).unwrap();
            }
        }
        vars.iter()
            .map(|(_, v)| common::values_f64(v.as_tensor()))
            .collect()
    };
    let (whole, layerwise) = (run(false), run(true));
    assert_eq!(whole, layerwise);
    let (w1, w2) = (init(1, (5, 6)), init(2, (4, 5)));
    assert_ne!(
        whole[0],
        common::values_f64(w1.as_tensor()),
        "the weights moved"
    );
    assert_ne!(whole[1], common::values_f64(w2.as_tensor()));
}
