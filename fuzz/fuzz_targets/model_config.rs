//! A model `config.json`: the family, then the typed decoder or BERT config.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let _ = ferrule::model::config::check(&v);
    let _ = ferrule::model::DecoderConfig::from_json(&v);
    let _ = ferrule::model::BertConfig::from_json(&v);
});
