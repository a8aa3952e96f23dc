//! `ferrule merge --config` against mergekit 0.1.5: every case in
//! tests/fixtures/merge_models (made by make_mergekit_fixtures.py) merged by ferrule equals
//! mergekit's output within 1e-5; random methods are checked statistically; bad inputs are
//! named errors that leave nothing written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferrule::merge::models::config::MergeConfig;
use ferrule::merge::models::{merge, merge_from_config, ModelMergeOptions};
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/merge_models")
}

fn read_f32(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, (v.shape().to_vec(), vals))
        })
        .collect()
}

#[test]
fn every_fixture_equals_mergekit() {
    let root = fixtures();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root.join("cases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let mut methods = std::collections::BTreeSet::new();
    for case in cases {
        let name = case.file_stem().unwrap().to_string_lossy().to_string();
        let config = MergeConfig::read(&case).unwrap();
        methods.insert(config.merge_method.clone());
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("merged");
        let report = merge(&config, Some(&root), &dir, &ModelMergeOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let ours = read_f32(&dir.join("model.safetensors"));
        let theirs = read_f32(&root.join("expected").join(format!("{name}.safetensors")));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{name}: tensor names"
        );
        assert_eq!(report.tensors_written, theirs.len());
        let mut worst = (0f32, String::new());
        for (t, (shape, want)) in &theirs {
            let (s, got) = &ours[t];
            assert_eq!(s, shape, "{name}: {t}");
            for (a, b) in got.iter().zip(want) {
                if (a - b).abs() > worst.0 {
                    worst = ((a - b).abs(), t.clone());
                }
            }
        }
        assert!(
            worst.0 <= 1e-5,
            "{name}: max |ferrule - mergekit| = {} in {}",
            worst.0,
            worst.1
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["torch_dtype"], "float32", "{name}");
        assert_eq!(
            cfg["num_hidden_layers"].as_u64().unwrap() as usize,
            report.layers,
            "{name}"
        );
    }
    for m in [
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "slerp",
        "model_stock",
        "passthrough",
    ] {
        assert!(methods.contains(m), "no fixture for {m}");
    }
}

/// A model folder of `tensors` (f32) with a Llama config of `layers` layers.
fn write_model(dir: &Path, layers: usize, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
    std::fs::create_dir_all(dir).unwrap();
    let raw: Vec<(String, ferrule::util::atomic::RawTensor)> = tensors
        .iter()
        .map(|(n, (s, v))| {
            (
                n.clone(),
                ferrule::util::atomic::RawTensor::f32s(s.clone(), v),
            )
        })
        .collect();
    let map: BTreeMap<String, _> = raw.into_iter().collect();
    ferrule::util::atomic::save_raw_safetensors_atomic(&dir.join("model.safetensors"), &map, None)
        .unwrap();
    let cfg = serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": layers, "hidden_size": 4});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

fn model(seed: u32, vocab: usize, n: usize) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    // A small deterministic generator: the values only need to differ between models.
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x as f32 / u32::MAX as f32) - 0.5
    };
    let mut m = BTreeMap::new();
    m.insert(
        "model.embed_tokens.weight".to_string(),
        (vec![vocab, 4], (0..vocab * 4).map(|_| next()).collect()),
    );
    m.insert(
        "model.layers.0.mlp.up_proj.weight".to_string(),
        (vec![n / 4, 4], (0..n).map(|_| next()).collect()),
    );
    m.insert(
        "model.norm.weight".to_string(),
        (vec![4], (0..4).map(|_| next()).collect()),
    );
    m
}

/// Writes `yaml` beside models a, b, c, d (c's vocabulary is 10, the others' 8) and merges it.
fn try_merge(yaml: &str) -> (tempfile::TempDir, anyhow::Result<()>) {
    let tmp = tempfile::tempdir().unwrap();
    write_model(&tmp.path().join("a"), 1, &model(1, 8, 64));
    write_model(&tmp.path().join("b"), 1, &model(2, 8, 64));
    write_model(&tmp.path().join("c"), 1, &model(3, 10, 64));
    write_model(&tmp.path().join("d"), 1, &model(4, 8, 64));
    let cfg = tmp.path().join("merge.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = tmp.path().join("out");
    let r = merge_from_config(&cfg, &out, &ModelMergeOptions::default()).map(|_| ());
    if r.is_err() {
        assert!(!out.exists(), "an error left {}", out.display());
        assert!(!tmp.path().join("out.tmp").exists());
    }
    (tmp, r)
}

fn err_of(yaml: &str) -> String {
    let (_tmp, r) = try_merge(yaml);
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn bad_inputs_are_named_errors_that_write_nothing() {
    let e = err_of("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 1, density: 1.5}\n");
    assert!(e.contains("density = 1.5") && e.contains("(0, 1]"), "{e}");
    let e = err_of("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 1, density: 0}\n");
    assert!(e.contains("density = 0"), "{e}");
    let e = err_of("merge_method: tie\nbase_model: a\nmodels: [{model: b}]\n");
    assert!(
        e.contains("unknown method \"tie\"") && e.contains("breadcrumbs_ties"),
        "{e}"
    );
    let e = err_of("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 1, densty: 0.5}\n");
    assert!(e.contains("models[0].parameters.densty"), "{e}");
    let e = err_of("merge_method: ties\nbase_model: a\nmodels: [{model: b}]\nnormalise: true\n");
    assert!(
        e.contains("unknown field `normalise`") && e.contains("merge.yaml"),
        "{e}"
    );
    // Weights that do not match the models: one model lacks its weight.
    let e = err_of("merge_method: task_arithmetic\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 1}\n  - model: d\n");
    assert!(
        e.contains("missing required parameter weight for model d"),
        "{e}"
    );
    // Shapes that differ: the error names the tensor and both shapes.
    let e = err_of("merge_method: task_arithmetic\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 1}\n  - model: c\n    parameters: {weight: 1}\n");
    assert!(
        e.contains("tensor model.embed_tokens.weight: shape [8, 4] in b but [10, 4] in c"),
        "{e}"
    );
    let e = err_of("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n");
    assert!(e.contains("missing required parameter t"), "{e}");
    // The `tokenizer:` block: with tokenizer_source too, an unknown key, a source given twice.
    let e = err_of("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer_source: base\ntokenizer: {source: base}\n");
    assert!(
        e.contains("`tokenizer_source` and the `tokenizer` block"),
        "{e}"
    );
    let e = err_of("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer: {source: base, pad_to: 8}\n");
    assert!(e.contains("pad_to"), "{e}");
    let e = err_of("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer:\n  tokens: {x: {source: {kind: model_token, model: a, token_id: 1, token: y}}}\n");
    assert!(e.contains("one of token_id or token"), "{e}");
    // A tokenizer that cannot be read: the error names the file.
    let e = err_of("merge_method: linear\nbase_model: a\nmodels: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]\ntokenizer_source: union\n");
    assert!(e.contains("tokenizer.json") && e.contains("model a"), "{e}");
}

/// The added tokens of a `tokenizer.json`: (id, content, special, normalized).
fn added_tokens(path: &Path) -> Vec<(u64, String, bool, bool)> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_u64().unwrap(),
                t["content"].as_str().unwrap().to_string(),
                t["special"].as_bool().unwrap(),
                t["normalized"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn union_tokenizer_equals_mergekits() {
    // The tensors are checked with every other case; here the tokenizer and vocab_size, with
    // `tokenizer_source: union` and with the `tokenizer:` block (a token added, padding).
    for case in ["llama_ties_tokenizer_union", "llama_ties_tokenizer_block"] {
        check_merged_tokenizer(case);
    }
}

fn check_merged_tokenizer(case: &str) {
    let root = fixtures();
    let config = MergeConfig::read(&root.join("cases").join(format!("{case}.yaml"))).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("merged");
    merge(&config, Some(&root), &dir, &ModelMergeOptions::default()).unwrap();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("expected").join(format!("{case}.encoded.json")))
            .unwrap(),
    )
    .unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], expected["vocab_size"], "{case}");
    let ours = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text = expected["text"].as_str().unwrap();
    let ids = ours.encode(text, true).unwrap().get_ids().to_vec();
    let want: Vec<u32> = expected["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want, "{case}: {text:?}");
    assert_eq!(
        added_tokens(&dir.join("tokenizer.json")),
        added_tokens(&root.join("expected").join(format!("{case}.tokenizer.json")))
    );
    // The other tokenizer files are the base's.
    assert!(dir.join("tokenizer_config.json").is_file());
}

#[test]
fn random_methods_keep_density_and_rescale_the_l1_norm() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 40_000;
    write_model(&tmp.path().join("a"), 1, &model(1, 8, n));
    write_model(&tmp.path().join("b"), 1, &model(2, 8, n));
    let run = |yaml: &str, out: &str| {
        let cfg = tmp.path().join(format!("{out}.yaml"));
        std::fs::write(&cfg, yaml).unwrap();
        let opts = ModelMergeOptions {
            seed: 7,
            ..Default::default()
        };
        merge_from_config(&cfg, &tmp.path().join(out), &opts).unwrap();
        read_f32(&tmp.path().join(out).join("model.safetensors"))
    };
    let base = read_f32(&tmp.path().join("a/model.safetensors"));
    let tuned = read_f32(&tmp.path().join("b/model.safetensors"));
    let name = "model.layers.0.mlp.up_proj.weight";
    let delta = |m: &BTreeMap<String, (Vec<usize>, Vec<f32>)>| -> Vec<f32> {
        m[name]
            .1
            .iter()
            .zip(&base[name].1)
            .map(|(x, b)| x - b)
            .collect()
    };
    let full = delta(&tuned);
    let l1 = |d: &[f32]| d.iter().map(|x| x.abs() as f64).sum::<f64>();
    for method in ["dare_linear", "della_linear"] {
        let yaml = format!("merge_method: {method}\nbase_model: a\nmodels:\n  - model: b\n    parameters: {{weight: 1, density: 0.3, epsilon: 0.1}}\n");
        let yaml = if method == "dare_linear" {
            yaml.replace(", epsilon: 0.1", "")
        } else {
            yaml
        };
        let merged = run(&yaml, method);
        let d = delta(&merged);
        let kept = d.iter().filter(|x| x.abs() > 1e-7).count() as f64 / n as f64;
        // Binomial sd ≈ 0.0023 at n = 40000: 5 sd.
        assert!((kept - 0.3).abs() < 0.012, "{method}: kept {kept}");
        // rescale (on by default) matches the delta's L1 norm.
        let ratio = l1(&d) / l1(&full);
        assert!((ratio - 1.0).abs() < 1e-3, "{method}: L1 ratio {ratio}");
        // Kept entries are the delta scaled by one factor.
        let s = l1(&full)
            / l1(&full
                .iter()
                .zip(&d)
                .map(|(f, x)| if x.abs() > 1e-7 { *f } else { 0.0 })
                .collect::<Vec<_>>());
        for (f, x) in full.iter().zip(&d) {
            if x.abs() > 1e-7 {
                assert!((x - f * s as f32).abs() < 1e-4, "{method}");
            }
        }
    }
    // The same seed gives the same merge.
    let y = "merge_method: dare_linear\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 1, density: 0.5}\n";
    assert_eq!(run(y, "again1")[name].1, run(y, "again2")[name].1);
}

fn repo_fixture(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
        .to_string_lossy()
        .to_string()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Inputs mergekit cannot read: an NF4 folder and `base+adapter`; and an NF4 output.
#[test]
fn quantized_folders_and_base_plus_adapter_are_inputs() {
    let base = repo_fixture("models/llama");
    let nf4 = repo_fixture("quant/llama-nf4-dq");
    let adapter = repo_fixture("adapters/llama_lora");
    let tmp = tempfile::tempdir().unwrap();
    let dense = read_f32(&Path::new(&base).join("model.safetensors"));
    let q = "model.layers.0.self_attn.q_proj.weight";

    // passthrough of the NF4 folder: dense f32, within NF4's rounding of the f32 model.
    let yaml = format!("merge_method: passthrough\nmodels: [{{model: {nf4}}}]\n");
    let cfg = tmp.path().join("nf4.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = tmp.path().join("from_nf4");
    merge_from_config(&cfg, &out, &ModelMergeOptions::default()).unwrap();
    let got = read_f32(&out.join("model.safetensors"));
    let (shape, v) = &got[q];
    assert_eq!(shape, &dense[q].0);
    let scale = dense[q].1.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = max_abs_diff(v, &dense[q].1);
    assert!(err > 0.0 && err < 0.2 * scale, "nf4 error {err} of {scale}");

    // linear of the base and base+adapter at 0.5 each: base + ΔW/2 on adapted weights.
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - {{model: {base}, parameters: {{weight: 0.5}}}}\n  - {{model: {base}+{adapter}, parameters: {{weight: 0.5}}}}\n"
    );
    let cfg = tmp.path().join("adapter.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = tmp.path().join("with_adapter");
    merge_from_config(&cfg, &out, &ModelMergeOptions::default()).unwrap();
    let got = read_f32(&out.join("model.safetensors"));
    let merged = ferrule::merge::models::inputs::InputModel::open(
        &format!("{base}+{adapter}"),
        &|s: &str| PathBuf::from(s),
    )
    .unwrap();
    let full = merged.read(q).unwrap();
    assert!(
        max_abs_diff(&full, &dense[q].1) > 1e-4,
        "the adapter changes {q}"
    );
    let want: Vec<f32> = full
        .iter()
        .zip(&dense[q].1)
        .map(|(m, b)| 0.5 * m + 0.5 * b)
        .collect();
    assert!(max_abs_diff(&got[q].1, &want) < 1e-6);

    // --quantize nf4: a bitsandbytes folder, with the rounding error reported.
    let spec = ferrule::quant::QuantSpec::new(ferrule::quant::QuantMethod::Nf4, 64, false).unwrap();
    let out = tmp.path().join("nf4_out");
    let report = ferrule::merge::models::merge_quantized(
        &cfg,
        &out,
        &ModelMergeOptions::default(),
        Some(spec),
    )
    .unwrap();
    assert!(report.quantized_tensors > 0);
    let e = report.quantize_error.expect("an error is measured");
    assert!(e.max_abs > 0.0 && e.max_abs < 0.2 * scale, "{e:?}");
    let cfg_out = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg_out.contains("quantization_config"));
    assert!(!tmp.path().join("nf4_out.unquantized").exists());
}

/// A tensor merged in blocks of rows equals the same tensor merged whole, bit for bit, for the
/// methods that need whole-tensor scalars (magnitude ranks, norms, cosines, L1 rescale) and
/// the random ones (their generators carried from block to block), at blocks of 1 row, of 7
/// (which do not divide the 1000 rows) and of 64.
#[test]
fn row_blocks_equal_whole_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, m) in ["base", "a", "b", "c"].iter().enumerate() {
        let mut t = model(i as u32 + 11, 8, 4000);
        // Coarse values: many equal magnitudes, so that ties at the rank cuts are exercised.
        for (_, v) in t.values_mut() {
            v.iter_mut().for_each(|x| *x = (*x * 16.0).round() / 16.0);
        }
        write_model(&tmp.path().join(m), 1, &t);
    }
    let three = "base_model: base\nmodels:\n  - {model: base}\n  - {model: a, parameters: {weight: 0.5, density: 0.3}}\n  - {model: b, parameters: {weight: 0.3, density: 0.6}}\n  - {model: c, parameters: {weight: 0.2, density: 0.45}}\n";
    let yamls = [
        format!("merge_method: ties\n{three}"),
        format!("merge_method: ties\nparameters: {{rescale: true}}\n{three}"),
        format!("merge_method: breadcrumbs\nparameters: {{gamma: 0.05}}\n{three}"),
        format!("merge_method: breadcrumbs_ties\nparameters: {{gamma: 0.1}}\n{three}"),
        format!("merge_method: della\nparameters: {{epsilon: 0.1}}\n{three}"),
        format!("merge_method: dare_ties\n{three}"),
        format!("merge_method: dare_linear\n{three}"),
        "merge_method: model_stock\nbase_model: base\nmodels: [{model: base}, {model: a}, {model: b}, {model: c}]\n".into(),
        "merge_method: model_stock\nparameters: {filter_wise: true}\nbase_model: base\nmodels: [{model: base}, {model: a}, {model: b}]\n".into(),
        "merge_method: slerp\nbase_model: base\nparameters: {t: 0.3}\nmodels: [{model: base}, {model: a}]\n".into(),
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: 0.7}}, {model: b, parameters: {weight: 0.3}}]\n".into(),
    ];
    let name = "model.layers.0.mlp.up_proj.weight";
    for (k, yaml) in yamls.iter().enumerate() {
        let cfg = tmp.path().join(format!("{k}.yaml"));
        std::fs::write(&cfg, yaml).unwrap();
        let run = |block_bytes: usize| {
            let out = tmp.path().join(format!("{k}-{block_bytes}"));
            let opts = ModelMergeOptions {
                seed: 3,
                block_bytes,
                ..Default::default()
            };
            merge_from_config(&cfg, &out, &opts).unwrap();
            read_f32(&out.join("model.safetensors"))
        };
        let whole = run(usize::MAX);
        // Rows of 4 f32: 16 bytes.
        for rows in [1, 7, 64] {
            let blocks = run(16 * rows);
            for (t, (shape, v)) in &whole {
                assert_eq!(&blocks[t].0, shape);
                assert!(
                    blocks[t].1 == *v,
                    "{yaml}: {t} differs in blocks of {rows} rows"
                );
            }
        }
        // The merge is not the base: the masks kept something.
        assert_ne!(
            whole[name].1,
            read_f32(&tmp.path().join("base/model.safetensors"))[name].1
        );
    }
}

/// A GGUF file is an input like a folder: the tiny SmolLM2 exported to an f32 GGUF (names
/// mapped, q/k permuted as llama.cpp stores them) and merged 0.5/0.5 with its own HF folder
/// (weights not normalized, so each input must count) gives the folder's tensors back.
#[test]
fn a_gguf_file_is_an_input() {
    use ferrule::export::gguf::{export_model_gguf, GgufExportOptions, OutType};
    let folder = repo_fixture("models/smollm");
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("smollm.gguf");
    let source = ferrule::model::ModelSource::load(&folder, &candle_core::Device::Cpu).unwrap();
    let options = GgufExportOptions {
        outtype: OutType::F32,
        overwrite: false,
    };
    export_model_gguf(&source, None, &gguf, options).unwrap();
    let yaml = format!(
        "merge_method: linear\nparameters: {{normalize: false}}\nmodels:\n  - {{model: {}, parameters: {{weight: 0.5}}}}\n  - {{model: {folder}, parameters: {{weight: 0.5}}}}\n",
        gguf.display()
    );
    let cfg = tmp.path().join("gguf.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = tmp.path().join("merged");
    merge_from_config(&cfg, &out, &ModelMergeOptions::default()).unwrap();
    let got = read_f32(&out.join("model.safetensors"));
    let want = read_f32(&Path::new(&folder).join("model.safetensors"));
    assert_eq!(got.len(), want.len());
    for (name, (shape, v)) in &want {
        let (s, g) = &got[name];
        assert_eq!(s, shape, "{name}");
        let d = max_abs_diff(g, v);
        assert!(d < 1e-6, "{name}: {d}");
    }
}
