//! Times one LoRA training step of a model split into forward, loss and backward, for
//! profiling. Run: `cargo run --release --example step_profile -- MODEL BATCH SEQ`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use ferrule::model::{Inputs, Model, ModelSource, Task};
use ferrule::ops::loss::causal_lm_loss;
use ferrule::tuners::{registry, AdapterConfig, BuildContext};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (model, b, t) = (
        &args[1],
        args[2].parse::<usize>()?,
        args[3].parse::<usize>()?,
    );
    let dev = Device::Cpu;
    let src = ModelSource::load(model, &dev)?;
    let cfg = AdapterConfig::from_json(
        serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    )?;
    let lora = registry::build(
        &cfg,
        BuildContext {
            seed: 0,
            device: &dev,
            weights: None,
            allow_unmatched: false,
            release_base: None,
        },
    )?;
    let m = Model::build(&src, Task::CausalLm, lora.as_ref(), &dev, 0)?;
    lora.finish()?;
    lora.mode().set_training(true);
    let ids = Tensor::arange(0u32, (b * t) as u32, &dev)?
        .reshape((b, t))?
        .affine(1.0, 100.0)?;
    let labels = ids.to_dtype(candle_core::DType::I64)?;
    for rep in 0..3 {
        let t0 = Instant::now();
        let logits = m.forward(&Inputs {
            input_ids: &ids,
            attention_mask: None,
            token_type_ids: None,
        })?;
        let t1 = Instant::now();
        let (loss, _) = causal_lm_loss(&logits, &labels)?;
        let t2 = Instant::now();
        let grads = loss.backward()?;
        let t3 = Instant::now();
        drop(grads);
        drop(logits);
        let t4 = Instant::now();
        println!(
            "rep {rep}: forward {:.2}s  loss {:.2}s  backward {:.2}s  drop {:.2}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t4 - t3).as_secs_f64()
        );
    }
    Ok(())
}
