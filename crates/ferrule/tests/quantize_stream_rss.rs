//! `ferrule quantize` of a memory-mapped model (`LoadOptions::read_once`, what the command
//! loads) grows peak RSS by about the largest tensor, not by the model: it used to load the
//! whole model quantized and serialize it into a second copy before writing (14.3 GB for a
//! 7B bf16 folder). Alone in its test binary so that no other test shares the process's
//! high-water mark.

mod common;

use candle_core::Device;
use common::rss::{status_kb, write_model_and_adapter};
use ferrule::model::{LoadOptions, ModelSource};
use ferrule::quant::{QuantMethod, QuantSpec};

#[test]
fn quantizing_a_mapped_model_grows_peak_rss_by_about_the_largest_tensor() {
    if status_kb("VmHWM:").is_none() {
        eprintln!("no /proc/self/status: skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // 8 layers: 604 MB of f32, 68 MB in NF4 with its bf16 embedding.
    let (model, _) = write_model_and_adapter(tmp.path(), 8);
    // Reset the high-water mark to the current RSS (Linux ≥ 4.0).
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        eprintln!("cannot reset the peak RSS: skipped");
        return;
    }
    let before = status_kb("VmRSS:").unwrap();
    let path = model.to_str().unwrap();
    let source =
        ModelSource::load_with(path, &Device::Cpu, LoadOptions::read_once(None, path)).unwrap();
    let spec = QuantSpec::new(QuantMethod::Nf4, 64, true).unwrap();
    let out = tmp.path().join("nf4");
    let report = ferrule::export::quantize_to_dir(&source, &spec, &out).unwrap();
    let grew_mb = status_kb("VmHWM:").unwrap().saturating_sub(before) as f64 / 1024.0;
    let model_mb = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len() as f64
        / 1e6;
    let written_mb = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len() as f64
        / 1e6;
    let largest_mb = 64.0;
    eprintln!("peak RSS grew {grew_mb:.0} MB quantizing a {model_mb:.0} MB model to {written_mb:.0} MB (largest tensor {largest_mb:.0} MB)");
    // The vocabulary table's mapped pages while it is written (rounded to bf16 and widened, a
    // slice at a time), or one MLP matrix's (16 MB) with its codes, and the write buffer:
    // 70 MB measured. The old in-memory path, which held the quantized model and its
    // serialized copy at once, grew 270 MB here and fails this.
    assert!(grew_mb < 1.5 * largest_mb, "peak RSS grew {grew_mb:.0} MB");
    assert!(model_mb > 8.0 * largest_mb);
    assert_eq!(report.quantized_tensors, 8 * 7 + 1);
    let written =
        ferrule::util::atomic::load_safetensors(&out.join("model.safetensors"), &Device::Cpu)
            .unwrap();
    // Per linear: codes, absmax, quant_map, nested_absmax, nested_quant_map, quant_state.
    assert_eq!(written.len(), 2 + 8 * 2 + 8 * 7 * 6);
    drop((source, written));

    // The same model stored in bf16 (as checkpoints are): its values are widened to f32 a
    // piece of rows at a time, so the 32 MB bf16 vocabulary table never stands whole in f32
    // (64 MB) beside its mapped pages. Same process, sequential, the peak reset first.
    let bf16_dir = tmp.path().join("bf16");
    std::fs::create_dir_all(&bf16_dir).unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap();
        if f.file_name() != "model.safetensors" {
            std::fs::copy(f.path(), bf16_dir.join(f.file_name())).unwrap();
        }
    }
    let tensors: Vec<(String, candle_core::Tensor)> =
        ferrule::util::atomic::load_safetensors(&model.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.to_dtype(candle_core::DType::BF16).unwrap()))
            .collect();
    ferrule::util::atomic::save_safetensors_atomic(
        &bf16_dir.join("model.safetensors"),
        &tensors,
        None,
    )
    .unwrap();
    drop(tensors);
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kb("VmRSS:").unwrap();
    let path = bf16_dir.to_str().unwrap();
    let source =
        ModelSource::load_with(path, &Device::Cpu, LoadOptions::read_once(None, path)).unwrap();
    ferrule::export::quantize_to_dir(&source, &spec, &tmp.path().join("nf4-bf16")).unwrap();
    let grew_mb = status_kb("VmHWM:").unwrap().saturating_sub(before) as f64 / 1024.0;
    eprintln!("from bf16: peak RSS grew {grew_mb:.0} MB");
    // The table's 32 MB of mapped pages, a 4 MB piece of it in f32 with its widened copy, and
    // the write buffer. Widened whole (before), the 64 MB f32 copy alone passed this bound.
    assert!(
        grew_mb < 0.75 * largest_mb,
        "from bf16: peak RSS grew {grew_mb:.0} MB"
    );
}
