//! Reports from users of tools like ferrule, tried on it as a new user would (issue 25, item 7):
//! each error names the file, line, key or flag and the fix, and nothing differs silently.
//! All run on the small fixture models.

mod common;
use common::{ferrule, fx};

use std::path::Path;

/// Runs ferrule, expecting it to fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    let (ok, out, err) = ferrule(args);
    assert!(
        !ok,
        "expected {args:?} to fail; stdout:\n{out}\nstderr:\n{err}"
    );
    err
}

/// Runs ferrule, expecting it to succeed; returns (stdout, stderr).
fn succeeds(args: &[&str]) -> (String, String) {
    let (ok, out, err) = ferrule(args);
    assert!(ok, "{args:?} failed:\n{err}");
    (out, err)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

fn chat_line(turns: &[(&str, &str)]) -> String {
    let messages: Vec<serde_json::Value> = turns
        .iter()
        .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
        .collect();
    serde_json::json!({ "messages": messages }).to_string()
}

fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--output",
        out,
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "-q",
    ]
}

/// A template that, as Mistral's and Llama 2's do, refuses two user turns in a row.
const ALTERNATING_TEMPLATE: &str = "{% for message in messages %}\
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A template error on the record of line 3 (line 2 is blank, so it is record 1) names
/// `file:line`, as a JSON error does, in `ferrule data` and in `ferrule train`.
#[test]
fn chat_template_error_names_the_file_and_line() {
    let t = tempfile::tempdir().unwrap();
    let model = t.path().join("model");
    copy_dir(Path::new(&fx("models/llama")), &model);
    std::fs::write(model.join("chat_template.jinja"), ALTERNATING_TEMPLATE).unwrap();
    let model = model.display().to_string();
    let ok = chat_line(&[("user", "hi"), ("assistant", "hello")]);
    let bad = chat_line(&[("user", "hi"), ("user", "again")]);
    let data = write(&t.path().join("chat.jsonl"), &format!("{ok}\n\n{bad}\n"));
    let at = format!("{data}:3: ");

    let err = fails(&["data", "--model", &model, "--data", &data]);
    assert!(err.contains(&at), "{err}");
    assert!(err.contains("Conversation roles must alternate"), "{err}");
    assert!(!err.contains("record 1"), "{err}");

    let out = t.path().join("run").display().to_string();
    let err = fails(&train_args(&model, &data, &out));
    assert!(err.contains(&at), "{err}");
    assert!(!err.contains("record 1"), "{err}");
}

/// Records whose prompt fills --max-len keep nothing of their answer: they are counted as
/// truncated and skipped, by line, with the flag and the prompt length; when no record is
/// left the error says the same.
#[test]
fn answers_beyond_max_len_are_counted_with_the_flag_and_prompt_length() {
    let t = tempfile::tempdir().unwrap();
    let model = fx("models/llama");
    let long = "x ".repeat(30);
    let short = chat_line(&[("user", "hi"), ("assistant", "hello there")]);
    let cut = chat_line(&[("user", &long), ("assistant", "ok")]);
    let data = write(
        &t.path().join("mixed.jsonl"),
        &format!("{short}\n{cut}\n{short}\n"),
    );

    // The prompt's length as the tokenizer counts it: the longest max_len that still skips it.
    let (out, _) = succeeds(&[
        "data",
        "--model",
        &model,
        "--data",
        &data,
        "--max-len",
        "24",
        "--json",
    ]);
    let counts: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(counts["skipped_lines"], serde_json::json!([2]), "{counts}");
    let skipped = &counts["skipped_past_max_len"];
    assert_eq!(skipped[0]["line"], 2, "{counts}");
    let prompt = skipped[0]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt >= 24, "{counts}");

    let (out, _) = succeeds(&[
        "data",
        "--model",
        &model,
        "--data",
        &data,
        "--max-len",
        "24",
    ]);
    assert!(out.contains("records 3 (kept 2, skipped 1"), "{out}");
    assert!(
        out.contains(&format!(
            "truncated and skipped 1: their prompt ({prompt} tokens) fills --max-len 24"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("raise --max-len above {prompt}")),
        "{out}"
    );

    // train says so in its log, naming the file and line.
    let run = t.path().join("run").display().to_string();
    let mut args = train_args(&model, &data, &run);
    args.extend(["--max-len", "24"]);
    let (_, err) = succeeds(&args);
    assert!(
        err.contains(&format!(
            "{data}: skipped 1 record whose prompt ({prompt} tokens) fills max_len 24 (--max-len)"
        )),
        "{err}"
    );
    assert!(err.contains("(line 2)"), "{err}");

    // Every record cut before its answer: the error names the flag and the prompt length.
    let only = write(&t.path().join("cut.jsonl"), &format!("{cut}\n{cut}\n"));
    let run = t.path().join("run2").display().to_string();
    let mut args = train_args(&model, &only, &run);
    args.extend(["--max-len", "24"]);
    let err = fails(&args);
    assert!(err.contains("--max-len"), "{err}");
    assert!(err.contains(&format!("prompts ({prompt} tokens)")), "{err}");
    assert!(
        err.contains(&format!("raise --max-len above {prompt}")),
        "{err}"
    );
}

/// A copy of the llama fixture whose tokenizer holds one added token, `<|tool|>` with id 320,
/// one past the embedding's 320 rows (config.json vocab_size).
fn model_with_added_token(dir: &Path) -> String {
    let model = dir.join("model");
    copy_dir(Path::new(&fx("models/llama")), &model);
    let path = model.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tok["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": 320, "content": "<|tool|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    std::fs::write(&path, tok.to_string()).unwrap();
    model.display().to_string()
}

/// A token added to the tokenizer without resizing the embeddings is refused when the model
/// loads, naming the token and both sizes.
#[test]
fn tokens_past_the_embedding_are_named_at_load() {
    let t = tempfile::tempdir().unwrap();
    let model = model_with_added_token(t.path());
    let data = write(
        &t.path().join("d.jsonl"),
        &format!(
            "{}\n",
            chat_line(&[("user", "<|tool|> hi"), ("assistant", "ok")])
        ),
    );
    for args in [
        vec!["data", "--model", &model, "--data", &data],
        train_args(&model, &data, &t.path().join("run").display().to_string()),
    ] {
        let err = fails(&args);
        assert!(err.contains("token \"<|tool|>\" has id 320"), "{err}");
        assert!(err.contains("embedding has 320 rows"), "{err}");
        assert!(err.contains("the tokenizer needs 321"), "{err}");
        assert!(err.contains("resize_token_embeddings"), "{err}");
        assert!(err.contains("--resize-token-embeddings"), "{err}");
    }
    // inspect takes the flag too: the model and what an adapter would train on it.
    let inspect = ["inspect", "--model", &model, "--method", "lora"];
    let err = fails(&inspect);
    assert!(err.contains("--resize-token-embeddings"), "{err}");
    let resized = [&inspect[..], &["--resize-token-embeddings", "--json"]].concat();
    let (resized_ok, out, err) = ferrule(&resized);
    assert!(resized_ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["config"]["vocab_size"], 321, "{out}");
}

/// What peft offers for added tokens: the embeddings resized to the tokenizer and only the
/// listed rows trained (trainable_token_indices). The adapter holds the resized tables, as
/// peft saves them, and eval on the same model folder resizes it alike and loads it.
#[test]
fn added_tokens_train_with_resized_embeddings_and_listed_rows() {
    let t = tempfile::tempdir().unwrap();
    let model = model_with_added_token(t.path());
    let data = write(
        &t.path().join("d.jsonl"),
        &format!(
            "{}\n{}\n",
            chat_line(&[("user", "call <|tool|> now"), ("assistant", "<|tool|> ok")]),
            chat_line(&[("user", "hi"), ("assistant", "<|tool|>")])
        ),
    );
    succeeds(&[
        "data",
        "--model",
        &model,
        "--data",
        &data,
        "--resize-token-embeddings",
    ]);
    let run = t.path().join("run").display().to_string();
    let mut args = train_args(&model, &data, &run);
    args.push("--resize-token-embeddings");
    let err = fails(&args);
    assert!(err.contains("--trainable-token-indices"), "{err}");
    args.extend(["--trainable-token-indices", "320,5"]);
    succeeds(&args);

    let saved = ferrule::model::weights::load_safetensors_file(
        &Path::new(&run).join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let shape = |k: &str| saved.get(k).map(|t| t.dims().to_vec());
    let key = |s: &str| format!("base_model.model.{s}");
    assert_eq!(
        shape(&key(
            "model.embed_tokens.token_adapter.trainable_tokens_delta"
        )),
        Some(vec![2, 64])
    );
    // The fixture's lm_head is untied: peft saves it whole after a resize.
    assert_eq!(
        shape(&key("model.embed_tokens.token_adapter.base_layer.weight")),
        Some(vec![321, 64])
    );
    assert_eq!(shape(&key("lm_head.weight")), Some(vec![321, 64]));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&run).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["trainable_token_indices"],
        serde_json::json!([320, 5])
    );

    succeeds(&[
        "eval",
        "--model",
        &model,
        "--adapter",
        &run,
        "--data",
        &data,
    ]);

    // On a quantized base the tables are held in bf16 rows; they resize alike.
    let run_q = t.path().join("run-qlora").display().to_string();
    let mut qlora = train_args(&model, &data, &run_q);
    qlora.extend([
        "--resize-token-embeddings",
        "--trainable-token-indices",
        "320",
    ]);
    qlora.extend(["--quantize", "nf4"]);
    succeeds(&qlora);
    let eval_q = [
        "eval",
        "--model",
        &model,
        "--quantize",
        "nf4",
        "--adapter",
        &run_q,
    ];
    succeeds(&[&eval_q[..], &["--data", &data]].concat());

    // peft's standalone method: the rows alone, keys without token_adapter.
    let run = t.path().join("run-tokens").display().to_string();
    let mut args = train_args(&model, &data, &run);
    args.extend(["--resize-token-embeddings", "--method", "trainable-tokens"]);
    // Tokens by name, looked up in the model's tokenizer.json.
    let mut misnamed = args.clone();
    misnamed.extend(["--token-indices", "<|tol|>"]);
    let err = fails(&misnamed);
    assert!(
        err.contains("--token-indices: \"<|tol|>\" is no token id and no token of"),
        "{err}"
    );
    args.extend(["--token-indices", "<|tool|>"]);
    succeeds(&args);
    let saved = ferrule::model::weights::load_safetensors_file(
        &Path::new(&run).join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut keys: Vec<(&str, Vec<usize>)> = saved
        .iter()
        .map(|(k, t)| (k.as_str(), t.dims().to_vec()))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            ("base_model.model.lm_head.weight", vec![321, 64]),
            (
                "base_model.model.model.embed_tokens.base_layer.weight",
                vec![321, 64]
            ),
            (
                "base_model.model.model.embed_tokens.trainable_tokens_delta",
                vec![1, 64]
            ),
        ]
    );
    succeeds(&[
        "eval",
        "--model",
        &model,
        "--adapter",
        &run,
        "--data",
        &data,
    ]);
}

/// Classification records without --task seq-cls: say what to pass, not an internal name.
#[test]
fn classification_records_without_the_task_name_the_flag() {
    let t = tempfile::tempdir().unwrap();
    let data = write(
        &t.path().join("cls.jsonl"),
        "{\"text\": \"great film\", \"label\": 1}\n{\"text\": \"dull\", \"label\": 0}\n",
    );
    let model = fx("models/llama");
    let run = t.path().join("run").display().to_string();
    for args in [
        vec!["data", "--model", &model, "--data", &data],
        train_args(&model, &data, &run),
    ] {
        let err = fails(&args);
        assert!(err.contains(&format!("{data}:1: ")), "{err}");
        assert!(err.contains("pass --task seq-cls"), "{err}");
        assert!(!err.contains("Encoder::"), "{err}");
    }
}

/// "labels" where "label" is meant: the error names the file, the line, the key found and the
/// key expected.
#[test]
fn a_misnamed_label_key_is_named_with_the_expected_one() {
    let t = tempfile::tempdir().unwrap();
    let data = write(
        &t.path().join("cls.jsonl"),
        "\n{\"text\": \"great film\", \"labels\": 1}\n{\"text\": \"dull\", \"labels\": 0}\n",
    );
    let model = fx("models/llama");
    let run = t.path().join("run").display().to_string();
    let mut train = train_args(&model, &data, &run);
    train.extend(["--task", "seq-cls"]);
    for args in [
        vec![
            "data", "--model", &model, "--data", &data, "--task", "seq-cls",
        ],
        train,
    ] {
        let err = fails(&args);
        assert!(err.contains(&format!("{data}:2: ")), "{err}");
        assert!(err.contains("keys \"text\", \"labels\""), "{err}");
        assert!(err.contains("rename \"labels\" to \"label\""), "{err}");
    }
}

/// A folder that holds a .gguf file but no config.json: suggest the file.
#[test]
fn a_folder_holding_a_gguf_suggests_the_file() {
    let t = tempfile::tempdir().unwrap();
    let gguf = t.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let dir = t.path().display().to_string();
    let data = fx("data/chat.jsonl");
    let err = fails(&["data", "--model", &dir, "--data", &data]);
    assert!(err.contains("no config.json"), "{err}");
    assert!(
        err.contains(&format!("pass --model {}", gguf.display())),
        "{err}"
    );
}

/// The dtype and shape of each tensor in a safetensors file's header.
fn header(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

/// `ferrule quantize` holds the embedding and head in bf16 but writes them in f32 (transformers
/// fails on a bf16 head when loading the folder in f32): it says so with the file's size, and
/// the values it writes are bf16-exact, so reading the folder back computes the same logits.
#[test]
fn quantize_reports_the_file_size_and_why_it_differs() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("nf4");
    let out_s = out.display().to_string();
    let model = fx("models/llama");
    let (_, err) = succeeds(&[
        "quantize",
        "--model",
        &model,
        "--quantize",
        "nf4",
        "--output",
        &out_s,
    ]);
    let file = out.join("model.safetensors");
    let size = std::fs::metadata(&file).unwrap().len() as f64 / 1e6;
    assert!(
        err.contains(&format!("{}: {size:.1} MB on disk", file.display())),
        "{err}"
    );
    // The fixture's 320 x 64 embedding and head: 2 x 40 960 bf16 values.
    assert!(
        err.contains(
            "the 2 bf16 tables (embedding, head) 0.1 MB in memory are written in f32 (0.2 MB"
        ),
        "{err}"
    );
    let h = header(&file);
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        assert_eq!(h[name]["dtype"], "F32", "{name}: {}", h[name]);
    }
    let tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let embed: Vec<f32> = tensors["model.embed_tokens.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(embed.iter().all(|v| v.to_bits() & 0xffff == 0));

    // Read back, the folder computes what the quantized base computes.
    let inputs = fx("inputs/decoder.safetensors");
    let a = t.path().join("a.safetensors").display().to_string();
    let b = t.path().join("b.safetensors").display().to_string();
    succeeds(&[
        "logits",
        "--model",
        &model,
        "--quantize",
        "nf4",
        "--inputs",
        &inputs,
        "--out",
        &a,
    ]);
    succeeds(&[
        "logits", "--model", &out_s, "--inputs", &inputs, "--out", &b,
    ]);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

fn logits(path: &str) -> Vec<f32> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    t["logits"]
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &str, b: &str) -> f32 {
    let (a, b) = (logits(a), logits(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// An adapter trained on an NF4 base (QLoRA) merged into the dense base gives another model:
/// merge says so, naming the quantization and the flags that merge it as it was trained; with
/// them (and --dequantize) the merged model computes what was trained.
#[test]
fn merging_a_qlora_adapter_into_a_dense_base_warns() {
    let t = tempfile::tempdir().unwrap();
    let model = fx("models/llama");
    let data = fx("data/chat.jsonl");
    let run = t.path().join("run").display().to_string();
    let mut args = train_args(&model, &data, &run);
    args.extend([
        "--quantize",
        "nf4",
        "--double-quant",
        "--lr",
        "0.05",
        "--target-modules",
        "all-linear",
    ]);
    succeeds(&args);
    let record = std::fs::read_to_string(Path::new(&run).join("ferrule_base.json")).unwrap();
    assert!(
        record.contains("nf4 (blocksize 64, double quant)"),
        "{record}"
    );

    let dense = t.path().join("dense").display().to_string();
    let (_, err) = succeeds(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        &run,
        "--output",
        &dense,
    ]);
    assert!(
        err.contains("was trained on a quantized base (bf16, nf4 (blocksize 64, double quant))"),
        "{err}"
    );
    assert!(err.contains("add --quantize nf4 --double-quant"), "{err}");

    let exact = t.path().join("exact").display().to_string();
    let (_, err) = succeeds(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        &run,
        "--output",
        &exact,
        "--quantize",
        "nf4",
        "--double-quant",
        "--dequantize",
    ]);
    assert!(!err.contains("was trained on a quantized base"), "{err}");

    // What was trained, the merged dense base, and the merged dequantized base.
    let inputs = fx("inputs/decoder.safetensors");
    let out = |name: &str| t.path().join(name).display().to_string();
    let (trained, merged_dense, merged_exact) =
        (out("trained.st"), out("dense.st"), out("exact.st"));
    succeeds(&[
        "logits",
        "--model",
        &model,
        "--adapter",
        &run,
        "--quantize",
        "nf4",
        "--double-quant",
        "--inputs",
        &inputs,
        "--out",
        &trained,
    ]);
    succeeds(&[
        "logits",
        "--model",
        &dense,
        "--inputs",
        &inputs,
        "--out",
        &merged_dense,
    ]);
    succeeds(&[
        "logits",
        "--model",
        &exact,
        "--inputs",
        &inputs,
        "--out",
        &merged_exact,
    ]);
    let exact_diff = max_abs_diff(&trained, &merged_exact);
    let dense_diff = max_abs_diff(&trained, &merged_dense);
    assert!(exact_diff < 1e-4, "{exact_diff}");
    assert!(
        dense_diff > 100.0 * exact_diff.max(1e-6),
        "{dense_diff} vs {exact_diff}"
    );

    // `--quantize` again on a base that is already bitsandbytes NF4 is named, and writes
    // nothing (merge maps a dense base and quantizes it while writing).
    let nf4 = out("nf4");
    succeeds(&[
        "quantize",
        "--model",
        &model,
        "--quantize",
        "nf4",
        "--double-quant",
        "--output",
        &nf4,
    ]);
    let again = out("again");
    let err = fails(&[
        "merge",
        "--model",
        &nf4,
        "--adapter",
        &run,
        "--output",
        &again,
        "--quantize",
        "nf4",
    ]);
    assert!(
        err.contains(
            "is already quantized (bf16, nf4 (blocksize 64, double quant)); drop --quantize"
        ),
        "{err}"
    );
    assert!(!Path::new(&again).exists());
}
