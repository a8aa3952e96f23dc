//! The residual-branch hook point on the committed tiny llama and BERT: where a branch change
//! sits (scaling the attention / MLP branch output equals scaling its output projection, done
//! through the linear hook point), what it reads, and that an unchanged branch changes nothing.

mod common;

use std::sync::Mutex;

use anyhow::Result;
use candle_core::{Device, Tensor};
use common::*;
use ferrule::model::{
    BranchInfo, BranchKind, Frozen, Inputs, Linear, LinearInfo, Model, ModelHook, ModelSource,
    ResidualBranch, Task,
};
use ferrule::ops::FrozenLinear;

/// `g(u, f) = s · f`.
struct Scale(f64);

impl ResidualBranch for Scale {
    fn forward(&self, _input: &Tensor, output: &Tensor) -> candle_core::Result<Tensor> {
        output * self.0
    }
}

/// Scales one kind of branch through the residual-branch point.
struct ScaleBranch(BranchKind, f64);

impl ModelHook for ScaleBranch {
    fn residual_branch(&self, info: &BranchInfo) -> Result<Option<Box<dyn ResidualBranch>>> {
        Ok((info.kind == self.0).then(|| Box::new(Scale(self.1)) as Box<dyn ResidualBranch>))
    }
}

/// Scales the weight and bias of the linear layers whose path ends with one of `suffixes`.
struct ScaleLinear(&'static [&'static str], f64);

impl ModelHook for ScaleLinear {
    fn linear(&self, info: &LinearInfo, base: FrozenLinear) -> Result<Box<dyn Linear>> {
        if !self.0.iter().any(|s| info.path.ends_with(s)) {
            return Ok(Box::new(base));
        }
        let w = (base.weight().to_dense(&Device::Cpu)? * self.1)?;
        let b = base.bias().map(|b| b * self.1).transpose()?;
        Ok(Box::new(FrozenLinear::new(w, b)?))
    }
}

fn model(name: &str, task: Task, hook: &dyn ModelHook) -> Model {
    let mut src = ModelSource::load(
        fixtures().join("models").join(name).to_str().unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    if task == Task::SeqCls {
        src.config["num_labels"] = serde_json::json!(2);
    }
    Model::build(&src, task, hook, &Device::Cpu, 0).unwrap()
}

fn outputs(name: &str, task: Task, hook: &dyn ModelHook) -> Tensor {
    let (file, bert) = if name == "bert" {
        ("inputs/bert.safetensors", true)
    } else {
        ("inputs/decoder.safetensors", false)
    };
    let t = load(file);
    let inputs = Inputs {
        input_ids: &t["input_ids"],
        attention_mask: t.get("attention_mask"),
        token_type_ids: if bert { t.get("token_type_ids") } else { None },
    };
    model(name, task, hook).forward(&inputs).unwrap()
}

#[test]
fn a_scaled_branch_equals_its_scaled_output_projection() {
    let cases: [(&str, Task, BranchKind, &[&str]); 4] = [
        (
            "llama",
            Task::CausalLm,
            BranchKind::Attention,
            &["self_attn.o_proj"],
        ),
        ("llama", Task::CausalLm, BranchKind::Mlp, &["mlp.down_proj"]),
        (
            "bert",
            Task::SeqCls,
            BranchKind::Attention,
            &["attention.output.dense"],
        ),
        // `encoder.layer.N.output.dense`, not `...attention.output.dense` (2 layers).
        (
            "bert",
            Task::SeqCls,
            BranchKind::Mlp,
            &["0.output.dense", "1.output.dense"],
        ),
    ];
    for (name, task, kind, suffixes) in cases {
        let by_branch = outputs(name, task, &ScaleBranch(kind, 0.5));
        let by_weight = outputs(name, task, &ScaleLinear(suffixes, 0.5));
        let plain = outputs(name, task, &Frozen);
        let d = max_diff_masked(&by_branch, &by_weight, None);
        assert!(d <= 1e-5, "{name} {kind:?}: {d}");
        assert!(
            max_diff_masked(&by_branch, &plain, None) > 1e-3,
            "{name} {kind:?}: the change did nothing"
        );
    }
    // An identity change leaves the model as it was, to the bit.
    let same = outputs("llama", Task::CausalLm, &ScaleBranch(BranchKind::Mlp, 1.0));
    assert_eq!(
        max_diff_masked(&same, &outputs("llama", Task::CausalLm, &Frozen), None),
        0.0
    );
}

/// Records what layer 0's attention branch read.
#[derive(Default)]
struct Record(Mutex<Option<Tensor>>);

struct Recorder(&'static Record);

impl ResidualBranch for Recorder {
    fn forward(&self, input: &Tensor, output: &Tensor) -> candle_core::Result<Tensor> {
        *self.0 .0.lock().unwrap() = Some(input.clone());
        Ok(output.clone())
    }
}

struct RecordLayer0(&'static Record);

impl ModelHook for RecordLayer0 {
    fn residual_branch(&self, info: &BranchInfo) -> Result<Option<Box<dyn ResidualBranch>>> {
        assert!(
            info.path.ends_with(if info.kind == BranchKind::Attention {
                "self_attn"
            } else {
                "mlp"
            }),
            "{}",
            info.path
        );
        Ok((info.layer == 0 && info.kind == BranchKind::Attention)
            .then(|| Box::new(Recorder(self.0)) as Box<dyn ResidualBranch>))
    }
}

#[test]
fn a_decoder_branch_reads_the_pre_normed_stream() {
    let record: &'static Record = Box::leak(Box::default());
    outputs("llama", Task::CausalLm, &RecordLayer0(record));
    let u = record
        .0
        .lock()
        .unwrap()
        .clone()
        .expect("layer 0's attention branch ran");
    // u = RMSNorm(embed[ids]) ⊙ input_layernorm.weight, by hand.
    let w = load("models/llama/model.safetensors");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("models/llama/config.json")).unwrap(),
    )
    .unwrap();
    let eps = cfg["rms_norm_eps"].as_f64().unwrap();
    let ids = load("inputs/decoder.safetensors")["input_ids"].clone();
    let (b, t) = ids.dims2().unwrap();
    let x = w["model.embed_tokens.weight"]
        .index_select(
            &ids.flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::U32)
                .unwrap(),
            0,
        )
        .unwrap();
    let x = x.reshape((b, t, ())).unwrap();
    let rms = (x.sqr().unwrap().mean_keepdim(2).unwrap() + eps)
        .unwrap()
        .sqrt()
        .unwrap();
    let want = x
        .broadcast_div(&rms)
        .unwrap()
        .broadcast_mul(&w["model.layers.0.input_layernorm.weight"])
        .unwrap();
    let d = max_diff_masked(&u, &want, None);
    assert!(d <= 1e-5, "{d}");
}
