//! An `adapter_config.json`: its method, its keys, and the method's typed config.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(c) = ferrule::tuners::AdapterConfig::from_json(v) else { return };
    let _ = c.check_keys("fuzz", false);
    for model_type in ["llama", "bert"] {
        let _ = c.resolved(model_type, ferrule::model::Task::CausalLm);
    }
    if let Ok(lora) = c.typed::<ferrule::tuners::lora::LoraConfig>("lora") {
        let _ = lora.validate();
    }
});
