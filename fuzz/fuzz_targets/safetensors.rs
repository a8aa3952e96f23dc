//! A safetensors file (header and data) as ferrule reads an adapter or checkpoint, and a
//! `model.safetensors.index.json` naming shards: an error or a value, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferrule::util::atomic::deserialize_safetensors(data, &candle_core::Device::Cpu);
    // The same bytes as an index file beside one shard that is this file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.safetensors.index.json"), data).unwrap();
    let _ = ferrule::model::Weights::from_dir(dir.path(), candle_core::DType::F32, &candle_core::Device::Cpu);
});
