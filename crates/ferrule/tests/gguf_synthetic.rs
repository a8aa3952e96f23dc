//! The GGUF loader on tiny hand-written files: layout, names, tokenizer, and every error case.
//! Needs no assets.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ferrule::model::gguf::{load_gguf, GgufError};

// ---------------------------------------------------------------------------------------------
// A minimal GGUF v3 writer
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum V {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

#[derive(Clone)]
struct T {
    name: String,
    /// ggml order (innermost first), as written in the file.
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn gguf_bytes(kv: &[(String, V)], tensors: &[T]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut b, k);
        match v {
            V::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            V::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            V::Bool(x) => {
                b.extend(7u32.to_le_bytes());
                b.push(*x as u8);
            }
            V::Str(s) => {
                b.extend(8u32.to_le_bytes());
                put_str(&mut b, s);
            }
            V::Strs(xs) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((xs.len() as u64).to_le_bytes());
                for s in xs {
                    put_str(&mut b, s);
                }
            }
            V::I32s(xs) => {
                b.extend(9u32.to_le_bytes());
                b.extend(5u32.to_le_bytes());
                b.extend((xs.len() as u64).to_le_bytes());
                for x in xs {
                    b.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(t.ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    let base = b.len();
    for (t, off) in tensors.iter().zip(offsets) {
        b.resize(base + off as usize, 0);
        b.extend(&t.data);
    }
    b
}

// ---------------------------------------------------------------------------------------------
// A tiny llama: hidden 8, 2 heads of 4, 1 kv head, ffn 16, 2 layers, vocab 10
// ---------------------------------------------------------------------------------------------

const HIDDEN: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 4;
const FFN: usize = 16;
const LAYERS: usize = 2;

fn tokens() -> Vec<String> {
    [
        "<|endoftext|>",
        "<|im_start|>",
        "a",
        "b",
        "Ġ",
        "ab",
        "Ġa",
        "Ġab",
        "<think>",
        "é",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Values that identify their HF position: `rows x cols` row-major, value = seed + row + col/100.
fn hf_values(rows: usize, cols: usize, seed: f32) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| seed + (i / cols) as f32 + (i % cols) as f32 / 100.0)
        .collect()
}

/// llama.cpp's `LlamaModel.permute` of the rows of an HF matrix.
fn llama_cpp_permute(w: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = w.len() / rows;
    let d = rows / heads / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for i in 0..d {
            for j in 0..2 {
                let dst = h * 2 * d + i * 2 + j;
                let src = h * 2 * d + j * d + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn f32_tensor(name: &str, rows: usize, cols: usize, values: Vec<f32>) -> T {
    let dims = if rows == 1 {
        vec![cols as u64]
    } else {
        vec![cols as u64, rows as u64]
    };
    T {
        name: name.to_string(),
        dims,
        ty: 0,
        data: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

struct Spec {
    kv: Vec<(String, V)>,
    tensors: Vec<T>,
}

impl Spec {
    fn llama(arch: &str) -> Self {
        let a = arch;
        let toks = tokens();
        let mut types = vec![1; toks.len()];
        types[0] = 3;
        types[1] = 3;
        types[8] = 4;
        let kv = vec![
            ("general.architecture".into(), V::Str(a.into())),
            (format!("{a}.block_count"), V::U32(LAYERS as u32)),
            (format!("{a}.context_length"), V::U32(128)),
            (format!("{a}.embedding_length"), V::U32(HIDDEN as u32)),
            (format!("{a}.feed_forward_length"), V::U32(FFN as u32)),
            (format!("{a}.attention.head_count"), V::U32(HEADS as u32)),
            (
                format!("{a}.attention.head_count_kv"),
                V::U32(KV_HEADS as u32),
            ),
            (format!("{a}.rope.freq_base"), V::F32(10000.0)),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                V::F32(1e-6),
            ),
            ("tokenizer.ggml.model".into(), V::Str("gpt2".into())),
            ("tokenizer.ggml.pre".into(), V::Str("smollm".into())),
            ("tokenizer.ggml.tokens".into(), V::Strs(toks.clone())),
            ("tokenizer.ggml.token_type".into(), V::I32s(types)),
            (
                "tokenizer.ggml.merges".into(),
                V::Strs(vec!["a b".into(), "Ġ a".into(), "Ġ ab".into()]),
            ),
            ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), V::U32(0)),
            ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
            (
                "tokenizer.chat_template".into(),
                V::Str("{{ messages }}".into()),
            ),
        ];
        let permutes = arch != "qwen2";
        let vocab = toks.len();
        let mut tensors = vec![f32_tensor(
            "token_embd.weight",
            vocab,
            HIDDEN,
            hf_values(vocab, HIDDEN, 0.0),
        )];
        for l in 0..LAYERS {
            let s = 1000.0 * (l + 1) as f32;
            let q = hf_values(HEADS * HEAD_DIM, HIDDEN, s + 100.0);
            let k = hf_values(KV_HEADS * HEAD_DIM, HIDDEN, s + 200.0);
            let (q, k) = if permutes {
                (
                    llama_cpp_permute(&q, HEADS * HEAD_DIM, HEADS),
                    llama_cpp_permute(&k, KV_HEADS * HEAD_DIM, KV_HEADS),
                )
            } else {
                (q, k)
            };
            let b = format!("blk.{l}");
            tensors.extend([
                f32_tensor(&format!("{b}.attn_q.weight"), HEADS * HEAD_DIM, HIDDEN, q),
                f32_tensor(
                    &format!("{b}.attn_k.weight"),
                    KV_HEADS * HEAD_DIM,
                    HIDDEN,
                    k,
                ),
                f32_tensor(
                    &format!("{b}.attn_v.weight"),
                    KV_HEADS * HEAD_DIM,
                    HIDDEN,
                    hf_values(KV_HEADS * HEAD_DIM, HIDDEN, s + 300.0),
                ),
                f32_tensor(
                    &format!("{b}.attn_output.weight"),
                    HIDDEN,
                    HEADS * HEAD_DIM,
                    hf_values(HIDDEN, HEADS * HEAD_DIM, s + 400.0),
                ),
                f32_tensor(
                    &format!("{b}.ffn_gate.weight"),
                    FFN,
                    HIDDEN,
                    hf_values(FFN, HIDDEN, s + 500.0),
                ),
                f32_tensor(
                    &format!("{b}.ffn_up.weight"),
                    FFN,
                    HIDDEN,
                    hf_values(FFN, HIDDEN, s + 600.0),
                ),
                f32_tensor(
                    &format!("{b}.ffn_down.weight"),
                    HIDDEN,
                    FFN,
                    hf_values(HIDDEN, FFN, s + 700.0),
                ),
                f32_tensor(
                    &format!("{b}.attn_norm.weight"),
                    1,
                    HIDDEN,
                    hf_values(1, HIDDEN, s + 800.0),
                ),
                f32_tensor(
                    &format!("{b}.ffn_norm.weight"),
                    1,
                    HIDDEN,
                    hf_values(1, HIDDEN, s + 900.0),
                ),
            ]);
            if arch == "qwen2" {
                tensors.extend([
                    f32_tensor(
                        &format!("{b}.attn_q.bias"),
                        1,
                        HEADS * HEAD_DIM,
                        hf_values(1, HEADS * HEAD_DIM, s + 110.0),
                    ),
                    f32_tensor(
                        &format!("{b}.attn_k.bias"),
                        1,
                        KV_HEADS * HEAD_DIM,
                        hf_values(1, KV_HEADS * HEAD_DIM, s + 210.0),
                    ),
                    f32_tensor(
                        &format!("{b}.attn_v.bias"),
                        1,
                        KV_HEADS * HEAD_DIM,
                        hf_values(1, KV_HEADS * HEAD_DIM, s + 310.0),
                    ),
                ]);
            }
        }
        tensors.push(f32_tensor(
            "output_norm.weight",
            1,
            HIDDEN,
            hf_values(1, HIDDEN, 5.0),
        ));
        Spec { kv, tensors }
    }

    fn set(mut self, key: &str, v: V) -> Self {
        self.kv.retain(|(k, _)| k != key);
        self.kv.push((key.to_string(), v));
        self
    }

    fn without_key(mut self, key: &str) -> Self {
        self.kv.retain(|(k, _)| k != key);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        gguf_bytes(&self.kv, &self.tensors)
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write(dir, name, &self.bytes())
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn load_err(path: &Path) -> (GgufError, String) {
    let err = load_gguf(path, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "message does not name the file: {msg}"
    );
    (err, msg)
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

#[test]
fn llama_loads_in_hf_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = Spec::llama("llama").write(dir.path(), "tiny.gguf");
    let m = load_gguf(&path, &Device::Cpu).unwrap();

    let c = &m.config;
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["hidden_size"], 8);
    assert_eq!(c["intermediate_size"], 16);
    assert_eq!(c["num_hidden_layers"], 2);
    assert_eq!(c["num_attention_heads"], 2);
    assert_eq!(c["num_key_value_heads"], 1);
    assert_eq!(c["max_position_embeddings"], 128);
    assert_eq!(c["rms_norm_eps"], serde_json::json!(1e-6));
    assert_eq!(c["rope_theta"], serde_json::json!(10000.0));
    assert_eq!(c["vocab_size"], 10);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["bos_token_id"], 1);
    assert_eq!(c["eos_token_id"], 0);
    assert_eq!(c["pad_token_id"], serde_json::Value::Null);
    assert!(c.get("head_dim").is_none());

    assert_eq!(m.tensors.len(), 1 + LAYERS * 9 + 1);
    assert_eq!(m.tensor_types, vec![("F32".to_string(), 20)]);
    // Every matrix is back in HF order, q and k included: row r of layer l's q is s + 100 + r.
    for l in 0..LAYERS {
        let s = 1000.0 * (l + 1) as f32;
        for (leaf, seed, n) in [
            ("self_attn.q_proj", 100.0, HEADS * HEAD_DIM),
            ("self_attn.k_proj", 200.0, KV_HEADS * HEAD_DIM),
            ("self_attn.v_proj", 300.0, KV_HEADS * HEAD_DIM),
            ("mlp.down_proj", 700.0, HIDDEN),
        ] {
            let t = &m.tensors[&format!("model.layers.{l}.{leaf}.weight")];
            let r = rows(t);
            assert_eq!(r.len(), n, "{leaf}");
            for (i, row) in r.iter().enumerate() {
                assert_eq!(row[0], s + seed + i as f32, "layer {l} {leaf} row {i}");
                assert_eq!(
                    row[3],
                    s + seed + i as f32 + 0.03,
                    "layer {l} {leaf} row {i}"
                );
            }
        }
    }
    let e = rows(&m.tensors["model.embed_tokens.weight"]);
    assert_eq!(e.len(), 10);
    assert_eq!(e[7][1], 7.01);
    let norm = m.tensors["model.layers.1.post_attention_layernorm.weight"]
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(norm[2], 2900.02);
    assert!(m.tensors.contains_key("model.norm.weight"));

    assert_eq!(m.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(m.eos_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(m.chat_template.as_deref(), Some("{{ messages }}"));
}

#[test]
fn qwen2_is_not_permuted_and_has_biases() {
    let dir = tempfile::tempdir().unwrap();
    let path = Spec::llama("qwen2").write(dir.path(), "qwen.gguf");
    let m = load_gguf(&path, &Device::Cpu).unwrap();
    assert_eq!(m.config["model_type"], "qwen2");
    assert_eq!(m.config["architectures"][0], "Qwen2ForCausalLM");
    let q = rows(&m.tensors["model.layers.0.self_attn.q_proj.weight"]);
    for (i, row) in q.iter().enumerate() {
        assert_eq!(row[0], 1100.0 + i as f32);
    }
    let b = m.tensors["model.layers.1.self_attn.k_proj.bias"]
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(b, vec![2210.0, 2210.01, 2210.02, 2210.03]);
    assert_eq!(m.tensors.len(), 1 + LAYERS * 12 + 1);
}

#[test]
fn untied_output_becomes_lm_head() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::llama("llama");
    spec.tensors.push(f32_tensor(
        "output.weight",
        10,
        HIDDEN,
        hf_values(10, HIDDEN, 9.0),
    ));
    let m = load_gguf(&spec.write(dir.path(), "untied.gguf"), &Device::Cpu).unwrap();
    assert_eq!(m.config["tie_word_embeddings"], false);
    assert_eq!(rows(&m.tensors["lm_head.weight"])[2][0], 11.0);
}

#[test]
fn byte_level_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let path = Spec::llama("llama").write(dir.path(), "tok.gguf");
    let m = load_gguf(&path, &Device::Cpu).unwrap();
    let ids = |s: &str| m.tokenizer.encode(s, true).unwrap().get_ids().to_vec();
    // "ab" merges, " ab" is one token, control and user-defined tokens stay whole, no BOS.
    assert_eq!(ids("ab ab a"), vec![5, 7, 6]);
    assert_eq!(ids("<|im_start|>ab<|endoftext|>"), vec![1, 5, 0]);
    assert_eq!(ids("b<think>a"), vec![3, 8, 2]);
    assert_eq!(
        m.tokenizer.decode(&[1, 5, 7, 8], false).unwrap(),
        "<|im_start|>ab ab<think>"
    );
    assert_eq!(m.tokenizer.decode(&[1, 5, 7], true).unwrap(), "ab ab");
}

#[test]
fn add_bos_token_true_adds_bos() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::llama("llama").set("tokenizer.ggml.add_bos_token", V::Bool(true));
    let m = load_gguf(&spec.write(dir.path(), "bos.gguf"), &Device::Cpu).unwrap();
    assert_eq!(m.tokenizer.encode("ab", true).unwrap().get_ids(), &[1, 5]);
    assert_eq!(m.tokenizer.encode("ab", false).unwrap().get_ids(), &[5]);
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "model.safetensors",
        b"{\"__metadata__\": {}} and more bytes",
    );
    let (err, msg) = load_err(&path);
    assert!(matches!(err, GgufError::NotGguf { .. }), "{err:?}");
    assert!(msg.contains("not a GGUF file"), "{msg}");

    let empty = write(dir.path(), "empty.gguf", b"");
    let (err, _) = load_err(&empty);
    assert!(matches!(err, GgufError::NotGguf { .. }), "{err:?}");

    let missing = dir.path().join("nope.gguf");
    let (err, msg) = load_err(&missing);
    assert!(matches!(err, GgufError::Io { .. }), "{err:?}");
    assert!(msg.contains("cannot read"), "{msg}");
}

#[test]
fn truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = Spec::llama("llama").bytes();
    // Cut inside the metadata, inside the tensor infos, and inside the data.
    for (name, keep) in [("meta.gguf", 200), ("infos.gguf", 1000), ("magic.gguf", 6)] {
        let path = write(dir.path(), name, &bytes[..keep]);
        let (err, msg) = load_err(&path);
        assert!(matches!(err, GgufError::Corrupt { .. }), "{name}: {err:?}");
        assert!(msg.contains("truncated or corrupt"), "{msg}");
    }
    let path = write(dir.path(), "data.gguf", &bytes[..bytes.len() - 8]);
    let (err, msg) = load_err(&path);
    assert!(matches!(err, GgufError::Corrupt { .. }), "{err:?}");
    assert!(
        msg.contains("tensor \"output_norm.weight\" needs bytes"),
        "{msg}"
    );
}

#[test]
fn unsupported_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::llama("llama").set("general.architecture", V::Str("falcon".into()));
    let (err, msg) = load_err(&spec.write(dir.path(), "falcon.gguf"));
    assert!(
        matches!(err, GgufError::UnsupportedArchitecture { .. }),
        "{err:?}"
    );
    assert!(
        msg.contains("unsupported GGUF architecture \"falcon\""),
        "{msg}"
    );
}

#[test]
fn unsupported_tensor_type() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::llama("llama");
    let t = spec
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.1.ffn_up.weight")
        .unwrap();
    t.ty = 16; // IQ2_XXS
    t.data.truncate(66);
    let (err, msg) = load_err(&spec.write(dir.path(), "iq.gguf"));
    assert!(
        matches!(err, GgufError::UnsupportedTensorType { .. }),
        "{err:?}"
    );
    assert!(
        msg.contains("\"blk.1.ffn_up.weight\"") && msg.contains("IQ2_XXS"),
        "{msg}"
    );
}

#[test]
fn missing_metadata_key() {
    let dir = tempfile::tempdir().unwrap();
    for key in [
        "llama.feed_forward_length",
        "llama.attention.layer_norm_rms_epsilon",
        "general.architecture",
        "tokenizer.ggml.merges",
    ] {
        let spec = Spec::llama("llama").without_key(key);
        let (err, msg) = load_err(&spec.write(dir.path(), "nokey.gguf"));
        assert!(
            matches!(err, GgufError::MissingKey { .. }),
            "{key}: {err:?}"
        );
        assert!(
            msg.contains(&format!("missing required metadata key \"{key}\"")),
            "{msg}"
        );
    }
}

#[test]
fn wrongly_typed_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::llama("llama").set("llama.block_count", V::Str("two".into()));
    let (err, msg) = load_err(&spec.write(dir.path(), "badkey.gguf"));
    assert!(matches!(err, GgufError::BadMetadata { .. }), "{err:?}");
    assert!(
        msg.contains("\"llama.block_count\"") && msg.contains("integer"),
        "{msg}"
    );
}

#[test]
fn unknown_tensor_name() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "blk.0.ffn_gate_exps.weight",
        "blk.2.attn_q.weight",
        "rope_freqs.weight",
    ] {
        let mut spec = Spec::llama("llama");
        spec.tensors.push(f32_tensor(name, 1, 8, vec![0.0; 8]));
        let (err, msg) = load_err(&spec.write(dir.path(), "extra.gguf"));
        assert!(matches!(err, GgufError::UnknownTensor { .. }), "{err:?}");
        assert!(
            msg.contains(&format!("unknown tensor name \"{name}\"")),
            "{msg}"
        );
    }
}

#[test]
fn missing_or_misshapen_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::llama("llama");
    spec.tensors.retain(|t| t.name != "blk.1.ffn_down.weight");
    let (err, msg) = load_err(&spec.write(dir.path(), "missing.gguf"));
    assert!(matches!(err, GgufError::MissingTensor { .. }), "{err:?}");
    assert!(
        msg.contains("model.layers.1.mlp.down_proj.weight (blk.1.ffn_down.weight)"),
        "{msg}"
    );

    let mut spec = Spec::llama("llama");
    let t = spec
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.0.attn_k.weight")
        .unwrap();
    t.dims = vec![8, 2];
    t.data.truncate(64);
    let (err, msg) = load_err(&spec.write(dir.path(), "shape.gguf"));
    assert!(matches!(err, GgufError::BadTensor { .. }), "{err:?}");
    assert!(
        msg.contains("\"blk.0.attn_k.weight\"") && msg.contains("expected [4, 8]"),
        "{msg}"
    );
}

#[test]
fn unsupported_tokenizer_model() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::llama("llama").set("tokenizer.ggml.model", V::Str("llama".into()));
    let (err, msg) = load_err(&spec.write(dir.path(), "spm.gguf"));
    assert!(
        matches!(err, GgufError::UnsupportedTokenizer { .. }),
        "{err:?}"
    );
    assert!(
        msg.contains("unsupported tokenizer model \"llama\""),
        "{msg}"
    );
}

/// Fuzzing found it (fuzz/corpus/gguf/tiny-llama.gguf): a merge whose result is longer than every
/// token made the tokenizers crate panic; a merge whose result is not a token is an error.
#[test]
fn a_merge_that_makes_no_token_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // The longest token merged with itself: longer than any token of the vocabulary.
    let longest = tokens().into_iter().max_by_key(|t| t.len()).unwrap();
    let spec = Spec::llama("llama").set(
        "tokenizer.ggml.merges",
        V::Strs(vec![format!("{longest} {longest}")]),
    );
    let path = spec.write(dir.path(), "merge.gguf");
    let msg = match load_gguf(&path, &Device::Cpu) {
        Ok(_) => panic!("a merge making no token was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        msg.contains("merge 0") && msg.contains("which is not in tokenizer.ggml.tokens"),
        "{msg}"
    );
}

/// Fuzzing found it: tensor dims whose product overflows (an overflow panic with debug
/// assertions, a wrapped small size without) are a corrupt file, not a small tensor.
#[test]
fn tensor_dims_whose_product_overflows_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::llama("llama");
    let t = spec
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    // 2^33 x 2^31 = 2^64 elements: wraps to 0.
    t.dims = vec![1 << 33, 1 << 31];
    let (err, msg) = load_err(&spec.write(dir.path(), "overflow.gguf"));
    assert!(matches!(err, GgufError::Corrupt { .. }), "{err:?}: {msg}");
    assert!(msg.contains("\"blk.0.attn_q.weight\" needs bytes"), "{msg}");
}

/// Fuzzing found it: a `block_count` of 2^32 made a 4 KB file take 22 GB (every required
/// tensor name was built first). The first absent layer is named, at once.
#[test]
fn a_huge_block_count_names_the_first_missing_layer() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::llama("llama").set("llama.block_count", V::U32(u32::MAX));
    let (err, msg) = load_err(&spec.write(dir.path(), "layers.gguf"));
    assert!(matches!(err, GgufError::MissingTensor { .. }), "{err:?}");
    assert!(
        msg.contains(&format!("model.layers.{LAYERS}.self_attn.q_proj.weight")),
        "{msg}"
    );
}

#[test]
fn out_of_range_metadata_is_an_error_naming_the_gguf_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("llama.attention.layer_norm_rms_epsilon", V::F32(0.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(-1e-6)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(f32::NAN)),
        ("llama.rope.freq_base", V::F32(0.0)),
        ("llama.rope.freq_base", V::F32(f32::INFINITY)),
        ("llama.context_length", V::U32(0)),
        ("llama.embedding_length", V::U32(0)),
        ("llama.feed_forward_length", V::U32(0)),
        ("llama.attention.head_count", V::U32(0)),
        ("llama.attention.head_count_kv", V::U32(3)),
        ("tokenizer.ggml.eos_token_id", V::U32(10)),
        ("tokenizer.ggml.bos_token_id", V::U32(u32::MAX)),
    ];
    for (key, value) in cases {
        let shown = format!("{value:?}");
        let spec = Spec::llama("llama").set(key, value);
        let (err, msg) = load_err(&spec.write(dir.path(), "range.gguf"));
        assert!(
            matches!(err, GgufError::BadMetadata { .. }),
            "{key} = {shown}: {err:?}"
        );
        assert!(
            msg.contains(&format!("\"{key}\"")) && msg.contains("range.gguf"),
            "{key} = {shown}: {msg}"
        );
    }
}
