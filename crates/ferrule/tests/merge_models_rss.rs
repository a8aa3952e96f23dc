//! A whole-model merge streams: its peak RSS grows by a few tensors, not by the models, and a
//! tensor larger than the row-block budget by a few blocks, not by the tensor.
//! Alone in its test binary so that no other test shares the process's high-water mark.

use std::path::Path;

use ferrule::merge::models::config::OutDtype;
use ferrule::merge::models::writer::{Entry, ShardWriter};
use ferrule::merge::models::{merge_from_config, ModelMergeOptions};

const TENSORS: usize = 24;
const ELEMENTS: usize = 1 << 20;
/// The embedding: 8192 rows of 2048, 64 MB in f32, sixteen times a layer's tensor.
const EMBED: [usize; 2] = [8192, 2048];
/// Row blocks of 4 MB per input.
const BLOCK_BYTES: usize = 4 << 20;

/// A model of `TENSORS` layers of one 1M-element f32 matrix each, written tensor by tensor.
fn write_model(dir: &Path, seed: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    names.extend((0..TENSORS).map(|i| format!("model.layers.{i}.mlp.up_proj.weight")));
    let entries = names
        .iter()
        .enumerate()
        .map(|(i, n)| Entry {
            name: n.clone(),
            dtype: OutDtype::F32,
            shape: if i == 0 {
                EMBED.to_vec()
            } else {
                vec![1024, ELEMENTS / 1024]
            },
        })
        .collect();
    let mut w = ShardWriter::new(dir, entries, usize::MAX);
    let mut x = seed.wrapping_mul(2654435761) | 1;
    for (i, n) in names.iter().enumerate() {
        let len = if i == 0 {
            EMBED[0] * EMBED[1]
        } else {
            ELEMENTS
        };
        let v: Vec<f32> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as f32 / u32::MAX as f32 - 0.5
            })
            .collect();
        w.write(n, &v).unwrap();
    }
    w.finish().unwrap();
    let cfg = serde_json::json!({"model_type": "llama", "num_hidden_layers": TENSORS});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

fn status_kb(field: &str) -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn peak_rss_is_a_few_tensors_not_the_models() {
    if status_kb("VmHWM:").is_none() {
        eprintln!("no /proc/self/status: skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for (i, m) in ["base", "a", "b", "c"].iter().enumerate() {
        write_model(&tmp.path().join(m), i as u32 + 1);
    }
    let cfg = tmp.path().join("merge.yaml");
    std::fs::write(
        &cfg,
        "merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 0.5, density: 0.5}}\n  - {model: b, parameters: {weight: 0.3, density: 0.5}}\n  - {model: c, parameters: {weight: 0.2, density: 0.5}}\n",
    )
    .unwrap();
    // Reset the high-water mark to the current RSS (Linux ≥ 4.0).
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        eprintln!("cannot reset the peak RSS: skipped");
        return;
    }
    let before = status_kb("VmRSS:").unwrap();
    let out = tmp.path().join("out");
    let options = ModelMergeOptions {
        block_bytes: BLOCK_BYTES,
        ..Default::default()
    };
    merge_from_config(&cfg, &out, &options).unwrap();
    let grew_mb = (status_kb("VmHWM:").unwrap().saturating_sub(before)) as f64 / 1024.0;
    let mb = |elements: usize| (elements * 4) as f64 / (1 << 20) as f64;
    let (tensor_mb, embed_mb) = (mb(ELEMENTS), mb(EMBED[0] * EMBED[1]));
    let model_mb = tensor_mb * TENSORS as f64 + embed_mb;
    eprintln!(
        "peak RSS grew {grew_mb:.0} MB merging 4 models of {model_mb:.0} MB (largest tensor {embed_mb:.0} MB, row blocks {} MB, other tensors {tensor_mb:.0} MB)",
        BLOCK_BYTES >> 20
    );
    // A layer's tensor (one block) merged whole: 4 inputs + the sum, signs and ranking
    // scratch, about 12 tensors with allocator slack. The embedding in blocks holds as much
    // per block; whole, its 4 inputs alone would be 256 MB.
    assert!(
        grew_mb < 20.0 * tensor_mb && grew_mb < embed_mb * 1.5,
        "peak RSS grew {grew_mb:.0} MB"
    );
    assert!(out.join("model.safetensors").is_file());
}
