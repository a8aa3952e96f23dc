//! A JSONL training file in any of the four shapes (text, Alpaca, chat, classification).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(examples) = ferrule::data::parse_jsonl(std::path::Path::new("fuzz.jsonl"), data) {
        let _ = ferrule::data::LabelMap::from_examples(&examples);
    }
});
