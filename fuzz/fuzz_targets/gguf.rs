//! A GGUF file: metadata, tensor infos, architecture and shapes (GgufFile::open).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, data).unwrap();
    let _ = ferrule::model::gguf::GgufFile::open(f.path());
});
