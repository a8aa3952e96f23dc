//! The `ferrule` binary as a user runs it: the happy path through every subcommand, and the
//! bad inputs users produce, each answered with a clear error and nothing half-written.

mod common;

use common::{fails_with, ferrule};

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}
fn fx(rel: &str) -> String {
    root()
        .join("tests/fixtures")
        .join(rel)
        .display()
        .to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn train_merge_generate_eval_inspect_logits() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run");
    let run_s = run.display().to_string();
    let (ok, out, err) = ferrule(&[
        "train",
        "--model",
        &fx("models/llama"),
        "--data",
        &fx("data/chat.jsonl"),
        "--eval-data",
        &fx("data/chat.jsonl"),
        "--output",
        &run_s,
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--target-modules",
        "all-linear",
        "-q",
        "--json",
    ]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["steps"], 3);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("adapter_config.json")).unwrap())
            .unwrap();
    // PEFT expands all-linear into the module list on save.
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 14);

    let merged = t.path().join("merged").display().to_string();
    let (ok, _, err) = ferrule(&[
        "merge",
        "--model",
        &fx("models/llama"),
        "--adapter",
        &run_s,
        "--output",
        &merged,
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = ferrule(&[
        "generate",
        "--model",
        &fx("models/llama"),
        "--adapter",
        &run_s,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "5",
        // Merged and unmerged agree to f32 rounding; bf16 rounds the merged weight instead.
        "--compute-dtype",
        "f32",
    ]);
    assert!(ok, "{err}");
    let (ok2, out2, _) = ferrule(&[
        "generate",
        "--model",
        &merged,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "5",
        "--compute-dtype",
        "f32",
    ]);
    assert!(ok2);
    assert_eq!(
        out, out2,
        "merged model generates differently from base + adapter"
    );

    let (ok, out, err) = ferrule(&[
        "eval",
        "--model",
        &fx("models/llama"),
        "--adapter",
        &run_s,
        "--data",
        &fx("data/chat.jsonl"),
        // Checked against f32 logits to 1e-5.
        "--compute-dtype",
        "f32",
    ]);
    assert!(ok, "{err}");
    let ev: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // Against the mean token loss computed here from the logits of each record on its own.
    let (by_hand, records) =
        mean_token_loss_by_hand(&fx("models/llama"), &run, Path::new(&fx("data/chat.jsonl")));
    let eval_loss = ev["eval_loss"].as_f64().unwrap();
    assert!(
        (eval_loss - by_hand).abs() <= 1e-5 * by_hand,
        "eval_loss {eval_loss} vs {by_hand} from the logits"
    );
    let ppl = ev["eval_perplexity"].as_f64().unwrap();
    assert!(
        (ppl - by_hand.exp()).abs() <= 1e-5 * by_hand.exp(),
        "eval_perplexity {ppl} vs exp({by_hand})"
    );
    assert_eq!(ev["eval_records"], records);
    assert!(ev["eval_accuracy"].is_null(), "{ev}");

    let (ok, out, err) = ferrule(&[
        "inspect",
        "--model",
        &fx("models/llama"),
        "--adapter",
        &run_s,
        "--json",
    ]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["adapter"]["modules"], 14);

    let logits = t.path().join("logits.safetensors").display().to_string();
    let (ok, _, err) = ferrule(&[
        "logits",
        "--model",
        &fx("models/llama"),
        "--adapter",
        &fx("adapters/llama_lora"),
        "--inputs",
        &fx("inputs/decoder.safetensors"),
        "--out",
        &logits,
    ]);
    assert!(ok, "{err}");
    // peft's logits for that adapter (tests/fixtures/make_fixtures.py), at the real positions.
    let dev = candle_core::Device::Cpu;
    let load =
        |p: &str| ferrule::model::weights::load_safetensors_file(Path::new(p), &dev).unwrap();
    let (got, want, inputs) = (
        load(&logits),
        load(&fx("expected/llama_lora_logits.safetensors")),
        load(&fx("inputs/decoder.safetensors")),
    );
    let (got, want) = (&got["logits"], &want["logits"]);
    assert_eq!(got.dims(), want.dims());
    let v = got.dim(2).unwrap();
    let flat = |t: &candle_core::Tensor| {
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (g, w, mask) = (flat(got), flat(want), flat(&inputs["attention_mask"]));
    let mut worst = 0f32;
    for (pos, m) in mask.iter().enumerate() {
        if *m != 0.0 {
            for i in pos * v..(pos + 1) * v {
                assert!(g[i].is_finite(), "logit {i} is {}", g[i]);
                worst = worst.max((g[i] - w[i]).abs());
            }
        }
    }
    assert!(worst < 1e-4, "ferrule logits vs peft's: max |Δ| = {worst}");
}

/// The mean loss over the loss targets of `data` (encoded as `ferrule eval` does: max_len 512,
/// completion only), each record run alone through base + adapter, the log-softmax taken here
/// in f64: `Σ −log p(label[t+1] | ..t) / #targets`. Also returns the number of records.
fn mean_token_loss_by_hand(model: &str, adapter: &Path, data: &Path) -> (f64, usize) {
    use ferrule::data::{EncodeOptions, Truncation, IGNORE_INDEX};
    let dev = candle_core::Device::Cpu;
    let m = ferrule::adapted::AdaptedModel::load(model, Some(adapter), None, &dev).unwrap();
    let opts = EncodeOptions {
        max_len: 512,
        truncation: Truncation::Right,
        completion_only: true,
    };
    let set = ferrule::train::encode_file(data, &m.source, opts, None, None).unwrap();
    let (mut sum, mut count) = (0f64, 0usize);
    for item in &set.items {
        let ids = candle_core::Tensor::new(item.input_ids.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = m
            .model
            .forward(&ferrule::model::Inputs {
                input_ids: &ids,
                attention_mask: None,
                token_type_ids: None,
            })
            .unwrap();
        let rows = out
            .squeeze(0)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (t, &label) in item.labels.iter().enumerate().skip(1) {
            if label == IGNORE_INDEX {
                continue;
            }
            let row = &rows[t - 1];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_z = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            sum += log_z - row[label as usize];
            count += 1;
        }
    }
    assert!(count > 0);
    (sum / count as f64, set.items.len())
}

/// `ferrule logits` on a left-padded batch with the `position_ids` of its `--inputs` file: a
/// prefix-tuning adapter peft 0.21 made gives peft's logits (which shift the ids past the
/// prefix) within 1e-5 (tests/fixtures/left_padding); ids of another shape name the file.
#[test]
fn logits_take_position_ids_as_peft_does() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("logits.safetensors").display().to_string();
    let inputs = fx("left_padding/inputs.safetensors");
    let args = |inputs: &str| {
        [
            "logits".to_string(),
            "--model".into(),
            fx("models/llama"),
            "--adapter".into(),
            fx("methods/llama_prefix_tuning"),
            "--inputs".into(),
            inputs.to_string(),
            "--out".into(),
            out.clone(),
        ]
    };
    let run = |inputs: &str| ferrule(&args(inputs).iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let (ok, _, err) = run(&inputs);
    assert!(ok, "{err}");
    let dev = candle_core::Device::Cpu;
    let load =
        |p: &str| ferrule::model::weights::load_safetensors_file(Path::new(p), &dev).unwrap();
    let got = &load(&out)["logits"];
    let want = &load(&fx("left_padding/llama_prefix_tuning.safetensors"))["logits_pos"];
    let d = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "max |Δlogits| = {d}");
    let mut tensors = load(&inputs);
    let short = tensors["position_ids"].narrow(1, 0, 4).unwrap();
    tensors.insert("position_ids".into(), short);
    let bad = t.path().join("bad.safetensors");
    candle_core::safetensors::save(&tensors, &bad).unwrap();
    let bad = bad.display().to_string();
    let (ok, _, err) = run(&bad);
    assert!(
        !ok && err.contains(&bad) && err.contains("position_ids have shape [3, 4]"),
        "{err}"
    );
}

#[test]
fn bad_models_are_refused_clearly() {
    let t = tempfile::tempdir().unwrap();
    // Truncated safetensors.
    let trunc = t.path().join("trunc");
    copy_dir(&root().join("tests/fixtures/models/llama"), &trunc);
    let bytes = std::fs::read(trunc.join("model.safetensors")).unwrap();
    std::fs::write(trunc.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &["inspect", "--model", trunc.to_str().unwrap()],
        "not a valid safetensors file",
    );
    // Missing weights.
    std::fs::remove_file(trunc.join("model.safetensors")).unwrap();
    fails_with(
        &["inspect", "--model", trunc.to_str().unwrap()],
        "no model.safetensors",
    );
    // Unknown architecture.
    let unk = t.path().join("unk");
    copy_dir(&root().join("tests/fixtures/models/llama"), &unk);
    let cfg = std::fs::read_to_string(unk.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(unk.join("config.json"), cfg).unwrap();
    fails_with(
        &["inspect", "--model", unk.to_str().unwrap()],
        "unsupported model_type \"gpt_neox\"",
    );
    fails_with(
        &["inspect", "--model", "/nonexistent/model"],
        "no such file or folder",
    );
}

#[test]
fn bad_adapters_are_refused_clearly() {
    let t = tempfile::tempdir().unwrap();
    // A pickle is never loaded.
    let pickle = t.path().join("pickle");
    std::fs::create_dir_all(&pickle).unwrap();
    std::fs::copy(
        fx("adapters/llama_lora/adapter_config.json"),
        pickle.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(pickle.join("adapter_model.bin"), b"\x80\x04not really").unwrap();
    fails_with(
        &[
            "inspect",
            "--model",
            &fx("models/llama"),
            "--adapter",
            pickle.to_str().unwrap(),
        ],
        "pickle",
    );
    // An adapter for other modules (a llama adapter's q/k/v/o on bert).
    fails_with(
        &[
            "inspect",
            "--model",
            &fx("models/bert"),
            "--adapter",
            &fx("adapters/smollm_lora"),
        ],
        "cannot be trained as a causal LM",
    );
    fails_with(
        &[
            "inspect",
            "--model",
            &fx("models/bert"),
            "--task",
            "feature-extraction",
            "--adapter",
            &fx("adapters/smollm_lora"),
        ],
        "does not fit",
    );
    // Shapes that don't fit the model's layers.
    let wrong = t.path().join("wrong");
    copy_dir(&root().join("tests/fixtures/adapters/llama_lora"), &wrong);
    let dev = candle_core::Device::Cpu;
    let mut tensors: Vec<(String, candle_core::Tensor)> =
        ferrule::model::weights::load_safetensors_file(
            &wrong.join("adapter_model.safetensors"),
            &dev,
        )
        .unwrap()
        .into_iter()
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors[0].1 = candle_core::Tensor::zeros((4, 48), candle_core::DType::F32, &dev).unwrap();
    ferrule::peft_io::write_safetensors(
        &wrong.join("adapter_model.safetensors"),
        &tensors,
        &[("format", "pt")],
    )
    .unwrap();
    fails_with(
        &[
            "inspect",
            "--model",
            &fx("models/llama"),
            "--adapter",
            wrong.to_str().unwrap(),
        ],
        "has shape [4, 48]",
    );
}

#[test]
fn bad_training_inputs_are_refused_clearly() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("o").display().to_string();
    let base = [
        "train",
        "--model",
        &fx("models/llama"),
        "--output",
        &out,
        "--max-steps",
        "1",
        "-q",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |extra: &[&str], needle: &str| {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&refs, needle);
    };
    // Malformed JSONL names file and line.
    let bad = t.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"text\": oops}\n").unwrap();
    run(&["--data", bad.to_str().unwrap()], "bad.jsonl:2");
    // Empty dataset.
    let empty = t.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    run(&["--data", empty.to_str().unwrap()], "no records");
    // Targets that match nothing.
    run(
        &[
            "--data",
            &fx("data/chat.jsonl"),
            "--target-modules",
            "nonexistent_proj",
        ],
        "[\"nonexistent_proj\"] matched no module",
    );
    // One misspelt entry among good ones fails too, naming it and the model's module names.
    run(
        &[
            "--data",
            &fx("data/chat.jsonl"),
            "--target-modules",
            "q_proj,v_projx",
        ],
        "[\"v_projx\"] matched no module",
    );
    run(
        &[
            "--data",
            &fx("data/chat.jsonl"),
            "--target-modules",
            "q_proj,v_projx",
        ],
        "model.layers.*.self_attn.v_proj (2)",
    );
    // A rank_pattern key that is no regex, or that matches no targeted module.
    run(
        &[
            "--data",
            &fx("data/chat.jsonl"),
            "--peft-option",
            "rank_pattern={\"q_proj(\": 2}",
        ],
        "rank_pattern: key \"q_proj(\" is not a valid regular expression",
    );
    run(
        &[
            "--data",
            &fx("data/chat.jsonl"),
            "--peft-option",
            "rank_pattern={\"k_proj\": 2}",
        ],
        "rank_pattern[\"k_proj\"] matched no targeted module",
    );
    // Options of another method, and unknown methods.
    run(
        &[
            "--data",
            &fx("data/chat.jsonl"),
            "--method",
            "ia3",
            "--lora-r",
            "4",
        ],
        "--lora-r sets \"r\", which the ia3 method does not have",
    );
    run(
        &["--data", &fx("data/chat.jsonl"), "--method", "adalora"],
        "unknown method \"adalora\"",
    );
    run(
        &[
            "--data",
            &fx("data/chat.jsonl"),
            "--peft-option",
            "use_dorra=true",
        ],
        "\"use_dorra\", which the lora method does not have",
    );
    // Longer than the model's context (tiny models have 128 positions).
    run(
        &["--data", &fx("data/chat.jsonl"), "--max-len", "4096"],
        "exceeds the model's context",
    );
    // Records longer than max-len when truncation is off.
    run(
        &[
            "--data",
            &fx("data/chat.jsonl"),
            "--max-len",
            "8",
            "--no-truncate",
        ],
        "chat.jsonl:1: 25 tokens, more than max_len 8",
    );
    // Nothing was left behind by the failed runs.
    assert!(!Path::new(&out).join("adapter_model.safetensors").exists());
}

#[test]
fn toml_config_with_flag_overrides() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("run.toml");
    let out = t.path().join("run");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = {:?}\noutput_dir = {:?}\nbatch_size = 4\nmax_steps = 5\nlr = 0.01\nschedule = \"cosine\"\ncompute_dtype = \"f32\"\n\n[lora]\nr = 2\nlora_alpha = 4\ntarget_modules = [\"q_proj\"]\n",
            fx("models/llama"), fx("data/chat.jsonl"), out.display().to_string()
        ),
    )
    .unwrap();
    // The flag overrides the file's max_steps.
    let (ok, stdout, err) = ferrule(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--max-steps",
        "2",
        "-q",
        "--json",
    ]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["steps"], 2);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["r"], 2);
    assert_eq!(saved["target_modules"], serde_json::json!(["q_proj"]));
    // A [quantize] table quantizes the base: int8 weights are a quarter of f32 (plus one scale
    // per row), and the bf16 embedding/head half.
    let out_q = t.path().join("runq");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&out.display().to_string(), &out_q.display().to_string());
    std::fs::write(&cfg, text + "\n[quantize]\nmethod = \"int8\"\n").unwrap();
    let (ok, stdout, err) = ferrule(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--max-steps",
        "1",
        "-q",
        "--json",
    ]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let dense: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap())
            .unwrap();
    let (q, d) = (
        summary["base_weight_bytes"].as_f64().unwrap(),
        dense["base_weight_bytes"].as_f64().unwrap(),
    );
    assert!(q < 0.5 * d, "int8 base {q} bytes vs f32 {d}");
    let bad = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("method = \"int8\"", "method = \"nf4\"\nblocksize = 100");
    std::fs::write(&cfg, bad).unwrap();
    fails_with(
        &["train", "--config", cfg.to_str().unwrap()],
        "blocksize 100",
    );
    // A misspelt key is an error naming it, at the top level and in [adapter].
    std::fs::write(&cfg, "model = \"x\"\nbatchsize = 4\n").unwrap();
    fails_with(&["train", "--config", cfg.to_str().unwrap()], "batchsize");
    std::fs::write(
        &cfg,
        "model = \"x\"\n[adapter]\npeft_type = \"IA3\"\nfeedforward_module = [\"down_proj\"]\n",
    )
    .unwrap();
    fails_with(
        &["train", "--config", cfg.to_str().unwrap()],
        "\"feedforward_module\" is not a IA3 option",
    );
    std::fs::write(&cfg, "model = \"x\"\n[adapter]\npeft_type = \"VERA\"\n").unwrap();
    fails_with(
        &["train", "--config", cfg.to_str().unwrap()],
        "peft_type \"VERA\" is not supported",
    );
}

/// `--allow-unmatched` turns an unmatched entry into a warning; the run trains the rest.
#[test]
fn allow_unmatched_trains_what_matched() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("o");
    let (ok, _, err) = ferrule(&[
        "train",
        "--model",
        &fx("models/llama"),
        "--data",
        &fx("data/chat.jsonl"),
        "--output",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
        "--target-modules",
        "q_proj,v_projx",
        "--allow-unmatched",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("v_projx") && err.contains("--allow-unmatched"),
        "no warning:\n{err}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        saved["target_modules"],
        serde_json::json!(["q_proj", "v_projx"])
    );
    let keys = ferrule::model::weights::load_safetensors_file(
        &out.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        keys.len(),
        4,
        "q_proj A and B in 2 layers: {:?}",
        keys.keys()
    );
}

/// `--shard-base` in one process shards nothing: a warning that `-q` does not hide, and the
/// run trains the adapter it trains without the flag.
#[test]
fn shard_base_in_one_process_warns() {
    let t = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = t.path().join(name);
        let (model, data, out_s) = (
            fx("models/llama"),
            fx("data/chat.jsonl"),
            out.display().to_string(),
        );
        let mut a = vec![
            "train",
            "--model",
            &model,
            "--data",
            &data,
            "--max-steps",
            "2",
            "-q",
        ];
        a.extend_from_slice(&["--output", &out_s]);
        a.extend_from_slice(extra);
        let (ok, _, err) = ferrule(&a);
        assert!(ok, "{err}");
        (
            err,
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        )
    };
    let (err, sharded) = run("sb", &["--shard-base"]);
    assert!(
        err.contains("--shard-base") && err.contains("nothing is sharded"),
        "no warning:\n{err}"
    );
    let (_, plain) = run("plain", &[]);
    assert_eq!(sharded, plain);
}

/// An `[adapter]` table with another method trains it; inspect shows the plan of a method.
#[test]
fn adapter_table_and_inspect_plan() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("run.toml");
    let out = t.path().join("run");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = {:?}\noutput_dir = {:?}\nbatch_size = 4\nmax_steps = 2\n\n[adapter]\npeft_type = \"IA3\"\ntarget_modules = [\"k_proj\", \"down_proj\"]\nfeedforward_modules = [\"down_proj\"]\n",
            fx("models/llama"), fx("data/chat.jsonl"), out.display().to_string()
        ),
    )
    .unwrap();
    let (ok, _, err) = ferrule(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        err.contains("k_proj     2 modules") && err.contains("down_proj  2 modules"),
        "no match table:\n{err}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["peft_type"], "IA3");
    fails_with(
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--method",
            "lora",
            "--output",
            t.path().join("x").to_str().unwrap(),
        ],
        "conflicts with the config file",
    );
    // inspect: IA3 with PEFT's defaults for llama (k_proj, v_proj, down_proj): 2 x (32 + 32 + 128) parameters.
    let (ok, stdout, err) = ferrule(&[
        "inspect",
        "--model",
        &fx("models/llama"),
        "--method",
        "ia3",
        "--json",
    ]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(info["plan"]["peft_type"], "IA3");
    assert_eq!(info["plan"]["modules"], 6);
    let (ok, stdout, err) = ferrule(&[
        "inspect",
        "--model",
        &fx("models/llama"),
        "--method",
        "ln-tuning",
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("ln-tuning (LN_TUNING) on 5 modules"),
        "{stdout}"
    );
}

#[test]
fn qlora_train_eval_merge_quantize_inspect() {
    let t = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.display().to_string();
    let (run, merged, quant) = (
        t.path().join("run"),
        t.path().join("merged"),
        t.path().join("quant"),
    );
    let q = ["--quantize", "nf4", "--double-quant"];
    let (ok, out, err) = ferrule(
        &[
            &[
                "train",
                "--model",
                &fx("models/llama"),
                "--data",
                &fx("data/chat.jsonl"),
                "--output",
                &s(&run),
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--lr",
                "1e-2",
                "--target-modules",
                "all-linear",
                "-q",
                "--json",
            ][..],
            &q,
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"completed\":true"), "{out}");
    let (ok, out, err) = ferrule(
        &[
            &[
                "eval",
                "--model",
                &fx("models/llama"),
                "--adapter",
                &s(&run),
                "--data",
                &fx("data/chat.jsonl"),
            ][..],
            &q,
        ]
        .concat(),
    );
    assert!(ok && out.contains("loss"), "{out}{err}");

    // Merging into the NF4 base requantizes the adapted weights and reports what that cost.
    let (ok, out, err) = ferrule(
        &[
            &[
                "merge",
                "--model",
                &fx("models/llama"),
                "--adapter",
                &s(&run),
                "--output",
                &s(&merged),
            ][..],
            &q,
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert!(err.contains("rounding errors"), "peft's warning: {err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["requantized"], 14);
    let e = &report["requantize_error"];
    // Measured: max_abs 0.0354, rel 0.0720 (of the largest |weight|) for this seeded run; NF4's
    // widest code gap (0.7230 to 1) bounds a block's rounding at 0.139 of its absmax.
    assert!(
        e["max_abs"].as_f64().unwrap() > 0.0 && e["rel"].as_f64().unwrap() < 0.08,
        "{report}"
    );
    let (ok, out, _) = ferrule(&["inspect", "--model", &s(&merged)]);
    assert!(
        ok && out.contains("14 x nf4 (blocksize 64, double quant)"),
        "{out}"
    );

    // ferrule quantize, then inspect: bits per parameter with the statistics.
    let (ok, _, err) = ferrule(&[
        "quantize",
        "--model",
        &fx("models/llama"),
        "--output",
        &s(&quant),
        "--quantize",
        "fp4",
        "--quant-blocksize",
        "32",
    ]);
    assert!(ok, "{err}");
    let (ok, out, _) = ferrule(&["inspect", "--model", &s(&quant), "--json"]);
    assert!(ok);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    // 4 bits + one f32 absmax per 32 values.
    let fp4 = &info["weights"]["formats"]["fp4 (blocksize 32)"];
    assert_eq!(fp4["tensors"], 14);
    assert!(
        (fp4["bits_per_param"].as_f64().unwrap() - 5.0).abs() < 1e-9,
        "{out}"
    );
    // The embedding table and the head are kept in bf16.
    assert_eq!(info["weights"]["formats"]["bf16"]["tensors"], 2, "{out}");
    fails_with(
        &[
            "quantize",
            "--model",
            &fx("models/llama"),
            "--output",
            &s(&quant),
            "--quantize",
            "nf4",
        ],
        "already exists",
    );
}

#[test]
fn bad_quantization_flags_are_refused_clearly() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("x").display().to_string();
    let base = [
        "train",
        "--model",
        &fx("models/llama"),
        "--data",
        &fx("data/chat.jsonl"),
        "--output",
        &out,
        "--max-steps",
        "1",
    ];
    fails_with(
        &[&base[..], &["--quantize", "nf4", "--quant-blocksize", "48"]].concat(),
        "invalid 4-bit blocksize 48",
    );
    fails_with(
        &[&base[..], &["--double-quant"]].concat(),
        "need --quantize",
    );
    fails_with(
        &[&base[..], &["--quantize", "int8", "--double-quant"]].concat(),
        "double quantization applies to nf4/fp4",
    );
    fails_with(&[&base[..], &["--quantize", "nf3"]].concat(), "nf3");
    fails_with(
        &["quantize", "--model", &fx("models/llama"), "--output", &out],
        "needs --quantize",
    );
    fails_with(
        &[
            "quantize",
            "--model",
            &fx("quant/llama-fp4"),
            "--output",
            &out,
            "--quantize",
            "nf4",
        ],
        "already quantized",
    );
    assert!(!t.path().join("x").exists(), "nothing written");
}

/// `ferrule plan --stream-base` on the tiny llama's f32 weights, by hand: the norms stay
/// resident (2 layers x 2 x 64 + 64 floats), the head (320 x 64 f32) is the largest use, and
/// the largest matrix of another shape (gate_proj, 128 x 64) is read ahead meanwhile; the
/// same-shaped embedding is not (its lookup touches only its rows).
#[test]
fn plan_a_streamed_base_counts_the_matrix_in_use_and_the_next() {
    let model = fx("models/llama");
    let plan = |extra: &[&str]| {
        let mut a = vec![
            "plan",
            "--model",
            &model,
            "--compute-dtype",
            "f32",
            "--json",
        ];
        a.extend_from_slice(extra);
        let (ok, out, err) = ferrule(&a);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["weights_bytes"]
            .as_f64()
            .unwrap()
    };
    let by_hand = 4.0 * (2.0 * 2.0 * 64.0 + 64.0) + 4.0 * 320.0 * 64.0 + 4.0 * 128.0 * 64.0;
    assert_eq!(plan(&["--stream-base"]), by_hand);
    assert!(plan(&[]) > 2.0 * by_hand);
    fails_with(
        &["plan", "--model", &model, "--stream-base", "--shard-base"],
        "--stream-base and --shard-base",
    );
    // --max-resident-gb: the least is --stream-base's plan; the whole base as budget is the
    // in-memory plan (f32 file, f32 compute: a kept matrix costs its mapped bytes); a budget
    // between gives a base between, within the budget; below the least is named.
    let whole = plan(&[]);
    let gb = |bytes: f64| format!("{:.9}", bytes / 1e9);
    assert_eq!(plan(&["--max-resident-gb", &gb(by_hand)]), by_hand);
    assert_eq!(plan(&["--max-resident-gb", &gb(whole)]), whole);
    let half = (by_hand + whole) / 2.0;
    let between = plan(&["--max-resident-gb", &gb(half)]);
    assert!(between > by_hand && between <= half, "{between}");
    fails_with(
        &[
            "plan",
            "--model",
            &model,
            "--compute-dtype",
            "f32",
            "--max-resident-gb",
            &gb(by_hand - 4.0),
        ],
        &format!("needs at least {:.3} GB ({by_hand} bytes)", by_hand / 1e9),
    );
    fails_with(
        &[
            "plan",
            "--model",
            &model,
            "--max-resident-gb",
            "1",
            "--stream-base",
        ],
        "--stream-base keeps no frozen matrix resident",
    );
}

/// `ferrule plan` from a config.json alone (Meta-Llama-3-70B's shapes): the ZeRO formulas for
/// its LoRA parameters, the NF4 base sharded over 8 ranks, and the answer to "does it fit".
/// IA3 counted from a `config.json` alone: by hand for the 70B Llama (k and v project to 8 kv
/// heads of 128, down_proj's input is 28672 wide: (1024 + 1024 + 28672) x 80 layers), and equal to
/// the count of the method built on the weights of the tiny Llama.
#[test]
fn plan_counts_ia3_from_the_config_alone() {
    let trainable = |model: &str| {
        let (ok, out, err) = ferrule(&["plan", "--model", model, "--method", "ia3", "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["trainable_params"].as_u64().unwrap()
    };
    assert_eq!(
        trainable(&fx("plan/llama-70b/config.json")),
        (1024 + 1024 + 28672) * 80
    );
    let tiny = fx("models/llama");
    assert_eq!(trainable(&format!("{tiny}/config.json")), trainable(&tiny));
}

#[test]
fn plan_a_70b_model_this_machine_cannot_hold() {
    let cfg = fx("plan/llama-70b/config.json");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "plan",
            "--model",
            &cfg,
            "--quantize",
            "nf4",
            "--double-quant",
            "--lora-r",
            "16",
            "--target-modules",
            "q_proj,k_proj,v_proj,o_proj",
        ];
        a.extend_from_slice(extra);
        a.push("--json");
        let (ok, out, err) = ferrule(&a);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let one = args(&["--batch-size", "1", "--max-len", "2048", "--recompute"]);
    assert_eq!(one["base_params"], 70_553_706_496u64);
    let psi = 65_536_000f64;
    assert_eq!(one["trainable_params"].as_f64().unwrap(), psi);
    assert_eq!(one["paper_model_state_bytes"].as_f64().unwrap(), 16.0 * psi);
    // By hand: 68,451,041,280 linear weights at NF4 + double quant (4 + 8.125/64 bits), the
    // untied embedding and head (2 x 128256 x 8192) in bf16, 1,318,912 norm weights in f32.
    let weights = one["weights_bytes"].as_f64().unwrap();
    let by_hand = 68_451_041_280.0 * (4.0 + 8.125 / 64.0) / 8.0
        + 2.0 * 2.0 * 128_256.0 * 8192.0
        + 4.0 * 1_318_912.0;
    assert!((weights - by_hand).abs() < 1.0, "{weights} vs {by_hand}");
    let eight = args(&[
        "--world-size",
        "8",
        "--zero-stage",
        "3",
        "--shard-base",
        "--batch-size",
        "1",
        "--max-len",
        "2048",
        "--recompute",
        "--memory-per-rank",
        "24",
    ]);
    assert_eq!(
        eight["paper_model_state_bytes"].as_f64().unwrap(),
        16.0 * psi / 8.0
    );
    // Stage 3 sends 3Ψ elements of 4 bytes in the paper, 2Ψ in ferrule; times (N-1)/N.
    assert_eq!(
        eight["paper_comm_bytes_per_step"].as_f64().unwrap(),
        3.0 * 4.0 * psi * 7.0 / 8.0
    );
    // --shard-base adds, by hand: every linear weight broadcast in f32 three times (forward,
    // recomputed forward, backward), the head twice, and the distributed embedding lookup
    // (a reduce-scatter of 8 x 2048 rows of 8192 and an all-gather of 8 x 2049 ids).
    let base_broadcasts = 3.0 * 68_451_041_280.0 + 2.0 * 128_256.0 * 8192.0;
    let lookup = 8.0 * 2048.0 * 8192.0 + 8.0 * 2049.0;
    let sharded_base = 4.0 * (base_broadcasts + lookup) * 7.0 / 8.0;
    let comm = eight["comm_bytes_per_step"].as_f64().unwrap();
    assert!(
        (comm - (2.0 * 4.0 * psi * 7.0 / 8.0 + sharded_base)).abs() < 1.0,
        "{comm}"
    );
    assert!(eight["weights_bytes"].as_f64().unwrap() < weights / 4.0);
    assert_eq!(eight["fits"], true);
    // Streamed from disk on one rank, by hand: the norms stay resident, and the head in use
    // (128256 x 8192 in bf16) is the largest matrix, with one more of its size read ahead.
    let streamed = args(&[
        "--stream-base",
        "--compute-dtype",
        "bf16",
        "--batch-size",
        "1",
        "--max-len",
        "2048",
        "--recompute",
        "--memory-per-rank",
        "24",
    ]);
    let by_hand = 4.0 * 1_318_912.0 + 2.0 * 2.0 * 128_256.0 * 8192.0;
    let w = streamed["weights_bytes"].as_f64().unwrap();
    assert!((w - by_hand).abs() < 1.0, "{w} vs {by_hand}");
    assert_eq!(streamed["fits"], true);
    assert_eq!(args(&["--memory-per-rank", "24"])["fits"], false);
    fails_with(
        &["plan", "--model", &cfg, "--method", "ln-tuning"],
        "count their parameters, and not with every option (DoRA needs the weights): lora, dylora, ia3, difffit, bottleneck, pst, dept, svfit, pela, ist, l4q;",
    );
    fails_with(
        &["plan", "--model", &cfg, "--target-modules", "query"],
        "names no linear layer",
    );
    fails_with(
        &["plan", "--model", &cfg, "--world-size", "0"],
        "--world-size is 0",
    );
    fails_with(
        &["plan", "--model", &cfg, "--batch-size", "0"],
        "--batch-size and --max-len must be at least 1",
    );
    fails_with(
        &["plan", "--model", &cfg, "--memory-per-rank", "nan"],
        "expected a positive number of GB",
    );
    fails_with(
        &["plan", "--model", "no/such/model"],
        "no such file or folder",
    );
}

/// A checkpoint that lost a file is not skipped quietly on --resume (which would start over).
#[test]
fn resume_refuses_an_incomplete_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run").display().to_string();
    let args = [
        "train",
        "--model",
        &fx("models/llama"),
        "--data",
        &fx("data/chat.jsonl"),
        "--output",
        &run,
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "-q",
    ];
    let mut first = args.to_vec();
    first.extend(["--stop-after", "1"]);
    let (ok, _, err) = ferrule(&first);
    assert!(ok, "{err}");
    std::fs::remove_file(t.path().join("run/checkpoint-1/optimizer.safetensors")).unwrap();
    let mut again = args.to_vec();
    again.push("--resume");
    fails_with(&again, "an incomplete checkpoint");
}
