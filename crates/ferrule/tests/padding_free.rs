//! Padding-free batches (records end to end in one row, `data::pack`) against padded ones
//! (`data::collate`): the loss and the gradient of every trained tensor agree within 1e-5, on
//! decoders (sliding window and GQA included) and BERT, on dense and NF4 bases, with and
//! without recomputation, for LoRA-family methods and for prompt and prefix tuning (virtual
//! tokens and prefixes before every record); no record attends to another; and a whole
//! training run gives the same adapter either way.

mod common;

use ferrule::model::LoadOptions;
use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use ferrule::data::{collate, pack, Encoded, Padding, PaddingSide, IGNORE_INDEX};
use ferrule::model::{Model, ModelSource, Task};
use ferrule::ops::recompute::GradSink;
use ferrule::quant::{QuantMethod, QuantSpec};
use ferrule::train::batch_loss;
use ferrule::train::{train, RunOptions, Silent, TrainConfig};
use ferrule::tuners::registry::{self, BuildContext};
use ferrule::tuners::{AdapterConfig, Tuner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL: f32 = 1e-5;

struct Built {
    model: Model,
    tuner: Box<dyn Tuner>,
}

/// The fixture `model` with `adapter` (its trainable tensors set to random values, so that
/// every one gets a gradient: LoRA's B starts at zero).
fn build(
    model: &str,
    task: Task,
    adapter: serde_json::Value,
    quantize: Option<&QuantSpec>,
) -> Built {
    let dev = Device::Cpu;
    let mut src = ModelSource::load_with(
        fixtures().join("models").join(model).to_str().unwrap(),
        &dev,
        LoadOptions::quantized(quantize),
    )
    .unwrap();
    if task == Task::SeqCls {
        src.config["num_labels"] = serde_json::json!(3);
    }
    let adapter = AdapterConfig::from_json(adapter)
        .unwrap()
        .resolved(src.model_type(), task)
        .unwrap();
    let tuner = registry::build(
        &adapter,
        BuildContext {
            seed: 1,
            device: &dev,
            weights: None,
            allow_unmatched: false,
            release_base: None,
        },
    )
    .unwrap();
    let model = Model::build(&src, task, tuner.as_ref(), &dev, 0).unwrap();
    tuner.finish().unwrap();
    for (_, v) in tuner.trainable() {
        v.set(&Tensor::randn(0f32, 0.05, v.shape(), &dev).unwrap())
            .unwrap();
    }
    Built { model, tuner }
}

/// Records of the given lengths with random tokens below `vocab`; language-modelling labels
/// on the second half of each record, or a class per record.
fn records(lens: &[usize], vocab: u32, classes: Option<usize>, seed: u64) -> Vec<Encoded> {
    let mut rng = StdRng::seed_from_u64(seed);
    lens.iter()
        .map(|&n| {
            let input_ids: Vec<u32> = (0..n).map(|_| rng.gen_range(1..vocab)).collect();
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    if classes.is_some() || i < n / 2 {
                        IGNORE_INDEX
                    } else {
                        t as i64
                    }
                })
                .collect();
            Encoded {
                input_ids,
                labels,
                class_label: classes.map(|c| rng.gen_range(0..c)),
            }
        })
        .collect()
}

/// Language-modelling records trained on every token, the first included: in a padded batch
/// only prompt tuning's last virtual token predicts it.
fn records_trained_whole(lens: &[usize], vocab: u32, seed: u64) -> Vec<Encoded> {
    let mut items = records(lens, vocab, None, seed);
    for e in &mut items {
        e.labels = e.input_ids.iter().map(|&t| t as i64).collect();
    }
    items
}

/// Loss, counted targets and the gradient of every trainable tensor for one batch.
fn loss_and_grads(
    b: &Built,
    batch: &ferrule::data::Batch,
    sink: Option<&Arc<GradSink>>,
) -> (f32, usize, BTreeMap<String, Tensor>) {
    let (loss, n, _) = batch_loss(&b.model, batch).unwrap();
    let mut grads = loss.backward().unwrap();
    if let Some(s) = sink {
        s.drain_into(&mut grads).unwrap();
    }
    let g = b
        .tuner
        .trainable()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                grads
                    .get(v.as_tensor())
                    .expect("a trainable tensor without a gradient")
                    .clone(),
            )
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), n, g)
}

/// `|a − b| ≤ TOL·(|b| + max|b|)`, element-wise, and finite.
fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: all zero");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            x.is_finite() && (x - y).abs() <= TOL * (y.abs() + scale),
            "{what}[{i}]: padding-free {x} vs padded {y}"
        );
    }
}

/// Padded and padding-free batches of the same records give the same loss and gradients;
/// returns the counted targets.
fn check_equal(what: &str, b: &Built, items: &[Encoded], recompute: bool) -> usize {
    let dev = Device::Cpu;
    let refs: Vec<&Encoded> = items.iter().collect();
    let sink = recompute.then(|| {
        Arc::new(GradSink::new(
            b.tuner.trainable().iter().map(|(_, v)| v.as_tensor().id()),
        ))
    });
    if let Some(s) = &sink {
        assert!(
            b.model.set_recompute(Some(s.clone())),
            "{what}: recompute not on"
        );
    }
    let padded = collate(&refs, 0, PaddingSide::Right, &dev).unwrap();
    let packed = pack(&refs, &dev).unwrap();
    assert_eq!(
        packed.input_ids.dims(),
        &[1, items.iter().map(|e| e.len()).sum::<usize>()]
    );
    assert!(
        padded.input_ids.elem_count() > packed.input_ids.elem_count(),
        "{what}: the records should need padding"
    );
    let (lp, np, gp) = loss_and_grads(b, &padded, sink.as_ref());
    let (lf, nf, gf) = loss_and_grads(b, &packed, sink.as_ref());
    assert_eq!(np, nf, "{what}: counted targets");
    assert!(
        (lp - lf).abs() <= TOL * lp.abs(),
        "{what}: loss padding-free {lf} vs padded {lp}"
    );
    assert_eq!(gp.len(), gf.len());
    for (k, g) in &gp {
        assert_close(&gf[k], g, &format!("{what}: grad of {k}"));
    }
    b.model.set_recompute(None);
    nf
}

fn lora(targets: &[&str]) -> serde_json::Value {
    serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets})
}

#[test]
fn decoder_losses_and_gradients_equal_the_padded_batch() {
    let lens = [9, 3, 17, 6];
    let all = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    // llama: GQA; mistral: a sliding window of 4, shorter than three of the records.
    for model in ["llama", "mistral", "qwen2"] {
        let b = build(model, Task::CausalLm, lora(&all), None);
        let items = records(&lens, 200, None, 7);
        check_equal(&format!("{model} LoRA"), &b, &items, false);
        check_equal(&format!("{model} LoRA, recompute"), &b, &items, true);
    }
    let nf4 = QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap();
    let b = build("llama", Task::CausalLm, lora(&all), Some(&nf4));
    check_equal("llama NF4 LoRA", &b, &records(&lens, 200, None, 8), false);
    check_equal(
        "llama NF4 LoRA, recompute",
        &b,
        &records(&lens, 200, None, 8),
        true,
    );
    // Methods on norms and embeddings go through the same layout.
    let b = build(
        "llama",
        Task::CausalLm,
        serde_json::json!({"peft_type": "LN_TUNING"}),
        None,
    );
    check_equal("llama LN tuning", &b, &records(&lens, 200, None, 9), false);
    let b = build(
        "llama",
        Task::CausalLm,
        lora(&["embed_tokens", "q_proj"]),
        None,
    );
    check_equal(
        "llama LoRA on embeddings",
        &b,
        &records(&lens, 200, None, 10),
        false,
    );
}

/// Prompt tuning (virtual tokens before each record) and prefix tuning (keys and values before
/// each record's, with and without the MLP) on padding-free batches.
fn prompt_methods() -> [(&'static str, serde_json::Value); 3] {
    [
        (
            "prompt tuning",
            serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}),
        ),
        (
            "prefix tuning",
            serde_json::json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3}),
        ),
        (
            "projected prefix tuning",
            serde_json::json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "prefix_projection": true, "encoder_hidden_size": 8}),
        ),
    ]
}

#[test]
fn prompt_and_prefix_tuning_losses_and_gradients_equal_the_padded_batch() {
    let lens = [9, 3, 17, 6];
    let tokens: usize = lens.iter().sum();
    // llama: GQA; mistral: a sliding window of 4, shorter than the prefix plus a record.
    for model in ["llama", "mistral"] {
        for (name, adapter) in prompt_methods() {
            let b = build(model, Task::CausalLm, adapter, None);
            let what = format!("{model} {name}");
            check_equal(&what, &b, &records(&lens, 200, None, 12), false);
            check_equal(
                &format!("{what}, recompute"),
                &b,
                &records(&lens, 200, None, 12),
                true,
            );
            // A record's first label: the last virtual token predicts it (prompt tuning); with
            // a prefix nothing does, as in the padded batch.
            let counted = check_equal(
                &format!("{what}, every label"),
                &b,
                &records_trained_whole(&lens, 200, 13),
                false,
            );
            let first_labels = if name == "prompt tuning" {
                0
            } else {
                lens.len()
            };
            assert_eq!(counted, tokens - first_labels, "{what}: counted targets");
        }
    }
    let nf4 = QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap();
    for (name, adapter) in prompt_methods() {
        let b = build("llama", Task::CausalLm, adapter, Some(&nf4));
        let items = records_trained_whole(&lens, 200, 14);
        check_equal(&format!("llama NF4 {name}, recompute"), &b, &items, true);
    }
}

#[test]
fn bert_classification_losses_and_gradients_equal_the_padded_batch() {
    let b = build(
        "bert",
        Task::SeqCls,
        lora(&["query", "value", "intermediate.dense"]),
        None,
    );
    let items = records(&[5, 12, 2, 8, 8], 90, Some(3), 11);
    check_equal("bert SEQ_CLS LoRA", &b, &items, false);
    let b = build(
        "bert",
        Task::SeqCls,
        serde_json::json!({"peft_type": "IA3", "target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}),
        None,
    );
    check_equal("bert SEQ_CLS IA3", &b, &items, false);
    // The pooler reads each record's first virtual token.
    let b = build(
        "bert",
        Task::SeqCls,
        serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}),
        None,
    );
    check_equal("bert SEQ_CLS prompt tuning", &b, &items, false);
}

/// Outputs of the records of `items` when packed, one tensor per record (decoder: logits of
/// its tokens; BERT: its classification logits).
fn packed_outputs(m: &Model, items: &[&Encoded]) -> Vec<Tensor> {
    let batch = pack(items, &Device::Cpu).unwrap();
    let lens = batch.seq_lens.clone().unwrap();
    let out = m.forward_packed(&batch.input_ids, &lens).unwrap();
    let mut start = 0;
    lens.iter()
        .enumerate()
        .map(|(i, &l)| {
            let o = if m.task == Task::CausalLm {
                out.squeeze(0).unwrap().narrow(0, start, l).unwrap()
            } else {
                out.get(i).unwrap()
            };
            start += l;
            o
        })
        .collect()
}

#[test]
fn no_record_attends_to_another_in_a_padding_free_batch() {
    // A record's outputs are the same alone and packed after (decoder) or between (BERT) other
    // records, and changing the other records' tokens does not move them: a causal mask that
    // reached back into the previous record, or a bidirectional one across records, fails.
    for (model, task, vocab, targets) in [
        ("llama", Task::CausalLm, 200u32, ["q_proj", "v_proj"]),
        ("mistral", Task::CausalLm, 200, ["q_proj", "v_proj"]),
        ("bert", Task::SeqCls, 90, ["query", "value"]),
    ] {
        let b = build(model, task, lora(&targets), None);
        let classes = (task == Task::SeqCls).then_some(3);
        let [target, before, after, other, same_len]: [Encoded; 5] =
            records(&[7, 11, 5, 11, 7], vocab, classes, 21)
                .try_into()
                .ok()
                .unwrap();
        let alone = &packed_outputs(&b.model, &[&target])[0];
        let with_others = &packed_outputs(&b.model, &[&before, &target, &after])[1];
        let others_changed = &packed_outputs(&b.model, &[&other, &target, &after])[1];
        for (got, what) in [
            (with_others, "packed with others"),
            (others_changed, "others' tokens changed"),
        ] {
            let d = max_diff(got, alone);
            assert!(
                d <= 1e-5,
                "{model}: record's output {what} moved by {d} from the record alone"
            );
        }
        assert!(
            max_diff(&packed_outputs(&b.model, &[&same_len])[0], alone) > 1e-3,
            "{model}: different records should differ"
        );
    }
}

#[test]
fn a_training_run_is_the_same_padded_or_padding_free() {
    // 10 steps of batch 4 x accumulation 2 on chat records of unequal lengths, for LoRA and
    // for the methods that add positions: the logged losses agree within 1e-5 and the adapters
    // within 1e-4 (float rounding differs, and AdamW's first steps divide by tiny second
    // moments).
    let methods = [
        ("LoRA", lora(&["q_proj", "v_proj", "down_proj"])),
        ("prompt tuning", prompt_methods()[0].1.clone()),
        ("projected prefix tuning", prompt_methods()[2].1.clone()),
    ];
    for (name, adapter) in methods {
        let (free, lf, af) = training_run(&adapter, Padding::Free);
        let (padded, lp, ap) = training_run(&adapter, Padding::Longest);
        assert!(free.padding.starts_with("padding-free"), "{}", free.padding);
        assert!(padded.padding.starts_with("padded"), "{}", padded.padding);
        assert_eq!(
            free.tokens_per_sec.is_some(),
            padded.tokens_per_sec.is_some()
        );
        assert_eq!(lf.len(), 10);
        for (i, (a, b)) in lf.iter().zip(&lp).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{name} step {}: loss {a} padding-free vs {b} padded",
                i + 1
            );
        }
        assert_eq!(af.len(), ap.len());
        for (k, t) in &ap {
            let d = max_diff(
                &af[k].to_dtype(DType::F32).unwrap(),
                &t.to_dtype(DType::F32).unwrap(),
            );
            assert!(d <= 1e-4, "{name} {k}: adapters differ by {d}");
        }
    }
}

/// A 10-step run of `adapter` with batches laid out as `padding` says: its summary, logged
/// losses and saved adapter.
fn training_run(
    adapter: &serde_json::Value,
    padding: Padding,
) -> (
    ferrule::train::TrainSummary,
    Vec<f64>,
    std::collections::HashMap<String, Tensor>,
) {
    let dev = Device::Cpu;
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        model: fixtures().join("models/llama").display().to_string(),
        data: fixtures().join("data/chat.jsonl"),
        output_dir: out.path().to_path_buf(),
        adapter: Some(AdapterConfig::from_json(adapter.clone()).unwrap()),
        padding: Some(padding),
        max_len: Some(64),
        batch_size: Some(4),
        grad_accum: 2,
        max_steps: Some(10),
        lr: 1e-2,
        seed: 3,
        ..Default::default()
    };
    let s = train(&cfg, &dev, &mut Silent, &RunOptions::default()).unwrap();
    let metrics = ferrule::train::metrics::read_metrics(&out.path().join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .iter()
        .filter_map(|m| m.get("loss").and_then(|v| v.as_f64()))
        .collect();
    let adapter =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &dev).unwrap();
    (s, losses, adapter)
}
