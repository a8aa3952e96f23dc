//! `ferrule export gguf` from the library: models written as GGUF are read back by ferrule's
//! own GGUF reader with the source's logits (exactly in f32, within the rounding of f16, q8_0
//! and q4_0), read back by gguf-py (llama.cpp's Python package, in the reference venv) with
//! every key, name, shape, type and value checked (tests/fixtures/gguf_export/check_gguf.py),
//! and bad inputs are named errors that leave nothing written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use common::*;
use ferrule::adapted::AdaptedModel;
use ferrule::export::gguf::{
    export_lora_gguf, export_model_gguf, GgufExportOptions, GgufExportReport, OutType,
};
use ferrule::model::{Frozen, Inputs, LoadOptions, Model, ModelSource, Task};

fn opts(outtype: OutType) -> GgufExportOptions {
    GgufExportOptions {
        outtype,
        overwrite: false,
    }
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn logits_of(source: &ModelSource) -> Tensor {
    let dev = Device::Cpu;
    let model = Model::build(source, Task::CausalLm, &Frozen, &dev, 0).unwrap();
    let inputs = load("inputs/decoder.safetensors");
    model
        .forward(&Inputs {
            input_ids: &inputs["input_ids"],
            attention_mask: Some(&inputs["attention_mask"]),
            token_type_ids: None,
        })
        .unwrap()
}

fn mask() -> Tensor {
    load("inputs/decoder.safetensors")["attention_mask"].clone()
}

/// Exports `name` as `outtype`, reloads it with ferrule's GGUF reader, and returns the largest
/// logit difference to the source model with the report.
fn round_trip(name: &str, outtype: OutType) -> (f32, GgufExportReport, PathBuf) {
    let dev = Device::Cpu;
    let mut src = ModelSource::load(model_dir(name).to_str().unwrap(), &dev).unwrap();
    let dir = tempfile::tempdir().unwrap().keep();
    let out = dir.join(format!("{name}.{}.gguf", outtype.name()));
    let report = export_model_gguf(&src, None, &out, opts(outtype)).unwrap();
    let back = ModelSource::load(out.to_str().unwrap(), &dev).unwrap();
    if let Some(w) = report.sliding_window_dropped {
        // llama.cpp's llama architecture has no sliding window (nor has the file): compare
        // with the source attending to the whole context.
        assert_eq!(src.config["sliding_window"], w);
        src.config["sliding_window"] = serde_json::Value::Null;
    }
    let m = mask();
    let diff = max_diff_masked(&logits_of(&back), &logits_of(&src), Some(&m));
    (diff, report, out)
}

#[test]
fn f32_round_trip_gives_the_same_logits_for_every_family() {
    // llama (GQA, rope permutation), smollm (tied embeddings), qwen2 (q/k/v biases, no
    // permutation), mistral (written as llama, as convert_hf_to_gguf.py does).
    for name in ["llama", "smollm", "qwen2", "mistral"] {
        let (diff, report, _) = round_trip(name, OutType::F32);
        assert_eq!(diff, 0.0, "{name}: max |Δlogits| = {diff}");
        assert_eq!(report.sliding_window_dropped.is_some(), name == "mistral");
        assert_eq!(report.tensor_types.keys().collect::<Vec<_>>(), ["F32"]);
        assert!(report.max_error.is_none());
        let want_arch = if name == "qwen2" { "qwen2" } else { "llama" };
        assert_eq!(report.architecture, want_arch, "{name}");
    }
}

#[test]
fn a_gguf_file_re_exports_to_the_same_model() {
    let (_, first, path) = round_trip("llama", OutType::F32);
    let dev = Device::Cpu;
    let gguf = ModelSource::load(path.to_str().unwrap(), &dev).unwrap();
    let again = path.with_extension("again.gguf");
    let report = export_model_gguf(&gguf, None, &again, opts(OutType::F32)).unwrap();
    assert_eq!(report.tensor_types, first.tensor_types);
    assert_eq!(report.tokenizer_pre, first.tokenizer_pre);
    let back = ModelSource::load(again.to_str().unwrap(), &dev).unwrap();
    let m = mask();
    assert_eq!(
        max_diff_masked(&logits_of(&back), &logits_of(&gguf), Some(&m)),
        0.0
    );
    // The same tokens, ids and merges: the tokenizers encode alike.
    let text = "<|im_start|>user hello there 123<|im_end|>";
    let ids = |s: &ModelSource| {
        s.tokenizer()
            .unwrap()
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec()
    };
    assert_eq!(ids(&back), ids(&gguf));
}

#[test]
fn quantized_round_trips_stay_within_their_rounding() {
    // Measured on the fixture: f16 3.2e-3, q8_0 6.7e-2, q4_0 1.29. Each range starts above the
    // next finer type's error, so a type silently written as another fails.
    for (outtype, low, high) in [
        (OutType::F16, 3e-4, 2e-2),
        (OutType::Q8_0, 1e-2, 0.3),
        (OutType::Q4_0, 0.3, 4.0),
    ] {
        let (diff, report, _) = round_trip("llama", outtype);
        assert!(
            diff > low && diff < high,
            "{outtype:?}: max |Δlogits| = {diff}, expected in ({low}, {high})"
        );
        let ty = outtype.tensor_type().name();
        // 2 layers × 7 matrices + embedding + head in the outtype; 2 × 2 norms + final norm F32.
        assert_eq!(report.tensor_types[ty], 16, "{report:?}");
        assert_eq!(report.tensor_types["F32"], 5, "{report:?}");
        assert!(report.f16_fallback.is_empty());
        let e = report.max_error.expect("a lossy type reports its error");
        assert!(e.max_abs > 0.0);
    }
}

#[test]
fn merged_adapter_gives_peft_logits() {
    let dev = Device::Cpu;
    let m = AdaptedModel::load_with(
        model_dir("llama").to_str().unwrap(),
        Some(&fixtures().join("adapters/llama_lora")),
        None,
        &dev,
        LoadOptions::quantized(None),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.gguf");
    let report =
        export_model_gguf(&m.source, m.tuner.as_deref(), &out, opts(OutType::F32)).unwrap();
    assert_eq!(report.merged_modules, Some(4), "{report:?}");
    let back = ModelSource::load(out.to_str().unwrap(), &dev).unwrap();
    let expected = &load("expected/llama_lora_logits.safetensors")["logits"];
    let msk = mask();
    let diff = max_diff_masked(&logits_of(&back), expected, Some(&msk));
    assert!(diff < 1e-4, "merged GGUF vs peft: max |Δlogits| = {diff}");
}

/// A tiny llama whose hidden size (48) is not a multiple of the 32-value blocks: every matrix
/// reading rows of 48 falls back to F16, as convert_hf_to_gguf.py does; ffn_down (rows of 64)
/// stays in Q4_0.
fn odd_width_model(dir: &Path) -> PathBuf {
    let m = dir.join("odd");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir("llama").join(f), m.join(f)).unwrap();
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 48,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 320, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128, "tie_word_embeddings": true, "rope_theta": 10000.0,
        "hidden_act": "silu", "eos_token_id": 2, "pad_token_id": 0
    });
    std::fs::write(m.join("config.json"), config.to_string()).unwrap();
    let dev = Device::Cpu;
    let mut tensors = vec![];
    let mut add = |name: &str, shape: &[usize]| {
        let seed = tensors.len() as f32;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.618 + seed).sin()) * 0.2)
            .collect();
        tensors.push((name.to_string(), Tensor::from_vec(v, shape, &dev).unwrap()));
    };
    add("model.embed_tokens.weight", &[320, 48]);
    add("model.norm.weight", &[48]);
    let l = "model.layers.0";
    add(&format!("{l}.input_layernorm.weight"), &[48]);
    add(&format!("{l}.post_attention_layernorm.weight"), &[48]);
    add(&format!("{l}.self_attn.q_proj.weight"), &[48, 48]);
    add(&format!("{l}.self_attn.k_proj.weight"), &[24, 48]);
    add(&format!("{l}.self_attn.v_proj.weight"), &[24, 48]);
    add(&format!("{l}.self_attn.o_proj.weight"), &[48, 48]);
    add(&format!("{l}.mlp.gate_proj.weight"), &[64, 48]);
    add(&format!("{l}.mlp.up_proj.weight"), &[64, 48]);
    add(&format!("{l}.mlp.down_proj.weight"), &[48, 64]);
    ferrule::util::atomic::save_safetensors_atomic(&m.join("model.safetensors"), &tensors, None)
        .unwrap();
    m
}

/// A tiny llama with rows of 256 values (whole Q4_K super-blocks) except ffn_down's 480 (whole
/// 32-value blocks only: Q5_0 under q4_k, as llama-quantize falls back).
fn wide_model(dir: &Path) -> PathBuf {
    let m = dir.join("wide");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir("llama").join(f), m.join(f)).unwrap();
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 480, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 320, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128, "tie_word_embeddings": true, "rope_theta": 10000.0,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
    });
    std::fs::write(m.join("config.json"), config.to_string()).unwrap();
    let dev = Device::Cpu;
    let mut tensors = vec![];
    let mut add = |name: &str, shape: &[usize], scale: f32| {
        let seed = tensors.len() as f32;
        let n: usize = shape.iter().product();
        // Irregular values: a sum of incommensurate sines, so blocks differ in range and sign.
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let x = i as f32;
                ((x * 0.618 + seed).sin() + 0.5 * (x * 0.0137 + 2.0 * seed).sin()) * scale
            })
            .collect();
        tensors.push((name.to_string(), Tensor::from_vec(v, shape, &dev).unwrap()));
    };
    add("model.embed_tokens.weight", &[320, 256], 0.5);
    add("model.norm.weight", &[256], 1.0);
    let l = "model.layers.0";
    add(&format!("{l}.input_layernorm.weight"), &[256], 1.0);
    add(&format!("{l}.post_attention_layernorm.weight"), &[256], 1.0);
    add(&format!("{l}.self_attn.q_proj.weight"), &[256, 256], 0.06);
    add(&format!("{l}.self_attn.k_proj.weight"), &[128, 256], 0.06);
    add(&format!("{l}.self_attn.v_proj.weight"), &[128, 256], 0.06);
    add(&format!("{l}.self_attn.o_proj.weight"), &[256, 256], 0.06);
    add(&format!("{l}.mlp.gate_proj.weight"), &[480, 256], 0.06);
    add(&format!("{l}.mlp.up_proj.weight"), &[480, 256], 0.06);
    add(&format!("{l}.mlp.down_proj.weight"), &[256, 480], 0.05);
    ferrule::util::atomic::save_safetensors_atomic(&m.join("model.safetensors"), &tensors, None)
        .unwrap();
    m
}

#[test]
fn q4_k_writes_super_blocks_and_falls_back_to_q5_0() {
    let t = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let dir = wide_model(t.path());
    let src = ModelSource::load(dir.to_str().unwrap(), &dev).unwrap();
    let mut diffs = vec![];
    for outtype in [OutType::Q8_0, OutType::Q4K] {
        let out = t.path().join(format!("wide.{}.gguf", outtype.name()));
        let report = export_model_gguf(&src, None, &out, opts(outtype)).unwrap();
        let back = ModelSource::load(out.to_str().unwrap(), &dev).unwrap();
        let msk = mask();
        diffs.push(max_diff_masked(
            &logits_of(&back),
            &logits_of(&src),
            Some(&msk),
        ));
        if outtype == OutType::Q4K {
            // token_embd (tied head), q, k, v, output, gate, up: Q4_K; ffn_down: Q5_0.
            assert_eq!(report.tensor_types["Q4_K"], 7, "{report:?}");
            assert_eq!(report.tensor_types["Q5_0"], 1, "{report:?}");
            assert_eq!(report.q5_0_fallback, ["blk.0.ffn_down.weight"]);
            assert!(report.f16_fallback.is_empty(), "{report:?}");
            check_with_gguf_py(&[
                "model",
                out.to_str().unwrap(),
                dir.to_str().unwrap(),
                "q4_k",
            ]);
        }
    }
    // Q4_K rounds more than Q8_0 (its steps are about 8 times Q8_0's: measured 2.86 against
    // 0.377), and stays small against the logits (max |logit| 34).
    let (q8, q4k) = (diffs[0], diffs[1]);
    let scale = logits_of(&src)
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        q4k > 2.0 * q8 && q4k < 20.0 * q8 && q4k < 0.2 * scale,
        "max |Δlogits|: q8_0 {q8}, q4_k {q4k}; max |logit| {scale}"
    );
    eprintln!("max |Δlogits|: q8_0 {q8}, q4_k {q4k}; max |logit| {scale}");
}

#[test]
fn q4_0_falls_back_to_f16_for_rows_that_are_not_whole_blocks() {
    let t = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let src = ModelSource::load(odd_width_model(t.path()).to_str().unwrap(), &dev).unwrap();
    let out = t.path().join("odd.gguf");
    let report = export_model_gguf(&src, None, &out, opts(OutType::Q4_0)).unwrap();
    let mut fell: Vec<&str> = report.f16_fallback.iter().map(String::as_str).collect();
    fell.sort();
    assert_eq!(
        fell,
        [
            "blk.0.attn_k.weight",
            "blk.0.attn_output.weight",
            "blk.0.attn_q.weight",
            "blk.0.attn_v.weight",
            "blk.0.ffn_gate.weight",
            "blk.0.ffn_up.weight",
            "token_embd.weight"
        ]
    );
    assert_eq!(report.tensor_types["Q4_0"], 1, "{report:?}");
    assert_eq!(report.tensor_types["F16"], 7, "{report:?}");
    let back = ModelSource::load(out.to_str().unwrap(), &dev).unwrap();
    let msk = mask();
    let diff = max_diff_masked(&logits_of(&back), &logits_of(&src), Some(&msk));
    assert!(diff > 0.0 && diff < 0.1, "max |Δlogits| = {diff}");
}

#[test]
fn bad_inputs_are_named_and_leave_nothing_written() {
    let dev = Device::Cpu;
    let t = tempfile::tempdir().unwrap();
    // An encoder: named, with the architectures that are supported.
    let bert = ModelSource::load(model_dir("bert").to_str().unwrap(), &dev).unwrap();
    let out = t.path().join("bert.gguf");
    let err = export_model_gguf(&bert, None, &out, opts(OutType::F16))
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"bert\"") && err.contains("llama"), "{err}");
    assert!(!out.exists());

    // An existing output is kept unless overwrite is asked for.
    let llama = ModelSource::load(model_dir("llama").to_str().unwrap(), &dev).unwrap();
    let out = t.path().join("exists.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let err = export_model_gguf(&llama, None, &out, opts(OutType::F32))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already exists") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let o = GgufExportOptions {
        overwrite: true,
        ..opts(OutType::F32)
    };
    export_model_gguf(&llama, None, &out, o).unwrap();
    assert_eq!(&std::fs::read(&out).unwrap()[..4], b"GGUF");

    // An unknown outtype lists the valid ones.
    let err = "q5_k".parse::<OutType>().unwrap_err().to_string();
    assert!(err.contains("f32, f16, q8_0, q4_0, q4_1, q4_k"), "{err}");

    // llama3 rope scaling is refused by name rather than written without its factors.
    let l3 = ModelSource::load(model_dir("llama3rope").to_str().unwrap(), &dev).unwrap();
    let out = t.path().join("l3.gguf");
    let err = export_model_gguf(&l3, None, &out, opts(OutType::F32))
        .unwrap_err()
        .to_string();
    assert!(err.contains("Llama3") && err.contains("rope"), "{err}");
    assert!(!out.exists());
}

#[test]
fn lora_adapter_layout_and_refusals() {
    let dev = Device::Cpu;
    let t = tempfile::tempdir().unwrap();
    let llama = ModelSource::load(model_dir("llama").to_str().unwrap(), &dev).unwrap();
    let out = t.path().join("lora.gguf");
    let adapter = fixtures().join("adapters/llama_lora");
    let report = export_lora_gguf(&llama, &adapter, &out, opts(OutType::F32)).unwrap();
    assert_eq!(report.kind, "adapter");
    // q_proj and v_proj in 2 layers, an A and a B each.
    assert_eq!(report.tensors, 8, "{report:?}");
    let bytes = std::fs::read(&out).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes))
        .unwrap();
    assert_eq!(c.metadata["general.type"].to_string().unwrap(), "adapter");
    assert_eq!(c.metadata["adapter.type"].to_string().unwrap(), "lora");
    assert_eq!(c.metadata["adapter.lora.alpha"].to_f32().unwrap(), 8.0);
    // candle reports dims outermost first: lora_a [r, in], lora_b [out, r].
    assert_eq!(
        c.tensor_infos["blk.0.attn_q.weight.lora_a"].shape.dims(),
        &[4, 64]
    );
    assert_eq!(
        c.tensor_infos["blk.1.attn_v.weight.lora_b"].shape.dims(),
        &[32, 4]
    );

    // q4_0 and q4_k are not among convert_lora_to_gguf.py's types.
    for outtype in [OutType::Q4_0, OutType::Q4K] {
        let err = export_lora_gguf(&llama, &adapter, &t.path().join("q4.gguf"), opts(outtype))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f32, f16 or q8_0") && err.contains(outtype.name()),
            "{err}"
        );
    }
    // Methods llama.cpp cannot load as an adapter are named, and nothing is written.
    for (method, needle) in [
        ("llama_ia3", "IA3"),
        ("llama_dora", "use_dora"),
        ("llama_pissa/initial", "PiSSA"),
    ] {
        let out = t.path().join(format!("{}.gguf", method.replace('/', "_")));
        let dir = fixtures().join("methods").join(method);
        let err = format!(
            "{:#}",
            export_lora_gguf(&llama, &dir, &out, opts(OutType::F32)).unwrap_err()
        );
        assert!(
            err.contains(needle) && err.contains("llama.cpp"),
            "{method}: {err}"
        );
        assert!(!out.exists(), "{method}");
    }
}

/// The reference venv's python with gguf-py, or None (the test then says why it skipped).
fn ref_python() -> Option<PathBuf> {
    let venv = std::env::var("FERRULE_REF_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/ferrule/ref-venv")
        });
    let py = venv.join("bin/python");
    if py.exists() {
        Some(py)
    } else {
        eprintln!(
            "skipping: no reference venv at {} (scripts/reference-venv.sh makes it)",
            venv.display()
        );
        None
    }
}

fn check_with_gguf_py(args: &[&str]) {
    let Some(py) = ref_python() else { return };
    let script = fixtures().join("gguf_export/check_gguf.py");
    let out = Command::new(&py).arg(&script).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "check_gguf.py {args:?} failed:\n{text}"
    );
    assert!(text.contains("OK:"), "{text}");
}

#[test]
fn gguf_py_reads_back_models_of_every_outtype() {
    if ref_python().is_none() {
        return;
    }
    for (name, outtype) in [
        ("llama", OutType::F32),
        ("llama", OutType::F16),
        ("llama", OutType::Q8_0),
        ("llama", OutType::Q4_0),
        ("qwen2", OutType::Q8_0),
        ("smollm", OutType::Q4_0),
    ] {
        let (_, _, out) = round_trip(name, outtype);
        let dir = model_dir(name);
        check_with_gguf_py(&[
            "model",
            out.to_str().unwrap(),
            dir.to_str().unwrap(),
            outtype.name(),
        ]);
    }
}

#[test]
fn gguf_py_reads_back_a_merged_model_and_a_lora_adapter() {
    if ref_python().is_none() {
        return;
    }
    let dev = Device::Cpu;
    let t = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("adapters/llama_lora");
    let m = AdaptedModel::load_with(
        model_dir("llama").to_str().unwrap(),
        Some(&adapter),
        None,
        &dev,
        LoadOptions::quantized(None),
    )
    .unwrap();
    let merged = t.path().join("merged.gguf");
    export_model_gguf(&m.source, m.tuner.as_deref(), &merged, opts(OutType::Q8_0)).unwrap();
    check_with_gguf_py(&[
        "model",
        merged.to_str().unwrap(),
        model_dir("llama").to_str().unwrap(),
        "q8_0",
        adapter.to_str().unwrap(),
    ]);
    let lora = t.path().join("lora.gguf");
    export_lora_gguf(&m.source, &adapter, &lora, opts(OutType::F32)).unwrap();
    check_with_gguf_py(&[
        "lora",
        lora.to_str().unwrap(),
        model_dir("llama").to_str().unwrap(),
        adapter.to_str().unwrap(),
    ]);
    // rsLoRA's alpha / sqrt(r) and an alpha_pattern entry are folded into lora_b, so that
    // llama.cpp's alpha / r gives PEFT's update; rank_pattern needs nothing.
    for (model, adapter) in [
        ("qwen2", "qwen2_allin_rslora"),
        ("mistral", "mistral_patterns"),
    ] {
        let src = ModelSource::load(model_dir(model).to_str().unwrap(), &dev).unwrap();
        let dir = fixtures().join("adapters").join(adapter);
        let lora = t.path().join(format!("{adapter}.gguf"));
        export_lora_gguf(&src, &dir, &lora, opts(OutType::F32)).unwrap();
        check_with_gguf_py(&[
            "lora",
            lora.to_str().unwrap(),
            model_dir(model).to_str().unwrap(),
            dir.to_str().unwrap(),
        ]);
    }
}

/// The python of the venv scripts/llama-cpp-venv.sh makes, if llama_cpp imports there.
fn llama_cpp_python() -> Option<PathBuf> {
    let venv = std::env::var("FERRULE_LLAMA_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/ferrule/llama-venv")
        });
    let py = venv.join("bin/python");
    let imports = py.exists()
        && Command::new(&py)
            .args(["-c", "import llama_cpp"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !imports {
        eprintln!(
            "skipping: no llama-cpp-python in {} (scripts/llama-cpp-venv.sh builds it)",
            venv.display()
        );
        return None;
    }
    Some(py)
}

/// ferrule's logits for `ids` (one sequence, no padding) as JSON rows.
fn ferrule_logits(
    source: &ModelSource,
    hook: &dyn ferrule::model::ModelHook,
    ids: &[i64],
) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let model = Model::build(source, Task::CausalLm, hook, &dev, 0).unwrap();
    let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let out = model
        .forward(&Inputs {
            input_ids: &input,
            attention_mask: None,
            token_type_ids: None,
        })
        .unwrap();
    out.squeeze(0).unwrap().to_vec2().unwrap()
}

#[test]
fn llama_cpp_loads_the_model_and_the_lora_adapter_with_ferrules_logits() {
    let Some(py) = llama_cpp_python() else { return };
    let dev = Device::Cpu;
    let t = tempfile::tempdir().unwrap();
    let src = ModelSource::load(model_dir("llama").to_str().unwrap(), &dev).unwrap();
    let adapter = fixtures().join("adapters/llama_lora");
    let base = t.path().join("base.gguf");
    let lora = t.path().join("lora.gguf");
    export_model_gguf(&src, None, &base, opts(OutType::F32)).unwrap();
    export_lora_gguf(&src, &adapter, &lora, opts(OutType::F32)).unwrap();
    let ids: Vec<i64> = vec![1, 40, 75, 120, 7, 250, 33, 64, 99, 2];
    let saved = ferrule::peft_io::load_adapter(&adapter, &dev).unwrap();
    let tuner = saved.into_tuner(0, &dev).unwrap();
    let plain = ferrule_logits(&src, &Frozen, &ids);
    let adapted = ferrule_logits(&src, tuner.as_ref(), &ids);
    let flat = |v: &Vec<Vec<f32>>| v.concat();
    let effect = max_abs_diff(&flat(&plain), &flat(&adapted));
    // The adapter must change the logits far more than the tolerance, or the check proves nothing.
    assert!(
        effect > 0.1,
        "the adapter changes the logits by only {effect}"
    );
    // A q8_0 file: ferrule reads its blocks back to f32, llama.cpp also rounds the activations
    // to Q8_0 blocks in its products, so they agree only to that rounding (measured 6.5e-2).
    let q8 = t.path().join("q8.gguf");
    export_model_gguf(&src, None, &q8, opts(OutType::Q8_0)).unwrap();
    let q8_src = ModelSource::load(q8.to_str().unwrap(), &dev).unwrap();
    let q8_logits = ferrule_logits(&q8_src, &Frozen, &ids);
    // A q4_k file (Q4_K super-blocks, ffn_down in Q5_0): ferrule reads the blocks back to f32;
    // llama.cpp rounds the activations to Q8_K / Q8_0 blocks in its products.
    let wide = ModelSource::load(wide_model(t.path()).to_str().unwrap(), &dev).unwrap();
    let q4k = t.path().join("q4k.gguf");
    export_model_gguf(&wide, None, &q4k, opts(OutType::Q4K)).unwrap();
    let q4k_src = ModelSource::load(q4k.to_str().unwrap(), &dev).unwrap();
    let q4k_logits = ferrule_logits(&q4k_src, &Frozen, &ids);
    for (model, gguf_lora, logits, tol) in [
        (&base, None, plain, 1e-4),
        (&base, Some(&lora), adapted, 1e-4),
        (&q8, None, q8_logits, 0.15),
        // Measured 0.51 (the logits reach 34): llama.cpp's Q8_K activations.
        (&q4k, None, q4k_logits, 1.0),
    ] {
        let expected = t.path().join("expected.json");
        let json = serde_json::json!({"ids": ids, "logits": logits, "tol": tol});
        std::fs::write(&expected, json.to_string()).unwrap();
        let mut cmd = Command::new(&py);
        cmd.arg(fixtures().join("gguf_export/check_llama_cpp.py"))
            .arg(&expected)
            .arg(model);
        if let Some(l) = gguf_lora {
            cmd.arg(l);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && text.contains("OK:"), "{text}");
        eprint!("{text}");
    }
}

/// Rows of f32 weights with llama.cpp's Q4_K (and Q5_0 fallback) bytes and gguf-py's
/// dequantization of them (tests/fixtures/gguf_export/make_q4_k_fixture.py).
#[test]
fn q4_k_and_q5_0_blocks_equal_llama_cpps_quantizer() {
    use candle_core::quantized::GgmlDType;
    use ferrule::quant::ggml::GgmlMatrix;
    use ferrule::quant::ggml_quantize::GgmlWriteType;
    use ferrule::quant::QuantMatrix;
    let path = fixtures().join("gguf_export/q4_k_llama_cpp.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let v = st.tensor(name).unwrap();
        let vals = v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (v.shape().to_vec(), vals)
    };
    let mut checked = std::collections::BTreeMap::new();
    for name in st.names() {
        let Some(tensor) = name.strip_suffix(".f32") else {
            continue;
        };
        let (ty, dtype, key) = if let Ok(v) = st.tensor(&format!("{tensor}.q4_k")) {
            (GgmlWriteType::Q4K, GgmlDType::Q4K, v)
        } else {
            let v = st.tensor(&format!("{tensor}.q5_0")).unwrap();
            (GgmlWriteType::Q5_0, GgmlDType::Q5_0, v)
        };
        let want = key.data();
        let (shape, x) = f32s(name);
        let got = ty.encode(&x);
        let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
        assert_eq!(
            first_diff, None,
            "{tensor} ({ty:?}): bytes differ from llama.cpp's"
        );
        assert_eq!(got.len(), want.len(), "{tensor}");
        // Decoding: ferrule's writer-side decoder, its GGUF reader's (quant/ggml.rs) and
        // gguf-py's agree exactly.
        let (_, deq) = f32s(&format!("{tensor}.dequantized"));
        assert_eq!(ty.decode(want), deq, "{tensor}: decode");
        let m = GgmlMatrix::new(dtype, shape[0], shape[1], want).unwrap();
        assert_eq!(m.dequantize(), deq, "{tensor}: GGUF reader");
        *checked.entry(ty.name()).or_insert(0) += shape[0];
    }
    assert!(checked["Q4_K"] >= 16 && checked["Q5_0"] >= 4, "{checked:?}");
}
