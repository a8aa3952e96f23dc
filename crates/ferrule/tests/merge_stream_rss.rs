//! Merging an adapter into a memory-mapped base (`LoadOptions::read_once`, what `ferrule
//! merge` loads) grows peak RSS by about the largest tensor, not by the model (the in-memory
//! merge held the base, every merged weight and every tensor's bytes: 20.9 GB for a 4.3 GB
//! 1.07B Llama). Alone in its test binary so that no other test shares the process's
//! high-water mark.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ferrule::adapted::AdaptedModel;
use ferrule::merge::{merge_to_dir_with, MergeOptions};
use ferrule::model::LoadOptions;

fn status_kb(field: &str) -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A Llama of `layers` layers, hidden 1024, MLP 4096 and a tied 16384-row vocabulary (64 MB of
/// f32, the largest tensor), random weights, with a LoRA r 8 on every linear.
fn write_model_and_adapter(dir: &Path, layers: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let (hidden, inter, vocab) = (1024usize, 4096usize, 16384usize);
    let dev = Device::Cpu;
    let rand = |shape: &[usize]| Tensor::randn(0f32, 0.02, shape, &dev).unwrap();
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let mut tensors = vec![
        (
            "model.embed_tokens.weight".to_string(),
            rand(&[vocab, hidden]),
        ),
        (
            "model.norm.weight".to_string(),
            Tensor::ones(hidden, DType::F32, &dev).unwrap(),
        ),
    ];
    let linears = [
        ("self_attn.q_proj", hidden, hidden),
        ("self_attn.k_proj", hidden, hidden),
        ("self_attn.v_proj", hidden, hidden),
        ("self_attn.o_proj", hidden, hidden),
        ("mlp.gate_proj", inter, hidden),
        ("mlp.up_proj", inter, hidden),
        ("mlp.down_proj", hidden, inter),
    ];
    let mut lora = vec![];
    for l in 0..layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let t = Tensor::ones(hidden, DType::F32, &dev).unwrap();
            tensors.push((format!("model.layers.{l}.{norm}.weight"), t));
        }
        for (name, out, inp) in linears {
            let path = format!("model.layers.{l}.{name}");
            tensors.push((format!("{path}.weight"), rand(&[out, inp])));
            lora.push((
                format!("base_model.model.{path}.lora_A.weight"),
                rand(&[8, inp]),
            ));
            lora.push((
                format!("base_model.model.{path}.lora_B.weight"),
                rand(&[out, 8]),
            ));
        }
    }
    ferrule::util::atomic::save_safetensors_atomic(
        &model.join("model.safetensors"),
        &tensors,
        None,
    )
    .unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "tie_word_embeddings": true, "hidden_act": "silu",
    });
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    ferrule::util::atomic::save_safetensors_atomic(
        &adapter.join("adapter_model.safetensors"),
        &lora,
        None,
    )
    .unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    });
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    (model, adapter)
}

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
