//! Peak-RSS tests' pieces: reading the process's memory figures, and a random Llama large
//! enough that holding it whole shows.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// A field of /proc/self/status in kB (`VmRSS:`, `VmHWM:`), or None off Linux.
pub fn status_kb(field: &str) -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A Llama of `layers` layers, hidden 1024, MLP 4096 and a tied 16384-row vocabulary (64 MB of
/// f32, the largest tensor), random weights, with a LoRA r 8 on every linear.
pub fn write_model_and_adapter(
    dir: &Path,
    layers: usize,
) -> (std::path::PathBuf, std::path::PathBuf) {
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
