//! What the method tests (one fixture made by each method's reference) share: the fixture
//! model, the fixture's adapter built on it, its logits, the loss with every trainable
//! tensor's gradient, and torch's gradient clipping.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use ferrule::model::{Arch, Inputs, Model, ModelSource, Task};
use ferrule::ops::recompute::GradSink;
use ferrule::peft_io::load_adapter;
use ferrule::tuners::Tuner;

/// The fixture model `tests/fixtures/models/<model>`; for sequence classification with
/// two labels, as the fixtures' heads have.
pub fn fixture_source(model: &str, task: Task) -> ModelSource {
    let dir = super::fixtures().join("models").join(model);
    let mut src = ModelSource::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    if task == Task::SeqCls {
        src.config["num_labels"] = serde_json::json!(2);
    }
    src
}

/// The adapter saved in `dir` (a fixture's tensors before its step), which must be of
/// `peft_type`, built on `src` for `task`.
pub fn saved_tuned(
    dir: &Path,
    peft_type: &str,
    src: &ModelSource,
    task: Task,
) -> (Model, Box<dyn Tuner>) {
    let dev = Device::Cpu;
    let saved = load_adapter(dir, &dev).unwrap();
    assert_eq!(saved.peft_type(), peft_type, "{}", dir.display());
    let tuner = saved.into_tuner(0, &dev).unwrap();
    let model = Model::build(src, task, tuner.as_ref(), &dev, 0).unwrap();
    tuner.finish().unwrap();
    (model, tuner)
}

/// The model's logits on a fixture batch (`input_ids`, `attention_mask`, optionally
/// `token_type_ids`).
pub fn logits(model: &Model, inp: &HashMap<String, Tensor>) -> Tensor {
    model
        .forward(&Inputs {
            input_ids: &inp["input_ids"],
            attention_mask: Some(&inp["attention_mask"]),
            token_type_ids: inp.get("token_type_ids"),
        })
        .unwrap()
}

/// The loss (causal LM for a decoder, cross-entropy of the classifier for BERT) and every
/// trainable tensor's gradient by key, with or without recomputation. A trainable tensor
/// without a gradient fails.
pub fn loss_grads(
    model: &Model,
    tuner: &dyn Tuner,
    inp: &HashMap<String, Tensor>,
    labels: &Tensor,
    recompute: bool,
) -> (f32, HashMap<String, Tensor>) {
    let sink = recompute.then(|| {
        Arc::new(GradSink::new(
            tuner.trainable().iter().map(|(_, v)| v.as_tensor().id()),
        ))
    });
    model.set_recompute(sink.clone());
    let loss = match &model.arch {
        Arch::Decoder(lm) => {
            let mask = Some(&inp["attention_mask"]);
            lm.causal_lm_loss(&inp["input_ids"], mask, None, labels)
                .unwrap()
                .0
        }
        Arch::Bert(_) => {
            ferrule::ops::loss::cross_entropy(&logits(model, inp), labels)
                .unwrap()
                .0
        }
    };
    let mut grads = loss.backward().unwrap();
    if let Some(s) = &sink {
        s.drain_into(&mut grads).unwrap();
    }
    model.set_recompute(None);
    let by_key = tuner
        .trainable()
        .into_iter()
        .map(|(k, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{k}: no gradient"));
            (k, g.clone())
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), by_key)
}

/// torch's `clip_grad_norm_(max_norm=1.0)`: every gradient times min(1, 1/(‖g‖ + 1e-6)).
pub fn clipped(grads: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let sq: f64 = grads
        .values()
        .map(|g| {
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .sum();
    let coef = (1.0 / (sq.sqrt() + 1e-6)).min(1.0);
    grads
        .iter()
        .map(|(k, g)| (k.clone(), (g * coef).unwrap()))
        .collect()
}
