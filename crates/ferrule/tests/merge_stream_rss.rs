//! Merging an adapter into a memory-mapped base (`LoadOptions::read_once`, what `ferrule
//! merge` loads) grows peak RSS by about the largest tensor, not by the model (the in-memory
//! merge held the base, every merged weight and every tensor's bytes: 20.9 GB for a 4.3 GB
//! 1.07B Llama). Alone in its test binary so that no other test shares the process's
//! high-water mark.

mod common;

use candle_core::Device;
use common::rss::{status_kb, write_model_and_adapter};
use ferrule::adapted::AdaptedModel;
use ferrule::merge::{merge_to_dir_with, MergeOptions};
use ferrule::model::LoadOptions;

#[test]
fn merging_into_a_mapped_base_grows_peak_rss_by_about_the_largest_tensor() {
    if status_kb("VmHWM:").is_none() {
        eprintln!("no /proc/self/status: skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (model, adapter) = write_model_and_adapter(tmp.path(), 4);
    // Reset the high-water mark to the current RSS (Linux ≥ 4.0).
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        eprintln!("cannot reset the peak RSS: skipped");
        return;
    }
    let before = status_kb("VmRSS:").unwrap();
    let spec = model.to_str().unwrap();
    let m = AdaptedModel::load_with(
        spec,
        Some(&adapter),
        None,
        &Device::Cpu,
        LoadOptions::read_once(None, spec),
    )
    .unwrap();
    let out = tmp.path().join("merged");
    let tuner = m.tuner.as_deref().unwrap();
    merge_to_dir_with(
        &m.source,
        tuner,
        m.model.task,
        &out,
        MergeOptions::default(),
    )
    .unwrap();
    let grew_mb = status_kb("VmHWM:").unwrap().saturating_sub(before) as f64 / 1024.0;
    let model_mb = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len() as f64
        / 1e6;
    let largest_mb = 64.0;
    eprintln!("peak RSS grew {grew_mb:.0} MB merging a LoRA into a {model_mb:.0} MB model (largest tensor {largest_mb:.0} MB)");
    // Loading maps the base and holds the adapter (1.3 MB); merging holds the vocabulary
    // table's mapped pages while they are written, or one merged MLP matrix (16 MB) with its
    // ΔW and bytes, and the write buffer. Loaded in memory, the base alone is the model's size.
    assert!(grew_mb < 2.0 * largest_mb, "peak RSS grew {grew_mb:.0} MB");
    assert!(model_mb > 5.0 * largest_mb);
    // The merged head is the embedding table, tied as before.
    let written =
        ferrule::util::atomic::load_safetensors(&out.join("model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(!written.contains_key("lm_head.weight"));
    assert_eq!(written.len(), 2 + 4 * 9);
}
